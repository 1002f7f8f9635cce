"""A pool: one governed state machine, its ledger, and the wake-up for waiting intake.

The ledger decides; the pool adds what the async side needs: a condition intake waits
on when no slot is free (woken by whatever frees one - never a timer), gauges kept in
step with the ledger, and the refill clock (slot freed -> next start).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import anyio

from dispatcher.ledger import Change, Ledger, Reservation
from dispatcher.metrics import Metrics

Clock = Callable[[], float]


class Pool:
    """One state machine under a concurrency limit."""

    def __init__(
        self,
        name: str,
        state_machine_arn: str,
        ledger: Ledger,
        metrics: Metrics,
        clock: Clock = time.monotonic,
    ) -> None:
        self.name = name
        self.state_machine_arn = state_machine_arn
        self.ledger = ledger
        self.metrics = metrics
        self.clock = clock
        self._changed = anyio.Event()
        self._freed_at: deque[float] = deque(maxlen=10_000)
        self.queued: int | None = None  # approximate request-queue depth, from reconcile
        self.receiving = 0  # reserved slots held by receives in flight (not yet starts)
        self.started_total = 0
        self.finished_total = 0
        self.max_running_seen = 0
        metrics.prefill(name)
        self.update()

    def update(self) -> None:
        """Refresh gauges and wake intake; call after every ledger change."""
        ledger = self.ledger
        labels = {"pool": self.name}
        self.metrics.limit.labels(**labels).set(ledger.limit)
        self.metrics.running.labels(**labels).set(ledger.running_count)
        self.metrics.starting.labels(**labels).set(self.starting)
        self.metrics.free.labels(**labels).set(ledger.free)
        self.max_running_seen = max(self.max_running_seen, ledger.running_count)
        # Wake every waiter on every change: intake waits for a free slot, handlers for
        # admission; each re-checks its own condition.
        event, self._changed = self._changed, anyio.Event()
        event.set()

    @property
    def starting(self) -> int:
        """Reserved slots whose request has arrived: starts in flight."""
        return max(0, self.ledger.reserved_count - self.receiving)

    async def wait_free(self) -> int:
        """Wait until at least one slot is free; return how many are."""
        while (free := self.ledger.free) == 0:
            await self._changed.wait()
        return free

    async def wait_admitted(self, reservation: Reservation, at_most: float) -> bool:
        """Wait (``at_most`` seconds) until the reservation may start; return whether it may."""
        with anyio.move_on_after(at_most):
            while not self.ledger.admitted(reservation):
                await self._changed.wait()
        return self.ledger.admitted(reservation)

    def note_freed(self, change: Change, was_full: bool) -> None:
        """Record a slot freed while the pool was full: a hand-over has begun."""
        if change is Change.FREED:
            self.finished_total += 1
            if was_full:
                self._freed_at.append(self.clock())

    def note_start_sent(self) -> None:
        """A StartExecution is being sent: close the oldest open hand-over, if any."""
        if self._freed_at:
            self.metrics.refill.labels(pool=self.name).observe(
                self.clock() - self._freed_at.popleft()
            )

    def backlog_drained(self) -> None:
        """The request queue ran dry: pending frees are no longer hand-overs."""
        self._freed_at.clear()
