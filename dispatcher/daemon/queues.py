"""One request queue: where its messages are deleted, handed back and kept hidden.

A request belongs to the queue it came from until it is deleted; every SQS side effect
of a request goes through its queue's `RequestQueue`, so a dispatcher reading several
queues never acknowledges a message on the wrong one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from dispatcher.aws.api import AWS_ERRORS
from dispatcher.daemon.deleter import BATCH, DeleteBatcher
from dispatcher.settings.layout import QueueConfig

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient

log = structlog.get_logger("dispatcher.queues")

MAX_VISIBILITY = 43_200  # SQS: 12 hours

LastChance = Callable[[Mapping[str, Any], str], Awaitable[bool]]
"""Dead-letters a valid request on its last receive, with the reason; False if it cannot."""


def receive_count(message: Mapping[str, Any]) -> int:
    """How many times SQS has delivered the message (0 when it did not say)."""
    try:
        return int((message.get("Attributes") or {}).get("ApproximateReceiveCount", 0))
    except (TypeError, ValueError):
        return 0


class RequestQueue:
    """The SQS side effects of one request queue (deletes batched while `deleter` runs)."""

    def __init__(self, sqs: SQSClient, config: QueueConfig) -> None:
        self.sqs = sqs
        self.config = config
        self.url = config.url
        self.priority = config.priority
        self.deleter: DeleteBatcher | None = None
        self.received = 0
        self.max_receive_count: int | None = None  # the redrive policy's, read at start-up
        self.last_chance: LastChance | None = None
        # Seconds a message handed back now must stay hidden at least (while stopping: until
        # this process's own long polls can no longer take it again, counting a receive).
        self.min_delay: Callable[[], int] = lambda: 0

    def is_last_receive(self, message: Mapping[str, Any]) -> bool:
        """Whether handing ``message`` back would let SQS move it to the dead-letter queue
        without a reason on its next receive (its redrive policy's maxReceiveCount)."""
        limit = self.max_receive_count
        return limit is not None and receive_count(message) >= limit

    async def delete(self, receipt_handle: str, bound: Any) -> None:
        """Delete one message (after its execution exists, or it was dead-lettered)."""
        if self.deleter is not None:
            await self.deleter.delete(receipt_handle)
            return
        try:
            await self.sqs.delete_message(QueueUrl=self.url, ReceiptHandle=receipt_handle)
        except Exception as exc:  # noqa: BLE001 - redelivery maps to the same name: safe
            bound.warning("dispatcher.delete_failed", error=str(exc))

    async def hand_back(
        self,
        receipt_handle: str,
        delay: int,
        bound: Any,
        why: str,
        *,
        message: Mapping[str, Any] | None = None,
    ) -> None:
        """Make one message visible again after ``delay`` seconds. A valid request
        (``message`` given) on its last receive is dead-lettered with the reason instead:
        handed back, SQS would move it there on its own, without one."""
        if (
            message is not None
            and self.last_chance is not None
            and self.is_last_receive(message)
            and await self.last_chance(message, why)
        ):
            return
        delay = max(delay, self.min_delay())
        try:
            await self.sqs.change_message_visibility(
                QueueUrl=self.url, ReceiptHandle=receipt_handle, VisibilityTimeout=delay
            )
            bound.info("dispatcher.request_handed_back", why=why, visible_in=delay)
        except Exception as exc:  # noqa: BLE001 - it becomes visible at its timeout anyway
            bound.warning("dispatcher.hand_back_failed", error=str(exc))

    async def hand_back_all(self, messages: Sequence[Mapping[str, Any]], why: str) -> int:
        """Make many valid requests visible again at once (those on their last receive are
        dead-lettered with the reason instead); returns how many went back."""
        back = []
        for message in messages:
            if (
                self.last_chance is not None
                and self.is_last_receive(message)
                and await self.last_chance(message, why)
            ):
                continue
            back.append(str(message["ReceiptHandle"]))
        failed = await self.set_visibility(back, self.min_delay()) if back else set()
        return len(back) - len(failed)

    async def set_visibility(self, receipt_handles: Sequence[str], seconds: int) -> set[str]:
        """Set the visibility of many messages (batches of ten, sent concurrently); return
        the handles that failed (their message may already be visible again: it will come
        back)."""
        failed, unknown = await self.extend_visibility(receipt_handles, seconds)
        return failed | unknown

    async def extend_visibility(
        self, receipt_handles: Sequence[str], seconds: int
    ) -> tuple[set[str], set[str]]:
        """Set the visibility of many messages, the batches of ten concurrently (a batch
        whose answer is slow never holds back the others). Returns the handles SQS
        refused, and those of batches whose call failed (outcome unknown)."""
        failed: set[str] = set()
        unknown: set[str] = set()

        async def one(batch: Sequence[str]) -> None:
            try:
                result = await self.sqs.change_message_visibility_batch(
                    QueueUrl=self.url,
                    Entries=[
                        {"Id": str(i), "ReceiptHandle": h, "VisibilityTimeout": seconds}
                        for i, h in enumerate(batch)
                    ],
                )
            except AWS_ERRORS as exc:
                log.warning("dispatcher.visibility_failed", error=str(exc), count=len(batch))
                unknown.update(batch)
                return
            for entry in result.get("Failed", []):
                failed.add(batch[int(entry["Id"])])
                log.warning("dispatcher.visibility_failed", code=entry.get("Code"))

        async with anyio.create_task_group() as batches:
            for start in range(0, len(receipt_handles), BATCH):
                batches.start_soon(one, receipt_handles[start : start + BATCH])
        return failed, unknown
