"""Fixed bugs, put back on demand: the simulation must find each (its teeth).

Each entry patches the production code the way it was before the fix, for the length of
one run, and says what the harness must change to match (the old client set-up).
"""

from __future__ import annotations

import contextlib
import inspect
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

from dispatcher.core.ledger import Reservation
from dispatcher.daemon.pool import MAX_DEFER_SECONDS, Pool
from dispatcher.daemon.service import Dispatcher
from dispatcher.daemon.starter import Starter, Waiting, _Handling


@dataclass(frozen=True)
class Bug:
    """One fixed bug and how to put it back."""

    issue: str
    patches: tuple[tuple[Any, str, Any], ...]
    settings: tuple[tuple[str, Any], ...] = ()  # [dispatcher] settings the old code had
    old_start_client: bool = False  # StartExecution on the shared client: 35 s, 3 attempts


def _always_release(
    self: Starter, entry: Waiting, reservation: Reservation, handling: _Handling
) -> None:
    """Before the fix: a start given up frees its slot, whatever its outcome."""
    del handling
    self._release(entry.pool, reservation)


def _old_settle(self: Dispatcher) -> float:
    """Before the fix: a new lease holder waited the lease margin (3 s); a restarted
    process did not wait at all."""
    return 3.0 if self.settings.lease_table is not None else 0.0


def _old_deferred(pool: Pool) -> dict[str | None, deque[float]]:
    """The old shape of ``Pool._deferred``: key -> return times of its deferrals."""
    return cast(dict[str | None, deque[float]], pool.__dict__.setdefault("_old_deferred", {}))


def _old_defer_seconds(self: Pool, key: str | None, ident: object = None, **_: object) -> int:
    """Before the fix: a deque of return times for every key ever deferred."""
    now = self.clock()
    pending = _old_deferred(self).setdefault(key, deque())
    while pending and pending[0] <= now:
        pending.popleft()
    ledger = self.ledger
    lanes = ledger.per_key_limit if key is not None and ledger.per_key_limit else ledger.limit
    ahead = self.room.count(key=key) + len(pending)
    delay = int(min(MAX_DEFER_SECONDS, max(1.0, ahead / max(1, lanes) * self.run_time())))
    pending.append(now + delay)
    return delay


def _old_forget(self: Pool) -> None:
    """Before the fix: returned deferrals leave their key's (empty) deque behind."""
    now = self.clock()
    for pending in _old_deferred(self).values():
        while pending and pending[0] <= now:
            pending.popleft()


def _old_pending(self: Pool) -> int:
    return sum(len(p) for p in _old_deferred(self).values())


def _old_keys(self: Pool) -> int:
    return len(_old_deferred(self))


BUGS: dict[str, Bug] = {
    "lost-answer-frees-slot": Bug(
        "issue 11 bug 1: a start whose answers were lost until give-up frees its slot",
        patches=((Starter, "_settle_slot", _always_release),),
    ),
    "lease-fence-unbounded": Bug(
        "issue 11 bug 2: a start in flight lands after the new lease holder filled the pool",
        patches=((Dispatcher, "settle_seconds", _old_settle),),
        # A visibility long enough that no extension precedes an attempt (the old fence
        # sent its start at once; an extension first would shift the race it loses).
        settings=(("start_timeout", 60.0), ("visibility_timeout", 300)),
        old_start_client=True,
    ),
    "deferrals-never-forgotten": Bug(
        "issue 11 bug 3: deferral state is kept for every key ever deferred",
        patches=(
            (Pool, "defer_seconds", _old_defer_seconds),
            (Pool, "forget_returned_deferrals", _old_forget),
            (Pool, "deferrals_pending", property(_old_pending)),
            (Pool, "deferral_keys", property(_old_keys)),
        ),
    ),
    "takeover-without-waiting": Bug(
        "issue 11 bug 2, the lease half: a new holder lists 3 s after taking the lease, "
        "a restarted process at once (D-bounded starts kept)",
        patches=((Dispatcher, "settle_seconds", _old_settle),),
    ),
}


@contextlib.contextmanager
def patched(patches: tuple[tuple[Any, str, Any], ...]) -> Iterator[None]:
    """Set each ``(owner, attribute, replacement)`` until the block ends."""
    saved: list[tuple[Any, str, Callable[..., Any]]] = []
    try:
        for owner, attribute, replacement in patches:
            saved.append((owner, attribute, inspect.getattr_static(owner, attribute)))
            setattr(owner, attribute, replacement)
        yield
    finally:
        for owner, attribute, original in reversed(saved):
            setattr(owner, attribute, original)
