"""The dispatcher as a child process (``python -m dispatcher run``), for tests and benchmarks.

Its stderr is read as JSON log lines: ``ready`` is set (and ``http_port`` known) at
``dispatcher.ready``, ``summary`` holds the ``dispatcher.stopped`` line. Tests keep every
line (``keep_lines``) to look for events; benchmarks keep a tail only, since parsing a
line per start would cost the driver the CPU it measures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal, TypeVar

import aiohttp
import anyio
from anyio.abc import Process

RUN = (sys.executable, "-m", "dispatcher", "run")


class DispatcherProcess:
    """A running dispatcher process and what it has said on stderr."""

    def __init__(self, process: Process, *, keep_lines: bool) -> None:
        self.process = process
        self.keep_lines = keep_lines
        self.lines: list[dict[str, Any]] = []  # every line parsed (keep_lines only)
        self.count = 0  # lines seen
        self.tail: deque[str] = deque(maxlen=20)
        self.http_port: int | None = None
        self.ready = anyio.Event()
        self.summary: dict[str, Any] | None = None
        self.closed = anyio.Event()  # its stderr reached end of file

    @property
    def pid(self) -> int:
        """Its process id."""
        return self.process.pid

    def events(self, name: str) -> list[dict[str, Any]]:
        """Log lines with this event name (``keep_lines`` only)."""
        return [line for line in self.lines if line.get("event") == name]

    async def get(self, path: str) -> str:
        """GET ``path`` of its HTTP server (/metrics, /status, ...)."""
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{self.http_port}{path}") as response,
        ):
            return await response.text()

    def _line(self, raw: bytes) -> None:
        self.count += 1
        self.tail.append(raw.decode(errors="replace"))
        if self.keep_lines:
            try:
                line = json.loads(raw)
            except ValueError:
                line = {"event": "raw", "text": raw.decode(errors="replace")}
            self.lines.append(line)
        elif b'"dispatcher.ready"' in raw or b'"dispatcher.stopped"' in raw:
            line = json.loads(raw)
        else:
            return
        if line.get("event") == "dispatcher.ready":
            self.http_port = line.get("http_port")
            self.ready.set()
        elif line.get("event") == "dispatcher.stopped":
            self.summary = line

    async def _read(self) -> None:
        stderr = self.process.stderr
        if stderr is None:  # opened with stderr piped, always
            raise RuntimeError("the dispatcher's stderr is not piped")
        buffer = b""
        async for chunk in stderr:
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for raw in complete:
                self._line(raw)
        self.closed.set()


P = TypeVar("P", bound=DispatcherProcess)


@asynccontextmanager
async def dispatcher_process(
    env: Mapping[str, str],
    *,
    keep_lines: bool = True,
    ready_within: float | None = None,
    leave: Literal["kill", "terminate"] = "kill",
    command: Sequence[str] = RUN,
    kind: type[P],
) -> AsyncIterator[P]:
    """Run ``command`` with exactly ``env`` until the block ends.

    ``kind``: the class of the handle (a subclass adds what its user measures).
    ``ready_within``: wait for ``dispatcher.ready`` first (RuntimeError with its last lines
    if it exits before). Leaving the block kills it (``kill``: SIGKILL, as a crash) or stops
    it in order (``terminate``: SIGTERM, SIGKILL after 30 s) and waits for its last lines.
    """
    process = await anyio.open_process(list(command), env=dict(env), stdout=subprocess.DEVNULL)
    child = kind(process, keep_lines=keep_lines)
    async with anyio.create_task_group() as tg:
        tg.start_soon(child._read)
        try:
            if ready_within is not None:
                with anyio.fail_after(ready_within):
                    while not child.ready.is_set():
                        if process.returncode is not None:
                            raise RuntimeError(
                                "the dispatcher exited before it was ready: "
                                + " | ".join(child.tail)
                            )
                        with anyio.move_on_after(0.2):
                            await child.ready.wait()
            yield child
        finally:
            with anyio.CancelScope(shield=True):
                if process.returncode is None and leave == "terminate":
                    process.terminate()
                    with anyio.move_on_after(30):
                        await process.wait()
                if process.returncode is None:
                    process.kill()
                await process.wait()
                with anyio.move_on_after(5):
                    await child.closed.wait()  # its last lines, the exit summary among them
            tg.cancel_scope.cancel()
