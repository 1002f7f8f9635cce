"""``sfn-dispatcher redrive``: move dead-lettered requests back to a request queue.

Each dead letter carries the reason the dispatcher gave (``dispatcher-reason``, see
`dispatcher.daemon.deadletter`). Redrive picks them by reason, sends a copy without the
``dispatcher-*`` attributes but with the request's identity (``dispatcher-request-id``, so
the copy maps to the same execution name; written here when a redrive policy moved the
message and nothing wrote it), and deletes the dead letter only after that send
succeeded: a message is never lost, at worst (a failed delete) it is on both queues and
reported, and a later run's copy maps to the same execution. What is not moved (another
reason, ``--dry-run``, ``--max`` reached) is made visible again at the end.

A run moves what was in the dead-letter queue when it started, then ends: a dead letter
sent after the run started (``SentTimestamp``), or a request already moved by this run
(the same identity: the dispatcher dead-lettered the copy again), is left where it is; and
it moves no more messages than the queue held when it started (its visible, in-flight and
delayed counts): a message a redrive policy moves meanwhile keeps the ``SentTimestamp`` of
its first send, so only the count tells it from what was there.

Why not SQS's own ``StartMessageMoveTask``: it cannot filter by reason, it keeps every
attribute (harmless: the dispatcher ignores the ``dispatcher-*`` ones but the request id),
it cannot show counts by reason first, it cannot give a message the redrive policy moved its
identity, and it only applies to a queue that is some queue's redrive-policy dead-letter
queue. For a plain move of everything,
``aws sqs start-message-move-task --source-arn DLQ_ARN --destination-arn QUEUE_ARN``
does it server-side.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio

from dispatcher.aws.api import AWS_ERRORS, error_code
from dispatcher.core.deadline import EXPIRED, START_BY_ATTRIBUTE
from dispatcher.core.requests import OUR_PREFIX, REQUEST_ID_ATTRIBUTE, request_identity
from dispatcher.daemon.deadletter import REASON_ATTRIBUTE
from dispatcher.errors import UserError
from dispatcher.producer import open_sqs
from dispatcher.progress import Progress
from dispatcher.settings.config import env_name

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_sqs.type_defs import MessageTypeDef

DEAD_LETTER_ENV = env_name("dead_letter_queue_url")
REQUEST_QUEUE_ENV = env_name("request_queue_url")
NO_REASON = "(none)"  # moved by a queue's redrive policy, not by the dispatcher
DEFAULT_VISIBILITY = 300  # seconds a received dead letter stays hidden during the run


@dataclass
class RedriveReport:
    """What a run saw and did; counts by reason."""

    seen: Counter[str] = field(default_factory=Counter)
    moved: Counter[str] = field(default_factory=Counter)
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (id, code, message)
    not_deleted: list[tuple[str, str]] = field(default_factory=list)  # sent, still in the DLQ
    error: str | None = None  # why the run stopped early
    arrived: int = 0  # left: sent to the dead-letter queue after the run started
    came_back: int = 0  # left: the same request as one this run moved (dead-lettered again?)
    beyond: int = 0  # left: more than the queue held when the run started
    seen_ids: set[str] = field(default_factory=set, repr=False)
    moved_requests: set[str] = field(default_factory=set, repr=False)  # `request_key`s

    @property
    def ok(self) -> bool:
        """Everything chosen was moved and deleted from the dead-letter queue."""
        return not self.failed and not self.not_deleted and self.error is None


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``redrive``."""
    parser = subparsers.add_parser(
        "redrive",
        help="move dead-lettered requests back to the request queue, by reason",
        description="Move dead letters back to a request queue: a copy without the "
        "dispatcher-* attributes is sent first, the dead letter deleted only after the send "
        "succeeded. Filter by --reason (the dispatcher-reason attribute; (none) for "
        "messages a redrive policy moved); --dry-run counts by reason and moves nothing. "
        "An expired request goes back without its start-by attribute (it runs). "
        "Not SQS's StartMessageMoveTask: it cannot filter by reason nor drop attributes "
        "(for a plain move of everything, `aws sqs start-message-move-task` does it "
        "server-side). Exit 0 when every chosen message moved, 1 when some failed.",
    )
    parser.add_argument(
        "--from",
        dest="source",
        metavar="URL",
        help=f"the dead-letter queue (default ${DEAD_LETTER_ENV})",
    )
    parser.add_argument(
        "--to",
        dest="target",
        metavar="URL",
        help=f"the request queue (default ${REQUEST_QUEUE_ENV})",
    )
    parser.add_argument(
        "--reason",
        action="append",
        metavar="REASON",
        help="only dead letters with this dispatcher-reason (repeatable), e.g. invalid_json",
    )
    parser.add_argument("--dry-run", action="store_true", help="count by reason, move nothing")
    parser.add_argument("--max", type=int, metavar="N", help="move at most N messages")
    parser.add_argument(
        "--visibility-timeout",
        type=int,
        default=DEFAULT_VISIBILITY,
        metavar="S",
        help=f"seconds a dead letter stays hidden while the run lasts (default "
        f"{DEFAULT_VISIBILITY}); make it longer than the run",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``sfn-dispatcher redrive``."""
    source = args.source or os.environ.get(DEAD_LETTER_ENV)
    target = args.target or os.environ.get(REQUEST_QUEUE_ENV)
    if not source:
        raise UserError(f"no dead-letter queue: pass --from URL or set {DEAD_LETTER_ENV}")
    if not target and not args.dry_run:
        raise UserError(f"no request queue: pass --to URL or set {REQUEST_QUEUE_ENV}")
    if source == target:
        raise UserError(f"--from and --to are the same queue ({source})")
    if args.max is not None and args.max < 1:
        raise UserError(f"--max {args.max} is invalid: give 1 or more")
    if not 1 <= args.visibility_timeout <= 43_200:
        raise UserError(
            f"--visibility-timeout {args.visibility_timeout} is invalid: give 1 to 43200 s"
        )
    report = anyio.run(partial(_run, args, source, target or ""))
    _print_report(report, args)
    if report.error and not report.seen:
        raise UserError(f"cannot redrive from {source}: {report.error}")
    if report.error:
        print(f"stopped early: {report.error}", file=sys.stderr)
    return 0 if report.ok else 1


def _print_report(report: RedriveReport, args: argparse.Namespace) -> None:
    """Counts by reason on stdout; what failed or was left on both queues on stderr."""
    verb = "would move" if args.dry_run else "moved"
    chosen = report.seen if args.dry_run else report.moved
    if args.dry_run and args.reason:
        chosen = Counter({r: n for r, n in report.seen.items() if r in set(args.reason)})
    print(f"{sum(report.seen.values())} dead letters seen; {verb} {sum(chosen.values())}")
    for reason in sorted(report.seen):
        print(f"  {reason:<32} {report.seen[reason]:>7} seen {chosen.get(reason, 0):>7} {verb}")
    if report.arrived:
        print(f"left {report.arrived} sent to the dead-letter queue after the run started")
    if report.came_back:
        print(f"left {report.came_back} copies of requests this run moved (same request id)")
    if report.beyond:
        print(f"left {report.beyond} beyond what the queue held when the run started")
    for message_id, code, message in report.failed[:20]:
        print(f"failed: {message_id}: {code}: {message} (left in the DLQ)", file=sys.stderr)
    for message_id, why in report.not_deleted[:20]:
        print(
            f"not deleted: {message_id}: {why} (sent, and still in the DLQ: a later redrive "
            "sends it again, with the same request id: one execution)",
            file=sys.stderr,
        )


async def _run(args: argparse.Namespace, source: str, target: str) -> RedriveReport:
    async with open_sqs(source) as sqs:
        total = await _depth(sqs, source)
        with Progress(total) as bar:
            return await redrive(
                sqs,
                source,
                target,
                reasons=set(args.reason) if args.reason else None,
                dry_run=args.dry_run,
                limit=args.max,
                visibility=args.visibility_timeout,
                advance=bar.update,
            )


async def queue_depth(sqs: SQSClient, url: str, report: RedriveReport) -> int | None:
    """How many messages ``url`` holds now, visible, in flight or delayed (None, and
    ``report.error`` set, when it cannot be read)."""
    try:
        response = await sqs.get_queue_attributes(
            QueueUrl=url,
            AttributeNames=[
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesNotVisible",
                "ApproximateNumberOfMessagesDelayed",
            ],
        )
        attributes = response.get("Attributes", {})
        return (
            int(attributes.get("ApproximateNumberOfMessages", "0"))
            + int(attributes.get("ApproximateNumberOfMessagesNotVisible", "0"))
            + int(attributes.get("ApproximateNumberOfMessagesDelayed", "0"))
        )
    except (*AWS_ERRORS, ValueError) as exc:
        report.error = f"reading how many dead letters there are: {exc}"
        return None


async def _depth(sqs: SQSClient, url: str) -> int | None:
    try:
        response = await sqs.get_queue_attributes(
            QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"]
        )
    except AWS_ERRORS:
        return None  # the run itself reports why
    return int(response.get("Attributes", {}).get("ApproximateNumberOfMessages", 0))


def reason_of(message: Mapping[str, Any]) -> str:
    """The dispatcher's reason on a dead letter, or ``(none)``."""
    value = (message.get("MessageAttributes") or {}).get(REASON_ATTRIBUTE) or {}
    return str(value.get("StringValue") or NO_REASON)


def request_attributes(message: Mapping[str, Any]) -> dict[str, Any]:
    """What the copy carries: the request's own attributes (the dead letter's without
    ``dispatcher-*``) and its identity, ``dispatcher-request-id``: kept, or written from
    the message id of a message a redrive policy moved (its id is the original's) when
    SQS's ten attributes leave room. An expired request goes back without its start-by
    (kept, it would expire again at once): redriving it asks for it to run."""
    attributes = {
        name: value
        for name, value in (message.get("MessageAttributes") or {}).items()
        if not name.startswith(OUR_PREFIX) or name == REQUEST_ID_ATTRIBUTE
    }
    if reason_of(message) == EXPIRED:
        attributes.pop(START_BY_ATTRIBUTE, None)
    identity, _ = request_identity(message)
    if identity is not None and REQUEST_ID_ATTRIBUTE not in attributes and len(attributes) < 10:
        attributes[REQUEST_ID_ATTRIBUTE] = {"DataType": "String", "StringValue": identity}
    return attributes


def request_key(message: Mapping[str, Any]) -> str:
    """Which request a dead letter is a copy of: its identity (the base of its execution
    name); without a valid one, a digest of its body and own attributes."""
    identity, _ = request_identity(message)
    if identity is not None:
        return identity
    own = {
        name: value.get("StringValue")
        for name, value in (message.get("MessageAttributes") or {}).items()
        if not name.startswith(OUR_PREFIX)
    }
    content = json.dumps([message.get("Body", ""), sorted(own.items())], default=str)
    return "#" + hashlib.sha256(content.encode()).hexdigest()


def sent_after(message: Mapping[str, Any], started_ms: int) -> bool:
    """Whether the dead letter was sent after the run started (SQS's SentTimestamp)."""
    sent = (message.get("Attributes") or {}).get("SentTimestamp")
    try:
        return sent is not None and int(sent) > started_ms
    except ValueError:
        return False


async def redrive(
    sqs: SQSClient,
    source: str,
    target: str,
    *,
    reasons: set[str] | None = None,
    dry_run: bool = False,
    limit: int | None = None,
    visibility: int = DEFAULT_VISIBILITY,
    wait_seconds: int = 1,
    advance: Callable[[int], object] = lambda _: None,
    started_ms: int | None = None,
) -> RedriveReport:
    """Receive every dead letter once; move the chosen ones, release the rest at the end.

    Only what was in the queue at ``started_ms`` (default: now) is moved, each request at
    most once: a dead letter sent later, or a copy of a request this run moved, is left;
    and no more than the queue held when the run started (read first: a run that cannot
    read it moves nothing). Stops when a receive returns nothing new (a long poll: the
    queue has nothing visible), which comes, whatever a dispatcher does meanwhile: every
    message is received once, and only messages already in the queue are moved.
    """
    report = RedriveReport()
    if started_ms is None:
        started_ms = int(time.time() * 1000)
    held_at_start = None if dry_run else await queue_depth(sqs, source, report)
    if not dry_run and held_at_start is None:
        return report
    held: dict[str, str] = {}  # message id -> receipt handle, to make visible again
    try:
        while True:
            try:
                response = await sqs.receive_message(
                    QueueUrl=source,
                    MaxNumberOfMessages=10,
                    WaitTimeSeconds=wait_seconds,
                    VisibilityTimeout=visibility,
                    MessageAttributeNames=["All"],
                    MessageSystemAttributeNames=["MessageGroupId", "SentTimestamp"],
                )
            except AWS_ERRORS as exc:
                report.error = f"{error_code(exc) or type(exc).__name__}: {exc}"
                break
            fresh = [
                m for m in response.get("Messages", []) if m["MessageId"] not in report.seen_ids
            ]
            for message in response.get("Messages", []):
                held[message["MessageId"]] = message["ReceiptHandle"]  # the newest handle
            if not fresh:
                break
            chosen = _choose(
                fresh,
                report,
                started_ms=started_ms,
                reasons=reasons,
                limit=limit,
                held_at_start=held_at_start,
                dry_run=dry_run,
            )
            if chosen:
                await _move(sqs, source, target, chosen, report=report, held=held)
            advance(len(fresh))
            if report.error:
                break
    finally:
        with anyio.CancelScope(shield=True):
            await _release(sqs, source, held)
    return report


def _choose(
    fresh: Sequence[MessageTypeDef],
    report: RedriveReport,
    *,
    started_ms: int,
    reasons: set[str] | None,
    limit: int | None,
    held_at_start: int | None,
    dry_run: bool,
) -> list[MessageTypeDef]:
    """Which of the dead letters just received to move (each counted in ``report``)."""
    chosen: list[MessageTypeDef] = []
    for message in fresh:
        report.seen_ids.add(message["MessageId"])
        if request_key(message) in report.moved_requests:
            report.came_back += 1  # moved by this run, dead-lettered again: left
            continue
        if sent_after(message, started_ms):
            report.arrived += 1
            continue
        reason = reason_of(message)
        report.seen[reason] += 1
        if dry_run or (reasons is not None and reason not in reasons):
            continue
        tried = sum(report.moved.values()) + len(report.failed) + len(chosen)
        if held_at_start is not None and tried >= held_at_start:
            report.beyond += 1  # a redrive policy moved it after the run started
        elif limit is None or sum(report.moved.values()) + len(chosen) < limit:
            chosen.append(message)
    return chosen


async def _move(
    sqs: SQSClient,
    source: str,
    target: str,
    messages: Sequence[MessageTypeDef],
    *,
    report: RedriveReport,
    held: dict[str, str],
) -> None:
    """Send the batch to ``target``; delete from ``source`` only what was sent."""
    fifo = target.endswith(".fifo")
    entries: list[Any] = []
    for index, message in enumerate(messages):
        entry: dict[str, Any] = {"Id": str(index), "MessageBody": message.get("Body", "")}
        attributes = request_attributes(message)
        if attributes:
            entry["MessageAttributes"] = attributes
        if fifo:
            group = (message.get("Attributes") or {}).get("MessageGroupId", "redrive")
            entry["MessageGroupId"] = group
            entry["MessageDeduplicationId"] = message["MessageId"]
        entries.append(entry)
    try:
        result = await sqs.send_message_batch(QueueUrl=target, Entries=entries)
    except AWS_ERRORS as exc:
        code = error_code(exc) or type(exc).__name__
        report.failed += [(m["MessageId"], code, str(exc)) for m in messages]
        report.error = f"sending to {target}: {code}: {exc}"
        return
    for failure in result.get("Failed", []):
        message = messages[int(failure["Id"])]
        report.failed.append((message["MessageId"], failure["Code"], failure.get("Message", "")))
    sent = [messages[int(ok["Id"])] for ok in result.get("Successful", [])]
    report.moved_requests.update(request_key(m) for m in sent)
    if not sent:
        return
    try:
        deleted = await sqs.delete_message_batch(
            QueueUrl=source,
            Entries=[
                {"Id": str(i), "ReceiptHandle": held[m["MessageId"]]} for i, m in enumerate(sent)
            ],
        )
    except AWS_ERRORS as exc:
        report.not_deleted += [(m["MessageId"], str(exc)) for m in sent]
        for message in sent:
            report.moved[reason_of(message)] += 1
        return
    for failure in deleted.get("Failed", []):
        message = sent[int(failure["Id"])]
        report.not_deleted.append((message["MessageId"], failure.get("Message", failure["Code"])))
    for message in sent:
        report.moved[reason_of(message)] += 1
        if not any(m == message["MessageId"] for m, _ in report.not_deleted):
            held.pop(message["MessageId"], None)


async def _release(sqs: SQSClient, source: str, held: Mapping[str, str]) -> None:
    """Make what was received but not moved visible again (best effort: a message not
    released reappears by itself when its visibility timeout ends)."""
    handles = list(held.values())
    for start in range(0, len(handles), 10):
        chunk = handles[start : start + 10]
        try:
            await sqs.change_message_visibility_batch(
                QueueUrl=source,
                Entries=[
                    {"Id": str(i), "ReceiptHandle": h, "VisibilityTimeout": 0}
                    for i, h in enumerate(chunk)
                ],
            )
        except AWS_ERRORS:
            return
