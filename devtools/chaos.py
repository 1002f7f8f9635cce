"""A relay that damages status-change events on their way to the dispatcher's events queue.

In tests the EventBridge rule targets a "raw" queue; `EventChaos` moves each event from
there to the queue the dispatcher reads, dropping, duplicating, delaying and reordering
them as Step Functions + EventBridge + SQS may do in AWS (best-effort, at-least-once,
unordered), with a seed so a failing run can be replayed.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import TYPE_CHECKING

import aioboto3
import anyio
from anyio.abc import TaskStatus

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_sqs.type_defs import (
        DeleteMessageBatchRequestEntryTypeDef,
        MessageTypeDef,
        SendMessageBatchRequestEntryTypeDef,
    )

_MAX_DELAY = 900  # SQS's ceiling for DelaySeconds
_FLUSH_TIMEOUT = 5.0
# The emulator accepts any credentials; fixed ones keep the host's real ones out of tests.
_EMULATOR_CREDENTIALS = {"aws_access_key_id": "test", "aws_secret_access_key": "test"}


class EventChaos:
    """Relay messages from `source_queue_url` to `target_queue_url`, damaging them en route.

    `drop`: probability each event is lost (1.0 loses all); `duplicate`: probability a
    forwarded event is sent twice; `max_delay`: each copy waits a random 0..max_delay s
    (SQS per-message DelaySeconds); `reorder`: shuffle each batch and hold one message back
    until after the next batch. `stats` counts received, dropped, duplicated, delayed,
    held and forwarded (copies sent).
    """

    def __init__(
        self,
        endpoint: str,
        source_queue_url: str,
        target_queue_url: str,
        *,
        drop: float = 0.0,
        duplicate: float = 0.0,
        reorder: bool = False,
        max_delay: int = 0,
        seed: int = 0,
        wait_seconds: int = 1,
    ) -> None:
        for name, value in (("drop", drop), ("duplicate", duplicate)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}")
        if not 0 <= max_delay <= _MAX_DELAY:
            raise ValueError(f"max_delay must be within [0, {_MAX_DELAY}], got {max_delay}")
        self.endpoint = endpoint
        self.source_queue_url = source_queue_url
        self.target_queue_url = target_queue_url
        self.drop = drop
        self.duplicate = duplicate
        self.reorder = reorder
        self.max_delay = max_delay
        self.wait_seconds = wait_seconds
        self.stats: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._held: list[MessageTypeDef] = []
        self._session = aioboto3.Session(region_name="us-east-1", **_EMULATOR_CREDENTIALS)

    async def run(
        self, *, burst: bool = False, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Relay until cancelled (or, with `burst`, until a pass finds the source empty).

        Reports started once the SQS client is open.
        """
        async with self._session.client("sqs", endpoint_url=self.endpoint) as sqs:
            task_status.started()
            try:
                while await self.run_once(sqs) or not burst:
                    pass
            finally:
                # A held-back message was already deleted from the source: send it on the
                # way out, so reordering never turns into a silent drop.
                with anyio.move_on_after(_FLUSH_TIMEOUT, shield=True):
                    await self.flush(sqs)

    async def flush(self, sqs: SQSClient) -> None:
        """Send the message held back for reordering, if any."""
        await self._send(sqs, self._take_held())

    async def run_once(self, sqs: SQSClient) -> int:
        """One pass: receive a batch, damage it, forward it, delete it from the source.

        Returns how many messages were received.
        """
        received = await sqs.receive_message(
            QueueUrl=self.source_queue_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=self.wait_seconds,
            MessageAttributeNames=["All"],
        )
        batch = received.get("Messages", [])
        self.stats["received"] += len(batch)
        released = self._take_held()
        outgoing: list[MessageTypeDef] = []
        for message in batch:
            if self._rng.random() < self.drop:
                self.stats["dropped"] += 1
                continue
            outgoing.append(message)
            if self._rng.random() < self.duplicate:
                self.stats["duplicated"] += 1
                outgoing.append(message)
        if self.reorder and outgoing:
            self._rng.shuffle(outgoing)
            self._held.append(outgoing.pop(self._rng.randrange(len(outgoing))))
            self.stats["held"] += 1
        # The message held back last pass goes out after this batch: a real reorder.
        await self._send(sqs, outgoing + released)
        await self._delete(sqs, batch)
        return len(batch)

    def _take_held(self) -> list[MessageTypeDef]:
        """Empty the held-back list and return what it held."""
        held, self._held = self._held, []
        return held

    async def _send(self, sqs: SQSClient, messages: list[MessageTypeDef]) -> None:
        """Send copies to the target in batches of 10, each with its own random delay."""
        entries: list[SendMessageBatchRequestEntryTypeDef] = []
        for index, message in enumerate(messages):
            delay = self._rng.randint(0, self.max_delay) if self.max_delay else 0
            entry: SendMessageBatchRequestEntryTypeDef = {
                "Id": str(index),
                "MessageBody": message["Body"],
                "DelaySeconds": delay,
            }
            if message.get("MessageAttributes"):
                entry["MessageAttributes"] = message["MessageAttributes"]
            entries.append(entry)
            if delay:
                self.stats["delayed"] += 1
        for start in range(0, len(entries), 10):
            result = await sqs.send_message_batch(
                QueueUrl=self.target_queue_url, Entries=entries[start : start + 10]
            )
            if result.get("Failed"):
                raise RuntimeError(f"EventChaos could not forward: {result['Failed']}")
            self.stats["forwarded"] += len(result.get("Successful", []))

    async def _delete(self, sqs: SQSClient, batch: list[MessageTypeDef]) -> None:
        """Delete the handled messages from the source queue."""
        if not batch:
            return
        entries: list[DeleteMessageBatchRequestEntryTypeDef] = [
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(batch)
        ]
        await sqs.delete_message_batch(QueueUrl=self.source_queue_url, Entries=entries)
