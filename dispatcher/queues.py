"""One request queue: where its messages are deleted, handed back and kept hidden.

A request belongs to the queue it came from until it is deleted; every SQS side effect
of a request goes through its queue's `RequestQueue`, so a dispatcher reading several
queues never acknowledges a message on the wrong one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import structlog

from dispatcher.aws import AWS_ERRORS
from dispatcher.deleter import BATCH, DeleteBatcher
from dispatcher.layout import QueueConfig

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient

log = structlog.get_logger("dispatcher.queues")

MAX_VISIBILITY = 43_200  # SQS: 12 hours


class RequestQueue:
    """The SQS side effects of one request queue (deletes batched while `deleter` runs)."""

    def __init__(self, sqs: SQSClient, config: QueueConfig) -> None:
        self.sqs = sqs
        self.config = config
        self.url = config.url
        self.priority = config.priority
        self.deleter: DeleteBatcher | None = None
        self.received = 0

    async def delete(self, receipt_handle: str, bound: Any) -> None:
        """Delete one message (after its execution exists, or it was dead-lettered)."""
        if self.deleter is not None:
            await self.deleter.delete(receipt_handle)
            return
        try:
            await self.sqs.delete_message(QueueUrl=self.url, ReceiptHandle=receipt_handle)
        except Exception as exc:  # noqa: BLE001 - redelivery maps to the same name: safe
            bound.warning("dispatcher.delete_failed", error=str(exc))

    async def hand_back(self, receipt_handle: str, delay: int, bound: Any, why: str) -> None:
        """Make one message visible again after ``delay`` seconds."""
        try:
            await self.sqs.change_message_visibility(
                QueueUrl=self.url, ReceiptHandle=receipt_handle, VisibilityTimeout=delay
            )
            bound.info("dispatcher.request_handed_back", why=why, visible_in=delay)
        except Exception as exc:  # noqa: BLE001 - it becomes visible at its timeout anyway
            bound.warning("dispatcher.hand_back_failed", error=str(exc))

    async def set_visibility(self, receipt_handles: Sequence[str], seconds: int) -> set[str]:
        """Set the visibility of many messages (batches of ten); return the handles that
        failed (their message may already be visible again: it will come back)."""
        failed: set[str] = set()
        for start in range(0, len(receipt_handles), BATCH):
            batch = receipt_handles[start : start + BATCH]
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
                failed.update(batch)
                continue
            for entry in result.get("Failed", []):
                failed.add(batch[int(entry["Id"])])
                log.warning("dispatcher.visibility_failed", code=entry.get("Code"))
        return failed
