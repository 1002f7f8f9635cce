"""A request's copies, and the checker's rules about them (see `sim.checker` for the rest).

A request travels as more than one message: the producer's (and its retries), the
dispatcher's dead-letter copy, a copy ``sfn-dispatcher redrive`` sends back, a copy SQS's
move task sends back (every attribute kept, a new message id), a copy of that copy. The
lineage (`copies`) finds each copy's request from the history alone: the
``dispatcher-original-message-id`` a copy carries when it names a known message, else its
body when exactly one request has that body. The checker counts a copy's message id as a
name of its request's execution, and an envelope input's ``body`` as its input
(``duplicate_execution``: never two executions for one request, whichever copy started
them).

9. ``dead_letter_ran``: a request is dead-lettered only if its execution never ran (none
   existed when the copy was sent, nor came to exist within ``CheckSpec.late_start`` after,
   from a start sent before: the network's record of each attempt says when it left); if
   it did run, the dead letter says so (its detail names the execution) and nothing in it
   invites a redrive.
   ``false_conflict``: a request dead-lettered as ``idempotency_conflict`` although the
   execution under its name runs this very request's body (a producer's retry, a redrive:
   the same request, not a conflict).
   ``dead_letter_held_copy``: nor while the process that dead-letters it holds another
   copy of it that it then starts: an execution of the request that began after the dead
   letter, attempted by the process that sent it with no copy of the request received by
   that process between the dead letter and that attempt (so the copy it started from was
   in its hands, waiting or being started, when it wrote that the execution does not
   exist).

10. ``dead_letter_unrenewed``: a request on its last receive is renewed (a copy of it sent
   to its queue, docs/requests.md "The last receive"), and dead-lettered as
   ``receive_limit`` only once that was tried: a ``receive_limit`` dead letter of a message
   comes after a send of a copy of that message to a queue other than the dead-letter queue
   (whatever its outcome: SQS may refuse it, or its answer may be lost). A message with
   9 attributes of its own or more is not judged: its copy has no room to name it.

A *fresh* copy (`fresh_identities`) is the documented limit of request identity (docs/requests.md,
"Request identity"): SQS's move task's copy of a message the redrive policy moved carries
nothing that names the request it came from (no ``dispatcher-request-id``, no original
message id), so without an idempotency key it is a new request under its new message id.
Executions named after a fresh copy (and dead letters of it) are judged as that new
request's: never two under one identity, none beside a dead letter of it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from sim.history import (
    ORIGINAL_ID_ATTRIBUTE,
    OUTSIDE,
    REASON_ATTRIBUTE,
    Execution,
    History,
    RequestMessage,
    key_tag_of,
)
from sim.move_task import NODE as MOVE_TASK
from sim.violation import Violation

if TYPE_CHECKING:
    from sim.checker import CheckSpec

DETAIL_ATTRIBUTE = "dispatcher-detail"
REQUEST_ID_ATTRIBUTE = "dispatcher-request-id"
IDEMPOTENCY_ATTRIBUTE = "idempotency-key"
_NAMING = (REQUEST_ID_ATTRIBUTE, ORIGINAL_ID_ATTRIBUTE, IDEMPOTENCY_ATTRIBUTE)
CONFLICT = "idempotency_conflict"
EXPIRED = "expired"
_INVITES = re.compile(r"\bredrive\b", re.IGNORECASE)
_WARNS = re.compile(r"\b(not|never|don't|do not)\b[^.;]{0,40}\bredrive", re.IGNORECASE)


def canonical(text: str) -> str | None:
    """JSON text in one canonical form (None: not JSON)."""
    try:
        return json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    except (ValueError, RecursionError):
        return None


def work_inputs(text: str) -> Iterator[str]:
    """The canonical forms an execution input stands for: itself, and for an envelope
    (``{"body": ...}``) its body too."""
    whole = canonical(text)
    if whole is None:
        return
    yield whole
    parsed = json.loads(text)
    if isinstance(parsed, dict) and isinstance(parsed.get("body"), str):
        body = canonical(parsed["body"])
        if body is not None:
            yield body


def copies(history: History) -> list[RequestMessage]:
    """Every copy of a request the history shows (not the producers' messages), as a
    message of its request, in time order."""
    request_of: dict[str, str] = {m.message_id: m.request_id for m in history.requests}
    bodies: dict[str, set[str]] = {}
    for message in history.requests:
        bodies.setdefault(message.body, set()).add(message.request_id)
    found: list[RequestMessage] = []
    for sent in sorted(history.sends, key=lambda s: s.time):
        if sent.message_id in request_of:
            continue
        original = sent.attributes.get(ORIGINAL_ID_ATTRIBUTE)
        request_id = request_of.get(original) if original is not None else None
        if request_id is None:
            owners = bodies.get(sent.body, set())
            if len(owners) != 1:
                continue
            [request_id] = owners
        request_of[sent.message_id] = request_id
        found.append(
            RequestMessage(
                request_id,
                sent.message_id,
                sent.queue_url,
                sent.body,
                sent.attributes,
                sent.time,
                sent.node,
            )
        )
    return found


def renewals(history: History, request_queues: frozenset[str] | set[str]) -> dict[str, float]:
    """Message id -> when a copy naming it (``dispatcher-original-message-id``) was first
    sent to a request queue: a dispatcher renewed the request on its last receive (its
    copy carries it on; the original may be deleted from then on)."""
    found: dict[str, float] = {}
    for sent in history.sends:
        original = sent.attributes.get(ORIGINAL_ID_ATTRIBUTE)
        if original is not None and sent.queue_url in request_queues:
            found[original] = min(sent.time, found.get(original, math.inf))
    return found


def fresh_identities(found: list[RequestMessage]) -> set[str]:
    """Message ids of the fresh copies among ``found`` (`copies`): sent by SQS's move task
    without any attribute that names a request (what the redrive policy moved), so a new
    request by the documented identity rules."""
    return {
        c.message_id
        for c in found
        if c.node == MOVE_TASK and not any(a in c.attributes for a in _NAMING)
    }


def identity_of(execution_name: str) -> str:
    """An execution's name without a pool's key tag: the identity it was named after."""
    return (
        execution_name.split("_", 1)[1]
        if key_tag_of(execution_name) is not None
        else execution_name
    )


def check_dead_letters(
    history: History,
    spec: CheckSpec,
    executions: Mapping[str, list[Execution]],
    request_of: Mapping[str, str],
    fresh: frozenset[str] | set[str] = frozenset(),
) -> list[Violation]:
    """Rule 9. ``executions``: request id -> its executions; ``request_of``: message id
    (producers' and copies') -> request id; ``fresh``: `fresh_identities`."""
    found: list[Violation] = []
    attempts: dict[str, list[float]] = {}  # execution name -> when its starts were sent
    for record in history.records:
        if record.kind == "start_sent":
            attempts.setdefault(str(record.details.get("name")), []).append(record.time)
    for sent in history.dead_letter_copies(spec.dead_letter_queue):
        request_id = request_of.get(sent.message_id) or request_of.get(
            sent.attributes.get(ORIGINAL_ID_ATTRIBUTE, "")
        )
        if request_id is None:
            continue
        reason = sent.attributes.get(REASON_ATTRIBUTE, "")
        detail = sent.attributes.get(DETAIL_ATTRIBUTE, "")
        named = sent.attributes.get(REQUEST_ID_ATTRIBUTE) or sent.attributes.get(
            ORIGINAL_ID_ATTRIBUTE, ""
        )
        lineage = named if named in fresh else None  # a fresh copy's: a request of its own
        ran = [
            e
            for e in executions.get(request_id, [])
            if e.started_by != OUTSIDE
            and e.first_start <= sent.time + spec.late_start
            # Applied after the copy: only from a start sent before it (not a later copy's,
            # e.g. a redrive of an expired request, which runs it).
            and (e.first_start <= sent.time or min(attempts.get(e.name, [0.0])) <= sent.time)
            and (identity_of(e.name) == lineage if lineage else identity_of(e.name) not in fresh)
        ]
        if not ran:
            continue
        execution = ran[0]
        if reason == CONFLICT:
            body = canonical(sent.body)
            if body is not None and body in set(work_inputs(execution.input)):
                found.append(
                    Violation(
                        "false_conflict",
                        sent.time,
                        f"request {request_id} dead-lettered as {CONFLICT}, but execution "
                        f"{execution.name} runs this very request's body",
                    )
                )
            continue
        says_so = execution.name in detail
        invites = bool(_INVITES.search(detail)) and not _WARNS.search(detail)
        if says_so and not invites:
            continue
        why = "its detail invites a redrive" if says_so else "its detail does not say so"
        found.append(
            Violation(
                "dead_letter_ran",
                sent.time,
                f"request {request_id} dead-lettered ({reason}) although its execution "
                f"{execution.name} ran from {execution.first_start:.3f}: {why}",
            )
        )
    return found


def check_held_copies(
    history: History,
    spec: CheckSpec,
    executions: Mapping[str, list[Execution]],
    request_of: Mapping[str, str],
) -> list[Violation]:
    """Rule 9's ``dead_letter_held_copy``: a dead letter that says the execution never ran
    (it does not name it, or invites a redrive) while the process that sent it held another
    copy of the request, which it started afterwards. ``executions``: request id -> its
    executions; ``request_of``: message id (producers' and copies') -> request id."""
    found: list[Violation] = []
    attempts: dict[str, list[tuple[float, str]]] = {}  # name -> (when, node) of each attempt
    for record in history.records:
        if record.kind == "start_sent":
            attempts.setdefault(str(record.details.get("name")), []).append(
                (record.time, record.node)
            )
    receives: dict[str, list[tuple[float, str]]] = {}  # request id -> (when, node)
    for receive in history.receives:
        for message_id, _count in receive.messages:
            request_id = request_of.get(message_id)
            if request_id is not None:
                receives.setdefault(request_id, []).append((receive.time, receive.node))
    for sent in history.dead_letter_copies(spec.dead_letter_queue):
        request_id = request_of.get(sent.message_id) or request_of.get(
            sent.attributes.get(ORIGINAL_ID_ATTRIBUTE, "")
        )
        # Not ``expired`` either: it judges that copy's own start-by, and a producer's
        # retry with a later one (or none) may start once it passed (a start after a
        # copy's deadline is ``start_after_deadline``'s).
        if request_id is None or sent.attributes.get(REASON_ATTRIBUTE) in (CONFLICT, EXPIRED):
            continue
        detail = sent.attributes.get(DETAIL_ATTRIBUTE, "")
        for execution in executions.get(request_id, []):
            if execution.started_by == OUTSIDE or execution.first_start <= sent.time:
                continue  # (one that ran before the dead letter: rule 9's)
            mine = sorted(
                when
                for when, node in attempts.get(execution.name, [])
                if node == sent.node and when > sent.time
            )
            if not mine:
                continue
            first = mine[0]  # its first attempt after the dead letter, by its sender
            if any(
                sent.time < when <= first and node == sent.node
                for when, node in receives.get(request_id, [])
            ):
                continue  # a copy received after the dead letter: not held then
            if execution.name in detail and not (
                _INVITES.search(detail) and not _WARNS.search(detail)
            ):
                continue
            found.append(
                Violation(
                    "dead_letter_held_copy",
                    sent.time,
                    f"request {request_id} dead-lettered by {sent.node} while it held another "
                    f"copy of it, which it started as {execution.name} at {first:.3f}",
                )
            )
            break
    return found


RECEIVE_LIMIT = "receive_limit"
OURS = "dispatcher-"
NO_ROOM = 9  # attributes of its own: its copy's identity fills SQS's 10, no original id


def check_renewed_first(history: History, spec: CheckSpec) -> list[Violation]:
    """Rule 10 (``dead_letter_unrenewed``)."""
    tried: dict[str, float] = {}  # original message id -> its first copy's send
    for record in history.records:
        if record.kind == "copy_sent" and record.details.get("queue") != spec.dead_letter_queue:
            tried.setdefault(str(record.details.get("original")), record.time)
    own: dict[str, int] = {}  # message id -> how many attributes of its own it carries
    carried: list[tuple[str, Mapping[str, str]]] = [
        (m.message_id, m.attributes) for m in history.requests
    ] + [(m.message_id, m.attributes) for m in history.sends]
    for message_id, attributes in carried:
        own[message_id] = len([a for a in attributes if not a.startswith(OURS)])
    found: list[Violation] = []
    for sent in history.dead_letter_copies(spec.dead_letter_queue):
        if sent.attributes.get(REASON_ATTRIBUTE) != RECEIVE_LIMIT:
            continue
        original = sent.attributes.get(ORIGINAL_ID_ATTRIBUTE, "")
        if tried.get(original, math.inf) <= sent.time or own.get(original, 0) >= NO_ROOM:
            continue
        found.append(
            Violation(
                "dead_letter_unrenewed",
                sent.time,
                f"message {original} dead-lettered as {RECEIVE_LIMIT} by {sent.node} with no "
                "copy of it tried first (a request on its last receive is renewed)",
            )
        )
    return found
