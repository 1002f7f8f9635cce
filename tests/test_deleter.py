"""Batched deletes: full batches of ten, a lone delete only ``linger`` late, each handle once."""

from __future__ import annotations

from typing import Any, cast

import anyio
import pytest

from dispatcher.daemon.deleter import ATTEMPTS, DeleteBatcher
from tests.fakes import FakeSQS, client_error

QUEUE = "https://sqs.us-east-1.amazonaws.com/123456789012/requests"

pytestmark = pytest.mark.timeout(10)


class SlowSQS(FakeSQS):
    """Holds every batch delete until ``release`` is set, as a network round trip would."""

    def __init__(self) -> None:
        super().__init__()
        self.release = anyio.Event()

    async def delete_message_batch(
        self,
        *,
        QueueUrl: str,  # noqa: N803 - botocore's keyword names
        Entries: list[dict[str, str]],  # noqa: N803
    ) -> dict[str, Any]:
        result = await super().delete_message_batch(QueueUrl=QueueUrl, Entries=Entries)
        await self.release.wait()
        return result


def _sizes(sqs: FakeSQS) -> list[int]:
    return [len(call["Entries"]) for call in sqs.calls_to("delete_message_batch")]


def _handles(sqs: FakeSQS) -> list[str]:
    calls = sqs.calls_to("delete_message_batch")
    return [entry["ReceiptHandle"] for call in calls for entry in call["Entries"]]


async def test_a_burst_goes_out_in_full_batches() -> None:
    sqs = FakeSQS()
    batcher = DeleteBatcher(cast(Any, sqs), QUEUE, linger=60)
    async with anyio.create_task_group() as tg:
        await tg.start(batcher.run)
        for i in range(45):
            await batcher.delete(f"rh-{i}")
        with anyio.fail_after(5):
            while len(_sizes(sqs)) < 4:
                await sqs.called("delete_message_batch")
                await anyio.lowlevel.checkpoint()
        # Four full batches at once; the last five wait for company (the linger is long).
        assert _sizes(sqs) == [10, 10, 10, 10]
        batcher.close()  # closing sends the partial batch without waiting out the linger
    assert _sizes(sqs) == [10, 10, 10, 10, 5]
    assert sorted(_handles(sqs)) == sorted(f"rh-{i}" for i in range(45)), "each deleted once"
    assert batcher.deleted == 45
    assert batcher.calls == 5


async def test_a_lone_delete_goes_out_after_the_linger() -> None:
    sqs = FakeSQS()
    batcher = DeleteBatcher(cast(Any, sqs), QUEUE, linger=0.01)
    async with anyio.create_task_group() as tg:
        await tg.start(batcher.run)
        await batcher.delete("rh-alone")
        with anyio.fail_after(5):  # not closed: only the linger sends it
            await sqs.called("delete_message_batch")
        batcher.close()
    assert sqs.calls_to("delete_message_batch") == [
        {"QueueUrl": QUEUE, "Entries": [{"Id": "0", "ReceiptHandle": "rh-alone"}]}
    ]


async def test_batches_fill_while_every_flusher_is_busy() -> None:
    sqs = SlowSQS()
    batcher = DeleteBatcher(cast(Any, sqs), QUEUE, flushers=1, linger=0)
    async with anyio.create_task_group() as tg:
        await tg.start(batcher.run)
        await batcher.delete("rh-0")
        with anyio.fail_after(5):
            await sqs.called("delete_message_batch")  # the one flusher is now busy
        for i in range(1, 13):
            await batcher.delete(f"rh-{i}")
        sqs.release.set()
        batcher.close()
    # No linger at all, yet the twelve queued behind the busy call went out as 10 + 2.
    assert _sizes(sqs) == [1, 10, 2]
    assert sorted(_handles(sqs)) == sorted(f"rh-{i}" for i in range(13))


async def test_a_batch_that_keeps_failing_is_logged_not_fatal() -> None:
    sqs = FakeSQS()
    sqs.fail_always("delete_message_batch", client_error("InternalError", 500))
    batcher = DeleteBatcher(cast(Any, sqs), QUEUE, flushers=1, pause=0.01)
    async with anyio.create_task_group() as tg:
        await tg.start(batcher.run)
        await batcher.delete("rh-1")
        batcher.close()
    assert batcher.calls == ATTEMPTS
    assert batcher.deleted == 0


async def test_a_failed_batch_is_sent_again() -> None:
    """A delete lost on the wire is sent again: left, the message would come back, and on
    its last receive the redrive policy would move it without a reason."""
    sqs = FakeSQS()
    sqs.fail("delete_message_batch", client_error("InternalError", 500))
    batcher = DeleteBatcher(cast(Any, sqs), QUEUE, flushers=1, pause=0.01)
    async with anyio.create_task_group() as tg:
        await tg.start(batcher.run)
        await batcher.delete("rh-1")
        batcher.close()
    assert _handles(sqs) == ["rh-1", "rh-1"]
    assert batcher.deleted == 1


async def test_an_unanswered_batch_is_sent_again() -> None:
    """A call whose answer never comes is cut after `CALL_SECONDS` and sent again."""
    sqs = HangingOnceSQS()
    batcher = DeleteBatcher(cast(Any, sqs), QUEUE, flushers=1, call_seconds=0.1, pause=0.01)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(batcher.run)
            await batcher.delete("rh-1")
            batcher.close()
    assert _handles(sqs) == ["rh-1", "rh-1"]
    assert batcher.deleted == 1


class HangingOnceSQS(FakeSQS):
    """Its first batch delete never answers (lost on the wire)."""

    def __init__(self) -> None:
        super().__init__()
        self.hung = False

    async def delete_message_batch(
        self,
        *,
        QueueUrl: str,  # noqa: N803 - botocore's keyword names
        Entries: list[dict[str, str]],  # noqa: N803
    ) -> dict[str, Any]:
        result = await super().delete_message_batch(QueueUrl=QueueUrl, Entries=Entries)
        if not self.hung:
            self.hung = True
            await anyio.sleep_forever()
        return result
