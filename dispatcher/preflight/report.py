"""The preflight's report: each check, its status, finding and fix, and the table they print."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from dispatcher.aws.api import error_code

if TYPE_CHECKING:
    from dispatcher.preflight.context import Context


class Status(StrEnum):
    """How a check came out; only FAIL makes the exit status 1."""

    OK = "OK"
    FAIL = "FAIL"
    WARN = "WARN"
    INFO = "INFO"
    SKIP = "SKIP"


@dataclass(frozen=True)
class Finding:
    """What one check found: a status, one line of detail, and the fix when it is not OK."""

    status: Status
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class Result:
    """One line of the report: a stable id (for machines), a title, the finding, and what it
    is about when the check runs once per pool or queue (``pool orders``, ``queue x``)."""

    id: str
    title: str
    status: Status
    detail: str
    fix: str = ""
    about: str = ""

    @classmethod
    def of(cls, id_: str, title: str, finding: Finding, about: str = "") -> Result:
        """The line for ``finding``."""
        return cls(id_, title, finding.status, finding.detail, finding.fix, about)

    @property
    def label(self) -> str:
        """The title, with what the line is about."""
        return f"{self.title} [{self.about}]" if self.about else self.title


class Skip(Exception):  # noqa: N818 - a signal ("cannot run"), not an error
    """A check cannot run because something it needs is unset or failed; says which."""


@dataclass(frozen=True)
class Report:
    """Every check's result, in a fixed order."""

    subject: str
    results: tuple[Result, ...]

    @property
    def ok(self) -> bool:
        """True when no check failed (WARN, INFO and SKIP do not fail the preflight)."""
        return all(r.status is not Status.FAIL for r in self.results)

    def counts(self) -> dict[str, int]:
        """How many checks ended in each status."""
        return {s.value: sum(r.status is s for r in self.results) for s in Status}

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document."""
        checks = [{**r.__dict__, "status": r.status.value} for r in self.results]
        return {"ok": self.ok, "subject": self.subject, "counts": self.counts(), "checks": checks}


class Scope(StrEnum):
    """What a check looks at: the process once, each pool, each request queue, or each
    named limit (none when there are none)."""

    PROCESS = "process"
    POOL = "pool"
    QUEUE = "queue"
    LIMIT = "limit"


@dataclass(frozen=True)
class Check:
    """One kind of line of the report: an id, a title, the coroutine that decides it, and
    whether it runs once or once per pool or request queue."""

    id: str
    title: str
    run: Callable[[Context], Awaitable[Finding]]
    scope: Scope = Scope.PROCESS


def text(exc: BaseException) -> str:
    """One line for an AWS error: its code and message."""
    if isinstance(exc, ClientError):
        message = exc.response.get("Error", {}).get("Message", "")
        return f"{error_code(exc)}: {message}" if message else error_code(exc)
    return f"{type(exc).__name__}: {exc}"


def is_denied(exc: BaseException) -> bool:
    """True for an authorisation failure: the call reached AWS, the role lacks a permission."""
    code = error_code(exc)
    return "AccessDenied" in code or code in {"AuthorizationError", "UnauthorizedOperation"}


_COLOURS = {
    Status.OK: "32",
    Status.FAIL: "31",
    Status.WARN: "33",
    Status.INFO: "36",
    Status.SKIP: "2",
}


def render(report: Report, *, colour: bool = False) -> str:
    """The readable table: status, check, detail, and each fix on the lines below."""
    width = max(len(r.label) for r in report.results)
    lines = [f"checking {report.subject}", ""]
    for r in report.results:
        status = f"{r.status.value:<4}"
        if colour:
            status = f"\x1b[{_COLOURS[r.status]}m{status}\x1b[0m"
        lines.append(f"{status}  {r.label:<{width}}  {r.detail}")
        for i, fix in enumerate(r.fix.splitlines()):
            lines.append(" " * (width + 8) + ("fix: " if i == 0 else "     ") + fix)
    counts = ", ".join(f"{n} {s}" for s, n in report.counts().items() if n)
    verdict = "ready" if report.ok else "not ready: fix the FAIL lines and run check again"
    lines += ["", f"{counts}: {verdict}"]
    return "\n".join(lines)
