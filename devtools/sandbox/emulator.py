"""MiniStack as a child process on loopback: found, started, health-checked, never orphaned.

The emulator lives in its own virtualenv (its botocore pin conflicts with aiobotocore), so
it is started as an executable, not imported. Three things keep it from outliving us:
``stop()`` signals its whole process group; on Linux the child asks the kernel for
SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), which covers ``kill -9`` of the
parent; and its state lives in a private temporary directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

import anyio

from dispatcher.errors import AwsSetupError, UserError

EXECUTABLE_ENV = "DISPATCHER_SANDBOX_EMULATOR"
EMULATOR_VENV = ".venv-emulator"
HEALTH_PATH = "/_ministack/health"
_POLL_INTERVAL = 0.05  # waiting on an external process, not synchronising tests
_PR_SET_PDEATHSIG = 1
_SPAWN_ATTEMPTS = 3  # only a picked free port is retried, when another process took it first
# SIGTERM to SIGKILL. MiniStack's SIGTERM handler calls sys.exit(), and the interpreter then
# waits for its non-daemon threads: an execution still RUNNING (a parent waiting for a task
# token) held every stop for the whole grace. Its state is throwaway, so the grace is short.
STOP_GRACE = 2.0


def find_executable() -> Path:
    """Locate the ``ministack`` executable: env variable, ``.venv-emulator`` up the tree, PATH."""
    configured = os.environ.get(EXECUTABLE_ENV)
    if configured:
        path = Path(configured).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return path
        raise UserError(
            f"{EXECUTABLE_ENV}={configured} is not an executable file; "
            "point it at the ministack executable or unset it"
        )
    starts = [Path.cwd(), Path(__file__).resolve().parent]
    for start in starts:
        for directory in (start, *start.parents):
            candidate = directory / EMULATOR_VENV / "bin" / "ministack"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
    on_path = shutil.which("ministack")
    if on_path:
        return Path(on_path)
    raise UserError(
        "the AWS emulator (ministack) was not found: set "
        f"{EXECUTABLE_ENV}=/path/to/ministack, or create {EMULATOR_VENV} in the project "
        "(`make demo` does it), or put ministack on PATH "
        "(`pip install ministack==1.5.33` in a separate virtualenv)"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_in_use_error(host: str, port: int) -> UserError:
    """The one error for a taken port, shared with the CLI."""
    return UserError(f"port {port} is in use on {host}; pass --port N or stop what listens there")


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # The emulator binds with SO_REUSEADDR too: a TIME_WAIT left by a previous run
        # is not "in use".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise port_in_use_error(host, port) from None
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def probe(endpoint: str, timeout: float = 1.0) -> bool:
    """True when the emulator at ``endpoint`` answers its health check."""
    # No proxies: a corporate HTTP_PROXY must not swallow a loopback health check.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(endpoint.rstrip("/") + HEALTH_PATH, timeout=timeout) as response:
            return 200 <= int(response.status) < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


async def wait_healthy(endpoint: str, wait_seconds: float) -> None:
    """Wait until ``endpoint`` answers its health check; UserError after ``wait_seconds``."""
    with anyio.move_on_after(wait_seconds):
        # Polling: the emulator is another process with nothing to wait on but its port.
        while True:
            if await anyio.to_thread.run_sync(probe, endpoint, min(1.0, wait_seconds)):
                return
            await anyio.sleep(_POLL_INTERVAL)
    raise AwsSetupError(  # unreachable: exit 3, not a usage error
        f"no AWS emulator answers at {endpoint}{HEALTH_PATH} after {wait_seconds:g} s; "
        "start it first or check the URL"
    )


def pdeathsig_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when its parent dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    prctl = libc.prctl  # resolved here: the child must not load libraries after fork
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        # The parent may have died between fork and prctl: then no signal will come.
        if os.getppid() != parent:
            os._exit(1)

    return preexec


class Emulator:
    """MiniStack running as a child process on ``host`` (loopback), for the sandbox and tests.

    Start it from a thread that lives as long as the emulator (the main thread, or the
    event loop's): Linux delivers the parent-death signal when the *thread* that started
    the child exits.
    """

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        *,
        executable: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        start_timeout: float = 20.0,
    ) -> None:
        self.host = host
        self._requested_port = port
        self._port = port
        self._executable = Path(executable) if executable is not None else None
        self._extra_env = dict(env or {})
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None

    @property
    def port(self) -> int:
        """The port it listens on (chosen at start when 0 was asked for)."""
        return self._port

    @property
    def endpoint(self) -> str:
        """Its URL, for ``AWS_ENDPOINT_URL``."""
        return f"http://{self.host}:{self._port}"

    @property
    def pid(self) -> int | None:
        """Process id of the running emulator (None when not started)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path | None:
        """Where its output goes (removed by a clean ``stop()``)."""
        return self._workdir / "ministack.log" if self._workdir is not None else None

    def start(self, timeout: float | None = None) -> None:
        """Start the emulator and wait until it is healthy; UserError when it cannot."""
        deadline = time.monotonic() + (timeout or self.start_timeout)
        for attempt in range(_SPAWN_ATTEMPTS):
            self._spawn()
            try:
                while not self._started(deadline):
                    time.sleep(_POLL_INTERVAL)
            except _AddressInUseError:
                self._discard(keep_log=False)
                if self._requested_port != 0 or attempt == _SPAWN_ATTEMPTS - 1:
                    raise port_in_use_error(self.host, self._port) from None
                continue  # lost a race for the port we picked: pick another
            except BaseException:
                self._discard(keep_log=True)
                raise
            return

    def stop(self, timeout: float = STOP_GRACE) -> None:
        """Stop the emulator (SIGTERM, then SIGKILL after ``timeout``) and clean up."""
        self._discard(keep_log=False, timeout=timeout)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        # Spawned on the event loop's thread (see the class docstring); health probes go
        # to worker threads one at a time so that cancellation (Ctrl-C) stays prompt.
        deadline = time.monotonic() + self.start_timeout
        for attempt in range(_SPAWN_ATTEMPTS):
            self._spawn()
            try:
                while True:
                    if await anyio.to_thread.run_sync(self._started, deadline):
                        break
                    await anyio.sleep(_POLL_INTERVAL)
            except _AddressInUseError:
                await anyio.to_thread.run_sync(self._discard, False)
                if self._requested_port != 0 or attempt == _SPAWN_ATTEMPTS - 1:
                    raise port_in_use_error(self.host, self._port) from None
                continue
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self._discard, True)
                raise
            break
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.stop)

    def _started(self, deadline: float) -> bool:
        """One health probe: True when healthy; raises when dead or past ``deadline``."""
        self._check_alive()
        if probe(self.endpoint, timeout=1.0):
            return True
        if time.monotonic() >= deadline:
            raise UserError(
                f"the emulator did not answer {self.endpoint}{HEALTH_PATH} in time; "
                f"its log is {self.log_path}"
            )
        return False

    def _spawn(self) -> None:
        if self._proc is not None:
            raise RuntimeError("the emulator is already running")
        if self._requested_port == 0:
            self._port = free_port(self.host)
        else:
            _check_port_free(self.host, self._port)
        executable = self._executable or find_executable()
        self._workdir = Path(tempfile.mkdtemp(prefix="sfn-dispatcher-emulator-"))
        env = {
            **os.environ,
            "BIND_HOST": self.host,
            "GATEWAY_PORT": str(self._port),
            "LOG_LEVEL": "WARNING",  # no access log per request: quieter and faster
            # Listeners we never use, which would also collide between two emulators.
            "IOT_MTLS_ENABLED": "0",
            "SFTP_ENABLED": "0",
            "PERSIST_STATE": "0",
            "USE_SSL": "0",
            # Its pid file and state go to our private directory, not a shared /tmp name.
            "TMPDIR": str(self._workdir),
            "STATE_DIR": str(self._workdir / "state"),
            # No Docker: the sandbox needs no containers, and MiniStack's boot-time
            # reaper must never touch containers of another MiniStack on this host.
            "DOCKER_HOST": f"unix://{self._workdir / 'no-docker.sock'}",
            **self._extra_env,
        }
        try:
            with (self._workdir / "ministack.log").open("wb") as log:
                self._proc = subprocess.Popen(  # noqa: S603 - our own executable, no shell
                    [str(executable)],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # own process group: stop() signals all of it
                    preexec_fn=pdeathsig_preexec(),  # noqa: PLW1509 - prctl only, no locks
                )
        except OSError as exc:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
            raise UserError(f"cannot start the emulator {executable}: {exc}") from None

    def _check_alive(self) -> None:
        assert self._proc is not None  # noqa: S101 - called only after _spawn
        code = self._proc.poll()
        if code is None:
            return
        tail = self._log_tail()
        if "already in use" in tail:
            raise _AddressInUseError
        raise UserError(
            f"the emulator exited with status {code} before it became healthy: "
            f"{tail or '(no output)'} (log: {self.log_path})"
        )

    def _log_tail(self, lines: int = 5) -> str:
        path = self.log_path
        if path is None or not path.exists():
            return ""
        text = path.read_text(errors="replace").strip().splitlines()
        return " | ".join(line.strip() for line in text[-lines:] if line.strip())

    def _discard(self, keep_log: bool, timeout: float = STOP_GRACE) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_group(proc, timeout)
        if self._workdir is not None and not keep_log:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


def stop_group(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Stop a child started in its own session: SIGTERM its group, SIGKILL after
    ``timeout``; by process group, never by name."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    # Anything it started in its group goes too. The group id cannot be reused while a
    # member is alive, so this never hits a stranger.
    _signal_group(proc.pid, signal.SIGKILL)


class _AddressInUseError(Exception):
    """The emulator exited because its port was taken."""


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)
