"""The receive budget: every hand-back is a receive, and SQS moves a request to the
dead-letter queue on its own, without a reason, after ``maxReceiveCount`` receives. On
fakes: a valid request on its last receive is never handed back silently."""

from __future__ import annotations

from typing import Any

import pytest

from dispatcher.daemon.deadletter import REASON_ATTRIBUTE
from dispatcher.daemon.queues import RequestQueue
from tests.fake_intake import handle, intake_of
from tests.fakes import (
    DEAD_LETTER_QUEUE,
    REQUEST_QUEUE,
    World,
    build_world,
    sqs_message,
    throttled,
)

pytestmark = [pytest.mark.timeout(10), pytest.mark.usefixtures("fast_retries")]

MAX_RECEIVES = 5


RETRY_ATTEMPTS = 2  # stamina's test mode (the fast_retries fixture)


def received(times: int, message_id: str = "m-1") -> dict[str, Any]:
    """A valid request received for the ``times``-th time."""
    return sqs_message(
        '{"n": 1}', message_id=message_id, system={"ApproximateReceiveCount": str(times)}
    )


def dead_letters(world: World) -> list[dict[str, Any]]:
    """The copies sent to the dead-letter queue."""
    return [c for c in world.sqs.calls_to("send_message") if c["QueueUrl"] == DEAD_LETTER_QUEUE]


async def test_a_start_given_up_on_the_last_receive_is_dead_lettered_with_the_reason() -> None:
    """Once its execution is known not to exist: an attempt in an earlier receive (or
    process) may have started it, so it is described after D and the grace first. (SQS
    refuses its copy: renewed instead, it would not be dead-lettered.)"""
    world = build_world()
    world.sqs.refuse_sends_to.add(REQUEST_QUEUE)
    world.sfn.fail_always("start_execution", throttled())
    intake = intake_of(world)
    intake.queues[0].max_receive_count = MAX_RECEIVES
    await handle(world, received(MAX_RECEIVES), intake)
    assert dead_letters(world) == []
    world.clock.advance(world.settings.start_timeout + world.settings.start_grace)
    assert await intake.starter.last_receives.settle_once() == 1
    [copy] = dead_letters(world)
    assert copy["MessageAttributes"][REASON_ATTRIBUTE]["StringValue"] == "receive_limit"
    assert world.sample("dispatcher_dead_letters_total", pool="default", reason="receive_limit")
    handed = [c for c in world.sqs.calls_to("change_message_visibility") if c["VisibilityTimeout"]]
    assert handed == [], "handed back, SQS would move it without a reason"


async def test_a_start_given_up_earlier_is_handed_back_as_before() -> None:
    world = build_world()
    world.sfn.fail_always("start_execution", throttled())
    intake = intake_of(world)
    intake.queues[0].max_receive_count = MAX_RECEIVES
    await handle(world, received(MAX_RECEIVES - 1), intake)
    assert dead_letters(world) == []
    [handed] = world.sqs.calls_to("change_message_visibility")
    assert handed["VisibilityTimeout"] == 30


async def test_without_a_redrive_policy_nothing_is_dead_lettered_for_receives() -> None:
    world = build_world()
    world.sfn.fail_always("start_execution", throttled())
    await handle(world, received(1000))
    assert dead_letters(world) == []


async def test_the_last_receive_not_renewed_waits_in_the_room_instead_of_being_deferred() -> None:
    """Its copy refused (a renewal, see tests/test_last_receive.py), it waits in the room."""
    world = build_world(limit=0, max_waiting=0)
    world.pool.ledger.set_limit(0)
    world.sqs.refuse_sends_to.add(REQUEST_QUEUE)
    intake = intake_of(world)
    intake.queues[0].max_receive_count = MAX_RECEIVES
    await intake.admit(intake.queues[0], received(MAX_RECEIVES))
    assert len(world.pool.room) == 1
    assert world.sqs.calls_to("change_message_visibility") == []


async def test_a_paused_pool_receives_nothing() -> None:
    world = build_world(limit=0, max_waiting=0)
    assert world.pool.wanted(0, 0) == 0
    world.pool.ledger.set_limit(1)
    assert world.pool.wanted(0, 0) == 1


async def test_handing_back_many_dead_letters_only_those_on_their_last_receive() -> None:
    """(SQS refuses the copy of the one on its last receive: renewed instead, it would not
    be dead-lettered.)"""
    world = build_world()
    world.sqs.refuse_sends_to.add(REQUEST_QUEUE)
    intake = intake_of(world)
    queue: RequestQueue = intake.queues[0]
    queue.max_receive_count = MAX_RECEIVES
    assert queue.url == REQUEST_QUEUE
    back = await queue.hand_back_all(
        [received(MAX_RECEIVES, "last"), received(1, "first")], "waiting at shutdown"
    )
    assert back == 1
    assert dead_letters(world) == [], "not before its execution is known not to exist"
    world.clock.advance(world.settings.start_timeout + world.settings.start_grace)
    await intake.starter.last_receives.settle_once()
    [copy] = dead_letters(world)
    assert copy["MessageAttributes"]["dispatcher-original-message-id"]["StringValue"] == "last"
    [batch] = world.sqs.calls_to("change_message_visibility_batch")
    assert [e["ReceiptHandle"] for e in batch["Entries"]] == ["rh-first"]
