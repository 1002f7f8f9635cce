"""Batched deletes: nothing waits for a batch to fill, every handle is deleted once."""

from __future__ import annotations

from typing import Any, cast

import anyio

from dispatcher.deleter import DeleteBatcher
from tests.fakes import FakeSQS, client_error

QUEUE = "https://sqs.us-east-1.amazonaws.com/123456789012/requests"


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
        await self.release.wait()
        return await super().delete_message_batch(QueueUrl=QueueUrl, Entries=Entries)


async def test_a_burst_shares_batches_of_at_most_ten() -> None:
    sqs = SlowSQS()
    batcher = DeleteBatcher(cast(Any, sqs), QUEUE, flushers=2)
    async with anyio.create_task_group() as tg:
        await tg.start(batcher.run)
        for i in range(45):
            await batcher.delete(f"rh-{i}")  # the first two calls are in flight meanwhile
        sqs.release.set()
        batcher.close()
    calls = sqs.calls_to("delete_message_batch")
    handles = [entry["ReceiptHandle"] for call in calls for entry in call["Entries"]]
    assert sorted(handles) == sorted(f"rh-{i}" for i in range(45)), "each deleted exactly once"
    assert all(1 <= len(call["Entries"]) <= 10 for call in calls)
    assert len(calls) <= 2 + 5, "two in flight, then the other 43 in batches of ten"
    assert batcher.deleted == 45


async def test_a_lone_delete_goes_out_without_waiting_for_company() -> None:
    sqs = FakeSQS()
    batcher = DeleteBatcher(cast(Any, sqs), QUEUE)
    async with anyio.create_task_group() as tg:
        await tg.start(batcher.run)
        await batcher.delete("rh-alone")
        batcher.close()  # closing does not wait for a batch to fill: the lone one goes out
    [call] = sqs.calls_to("delete_message_batch")
    assert call["Entries"] == [{"Id": "0", "ReceiptHandle": "rh-alone"}]


async def test_a_failed_batch_is_logged_not_fatal() -> None:
    sqs = FakeSQS()
    sqs.fail("delete_message_batch", client_error("InternalError", 500))
    batcher = DeleteBatcher(cast(Any, sqs), QUEUE, flushers=1)
    async with anyio.create_task_group() as tg:
        await tg.start(batcher.run)
        await batcher.delete("rh-1")
        batcher.close()
    assert batcher.calls == 1
    assert batcher.deleted == 0
