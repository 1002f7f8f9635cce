"""Fixed bugs, put back on demand: the simulation must find each (its teeth).

Each entry patches the production code the way it was before the fix, for the length of
one run, and says what the harness must change to match (the old client set-up).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from dispatcher.ledger import Reservation
from dispatcher.service import Dispatcher
from dispatcher.starter import Starter, Waiting, _Handling


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


BUGS: dict[str, Bug] = {
    "lost-answer-frees-slot": Bug(
        "issue 11 bug 1: a start whose answers were lost until give-up frees its slot",
        patches=((Starter, "_settle_slot", _always_release),),
    ),
    "lease-fence-unbounded": Bug(
        "issue 11 bug 2: a start in flight lands after the new lease holder filled the pool",
        patches=((Dispatcher, "settle_seconds", _old_settle),),
        settings=(("start_timeout", 60.0),),
        old_start_client=True,
    ),
}


@contextlib.contextmanager
def put_back(names: tuple[str, ...]) -> Iterator[list[Bug]]:
    """Apply the patches of ``names`` until the block ends."""
    bugs = [BUGS[n] for n in names]
    saved: list[tuple[Any, str, Callable[..., Any]]] = []
    try:
        for bug in bugs:
            for owner, attribute, replacement in bug.patches:
                saved.append((owner, attribute, getattr(owner, attribute)))
                setattr(owner, attribute, replacement)
        yield bugs
    finally:
        for owner, attribute, original in reversed(saved):
            setattr(owner, attribute, original)
