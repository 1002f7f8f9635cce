"""Rolling deploys whose configurations differ (the ``rolling`` operator scenario of
`sim.extras`).

Two or three processes share the lease table, each with its own config file: one
governs ``{p0, p1}``, another only ``{p0}`` (or ``{p1}``); a pool's limit is in the file for
one and in its SSM parameter for another; their D (``start_timeout``) and start grace
differ. A deploy rolls a new configuration out as ECS does: for each running process a
new one is started with the new file, and after an overlap the old one gets SIGTERM (now
and then kill -9) and is not started again. The last deploy governs every pool, so the
run can settle. Meanwhile the leader is frozen past its lease (every call of it held on
the wire, as a paused process's are) or only its lease's ``UpdateItem`` hangs.

Whatever each file says, the operator keeps a pool's limit the same everywhere: a change
is put in the parameter and in every file at once (SIGHUP to every process), and recorded
in the history (`harness._config_record`), so the checker judges each state machine's
limit from one timeline, whichever process starts its executions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from sim.nemesis import STORM_MAX, Action, EventStorm, Storm

if TYPE_CHECKING:
    from sim.harness import Run

POOLS: tuple[str, ...] = ("p0", "p1")
"""The pools a rolling seed has (the harness adds ``p1`` when the seed drew one pool)."""
PROCESS_STARTS = 3.0  # seconds a new process takes before its old one may be stopped
LEASE_HELD = ("UpdateItem",)  # a renewal hang: the lease's writes held, the rest answers
EVENTS_LOST = 30.0  # a renewal hang loses status events until this long after it
LISTING_LAG = 9.5  # just under the least start grace a file has (10 s)


@dataclass(frozen=True)
class Variant:
    """One config file: the pools it governs, which of them read their limit from SSM, its
    D and start grace."""

    pools: tuple[str, ...]
    in_ssm: tuple[str, ...]
    start_timeout: float
    start_grace: float

    @property
    def settings(self) -> dict[str, float]:
        """Its [dispatcher] settings that differ from the run's."""
        return {"start_timeout": self.start_timeout, "start_grace": self.start_grace}

    def describe(self) -> str:
        """A short form for the history and the scenario line."""
        ssm = ",".join(self.in_ssm) or "-"
        return (
            f"pools {{{','.join(self.pools)}}} ssm {{{ssm}}} "
            f"D {self.start_timeout:g} grace {self.start_grace:g}"
        )


@dataclass(frozen=True)
class Step:
    """One process replaced: ``node`` starts with ``variant`` at ``at``; ``replaces`` gets
    SIGTERM (or kill -9: ``crash``) ``overlap`` seconds later and stays down."""

    at: float
    node: str
    variant: Variant
    replaces: str
    overlap: float
    crash: bool = False


@dataclass(frozen=True)
class Hang:
    """At ``at``, the leader (when there is one) freezes for ``seconds``: ``freeze``, every
    call of it held; ``renewal``, only its lease writes, while every StartExecution takes
    effect at its sender's D (a degraded network: the last starts of the leader whose
    lease lapses land late, within its D) and status events are lost."""

    at: float
    kind: str  # freeze | renewal
    seconds: float


@dataclass(frozen=True)
class RollingPlan:
    """The processes at the start, the deploys that replace them, the hangs."""

    initial: tuple[Variant, ...]  # d1, d2 (, d3)
    steps: tuple[Step, ...]
    hangs: tuple[Hang, ...]
    listing_lag: float | None = None  # the run's listing lag, when this plan sets it

    @property
    def nodes(self) -> tuple[str, ...]:
        """Every process slot of the run, in order of birth."""
        return tuple(f"d{i + 1}" for i in range(len(self.initial))) + tuple(
            s.node for s in self.steps
        )

    def variant_of(self, node: str) -> Variant:
        """The config file of ``node``."""
        born = {s.node: s.variant for s in self.steps}
        if node in born:
            return born[node]
        return self.initial[int(node[1:]) - 1]

    def born_at(self, node: str) -> float:
        """When ``node`` is first started (0: at the start)."""
        return next((s.at for s in self.steps if s.node == node), 0.0)

    @property
    def last_action(self) -> float:
        """When the last step or hang is carried out."""
        times = [s.at + s.overlap for s in self.steps] + [h.at for h in self.hangs]
        return max(times, default=0.0)

    @property
    def names(self) -> list[str]:
        """For the scenario line of a failing seed."""
        kinds = sorted({h.kind for h in self.hangs})
        return [
            f"rolling:{len(self.initial)}p/{len(self.steps)}steps" + "".join(f"+{k}" for k in kinds)
        ]


def _variant(rng: random.Random, *, every_pool: bool) -> Variant:
    pools: tuple[str, ...] = POOLS
    if not every_pool:
        pools = rng.choice((POOLS, POOLS, ("p0",), ("p1",)))
    return Variant(
        pools=pools,
        in_ssm=tuple(p for p in pools if rng.random() < 0.5),
        start_timeout=rng.choice((3.0, 5.0, 15.0)),
        start_grace=rng.choice((10.0, 15.0, 25.0)),
    )


def draw(rng: random.Random, quiet_at: float) -> RollingPlan:
    """A seed's rolling deploys (``rng``: the scenario's own generator)."""
    initial = tuple(_variant(rng, every_pool=False) for _ in range(rng.choice((2, 2, 3))))
    if all(v.pools == initial[0].pools for v in initial):  # differing pool sets, mostly
        initial = (initial[0], _variant(rng, every_pool=False), *initial[2:])
    live = [f"d{i + 1}" for i in range(len(initial))]
    born = len(live)
    steps: list[Step] = []
    at = rng.uniform(0.1, 0.7) * quiet_at
    deploys = rng.choice((1, 1, 2))
    for deploy in range(deploys):
        variant = _variant(rng, every_pool=deploy == deploys - 1)
        for old in list(live):
            born += 1
            node = f"d{born}"
            overlap = PROCESS_STARTS + rng.uniform(0.0, 40.0)
            steps.append(Step(at, node, variant, old, overlap, crash=rng.random() < 0.15))
            live[live.index(old)] = node
            at += overlap + rng.uniform(1.0, 30.0)
        at += rng.uniform(30.0, 200.0)
    hangs = tuple(
        sorted(
            (
                Hang(
                    at=rng.uniform(0.0, quiet_at * 0.9),
                    kind=rng.choice(("freeze", "renewal")),
                    seconds=rng.uniform(16.0, 60.0),  # past the lease (15 s)
                )
                for _ in range(rng.randint(1, 3))
            ),
            key=lambda h: h.at,
        )
    )
    # Listings late by up to the least start grace of any file, now and then: a late start
    # of a leader with a long D is then missed by a successor that waits only its own.
    lag = rng.choice((None, None, LISTING_LAG))
    return RollingPlan(initial, tuple(steps), hangs, lag)


# -- carried out during a run ------------------------------------------------------------------


async def born(run: Run, node: str) -> None:
    """Wait until ``node`` is started (at once unless a deploy brings it)."""
    plan = run.plan.extras.rolling
    if plan is not None:
        await anyio.sleep(max(0.0, plan.born_at(node) - run.clock()))
        if plan.born_at(node):
            run.world.history.note(
                run.clock(), "operator", f"deploy: {node} with {plan.variant_of(node).describe()}"
            )


async def run_rolling(run: Run, plan: RollingPlan) -> None:
    """Stop each replaced process after its overlap; hang the leader when told."""
    async with anyio.create_task_group() as tg:
        for step in plan.steps:
            tg.start_soon(_retire, run, step)
        for hang in plan.hangs:
            tg.start_soon(_hang, run, hang)


async def _retire(run: Run, step: Step) -> None:
    await anyio.sleep(max(0.0, step.at + step.overlap - run.clock()))
    run.retired.add(step.replaces)
    kind = "crash" if step.crash else "sigterm"
    run.world.history.note(
        run.clock(), "operator", f"deploy: {step.replaces} replaced by {step.node} ({kind})"
    )
    run.kill(Action(run.clock(), kind, step.replaces))


async def _hang(run: Run, hang: Hang) -> None:
    await anyio.sleep(max(0.0, hang.at - run.clock()))
    leaders = [
        name.split(".", maxsplit=1)[0]
        for name, dispatcher, _ in run.incarnations.values()
        if dispatcher is not None and dispatcher.role == "leader"
    ]
    if not leaders:
        return
    node = leaders[0]
    end = min(run.plan.quiet_at, run.clock() + min(hang.seconds, STORM_MAX))
    run.world.history.note(run.clock(), "nemesis", f"{hang.kind} of leader {node} until {end:.3f}")
    if hang.kind == "renewal":
        run.nemesis.late_start_windows.append((run.clock(), end))
        # ... and their status events lost: only the listings tell the successor.
        run.nemesis.event_storms.append(EventStorm(run.clock(), end + EVENTS_LOST, lost=True))
    run.nemesis.storms.append(
        Storm(
            kind="partition",
            start=run.clock(),
            end=end,
            rate=1.0,
            operations=LEASE_HELD if hang.kind == "renewal" else (),
            node=node,
        )
    )


def set_limit(run: Run, pool: str, value: int) -> None:
    """An operator changes ``pool``'s limit everywhere: its parameter and every file (then
    SIGHUP to every process), recorded for the checker."""
    from sim.harness import _config_record, _parameter  # noqa: PLC0415 - the harness imports us

    run.world.put_parameter(_parameter(pool), str(value))
    run.world.put_parameter(_config_record(pool), str(value))
    run.limits[pool] = value
    run.write_configs()
    for name, dispatcher, _ in run.incarnations.values():
        if dispatcher is not None:
            run.world.history.note(run.clock(), name, f"SIGHUP (limit {value})")
            dispatcher.reload()


__all__ = ["Hang", "RollingPlan", "Step", "Variant", "born", "draw", "run_rolling", "set_limit"]
