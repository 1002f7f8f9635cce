"""Buggify's ``deep_backlog``: a backlog far deeper than the waiting room, deferred in turn.

A pool holds at most ``max_waiting`` requests in memory; one beyond goes back to its queue,
hidden for about as long as the requests ahead of it (waiting, or deferred before and not
back yet) need to start (docs/pools.md, "The waiting room is bounded"): a deep backlog
comes back in turn, about once per message - each hand-back is a receive, and receives
count towards the queue's redrive policy.

The scenario is of its own (every other knob off, no fault, no operator action, no parent,
no extra, no named limit): one pool of limit 1 or 2 fed by one queue, a per-key limit of 1
over three tenants, a waiting room of 4 (a key's share of it: 2), and a burst of 50 to 60
plain requests of short runs; a request of a key beyond its share goes back. The checker's
``receives`` rule holds each request to `RECEIVE_BOUND` receives before its execution
starts: spaced deferrals stay well under it; deferrals all hidden for the same time come
back together, again and again.

Drawn from a stream of its own (``buggify-deep-backlog-SEED``, `sim.buggify`), planned from
``deep-backlog-SEED``: a seed where it is off runs exactly as before; not where the seed
has parent workflows (it keeps them, as if the knob had not been drawn).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import TYPE_CHECKING

from sim import shaping
from sim.history import OUTSIDE, Execution, History
from sim.violation import Violation

if TYPE_CHECKING:
    from sim.checker import CheckSpec
    from sim.harness import Scenario

LIMITS = (1, 2)
REQUESTS = (50, 60)
BURST = (20.0, 22.0)
MAX_WAITING = 4
MAX_SECONDS = 10
RECEIVE_BOUND = 10
"""Receives of a request before its execution starts, at most (see `check_receives`):
calibrated - spaced deferrals came to at most 8 in the seeds of 0..199 that run the
knob (the first spacings rest on the age of the oldest run, before any has ended), while
deferrals hidden alike came to 12 to 23."""


def shaped(made: Scenario) -> Scenario:
    """The knob's scenario (the seed's pools, load and operators replaced)."""
    if not made.knobs.deep_backlog:
        return made
    return shaping.one_pool_burst(
        made,
        random.Random(f"deep-backlog-{made.seed}"),
        limits=LIMITS,
        requests=REQUESTS,
        burst=BURST,
        max_seconds=MAX_SECONDS,
        pool={"per_key_limit": 1, "max_waiting": MAX_WAITING},
        tenants=3,
    )


def check_receives(
    history: History,
    spec: CheckSpec,
    executions: Mapping[str, list[Execution]],
    request_of: Mapping[str, str],
) -> list[Violation]:
    """``receives`` (``deep_backlog`` seeds, ``spec.receive_bound`` set): no request is
    received more than the bound times before its execution starts. ``executions``:
    request id -> its executions; ``request_of``: message id -> request id."""
    bound = spec.receive_bound
    if bound is None:
        return []
    started: dict[str, float] = {}
    for request_id, found in executions.items():
        starts = [e.first_start for e in found if e.started_by != OUTSIDE]
        if starts:
            started[request_id] = min(starts)
    counts: dict[str, int] = {}
    for receive in history.receives:
        for message_id, _count in receive.messages:
            owner = request_of.get(message_id)
            if owner is not None and owner in started and receive.time < started[owner]:
                counts[owner] = counts.get(owner, 0) + 1
    return [
        Violation(
            "receives",
            started[owner],
            f"request {owner} was received {count} times before it started (at most "
            f"{bound}: a deferral is spaced after the deferrals of its key not back yet)",
        )
        for owner, count in sorted(counts.items())
        if count > bound
    ]
