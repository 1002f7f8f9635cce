"""Scenarios of their own (`sim.buggify.SCENARIO_MARKS`) that replace a seed's pools, load
and operators with one pool fed by one burst: every other knob, fault source, operator
action, parent and extra off."""

from __future__ import annotations

import dataclasses
import random
from typing import TYPE_CHECKING, Any

from sim.extras import ExtrasPlan
from sim.parents import ParentsPlan

if TYPE_CHECKING:
    from sim.harness import Scenario


def one_pool_burst(
    made: Scenario,
    rng: random.Random,
    *,
    limits: tuple[int, ...],
    requests: tuple[int, int],
    burst: tuple[float, float],
    max_seconds: int,
    pool: dict[str, Any],
    **scenario: Any,
) -> Scenario:
    """``made`` with one pool ``p0`` (a limit from ``limits``, no parameter, no priorities,
    and ``pool``'s fields), no lease and no shared queue, a burst of ``requests`` requests
    sent within ``burst`` seconds, each running up to ``max_seconds``, quiet from 300 s on,
    and nothing else (``scenario``: more fields of the plan)."""
    from sim.token_faults import OFF  # noqa: PLC0415 - kept out of the module's imports

    shaped_pool = dataclasses.replace(  # a PoolPlan (sim.harness imports this module)
        made.pools[0],
        name="p0",
        limit=rng.choice(limits),
        parameter=False,
        priorities=False,
        **pool,
    )
    count = rng.randint(*requests)
    times = tuple(sorted(rng.uniform(*burst) for _ in range(count)))
    return dataclasses.replace(
        made,
        pools=(shaped_pool,),
        lease=False,
        shared_queue=False,
        requests=count,
        request_times=times,
        quiet_at=300.0,
        max_seconds=max_seconds,
        parents=ParentsPlan(),
        extras=ExtrasPlan(),
        named=None,
        token_knobs=OFF,
        **scenario,
    )
