"""One simulation run: the production dispatcher against the simulated AWS, under a
seeded nemesis, on virtual time; then the checker judges the history.

Only the AWS clients are swapped (`Dispatcher(clients=...)`); everything else is the code
that runs in production: settings and the config file, intake, the starter, events,
reconcile, live limits, the lease, the ordered shutdown. A crash drops every in-memory
object of the process (as ``kill -9``): a new `Dispatcher` is built from the config file.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import random
import tempfile
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import anyio
from prometheus_client import CollectorRegistry

from dispatcher.aws.api import AWS_ERRORS, Clients, StartGate
from dispatcher.daemon.metrics import Metrics
from dispatcher.daemon.pool import MAX_DEFER_SECONDS
from dispatcher.daemon.service import Dispatcher
from dispatcher.errors import UserError
from dispatcher.settings import layout
from dispatcher.settings.config import Settings
from sim import (
    backlog,
    buggify,
    exists,
    extras,
    key_limits,
    late_running,
    loop,
    named,
    redrives,
    rolling,
    takeover_wait,
    token_faults,
    twin_waits,
    twins,
)
from sim.aws import World, WorldConfig
from sim.buggify import GRACE_MARGIN, OFF, Knobs
from sim.buggify import draw as draw_knobs
from sim.bugs import Bug
from sim.changes import put_back
from sim.checker import CheckSpec, PoolSpec, Violation, check
from sim.deadlines import Producer as StartBys
from sim.exists import ExistsUnknown
from sim.extras import ExtrasPlan
from sim.key_limits import KeyLimitDrops
from sim.nemesis import SLOW_START_GAP, STORM_MAX, Action, Nemesis, plan
from sim.operators import run_extras
from sim.parameters import config_record, limit_parameter
from sim.parents import ParentsPlan, draw, run_parents, with_retries
from sim.redrives import LateRedrives
from sim.token_rules import SETTLE_KINDS

PARENTS = True
"""Whether a share of the seeds runs parent workflows that ask for children through task
tokens (`sim.parents`)."""

# Settings of every simulated dispatcher (the [dispatcher] table of its config file).
# start_grace must cover the simulated listing lag (an assumption docs/testing.md states).
DISPATCHER = {
    "reconcile_interval": 10.0,
    "start_grace": 10.0,
    "start_timeout": 5.0,
    "start_retry_timeout": 120.0,
    "visibility_timeout": 60,
    "receive_wait_seconds": 20,
    "lease_ttl": 15.0,
    "limit_refresh_interval": 10.0,
    "shutdown_timeout": 20.0,
    "http_port": 0,
}
MAX_RECEIVE_COUNT = 20  # the deploy template's default
STOP_TIMEOUT = 30.0  # ECS: SIGKILL this long after SIGTERM
KEY_ATTRIBUTE = "tenant"
POOL_ATTRIBUTE = "pool"
HEARTBEAT_INTERVAL = 30.0  # the dispatcher's heartbeat_interval when a seed has parents
# After a crash a held token's message comes back within a visibility timeout, a process
# within a stop timeout and 20 s; then a receive, and a heartbeat interval.
HEARTBEAT_GRACE = (
    DISPATCHER["visibility_timeout"]
    + DISPATCHER["receive_wait_seconds"]
    + STOP_TIMEOUT
    + 20.0
    + HEARTBEAT_INTERVAL
)
RESTART_MAX = 20.0  # a process slot starts a new process within this after one ended


@dataclass(frozen=True)
class PoolPlan:
    """One governed state machine of a scenario."""

    name: str
    limit: int
    parameter: bool  # the limit lives in SSM (else: the config file, changed by SIGHUP)
    per_key_limit: int | None  # keyed by the tenant attribute when set
    priorities: bool  # fed by two queues of different priority
    max_waiting: int = 100  # the waiting room (small: requests are deferred)


@dataclass(frozen=True)
class Scenario:
    """What one seed runs: pools, processes, load and how long faults last."""

    seed: int
    pools: tuple[PoolPlan, ...]
    lease: bool  # two dispatchers share the pools through the lease
    shared_queue: bool  # one queue feeds every pool (routed by attribute)
    requests: int
    quiet_at: float
    max_seconds: int  # executions run 0..max_seconds
    settings: tuple[tuple[str, Any], ...] = ()  # this seed's [dispatcher] settings, varied
    tenants: int = 3  # distinct tenants of keyed pools (many: each request its own, mostly)
    listing_lag: float = 2.0  # up to this long before ListExecutions shows a change
    request_times: tuple[float, ...] = ()  # a scripted scenario's send times (else drawn)
    parents: ParentsPlan = field(default_factory=ParentsPlan)  # task-token workflows
    knobs: Knobs = OFF  # buggify: the rare cases made common (`sim.buggify`)
    extras: ExtrasPlan = field(default_factory=ExtrasPlan)  # operator scenarios (sim.extras)
    named: named.NamedPlan | None = None  # a named limit shared by the pools (sim.named)
    token_knobs: token_faults.TokenKnobs = token_faults.OFF  # sim.token_faults


def scenario(seed: int, *, parents: bool | None = None) -> Scenario:
    """The scenario of ``seed`` (``parents``: whether seeds may have parent workflows;
    None: as `PARENTS`)."""
    knobs = draw_knobs(seed)
    made = _drawn(seed, knobs, parents)
    if (knobs.twin_waits and not made.knobs.twin_waits) or (
        knobs.exists_full and not made.knobs.exists_full
    ):
        # A scenario of its own (`buggify.scenario_knobs`) that cannot run here: the seed
        # as if it had not been drawn.
        made = _drawn(seed, buggify.classic(seed), parents)
    elif knobs.late_running or knobs.deep_backlog:
        # Not where the seed has parent workflows (a share of the seeds only): they stay.
        classic = _drawn(seed, buggify.classic(seed), parents)
        if classic.parents.parents:
            made = classic
    return backlog.shaped(late_running.shaped(exists.shaped(made)))


def _drawn(seed: int, knobs: Knobs, parents: bool | None) -> Scenario:
    """The scenario of ``seed`` with ``knobs``, less those that cannot run in it."""
    made = _scenario(seed, knobs, parents)
    if knobs.twin_keeps:
        # Not with parents (their children's requests), rolling deploys or slow starts
        # (their own pools, limits and rates): each twin waits for its first copy's slot
        # (`_twinned` drops the lease). Dropped, the seed is as if it had not been drawn.
        off = dataclasses.replace(knobs, twin_keeps=False, twin_waits=False)
        plain = _scenario(seed, off, parents)
        crowded = plain.parents.parents or plain.extras.rolling is not None
        if crowded or made.extras.rolling is not None or knobs.slow_starts:
            knobs, made = off, plain
    # Not with the lease: a reign that ends (a frozen leader, a renewal lost) lets its kept
    # requests go, hidden, and the redrive policy moves them without a reason - as
    # documented (README, Pools), but not excused by the checker as a crash or a SIGTERM
    # is; with that knob most requests are kept for minutes.
    kept = made.lease and knobs.last_receive_doubts
    # Not with a second pool (a rolling deploy adds one): more starts would wait for their
    # rate tokens than half a visibility timeout covers (see `SLOW_START_GAP`).
    slow = len(made.pools) > 1 and knobs.slow_starts
    if kept or slow:  # the seed as if the knob had not been drawn
        without = dataclasses.replace(
            knobs,
            last_receive_doubts=knobs.last_receive_doubts and not kept,
            slow_starts=knobs.slow_starts and not slow,
        )
        made = _scenario(seed, without, parents)
    reconfigured = any(r.what == "key_attribute" for r in made.extras.reconfigures)
    crowded = any(
        getattr(made.knobs, k)
        for k in ("unknown_starts", "last_receive_doubts", "slow_starts", "twin_keeps")
    )
    heartbeats = any(p.heartbeat_seconds for p in made.parents.parents)
    if made.knobs.key_limit_drops and (
        made.extras.rolling is not None or reconfigured or crowded or heartbeats
    ):
        # Each process's file is the rolling deploy's; a reconfiguration may unkey the pool;
        # knobs whose stretches refuse every retry, or send one start at a time, leave no
        # retry to admit (twin_keeps: its one pool of limit 1 has no per-key limit);
        # heartbeats of tokens across the stretch are another matter.
        without = dataclasses.replace(made.knobs, key_limit_drops=False)
        made = _scenario(seed, without, parents)
    reconfigured = any(r.what == "key_attribute" for r in made.extras.reconfigures)
    if made.knobs.exists_unknown and (
        made.parents.parents or made.extras.rolling is not None or reconfigured
    ):
        # A failed child answers its parent; a rolling deploy's processes are its own; a
        # new key_attribute gives the retry another name.
        without = dataclasses.replace(made.knobs, exists_unknown=False, exists_full=False)
        made = _scenario(seed, without, parents)
    if made.knobs.late_redrives and made.parents.parents:
        # Not with parent workflows (a failed child answers its parent): as if not drawn.
        without = dataclasses.replace(made.knobs, late_redrives=False)
        made = _scenario(seed, without, parents)
    return made


def _scenario(seed: int, knobs: Knobs, parents: bool | None) -> Scenario:
    rng = random.Random(f"scenario-{seed}")
    pools = []
    for index in range(rng.choice((1, 1, 1, 2))):
        limit = rng.choice((1, 1, 2, 3, 5))
        pools.append(
            PoolPlan(
                name=f"p{index}",
                limit=limit,
                parameter=rng.random() < 0.4,
                per_key_limit=rng.choice((None, None, 1, 2)),
                priorities=rng.random() < 0.3,
                max_waiting=rng.choice((100, 100, 2, 4)),
            )
        )
    made = Scenario(
        seed=seed,
        pools=tuple(pools),
        lease=rng.random() < 0.4,
        shared_queue=len(pools) > 1 and rng.random() < 0.5,
        requests=rng.randint(5, 40),
        quiet_at=rng.choice((60.0, 120.0, 300.0)),
        max_seconds=rng.choice((2, 10, 30, 120)),
        settings=(
            ("start_retry_timeout", rng.choice((10.0, 30.0, 120.0))),
            ("reconcile_interval", rng.choice((10.0, 30.0))),
        ),
        tenants=rng.choice((3, 3, 1000)),
        # Up to the start grace the dispatcher assumes (an assumption docs/testing.md states).
        listing_lag=rng.choice((0.0, 2.0, 9.5)),
    )
    made = exists.buggified(key_limits.buggified(_buggified(made, knobs)))
    if PARENTS if parents is None else parents:
        drawn = draw(
            seed,
            pools={p.name: p.limit for p in made.pools},
            quiet_at=made.quiet_at,
            max_seconds=made.max_seconds,
        )
        made = dataclasses.replace(made, parents=drawn)
    if not extras.ENABLED:
        return named.draw(seed, token_faults.shape(seed, made))
    heartbeats = any(p.heartbeat_seconds for p in made.parents.parents)
    chosen = extras.draw(
        seed,
        pools={p.name: p.per_key_limit is not None for p in made.pools},
        one_target=len(made.pools) == 1 or made.shared_queue,
        quiet_at=made.quiet_at,
        parents=bool(made.parents.parents),
        heartbeats=heartbeats and "heartbeat_interval" in Settings.model_fields,
        heartbeat_grace=HEARTBEAT_GRACE,
    )
    if chosen.parent_retries:
        made = dataclasses.replace(made, parents=with_retries(seed, made.parents))
    if chosen.rolling is not None:  # two pools, each fed by its own queues, and the lease
        rolled = made.pools
        if len(rolled) == 1:
            rolled = (*rolled, dataclasses.replace(rolled[0], name="p1", limit=2))
        made = dataclasses.replace(made, pools=rolled, lease=True, shared_queue=False)
        if chosen.rolling.listing_lag is not None:
            made = dataclasses.replace(made, listing_lag=chosen.rolling.listing_lag)
    made = takeover_wait.shape(seed, dataclasses.replace(made, extras=chosen))
    return named.draw(seed, token_faults.shape(seed, made))


def _buggified(made: Scenario, knobs: Knobs) -> Scenario:
    """The scenario with the seed's buggify knobs (a listing lag at the start grace)."""
    if not knobs.on:
        return made
    lag = made.listing_lag
    if knobs.lag_at_grace:
        lag = float(DISPATCHER["start_grace"]) - GRACE_MARGIN
    settings = made.settings
    if knobs.late_starts:
        # Late starts come in windows longer than the start retry timeout, before the
        # faults stop: a retry timeout of 10 or 30 s.
        retry = min(float(dict(settings)["start_retry_timeout"]), 30.0)
        settings = (*settings, ("start_retry_timeout", retry))
    max_seconds = made.max_seconds
    if knobs.refused_retries:
        # A start given up in doubt must still run when the next one is admitted.
        retry = min(float(dict(settings)["start_retry_timeout"]), 30.0)
        settings = (*settings, ("start_retry_timeout", retry))
        max_seconds = max(max_seconds, 120)
    quiet_at, requests = made.quiet_at, made.requests
    if knobs.unknown_starts or knobs.last_receive_doubts:
        # As refused_retries, and time and requests for a backlog to meet the stretch.
        retry = min(float(dict(settings)["start_retry_timeout"]), 30.0)
        settings = (*settings, ("start_retry_timeout", retry))
        quiet_at, requests = max(quiet_at, 300.0), max(requests, 20)
        # unknown_starts: long runs (a start given up must still run when the next one
        # is admitted); last_receive_doubts alone: short runs (ended before a listing
        # could show them, their end lost: only the doubt knows they may have run).
        max_seconds = max(max_seconds, 120) if knobs.unknown_starts else 10
    if knobs.early_answers:
        # A reconcile soon after each give-up; a backlog for the slot freed.
        settings = (*settings, ("reconcile_interval", 2.0))
        quiet_at, requests = max(quiet_at, 300.0), max(requests, 20)
        max_seconds = max(max_seconds, 60)
    if knobs.late_redrives:
        # Time and a backlog: the pool full while the redriven runs are counted.
        quiet_at, requests = max(quiet_at, 600.0), max(requests, 40)
        max_seconds = max(max_seconds, 120)
    pools, shared = made.pools, made.shared_queue
    if knobs.twin_keeps:
        made = twin_waits.shaped(_twinned(made), knobs)
        pools, shared, settings = made.pools, made.shared_queue, (*settings, *made.settings)
        quiet_at, requests = max(quiet_at, made.quiet_at), min(requests, made.requests)
        max_seconds = min(max_seconds, made.max_seconds)
    if knobs.slow_starts:
        # One start every SLOW_START_GAP seconds, one pool of limit 2 (two starts wait for
        # their tokens at most); runs long enough to overlap the start that waited.
        gap = 1.0 / SLOW_START_GAP
        settings = (*settings, ("start_rate", gap), ("start_rate_floor", gap), ("start_burst", 1))
        pools, shared = (dataclasses.replace(made.pools[0], limit=2),), False
        quiet_at, requests = max(quiet_at, 300.0), max(requests, 12)
        max_seconds = max(max_seconds, 60)
    return dataclasses.replace(
        made,
        knobs=knobs,
        listing_lag=lag,
        settings=settings,
        max_seconds=max_seconds,
        quiet_at=quiet_at,
        requests=requests,
        pools=pools,
        shared_queue=shared,
    )


def _twinned(made: Scenario) -> Scenario:
    """Buggify's ``twin_keeps`` (`sim.twins`): one pool of limit 1 that each twin waits for
    (in the waiting room: its queue, the urgent one, is read ahead and started first), a
    start retry timeout the twin's retries fit in, and little other traffic."""
    pool = dataclasses.replace(
        made.pools[0], limit=1, per_key_limit=None, priorities=True, max_waiting=100
    )
    return dataclasses.replace(
        made,
        pools=(pool,),
        lease=False,
        shared_queue=False,
        settings=(("start_retry_timeout", twins.START_RETRY_TIMEOUT),),
        quiet_at=300.0,
        requests=5,
        max_seconds=10,
    )


@dataclass
class Outcome:
    """What one run did and what the checker found."""

    seed: int
    scenario: Scenario
    violations: list[Violation]
    world: World
    nemesis: Nemesis
    ended_at: float
    requests: int = 0
    executions: int = 0
    errors: list[str] = field(default_factory=list)
    state_machines: dict[str, str] = field(default_factory=dict)  # pool -> ARN

    @property
    def ok(self) -> bool:
        """No violation and no unexpected exception."""
        return not self.violations and not self.errors


NemesisFactory = Callable[["Run"], Nemesis]
"""Builds a run's fault plan (a scripted scenario's; default: drawn from the seed)."""


def simulate(
    seed: int,
    *,
    bugs: tuple[str, ...] = (),
    plan: Scenario | None = None,
    nemesis: NemesisFactory | None = None,
) -> Outcome:
    """Run seed ``seed`` on virtual time and judge it (``bugs``: fixed bugs put back, see
    `sim.bugs`; ``plan`` and ``nemesis``: a scripted scenario instead of the seed's)."""
    with put_back(bugs) as active:
        runs: list[Run] = []

        def main() -> Awaitable[Outcome]:
            runs.append(Run(seed, active, plan, nemesis))
            return runs[0].main()

        try:
            return loop.run(main)
        except loop.SimulationBusyError as exc:
            # A spinning task froze virtual time: the run cannot go on nor be judged.
            return runs[0].outcome([], [f"at {runs[0].ended_at:.3f}: {exc}"])


class Run:
    """The moving parts of one run."""

    def __init__(
        self,
        seed: int,
        bugs: list[Bug] | None = None,
        plan: Scenario | None = None,
        nemesis: NemesisFactory | None = None,
    ) -> None:
        self.seed = seed
        self.bugs = bugs or []
        self.plan = plan if plan is not None else scenario(seed)
        self.rng = random.Random(seed)
        self.clock: Callable[[], float] = loop.now
        lag = self.plan.listing_lag
        self.world = World(
            clock=self.clock,
            rng=random.Random(f"aws-{seed}"),
            config=WorldConfig(
                listing_lag=lag,
                describe_lag=min(lag, 1.0),
                listing_lag_at_max=0.5 if self.plan.knobs.lag_at_grace else 0.0,
                sqs_duplicate_rate=self.plan.knobs.sqs_duplicates,
                closed_task_error=self.plan.parents.closed_task_error,
            ),
        )
        self.world.sqs.token_duplicate_rate = token_faults.token_duplicates(self.plan)
        self.errors: list[str] = []
        self.memory: list[Violation] = []
        self.nodes: tuple[str, ...] = ("d1", "d2") if self.plan.lease else ("d1",)
        self.rolling = self.plan.extras.rolling  # processes whose configs differ
        if self.rolling is not None:
            self.nodes = self.rolling.nodes
        self.retired: set[str] = set()  # replaced by a rolling deploy: not started again
        self.incarnations: dict[str, tuple[str, Dispatcher | None, anyio.CancelScope]] = {}
        self.restart_after: dict[str, float] = dict.fromkeys(self.nodes, 0.0)
        self.expected_bad: set[str] = set()
        self.finished = anyio.Event()
        self._tmp = tempfile.TemporaryDirectory(prefix="sfn-sim-")
        self.config_path = Path(self._tmp.name) / "dispatcher.toml"
        self.limits = {p.name: p.limit for p in self.plan.pools}
        # What the config file says now (configuration changes across restarts, sim.extras).
        changed = {(r.what, r.pool) for r in self.plan.extras.reconfigures}
        self.keyed = {p.name: p.per_key_limit is not None for p in self.plan.pools}
        self.key_limits = {
            p.name: p.per_key_limit or 2
            for p in self.plan.pools
            if p.per_key_limit is not None or ("key_attribute", p.name) in changed
        }
        self.in_ssm = {p.name: p.parameter for p in self.plan.pools}
        self.limit_moves = {pool for what, pool in changed if what == "limit_source"}
        self.input_format = "envelope" if self.plan.extras.envelope else "json"
        self.extra_violations: list[Violation] = []
        self.extras_done = anyio.Event()
        self.extras_pending = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.named_limit = 0 if self.plan.named is None else self.plan.named.limit  # the file's
        self._setup()
        self.nemesis = nemesis(self) if nemesis is not None else self._drawn_nemesis()
        decide = token_faults.faults(self.nemesis.call_fault, self.plan, self.clock)
        self.world.faults = _except_ssm(takeover_wait.faults(decide, self.plan, self.clock))
        self.world.event_faults = self.nemesis.event_fault
        self.world.sfn.listing_lag_of = self.nemesis.listing_lag_of
        self._hunt_knobs()

    def _hunt_knobs(self) -> None:
        """The parts of the knobs that run beside the nemesis (`sim.buggify`)."""
        self.late_redrives: LateRedrives | None = None
        if self.plan.knobs.late_redrives:
            self.late_redrives = LateRedrives(self, self.spec().outside_grace)
        self.exists_unknown: ExistsUnknown | None = None
        if self.plan.knobs.exists_unknown:
            self.exists_unknown = ExistsUnknown(self)
        self.key_limit_drops: KeyLimitDrops | None = None
        if self.plan.knobs.key_limit_drops:
            self.key_limit_drops = KeyLimitDrops(self)
        if self.plan.knobs.twin_keeps:
            lag = twins.describe_lag(self.setting("start_grace"), self.setting("start_timeout"))
            self.world.sfn.describe_lag_of = lambda name: lag
        self.late_copies: late_running.LateCopies | None = None
        if self.plan.knobs.late_running:
            self.late_copies = late_running.LateCopies(self)
        self.twin_waits: twin_waits.LimitHolds | None = None
        if self.plan.knobs.twin_waits and self.nemesis.twins is not None:
            self.twin_waits = twin_waits.LimitHolds(self)
            self.nemesis.twins.on_give_up = self.twin_waits.gave_up

    def _drawn_nemesis(self) -> Nemesis:
        """The seed's fault plan."""
        if self.plan.knobs.late_running or self.plan.knobs.deep_backlog:  # no fault at all
            return Nemesis(random.Random(f"nemesis-{self.seed}"), self.clock, 0.0, 0.0)
        tokens = ("SendTaskSuccess", "SendTaskFailure", "SendTaskHeartbeat", "StopExecution")
        drawn = plan(
            random.Random(f"nemesis-{self.seed}"),
            self.clock,
            quiet_at=self.plan.quiet_at,
            nodes=self.nodes,
            pools={p.name: (p.limit, p.parameter) for p in self.plan.pools},
            operations=(
                "StartExecution",
                "DescribeExecution",
                "ListExecutions",
                "ReceiveMessage",
                "DeleteMessageBatch",
                "ChangeMessageVisibility",
                "SendMessage",
                "UpdateItem",
                *(tokens if self.plan.parents.parents else ()),
            ),
            knobs=self.plan.knobs,
            give_up_after=self.setting("start_retry_timeout"),
            start_grace=self.setting("start_grace"),
            hunt_rng=random.Random(f"buggify-hunt-plan-{self.seed}"),
        )
        if self.plan.knobs.twin_keeps:
            # Nothing else takes the slot a twin waits for: no limit changes, no outside
            # starts or redrives (processes still crash and stop).
            drawn.actions = [a for a in drawn.actions if a.kind in ("crash", "sigterm")]
            drawn.knobs = self.plan.knobs  # (visibility extensions spared, see `_spared`)
            drawn.twins = twins.plan(
                random.Random(f"buggify-twin-keeps-plan-{self.seed}"),
                self.plan.quiet_at,
                self.setting("start_retry_timeout"),
            )
        if self.plan.knobs.exists_full:
            # No limit change, outside start or redrive (it could pick the victim): the
            # pool fills with the burst alone.
            drawn.actions = [a for a in drawn.actions if a.kind in ("crash", "sigterm")]
        return drawn

    # -- the world -------------------------------------------------------------------------

    def _setup(self) -> None:
        world = self.world
        self.dlq = world.create_queue("dead-letters", visibility_timeout=60)
        self.events = world.create_queue("events", visibility_timeout=60)
        self.arns: dict[str, str] = {}
        self.queues: dict[str, list[str]] = {}
        for pool in self.plan.pools:
            self.arns[pool.name] = world.create_state_machine(f"governed-{pool.name}")
            if pool.parameter or pool.name in self.limit_moves or self.rolling is not None:
                world.put_parameter(limit_parameter(pool.name), str(pool.limit))
            world.put_parameter(config_record(pool.name), str(pool.limit))
        world.route_events(self.arns.values(), self.events)
        if self.plan.parents.parents:  # not governed: its events are not routed
            self.arns["parents"] = world.create_state_machine("parents")
        if self.plan.shared_queue:
            shared = self._queue("requests")
            self.queues = {p.name: [shared] for p in self.plan.pools}
        else:
            for pool in self.plan.pools:
                names = ["requests-" + pool.name]
                if pool.priorities:
                    names.append("urgent-" + pool.name)
                self.queues[pool.name] = [self._queue(n) for n in names]
        if self.plan.lease:
            world.create_table("leases")
        # last_receive_doubts keeps requests on their last receive in doubt: renewed, none
        # would stay kept, the path it makes common.
        if self.plan.knobs.renewals_denied or self.plan.knobs.last_receive_doubts:
            self._deny_renewals()
        named.setup(self)
        self._write_config()

    def _deny_renewals(self) -> None:
        """No dispatcher may send to a request queue (buggify's ``renewals_denied``)."""
        requests = {url for urls in self.queues.values() for url in urls}
        nodes = set(self.nodes)
        self.world.sqs.deny_send = lambda node, url: (
            url in requests and node.split(".", 1)[0] in nodes
        )

    def _queue(self, name: str) -> str:
        return self.world.create_queue(
            name,
            visibility_timeout=60,
            dead_letter=self.dlq,
            max_receive_count=(1 if self.plan.knobs.twin_keeps else None)
            or self.plan.extras.max_receive_count
            or (2 if self.plan.knobs.last_receive_doubts else None)
            or self.plan.knobs.max_receive_count
            or MAX_RECEIVE_COUNT,
        )

    def _write_config(self) -> None:
        self.config_path.write_text(self._config_text(), encoding="utf-8")
        if self.rolling is not None:
            for node in self.rolling.nodes:
                text = self._config_text(self.rolling.variant_of(node))
                self._config_of(node).write_text(text, encoding="utf-8")

    def write_configs(self) -> None:
        """Write every process's config file again (what the harness's state says)."""
        self._write_config()

    def _config_of(self, name: str) -> Path:
        """The config file of process ``name`` (its slot's, in a rolling seed)."""
        if self.rolling is None:
            return self.config_path
        return self.config_path.with_name(f"dispatcher-{name.split('.', maxsplit=1)[0]}.toml")

    def _config_text(self, variant: rolling.Variant | None = None) -> str:
        """A config file: this run's, or a rolling deploy's ``variant`` of it."""
        governed = [p for p in self.plan.pools if variant is None or p.name in variant.pools]
        in_ssm = self.in_ssm if variant is None else {p: p in variant.in_ssm for p in self.in_ssm}
        lines = ["[dispatcher]"]
        settings: dict[str, Any] = {
            **DISPATCHER,
            "events_queue_url": self.events,
            "dead_letter_queue_url": self.dlq,
        }
        settings.update(self.plan.settings)
        for bug in self.bugs:
            settings.update(bug.settings)
        if self.plan.lease:
            settings["lease_table"] = "leases"
        settings.update(variant.settings if variant is not None else {})
        if self.input_format != "json":
            settings["input_format"] = self.input_format
        if self.plan.parents.parents:  # the settings the dispatcher has (before and after)
            wanted = {
                "heartbeat_interval": HEARTBEAT_INTERVAL,
                "stop_orphaned_children": self.plan.parents.stop_orphans,
            }
            settings.update({k: v for k, v in wanted.items() if k in Settings.model_fields})
        lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
        lines += named.limit_lines(self.plan.named, self.named_limit)
        for pool in governed:
            lines += [
                f"[pools.{pool.name}]",
                f'state_machine_arn = "{self.arns[pool.name]}"',
                f"limit = {self.limits[pool.name]}",
            ]
            if in_ssm[pool.name]:
                lines.append(f'limit_parameter = "{limit_parameter(pool.name)}"')
            if self.keyed[pool.name]:
                lines += [
                    f"max_waiting = {pool.max_waiting}",
                    f'key_attribute = "{KEY_ATTRIBUTE}"',
                    f"per_key_limit = {self.key_limits[pool.name]}",
                ]
            lines += named.pool_lines(self.plan.named, pool.name)
        seen: set[str] = set()
        for pool in governed:
            for priority, url in enumerate(self.queues[pool.name]):
                if url in seen:
                    continue
                seen.add(url)
                lines.append("[[queues]]")
                lines.append(f'url = "{url}"')
                if self.plan.shared_queue:
                    names = ", ".join(f'"{p.name}"' for p in self.plan.pools)
                    lines += [f"pools = [{names}]", f'pool_attribute = "{POOL_ATTRIBUTE}"']
                else:
                    lines += [f'pool = "{pool.name}"', f"priority = {priority}"]
        return "\n".join(lines) + "\n"

    # -- the run ---------------------------------------------------------------------------

    async def main(self) -> Outcome:
        """Run until every request settled (or the bound), then judge."""
        random.seed(self.seed)  # stamina's jitter draws from the global generator
        self._loop = asyncio.get_running_loop()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.world.run)
                for node in self.nodes:
                    tg.start_soon(self._life, node)
                tg.start_soon(self._produce)
                if self.nemesis.twins is not None:
                    tg.start_soon(twins.produce, self, self.nemesis.twins)
                if self.twin_waits is not None:
                    tg.start_soon(self.twin_waits)
                if self.late_copies is not None:
                    tg.start_soon(self.late_copies.operate)
                tg.start_soon(self._act)
                tg.start_soon(self._kill_when_told)
                if self.late_redrives is not None:
                    tg.start_soon(self.late_redrives)
                if self.key_limit_drops is not None:
                    tg.start_soon(self.key_limit_drops)
                if self.exists_unknown is not None:
                    tg.start_soon(self.exists_unknown)
                tg.start_soon(named.run_changes, self)
                if self.plan.parents.parents:
                    tg.start_soon(run_parents, self, self.plan.parents)
                if self.plan.extras != ExtrasPlan():
                    tg.start_soon(run_extras, self, self.plan.extras)
                else:
                    self.extras_done.set()
                await self._until_settled()
                self.finished.set()
                for _, _, scope in self.incarnations.values():
                    scope.cancel()
                tg.cancel_scope.cancel()
        finally:
            self._tmp.cleanup()
        spec = self.spec()
        violations = check(self.world.history, spec) + self.memory[:1]
        violations += named.check(self.world.history, self.plan.named, self.arns, spec)
        return self.outcome(violations + self.extra_violations, self.errors)

    @property
    def ended_at(self) -> float:
        """The virtual time now (or when the run's loop stopped)."""
        return self._loop.time() if self._loop is not None else 0.0

    def outcome(self, violations: list[Violation], errors: list[str]) -> Outcome:
        """The run's outcome with these findings."""
        history = self.world.history
        return Outcome(
            seed=self.seed,
            scenario=self.plan,
            violations=violations,
            world=self.world,
            nemesis=self.nemesis,
            ended_at=self.ended_at,
            requests=len({m.request_id for m in history.requests}),
            executions=len(history.executions),
            errors=errors,
            state_machines=dict(self.arns),
        )

    def setting(self, name: str) -> float:
        """A [dispatcher] setting of this run."""
        return float(dict(self.plan.settings).get(name, DISPATCHER[name]))

    @property
    def settle_bound(self) -> float:
        """How long after the faults stop every request must be settled: the work itself
        (all requests one after another on one slot), plus a hand-back, a doubt settled
        by reconcile, a visibility timeout and a deferral."""
        least = named.least(self.plan.named, {p.name: p.limit for p in self.plan.pools})
        work = self.plan.requests * (self.plan.max_seconds + 1) / least
        for parent in self.plan.parents.parents:
            work += sum(s + 1 for s in parent.seconds) / least
        if self.rolling is not None:
            work += self.rolling.burst_work([p.limit for p in self.plan.pools]) / least
        # Outside runs may hold every slot of a pool while they last.
        work += sum(a.value for a in self.nemesis.actions if a.kind == "outside_start") / least
        if self.late_redrives is not None:
            work += redrives.work(self.late_redrives.planned) / least
        if self.plan.knobs.exists_unknown:
            work += exists.REDRIVE_RUNS[1] / least
        return work + 600.0 + MAX_DEFER_SECONDS  # a deferral may last 15 min

    def spec(self) -> CheckSpec:
        """What the checker must know besides the history."""
        pools = {}
        for pool in self.plan.pools:
            parameter = limit_parameter(pool.name) if pool.parameter else config_record(pool.name)
            if pool.name in self.limit_moves or self.rolling is not None:
                parameter = config_record(pool.name)  # the harness records every change
            # Keyed the whole run (no reconfigure turns its key_attribute on or off): each
            # run counts against its request's key, whatever its name says.
            changes = {r.pool for r in self.plan.extras.reconfigures if r.what == "key_attribute"}
            always_keyed = pool.per_key_limit is not None and pool.name not in changes
            pools[self.arns[pool.name]] = PoolSpec(
                limit=pool.limit,
                parameter=parameter,
                per_key_limit=self.key_limits.get(pool.name),
                key_attribute=KEY_ATTRIBUTE if always_keyed else None,
                key_limit_parameter=key_limits.record(pool.name)
                if self.plan.knobs.key_limit_drops
                else None,
            )
        return CheckSpec(
            pools=pools,
            request_queues=frozenset(u for urls in self.queues.values() for u in urls),
            dead_letter_queue=self.dlq,
            quiet_at=self.plan.quiet_at,
            settle_bound=self.settle_bound,
            # A lowered limit is read within one refresh interval (SSM reads are spared by
            # the nemesis: while they fail, the dispatcher keeps the limit it has); a start
            # sent just before the read takes effect within its sender's D (the longest of
            # the run: rolling seeds' files have longer ones). Without the default D, a
            # start sent 0.1 s before the read, held on the wire for its D, was judged
            # against the new limit.
            staleness=float(DISPATCHER["limit_refresh_interval"]) + 2.0 + self._longest_d,
            read_lag=float(DISPATCHER["limit_refresh_interval"]) + 2.0,
            # An outside start is known from its status event or the next listing that
            # works; events may be lost and listings fail while a storm lasts.
            outside_grace=self.setting("reconcile_interval") + STORM_MAX + 35.0 + 10.0,
            expected_bad=frozenset(self.expected_bad),
            wall_epoch=self.world.config.epoch,
            idle_bound=late_running.IDLE_BOUND if self.plan.knobs.late_running else None,
            receive_bound=backlog.RECEIVE_BOUND if self.plan.knobs.deep_backlog else None,
            # A held token is heartbeated every interval (slack: one more); after a crash
            # its message comes back within a visibility timeout, a process within a stop
            # timeout and 20 s.
            heartbeat_every=2 * HEARTBEAT_INTERVAL if self._heartbeats else None,
            heartbeat_grace=HEARTBEAT_GRACE,
            # Across a restart: the last heartbeat, the message hidden (kill -9: a visibility
            # timeout; SIGTERM: the shutdown), a new process, a receive, a heartbeat.
            heartbeat_restart_gap=self._rolling_gap
            + HEARTBEAT_INTERVAL
            + DISPATCHER["visibility_timeout"]
            + RESTART_MAX
            + DISPATCHER["receive_wait_seconds"]
            + 10.0,
            # A start given up may still take effect this long after (the fence, D).
            late_start=self._longest_d,
            heartbeat_deploy_gap=self._rolling_gap
            + HEARTBEAT_INTERVAL
            + DISPATCHER["shutdown_timeout"]
            + RESTART_MAX
            + DISPATCHER["receive_wait_seconds"]
            + 10.0,
        )

    @property
    def _longest_d(self) -> float:
        """The longest D (``start_timeout``) of any process of the run."""
        return max(
            [float(DISPATCHER["start_timeout"])]
            + [self.rolling.variant_of(n).start_timeout for n in self.nodes if self.rolling]
        )

    @property
    def _rolling_gap(self) -> float:
        """How much longer a held token's heartbeats may pause in a rolling seed: a frozen
        leader sends none, and its successor waits the longest D + grace of any file."""
        if self.rolling is None:
            return 0.0
        variants = [self.rolling.variant_of(n) for n in self.nodes]
        longest = max(v.start_timeout + v.start_grace for v in variants)
        frozen = max((h.seconds for h in self.rolling.hangs), default=0.0)
        return longest + min(frozen, STORM_MAX)

    @property
    def _heartbeats(self) -> bool:
        """Whether the dispatcher of this run heartbeats task tokens."""
        return bool(self.plan.parents.parents) and "heartbeat_interval" in Settings.model_fields

    async def _until_settled(self) -> None:
        deadline = self.plan.quiet_at + self.settle_bound
        while self.clock() < deadline:
            await anyio.sleep(10.0)
            self._check_memory()
            if (
                self.clock() > self.plan.quiet_at
                and self.extras_done.is_set()
                and not self.extras_pending
                and self._settled()
            ):
                return

    def _check_memory(self) -> None:
        """Memory stays O(running + waiting room): deferral state is kept only for keys
        with a deferral not back yet, whatever the number of keys seen."""
        for name, dispatcher, _ in self.incarnations.values():
            if dispatcher is None:
                continue
            for pool in dispatcher.pools.values():
                pool.forget_returned_deferrals()
                if pool.deferral_keys > pool.deferrals_pending:
                    self.memory.append(
                        Violation(
                            "memory",
                            self.clock(),
                            f"{name} pool {pool.name} remembers deferral state for "
                            f"{pool.deferral_keys} keys, {pool.deferrals_pending} deferrals "
                            "not back yet",
                        )
                    )

    def _settled(self) -> bool:
        """Nothing runs, and every request has an execution or a dead-letter copy."""
        history = self.world.history
        now = self.clock()
        if any(run.running_at(now) for e in history.executions.values() for run in e.runs):
            return False
        spec = dataclasses.replace(self.spec(), quiet_at=now, settle_bound=0.0)
        return not any(v.kind in SETTLE_KINDS for v in check(history, spec))

    # -- processes -------------------------------------------------------------------------

    def _dispatcher(self, name: str) -> Dispatcher:
        config = self._config_of(name)
        loaded = layout.load({"config": str(config)}, env={})
        skew = 0.0
        return Dispatcher(
            loaded.settings,
            layout=loaded.layout,
            metrics=Metrics(CollectorRegistry()),
            clock=self.clock,
            wall=lambda: self.world.wall(self.clock()) + skew,
            overrides={"config": str(config)},
            environ={},
            clients=self._clients_of(name),
            serve_http=False,
            lease_owner=name,
        )

    def _clients_of(self, name: str) -> Callable[..., Any]:
        world = self.world

        @asynccontextmanager
        async def open_clients(_metrics: Metrics, **options: Any) -> AsyncIterator[Clients]:
            timeout = float(options.get("start_timeout", 5.0))
            starts = world.client("stepfunctions", name, read_timeout=timeout)
            if any(bug.old_start_client for bug in self.bugs):
                starts = world.client("stepfunctions", name, max_attempts=3)
            gate = StartGate()
            yield Clients(
                sqs=world.client("sqs", name, max_attempts=3),
                sfn=world.client("stepfunctions", name, max_attempts=3),
                starts=cast("Any", _Gated(starts, gate)),
                start_gate=gate,
                dynamodb=world.client("dynamodb", name, max_attempts=3),
                ssm=world.client("ssm", name, max_attempts=3),
            )

        return open_clients

    async def _life(self, node: str) -> None:
        """One process slot: run a dispatcher; after it dies or exits, start a new one."""
        incarnation = 0
        await rolling.born(self, node)
        while not self.finished.is_set() and node not in self.retired:
            incarnation += 1
            name = f"{node}.{incarnation}"
            dispatcher = self._dispatcher(name)
            with anyio.CancelScope() as scope:
                self.incarnations[node] = (name, dispatcher, scope)
                self.world.history.note(self.clock(), name, "process started")
                try:
                    await dispatcher.run(handle_signals=False)
                    self.world.history.note(self.clock(), name, "process exited 0")
                except Exception as exc:  # noqa: BLE001 - sorted: expected exit, or a finding
                    leaves = _leaves(exc)
                    if all(isinstance(e, (UserError, *AWS_ERRORS)) for e in leaves):
                        # Preflight or the start-up listing failed under faults: the
                        # process exits and ECS starts a new one.
                        why = "; ".join(str(e)[:120] for e in leaves)
                        self.world.history.note(self.clock(), name, f"process exited: {why}")
                    else:
                        text = "".join(traceback.format_exception(exc))
                        self.errors.append(f"{name} at {self.clock():.3f}: {text}")
                        self.world.history.note(self.clock(), name, "process died: BUG")
            if node in self.retired:
                break
            await anyio.sleep(max(1.0, self.restart_after[node]))
        if node in self.retired:  # replaced by a rolling deploy: gone for good
            self.incarnations.pop(node, None)

    async def _act(self) -> None:
        for action in self.nemesis.actions:
            await anyio.sleep(max(0.0, action.time - self.clock()))
            await self._do(action)
        # Faults end: an operator puts every limit back (a limit left at 0 would hold every
        # request forever, rightly).
        await anyio.sleep(max(0.0, self.plan.quiet_at - self.clock()))
        for pool in self.plan.pools:
            kind = "set_limit" if pool.parameter else "sighup"
            await self._do(Action(self.clock(), kind, "", pool.limit, pool.name))

    async def _do(self, action: Action) -> None:
        if action.kind in ("crash", "sigterm"):
            self._kill(action)
        elif action.kind in ("set_limit", "sighup"):
            self._set_limit(action)
        elif action.kind == "outside_start":
            name = f"console-{self.rng.randrange(10**9)}"
            with contextlib.suppress(Exception):  # a refused outside start changes nothing
                self.world.start_outside(self.arns[action.pool], name, "{}", float(action.value))
        elif action.kind == "redrive":
            now = self.clock()
            failed = [
                e.arn
                for e in self.world.history.executions.values()
                if e.state_machine_arn == self.arns[action.pool]
                and e.runs[-1].status == "FAILED"
                and (e.runs[-1].stop or now) < now
            ]
            if failed:
                self.world.redrive(self.rng.choice(failed), float(action.value))

    async def _kill_when_told(self) -> None:
        """Kills the nemesis decides on as it goes (a node with a start held on the wire)."""
        nemesis = self.nemesis
        while True:
            if not nemesis.kills:
                await nemesis.kill_signal.wait(math.inf)
                continue
            action = nemesis.kills.pop(0)
            await anyio.sleep(max(0.0, action.time - self.clock()))
            self.world.history.note(self.clock(), "nemesis", f"kill {action.node}")
            self._kill(action)
            self.restart_after[action.node] = 0.0  # back at once: before the start lands

    def _kill(self, action: Action) -> None:
        """``kill -9`` (crash), or SIGTERM then SIGKILL after the stop timeout."""
        if action.node not in self.incarnations:
            return
        name, dispatcher, scope = self.incarnations[action.node]
        self.restart_after[action.node] = self.rng.uniform(0.0, RESTART_MAX)
        if action.kind == "crash":
            self.world.crash(name)
            scope.cancel()
            return
        self.world.history.note(self.clock(), name, "SIGTERM")
        if dispatcher is not None:
            dispatcher.stop()
        scope.deadline = self.clock() + STOP_TIMEOUT  # then SIGKILL, as ECS does

    @property
    def _any_envelope(self) -> bool:
        """Whether some process of this run may run the envelope input format."""
        extra = self.plan.extras
        return extra.envelope or any(r.what == "input_format" for r in extra.reconfigures)

    def kill(self, action: Action) -> None:
        """A crash or SIGTERM of ``action.node`` (the operator scenarios' restarts)."""
        self._kill(action)

    def reconfigure(self, what: str, pool: str) -> str:
        """Change the config file (a restart applies it); returns what changed."""
        if what == "key_attribute":
            self.keyed[pool] = not self.keyed[pool]
            done = f"pool {pool} key_attribute {'on' if self.keyed[pool] else 'off'}"
        elif what == "input_format":
            self.input_format = "envelope" if self.input_format == "json" else "json"
            done = f"input_format {self.input_format}"
        else:  # limit_source: the limit in force moves to the other place, same value
            limit = self.world.ssm.parameters[config_record(pool)].value
            if self.in_ssm[pool]:
                self.limits[pool] = int(limit)
            else:
                self.world.put_parameter(limit_parameter(pool), limit)
            self.in_ssm[pool] = not self.in_ssm[pool]
            done = f"pool {pool} limit in {'SSM' if self.in_ssm[pool] else 'the file'}"
        self._write_config()
        return done

    def _set_limit(self, action: Action) -> None:
        """An operator changes a limit: in SSM, or in the config file and then SIGHUP
        (wherever the pool's limit is now, when it moves between the two)."""
        if self.rolling is not None:
            rolling.set_limit(self, action.pool, action.value)
            return
        pool = next(p for p in self.plan.pools if p.name == action.pool)
        kind = action.kind
        if pool.name in self.limit_moves:
            kind = "set_limit" if self.in_ssm[pool.name] else "sighup"
            self.world.put_parameter(config_record(pool.name), str(action.value))
        if kind == "set_limit":
            self.world.put_parameter(limit_parameter(pool.name), str(action.value))
            return
        self.limits[pool.name] = action.value
        self._write_config()
        if pool.name not in self.limit_moves:
            self.world.put_parameter(config_record(pool.name), str(action.value))
        for name, dispatcher, _ in self.incarnations.values():
            if dispatcher is not None:
                self.world.history.note(self.clock(), name, f"SIGHUP (limit {action.value})")
                dispatcher.reload()

    # -- the producers ---------------------------------------------------------------------

    async def _produce(self) -> None:  # noqa: PLR0915 - each kind of request in turn
        """Send the scenario's requests at their times: valid ones (with and without an
        idempotency key, some sent twice as a producer retry does, some that fail) and
        poison messages (invalid JSON near the maximum size, an invalid key, an unknown
        pool)."""
        rng = random.Random(f"producer-{self.seed}")
        times = list(self.plan.request_times) or sorted(
            rng.uniform(0, self.plan.quiet_at * 0.8) for _ in range(self.plan.requests)
        )
        if self.plan.knobs.late_starts and not self.plan.request_times:
            times = _burst(times, random.Random(f"burst-{self.seed}"), self.plan.quiet_at)
        if self.nemesis.burst_at is not None and not self.plan.request_times:
            burst = random.Random(f"burst-hunt-{self.seed}")
            times = _burst(times, burst, 0.0, self.nemesis.burst_at)
        sent: list[tuple[str, str, str, dict[str, str]]] = []
        attributes: dict[str, str]
        # Producers that retry soon (sim.extras "retries"): the same key and body again.
        again_rng = random.Random(f"producer-retries-{self.seed}")
        retries: list[tuple[float, tuple[str, str, str, dict[str, str]]]] = []
        deadlines = StartBys(self.seed, self.plan.max_seconds)
        if self.plan.request_times:
            deadlines.enabled = False  # a scripted scenario: plain requests

        async def retry_until(t: float) -> None:
            retries.sort(key=lambda r: r[0])
            while retries and retries[0][0] <= t:
                when, (request_id, url, body, again) = retries.pop(0)
                await anyio.sleep(max(0.0, when - self.clock()))
                self.world.send_request(url, body, again, request_id=request_id)

        for index, at in enumerate(times):
            await retry_until(at)
            await anyio.sleep(max(0.0, at - self.clock()))
            pool = rng.choice(self.plan.pools)
            url = rng.choice(self.queues[pool.name])
            request_id = f"r{index}"
            roll = 0.5 if self.plan.request_times else rng.random()  # scripted: plain
            if roll < 0.1 and sent:
                # A producer's retry: the same idempotency key maps to the same execution.
                request_id, url, body, again = rng.choice(sent)
                self.world.send_request(url, body, again, request_id=request_id)
                continue
            body = json.dumps(
                {"req": request_id, "seconds": rng.randint(0, self.plan.max_seconds)}
                | ({"fail": True} if rng.random() < 0.1 else {})
            )
            attributes = self.attributes(rng, pool, request_id)
            start_by, invalid = deadlines.start_by(at)
            if start_by is not None:
                attributes["start-by"] = start_by
                if invalid and roll <= 0.95:
                    self.expected_bad.add(request_id)
            if roll > 0.95:
                self.expected_bad.add(request_id)
                body = self._poison(rng, body, attributes)
            elif "idempotency-key" in attributes:
                sent.append((request_id, url, body, attributes))
                if again_rng.random() < self.plan.extras.producer_retries:
                    retries.append((at + again_rng.uniform(0.1, 20.0), sent[-1]))
            try:
                self.world.send_request(url, body, attributes, request_id=request_id)
            except Exception as exc:  # noqa: BLE001 - the producer's own send was refused
                self.expected_bad.discard(request_id)
                self.world.history.note(self.clock(), "producer", f"send refused: {exc}")
        await retry_until(math.inf)

    def attributes(self, rng: random.Random, pool: PoolPlan, request_id: str) -> dict[str, str]:
        """A request's attributes: its pool (shared queue), tenant (keyed pool), and an
        idempotency key half the time."""
        attributes = {}
        if self.plan.shared_queue:
            attributes[POOL_ATTRIBUTE] = pool.name
        if pool.name in self.key_limits:  # keyed, now or after a configuration change
            if self.plan.tenants <= 3:
                attributes[KEY_ATTRIBUTE] = rng.choice(("a", "a", "a", "b", "c"))
            else:
                attributes[KEY_ATTRIBUTE] = f"t{rng.randrange(self.plan.tenants)}"
        if rng.random() < 0.5:
            attributes["idempotency-key"] = f"key-{request_id}"
        return attributes

    def _poison(self, rng: random.Random, body: str, attributes: dict[str, str]) -> str:
        """Spoil a request (returns its body): invalid JSON near the maximum message size,
        an invalid idempotency key, or a pool the queue does not feed."""
        kinds = ("json", "key", "pool") if self.plan.shared_queue else ("json", "key")
        poison = rng.choice(kinds)
        if poison == "json" and self._any_envelope:
            poison = "key"  # the envelope format takes any body: not a bad request there
        if poison == "json":
            return "{" + "x" * (262_144 - 2048)
        if poison == "key":
            attributes["idempotency-key"] = "not a valid name!"
        else:
            attributes[POOL_ATTRIBUTE] = "nowhere"
        return body


def _burst(
    times: list[float], rng: random.Random, quiet_at: float, at: float | None = None
) -> list[float]:
    """Half of the requests sent within 5 s (a batch) from ``at`` (default: drawn): a
    backlog while starts go dark."""
    at = rng.uniform(0, quiet_at * 0.5) if at is None else at
    burst = sorted(at + rng.uniform(0, 5) for _ in range(len(times) // 2))
    return sorted(times[len(burst) :] + burst)


class _Gated:
    """The starts client with `Clients.start_gate` checked just before each StartExecution
    leaves, as `dispatcher.aws.api.open_clients` registers it (botocore's before-send): a
    closed gate (the lease lapsed) fails the attempt as a connection never made."""

    def __init__(self, client: Any, gate: StartGate) -> None:
        self._client = client
        self._gate = gate

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def start_execution(self, **kwargs: Any) -> Any:
        """StartExecution, unless the gate is closed."""
        self._gate.before_send()
        return await self._client.start_execution(**kwargs)


def _except_ssm(faults: Any) -> Any:
    def decide(node: str, operation: str, params: Any) -> Any:
        if operation == "GetParameter":
            return faults("producer", operation, params)  # never faulted
        return faults(node, operation, params)

    return decide


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


__all__ = ["Outcome", "Run", "Scenario", "scenario", "simulate"]
