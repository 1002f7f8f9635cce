"""Delete handled requests ten per ``DeleteMessageBatch``: full batches, a short wait at most.

One collector gathers receipt handles; a batch goes out as soon as it holds ten, or when
its first handle has waited ``linger`` seconds (50 ms), with at most ``flushers`` calls in
flight (while all are busy, the next batch keeps filling). Measured in ``bench/``: one
``DeleteMessage`` costs the client about 0.8 ms of CPU, a batch of ten about 0.09 ms each;
sending whatever was queued the moment a flusher was free averaged five handles a call.
Deleting late is safe: the message stays hidden for its visibility timeout (minutes), far
longer than the wait. A delete whose call fails, or whose answer does not come within
`CALL_SECONDS`, is sent again (`ATTEMPTS` in all, within the visibility timeout): left, the
message would come back, and on its last receive the queue's redrive policy would move it
to the dead-letter queue without a reason although its execution exists. Deleting twice is
harmless. A delete that still fails is only logged: the request comes back and maps to the
same execution name, which the intake recognises as already started (invariant 4).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus

from dispatcher.aws.api import AWS_ERRORS

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient

log = structlog.get_logger("dispatcher.deleter")

BATCH = 10  # the SQS maximum per DeleteMessageBatch
LINGER = 0.05
"""Seconds the first handle of a batch waits for nine more (a few hundred starts per
second fill a batch in well under this; a lone delete goes out this late)."""
ATTEMPTS = 4
"""Calls per batch at most: a failed or unanswered one is sent again."""
CALL_SECONDS = 8.0
"""Seconds one call may take (the SDK's own retries included) before it is sent again: the
attempts and their pauses stay well within a visibility timeout of 30 s or more."""


class DeleteBatcher:
    """Batches deletes of one queue; `run` it in a task group, `close` it to drain and end."""

    def __init__(
        self,
        sqs: SQSClient,
        queue_url: str,
        *,
        flushers: int = 4,
        linger: float = LINGER,
        call_seconds: float = CALL_SECONDS,
        pause: float = 0.5,
    ) -> None:
        self.sqs = sqs
        self.queue_url = queue_url
        self.flushers = flushers
        self.linger = linger
        self.call_seconds = call_seconds
        self.pause = pause  # before the second call; doubled for each next one (2 s at most)
        self.calls = 0
        self.deleted = 0
        self._pending: list[str] = []
        self._closed = False
        self._arrived = anyio.Event()  # a first handle arrived, or closed
        self._full = anyio.Event()  # a batch is full, or closed

    async def delete(self, receipt_handle: str) -> None:
        """Queue one delete (never waits: the handles queued are bounded by the requests
        being handled)."""
        if self._closed:
            raise anyio.ClosedResourceError
        self._pending.append(receipt_handle)
        self._arrived.set()
        if len(self._pending) >= BATCH:
            self._full.set()

    def close(self) -> None:
        """No more deletes: what is queued goes out at once, then `run` returns."""
        self._closed = True
        self._arrived.set()
        self._full.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Flush until closed and drained."""
        calls = anyio.Semaphore(self.flushers)  # released by the call's own task
        try:
            async with anyio.create_task_group() as tg:
                task_status.started()
                await self._collect(tg, calls)
        finally:
            log.info(
                "dispatcher.deletes_flushed",
                queue=self.queue_url,
                calls=self.calls,
                deleted=self.deleted,
                left=len(self._pending),
            )

    async def _collect(self, tg: TaskGroup, calls: anyio.Semaphore) -> None:
        """Cut batches until closed and drained; each is sent in a task of ``tg``."""
        while True:
            if not self._pending:
                if self._closed:
                    break
                await self._arrived.wait()
                continue
            if len(self._pending) < BATCH and not self._closed:
                with anyio.move_on_after(self.linger):
                    await self._full.wait()
            # While every flusher is busy, the batch keeps filling.
            await calls.acquire()
            batch, self._pending = self._pending[:BATCH], self._pending[BATCH:]
            if not self._pending:
                self._arrived = anyio.Event()
            if len(self._pending) < BATCH:
                self._full = anyio.Event()
            if self._closed:
                self._arrived.set()
                self._full.set()
            tg.start_soon(self._delete, batch, calls)

    async def _delete(self, batch: list[str], calls: anyio.Semaphore) -> None:
        try:
            await self._send(batch)
        finally:
            calls.release()

    async def _send(self, batch: list[str]) -> None:
        """Delete ``batch``; what failed for a reason that may pass (no answer, a server
        fault) is sent again, after a short pause, `ATTEMPTS` calls in all."""
        pending = batch
        for attempt in range(ATTEMPTS):
            if attempt:
                await anyio.sleep(min(2.0, self.pause * 2 ** (attempt - 1)))
            self.calls += 1
            result = None
            with anyio.move_on_after(self.call_seconds):
                try:
                    result = await self.sqs.delete_message_batch(
                        QueueUrl=self.queue_url,
                        Entries=[{"Id": str(i), "ReceiptHandle": h} for i, h in enumerate(pending)],
                    )
                except AWS_ERRORS as exc:
                    log.warning("dispatcher.delete_failed", error=str(exc), count=len(pending))
                    continue
            if result is None:
                log.warning("dispatcher.delete_failed", error="no answer", count=len(pending))
                continue
            failed = result.get("Failed", [])
            self.deleted += len(pending) - len(failed)
            for entry in failed:
                log.warning(
                    "dispatcher.delete_failed", code=entry.get("Code"), detail=entry.get("Message")
                )
            # A sender fault (a stale receipt handle: the message came back) cannot pass.
            pending = [pending[int(e["Id"])] for e in failed if not e.get("SenderFault")]
            if not pending:
                return
