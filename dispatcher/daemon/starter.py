"""Starting one request: exactly once, and every outcome settles its message.

A request picked from its pool's waiting room arrives here with a reserved slot. The
starter waits for admission (the limit in force, the key's limit, the lease) and a
start-rate token, calls ``StartExecution`` under the request's deterministic name
(retrying throttles and 5xx with jittered back-off while keeping the message hidden),
and deletes the message only once the execution is known to exist; a bad request goes
to the dead-letter queue with its reason first (invariant 5).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import stamina
import structlog

from dispatcher.aws.api import (
    AWS_ERRORS,
    THROTTLE_CODES,
    Clients,
    ErrorKind,
    classify,
    error_code,
    is_retryable,
    outcome_unknown,
)
from dispatcher.core.deadline import EXPIRED, EXPIRED_ERROR
from dispatcher.core.ledger import Change, Reservation
from dispatcher.core.requests import (
    IDEMPOTENCY_ATTRIBUTE,
    REQUEST_ID_ATTRIBUTE,
    StartRequest,
    execution_arn,
    former_names,
    task_token,
)
from dispatcher.daemon.callbacks import BAD_REQUEST, DEAD_LETTERED, FIRST_RECEIVE_SKEW, Callbacks
from dispatcher.daemon.deadletter import (
    DEFAULT_MAX_SIZE,
    LAST_RECEIVE_HIDDEN_MARGIN,
    LAST_RECEIVE_MAX_PAUSE,
    LAST_RECEIVE_RETRY_SECONDS,
    DeadLetterQueue,
)
from dispatcher.daemon.expiry import ExpiredError, Expiries
from dispatcher.daemon.health import Health
from dispatcher.daemon.lastreceive import LastReceives
from dispatcher.daemon.metrics import Metrics
from dispatcher.daemon.pastnames import PastNames
from dispatcher.daemon.pool import Pool
from dispatcher.daemon.queues import RequestQueue
from dispatcher.daemon.ratelimit import RateLimiters
from dispatcher.settings.config import Settings

log = structlog.get_logger("dispatcher.intake")


MAX_UNANSWERED = 10_000
"""Starts with a lost answer remembered at most (to count them started when confirmed)."""
START_WAIT_MAX = 5.0
"""Seconds between two attempts of a start, at most (jittered back-off)."""
EXTEND_CALL_SECONDS = 8.0
"""Seconds a visibility extension of a request being started may take."""
EXTEND_RETRY_PAUSE = 1.0
"""Seconds between two extensions of a message that would lapse before the next check."""
GONE_CODES = frozenset(
    {"ReceiptHandleIsInvalid", "AWS.SimpleQueueService.MessageNotInflight", "InvalidParameterValue"}
)
"""SQS's refusals of an extension that no retry can change (the message is visible again,
received by another, or deleted)."""


class AbandonedError(Exception):
    """Shutting down (or the lease is gone): hand the request back instead of retrying."""


class OverLimitError(Exception):
    """A retry of a start in doubt does not fit under the limit in force: stop retrying."""


@dataclass(eq=False)
class Waiting:
    """A received, valid request: waiting in its pool's room, then being started."""

    request: StartRequest
    message: dict[str, Any]
    queue: RequestQueue
    pool: Pool
    key: str | None  # the key tag the ledger counts it under (None: no key)
    hidden_since: float  # when its visibility was last set
    bound: Any  # its logger, bound to message id and execution name


@dataclass
class _Handling:
    """One request being handled; ``phase`` tells shutdown whether it may be cut short."""

    scope: anyio.CancelScope
    phase: str = "received"  # received | calling | backoff | finishing
    doubt: bool = False
    """An attempt may have started the execution (its outcome is unknown): the slot is
    kept, in doubt, until evidence settles it (invariant 1)."""
    sent_at: float | None = None
    """(pool clock) When the last attempt was sent: it takes effect within D of then, or
    never - even when its answer (a 5xx, a reset connection) came at once."""


@dataclass
class _Copies:
    """Handlers starting one execution name at the same time (copies of one request)."""

    handlers: int = 0
    started: bool = False
    """One of them counted the start: AWS answers the others' repeat with success too."""
    sending: bool = False
    """One of them is past its last check before the start (a task token's parent still
    waits, or was not asked): it may be sending, or have sent, StartExecution. Kept set
    until the last of them is done."""


@dataclass
class IntakeStats:
    """Totals for the shutdown summary and `/status`."""

    received: int = 0
    started: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    handed_back: int = 0
    deferred: int = 0
    in_flight: dict[int, _Handling] = field(default_factory=dict)


class Starter:
    """Starts the executions of requests whose turn has come, for every pool."""

    def __init__(
        self,
        settings: Settings,
        clients: Clients,
        metrics: Metrics,
        health: Health,
        limiters: RateLimiters,
        *,
        dead_letter_max_size: int = DEFAULT_MAX_SIZE,
    ) -> None:
        self.settings = settings
        self.sqs = clients.sqs
        self.sfn = clients.sfn
        self.starts = clients.starts or clients.sfn
        self.metrics = metrics
        self.health = health
        self.limiters = limiters
        self.stats = IntakeStats()
        self.callbacks: Callbacks | None = None  # answers parents (task tokens)
        self.may_start: Callable[[], bool] = lambda: True  # the lease sets this
        self.stopping = False
        self.force = False
        self._ids = iter(range(1, 1 << 62))
        self._copies: dict[str, _Copies] = {}  # ARN -> handlers starting it now
        # Built with the intake at the start of each reign (after the predecessor's last
        # receive, before this reign's first): a message first received before then may
        # have been started by a process under another configuration, by another name.
        self.reign_began = time.time()
        self._past: dict[str, PastNames] = {}  # pool name -> its executions before now
        self._unanswered: dict[str, None] = {}
        """ARNs this process sent a start for whose answer never came (outcome unknown), not
        counted yet: the first answer that shows the execution exists counts it as started
        (not as a duplicate), once. Oldest forgotten past `MAX_UNANSWERED`."""
        self.dead_letters = DeadLetterQueue(
            clients.sqs, settings.dead_letter_queue_url, metrics, dead_letter_max_size
        )
        self.last_receives = LastReceives(self)  # kept until their execution is settled
        self.expiries = Expiries(self)  # requests whose start-by passed

    def starting(self, arn: str, *, besides: int = 0) -> bool:
        """Whether a request for execution ``arn`` is being started now (by more handlers
        than ``besides``: the caller's own)."""
        copies = self._copies.get(arn)
        return copies is not None and copies.handlers > besides

    def cut_short_waiting(self) -> None:
        """Cancel handlers that are only waiting (admission, back-off): they hand back.
        Forced: every handler, and the deletes going on through a stop."""
        if self.force:
            self.dead_letters.abandon()
        for handling in list(self.stats.in_flight.values()):
            if handling.phase in ("received", "backoff") or self.force:
                handling.scope.cancel()

    # -- one request -------------------------------------------------------------------

    async def handle(self, entry: Waiting, reservation: Reservation) -> None:
        """Start, dead-letter or hand back one request; always settles its reservation."""
        ident = next(self._ids)
        handling = _Handling(scope=anyio.CancelScope())
        self.stats.in_flight[ident] = handling
        try:
            with handling.scope:
                self._check_not_stopping(2)
                await self._start(entry, reservation, handling)
        except AbandonedError:
            await self._hand_back(entry, 0, "stopping")
        finally:
            del self.stats.in_flight[ident]
            self._settle_slot(entry, reservation, handling)
        if handling.scope.cancelled_caught and not self.force:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self._hand_back(entry, 0, "shutting down")

    async def _hand_back(
        self,
        entry: Waiting,
        delay: int,
        why: str,
        *,
        exists: bool = False,
        arn: str | None = None,
    ) -> None:
        """Make the request visible again in ``delay`` seconds - unless this is its last
        receive: handed back, SQS would move it to the dead-letter queue without a reason,
        and dead-lettered, its execution may yet exist (an earlier attempt, here or in an
        earlier process). Then it is kept, hidden, until a describe settles it
        (`LastReceives`). ``exists``: AWS said its execution exists (``arn``: under a former
        name, if found so). A token request's parent waits all the same: its token is
        deferred (passed on, its child kept)."""
        if entry.queue.is_last_receive(entry.message):
            self.last_receives.keep(entry, why, exists=exists, delay=delay, arn=arn)
            return
        await self._back_to_queue(entry, delay, why)

    async def _back_to_queue(
        self, entry: Waiting, delay: int, why: str, *, message: Mapping[str, Any] | None = None
    ) -> None:
        """Make the request visible again in ``delay`` seconds (`RequestQueue.hand_back`). A
        token request's parent still waits on this reign: its token is deferred (passed on
        to a successor, the child of its name kept for it) until it is back."""
        if self.callbacks is not None:
            self.callbacks.deferred(entry, delay)
        await entry.queue.hand_back(
            entry.request.receipt_handle, delay, entry.bound, why, message=message
        )

    def _release(self, pool: Pool, reservation: Reservation) -> None:
        if pool.ledger.cancel(reservation):
            pool.update()

    def _settle_slot(self, entry: Waiting, reservation: Reservation, handling: _Handling) -> None:
        """The handler is done: a reservation still held is given back, unless an attempt's
        outcome is unknown - then its slot stays held, in doubt (never freed on a guess)."""
        pool = entry.pool
        if not handling.doubt:
            self._release(pool, reservation)
            return
        arn = execution_arn(pool.state_machine_arn, entry.request.name)
        since = pool.clock()
        if handling.sent_at is not None:
            # Its last attempt may take effect until D after it was sent, later than now
            # when its answer came at once: a describe proves nothing before the grace
            # after that (with D longer than the grace, "does not exist" could free the
            # slot before the execution appears).
            since = max(since, handling.sent_at + self.settings.start_timeout)
        if pool.ledger.doubt(reservation, arn, since) is Change.ADDED:
            entry.bound.warning("dispatcher.start_in_doubt", execution_arn=arn)
        pool.update()

    async def _start(self, entry: Waiting, reservation: Reservation, handling: _Handling) -> None:
        """Count a start once per execution: AWS answers a repeat of a running execution
        (same name and input) with success and its ARN, so a success is a start only if the
        ARN was not held before our first attempt (a redelivery) and no other copy of the
        request in flight with ours counted it. Not the ledger's hold after the answer: a
        RUNNING event of our own start may have come first."""
        arn = execution_arn(entry.pool.state_machine_arn, entry.request.name)
        held_before = entry.pool.ledger.holds(arn)
        copies = self._copies.setdefault(arn, _Copies())
        copies.handlers += 1
        try:
            await self._start_counted(entry, reservation, handling, copies, held_before)
        finally:
            copies.handlers -= 1
            if copies.handlers == 0:
                del self._copies[arn]

    async def _start_counted(
        self,
        entry: Waiting,
        reservation: Reservation,
        handling: _Handling,
        copies: _Copies,
        held_before: bool,
    ) -> None:
        pool, request, bound = entry.pool, entry.request, entry.bound
        held = self._former_name_held(entry)
        if held is not None:
            handling.phase = "finishing"
            self.metrics.former_names.labels(pool=pool.name, result="found").inc()
            bound.info("dispatcher.found_under_former_name", execution_arn=held)
            await self._already_exists(entry, reservation, handling, arn=held)
            return
        if self._may_have_former_name(entry) and await self._settled_by_former_name(
            entry, reservation, handling
        ):
            return
        if (
            request.task_token is not None
            and self.callbacks is not None
            and not held_before
            and await self.callbacks.dropped_unstarted(entry, others=lambda: copies.sending)
        ):
            return  # its parent no longer waits: deleted unstarted (the slot goes back)
        # Set with no await since the check: a copy whose parent is gone defers to this one
        # only from now on (read after its own check, see `Callbacks.dropped_unstarted`).
        copies.sending = True
        try:
            arn, attempts = await self._call_start(entry, reservation, handling)
        except AbandonedError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is sorted just below
            handling.phase = "finishing"
            await self._start_failed(exc, entry, reservation, handling)
            return
        handling.phase = "finishing"
        self._commit(pool, reservation, arn)
        ours = self._unanswered.pop(arn, False) is None  # our earlier attempt started it
        if (held_before and not ours) or copies.started:
            self.stats.duplicates += 1
            self.metrics.starts.labels(pool=pool.name, outcome="duplicate").inc()
            bound.info("dispatcher.duplicate_request", execution_arn=arn, status="RUNNING")
            await self._settled(entry, arn)
            return
        copies.started = True
        self.stats.started += 1
        pool.started_total += 1
        self.metrics.starts.labels(pool=pool.name, outcome="started").inc()
        if request.sent_at is not None:
            self.metrics.queue_wait.labels(pool=pool.name).observe(
                max(0.0, time.time() - request.sent_at)
            )
        bound.info("dispatcher.execution_started", execution_arn=arn, attempts=attempts)
        await self._settled(entry, arn, started=True)

    def _may_have_former_name(self, entry: Waiting) -> bool:
        """Whether the request may have started under a name a former configuration gave
        it (``key_attribute`` changed across a restart) and is worth looking for there: its
        current name is not known, and it was first received before this reign began, or
        it was *sent* before this reign began (with an idempotency key, a producer's retry;
        with or without, a copy SQS stored twice, whose twin a predecessor may have started
        under its former name: without a key, looked for in a listing, `_twin_sent_at`),
        or it is a copy (a dead letter moved back) that may have started before it was
        dead-lettered. Any other request is looked for under its
        former names only in what the ledger knows (free, see `_former_name_held`)."""
        pool, message = entry.pool, entry.message
        arn = execution_arn(pool.state_machine_arn, entry.request.name)
        ledger = pool.ledger
        if ledger.holds(arn) or ledger.is_tombstoned(arn) or ledger.doubted_since(arn):
            return False
        attributes = message.get("MessageAttributes") or {}
        if REQUEST_ID_ATTRIBUTE in attributes:
            return True
        system = message.get("Attributes") or {}
        began = self.reign_began + FIRST_RECEIVE_SKEW
        try:
            first = system.get("ApproximateFirstReceiveTimestamp")
            if first is not None and int(first) / 1000 < began:
                return True
            sent = system.get("SentTimestamp")
            # Sent before: with a key, a producer's other send of it; without, a twin SQS
            # stored (looked for in a listing, `_twin_sent_at`, not described).
            if sent is not None and int(sent) / 1000 < began:
                return True
        except ValueError:
            return True
        # With a key, sent in this reign: a producer's retry, or the copy SQS's move task
        # sent back of a message its redrive policy moved, of a request a predecessor
        # started under a former name (looked for in the listing only, `_keyed_in_reign`).
        return self._keyed_in_reign(entry)

    def _keyed_in_reign(self, entry: Waiting) -> bool:
        """Whether the request carries an idempotency key (and is not a copy) and its
        message was sent and first received in this reign: an execution of it under a former
        name started before the reign, and is looked for only in the listing of the
        executions before it, as far back as its pages reach (no describe)."""
        attributes = entry.message.get("MessageAttributes") or {}
        if REQUEST_ID_ATTRIBUTE in attributes or IDEMPOTENCY_ATTRIBUTE not in attributes:
            return False
        system = entry.message.get("Attributes") or {}
        began = self.reign_began + FIRST_RECEIVE_SKEW
        try:
            first = system.get("ApproximateFirstReceiveTimestamp")
            if first is not None and int(first) / 1000 < began:
                return False
            return int(system["SentTimestamp"]) / 1000 >= began
        except (KeyError, ValueError):
            return False

    def _twin_sent_at(self, entry: Waiting) -> float | None:
        """When a request without an idempotency key (and not a copy), first received in
        this reign, was sent - if before the reign began: its only other copy is a twin
        SQS stored (same message id and ``SentTimestamp``), started after that if at all.
        None for any other request."""
        message = entry.message
        attributes = message.get("MessageAttributes") or {}
        if REQUEST_ID_ATTRIBUTE in attributes or IDEMPOTENCY_ATTRIBUTE in attributes:
            return None
        system = message.get("Attributes") or {}
        began = self.reign_began + FIRST_RECEIVE_SKEW
        try:
            first = system.get("ApproximateFirstReceiveTimestamp")
            sent = int(system["SentTimestamp"]) / 1000
        except (KeyError, ValueError):
            return None
        if first is not None and int(first) / 1000 < began:
            return None  # received before: an earlier process may have started it itself
        return sent if sent < began else None

    def _past_names(self, pool: Pool) -> PastNames:
        """The listing of ``pool``'s executions started before now (one per reign)."""
        past = self._past.get(pool.name)
        if past is None:
            past = self._past[pool.name] = PastNames(self.sfn, pool.state_machine_arn)
        return past

    def _former_name_held(self, entry: Waiting) -> str | None:
        """The ARN of a running (or tombstoned) execution the ledger knows under one of the
        request's former names, or None: free, checked for every request (a producer's
        retry sent after the restart while its first execution still runs)."""
        pool = entry.pool
        arn = execution_arn(pool.state_machine_arn, entry.request.name)
        if pool.ledger.holds(arn) or pool.ledger.is_tombstoned(arn):
            return None
        names = former_names(
            entry.request,
            entry.message,
            pool.config.key_attribute,
            self.settings.task_token_attribute,
        )
        for name in names:
            former = execution_arn(pool.state_machine_arn, name)
            if pool.ledger.holds(former) or pool.ledger.is_tombstoned(former):
                return former
        return None

    async def find_former_name(self, entry: Waiting) -> str | None:
        """The ARN of the request's execution under a former name, or None: first what the
        ledger knows (the start-up listing, tombstones: free), then ``DescribeExecution`` of
        each candidate (bounded, see `former_names`). A describe that fails for another
        reason than "does not exist" raises: the request must not start on a guess."""
        pool, request = entry.pool, entry.request
        names = former_names(
            request,
            entry.message,
            pool.config.key_attribute,
            self.settings.task_token_attribute,
        )
        arns = [execution_arn(pool.state_machine_arn, name) for name in names]
        for arn in arns:
            if pool.ledger.holds(arn) or pool.ledger.is_tombstoned(arn):
                return arn
        sent = self._twin_sent_at(entry)
        if sent is not None:
            # Not described: a twin older than the listing reaches (`MAX_PAGES`) is not
            # looked for (a describe per message of a deep backlog, after every restart).
            past = self._past_names(pool)
            if not await past.cover(sent - FIRST_RECEIVE_SKEW):
                return None
            found = [arn for arn, name in zip(arns, names, strict=True) if name in past.names]
            return found[0] if found else None
        if self._keyed_in_reign(entry):
            past = self._past_names(pool)
            await past.cover(-math.inf)  # as far back as its pages reach
            found = [arn for arn, name in zip(arns, names, strict=True) if name in past.names]
            return found[0] if found else None
        for arn in arns:
            self.metrics.former_name_describes.labels(pool=pool.name).inc()
            try:
                async for attempt in stamina.retry_context(
                    on=is_retryable, attempts=5, timeout=self.settings.start_retry_timeout
                ):
                    with attempt:
                        await self.sfn.describe_execution(executionArn=arn)
            except Exception as exc:
                if error_code(exc) == "ExecutionDoesNotExist":
                    continue
                raise
            return arn
        return None

    async def _settled(self, entry: Waiting, arn: str, *, started: bool = False) -> None:
        """The request's execution runs (``started`` by this reign, or found): delete its
        message - unless a parent waits for the child (task token): then the message is
        kept until the parent was answered."""
        request = entry.request
        if started and self.callbacks is not None:
            self.callbacks.started(arn)
        if request.task_token is not None and self.callbacks is not None:
            self.callbacks.hold(
                entry.pool,
                queue=entry.queue,
                token=request.task_token,
                arn=arn,
                receipt=request.receipt_handle,
                bound=entry.bound,
                message=entry.message,
                hidden_since=entry.hidden_since,
            )
            return
        if entry.queue.is_last_receive(entry.message):
            # Left (a delete refused, or after the reign, when no batcher retries it), it
            # comes back past maxReceiveCount and SQS moves it without a reason: tried again,
            # kept hidden, as a dead letter's delete is.
            await self.dead_letters.delete_last(entry.queue, request.receipt_handle, entry.bound)
            return
        await entry.queue.delete(request.receipt_handle, entry.bound)

    async def _call_start(
        self, entry: Waiting, reservation: Reservation, handling: _Handling
    ) -> tuple[str, int]:
        """StartExecution with jittered back-off on throttles/5xx; returns (ARN, attempts)."""
        pool, request, bound = entry.pool, entry.request, entry.bound
        kwargs: dict[str, Any] = {
            "stateMachineArn": pool.state_machine_arn,
            "name": request.name,
            "input": request.input,
        }
        if request.trace_header:
            kwargs["traceHeader"] = request.trace_header
        limiter = self.limiters.for_arn(pool.state_machine_arn)
        attempts = 0
        async for attempt in stamina.retry_context(
            on=is_retryable,
            attempts=None,
            timeout=self.settings.start_retry_timeout,
            wait_initial=0.05,
            wait_max=START_WAIT_MAX,
        ):
            with attempt:
                attempts += 1
                self._check_not_stopping(attempts)
                await self._admission(entry, reservation, handling)
                await self._wait_hidden(entry, limiter.reserve())
                # Hidden through this attempt and the back-off after it (checked next at
                # the next attempt's admission).
                await self.keep_hidden(entry, ahead=self.settings.start_timeout + START_WAIT_MAX)
                await self._admission(entry, reservation, handling)  # the wait may be long
                # Its start-by: no attempt is sent after it, by this clock, read last
                # before the call (no await in between).
                if self.expiries.due(entry):
                    raise ExpiredError
                handling.phase = "calling"
                pool.ledger.mark_sent(reservation)  # no await since admission: still true
                pool.note_start_sent()
                handling.sent_at = pool.clock()
                began = time.perf_counter()
                unknown_before, handling.doubt = handling.doubt, True  # until answered
                try:
                    # The fence (invariant 8): sent while the lease was valid, this attempt
                    # takes effect within D or never; a new holder waits D before listing.
                    with anyio.fail_after(self.settings.start_timeout):
                        response = await self.starts.start_execution(**kwargs)
                except Exception as exc:
                    handling.phase = "backoff"
                    if not outcome_unknown(exc):
                        handling.doubt = unknown_before  # refused: this attempt did nothing
                        if not handling.doubt:  # nor did any before: a first attempt again
                            pool.ledger.unsend(reservation)
                    else:
                        self._sent_unanswered(execution_arn(pool.state_machine_arn, request.name))
                    if error_code(exc) in THROTTLE_CODES:
                        limiter.throttled()
                    kind = classify(exc)
                    if kind in (ErrorKind.SETUP, ErrorKind.UNKNOWN):
                        # The deployment's or AWS's error, never the request's: kept, alerted.
                        self.health.aws_failed("StartExecution", exc)
                        bound.warning(
                            "dispatcher.start_failed_not_request",
                            error=error_code(exc) or str(exc),
                            kind=str(kind),
                            status=_status_of(exc),
                            in_doubt=handling.doubt,
                        )
                    elif kind is not ErrorKind.PERMANENT:
                        bound.info("dispatcher.start_retrying", error=error_code(exc) or str(exc))
                    raise
                finally:
                    self.metrics.start_latency.labels(pool=pool.name).observe(
                        time.perf_counter() - began
                    )
                handling.doubt = False
                limiter.succeeded()
                return str(response["executionArn"]), attempts
        raise AssertionError("unreachable: stamina either returns or raises")  # pragma: no cover

    def _sent_unanswered(self, arn: str) -> None:
        """An attempt for ``arn`` may have started it and its answer is lost."""
        self._unanswered[arn] = None
        while len(self._unanswered) > MAX_UNANSWERED:
            del self._unanswered[next(iter(self._unanswered))]

    async def _admission(
        self, entry: Waiting, reservation: Reservation, handling: _Handling
    ) -> None:
        """Wait until this start fits under the limits in force (and the lease, if any),
        keeping the request hidden meanwhile."""
        pool = entry.pool
        await self.keep_hidden(entry)
        waited = False
        while not (pool.ledger.admitted(reservation) and self.may_start()):
            if not self.may_start():
                raise AbandonedError  # not the leader any more: hand the request back
            if handling.doubt:
                # A retry of a start that may run already, over the limit now: waiting
                # could wait on itself. It stays in doubt; evidence settles it, and the
                # request comes back as a new one.
                raise OverLimitError
            if not waited:
                entry.bound.info("dispatcher.start_held", why="slots taken by other executions")
                waited = True
            wait = self.settings.visibility_timeout / 3
            if entry.request.start_by is not None:  # wake at its start-by, to expire it
                wait = min(wait, max(0.0, entry.request.start_by - self.expiries.clock()))
            # Hidden through the wait: checked only after it, two extensions lost in a row
            # let the request lapse.
            await self.keep_hidden(entry, ahead=wait)
            await pool.wait_admitted(reservation, wait)
            if self.expiries.due(entry):
                raise ExpiredError
            await self.keep_hidden(entry)

    def _check_not_stopping(self, attempts: int) -> None:
        if self.stopping and attempts > 1:
            raise AbandonedError

    async def _start_failed(
        self, exc: Exception, entry: Waiting, reservation: Reservation, handling: _Handling
    ) -> None:
        if isinstance(exc, ExpiredError):  # its start-by passed: no attempt is sent now
            await self.expiries.expire(entry, reservation, doubt=handling.doubt, handling=True)
            return
        if error_code(exc) == "ExecutionAlreadyExists":
            handling.doubt = False  # it exists: the describe decides
            await self._already_exists(entry, reservation, handling)
            return
        if handling.doubt:
            # Retries given up, and some attempt may have started it: the slot stays held,
            # in doubt (see `handle`), and the request goes back; its next attempt (same
            # name), a status event, a listing or a describe settles it.
            self.stats.handed_back += 1
            self.metrics.starts.labels(pool=entry.pool.name, outcome="in_doubt").inc()
            entry.bound.warning("dispatcher.start_gave_up", error=str(exc), in_doubt=True)
            await self._hand_back(entry, 30, "start outcome unknown")
            return
        if not isinstance(exc, AWS_ERRORS):
            # A defect of this process, not an answer about the request: it ends the
            # process (ECS starts a new one; what it held is settled as after a kill -9).
            # Dead-lettered, every request met by the defect was once blamed for it.
            raise exc
        self._release(entry.pool, reservation)
        if classify(exc) is ErrorKind.PERMANENT:
            detail = f"StartExecution refused the request: {error_code(exc)}: {exc}"
            reason = error_code(exc) or type(exc).__name__
            await self.dead_letter(entry.queue, entry.pool.name, entry.message, reason, detail)
        else:
            self.stats.handed_back += 1
            self.metrics.starts.labels(pool=entry.pool.name, outcome="retried").inc()
            entry.bound.warning("dispatcher.start_gave_up", error=str(exc))
            await self._hand_back(entry, 30, "start kept failing")

    def _commit(self, pool: Pool, reservation: Reservation | None, arn: str) -> None:
        if reservation is None:
            pool.ledger.observe_running(arn, pool.clock())
        else:
            pool.ledger.started(reservation, arn, pool.clock())
        pool.update()

    async def _already_exists(
        self,
        entry: Waiting,
        reservation: Reservation,
        handling: _Handling,
        *,
        arn: str | None = None,
    ) -> None:
        """Same name seen before: running -> adopt it; closed -> already served. ``arn``:
        the request's execution found under a former name (default: its current name)."""
        pool, request, bound = entry.pool, entry.request, entry.bound
        arn = arn or execution_arn(pool.state_machine_arn, request.name)
        try:
            async for attempt in stamina.retry_context(
                # "Does not exist" right after "already exists": the describe lags; ask again.
                on=lambda e: is_retryable(e) or error_code(e) == "ExecutionDoesNotExist",
                attempts=5,
                timeout=self.settings.start_retry_timeout,
            ):
                with attempt:
                    # The message stays hidden meanwhile: an attempt (with the SDK's own
                    # retries) is cut at a quarter of the visibility, extended in between.
                    await self.keep_hidden(entry, ahead=self.settings.visibility_timeout / 4)
                    with anyio.fail_after(self.settings.visibility_timeout / 4):
                        described = await self.sfn.describe_execution(executionArn=arn)
        except Exception as exc:  # noqa: BLE001 - any failure: keep the request, try later
            # It exists (AWS said so) but its status is unknown - even "does not exist",
            # which only says the describe lags: the slot stays held, in doubt.
            handling.doubt = True
            bound.warning("dispatcher.describe_failed", execution_arn=arn, error=str(exc))
            await self._hand_back(entry, 30, "describe failed", exists=True, arn=arn)
            return
        await self.existing(entry, reservation, described)

    async def existing(
        self, entry: Waiting, reservation: Reservation | None, described: Mapping[str, Any]
    ) -> None:
        """The request's execution exists (``described``): running -> count it (with the
        start's ``reservation``, if any) and settle the message as a start's; closed ->
        already served (its parent, if any, is answered now)."""
        pool, request, bound = entry.pool, entry.request, entry.bound
        # The described ARN: the request's execution may have been found under a former name.
        arn = str(
            described.get("executionArn") or execution_arn(pool.state_machine_arn, request.name)
        )
        existing = described.get("input")
        if existing is not None and not _same_json(existing, request.input):
            if reservation is not None:
                self._release(pool, reservation)
            detail = f"execution {request.name!r} already exists with a different input"
            await self.dead_letter(
                entry.queue, pool.name, entry.message, "idempotency_conflict", detail
            )
            return
        status = described["status"]
        redrives = int(described.get("redriveCount", 0) or 0)
        if status == "RUNNING":
            self._commit(pool, reservation, arn)
            # Record which run is live, so a late terminal of an earlier run frees nothing.
            pool.ledger.observe_running(arn, pool.clock(), redrives)
        else:
            if reservation is not None:
                self._release(pool, reservation)
            pool.ledger.observe_terminal(arn, redrives)
            pool.update()
        if self._unanswered.pop(arn, False) is None:
            # Our own attempt started it (its answer was lost): a start, counted once.
            self.stats.started += 1
            pool.started_total += 1
            self.metrics.starts.labels(pool=pool.name, outcome="started").inc()
            bound.info("dispatcher.execution_started", execution_arn=arn, status=status)
            if self.callbacks is not None and status == "RUNNING":
                self.callbacks.started(arn)
        else:
            self.stats.duplicates += 1
            self.metrics.starts.labels(pool=pool.name, outcome="duplicate").inc()
            bound.info("dispatcher.duplicate_request", execution_arn=arn, status=status)
        if status == "RUNNING" or request.task_token is None or self.callbacks is None:
            await self._settled(entry, arn)
            return
        # Closed already (a restart, a redelivery): its parent is answered now. Not answered
        # (the answer failed), the message lapses and comes back to try again - but on its
        # last receive the redrive policy would move it: kept (renewed) instead.
        done = await self.callbacks.answer_closed(
            pool,
            queue=entry.queue,
            token=request.task_token,
            receipt=request.receipt_handle,
            described=described,
            bound=bound,
        )
        if not done and entry.queue.is_last_receive(entry.message):
            # Described under the ARN it was found by (a former name, maybe): "exists" holds
            # only for that one.
            self.last_receives.keep(
                entry, "its parent was not answered", exists=True, delay=30, arn=arn
            )

    # -- SQS side effects ----------------------------------------------------------------

    async def _wait_hidden(self, entry: Waiting, seconds: float) -> None:
        """Sleep ``seconds`` (a rate token's wait), keeping the message hidden meanwhile: a
        wait longer than the visibility would otherwise let SQS hand the request out again,
        and on its last receive move it to the dead-letter queue while its start goes on."""
        step = self.settings.visibility_timeout / 4
        while seconds > step:
            await self.keep_hidden(entry, ahead=step)
            await anyio.sleep(step)
            seconds -= step
        if seconds > 0:
            await self.keep_hidden(entry, ahead=seconds)
            await anyio.sleep(seconds)

    async def _settled_by_former_name(
        self, entry: Waiting, reservation: Reservation, handling: _Handling
    ) -> bool:
        """Look for the request's execution under a former name (its message kept hidden
        meanwhile): True when that settled it (found: served as that execution; the lookup
        failed: handed back, never started on a guess)."""
        pool, bound = entry.pool, entry.bound
        try:
            async with self._hidden_meanwhile(entry):
                former = await self.find_former_name(entry)
        except Exception as exc:  # noqa: BLE001 - unknown: never start on a guess
            handling.phase = "finishing"
            self._release(pool, reservation)
            self.stats.handed_back += 1
            self.metrics.former_names.labels(pool=pool.name, result="failed").inc()
            self.metrics.starts.labels(pool=pool.name, outcome="retried").inc()
            bound.warning("dispatcher.former_name_lookup_failed", error=str(exc))
            await self._back_to_queue(entry, 30, "former names unknown", message=entry.message)
            return True
        result = "not_found" if former is None else "found"
        self.metrics.former_names.labels(pool=pool.name, result=result).inc()
        if former is None:
            return False
        handling.phase = "finishing"
        bound.info("dispatcher.found_under_former_name", execution_arn=former)
        await self._already_exists(entry, reservation, handling, arn=former)
        return True

    @asynccontextmanager
    async def _hidden_meanwhile(self, entry: Waiting) -> AsyncIterator[None]:
        """Keep ``entry``'s message hidden while the block runs (a listing of former names
        under throttling once took 51 s, unextended, and the request lapsed meanwhile)."""

        async def keep() -> None:
            step = self.settings.visibility_timeout / 4
            while True:
                await anyio.sleep(step)
                await self.keep_hidden(entry, ahead=step)

        failed: Exception | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(keep)
            try:
                yield
            except Exception as exc:  # noqa: BLE001 - raised as it is, not in a group
                failed = exc
            finally:
                tg.cancel_scope.cancel()
        if failed is not None:
            raise failed

    async def keep_hidden(self, entry: Waiting, ahead: float = 0.0) -> None:
        """Extend the message's visibility once half of it has passed, or would have after
        ``ahead`` seconds (what the caller does next before it checks again: a rate wait, an
        attempt and its back-off). Checked only between steps, it once lapsed during a
        start's retries - a rate wait, then an attempt, then a back-off, none of which
        alone reached half of it - and on its last receive SQS moved the request away while
        its start went on.

        Not extended, it is tried again at the next check - unless what comes next would
        outlast the message's hidden window: then it is tried again now, while some of the
        window is left (an attempt held on the wire once outlasted a lost extension, and
        the request lapsed on its last receive while its start was in flight)."""
        visibility = self.settings.visibility_timeout
        clock = entry.pool.clock
        tries = max(1, int((entry.hidden_since + visibility - clock()) / EXTEND_RETRY_PAUSE))
        for _ in range(tries):
            elapsed = clock() - entry.hidden_since
            if elapsed + ahead < visibility / 2 or await self._extend(entry):
                return
            left = entry.hidden_since + visibility - clock()
            if elapsed + ahead < visibility or left <= 2 * EXTEND_RETRY_PAUSE:
                return
            await anyio.sleep(EXTEND_RETRY_PAUSE)

    async def _extend(self, entry: Waiting) -> bool:
        """One bounded extension of the message's visibility; whether no retry is needed
        (made, or refused for good: it is visible again, or gone)."""
        now = entry.pool.clock()
        # Bounded: a call held on the wire once kept the start from checking again for a
        # minute, and the request lapsed meanwhile. Unanswered or refused for a reason
        # that may pass, hidden-since is left unchanged (the caller may try again).
        with anyio.move_on_after(EXTEND_CALL_SECONDS):
            try:
                await self.sqs.change_message_visibility(
                    QueueUrl=entry.queue.url,
                    ReceiptHandle=entry.request.receipt_handle,
                    VisibilityTimeout=self.settings.visibility_timeout,
                )
            except Exception as exc:  # noqa: BLE001 - worst case it is redelivered: idempotent
                entry.bound.warning("dispatcher.extend_visibility_failed", error=str(exc))
                if error_code(exc) in GONE_CODES:
                    entry.hidden_since = now  # no retry can help: it is visible, or gone
                    return True
                return False
            entry.hidden_since = now
            return True
        entry.bound.warning("dispatcher.extend_visibility_failed", error="no answer")
        return False

    async def dead_letter(
        self,
        queue: RequestQueue,
        pool: str,
        message: dict[str, Any],
        reason: str,
        detail: str,
        *,
        retry_answer: bool = True,
    ) -> bool:
        """Move a bad request to the dead-letter queue with its reason, then delete it; a
        parent waiting on it (task token) is answered with the reason first. Should that
        answer fail, the message - the only record of the token - is handed back instead,
        to be dead-lettered (and the parent answered) on a later receive; on its last
        receive (handed back, the redrive policy would move it) it is kept hidden and the
        answer tried again for a while, as a dead letter's send is, then dead-lettered -
        or, without ``retry_answer``, left as it is and False returned (the caller keeps
        it and tries again later)."""
        token = task_token(message, self.settings.task_token_attribute)
        if token is not None and self.callbacks is not None:
            errors = {"receive_limit": DEAD_LETTERED, EXPIRED: EXPIRED_ERROR}
            error = errors.get(reason, BAD_REQUEST)
            bound = log.bind(message_id=message.get("MessageId"), pool=pool)
            cause = f"{reason}: {detail}"
            answered = await self.callbacks.fail_request(pool, token, error, cause, bound)
            handle = str(message["ReceiptHandle"])
            if not answered and not queue.is_last_receive(message):
                self.stats.handed_back += 1
                await queue.hand_back(handle, 30, bound, "its parent was not answered")
                return True
            if not answered and not retry_answer:
                return False
            waited, failures = 0.0, 0
            while not answered and waited < LAST_RECEIVE_RETRY_SECONDS:
                failures += 1
                pause = min(LAST_RECEIVE_MAX_PAUSE, 2.0**failures)
                await queue.set_visibility([handle], int(pause) + LAST_RECEIVE_HIDDEN_MARGIN)
                await anyio.sleep(pause)
                waited += pause
                answered = await self.callbacks.fail_request(pool, token, error, cause, bound)
        self.stats.dead_lettered += 1
        await self.dead_letters.move(queue, pool, message, reason, detail)
        return True


def _status_of(exc: Exception) -> int | None:
    """The HTTP status of an error answer (None: no answer)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0) or None


def _same_json(a: str, b: str) -> bool:
    """Whether an existing execution's input ``a`` is this request's input ``b``."""
    if a == b:
        return True
    try:
        existing, wanted = json.loads(a), json.loads(b)
    except ValueError:
        return False
    return (
        bool(existing == wanted)
        or _same_envelope(existing, wanted)
        or _same_body(existing, wanted)
        or _same_body(wanted, existing)
    )


_ENVELOPE_KEYS = ({"body", "requestId", "attributes"}, {"body", "messageId", "attributes"})


def _envelope_body(value: Any) -> str | None:
    """The producer's body an envelope input carries (None: not an envelope)."""
    if isinstance(value, dict) and set(value) in _ENVELOPE_KEYS and isinstance(value["body"], str):
        return value["body"]
    return None


def _same_envelope(existing: Any, wanted: Any) -> bool:
    """An envelope input written before envelopes named the request instead of the message
    (``messageId``; attributes with the task token) is the same request when its body is:
    a request in flight across that upgrade is not an idempotency conflict."""
    return (
        isinstance(existing, dict)
        and isinstance(wanted, dict)
        and set(existing) == {"body", "messageId", "attributes"}
        and set(wanted) == {"body", "requestId", "attributes"}
        and existing["body"] == wanted["body"]
    )


def _same_body(envelope: Any, raw: Any) -> bool:
    """An envelope input and a raw (verbatim JSON) input of the same body are one request:
    a request in flight across a change of ``input_format`` is not an idempotency conflict."""
    body = _envelope_body(envelope)
    if body is None or _envelope_body(raw) is not None:
        return False
    try:
        return bool(json.loads(body) == raw)
    except ValueError:
        return False
