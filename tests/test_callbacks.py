"""Task tokens on fakes: the parent of a child started through the dispatcher is answered
with the child's result, and the request message is the durable record until then."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest

from dispatcher.core.requests import IDEMPOTENCY_ATTRIBUTE, execution_arn
from dispatcher.daemon.callbacks import MAX_OUTPUT_BYTES, Callbacks, answer_for
from dispatcher.daemon.events import Events
from dispatcher.daemon.intake import Intake
from dispatcher.daemon.reconcile import Reconciler
from tests.fake_intake import dispatch_all, finish, handle, intake_of
from tests.fakes import STATE_MACHINE_ARN, World, build_world, sqs_message, throttled

pytestmark = [pytest.mark.timeout(10), pytest.mark.usefixtures("fast_retries")]

TOKEN = "AQCEAAAAKgAAAAMAAAAAAAAAA" + "x" * 300  # opaque, up to 1,024 characters on AWS
CHILD = execution_arn(STATE_MACHINE_ARN, "parent-1-0")


RETRY_ATTEMPTS = 2  # stamina's test mode (the fast_retries fixture)


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
    callbacks.starting = intake.starter.starting
    # As with a lease table released by each holder, the former reigns' tokens are known
    # (test_token_handover.py shows what differs without one).
    callbacks.unsure_before = 0.0
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


async def test_a_bad_request_whose_parent_could_not_be_answered_stays_to_answer_it_later() -> None:
    """SendTaskFailure kept failing: the message, the only record of the token, is handed
    back (not dead-lettered and deleted, leaving the parent to wait for ever); on its
    next receive the parent is answered and the request dead-lettered."""
    world = build_world()
    intake, _ = wired(world)
    world.sfn.fail("send_task_failure", throttled(), throttled())  # every attempt
    await handle(world, child_request(body="{not json"), intake)
    assert TOKEN not in world.sfn.answers
    assert "delete_message" not in world.sqs.names(), "deleted before the parent was answered"
    assert world.sqs.calls_to("send_message") == [], "dead-lettered before the parent was answered"
    [back] = world.sqs.calls_to("change_message_visibility")
    assert back["ReceiptHandle"] == "rh-m-1"
    assert back["VisibilityTimeout"] > 0
    await handle(world, child_request(body="{not json"), intake)
    assert world.sfn.answers[TOKEN][:2] == ("failure", "Dispatcher.BadRequest")
    assert world.sample("dispatcher_dead_letters_total", pool="default", reason="invalid_json")


async def test_heartbeats_go_to_every_token_held_and_a_gone_parent_lets_the_child_go() -> None:
    world = build_world(stop_orphaned_children=True)
    intake, callbacks = wired(world)
    await handle(world, child_request(), intake)
    assert world.sfn.calls_to("send_task_heartbeat") == [{"taskToken": TOKEN}], "before the start"
    assert await callbacks.heartbeat_once() == 1
    assert world.sfn.calls_to("send_task_heartbeat") == [{"taskToken": TOKEN}] * 2
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


def two_copies() -> list[dict[str, Any]]:
    """One token request SQS holds twice (a dead letter moved back twice): two messages,
    one name."""
    first, second = child_request(), child_request()
    second["MessageId"], second["ReceiptHandle"] = "m-1-copy", "rh-m-1-copy"
    return [first, second]


async def test_two_copies_whose_parent_is_gone_are_both_dropped_unstarted() -> None:
    """Both copies' checks hear "parent gone" before either sends a start: neither defers to
    the other, no child is started, both messages are deleted and both slots go back."""
    world = build_world(limit=2)
    intake, _ = wired(world)
    world.sfn.gone_tokens.add(TOKEN)
    both_asked = anyio.Event()
    asked = 0
    heartbeat = world.sfn.send_task_heartbeat

    async def together(**kwargs: Any) -> dict[str, Any]:
        nonlocal asked
        asked += 1
        if asked == 2:
            both_asked.set()
        await both_asked.wait()  # both checks in flight at once
        return await heartbeat(**kwargs)

    world.sfn.send_task_heartbeat = together  # type: ignore[method-assign]
    for message in two_copies():
        await intake.admit(intake.queues[0], message)
    assert await dispatch_all(intake, world.pool) == 2
    assert asked == 2
    assert world.sfn.calls_to("start_execution") == []
    assert CHILD not in world.sfn.executions
    deleted = {c["ReceiptHandle"] for c in world.sqs.calls_to("delete_message")}
    assert deleted == {"rh-m-1", "rh-m-1-copy"}
    assert world.sample("dispatcher_orphaned_children_total", pool="default", action="dropped") == 2
    assert world.pool.ledger.held == 0
    assert world.pool.ledger.free == 2


async def test_a_copy_that_hears_parent_gone_while_another_sends_defers_to_it() -> None:
    """One copy is past its check (its parent still waited) and sending the start when the
    other's check hears "parent gone": that one is not dropped, its start finds the child
    (a duplicate), and the child is let go as an orphan later."""
    world = build_world(limit=2)
    intake, callbacks = wired(world)
    gate = anyio.Event()
    world.sfn.start_gate = gate
    start, heartbeat = world.sfn.start_execution, world.sfn.send_task_heartbeat
    starts = 0

    async def second_opens(**kwargs: Any) -> dict[str, Any]:
        nonlocal starts
        starts += 1
        if starts == 2:
            gate.set()
        return await start(**kwargs)

    async def gone_once_one_sends(**kwargs: Any) -> dict[str, Any]:
        if world.sfn.calls_to("send_task_heartbeat"):  # the second check
            await world.sfn.called("start_execution")  # the first copy is sending
            world.sfn.gone_tokens.add(TOKEN)
        return await heartbeat(**kwargs)

    world.sfn.start_execution = second_opens  # type: ignore[method-assign]
    world.sfn.send_task_heartbeat = gone_once_one_sends  # type: ignore[method-assign]
    for message in two_copies():
        await intake.admit(intake.queues[0], message)
    assert await dispatch_all(intake, world.pool) == 2
    assert len(world.sfn.calls_to("start_execution")) == 2
    assert world.sample("dispatcher_orphaned_children_total", pool="default", action="dropped") == 0
    assert world.sqs.calls_to("delete_message") == [], "deleted while its child may start"
    assert intake.starter.stats.started == 1
    assert intake.starter.stats.duplicates == 1
    assert callbacks.held == 1
    assert world.pool.ledger.running == {CHILD}


async def test_held_messages_stay_hidden() -> None:
    world = build_world()
    intake, callbacks = wired(world)
    await handle(world, child_request(), intake)
    assert await callbacks.keep_hidden_once() == 0
    world.clock.advance(world.settings.visibility_timeout / 2)
    assert await callbacks.keep_hidden_once() == 1
    [call] = world.sqs.calls_to("change_message_visibility_batch")
    assert call["Entries"][0]["VisibilityTimeout"] == world.settings.visibility_timeout


async def test_a_held_message_is_extended_from_when_it_was_last_hidden_in_the_room() -> None:
    """A request that waited in the room before its start: its message's visibility runs
    from its last extension there, not from its start."""
    world = build_world(limit=1)
    world.pool.ledger.observe_running("arn:busy", world.clock())  # no slot free
    world.pool.update()
    intake, callbacks = wired(world)
    await intake.admit(intake.queues[0], child_request())
    world.clock.advance(world.settings.visibility_timeout / 4)
    world.pool.ledger.set_limit(2)
    world.pool.update()
    await dispatch_all(intake, world.pool)
    assert callbacks.held == 1
    world.clock.advance(world.settings.visibility_timeout / 4)
    assert await callbacks.keep_hidden_once() == 1, "hidden half its visibility ago"


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
    # The newest handle first; the earlier one too (stale after the 12 h cap: only logs).
    assert [c["ReceiptHandle"] for c in world.sqs.calls_to("delete_message")] == [
        "rh-m-1-again",
        "rh-m-1",
    ]


async def test_a_duplicate_delivery_of_a_held_token_keeps_every_copy_hidden() -> None:
    """SQS delivered the token's message twice (two receipt handles at once). Both copies
    are extended while the child runs and deleted when the parent is answered: one
    forgotten would come back, be held again in place of the other, and the two would
    alternate until the redrive policy moved one without a reason."""
    world = build_world(aws_exact=False)
    intake, callbacks = wired(world)
    await handle(world, child_request(), intake)
    again = child_request()
    again["ReceiptHandle"] = "rh-m-1-copy"
    await handle(world, again, intake)
    assert callbacks.tokens() == [(TOKEN, CHILD)]
    world.clock.advance(world.settings.visibility_timeout / 2)
    assert await callbacks.keep_hidden_once() == 1
    [call] = world.sqs.calls_to("change_message_visibility_batch")
    assert sorted(e["ReceiptHandle"] for e in call["Entries"]) == ["rh-m-1", "rh-m-1-copy"]
    events_of(world).apply(terminal_event("SUCCEEDED", output="{}"))
    await callbacks.answer_due()
    deleted = {c["ReceiptHandle"] for c in world.sqs.calls_to("delete_message")}
    assert deleted == {"rh-m-1", "rh-m-1-copy"}


# -- a child another token waits on ----------------------------------------------------------

RETRY_TOKEN = "AQCEAAAAKgAAAAMAAAAAAAAAB" + "y" * 300


def retry_request(message_id: str = "m-2") -> dict[str, Any]:
    """The parent's retry of the same item: a new token, the same key (the same child)."""
    attributes = {"task-token": RETRY_TOKEN, IDEMPOTENCY_ATTRIBUTE: "parent-1-0"}
    return sqs_message('{"n": 1}', message_id=message_id, attributes=attributes)


async def test_a_child_another_held_token_waits_on_is_not_stopped() -> None:
    """The first token's parent step timed out and retried with the same key: the retry's
    token waits on the same child. The first token found gone must not stop it; once the
    retry's parent is gone too, it is stopped."""
    world = build_world(stop_orphaned_children=True)
    intake, callbacks = wired(world)
    await handle(world, child_request(), intake)
    await handle(world, retry_request(), intake)
    assert sorted(callbacks.tokens()) == sorted([(TOKEN, CHILD), (RETRY_TOKEN, CHILD)])
    world.sfn.gone_tokens.add(TOKEN)
    await callbacks.heartbeat_once()
    assert world.sfn.calls_to("stop_execution") == [], "the retry's parent still waits on it"
    assert world.sfn.executions[CHILD].status == "RUNNING"
    assert callbacks.tokens() == [(RETRY_TOKEN, CHILD)]
    assert [c["ReceiptHandle"] for c in world.sqs.calls_to("delete_message")] == ["rh-m-1"]
    assert world.sample("dispatcher_orphaned_children_total") == 0
    world.sfn.gone_tokens.add(RETRY_TOKEN)
    await callbacks.heartbeat_once()
    assert [c["executionArn"] for c in world.sfn.calls_to("stop_execution")] == [CHILD]
    assert callbacks.held == 0


async def test_a_child_a_waiting_retry_will_wait_on_is_not_stopped() -> None:
    """The retry's request waits in the room for a slot (every slot taken): it will find
    the same child and wait on it, so the first token found gone stops nothing."""
    world = build_world(limit=1, stop_orphaned_children=True)
    intake, callbacks = wired(world)
    await handle(world, child_request(), intake)
    await intake.admit(intake.queues[0], retry_request())
    assert len(world.pool.room) == 1
    world.sfn.gone_tokens.add(TOKEN)
    await callbacks.heartbeat_once()
    assert world.sfn.calls_to("stop_execution") == []
    assert callbacks.held == 0
    assert len(world.pool.room) == 1


async def test_a_child_a_retry_set_aside_at_shutdown_will_wait_on_is_not_stopped() -> None:
    """Stopping empties the rooms: the retry's request goes back to its queue and its token
    is passed on to the successor. The first token found gone meanwhile once stopped the
    child the retry's parent still waited on (the retry was in no room any more)."""
    world = build_world(limit=1, stop_orphaned_children=True)
    intake, callbacks = wired(world)
    await handle(world, child_request(), intake)
    await intake.admit(intake.queues[0], retry_request())
    assert len(world.pool.room) == 1
    await intake.hand_back_waiting()
    assert len(world.pool.room) == 0
    world.sfn.gone_tokens.add(TOKEN)
    await callbacks.heartbeat_once()
    assert world.sfn.calls_to("stop_execution") == []
    assert world.sfn.executions[CHILD].status == "RUNNING"


async def test_a_retry_for_a_running_child_waits_even_when_the_room_is_full() -> None:
    """The room is full when the retry's request arrives. It needs no slot of its own: its
    child runs. Deferred (handed back for minutes), its parent would get no heartbeat and
    the child, its first token found gone, would be stopped as an orphan. It waits in the
    room instead, is heartbeated, and keeps the child."""
    world = build_world(limit=1, max_waiting=1, stop_orphaned_children=True)
    intake, callbacks = wired(world)
    await handle(world, child_request(), intake)
    await intake.admit(intake.queues[0], sqs_message('{"other": 1}', message_id="m-0"))
    assert len(world.pool.room) == 1, "the room is full"
    await intake.admit(intake.queues[0], retry_request())
    assert world.sqs.calls_to("change_message_visibility") == [], "not deferred"
    assert len(world.pool.room) == 2
    world.sfn.gone_tokens.add(TOKEN)
    await callbacks.heartbeat_once()
    assert world.sfn.calls_to("stop_execution") == []
    assert world.sfn.executions[CHILD].status == "RUNNING"
    beaten = [c["taskToken"] for c in world.sfn.calls_to("send_task_heartbeat")]
    assert RETRY_TOKEN in beaten


async def test_a_child_a_deferred_retry_will_wait_on_is_not_stopped() -> None:
    """The retry's request arrived when the room was full and its child did not run yet:
    deferred to its queue (for minutes). The first request then starts the child, and its
    parent is found gone: the retry, on its way back, will wait on that child - it is not
    stopped. Once the deferral is surely over, nothing keeps it any more."""
    world = build_world(limit=1, max_waiting=1, stop_orphaned_children=True)
    intake, callbacks = wired(world)
    world.pool.ledger.observe_running("arn:busy", world.clock())  # every slot taken
    world.pool.update()
    await intake.admit(intake.queues[0], child_request())
    assert len(world.pool.room) == 1, "the room is full"
    await intake.admit(intake.queues[0], retry_request())
    [deferred] = world.sqs.calls_to("change_message_visibility")
    assert deferred["ReceiptHandle"] == "rh-m-2"
    finish(world.pool, "arn:busy")
    assert await dispatch_all(intake, world.pool) == 1
    assert callbacks.tokens() == [(TOKEN, CHILD)]
    world.sfn.gone_tokens.add(TOKEN)
    await callbacks.heartbeat_once()
    assert world.sfn.calls_to("stop_execution") == [], "the deferred retry will wait on it"
    assert world.sfn.executions[CHILD].status == "RUNNING"
    world.clock.advance(deferred["VisibilityTimeout"] + world.settings.visibility_timeout + 1)
    assert callbacks._waiters(CHILD, {TOKEN}) == 0


async def test_a_retry_first_received_after_a_restart_does_not_stop_a_former_child() -> None:
    """A predecessor started the child for the first token and handed its message back at
    its orderly stop; the message waits in the queue. The retry's request, never received
    before this reign, arrives first and its parent is gone. The child was not started for
    it: it is kept for the first token. When that token comes back and its parent is gone
    too, the child is stopped."""
    world = build_world(limit=1, stop_orphaned_children=True)
    intake, callbacks = wired(world)
    callbacks.reign_began = 1_000.0
    world.pool.ledger.observe_running(CHILD, world.clock())  # the start-up listing adopts it
    world.sfn.add_execution("parent-1-0", input='{"n": 1}')
    later = {"ApproximateFirstReceiveTimestamp": "1100000"}
    retry = retry_request()
    retry["Attributes"].update(later)
    await intake.admit(intake.queues[0], retry)
    world.sfn.gone_tokens.add(RETRY_TOKEN)
    await callbacks.heartbeat_once()
    assert world.sfn.calls_to("stop_execution") == [], "kept for the token it was started for"
    assert world.sfn.executions[CHILD].status == "RUNNING"
    assert [c["ReceiptHandle"] for c in world.sqs.calls_to("delete_message")] == ["rh-m-2"]
    first = child_request()
    first["Attributes"].update({"ApproximateFirstReceiveTimestamp": "900000"})
    await intake.admit(intake.queues[0], first)
    world.sfn.gone_tokens.add(TOKEN)
    await callbacks.heartbeat_once()
    assert [c["executionArn"] for c in world.sfn.calls_to("stop_execution")] == [CHILD]


async def test_a_child_a_retry_being_started_will_wait_on_is_not_stopped() -> None:
    """The retry's request is being started (its StartExecution in flight) when the first
    token is found gone: it will wait on the same child, which is not stopped."""
    world = build_world(stop_orphaned_children=True)
    intake, callbacks = wired(world)
    await handle(world, child_request(), intake)
    world.sfn.start_gate = anyio.Event()
    async with anyio.create_task_group() as handlers:
        await intake.admit(intake.queues[0], retry_request())
        assert intake.dispatch_once(world.pool, handlers)
        await anyio.wait_all_tasks_blocked()  # the retry's start waits at the gate
        assert len(world.sfn.calls_to("start_execution")) == 2
        world.sfn.gone_tokens.add(TOKEN)
        await callbacks.heartbeat_once()
        assert world.sfn.calls_to("stop_execution") == []
        world.sfn.start_gate.set()
    assert callbacks.tokens() == [(RETRY_TOKEN, CHILD)]


async def test_two_gone_tokens_of_one_child_stop_it_once() -> None:
    world = build_world(stop_orphaned_children=True)
    intake, callbacks = wired(world)
    await handle(world, child_request(), intake)
    await handle(world, retry_request(), intake)
    world.sfn.gone_tokens.update({TOKEN, RETRY_TOKEN})
    await callbacks.heartbeat_once()
    assert len(world.sfn.calls_to("stop_execution")) == 1
    assert world.sample("dispatcher_orphaned_children_total", action="stopped") == 1
    assert sorted(c["ReceiptHandle"] for c in world.sqs.calls_to("delete_message")) == [
        "rh-m-1",
        "rh-m-2",
    ]


# -- the final result, never a run a redrive reopened ----------------------------------------


async def test_a_failure_superseded_by_a_redrive_is_not_the_answer() -> None:
    """The child failed and was redriven before its FAILED event was applied: the parent
    gets the redriven run's result, not the first run's failure."""
    world = build_world()
    intake, callbacks = wired(world)
    await handle(world, child_request(), intake)
    world.sfn.finish(CHILD, "FAILED", error="Flaky", cause="first run")
    world.sfn.redrive(CHILD)
    events_of(world).apply(terminal_event("FAILED", error="Flaky", cause="first run"))
    assert await callbacks.answer_due() == 0
    assert TOKEN not in world.sfn.answers
    assert callbacks.held == 1
    world.sfn.finish(CHILD, "SUCCEEDED", output='{"second": true}')
    events_of(world).apply(terminal_event("SUCCEEDED", output='{"second": true}', redriveCount=1))
    assert await callbacks.answer_due() == 1
    assert world.sfn.answers[TOKEN] == ("success", '{"second": true}')


async def test_a_describe_showing_the_child_running_again_is_not_an_answer() -> None:
    """Known only to have ended (an event without its error): the describe shows it
    running again (redriven) - "the child ended RUNNING" must never be an answer."""
    world = build_world()
    intake, callbacks = wired(world)
    await handle(world, child_request(), intake)
    world.sfn.finish(CHILD, "TIMED_OUT")
    world.sfn.redrive(CHILD)
    events_of(world).apply(terminal_event("TIMED_OUT"))
    await callbacks.answer_due()
    assert TOKEN not in world.sfn.answers
    world.clock.advance(world.settings.heartbeat_interval)
    await callbacks.heartbeat_once()  # the tombstone says ended: described again
    await callbacks.answer_due()
    assert TOKEN not in world.sfn.answers, "still running"
    world.sfn.finish(CHILD, "FAILED", error="Again", cause="second run")
    await callbacks.heartbeat_once()
    await callbacks.answer_due()
    assert world.sfn.answers[TOKEN] == ("failure", "Again", "second run")


async def test_a_child_pending_redrive_is_awaited_not_answered() -> None:
    """After a restart the request meets its child about to run again (PENDING_REDRIVE)."""
    world = build_world()
    world.sfn.add_execution("parent-1-0", input='{"n": 1}', status="PENDING_REDRIVE")
    intake, callbacks = wired(world)
    await handle(world, child_request(), intake)
    assert TOKEN not in world.sfn.answers
    assert callbacks.tokens() == [(TOKEN, CHILD)]
    world.sfn.finish(CHILD, "SUCCEEDED", output='"redriven"')
    events_of(world).apply(terminal_event("SUCCEEDED", output='"redriven"', redriveCount=1))
    await callbacks.answer_due()
    assert world.sfn.answers[TOKEN] == ("success", '"redriven"')


# -- heartbeats at once, and handed back at the end of a reign -------------------------------


async def until_called(world: World, operation: str, callbacks: Callbacks) -> None:
    """Run the callbacks loop until ``operation`` was called (a few seconds at most)."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(callbacks.run)
        with anyio.fail_after(3):
            await world.sfn.called(operation)
        tg.cancel_scope.cancel()


async def test_a_token_is_heartbeated_as_soon_as_it_is_held() -> None:
    """After a restart the listing found the child running; its request comes back and its
    token is held again: heartbeated now, not an interval later (its parent has gone
    without one since the old process's last)."""
    world = build_world()
    world.sfn.add_execution("parent-1-0", input='{"n": 1}')
    world.pool.ledger.observe_running(CHILD, world.clock())
    intake, callbacks = wired(world)
    await handle(world, child_request(), intake)
    assert callbacks.tokens() == [(TOKEN, CHILD)]
    await until_called(world, "send_task_heartbeat", callbacks)
    assert world.sfn.calls_to("send_task_heartbeat") == [{"taskToken": TOKEN}]


async def test_a_request_waiting_for_a_slot_is_heartbeated_as_soon_as_it_is_received() -> None:
    world = build_world(limit=1)
    world.pool.ledger.observe_running("arn:busy", world.clock())
    world.pool.update()
    intake, callbacks = wired(world)
    await intake.admit(intake.queues[0], child_request())
    assert len(world.pool.room) == 1
    await until_called(world, "send_task_heartbeat", callbacks)
    assert world.sfn.calls_to("send_task_heartbeat") == [{"taskToken": TOKEN}]


async def test_a_token_heartbeated_just_before_its_start_is_not_heartbeated_again_at_once() -> None:
    world = build_world()
    intake, callbacks = wired(world)
    await handle(world, child_request(), intake)
    assert await callbacks.heartbeat_new() == 0
    assert len(world.sfn.calls_to("send_task_heartbeat")) == 1


async def test_at_the_end_of_a_reign_held_tokens_get_a_last_heartbeat_and_go_back() -> None:
    world = build_world()
    intake, callbacks = wired(world)
    await handle(world, child_request(), intake)
    beats = len(world.sfn.calls_to("send_task_heartbeat"))
    assert await callbacks.hand_back() == 1
    assert len(world.sfn.calls_to("send_task_heartbeat")) == beats + 1
    [call] = world.sqs.calls_to("change_message_visibility_batch")
    assert call["Entries"] == [{"Id": "0", "ReceiptHandle": "rh-m-1", "VisibilityTimeout": 0}]
    assert callbacks.held == 0
    assert world.sample("dispatcher_tokens_held", pool="default") == 0
    assert world.sqs.calls_to("delete_message") == [], "its parent still waits"
    assert world.sfn.calls_to("stop_execution") == []


# -- a request whose parent is already gone --------------------------------------------------


async def test_a_request_whose_parent_is_gone_takes_no_slot_and_starts_nothing() -> None:
    world = build_world(limit=1)
    world.sfn.gone_tokens.add(TOKEN)
    intake, _ = wired(world)
    await handle(world, child_request(), intake)
    assert world.sfn.calls_to("start_execution") == []
    assert CHILD not in world.sfn.executions
    assert [c["ReceiptHandle"] for c in world.sqs.calls_to("delete_message")] == ["rh-m-1"]
    assert world.sample("dispatcher_orphaned_children_total", action="dropped") == 1
    assert world.pool.ledger.free == 1, "its slot went back"


async def test_a_gone_parents_request_whose_child_ended_is_deleted_unstarted() -> None:
    """Redelivered after its answer's delete was lost: the child ended, the parent was
    answered (TaskDoesNotExist now): nothing to start, nothing to answer."""
    world = build_world()
    world.sfn.add_execution("parent-1-0", input='{"n": 1}', status="SUCCEEDED")
    world.sfn.answers[TOKEN] = ("success", "{}")
    intake, _ = wired(world)
    await handle(world, child_request(), intake)
    assert world.sfn.calls_to("start_execution") == []
    assert [c["ReceiptHandle"] for c in world.sqs.calls_to("delete_message")] == ["rh-m-1"]


@pytest.mark.parametrize("known", ["running", "in_doubt", "described"])
async def test_a_gone_parents_request_whose_child_may_run_is_not_dropped(known: str) -> None:
    """The child may exist (the ledger holds it, a start of it is in doubt, or a describe
    finds it running): the request goes the start's way, which finds the child; the child
    is let go as an orphan (stopped here), and only then the request deleted."""
    world = build_world(aws_exact=False, stop_orphaned_children=True)
    world.sfn.add_execution("parent-1-0", input='{"n": 1}')
    if known == "running":
        world.pool.ledger.observe_running(CHILD, world.clock())
    elif known == "in_doubt":
        [reservation] = world.pool.ledger.reserve(1, world.clock())
        world.pool.ledger.doubt(reservation, CHILD, world.clock())
    world.sfn.gone_tokens.add(TOKEN)
    intake, callbacks = wired(world)
    await handle(world, child_request(), intake)
    assert world.sqs.calls_to("delete_message") == [], "not before its child was dealt with"
    assert callbacks.tokens() == [(TOKEN, CHILD)]
    await callbacks.heartbeat_new()
    assert [c["executionArn"] for c in world.sfn.calls_to("stop_execution")] == [CHILD]
    assert [c["ReceiptHandle"] for c in world.sqs.calls_to("delete_message")] == ["rh-m-1"]
    assert len(world.sfn.executions) == 1


async def test_a_lost_lease_hands_back_the_requests_whose_parents_wait() -> None:
    """Not the leader any more: the held request goes back to its queue at once (visible,
    not deleted) and no token is held, so the new leader finds the child by name."""
    world = build_world()
    intake, callbacks = wired(world)
    await handle(world, child_request(), intake)
    assert callbacks.held == 1
    assert await callbacks.hand_back() == 1
    assert callbacks.held == 0
    assert world.sample("dispatcher_tokens_held", pool="default") == 0
    assert "delete_message" not in world.sqs.names()
    [batch] = world.sqs.calls_to("change_message_visibility_batch")
    assert [e["VisibilityTimeout"] for e in batch["Entries"]] == [0]
