"""The container engine the container tests drive: docker, or podman where there is none.

`scripts/image` chooses the engine and builds the images; this module asks it which one it
chose and runs the same engine with the same settings (podman's CONTAINERS_CONF).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "image"
IMAGE = os.environ.get("IMAGE", "sfn-dispatcher:local")
# Stand-ins for the compose stack's registry images, built by `scripts/image standins`.
STANDIN_OVERRIDE = ROOT / "tests" / "containers" / "compose.standins.yaml"

# The container tests build images and start an engine: `make test-containers` runs them.
requires_container_tests = pytest.mark.skipif(
    not os.environ.get("SFN_CONTAINER_TESTS"),
    reason="container tests: run by `make test-containers` (builds the image, needs an engine)",
)

T = TypeVar("T")

# Lines for the end of the session's output (sizes, timings): see conftest.py.
REPORT: list[str] = []


def report(line: str) -> None:
    """Show ``line`` in the session's summary."""
    REPORT.append(line)


@dataclass
class Engine:
    """docker or podman, with the environment `scripts/image` gives it."""

    name: str
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def detect(cls) -> Engine:
        env = dict(os.environ)
        name = subprocess.run(
            [str(SCRIPT), "engine"], capture_output=True, text=True, check=True, env=env
        ).stdout.strip()
        if name == "podman":
            env.setdefault("CONTAINERS_CONF", str(ROOT / "scripts" / "containers.conf"))
        return cls(name, env)

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run ``<engine> args``; AssertionError with its output when it fails."""
        result = subprocess.run(
            [self.name, *args],
            capture_output=True,
            text=True,
            check=False,
            env=self.env,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{self.name} {' '.join(args)} exited {result.returncode}: {result.stderr[-2000:]}"
            )
        return result

    def inspect(self, what: str, kind: str = "container") -> dict[str, Any]:
        """``inspect --type kind what``, parsed."""
        [document] = json.loads(self("inspect", "--type", kind, what).stdout)
        return dict(document)

    def history(self, image: str) -> list[str]:
        """What created each of the image's layers (the Dockerfile's instructions)."""
        result = self("history", "--no-trunc", "--format", "{{.CreatedBy}}", image)
        return result.stdout.splitlines()

    def exit_code(self, container: str) -> int:
        return int(self.inspect(container)["State"]["ExitCode"])

    def logs(self, container: str) -> str:
        result = self("logs", container, check=False)
        return result.stdout + result.stderr


@contextmanager
def containers(engine: Engine) -> Iterator[list[str]]:
    """A list to put started container ids in; each is removed (by id) when the block ends."""
    started: list[str] = []
    try:
        yield started
    finally:
        for container in started:
            engine("rm", "--force", "--volumes", container, check=False)


def http_get(url: str, timeout: float = 3.0) -> tuple[int, bytes]:
    """(status, body); status 0 when nothing answers."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def until(what: str, check: Callable[[], T | None], timeout: float, interval: float = 0.25) -> T:
    """Poll ``check()`` (state in another process) until truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s (last: {result!r})")
        time.sleep(interval)
