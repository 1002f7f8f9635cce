"""Intake: receive requests only for free slots, start each once, delete only after.

One pass (`Intake.run_once`) waits for a free slot, reserves up to ten, long-polls that
many messages and hands each to a handler task. A handler starts the execution under
its deterministic name (retrying throttles and 5xx with jittered back-off while keeping
the message hidden), and deletes the message only once the execution is known to exist;
a bad request goes to the dead-letter queue with its reason first (invariant 5).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import stamina
import structlog
from anyio.abc import TaskGroup, TaskStatus

from dispatcher.aws import AWS_ERRORS, Clients, ErrorKind, classify, error_code, is_retryable
from dispatcher.config import Settings
from dispatcher.deleter import DeleteBatcher
from dispatcher.health import Health
from dispatcher.ledger import Reservation
from dispatcher.metrics import Metrics
from dispatcher.pool import Pool
from dispatcher.requests import BadRequest, StartRequest, execution_arn, parse

log = structlog.get_logger("dispatcher.intake")

REASON_ATTRIBUTE = "dispatcher-reason"
DETAIL_ATTRIBUTE = "dispatcher-detail"
ORIGINAL_ID_ATTRIBUTE = "dispatcher-original-message-id"
_MAX_SQS_ATTRIBUTES = 10


class _AbandonedError(Exception):
    """Shutting down: hand the request back to the queue instead of retrying."""


@dataclass
class _Handling:
    """One request being handled; ``phase`` tells shutdown whether it may be cut short."""

    scope: anyio.CancelScope
    phase: str = "received"  # received | calling | backoff | finishing


@dataclass
class IntakeStats:
    """Totals for the shutdown summary and `/status`."""

    received: int = 0
    started: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    handed_back: int = 0
    in_flight: dict[int, _Handling] = field(default_factory=dict)


class Intake:
    """Starts executions for the requests of one pool."""

    def __init__(
        self, settings: Settings, clients: Clients, pool: Pool, metrics: Metrics, health: Health
    ) -> None:
        self.settings = settings
        self.sqs = clients.sqs
        self.sfn = clients.sfn
        self.pool = pool
        self.metrics = metrics
        self.health = health
        self.stats = IntakeStats()
        self._stopping = False
        self._force = False
        self.may_start: Callable[[], bool] = lambda: True  # the lease sets this
        self._pollers: anyio.CancelScope | None = None
        self._deleter: DeleteBatcher | None = None
        self._ids = iter(range(1, 1 << 62))

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Poll until `stop`, then let started handlers finish within the shutdown timeout."""
        deleter = DeleteBatcher(self.sqs, self.settings.request_queue_url)
        async with anyio.create_task_group() as deleting:
            await deleting.start(deleter.run)
            self._deleter = deleter
            try:
                async with anyio.create_task_group() as handlers:
                    with anyio.CancelScope() as self._pollers:
                        async with anyio.create_task_group() as pollers:
                            for _ in range(self.settings.receive_concurrency):
                                pollers.start_soon(self._poll_loop, handlers)
                            task_status.started()
                    deadline = anyio.current_time() + self.settings.shutdown_timeout
                    handlers.cancel_scope.deadline = deadline
                    self._cut_short_waiting()
            finally:
                self._deleter = None
                deleter.close()  # the queued deletes still go out

    def stop(self, *, force: bool = False) -> None:
        """Stop receiving; with ``force`` also abandon handlers without clean-up."""
        self._stopping = True
        self._force = self._force or force
        if self._pollers is not None:
            self._pollers.cancel()
        self._cut_short_waiting()
        if force:
            for handling in list(self.stats.in_flight.values()):
                handling.scope.cancel()

    def _cut_short_waiting(self) -> None:
        for handling in list(self.stats.in_flight.values()):
            if handling.phase in ("received", "backoff"):
                handling.scope.cancel()

    async def _poll_loop(self, handlers: TaskGroup) -> None:
        failures = 0
        while not self._stopping:
            try:
                await self.run_once(handlers)
                failures = 0
            except AWS_ERRORS as exc:  # a bug is not caught: the loop dies, /healthz says so
                failures += 1
                self.health.aws_failed("ReceiveMessage", exc)
                log.warning("dispatcher.receive_failed", error=str(exc), failures=failures)
                await anyio.sleep(min(30.0, 0.5 * 2 ** min(failures, 6)))

    # -- one pass ----------------------------------------------------------------------

    async def run_once(self, handlers: TaskGroup) -> int:
        """Wait for free slots, receive that many requests (<= 10), hand them to handlers."""
        free = await self.pool.wait_free()
        ledger = self.pool.ledger
        reservations = ledger.reserve(min(10, free), self.pool.clock())
        self.pool.receiving += len(reservations)
        self.pool.update()
        try:
            response = await self.sqs.receive_message(
                QueueUrl=self.settings.request_queue_url,
                MaxNumberOfMessages=len(reservations),
                WaitTimeSeconds=self.settings.receive_wait_seconds,
                VisibilityTimeout=self.settings.visibility_timeout,
                MessageAttributeNames=["All"],
                MessageSystemAttributeNames=["All"],
            )
        except BaseException:
            for reservation in reservations:
                ledger.cancel(reservation)
            raise
        finally:
            self.pool.receiving -= len(reservations)
            self.pool.update()
        self.health.aws_ok()
        messages: list[Any] = list(response.get("Messages", []))
        for reservation in reservations[len(messages) :]:
            ledger.cancel(reservation)
        if not messages:
            self.pool.backlog_drained()
        self.pool.update()
        self.stats.received += len(messages)
        for message, reservation in zip(messages, reservations, strict=False):
            handlers.start_soon(self.handle, message, reservation)
        return len(messages)

    # -- one request -------------------------------------------------------------------

    async def handle(self, message: dict[str, Any], reservation: Reservation) -> None:
        """Start, dead-letter or hand back one request; always settles its reservation."""
        key = next(self._ids)
        handling = _Handling(scope=anyio.CancelScope())
        self.stats.in_flight[key] = handling
        bound = log.bind(message_id=message.get("MessageId"))
        receipt_handle = str(message.get("ReceiptHandle"))
        try:
            request = parse(message, self.settings.input_format)
            with handling.scope:
                self._check_not_stopping(2)
                if isinstance(request, BadRequest):
                    self._release(reservation)
                    handling.phase = "finishing"
                    await self._dead_letter(message, request.reason, request.detail, bound)
                else:
                    bound = bound.bind(execution_name=request.name)
                    await self._start(request, message, reservation, handling, bound)
        except _AbandonedError:
            await self._hand_back(receipt_handle, 0, bound, "shutting down")
        finally:
            del self.stats.in_flight[key]
            self._release(reservation)
        if handling.scope.cancelled_caught and not self._force:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self._hand_back(receipt_handle, 0, bound, "shutting down")

    def _release(self, reservation: Reservation) -> None:
        if self.pool.ledger.cancel(reservation):
            self.pool.update()

    async def _start(
        self,
        request: StartRequest,
        message: dict[str, Any],
        reservation: Reservation,
        handling: _Handling,
        bound: Any,
    ) -> None:
        # Held before our first attempt: AWS's idempotent success is a duplicate, not a start.
        held_before = self.pool.ledger.holds(
            execution_arn(self.pool.state_machine_arn, request.name)
        )
        try:
            arn, attempts = await self._call_start(request, reservation, handling, bound)
        except _AbandonedError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is sorted just below
            handling.phase = "finishing"
            await self._start_failed(exc, request, message, reservation, bound)
            return
        handling.phase = "finishing"
        self._commit(reservation, arn)
        if held_before:
            self.stats.duplicates += 1
            self.metrics.starts.labels(pool=self.pool.name, outcome="duplicate").inc()
            bound.info("dispatcher.duplicate_request", execution_arn=arn, status="RUNNING")
            await self._delete(request.receipt_handle, bound)
            return
        self.stats.started += 1
        self.pool.started_total += 1
        self.metrics.starts.labels(pool=self.pool.name, outcome="started").inc()
        if request.sent_at is not None:
            self.metrics.queue_wait.labels(pool=self.pool.name).observe(
                max(0.0, time.time() - request.sent_at)
            )
        bound.info("dispatcher.execution_started", execution_arn=arn, attempts=attempts)
        await self._delete(request.receipt_handle, bound)

    async def _call_start(
        self, request: StartRequest, reservation: Reservation, handling: _Handling, bound: Any
    ) -> tuple[str, int]:
        """StartExecution with jittered back-off on throttles/5xx; returns (ARN, attempts)."""
        kwargs: dict[str, Any] = {
            "stateMachineArn": self.pool.state_machine_arn,
            "name": request.name,
            "input": request.input,
        }
        if request.trace_header:
            kwargs["traceHeader"] = request.trace_header
        hidden_since = self.pool.clock()
        attempts = 0
        async for attempt in stamina.retry_context(
            on=is_retryable,
            attempts=None,
            timeout=self.settings.start_retry_timeout,
            wait_initial=0.05,
            wait_max=5.0,
        ):
            with attempt:
                attempts += 1
                self._check_not_stopping(attempts)
                hidden_since = await self._admission(request, reservation, hidden_since, bound)
                handling.phase = "calling"
                self.pool.note_start_sent()
                began = time.perf_counter()
                try:
                    response = await self.sfn.start_execution(**kwargs)
                except Exception as exc:
                    handling.phase = "backoff"
                    if classify(exc) is not ErrorKind.PERMANENT:
                        bound.info("dispatcher.start_retrying", error=error_code(exc) or str(exc))
                    raise
                finally:
                    self.metrics.start_latency.labels(pool=self.pool.name).observe(
                        time.perf_counter() - began
                    )
                return str(response["executionArn"]), attempts
        raise AssertionError("unreachable: stamina either returns or raises")  # pragma: no cover

    async def _admission(
        self, request: StartRequest, reservation: Reservation, hidden_since: float, bound: Any
    ) -> float:
        """Wait until this start fits under the limit (and the lease, if any), keeping the
        request hidden meanwhile; returns when its visibility was last extended."""
        hidden_since = await self._keep_hidden(request, hidden_since, bound)
        waited = False
        while not (self.pool.ledger.admitted(reservation) and self.may_start()):
            if not self.may_start():
                raise _AbandonedError  # not the leader any more: hand the request back
            if not waited:
                bound.info("dispatcher.start_held", why="slots taken by other executions")
                waited = True
            await self.pool.wait_admitted(reservation, self.settings.visibility_timeout / 3)
            hidden_since = await self._keep_hidden(request, hidden_since, bound)
        return hidden_since

    def _check_not_stopping(self, attempts: int) -> None:
        if self._stopping and attempts > 1:
            raise _AbandonedError

    async def _start_failed(
        self,
        exc: Exception,
        request: StartRequest,
        message: dict[str, Any],
        reservation: Reservation,
        bound: Any,
    ) -> None:
        if error_code(exc) == "ExecutionAlreadyExists":
            await self._already_exists(request, message, reservation, bound)
            return
        self._release(reservation)
        if classify(exc) is ErrorKind.PERMANENT:
            detail = f"StartExecution refused the request: {error_code(exc)}: {exc}"
            reason = error_code(exc) or type(exc).__name__
            await self._dead_letter(message, reason, detail, bound)
        else:
            self.stats.handed_back += 1
            self.metrics.starts.labels(pool=self.pool.name, outcome="retried").inc()
            bound.warning("dispatcher.start_gave_up", error=str(exc))
            await self._hand_back(request.receipt_handle, 30, bound, "start kept failing")

    def _commit(self, reservation: Reservation, arn: str) -> None:
        self.pool.ledger.started(reservation, arn, self.pool.clock())
        self.pool.update()

    async def _already_exists(
        self,
        request: StartRequest,
        message: dict[str, Any],
        reservation: Reservation,
        bound: Any,
    ) -> None:
        """Same name seen before: running -> adopt it; closed -> already served."""
        arn = execution_arn(self.pool.state_machine_arn, request.name)
        try:
            async for attempt in stamina.retry_context(
                on=lambda e: is_retryable(e) or error_code(e) == "ExecutionDoesNotExist",
                attempts=5,
                timeout=self.settings.start_retry_timeout,
            ):
                with attempt:
                    described = await self.sfn.describe_execution(executionArn=arn)
        except Exception as exc:  # noqa: BLE001 - any failure: keep the request, try later
            self._release(reservation)
            bound.warning("dispatcher.describe_failed", execution_arn=arn, error=str(exc))
            await self._hand_back(request.receipt_handle, 30, bound, "describe failed")
            return
        existing = described.get("input")
        if existing is not None and not _same_json(existing, request.input):
            self._release(reservation)
            detail = f"execution {request.name!r} already exists with a different input"
            await self._dead_letter(message, "idempotency_conflict", detail, bound)
            return
        status = described["status"]
        if status == "RUNNING":
            self._commit(reservation, arn)
            # Record which run is live, so a late terminal of an earlier run frees nothing.
            redrives = int(described.get("redriveCount", 0) or 0)
            self.pool.ledger.observe_running(arn, self.pool.clock(), redrives)
        else:
            self._release(reservation)
            self.pool.ledger.observe_terminal(arn, int(described.get("redriveCount", 0) or 0))
            self.pool.update()
        self.stats.duplicates += 1
        self.metrics.starts.labels(pool=self.pool.name, outcome="duplicate").inc()
        bound.info("dispatcher.duplicate_request", execution_arn=arn, status=status)
        await self._delete(request.receipt_handle, bound)

    # -- SQS side effects ----------------------------------------------------------------

    async def _keep_hidden(self, request: StartRequest, hidden_since: float, bound: Any) -> float:
        """Extend the message's visibility once half of it has passed (long retries)."""
        now = self.pool.clock()
        if now - hidden_since < self.settings.visibility_timeout / 2:
            return hidden_since
        try:
            await self.sqs.change_message_visibility(
                QueueUrl=self.settings.request_queue_url,
                ReceiptHandle=request.receipt_handle,
                VisibilityTimeout=self.settings.visibility_timeout,
            )
        except Exception as exc:  # noqa: BLE001 - worst case it is redelivered: idempotent
            bound.warning("dispatcher.extend_visibility_failed", error=str(exc))
        return now

    async def _delete(self, receipt_handle: str, bound: Any) -> None:
        if self._deleter is not None:  # batched while `run` runs
            await self._deleter.delete(receipt_handle)
            return
        try:
            await self.sqs.delete_message(
                QueueUrl=self.settings.request_queue_url, ReceiptHandle=receipt_handle
            )
        except Exception as exc:  # noqa: BLE001 - redelivery maps to the same name: safe
            bound.warning("dispatcher.delete_failed", error=str(exc))

    async def _hand_back(self, receipt_handle: str, delay: int, bound: Any, why: str) -> None:
        try:
            await self.sqs.change_message_visibility(
                QueueUrl=self.settings.request_queue_url,
                ReceiptHandle=receipt_handle,
                VisibilityTimeout=delay,
            )
            bound.info("dispatcher.request_handed_back", why=why, visible_in=delay)
        except Exception as exc:  # noqa: BLE001 - it becomes visible at its timeout anyway
            bound.warning("dispatcher.hand_back_failed", error=str(exc))

    async def _dead_letter(
        self,
        message: dict[str, Any],
        reason: str,
        detail: str,
        bound: Any,
    ) -> None:
        """Move a bad request to the dead-letter queue with its reason, then delete it."""
        self.stats.dead_lettered += 1
        self.metrics.dead_letters.labels(pool=self.pool.name, reason=reason).inc()
        self.metrics.starts.labels(pool=self.pool.name, outcome="dead_lettered").inc()
        bound.warning("dispatcher.request_dead_lettered", reason=reason, detail=detail[:500])
        handle = str(message["ReceiptHandle"])
        dlq = self.settings.dead_letter_queue_url
        if dlq is None:
            # The queue's redrive policy moves it after maxReceiveCount receives.
            await self._hand_back(handle, 0, bound, f"bad request ({reason}); redrive policy")
            return
        attributes: dict[str, Any] = {
            REASON_ATTRIBUTE: {"DataType": "String", "StringValue": reason},
            DETAIL_ATTRIBUTE: {"DataType": "String", "StringValue": detail[:1000]},
            ORIGINAL_ID_ATTRIBUTE: {"DataType": "String", "StringValue": str(message["MessageId"])},
        }
        for name, value in (message.get("MessageAttributes") or {}).items():
            if len(attributes) >= _MAX_SQS_ATTRIBUTES:
                break
            attributes.setdefault(name, value)
        try:
            await self.sqs.send_message(
                QueueUrl=dlq,
                MessageBody=str(message.get("Body") or "(empty)"),
                MessageAttributes=attributes,
            )
        except Exception as exc:  # noqa: BLE001 - keep the request; it will come back
            bound.error("dispatcher.dead_letter_failed", error=str(exc))
            await self._hand_back(handle, 30, bound, "dead-letter queue unavailable")
            return
        await self._delete(handle, bound)


def _same_json(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return bool(json.loads(a) == json.loads(b))
    except ValueError:
        return False
