"""The dispatcher as a child process (``python -m dispatcher run``), for CPU and RSS figures.

Its CPU seconds and RSS come from /proc/<pid>, so they are the dispatcher's alone; its
metrics and status come from its own HTTP endpoints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import anyio
from anyio.abc import Process

from bench import prom
from bench.proc import ProcSample, sample
from devtools.sandbox import SandboxResources


class Child:
    """A running dispatcher process and what it has said on stderr."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.http_port: int | None = None
        self.ready = anyio.Event()
        self.tail: deque[str] = deque(maxlen=20)
        self.lines = 0
        self.summary: dict[str, Any] | None = None
        self.closed = anyio.Event()  # its stderr reached end of file

    @property
    def pid(self) -> int:
        """Its process id."""
        return self.process.pid

    def sample(self) -> ProcSample:
        """CPU seconds and RSS right now."""
        return sample(self.pid)

    async def _get(self, path: str) -> str:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{self.http_port}{path}") as response,
        ):
            return await response.text()

    async def metrics(self) -> list[prom.Sample]:
        """Its /metrics, parsed."""
        return prom.from_text(await self._get("/metrics"))

    async def status(self) -> dict[str, Any]:
        """Its /status document (started, finished, running...)."""
        document: dict[str, Any] = json.loads(await self._get("/status"))
        return document

    async def _read(self) -> None:
        assert self.process.stderr is not None
        buffer = b""
        async for chunk in self.process.stderr:
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for raw in complete:
                self.lines += 1
                text = raw.decode(errors="replace")
                self.tail.append(text)
                # Parse only the two lines we need: one per start would cost the driver CPU.
                if b'"dispatcher.ready"' in raw:
                    self.http_port = int(json.loads(raw)["http_port"])
                    self.ready.set()
                elif b'"dispatcher.stopped"' in raw:
                    self.summary = json.loads(raw)
        self.closed.set()


@asynccontextmanager
async def dispatcher_child(
    resources: SandboxResources,
    settings: Mapping[str, object],
    *,
    ready_within: float = 60,
    command: Sequence[str] = (sys.executable, "-m", "dispatcher", "run"),
) -> AsyncIterator[Child]:
    """Run the dispatcher CLI for ``resources`` with ``settings`` (field -> value) until exit.

    ``command`` runs another entry point (a variant under evaluation). Leaving the block
    sends SIGTERM (an orderly shutdown), then SIGKILL after 30 s.
    """
    env = {
        **os.environ,
        **resources.env(),
        "DISPATCHER_LOG_FORMAT": "json",
        "DISPATCHER_HTTP_PORT": "0",
        **{f"DISPATCHER_{name.upper()}": str(value) for name, value in settings.items()},
    }
    process = await anyio.open_process(list(command), env=env, stdout=subprocess.DEVNULL)
    child = Child(process)
    async with anyio.create_task_group() as tg:
        tg.start_soon(child._read)
        try:
            with anyio.fail_after(ready_within):
                while not child.ready.is_set():
                    if process.returncode is not None:
                        raise RuntimeError(
                            "the dispatcher exited before it was ready: " + " | ".join(child.tail)
                        )
                    with anyio.move_on_after(0.2):
                        await child.ready.wait()
            yield child
        finally:
            with anyio.CancelScope(shield=True):
                if process.returncode is None:
                    process.terminate()
                    with anyio.move_on_after(30):
                        await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                with anyio.move_on_after(5):
                    await child.closed.wait()  # its last lines, the exit summary among them
            tg.cancel_scope.cancel()


async def wait_until(
    check: Callable[[], Awaitable[bool]], *, within: float, interval: float = 0.5
) -> None:
    """Poll ``check`` until it is true; TimeoutError after ``within`` seconds."""
    with anyio.fail_after(within):
        # Polling: another process's state cannot be waited on any other way.
        while not await check():  # noqa: ASYNC110
            await anyio.sleep(interval)
