"""Buggify's ``key_limit_drops``: a key's starts are lost on the wire while its per-key limit
is lowered.

Pool ``p0`` is keyed with a per-key limit of 2 (three tenants, one of them most of the
requests) and a limit of at least 5 (keys are served round-robin: two starts of one key go
with one of each other key), and a burst of requests comes. From then on every
StartExecution request is lost on the wire (each attempt's outcome unknown: the client
times out at D) until two starts of one key are on the wire; within a second the operator
lowers the per-key limit to 1 (the config file, then SIGHUP; put back when the faults
stop), and the stretch ends 14 to 18 s later. A retry must fit under the new per-key
limit with the key's other start sent (which may run): neither may go, or two of the
key's executions run under a per-key limit of 1. The start retry timeout is at least
40 s: attempts go on past the stretch.

The checker judges the per-key limit against the values the harness records (the
parameter `record` names), after the staleness a lowered limit is allowed. Not with a
rolling deploy (each process's file is its own) nor a ``key_attribute`` reconfiguration.
The knob draws and plans from streams of its own (``buggify-key-limit-drops-SEED``,
``key-limit-drops-SEED``): a seed where it is off runs exactly as before.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import anyio

from sim import buggify
from sim.calls import CallFault
from sim.history import key_tag_of

if TYPE_CHECKING:
    from sim.harness import Run, Scenario

SHARE = buggify.KEY_LIMIT_DROPS_SHARE
"""The share of seeds in which the knob is on."""
POOL = "p0"
KEY_LIMIT = 2
"""The pool's per-key limit before the drop (and after the faults stop)."""
LOWERED = 1
LOST = CallFault(drop_request=True)
MIN_RETRY_TIMEOUT = 40.0
"""The start retry timeout at least: longer than a stretch of lost requests after a start
of the pair was first sent."""


def drawn(seed: int) -> bool:
    """Whether ``seed`` has the knob on (its own stream)."""
    return buggify.own("key-limit-drops", seed, SHARE)


def record(pool: str) -> str:
    """The parameter the harness records a pool's per-key limit in (not read by the
    dispatcher: the checker's timeline)."""
    return f"/sim/config/{pool}/per_key_limit"


def buggified(made: Scenario) -> Scenario:
    """The scenario with the knob's pool, tenants, start retry timeout, and time and
    requests for a burst in the middle of the run."""
    if not made.knobs.key_limit_drops:
        return made
    first = made.pools[0]
    pools = (
        dataclasses.replace(first, limit=max(first.limit, 5), per_key_limit=KEY_LIMIT),
        *made.pools[1:],
    )
    retry = max(float(dict(made.settings)["start_retry_timeout"]), MIN_RETRY_TIMEOUT)
    settings = (*made.settings, ("start_retry_timeout", retry))
    return dataclasses.replace(
        made,
        pools=pools,
        tenants=3,
        settings=settings,
        quiet_at=max(made.quiet_at, 300.0),
        requests=max(made.requests, 40),
    )


PAIR_WITHIN = 5.0
"""Two starts of one key sent this close: both still retrying when the stretch ends."""
GIVE_UP = 20.0
"""A stretch in which no pair of one key's starts comes ends after this long."""


class KeyLimitDrops:
    """Carries out the knob in a run. From a drawn time, every StartExecution request is
    lost (a stretch); once two starts of one key of pool `POOL` are on the wire, the
    per-key limit is lowered within a second and the stretch ends 14 to 18 s later. A
    stretch without such a pair ends after `GIVE_UP` seconds and another begins 10 to 40 s
    later (before the faults stop)."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.rng = random.Random(f"key-limit-drops-{run.seed}")
        self.arm_at = self.rng.uniform(0.05, 0.4) * run.plan.quiet_at
        self.began: float | None = None  # the stretch now (None: none)
        self.ends: float | None = None  # when it ends (None: when no pair came)
        self.sent: dict[str, dict[str, float]] = {}  # key tag -> name -> first sent
        self.lowered_at: float | None = None
        self.lowered = anyio.Event()
        nemesis = run.nemesis
        if nemesis.burst_at is None:
            nemesis.burst_at = self.arm_at + self.rng.uniform(0.0, 1.0)
        self.machine = run.arns[POOL]
        self._faults = run.world.faults
        run.world.faults = self.call_fault

    def call_fault(self, node: str, operation: str, params: Mapping[str, Any]) -> CallFault:
        """Inside a stretch every StartExecution request is lost (before any fault the
        nemesis has planned: a start held and applied later would run); else the
        nemesis's."""
        if operation == "StartExecution" and node != "producer" and self._in_stretch(params):
            fired = self.run.nemesis.fired
            fired["key_limit_drop_lost"] = fired.get("key_limit_drop_lost", 0) + 1
            return LOST
        return self._faults(node, operation, params)

    def _in_stretch(self, params: Mapping[str, Any]) -> bool:
        now = self.run.clock()
        if now >= self.run.plan.quiet_at:
            return False
        if self.began is None:
            if self.lowered_at is not None or now < self.arm_at:
                return False
            self.began, self.ends, self.sent = now, None, {}
            self.run.world.history.note(now, "nemesis", "key_limit_drops: starts lost")
        if self.ends is None and now >= self.began + GIVE_UP:
            self.ends = now  # no pair: another stretch later
            self.arm_at = now + self.rng.uniform(10.0, 40.0)
        if self.ends is not None and now >= self.ends:
            self.began = None
            return self._in_stretch(params) if self.lowered_at is None else False
        name = str(params.get("name", ""))
        tag = key_tag_of(name)
        if params.get("stateMachineArn") == self.machine and tag is not None:
            names = self.sent.setdefault(tag, {})
            names.setdefault(name, now)
            pair = [n for n, at in names.items() if now - at <= PAIR_WITHIN]
            if self.lowered_at is None and self.ends is None and len(pair) >= KEY_LIMIT:
                self.lowered_at = now + self.rng.uniform(0.3, 1.0)
                self.ends = self.lowered_at + self.rng.uniform(14.0, 18.0)
                self.lowered.set()
        return True

    async def __call__(self) -> None:
        """Lower the per-key limit when a pair is on the wire; put it back when the faults
        stop."""
        with anyio.move_on_after(max(0.0, self.run.plan.quiet_at - self.run.clock())):
            await self.lowered.wait()
            assert self.lowered_at is not None  # noqa: S101 - set with the event
            await anyio.sleep(max(0.0, self.lowered_at - self.run.clock()))
            self._set(LOWERED)
        if self.lowered_at is not None:
            await anyio.sleep(max(0.0, self.run.plan.quiet_at - self.run.clock()))
            self._set(KEY_LIMIT)

    def _set(self, value: int) -> None:
        run = self.run
        run.key_limits[POOL] = value
        run.write_configs()
        run.world.put_parameter(record(POOL), str(value))
        for name, dispatcher, _ in list(run.incarnations.values()):
            if dispatcher is not None:
                run.world.history.note(run.clock(), name, f"SIGHUP (per-key limit {value})")
                dispatcher.reload()
