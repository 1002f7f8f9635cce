"""Buggify's ``long_d_takeover`` (rolling seeds with a long-D process and a short-D one,
`sim.rolling._long_d_pair`): the take-over those seeds plan, made to happen.

In those seeds the first process has a long D (30 or 40 s), the second the least D and
grace of all files; the long-D process is to lead, take a burst of requests beyond the
limit, and have its lease renewal hang as it starts them, so that the short-D process
takes the lease over while those starts are on the wire. But the long-D leader waits its
own D + grace (up to 65 s) before it governs, and the deploys, drawn from 0.1 of the run
on, often replace it first; the burst's starts, sent just before the hang, are applied at
once (or refused, or lost, by other knobs); long outside runs may fill the pool. With this
knob (drawn from a stream of its own, ``long-d-takeover-SEED``; on in half of those seeds)
the deploys and the leader's other hangs wait until the take-over is over (`CLEAR` s into
the run), the run lasts at least `QUIET_AT` s, no long outside runs, and every
StartExecution a long-D process sends is held on the wire and applied at its D (its
client times out then) - a degraded front end for that host, within what the dispatcher
assumes (a start lands within D of being sent, or never). A successor that waits only its
own D + grace lists before the burst's starts land, and starts the burst's other requests
(handed back to the queue): over the limit.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sim.calls import CallFault

if TYPE_CHECKING:
    from sim.harness import Scenario

SHARE = 0.5
"""Of the rolling seeds with a long-D pair."""
CLEAR = 220.0
"""Seconds into the run by which the take-over is over: a hand-over (a 20 s renewal hang),
the long-D leader's wait (D + grace, at most 65 s), its burst (10 s at most), its renewal
hang (up to 40 s), the late starts landing (D, up to 40 s), and some margin."""
QUIET_AT = 300.0


def on(seed: int, made: Scenario) -> bool:
    """Whether ``seed`` (its scenario ``made``) has the knob on."""
    from sim.buggify import BUGGIFY  # noqa: PLC0415 - read at call time (--no-buggify)

    plan = made.extras.rolling
    if not BUGGIFY or plan is None or not plan.burst_first or plan.long_d_hang is None:
        return False
    return random.Random(f"long-d-takeover-{seed}").random() < SHARE


def shape(seed: int, made: Scenario) -> Scenario:
    """The scenario with the knob's plan (unchanged when it is off)."""
    if not on(seed, made):
        return made
    plan = made.extras.rolling
    assert plan is not None  # noqa: S101 - `on` checked it
    first = min((s.at for s in plan.steps), default=CLEAR)
    shift = max(0.0, CLEAR - first)
    steps = tuple(dataclasses.replace(s, at=s.at + shift) for s in plan.steps)
    hangs = tuple(h for h in plan.hangs if h.at >= CLEAR)
    rolled = dataclasses.replace(plan, steps=steps, hangs=hangs)
    last = max((s.at + s.overlap for s in steps), default=0.0)
    return dataclasses.replace(
        made,
        quiet_at=max(made.quiet_at, QUIET_AT, last),
        knobs=dataclasses.replace(made.knobs, long_outside=False),
        extras=dataclasses.replace(made.extras, rolling=rolled),
    )


def long_d_nodes(made: Scenario) -> frozenset[str]:
    """The process slots whose file has the longest D (empty: the knob is off)."""
    plan = made.extras.rolling
    if plan is None or not on(made.seed, made):
        return frozenset()
    longest = max(plan.variant_of(n).start_timeout for n in plan.nodes)
    return frozenset(n for n in plan.nodes if plan.variant_of(n).start_timeout == longest)


def faults(
    decide: Callable[[str, str, Any], CallFault], made: Scenario, clock: Callable[[], float]
) -> Callable[[str, str, Any], CallFault]:
    """The run's call faults, with every StartExecution of a long-D process held to its D
    while the faults last (``decide`` as it is when the knob is off)."""
    nodes = long_d_nodes(made)
    if not nodes:
        return decide

    def held(node: str, operation: str, params: Any) -> CallFault:
        slot = node.split(".", maxsplit=1)[0]
        if operation == "StartExecution" and slot in nodes and clock() < made.quiet_at:
            return CallFault(apply_at_deadline=True)
        return decide(node, operation, params)

    return held


__all__ = ["CLEAR", "QUIET_AT", "SHARE", "faults", "long_d_nodes", "on", "shape"]
