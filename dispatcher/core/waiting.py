"""The waiting room of one pool: requests received from SQS that cannot start yet.

A request waits here while its concurrency key is at its per-key limit or a higher
priority goes first. The room decides only *which* held request starts next; whether a key
may start is asked of the caller, so the room stays pure (no I/O, no clock, no asyncio).

Order of service:

- within one priority level, round-robin across keys (``None`` is one more key) and FIFO
  within a key, so one busy tenant cannot push the others back;
- a key that may not start is skipped where it stands, so it blocks nobody and keeps its
  turn for when it may start again;
- across levels the highest level with a startable request wins, except that while lower
  levels also have startable requests, a ``reserved_share`` of the picks goes to them (and,
  recursively, the same share of those to the levels below the next), so they never starve.
  Credit counters make this deterministic: after N contested picks the lower side has had
  exactly ``floor(N * share)``.
"""

from __future__ import annotations

import bisect
import enum
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import Final, Generic, Literal, TypeAlias, TypeVar

T = TypeVar("T")

MAX_RESERVED_SHARE: Final = 0.9
"""Above this the lower levels would effectively outrank the top one."""

_SHARE_DENOMINATOR: Final = 1_000_000
"""Shares are kept as exact fractions (0.1 is 1/10, not 0.1000000000000000055...)."""

_Key: TypeAlias = str | None


class _AllKeys(enum.Enum):
    """Sentinel type: ``count()`` without a key counts every key, including ``None``."""

    ALL = enum.auto()


ALL_KEYS: Final = _AllKeys.ALL


class WaitingRoom(Generic[T]):
    """Requests held in memory per (priority, key), served fairly within capacity bounds."""

    def __init__(
        self, capacity: int, *, key_capacity: int | None = None, reserved_share: float = 0.1
    ) -> None:
        self._capacity, self._key_capacity, self._share = _validated(
            capacity, key_capacity, reserved_share
        )
        # priority -> key -> (arrival number, item) oldest first; the key order of a level
        # is its rotation order.
        self._levels: dict[int, OrderedDict[_Key, deque[tuple[int, T]]]] = {}
        self._priorities: list[int] = []  # ascending; a level exists only while it holds items
        self._credits: dict[int, Fraction] = {}  # level -> credit owed to the levels below it
        self._key_counts: dict[_Key, int] = {}
        self._level_counts: dict[int, int] = {}
        self._size = 0
        self._arrivals = itertools.count()

    # -- configuration ---------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Most items held in total."""
        return self._capacity

    @property
    def key_capacity(self) -> int | None:
        """Most items held of one key (``None``: no per-key cap)."""
        return self._key_capacity

    @property
    def reserved_share(self) -> float:
        """Fraction of contested picks that goes to the levels below the top one."""
        return float(self._share)

    def reconfigure(
        self, *, capacity: int, key_capacity: int | None, reserved_share: float
    ) -> None:
        """Apply new bounds; held items are never dropped, ``offer()`` refuses until below."""
        self._capacity, self._key_capacity, self._share = _validated(
            capacity, key_capacity, reserved_share
        )

    # -- reading ---------------------------------------------------------------------

    def __len__(self) -> int:
        return self._size

    def count(
        self, *, key: _Key | Literal[_AllKeys.ALL] = ALL_KEYS, priority: int | None = None
    ) -> int:
        """Items held, optionally only those of one key and/or one priority level."""
        if key is ALL_KEYS:
            return self._size if priority is None else self._level_counts.get(priority, 0)
        if priority is None:
            return self._key_counts.get(key, 0)
        level = self._levels.get(priority)
        queue = None if level is None else level.get(key)
        return 0 if queue is None else len(queue)

    def items(self) -> list[T]:
        """A snapshot of every held item, oldest first (e.g. to extend their visibility)."""
        return [item for _, item in self._oldest_first()]

    def startable(self, may_start: Callable[[_Key], bool]) -> int:
        """How many held items have a key that ``may_start`` lets start now."""
        verdict = _memo(may_start)
        return sum(
            len(queue)
            for level in self._levels.values()
            for key, queue in level.items()
            if verdict(key)
        )

    # -- changing --------------------------------------------------------------------

    def offer(self, item: T, *, priority: int, key: _Key, beyond_capacity: bool = False) -> bool:
        """Hold ``item``; False (not held) when the room or the key's share of it is full.

        ``beyond_capacity`` holds it regardless: for an item that is about to be picked
        (a free slot is waiting for it), which must not be turned away by a small room.
        """
        held = self._key_counts.get(key, 0)
        full = self._size >= self._capacity or (
            key is not None and self._key_capacity is not None and held >= self._key_capacity
        )
        if full and not beyond_capacity:
            return False
        level = self._levels.get(priority)
        if level is None:
            level = self._levels[priority] = OrderedDict()
            bisect.insort(self._priorities, priority)
        queue = level.get(key)
        if queue is None:
            queue = level[key] = deque()  # a new key joins the back of the rotation
        queue.append((next(self._arrivals), item))
        self._key_counts[key] = held + 1
        self._level_counts[priority] = self._level_counts.get(priority, 0) + 1
        self._size += 1
        return True

    def pick(self, may_start: Callable[[_Key], bool]) -> T | None:
        """Remove and return the next item to start, or None if no held item may start.

        ``may_start`` is asked at most once per key per call.
        """
        verdict = _memo(may_start)
        levels = self._startable_levels(verdict)
        chosen = next(levels, None)
        if chosen is None:
            return None
        # Walk down while the level at hand owes the levels below it a pick. Credit only
        # accrues while a lower level could actually start something, so a level holding
        # only blocked items takes nothing from the share.
        while self._share:
            lower = next(levels, None)
            if lower is None:
                break
            credit = self._credits.get(chosen[0], Fraction(0)) + self._share
            if credit < 1:
                self._credits[chosen[0]] = credit
                break
            self._credits[chosen[0]] = credit - 1
            chosen = lower
        return self._take(*chosen)

    def remove(self, item: T) -> bool:
        """Drop the oldest held entry that is ``item`` (or equals it); False if none is."""
        found: tuple[int, int, _Key] | None = None  # (arrival, priority, key)
        for priority, level in self._levels.items():
            for key, queue in level.items():
                for arrival, held in queue:
                    if (held is item or held == item) and (found is None or arrival < found[0]):
                        found = (arrival, priority, key)
                        break  # later entries of this queue arrived later still
        if found is None:
            return False
        arrival, priority, key = found
        queue = self._levels[priority][key]
        del queue[next(i for i, (seq, _) in enumerate(queue) if seq == arrival)]
        self._forget(priority, key)
        return True

    def drain(self) -> list[T]:
        """Remove and return every held item, oldest first (so per key, too), for shutdown."""
        drained = [item for _, item in self._oldest_first()]
        self._levels.clear()
        self._priorities.clear()
        self._credits.clear()
        self._key_counts.clear()
        self._level_counts.clear()
        self._size = 0
        return drained

    # -- internals -------------------------------------------------------------------

    def _startable_levels(self, verdict: Callable[[_Key], bool]) -> Iterator[tuple[int, _Key]]:
        """For each level from the highest down, the key to serve there, if any may start.

        Lazy, so that with no share to hand out only the top levels are looked at.
        """
        for priority in reversed(self._priorities):
            for key in self._levels[priority]:
                if verdict(key):  # blocked keys are skipped where they stand: they keep their turn
                    yield priority, key
                    break

    def _take(self, priority: int, key: _Key) -> T:
        level = self._levels[priority]
        queue = level[key]
        _, item = queue.popleft()
        if queue:
            level.move_to_end(key)  # served: to the back of the rotation
        self._forget(priority, key)
        return item

    def _forget(self, priority: int, key: _Key) -> None:
        """Count one entry of (priority, key) as gone and drop what is left empty."""
        self._size -= 1
        self._key_counts[key] -= 1
        if not self._key_counts[key]:
            del self._key_counts[key]
        self._level_counts[priority] -= 1
        level = self._levels[priority]
        if not level[key]:
            del level[key]
        if not level:
            del self._levels[priority], self._level_counts[priority]
            self._priorities.remove(priority)
            self._credits.pop(priority, None)

    def _oldest_first(self) -> list[tuple[int, T]]:
        queues = (queue for level in self._levels.values() for queue in level.values())
        return sorted((entry for queue in queues for entry in queue), key=lambda entry: entry[0])


def _memo(may_start: Callable[[_Key], bool]) -> Callable[[_Key], bool]:
    """``may_start`` asked once per key: a key can hold items at several levels."""
    verdicts: dict[_Key, bool] = {}

    def verdict(key: _Key) -> bool:
        if key not in verdicts:
            verdicts[key] = may_start(key)
        return verdicts[key]

    return verdict


def _validated(
    capacity: int, key_capacity: int | None, reserved_share: float
) -> tuple[int, int | None, Fraction]:
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    if key_capacity is not None and key_capacity < 1:
        raise ValueError(f"key_capacity must be >= 1 or None (no per-key cap), got {key_capacity}")
    if not 0 <= reserved_share <= MAX_RESERVED_SHARE:  # also refuses NaN
        raise ValueError(
            f"reserved_share must be between 0 and {MAX_RESERVED_SHARE}, got {reserved_share}"
        )
    return capacity, key_capacity, Fraction(reserved_share).limit_denominator(_SHARE_DENOMINATOR)
