"""Events: apply Step Functions status changes from the events queue to the ledger.

Events are hints (invariant 3): duplicated, reordered, late or lost. Each one is applied
idempotently, then the batch is deleted. A malformed event is logged, counted and
deleted; it never stops the loop.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog

from dispatcher.aws.api import AWS_ERRORS, Clients
from dispatcher.core.ledger import TERMINAL_STATUSES, Change
from dispatcher.daemon.callbacks import result_of_event
from dispatcher.daemon.deleter import DeleteBatcher
from dispatcher.daemon.health import Health
from dispatcher.daemon.metrics import NO_POOL, Metrics
from dispatcher.daemon.pool import Pool
from dispatcher.settings.config import Settings

log = structlog.get_logger("dispatcher.events")

DETAIL_TYPE = "Step Functions Execution Status Change"
SOURCE = "aws.states"


@dataclass(frozen=True, slots=True)
class StatusChange:
    """The fields of one status-change event the dispatcher uses."""

    execution_arn: str
    state_machine_arn: str
    status: str
    redrive_count: int
    result: dict[str, Any] = field(default_factory=dict)  # output, error, cause (terminal)


def parse_event(body: str) -> StatusChange:
    """Parse an EventBridge envelope; raise ValueError naming what is missing or wrong."""
    try:
        envelope = json.loads(body)
    except RecursionError:
        raise ValueError("event body is nested too deeply") from None
    if not isinstance(envelope, dict):
        raise ValueError("event body is not a JSON object")
    if envelope.get("source") != SOURCE or envelope.get("detail-type") != DETAIL_TYPE:
        raise ValueError(
            f"not a status-change event (source={envelope.get('source')!r}, "
            f"detail-type={envelope.get('detail-type')!r})"
        )
    detail = envelope.get("detail")
    if not isinstance(detail, dict):
        raise ValueError("event has no detail object")
    try:
        return StatusChange(
            execution_arn=str(detail["executionArn"]),
            state_machine_arn=str(detail["stateMachineArn"]),
            status=str(detail["status"]),
            redrive_count=int(detail.get("redriveCount") or 0),
            result=result_of_event(detail),
        )
    except KeyError as exc:
        raise ValueError(f"event detail lacks {exc.args[0]!r}") from None
    except TypeError as exc:
        raise ValueError(f"event detail has a field of the wrong type ({exc})") from None


_RESULTS = {
    Change.ADDED: "applied",
    Change.FREED: "applied",
    Change.NOTED: "applied",
    Change.UNCHANGED: "duplicate",
    Change.STALE: "stale",
}


class Events:
    """Consumes the events queue for a set of pools (routed by state machine ARN)."""

    def __init__(
        self,
        settings: Settings,
        clients: Clients,
        pools: Mapping[str, Pool],
        metrics: Metrics,
        health: Health,
    ) -> None:
        self.settings = settings
        self.sqs = clients.sqs
        self.pools = pools  # state machine ARN -> pool
        self.metrics = metrics
        self.health = health
        self.applied = 0
        self._deleter: DeleteBatcher | None = None

    async def run(self) -> None:
        """Apply events until cancelled, with several receives in flight (a single loop that
        waits for each delete lets ended executions hold slots in a burst: see bench/)."""
        deleter = DeleteBatcher(self.sqs, self.settings.events_queue_url)
        async with anyio.create_task_group() as tg:
            await tg.start(deleter.run)
            self._deleter = deleter
            try:
                async with anyio.create_task_group() as receivers:
                    for _ in range(self.settings.events_concurrency):
                        receivers.start_soon(self._receive_loop)
            finally:
                self._deleter = None
                deleter.close()

    async def _receive_loop(self) -> None:
        failures = 0
        while True:
            try:
                await self.run_once()
                failures = 0
            except AWS_ERRORS as exc:  # a bug is not caught: the loop dies, /healthz says so
                failures += 1
                self.health.aws_failed("ReceiveMessage", exc)
                log.warning("dispatcher.events_receive_failed", error=str(exc))
                await anyio.sleep(min(30.0, 0.5 * 2 ** min(failures, 6)))

    async def run_once(self) -> int:
        """Receive up to ten events, apply them, delete them; return how many arrived."""
        response = await self.sqs.receive_message(
            QueueUrl=self.settings.events_queue_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=self.settings.receive_wait_seconds,
            VisibilityTimeout=60,
            # When each event reached the queue: the debug line shows how long it waited
            # there (bench/cycle.py attributes the slot cycle with it).
            MessageSystemAttributeNames=["SentTimestamp"],
        )
        self.health.aws_ok()
        messages: list[Any] = list(response.get("Messages", []))
        if not messages:
            return 0
        for message in messages:
            sent = (message.get("Attributes") or {}).get("SentTimestamp")
            self.apply(
                str(message.get("Body", "")),
                str(message.get("MessageId", "")),
                sent_ms=int(sent) if sent else None,
            )
        if self._deleter is not None:  # batched while `run` runs; applied already either way
            for message in messages:
                await self._deleter.delete(message["ReceiptHandle"])
            return len(messages)
        result = await self.sqs.delete_message_batch(
            QueueUrl=self.settings.events_queue_url,
            Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)
            ],
        )
        for failed in result.get("Failed", []):
            # Applying again on redelivery is harmless: every input is idempotent.
            log.warning("dispatcher.event_delete_failed", code=failed.get("Code"))
        return len(messages)

    def apply(self, body: str, message_id: str = "", *, sent_ms: int | None = None) -> str:
        """Apply one event body; return the result label it was counted under (``sent_ms``:
        when it reached the queue, for the debug line)."""
        try:
            change = parse_event(body)
        except ValueError as exc:
            self.metrics.events.labels(pool=NO_POOL, status="unknown", result="malformed").inc()
            log.warning("dispatcher.event_malformed", message_id=message_id, error=str(exc))
            return "malformed"
        pool = self.pools.get(change.state_machine_arn)
        if pool is None:
            self.metrics.events.labels(pool=NO_POOL, status=change.status, result="foreign").inc()
            log.debug("dispatcher.event_foreign", state_machine_arn=change.state_machine_arn)
            return "foreign"
        ledger = pool.ledger
        was_full = ledger.free == 0
        if change.status == "RUNNING":
            outcome = ledger.observe_running(
                change.execution_arn, pool.clock(), change.redrive_count
            )
        elif change.status in TERMINAL_STATUSES:
            since = ledger.held_since(change.execution_arn)
            outcome = ledger.observe_terminal(change.execution_arn, change.redrive_count)
            pool.note_freed(outcome, was_full, since)
            if outcome is not Change.STALE:
                pool.ended(change.execution_arn, change.status, change.result)
        else:  # PENDING_REDRIVE and statuses newer than this code: a RUNNING event follows
            self.metrics.events.labels(pool=pool.name, status=change.status, result="ignored").inc()
            return "ignored"
        pool.update()
        result = _RESULTS[outcome]
        self.metrics.events.labels(pool=pool.name, status=change.status, result=result).inc()
        self.health.mark_event()
        self.applied += 1
        log.debug(
            "dispatcher.event_applied",
            execution_arn=change.execution_arn,
            status=change.status,
            result=result,
            change=outcome.value,
            sent_ms=sent_ms,
        )
        return result
