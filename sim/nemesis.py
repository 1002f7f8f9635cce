"""The nemesis: a seeded plan of faults, combined, for one simulation run.

Two kinds of faults. *Call faults* are decided per AWS call (`Nemesis.call_fault`, given
to the simulated AWS): a steady drizzle of lost requests, lost answers, 5xx answers
before or after the effect, and throttles, plus *storms* (time windows in which one kind
hits hard: throttling, 5xx, latency spikes past the client's deadline, a node cut off
from AWS as a paused leader is). *Event faults* lose, duplicate, delay and so reorder
status events. Process faults (crashes, SIGTERM, SIGHUP, limit changes, outside starts,
redrives) are planned here as `Action` s and carried out by the harness.

Every fault stops at ``quiet_at``: from then on the system must settle. The plan is a
pure function of the seed, so a failing seed replays exactly.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sim.aws import EventFault, EventInfo
from sim.buggify import GRACE_MARGIN, OFF, Knobs
from sim.calls import NO_FAULT, CallFault, Signal
from sim.twins import TwinStorms

STORM_MAX = 150.0
"""The longest storm, in seconds (the checker's grace for outside starts covers it)."""
STORM_KINDS = ("throttle", "server_error", "latency", "partition", "lost_answers")

# Operations whose failure the dispatcher must survive; the producer's sends go around
# the nemesis (they are the test's input, not the system under test).
SFN_OPERATIONS = ("StartExecution", "DescribeExecution", "ListExecutions")


@dataclass(frozen=True)
class Storm:
    """A window of heavy faults of one kind, on some operations or one node."""

    kind: str
    start: float
    end: float
    rate: float
    operations: tuple[str, ...] = ()  # empty: every operation
    node: str | None = None  # a partition cuts one node ("d1": every incarnation of it)
    delay: float = 0.0  # latency storms: extra seconds on the request leg

    def covers(self, now: float, node: str, operation: str) -> bool:
        """Whether the storm hits this call."""
        if not self.start <= now < self.end:
            return False
        if self.node is not None and node.split(".", maxsplit=1)[0] != self.node:
            return False
        return not self.operations or operation in self.operations


@dataclass(frozen=True)
class EventStorm:
    """A stretch of time in which every status event is lost, or late by ``delay`` (up
    to twice it): buggify's ``event_storms``."""

    start: float
    end: float
    lost: bool
    delay: float = 0.0


REDRIVABLE_ENDS = frozenset({"FAILED", "TIMED_OUT", "ABORTED"})
# How late the events of a late stretch are: seconds to hours.
EVENT_DELAYS = (5.0, 30.0, 300.0, 3600.0, 7200.0)
LATE_START_FAILURES: tuple[tuple[str | None, bool], ...] = (
    (None, False),  # the client times out at D, as AWS applies it
    (None, False),
    ("ServiceUnavailable", False),  # a 5xx first, applied later
    ("InternalFailure", False),
    (None, True),  # the connection reset first, applied later
)


@dataclass(frozen=True)
class Action:
    """Something the harness does to the system at ``time``."""

    time: float
    kind: str  # crash | sigterm | sighup | set_limit | outside_start | redrive
    node: str = ""
    value: int = 0  # set_limit / sighup: the new limit; outside_start: seconds to run
    pool: str = ""


@dataclass
class Nemesis:
    """The fault plan of one run; ``clock`` is the simulation's virtual time."""

    rng: random.Random
    clock: Callable[[], float]
    quiet_at: float
    drizzle: float  # probability of each drizzle fault per call
    storms: list[Storm] = field(default_factory=list)
    event_loss: float = 0.0
    event_duplicate: float = 0.0
    event_delay: float = 0.0  # events are delayed up to this long (reordering them)
    actions: list[Action] = field(default_factory=list)
    fired: dict[str, int] = field(default_factory=dict)
    knobs: Knobs = OFF
    event_storms: list[EventStorm] = field(default_factory=list)
    late_start_rate: float = 0.0  # share of StartExecution attempts applied at D
    # Dark starts: this share of the executions the dispatcher starts have every attempt
    # applied at D for ``dark_for`` seconds from their first (longer than the start retry
    # timeout: the start gives up in doubt), and their status events lost or late.
    dark_share: float = 0.0
    dark_for: float = 0.0
    held_from_end: float = 0.0  # ...the last attempts (this long before dark_for) held
    dark_events: EventStorm | None = None  # what happens to a dark start's events
    dark_failure: tuple[str | None, bool] | None = (
        None  # how its held attempts fail (None: by name)
    )
    _dark: dict[str, float | None] = field(default_factory=dict)  # name -> first attempt
    late_start_windows: list[tuple[float, float]] = field(default_factory=list)  # all late
    # A node that sent a held start is killed within D this share of the time (the
    # harness carries out ``kills``): its successor must not miss the start landing.
    kill_after_held: float = 0.0
    kills: list[Action] = field(default_factory=list)
    kill_signal: Signal = field(default_factory=Signal)
    dark_listing_lag: float | None = None  # a dark start shows in listings this late
    # Refused retries: in these windows a start's first attempt is applied and answered
    # with the window's failure; every later attempt of it is throttled.
    refusal_windows: list[tuple[float, float, str]] = field(default_factory=list)
    _refused: set[tuple[int, str]] = field(default_factory=set)  # (window, name) applied
    # Buggify's hunt knobs: when a burst of requests is sent (None: as drawn).
    burst_at: float | None = None
    twins: TwinStorms | None = None  # buggify's twin_keeps (sim.twins)

    def _count(self, what: str) -> None:
        self.fired[what] = self.fired.get(what, 0) + 1

    # -- what the simulated AWS asks -------------------------------------------------------

    def call_fault(self, node: str, operation: str, params: Mapping[str, Any]) -> CallFault:
        """The fate of one call."""
        now = self.clock()
        if now >= self.quiet_at or node == "producer" or self._spared(operation):
            return NO_FAULT
        if operation == "StartExecution":
            refused = self._refusal(now, params)
            if refused is not None:
                return refused
            late = self._late_start(now, params)
            if late is not None:
                if late.apply_at_deadline and self.rng.random() < self.kill_after_held:
                    self._count("killed_while_a_start_is_held")
                    at = now + self.rng.uniform(0.1, 4.0)
                    self.kills.append(Action(at, "crash", node.split(".", maxsplit=1)[0]))
                    self.kill_signal.notify()
                return late
        for storm in self.storms:
            if storm.covers(now, node, operation) and self.rng.random() < storm.rate:
                self._count(storm.kind)
                return _storm_fault(storm, operation, self.rng, now)
        roll = self.rng.random()
        if roll >= len(_DRIZZLE) * self.drizzle:
            return NO_FAULT
        name, fault = _DRIZZLE[int(roll / self.drizzle)]
        self._count(name)
        return fault if fault is not None else CallFault(error=_throttle_code(operation))

    def _spared(self, operation: str) -> bool:
        """Visibility extensions, in ``last_receive_doubts`` seeds: a failed extension of a
        request kept on its last receive lets it go (`LastReceives.keep_hidden_once`), and
        SQS then moves it without a reason - a gap of the dispatcher, reported, not what
        that knob is about (with extensions faulted too, seeds 234 and 441 end with such a
        ``redrive_move``); the same in ``twin_keeps`` seeds (every receive is the last)."""
        kept = self.knobs.last_receive_doubts or self.knobs.twin_keeps
        return kept and operation.startswith("ChangeMessageVisibility")

    def _refusal(self, now: float, params: Mapping[str, Any]) -> CallFault | None:
        """Inside a refusal window: the first attempt of a start applied with its answer
        failed, every later one throttled (None: outside every window). First, a
        ``twin_keeps`` storm's throttles (`sim.twins`)."""
        twin = self.twins.fault(now, params) if self.twins is not None else None
        if twin is not None:
            self._count("twin_storm")
            return twin
        for index, (start, end, first) in enumerate(self.refusal_windows):
            if not start <= now < end:
                continue
            key = (index, str(params.get("name", "")))
            if key in self._refused:
                self._count("start_refused")
                return CallFault(error="ThrottlingException")
            self._refused.add(key)
            self._count("start_applied_answer_failed")
            if first == "5xx_after":
                return CallFault(error="ServiceUnavailable", error_after=True)
            if first == "lost_answer":
                return CallFault(drop_answer=True)
            return CallFault(apply_at_deadline=True)
        return None

    def _late_start(self, now: float, params: Mapping[str, Any]) -> CallFault | None:
        """A start's attempt held on the wire and applied at D (None: not this one). The
        attempts of a dark start are lost until the last ones before it gives up, which
        are held: it exists from about when the dispatcher gives up on it."""
        name = str(params.get("name", ""))
        if self.dark_share and name not in self._dark:
            dark = self.rng.random() < self.dark_share
            self._dark[name] = now if dark else None
            if dark:
                self._count("dark_start")
        first = self._dark.get(name)
        late = any(start <= now < end for start, end in self.late_start_windows)
        late = late or (bool(self.late_start_rate) and self.rng.random() < self.late_start_rate)
        failure = None
        if first is not None and now < first + self.dark_for:
            if now < first + self.dark_for - self.held_from_end:
                self._count("dark_start_lost")
                return CallFault(drop_request=True)
            # Every attempt of one dark start fails the same way (all time out, say).
            failure = (
                self.dark_failure or LATE_START_FAILURES[hash_name(name) % len(LATE_START_FAILURES)]
            )
            late = True
        if not late:
            return None
        error, reset = failure or self.rng.choice(LATE_START_FAILURES)
        self._count("start_applied_at_deadline")
        return CallFault(apply_at_deadline=True, error=error, reset=reset)

    def listing_lag_of(self, name: str) -> float | None:
        """How late a dispatcher's execution shows in listings (None: as usual): a dark
        start's, at the start grace (just under it)."""
        if self.dark_listing_lag is not None and self._dark.get(name) is not None:
            return self.dark_listing_lag
        return None

    def event_fault(self, info: EventInfo) -> EventFault:
        """The fate of one status event."""
        if info.time >= self.quiet_at:
            return EventFault()
        name = info.execution_arn.rsplit(":", 1)[-1]
        dark = self.dark_events if self._dark.get(name) is not None else None
        storm = dark or next((e for e in self.event_storms if e.start <= info.time < e.end), None)
        if storm is None and self.knobs.long_outside and info.status in REDRIVABLE_ENDS:
            # Late news of a failure: a redrive meanwhile must not be freed by it.
            storm = EventStorm(0.0, self.quiet_at, lost=False, delay=300.0)
        if storm is not None:
            if storm.lost:
                self._count("event_lost_in_storm")
                return EventFault(lost=True)
            self._count("event_late_in_storm")
            return EventFault(delay=self.rng.uniform(storm.delay, 2 * storm.delay))
        if self.rng.random() < self.event_loss:
            self._count("event_lost")
            return EventFault(lost=True)
        duplicate = self.rng.random() < self.event_duplicate
        delay = self.rng.uniform(0, self.event_delay) if self.event_delay else 0.0
        if duplicate:
            self._count("event_duplicated")
        if delay:
            self._count("event_delayed")
        return EventFault(
            duplicate=duplicate,
            delay=delay,
            duplicate_delay=self.rng.uniform(0, self.event_delay or 1.0),
        )

    @property
    def faults_fired(self) -> int:
        """How many faults hit so far (calls and events; actions not included)."""
        return sum(self.fired.values())


# The steady faults, equally likely (None: the operation's throttle error).
_DRIZZLE: tuple[tuple[str, CallFault | None], ...] = (
    ("lost_request", CallFault(drop_request=True)),
    ("lost_answer", CallFault(drop_answer=True)),
    ("5xx_before", CallFault(error="InternalFailure")),
    ("5xx_after", CallFault(error="ServiceUnavailable", error_after=True)),
    ("throttle", None),
)


def hash_name(name: str) -> int:
    """A stable small hash of a name (not Python's: it varies by process)."""
    return sum((i + 1) * ord(c) for i, c in enumerate(name))


def _throttle_code(operation: str) -> str:
    if operation in SFN_OPERATIONS or operation.startswith(("Send", "Start", "Stop")):
        return "ThrottlingException"
    if operation in ("UpdateItem", "GetItem", "PutItem", "DescribeTable"):
        return "ProvisionedThroughputExceededException"
    if operation in ("GetParameter",):
        return "ThrottlingException"
    return "RequestThrottled"


def _storm_fault(storm: Storm, operation: str, rng: random.Random, now: float) -> CallFault:
    if storm.kind == "throttle":
        return CallFault(error=_throttle_code(operation))
    if storm.kind == "server_error":
        return CallFault(error="ServiceUnavailable", error_after=rng.random() < 0.5)
    if storm.kind == "latency":
        return CallFault(request_delay=rng.uniform(0, storm.delay))
    if storm.kind == "lost_answers":
        return CallFault(drop_answer=True)
    if storm.kind == "lost_requests":  # buggify's limit_drops only
        return CallFault(drop_request=True)
    # A partition (a paused leader, a broken network): requests are held on the wire until
    # the window ends; a client that gives up first closes the connection, and a request
    # whose client gave up never arrives.
    return CallFault(request_delay=max(0.0, storm.end - now) + rng.uniform(0.0, 0.1))


def plan(
    rng: random.Random,
    clock: Callable[[], float],
    *,
    quiet_at: float,
    nodes: tuple[str, ...],
    pools: Mapping[str, tuple[int, bool]],
    operations: tuple[str, ...],
    knobs: Knobs = OFF,
    give_up_after: float = 120.0,
    start_grace: float = 10.0,
    hunt_rng: random.Random | None = None,
) -> Nemesis:
    """Draw a fault plan. ``pools`` maps pool name -> (limit, has an SSM limit);
    ``knobs``: the seed's buggify knobs (`sim.buggify`); ``give_up_after``: the
    dispatcher's start retry timeout; ``start_grace``: its start grace; ``hunt_rng``: the
    stream the `sim.buggify.HUNT` knobs plan from (never ``rng``: seeds without them keep
    their plans and faults)."""
    intensity = rng.choice((0.0, 0.5, 1.0, 1.0, 2.0))
    nemesis = Nemesis(
        rng=rng,
        clock=clock,
        quiet_at=quiet_at,
        drizzle=0.01 * intensity,
        event_loss=rng.choice((0.0, 0.05, 0.2, 0.5, 1.0)) if intensity else 0.0,
        event_duplicate=rng.choice((0.0, 0.1, 0.3)),
        event_delay=rng.choice((0.0, 2.0, 10.0, 60.0)),
    )
    for _ in range(rng.randint(0, int(3 * intensity) + 1)):
        kind = rng.choice(STORM_KINDS)
        start = rng.uniform(0, quiet_at * 0.9)
        end = min(quiet_at, start + rng.choice((rng.uniform(2, 60), rng.uniform(2, STORM_MAX))))
        ops: tuple[str, ...] = ()
        if kind in ("throttle", "server_error", "lost_answers"):
            ops = (rng.choice(operations),) if rng.random() < 0.7 else ()
        nemesis.storms.append(
            Storm(
                kind=kind,
                start=start,
                end=end,
                rate=rng.uniform(0.3, 1.0),
                operations=ops,
                node=rng.choice(nodes) if kind == "partition" else None,
                delay=rng.uniform(1, 30) if kind == "latency" else 0.0,
            )
        )
    nemesis.actions = _actions(rng, quiet_at, nodes, pools, intensity)
    if knobs.classic:
        _buggify(nemesis, random.Random(rng.getrandbits(64)), knobs, pools, give_up_after)
        _buggify_more(
            nemesis,
            random.Random(f"buggify-more-{rng.getrandbits(64)}"),
            knobs,
            nodes,
            pools,
            give_up_after,
        )
        if knobs.late_starts:
            nemesis.dark_listing_lag = start_grace - GRACE_MARGIN
    if hunt_rng is not None and (
        knobs.unknown_starts
        or knobs.last_receive_doubts
        or knobs.slow_starts
        or knobs.early_answers
    ):
        nemesis.knobs = knobs
        _buggify_hunt(nemesis, hunt_rng, knobs, give_up_after, start_grace)
        if knobs.slow_starts:
            _slow_starts(nemesis, hunt_rng, nodes, pools)
        if knobs.early_answers:
            _early_answers(nemesis, hunt_rng, give_up_after)
    return nemesis


SLOW_START_GAP = 14.5
"""Seconds between StartExecution calls with buggify's ``slow_starts`` (its start rate):
longer than the checker's staleness of a lowered limit (limit_refresh_interval + 2 s) with
the limit lowered within 1.5 s of the first start, and twice it under half the visibility
timeout (the two starts of a pool of limit 2 wait for their tokens without extending
their messages' visibility: see the report of the helper that added it)."""


def _slow_starts(
    nemesis: Nemesis,
    rng: random.Random,
    nodes: tuple[str, ...],
    pools: Mapping[str, tuple[int, bool]],
) -> None:
    """Buggify's ``slow_starts``: at a burst of requests, StartExecution answers lost (the
    starts applied) and status events lost for 20 to 40 s, and the pool's limit lowered
    (2 to 1) within 1.5 s of the first start: a start waiting for its rate token meanwhile
    must count the start sent, which runs unseen."""
    quiet_at = nemesis.quiet_at
    start = rng.uniform(0.05, 0.5) * quiet_at
    end = min(quiet_at, start + rng.uniform(20, 40))
    nemesis.storms.insert(0, Storm("lost_answers", start, end, 1.0, operations=("StartExecution",)))
    nemesis.event_storms.insert(0, EventStorm(start, end + 60.0, lost=True))
    nemesis.burst_at = start + rng.uniform(0, 2)
    for name, (limit, parameter) in pools.items():
        if limit < 2:
            continue
        at = nemesis.burst_at + rng.uniform(0.3, 1.5)
        kind = "set_limit" if parameter else "sighup"
        for node in nodes if kind == "sighup" else (rng.choice(nodes),):
            nemesis.actions.append(Action(at, kind, node, limit - 1, name))
    nemesis.actions.sort(key=lambda a: a.time)


def _early_answers(nemesis: Nemesis, rng: random.Random, give_up_after: float) -> None:
    """Buggify's ``early_answers``: dark starts (half of the starts) whose attempts are lost
    until the last 1 to 3 s before the start gives up; those are held on the wire, answered
    with a 5xx at once and applied at D - after the start gave up, in doubt. Their status
    events are lost. A describe in the D after the give-up says "does not exist"."""
    nemesis.dark_share = 0.5
    nemesis.dark_for = give_up_after + rng.uniform(6, 10)
    nemesis.held_from_end = nemesis.dark_for - give_up_after + rng.uniform(1, 3)
    nemesis.dark_failure = ("ServiceUnavailable", False)
    nemesis.dark_events = EventStorm(0.0, nemesis.quiet_at, lost=True)
    if nemesis.burst_at is None:
        nemesis.burst_at = rng.uniform(0.05, 0.4) * nemesis.quiet_at


def _buggify_hunt(
    nemesis: Nemesis, rng: random.Random, knobs: Knobs, give_up_after: float, start_grace: float
) -> None:
    """The plans of `sim.buggify.HUNT` knobs: put first, so that they win where another
    window overlaps them (a refusal window, an event storm)."""
    quiet_at = nemesis.quiet_at
    if knobs.unknown_starts:
        # Each start's first attempt applied, answered 5xx; its retries refused until it
        # gives up; its events lost: only its slot, held in doubt, keeps the count.
        start = rng.uniform(0.05, 0.3) * quiet_at
        end = min(quiet_at, start + give_up_after + rng.uniform(40, 100))
        nemesis.refusal_windows.insert(0, (start, end, "5xx_after"))
        nemesis.event_storms.insert(0, EventStorm(start, end + 60.0, lost=True))
        nemesis.burst_at = start + rng.uniform(0, 5)
    if knobs.last_receive_doubts:
        # The same, long enough for a request's second receive (the harness sets
        # maxReceiveCount 2: its last) to give up too, and describes failing until well
        # after: the request is kept, its first start in doubt. (Listings work: the runs
        # are short, so that a listing may never see one; a listing failing for minutes
        # stops a process that takes the lease over, which lets its kept requests go.)
        start = rng.uniform(0.05, 0.3) * quiet_at
        end = min(quiet_at, start + 2 * give_up_after + 30.0 + rng.uniform(10, 40))
        first = rng.choice(("5xx_after", "lost_answer"))
        nemesis.refusal_windows.insert(0, (start, end, first))
        nemesis.event_storms.insert(0, EventStorm(start, end + 60.0, lost=True))
        kind = rng.choice(("server_error", "throttle"))
        failing = min(quiet_at, end + start_grace + rng.uniform(60, 180))
        nemesis.storms.insert(
            0, Storm(kind, start, failing, 1.0, operations=("DescribeExecution",))
        )
        nemesis.burst_at = start + rng.uniform(0, 5)


def _buggify(
    nemesis: Nemesis,
    rng: random.Random,
    knobs: Knobs,
    pools: Mapping[str, tuple[int, bool]],
    give_up_after: float,
) -> None:
    """Add the plan of the seed's buggify knobs (drawn from their own stream)."""
    nemesis.knobs = knobs
    quiet_at = nemesis.quiet_at
    if knobs.event_storms:
        for _ in range(rng.randint(1, 3)):
            start = rng.uniform(0, quiet_at * 0.9)
            end = min(quiet_at, start + rng.uniform(10, quiet_at))
            lost = rng.random() < 0.4
            delay = 0.0 if lost else rng.choice(EVENT_DELAYS)
            nemesis.event_storms.append(EventStorm(start, end, lost, delay))
    if knobs.late_starts:
        nemesis.late_start_rate = rng.choice((0.05, 0.2, 0.5))
        nemesis.dark_share = rng.choice((0.1, 0.3, 0.5))
        # Longer than the start retry timeout: every attempt of a dark start gives up in
        # doubt, and each was applied. Mostly its status events are lost or late by
        # minutes to hours too, so only the dispatcher's doubt (and its listings) keep
        # the count.
        nemesis.dark_for = give_up_after + rng.uniform(5, 15)
        nemesis.held_from_end = rng.uniform(5, 20)
        nemesis.kill_after_held = rng.choice((0.0, 0.05, 0.2))
        for _ in range(rng.choice((0, 1, 1, 2))):
            # A window in which every start is held (a degraded front end), and mostly
            # its status events are lost or late too.
            start = rng.uniform(0, quiet_at * 0.8)
            end = start + rng.uniform(20, 120)
            nemesis.late_start_windows.append((start, end))
            if rng.random() < 0.7:
                lost = rng.random() < 0.5
                delay = 0.0 if lost else rng.choice(EVENT_DELAYS[2:])
                nemesis.event_storms.append(EventStorm(start, end + 60.0, lost, delay))
        if rng.random() < 0.8:
            lost = rng.random() < 0.5
            delay = 0.0 if lost else rng.choice(EVENT_DELAYS[2:])
            nemesis.dark_events = EventStorm(0.0, quiet_at, lost, delay)
    if knobs.long_outside:
        kept = [a for a in nemesis.actions if a.kind not in ("outside_start", "redrive")]
        for name in pools:
            for _ in range(rng.randint(1, 3)):
                at = rng.uniform(0, quiet_at)
                kept.append(Action(at, "outside_start", "", rng.randint(240, 600), name))
            for _ in range(rng.randint(2, 4)):
                at = rng.uniform(quiet_at * 0.2, quiet_at)
                kept.append(Action(at, "redrive", "", rng.randint(240, 600), name))
        kept.sort(key=lambda a: a.time)
        nemesis.actions = kept


def _buggify_more(  # noqa: PLR0917 - the plan's parts
    nemesis: Nemesis,
    rng: random.Random,
    knobs: Knobs,
    nodes: tuple[str, ...],
    pools: Mapping[str, tuple[int, bool]],
    give_up_after: float,
) -> None:
    """The later knobs (their own stream: the earlier knobs' plans do not move)."""
    quiet_at = nemesis.quiet_at
    if knobs.refused_retries:
        for _ in range(rng.randint(1, 2)):
            start = rng.uniform(0, quiet_at * 0.5)
            end = min(quiet_at, start + give_up_after + rng.uniform(10, 60))
            first = rng.choice(("5xx_after", "lost_answer", "timeout"))
            nemesis.refusal_windows.append((start, end, first))
            lost = rng.random() < 0.5
            delay = 0.0 if lost else rng.choice(EVENT_DELAYS[2:])
            nemesis.event_storms.append(EventStorm(start, end + 60.0, lost, delay))
    if knobs.callback_storms:
        operations = ("SendTaskSuccess", "SendTaskFailure", "SendTaskHeartbeat")
        for _ in range(rng.randint(1, 3)):
            start = rng.uniform(0, quiet_at * 0.8)
            end = min(quiet_at, start + rng.uniform(40, 200))
            kind = rng.choice(("throttle", "server_error"))
            nemesis.storms.append(Storm(kind, start, end, rate=1.0, operations=operations))
    if knobs.limit_drops:
        for name, (limit, parameter) in pools.items():
            start = rng.uniform(0, quiet_at * 0.7)
            end = min(quiet_at, start + rng.uniform(15, 40))
            nemesis.storms.append(
                Storm("lost_requests", start, end, rate=1.0, operations=("StartExecution",))
            )
            at = start + rng.uniform(0, 3)
            new = max(0, limit - rng.randint(1, max(1, limit)))
            kind = "set_limit" if parameter else "sighup"
            for node in nodes if kind == "sighup" else (rng.choice(nodes),):
                nemesis.actions.append(Action(at, kind, node, new, name))
        nemesis.actions.sort(key=lambda a: a.time)


def _actions(
    rng: random.Random,
    quiet_at: float,
    nodes: tuple[str, ...],
    pools: Mapping[str, tuple[int, bool]],
    intensity: float,
) -> list[Action]:
    actions: list[Action] = []

    def at() -> float:
        return rng.uniform(0, quiet_at)

    actions += [
        Action(at(), rng.choice(("crash", "crash", "sigterm")), rng.choice(nodes))
        for _ in range(rng.randint(0, int(2 * intensity) + 1))
    ]
    for name, (limit, parameter) in pools.items():
        for _ in range(rng.randint(0, 2)):
            new = max(0, limit + rng.randint(-limit, limit))
            kind = "set_limit" if parameter else "sighup"
            actions.append(Action(at(), kind, rng.choice(nodes), new, name))
        actions += [
            Action(at(), "outside_start", "", rng.randint(1, 30), name)
            for _ in range(rng.randint(0, 2))
        ]
        if rng.random() < 0.3:
            actions.append(Action(at(), "redrive", "", rng.randint(1, 20), name))
    actions.sort(key=lambda a: a.time)
    return actions
