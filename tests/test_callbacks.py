"""Task tokens on fakes: the parent of a child started through the dispatcher is answered
with the child's result, and the request message is the durable record until then."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import stamina

from dispatcher.callbacks import MAX_OUTPUT_BYTES, Callbacks, answer_for
from dispatcher.events import Events
from dispatcher.intake import Intake
from dispatcher.reconcile import Reconciler
from dispatcher.requests import IDEMPOTENCY_ATTRIBUTE, execution_arn
from tests.fake_intake import handle, intake_of
from tests.fakes import STATE_MACHINE_ARN, World, build_world, sqs_message

pytestmark = pytest.mark.timeout(10)

TOKEN = "AQCEAAAAKgAAAAMAAAAAAAAAA" + "x" * 300  # opaque, up to 1,024 characters on AWS
CHILD = execution_arn(STATE_MACHINE_ARN, "parent-1-0")


@pytest.fixture(autouse=True)
def fast_retries() -> Iterator[None]:
    with stamina.set_testing(True, attempts=2):
        yield


def child_request(token: str = TOKEN, body: str = '{"n": 1}', **extra: str) -> dict[str, Any]:
    """A parent's request: the child's input, its task token, an idempotency key."""
    attributes = {"task-token": token, IDEMPOTENCY_ATTRIBUTE: "parent-1-0", **extra}
    return sqs_message(body, message_id="m-1", attributes=attributes)


def wired(world: World) -> tuple[Intake, Callbacks]:
    """Intake and callbacks over the world's fakes, as the service wires them."""
    intake = intake_of(world)
    callbacks = Callbacks(
        world.settings, world.clients, world.metrics, {"default": world.pool}, world.clock
    )
    intake.starter.callbacks = callbacks
    world.pool.on_ended = callbacks.ended
    return intake, callbacks


def terminal_event(status: str, **detail: Any) -> str:
    return json.dumps(
        {
            "source": "aws.states",
            "detail-type": "Step Functions Execution Status Change",
            "detail": {
                "executionArn": CHILD,
                "stateMachineArn": STATE_MACHINE_ARN,
                "status": status,
                **detail,
            },
        }
    )


def events_of(world: World) -> Events:
    return Events(
        world.settings, world.clients, {STATE_MACHINE_ARN: world.pool}, world.metrics, world.health
    )


async def test_the_message_is_kept_until_the_parent_is_answered_with_the_output() -> None:
    world = build_world()
    intake, callbacks = wired(world)
    await handle(world, child_request(), intake)
    assert CHILD in world.sfn.executions
    assert "delete_message" not in world.sqs.names(), "deleted before the parent was answered"
    assert callbacks.held == 1
    assert world.sample("dispatcher_tokens_held", pool="default") == 1
    events_of(world).apply(terminal_event("SUCCEEDED", output='{"result": 42}'))
    assert await callbacks.answer_due() == 1
    assert world.sfn.answers[TOKEN] == ("success", '{"result": 42}')
    assert "describe_execution" not in world.sfn.names(), "the event carried the output"
    assert world.sqs.calls_to("delete_message") == [
        {"QueueUrl": world.settings.request_queue_url, "ReceiptHandle": "rh-m-1"}
    ]
    assert callbacks.held == 0
    assert world.sample("dispatcher_callbacks_total", pool="default", outcome="success") == 1


async def test_a_failed_child_fails_the_parent_with_its_error_from_a_describe() -> None:
    world = build_world()
    intake, callbacks = wired(world)
    await handle(world, child_request(), intake)
    world.sfn.finish(CHILD, "FAILED", error="Payment.Declined", cause="card expired")
    events_of(world).apply(terminal_event("FAILED"))  # no error in the event: describe
    await callbacks.answer_due()
    assert world.sfn.answers[TOKEN] == ("failure", "Payment.Declined", "card expired")


@pytest.mark.parametrize(
    ("status", "error"),
    [("TIMED_OUT", "Dispatcher.ChildTimedOut"), ("ABORTED", "Dispatcher.ChildAborted")],
)
def test_timed_out_and_aborted_children_have_names_a_parent_can_catch(
    status: str, error: str
) -> None:
    answer = answer_for(status, {})
    assert (answer.success, answer.error) == (False, error)
    assert status in answer.cause


def test_an_output_too_large_for_a_callback_fails_the_parent_clearly() -> None:
    answer = answer_for("SUCCEEDED", {"output": json.dumps("x" * MAX_OUTPUT_BYTES)})
    assert (answer.success, answer.error) == (False, "Dispatcher.OutputTooLarge")
    assert str(MAX_OUTPUT_BYTES) in answer.cause


async def test_reconcile_finds_the_end_when_every_event_is_lost() -> None:
    world = build_world(start_grace=0.0)
    intake, callbacks = wired(world)
    await handle(world, child_request(), intake)
    world.sfn.finish(CHILD, "SUCCEEDED", output='"done"')
    world.clock.advance(1)
    await Reconciler(
        world.settings, world.clients, world.pool, world.metrics, world.health
    ).run_once()
    await callbacks.answer_due()
    assert world.sfn.answers[TOKEN] == ("success", '"done"')


async def test_after_a_restart_a_closed_child_is_answered_at_once() -> None:
    """The message came back after a restart: same name, the child already ended."""
    world = build_world()
    world.sfn.add_execution("parent-1-0", input='{"n": 1}', status="SUCCEEDED")
    world.sfn.executions[CHILD].output = '{"r": 1}'
    intake, callbacks = wired(world)
    await handle(world, child_request(), intake)
    assert world.sfn.answers[TOKEN] == ("success", '{"r": 1}')
    assert [c["ReceiptHandle"] for c in world.sqs.calls_to("delete_message")] == ["rh-m-1"]
    assert callbacks.held == 0


async def test_after_a_restart_a_running_child_is_adopted_and_awaited() -> None:
    world = build_world(aws_exact=False)  # MiniStack: ExecutionAlreadyExists while running
    world.sfn.add_execution("parent-1-0", input='{"n": 1}')
    intake, callbacks = wired(world)
    await handle(world, child_request(), intake)
    assert callbacks.held == 1
    assert world.pool.ledger.running == {CHILD}
    assert TOKEN not in world.sfn.answers


async def test_an_answer_already_given_is_done_not_an_error() -> None:
    """The answer's reply was lost, the retry meets TaskDoesNotExist: done, deleted."""
    world = build_world()
    intake, callbacks = wired(world)
    await handle(world, child_request(), intake)
    world.sfn.answers[TOKEN] = ("success", "earlier")
    events_of(world).apply(terminal_event("SUCCEEDED", output="{}"))
    await callbacks.answer_due()
    assert world.sample("dispatcher_callbacks_total", pool="default", outcome="parent_gone") == 1
    assert world.sqs.calls_to("delete_message")
    assert callbacks.held == 0


async def test_a_bad_request_with_a_token_fails_the_parent_and_is_dead_lettered() -> None:
    world = build_world()
    intake, _ = wired(world)
    await handle(world, child_request(body="{not json"), intake)
    kind, error, cause = world.sfn.answers[TOKEN]
    assert (kind, error) == ("failure", "Dispatcher.BadRequest")
    assert cause.startswith("invalid_json: ")
    assert world.sample("dispatcher_dead_letters_total", pool="default", reason="invalid_json")
    assert world.sfn.calls_to("start_execution") == []


async def test_heartbeats_go_to_every_token_held_and_a_gone_parent_lets_the_child_go() -> None:
    world = build_world(stop_orphaned_children=True)
    intake, callbacks = wired(world)
    await handle(world, child_request(), intake)
    assert await callbacks.heartbeat_once() == 1
    assert world.sfn.calls_to("send_task_heartbeat") == [{"taskToken": TOKEN}]
    world.sfn.gone_tokens.add(TOKEN)
    await callbacks.heartbeat_once()
    assert world.sfn.calls_to("stop_execution")[0]["executionArn"] == CHILD
    assert world.sample("dispatcher_orphaned_children_total", pool="default", action="stopped")
    assert callbacks.held == 0
    assert world.sqs.calls_to("delete_message")


async def test_by_default_an_orphaned_child_runs_on() -> None:
    world = build_world()
    intake, callbacks = wired(world)
    await handle(world, child_request(), intake)
    world.sfn.gone_tokens.add(TOKEN)
    await callbacks.heartbeat_once()
    assert world.sfn.calls_to("stop_execution") == []
    assert world.sample("dispatcher_orphaned_children_total", pool="default", action="left")


async def test_a_waiting_request_whose_parent_is_gone_is_dropped_unstarted() -> None:
    world = build_world(limit=1)
    world.pool.ledger.observe_running("arn:busy", world.clock())  # no slot free
    world.pool.update()
    intake, callbacks = wired(world)
    await intake.admit(intake.queues[0], child_request())
    assert len(world.pool.room) == 1
    world.sfn.gone_tokens.add(TOKEN)
    await callbacks.heartbeat_once()
    assert len(world.pool.room) == 0
    assert world.sample("dispatcher_orphaned_children_total", pool="default", action="dropped")
    assert world.sfn.calls_to("start_execution") == []


async def test_held_messages_stay_hidden() -> None:
    world = build_world()
    intake, callbacks = wired(world)
    await handle(world, child_request(), intake)
    assert await callbacks.keep_hidden_once() == 0
    world.clock.advance(world.settings.visibility_timeout / 2)
    assert await callbacks.keep_hidden_once() == 1
    [call] = world.sqs.calls_to("change_message_visibility_batch")
    assert call["Entries"][0]["VisibilityTimeout"] == world.settings.visibility_timeout


async def test_a_request_received_again_while_its_child_runs_is_held_once() -> None:
    """SQS hides a message at most 12 h from its receive: a long child's request comes back,
    meets its running child, and its token is held once, under the newer receipt."""
    world = build_world(aws_exact=False)
    intake, callbacks = wired(world)
    await handle(world, child_request(), intake)
    again = child_request()
    again["ReceiptHandle"] = "rh-m-1-again"
    await handle(world, again, intake)
    assert callbacks.tokens() == [(TOKEN, CHILD)]
    events_of(world).apply(terminal_event("SUCCEEDED", output="{}"))
    await callbacks.answer_due()
    assert [c["ReceiptHandle"] for c in world.sqs.calls_to("delete_message")] == ["rh-m-1-again"]


async def test_a_lost_lease_hands_back_the_requests_whose_parents_wait() -> None:
    """Not the leader any more: the held request goes back to its queue at once (visible,
    not deleted) and no token is held, so the new leader finds the child by name."""
    world = build_world()
    intake, callbacks = wired(world)
    await handle(world, child_request(), intake)
    assert callbacks.held == 1
    assert await callbacks.hand_back_all() == 1
    assert callbacks.held == 0
    assert world.sample("dispatcher_tokens_held", pool="default") == 0
    assert "delete_message" not in world.sqs.names()
    [batch] = world.sqs.calls_to("change_message_visibility_batch")
    assert [e["VisibilityTimeout"] for e in batch["Entries"]] == [0]
