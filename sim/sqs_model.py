"""SQS's data and rules: stored messages, queues, what counts against the size limit, and
the checks SQS makes on a request before it does anything."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError

from sim.calls import Answer, Signal, aws_error, error_code

MAX_VISIBILITY = 43_200
MAX_DELAY = 900
MAX_WAIT = 20
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,80}\Z")
_ATTRIBUTE_NAME_RE = re.compile(r"^(?!\.)(?!.*\.\.)(?!.*\.$)[A-Za-z0-9_.-]{1,256}\Z")
_DATA_TYPE_RE = re.compile(r"^(String|Number|Binary)(\.[A-Za-z0-9_.-]+)?\Z")
QUEUE_ATTRIBUTES = (
    "VisibilityTimeout",
    "MaximumMessageSize",
    "MessageRetentionPeriod",
    "DelaySeconds",
    "ReceiveMessageWaitTimeSeconds",
    "QueueArn",
    "ApproximateNumberOfMessages",
    "ApproximateNumberOfMessagesNotVisible",
    "ApproximateNumberOfMessagesDelayed",
    "CreatedTimestamp",
    "LastModifiedTimestamp",
    "RedrivePolicy",
    "SqsManagedSseEnabled",
)
SYSTEM_ATTRIBUTES = (
    "ApproximateReceiveCount",
    "ApproximateFirstReceiveTimestamp",
    "SentTimestamp",
    "SenderId",
)


def md5(text: str) -> str:
    """The MD5 digest SQS reports for a body."""
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


def flat(attributes: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Message attributes as plain strings (binary ones as their repr)."""
    out: dict[str, str] = {}
    for name, value in attributes.items():
        string = value.get("StringValue")
        out[name] = str(string) if string is not None else repr(value.get("BinaryValue"))
    return out


def message_size(body: str, attributes: Mapping[str, Mapping[str, Any]]) -> int:
    """What counts against MaximumMessageSize: the body plus every attribute's name, data
    type and value."""
    size = len(body.encode())
    for name, value in attributes.items():
        size += len(name.encode()) + len(str(value.get("DataType", "")).encode())
        if "StringValue" in value:
            size += len(str(value["StringValue"]).encode())
        elif "BinaryValue" in value:
            raw = value["BinaryValue"]
            size += len(raw if isinstance(raw, bytes) else str(raw).encode())
    return size


@dataclass(eq=False, slots=True)
class StoredMessage:
    """One stored copy of a message (a duplicate is a second copy, same MessageId)."""

    serial: int
    message_id: str
    body: str
    attributes: dict[str, dict[str, Any]]
    sent_at: float  # stored from here (an event's delivery may be in the future)
    available_at: float  # after DelaySeconds
    sender: str
    hidden_until: float = -math.inf
    receive_count: int = 0
    first_receive_at: float | None = None
    received_at: float = -math.inf  # the latest receive (visibility is capped from here)
    handle: str | None = None  # the latest receipt handle
    deleted: bool = False

    def visible(self, now: float) -> bool:
        """Whether a receive at ``now`` may take it."""
        return (
            not self.deleted
            and self.sent_at <= now
            and self.available_at <= now
            and self.hidden_until <= now
        )


@dataclass(eq=False)
class Queue:
    """One standard queue."""

    name: str
    url: str
    arn: str
    visibility_timeout: int
    maximum_message_size: int
    created: float
    redrive: tuple[str, int] | None = None  # (dead-letter queue ARN, maxReceiveCount)
    messages: dict[int, StoredMessage] = field(default_factory=dict)
    signal: Signal = field(default_factory=Signal)

    def attributes(self, now: float, wall: Callable[[float], float]) -> dict[str, str]:
        """Every attribute GetQueueAttributes knows, as strings."""
        live = [m for m in self.messages.values() if not m.deleted and m.sent_at <= now]
        out = {
            "VisibilityTimeout": str(self.visibility_timeout),
            "MaximumMessageSize": str(self.maximum_message_size),
            "MessageRetentionPeriod": "345600",
            "DelaySeconds": "0",
            "ReceiveMessageWaitTimeSeconds": "0",
            "QueueArn": self.arn,
            "ApproximateNumberOfMessages": str(sum(m.visible(now) for m in live)),
            "ApproximateNumberOfMessagesNotVisible": str(
                sum(m.available_at <= now < m.hidden_until for m in live)
            ),
            "ApproximateNumberOfMessagesDelayed": str(sum(m.available_at > now for m in live)),
            "CreatedTimestamp": str(int(wall(self.created))),
            "LastModifiedTimestamp": str(int(wall(self.created))),
            "SqsManagedSseEnabled": "true",
        }
        if self.redrive is not None:
            target, count = self.redrive
            out["RedrivePolicy"] = json.dumps(
                {"deadLetterTargetArn": target, "maxReceiveCount": count}
            )
        return out

    def next_change(self, now: float) -> float:
        """The earliest future time a message may become receivable."""
        soonest = math.inf
        for m in self.messages.values():
            if not m.deleted:
                at = max(m.sent_at, m.available_at, m.hidden_until)
                if now < at < soonest:
                    soonest = at
        return soonest


def check_message(
    queue: Queue,
    body: str,
    attributes: Mapping[str, Mapping[str, Any]],
    delay: int,
    op: str,
) -> None:
    """Refuse a message SQS would refuse, with its error."""
    if not body:
        raise aws_error(
            "MissingParameter", "The request must contain the parameter MessageBody.", op
        )
    if not 0 <= delay <= MAX_DELAY:
        raise aws_error(
            "InvalidParameterValue",
            f"Value {delay} for parameter DelaySeconds is invalid. Reason: must be "
            f"between 0 and {MAX_DELAY}.",
            op,
        )
    if len(attributes) > 10:
        raise aws_error(
            "InvalidParameterValue",
            f"Number of message attributes [{len(attributes)}] exceeds the allowed maximum [10].",
            op,
        )
    for name, value in attributes.items():
        if not _ATTRIBUTE_NAME_RE.match(name) or name.lower().startswith(("aws.", "amazon.")):
            raise aws_error(
                "InvalidParameterValue", f"Message attribute name '{name}' is invalid.", op
            )
        if not _DATA_TYPE_RE.match(str(value.get("DataType", ""))):
            raise aws_error(
                "InvalidParameterValue",
                f"The type of message (user) attribute '{name}' is invalid.",
                op,
            )
        if not value.get("StringValue") and not value.get("BinaryValue"):
            raise aws_error(
                "InvalidParameterValue",
                f"Message (user) attribute '{name}' must contain a non-empty value of "
                "message attribute type 'String'.",
                op,
            )
    size = message_size(body, attributes)
    if size > queue.maximum_message_size:
        raise aws_error(
            "InvalidParameterValue",
            "One or more parameters are invalid. Reason: Message must be shorter than "
            f"{queue.maximum_message_size} bytes.",
            op,
        )


def attribute_wanted(name: str, names: list[str]) -> bool:
    """Whether MessageAttributeNames (names, ``All``, ``.*``, ``prefix.*``) asks for it."""
    for pattern in names:
        if pattern in ("All", ".*") or pattern == name:
            return True
        if pattern.endswith(".*") and name.startswith(pattern[:-1]):
            return True
    return False


def check_range(name: str, value: int, low: int, high: int, op: str) -> None:
    """Refuse a numeric parameter out of its range."""
    if not low <= value <= high:
        raise aws_error(
            "InvalidParameterValue",
            f"Value {value} for parameter {name} is invalid. Reason: Must be between "
            f"{low} and {high}, if provided.",
            op,
        )


def check_batch(entries: list[Mapping[str, Any]], op: str) -> None:
    """Refuse an empty batch, more than ten entries, bad or repeated entry ids."""
    if not entries:
        raise aws_error(
            "AWS.SimpleQueueService.EmptyBatchRequest",
            "There should be at least one SendMessageBatchRequestEntry in the request.",
            op,
        )
    if len(entries) > 10:
        raise aws_error(
            "AWS.SimpleQueueService.TooManyEntriesInBatchRequest",
            f"Maximum number of entries per request are 10. You have sent {len(entries)}.",
            op,
        )
    ids = [str(e.get("Id", "")) for e in entries]
    for ident in ids:
        if not _ID_RE.match(ident):
            raise aws_error(
                "AWS.SimpleQueueService.InvalidBatchEntryId",
                "A batch entry id can only contain alphanumeric characters, hyphens and "
                "underscores. It can be at most 80 letters long.",
                op,
            )
    if len(set(ids)) != len(ids):
        raise aws_error(
            "AWS.SimpleQueueService.BatchEntryIdsNotDistinct",
            "Two or more batch entries in the request have the same Id.",
            op,
        )


def batch_failure(ident: str, exc: ClientError) -> Answer:
    """A batch entry's failure as SQS reports it."""
    return {
        "Id": ident,
        "SenderFault": True,
        "Code": error_code(exc),
        "Message": str(exc.response.get("Error", {}).get("Message", "")),
    }
