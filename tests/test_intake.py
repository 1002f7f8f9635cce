"""Intake on fakes: one request at a time (`handle`: admit, dispatch, start) and one
receive pass (`Intake.receive_once`)."""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
import anyio
import pytest
import stamina
from botocore.exceptions import ClientError
from structlog.testing import capture_logs

from dispatcher.core.requests import IDEMPOTENCY_ATTRIBUTE, execution_arn
from dispatcher.daemon.deadletter import DETAIL_ATTRIBUTE, ORIGINAL_ID_ATTRIBUTE, REASON_ATTRIBUTE
from dispatcher.daemon.intake import RECEIVE_GRACE
from dispatcher.daemon.starter import _Handling
from tests.fake_intake import dispatch_all, finish, handle, intake_of, waiting
from tests.fakes import (
    DEAD_LETTER_QUEUE,
    DEFAULT_MAX_MESSAGE_SIZE,
    REQUEST_QUEUE,
    STATE_MACHINE_ARN,
    World,
    build_world,
    client_error,
    sqs_message,
    throttled,
)
from tests.virtual_time import on_virtual_time

pytestmark = pytest.mark.timeout(10)

MESSAGE_ID = "2f6c0f7e-8b1a-4c3d-9e5f-0a1b2c3d4e5f"
ARN = execution_arn(STATE_MACHINE_ARN, MESSAGE_ID)
KEYED_ARN = execution_arn(STATE_MACHINE_ARN, "order-1")


def assert_slot_free(world: World) -> None:
    """Nothing held, nothing reserved: the reservation was given back."""
    ledger = world.pool.ledger
    assert ledger.running_count == 0
    assert ledger.reserved_count == 0
    assert ledger.free == ledger.limit


def keyed(body: str = '{"n": 1}', **kwargs: Any) -> dict[str, Any]:
    """A request carrying the idempotency key ``order-1``."""
    return sqs_message(body, attributes={IDEMPOTENCY_ATTRIBUTE: "order-1"}, **kwargs)


# -- one request -----------------------------------------------------------------------


async def test_started_request_is_held_then_deleted() -> None:
    world = build_world()
    sent_ms = str(int((time.time() - 5) * 1000))
    message = sqs_message('{"n": 1}', message_id=MESSAGE_ID, system={"SentTimestamp": sent_ms})
    intake = await handle(world, message)
    assert world.pool.ledger.running == {ARN}
    assert world.pool.ledger.reserved_count == 0
    # Sent before this reign without an idempotency key: its former names are looked for
    # in one listing (a twin SQS stored may have started under one).
    assert world.sqs.names() == ["list_executions", "start_execution", "delete_message"]
    [start] = world.sfn.calls_to("start_execution")
    assert start == {"stateMachineArn": STATE_MACHINE_ARN, "name": MESSAGE_ID, "input": '{"n": 1}'}
    [delete] = world.sqs.calls_to("delete_message")
    assert delete == {"QueueUrl": REQUEST_QUEUE, "ReceiptHandle": message["ReceiptHandle"]}
    assert world.sample("dispatcher_starts_total", pool="default", outcome="started") == 1
    assert world.sample("dispatcher_queue_wait_seconds_count", pool="default") == 1
    assert world.sample("dispatcher_queue_wait_seconds_sum", pool="default") >= 5
    assert world.sample("dispatcher_running", pool="default") == 1
    assert intake.stats.started == 1
    assert not intake.stats.in_flight


async def test_trace_header_is_passed_on() -> None:
    world = build_world()
    trace = "Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=1"
    await handle(world, sqs_message(system={"AWSTraceHeader": trace}))
    [start] = world.sfn.calls_to("start_execution")
    assert start["traceHeader"] == trace


@pytest.mark.usefixtures("fast_retries")
async def test_throttled_twice_then_started_once() -> None:
    world = build_world()
    world.sfn.fail("start_execution", throttled(), throttled())
    intake = await handle(world, sqs_message(message_id=MESSAGE_ID))
    assert world.sqs.names() == ["start_execution"] * 3 + ["delete_message"]
    assert world.pool.ledger.running == {ARN}
    assert intake.stats.started == 1
    assert world.sample("dispatcher_starts_total", pool="default", outcome="started") == 1
    assert world.sample("dispatcher_start_execution_seconds_count", pool="default") == 3


@pytest.mark.usefixtures("fast_retries")
@pytest.mark.parametrize("code", ["InvalidExecutionInput", "ValidationException", "InvalidName"])
async def test_permanent_error_dead_letters_with_the_reason_then_deletes(code: str) -> None:
    world = build_world()
    world.sfn.fail("start_execution", client_error(code, 400))
    message = sqs_message('{"n": 1}', message_id=MESSAGE_ID, attributes={"customer": "c-1"})
    intake = await handle(world, message)
    assert world.sqs.names() == ["start_execution", "send_message", "delete_message"]
    [sent] = world.sqs.calls_to("send_message")
    assert sent["QueueUrl"] == DEAD_LETTER_QUEUE
    assert sent["MessageBody"] == '{"n": 1}'
    attributes = sent["MessageAttributes"]
    assert attributes[REASON_ATTRIBUTE] == {"DataType": "String", "StringValue": code}
    assert code in attributes[DETAIL_ATTRIBUTE]["StringValue"]
    assert attributes[ORIGINAL_ID_ATTRIBUTE]["StringValue"] == MESSAGE_ID
    assert attributes["customer"]["StringValue"] == "c-1"
    assert world.sqs.calls_to("delete_message")[0]["ReceiptHandle"] == message["ReceiptHandle"]
    assert_slot_free(world)
    assert intake.stats.dead_lettered == 1
    assert world.sample("dispatcher_dead_letters_total", pool="default", reason=code) == 1


@pytest.mark.usefixtures("fast_retries")
async def test_a_request_near_the_size_limit_is_dead_lettered_with_its_reason() -> None:
    """Body 300 bytes under the dead-letter queue's maximum, a 2,000-character refusal:
    the copy fits (detail cut), reason and original id kept, body unchanged."""
    world = build_world()
    refusal = "Invalid State Machine Execution Input: " + "x" * 2_000
    world.sfn.fail("start_execution", client_error("InvalidExecutionInput", 400, refusal))
    body = json.dumps({"pad": "p" * (DEFAULT_MAX_MESSAGE_SIZE - 300 - len('{"pad": ""}'))})
    assert len(body.encode()) == DEFAULT_MAX_MESSAGE_SIZE - 300
    message = sqs_message(body, message_id=MESSAGE_ID, attributes={"customer": "c-1"})
    intake = await handle(world, message)
    assert world.sqs.names() == ["start_execution", "send_message", "delete_message"]
    [copy] = world.sqs.visible[DEAD_LETTER_QUEUE]  # accepted by the (size-checking) fake
    assert copy["Body"] == body
    attributes = copy["MessageAttributes"]
    assert attributes[REASON_ATTRIBUTE]["StringValue"] == "InvalidExecutionInput"
    assert attributes[ORIGINAL_ID_ATTRIBUTE]["StringValue"] == MESSAGE_ID
    assert attributes["customer"]["StringValue"] == "c-1"
    detail = attributes[DETAIL_ATTRIBUTE]["StringValue"]
    assert detail.startswith("StartExecution refused the request: InvalidExecutionInput")
    assert len(detail) < 1_000
    assert intake.stats.dead_lettered == 1
    assert_slot_free(world)


async def test_bad_request_is_dead_lettered_without_a_start() -> None:
    world = build_world()
    await handle(world, sqs_message("not json"))
    assert world.sqs.names() == ["send_message", "delete_message"]
    [sent] = world.sqs.calls_to("send_message")
    assert sent["MessageAttributes"][REASON_ATTRIBUTE]["StringValue"] == "invalid_json"
    assert sent["MessageBody"] == "not json"
    assert_slot_free(world)


async def test_without_a_dead_letter_queue_a_bad_request_is_handed_back_at_once() -> None:
    world = build_world(dead_letter=False)
    message = sqs_message("not json")
    await handle(world, message)
    assert world.sqs.names() == ["change_message_visibility"]
    [handed] = world.sqs.calls_to("change_message_visibility")
    assert handed == {
        "QueueUrl": REQUEST_QUEUE,
        "ReceiptHandle": message["ReceiptHandle"],
        "VisibilityTimeout": 0,  # straight back: the redrive policy moves it after N receives
    }
    assert world.sample("dispatcher_dead_letters_total", pool="default", reason="invalid_json") == 1
    assert_slot_free(world)


async def test_a_poison_body_is_dead_lettered_and_the_slot_released() -> None:
    world = build_world()
    deep = "[" * 100_000 + "]" * 100_000
    await handle(world, sqs_message(deep))
    assert world.sqs.names() == ["send_message", "delete_message"]
    assert_slot_free(world)


async def test_unreachable_dead_letter_queue_keeps_the_request() -> None:
    world = build_world()
    world.sqs.fail("send_message", client_error("InternalError", 500))
    await handle(world, sqs_message("not json"))
    assert world.sqs.names() == ["send_message", "change_message_visibility"]
    assert world.sqs.calls_to("change_message_visibility")[0]["VisibilityTimeout"] == 30
    assert_slot_free(world)


@pytest.mark.usefixtures("fast_retries")
async def test_running_duplicate_with_the_same_input_is_adopted() -> None:
    world = build_world(aws_exact=False)  # MiniStack: ExecutionAlreadyExists while RUNNING
    world.sfn.add_execution("order-1", input='{"n": 1}')
    intake = await handle(world, keyed('{ "n" : 1 }'))  # same JSON, other spacing
    assert world.sqs.names() == ["start_execution", "describe_execution", "delete_message"]
    assert world.sfn.calls_to("describe_execution") == [{"executionArn": KEYED_ARN}]
    assert world.pool.ledger.running == {KEYED_ARN}
    assert world.pool.ledger.reserved_count == 0
    assert intake.stats.duplicates == 1
    assert world.sample("dispatcher_starts_total", pool="default", outcome="duplicate") == 1


@pytest.mark.usefixtures("fast_retries")
async def test_closed_duplicate_is_released_tombstoned_and_deleted() -> None:
    world = build_world()
    world.sfn.add_execution("order-1", input='{"n": 1}', status="SUCCEEDED")
    await handle(world, keyed())
    assert world.sqs.names() == ["start_execution", "describe_execution", "delete_message"]
    assert_slot_free(world)
    assert world.pool.ledger.is_tombstoned(KEYED_ARN)
    assert world.sample("dispatcher_starts_total", pool="default", outcome="duplicate") == 1


@pytest.mark.usefixtures("fast_retries")
async def test_same_name_with_another_input_is_an_idempotency_conflict() -> None:
    world = build_world()
    world.sfn.add_execution("order-1", input='{"n": 2}')
    await handle(world, keyed('{"n": 1}'))
    names = world.sqs.names()
    assert names == ["start_execution", "describe_execution", "send_message", "delete_message"]
    [sent] = world.sqs.calls_to("send_message")
    assert sent["MessageAttributes"][REASON_ATTRIBUTE]["StringValue"] == "idempotency_conflict"
    assert_slot_free(world)


@pytest.mark.usefixtures("fast_retries")
async def test_describe_after_already_exists_retries_until_the_execution_is_visible() -> None:
    world = build_world(aws_exact=False)
    world.sfn.add_execution("order-1", input='{"n": 1}')
    world.sfn.fail("describe_execution", client_error("ExecutionDoesNotExist"))
    await handle(world, keyed())
    assert world.sqs.names().count("describe_execution") == 2
    assert world.pool.ledger.running == {KEYED_ARN}


async def test_aws_exact_success_for_a_running_name_holds_one_arn_once() -> None:
    world = build_world(aws_exact=True)
    intake = intake_of(world)
    await handle(world, keyed(message_id="m-1"), intake)
    await handle(world, keyed(message_id="m-2"), intake)  # redelivered under another id
    assert len(world.sfn.executions) == 1
    assert world.pool.ledger.running == {KEYED_ARN}
    assert world.pool.ledger.reserved_count == 0
    assert world.pool.ledger.free == world.pool.ledger.limit - 1
    assert len(world.sqs.calls_to("delete_message")) == 2


async def test_aws_exact_success_for_a_running_name_counts_a_duplicate() -> None:
    world = build_world(aws_exact=True)
    intake = intake_of(world)
    await handle(world, keyed(message_id="m-1"), intake)
    await handle(world, keyed(message_id="m-2"), intake)
    assert world.sample("dispatcher_starts_total", pool="default", outcome="started") == 1
    assert world.sample("dispatcher_starts_total", pool="default", outcome="duplicate") == 1
    assert (intake.stats.started, intake.stats.duplicates) == (1, 1)


async def test_exhausted_retries_hand_the_request_back() -> None:
    with stamina.set_testing(True, attempts=4):
        world = build_world()
        world.sfn.fail_always("start_execution", throttled())
        message = sqs_message()
        intake = await handle(world, message)
    assert world.sqs.names() == ["start_execution"] * 4 + ["change_message_visibility"]
    [handed] = world.sqs.calls_to("change_message_visibility")
    assert handed["ReceiptHandle"] == message["ReceiptHandle"]
    assert handed["VisibilityTimeout"] == 30
    assert_slot_free(world)
    assert intake.stats.handed_back == 1
    assert world.sample("dispatcher_starts_total", pool="default", outcome="retried") == 1


async def test_retry_timeout_ends_the_retries() -> None:
    with stamina.set_testing(False):  # real stamina: the tiny timeout is what stops it
        world = build_world(start_retry_timeout=1e-6)
        world.sfn.fail_always("start_execution", throttled())
        await handle(world, sqs_message())
    assert world.sqs.names()[-1] == "change_message_visibility"
    assert "delete_message" not in world.sqs.names()
    assert_slot_free(world)  # every attempt was refused: nothing can have started


@pytest.mark.parametrize("code", ["AccessDeniedException", "StateMachineDoesNotExist"])
async def test_setup_error_never_dead_letters(code: str) -> None:
    with stamina.set_testing(True, attempts=3):
        world = build_world()
        world.sfn.fail_always("start_execution", client_error(code, 400))
        await handle(world, sqs_message())
    assert world.sqs.names() == ["start_execution"] * 3 + ["change_message_visibility"]
    assert world.sqs.calls_to("change_message_visibility")[0]["VisibilityTimeout"] == 30
    assert world.sample("dispatcher_dead_letters_total", pool="default", reason=code) == 0
    assert world.sample("dispatcher_starts_total", pool="default", outcome="dead_lettered") == 0
    assert_slot_free(world)


async def test_failed_delete_after_a_start_keeps_the_execution_held() -> None:
    world = build_world()
    world.sqs.fail("delete_message", client_error("InternalError", 500))
    await handle(world, sqs_message(message_id=MESSAGE_ID))
    assert world.pool.ledger.running == {ARN}


# -- one receive pass --------------------------------------------------------------------


def queue_requests(world: World, count: int) -> None:
    """Put ``count`` valid requests with distinct ids on the request queue."""
    for i in range(count):
        world.sqs.put(REQUEST_QUEUE, sqs_message(json.dumps({"i": i}), message_id=f"m-{i}"))


@pytest.mark.parametrize(("limit", "asked"), [(3, 3), (25, 10), (1, 1)])
async def test_with_no_room_receive_once_asks_for_no_more_than_the_free_slots(
    limit: int, asked: int
) -> None:
    world = build_world(limit=limit, max_waiting=0)  # nothing may wait beyond a free slot
    queue_requests(world, 30)
    intake = intake_of(world)
    assert await intake.receive_once(intake.queues[0]) == asked
    [receive] = world.sqs.calls_to("receive_message")
    assert receive == {
        "QueueUrl": REQUEST_QUEUE,
        "MaxNumberOfMessages": asked,
        "WaitTimeSeconds": world.settings.receive_wait_seconds,
        "VisibilityTimeout": world.settings.visibility_timeout,
        "MessageAttributeNames": ["All"],
        "MessageSystemAttributeNames": ["All"],
    }
    assert len(world.sqs.visible[REQUEST_QUEUE]) == 30 - asked
    assert intake.stats.received == asked
    assert await dispatch_all(intake, world.pool) == asked
    assert world.pool.ledger.running_count == asked
    assert intake.wanted(intake.queues[0]) == min(10, limit - asked)


async def test_a_plain_pool_receives_ahead_until_its_room_is_full() -> None:
    """One queue, no key attribute, its one slot taken: requests are received ahead into
    the waiting room (there their start-by is watched, and a freed slot takes the next at
    once), up to the room's size; the rest of the backlog stays in the queue. It used to
    receive only for free slots."""
    world = build_world(limit=1, max_waiting=15)
    world.pool.ledger.observe_running("arn:busy", world.clock())
    world.pool.update()
    queue_requests(world, 30)
    intake = intake_of(world)
    assert intake.wanted(intake.queues[0]) == 10
    assert await intake.receive_once(intake.queues[0]) == 10
    assert intake.wanted(intake.queues[0]) == 5
    assert await intake.receive_once(intake.queues[0]) == 5
    assert intake.wanted(intake.queues[0]) == 0, "the room is full"
    assert len(waiting(world)) == 15
    assert len(world.sqs.visible[REQUEST_QUEUE]) == 15
    assert await dispatch_all(intake, world.pool) == 0
    finish(world.pool, "arn:busy")
    assert await dispatch_all(intake, world.pool) == 1, "the freed slot takes the next"
    assert world.pool.ledger.running == {execution_arn(STATE_MACHINE_ARN, "m-0")}
    assert intake.wanted(intake.queues[0]) == 1


async def test_receive_once_counts_held_executions() -> None:
    world = build_world(limit=3, max_waiting=0)
    world.pool.ledger.observe_running("arn:elsewhere", world.clock())
    queue_requests(world, 5)
    intake = intake_of(world)
    await intake.receive_once(intake.queues[0])
    assert world.sqs.calls_to("receive_message")[0]["MaxNumberOfMessages"] == 2


async def test_received_requests_wait_in_the_room_until_dispatched() -> None:
    world = build_world(limit=3)
    queue_requests(world, 2)
    intake = intake_of(world)
    assert await intake.receive_once(intake.queues[0]) == 2
    assert [w.request.name for w in waiting(world)] == ["m-0", "m-1"]
    assert world.sample("dispatcher_requests_waiting", pool="default") == 2
    assert world.pool.ledger.reserved_count == 0
    assert world.sfn.calls_to("start_execution") == []
    assert intake.wanted(intake.queues[0]) == 10  # the third slot, and ahead into the room


async def test_fewer_messages_than_asked_reserve_only_what_they_start() -> None:
    world = build_world(limit=5)
    queue_requests(world, 2)
    world.sfn.start_gate = anyio.Event()
    intake = intake_of(world)
    assert await intake.receive_once(intake.queues[0]) == 2
    assert world.pool.receiving == 0
    async with anyio.create_task_group() as handlers:
        while intake.dispatch_once(world.pool, handlers):
            pass
        await anyio.wait_all_tasks_blocked()  # both handlers wait inside StartExecution
        assert world.pool.ledger.reserved_count == 2
        assert world.pool.ledger.free == 3
        assert world.sample("dispatcher_starting", pool="default") == 2
        world.sfn.start_gate.set()
    assert world.pool.ledger.running_count == 2
    assert world.pool.ledger.reserved_count == 0


@on_virtual_time
async def test_empty_receive_leaves_every_slot_free() -> None:
    world = build_world(limit=4, max_waiting=0)
    intake = intake_of(world)
    began = anyio.current_time()
    assert await intake.receive_once(intake.queues[0]) == 0
    assert anyio.current_time() - began == world.settings.receive_wait_seconds, "a long poll"
    assert_slot_free(world)
    assert world.pool.receiving == 0
    assert waiting(world) == []
    assert intake.wanted(intake.queues[0]) == 4


@on_virtual_time
async def test_a_fake_long_poll_waits_for_a_message_or_its_wait_as_sqs_does() -> None:
    """The fakes long-poll: an empty queue's receive answers when a message arrives, or
    empty once its wait is over (on virtual time; it used to answer at once, so a receive
    loop with nothing to receive spun without ever yielding)."""
    world = build_world()
    answers: list[tuple[float, dict[str, Any]]] = []
    began = anyio.current_time()

    async def poll() -> None:
        answer = await world.sqs.receive_message(QueueUrl=REQUEST_QUEUE, WaitTimeSeconds=20)
        answers.append((anyio.current_time() - began, answer))

    async with anyio.create_task_group() as tg:
        tg.start_soon(poll)
        await anyio.wait_all_tasks_blocked()
        assert answers == []
        world.sqs.put(REQUEST_QUEUE, sqs_message(message_id="m-1"))
    [(after, answer)] = answers
    assert after == 0
    assert [m["MessageId"] for m in answer["Messages"]] == ["m-1"]
    await poll()
    assert answers[1] == (20, {})


async def test_failed_receive_leaves_nothing_claimed() -> None:
    world = build_world(limit=4, max_waiting=0)
    world.sqs.fail("receive_message", client_error("InternalError", 500))
    intake = intake_of(world)
    with pytest.raises(ClientError):
        await intake.receive_once(intake.queues[0])
    assert_slot_free(world)
    assert world.pool.receiving == 0
    assert world.sample("dispatcher_starting", pool="default") == 0
    assert intake.wanted(intake.queues[0]) == 4


async def test_receive_once_waits_for_a_free_slot_without_receiving() -> None:
    world = build_world(limit=1, max_waiting=0)  # the room takes nothing ahead
    world.pool.ledger.observe_running("arn:busy", world.clock())
    world.pool.update()
    queue_requests(world, 1)
    intake = intake_of(world)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(intake.receive_once, intake.queues[0])
            await anyio.wait_all_tasks_blocked()
            assert world.sqs.calls_to("receive_message") == []
            finish(world.pool, "arn:busy")  # what an event or reconcile does: wakes intake
    assert world.sqs.calls_to("receive_message")[0]["MaxNumberOfMessages"] == 1
    assert [w.request.name for w in waiting(world)] == ["m-0"]
    await dispatch_all(intake, world.pool)
    assert world.pool.ledger.running == {execution_arn(STATE_MACHINE_ARN, "m-0")}


async def test_a_request_is_hidden_since_its_receive_was_sent_not_since_it_was_admitted() -> None:
    """The receive's answer (or the admission of the messages before it) may take long:
    the message's visibility runs from SQS's answer, so the waiting room counts it from
    when the receive was sent - its extension is then due in time (it used to be counted
    from its admission, and extended after its visibility had run out)."""
    world = build_world(limit=1)
    queue_requests(world, 1)
    intake = intake_of(world)
    sent = world.clock()
    world.sqs.receive_gate = anyio.Event()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(intake.receive_once, intake.queues[0])
            await world.sqs.called("receive_message")
            world.clock.advance(40.0)
            world.sqs.receive_gate.set()
    [entry] = waiting(world)
    assert entry.hidden_since == sent


async def test_receive_once_is_cancellable_while_it_waits() -> None:
    world = build_world(limit=1, max_waiting=0)
    world.pool.ledger.observe_running("arn:busy", world.clock())
    world.pool.update()
    queue_requests(world, 1)
    intake = intake_of(world)
    async with anyio.create_task_group() as tg:
        tg.start_soon(intake.receive_once, intake.queues[0])
        await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()
    assert world.sqs.calls_to("receive_message") == []
    assert world.pool.receiving == 0
    assert len(world.sqs.visible[REQUEST_QUEUE]) == 1


# -- shutdown ------------------------------------------------------------------------------


def visibility_set(world: World) -> list[set[tuple[str, int]]]:
    """Each ChangeMessageVisibilityBatch call: its (receipt handle, timeout) pairs."""
    return [
        {(entry["ReceiptHandle"], entry["VisibilityTimeout"]) for entry in call["Entries"]}
        for call in world.sqs.calls_to("change_message_visibility_batch")
    ]


async def test_what_a_receive_brings_after_stop_goes_straight_back() -> None:
    """A long poll answers after `stop`: its messages are made visible as soon as the last
    receive has answered, not left hidden for the visibility timeout. What waited in the
    room goes back with them - not before: this process's own long poll would take it
    again, counting a receive (on its last receive, SQS moved it to the dead-letter queue
    without a reason). Until then it is hidden for as long as that poll could answer."""
    world = build_world(limit=1, key_attribute="tenant", receive_concurrency=1)
    world.pool.ledger.observe_running("arn:busy", world.clock())  # no slot free
    world.pool.update()
    intake = intake_of(world)
    await intake.admit(intake.queues[0], sqs_message(message_id="early"))  # waits in the room
    world.sqs.put(REQUEST_QUEUE, sqs_message(message_id="late-1"))
    world.sqs.put(REQUEST_QUEUE, sqs_message(message_id="late-2"))
    world.sqs.receive_gate = anyio.Event()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(intake.run)
            await anyio.wait_all_tasks_blocked()
            late = set(world.sqs.in_flight)  # taken by the receive, its answer on the way
            assert len(late) == 2
            intake.stop()
            await world.sqs.called("change_message_visibility_batch")
            [[(handle, hidden)]] = [list(call) for call in visibility_set(world)]
            assert handle == "rh-early"
            assert hidden >= world.settings.receive_wait_seconds + RECEIVE_GRACE, (
                "the room stays hidden while the receive in flight may answer"
            )
            assert waiting(world) == []
            world.sqs.receive_gate.set()  # the answer arrives while stopping
    assert visibility_set(world)[1:] == [{("rh-early", 0)} | {(h, 0) for h in late}]
    assert waiting(world) == []
    assert world.sfn.calls_to("start_execution") == []
    assert intake.stats.received == 2


@on_virtual_time
async def test_a_plain_pool_keeps_what_it_received_ahead_hidden() -> None:
    """One queue, no key attribute, its slot taken: the running intake receives ahead, and
    keeps each request waiting in the room hidden (visibility extended before it runs
    out) until stopped; then it goes back to its queue."""
    world = build_world(limit=1, receive_concurrency=1)
    world.pool.clock = time.monotonic  # virtual time, as the loop's
    world.pool.ledger.observe_running("arn:busy", world.pool.clock())
    world.pool.update()
    queue_requests(world, 1)
    intake = intake_of(world)
    visibility = world.settings.visibility_timeout
    async with anyio.create_task_group() as tg:
        await tg.start(intake.run)
        await anyio.wait_all_tasks_blocked()
        [entry] = waiting(world)
        received = entry.hidden_since
        for _ in range(3):  # three extensions, each before the visibility ran out
            with anyio.fail_after(visibility):
                await world.sqs.called("change_message_visibility_batch")
            [call] = world.sqs.calls_to("change_message_visibility_batch")[-1:]
            assert call["Entries"][0]["ReceiptHandle"] == entry.request.receipt_handle
            assert call["Entries"][0]["VisibilityTimeout"] == visibility
            assert anyio.current_time() - received < visibility
            received = anyio.current_time()
            world.sqs.calls.clear()
        intake.stop()
    *_, back = visibility_set(world)  # (hidden first while the last long poll may answer)
    assert back == {(entry.request.receipt_handle, 0)}
    assert world.sfn.calls_to("start_execution") == []


async def test_stop_ends_a_receive_waiting_for_free_slots_without_receiving() -> None:
    world = build_world(limit=1, max_waiting=0)
    world.pool.ledger.observe_running("arn:busy", world.clock())
    world.pool.update()
    queue_requests(world, 1)
    intake = intake_of(world)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(intake.run)
            await anyio.wait_all_tasks_blocked()
            intake.stop()
    assert world.sqs.calls_to("receive_message") == []
    assert len(world.sqs.visible[REQUEST_QUEUE]) == 1


# -- the starts' client ----------------------------------------------------------------


async def test_the_start_client_sends_a_fixed_user_agent_and_leaves_validation_to_aws(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`client_config`: botocore rebuilds its User-Agent and validates parameters on every
    call (about a third of a bare StartExecution's client CPU, bench/); the dispatcher's
    clients send a fixed User-Agent and let AWS validate (a bad value comes back as an
    error answer, which `classify` sorts as permanent)."""
    from aiohttp import web  # noqa: PLC0415 - only this test serves HTTP

    from dispatcher.aws.api import USER_AGENT, ErrorKind, classify, open_clients  # noqa: PLC0415
    from dispatcher.daemon.metrics import Metrics  # noqa: PLC0415

    seen: list[tuple[str, dict[str, Any]]] = []

    async def answer(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        seen.append((request.headers["User-Agent"], body))
        if not isinstance(body.get("input"), str):
            return web.json_response(
                {"__type": "ValidationException", "message": "input must be a string"},
                status=400,
            )
        return web.json_response({"executionArn": ARN, "startDate": time.time()})

    app = web.Application()
    app.router.add_post("/", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    for name, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "eu-west-1",
    }.items():
        monkeypatch.setenv(name, value)
    try:
        async with open_clients(
            Metrics(), region="eu-west-1", endpoint_url=f"http://127.0.0.1:{port}"
        ) as clients:
            assert clients.starts is not None
            await clients.starts.start_execution(
                stateMachineArn=STATE_MACHINE_ARN, name="a", input="{}"
            )
            with pytest.raises(ClientError) as refused:
                # Not a string: botocore would refuse it before sending; AWS refuses it here.
                await clients.starts.start_execution(
                    stateMachineArn=STATE_MACHINE_ARN,
                    name="b",
                    input=7,  # type: ignore[arg-type]
                )
    finally:
        await runner.cleanup()
    assert seen[0][0].startswith(USER_AGENT), seen[0][0]
    assert seen[1][0] == seen[0][0], "built once, not per request"
    assert seen[1][1]["input"] == 7, "sent as given: no client-side validation"
    assert classify(refused.value) is ErrorKind.PERMANENT


async def test_a_start_about_to_outlast_half_the_visibility_extends_it_first() -> None:
    """Checked only between steps, the visibility once lapsed during a start's retries: 25
    of 60 s had passed (under half: no extension), then an attempt of up to D and a
    back-off took it past 60 s, and on its last receive SQS moved the request away while
    its start went on. An attempt that may end past half the visibility extends it first."""
    world = build_world(visibility_timeout=60, start_timeout=10.0)
    intake = intake_of(world)
    message = sqs_message()
    await intake.admit(intake.queues[0], message)
    world.clock.advance(25)
    async with anyio.create_task_group() as handlers:
        intake.dispatch_once(world.pool, handlers)
    assert world.sqs.names()[:1] == ["change_message_visibility"]
    [extended] = world.sqs.calls_to("change_message_visibility")
    assert extended["VisibilityTimeout"] == 60
    assert extended["ReceiptHandle"] == message["ReceiptHandle"]
    assert len(world.sfn.calls_to("start_execution")) == 1


async def test_a_start_well_within_the_visibility_does_not_extend_it() -> None:
    world = build_world(visibility_timeout=60, start_timeout=10.0)
    intake = intake_of(world)
    await intake.admit(intake.queues[0], sqs_message())
    world.clock.advance(5)
    async with anyio.create_task_group() as handlers:
        intake.dispatch_once(world.pool, handlers)
    assert world.sqs.calls_to("change_message_visibility") == []


async def test_a_defect_in_the_start_path_ends_the_process_and_blames_no_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failure that is no AWS answer at all, before any attempt was sent (here a defect
    put into the rate wait), once dead-lettered every request it met with the exception's
    name as reason; it now ends the process (restarted, what it held settled as after a
    kill -9), nothing is dead-lettered and nothing retries it."""

    async def defect(*_: Any) -> None:
        raise NameError("name 'START_WAIT_MAX' is not defined")

    monkeypatch.setattr("dispatcher.daemon.starter.Starter._wait_hidden", defect)
    world = build_world()
    intake = intake_of(world)
    await intake.admit(intake.queues[0], sqs_message())
    with pytest.raises(BaseExceptionGroup) as raised:
        async with anyio.create_task_group() as handlers:
            intake.dispatch_once(world.pool, handlers)
    assert raised.group_contains(NameError)
    assert world.sqs.calls_to("send_message") == []
    assert world.sqs.calls_to("delete_message") == []
    assert world.sfn.calls_to("start_execution") == []


async def test_a_slow_admission_does_not_hold_back_the_rest_of_its_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Admitted one after another, one message's slow call (here its dead-letter copy's
    send, hanging) once kept the rest of its batch unadmitted and unextended, until one on
    its last receive lapsed and SQS's redrive policy moved it without a reason."""
    world = build_world()
    world.sqs.put(REQUEST_QUEUE, sqs_message("not json", message_id="bad"))
    world.sqs.put(REQUEST_QUEUE, sqs_message('{"n": 2}', message_id="good"))
    sent = anyio.Event()

    async def hangs(**_: Any) -> dict[str, Any]:
        sent.set()
        await anyio.sleep_forever()
        return {}

    monkeypatch.setattr(world.sqs, "send_message", hangs)
    intake = intake_of(world)
    async with anyio.create_task_group() as tg:
        tg.start_soon(intake.receive_once, intake.queues[0])
        await sent.wait()
        await anyio.wait_all_tasks_blocked()
        assert [e.request.message_id for e in world.pool.room.items()] == ["good"]
        tg.cancel_scope.cancel()


async def test_an_extension_held_on_the_wire_is_given_up_and_tried_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An extension whose call hung once kept a start from checking again for a minute,
    and the request lapsed meanwhile. The call is bounded; unanswered, the message's
    hidden-since is left as it was, so the next check tries again."""
    monkeypatch.setattr("dispatcher.daemon.starter.EXTEND_CALL_SECONDS", 0.05)

    async def hangs(**_: Any) -> dict[str, Any]:
        await anyio.sleep_forever()
        return {}

    world = build_world(visibility_timeout=60)
    intake = intake_of(world)
    await intake.admit(intake.queues[0], sqs_message())
    [entry] = list(world.pool.room.items())
    since = entry.hidden_since
    world.clock.advance(40)
    monkeypatch.setattr(world.sqs, "change_message_visibility", hangs)
    with anyio.fail_after(2):
        await intake.starter.keep_hidden(entry)
    assert entry.hidden_since == since
    monkeypatch.undo()
    monkeypatch.setattr("dispatcher.daemon.starter.EXTEND_CALL_SECONDS", 0.05)
    await intake.starter.keep_hidden(entry)
    assert entry.hidden_since == since + 40


async def test_an_answer_cut_mid_body_while_extending_does_not_end_the_process() -> None:
    """aiobotocore reads an answer's body outside its own error mapping: a connection cut
    mid-answer raises aiohttp's ClientPayloadError. Raised by the extension before a start,
    it was once taken for a defect of the dispatcher, and ended the process."""
    world = build_world(visibility_timeout=60, start_timeout=10.0)
    intake = intake_of(world)
    await intake.admit(intake.queues[0], sqs_message())
    world.clock.advance(35)  # past half the visibility: the start extends it first
    world.sqs.fail(
        "change_message_visibility",
        aiohttp.ClientPayloadError("Response payload is not completed"),
    )
    async with anyio.create_task_group() as handlers:
        intake.dispatch_once(world.pool, handlers)
    assert len(world.sfn.calls_to("start_execution")) == 1


async def test_an_extension_refused_for_a_reason_that_may_pass_is_tried_again() -> None:
    """An expired session token (it passes at the next credential refresh) once counted as
    an extension made: nothing tried again for half a visibility, and the message lapsed."""
    world = build_world(visibility_timeout=60)
    intake = intake_of(world)
    await intake.admit(intake.queues[0], sqs_message())
    [entry] = list(world.pool.room.items())
    since = entry.hidden_since
    world.clock.advance(40)
    world.sqs.fail("change_message_visibility", client_error("ExpiredTokenException", 400))
    await intake.starter.keep_hidden(entry)
    assert entry.hidden_since == since
    world.sqs.fail("change_message_visibility", client_error("ReceiptHandleIsInvalid", 400))
    await intake.starter.keep_hidden(entry)
    assert entry.hidden_since == since + 40, "gone: no retry can help"


async def test_an_extension_that_an_attempt_would_outlast_is_tried_again_before_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An extension before an attempt went unanswered, and the attempt went on with 22 s
    of the message's hidden window left: held on the wire for its 40 s, it outlasted the
    window, and on its last receive the request was moved by the redrive policy while its
    start was in flight. An extension that what comes next would outlast is tried again
    at once, while the window lasts."""
    monkeypatch.setattr("dispatcher.daemon.starter.EXTEND_RETRY_PAUSE", 0.01)
    world = build_world(visibility_timeout=60, start_timeout=40.0)
    intake = intake_of(world)
    await intake.admit(intake.queues[0], sqs_message())
    [entry] = list(world.pool.room.items())
    since = entry.hidden_since
    world.clock.advance(38)
    world.sqs.fail("change_message_visibility", *[client_error("ServiceUnavailable", 503)] * 2)
    with anyio.fail_after(5):
        await intake.starter.keep_hidden(entry, ahead=45.0)
    assert len(world.sqs.calls_to("change_message_visibility")) == 3
    assert entry.hidden_since == since + 38
    # What comes next ends within the window: one try, the next check tries again.
    world.clock.advance(20)
    world.sqs.fail("change_message_visibility", client_error("ServiceUnavailable", 503))
    await intake.starter.keep_hidden(entry, ahead=10.0)
    assert len(world.sqs.calls_to("change_message_visibility")) == 4
    assert entry.hidden_since == since + 38


async def test_a_failed_former_name_lookup_is_logged_with_its_cause(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Kept hidden while it runs, the lookup's error once came out wrapped in a group:
    the log said "unhandled errors in a TaskGroup" instead of the AWS error."""
    world = build_world(visibility_timeout=60)
    intake = intake_of(world)
    await intake.admit(intake.queues[0], sqs_message())
    [entry] = list(world.pool.room.items())

    async def fails(_: Any) -> str | None:
        raise client_error("AccessDeniedException", 400, "not allowed to list")

    monkeypatch.setattr(intake.starter, "find_former_name", fails)
    [reservation] = world.pool.ledger.reserve(1, world.pool.clock(), None)
    with capture_logs() as logs:
        settled = await intake.starter._settled_by_former_name(
            entry, reservation, _Handling(scope=anyio.CancelScope())
        )
    assert settled
    [failed] = [e for e in logs if e["event"] == "dispatcher.former_name_lookup_failed"]
    assert "AccessDeniedException" in failed["error"]


async def test_an_admission_whose_call_fails_cuts_no_other_admission_short(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Admitted side by side, one admission's failed AWS call once left the batch as an
    exception group that the receive loop could not recognise, and cancelled the others."""
    world = build_world()
    world.sqs.put(REQUEST_QUEUE, sqs_message("not json", message_id="bad"))
    world.sqs.put(REQUEST_QUEUE, sqs_message('{"n": 2}', message_id="good"))
    intake = intake_of(world)

    async def dead_letter(*_: Any, **__: Any) -> bool:
        raise client_error("InternalError", 500)

    monkeypatch.setattr(intake.starter, "dead_letter", dead_letter)
    assert await intake.receive_once(intake.queues[0]) == 2
    assert [e.request.message_id for e in world.pool.room.items()] == ["good"]
