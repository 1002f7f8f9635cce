"""Live limits: SSM parameters re-read on an interval, the config file reloaded on SIGHUP.

The same parameter is how an operator pauses, resumes and drains a pool without a
redeploy (``sfn-dispatcher pause``, in `dispatcher.cli.control`): limit 0 receives nothing and
starts nothing, while running executions finish.

Raising a limit takes effect at once (intake is woken); lowering it never stops a running
execution, it only holds starts until the count falls below (the ledger never evicts).
A value that is not a limit is refused with a log line naming it, and the limit in
force is kept; so is a config file that does not load. Nothing here can crash the loop.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from dispatcher.aws.api import AWS_ERRORS, error_code
from dispatcher.core.shared_limits import SharedLimits
from dispatcher.daemon.metrics import Metrics
from dispatcher.daemon.pool import Pool
from dispatcher.daemon.ratelimit import RateLimiters
from dispatcher.settings.config import (
    LIVE_FIELDS,
    POOL_STRUCTURE,
    PROCESS_FIELDS,
    ConfigError,
    Settings,
    env_name,
    gather,
)
from dispatcher.settings.layout import Layout, PoolConfig, load

if TYPE_CHECKING:
    from types_aiobotocore_ssm import SSMClient

log = structlog.get_logger("dispatcher.limits")

MAX_LIMIT = 100_000
_LIMIT_RE = re.compile(r"^\s*\d{1,9}\s*\Z")


def parse_limit(text: str) -> int:
    """A limit from a parameter's text; ValueError saying what is accepted."""
    if not _LIMIT_RE.match(text) or int(text) > MAX_LIMIT:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise ValueError(f"{shown!r} is not a limit: use a whole number from 0 to {MAX_LIMIT}")
    return int(text)


class LiveLimits:
    """Keeps each pool's limit in step with its SSM parameter and the config file."""

    def __init__(
        self,
        settings: Settings,
        layout: Layout,
        pools: Mapping[str, Pool],
        *,
        ssm: SSMClient | None,
        metrics: Metrics,
        limiters: RateLimiters,
    ) -> None:
        self.settings = settings
        self.layout = layout
        self.pools = pools
        self.ssm = ssm
        self.metrics = metrics
        self.limiters = limiters
        self.overrides: Mapping[str, Any] = {}  # the flags given at start-up
        self.environ: Mapping[str, str] = os.environ
        self._read: set[str] = set()  # pools whose parameter has been read once
        # What of the pools and queues the last reload of the file could not apply: the
        # rules that route, count, name and limit (each needs a restart).
        self.structure_changed: list[str] = []
        self.shared: SharedLimits | None = None  # the named limits, if any

    @property
    def shared_parameters(self) -> dict[str, str]:
        """Parameter name -> named limit, for the named limits whose value lives in SSM."""
        return {n.limit_parameter: n.name for n in self.layout.limits if n.limit_parameter}

    def apply_shared(self, name: str, limit: int, source: str) -> bool:
        """Set a named limit's value (already validated); returns whether it changed. A pool
        whose weight is now above it waits, and the log says so."""
        shared = self.shared
        if shared is None or not shared.set_limit(name, limit):
            return False
        users = shared.users(name)
        log.info(
            "dispatcher.shared_limit_changed",
            limit_name=name,
            source=source,
            limit=limit,
            in_use=shared.in_use(name),
        )
        for pool in users:
            for blocked in shared.blocked(pool):
                if blocked.limit == name:
                    log.warning("dispatcher.pool_blocked", pool=pool, why=blocked.why)
            self.pools[pool].update()  # wakes its intake: a raise lets starts go at once
        return True

    @property
    def parameters(self) -> dict[str, str]:
        """Parameter name -> pool name, for the pools whose limit lives in SSM."""
        return {p.limit_parameter: p.name for p in self.layout.pools if p.limit_parameter}

    def apply(self, pool: Pool, limit: int, source: str) -> bool:
        """Set a pool's limit (already validated); returns whether it changed."""
        before = pool.ledger.limit
        if limit == before:
            return False
        pool.ledger.set_limit(limit)
        pool.update()  # raising wakes intake at once; lowering holds starts back
        self.metrics.limit_updates.labels(pool=pool.name, source=source, result="applied").inc()
        log.info(
            "dispatcher.limit_changed",
            pool=pool.name,
            source=source,
            previous=before,
            limit=limit,
            running=pool.ledger.running_count,
            held_back=max(0, pool.ledger.running_count - limit),
        )
        return True

    def given(self, pool: Pool) -> str:
        """How the limit a pool started with was given: ``--limit 3``, ``DISPATCHER_LIMIT=3``,
        the config file's ``[pools.NAME] limit``, or the default."""
        limit = pool.config.limit
        named = gather(self.overrides, self.environ).names.get("limit")
        if named is not None:
            return f"{named} {limit}" if named.startswith("--") else f"{named}={limit}"
        if self.settings.config is not None:
            return f"[pools.{pool.name}] limit {limit} in {self.settings.config}"
        return f"the default limit {limit}"

    def _first_read(self, pool: Pool, parameter: str, limit: int) -> None:
        """Say once which source sets the limit: a parameter that overrides a limit given
        another way is a warning, so that ``--limit 3`` is never replaced unnoticed."""
        self._read.add(pool.name)
        given = self.given(pool)
        if limit == pool.config.limit:
            log.info("dispatcher.limit_source", pool=pool.name, limit=limit, source=parameter)
            return
        log.warning(
            "dispatcher.limit_overridden",
            pool=pool.name,
            limit=limit,
            source=f"SSM parameter {parameter}",
            overrides=given,
            why="the limit parameter wins once read (pause, resume and drain write it); to "
            f"use {given}, write it to the parameter or unset the limit parameter",
        )

    def _refuse(self, pool: str, source: str, why: str) -> None:
        self.metrics.limit_updates.labels(pool=pool, source=source, result="rejected").inc()
        kept = self.pools[pool].ledger.limit if pool in self.pools else None
        log.error("dispatcher.limit_rejected", pool=pool, source=source, error=why, kept=kept)

    # -- SSM -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Re-read the parameters every interval until cancelled."""
        while True:
            await anyio.sleep(self.settings.limit_refresh_interval)
            await self.refresh_once()

    async def refresh_once(self) -> int:
        """Read every limit parameter once and apply the valid ones; returns how many
        limits changed. A parameter that cannot be read or holds no limit keeps the limit."""
        changed = await self._refresh_shared()
        names = list(self.parameters)
        if not names or self.ssm is None:
            return changed
        for name in names:  # one GetParameter each: the IAM action the template grants
            pool = self.parameters[name]
            try:
                response = await self.ssm.get_parameter(Name=name)
            except AWS_ERRORS as exc:
                missing = error_code(exc) == "ParameterNotFound"
                self._refuse(
                    pool,
                    "ssm",
                    f"parameter {name} does not exist" if missing else f"cannot read {name}: {exc}",
                )
                continue
            try:
                limit = parse_limit(str(response.get("Parameter", {}).get("Value", "")))
            except ValueError as exc:
                self._refuse(pool, "ssm", f"parameter {name}: {exc}")
                continue
            if pool not in self._read:
                self._first_read(self.pools[pool], name, limit)
            changed += self.apply(self.pools[pool], limit, "ssm")
        return changed

    def _reload_shared(self, layout: Layout) -> None:
        """Apply the reloaded values of the named limits no parameter holds."""
        known = set(self.shared.names) if self.shared is not None else set()
        for named in layout.limits:
            if named.limit_parameter is None and named.name in known:
                self.apply_shared(named.name, named.limit, "config")

    async def _refresh_shared(self) -> int:
        """Read every named limit's parameter once; a bad or missing one keeps the value."""
        changed = 0
        for parameter, name in self.shared_parameters.items():
            if self.ssm is None:
                break
            try:
                response = await self.ssm.get_parameter(Name=parameter)
                limit = parse_limit(str(response.get("Parameter", {}).get("Value", "")))
            except (*AWS_ERRORS, ValueError) as exc:
                kept = None if self.shared is None else self.shared.limit(name)
                log.error(  # noqa: TRY400 - the message says it all
                    "dispatcher.limit_rejected",
                    limit_name=name,
                    source="ssm",
                    error=f"parameter {parameter}: {exc}",
                    kept=kept,
                )
                continue
            changed += self.apply_shared(name, limit, "ssm")
        return changed

    # -- the config file -----------------------------------------------------------------

    def reload(self, why: str = "SIGHUP") -> bool:
        """Re-read the config file (SIGHUP, or a new leader before its first start) and
        apply what can change live: limits (where no parameter holds them), per-key limits,
        waiting rooms, shares, the start rate, the reconcile and limit refresh intervals.
        A file that does not load changes nothing; every change that needs a restart
        (pools, queues, ARNs, other process settings) is logged by name, old -> new, and
        left out."""
        if self.settings.config is None:
            log.warning("dispatcher.reload_skipped", why=f"no config file ({env_name('config')})")
            return False
        try:  # the same loader and precedence as at start-up
            loaded = load({**self.overrides, "config": self.settings.config}, self.environ)
        except ConfigError as exc:
            for name in self.pools:
                self._refuse(name, "config", str(exc))
            log.error("dispatcher.reload_failed", error=str(exc), kept="the running config")  # noqa: TRY400 - the message says it all
            return False
        settings, layout = loaded.settings, loaded.layout
        needs_restart = _structural_changes(self.layout, layout)
        self.structure_changed = list(needs_restart)
        live: dict[str, Any] = {}
        for name, before, after in _setting_changes(self.settings, settings):
            if name in LIVE_FIELDS:
                live[name] = after
                log.info("dispatcher.setting_changed", setting=name, previous=before, value=after)
            else:
                needs_restart.append(f"{name} {before!r} -> {after!r}")
        for change in needs_restart:
            log.warning("dispatcher.reload_needs_restart", change=change, why="needs a restart")
        for new in layout.pools:
            pool = self.pools.get(new.name)
            if pool is None or not _same_structure(pool.config, new):
                continue  # logged above: needs a restart
            pool.reconfigure(new)
            if new.limit_parameter is None:
                self.apply(pool, new.limit, "config")
        self._reload_shared(layout)
        try:
            self.limiters.reconfigure(
                rate=settings.start_rate,
                burst=settings.start_burst,
                floor=settings.start_rate_floor,
            )
        except ValueError as exc:  # Settings checks these; belt and braces for a live change
            log.error("dispatcher.start_rate_rejected", error=str(exc))  # noqa: TRY400
        if live:
            self.settings = self.settings.model_copy(update=live)
        self.layout = _merge(self.layout, layout)
        log.info(
            "dispatcher.config_reloaded",
            path=str(self.settings.config),
            why=why,
            not_applied=len(needs_restart),
        )
        return True


def _setting_changes(before: Settings, after: Settings) -> list[tuple[str, Any, Any]]:
    """(name, old, new) of every process setting that differs."""
    return [
        (name, getattr(before, name), getattr(after, name))
        for name in PROCESS_FIELDS  # pools are compared through the layout
        if getattr(before, name) != getattr(after, name)
    ]


_STRUCTURE = (*POOL_STRUCTURE, "uses")
"""Pool settings a reload cannot change (routing, counting and limit source hang on them;
which named limits a pool uses, and its weights)."""


def _same_structure(before: PoolConfig, after: PoolConfig) -> bool:
    return all(getattr(before, attr) == getattr(after, attr) for attr in _STRUCTURE)


def _structural_changes(old: Layout, new: Layout) -> list[str]:
    """What a reload cannot apply without a restart."""
    old_pools = {p.name: p for p in old.pools}
    new_pools = {p.name: p for p in new.pools}
    changes = [f"pool {n} added" for n in sorted(set(new_pools) - set(old_pools))]
    changes += [f"pool {n} removed" for n in sorted(set(old_pools) - set(new_pools))]
    for name in sorted(set(old_pools) & set(new_pools)):
        before, after = old_pools[name], new_pools[name]
        changes += [
            f"pool {name} {a} {getattr(before, a)!r} -> {getattr(after, a)!r}"
            for a in _STRUCTURE
            if getattr(before, a) != getattr(after, a)
        ]
    if old.queues != new.queues:
        changes.append(f"queues {_queues(old)} -> {_queues(new)}")
    old_named = {n.name: n.limit_parameter for n in old.limits}
    new_named = {n.name: n.limit_parameter for n in new.limits}
    if old_named != new_named:
        changes.append(f"named limits or their parameters {old_named} -> {new_named}")
    return changes


def _queues(layout: Layout) -> str:
    return ", ".join(f"{q.url} ({'/'.join(q.pools)})" for q in layout.queues) or "none"


def _merge(old: Layout, new: Layout) -> Layout:
    """The layout in force after a reload: the old structure with the new live values."""
    reloaded = {p.name: p for p in new.pools}
    pools = tuple(
        reloaded[p.name] if p.name in reloaded and _same_structure(p, reloaded[p.name]) else p
        for p in old.pools
    )
    named = {n.name: n for n in new.limits}
    limits = tuple(
        named[n.name] if named.get(n.name, n).limit_parameter == n.limit_parameter else n
        for n in old.limits
    )
    return Layout(pools, old.queues, old.source, limits)
