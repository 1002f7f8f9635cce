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

In some seeds (a generator of their own) files have a long D (25-40 s): the first leader
with the longest D then has its lease renewal hang just as it starts a burst of requests
(or just before it); its starts land up to its D later, long after a successor took the
lease, and a successor's listing must wait the D the lease records for it. The D beyond
the default's also widens the checker's window for a lowered limit (a start sent before
it lands within its sender's D).

Whatever each file says, the operator keeps a pool's limit the same everywhere: a change
is put in the parameter and in every file at once (SIGHUP to every process), and recorded
in the history (`sim.parameters.config_record`), so the checker judges each state machine's
limit from one timeline, whichever process starts its executions.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from sim.nemesis import STORM_MAX, Action, EventStorm, Storm
from sim.parameters import config_record, limit_parameter

if TYPE_CHECKING:
    from dispatcher.daemon.service import Dispatcher
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
    long_d_hang: float | None = None  # seconds of a renewal hang of a long-D leader ...
    long_d_burst: tuple[float, int] = (0.0, 0)  # ... and a burst (after, beyond the limit)
    burst_first: bool = False  # the burst first, and the hang once the leader starts it

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

    def burst_work(self, limits: list[int]) -> float:
        """Seconds of work the burst adds (``limits``: of the pools), on one slot."""
        if self.long_d_hang is None:
            return 0.0
        return (max(limits) + self.long_d_burst[1]) * (BURST_SECONDS + 1.0)

    @property
    def last_action(self) -> float:
        """When the last step or hang is carried out."""
        times = [s.at + s.overlap for s in self.steps] + [h.at for h in self.hangs]
        return max(times, default=0.0)

    @property
    def names(self) -> list[str]:
        """For the scenario line of a failing seed."""
        kinds = sorted({h.kind for h in self.hangs})
        if self.long_d_hang is not None:
            kinds.append("long_d_hang")
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


LONG_D_SHARE = 0.5  # of the rolling seeds: some files with a long D (`_long_d`)
LONG_D = (25.0, 30.0, 40.0)
LONG_D_PAIR_SHARE = 0.6  # of the others: a long-D process and a short-D one (`_long_d_pair`)
BURST_SECONDS = 60  # each burst request's run: still running when the late starts land
LONG_D_HANG_SHARE = 0.7  # of those: the lease renewal of a long-D leader hangs as it starts


def _long_d(rng: random.Random, plan: RollingPlan) -> RollingPlan:
    """Now and then some files with a D far longer than the others': a leader with a long D
    whose lease lapses mid-start has its last starts land long after its lease did, past the
    wait of a successor with a short D (or any wait but the longest recorded D + grace).
    ``rng``: a generator of its own, so that the seeds without it draw as before."""
    if rng.random() >= LONG_D_SHARE:
        return _long_d_pair(rng, plan)
    d = rng.choice(LONG_D)
    variants = set(plan.initial) | {s.variant for s in plan.steps}
    long = {v for v in sorted(variants, key=Variant.describe) if rng.random() < 0.5}
    if not long:
        return plan
    hang = rng.uniform(16.0, 40.0) if rng.random() < LONG_D_HANG_SHARE else None
    burst = (rng.uniform(3.0, 9.0), rng.randint(2, 5))

    def longer(v: Variant) -> Variant:
        return dataclasses.replace(v, start_timeout=d) if v in long else v

    return dataclasses.replace(
        plan,
        initial=tuple(longer(v) for v in plan.initial),
        steps=tuple(dataclasses.replace(s, variant=longer(s.variant)) for s in plan.steps),
        long_d_hang=hang,
        long_d_burst=burst if hang is not None else (0.0, 0),
    )


def _long_d_pair(rng: random.Random, plan: RollingPlan) -> RollingPlan:
    """In the other rolling seeds, now and then: the first process with a long D, the
    second with the least D and grace of all files and the same pools (its successor,
    whose own wait is far shorter than the one the lease records), and the renewal hang
    with its burst."""
    if rng.random() >= LONG_D_PAIR_SHARE:
        return plan
    first, second = plan.initial[0], plan.initial[1]
    first = dataclasses.replace(first, start_timeout=rng.choice(LONG_D[1:]))
    second = Variant(
        pools=first.pools,
        in_ssm=tuple(p for p in first.pools if p in second.in_ssm),
        start_timeout=3.0,
        start_grace=10.0,
    )
    return dataclasses.replace(
        plan,
        initial=(first, second, *plan.initial[2:]),
        long_d_hang=rng.uniform(16.0, 40.0),
        long_d_burst=(0.0, rng.randint(2, 5)),
        burst_first=True,
    )


def draw(rng: random.Random, quiet_at: float, long_d: random.Random | None = None) -> RollingPlan:
    """A seed's rolling deploys (``rng``: the scenario's own generator; ``long_d``: the one
    of the long-D files, none without it)."""
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
    plan = RollingPlan(initial, tuple(steps), hangs, lag)
    return plan if long_d is None else _long_d(long_d, plan)


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
        if plan.long_d_hang is not None:
            tg.start_soon(_hang_long_d_leader, run, plan, plan.long_d_hang)


async def _retire(run: Run, step: Step) -> None:
    await anyio.sleep(max(0.0, step.at + step.overlap - run.clock()))
    run.retired.add(step.replaces)
    kind = "crash" if step.crash else "sigterm"
    run.world.history.note(
        run.clock(), "operator", f"deploy: {step.replaces} replaced by {step.node} ({kind})"
    )
    run.kill(Action(run.clock(), kind, step.replaces))


def _leaders(run: Run) -> list[tuple[str, Dispatcher]]:
    return [
        (name.split(".", maxsplit=1)[0], dispatcher)
        for name, dispatcher, _ in run.incarnations.values()
        if dispatcher is not None and dispatcher.role == "leader"
    ]


async def _hang(run: Run, hang: Hang) -> None:
    await anyio.sleep(max(0.0, hang.at - run.clock()))
    leaders = _leaders(run)
    if leaders:
        _hang_now(run, leaders[0][0], hang)


async def _hang_long_d_leader(run: Run, plan: RollingPlan, seconds: float) -> None:
    """The first time a leader with the longest D governs, its lease renewal hangs, and
    just before its lease lapses a burst of requests (more than the limit) comes in: the
    starts it sends then land up to its D later, long after a successor with a shorter D
    took the lease (which must wait the D the lease records before it lists)."""
    longest = max(plan.variant_of(n).start_timeout for n in plan.nodes)
    after, beyond = plan.long_d_burst
    handed = False
    while run.clock() < run.plan.quiet_at * 0.9 - after:
        for node, dispatcher in _leaders(run):
            if not dispatcher.started.is_set():
                continue
            if plan.burst_first and not handed and plan.variant_of(node).start_timeout < longest:
                # The short-D process leads: its renewal hangs once, to hand the lease over.
                handed = True
                _hang_now(run, node, Hang(run.clock(), "renewal", 20.0))
            if plan.variant_of(node).start_timeout == longest:
                if plan.burst_first:
                    _burst(run, plan.variant_of(node).pools[0], beyond)
                    for _ in range(200):  # until it starts some (10 s at most)
                        if dispatcher.intake and dispatcher.intake.stats.in_flight:
                            break
                        await anyio.sleep(0.05)
                _hang_now(run, node, Hang(run.clock(), "renewal", seconds))
                if not plan.burst_first:
                    await anyio.sleep(after)
                    _burst(run, plan.variant_of(node).pools[0], beyond)
                return
        await anyio.sleep(0.5)


def _burst(run: Run, pool_name: str, beyond: int) -> None:
    """``beyond`` requests more than ``pool_name``'s limit, at once, from a producer."""
    rng = random.Random(f"{run.seed}:rolling-long-d-burst")
    pool = next(p for p in run.plan.pools if p.name == pool_name)
    run.world.history.note(run.clock(), "operator", f"burst of requests to {pool_name}")
    for index in range(run.limits[pool_name] + beyond):
        request_id = f"rb{index}"
        body = json.dumps({"req": request_id, "seconds": BURST_SECONDS})
        attributes = run.attributes(rng, pool, request_id)
        run.world.send_request(
            rng.choice(run.queues[pool_name]), body, attributes, request_id=request_id
        )


def _hang_now(run: Run, node: str, hang: Hang) -> None:
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

    run.world.put_parameter(limit_parameter(pool), str(value))
    run.world.put_parameter(config_record(pool), str(value))
    run.limits[pool] = value
    run.write_configs()
    for name, dispatcher, _ in run.incarnations.values():
        if dispatcher is not None:
            run.world.history.note(run.clock(), name, f"SIGHUP (limit {value})")
            dispatcher.reload()


__all__ = ["Hang", "RollingPlan", "Step", "Variant", "born", "draw", "run_rolling", "set_limit"]
