"""The slot ledger: which executions hold a slot of one pool, decided without I/O.

Everything that decides *whether* a start may happen lives here, so it can be tested
exhaustively. The ledger keeps a *set* of execution ARNs (never a counter), the
reservations of starts in flight, and bounded tombstones of executions known to have
finished. Every input is idempotent: applying the same event or listing twice changes
nothing, and a tombstone keeps a late ``RUNNING`` event or a stale listing from bringing
a finished execution back. Time is passed in by the caller (monotonic seconds).
"""

from __future__ import annotations

import enum
import itertools
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

_TOKENS = itertools.count(1)
"""Reservation tokens, shared by every ledger of the process: their order is the order the
starts were reserved in, across pools too (named limits admit the oldest first)."""

TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "TIMED_OUT", "ABORTED"})
"""Statuses after which an execution no longer holds a slot."""


class Change(enum.Enum):
    """What applying one input did to the ledger."""

    ADDED = "added"
    """The execution now holds a slot it did not hold before."""
    FREED = "freed"
    """The execution held a slot and gave it back."""
    UNCHANGED = "unchanged"
    """The input was already known (a duplicate): nothing changed."""
    STALE = "stale"
    """The input is older than what is known (a tombstone, a later run): ignored."""
    NOTED = "noted"
    """An execution the ledger did not hold has finished: only its tombstone was written."""


@dataclass(frozen=True, slots=True)
class Reservation:
    """A slot held for a start that is in flight; ``token`` is unique in the process and
    grows with each reservation."""

    token: int
    key: str | None = None
    """The concurrency key the start is for (None: no key)."""


@dataclass(slots=True)
class _Held:
    """One running execution: when it was last confirmed, and the latest run seen."""

    since: float
    redrives: int
    """The highest redrive count seen while held: a terminal for an earlier run is stale."""
    key: str | None = None
    """The concurrency key it runs for (None: none, or unknown)."""


@dataclass(slots=True)
class _Doubt:
    """A start whose outcome is unknown: it may be running under ``arn``."""

    since: float
    """When its last attempt ended: it took effect before then, if at all."""
    key: str | None = None


@dataclass(frozen=True, slots=True)
class ListingResult:
    """What one reconcile listing changed and what it could not decide alone."""

    adopted: tuple[str, ...]
    """Running executions the ledger did not know (started elsewhere); now counted."""
    suspects: tuple[str, ...]
    """Held executions the listing no longer shows, past the grace window, and starts in
    doubt past the grace window since their last attempt: describe them."""


class Ledger:
    """The running set, reservations and tombstones of one pool."""

    def __init__(
        self,
        limit: int,
        *,
        per_key_limit: int | None = None,
        key_of: Callable[[str], str | None] = lambda _arn: None,
        tombstone_capacity: int = 100_000,
    ) -> None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        if tombstone_capacity < 1:
            raise ValueError(f"tombstone_capacity must be >= 1, got {tombstone_capacity}")
        self._limit = limit
        self._per_key_limit = _checked_key_limit(per_key_limit)
        self._key_of = key_of  # the key of an execution seen but not started here (its name)
        self._running: dict[str, _Held] = {}  # arn -> since when, latest run seen
        self._reserved: dict[int, Reservation] = {}  # token -> reservation, oldest first
        self._sent: set[int] = set()  # reservations whose StartExecution has been sent
        self._doubt: dict[str, _Doubt] = {}  # arn -> start in doubt (may be running)
        self._by_key: Counter[str] = Counter()  # key -> running + reserved + in doubt
        self._tombstones: OrderedDict[str, int] = OrderedDict()  # arn -> redrive count
        self._tombstone_capacity = tombstone_capacity
        self.gate: Callable[[Reservation, bool], bool] | None = None
        """Asked last by `admitted` (reservation, sent already): the named limits the pool
        uses (`dispatcher.core.shared_limits`); None: none."""

    # -- reading ---------------------------------------------------------------------

    @property
    def limit(self) -> int:
        """The most slots that may be held by running executions and starts in flight."""
        return self._limit

    @property
    def per_key_limit(self) -> int | None:
        """The most slots one key may hold (None: no per-key limit)."""
        return self._per_key_limit

    def key_held(self, key: str) -> int:
        """Slots held by ``key``: its running executions and its starts in flight."""
        return self._by_key[key]

    def key_free(self, key: str | None) -> int:
        """Slots a new start for ``key`` may take now (the pool's free slots and the key's)."""
        if key is None or self._per_key_limit is None:
            return self.free
        return max(0, min(self.free, self._per_key_limit - self._by_key[key]))

    @property
    def keys_at_limit(self) -> int:
        """How many keys hold all the slots their per-key limit allows."""
        if self._per_key_limit is None:
            return 0
        return sum(1 for held in self._by_key.values() if held >= self._per_key_limit)

    @property
    def running(self) -> frozenset[str]:
        """ARNs of the executions believed to be running."""
        return frozenset(self._running)

    @property
    def running_count(self) -> int:
        """How many executions are believed to be running."""
        return len(self._running)

    @property
    def reserved_count(self) -> int:
        """How many slots are held for starts in flight."""
        return len(self._reserved)

    @property
    def sent_count(self) -> int:
        """How many reserved slots' starts have been sent (their outcome not known yet)."""
        return len(self._sent)

    def unsent(self) -> list[Reservation]:
        """The reservations whose start has not been sent yet, oldest first."""
        return [r for r in self._reserved.values() if r.token not in self._sent]

    @property
    def doubt_count(self) -> int:
        """How many slots are held by starts whose outcome is unknown (in doubt)."""
        return len(self._doubt)

    @property
    def in_doubt(self) -> frozenset[str]:
        """ARNs of the starts in doubt: each may or may not be running."""
        return frozenset(self._doubt)

    @property
    def held(self) -> int:
        """Slots held: running executions, starts in flight and starts in doubt."""
        return len(self._running) + len(self._reserved) + len(self._doubt)

    @property
    def free(self) -> int:
        """Slots a new start may take now (0 while over the limit, e.g. after lowering it)."""
        return max(0, self._limit - self.held)

    def oldest_since(self) -> float | None:
        """When the longest-held running execution was last confirmed (None: none runs)."""
        return min((held.since for held in self._running.values()), default=None)

    def held_since(self, arn: str) -> float | None:
        """When ``arn`` was last confirmed running (for ours: when it started)."""
        held = self._running.get(arn)
        return None if held is None else held.since

    def holds(self, arn: str) -> bool:
        """Whether ``arn`` is in the running set."""
        return arn in self._running

    def is_tombstoned(self, arn: str) -> bool:
        """Whether ``arn`` is known to have finished."""
        return arn in self._tombstones

    # -- changing the limit ----------------------------------------------------------

    def set_limit(self, limit: int) -> None:
        """Change the limit. Lowering it never evicts: it only holds starts back."""
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        self._limit = limit

    def set_per_key_limit(self, per_key_limit: int | None) -> None:
        """Change the per-key limit; like the limit, lowering it only holds starts back."""
        self._per_key_limit = _checked_key_limit(per_key_limit)

    # -- starts ----------------------------------------------------------------------

    def reserve(self, n: int, now: float, key: str | None = None) -> list[Reservation]:
        """Hold up to ``n`` free slots for starts (for ``key``) about to be made; may return
        fewer. ``now`` is accepted for symmetry with the other inputs."""
        del now
        granted = min(max(n, 0), self.key_free(key))
        out = []
        for _ in range(granted):
            reservation = Reservation(next(_TOKENS), key)
            self._reserved[reservation.token] = reservation
            if key is not None:
                self._by_key[key] += 1
            out.append(reservation)
        return out

    def admitted(self, reservation: Reservation) -> bool:
        """Whether the start of this reservation may be sent now.

        A reservation is granted only while a slot is free, but executions started
        elsewhere (or a lowered limit) can take slots while requests are being received.
        Then starts already sent keep their slots, and of the others only the oldest that
        fit under ``limit - running - sent`` may start (per key likewise); the rest wait
        (their requests stay hidden) until slots free up, so the limit holds even then.
        """
        token = reservation.token
        if token not in self._reserved:
            return False
        held = len(self._running) + len(self._doubt)
        if token in self._sent:
            # A retry after an attempt whose outcome is unknown: it may run already, and if
            # it does not, this attempt may start it - while every other start sent may
            # run too. It goes only while all of them fit under the limit in force now
            # (lowered meanwhile, or slots taken by executions started elsewhere): never a
            # new start while over. (A refused attempt did nothing: see `unsend`.)
            if held + len(self._sent) > self._limit:
                return False
            return self._key_admits(reservation, sent=True) and self._gate_admits(
                reservation, sent=True
            )
        unsent = self.unsent()
        if not _among_oldest(unsent, reservation, self._limit - held - len(self._sent)):
            return False
        return self._key_admits(reservation, sent=False) and self._gate_admits(
            reservation, sent=False
        )

    def _gate_admits(self, reservation: Reservation, *, sent: bool) -> bool:
        return self.gate is None or self.gate(reservation, sent)

    def _key_admits(self, reservation: Reservation, *, sent: bool) -> bool:
        """`admitted`'s rule for the reservation's key (per-key limit)."""
        key = reservation.key
        if key is None or self._per_key_limit is None:
            return True
        keyed = [r for r in self._reserved.values() if r.key == key]
        keyed_sent = [r for r in keyed if r.token in self._sent]
        held = self._by_key[key] - len(keyed)  # its running executions and starts in doubt
        if sent:
            return held + len(keyed_sent) <= self._per_key_limit
        keyed_unsent = [r for r in keyed if r.token not in self._sent]
        room = self._per_key_limit - held - len(keyed_sent)
        return _among_oldest(keyed_unsent, reservation, room)

    def mark_sent(self, reservation: Reservation) -> None:
        """The start of this (admitted) reservation is on the wire: it keeps its slot, and
        later admissions count it, even if slots are taken elsewhere meanwhile."""
        if reservation.token in self._reserved:
            self._sent.add(reservation.token)

    def unsend(self, reservation: Reservation) -> None:
        """The start of this reservation was refused (a throttle, a validation error: it did
        nothing): it is among the starts not yet sent again, keeping its age, and its retry
        is admitted as a first attempt is."""
        self._sent.discard(reservation.token)

    def cancel(self, reservation: Reservation) -> bool:
        """Give a reserved slot back (the start failed or was not needed).

        Returns whether the reservation was still held; cancelling twice is harmless.
        """
        return self._unreserve(reservation.token)

    def _unreserve(self, token: int) -> bool:
        self._sent.discard(token)
        reservation = self._reserved.pop(token, None)
        if reservation is None:
            return False
        if reservation.key is not None:
            self._drop_key(reservation.key)
        return True

    def _drop_key(self, key: str) -> None:
        self._by_key[key] -= 1
        if self._by_key[key] <= 0:
            del self._by_key[key]

    def _hold(self, arn: str, held: _Held) -> None:
        self._running[arn] = held
        if held.key is not None:
            self._by_key[held.key] += 1

    def _release(self, arn: str) -> bool:
        held = self._running.pop(arn, None)
        if held is None:
            return False
        if held.key is not None:
            self._drop_key(held.key)
        return True

    def started(self, reservation: Reservation, arn: str, now: float) -> Change:
        """Turn a reservation into a running execution once ``StartExecution`` answered.

        The status event may have been applied before the start call returned: if the
        execution is already running the reservation is simply dropped, and if it has
        already finished (tombstone) it does not come back.
        """
        self._unreserve(reservation.token)
        self._settle(arn)  # a start of it in doubt: this answer settles it
        if arn in self._tombstones:
            return Change.STALE
        if arn in self._running:
            return Change.UNCHANGED
        self._hold(arn, _Held(now, 0, reservation.key))
        return Change.ADDED

    def doubt(self, reservation: Reservation, arn: str, now: float) -> Change:
        """The start of this reservation may have taken effect as ``arn``, but no answer
        says so (a timeout, a reset, a 5xx, retries given up): its slot stays held, in
        doubt, until evidence settles it (invariant 1) - a status event, a listing, or a
        describe (`observe_running`, `observe_terminal`, `observe_missing`).

        ``now`` is when the last attempt could take effect (it ended, or D after it was sent
        if that is later): the start took effect before then, if at all. Nothing to doubt
        when ``arn`` is already known running or finished (names are never reused): the
        reservation is simply dropped.
        """
        if not self._unreserve(reservation.token):
            return Change.UNCHANGED  # already settled (started, or given back)
        if arn in self._running or arn in self._tombstones:
            return Change.UNCHANGED
        doubt = self._doubt.get(arn)
        if doubt is not None:  # doubted twice (two copies of one request): one slot
            doubt.since = max(doubt.since, now)
            return Change.UNCHANGED
        self._doubt[arn] = _Doubt(now, reservation.key)
        if reservation.key is not None:
            self._by_key[reservation.key] += 1
        return Change.ADDED

    def doubted_since(self, arn: str) -> float | None:
        """When the last attempt of a start in doubt ended (None: not in doubt)."""
        doubt = self._doubt.get(arn)
        return None if doubt is None else doubt.since

    def _settle(self, arn: str) -> str | None:
        """Drop ``arn``'s doubt, if any; return its key (or None)."""
        doubt = self._doubt.pop(arn, None)
        if doubt is None:
            return None
        if doubt.key is not None:
            self._drop_key(doubt.key)
        return doubt.key

    # -- events and listings ---------------------------------------------------------

    def observe_running(self, arn: str, now: float, redrive_count: int = 0) -> Change:
        """Apply "``arn`` is running" (a ``RUNNING`` event or a describe/listing).

        Unknown executions are counted: started by someone else, or by us before a
        restart. A tombstoned one comes back only when it was redriven since it ended.
        """
        ended_at_redrive = self._tombstones.get(arn)
        if ended_at_redrive is not None:
            if redrive_count <= ended_at_redrive:
                return Change.STALE
            del self._tombstones[arn]
        held = self._running.get(arn)
        if held is not None:
            held.redrives = max(held.redrives, redrive_count)
            return Change.UNCHANGED
        doubted = arn in self._doubt
        key = self._settle(arn) if doubted else self._key_of(arn)
        self._hold(arn, _Held(now, redrive_count, key))
        return Change.UNCHANGED if doubted else Change.ADDED

    def observe_terminal(self, arn: str, redrive_count: int = 0) -> Change:
        """Apply "``arn`` has finished": free its slot and leave a tombstone.

        ``redrive_count`` is the finished run's (events and ``DescribeExecution`` carry
        it): the terminal event of a run before a redrive the ledger has already seen
        running is late, and must not free the redriven run's slot.
        """
        held = self._running.get(arn)
        if held is not None and redrive_count < held.redrives:
            return Change.STALE
        previous = self._tombstones.get(arn)
        self._tombstones[arn] = max(redrive_count, previous if previous is not None else 0)
        self._tombstones.move_to_end(arn)
        while len(self._tombstones) > self._tombstone_capacity:
            self._tombstones.popitem(last=False)
        doubted = arn in self._doubt
        self._settle(arn)
        if self._release(arn) or doubted:
            return Change.FREED
        return Change.UNCHANGED if previous is not None else Change.NOTED

    def confirm_running(self, arn: str, now: float, redrive_count: int = 0) -> None:
        """A describe said ``arn`` still runs: restart its grace window (a start in doubt
        is settled: it runs)."""
        if arn in self._doubt:
            self.observe_running(arn, now, redrive_count)
        held = self._running.get(arn)
        if held is not None:
            held.since = now
            # The run described is the live one: a late terminal of an earlier run is stale.
            held.redrives = max(held.redrives, redrive_count)

    def observe_missing(self, arn: str, now: float, grace: float) -> Change:
        """Apply "``arn`` does not exist" (``ExecutionDoesNotExist`` from a describe).

        Describes and listings lag behind a start, so this settles a start in doubt only
        once ``grace`` has passed since its last attempt could take effect (`doubt`), and
        frees a held execution only once ``grace`` has passed since it was last confirmed;
        before that nothing
        changes. No tombstone: the request may still start it later under the same name.
        The one rule for "does not exist", whoever asked (the starter or reconcile).
        """
        doubt = self._doubt.get(arn)
        if doubt is not None:
            if now - doubt.since < grace:
                return Change.UNCHANGED
            self._settle(arn)
            return Change.FREED
        held = self._running.get(arn)
        if held is None or now - held.since < grace:
            return Change.UNCHANGED
        self._release(arn)
        return Change.FREED

    def apply_listing(
        self, listed: Mapping[str, int] | Iterable[str], listed_at: float, grace: float
    ) -> ListingResult:
        """Apply a complete ``ListExecutions(RUNNING)`` taken starting at ``listed_at``.

        ``listed`` maps ARN -> redrive count (or is a plain iterable of ARNs). Unknown
        running executions are adopted. Held executions missing from the listing are not
        freed here: the listing may lag, so those held since before ``listed_at - grace``
        are returned as suspects for the caller to confirm with ``DescribeExecution``.
        """
        counts = dict(listed) if isinstance(listed, Mapping) else dict.fromkeys(listed, 0)
        adopted = [
            arn
            for arn, redrives in counts.items()
            if self.observe_running(arn, listed_at, redrives) is Change.ADDED
        ]
        cutoff = listed_at - grace
        suspects = [
            arn for arn, held in self._running.items() if arn not in counts and held.since <= cutoff
        ]
        suspects += [
            arn for arn, doubt in self._doubt.items() if arn not in counts and doubt.since <= cutoff
        ]
        return ListingResult(adopted=tuple(adopted), suspects=tuple(suspects))


def _among_oldest(reservations: Iterable[Reservation], reservation: Reservation, room: int) -> bool:
    """Whether ``reservation`` is among the oldest ``room`` of ``reservations``."""
    for position, other in enumerate(reservations):
        if position >= room:
            return False
        if other.token == reservation.token:
            return True
    return False


def _checked_key_limit(per_key_limit: int | None) -> int | None:
    if per_key_limit is not None and per_key_limit < 1:
        raise ValueError(f"per_key_limit must be >= 1 (or None), got {per_key_limit}")
    return per_key_limit
