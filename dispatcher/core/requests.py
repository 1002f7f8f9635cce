"""Turn an SQS request message into a start request, or say exactly why it is bad.

Pure functions, no I/O. The execution name is derived deterministically from the
request (invariant 4), from its *identity*: the ``dispatcher-request-id`` attribute when
present (the dispatcher writes it on every copy it makes: a dead letter, a redrive), else
the ``idempotency-key`` attribute, else the SQS message id. A redelivered message, and
every copy of a request made by the dispatcher, ``redrive`` or SQS's own move task, maps
to the same execution; a producer's retry does only when it carries an idempotency key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dispatcher.core.deadline import INVALID_START_BY, START_BY_ATTRIBUTE, start_by_of
from dispatcher.settings.config import InputFormat

IDEMPOTENCY_ATTRIBUTE = "idempotency-key"
REQUEST_ID_ATTRIBUTE = "dispatcher-request-id"
"""The request's identity, written on every copy of it (dead letter, redrive): the base of
its execution name. Named like the dispatcher's other attributes, but kept by redrive."""
ORIGINAL_ID_ATTRIBUTE = "dispatcher-original-message-id"
"""The message id of the request a dead letter copies (dead letters written before the
request id existed carry only this)."""
OUR_PREFIX = "dispatcher-"
"""Attributes the dispatcher writes on copies (dead letters); never part of an input."""
PARENT_ATTRIBUTE = "parent-execution"
"""Optional: the ARN of the parent workflow that asked (logged with the child's ARN)."""
KEY_TAG_RE = re.compile(r"^k(?P<tag>[0-9a-f]{10})_")
KEY_TAG_LENGTH = 12  # "k" + 10 hex digits + "_"
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,80}\Z")
MAX_INPUT_BYTES = 256 * 1024  # the Step Functions input limit


@dataclass(frozen=True, slots=True)
class StartRequest:
    """A valid request: start execution ``name`` with ``input``."""

    message_id: str
    receipt_handle: str
    name: str
    input: str
    trace_header: str | None
    sent_at: float | None  # Unix seconds, from SentTimestamp
    receive_count: int
    task_token: str | None = None  # a parent workflow waits for the child's result
    identity: str = ""  # the request's identity: ``name`` without a pool's key tag
    start_by: float | None = None  # Unix seconds: not started by then, never started


@dataclass(frozen=True, slots=True)
class BadRequest:
    """A request that no retry can fix; ``reason`` is a short code, ``detail`` says why."""

    message_id: str
    receipt_handle: str
    reason: str
    detail: str


def string_attributes(message: Mapping[str, Any]) -> dict[str, str]:
    """The message's String/Number attributes as plain strings (binary ones skipped)."""
    out: dict[str, str] = {}
    for name, attr in (message.get("MessageAttributes") or {}).items():
        value = attr.get("StringValue")
        if value is not None:
            out[name] = value
    return out


def request_identity(message: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(identity, None), else (None, why it is invalid). The identity is the base of the
    execution name: ``dispatcher-request-id`` (a copy), else ``idempotency-key``, else
    ``dispatcher-original-message-id`` (a copy written before the request id existed),
    else the message id. Attributes are validated as execution names (1-80 characters)."""
    attrs = message.get("MessageAttributes") or {}
    for attribute in (REQUEST_ID_ATTRIBUTE, IDEMPOTENCY_ATTRIBUTE, ORIGINAL_ID_ATTRIBUTE):
        if attribute in attrs:
            value = attrs[attribute].get("StringValue")
            if value is None or not NAME_RE.match(value):
                shown = value if value is None or len(value) <= 100 else value[:100] + "..."
                return None, (
                    f"{attribute} {shown!r} is invalid: use 1-80 characters of "
                    "A-Z, a-z, 0-9, '-' and '_'"
                )
            return value, None
    message_id = str(message["MessageId"])
    if NAME_RE.match(message_id):
        return message_id, None
    return None, f"message id {message_id!r} is not a valid execution name"


def execution_name(message: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(name, None) for a usable (unkeyed) name, else (None, why the identity is invalid)."""
    return request_identity(message)


def producer_attributes(message: Mapping[str, Any], token_attribute: str) -> dict[str, str]:
    """The String/Number attributes the producer gave the request: not the dispatcher's
    own (``dispatcher-*``, written on copies), not the parent's task token (each retry
    of the parent's task has a new one) and not the start-by deadline (said to the
    dispatcher, not to the execution: a retry with a later one is the same request)."""
    return {
        name: value
        for name, value in string_attributes(message).items()
        if not name.startswith(OUR_PREFIX) and name not in (token_attribute, START_BY_ATTRIBUTE)
    }


def task_token(message: dict[str, Any], attribute: str) -> str | None:
    """The parent's task token a request carries in ``attribute`` (None: none)."""
    return string_attributes(message).get(attribute) or None


def parse(
    message: dict[str, Any],
    fmt: InputFormat,
    token_attribute: str = "task-token",  # noqa: S107 - an attribute's name, not a secret
) -> StartRequest | BadRequest:
    """Validate one received message and build its start request."""
    message_id = str(message["MessageId"])
    handle = str(message["ReceiptHandle"])
    body = str(message.get("Body", ""))
    system = message.get("Attributes") or {}

    def bad(reason: str, detail: str) -> BadRequest:
        return BadRequest(message_id, handle, reason, detail)

    name, why = request_identity(message)
    if name is None:
        return bad("invalid_idempotency_key", why or "invalid name")
    start_by, why = start_by_of(message.get("MessageAttributes") or {})
    if why is not None:
        return bad(INVALID_START_BY, why)
    if fmt is InputFormat.ENVELOPE:
        # A function of the request, not of the copy: every copy, and a producer's retry
        # with the same key, body and attributes, has the same input (sorted: stable).
        attributes = producer_attributes(message, token_attribute)
        payload = json.dumps(
            {"body": body, "requestId": name, "attributes": dict(sorted(attributes.items()))}
        )
    else:
        try:
            json.loads(body)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
            return bad("invalid_json", f"body is not valid JSON ({exc})")
        payload = body
    size = len(payload.encode())
    if size > MAX_INPUT_BYTES:
        return bad(
            "input_too_large",
            f"execution input is {size} bytes; Step Functions accepts at most {MAX_INPUT_BYTES}",
        )
    sent_ms = system.get("SentTimestamp")
    return StartRequest(
        message_id=message_id,
        receipt_handle=handle,
        name=name,
        input=payload,
        trace_header=system.get("AWSTraceHeader"),
        sent_at=int(sent_ms) / 1000 if sent_ms else None,
        receive_count=int(system.get("ApproximateReceiveCount", 1)),
        task_token=task_token(message, token_attribute),
        identity=name,
        start_by=start_by,
    )


def execution_arn(state_machine_arn: str, name: str) -> str:
    """The ARN an execution named ``name`` of this (standard) state machine has."""
    return state_machine_arn.replace(":stateMachine:", ":execution:", 1) + ":" + name


def key_tag(key: str) -> str:
    """The short, stable tag of a concurrency key that keyed execution names start with.

    The tag lets a restarted dispatcher count running executions per key from a listing
    alone; a hash keeps tenant ids out of execution names and keeps the length fixed.
    """
    return hashlib.sha256(key.encode()).hexdigest()[:10]


def tag_of(arn_or_name: str) -> str | None:
    """The key tag an execution name (or ARN) carries, or None for an untagged one."""
    match = KEY_TAG_RE.match(arn_or_name.rsplit(":", 1)[-1])
    return match["tag"] if match else None


FORMER_KEY_ATTRIBUTES = 4
"""Attribute values of a request tried as the key of a former ``key_attribute``, at most."""


def former_names(
    request: StartRequest,
    message: Mapping[str, Any],
    key_attribute: str | None,
    token_attribute: str = "task-token",  # noqa: S107 - an attribute's name, not a secret
) -> list[str]:
    """The names ``request`` may have started under before a configuration change (another
    ``key_attribute``, or none, before a restart), most likely first, not its current name:
    the plain name (the identity); then the identity keyed by each of the request's own
    attribute values (a former key attribute), at most `FORMER_KEY_ATTRIBUTES` of them,
    by attribute name; then keyed by the empty key (the attribute was missing). Only names
    that fit the 80 characters Step Functions allows."""
    identity = request.identity or request.name
    values = [
        value
        for name, value in sorted(string_attributes(message).items())
        if not name.startswith(OUR_PREFIX)
        and name not in (IDEMPOTENCY_ATTRIBUTE, key_attribute, token_attribute, START_BY_ATTRIBUTE)
        and value
    ][:FORMER_KEY_ATTRIBUTES]
    keyed_names = [f"k{key_tag(value)}_{identity}" for value in (*values, "")]
    out: list[str] = []
    for name in (identity, *keyed_names):
        if name != request.name and name not in out and len(name) <= 80:
            out.append(name)
    return out


def keyed(request: StartRequest, tag: str) -> StartRequest | BadRequest:
    """The request with its execution name prefixed by the key tag (names stay <= 80)."""
    name = f"k{tag}_{request.name}"
    if len(name) > 80:
        return BadRequest(
            request.message_id,
            request.receipt_handle,
            "invalid_idempotency_key",
            f"{IDEMPOTENCY_ATTRIBUTE} {request.name!r} is too long for a pool with per-key "
            f"limits: at most {80 - KEY_TAG_LENGTH} characters (the name carries a key tag)",
        )
    return dataclasses.replace(request, name=name)
