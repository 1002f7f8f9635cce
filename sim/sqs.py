"""Simulated SQS standard queues, with the documented semantics the dispatcher relies on.

At-least-once (a message may be stored twice), best-effort order, visibility timeouts, a
new receipt handle per receive (a delete with an older one succeeds and deletes nothing),
long polls that wake on sends and on the earliest time something becomes visible, the
redrive policy's move to the dead-letter queue, and the size limit counted over the body
and the message attributes.
"""

from __future__ import annotations

import itertools
import json
import random
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from botocore.exceptions import ClientError

from sim.calls import CURRENT_CALL, Answer, aws_error, error_code
from sim.history import History
from sim.sqs_model import (
    MAX_VISIBILITY,
    MAX_WAIT,
    QUEUE_ATTRIBUTES,
    SYSTEM_ATTRIBUTES,
    Queue,
    StoredMessage,
    attribute_wanted,
    batch_failure,
    check_batch,
    check_message,
    check_range,
    flat,
    md5,
    message_size,
)
from sim.tokens import TOKEN_ATTRIBUTE


class SQS:
    """Every queue and the SQS operations (receive may wait; the rest are one step)."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        rng: random.Random,
        history: History,
        wall: Callable[[float], float],
        duplicate_rate: float,
        advance: Callable[[], None],
        next_change: Callable[[], float],
        region: str,
        account: str,
    ) -> None:
        self._clock = clock
        self._rng = rng
        self._history = history
        self._wall = wall
        self._duplicate_rate = duplicate_rate
        self.token_duplicate_rate = 0.0  # a task token's request messages stored twice
        self._advance = advance
        self._next_world_change = next_change
        self.region = region
        self.account = account
        self.queues: dict[str, Queue] = {}
        self.deny_send: Callable[[str, str], bool] = lambda _node, _url: False
        """Whether (node, queue URL) may not send (buggify's ``renewals_denied``)."""
        self._by_arn: dict[str, Queue] = {}
        self._handles: dict[str, tuple[Queue, StoredMessage]] = {}
        self._serial = itertools.count(1)

    # -- set-up and deliveries -----------------------------------------------------------

    def create_queue(
        self,
        name: str,
        *,
        visibility_timeout: int,
        maximum_message_size: int,
        dead_letter: str | None,
        max_receive_count: int,
    ) -> str:
        """Create a queue; returns its URL."""
        url = f"https://sqs.{self.region}.amazonaws.com/{self.account}/{name}"
        arn = f"arn:aws:sqs:{self.region}:{self.account}:{name}"
        redrive = None
        if dead_letter is not None:
            if dead_letter not in self.queues:
                raise ValueError(f"dead-letter queue {dead_letter} does not exist yet")
            redrive = (self.queues[dead_letter].arn, max_receive_count)
        queue = Queue(
            name, url, arn, visibility_timeout, maximum_message_size, self._clock(), redrive
        )
        self.queues[url] = queue
        self._by_arn[arn] = queue
        return url

    def store(
        self,
        queue: Queue,
        body: str,
        attributes: Mapping[str, Mapping[str, Any]],
        *,
        sender: str,
        at: float | None = None,
        delay: int = 0,
        message_id: str | None = None,
        twice: bool = False,
    ) -> tuple[str, int]:
        """Store a message (twice, now and then: at-least-once; ``twice``: this one);
        returns (id, copies)."""
        sent = self._clock() if at is None else at
        mid = message_id or str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
        rate = self._duplicate_rate
        if self.token_duplicate_rate and TOKEN_ATTRIBUTE in attributes:
            rate = self.token_duplicate_rate  # sim.token_faults: token messages only
        copies = 2 if self._rng.random() < rate or twice else 1
        for _ in range(copies):
            serial = next(self._serial)
            queue.messages[serial] = StoredMessage(
                serial,
                mid,
                body,
                {k: dict(v) for k, v in attributes.items()},
                sent,
                sent + delay,
                sender,
            )
        queue.signal.notify()
        return mid, copies

    # -- API -----------------------------------------------------------------------------

    def queue(self, url: str, op: str) -> Queue:
        """The queue at ``url`` or AWS's error."""
        queue = self.queues.get(url)
        if queue is None:
            raise aws_error(
                "AWS.SimpleQueueService.NonExistentQueue",
                "The specified queue does not exist.",
                op,
            )
        return queue

    def send_message(
        self,
        node: str,
        url: str,
        body: str,
        attributes: Mapping[str, Mapping[str, Any]] | None,
        delay: int,
    ) -> Answer:
        """SendMessage (AccessDenied when `deny_send` says so: an IAM policy)."""
        queue = self.queue(url, "SendMessage")
        if self.deny_send(node, url):
            raise aws_error(
                "AccessDenied",
                f"User: {node} is not authorized to perform: sqs:SendMessage on resource: {url}",
                "SendMessage",
            )
        attrs = attributes or {}
        check_message(queue, body, attrs, delay, "SendMessage")
        mid, copies = self.store(queue, body, attrs, sender=node, delay=delay)
        self._history.message_sent(
            self._clock(),
            node,
            queue_url=url,
            message_id=mid,
            body=body,
            attributes=flat(attrs),
            copies=copies,
        )
        out: Answer = {"MessageId": mid, "MD5OfMessageBody": md5(body)}
        if attrs:
            out["MD5OfMessageAttributes"] = md5(json.dumps(flat(attrs), sort_keys=True))
        return out

    def send_message_batch(self, node: str, url: str, entries: list[Mapping[str, Any]]) -> Answer:
        """SendMessageBatch: per-entry results."""
        op = "SendMessageBatch"
        queue = self.queue(url, op)
        check_batch(entries, op)
        total = sum(
            message_size(str(e.get("MessageBody", "")), e.get("MessageAttributes") or {})
            for e in entries
        )
        if total > queue.maximum_message_size:
            raise aws_error(
                "AWS.SimpleQueueService.BatchRequestTooLong",
                f"Batch requests cannot be longer than {queue.maximum_message_size} bytes. "
                f"You have sent {total} bytes.",
                op,
            )
        successful: list[Answer] = []
        failed: list[Answer] = []
        for entry in entries:
            try:
                answer = self.send_message(
                    node,
                    url,
                    str(entry.get("MessageBody", "")),
                    entry.get("MessageAttributes"),
                    int(entry.get("DelaySeconds", 0)),
                )
            except ClientError as exc:  # the entry's failure, not the call's
                failed.append(batch_failure(entry["Id"], exc))
                continue
            successful.append({"Id": entry["Id"], **answer})
        return {"Successful": successful, "Failed": failed}

    async def receive_message(
        self,
        node: str,
        url: str,
        max_number: int,
        wait: int,
        *,
        visibility: int | None,
        attribute_names: Iterable[str],
        system_names: Iterable[str],
        deadline: float,
    ) -> Answer:
        """ReceiveMessage: waits up to ``wait`` seconds (not past the client's deadline)."""
        op = "ReceiveMessage"
        queue = self.queue(url, op)
        check_range("MaxNumberOfMessages", max_number, 1, 10, op)
        check_range("WaitTimeSeconds", wait, 0, MAX_WAIT, op)
        if visibility is not None:
            check_range("VisibilityTimeout", visibility, 0, MAX_VISIBILITY, op)
        end = min(self._clock() + wait, deadline)
        while True:
            self._advance()
            taken = self._take(queue, max_number, visibility)
            now = self._clock()
            if taken or now >= end:
                break
            wake = min(end, queue.next_change(now), self._next_world_change())
            await queue.signal.wait(wake - now)
        self._history.messages_received(
            now,
            node,
            url,
            [(m.message_id, m.receive_count) for m in taken],
            call_id=CURRENT_CALL.get(),
        )
        if not taken:
            return {}
        names, system = list(attribute_names), set(system_names)
        return {"Messages": [self._answer(m, names, system) for m in taken]}

    def _take(self, queue: Queue, max_number: int, visibility: int | None) -> list[StoredMessage]:
        now = self._clock()
        candidates = [m for m in queue.messages.values() if m.visible(now)]
        # Best-effort order: the oldest few, shuffled.
        window = candidates[: max_number * 3]
        self._rng.shuffle(window)
        candidates[: len(window)] = window
        taken: list[StoredMessage] = []
        for message in candidates:
            if len(taken) == max_number:
                break
            if queue.redrive is not None and message.receive_count >= queue.redrive[1]:
                self._move(queue, message)
                continue
            message.receive_count += 1
            if message.first_receive_at is None:
                message.first_receive_at = now
            message.received_at = now
            message.hidden_until = now + (
                queue.visibility_timeout if visibility is None else visibility
            )
            message.handle = f"AQEB{self._rng.getrandbits(96):024x}-{message.serial}"
            self._handles[message.handle] = (queue, message)
            taken.append(message)
        return taken

    def _move(self, queue: Queue, message: StoredMessage) -> None:
        """SQS's own move to the dead-letter queue: same id, body and attributes."""
        assert queue.redrive is not None  # noqa: S101 - only queues with a policy move
        target = self._by_arn[queue.redrive[0]]
        message.deleted = True
        del queue.messages[message.serial]
        serial = next(self._serial)
        now = self._clock()
        target.messages[serial] = StoredMessage(
            serial,
            message.message_id,
            message.body,
            message.attributes,
            message.sent_at,
            now,
            message.sender,
        )
        target.signal.notify()
        self._history.message_moved(
            now,
            source_url=queue.url,
            target_url=target.url,
            message_id=message.message_id,
            body=message.body,
            attributes=flat(message.attributes),
        )

    def _answer(self, message: StoredMessage, names: list[str], system: set[str]) -> Answer:
        out: Answer = {
            "MessageId": message.message_id,
            "ReceiptHandle": message.handle,
            "MD5OfBody": md5(message.body),
            "Body": message.body,
        }
        wanted = set(SYSTEM_ATTRIBUTES) if "All" in system else system & set(SYSTEM_ATTRIBUTES)
        if wanted:
            values = {
                "ApproximateReceiveCount": str(message.receive_count),
                "ApproximateFirstReceiveTimestamp": str(
                    int(self._wall(message.first_receive_at or message.sent_at) * 1000)
                ),
                "SentTimestamp": str(int(self._wall(message.sent_at) * 1000)),
                "SenderId": f"AIDASIM{message.sender.upper()}",
            }
            out["Attributes"] = {k: v for k, v in values.items() if k in wanted}
        chosen = {
            name: dict(value)
            for name, value in message.attributes.items()
            if attribute_wanted(name, names)
        }
        if chosen:
            out["MessageAttributes"] = chosen
            out["MD5OfMessageAttributes"] = md5(json.dumps(flat(chosen), sort_keys=True))
        return out

    def _handle(self, queue: Queue, handle: str, op: str) -> StoredMessage:
        found = self._handles.get(handle)
        if found is None or found[0] is not queue:
            raise aws_error(
                "ReceiptHandleIsInvalid",
                f'The input receipt handle "{handle}" is not a valid receipt handle.',
                op,
            )
        return found[1]

    def delete_message(self, node: str, url: str, handle: str, op: str = "DeleteMessage") -> Answer:
        """DeleteMessage: a stale handle succeeds and deletes nothing (AWS documents it)."""
        queue = self.queue(url, op)
        message = self._handle(queue, handle, op)
        effective = not message.deleted and message.handle == handle
        if effective:
            message.deleted = True
            del queue.messages[message.serial]
        self._history.message_deleted(
            self._clock(),
            node,
            queue_url=url,
            message_id=message.message_id,
            deleted=effective,
        )
        return {}

    def delete_message_batch(self, node: str, url: str, entries: list[Mapping[str, Any]]) -> Answer:
        """DeleteMessageBatch: per-entry results."""
        op = "DeleteMessageBatch"
        self.queue(url, op)
        check_batch(entries, op)
        successful: list[Answer] = []
        failed: list[Answer] = []
        for entry in entries:
            try:
                self.delete_message(node, url, str(entry["ReceiptHandle"]), op)
            except ClientError as exc:  # the entry's failure, not the call's
                failed.append(batch_failure(entry["Id"], exc))
                continue
            successful.append({"Id": entry["Id"]})
        return {"Successful": successful, "Failed": failed}

    def change_visibility(
        self, node: str, url: str, handle: str, timeout: int, op: str = "ChangeMessageVisibility"
    ) -> Answer:
        """ChangeMessageVisibility: only the latest handle of a message in flight."""
        queue = self.queue(url, op)
        message = self._handle(queue, handle, op)
        now = self._clock()
        result = "ok"
        try:
            check_range("VisibilityTimeout", timeout, 0, MAX_VISIBILITY, op)
            if message.deleted or message.handle != handle:
                raise aws_error(
                    "InvalidParameterValue",
                    f"Value {handle} for parameter ReceiptHandle is invalid. Reason: Message "
                    "does not exist or is not available for visibility timeout change.",
                    op,
                )
            if message.hidden_until <= now:
                raise aws_error(
                    "AWS.SimpleQueueService.MessageNotInflight",
                    "The message referred to isn't in flight.",
                    op,
                )
            if now + timeout > message.received_at + MAX_VISIBILITY:
                # At most 12 hours in flight from the receive; no silent shortening.
                raise aws_error(
                    "InvalidParameterValue",
                    f"Value {timeout} for parameter VisibilityTimeout is invalid. Reason: "
                    f"Total VisibilityTimeout for the message is beyond the limit "
                    f"[{MAX_VISIBILITY} seconds]",
                    op,
                )
        except ClientError as exc:
            result = error_code(exc)
            raise
        else:
            message.hidden_until = now + timeout
            queue.signal.notify()
        finally:
            self._history.visibility_changed(
                now,
                node,
                queue_url=url,
                message_id=message.message_id,
                timeout=timeout,
                result=result,
            )
        return {}

    def change_visibility_batch(
        self, node: str, url: str, entries: list[Mapping[str, Any]]
    ) -> Answer:
        """ChangeMessageVisibilityBatch: per-entry results."""
        op = "ChangeMessageVisibilityBatch"
        self.queue(url, op)
        check_batch(entries, op)
        successful: list[Answer] = []
        failed: list[Answer] = []
        for entry in entries:
            try:
                self.change_visibility(
                    node,
                    url,
                    str(entry["ReceiptHandle"]),
                    int(entry.get("VisibilityTimeout", 0)),
                    op,
                )
            except ClientError as exc:  # the entry's failure, not the call's
                failed.append(batch_failure(entry["Id"], exc))
                continue
            successful.append({"Id": entry["Id"]})
        return {"Successful": successful, "Failed": failed}

    def get_queue_attributes(self, url: str, names: Iterable[str]) -> Answer:
        """GetQueueAttributes."""
        op = "GetQueueAttributes"
        queue = self.queue(url, op)
        wanted = list(names)
        for name in wanted:
            if name != "All" and name not in QUEUE_ATTRIBUTES:
                raise aws_error(
                    "InvalidAttributeName", f"Unknown Attribute {name}.", "GetQueueAttributes"
                )
        values = queue.attributes(self._clock(), self._wall)
        if "All" in wanted:
            return {"Attributes": values}
        chosen = {name: values[name] for name in wanted if name in values}
        return {"Attributes": chosen} if chosen else {}
