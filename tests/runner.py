"""Run the real dispatcher for a test: in-process (a task) or as a child process."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
from anyio.abc import Process

from devtools.sandbox.provision import SandboxResources
from dispatcher.daemon.service import Dispatcher
from dispatcher.settings import layout
from dispatcher.settings.config import POOL_FIELDS, Settings, env_name

# Fast loops for tests: short long-polls so shutdown is quick, frequent reconcile.
FAST = {
    "DISPATCHER_RECEIVE_WAIT_SECONDS": "1",
    "DISPATCHER_RECONCILE_INTERVAL": "2",
    "DISPATCHER_START_GRACE": "0.5",
    "DISPATCHER_START_TIMEOUT": "1",
    "DISPATCHER_VISIBILITY_TIMEOUT": "10",
    "DISPATCHER_SHUTDOWN_TIMEOUT": "5",
    "DISPATCHER_HTTP_PORT": "0",
}


def settings_for(resources: SandboxResources, **overrides: Any) -> Settings:
    """Settings of a dispatcher for the sandbox, with test-speed loops."""
    env = {**resources.env(), **FAST}
    return Settings.load(overrides, env=env)


@asynccontextmanager
async def running(
    resources: SandboxResources, endpoint: str | None = None, **overrides: Any
) -> AsyncIterator[Dispatcher]:
    """Run a dispatcher in this process until the block ends (then an orderly stop)."""
    settings = settings_for(resources, **overrides)
    dispatcher = Dispatcher(settings, endpoint_url=endpoint or resources.endpoint)
    async with anyio.create_task_group() as tg:
        await tg.start(partial(dispatcher.run, handle_signals=False))
        try:
            yield dispatcher
        finally:
            dispatcher.stop()


@dataclass
class Child:
    """A dispatcher running as ``python -m dispatcher run``; its log lines are collected."""

    process: Process
    lines: list[dict[str, Any]] = field(default_factory=list)
    ready: anyio.Event = field(default_factory=anyio.Event)
    http_port: int | None = None

    def events(self, name: str) -> list[dict[str, Any]]:
        """Log lines with this event name."""
        return [line for line in self.lines if line.get("event") == name]


async def _collect(child: Child) -> None:
    assert child.process.stderr is not None
    buffer = b""
    async for chunk in child.process.stderr:
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for raw in complete:
            try:
                line = json.loads(raw)
            except ValueError:
                line = {"event": "raw", "text": raw.decode(errors="replace")}
            child.lines.append(line)
            if line.get("event") == "dispatcher.ready":
                child.http_port = line.get("http_port")
                child.ready.set()


@asynccontextmanager
async def child_process(
    resources: SandboxResources,
    extra_env: dict[str, str] | None = None,
    *,
    base_env: dict[str, str] | None = None,
) -> AsyncIterator[Child]:
    """Start the dispatcher CLI as a child process; kill it (SIGKILL) if the block leaves it.
    ``base_env`` replaces the sandbox's variables (e.g. `config_env` for a config file)."""
    env = {
        **os.environ,
        **(resources.env() if base_env is None else base_env),
        **FAST,
        "DISPATCHER_LOG_FORMAT": "json",
        **(extra_env or {}),
    }
    process = await anyio.open_process(
        [sys.executable, "-m", "dispatcher", "run"], env=env, stdout=None
    )
    child = Child(process)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_collect, child)
        try:
            yield child
        finally:
            if process.returncode is None:
                process.kill()
            with anyio.CancelScope(shield=True):
                await process.wait()
            tg.cancel_scope.cancel()


def config_env(resources: SandboxResources, path: str, **extra: str) -> dict[str, str]:
    """Variables of a dispatcher run from config file ``path`` (test-speed loops)."""
    pool_variables = {env_name(f) for f in POOL_FIELDS}
    env = {k: v for k, v in resources.env().items() if k not in pool_variables}
    return {**env, **FAST, "DISPATCHER_CONFIG": path, **extra}


@asynccontextmanager
async def running_config(
    resources: SandboxResources, path: str, **extra: str
) -> AsyncIterator[Dispatcher]:
    """Run a dispatcher from a config file in this process until the block ends."""
    env = config_env(resources, path, **extra)
    loaded = layout.load(env=env)
    dispatcher = Dispatcher(
        loaded.settings, layout=loaded.layout, endpoint_url=resources.endpoint, environ=env
    )
    async with anyio.create_task_group() as tg:
        await tg.start(partial(dispatcher.run, handle_signals=False))
        try:
            yield dispatcher
        finally:
            dispatcher.stop()
