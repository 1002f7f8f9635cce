"""Buggify's ``late_redrives``: a governed execution fails while its pool is full, and an
operator redrives it seconds later, for minutes.

Two redrives a seed, one of each kind, in a drawn order:

- *late news*: the failure's status event is late (EventBridge delivers best effort) by
  longer than the redrive's start plus the checker's grace for outside runs: it arrives
  while the redriven run still runs and is counted against the limit. The ledger has seen
  the redriven run (its RUNNING event, a listing, with its redrive count), so the late
  terminal of the run before the redrive must free nothing.
- *on time*: the failure's event arrives at once (the ledger tombstones the execution)
  and the redriven run runs past the grace: its RUNNING event (or a listing) with a
  higher redrive count must bring it back, counted.

A burst of requests just before (unless another knob set one) keeps the pool full and
requests waiting, so a slot wrongly freed is taken at once. The failure is the
workflow's own (a task error: ``FAILED``), of a running execution the dispatcher started
(seeds with parent workflows are left out: a failed child answers its parent). The knob
draws and plans from streams of its own (``buggify-late-redrives-SEED``,
``late-redrives-SEED``): a seed where it is off runs exactly as before.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from sim import buggify
from sim.aws import EventFault, EventFaults, EventInfo
from sim.history import OUTSIDE

if TYPE_CHECKING:
    from sim.harness import Run

SHARE = 0.3
"""The share of seeds in which the knob is on."""
REDRIVES = 2
"""Redrives a seed plans (one late, one on time)."""
RUN_AFTER_COUNTED = (60.0, 240.0)
"""How long a redriven run goes on after the checker counts it (and after late news)."""


def drawn(seed: int) -> bool:
    """Whether ``seed`` has the knob on (its own stream)."""
    return buggify.own("late-redrives", seed, SHARE)


@dataclass(frozen=True)
class Redrive:
    """One planned failure and redrive."""

    fail_at: float
    late: bool  # the failure's status event arrives after the redriven run is counted
    gap: float  # seconds from the failure to the redrive
    delay: float  # how late the failure's status event is (late only)
    duration: float  # how long the redriven run runs


def plan(seed: int, burst_at: float, outside_grace: float) -> list[Redrive]:
    """The seed's failures and redrives, after a burst of requests at ``burst_at``."""
    rng = random.Random(f"late-redrives-{seed}")
    kinds = [True, False]
    rng.shuffle(kinds)
    planned = []
    at = burst_at
    for late in kinds[:REDRIVES]:
        at += rng.uniform(10.0, 40.0)
        gap = rng.uniform(5.0, 20.0)
        delay = gap + outside_grace + rng.uniform(10.0, 60.0) if late else 0.0
        counted = (delay - gap) if late else outside_grace
        duration = counted + rng.uniform(*RUN_AFTER_COUNTED)
        planned.append(Redrive(at, late, gap, delay, duration))
    return planned


def work(planned: list[Redrive]) -> float:
    """Seconds the planned redriven runs may hold a slot, one after another."""
    return sum(r.gap + r.delay + r.duration for r in planned)


class LateRedrives:
    """Carries out the plan in a run: fails executions, delays or delivers their events,
    redrives them."""

    def __init__(self, run: Run, outside_grace: float) -> None:
        self.run = run
        nemesis = run.nemesis
        if nemesis.burst_at is None:
            nemesis.burst_at = (
                random.Random(f"late-redrives-burst-{run.seed}").uniform(0.05, 0.2)
                * run.plan.quiet_at
            )
        self.planned = plan(run.seed, nemesis.burst_at, outside_grace)
        self._events: dict[str, EventFault] = {}  # ARN -> the fate of its failure's event
        self._faults: EventFaults = run.world.event_faults
        run.world.event_faults = self.event_fault

    def event_fault(self, info: EventInfo) -> EventFault:
        """The planned fate of a failure's event; any other event: the nemesis's."""
        if info.status == "FAILED" and info.redrive_count == 0:
            planned = self._events.pop(info.execution_arn, None)
            if planned is not None:
                return planned
        return self._faults(info)

    async def __call__(self) -> None:
        """Fail and redrive at the planned times (before the faults stop)."""
        async with anyio.create_task_group() as tg:
            for redrive in self.planned:
                await anyio.sleep(max(0.0, redrive.fail_at - self.run.clock()))
                if self.run.clock() >= self.run.plan.quiet_at:
                    return
                arn = self._victim()
                if arn is None:
                    continue
                self._events[arn] = EventFault(delay=redrive.delay)
                history = self.run.world.history
                kind = "late news" if redrive.late else "news on time"
                history.note(self.run.clock(), "operator", f"late_redrives: {arn} fails ({kind})")
                if not self.run.world.stop_outside(arn, status="FAILED"):
                    self._events.pop(arn, None)
                    continue
                tg.start_soon(self._redrive, arn, redrive)

    async def _redrive(self, arn: str, redrive: Redrive) -> None:
        await anyio.sleep(redrive.gap)
        if self.run.world.redrive(arn, redrive.duration):
            note = f"late_redrives: {arn} redriven for {redrive.duration:.0f} s"
            self.run.world.history.note(self.run.clock(), "operator", note)

    def _victim(self) -> str | None:
        """A running execution a dispatcher started, of a governed pool (None: none runs
        now)."""
        governed = set(self.run.arns.values()) - {self.run.arns.get("parents")}
        running = sorted(
            e.arn
            for e in self.run.world.history.executions.values()
            if e.state_machine_arn in governed
            and e.started_by != OUTSIDE
            and len(e.runs) == 1
            and e.runs[0].stop is None
        )
        if not running:
            return None
        return random.Random(f"late-redrives-victim-{self.run.seed}-{len(running)}").choice(running)
