"""Expiring a request whose start-by passed: dead-lettered, unless its execution may exist.

A request whose deadline (`dispatcher.core.deadline`) has passed is never sent to
``StartExecution`` again. It goes to the dead-letter queue with reason ``expired`` only
when no start of it can have taken effect - the design's rule that a request whose
execution may exist is never dead-lettered:

- a start of it in doubt here (an attempt's answer was lost, in the ledger or in the
  handler at hand), or another copy of it being started now: handed back, to be judged
  again once evidence has settled the doubt;
- its execution is known here (running, or ended: the ledger), or it may have been
  started elsewhere - a copy (a dead letter moved back), a request with an idempotency
  key (a producer's earlier send of it), one received before this reign began, or one
  a former configuration named otherwise: ``DescribeExecution`` decides. Found, it is
  served as an existing execution is (adopted, or its parent answered); "does not
  exist" proves it never started once this reign has run D (the start timeout) and the
  start grace: every start an earlier process sent took effect within D or never;
- otherwise (first received in this reign, and nothing here ever started it): expired.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import stamina

from dispatcher.aws.api import error_code, is_retryable
from dispatcher.core.deadline import EXPIRED, expired_detail
from dispatcher.core.requests import IDEMPOTENCY_ATTRIBUTE, REQUEST_ID_ATTRIBUTE, execution_arn
from dispatcher.daemon.callbacks import FIRST_RECEIVE_SKEW

if TYPE_CHECKING:
    from dispatcher.core.ledger import Reservation
    from dispatcher.daemon.starter import Starter, Waiting

DOUBT_RETRY_SECONDS = 30
"""A request whose start is in doubt when its deadline passes comes back this much later
(the doubt is settled by then: a describe, an event or a listing), to be judged again."""


def wall_clock() -> float:
    """The dispatcher's clock for deadlines (late-bound: a simulation may replace time)."""
    return time.time()


class ExpiredError(Exception):
    """The request's start-by passed before this attempt could be sent."""


class Expiries:
    """Judges requests whose start-by passed, for every pool (see the module docstring)."""

    def __init__(self, starter: Starter, clock: Callable[[], float] = wall_clock) -> None:
        self.starter = starter
        self.clock = clock

    def due(self, entry: Waiting) -> bool:
        """Whether ``entry``'s start-by has passed (a start may no longer be sent)."""
        deadline = entry.request.start_by
        return deadline is not None and self.clock() >= deadline

    async def expire(
        self,
        entry: Waiting,
        reservation: Reservation | None = None,
        *,
        doubt: bool = False,
        handling: bool = False,
    ) -> str:
        """Settle ``entry``, whose start-by passed, without starting it: dead-lettered as
        expired, served as an existing execution, or handed back while a start of it may
        be in doubt. ``reservation``: the slot reserved for it (given back); ``doubt``: an
        attempt of the handler at hand may have started it; ``handling``: the caller is a
        handler of the request (not another copy starting it). Returns what was done."""
        starter, pool, request = self.starter, entry.pool, entry.request
        if reservation is not None and not doubt:  # in doubt, its slot stays held
            starter._release(pool, reservation)
        arn = execution_arn(pool.state_machine_arn, request.name)
        ledger = pool.ledger
        mine = 1 if handling else 0

        def may_start() -> bool:
            """Another copy of it (a redrive's, a producer's retry) is being started, or a
            start of it is in doubt here."""
            return starter.starting(arn, besides=mine) or arn in ledger.in_doubt

        if doubt or may_start():
            entry.bound.info("dispatcher.expiry_in_doubt", execution_arn=arn)
            await starter._hand_back(entry, DOUBT_RETRY_SECONDS, "start-by passed, start in doubt")
            return "in_doubt"
        known = ledger.holds(arn) or ledger.is_tombstoned(arn)
        if known or self._may_exist_elsewhere(entry):
            try:
                described = await self._find(entry, arn)
            except Exception as exc:  # noqa: BLE001 - unknown: never dead-letter on a guess
                entry.bound.warning("dispatcher.expiry_describe_failed", error=str(exc))
                described, known = None, True
            if described is None and known:  # it exists, or may: the describe lags or failed
                await starter._hand_back(entry, DOUBT_RETRY_SECONDS, "start-by passed, unknown")
                return "unknown"
            if described is not None:
                await starter.existing(entry, None, described)
                return "exists"
            if may_start() or ledger.holds(arn) or ledger.is_tombstoned(arn):
                # Begun while it was described (another copy's start, sent after the
                # describe): "does not exist" is stale; that start settles it.
                entry.bound.info("dispatcher.expiry_in_doubt", execution_arn=arn)
                await starter._hand_back(
                    entry, DOUBT_RETRY_SECONDS, "start-by passed, start in doubt"
                )
                return "in_doubt"
            settled = starter.reign_began + self._settle_seconds()
            if self.clock() < settled:  # an earlier process's start may still take effect
                delay = max(1, int(settled - self.clock()) + 1)
                await starter._hand_back(entry, delay, "start-by passed, earlier start unsettled")
                return "unsettled"
        deadline = request.start_by if request.start_by is not None else self.clock()
        await starter.dead_letter(
            entry.queue,
            pool.name,
            entry.message,
            EXPIRED,
            expired_detail(deadline, self.clock()),
        )
        return EXPIRED

    def _settle_seconds(self) -> float:
        settings = self.starter.settings
        return settings.start_timeout + settings.start_grace

    def _may_exist_elsewhere(self, entry: Waiting) -> bool:
        """Whether a start of the request may have been sent by another process, or for
        another message of it: only ``DescribeExecution`` can tell."""
        attributes = entry.message.get("MessageAttributes") or {}
        if REQUEST_ID_ATTRIBUTE in attributes or IDEMPOTENCY_ATTRIBUTE in attributes:
            return True
        system = entry.message.get("Attributes") or {}
        try:
            first = int(system["ApproximateFirstReceiveTimestamp"]) / 1000
        except (KeyError, ValueError):
            return True  # unknown: it may have been received before this reign
        if first < self.starter.reign_began + FIRST_RECEIVE_SKEW:
            return True
        return self.starter._may_have_former_name(entry)

    async def _find(self, entry: Waiting, arn: str) -> dict[str, Any] | None:
        """The request's execution described (under its name, else a former one), or None
        if it does not exist; raises when that is unknown."""
        described = await self._describe(entry, arn)
        if described is None and self.starter._may_have_former_name(entry):
            former = await self.starter.find_former_name(entry)
            if former is not None:
                described = await self._describe(entry, former)
        return described

    async def _describe(self, entry: Waiting, arn: str) -> dict[str, Any] | None:
        settings = self.starter.settings
        try:
            async for attempt in stamina.retry_context(
                on=is_retryable, attempts=3, timeout=settings.start_retry_timeout
            ):
                with attempt:
                    await self.starter.keep_hidden(entry)
                    with anyio.fail_after(settings.visibility_timeout / 4):
                        return dict(await self.starter.sfn.describe_execution(executionArn=arn))
        except Exception as exc:
            if error_code(exc) == "ExecutionDoesNotExist":
                return None
            raise
        raise AssertionError("unreachable: stamina either returns or raises")  # pragma: no cover
