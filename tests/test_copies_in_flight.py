"""Copies of a request that arrive while another copy of it is being started (a producer's
retry, a parent's retry with a new token, a message SQS stored twice), and a request kept on
its last receive while the renewals of others are held up. On fakes."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from dispatcher.core.deadline import format_deadline
from tests.fakes import DEAD_LETTER_QUEUE, World, build_world, sqs_message, throttled
from tests.test_last_receive import MAX_RECEIVES, world_of
from tests.test_last_receive import intake_for as last_receive_intake
from tests.test_start_by import T0, dead_letters, intake_for, reason_of
from tests.virtual_time import on_virtual_time

pytestmark = [pytest.mark.timeout(10), pytest.mark.usefixtures("fast_retries")]

TOKEN_A = "AQCEAAAAKgAAAAMAAAAAAAAAA" + "a" * 100
TOKEN_B = "AQCEAAAAKgAAAAMAAAAAAAAAA" + "b" * 100


def keyed(message_id: str, attributes: dict[str, str], receives: int = 1) -> dict[str, Any]:
    """A request with idempotency key ``order-7``, first received before the test's now."""
    return sqs_message(
        '{"n": 1}',
        message_id=message_id,
        attributes={"idempotency-key": "order-7", **attributes},
        system={
            "ApproximateFirstReceiveTimestamp": str(int((T0 - 10) * 1000)),
            "ApproximateReceiveCount": str(receives),
        },
    )


def deferred_for(world: World, message_id: str) -> list[int]:
    """How long each hand-back of ``message_id`` hid it."""
    calls = world.sqs.calls_to("change_message_visibility")
    return [c["VisibilityTimeout"] for c in calls if c["ReceiptHandle"] == f"rh-{message_id}"]


async def test_a_retry_with_a_later_start_by_runs_when_the_start_under_way_expires() -> None:
    """The first copy's start (start-by T0) is throttled and expires; the producer's retry
    (start-by T0 + 600) came in meanwhile, the room full. Deferred as a spare for 15
    minutes, it came back only to expire in turn, never tried, though the one slot was
    free all along. It comes back once the start under way has had its time."""
    world = build_world(limit=1, max_waiting=0)
    intake, wall, _ = intake_for(world, now=T0 - 1)
    queue, release, real_start = intake.queues[0], anyio.Event(), world.sfn.start_execution

    async def start_execution(**kwargs: Any) -> Any:  # the first attempt: throttled, late
        if not world.sfn.calls_to("start_execution"):
            world.sfn.calls.append(("start_execution", kwargs))
            await release.wait()
            raise throttled()
        return await real_start(**kwargs)

    world.sfn.start_execution = start_execution  # type: ignore[method-assign]
    later = format_deadline(T0 + 600)
    await intake.admit(queue, keyed("m-1", {"start-by": format_deadline(T0)}))
    async with anyio.create_task_group() as handlers:
        intake.dispatch_once(world.pool, handlers)
        while not world.sfn.calls_to("start_execution"):
            await anyio.lowlevel.checkpoint()
        at = wall()
        await intake.admit(queue, keyed("m-2", {"start-by": later}))
        wall.advance(2)  # m-1's start-by passes before its retry
        release.set()
    [delay] = deferred_for(world, "m-2")
    assert at + delay < T0 + 600, "back only after its own start-by"
    wall.advance(max(0.0, at + delay - wall()))
    await intake.admit(queue, keyed("m-2", {"start-by": later}, 2))
    async with anyio.create_task_group() as handlers:
        intake.dispatch_once(world.pool, handlers)
    assert [reason_of(d) for d in dead_letters(world)] == ["expired"], "m-1 only"
    assert len(world.sfn.executions) == 1, "the retry started it"


async def test_a_parents_retry_for_a_child_being_started_waits_heartbeated() -> None:
    """A parent's retry (new token, same key) arrives while the child's start is on the
    wire, the room full. Deferred, its parent got no heartbeat (a deferred token is not
    heartbeated) for as long as the deferral; it gets in beyond the room's capacity, as a
    token for a child that runs does, and its parent is heartbeated."""
    world = build_world(limit=1, max_waiting=0)
    intake, _, callbacks = intake_for(world, now=T0 - 60)
    queue = intake.queues[0]
    world.sfn.start_gate = anyio.Event()
    await intake.admit(queue, keyed("m-1", {"task-token": TOKEN_A}))
    async with anyio.create_task_group() as handlers:
        intake.dispatch_once(world.pool, handlers)
        while not world.sfn.calls_to("start_execution"):  # m-1's start is on the wire
            await anyio.lowlevel.checkpoint()
        await intake.admit(queue, keyed("m-2", {"task-token": TOKEN_B}))
        assert deferred_for(world, "m-2") == [], "deferred: its parent gets no heartbeat"
        world.sfn.start_gate.set()  # the child starts, and runs
    world.clock.advance(world.settings.heartbeat_interval)
    await callbacks.heartbeat_once()
    beaten = [c["taskToken"] for c in world.sfn.calls_to("send_task_heartbeat")]
    assert TOKEN_B in beaten


@on_virtual_time
async def test_a_kept_request_is_renewed_before_it_is_dead_lettered() -> None:
    """One renewal's delete of its original goes unanswered (tried for half a visibility
    timeout and more); the renew pass waits for it, and a request kept meanwhile was
    described D + grace later and dead-lettered as receive_limit without its copy ever
    being tried. The describe pass renews it first."""
    world = world_of(limit=0)
    world.pool.ledger.set_limit(0)
    intake, _ = last_receive_intake(world, renewals=True)  # SQS takes every copy
    kept = intake.starter.last_receives
    delete, deleting = world.sqs.delete_message, anyio.Event()

    async def slow_delete(**call: Any) -> Any:  # m-1's original: its deletes go unanswered
        if call["ReceiptHandle"] == "rh-m-1":
            deleting.set()
            await anyio.sleep_forever()
        return await delete(**call)

    world.sqs.delete_message = slow_delete  # type: ignore[method-assign]

    def entry(message_id: str) -> Any:
        system = {"ApproximateReceiveCount": str(MAX_RECEIVES)}
        message = sqs_message("{}", message_id=message_id, system=system)
        return intake._entry_of(intake.queues[0], message)

    kept.keep(entry("m-1"), "in doubt")
    async with anyio.create_task_group() as tg:
        tg.start_soon(kept.run)
        await deleting.wait()  # m-1's copy sent; its original's delete goes on
        kept.keep(entry("m-2"), "in doubt")
        for _ in range(20):  # past D + grace (15 s)
            await anyio.sleep(1)
            world.clock.advance(1)
        tg.cancel_scope.cancel()
    sends = [
        (c["QueueUrl"], c["MessageAttributes"]["dispatcher-original-message-id"]["StringValue"])
        for c in world.sqs.calls_to("send_message")
    ]
    assert (DEAD_LETTER_QUEUE, "m-2") not in sends, "dead-lettered without a renewal tried"
    assert any(original == "m-2" and url != DEAD_LETTER_QUEUE for url, original in sends)
