"""What the history holds of parent workflows and their task tokens: each parent's life,
each token it issued (and the request message that carried it), every SendTask* call AWS
served for a token and what it answered, and the children a dispatcher stopped.

The simulated Step Functions (`sim.tokens`) records as it acts; the checker's tests build
the same records by hand. Records go to the history's one time-ordered list (``add``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

AWS = "aws"  # as `sim.history.AWS` (this module is imported by sim.history)
SUCCESS = "SendTaskSuccess"
FAILURE = "SendTaskFailure"
HEARTBEAT = "SendTaskHeartbeat"
ANSWERS = frozenset({SUCCESS, FAILURE})


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A token a parent issued for item ``index``, sent as request ``request_id``."""

    time: float
    token: str
    parent_arn: str
    index: int
    request_id: str
    message_id: str


@dataclass(slots=True)
class Parent:
    """A parent workflow: a Map over ``items`` task-token requests."""

    arn: str
    name: str
    started: float
    items: int
    heartbeat_seconds: float | None
    timeout_seconds: float | None
    tokens: list[IssuedToken] = field(default_factory=list)
    ended: float | None = None
    status: str | None = None
    error: str | None = None
    cause: str | None = None
    expired: str | None = None  # the token whose heartbeat timed out, if that ended it

    def closed_by(self, t: float) -> bool:
        """Whether the parent had ended by ``t``."""
        return self.ended is not None and self.ended <= t


@dataclass(frozen=True, slots=True)
class TokenCall:
    """A SendTask* call AWS served: ``result`` is ``ok`` or the error code it answered."""

    time: float
    node: str
    operation: str
    token: str
    result: str
    output: str | None = None
    error: str | None = None
    cause: str | None = None

    @property
    def accepted(self) -> bool:
        """Whether AWS took it (an answer that ended the token's wait, or a heartbeat)."""
        return self.result == "ok"


@dataclass(frozen=True, slots=True)
class ChildStop:
    """A StopExecution that ended a running execution."""

    time: float
    node: str
    arn: str
    error: str | None
    cause: str | None


def short(arn: str) -> str:
    """The last part of an ARN (as `sim.history.short`)."""
    return re.split(r"[:/]", arn)[-1]


class TokenLog:
    """The token records of one history, and the views the checker reads."""

    def __init__(self, add: Callable[..., Any]) -> None:
        self._add = add
        self.parents: dict[str, Parent] = {}
        self.issued: dict[str, IssuedToken] = {}  # by token
        self.calls: list[TokenCall] = []
        self.stops: list[ChildStop] = []

    def label(self, token: str) -> str:
        """A token as a trace shows it: its parent and item when known."""
        issued = self.issued.get(token)
        if issued is None:
            return f"token {token[:12]}..."
        return f"token {short(issued.parent_arn)}#{issued.index}"

    # -- records -----------------------------------------------------------------------------

    def parent_started(
        self,
        time: float,
        *,
        arn: str,
        items: int,
        heartbeat_seconds: float | None = None,
        timeout_seconds: float | None = None,
    ) -> Parent:
        """A parent workflow started, about to issue ``items`` tokens."""
        parent = Parent(arn, short(arn), time, items, heartbeat_seconds, timeout_seconds)
        self.parents[arn] = parent
        beats = f", HeartbeatSeconds {heartbeat_seconds:g}" if heartbeat_seconds else ""
        limit = f", TimeoutSeconds {timeout_seconds:g}" if timeout_seconds else ""
        self._add(time, AWS, "parent_started", f"parent {parent.name}: {items} items{beats}{limit}")
        return parent

    def token_issued(
        self,
        time: float,
        *,
        token: str,
        parent_arn: str,
        index: int,
        request_id: str,
        message_id: str,
    ) -> IssuedToken:
        """A parent sent request ``request_id`` (message ``message_id``) carrying ``token``."""
        issued = IssuedToken(time, token, parent_arn, index, request_id, message_id)
        self.issued[token] = issued
        self.parents[parent_arn].tokens.append(issued)
        self._add(
            time,
            AWS,
            "token_issued",
            f"{self.label(token)} issued, sent as {message_id} (request {request_id})",
        )
        return issued

    def token_call(
        self,
        time: float,
        node: str,
        *,
        operation: str,
        token: str,
        result: str,
        output: str | None = None,
        error: str | None = None,
        cause: str | None = None,
    ) -> TokenCall:
        """AWS served a SendTask* call for ``token`` and answered ``result``."""
        call = TokenCall(time, node, operation, token, result, output, error, cause)
        self.calls.append(call)
        if call.accepted and operation in ANSWERS:  # the rest: the call's own record says
            what = f" error={error}" if error is not None else ""
            self._add(
                time, node, "token_answered", f"{self.label(token)} ANSWERED {operation}{what}"
            )
        return call

    def parent_ended(
        self,
        time: float,
        arn: str,
        status: str,
        *,
        error: str | None = None,
        cause: str | None = None,
        expired: str | None = None,
    ) -> None:
        """A parent ended (every token answered, a failure, a timeout, an abort)."""
        parent = self.parents[arn]
        parent.ended, parent.status = time, status
        parent.error, parent.cause, parent.expired = error, cause, expired
        why = f" error={error}" if error else ""
        if expired is not None:
            why += f" ({self.label(expired)} got no heartbeat)"
        self._add(time, AWS, "parent_ended", f"parent {parent.name} {status}{why}")

    def child_stopped(
        self, time: float, node: str, arn: str, error: str | None, cause: str | None
    ) -> ChildStop:
        """A StopExecution ended a running execution."""
        stop = ChildStop(time, node, arn, error, cause)
        self.stops.append(stop)
        self._add(time, node, "child_stopped", f"execution {short(arn)} STOPPED error={error}")
        return stop

    # -- views -------------------------------------------------------------------------------

    def answer_of(self, token: str) -> TokenCall | None:
        """The accepted SendTaskSuccess/SendTaskFailure of ``token`` (None: never answered)."""
        for call in self.calls:
            if call.token == token and call.operation in ANSWERS and call.accepted:
                return call
        return None

    def parent_of(self, token: str) -> Parent | None:
        """The parent that issued ``token``."""
        issued = self.issued.get(token)
        return self.parents.get(issued.parent_arn) if issued is not None else None
