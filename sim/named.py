"""Named limits in the simulation: a share of the seeds has pools sharing one named limit
with weights, changed live, and the checker judges it from the simulated AWS's records.

The rule (``named_limit``): when a dispatcher's StartExecution took effect, the weighted
sum of the runs of every pool that uses the named limit, running then (outside runs past
their grace, as for a pool's limit), fits the value in force (the highest during the
last ``staleness`` seconds). The weights are configuration: the checker takes them from
the plan, never from the dispatcher.

A seed gets a named limit from its own generator (``named-<seed>``) when `ENABLED`, unless
it runs a rolling deploy (processes governing different pools would each hold the limit
alone: a named limit needs one process to govern every pool that uses it, as documented).
A seed with one pool gets a second one (not when its operator scenarios redrive to the one
queue). Not with parents that set ``HeartbeatSeconds``: children that fill a limit across a
restart go without heartbeats until one ends, as docs/task-tokens.md says of a pool's slots
(and docs/shared-limits.md of a named limit's units).
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from sim.checker import CheckSpec, limit_at, start_sends, window
from sim.history import OUTSIDE, History
from sim.violation import Violation

if TYPE_CHECKING:
    from sim.harness import Run, Scenario

ENABLED = os.environ.get("SIM_NAMED", "1") != "0"
"""Whether seeds may have a named limit (``SIM_NAMED=0``: none, as before they existed)."""
SHARE = 0.3
"""Of the seeds (without a rolling deploy), those with a named limit."""
NAME = "shared-api"
PARAMETER = "/sfn-dispatcher/limits/shared-api"
RECORD = "/sim/config/limits/shared-api"
"""Not read by the dispatcher: the harness records the config file's value here, so the
checker finds the whole timeline in the history (as for a pool's limit)."""


@dataclass(frozen=True)
class NamedPlan:
    """One named limit shared by the seed's pools."""

    limit: int  # the value it starts with (and is put back to when faults stop)
    parameter: bool  # its value lives in SSM (else the config file, changed by SIGHUP)
    weights: tuple[tuple[str, int], ...]  # pool -> units one of its executions takes
    changes: tuple[tuple[float, int], ...] = ()  # (time, value) live changes before quiet

    def weight(self, pool: str) -> int | None:
        """The pool's weight (None: it does not use the named limit)."""
        return dict(self.weights).get(pool)


def draw(seed: int, made: Scenario) -> Scenario:
    """``made`` with the seed's named limit, if it has one."""
    rng = random.Random(f"named-{seed}")
    if not ENABLED or made.extras.rolling is not None or rng.random() >= SHARE:
        return made
    pools = made.pools
    if len(pools) == 1 and (made.extras.cli_redrives or made.extras.move_tasks):
        return made  # they were drawn for one target queue: a second pool has its own
    if any(p.heartbeat_seconds for p in made.parents.parents):
        return made  # children filling a limit across a restart go unheartbeated (documented)
    if len(pools) == 1:
        pools = (*pools, dataclasses.replace(pools[0], name="p1", limit=rng.choice((2, 3))))
    weights = tuple((p.name, rng.choice((1, 1, 2, 3))) for p in pools)
    if all(w == 1 for _, w in weights):  # weights differ: the heavier one must not starve
        weights = (weights[0], (weights[1][0], 2), *weights[2:])
    heaviest = max(w for _, w in weights)
    limit = rng.randint(heaviest, heaviest + 3)
    parameter = rng.random() < 0.5
    # A value below a weight is refused in the file (a restart would not start): only the
    # parameter, read live, may drop below one (that pool then waits).
    values = (0, 1, heaviest, heaviest + 1, limit + 2) if parameter else (0, heaviest, limit + 2)
    changes = tuple(
        sorted(
            (rng.uniform(0, made.quiet_at * 0.9), rng.choice(values))
            for _ in range(rng.choice((0, 1, 2, 3)))
        )
    )
    plan = NamedPlan(limit=limit, parameter=parameter, weights=weights, changes=changes)
    return dataclasses.replace(made, pools=pools, named=plan)


# -- the config file -------------------------------------------------------------------------


def limit_lines(plan: NamedPlan | None, value: int) -> list[str]:
    """The ``[limits.NAME]`` table (``value``: what the file says now)."""
    if plan is None:
        return []
    lines = [f"[limits.{NAME}]", f"limit = {value}"]
    if plan.parameter:
        lines.append(f'limit_parameter = "{PARAMETER}"')
    return lines


def pool_lines(plan: NamedPlan | None, pool: str) -> list[str]:
    """A pool's ``uses`` line, if it uses the named limit."""
    weight = None if plan is None else plan.weight(pool)
    return [] if weight is None else [f"uses = {{ {NAME} = {weight} }}"]


def setup(run: Run) -> None:
    """Create the parameter and the config record the timeline is read from."""
    plan = run.plan.named
    if plan is None:
        return
    if plan.parameter:
        run.world.put_parameter(PARAMETER, str(plan.limit))
    run.world.put_parameter(RECORD, str(plan.limit))


def least(plan: NamedPlan | None, pools: Mapping[str, int]) -> int:
    """The fewest executions of one pool that may run at once (``pools``: their limits),
    once the named limit is back to its value: what the settle bound divides by."""
    fewest = min(pools.values()) or 1
    if plan is None:
        return fewest
    for pool, weight in plan.weights:
        fewest = min(fewest, max(1, min(pools[pool], plan.limit // weight)))
    return max(1, fewest)


# -- the operator ------------------------------------------------------------------------------


async def run_changes(run: Run) -> None:
    """Change the named limit at the plan's times; put it back when faults stop."""
    plan = run.plan.named
    if plan is None:
        return
    for at, value in (*plan.changes, (run.plan.quiet_at, plan.limit)):
        await anyio.sleep(max(0.0, at - run.clock()))
        run.world.history.note(run.clock(), "operator", f"named limit {NAME} -> {value}")
        if plan.parameter:
            run.world.put_parameter(PARAMETER, str(value))
            continue
        run.named_limit = value
        run.write_configs()
        run.world.put_parameter(RECORD, str(value))
        for name, dispatcher, _ in list(run.incarnations.values()):
            if dispatcher is not None:
                run.world.history.note(run.clock(), name, f"SIGHUP (named limit {value})")
                dispatcher.reload()


# -- the rule ----------------------------------------------------------------------------------


def check(
    history: History, plan: NamedPlan | None, arns: Mapping[str, str], spec: CheckSpec
) -> list[Violation]:
    """``named_limit``: every start fits the weighted use under the value in force."""
    if plan is None:
        return []
    timeline = history.limit_timeline(PARAMETER if plan.parameter else RECORD, plan.limit)
    points: list[tuple[float, int, int, int, str]] = []  # (at, kind, seq, weight, name)
    for pool, weight in plan.weights:
        for execution, run in history.runs_of(arns[pool]):
            outside = run.started_by == OUTSIDE
            counted_from = run.start + spec.outside_grace if outside else run.start
            if run.stop is not None and counted_from > run.stop:
                continue
            points.append((counted_from, 1 if outside else 2, run.seq, weight, execution.name))
            if run.stop is not None:
                end_kind = 0 if run.stop > counted_from else 3
                points.append((run.stop, end_kind, run.seq, -weight, execution.name))
    points.sort(key=lambda p: (p[0], p[1], p[2]))
    sends = start_sends(history)
    units = 0
    found: list[Violation] = []
    for at, kind, _, weight, name in points:
        units += weight
        if kind != 2:
            continue
        allowed = limit_at(timeline, at, window(sends, name, at, spec))
        if units > allowed:
            found.append(
                Violation(
                    "named_limit",
                    at,
                    f"named limit {NAME}: {units} units in use when {name} started "
                    f"(limit {allowed}; weights {dict(plan.weights)})",
                )
            )
    return found


def describe(plan: NamedPlan | None) -> dict[str, Any]:
    """The plan, for a summary."""
    return {} if plan is None else dataclasses.asdict(plan)
