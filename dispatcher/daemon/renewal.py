"""Renewing a request on its last receive: a fresh copy on its own queue, then the original
deleted.

A request received for the queue's ``maxReceiveCount``-th time that the dispatcher cannot
finish now (it goes back: no room, shutting down, its start in doubt, its parent not
answered) must not be handed back nor left to lapse: SQS's redrive policy would move it to
the dead-letter queue on its next receive, without a reason. Kept hidden instead, it
depends on every visibility extension arriving in time, which no process can promise (a
pause, a partition, a call held on the wire). So it is renewed: a copy is sent to the same
queue - its body verbatim, the request's own attributes, and its identity
(``dispatcher-request-id``, the base of its execution name) and this message's id
(``dispatcher-original-message-id``) - and only once that send succeeded is the original
deleted. The copy is a new message (received zero times), and it maps to the same
execution name: it cannot start the request a second time, and it finds an execution an
earlier attempt started (invariant 4). A send that fails, or whose answer does not come,
deletes nothing: the caller keeps the original as before (`LastReceives`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import anyio
import structlog

from dispatcher.aws.api import AWS_ERRORS, error_code, outcome_unknown
from dispatcher.core.requests import (
    ORIGINAL_ID_ATTRIBUTE,
    OUR_PREFIX,
    REQUEST_ID_ATTRIBUTE,
    request_identity,
)
from dispatcher.daemon.queues import RequestQueue

log = structlog.get_logger("dispatcher.intake")

MAX_ATTRIBUTES = 10  # SQS: message attributes per message
MAX_DELAY = 900  # SQS: DelaySeconds, at most
CALL_SECONDS = 8.0
"""Seconds a renewal's send (or one of its deletes) may take before it counts as failed."""
DELETE_PAUSE = 4.0
"""Seconds between two tries of the original's delete, at most (0.5 s, then doubling)."""


def renewal_attributes(message: Mapping[str, Any]) -> dict[str, Any] | None:
    """The copy's message attributes: the request's own (not an earlier ``dispatcher-*``
    one), its identity and this message's id; None when the request has no valid identity
    or SQS's ten attributes leave no room for it (the copy would be another request)."""
    identity, _ = request_identity(message)
    if identity is None:
        return None
    attributes = {
        name: value
        for name, value in (message.get("MessageAttributes") or {}).items()
        if not name.startswith(OUR_PREFIX)
    }
    attributes[REQUEST_ID_ATTRIBUTE] = {"DataType": "String", "StringValue": identity}
    if len(attributes) > MAX_ATTRIBUTES:
        return None
    if len(attributes) < MAX_ATTRIBUTES:
        original = str(message["MessageId"])
        attributes[ORIGINAL_ID_ATTRIBUTE] = {"DataType": "String", "StringValue": original}
    return attributes


def handle_left(hidden_since: float, now: float, visibility: float) -> float:
    """How long a renewal may go on trying to delete a message hidden since
    ``hidden_since`` (received or last extended then, for ``visibility`` seconds): while
    its receipt handle surely works, and at least half the visibility timeout (the
    dispatcher's ``hidden_since`` is a lower bound: SQS may hide it longer, and a delete
    once the handle lapsed is refused, or applied while nobody received it again -
    harmless either way)."""
    return max(visibility / 2, hidden_since + visibility - now - 1.0)


async def renew(
    queue: RequestQueue,
    message: Mapping[str, Any],
    delay: float,
    bound: Any,
    why: str,
    *,
    delete_within: float,
    maybe_sent: Callable[[], None] | None = None,
) -> bool:
    """Send a copy of ``message`` to its own queue, visible in ``delay`` seconds (at most
    SQS's 15 minutes), then delete the original (tried again while it fails). Returns
    whether the copy was sent; False: the original is still the caller's - and a copy may
    exist all the same when the send got no answer or one that says nothing (a 5xx, a
    reset): then ``maybe_sent`` is called."""
    attributes = renewal_attributes(message)
    if attributes is None:
        bound.warning("dispatcher.renewal_impossible", why="no room for the request's identity")
        return False
    sent: Mapping[str, Any] | None = None
    with anyio.move_on_after(CALL_SECONDS):
        try:
            sent = await queue.sqs.send_message(
                QueueUrl=queue.url,
                MessageBody=str(message.get("Body") or ""),
                MessageAttributes=attributes,
                DelaySeconds=max(0, min(MAX_DELAY, int(delay))),
            )
        except AWS_ERRORS as exc:
            bound.warning("dispatcher.renewal_failed", error=error_code(exc) or str(exc))
            if maybe_sent is not None and outcome_unknown(exc):
                maybe_sent()
            return False
    if sent is None:
        bound.warning("dispatcher.renewal_failed", error="no answer")
        if maybe_sent is not None:
            maybe_sent()
        return False
    bound.info(
        "dispatcher.request_renewed", why=why, copy_id=sent.get("MessageId"), visible_in=delay
    )
    await _delete_original(queue, str(message["ReceiptHandle"]), bound, delete_within)
    return True


async def _delete_original(queue: RequestQueue, handle: str, bound: Any, within: float) -> None:
    """Delete the renewed original, tried again while it fails, for ``within`` seconds
    (the caller's share of the original's visibility: its handle works until then). Left,
    the original would come back and be moved without a reason; its copy carries the
    request on either way. A burst of failures (throttling, a few lost calls in a row) is
    outlasted: four tries within seconds once were not. A try whose answer does not come
    does not hold up the next (each is bounded by `CALL_SECONDS`, and a delete is
    idempotent): waiting for each in turn, a storm of slow calls left four tries in 30 s,
    all lost, and the original was moved (the simulation's seed 956)."""
    deadline = anyio.current_time() + within
    done = anyio.Event()
    attempts = 0
    async with anyio.create_task_group() as tries:

        async def one_try() -> None:
            left = deadline - anyio.current_time()
            with anyio.move_on_after(max(1.0, min(CALL_SECONDS, left))):
                try:
                    await queue.sqs.delete_message(QueueUrl=queue.url, ReceiptHandle=handle)
                except AWS_ERRORS as exc:
                    bound.warning("dispatcher.delete_failed", error=str(exc), renewed=True)
                    if error_code(exc) != "ReceiptHandleIsInvalid":
                        return
                done.set()
                tries.cancel_scope.cancel()  # the other tries, and no more

        while attempts == 0 or deadline - anyio.current_time() > 0:
            tries.start_soon(one_try)
            attempts += 1
            left = deadline - anyio.current_time()
            await anyio.sleep(min(DELETE_PAUSE, 0.5 * 2**attempts, max(0.0, left)))
    if done.is_set():
        return
    bound.error(
        "dispatcher.renewed_original_not_deleted",
        attempts=attempts,
        advice="its copy carries the request; the original comes back and the queue's "
        "redrive policy may move it: that dead letter needs no redrive",
    )
