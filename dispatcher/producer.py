"""The producer side: send requests to the request queue, 10 per batch, several batches at once.

`submit_requests` is what ``sfn-dispatcher submit``, the demo and the benchmarks use. An
entry that SQS rejects is reported with its code and message, never dropped; only entries
SQS marks as not the sender's fault are retried. docs/producers.md shows it in use, next to
plain boto3 and AWS CLI producers.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

import aioboto3
import anyio
from aiobotocore.config import AioConfig
from anyio.streams.memory import MemoryObjectReceiveStream
from botocore.exceptions import BotoCoreError, ClientError

from dispatcher.core.deadline import START_BY_ATTRIBUTE, format_deadline
from dispatcher.progress import Progress

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_sqs.type_defs import (
        MessageAttributeValueTypeDef,
        SendMessageBatchRequestEntryTypeDef,
        SendMessageBatchResultTypeDef,
    )

IDEMPOTENCY_ATTRIBUTE = "idempotency-key"
BATCH_SIZE = 10  # the SendMessageBatch maximum
MAX_BATCH_BYTES = 256 * 1024  # conservative: older queues and regions cap a batch here
DEFAULT_CONCURRENCY = 8
MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class SubmitItem:
    """One request: the body (the execution input) and optional message attributes.

    ``start_by``: not started by then (Unix seconds, or an aware ``datetime``), the request
    is dead-lettered as ``expired`` instead (sent as the ``start-by`` attribute)."""

    body: str
    idempotency_key: str | None = None
    attributes: Mapping[str, str] = field(default_factory=dict)
    start_by: float | datetime | None = None

    def message_attributes(self) -> dict[str, str]:
        """Every String attribute the request is sent with."""
        attributes = dict(self.attributes)
        if self.idempotency_key is not None:
            attributes[IDEMPOTENCY_ATTRIBUTE] = self.idempotency_key
        if self.start_by is not None:
            attributes[START_BY_ATTRIBUTE] = format_start_by(self.start_by)
        return attributes


def format_start_by(when: float | datetime) -> str:
    """A start-by as the attribute carries it: RFC 3339 in UTC (``2026-12-05T10:00:00Z``).
    A naive ``datetime`` is refused: its zone would be a guess."""
    if isinstance(when, datetime):
        if when.tzinfo is None or when.utcoffset() is None:
            raise ValueError(f"start_by {when!r} has no time zone: give an aware datetime")
        when = when.timestamp()
    return format_deadline(when)


@dataclass(frozen=True)
class FailedEntry:
    """A request that was not sent, and why (as SQS or the client said)."""

    index: int  # position in the input, from 0
    code: str
    message: str
    sender_fault: bool


@dataclass
class SubmitReport:
    """What a submission did: sent, failed (with reasons), and not attempted after an abort."""

    sent: int = 0
    failed: list[FailedEntry] = field(default_factory=list)
    unsent: int = 0
    error: str | None = None  # why sending stopped early, when it did
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        """Every request was sent."""
        return not self.failed and not self.unsent and self.error is None

    @property
    def rate(self) -> float:
        """Messages sent per second."""
        return self.sent / self.elapsed if self.elapsed > 0 else 0.0

    def summary(self) -> str:
        """One line for humans and logs."""
        line = (
            f"sent {self.sent}, failed {len(self.failed)} in {self.elapsed:.2f} s "
            f"({self.rate:.0f} msg/s)"
        )
        if self.unsent:
            line += f", {self.unsent} not sent"
        return line


class BatchSender(Protocol):
    """The one SQS call `submit_requests` makes (an aiobotocore SQS client, or a test fake)."""

    async def send_message_batch(
        self,
        *,
        QueueUrl: str,  # noqa: N803 - botocore's parameter names
        Entries: Sequence[SendMessageBatchRequestEntryTypeDef],  # noqa: N803
    ) -> SendMessageBatchResultTypeDef:
        """Send up to 10 messages."""
        ...


def endpoint_for(queue_url: str) -> str | None:
    """The endpoint to use for ``queue_url`` when none is configured.

    ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_SQS``) wins; an AWS queue URL needs none;
    any other queue URL (an emulator's) names its own endpoint, so ``--queue-url`` alone
    is enough.
    """
    if os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_SQS"):
        return None
    parts = urlsplit(queue_url)
    host = parts.hostname or ""
    if not parts.scheme or not host or re.search(r"\.amazonaws\.com(\.cn)?$", host):
        return None
    return f"{parts.scheme}://{parts.netloc}"


def _region_of(queue_url: str) -> str | None:
    match = re.match(r"^https?://sqs[.-]([a-z0-9-]+)\.amazonaws\.com", queue_url)
    return match[1] if match else None


@asynccontextmanager
async def open_sqs(
    queue_url: str, endpoint_url: str | None = None, *, concurrency: int = DEFAULT_CONCURRENCY
) -> AsyncIterator[SQSClient]:
    """An SQS client for ``queue_url``, configured by the usual ``AWS_*`` variables."""
    session = aioboto3.Session()
    config = AioConfig(
        max_pool_connections=concurrency + 2,
        retries={"mode": "standard", "max_attempts": 3},
        connect_timeout=5,
        read_timeout=30,
    )
    region = session.region_name or _region_of(queue_url) or "us-east-1"
    async with session.client(
        "sqs",
        endpoint_url=endpoint_url or endpoint_for(queue_url),
        region_name=region,
        config=config,
    ) as sqs:
        yield sqs


async def submit_requests(
    queue_url: str,
    items: Iterable[SubmitItem] | AsyncIterable[SubmitItem],
    *,
    rate: float | None = None,
    progress: bool = False,
    total: int | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    client: BatchSender | None = None,
    endpoint_url: str | None = None,
    max_attempts: int = MAX_ATTEMPTS,
) -> SubmitReport:
    """Send ``items`` to ``queue_url`` and report what was sent and what failed.

    ``rate`` caps messages per second; ``progress`` shows a bar on stderr (``total`` sizes
    it). Without ``client``, one is opened from the ``AWS_*`` environment (`endpoint_for`
    says which endpoint). A call that fails as a whole (no such queue, no credentials,
    endpoint down) stops the run: its entries are reported as failed, the rest as not
    sent (counted when ``total`` is given), the reason in ``error``.
    """
    if rate is not None and rate <= 0:
        raise ValueError("rate must be positive")
    if client is None:
        async with open_sqs(queue_url, endpoint_url, concurrency=concurrency) as sqs:
            return await _Submission(queue_url, sqs, max_attempts).run(
                items, rate=rate, progress=progress, total=total, concurrency=concurrency
            )
    return await _Submission(queue_url, client, max_attempts).run(
        items, rate=rate, progress=progress, total=total, concurrency=concurrency
    )


_Batch = list[tuple[int, SubmitItem]]


class _Submission:
    """One run: a producer cuts batches, ``concurrency`` workers send them."""

    def __init__(self, queue_url: str, client: BatchSender, max_attempts: int) -> None:
        self.queue_url = queue_url
        self.client = client
        self.max_attempts = max_attempts
        self.report = SubmitReport()

    async def run(
        self,
        items: Iterable[SubmitItem] | AsyncIterable[SubmitItem],
        *,
        rate: float | None,
        progress: bool,
        total: int | None,
        concurrency: int,
    ) -> SubmitReport:
        started = anyio.current_time()
        # Below 10 msg/s a full batch would go out in one burst: send smaller ones instead.
        size = BATCH_SIZE if rate is None else max(1, min(BATCH_SIZE, int(rate)))
        send, receive = anyio.create_memory_object_stream[_Batch](concurrency)
        with Progress(total, enabled=progress) as bar:
            async with anyio.create_task_group() as group:
                for _ in range(concurrency):
                    group.start_soon(self._worker, receive.clone(), bar.update)
                receive.close()
                async with send:
                    queued = 0
                    async for batch in _batches(items, size):
                        if self.report.error is not None:
                            self.report.unsent += len(batch)
                            break
                        if rate is not None:
                            await anyio.sleep_until(started + queued / rate)
                        await send.send(batch)
                        queued += len(batch)
        self.report.elapsed = anyio.current_time() - started
        if self.report.error is not None and total is not None:
            # Stopped early: what was never pulled from ``items`` was not sent either.
            attempted = self.report.sent + len(self.report.failed)
            self.report.unsent = max(self.report.unsent, total - attempted)
        self.report.failed.sort(key=lambda entry: entry.index)
        return self.report

    async def _worker(
        self, batches: MemoryObjectReceiveStream[_Batch], advance: Callable[[int], object]
    ) -> None:
        async with batches:
            async for batch in batches:
                if self.report.error is not None:
                    self.report.unsent += len(batch)
                    continue
                await self._send(batch)
                advance(len(batch))

    async def _send(self, batch: _Batch) -> None:
        pending = batch
        for attempt in range(1, self.max_attempts + 1):
            by_id = {str(index): (index, item) for index, item in pending}
            try:
                result = await self.client.send_message_batch(
                    QueueUrl=self.queue_url,
                    Entries=[_entry(index, item) for index, item in pending],
                )
            except (ClientError, BotoCoreError, OSError) as exc:
                code, message = _describe(exc)
                self.report.error = self.report.error or f"{code}: {message}"
                self.report.failed += [
                    FailedEntry(index, code, message, sender_fault=True) for index, _ in pending
                ]
                return
            self.report.sent += len(result.get("Successful", []))
            retry: _Batch = []
            for failure in result.get("Failed", []):
                index, item = by_id[failure["Id"]]
                sender_fault = failure.get("SenderFault", True)
                if not sender_fault and attempt < self.max_attempts:
                    retry.append((index, item))
                    continue
                self.report.failed.append(
                    FailedEntry(index, failure["Code"], failure.get("Message", ""), sender_fault)
                )
            if not retry:
                return
            await anyio.sleep(0.1 * 2 ** (attempt - 1))  # back off before the retry
            pending = retry


async def _batches(
    items: Iterable[SubmitItem] | AsyncIterable[SubmitItem], size: int
) -> AsyncIterator[_Batch]:
    """Number the items and cut them into batches of at most ``size`` and 256 KiB."""
    batch: _Batch = []
    batch_bytes = 0
    index = 0
    async for item in _aiter(items):
        item_bytes = _size(item)
        if batch and (len(batch) >= size or batch_bytes + item_bytes > MAX_BATCH_BYTES):
            yield batch
            batch, batch_bytes = [], 0
        batch.append((index, item))
        batch_bytes += item_bytes
        index += 1
    if batch:
        yield batch


async def _aiter(
    items: Iterable[SubmitItem] | AsyncIterable[SubmitItem],
) -> AsyncIterator[SubmitItem]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


def _size(item: SubmitItem) -> int:
    """Bytes SQS counts against the batch limit: body, attribute names, types and values."""
    attributes = item.message_attributes()
    extra = sum(len(k.encode()) + len(v.encode()) + len("String") for k, v in attributes.items())
    return len(item.body.encode()) + extra


def _entry(index: int, item: SubmitItem) -> SendMessageBatchRequestEntryTypeDef:
    attributes: dict[str, MessageAttributeValueTypeDef] = {
        name: {"DataType": "String", "StringValue": value}
        for name, value in item.message_attributes().items()
    }
    entry: SendMessageBatchRequestEntryTypeDef = {"Id": str(index), "MessageBody": item.body}
    if attributes:
        entry["MessageAttributes"] = attributes
    return entry


def _describe(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return str(error.get("Code", "ClientError")), str(error.get("Message", exc))
    return type(exc).__name__, str(exc)
