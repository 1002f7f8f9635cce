"""Run the real dispatcher for a test: in-process (a task) or as a child process."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import partial
from typing import Any

import anyio

from devtools.child import DispatcherProcess, dispatcher_process
from devtools.sandbox.provision import SandboxResources
from dispatcher.core.shared_limits import SharedLimitConfig
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
    resources: SandboxResources,
    endpoint: str | None = None,
    *,
    shared: SharedLimitConfig | None = None,
    **overrides: Any,
) -> AsyncIterator[Dispatcher]:
    """Run a dispatcher in this process until the block ends (then an orderly stop).
    ``shared``: a named limit its one pool uses (weight 1), as a config file would give."""
    settings = settings_for(resources, **overrides)
    pools = layout.from_settings(settings)
    if shared is not None:
        pool = pools.pools[0].model_copy(update={"uses": {shared.name: 1}})
        pools = replace(pools, pools=(pool,), limits=(shared,))
    dispatcher = Dispatcher(settings, layout=pools, endpoint_url=endpoint or resources.endpoint)
    async with anyio.create_task_group() as tg:
        await tg.start(partial(dispatcher.run, handle_signals=False))
        try:
            yield dispatcher
        finally:
            dispatcher.stop()


Child = DispatcherProcess
"""A dispatcher running as ``python -m dispatcher run``; every log line is kept."""


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
    async with dispatcher_process(env, kind=Child, keep_lines=True, leave="kill") as child:
        yield child


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
