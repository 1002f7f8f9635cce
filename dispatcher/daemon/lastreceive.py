"""Requests on their last receive that have to go back: renewed, or settled before they leave.

A request kept here is first renewed (`dispatcher.daemon.renewal`): a fresh copy with its
identity is sent to its queue, visible when it would have been handed back, and the
original deleted; the copy maps to the same execution name and goes through the intake as
any request does. Only a request that cannot be renewed (its copy refused, or no answer;
tried again with a back-off meanwhile) stays kept, as follows.

Handed back on its last receive (the queue's ``maxReceiveCount``), a request would be
moved to the dead-letter queue by SQS on its own, without a reason; so the dispatcher
dead-letters it itself, with the reason. But a request whose execution may exist - its
start in doubt (here or in an earlier process), or ``ExecutionAlreadyExists`` and then
a failed describe - must not be dead-lettered: a redrive would start it again, and a
parent waiting on its token would be told it failed while its child runs. Such a
request is kept here instead, its message hidden (extended, within SQS's 12-hour cap),
until a ``DescribeExecution`` of its deterministic ARN settles it:

- the execution exists: the request was started - served as a start is (its message
  deleted, or held for its parent's token, or the parent answered);
- ``ExecutionDoesNotExist`` once D (the start timeout) and the start grace have passed
  since it was kept, no evidence here says it runs, no other copy of it is being started
  or waits to be started here (`LastReceives._may_run`), and no execution exists under a
  name a former configuration gave it (`Starter.find_former_name`; found: served as that
  execution's): it was never started, and only now is it dead-lettered, with a detail
  that says a redrive runs it - as ``expired`` if its start-by has passed (its parent gets
  ``Dispatcher.Expired``), else as ``receive_limit``.

Every attempt it had ended before it was kept, so a start of it takes effect within D of
then or never, and a describe shows it within the grace after that (invariant 8, and the
rule `Ledger.observe_missing` applies to doubts).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import structlog

from dispatcher.aws.api import error_code
from dispatcher.core.deadline import EXPIRED, expired_detail
from dispatcher.core.ledger import Change
from dispatcher.core.requests import execution_arn
from dispatcher.daemon.queues import receive_count
from dispatcher.daemon.renewal import handle_left, renew

if TYPE_CHECKING:
    from dispatcher.daemon.starter import Starter, Waiting

log = structlog.get_logger("dispatcher.intake")

MAX_BACKOFF = 60.0
"""Seconds between describes of a request whose describe keeps failing, at most."""
RENEWALS_AT_ONCE = 10


@dataclass(eq=False)
class _Kept:
    """A request kept on its last receive until its execution is known to exist or not."""

    entry: Waiting
    why: str  # why it had to go back
    arn: str
    exists: bool  # AWS said ExecutionAlreadyExists: "does not exist" is only a lag
    not_before: float  # (pool clock) "does not exist" proves nothing before this
    next_try: float
    failures: int = 0
    delay: int = 0  # seconds its copy stays invisible (as long as it would have, handed back)
    renew_at: float = 0.0  # (pool clock) when to try to renew it next
    renewals_failed: int = 0
    renewal_tried: bool = False  # settled (described) only once a renewal was tried
    copy_maybe_until: float = 0.0  # (pool clock) a copy a send with no answer may have left
    # would be received, and its start show, by then
    busy: bool = False  # being renewed or settled: the other waits
    again: bool = False  # kept again while being settled: not settled after all


class LastReceives:
    """The requests kept on their last receive, and the passes that settle them."""

    def __init__(self, starter: Starter) -> None:
        self.starter = starter
        self.settings = starter.settings
        self._kept: list[_Kept] = []
        self._wake = anyio.Event()
        self._renew_wake = anyio.Event()
        # Settled after the reign ended (the lease lost): the leader may start the request
        # from another copy of it (a producer's retry, a message SQS stored twice) at any
        # time, so "does not exist" no longer proves that a redrive is safe.
        self.after_reign = False
        self._unsure = False  # an extension's outcome is unknown: tried again soon

    def __len__(self) -> int:
        return len(self._kept)

    def reign_over(self, ended: float | None = None) -> None:
        """The lease was lost (at ``ended``, on the pools' clock; None: now): what is kept
        is settled after the reign from now on (`Dispatcher._settle_later`). The ledger that
        knew this process's starts in doubt was reset with the reign
        (`Dispatcher._abdicate`), so `_may_run` no longer sees them - a start of another
        copy of a kept request, sent after it was kept and given up in doubt, among them.
        Such a start was sent before ``ended`` (no start leaves once the lease is lost) and
        shows D and the grace later at most: no "does not exist" settles a kept request
        before then."""
        self.after_reign = True
        wait = self.settings.start_timeout + self.settings.start_grace
        for kept in self:
            now = kept.entry.pool.clock()
            until = (now if ended is None else min(ended, now)) + wait
            kept.not_before = max(kept.not_before, until)
            kept.next_try = max(kept.next_try, until)

    def keep(
        self,
        entry: Waiting,
        why: str,
        *,
        exists: bool = False,
        delay: int = 0,
        arn: str | None = None,
    ) -> None:
        """Keep ``entry`` (on its last receive, to go back because ``why``, in ``delay``
        seconds) until renewed or settled; ``exists``: AWS said its execution exists, only
        its status is unknown; ``arn``: that execution's, if found under a former name (else
        the one its current name gives) - the ARN described to settle it."""
        arn = arn or execution_arn(entry.pool.state_machine_arn, entry.request.name)
        now = entry.pool.clock()
        wait = self.settings.start_timeout + self.settings.start_grace
        for k in self:
            if k.entry.request.receipt_handle != entry.request.receipt_handle:
                continue
            if k.busy:  # kept again by its own settle (its parent's answer failed again)
                k.again, k.why, k.arn, k.exists = True, why, arn, exists
                k.not_before = k.next_try = now + wait
            return
        self._kept.append(_Kept(entry, why, arn, exists, now + wait, now + wait, delay=delay))
        entry.bound.warning(
            "dispatcher.last_receive_kept",
            execution_arn=arn,
            why=why,
            exists=exists,
            settle_in=wait,
        )
        self._wake.set()
        self._renew_wake.set()

    def __iter__(self) -> Iterator[_Kept]:
        """A snapshot: a pass may settle (remove) entries as it goes."""
        return iter(list(self._kept))

    # -- passes ------------------------------------------------------------------------

    async def renew_once(self) -> int:
        """Renew every kept request that is due (concurrently); returns how many were."""
        due = [k for k in self if not k.busy and k.entry.pool.clock() >= k.renew_at]
        renewed = 0
        limiter = anyio.CapacityLimiter(RENEWALS_AT_ONCE)

        async def one(kept: _Kept) -> None:
            nonlocal renewed
            async with limiter:
                if kept.busy or kept not in self._kept:
                    return
                if await self._renew(kept):
                    renewed += 1

        async with anyio.create_task_group() as tg:
            for kept in due:
                tg.start_soon(one, kept)
        return renewed

    async def _renew(self, kept: _Kept) -> bool:
        entry = kept.entry
        kept.busy = True
        kept.renewal_tried = True
        try:
            delay = max(kept.delay, entry.queue.min_delay())
            visibility = self.settings.visibility_timeout
            within = handle_left(entry.hidden_since, entry.pool.clock(), visibility)
            if await renew(
                entry.queue,
                entry.message,
                delay,
                entry.bound,
                kept.why,
                delete_within=within,
                maybe_sent=lambda: self._maybe_copied(kept, delay),
            ):
                if kept in self._kept:
                    self._kept.remove(kept)
                self._wake.set()  # `finish` ends once none is left
                return True
            kept.renewals_failed += 1
            backoff = min(MAX_BACKOFF, 2.0**kept.renewals_failed)
            kept.renew_at = entry.pool.clock() + backoff
            return False
        finally:
            kept.busy = False

    def _maybe_copied(self, kept: _Kept, delay: int) -> None:
        """A renewal's send of ``kept`` got no answer (or one that says nothing): its copy
        may be in the queue, visible in ``delay`` seconds, carrying the request - received
        then (or a visibility timeout later, handed back once) and started within D and the
        grace. Until then "does not exist" proves nothing: not dead-lettered."""
        settings = self.settings
        until = (
            kept.entry.pool.clock()
            + delay
            + settings.visibility_timeout
            + settings.start_timeout
            + settings.start_grace
        )
        kept.copy_maybe_until = max(kept.copy_maybe_until, until)

    async def settle_once(self) -> int:
        """Describe every kept request that is due and settle what the answers settle;
        returns how many were settled. One being renewed waits."""
        settled = 0
        for kept in self:
            if kept.entry.pool.clock() < kept.next_try:
                continue
            if kept.busy or kept not in self._kept:
                continue
            if not kept.renewal_tried and await self._renew(kept):
                # Renewed first (docs/requests.md, "The last receive"), even when the renew
                # loop is held up (a renewal's delete going on): not for a describe to
                # dead-letter.
                continue
            if kept.busy or kept not in self._kept:
                continue
            kept.busy = True
            try:
                done = await self._settle(kept)
            finally:
                kept.busy = False
            if done:
                if kept in self._kept:  # (not let go meanwhile)
                    self._kept.remove(kept)
                settled += 1
        return settled

    async def _settle(self, kept: _Kept) -> bool:
        entry = kept.entry
        asked = self.starter.expiries.clock()  # wall clock: the describe's answer is later
        try:
            # Bounded: a describe hung on the wire must not hold up the other messages'
            # extensions (this pass and `keep_hidden_once` share one loop).
            with anyio.fail_after(self.settings.visibility_timeout / 4):
                described = await self.starter.sfn.describe_execution(executionArn=kept.arn)
        except Exception as exc:  # noqa: BLE001 - anything but proof: keep it, ask again
            now = entry.pool.clock()
            if error_code(exc) == "ExecutionDoesNotExist" and not kept.exists:
                if now >= kept.not_before and await self._never_started(kept, now, asked):
                    return True
            else:
                entry.bound.warning(
                    "dispatcher.last_receive_describe_failed",
                    execution_arn=kept.arn,
                    error=error_code(exc) or str(exc),
                )
            kept.failures += 1
            kept.next_try = max(kept.not_before, now + min(MAX_BACKOFF, 2.0**kept.failures))
            return False
        if (
            self.after_reign
            and entry.request.task_token is not None
            and (described["status"] == "RUNNING")
        ):
            # Its parent waits on a child that runs: only a leader holds tokens.
            self._let_go(kept, "its parent waits on a running child, and the lease was lost")
            return True
        entry.bound.info(
            "dispatcher.last_receive_settled", execution_arn=kept.arn, status=described["status"]
        )
        kept.again = False
        await self.starter.existing(entry, None, described)
        # Kept again (its parent's answer failed): it stays, settled by a later pass.
        return not kept.again

    def _may_run(self, kept: _Kept) -> bool:
        """Whether evidence here says the kept request's execution runs or ran (the ledger
        holds it, knows it ended, or holds a start of it in doubt: a status event, a
        listing), or another copy of the request (SQS stored it twice, a producer's retry, a
        renewal whose answer was lost) is being started here, whose attempt may have started
        it: then a "does not exist" only lags - or waits in its pool's room, to be started:
        its start settles the request (the kept copy is then served as that execution's)."""
        pool = kept.entry.pool
        ledger = pool.ledger
        if ledger.holds(kept.arn) or ledger.is_tombstoned(kept.arn) or kept.arn in ledger.in_doubt:
            return True
        waits = any(
            execution_arn(pool.state_machine_arn, e.request.name) == kept.arn
            for e in pool.room.items()
        )
        return waits or self.starter.starting(kept.arn)

    async def _never_started(self, kept: _Kept, now: float, asked: float) -> bool:
        """ "Does not exist" past D and the grace: dead-letter the request, unless evidence
        here says it runs or ran, or a copy of it is being started (`_may_run`) - then the
        describe lags. ``asked``: the wall clock when the describe was sent. A request whose
        start-by has passed is dead-lettered as expired (its parent gets
        ``Dispatcher.Expired``)."""
        entry = kept.entry
        pool = entry.pool
        if pool.ledger.observe_missing(kept.arn, now, self.settings.start_grace) is Change.FREED:
            pool.update()
        # A renewal's send that got no answer: its copy may be in the queue, carrying the
        # request. Dead-lettered, the request would be told to its parent as dead while
        # that copy may yet run it (or be dropped, its parent told so, seed 1379): not
        # before that copy would have shown (`_maybe_copied`).
        if self._may_run(kept) or now < kept.copy_maybe_until:
            return False
        # Not under its current name: it may have run under a name a former configuration
        # gave it (a producer's retry, a copy); that execution ran, so no dead letter.
        try:
            # Bounded as the describe is: the other kept messages' extensions wait on it.
            with anyio.fail_after(self.settings.visibility_timeout / 4):
                former = await self.starter.find_former_name(entry)
        except Exception as exc:  # noqa: BLE001 - unknown: keep it, ask again
            entry.bound.warning(
                "dispatcher.last_receive_describe_failed", execution_arn=kept.arn, error=str(exc)
            )
            return False
        if former is not None:
            entry.bound.info("dispatcher.found_under_former_name", execution_arn=former)
            kept.arn, kept.exists = former, True  # the next pass describes and serves it
            return False
        if self._may_run(kept):  # what came while the former names were described
            return False
        deadline = self._passed_start_by(entry, asked)
        if deadline is not None:
            return await self.starter.dead_letter(
                entry.queue,
                pool.name,
                entry.message,
                EXPIRED,
                expired_detail(deadline, self.starter.expiries.clock()),
                retry_answer=False,
            )
        detail = (
            f"received {receive_count(entry.message)} times, the queue's maxReceiveCount "
            f"({entry.queue.max_receive_count}), and it had to go back ({kept.why}): SQS would "
            "have moved it to the dead-letter queue on its next receive without a reason. Its "
            f"execution {entry.request.name!r} does not exist (described after every start "
            "of it could have taken effect): redrive it from the dead-letter queue to run it; "
            "raise maxReceiveCount"
        )
        if self.after_reign:
            detail = (
                f"received {receive_count(entry.message)} times, the queue's maxReceiveCount "
                f"({entry.queue.max_receive_count}), and it had to go back ({kept.why}). Its "
                f"execution {entry.request.name!r} did not exist when described, but this "
                "dispatcher had lost its lease: the leader may have started it since, from "
                "another copy of the request. Describe it first; do not redrive the request "
                "unless it does not exist; raise maxReceiveCount"
            )
        # Its parent not answered (the answer failed): kept, and tried again later.
        return await self.starter.dead_letter(
            entry.queue, pool.name, entry.message, "receive_limit", detail, retry_answer=False
        )

    def _passed_start_by(self, entry: Waiting, asked: float) -> float | None:
        """The start-by of a request known never to have started (here), if it has passed:
        the request is expired (None: it is not). After the reign, "does not exist" proves
        nothing while the leader may still start it from another copy; it may not once the
        start-by has passed, and a start sent before it took effect within D or never: a
        describe sent D and the grace after the start-by that finds nothing proves it never
        started, nor will."""
        deadline = entry.request.start_by
        if deadline is None:
            return None
        if self.after_reign:
            settled = deadline + self.settings.start_timeout + self.settings.start_grace
            return deadline if asked >= settled else None
        return deadline if self.starter.expiries.clock() >= deadline else None

    async def keep_hidden_once(self) -> int:
        """Extend the visibility of kept messages hidden for half of it or more (batched per
        queue); one SQS no longer lets be extended (its 12-hour cap) is let go: it comes
        back, and the queue's redrive policy moves it. A call that failed (throttled, no
        answer by its deadline, a fifth of the visibility) lets nothing go: it is tried
        again a second later, as long as the message may still be hidden (a call that hangs
        must not use up the margin an extension at half the visibility leaves). Returns how
        many were extended."""
        visibility = self.settings.visibility_timeout
        extended = 0
        self._unsure = False
        due = [k for k in self if k.entry.pool.clock() - k.entry.hidden_since >= visibility / 2]
        for queue in {id(k.entry.queue): k.entry.queue for k in due}.values():
            mine = [k for k in due if k.entry.queue is queue]
            handles = [k.entry.request.receipt_handle for k in mine]
            now = min(k.entry.pool.clock() for k in mine)  # before the call: its effect's start
            failed: set[str] = set()
            unknown = set(handles)
            with anyio.move_on_after(visibility / 5):
                failed, unknown = await queue.extend_visibility(handles, visibility)
            self._unsure = self._unsure or bool(unknown)
            for kept in mine:
                handle = kept.entry.request.receipt_handle
                surely_out = kept.entry.pool.clock() - kept.entry.hidden_since >= visibility
                if kept.busy and handle in failed:
                    continue  # being renewed: its original may be deleted already
                if handle in failed or (handle in unknown and surely_out):
                    self._let_go(kept, "its visibility could not be extended")
                elif handle not in unknown:
                    kept.entry.hidden_since = max(kept.entry.hidden_since, now)
                    extended += 1
        return extended

    def _let_go(self, kept: _Kept, why: str) -> None:
        if kept not in self._kept:
            return  # renewed meanwhile
        self._kept.remove(kept)
        self._wake.set()  # `finish` ends once none is left
        if self.starter.callbacks is not None:  # a parent waits: passed on to the successor
            self.starter.callbacks.passing_on(kept.entry)
        kept.entry.bound.error(
            "dispatcher.last_receive_unsettled",
            execution_arn=kept.arn,
            why=why,
            advice="the queue's redrive policy moves it to the dead-letter queue without a "
            "reason; its execution may exist: describe it before you redrive the request",
        )

    # -- loops -------------------------------------------------------------------------

    async def run(self) -> None:
        """Renew, keep hidden and settle until cancelled (intake's stop); each in a loop of
        its own, so that a slow settle (a describe, a dead letter tried again) holds up no
        renewal and no extension."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._renew_loop)
            tg.start_soon(self._hidden_loop)
            while True:
                await self.settle_once()
                with anyio.move_on_after(self._next_due(renewals=False)):
                    await self._wake.wait()
                self._wake = anyio.Event()

    async def _renew_loop(self) -> None:
        while True:
            await self.renew_once()
            waits = [k.renew_at - k.entry.pool.clock() for k in self if not k.busy]
            with anyio.move_on_after(max(0.01, min([MAX_BACKOFF, *waits]))):
                await self._renew_wake.wait()
            self._renew_wake = anyio.Event()

    async def _hidden_loop(self) -> None:
        while True:
            await self.keep_hidden_once()
            await anyio.sleep(self.settings.visibility_timeout / 8)

    def _next_due(self, *, renewals: bool = True) -> float:
        """Seconds until a kept request is due (a describe, its visibility, and with
        ``renewals`` its next renewal)."""
        visibility = self.settings.visibility_timeout
        waits = [1.0 if self._unsure else visibility / 4]
        for kept in self:
            now = kept.entry.pool.clock()
            waits.append(kept.next_try - now)
            if renewals:
                waits.append(kept.renew_at - now)
        return max(0.01, min(waits))

    async def finish(self) -> None:
        """Shutting down (or settling after the reign): settle what can be settled before
        the caller's deadline (D and the grace, at most, if AWS answers); then let the rest
        go, hidden. Renewals, extensions and settles run in loops of their own, as in
        `run`: a settle that hangs (a dead letter's send, a parent's answer lost on the
        wire) must not hold up the other kept messages' extensions until they come back."""
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._renew_loop)
                tg.start_soon(self._hidden_loop)
                while self._kept:
                    await self.settle_once()
                    if self._kept:
                        with anyio.move_on_after(self._next_due(renewals=False)):
                            await self._wake.wait()
                        self._wake = anyio.Event()
                tg.cancel_scope.cancel()
        finally:
            for kept in self:
                self._let_go(kept, "shutting down before its execution was settled")
