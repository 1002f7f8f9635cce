"""Buggify's ``late_running``: every RUNNING event delivered twice, the copy after the end.

EventBridge delivers at least once and in no particular order (docs/testing.md: events are
duplicated and delayed up to 60 s, so reordered). In these seeds every status event is
delivered at once, and each RUNNING event a second time, 0.5 to 3 s after its run ended
(the runs are short: the copy comes within 13 s). The process must not take the copy for a
run that started again: the terminal event it read first leaves a tombstone
(`Ledger.observe_running`). A run taken back in by the copy holds its slot until a
listing misses it past the start grace and a describe frees it - tens of seconds - while
requests wait for that slot. An operator also fails a running execution three times while
the backlog waits and redrives it a moment later, for a few seconds: the redriven run's
terminal event frees its slot only if read with its redrive count
(`Events.apply`).

The scenario is of its own (every other knob off, no fault, no operator action, no parent,
no extra, no named limit): one pool of limit 2 or 3 fed by one queue, no per-key limit, a
burst of plain requests (short runs) that waits in the pool's room. With everything
delivered, the process learns each end within a second or two, so the checker's
``idle_slot`` rule holds it to this: while a request waits (sent `RECEIVE_SLACK` ago and
not started yet), the pool is never below its limit for more than `IDLE_BOUND` seconds.

Drawn from a stream of its own (``buggify-late-running-SEED``, `sim.buggify`), planned
from ``late-running-SEED``: a seed where it is off runs exactly as before; not where the
seed has parent workflows (it keeps them, as if the knob had not been drawn).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING

import anyio

from sim import shaping
from sim.aws import EventFault, EventFaults, EventInfo
from sim.history import OUTSIDE, Execution, History
from sim.violation import Violation

if TYPE_CHECKING:
    from sim.checker import CheckSpec
    from sim.harness import Run, Scenario

LIMITS = (2, 3)
REQUESTS = (20, 30)
BURST = (20.0, 25.0)
"""When the requests are sent (after the process's start-up)."""
MAX_SECONDS = 10
COPY_AFTER_END = (0.5, 3.0)
"""Seconds after its run's end the copy of a RUNNING event comes (within the 60 s)."""
IDLE_BOUND = 8.0
"""Seconds a slot may stay free while a request waits: an end is known within a second or
two here; a run taken back in holds its slot past the start grace (10 s)."""
RECEIVE_SLACK = 2.0
"""A request counts as waiting this long after it was sent (received by then)."""
FAILURES = (30.0, 50.0)
"""An operator fails a running execution at three times in here (the backlog waits)..."""
REDRIVE_AFTER = (1.0, 3.0)
"""...and redrives it this long after..."""
REDRIVE_RUNS = (2.0, 6.0)
"""...for this long: its end (an event with its redrive count) frees its slot."""


def shaped(made: Scenario) -> Scenario:
    """The knob's scenario (the seed's pools, load and operators replaced)."""
    if not made.knobs.late_running:
        return made
    return shaping.one_pool_burst(
        made,
        random.Random(f"late-running-{made.seed}"),
        limits=LIMITS,
        requests=REQUESTS,
        burst=BURST,
        max_seconds=MAX_SECONDS,
        pool={"per_key_limit": None, "max_waiting": 100},
    )


class LateCopies:
    """Delivers every status event at once, and each RUNNING event again after the end;
    fails and redrives a running execution now and then (`operate`)."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.rng = random.Random(f"late-running-copies-{run.seed}")
        self._events: EventFaults = run.world.event_faults
        run.world.event_faults = self.event_fault

    async def operate(self) -> None:
        """Three times while the backlog waits: fail a running execution, redrive it a
        moment later (a redriven run's terminal event frees its slot only with its
        redrive count)."""
        run, history = self.run, self.run.world.history
        rng = random.Random(f"late-running-redrives-{run.seed}")
        for at in sorted(rng.uniform(*FAILURES) for _ in range(3)):
            await anyio.sleep(max(0.0, at - run.clock()))
            running = sorted(
                e.arn
                for e in history.executions.values()
                if e.started_by != OUTSIDE and len(e.runs) == 1 and e.runs[0].stop is None
            )
            if not running:
                continue
            arn = running[rng.randrange(len(running))]
            run.world.stop_outside(arn, status="FAILED")
            history.note(run.clock(), "operator", f"late_running: {arn} fails")
            await anyio.sleep(rng.uniform(*REDRIVE_AFTER))
            if run.world.redrive(arn, rng.uniform(*REDRIVE_RUNS)):
                history.note(run.clock(), "operator", f"late_running: {arn} redriven")

    def event_fault(self, info: EventInfo) -> EventFault:
        """A RUNNING event: a copy after the run's planned end."""
        if info.status != "RUNNING":
            return EventFault()
        execution = self.run.world.sfn.executions.get(info.execution_arn)
        if execution is None or not execution.runs or execution.runs[-1].stop is None:
            return EventFault()
        left = max(0.0, execution.runs[-1].stop - info.time)
        return EventFault(duplicate=True, duplicate_delay=left + self.rng.uniform(*COPY_AFTER_END))


def check_idle(
    history: History, spec: CheckSpec, executions: Mapping[str, list[Execution]]
) -> list[Violation]:
    """``idle_slot`` (``late_running`` seeds, ``spec.idle_bound`` set): while a request
    waits, its pool's slots are all in use within the bound. ``executions``: request id ->
    its executions."""
    bound = spec.idle_bound
    if bound is None or len(spec.pools) != 1:
        return []
    [(machine, pool)] = spec.pools.items()
    sent: dict[str, float] = {}
    for message in history.requests:
        sent[message.request_id] = min(sent.get(message.request_id, math.inf), message.sent_at)
    started: dict[str, float] = {}  # request id -> when its execution began (if it did)
    for request_id, found in executions.items():
        starts = [
            e.first_start
            for e in found
            if e.state_machine_arn == machine and e.started_by != OUTSIDE
        ]
        if starts and request_id in sent:
            started[request_id] = min(starts)
    runs = [
        (run.start, math.inf if run.stop is None else run.stop)
        for e in history.executions.values()
        if e.state_machine_arn == machine
        for run in e.runs
    ]
    waiting = [(sent[r] + RECEIVE_SLACK, started[r]) for r in started]
    points = sorted({t for pair in runs + waiting for t in pair if t != math.inf})
    found_: list[Violation] = []
    idle_since: float | None = None
    for t in points:
        running = sum(1 for start, stop in runs if start <= t < stop)
        pending = sum(1 for since, until in waiting if since <= t < until)
        idle = running < pool.limit and pending > 0
        if idle and idle_since is None:
            idle_since = t
        elif not idle and idle_since is not None:
            if t - idle_since > bound:
                found_.append(
                    Violation(
                        "idle_slot",
                        idle_since,
                        f"{machine}: a slot free from {idle_since:.3f} to {t:.3f} while a "
                        f"request waited (limit {pool.limit}; at most {bound:.0f} s)",
                    )
                )
            idle_since = None
    return found_
