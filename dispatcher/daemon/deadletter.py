"""Dead-lettering a bad request: a copy with the reason on the dead-letter queue, sized to fit.

SQS counts a message's body and each message attribute (name, data type and value)
against the queue's ``MaximumMessageSize``, and refuses a message over it. A request may
already be close to that size, so what the dispatcher adds to the copy is fitted to the
room the body leaves: the reason, the request's identity and the original message id first
(all short), then the request's own attributes, each whole, then as much of the detail as
still fits. The identity (``dispatcher-request-id``: the base of the execution name) makes
every later copy - a redrive, SQS's own move task - map to the same execution. The body
itself is never changed. A copy that could not be sent is retried when the request comes
back; on the request's last receive (the queue's ``maxReceiveCount``) it is kept hidden and
the send tried again at once (for `LAST_RECEIVE_RETRY_SECONDS`), as handed back, the redrive
policy would move it without its reason; so is the delete of the request once its copy
was sent (left, it would come back and be moved a second time, without the reason).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from dispatcher.core.requests import (
    ORIGINAL_ID_ATTRIBUTE,
    OUR_PREFIX,
    REQUEST_ID_ATTRIBUTE,
    request_identity,
)
from dispatcher.daemon.metrics import Metrics
from dispatcher.daemon.queues import RequestQueue

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient

log = structlog.get_logger("dispatcher.intake")

__all__ = [
    "DEFAULT_MAX_SIZE",
    "DETAIL_ATTRIBUTE",
    "ORIGINAL_ID_ATTRIBUTE",
    "OURS",
    "REASON_ATTRIBUTE",
    "REQUEST_ID_ATTRIBUTE",
    "DeadLetterQueue",
    "attribute_size",
    "body_of",
    "fitted_attributes",
    "message_size",
]

REASON_ATTRIBUTE = "dispatcher-reason"
DETAIL_ATTRIBUTE = "dispatcher-detail"
OURS = frozenset({REASON_ATTRIBUTE, DETAIL_ATTRIBUTE, ORIGINAL_ID_ATTRIBUTE, REQUEST_ID_ATTRIBUTE})

DEFAULT_MAX_SIZE = 262_144
"""Assumed when the dead-letter queue's ``MaximumMessageSize`` is unknown: the smallest
default SQS has had (256 KiB; queues made since 2025 default to 1 MiB)."""
MAX_ATTRIBUTES = 10  # SQS: message attributes per message
DETAIL_CHARS = 1_000
LAST_RECEIVE_RETRY_SECONDS = 300.0
"""How long a dead-letter send that fails on a request's last receive is tried again,
the request kept hidden meanwhile (handed back, the redrive policy would move it without
its reason)."""
LAST_RECEIVE_DELETE_SECONDS = 60.0
"""How long the delete of a request on its last receive whose copy was sent may go on
once the process stops."""
LAST_RECEIVE_CALL_SECONDS = 8.0
"""Seconds one try of a last-receive delete (or the extension between tries) may take."""
LAST_RECEIVE_MAX_PAUSE = 5.0
"""Seconds between those tries, at most: each also extends the request's visibility, so
the tries stay frequent while SQS refuses them (a throttling storm once refused the delete
and the extension for 40 s; with 30 s between tries, the request lapsed between two)."""
LAST_RECEIVE_HIDDEN_MARGIN = 30  # seconds the request stays hidden beyond the next try


def attribute_size(name: str, value: Mapping[str, Any]) -> int:
    """Bytes SQS counts for one message attribute: its name, data type and value."""
    size = len(name.encode()) + len(str(value.get("DataType", "")).encode())
    if "StringValue" in value:
        size += len(str(value["StringValue"]).encode())
    if "BinaryValue" in value:
        raw = value["BinaryValue"]
        size += len(raw) if isinstance(raw, bytes | bytearray) else len(str(raw).encode())
    return size


def message_size(body: str, attributes: Mapping[str, Mapping[str, Any]]) -> int:
    """Bytes SQS counts against ``MaximumMessageSize``: the body and every attribute."""
    return len(body.encode()) + sum(attribute_size(n, v) for n, v in attributes.items())


def body_of(message: Mapping[str, Any]) -> str:
    """The copy's body: the request's, verbatim (SQS refuses an empty one)."""
    return str(message.get("Body") or "(empty)")


def fitted_attributes(
    message: Mapping[str, Any], reason: str, detail: str, max_size: int
) -> dict[str, Any]:
    """The message attributes of the dead-letter copy of ``message`` that fit, with its
    body, in ``max_size`` bytes (at most ten): the reason, the request's identity (when
    it has a valid one), the original message id, the request's own attributes (never an
    earlier ``dispatcher-*`` one) while they fit, then the detail cut to the room left (up to
    1,000 characters). A body over ``max_size`` by itself shows the limit is not what we
    think (a queue delivered that body): then nothing is left out and SQS decides.
    """
    room = max_size - len(body_of(message).encode())
    if room < 0:
        room = 1 << 62
    fitted: dict[str, Any] = {}

    def add(name: str, value: dict[str, Any]) -> None:
        nonlocal room
        size = attribute_size(name, value)
        if size <= room and len(fitted) < MAX_ATTRIBUTES:
            fitted[name] = value
            room -= size

    add(REASON_ATTRIBUTE, _string(reason))
    identity, _ = request_identity(message)
    if identity is not None:
        add(REQUEST_ID_ATTRIBUTE, _string(identity))
    add(ORIGINAL_ID_ATTRIBUTE, _string(str(message["MessageId"])))
    for name, value in (message.get("MessageAttributes") or {}).items():
        if not name.startswith(OUR_PREFIX) and len(fitted) < MAX_ATTRIBUTES - 1:  # detail
            add(name, value)
    left = room - attribute_size(DETAIL_ATTRIBUTE, _string(""))
    cut = detail[:DETAIL_CHARS].encode()[: max(0, left)].decode("utf-8", "ignore")
    if cut:
        add(DETAIL_ATTRIBUTE, _string(cut))
    return fitted


def _string(value: str) -> dict[str, Any]:
    return {"DataType": "String", "StringValue": value}


@dataclass
class _Tries:
    """Where the tries of a delete on a last receive stand (a stop may cut them mid-way)."""

    waited: float = 0.0
    failures: int = 0
    next_at: float | None = None  # (anyio's clock) the next try, while pausing before it


class DeadLetterQueue:
    """Where bad requests go: copied with their reason to the dead-letter queue and then
    deleted; without one, back to their queue at once for its redrive policy to move."""

    def __init__(
        self, sqs: SQSClient, url: str | None, metrics: Metrics, max_size: int = DEFAULT_MAX_SIZE
    ) -> None:
        self.sqs = sqs
        self.url = url
        self.metrics = metrics
        self.max_size = max_size  # the dead-letter queue's MaximumMessageSize
        self.abandoned = False  # a forced stop: nothing goes on through it
        self._through_stop: set[anyio.CancelScope] = set()  # deletes going on through a stop

    def abandon(self) -> None:
        """A forced stop: the deletes going on through a stop are given up now."""
        self.abandoned = True
        for scope in list(self._through_stop):
            scope.cancel()

    async def move(
        self, queue: RequestQueue, pool: str, message: dict[str, Any], reason: str, detail: str
    ) -> None:
        """Dead-letter one request received on ``queue``; a failed send keeps the request."""
        bound = log.bind(message_id=message.get("MessageId"), pool=pool)
        self.metrics.dead_letters.labels(pool=pool, reason=reason).inc()
        self.metrics.starts.labels(pool=pool, outcome="dead_lettered").inc()
        bound.warning("dispatcher.request_dead_lettered", reason=reason, detail=detail[:500])
        handle = str(message["ReceiptHandle"])
        if self.url is None:
            # The queue's redrive policy moves it after maxReceiveCount receives.
            await queue.hand_back(handle, 0, bound, f"bad request ({reason}); redrive policy")
            return
        attributes = fitted_attributes(message, reason, detail, self.max_size)
        last = queue.is_last_receive(message)
        waited, failures = 0.0, 0
        while True:
            try:
                await self.sqs.send_message(
                    QueueUrl=self.url, MessageBody=body_of(message), MessageAttributes=attributes
                )
                break
            except Exception as exc:  # noqa: BLE001 - keep the request; it will come back
                bound.error("dispatcher.dead_letter_failed", error=str(exc), last_receive=last)
                if not last:
                    await queue.hand_back(handle, 30, bound, "dead-letter queue unavailable")
                    return
            # Its last receive: handed back, SQS's redrive policy would move it without a
            # reason. Kept hidden, the send is tried again (a while: then it is let go).
            if waited >= LAST_RECEIVE_RETRY_SECONDS:
                bound.error(
                    "dispatcher.dead_letter_given_up",
                    advice="the queue's redrive policy moves it without a reason",
                )
                return
            failures += 1
            pause = min(LAST_RECEIVE_MAX_PAUSE, 2.0**failures)
            await queue.set_visibility([handle], int(pause) + LAST_RECEIVE_HIDDEN_MARGIN)
            await anyio.sleep(pause)
            waited += pause
        if last:
            await self.delete_last(queue, handle, bound)
        else:
            await queue.delete(handle, bound)

    async def delete_last(self, queue: RequestQueue, handle: str, bound: Any) -> None:
        """Delete a request on its last receive whose copy was sent: tried again, the
        request kept hidden meanwhile, as its send is - even while the process stops
        (for `LAST_RECEIVE_DELETE_SECONDS` at most): cut short by a stop (the lease lost
        in a throttling storm), the request lapsed and the redrive policy moved it a second
        time, without its reason. Not once the stop is forced (`abandon`); without a stop,
        tried as long as its send is."""
        tries = _Tries()
        try:
            await self._delete_last_tries(queue, handle, bound, tries)
        except anyio.get_cancelled_exc_class():
            if not self.abandoned:
                with (
                    anyio.CancelScope(shield=True) as scope,
                    anyio.move_on_after(LAST_RECEIVE_DELETE_SECONDS),
                ):
                    self._through_stop.add(scope)
                    try:  # where the stop cut them: the pause under way, then the next try
                        await self._delete_last_tries(queue, handle, bound, tries)
                    finally:
                        self._through_stop.discard(scope)
            raise

    async def _delete_last_tries(
        self, queue: RequestQueue, handle: str, bound: Any, tries: _Tries
    ) -> None:
        while True:
            if tries.next_at is not None:
                await anyio.sleep(max(0.0, tries.next_at - anyio.current_time()))
                tries.next_at = None
            # Bounded: a call held on the wire (its answer lost) would wait for the client's
            # read timeout, over a minute, while the message's hidden time runs out.
            with anyio.move_on_after(LAST_RECEIVE_CALL_SECONDS):
                try:
                    await self.sqs.delete_message(QueueUrl=queue.url, ReceiptHandle=handle)
                except Exception as exc:  # noqa: BLE001 - kept hidden, tried again
                    bound.warning("dispatcher.delete_failed", error=str(exc), last_receive=True)
                else:
                    return
            if tries.waited >= LAST_RECEIVE_RETRY_SECONDS:
                return
            tries.failures += 1
            pause = min(LAST_RECEIVE_MAX_PAUSE, 2.0**tries.failures)
            with anyio.move_on_after(LAST_RECEIVE_CALL_SECONDS):
                await queue.set_visibility([handle], int(pause) + LAST_RECEIVE_HIDDEN_MARGIN)
            tries.next_at = anyio.current_time() + pause
            tries.waited += pause
