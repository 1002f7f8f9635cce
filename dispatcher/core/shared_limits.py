"""Named limits shared by pools, with weights: which starts they let go, decided without I/O.

A named limit (``[limits.NAME]``) caps a resource several pools' executions use (a partner
API, a licence pool, a database). A pool that uses it (``uses = { NAME = WEIGHT }``) counts
each of its executions ``WEIGHT`` times: running ones, starts in flight and starts in doubt.
The use is never kept as a counter: it is read from the pools' ledgers each time, so it is
right after a restart (the ledgers are rebuilt from the listings) and it cannot drift.

A start goes only when its pool, its key and every named limit its pool uses have room for
it, all at once: the dispatcher is the only starter, so nothing is held partly and nothing
waits on anything else. Two checks, as in the ledger:

- `SharedLimits.may_reserve`, before a request is picked: every limit the pool uses has
  room for its weight, counting starts in flight, and no other pool waits longer (below);
- `SharedLimits.admits`, the ledger's gate before each ``StartExecution`` is sent: starts
  already sent keep their units, and of the others only the oldest that fit under the
  value in force go (a lowered limit, or executions started elsewhere, hold the rest).

No starvation (the claim rule). A pool that has a request it could start but for a named
limit *claims* every named limit it uses, stamped in the order pools first could not
start. While a pool holds a claim, no other pool that uses one of those limits may start
unless it holds an older claim: units freed are kept for the oldest claim until its weight
fits, so a pool of weight 2 is never overtaken forever by weight-1 starts. A claim is
dropped when its pool starts (a pool that goes on starting claims afresh, behind the
others), or has nothing it could start. A pool whose weight is above a limit's value in
force (or whose limit is paused at 0) cannot start at all: it claims nothing, so it holds
nobody back, and `blocked` says why.

The bound: the oldest claim of all is never held back by another pool on its limits, and
those limits' use only falls (no other start on them), so its pool starts once the
executions holding them when it claimed have ended: within T, the longest run of an
execution of the pools that use them, plus the time to learn of an end (its status event,
at worst a reconcile interval). Each claim is the oldest after at most the claims older
than it, one per pool, so a pool waits at most ``n x T`` for a named limit, ``n`` the
number of pools that use its limits or share a limit with those (executions started
elsewhere and a lowered limit can only add to it).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from dispatcher.core.ledger import Ledger, Reservation

LIMIT_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
MAX_WEIGHT = 100_000


class SharedLimitConfig(BaseModel):
    """One named limit: ``[limits.NAME]``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="The named limit's name: the `NAME` of its table.")
    limit: int = Field(
        ge=0,
        le=MAX_WEIGHT,
        description="Units that the executions of the pools using it may hold at once "
        "(each counts its pool's weight); 0 pauses every pool that uses it.",
    )
    limit_parameter: str | None = Field(
        default=None,
        description="SSM parameter holding the limit, re-read every limit_refresh_interval "
        "(it wins over limit once read).",
    )


@dataclass(frozen=True, slots=True)
class Blocked:
    """Why a pool cannot start at all under a named limit."""

    limit: str
    value: int
    weight: int

    @property
    def why(self) -> str:
        """One line for `/status` and the logs."""
        if self.value == 0:
            return f"named limit {self.limit} is paused (limit 0)"
        return (
            f"weight {self.weight} is above named limit {self.limit}'s value {self.value}: "
            "the pool waits until the limit is raised"
        )


class SharedLimits:
    """Every named limit of one process, its users (pool -> weight) and their claims."""

    def __init__(
        self,
        limits: Iterable[SharedLimitConfig],
        uses: Mapping[str, Mapping[str, int]],
        ledger_of: Callable[[str], Ledger],
    ) -> None:
        self._limits = {config.name: config.limit for config in limits}
        self._uses = {pool: dict(used) for pool, used in uses.items() if used}
        unknown = {name for used in self._uses.values() for name in used} - set(self._limits)
        if unknown:
            raise ValueError(f"unknown named limit(s): {', '.join(sorted(unknown))}")
        self._users: dict[str, dict[str, int]] = {name: {} for name in self._limits}
        for pool, used in self._uses.items():
            for name, weight in used.items():
                if weight < 1:
                    raise ValueError(f"pool {pool}: weight of {name} must be >= 1, got {weight}")
                self._users[name][pool] = weight
        self._ledger_of = ledger_of
        self._claims: dict[str, int] = {}  # pool -> claim number (smaller: older)
        self._numbers = itertools.count(1)

    # -- reading ---------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """The named limits, in the order they were given."""
        return list(self._limits)

    def uses(self, pool: str) -> Mapping[str, int]:
        """The named limits ``pool`` uses, with its weight on each."""
        return self._uses.get(pool, {})

    def users(self, name: str) -> Mapping[str, int]:
        """The pools that use named limit ``name``, with their weights."""
        return self._users[name]

    def limit(self, name: str) -> int:
        """The value in force of named limit ``name``."""
        return self._limits[name]

    def in_use(self, name: str) -> int:
        """Units held: the weighted sum of its users' running executions, starts in flight
        and starts in doubt."""
        return sum(w * self._ledger_of(p).held for p, w in self._users[name].items())

    def free(self, name: str) -> int:
        """Units a new start may take now (0 while over the limit)."""
        return max(0, self._limits[name] - self.in_use(name))

    def blocked(self, pool: str) -> list[Blocked]:
        """The named limits whose value in force is below ``pool``'s weight (or paused)."""
        return [
            Blocked(name, self._limits[name], weight)
            for name, weight in self.uses(pool).items()
            if weight > self._limits[name]
        ]

    def claims(self, name: str) -> list[str]:
        """Pools that wait for named limit ``name`` (or another they use with it), oldest
        claim first: the first is served next."""
        users = self._users[name]
        return sorted((p for p in self._claims if p in users), key=self._claims.__getitem__)

    def claimed(self, pool: str) -> bool:
        """Whether ``pool`` holds a claim (it waits for a named limit)."""
        return pool in self._claims

    # -- changing --------------------------------------------------------------------

    def set_limit(self, name: str, limit: int) -> bool:
        """Change the value of named limit ``name``; returns whether it changed. Lowering it
        never stops an execution: it holds starts back until the use is under it."""
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        if self._limits[name] == limit:
            return False
        self._limits[name] = limit
        for pool in self._users[name]:
            if self.blocked(pool):
                self._claims.pop(pool, None)  # it cannot start: it holds nobody back
        return True

    def withdraw(self, pool: str) -> None:
        """``pool`` has nothing it could start now (or starts nothing: its own limit, the
        lease): its claim, if any, is dropped."""
        self._claims.pop(pool, None)

    # -- deciding --------------------------------------------------------------------

    def may_reserve(self, pool: str) -> bool:
        """Whether ``pool``, which has a request it could start by its own limits, may
        reserve a start now; if not, it claims its named limits (see the module).

        Called right before the reservation, with no await between: a True is used at once.
        """
        uses = self.uses(pool)
        if not uses:
            return True
        if self.blocked(pool):
            self._claims.pop(pool, None)
            return False
        mine = self._claims.get(pool)
        if self._fits(uses) and not self._older_claim(pool, uses, mine):
            self._claims.pop(pool, None)
            return True
        if mine is None:
            self._claims[pool] = next(self._numbers)
        return False

    def _fits(self, uses: Mapping[str, int]) -> bool:
        return all(self.in_use(n) + weight <= self._limits[n] for n, weight in uses.items())

    def _older_claim(self, pool: str, uses: Mapping[str, int], mine: int | None) -> bool:
        """Whether another pool that uses one of ``uses`` claimed before ``pool`` (a pool
        without a claim comes after every claim)."""
        for name in uses:
            for other in self._users[name]:
                number = self._claims.get(other)
                if other != pool and number is not None and (mine is None or number < mine):
                    return True
        return False

    def admits(self, pool: str, reservation: Reservation, sent: bool) -> bool:
        """Whether the start of ``reservation`` (of ``pool``) may be sent now, as far as the
        named limits go: the ledger's gate, asked after its own limit and key said yes.

        ``sent``: a retry of a start already sent (its outcome unknown): it goes only while
        every start sent on its limits still fits under the value in force. A first attempt
        goes when the starts sent, the executions running or in doubt, and the starts not
        sent yet reserved before it (across pools, oldest first) leave room for its weight.
        """
        for name in self.uses(pool):
            users = self._users[name]
            ledgers = {p: self._ledger_of(p) for p in users}
            committed = 0  # units of the starts sent, the executions running or in doubt
            for user, ledger in ledgers.items():
                committed += users[user] * (
                    ledger.running_count + ledger.doubt_count + ledger.sent_count
                )
            if sent:
                if committed > self._limits[name]:
                    return False
                continue
            unsent = sorted(
                (r.token, users[p], p == pool) for p in users for r in ledgers[p].unsent()
            )
            total = committed
            for token, weight, ours in unsent:
                total += weight
                if ours and token == reservation.token:
                    break
            if total > self._limits[name]:
                return False
        return True

    # -- reporting -------------------------------------------------------------------

    def status(self, waiting_of: Callable[[str], int] | None = None) -> dict[str, Any]:
        """Each named limit's part of `/status`: value, use, users and what waits on it.
        ``waiting_of`` gives the requests waiting in a pool's room."""
        out: dict[str, Any] = {}
        for name, users in self._users.items():
            waiting = self.claims(name)
            blocked = {pool: b.why for pool in users for b in self.blocked(pool) if b.limit == name}
            out[name] = {
                "limit": self._limits[name],
                "in_use": self.in_use(name),
                "free": self.free(name),
                "users": dict(users),
                "waiting_pools": waiting,
                "blocked": blocked,
                "requests_waiting": None
                if waiting_of is None
                else sum(waiting_of(p) for p in {*waiting, *blocked}),
            }
        return out
