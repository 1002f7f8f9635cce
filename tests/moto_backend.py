"""moto as a second, AWS-exact backend: a ``moto_server`` child process on loopback.

moto answers where MiniStack does not as AWS does (a repeated start of a running execution
with success and its ARN; a Wait state's ``SecondsPath`` read as an integer), so a focused
part of the integration suite runs against it too. It sends no EventBridge status events:
the dispatcher progresses by reconcile alone there.

The server runs in its own process group, is stopped by its PID (SIGTERM to the group,
SIGKILL after a deadline), and executes state machines only once asked to through its
config API.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from devtools.sandbox import SandboxResources, provision
from devtools.sandbox.emulator import free_port, pdeathsig_preexec, stop_group

EXECUTE_STATE_MACHINES = {"stepfunctions": {"execute_state_machine": True}}
_CONFIG_PATH = "/moto-api/config"
_START_TIMEOUT = 20.0
_SPAWN_ATTEMPTS = 3  # a picked free port may be taken before moto binds it


def moto_executable() -> Path:
    """``moto_server`` of the interpreter running the tests (the dev extra installs it)."""
    return Path(sys.executable).parent / "moto_server"


def _no_proxy() -> urllib.request.OpenerDirector:
    # A developer's HTTP_PROXY must not swallow loopback calls.
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


class MotoServer:
    """One ``moto_server`` on 127.0.0.1 and a free port, executing state machines."""

    def __init__(self) -> None:
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = Path(tempfile.mkdtemp(prefix="sfn-dispatcher-moto-")) / "moto.log"

    @property
    def endpoint(self) -> str:
        """Its URL, for the clients' ``endpoint_url``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the server, wait until it answers, switch execution on."""
        executable = moto_executable()
        if not executable.exists():
            raise RuntimeError(f"{executable} not found: install the dev extra (moto[server])")
        for attempt in range(_SPAWN_ATTEMPTS):
            self.port = free_port()
            with self._log.open("ab") as log:
                self._proc = subprocess.Popen(
                    [str(executable), "-H", "127.0.0.1", "-p", str(self.port)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # own process group: stop() signals all of it
                    # SIGTERM if pytest itself dies (kill -9), as the sandbox's emulator.
                    preexec_fn=pdeathsig_preexec(),  # noqa: PLW1509 - prctl only, no locks
                )
            if self._wait_answering():
                break
            self._kill()
            if attempt == _SPAWN_ATTEMPTS - 1:
                raise RuntimeError(f"moto_server did not start; its log is {self._log}")
        self.configure(EXECUTE_STATE_MACHINES)

    def _wait_answering(self) -> bool:
        """Poll its config API (another process: nothing to wait on but its port)."""
        assert self._proc is not None
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False  # exited: most likely the port was taken meanwhile
            with (
                contextlib.suppress(urllib.error.URLError, OSError),
                _no_proxy().open(self.endpoint + _CONFIG_PATH, timeout=1) as response,
            ):
                return 200 <= int(response.status) < 300
            time.sleep(0.05)
        return False

    def configure(self, config: dict[str, Any]) -> None:
        """POST moto's config (e.g. `EXECUTE_STATE_MACHINES`)."""
        request = urllib.request.Request(  # noqa: S310 - a loopback http URL we built
            self.endpoint + _CONFIG_PATH,
            data=json.dumps(config).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with _no_proxy().open(request, timeout=5) as response:
            if not 200 <= int(response.status) < 300:
                raise RuntimeError(f"moto config {config} refused: HTTP {response.status}")

    def stop(self) -> None:
        """Stop the server and remove its log."""
        self._kill()
        shutil.rmtree(self._log.parent, ignore_errors=True)

    def _kill(self, timeout: float = 5.0) -> None:
        """SIGTERM its process group, SIGKILL after ``timeout``; by PID, never by name."""
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_group(proc, timeout)


class MotoSandboxFactory(Protocol):
    """Provision a sandbox in the moto server (kwargs as for `provision`)."""

    async def __call__(self, **kwargs: Any) -> SandboxResources:
        """Provision and return the resources."""
        ...


@pytest.fixture(scope="module")
def moto_server() -> Iterator[str]:
    """One moto server for the module's tests; yields its endpoint."""
    server = MotoServer()
    try:
        server.start()
        yield server.endpoint
    finally:
        server.stop()


@pytest.fixture
def moto_sandbox_factory(moto_server: str) -> MotoSandboxFactory:
    """Provision sandboxes (state machine, queues, DLQ, rule) in moto under unique prefixes;
    nothing is deleted: the server and all it holds go at the end of the module."""

    async def make(**kwargs: Any) -> SandboxResources:
        kwargs.setdefault("prefix", f"m-{uuid.uuid4().hex[:10]}")
        return await provision(moto_server, **kwargs)

    return make
