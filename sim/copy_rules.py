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
   from a start sent before); if it did run, the dead letter says so (its detail names the
   execution) and nothing in it invites a redrive.
   ``false_conflict``: a request dead-lettered as ``idempotency_conflict`` although the
   execution under its name runs this very request's body (a producer's retry, a redrive:
   the same request, not a conflict).
"""

from __future__ import annotations

import json
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
)
from sim.violation import Violation

if TYPE_CHECKING:
    from sim.checker import CheckSpec

DETAIL_ATTRIBUTE = "dispatcher-detail"
CONFLICT = "idempotency_conflict"
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


def check_dead_letters(
    history: History,
    spec: CheckSpec,
    executions: Mapping[str, list[Execution]],
    request_of: Mapping[str, str],
) -> list[Violation]:
    """Rule 9. ``executions``: request id -> its executions; ``request_of``: message id
    (producers' and copies') -> request id."""
    found: list[Violation] = []
    for sent in history.dead_letter_copies(spec.dead_letter_queue):
        request_id = request_of.get(sent.message_id) or request_of.get(
            sent.attributes.get(ORIGINAL_ID_ATTRIBUTE, "")
        )
        if request_id is None:
            continue
        reason = sent.attributes.get(REASON_ATTRIBUTE, "")
        detail = sent.attributes.get(DETAIL_ATTRIBUTE, "")
        ran = [
            e
            for e in executions.get(request_id, [])
            if e.started_by != OUTSIDE and e.first_start <= sent.time + spec.late_start
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
