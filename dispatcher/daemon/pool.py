"""A pool: one governed state machine, its ledger, its waiting room, and the wake-up.

The ledger decides; the pool adds what the async side needs: the waiting room of
requests received but not yet startable (key at its limit, higher priorities first), a
condition intake waits on (woken by whatever frees a slot or adds a request - never a
timer), gauges kept in step with the ledger, and the refill clock (slot freed -> next
start).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping
from functools import partial
from typing import Any

import anyio

from dispatcher.core.ledger import Change, Ledger, Reservation
from dispatcher.core.requests import tag_of
from dispatcher.core.shared_limits import SharedLimitConfig, SharedLimits
from dispatcher.core.waiting import WaitingRoom
from dispatcher.daemon.metrics import Metrics
from dispatcher.settings.layout import PoolConfig

Clock = Callable[[], float]

LOOKAHEAD = 10
"""Requests each queue keeps waiting in a pool fed by several queues without a key
attribute; any other pool keeps its room full (``max_waiting``, this many at least)."""
MAX_DEFER_SECONDS = 900
PAUSED_DEFER_SECONDS = 300
"""A request for a paused pool (limit 0) that a shared queue brought comes back this late:
20 receives (the template's maxReceiveCount) last 100 minutes of pause."""
FORGET_AFTER_TURN = 120.0
"""Seconds after its turn a deferred request is forgotten unless it got into the waiting
room before: by then it was received again (deferred again, or started), or is gone."""
MAX_TRACKED_DEFERRALS = 50_000
"""Deferrals a pool remembers at most, about 10 MB (past it, the deferral due back first is
forgotten: its key's next one may come back a little early, one receive more). Deferrals not
back yet are otherwise bounded only by the backlog: each is a message hidden in SQS, up to
its in-flight quota of about 120,000 per queue."""


class Pool:
    """One state machine under a concurrency limit."""

    def __init__(
        self,
        config: PoolConfig,
        metrics: Metrics,
        clock: Clock = time.monotonic,
        *,
        queues: int = 1,
    ) -> None:
        self.config = config
        self.name = config.name
        self.state_machine_arn = config.state_machine_arn
        self.ledger = Ledger(config.limit, per_key_limit=config.per_key_limit, key_of=tag_of)
        self.room: WaitingRoom[Any] = WaitingRoom(
            config.max_waiting,
            key_capacity=_key_capacity(config),
            reserved_share=config.reserved_share,
        )
        # With keys, or with one queue, the room is kept full: keys behind a long run of
        # one key's requests in the queue are seen and served in turn, and the start-by of
        # every request held is watched in memory (expired as it passes, though no slot
        # frees). With priorities (several queues) each queue keeps a few startable
        # requests waiting.
        self._queues = queues
        self.lookahead = self._lookahead(config)
        self.metrics = metrics
        self.clock = clock
        self._changed = anyio.Event()
        self._freed_at: deque[float] = deque(maxlen=10_000)
        self.queued: int | None = None  # approximate request-queue depth, from reconcile
        self.queued_at: float | None = None  # when it was read (wall clock, for /status)
        self.receiving = 0  # messages asked for by receives in flight
        self.started_total = 0
        self.finished_total = 0
        self.max_running_seen = 0
        self.duration = 0.0  # mean execution run time (EWMA) once one has ended
        self._durations = 0
        # Deferred requests: each one's turn (when the requests ahead of it should have
        # started) and key, each key's turns in order (its line), and the turns in a heap,
        # earliest first, to forget them (an entry is stale once its request took another
        # turn). A request leaves when it gets into the waiting room, or some time after
        # its turn: never every key ever deferred is kept.
        self._turns: dict[Hashable, tuple[float, str | None]] = {}
        self._lines: dict[str | None, list[float]] = {}
        # The request (execution name) each place in line is for, and which place holds
        # each request's turn (its first copy deferred; the others are spares).
        self._name_of: dict[Hashable, str] = {}
        self._holders: dict[str, Hashable] = {}
        self._returns: list[tuple[float, int, Hashable]] = []  # (turn, seq, request)
        self.on_ended: Callable[[str, str, Mapping[str, Any] | None], None] | None = None
        self._seq = itertools.count()
        self.shared: SharedLimits | None = None  # the named limits it uses (`share`)
        self._linked: tuple[Pool, ...] = ()  # pools sharing a named limit with it
        metrics.prefill(self.name)
        # The gauges' children, looked up once: `labels()` on every update was 4 % of the
        # CPU per start (bench/, py-spy at limit 200).
        gauges = (
            metrics.waiting,
            metrics.per_key_limit,
            metrics.limit,
            metrics.running,
            metrics.starting,
            metrics.in_doubt,
            metrics.free,
        )
        (
            self._waiting_gauge,
            self._per_key_limit_gauge,
            self._limit_gauge,
            self._running_gauge,
            self._starting_gauge,
            self._in_doubt_gauge,
            self._free_gauge,
        ) = (gauge.labels(pool=self.name) for gauge in gauges)
        self.update()

    def reset(self) -> None:
        """A fresh ledger (same limits) for a new reign: it starts from the listing."""
        self.ledger = Ledger(
            self.ledger.limit, per_key_limit=self.ledger.per_key_limit, key_of=tag_of
        )
        if self.shared is not None:
            self.ledger.gate = partial(self.shared.admits, self.name)
            self.shared.withdraw(self.name)
        self.update()

    def share(self, shared: SharedLimits, pools: Iterable[Pool]) -> None:
        """Use the named limits ``shared`` gives this pool: its starts are admitted by them
        too, and a change of any pool sharing one of them wakes this pool's waiters."""
        self.shared = shared
        self.ledger.gate = partial(shared.admits, self.name)
        used = set(shared.uses(self.name))
        self._linked = tuple(p for p in pools if p is not self and used & set(shared.uses(p.name)))

    def reconfigure(self, config: PoolConfig) -> None:
        """Apply a reloaded pool config: per-key limit and waiting room (never evicts)."""
        self.config = config
        self.lookahead = self._lookahead(config)
        self.ledger.set_per_key_limit(config.per_key_limit)
        self.room.reconfigure(
            capacity=config.max_waiting,
            key_capacity=_key_capacity(config),
            reserved_share=config.reserved_share,
        )
        self.update()

    def _lookahead(self, config: PoolConfig) -> int:
        """Requests a queue keeps waiting in the room beyond the free slots (see __init__)."""
        if config.key_attribute is not None or self._queues == 1:
            return max(LOOKAHEAD, config.max_waiting)
        return LOOKAHEAD

    def ended(self, arn: str, status: str, result: Mapping[str, Any] | None) -> None:
        """An execution of this pool ended (status event, describe): tell whoever waits
        for it (a parent's task token)."""
        if self.on_ended is not None:
            self.on_ended(arn, status, result)

    def key_ok(self, key: str | None) -> bool:
        """Whether a request for ``key`` could start now."""
        return self.ledger.key_free(key) > 0

    def update(self) -> None:
        """Refresh gauges and wake intake; call after every ledger or waiting-room change."""
        ledger = self.ledger
        self._waiting_gauge.set(len(self.room))
        self._per_key_limit_gauge.set(ledger.per_key_limit or 0)
        self._limit_gauge.set(ledger.limit)
        self._running_gauge.set(ledger.running_count)
        self._starting_gauge.set(self.starting)
        self._in_doubt_gauge.set(ledger.doubt_count)
        self._free_gauge.set(ledger.free)
        self.max_running_seen = max(self.max_running_seen, ledger.running_count)
        # Wake every waiter on every change: intake waits for a free slot, handlers for
        # admission; each re-checks its own condition.
        self._wake()
        for other in self._linked:  # a unit of a named limit they share freed or taken
            other._wake()

    def _wake(self) -> None:
        event, self._changed = self._changed, anyio.Event()
        event.set()

    def may_reserve(self, may_start: bool) -> bool:
        """Whether a start may be reserved now: a free slot, the lease (``may_start``), and
        room in every named limit the pool uses for one of its waiting requests (which
        otherwise claims them: see `dispatcher.core.shared_limits`)."""
        if self.ledger.free == 0 or not may_start:
            if self.shared is not None:
                self.shared.withdraw(self.name)
            return False
        if self.shared is None or not self.shared.uses(self.name):
            return True
        if not self.room.startable(self.key_ok):
            self.shared.withdraw(self.name)
            return False
        return self.shared.may_reserve(self.name)

    def held_back(self) -> bool:
        """Whether a named limit it uses is paused or below its weight: nothing can start."""
        return self.shared is not None and bool(self.shared.blocked(self.name))

    @property
    def starting(self) -> int:
        """Reserved slots: starts in flight."""
        return self.ledger.reserved_count

    def wanted(self, from_queue: int, receiving: int) -> int:
        """How many messages a receive on a queue feeding this pool may take now (<= 10).

        Enough to fill the free slots no waiting request can take, and to keep
        ``lookahead`` requests of that queue waiting; never more than the waiting room has
        room for. ``from_queue`` and ``receiving`` are that queue's waiting requests and
        messages asked for in receives in flight: each queue counts only its own, so a long
        poll on an idle queue never holds back the receives of a busy one (their extra
        requests wait in the room).
        """
        if self.ledger.limit == 0 or self.held_back():
            return 0  # paused: the backlog stays in SQS, untouched (no receive is spent)
        startable = self.room.startable(self.key_ok)
        unclaimed = self.ledger.free - startable - receiving
        ahead = self.lookahead - from_queue - receiving if self.lookahead else 0
        room_left = self.room.capacity - len(self.room) - receiving
        want = max(unclaimed, ahead)
        if self.lookahead or unclaimed <= 0:  # taking more than free slots waits in the room
            want = min(want, room_left + max(0, unclaimed))
        return max(0, min(10, want))

    async def changed(self) -> None:
        """Wait for the next change (a slot freed or taken, a request added or picked)."""
        await self._changed.wait()

    async def wait_admitted(self, reservation: Reservation, at_most: float) -> bool:
        """Wait (``at_most`` seconds) until the reservation may start; return whether it may."""
        with anyio.move_on_after(at_most):
            while not self.ledger.admitted(reservation):
                await self._changed.wait()
        return self.ledger.admitted(reservation)

    def note_freed(self, change: Change, was_full: bool, since: float | None = None) -> None:
        """Record a freed slot: how long its execution ran (``since`` its start, when the
        status event tells), and whether a hand-over has begun (the pool was full)."""
        if change is Change.FREED:
            self.finished_total += 1
            if since is not None:
                ran = max(0.0, self.clock() - since)
                self.duration = ran if self._durations == 0 else 0.9 * self.duration + 0.1 * ran
                self._durations += 1
            if was_full:
                self._freed_at.append(self.clock())

    def run_time(self) -> float:
        """The executions' mean run time; until one has ended, how long the oldest has run
        so far (a lower bound that grows with the truth), at least 1 s."""
        if self._durations:
            return self.duration
        oldest = self.ledger.oldest_since()
        return max(1.0, 0.0 if oldest is None else self.clock() - oldest)

    def spare(self, name: str, ident: Hashable, predecessor: Hashable | None = None) -> bool:
        """Whether a place in line holds the turn of request ``name`` for another copy than
        ``ident`` (or the message it is a renewed copy of, ``predecessor``): this one is a
        spare, the request's start is that copy's."""
        holder = self._holders.get(name)
        return holder is not None and holder not in (ident, predecessor)

    def defer_seconds(
        self,
        key: str | None,
        ident: Hashable | None = None,
        *,
        predecessor: Hashable | None = None,
        name: str | None = None,
    ) -> int:
        """How long a request the waiting room has no space for should stay in its queue:
        about the time the requests ahead of it (of its key: waiting here, or deferred
        before it) need to start, from the executions' mean run time; 1 s to 15 min. Each
        deferral is spaced after the previous ones, so a deep backlog of one key comes back
        in turn, about once per message: every hand-back is a receive, and receives count
        towards the queue's redrive policy.

        A request (``ident``: its place in line) back before its turn keeps its place: it
        is deferred until its turn again. Counted as new, a backlog of one key longer than
        SQS's 15-minute delay once came back all at once, each one counting the others
        as ahead of it, and was deferred 15 minutes again, all at once, for ever, with the
        key idle in between. Back at its turn and still not let in, it goes to the back."""
        now = self.clock()
        self.forget_returned_deferrals()
        line = self._lines.get(key, [])
        if ident is not None and ident not in self._turns and predecessor in self._turns:
            self._adopt(predecessor, ident)  # a renewed copy keeps the place of its original
        held = self._turns.get(ident) if ident is not None else None
        paused = self.ledger.limit == 0 or self.held_back()
        if held is not None and held[0] - now >= 1.0 and not paused:
            # Back before its turn (SQS hides a message 15 min at most): it keeps its place.
            return int(min(MAX_DEFER_SECONDS, held[0] - now))
        # New, or back at its turn and still not let in: behind every request of its key
        # deferred before (not itself).
        before = len(line) - (held is not None)
        ledger = self.ledger
        lanes = ledger.per_key_limit if key is not None and ledger.per_key_limit else ledger.limit
        ahead = self.room.count(key=key) + before
        run_time = self.run_time()
        if self._linked:  # named limits: its lanes are theirs, shared with the pools waiting
            lanes = min(lanes, self._shared_lanes())
            ahead += sum(len(other.room) for other in self._linked)
            run_time = max(run_time, *(other.run_time() for other in self._linked))
        wait = max(1.0, ahead / max(1, lanes) * run_time)
        if held is not None and held[0] - now < 1.0:
            # Back at its turn (DelaySeconds counts whole seconds) and still not let in: a
            # run of its lanes at least. With none ahead of it any more, the head of a line
            # came back every second, a receive each (with maxReceiveCount 1, a renewal).
            wait = max(wait, run_time / max(1, lanes))
        if paused:  # a shared queue brought it
            wait = PAUSED_DEFER_SECONDS
        self._take_turn(object() if ident is None else ident, key, now + wait, name)
        return int(min(MAX_DEFER_SECONDS, wait))

    def _take_turn(
        self, ident: Hashable, key: str | None, turn: float, name: str | None = None
    ) -> None:
        """Remember ``ident``'s turn in its key's line (replacing the one it had)."""
        self.left_line(ident)
        self._turns[ident] = (turn, key)
        if name is not None:
            self._name_of[ident] = name
            self._holders.setdefault(name, ident)
        bisect.insort(self._lines.setdefault(key, []), turn)
        heapq.heappush(self._returns, (turn, next(self._seq), ident))
        while len(self._turns) > MAX_TRACKED_DEFERRALS:
            self._forget_earliest()
        if len(self._returns) > 2 * len(self._turns) + 1000:  # mostly stale: rebuilt
            self._returns = [(t, next(self._seq), i) for i, (t, _) in self._turns.items()]
            heapq.heapify(self._returns)

    def _adopt(self, old: Hashable, new: Hashable) -> None:
        """The place of message ``old`` passes to ``new``, its renewed copy."""
        turn, key = self._turns.pop(old)
        self._turns[new] = (turn, key)
        heapq.heappush(self._returns, (turn, next(self._seq), new))  # old's entry: stale
        name = self._name_of.pop(old, None)
        if name is not None:
            self._name_of[new] = name
            if self._holders.get(name) == old:
                self._holders[name] = new

    def left_line(self, ident: Hashable) -> None:
        """A deferred request got into the waiting room (or took another turn): it is no
        longer ahead of the requests deferred after it."""
        held = self._turns.pop(ident, None)
        name = self._name_of.pop(ident, None)
        if name is not None and self._holders.get(name) == ident:
            del self._holders[name]
        if held is None:
            return
        turn, key = held
        line = self._lines[key]
        del line[bisect.bisect_left(line, turn)]
        if not line:
            del self._lines[key]

    def _shared_lanes(self) -> int:
        """How many of its executions the named limits it uses let run at once."""
        shared = self.shared
        if shared is None:
            return self.ledger.limit
        used = shared.uses(self.name).items()
        return min((shared.limit(name) // weight for name, weight in used), default=1)

    def forget_returned_deferrals(self) -> None:
        """Forget the deferred requests whose turn is long past (back in their queue by
        then, and either deferred again or admitted, or gone), and their keys once none is
        left."""
        now = self.clock()
        while self._returns and self._returns[0][0] + FORGET_AFTER_TURN <= now:
            self._forget_earliest()

    def _forget_earliest(self) -> None:
        """Drop the earliest turn remembered (and its key, once it has none left)."""
        turn, _, ident = heapq.heappop(self._returns)
        held = self._turns.get(ident)
        if held is not None and held[0] == turn:  # else stale: it took another turn since
            self.left_line(ident)

    @property
    def deferrals_pending(self) -> int:
        """Deferred requests remembered (forgotten lazily, at the next deferral)."""
        return len(self._turns)

    @property
    def deferral_keys(self) -> int:
        """Keys with a deferred request remembered."""
        return len(self._lines)

    def note_start_sent(self) -> None:
        """A StartExecution is being sent: close the oldest open hand-over, if any."""
        if self._freed_at:
            self.metrics.refill.labels(pool=self.name).observe(
                self.clock() - self._freed_at.popleft()
            )

    def backlog_drained(self) -> None:
        """The request queue ran dry: pending frees are no longer hand-overs."""
        self._freed_at.clear()


def _key_capacity(config: PoolConfig) -> int | None:
    """One key may take half the room (at least twice its per-key limit): the other half
    stays for the other keys."""
    if config.key_attribute is None:
        return None
    return max(1, config.max_waiting // 2, 2 * (config.per_key_limit or 0))


def share_limits(
    pools: Mapping[str, Pool], limits: Iterable[SharedLimitConfig], metrics: Metrics
) -> SharedLimits | None:
    """Give ``pools`` the named limits they use (None: no named limit is configured)."""
    configs = list(limits)
    if not configs:
        return None
    shared = SharedLimits(
        configs,
        {name: pool.config.uses for name, pool in pools.items()},
        lambda name: pools[name].ledger,
    )
    for pool in pools.values():
        pool.share(shared, pools.values())
    publish_shared(shared, metrics, lambda name: len(pools[name].room))
    return shared


def publish_shared(
    shared: SharedLimits, metrics: Metrics, waiting_of: Callable[[str], int]
) -> None:
    """Export each named limit's gauges, read when scraped (never stale, nothing to keep in
    step). ``waiting_of`` gives the requests waiting in a pool's room."""
    for name in shared.names:
        metrics.shared_limit.labels(limit=name).set_function(partial(shared.limit, name))
        metrics.shared_limit_in_use.labels(limit=name).set_function(partial(shared.in_use, name))
        metrics.shared_limit_waiting.labels(limit=name).set_function(
            partial(_shared_waiting, shared, name, waiting_of)
        )
        for pool in shared.users(name):
            metrics.shared_limit_blocked.labels(limit=name, pool=pool).set_function(
                partial(_shared_blocked, shared, name, pool)
            )


def _shared_waiting(shared: SharedLimits, name: str, waiting_of: Callable[[str], int]) -> float:
    held_back = {*shared.claims(name), *(p for p in shared.users(name) if shared.blocked(p))}
    return float(sum(waiting_of(pool) for pool in held_back))


def _shared_blocked(shared: SharedLimits, name: str, pool: str) -> float:
    return float(any(b.limit == name and b.value > 0 for b in shared.blocked(pool)))
