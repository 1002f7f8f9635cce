"""The dispatcher as a child process (``python -m dispatcher run``), for CPU and RSS figures.

Its CPU seconds and RSS come from /proc/<pid>, so they are the dispatcher's alone; its
metrics and status come from its own HTTP endpoints.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from bench import prom
from bench.proc import ProcSample, sample
from devtools.child import RUN, DispatcherProcess, dispatcher_process
from devtools.sandbox import SandboxResources


class Child(DispatcherProcess):
    """A running dispatcher process, its CPU and RSS, metrics and status."""

    def sample(self) -> ProcSample:
        """CPU seconds and RSS right now."""
        return sample(self.pid)

    async def metrics(self) -> list[prom.Sample]:
        """Its /metrics, parsed."""
        return prom.from_text(await self.get("/metrics"))

    async def status(self) -> dict[str, Any]:
        """Its /status document (started, finished, running...)."""
        document: dict[str, Any] = json.loads(await self.get("/status"))
        return document


@asynccontextmanager
async def dispatcher_child(
    resources: SandboxResources,
    settings: Mapping[str, object],
    *,
    ready_within: float = 60,
    command: Sequence[str] = RUN,
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
    async with dispatcher_process(
        env,
        keep_lines=False,
        ready_within=ready_within,
        leave="terminate",
        command=command,
        kind=Child,
    ) as child:
        yield child
