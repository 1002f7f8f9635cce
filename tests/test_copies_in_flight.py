"""Copies of a request that arrive while another copy of it is being started (a producer's
retry, a parent's retry with a new token, a message SQS stored twice), and a request kept on
its last receive while the renewals of others are held up. On fakes."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from dispatcher.core.deadline import format_deadline
from dispatcher.daemon.intake import Intake
from dispatcher.daemon.starter import Waiting
from tests.fakes import (
    DEAD_LETTER_QUEUE,
    REQUEST_QUEUE,
    World,
    build_world,
    client_error,
    sqs_message,
    throttled,
)
from tests.test_last_receive import MAX_RECEIVES, deleted_handles, world_of
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


def on_last_receive(intake: Intake, message_id: str) -> Waiting:
    """A request on its last receive, as the intake reads it."""
    system = {"ApproximateReceiveCount": str(MAX_RECEIVES)}
    message = sqs_message("{}", message_id=message_id, system=system)
    entry = intake._entry_of(intake.queues[0], message)
    assert entry is not None
    return entry


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

    kept.keep(on_last_receive(intake, "m-1"), "in doubt")
    async with anyio.create_task_group() as tg:
        tg.start_soon(kept.run)
        await deleting.wait()  # m-1's copy sent; its original's delete goes on
        kept.keep(on_last_receive(intake, "m-2"), "in doubt")
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


@on_virtual_time
async def test_a_kept_request_whose_renewal_got_no_answer_is_not_dead_lettered() -> None:
    """A renewal's send got no answer: its copy may be in the queue, carrying the request.
    Once "does not exist" came, the kept original was dead-lettered and its parent told so,
    while that copy went on - and was dropped on its next receive, its parent gone: the
    request had no execution and no dead letter (the simulation's seed 1379). It is not
    dead-lettered before that copy would have shown; renewed meanwhile."""
    world = world_of(limit=0)
    world.pool.ledger.set_limit(0)
    intake, _ = last_receive_intake(world, renewals=True)
    kept = intake.starter.last_receives
    real_send = world.sqs.send_message
    answered = False

    async def send_message(**call: Any) -> Any:  # copies get no answer until told
        if call["QueueUrl"] != DEAD_LETTER_QUEUE and not answered:
            await real_send(**call)  # applied...
            await anyio.sleep_forever()  # ... and its answer lost
        return await real_send(**call)

    world.sqs.send_message = send_message  # type: ignore[method-assign]
    kept.keep(on_last_receive(intake, "m-1"), "in doubt")
    async with anyio.create_task_group() as tg:
        tg.start_soon(kept.run)
        for _ in range(40):  # past D + grace, with renewals unanswered
            await anyio.sleep(1)
            world.clock.advance(1)
        assert [
            c for c in world.sqs.calls_to("send_message") if c["QueueUrl"] == DEAD_LETTER_QUEUE
        ] == [], "dead-lettered while a copy may carry it"
        answered = True
        for _ in range(70):
            await anyio.sleep(1)
            world.clock.advance(1)
        tg.cancel_scope.cancel()
    assert len(kept) == 0, "renewed once a send was answered"


@on_virtual_time
async def test_a_kept_request_found_run_is_deleted_though_a_delete_gets_no_answer() -> None:
    """Kept on its last receive, found to have run: its message's delete (one try, after
    the reign without a batcher to retry it) got no answer, the message came back past
    maxReceiveCount and SQS moved it without a reason (the simulation's seed 784); a try
    held on the wire for the client's minute-long read timeout let it lapse too (seed
    987). It is deleted as a dead letter's is: each try bounded, kept hidden between."""
    world = world_of(limit=0)
    world.pool.ledger.set_limit(0)
    world.sqs.refuse_sends_to.add(REQUEST_QUEUE)  # no renewal: settled by a describe
    intake, _ = last_receive_intake(world)
    world.sfn.add_execution("m-1", "{}")
    kept = intake.starter.last_receives
    real_delete = world.sqs.delete_message
    tries: list[float] = []

    async def delete_message(**call: Any) -> Any:  # the first try gets no answer
        tries.append(anyio.current_time())
        if len(tries) == 1:
            await anyio.sleep_forever()
        return await real_delete(**call)

    world.sqs.delete_message = delete_message  # type: ignore[method-assign]
    entry = on_last_receive(intake, "m-1")
    kept.keep(entry, "in doubt")
    world.clock.advance(world.settings.start_timeout + world.settings.start_grace)
    with anyio.fail_after(60):
        await kept.settle_once()
    assert len(tries) == 2
    assert tries[1] - tries[0] < 15, "the second try waited for the first's read timeout"
    assert entry.request.receipt_handle in deleted_handles(world)


@on_virtual_time
async def test_renewals_refused_after_one_unanswered_end_in_a_dead_letter() -> None:
    """One send got no answer, every later one is refused (the queue's policy denies it):
    once the copy that send may have left would have shown, "does not exist" dead-letters
    the request, as any whose copies are refused. Kept for ever, it had no execution and no
    dead letter (the simulation's seed 868)."""
    world = world_of(limit=0)
    world.pool.ledger.set_limit(0)
    intake, _ = last_receive_intake(world, renewals=True)
    kept = intake.starter.last_receives
    sends = 0

    async def send_message(**call: Any) -> Any:
        nonlocal sends
        if call["QueueUrl"] == DEAD_LETTER_QUEUE:
            return {"MessageId": "dl-1"}
        sends += 1
        if sends == 1:
            await anyio.sleep_forever()  # no answer (never applied)
        raise client_error("AccessDenied", 403)

    world.sqs.send_message = send_message  # type: ignore[method-assign]
    kept.keep(on_last_receive(intake, "m-1"), "in doubt")
    settings = world.settings
    shown = settings.visibility_timeout + settings.start_timeout + settings.start_grace
    async with anyio.create_task_group() as tg:
        tg.start_soon(kept.run)
        for _ in range(int(shown) + 130):  # describes back off (60 s at most)
            await anyio.sleep(1)
            world.clock.advance(1)
        tg.cancel_scope.cancel()
    assert len(kept) == 0, "kept for ever"
