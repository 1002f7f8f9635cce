"""Turn an SQS request message into a start request, or say exactly why it is bad.

Pure functions, no I/O. The execution name is derived deterministically from the
request (invariant 4): the ``idempotency-key`` attribute when present, else the SQS
message id, so a redelivered message maps to the same execution.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from dispatcher.config import InputFormat

IDEMPOTENCY_ATTRIBUTE = "idempotency-key"
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


@dataclass(frozen=True, slots=True)
class BadRequest:
    """A request that no retry can fix; ``reason`` is a short code, ``detail`` says why."""

    message_id: str
    receipt_handle: str
    reason: str
    detail: str


def string_attributes(message: dict[str, Any]) -> dict[str, str]:
    """The message's String/Number attributes as plain strings (binary ones skipped)."""
    out: dict[str, str] = {}
    for name, attr in (message.get("MessageAttributes") or {}).items():
        value = attr.get("StringValue")
        if value is not None:
            out[name] = value
    return out


def execution_name(message: dict[str, Any]) -> tuple[str | None, str | None]:
    """(name, None) for a usable name, else (None, why the idempotency key is invalid)."""
    attrs = message.get("MessageAttributes") or {}
    if IDEMPOTENCY_ATTRIBUTE in attrs:
        key = attrs[IDEMPOTENCY_ATTRIBUTE].get("StringValue")
        if key is None or not NAME_RE.match(key):
            shown = key if key is None or len(key) <= 100 else key[:100] + "..."
            return None, (
                f"{IDEMPOTENCY_ATTRIBUTE} {shown!r} is invalid: use 1-80 characters of "
                "A-Z, a-z, 0-9, '-' and '_'"
            )
        return key, None
    message_id = str(message["MessageId"])
    if NAME_RE.match(message_id):
        return message_id, None
    return None, f"message id {message_id!r} is not a valid execution name"


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

    name, why = execution_name(message)
    if name is None:
        return bad("invalid_idempotency_key", why or "invalid name")
    if fmt is InputFormat.ENVELOPE:
        payload = json.dumps(
            {"body": body, "messageId": message_id, "attributes": string_attributes(message)}
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
