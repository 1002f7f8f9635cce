"""A request on its last receive that has to go back is renewed: a fresh copy with its
identity on its queue, then the original deleted. One that cannot be renewed (SQS refuses
the copy: most tests here) and whose execution may exist is never dead-lettered: it is kept
hidden until a describe settles it - started (served as a start) or, once D and the grace
have passed, known never to have started (only then dead-lettered). On fakes."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import stamina
from botocore.exceptions import ReadTimeoutError

from dispatcher.core.deadline import EXPIRED_ERROR
from dispatcher.core.ledger import Change
from dispatcher.core.requests import (
    IDEMPOTENCY_ATTRIBUTE,
    ORIGINAL_ID_ATTRIBUTE,
    REQUEST_ID_ATTRIBUTE,
    execution_arn,
    key_tag,
)
from dispatcher.daemon.callbacks import DEAD_LETTERED, Callbacks
from dispatcher.daemon.deadletter import DETAIL_ATTRIBUTE, REASON_ATTRIBUTE
from dispatcher.daemon.intake import Intake
from dispatcher.daemon.pool import MAX_DEFER_SECONDS
from dispatcher.daemon.renewal import handle_left
from tests.fake_intake import handle, intake_of
from tests.fakes import (
    DEAD_LETTER_QUEUE,
    REQUEST_QUEUE,
    STATE_MACHINE_ARN,
    FakeClock,
    World,
    build_world,
    client_error,
    sqs_message,
)
from tests.virtual_time import on_virtual_time

pytestmark = [pytest.mark.timeout(10), pytest.mark.usefixtures("fast_retries")]

MAX_RECEIVES = 5
D = 5.0
GRACE = 10.0
TOKEN = "AQCEAAAAKgAAAAMAAAAAAAAAA" + "t" * 100
ARN = execution_arn(STATE_MACHINE_ARN, "m-1")
T0 = 1_796_464_800.0  # 2026-12-05T10:00:00Z


RETRY_ATTEMPTS = 2  # stamina's test mode (the fast_retries fixture)


def world_of(**overrides: Any) -> World:
    return build_world(start_timeout=D, start_grace=GRACE, **overrides)


def last_receive(**attributes: str) -> dict[str, Any]:
    """A valid request received for the queue's maxReceiveCount-th time."""
    return sqs_message(
        '{"n": 1}',
        message_id="m-1",
        attributes=attributes or None,
        system={"ApproximateReceiveCount": str(MAX_RECEIVES)},
    )


def intake_for(world: World, *, renewals: bool = False) -> tuple[Intake, Callbacks]:
    """An intake whose queue has a redrive policy; without ``renewals``, SQS refuses every
    copy sent to the request queue (what is kept is then settled by describes)."""
    if not renewals:
        world.sqs.refuse_sends_to.add(REQUEST_QUEUE)
    intake = intake_of(world)
    intake.queues[0].max_receive_count = MAX_RECEIVES
    callbacks = Callbacks(
        world.settings, world.clients, world.metrics, {"default": world.pool}, world.clock
    )
    intake.starter.callbacks = callbacks
    world.pool.on_ended = callbacks.ended
    return intake, callbacks


def dead_letters(world: World) -> list[dict[str, Any]]:
    return [c for c in world.sqs.calls_to("send_message") if c["QueueUrl"] == DEAD_LETTER_QUEUE]


def handed_back(world: World) -> list[dict[str, Any]]:
    calls = world.sqs.calls_to("change_message_visibility")
    return [c for c in calls if c["VisibilityTimeout"] < world.settings.visibility_timeout]


async def test_a_start_in_doubt_on_its_last_receive_is_not_dead_lettered_and_is_served() -> None:
    """Every attempt takes effect and loses its answer: the execution runs. It used to be
    dead-lettered as receive_limit, inviting a redrive that starts it again."""
    world = world_of(limit=2)
    world.sfn.answers_lost = 10
    intake, _ = intake_for(world)
    await handle(world, last_receive(), intake)
    assert world.sfn.executions[ARN].status == "RUNNING"
    assert dead_letters(world) == [], "dead-lettered while its execution runs"
    assert handed_back(world) == [], "handed back: SQS would move it without a reason"
    assert len(intake.starter.last_receives) == 1
    assert world.pool.ledger.in_doubt == {ARN}, "its slot held meanwhile"
    world.clock.advance(D + GRACE)
    assert await intake.starter.last_receives.settle_once() == 1
    assert dead_letters(world) == []
    assert world.pool.ledger.running == {ARN}
    assert world.pool.ledger.in_doubt == frozenset()
    assert world.sqs.calls_to("delete_message") or world.sqs.calls_to("delete_message_batch")
    assert len(intake.starter.last_receives) == 0


async def test_a_parent_is_not_told_dead_lettered_while_its_child_runs() -> None:
    world = world_of(limit=2)
    world.sfn.answers_lost = 10
    intake, callbacks = intake_for(world)
    await handle(world, last_receive(**{"task-token": TOKEN}), intake)
    assert TOKEN not in world.sfn.answers, f"parent answered: {world.sfn.answers.get(TOKEN)}"
    world.clock.advance(D + GRACE)
    await intake.starter.last_receives.settle_once()
    assert callbacks.tokens() == [(TOKEN, ARN)], "held for the child, as a start's"
    assert "delete_message" not in world.sqs.names(), "the durable record of the callback"
    world.sfn.finish(ARN, "SUCCEEDED", output='{"done": true}')
    callbacks.ended(ARN, "", None)
    assert await callbacks.answer_due() == 1
    assert world.sfn.answers[TOKEN] == ("success", '{"done": true}')
    assert dead_letters(world) == []


async def test_a_describe_failed_after_already_exists_is_kept_until_it_answers() -> None:
    """AWS said the execution exists; describes then fail (and even lag: "does not
    exist"). It used to be dead-lettered as receive_limit."""
    world = world_of(limit=2, aws_exact=False)  # MiniStack: a running repeat is refused
    world.sfn.add_execution("m-1", '{"n": 1}')
    world.sfn.fail_always("describe_execution", client_error("InternalFailure", 500))
    intake, _ = intake_for(world)
    await handle(world, last_receive(), intake)
    assert dead_letters(world) == []
    assert handed_back(world) == []
    world.clock.advance(D + GRACE)
    await intake.starter.last_receives.settle_once()
    world.sfn._always.clear()
    world.sfn.fail("describe_execution", client_error("ExecutionDoesNotExist"))
    world.clock.advance(100)
    assert await intake.starter.last_receives.settle_once() == 0, "a lag, not proof"
    assert dead_letters(world) == []
    world.clock.advance(100)
    assert await intake.starter.last_receives.settle_once() == 1
    assert dead_letters(world) == []
    assert world.pool.ledger.running == {ARN}


async def test_a_start_that_did_nothing_is_dead_lettered_only_once_known_not_to_exist() -> None:
    """5xx answers that in truth did nothing: "does not exist" settles it only after D and
    the grace; then it is dead-lettered, and only now does the detail invite a redrive."""
    world = world_of(limit=1)
    world.sfn.fail_always("start_execution", client_error("InternalFailure", 500))
    intake, _ = intake_for(world)
    await handle(world, last_receive(**{"task-token": TOKEN}), intake)
    assert dead_letters(world) == [], "dead-lettered before the doubt was settled"
    assert TOKEN not in world.sfn.answers
    world.clock.advance(GRACE)  # past the grace alone, not D + grace
    await intake.starter.last_receives.settle_once()
    assert dead_letters(world) == []
    assert world.pool.ledger.in_doubt == {ARN}
    world.clock.advance(D)
    assert await intake.starter.last_receives.settle_once() == 1
    [copy] = dead_letters(world)
    attributes = copy["MessageAttributes"]
    assert attributes[REASON_ATTRIBUTE]["StringValue"] == "receive_limit"
    assert "does not exist" in attributes[DETAIL_ATTRIBUTE]["StringValue"]
    assert world.pool.ledger.in_doubt == frozenset(), "the slot given back"
    assert world.pool.ledger.free == 1
    assert world.sfn.answers[TOKEN][:2] == ("failure", DEAD_LETTERED)


async def test_one_never_started_whose_start_by_passed_meanwhile_is_dead_lettered_expired() -> None:
    """Kept on its last receive (its starts' 5xx answers did nothing), its start-by passes
    while it is kept: once known never to have started it is dead-lettered as expired, not
    receive_limit, and its parent gets Dispatcher.Expired. It used to be receive_limit."""
    world = world_of(limit=1)
    world.sfn.fail_always("start_execution", client_error("InternalFailure", 500))
    intake, _ = intake_for(world)
    wall = FakeClock(T0 - 1)
    intake.starter.expiries.clock = wall
    await handle(world, last_receive(**{"task-token": TOKEN, "start-by": "1796464805"}), intake)
    assert len(intake.starter.last_receives) == 1
    world.clock.advance(D + GRACE)
    wall.advance(D + GRACE)  # the start-by (T0 + 5) passed while it was kept
    assert await intake.starter.last_receives.settle_once() == 1
    [copy] = dead_letters(world)
    attributes = copy["MessageAttributes"]
    assert attributes[REASON_ATTRIBUTE]["StringValue"] == "expired"
    assert "start-by 2026-12-05T10:00:05Z passed" in attributes[DETAIL_ATTRIBUTE]["StringValue"]
    assert world.sfn.answers[TOKEN][:2] == ("failure", EXPIRED_ERROR)
    assert world.sfn.executions == {}, "never started"


async def test_one_never_started_whose_start_by_has_not_passed_is_a_receive_limit() -> None:
    world = world_of(limit=1)
    world.sfn.fail_always("start_execution", client_error("InternalFailure", 500))
    intake, _ = intake_for(world)
    intake.starter.expiries.clock = FakeClock(T0 - 100)
    await handle(world, last_receive(**{"start-by": "1796464805"}), intake)
    world.clock.advance(D + GRACE)
    assert await intake.starter.last_receives.settle_once() == 1
    [copy] = dead_letters(world)
    assert copy["MessageAttributes"][REASON_ATTRIBUTE]["StringValue"] == "receive_limit"


@pytest.mark.parametrize(("after", "reason"), [(D + GRACE, "expired"), (D, "receive_limit")])
async def test_after_the_reign_expired_needs_the_start_by_d_and_the_grace_behind_it(
    after: float, reason: str
) -> None:
    """The lease lost: the leader may start the request from another copy until its
    start-by, and such a start takes effect within D. Only a describe sent D and the grace
    after the start-by proves it never started."""
    world = world_of(limit=1)
    world.sfn.fail_always("start_execution", client_error("InternalFailure", 500))
    intake, _ = intake_for(world)
    wall = FakeClock(T0 - 1)
    intake.starter.expiries.clock = wall
    await handle(world, last_receive(**{"start-by": "1796464805"}), intake)
    intake.starter.last_receives.reign_over()
    world.clock.advance(D + GRACE)
    wall.now = T0 + 5 + after
    assert await intake.starter.last_receives.settle_once() == 1
    [copy] = dead_letters(world)
    assert copy["MessageAttributes"][REASON_ATTRIBUTE]["StringValue"] == reason


async def test_a_closed_execution_found_on_the_last_receive_answers_its_parent() -> None:
    """The start's answer was lost, the child ran and ended before anyone looked."""
    world = world_of(limit=2)
    world.sfn.answers_lost = 10
    intake, _ = intake_for(world)
    await handle(world, last_receive(**{"task-token": TOKEN}), intake)
    world.sfn.finish(ARN, "FAILED", error="Boom", cause="it broke")
    world.clock.advance(D + GRACE)
    await intake.starter.last_receives.settle_once()
    assert world.sfn.answers[TOKEN] == ("failure", "Boom", "it broke")
    assert dead_letters(world) == []
    assert world.pool.ledger.free == 2


async def test_waiting_requests_on_their_last_receive_are_kept_at_shutdown() -> None:
    """Handed back from the waiting room (shutdown): an earlier process may have started
    it. Kept, described, and served, not dead-lettered."""
    world = world_of(limit=0)
    world.pool.ledger.set_limit(0)
    intake, _ = intake_for(world)
    world.sfn.add_execution("m-1", '{"n": 1}')  # started by an earlier process
    await intake.admit(intake.queues[0], last_receive())
    assert await intake.hand_back_waiting() == 0
    assert dead_letters(world) == []
    world.clock.advance(D + GRACE)
    await intake.starter.last_receives.settle_once()
    assert dead_letters(world) == []
    assert world.pool.ledger.running == {ARN}


async def test_an_execution_under_a_former_name_is_found_before_dead_lettering() -> None:
    """Kept at shutdown on its last receive; its execution ran (and ended) under the name a
    former ``key_attribute`` gave it, not under its current one. Found, it is served as
    that execution's, never dead-lettered as never started."""
    world = world_of(limit=0)
    world.pool.ledger.set_limit(0)
    intake, _ = intake_for(world)
    former = world.sfn.add_execution(f"k{key_tag('t-1')}_m-1", '{"n": 1}', status="SUCCEEDED")
    await intake.admit(intake.queues[0], last_receive(tenant="t-1"))
    assert await intake.hand_back_waiting() == 0
    world.clock.advance(D + GRACE)
    await intake.starter.last_receives.settle_once()
    assert dead_letters(world) == [], "dead-lettered although it ran under its former name"
    world.clock.advance(D + GRACE)
    await intake.starter.last_receives.settle_once()
    assert len(intake.starter.last_receives) == 0
    assert dead_letters(world) == []
    assert world.pool.ledger.is_tombstoned(former)
    assert world.sqs.calls_to("delete_message") or world.sqs.calls_to("delete_message_batch")


async def test_an_idempotency_key_names_the_execution_described() -> None:
    world = world_of(limit=2)
    world.sfn.answers_lost = 10
    intake, _ = intake_for(world)
    await handle(world, last_receive(**{IDEMPOTENCY_ATTRIBUTE: "order-7"}), intake)
    world.clock.advance(D + GRACE)
    await intake.starter.last_receives.settle_once()
    described = world.sfn.calls_to("describe_execution")[-1]
    assert described == {"executionArn": execution_arn(STATE_MACHINE_ARN, "order-7")}
    assert dead_letters(world) == []


async def test_at_shutdown_what_a_describe_settles_is_served() -> None:
    world = world_of(limit=2)
    world.sfn.answers_lost = 10
    intake, _ = intake_for(world)
    await handle(world, last_receive(), intake)
    world.clock.advance(D + GRACE)
    await intake.starter.last_receives.finish()
    assert len(intake.starter.last_receives) == 0
    assert dead_letters(world) == []
    assert world.pool.ledger.running == {ARN}


async def test_at_shutdown_an_unsettled_request_is_left_hidden_not_dead_lettered() -> None:
    """AWS does not answer the describes before the shutdown's deadline: the request is
    neither dead-lettered nor handed back (its message stays hidden)."""
    world = world_of(limit=2)
    world.sfn.answers_lost = 10
    world.sfn.fail_always("describe_execution", client_error("InternalFailure", 500))
    intake, _ = intake_for(world)
    await handle(world, last_receive(), intake)
    with anyio.move_on_after(0.2):
        await intake.starter.last_receives.finish()
    assert len(intake.starter.last_receives) == 0
    assert dead_letters(world) == []
    assert handed_back(world) == []


async def test_slow_describes_after_already_exists_keep_the_message_hidden() -> None:
    """Each describe takes 20 s and times out: the message's visibility (60 s) is extended
    between them, or it would come back mid-describe - on its last receive, for SQS to
    move without a reason."""
    world = world_of(limit=2, aws_exact=False)
    world.sfn.add_execution("m-1", '{"n": 1}')
    describe = world.sfn.describe_execution
    slow = iter(range(4))

    async def slow_describe(*, executionArn: str) -> dict[str, Any]:  # noqa: N803 - botocore's
        world.clock.advance(20)
        if next(slow, None) is not None:
            raise ReadTimeoutError(endpoint_url="https://states.fake")
        return await describe(executionArn=executionArn)

    world.sfn.describe_execution = slow_describe  # type: ignore[method-assign]
    intake, _ = intake_for(world)
    with stamina.set_testing(True, attempts=5):
        await handle(world, last_receive(), intake)
    extended = [c["VisibilityTimeout"] for c in world.sqs.calls_to("change_message_visibility")]
    assert len(extended) >= 2, "extended between the slow describes"
    assert set(extended) == {world.settings.visibility_timeout}
    assert world.pool.ledger.running == {ARN}


async def test_a_dead_letter_send_failing_on_the_last_receive_is_retried_kept_hidden(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An invalid request on its last receive; the dead-letter queue refuses the copy twice.
    Handed back, SQS's redrive policy would move it without its reason: it is kept hidden
    and the send tried again until it goes, then the request is deleted."""
    monkeypatch.setattr("dispatcher.daemon.deadletter.LAST_RECEIVE_MAX_PAUSE", 0.01)
    world = world_of(limit=2)
    intake, _ = intake_for(world)
    world.sqs.fail("send_message", *(client_error("InternalError", 500) for _ in range(2)))
    bad = sqs_message(
        "not json", message_id="m-1", system={"ApproximateReceiveCount": str(MAX_RECEIVES)}
    )
    await handle(world, bad, intake)
    *refused, copy = dead_letters(world)
    assert len(refused) == 2, "tried again on the spot"
    assert copy["MessageAttributes"][REASON_ATTRIBUTE]["StringValue"] == "invalid_json"
    assert world.sqs.calls_to("change_message_visibility") == [], "handed back"
    assert world.sqs.calls_to("delete_message") or world.sqs.calls_to("delete_message_batch")


async def test_a_reign_lost_with_a_request_kept_leaves_it_to_be_settled_after() -> None:
    """The lease lost (`keep_settling`): intake ends without the shutdown's deadline for
    what it keeps on its last receive - not let go, for SQS's redrive policy to move
    without a reason, but left hidden for the service to settle once D and the grace have
    passed (here: its execution never existed, so it is dead-lettered with the reason)."""
    world = world_of(limit=0)
    world.pool.ledger.set_limit(0)
    intake, _ = intake_for(world)
    await intake.admit(intake.queues[0], last_receive())  # waits: no slot
    intake.keep_settling = True
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(intake.run)
            intake.stop()
    assert len(intake.starter.last_receives) == 1, "let go when the reign ended"
    assert dead_letters(world) == []
    assert handed_back(world) == []
    intake.starter.last_receives.reign_over()  # what the service does
    world.clock.advance(D + GRACE)
    with anyio.fail_after(5):
        await intake.starter.last_receives.finish()
    [copy] = dead_letters(world)
    assert copy["MessageAttributes"][REASON_ATTRIBUTE]["StringValue"] == "receive_limit"
    detail = copy["MessageAttributes"][DETAIL_ATTRIBUTE]["StringValue"]
    # The leader may start it from another copy meanwhile: no invitation to redrive it.
    assert "'m-1'" in detail
    assert "lost its lease" in detail
    assert "do not redrive" in detail


async def test_after_a_lost_lease_a_kept_request_waits_for_starts_the_reset_ledger_forgot() -> None:
    """Kept long ago (its own wait over), the request is settled after the reign. Another
    copy of it (SQS stored it twice) was started just before the lease was lost, its
    answer lost: a start in doubt, which the ledger knew - until the reign's reset. That
    start takes effect D after it was sent. A describe at once said "does not exist", and
    the request was dead-lettered, although its execution then ran. No "does not exist"
    settles it before D and the grace after the reign."""
    world = world_of(limit=0)
    world.pool.ledger.set_limit(0)
    intake, _ = intake_for(world)
    await intake.admit(intake.queues[0], last_receive())  # waits: no slot
    assert await intake.hand_back_waiting() == 0
    kept = intake.starter.last_receives
    assert len(kept) == 1
    world.clock.advance(D + GRACE + 30)  # its own wait long over
    world.pool.ledger.set_limit(1)
    [reservation] = world.pool.ledger.reserve(1, world.clock())
    world.pool.ledger.mark_sent(reservation)
    world.pool.ledger.doubt(reservation, ARN, world.clock())  # the twin's start, in doubt
    world.pool.reset()  # the reign is over (`Dispatcher._abdicate`)
    kept.reign_over()  # what the service does next
    assert await kept.settle_once() == 0
    world.clock.advance(D / 2)
    assert await kept.settle_once() == 0
    assert dead_letters(world) == [], "dead-lettered while the start the ledger forgot may land"
    world.sfn.add_execution("m-1", '{"n": 1}')  # the start took effect, D after it was sent
    world.clock.advance(D / 2 + GRACE)
    assert await kept.settle_once() == 1
    assert dead_letters(world) == []


async def test_a_dead_letter_on_its_last_receive_is_deleted_even_if_the_delete_fails_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its copy (with the reason) was sent, then the delete failed: left, the request
    would come back and the redrive policy would move it a second time, without a reason.
    Kept hidden, the delete is tried again."""
    monkeypatch.setattr("dispatcher.daemon.deadletter.LAST_RECEIVE_MAX_PAUSE", 0.01)
    world = world_of()
    intake, _ = intake_for(world)
    world.sqs.fail("delete_message", client_error("RequestThrottled", 400, op="DeleteMessage"))
    with anyio.fail_after(5):
        await intake.admit(intake.queues[0], last_receive(**{IDEMPOTENCY_ATTRIBUTE: "bad name!"}))
    [copy] = dead_letters(world)
    assert copy["MessageAttributes"][REASON_ATTRIBUTE]["StringValue"] == "invalid_idempotency_key"
    deletes = world.sqs.calls_to("delete_message")
    assert [d["ReceiptHandle"] for d in deletes] == ["rh-m-1", "rh-m-1"]
    assert handed_back(world) == []


async def test_a_dead_letters_delete_on_its_last_receive_outlives_a_stop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The lease was lost in a throttling storm while the delete of a dead-lettered request
    on its last receive was being tried again: the stop cut the tries short, the request
    lapsed, and the redrive policy moved it a second time, without its reason. The delete
    goes on through a stop, for a bounded time."""
    monkeypatch.setattr("dispatcher.daemon.deadletter.LAST_RECEIVE_MAX_PAUSE", 0.01)
    world = world_of()
    intake, _ = intake_for(world)
    throttled = client_error("RequestThrottled", 400, op="DeleteMessage")
    world.sqs.fail("delete_message", *[throttled] * 3)
    message = last_receive(**{IDEMPOTENCY_ATTRIBUTE: "bad name!"})
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(intake.admit, intake.queues[0], message)
            await world.sqs.called("delete_message")
            tg.cancel_scope.cancel()  # the stop comes while the delete is tried again
    assert len(dead_letters(world)) == 1
    deletes = world.sqs.calls_to("delete_message")
    assert [d["ReceiptHandle"] for d in deletes] == ["rh-m-1"] * 4, "tried until it was done"


async def test_a_kept_request_is_not_let_go_when_an_extension_call_fails() -> None:
    """The extension's call failed (throttled): the message is still hidden for a while,
    so it stays kept and the next pass tries again; it used to be let go at once, for the
    redrive policy to move without a reason."""
    world = world_of(limit=0)
    world.pool.ledger.set_limit(0)
    intake, _ = intake_for(world)
    await intake.admit(intake.queues[0], last_receive())
    assert await intake.hand_back_waiting() == 0
    kept = intake.starter.last_receives
    world.clock.advance(world.settings.visibility_timeout / 2)
    world.sqs.fail(
        "change_message_visibility_batch",
        client_error("RequestThrottled", 400, op="ChangeMessageVisibilityBatch"),
    )
    assert await kept.keep_hidden_once() == 0
    assert len(kept) == 1, "let go on a failed call"
    assert await kept.keep_hidden_once() == 1, "tried again"
    assert len(kept) == 1


async def test_a_kept_request_whose_extension_hangs_is_tried_again_within_seconds() -> None:
    """The extension's call hangs (a request lost on the wire): it is given up after a
    fifth of the visibility and tried again a second later, not a quarter of the
    visibility later - by then the margin an extension at half the visibility leaves may
    be gone, and the redrive policy moves the message without a reason."""
    world = world_of(limit=0, visibility_timeout=10)  # the deadline is in real time: 2 s
    world.pool.ledger.set_limit(0)
    intake, _ = intake_for(world)
    await intake.admit(intake.queues[0], last_receive())
    assert await intake.hand_back_waiting() == 0
    kept = intake.starter.last_receives
    world.clock.advance(world.settings.visibility_timeout / 2)
    answer = world.sqs.change_message_visibility_batch

    async def hangs(**_: Any) -> dict[str, Any]:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    world.sqs.change_message_visibility_batch = hangs  # type: ignore[method-assign]
    with anyio.fail_after(world.settings.visibility_timeout / 4):
        assert await kept.keep_hidden_once() == 0
    assert len(kept) == 1
    assert kept._next_due(renewals=False) <= 1.0
    world.sqs.change_message_visibility_batch = answer  # type: ignore[method-assign]
    assert await kept.keep_hidden_once() == 1
    assert kept._next_due(renewals=False) > 1.0


async def test_after_a_lost_lease_a_kept_token_request_whose_child_runs_is_let_go() -> None:
    """Only a leader holds tokens: settled after the reign, a token request whose child
    runs is let go (logged), neither deleted nor held - and the pass goes on."""
    world = world_of(limit=2)
    world.sfn.answers_lost = 10
    intake, _ = intake_for(world)
    await handle(world, last_receive(**{"task-token": TOKEN}), intake)
    kept = intake.starter.last_receives
    assert len(kept) == 1
    kept.reign_over()
    world.clock.advance(D + GRACE)
    assert await kept.settle_once() == 1
    assert len(kept) == 0
    assert world.sqs.calls_to("delete_message") == []
    assert dead_letters(world) == []


async def test_a_kept_token_request_is_dead_lettered_only_once_its_parent_was_answered() -> None:
    """Known never started, but SendTaskFailure fails (throttled): the message - the only
    record of the token - is neither dead-lettered nor deleted; it stays kept, and the
    next pass answers the parent, then dead-letters it."""
    world = world_of(limit=1)
    world.sfn.fail_always("start_execution", client_error("InternalFailure", 500))
    intake, _ = intake_for(world)
    await handle(world, last_receive(**{"task-token": TOKEN}), intake)
    kept = intake.starter.last_receives
    world.clock.advance(D + GRACE)
    world.sfn.fail("send_task_failure", *[client_error("ThrottlingException", 400)] * 2)
    assert await kept.settle_once() == 0
    assert TOKEN not in world.sfn.answers
    assert dead_letters(world) == []
    assert world.sqs.calls_to("delete_message") == []
    assert len(kept) == 1
    world.clock.advance(60)
    assert await kept.settle_once() == 1
    assert world.sfn.answers[TOKEN][:2] == ("failure", DEAD_LETTERED)
    assert len(dead_letters(world)) == 1


# -- renewed: a fresh copy with the request's identity, then the original deleted -----------


def copies_sent(world: World) -> list[dict[str, Any]]:
    return [c for c in world.sqs.calls_to("send_message") if c["QueueUrl"] == REQUEST_QUEUE]


def deleted_handles(world: World) -> list[str]:
    single = [c["ReceiptHandle"] for c in world.sqs.calls_to("delete_message")]
    batched = [
        e["ReceiptHandle"] for c in world.sqs.calls_to("delete_message_batch") for e in c["Entries"]
    ]
    return single + batched


async def test_at_shutdown_a_request_kept_unsettled_is_renewed_not_let_go() -> None:
    """AWS does not answer the describes before the shutdown's deadline. The request used
    to be let go, hidden: it came back and the redrive policy moved it without a reason.
    Renewed, its copy (same identity: the same execution name) goes back to the queue and
    the original is deleted."""
    world = world_of(limit=2)
    world.sfn.answers_lost = 10
    world.sfn.fail_always("describe_execution", client_error("InternalFailure", 500))
    intake, _ = intake_for(world, renewals=True)
    message = last_receive(tenant="t-1")
    await handle(world, message, intake)
    with anyio.move_on_after(0.2):
        await intake.starter.last_receives.finish()
    [copy] = copies_sent(world)
    attributes = copy["MessageAttributes"]
    assert copy["MessageBody"] == message["Body"]
    assert attributes[REQUEST_ID_ATTRIBUTE]["StringValue"] == "m-1", "the same execution name"
    assert attributes[ORIGINAL_ID_ATTRIBUTE]["StringValue"] == "m-1"
    assert attributes["tenant"]["StringValue"] == "t-1"
    assert copy["DelaySeconds"] == 30, "visible when it would have been, handed back"
    assert message["ReceiptHandle"] in deleted_handles(world)
    assert len(intake.starter.last_receives) == 0
    assert dead_letters(world) == []
    assert handed_back(world) == []


async def test_a_copy_keeps_the_task_token_and_not_an_earlier_reason() -> None:
    world = world_of(limit=2)
    world.sfn.answers_lost = 10
    intake, _ = intake_for(world, renewals=True)
    message = last_receive(
        **{"task-token": TOKEN, REQUEST_ID_ATTRIBUTE: "r-9", REASON_ATTRIBUTE: "old"}
    )
    await handle(world, message, intake)
    assert await intake.starter.last_receives.renew_once() == 1
    [copy] = copies_sent(world)
    attributes = copy["MessageAttributes"]
    assert attributes["task-token"]["StringValue"] == TOKEN
    assert attributes[REQUEST_ID_ATTRIBUTE]["StringValue"] == "r-9"
    assert REASON_ATTRIBUTE not in attributes


async def test_a_refused_copy_leaves_the_request_kept_and_tried_again() -> None:
    world = world_of(limit=2)
    world.sfn.answers_lost = 10
    intake, _ = intake_for(world)  # every copy refused
    message = last_receive()
    await handle(world, message, intake)
    assert await intake.starter.last_receives.renew_once() == 0
    assert len(intake.starter.last_receives) == 1
    assert message["ReceiptHandle"] not in deleted_handles(world)
    assert await intake.starter.last_receives.renew_once() == 0, "not due again yet"
    assert len(copies_sent(world)) == 1
    world.sqs.refuse_sends_to.clear()
    world.clock.advance(3)
    assert await intake.starter.last_receives.renew_once() == 1
    assert len(intake.starter.last_receives) == 0


async def test_a_closed_child_whose_parent_cannot_be_answered_on_the_last_receive_is_kept() -> None:
    """The child had ended; the answer to its parent fails. The message used to be left to
    lapse: on its last receive, the redrive policy moved it without a reason. Kept, it is
    renewed, and its copy (with the token) tries the answer again."""
    world = world_of(limit=2)
    world.sfn.add_execution("m-1", '{"n": 1}', status="SUCCEEDED")
    world.sfn.fail_always("send_task_success", client_error("ThrottlingException", 400))
    intake, _ = intake_for(world, renewals=True)
    await handle(world, last_receive(**{"task-token": TOKEN}), intake)
    assert TOKEN not in world.sfn.answers
    assert len(intake.starter.last_receives) == 1, "left to lapse"
    assert await intake.starter.last_receives.renew_once() == 1
    [copy] = copies_sent(world)
    assert copy["MessageAttributes"]["task-token"]["StringValue"] == TOKEN


async def test_a_request_that_would_wait_on_its_last_receive_is_renewed_at_once() -> None:
    """No slot: it used to wait in the room on its last receive, hidden by extensions; its
    process killed, SQS's redrive policy moved it without a reason (and SQS's move task sent
    it back without its identity). Renewed at once, its copy waits as any request does."""
    world = world_of(limit=0)
    world.pool.ledger.set_limit(0)
    intake, _ = intake_for(world, renewals=True)
    message = last_receive()
    await intake.admit(intake.queues[0], message)
    [copy] = copies_sent(world)
    assert copy["MessageAttributes"][REQUEST_ID_ATTRIBUTE]["StringValue"] == "m-1"
    assert message["ReceiptHandle"] in deleted_handles(world)
    assert len(world.pool.room) == 0
    assert len(intake.starter.last_receives) == 0


async def test_a_kept_request_is_not_dead_lettered_while_its_twin_is_being_started() -> None:
    """SQS stored the request twice: one copy, on its last receive, gave up (throttled) and
    was kept; its twin got the slot, and its start is on the wire when the kept copy is
    described - "does not exist" (the start has not taken effect, or the describe lags).
    It used to be dead-lettered then, inviting a redrive, while the twin started it."""
    world = world_of(limit=1)
    world.sfn.fail_always("start_execution", client_error("ThrottlingException", 400))
    intake, _ = intake_for(world)
    await handle(world, last_receive(), intake)
    assert len(intake.starter.last_receives) == 1
    world.sfn._always.clear()
    world.sfn.start_gate = anyio.Event()
    twin = sqs_message('{"n": 1}', message_id="m-1", receipt_handle="rh-twin")
    attempts = len(world.sfn.calls_to("start_execution"))
    async with anyio.create_task_group() as handlers:
        await intake.admit(intake.queues[0], twin)
        intake.dispatch_once(world.pool, handlers)
        while len(world.sfn.calls_to("start_execution")) == attempts:  # the twin's attempt
            await anyio.lowlevel.checkpoint()
        world.clock.advance(D + GRACE)
        assert await intake.starter.last_receives.settle_once() == 0
        assert dead_letters(world) == [], "dead-lettered while its twin starts it"
        world.sfn.start_gate.set()
    assert world.pool.ledger.running == {ARN}
    world.clock.advance(D + GRACE)
    assert await intake.starter.last_receives.settle_once() == 1
    assert dead_letters(world) == []
    assert len(intake.starter.last_receives) == 0


@pytest.mark.timeout(30)
async def test_a_hung_describe_of_a_former_name_does_not_hold_up_the_other_kept_messages() -> None:
    """The describes of a kept request's former names are bounded as its own describe is
    (a quarter of the visibility timeout): the pass that makes them also extends the
    other kept messages' visibility. Unbounded, a describe hung on the wire held it up
    until those messages came back, for SQS to move them without a reason."""
    world = world_of(limit=0, visibility_timeout=10)
    world.pool.ledger.set_limit(0)
    intake, _ = intake_for(world)
    former = execution_arn(STATE_MACHINE_ARN, f"k{key_tag('t-1')}_m-1")
    describe = world.sfn.describe_execution

    async def hung(*, executionArn: str) -> dict[str, Any]:  # noqa: N803 - botocore's
        if executionArn == former:
            await anyio.sleep_forever()
        return await describe(executionArn=executionArn)

    world.sfn.describe_execution = hung  # type: ignore[method-assign]
    await intake.admit(intake.queues[0], last_receive(tenant="t-1"))
    assert await intake.hand_back_waiting() == 0
    world.clock.advance(D + GRACE)
    with anyio.fail_after(world.settings.visibility_timeout / 2):
        assert await intake.starter.last_receives.settle_once() == 0
    assert dead_letters(world) == []


async def test_a_last_receive_waiting_unrenewed_is_renewed_when_its_extension_is_due() -> None:
    """Its copy refused at admission, it waits in the room; when its visibility is due to
    be extended, it is renewed instead (SQS takes the copy now)."""
    world = world_of(limit=0)
    world.pool.ledger.set_limit(0)
    intake, _ = intake_for(world)  # copies refused
    message = last_receive()
    await intake.admit(intake.queues[0], message)
    assert len(world.pool.room) == 1
    world.sqs.refuse_sends_to.clear()
    world.clock.advance(world.settings.visibility_timeout / 2)
    await intake.extend_waiting()
    assert len(copies_sent(world)) == 2, "refused at admission, sent now"
    assert message["ReceiptHandle"] in deleted_handles(world)
    assert len(world.pool.room) == 0


async def test_a_last_receive_not_renewed_while_stopping_is_kept_not_left_in_the_room() -> None:
    """The process began to stop while the copy was being refused: its rooms were set aside
    already, so a request put there now would be left to lapse. It is kept instead."""
    world = world_of(limit=0)
    world.pool.ledger.set_limit(0)
    intake, _ = intake_for(world)  # copies refused
    intake.starter.stopping = True
    await intake.admit(intake.queues[0], last_receive())
    assert len(world.pool.room) == 0
    assert len(intake.starter.last_receives) == 1


async def test_a_kept_request_is_not_dead_lettered_while_a_copy_of_it_waits_for_a_slot() -> None:
    """A renewal whose answer was lost left two copies of the request: one kept on its last
    receive (its start in doubt), one waiting in the room for the slot the doubt held. The
    kept copy is described "does not exist" past D and the grace: the doubt is settled, but
    the copy waiting here will start the request - it is not dead-lettered (inviting a
    redrive of a request about to run), and is served once that start took effect."""
    world = world_of(limit=1)
    world.sfn.fail_always("start_execution", client_error("InternalFailure", 500))
    intake, _ = intake_for(world)
    await handle(world, last_receive(), intake)
    assert len(intake.starter.last_receives) == 1
    assert world.pool.ledger.in_doubt == {ARN}
    world.sfn._always.clear()
    copy = sqs_message('{"n": 1}', message_id="m-2", attributes={REQUEST_ID_ATTRIBUTE: "m-1"})
    await intake.admit(intake.queues[0], copy)
    assert len(world.pool.room) == 1, "the copy waits: the doubt holds the only slot"
    world.clock.advance(D + GRACE)
    assert await intake.starter.last_receives.settle_once() == 0
    assert dead_letters(world) == [], "dead-lettered while a copy of it waits to start it"
    assert world.pool.ledger.in_doubt == frozenset(), "the doubt settled: the slot is free"
    async with anyio.create_task_group() as handlers:
        intake.dispatch_once(world.pool, handlers)
    assert world.pool.ledger.running == {ARN}
    world.clock.advance(D + GRACE)
    assert await intake.starter.last_receives.settle_once() == 1
    assert dead_letters(world) == []
    assert len(intake.starter.last_receives) == 0


async def test_a_closed_child_under_a_former_name_kept_unanswered_describes_that_name() -> None:
    """Its child ran (and ended) under the name a former ``key_attribute`` gave it; the
    answer to its parent fails on the last receive, and no copy can be sent: kept. It used
    to be kept under its current name, as existing: every describe said "does not exist",
    taken for a lag, and the message was neither deleted nor dead-lettered. Kept under the
    name it was found by, the next describe finds the child and its parent is answered."""
    world = world_of(limit=2)
    former = world.sfn.add_execution(f"k{key_tag('t-1')}_m-1", '{"n": 1}', status="SUCCEEDED")
    world.pool.ledger.observe_terminal(former, 0)  # known here: looked for there first
    world.sfn.fail("send_task_success", *[client_error("ThrottlingException", 400)] * 2)
    intake, _ = intake_for(world)  # every copy refused
    message = last_receive(tenant="t-1", **{"task-token": TOKEN})
    await handle(world, message, intake)
    kept = intake.starter.last_receives
    assert TOKEN not in world.sfn.answers
    assert len(kept) == 1
    world.clock.advance(D + GRACE)
    assert await kept.settle_once() == 1
    assert world.sfn.calls_to("describe_execution")[-1] == {"executionArn": former}
    assert world.sfn.answers[TOKEN][0] == "success"
    assert message["ReceiptHandle"] in deleted_handles(world)
    assert dead_letters(world) == []


async def test_a_kept_request_whose_parent_answer_fails_again_when_settled_stays_kept() -> None:
    """Settled by a describe (its child closed), the answer to its parent fails again: the
    settle used to drop it from the kept requests all the same (its re-keep a no-op, as it
    was still kept), and it lapsed - the redrive policy moved it without a reason. It stays
    kept, and a later pass answers the parent and deletes it."""
    world = world_of(limit=2)
    world.sfn.add_execution("m-1", '{"n": 1}', status="SUCCEEDED")
    world.sfn.fail("send_task_success", *[client_error("ThrottlingException", 400)] * 4)
    intake, _ = intake_for(world)  # every copy refused
    message = last_receive(**{"task-token": TOKEN})
    await handle(world, message, intake)
    kept = intake.starter.last_receives
    assert len(kept) == 1
    world.clock.advance(D + GRACE)
    await kept.settle_once()
    assert TOKEN not in world.sfn.answers
    assert len(kept) == 1, "let go unanswered, neither deleted nor dead-lettered"
    world.clock.advance(D + GRACE)
    await kept.settle_once()
    assert world.sfn.answers[TOKEN][0] == "success"
    assert message["ReceiptHandle"] in deleted_handles(world)
    assert len(kept) == 0
    assert dead_letters(world) == []


async def test_after_the_reign_a_hung_settle_does_not_hold_up_the_other_kept_extensions() -> None:
    """Settled after the reign (`finish`), the kept requests are renewed, kept hidden and
    settled each in a loop of its own, as while governing: a settle that hangs (its dead
    letter's send, its parent's answer lost on the wire) does not hold up the other kept
    messages' extensions. In one loop, it held them up until they came back, for SQS's
    redrive policy to move them without a reason."""
    world = world_of(limit=0, visibility_timeout=10)  # the extension loop: every 1.25 s
    world.pool.ledger.set_limit(0)
    intake, _ = intake_for(world)
    await intake.admit(intake.queues[0], last_receive())
    other = sqs_message(
        '{"n": 2}', message_id="m-2", system={"ApproximateReceiveCount": str(MAX_RECEIVES)}
    )
    await intake.admit(intake.queues[0], other)
    assert await intake.hand_back_waiting() == 0
    kept = intake.starter.last_receives
    assert len(kept) == 2
    world.clock.advance(D + GRACE)
    send = world.sqs.send_message
    hung: list[str] = []
    marks: list[int] = []  # extension calls made before the hang

    async def hangs_once(**call: Any) -> dict[str, Any]:
        if call["QueueUrl"] == DEAD_LETTER_QUEUE and not hung:
            hung.append(call["QueueUrl"])
            marks.append(len(world.sqs.calls_to("change_message_visibility_batch")))
            world.clock.advance(world.settings.visibility_timeout)  # the other one is due
            await anyio.sleep_forever()
        return await send(**call)

    world.sqs.send_message = hangs_once  # type: ignore[method-assign]
    kept.after_reign = True
    with anyio.move_on_after(3):
        await kept.finish()
    assert hung, "no dead letter was sent"
    calls = world.sqs.calls_to("change_message_visibility_batch")[marks[0] :]
    handles = [e["ReceiptHandle"] for c in calls for e in c["Entries"]]
    assert "rh-m-2" in handles, "the other kept message was not extended while one hung"


async def test_with_max_receive_count_1_a_waiting_copy_comes_back_when_a_deferral_would() -> None:
    """With maxReceiveCount 1 every receive is the last: a copy visible at once was received
    and renewed again at once, a send and a delete per receive for as long as the pool was
    full (in the simulation, hundreds of copies churning, one of whose deletes then failed).
    Its copy now stays hidden as long as a request deferred then would."""
    world = world_of(limit=1)
    world.pool.ledger.observe_running(execution_arn(STATE_MACHINE_ARN, "other"), T0)
    intake, _ = intake_for(world, renewals=True)
    intake.queues[0].max_receive_count = 1
    message = sqs_message('{"n": 1}', message_id="m-1", system={"ApproximateReceiveCount": "1"})
    await intake.admit(intake.queues[0], message)
    [copy] = copies_sent(world)
    assert copy["DelaySeconds"] >= 1
    assert message["ReceiptHandle"] in deleted_handles(world)


def full_of_minute_runs() -> tuple[World, Intake]:
    """Limit 1 taken by a run, runs lasting a minute; its queue's maxReceiveCount 1 (every
    receive is a last one) and SQS taking every copy."""
    world = world_of(limit=1)
    world.pool.ledger.observe_running(execution_arn(STATE_MACHINE_ARN, "other"), T0)
    world.pool.note_freed(Change.FREED, was_full=False, since=world.clock() - 60.0)
    intake, _ = intake_for(world, renewals=True)
    intake.queues[0].max_receive_count = 1
    return world, intake


async def test_max_receive_count_1_copy_back_at_its_turn_not_renewed_every_second() -> None:
    """maxReceiveCount 1, the pool full of one-minute runs: the first request's copy came
    back at its turn (nothing ahead of it in its line) and was renewed to come back 1 s
    later, and again, a send and a delete every second for as long as the pool stayed full
    (the simulation's seed 1020 churned for ever); it used to be spaced after the request
    still out behind it. Back at its turn and still unable to start, it waits one run of
    its lanes at least."""
    world, intake = full_of_minute_runs()
    queue = intake.queues[0]
    for n in (1, 2):  # m-2 is deferred after m-1: its copy is still out when m-1's is back
        message = sqs_message(
            f'{{"n": {n}}}', message_id=f"m-{n}", system={"ApproximateReceiveCount": "1"}
        )
        await intake.admit(queue, message)
    first, later = copies_sent(world)
    assert first["DelaySeconds"] < later["DelaySeconds"]
    world.clock.advance(first["DelaySeconds"])
    back = sqs_message(  # the copy, back at its turn
        first["MessageBody"],
        message_id="copy-1",
        attributes={k: v["StringValue"] for k, v in first["MessageAttributes"].items()},
        system={"ApproximateReceiveCount": "1"},
    )
    await intake.admit(queue, back)
    [*_, second] = copies_sent(world)
    assert second["DelaySeconds"] >= 60, "renewed to come back within the second"


async def test_max_receive_count_1_copies_of_one_request_out_together_come_back_spread() -> None:
    """maxReceiveCount 1, the pool full: every copy of a request is renewed on each receive,
    and copies multiply (SQS stores a send twice, a renewed original's delete is lost and
    it comes back). Sharing one place, four copies out together came back together, each
    renewed again after the same short wait: their number grew with every round, without
    bound (the simulation's seed 1020 never ended: 6,000 copies of one request). One copy
    holds the request's turn; the others are spares, back 15 minutes later (by then the
    request has mostly started, and they are deleted), so their rounds stay rare."""
    world, intake = full_of_minute_runs()
    queue = intake.queues[0]
    for n in range(4):  # copies of one request (its identity), received together
        copy = sqs_message(
            '{"n": 1}',
            message_id=f"copy-{n}",
            attributes={REQUEST_ID_ATTRIBUTE: "m-1"},
            system={"ApproximateReceiveCount": "1"},
        )
        await intake.admit(queue, copy)
    delays = [c["DelaySeconds"] for c in copies_sent(world)]
    assert len(delays) == 4
    assert delays[0] < MAX_DEFER_SECONDS, "the copy holding the turn"
    assert delays[1:] == [MAX_DEFER_SECONDS] * 3, f"spares back with it: {delays}"


async def test_with_more_receives_left_to_its_copy_a_waiting_copy_comes_back_at_once() -> None:
    """maxReceiveCount above 1: the copy (received zero times) may wait in the room, so it
    comes back at once and starts as soon as a slot frees."""
    world = world_of(limit=1)
    world.pool.ledger.observe_running(execution_arn(STATE_MACHINE_ARN, "other"), T0)
    intake, _ = intake_for(world, renewals=True)
    await intake.admit(intake.queues[0], last_receive())
    [copy] = copies_sent(world)
    assert copy.get("DelaySeconds", 0) == 0


async def test_a_renewed_original_is_deleted_through_a_burst_of_failed_deletes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Four tries within seconds once all failed (a throttle and three lost calls in a row):
    the original came back on a receive past maxReceiveCount and SQS moved it to the
    dead-letter queue without a reason. The delete is tried again while the original's
    receipt handle works."""
    monkeypatch.setattr("dispatcher.daemon.renewal.DELETE_PAUSE", 0.01)
    world = world_of(limit=0)
    world.pool.ledger.set_limit(0)
    intake, _ = intake_for(world, renewals=True)
    throttled = client_error("RequestThrottled", 400, op="DeleteMessage")
    world.sqs.fail("delete_message", *[throttled] * 7)
    message = last_receive()
    with anyio.fail_after(8):
        await intake.admit(intake.queues[0], message)
    assert len(copies_sent(world)) == 1
    deletes = [c["ReceiptHandle"] for c in world.sqs.calls_to("delete_message")]
    assert deletes == [message["ReceiptHandle"]] * 8


def test_a_renewal_tries_its_delete_for_at_least_half_the_visibility() -> None:
    """The dispatcher's hidden-since is a lower bound (SQS may hide the original longer):
    counted from it alone, a renewal once gave up its delete after one try, and the
    original, left, was moved without a reason when it came back."""
    assert handle_left(hidden_since=0.0, now=58.5, visibility=60) == 30.0
    assert handle_left(hidden_since=0.0, now=5.0, visibility=60) == 54.0


@on_virtual_time
async def test_a_dead_letters_delete_on_its_last_receive_is_tried_as_long_as_its_send_is() -> None:
    """No stop: a throttling storm refused the delete of a dead-lettered request on its
    last receive for 95 s. Its tries are bounded as its send's are (5 minutes); the bound
    of a stop (a minute) does not apply while the process runs on - cut short there, the
    request lapsed and the redrive policy moved it a second time, without its reason."""
    world = world_of()
    intake, _ = intake_for(world)
    throttled = client_error("RequestThrottled", 400, op="DeleteMessage")
    world.sqs.fail("delete_message", *[throttled] * 20)  # 2 + 4 + 18 x 5 s = 96 s of pauses
    began = anyio.current_time()
    await intake.admit(intake.queues[0], last_receive(**{IDEMPOTENCY_ATTRIBUTE: "bad name!"}))
    assert anyio.current_time() - began > 60
    assert len(dead_letters(world)) == 1
    deletes = world.sqs.calls_to("delete_message")
    assert len(deletes) == 21, "given up while SQS still refused it"
    assert handed_back(world) == []


@on_virtual_time
async def test_a_forced_stop_does_not_wait_for_a_dead_letters_delete() -> None:
    """A second SIGTERM abandons everything now: the delete of a dead-lettered request on
    its last receive, tried again through an ordered stop, does not hold a forced one."""
    world = world_of()
    intake, _ = intake_for(world)
    throttled = client_error("RequestThrottled", 400, op="DeleteMessage")
    world.sqs.fail("delete_message", *[throttled] * 100)
    message = last_receive(**{IDEMPOTENCY_ATTRIBUTE: "bad name!"})
    async with anyio.create_task_group() as tg:
        tg.start_soon(intake.admit, intake.queues[0], message)
        await world.sqs.called("delete_message")
        intake.stop(force=True)
        tg.cancel_scope.cancel()
        forced = anyio.current_time()
    assert anyio.current_time() - forced < 1, "the forced stop waited for the delete"
    assert len(world.sqs.calls_to("delete_message")) == 1


@on_virtual_time
async def test_a_forced_stop_ends_a_dead_letters_delete_going_on_through_a_stop() -> None:
    """SIGTERM: the delete of a dead-lettered request on its last receive goes on through
    the ordered stop; a second SIGTERM (forced) gives it up at once."""
    world = world_of()
    intake, _ = intake_for(world)
    throttled = client_error("RequestThrottled", 400, op="DeleteMessage")
    world.sqs.fail("delete_message", *[throttled] * 100)
    message = last_receive(**{IDEMPOTENCY_ATTRIBUTE: "bad name!"})
    scopes: list[anyio.CancelScope] = []

    async def admit() -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            await intake.admit(intake.queues[0], message)

    async with anyio.create_task_group() as tg:
        tg.start_soon(admit)
        await world.sqs.called("delete_message")
        scopes[0].cancel()  # the ordered stop
        await anyio.sleep(20)
        tried = len(world.sqs.calls_to("delete_message"))
        assert tried > 2, "the delete went on through the ordered stop"
        intake.stop(force=True)
        forced = anyio.current_time()
    assert anyio.current_time() - forced < 1, "the forced stop waited for the delete"
    assert len(world.sqs.calls_to("delete_message")) == tried


async def test_max_receive_count_1_copy_of_a_request_being_started_comes_back_as_a_spare() -> None:
    """maxReceiveCount 1: SQS stored the request twice, one copy's start is on the wire
    (retried for as long as AWS throttles it), the other is received meanwhile. It was
    renewed to come back 1 s later, and again, a send, a delete and a receive every second
    for as long as the start retried (the simulation's seed 203: 30 s). It comes back once
    the start has had its time (its retries and one attempt more), by when it has ended one
    way or the other - not 15 minutes later: the start may fail or expire, and the copy
    then carries the request."""
    world = world_of(limit=1)
    world.sfn.start_gate = anyio.Event()
    intake, _ = intake_for(world, renewals=True)
    queue = intake.queues[0]
    queue.max_receive_count = 1
    first = sqs_message('{"n": 1}', message_id="m-1", system={"ApproximateReceiveCount": "1"})
    twin = sqs_message(
        '{"n": 1}',
        message_id="m-1",
        receipt_handle="rh-twin",
        system={"ApproximateReceiveCount": "1"},
    )
    async with anyio.create_task_group() as handlers:
        await intake.admit(queue, first)
        intake.dispatch_once(world.pool, handlers)
        while not world.sfn.calls_to("start_execution"):  # its attempt is on the wire
            await anyio.lowlevel.checkpoint()
        await intake.admit(queue, twin)
        [copy] = copies_sent(world)
        settings = world.settings
        assert copy["DelaySeconds"] == settings.start_retry_timeout + settings.start_timeout
        assert "rh-twin" in deleted_handles(world)
        world.sfn.start_gate.set()
    assert world.pool.ledger.running == {ARN}


@on_virtual_time
async def test_a_renewed_originals_delete_is_not_held_up_by_tries_that_get_no_answer() -> None:
    """A storm of slow calls: each delete got no answer until its 8 s were up, and each try
    waited for the one before, four tries in the 30 s the handle works, all lost; the
    original came back and SQS moved it without a reason (the simulation's seed 956). A try
    that waits for its answer does not hold up the next."""
    world = world_of(limit=0)
    world.pool.ledger.set_limit(0)
    intake, _ = intake_for(world, renewals=True)
    real_delete = world.sqs.delete_message
    calls: list[float] = []

    async def delete_message(**call: Any) -> Any:  # the first six get no answer at all
        calls.append(anyio.current_time())
        if len(calls) <= 6:
            await anyio.sleep_forever()
        return await real_delete(**call)

    world.sqs.delete_message = delete_message  # type: ignore[method-assign]
    message = last_receive()
    began = anyio.current_time()
    await intake.admit(intake.queues[0], message)
    assert len(copies_sent(world)) == 1
    assert len(calls) == 7, "the seventh try deleted it"
    assert calls[-1] - began < world.settings.visibility_timeout / 2, "while the handle works"
    assert message["ReceiptHandle"] in deleted_handles(world)
