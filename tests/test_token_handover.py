"""Task tokens passed on from one reign to the next (on fakes): the tokens whose parents
wait on a reign are what a successor heartbeats from its take-over, before it receives
their messages - which it may not do for long (every slot taken), or which a kill -9 did
not hand back at all."""

from __future__ import annotations

import uuid

import pytest

from dispatcher.daemon.lease import Lease, LeaseConfig, Leases
from tests.audit import session
from tests.fake_intake import handle
from tests.fakes import STATE_MACHINE_ARN, World, build_world, client_error, sqs_message
from tests.helpers import create_lease_table
from tests.test_callbacks import CHILD, RETRY_TOKEN, TOKEN, child_request, wired
from tests.test_lease import Clock

pytestmark = [pytest.mark.timeout(10), pytest.mark.usefixtures("fast_retries")]

OTHER = "AQCEAAAAKgAAAAMAAAAAAAAAA" + "o" * 300  # a token waiting in the room


def beaten_tokens(world: World) -> list[str]:
    """The tokens heartbeated so far, in order."""
    return [c["taskToken"] for c in world.sfn.calls_to("send_task_heartbeat")]


async def test_a_reign_passes_on_every_token_whose_parent_waits() -> None:
    """Held for a running child, waiting in the room for a slot, handed back at the end of
    the reign: each is in what the lease item carries for the successor."""
    world = build_world(limit=1)
    intake, callbacks = wired(world)
    await handle(world, child_request(), intake)  # started: held
    other = sqs_message(
        "{}", message_id="m-3", attributes={"task-token": OTHER, "idempotency-key": "k-3"}
    )
    await intake.admit(intake.queues[0], other)  # every slot taken: waits
    assert len(world.pool.room) == 1
    waiting_child = CHILD.replace("parent-1-0", "k-3")
    passed = callbacks.waiting_tokens(STATE_MACHINE_ARN)
    assert passed == sorted([(TOKEN, CHILD), (OTHER, waiting_child)])
    assert callbacks.waiting_tokens(STATE_MACHINE_ARN.replace(":governed", ":other")) == []
    await intake.hand_back_waiting()
    await callbacks.hand_back()
    assert callbacks.waiting_tokens(STATE_MACHINE_ARN) == passed, "handed back: passed on"
    assert sorted(set(beaten_tokens(world))) == sorted([TOKEN, OTHER]), "each a last heartbeat"


async def test_a_successor_heartbeats_the_tokens_passed_on_before_it_receives_them() -> None:
    world = build_world()
    _, callbacks = wired(world)
    callbacks.adopt(world.pool, [(TOKEN, CHILD)])
    assert await callbacks.heartbeat_new() == 1
    assert beaten_tokens(world) == [TOKEN]
    assert await callbacks.heartbeat_once() == 1
    assert beaten_tokens(world) == [TOKEN, TOKEN]
    assert callbacks.waiting_tokens(STATE_MACHINE_ARN) == [(TOKEN, CHILD)], "passed on again"


async def test_a_token_passed_on_is_held_as_any_once_its_message_comes() -> None:
    world = build_world(aws_exact=False)
    world.sfn.add_execution("parent-1-0", input='{"n": 1}')
    intake, callbacks = wired(world)
    callbacks.adopt(world.pool, [(TOKEN, CHILD)])
    await handle(world, child_request(), intake)
    assert callbacks.tokens() == [(TOKEN, CHILD)]
    assert callbacks._handed == {}
    assert await callbacks.heartbeat_once() == 1


async def test_a_child_a_token_passed_on_waits_on_is_not_stopped() -> None:
    """The predecessor held the retry's token (or had it waiting); its message is back in
    the queue, not received yet. The first token's parent is gone: the child is kept."""
    world = build_world(stop_orphaned_children=True)
    intake, callbacks = wired(world)
    await handle(world, child_request(), intake)
    callbacks.adopt(world.pool, [(RETRY_TOKEN, CHILD)])
    world.sfn.gone_tokens.add(TOKEN)
    await callbacks.heartbeat_once()
    assert world.sfn.calls_to("stop_execution") == []
    # Its parent gone too: forgotten, and the child is left to whoever started it.
    world.sfn.gone_tokens.add(RETRY_TOKEN)
    await callbacks.heartbeat_once()
    assert callbacks.waiting_tokens(STATE_MACHINE_ARN) == []


async def test_a_token_passed_on_is_answered_when_its_child_ends() -> None:
    """Its message waits in the queue (every slot taken): its parent is answered all the
    same when the child ends; the message, received later, is deleted."""
    world = build_world(aws_exact=False)
    world.sfn.add_execution("parent-1-0", input='{"n": 1}', status="SUCCEEDED")
    world.sfn.executions[CHILD].output = '{"r": 1}'
    intake, callbacks = wired(world)
    callbacks.adopt(world.pool, [(TOKEN, CHILD)])
    callbacks.ended(CHILD, "", None)
    assert await callbacks.answer_due() == 1
    assert world.sfn.answers[TOKEN] == ("success", '{"r": 1}')
    assert callbacks.waiting_tokens(STATE_MACHINE_ARN) == []
    await handle(world, child_request(), intake)
    assert [c["ReceiptHandle"] for c in world.sqs.calls_to("delete_message")] == ["rh-m-1"]


async def test_a_token_request_kept_on_its_last_receive_is_heartbeated() -> None:
    """Its start in doubt on its last receive, the request is kept (hidden) until a
    describe settles it: its parent waits meanwhile, and gets heartbeats."""
    world = build_world(limit=1)
    world.pool.ledger.observe_running("arn:busy", world.clock())
    world.pool.update()
    intake, callbacks = wired(world)
    last_receives = intake.starter.last_receives
    callbacks.kept = lambda: [kept.entry for kept in last_receives]
    await intake.admit(intake.queues[0], child_request())
    [entry] = world.pool.room.items()
    world.pool.room.remove(entry)
    last_receives.keep(entry, "waiting at shutdown")
    assert await callbacks.heartbeat_once() == 1
    assert TOKEN in beaten_tokens(world)
    assert callbacks.waiting_tokens(STATE_MACHINE_ARN) == [(TOKEN, CHILD)]
    assert callbacks._waiters(CHILD, set()) == 1, "its child is kept for it"


async def test_without_a_lease_a_child_a_former_token_waited_on_is_left_to_run() -> None:
    """No lease table: what the former process deferred or handed back is unknown here. Its
    token first received before this reign, the child may be awaited by a retry's request
    waiting unseen in the queue: its parent gone, the child is left to run, not stopped."""
    world = build_world(stop_orphaned_children=True)
    intake, callbacks = wired(world)
    callbacks.reign_began = callbacks.unsure_before = 1_000.0
    first = child_request()
    first["Attributes"].update({"ApproximateFirstReceiveTimestamp": "900000"})
    await handle(world, first, intake)  # started here, for a request first received before
    assert callbacks.tokens() == [(TOKEN, CHILD)]
    world.sfn.gone_tokens.add(TOKEN)
    await callbacks.heartbeat_once()
    assert world.sfn.calls_to("stop_execution") == []
    assert world.sample("dispatcher_orphaned_children_total", pool="default", action="left")
    assert [c["ReceiptHandle"] for c in world.sqs.calls_to("delete_message")] == ["rh-m-1"]
    # With a lease table the former reign's tokens are known: nothing waits unseen.
    world = build_world(stop_orphaned_children=True)
    intake, callbacks = wired(world)
    callbacks.reign_began, callbacks.unsure_before = 1_000.0, 0.0
    first = child_request()
    first["Attributes"].update({"ApproximateFirstReceiveTimestamp": "900000"})
    await handle(world, first, intake)
    world.sfn.gone_tokens.add(TOKEN)
    await callbacks.heartbeat_once()
    assert [c["executionArn"] for c in world.sfn.calls_to("stop_execution")] == [CHILD]


# -- the lease item carries them ---------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_the_lease_item_carries_the_tokens_to_the_successor(emulator: str) -> None:
    """Written with a renewal when they change, and with the release; read by whoever takes
    the item next (after a release, or after a holder killed without one)."""
    table = await create_lease_table(emulator, f"lease-{uuid.uuid4().hex[:8]}")
    clock = Clock()
    config = LeaseConfig(table, STATE_MACHINE_ARN, ttl=10, margin=2)
    waiting = [(TOKEN, CHILD)]
    async with session().client("dynamodb", endpoint_url=emulator) as ddb:
        first = Leases(
            ddb,
            table,
            [STATE_MACHINE_ARN],
            ttl=10,
            margin=2,
            start_timeout=0,
            start_grace=0,
            owner="first",
            monotonic=clock,
            wall=clock,
        )
        assert await first.try_acquire()
        assert first.handed == {STATE_MACHINE_ARN: []}
        first.pass_on(lambda arn: list(waiting) if arn == STATE_MACHINE_ARN else [])
        assert await first.renew()
        clock.now += 11  # first killed: no release; the item lapses
        second = Lease(ddb, config, owner="second", monotonic=clock, wall=clock)
        assert await second.try_acquire()
        assert second.handed == [(TOKEN, CHILD)], "as of the last renewal"
        assert second.unsure_before == pytest.approx(clock.now, abs=0.01), "not released"
        second.tokens = lambda: [(TOKEN, CHILD), (RETRY_TOKEN, CHILD)]
        await second.release()
        third = Lease(ddb, config, owner="third", monotonic=clock, wall=clock)
        assert await third.try_acquire()
        assert sorted(third.handed) == sorted([(TOKEN, CHILD), (RETRY_TOKEN, CHILD)])
        assert third.unsure_before == pytest.approx(second.unsure_before, abs=0.01), "carried"
        assert first.unsure_before == 0.0, "a fresh item: nothing unseen"


async def test_a_token_request_handed_back_after_a_start_in_doubt_is_passed_on() -> None:
    """Its start's outcome unknown, the request goes back to its queue for a while: its
    parent still waits on this reign. A successor (this reign killed before the message
    comes back) takes the token over from the lease item, and here the child of its name
    is kept for it: another token's parent gone does not stop it as an orphan."""
    world = build_world(stop_orphaned_children=True)
    world.sfn.fail_always("start_execution", client_error("InternalFailure", 500))
    intake, callbacks = wired(world)
    await handle(world, child_request(), intake)
    assert world.pool.ledger.in_doubt == {CHILD}
    [back] = world.sqs.calls_to("change_message_visibility")
    assert back["ReceiptHandle"] == "rh-m-1"
    assert callbacks.waiting_tokens(STATE_MACHINE_ARN) == [(TOKEN, CHILD)]
    assert callbacks._waiters(CHILD, {RETRY_TOKEN}) == 1, "its child is kept for it"
