"""Intake on fakes, across pools, queues and keys: routing, priorities, per-key limits,
the waiting room (space, look-ahead, visibility) and the start rate."""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
import pytest

from dispatcher.core.ledger import Change
from dispatcher.core.requests import IDEMPOTENCY_ATTRIBUTE, KEY_TAG_LENGTH, execution_arn, key_tag
from dispatcher.core.requests import tag_of as tag_in
from dispatcher.daemon.deadletter import DETAIL_ATTRIBUTE, REASON_ATTRIBUTE
from dispatcher.daemon.intake import UNROUTED, Intake
from dispatcher.daemon.pool import FORGET_AFTER_TURN, LOOKAHEAD, Pool
from dispatcher.settings.layout import PoolConfig, QueueConfig
from sim import loop
from tests.fake_intake import (
    build_layout_world,
    dispatch_all,
    finish,
    handle,
    intake_of,
    waiting,
)
from tests.fakes import (
    ACCOUNT,
    QUEUE_BASE,
    REGION,
    REQUEST_QUEUE,
    STATE_MACHINE_ARN,
    World,
    build_world,
    client_error,
    sqs_message,
    throttled,
)

pytestmark = pytest.mark.timeout(10)

SECOND_ARN = f"arn:aws:states:{REGION}:{ACCOUNT}:stateMachine:second"
SHARED = f"{QUEUE_BASE}/shared"
HIGH = f"{QUEUE_BASE}/high"
LOW = f"{QUEUE_BASE}/low"


def request(message_id: str, **attributes: str) -> dict[str, Any]:
    """A valid request whose execution name is ``message_id``."""
    return sqs_message(json.dumps({"id": message_id}), message_id=message_id, attributes=attributes)


def names(pool: Pool) -> list[str]:
    """Execution names of the requests waiting in ``pool``'s room, oldest first."""
    return [entry.request.name for entry in pool.room.items()]


def started(world: World) -> list[str]:
    """Execution names of every StartExecution sent, in order."""
    return [call["name"] for call in world.sfn.calls_to("start_execution")]


def dead_letters(world: World) -> list[dict[str, Any]]:
    """The message attributes of every request sent to the dead-letter queue."""
    return [call["MessageAttributes"] for call in world.sqs.calls_to("send_message")]


def keyed_name(key: str, name: str) -> str:
    """The execution name a request ``name`` of concurrency key ``key`` starts under."""
    return f"k{key_tag(key)}_{name}"


# -- routing a shared queue --------------------------------------------------------------


def shared_world(pool_attribute: str = "pool") -> tuple[World, dict[str, Pool], Intake]:
    """Pools ``a`` and ``b`` (own state machines) fed by one queue, routed by attribute."""
    world, pools = build_layout_world(
        [
            PoolConfig(name="a", state_machine_arn=STATE_MACHINE_ARN, limit=5),
            PoolConfig(name="b", state_machine_arn=SECOND_ARN, limit=5),
        ],
        [QueueConfig(url=SHARED, pools=("a", "b"), pool_attribute=pool_attribute)],
    )
    return world, pools, intake_of(world, pools=pools)


async def test_a_shared_queue_routes_each_request_to_the_pool_it_names() -> None:
    world, pools, intake = shared_world()
    world.sqs.put(SHARED, request("to-a", pool="a"))
    world.sqs.put(SHARED, request("to-b", pool="b"))
    world.sqs.put(SHARED, request("to-a-too", pool="a"))
    assert await intake.receive_once(intake.queues[0]) == 3
    assert names(pools["a"]) == ["to-a", "to-a-too"]
    assert names(pools["b"]) == ["to-b"]
    assert await dispatch_all(intake, pools["a"]) == 2
    assert await dispatch_all(intake, pools["b"]) == 1
    assert pools["a"].ledger.running == {
        execution_arn(STATE_MACHINE_ARN, "to-a"),
        execution_arn(STATE_MACHINE_ARN, "to-a-too"),
    }
    assert pools["b"].ledger.running == {execution_arn(SECOND_ARN, "to-b")}
    by_machine = {c["name"]: c["stateMachineArn"] for c in world.sfn.calls_to("start_execution")}
    assert by_machine == {
        "to-a": STATE_MACHINE_ARN,
        "to-a-too": STATE_MACHINE_ARN,
        "to-b": SECOND_ARN,
    }


@pytest.mark.parametrize(("attributes", "shown"), [({"pool": "c"}, "pool='c'"), ({}, "pool=None")])
async def test_a_request_naming_no_pool_of_its_queue_is_dead_lettered(
    attributes: dict[str, str], shown: str
) -> None:
    world, pools, intake = shared_world()
    message = request("lost", **attributes)
    world.sqs.put(SHARED, message)
    assert await intake.receive_once(intake.queues[0]) == 1
    [dead] = dead_letters(world)
    assert dead[REASON_ATTRIBUTE]["StringValue"] == "unknown_pool"
    detail = dead[DETAIL_ATTRIBUTE]["StringValue"]
    assert shown in detail
    assert "accepted: a, b" in detail
    assert world.sqs.names() == ["receive_message", "send_message", "delete_message"]
    assert all(len(pool.room) == 0 for pool in pools.values())
    assert world.sample("dispatcher_dead_letters_total", pool=UNROUTED, reason="unknown_pool") == 1
    assert [await dispatch_all(intake, pool) for pool in pools.values()] == [0, 0]
    assert started(world) == []


async def test_routing_reads_the_queues_own_pool_attribute() -> None:
    world, pools, intake = shared_world(pool_attribute="workflow")
    world.sqs.put(SHARED, request("by-workflow", workflow="b"))
    world.sqs.put(SHARED, request("by-pool", pool="a"))  # not this queue's attribute
    assert await intake.receive_once(intake.queues[0]) == 2
    assert names(pools["b"]) == ["by-workflow"]
    assert names(pools["a"]) == []
    [dead] = dead_letters(world)
    assert "workflow=None" in dead[DETAIL_ATTRIBUTE]["StringValue"]


async def test_a_queue_of_one_pool_ignores_the_pool_attribute() -> None:
    world = build_world()
    await handle(world, request("anywhere", pool="some-other-pool"))
    assert started(world) == ["anywhere"]
    assert dead_letters(world) == []


async def test_a_shared_queue_keeps_the_lookahead_of_each_pool() -> None:
    world, pools = build_layout_world(
        [
            PoolConfig(
                name="a",
                state_machine_arn=STATE_MACHINE_ARN,
                limit=1,
                key_attribute="t",
                max_waiting=LOOKAHEAD,  # a keyed pool keeps its room full: look-ahead = room
            ),
            PoolConfig(name="b", state_machine_arn=SECOND_ARN, limit=0),
        ],
        [QueueConfig(url=SHARED, pools=("a", "b"))],
    )
    assert pools["a"].lookahead == LOOKAHEAD
    intake = intake_of(world, pools=pools)
    queue = intake.queues[0]
    for i in range(LOOKAHEAD):
        await intake.admit(queue, request(f"for-b-{i}", pool="b"))  # b has no slot free
    assert len(pools["b"].room) == LOOKAHEAD
    assert intake.wanted(queue) == LOOKAHEAD  # none of a's requests wait


# -- priorities --------------------------------------------------------------------------


async def start_order(share: float, picks: int) -> list[str]:
    """Four requests on a low and a high priority queue of one pool of one slot; the order
    their executions start in, each finishing before the next may start."""
    world, pools = build_layout_world(
        [PoolConfig(name="p", state_machine_arn=STATE_MACHINE_ARN, limit=1, reserved_share=share)],
        [
            QueueConfig(url=HIGH, pools=("p",), priority=10),
            QueueConfig(url=LOW, pools=("p",), priority=0),
        ],
    )
    pool = pools["p"]
    intake = intake_of(world, pools=pools)
    high, low = intake.queues
    for i in range(4):
        world.sqs.put(HIGH, request(f"high-{i}"))
        world.sqs.put(LOW, request(f"low-{i}"))
    assert await intake.receive_once(low) == 4  # the low ones arrive first
    assert await intake.receive_once(high) == 4
    for _ in range(picks):
        assert await dispatch_all(intake, pool) == 1
        finish(pool, execution_arn(STATE_MACHINE_ARN, started(world)[-1]))
    return started(world)


async def test_without_a_reserved_share_the_higher_priority_always_starts_first() -> None:
    order = await start_order(0.0, 8)
    assert order == [f"high-{i}" for i in range(4)] + [f"low-{i}" for i in range(4)]


async def test_a_reserved_share_of_a_half_alternates_the_priorities() -> None:
    order = await start_order(0.5, 6)
    assert order == ["high-0", "low-0", "high-1", "low-1", "high-2", "low-2"]


# -- concurrency keys ----------------------------------------------------------------------


def keyed_world(**overrides: Any) -> World:
    """A pool keyed by the ``tenant`` attribute."""
    return build_world(key_attribute="tenant", **overrides)


async def test_a_key_at_its_limit_waits_without_blocking_other_keys() -> None:
    world = keyed_world(limit=3, per_key_limit=1)
    for message_id, tenant in [("a-1", "A"), ("a-2", "A"), ("b-1", "B")]:
        world.sqs.put(REQUEST_QUEUE, request(message_id, tenant=tenant))
    intake = intake_of(world)
    queue = intake.queues[0]
    assert await intake.receive_once(queue) == 3
    assert await dispatch_all(intake, world.pool) == 2
    assert sorted(started(world)) == [keyed_name("A", "a-1"), keyed_name("B", "b-1")]
    assert names(world.pool) == [keyed_name("A", "a-2")]
    assert world.pool.ledger.key_held(key_tag("A")) == 1
    assert await dispatch_all(intake, world.pool) == 0  # a free slot, but not for A
    assert world.pool.ledger.free == 1
    assert intake.wanted(queue) > 0  # the free slot is still wanted for other keys
    finish(world.pool, execution_arn(STATE_MACHINE_ARN, keyed_name("A", "a-1")))
    assert await dispatch_all(intake, world.pool) == 1
    assert started(world)[-1] == keyed_name("A", "a-2")
    assert waiting(world) == []


async def test_keyed_execution_names_carry_the_key_tag() -> None:
    world = keyed_world(per_key_limit=2)
    await handle(world, request("order-7", tenant="tenant-42"))
    [name] = started(world)
    assert name == keyed_name("tenant-42", "order-7")
    assert tag_in(name) == key_tag("tenant-42")
    arn = execution_arn(STATE_MACHINE_ARN, name)
    assert world.pool.ledger.running == {arn}
    assert world.pool.ledger.key_held(key_tag("tenant-42")) == 1


@pytest.mark.parametrize(
    ("length", "dead"), [(80 - KEY_TAG_LENGTH, False), (81 - KEY_TAG_LENGTH, True)]
)
async def test_an_idempotency_key_too_long_for_the_key_tag_is_dead_lettered(
    length: int, dead: bool
) -> None:
    world = keyed_world(per_key_limit=1)
    name = "i" * length
    await handle(world, request("m-1", tenant="A", **{IDEMPOTENCY_ATTRIBUTE: name}))
    if dead:
        [attributes] = dead_letters(world)
        assert attributes[REASON_ATTRIBUTE]["StringValue"] == "invalid_idempotency_key"
        assert started(world) == []
        assert world.pool.ledger.free == world.pool.ledger.limit
    else:
        assert dead_letters(world) == []
        assert started(world) == [keyed_name("A", name)]


# -- waiting-room space ------------------------------------------------------------------


@pytest.mark.parametrize(("duration", "delay"), [(0.2, 1), (30.0, 30), (5000.0, 900)])
async def test_a_request_the_room_has_no_space_for_is_deferred(duration: float, delay: int) -> None:
    """Deferred for about as long as the one request waiting ahead of it needs to start:
    the executions' mean duration, 1 s to 15 min."""
    world = build_world(limit=1, max_waiting=1)
    measured(world, duration)
    intake = intake_of(world)
    queue = intake.queues[0]
    await intake.admit(queue, request("first"))
    refused = sqs_message(message_id="second")
    await intake.admit(queue, refused)
    assert names(world.pool) == ["first"]
    assert world.sqs.calls_to("change_message_visibility") == [
        {
            "QueueUrl": REQUEST_QUEUE,
            "ReceiptHandle": refused["ReceiptHandle"],
            "VisibilityTimeout": delay,
        }
    ]
    assert world.sample("dispatcher_requests_deferred_total", pool="default") == 1
    assert intake.stats.deferred == 1


async def test_one_key_takes_no_more_than_its_share_of_the_room() -> None:
    world = keyed_world(limit=1, max_waiting=100)
    intake = intake_of(world)
    queue = intake.queues[0]
    share = world.pool.room.key_capacity
    assert share == 50  # half the room
    for i in range(share + 1):
        await intake.admit(queue, request(f"a-{i}", tenant="A"))
    await intake.admit(queue, request("b-0", tenant="B"))
    assert world.pool.room.count(key=key_tag("A")) == share
    assert names(world.pool)[-1] == keyed_name("B", "b-0")
    [deferred] = world.sqs.calls_to("change_message_visibility")
    assert deferred["ReceiptHandle"] == f"rh-a-{share}"
    assert world.sample("dispatcher_requests_deferred_total", pool="default") == 1


@pytest.mark.parametrize(("limit", "max_waiting"), [(1, 0), (5, 2)])
async def test_requests_for_free_slots_start_whatever_the_room_holds(
    limit: int, max_waiting: int
) -> None:
    world = build_world(limit=limit, max_waiting=max_waiting)
    for i in range(limit):
        world.sqs.put(REQUEST_QUEUE, request(f"m-{i}"))
    intake = intake_of(world)
    assert await intake.receive_once(intake.queues[0]) == limit
    assert await dispatch_all(intake, world.pool) == limit
    assert intake.stats.deferred == 0


# -- how much a receive wants ------------------------------------------------------------


async def test_a_choosing_pool_wants_requests_until_lookahead_of_its_queue_wait() -> None:
    world = keyed_world(limit=1, max_waiting=LOOKAHEAD)
    assert world.pool.lookahead == LOOKAHEAD
    intake = intake_of(world)
    queue = intake.queues[0]
    for i in range(LOOKAHEAD):
        assert intake.wanted(queue) == LOOKAHEAD - i
        await intake.admit(queue, request(f"m-{i}", tenant=f"t-{i}"))
    assert intake.wanted(queue) == 0  # more than the one free slot: the look-ahead is full
    assert await dispatch_all(intake, world.pool) == 1
    assert intake.wanted(queue) == 1  # one was picked: one more is wanted


async def test_a_receive_for_a_choosing_pool_takes_the_lookahead_then_waits() -> None:
    world = keyed_world(limit=1, max_waiting=LOOKAHEAD)
    for i in range(3 * LOOKAHEAD):
        world.sqs.put(REQUEST_QUEUE, request(f"m-{i}", tenant=f"t-{i}"))
    intake = intake_of(world)
    queue = intake.queues[0]
    assert await intake.receive_once(queue) == LOOKAHEAD
    async with anyio.create_task_group() as tg:
        tg.start_soon(intake.receive_once, queue)
        await anyio.wait_all_tasks_blocked()
        assert len(world.sqs.calls_to("receive_message")) == 1
        tg.cancel_scope.cancel()
    assert world.pool.receiving == 0


# -- dispatching -------------------------------------------------------------------------


async def test_nothing_is_dispatched_while_starts_are_not_allowed() -> None:
    world = build_world()
    intake = intake_of(world)
    intake.set_may_start(lambda: False)  # e.g. the lease is lost
    await handle(world, request("held"), intake)
    assert started(world) == []
    assert names(world.pool) == ["held"]
    assert world.pool.ledger.reserved_count == 0
    intake.set_may_start(lambda: True)
    assert await dispatch_all(intake, world.pool) == 1
    assert started(world) == ["held"]


# -- the waiting requests' messages ------------------------------------------------------


async def test_extend_waiting_extends_only_requests_hidden_for_half_their_visibility() -> None:
    world = build_world(limit=1)
    half = world.settings.visibility_timeout / 2
    intake = intake_of(world)
    queue = intake.queues[0]
    await intake.admit(queue, request("older"))
    world.clock.advance(half - 10)
    await intake.admit(queue, request("newer"))
    world.clock.advance(10)
    assert await intake.extend_waiting() == 1
    [call] = world.sqs.calls_to("change_message_visibility_batch")
    assert call == {
        "QueueUrl": REQUEST_QUEUE,
        "Entries": [
            {
                "Id": "0",
                "ReceiptHandle": "rh-older",
                "VisibilityTimeout": world.settings.visibility_timeout,
            }
        ],
    }
    assert await intake.extend_waiting() == 0  # "older" was just extended
    world.clock.advance(half - 10)
    assert await intake.extend_waiting() == 1
    newer = world.sqs.calls_to("change_message_visibility_batch")[-1]["Entries"]
    assert [e["ReceiptHandle"] for e in newer] == ["rh-newer"]
    assert names(world.pool) == ["older", "newer"]


def two_queue_world() -> tuple[World, Pool, Intake]:
    """One pool fed by two queues (``HIGH`` and ``LOW``), no slot free (one busy: a
    paused pool, limit 0, would receive nothing)."""
    world, pools = build_layout_world(
        [PoolConfig(name="p", state_machine_arn=STATE_MACHINE_ARN, limit=1)],
        [QueueConfig(url=HIGH, pools=("p",), priority=1), QueueConfig(url=LOW, pools=("p",))],
    )
    pools["p"].ledger.observe_running("arn:busy", world.clock())
    pools["p"].update()
    return world, pools["p"], intake_of(world, pools=pools)


async def test_a_request_whose_extension_failed_leaves_the_room() -> None:
    world, pool, intake = two_queue_world()
    high, low = intake.queues
    await intake.admit(high, request("on-high"))
    await intake.admit(low, request("on-low"))
    world.clock.advance(world.settings.visibility_timeout)
    world.sqs.fail("change_message_visibility_batch", client_error("InternalError", 500))
    assert await intake.extend_waiting() == 1
    assert [c["QueueUrl"] for c in world.sqs.calls_to("change_message_visibility_batch")] == [
        HIGH,
        LOW,
    ]
    assert names(pool) == ["on-low"]
    assert world.sample("dispatcher_requests_waiting", pool="p") == 1
    assert (intake.wanted(high), intake.wanted(low)) == (LOOKAHEAD, LOOKAHEAD - 1)


async def test_a_hand_back_that_hangs_loses_no_request_on_its_last_receive() -> None:
    """The first queue's hand-back hangs until the caller's deadline: a request on its last
    receive from the other queue is kept all the same (set aside before any call), not left
    hidden and unkept for the redrive policy to move without a reason. (SQS refuses the
    renewal's copy, so the request waits in the room on its last receive.)"""
    world, pool, intake = two_queue_world()
    world.sqs.refuse_sends_to.add(LOW)
    high, low = intake.queues
    low.max_receive_count = 3
    await intake.admit(high, request("h-0"))
    last = request("l-0")
    last["Attributes"]["ApproximateReceiveCount"] = "3"
    await intake.admit(low, last)

    async def hangs(**_: Any) -> dict[str, Any]:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    world.sqs.change_message_visibility_batch = hangs  # type: ignore[method-assign]
    with anyio.move_on_after(0.2):
        await intake.hand_back_waiting()
    assert len(pool.room) == 0
    assert [k.entry.request.name for k in intake.starter.last_receives] == ["l-0"]


async def test_hand_back_waiting_empties_the_room_and_makes_each_request_visible() -> None:
    world, pool, intake = two_queue_world()
    high, low = intake.queues
    await intake.admit(high, request("h-0"))
    await intake.admit(low, request("l-0"))
    await intake.admit(high, request("h-1"))
    assert await intake.hand_back_waiting() == 3
    assert len(pool.room) == 0
    assert world.sample("dispatcher_requests_waiting", pool="p") == 0
    calls = world.sqs.calls_to("change_message_visibility_batch")
    handed = {
        (call["QueueUrl"], entry["ReceiptHandle"], entry["VisibilityTimeout"])
        for call in calls
        for entry in call["Entries"]
    }
    assert handed == {(HIGH, "rh-h-0", 0), (HIGH, "rh-h-1", 0), (LOW, "rh-l-0", 0)}
    assert len(calls) == 2  # one batch per queue
    assert (intake.wanted(high), intake.wanted(low)) == (LOOKAHEAD, LOOKAHEAD)
    assert await intake.hand_back_waiting() == 0


async def test_a_slow_call_at_stop_loses_no_waiting_request_of_another_queue(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stopping with a receive in flight: the waiting requests are set aside, hidden until
    it is over, and handed back when it has answered. The first queue's call hangs past
    the bound the shutdown gives it: the other queue's request is set aside all the same
    (it used to be left in no list, hidden, for SQS to move on its last receive)."""
    world, pool, intake = two_queue_world()
    high, low = intake.queues
    await intake.admit(high, request("h-0"))
    await intake.admit(low, request("l-0"))
    intake._polls[HIGH] = 1  # a long poll in flight on the first queue
    intake.stop()

    async def hangs(handles: list[str], seconds: int) -> set[str]:
        await anyio.sleep_forever()
        return set()

    monkeypatch.setattr(high, "set_visibility", hangs)
    with anyio.move_on_after(0.2):
        await intake._set_aside_waiting()
    assert len(pool.room) == 0
    monkeypatch.undo()
    intake._polls[HIGH] = 0  # it answered
    await intake._hand_back_late()
    handed = {
        (call["QueueUrl"], entry["ReceiptHandle"], entry["VisibilityTimeout"])
        for call in world.sqs.calls_to("change_message_visibility_batch")
        for entry in call["Entries"]
    }
    assert {(HIGH, "rh-h-0", 0), (LOW, "rh-l-0", 0)} <= handed


# -- the start rate ----------------------------------------------------------------------


@pytest.mark.usefixtures("fast_retries")
async def test_a_throttled_start_lowers_the_start_rate() -> None:
    world = build_world()
    world.sfn.fail("start_execution", throttled())
    # A high rate: the retry's wait for a token (1/rate on the clock) is negligible.
    intake = intake_of(world, rate=1e6, clock=world.clock)
    await handle(world, request("m-1"), intake)
    assert started(world) == ["m-1", "m-1"]
    labels = {"account": ACCOUNT, "region": REGION}
    assert world.sample("dispatcher_start_rate_limit", **labels) == 5e5
    assert world.sample("dispatcher_start_rate_throttles_total", **labels) == 1
    assert world.pool.ledger.running == {execution_arn(STATE_MACHINE_ARN, "m-1")}


async def test_a_start_waits_for_a_token_and_is_handed_back_when_stopped() -> None:
    world = build_world()
    intake = intake_of(world, rate=1.0, burst=1, clock=world.clock)
    await handle(world, request("first"), intake)  # takes the one token
    await intake.admit(intake.queues[0], request("second"))
    async with anyio.create_task_group() as handlers:
        assert intake.dispatch_once(world.pool, handlers)
        await anyio.wait_all_tasks_blocked()
        assert started(world) == ["first"]  # "second" waits a second for its token
        labels = {"account": ACCOUNT, "region": REGION}
        assert world.sample("dispatcher_start_rate_wait_seconds_total", **labels) == 1.0
        assert world.pool.ledger.reserved_count == 1
        intake.stop()
    assert started(world) == ["first"]
    [handed] = world.sqs.calls_to("change_message_visibility")
    assert handed == {
        "QueueUrl": REQUEST_QUEUE,
        "ReceiptHandle": "rh-second",
        "VisibilityTimeout": 0,
    }
    assert world.pool.ledger.reserved_count == 0
    assert world.pool.ledger.running == {execution_arn(STATE_MACHINE_ARN, "first")}


def test_a_long_wait_for_a_start_token_keeps_the_message_hidden() -> None:
    """A start that waits for its rate token longer than the visibility timeout extends its
    message's visibility meanwhile: else SQS hands the request out again (on its last
    receive, to the dead-letter queue) while its start goes on. On virtual time, so that the
    wait of 250 s takes none."""

    async def main() -> World:
        world = build_world(limit=2)
        world.pool.clock = time.monotonic  # the loop's clock: sleeps and the clock agree
        intake = intake_of(world, rate=0.004, burst=1, floor=0.004, clock=time.monotonic)
        await handle(world, request("first"), intake)  # takes the one token
        await handle(world, request("second"), intake)  # waits 250 s for the next one
        return world

    world = loop.run(main)
    assert started(world) == ["first", "second"]
    visibility = world.settings.visibility_timeout
    assert visibility < 250 / 3, "the wait spans more than three visibility timeouts"
    extended = [
        call
        for call in world.sqs.calls_to("change_message_visibility")
        if call["ReceiptHandle"] == "rh-second"
    ]
    assert len(extended) >= 250 // visibility
    assert {call["VisibilityTimeout"] for call in extended} == {visibility}


def test_the_mean_duration_follows_the_executions_that_end() -> None:
    """Freed slots with a known start feed the mean run time deferrals are sized by."""
    world = build_world(limit=2)
    pool = world.pool
    assert pool.run_time() == 1.0, "nothing ran yet: at least 1 s"
    start = world.clock()
    world.clock.advance(4.0)
    pool.note_freed(Change.FREED, was_full=False, since=start)
    assert pool.duration == 4.0  # the first measurement replaces the assumption
    world.clock.advance(10.0)
    pool.note_freed(Change.FREED, was_full=False, since=start + 4.0)
    assert pool.duration == pytest.approx(0.9 * 4.0 + 0.1 * 10.0)
    pool.note_freed(Change.NOTED, was_full=False, since=start)
    assert pool.duration == pytest.approx(4.6)


def test_a_deferral_is_sized_by_the_requests_of_its_key() -> None:
    """Twelve of A's requests wait at per-key limit 2 with 3 s runs: A's next waits 18 s."""
    world = keyed_world(limit=4, per_key_limit=2, max_waiting=100)
    pool = world.pool
    measured(world, 3.0)
    for i in range(12):
        assert pool.room.offer(i, priority=0, key=key_tag("A"))
    assert pool.defer_seconds(key_tag("A"), ident="a1") == 18
    assert pool.defer_seconds(key_tag("A"), ident="a2") == 19, "spaced after the one before"
    assert pool.defer_seconds(key_tag("B"), ident="b1") == 1
    world.clock.advance(18.0)
    assert pool.room.offer("a1", priority=0, key=key_tag("A"))  # back, into the room
    pool.left_line("a1")
    assert pool.defer_seconds(key_tag("A"), ident="a3") == 21, "a2 is ahead, a1 is not"


def test_a_request_deferred_again_keeps_its_place_in_its_keys_line() -> None:
    """A backlog of one key longer than SQS's 15-minute delay came back all at once,
    each request counting the others still out as ahead of it, and was deferred 15 minutes
    again, all at once, for ever, with the key idle in between. Back before its turn, a
    request keeps its place, whatever order they come back in."""
    world = keyed_world(limit=4, per_key_limit=1, max_waiting=100)
    pool = world.pool
    measured(world, 60.0)
    first = [pool.defer_seconds(key_tag("A"), ident=f"r{i}") for i in range(30)]
    assert first[:3] == [1, 60, 120]
    assert first[15:] == [900] * 15  # r29: 29 ahead, capped
    world.clock.advance(900.0)  # r15's turn; r16..r29 are all back together, early
    pool.left_line("r14")  # back in turn, they got into the waiting room
    pool.left_line("r15")
    again = {i: pool.defer_seconds(key_tag("A"), ident=f"r{i}") for i in range(29, 15, -1)}
    assert again[16] == 60, "its turn comes a run after r15's"
    assert again[29] == 14 * 60, "13 still ahead of it"
    assert [again[i] for i in range(16, 30)] == sorted(again.values()), "one after another"
    assert (pool.deferral_keys, pool.deferrals_pending) == (1, 14)


def test_the_head_of_a_line_deferred_again_is_not_back_every_second() -> None:
    """The room is full of other keys' requests (none of A's): A's requests are deferred,
    and A's first, back at its turn while the room is still full, is deferred again. With
    none of A's waiting and none deferred before it, it came back 1 s later, every second
    (a receive each, towards maxReceiveCount, its last renewed every 20 s), where it used
    to be spaced after A's requests still out. Held back by the room (not by its key), it
    waits at least until a place in the room frees: one start of the pool."""
    world = keyed_world(limit=2, per_key_limit=1, max_waiting=4)
    pool = world.pool
    measured(world, 30.0)
    for i, tenant in enumerate("BBCC"):
        assert pool.room.offer(i, priority=0, key=key_tag(tenant))
    assert not pool.room.offer("a0", priority=0, key=key_tag("A")), "the room is full"
    delays = [pool.defer_seconds(key_tag("A"), ident=f"a{i}") for i in range(5)]
    receives, now = 1, 0.0
    while now < 60.0:  # a0 comes back each time at its turn; the room is still full
        now += delays[0]
        world.clock.advance(delays[0])
        receives += 1
        delays[0] = pool.defer_seconds(key_tag("A"), ident="a0")
    assert receives <= 5, f"a0 received {receives} times in a minute"


def test_a_renewed_copy_keeps_its_originals_place_and_other_copies_are_spares() -> None:
    """A renewed copy (a new message, its original's id attached) keeps the place of the
    message it copies: it was sent to the back of the line on every renewal. Another copy
    of the same request (a producer's retry) is a spare while one holds the turn."""
    world = keyed_world(limit=4, per_key_limit=1, max_waiting=100)
    pool = world.pool
    measured(world, 10.0)
    assert pool.defer_seconds(key_tag("A"), "m1", name="r1") == 1
    assert pool.defer_seconds(key_tag("A"), "m2", name="r2") == 10
    assert pool.defer_seconds(key_tag("A"), "m3", name="r3") == 20
    world.clock.advance(0.5)
    assert pool.defer_seconds(key_tag("A"), "c2", predecessor="m2", name="r2") == 9
    assert pool.deferrals_pending == 3, "the copy took its original's place"
    assert pool.spare("r2", "retry-of-r2")
    assert not pool.spare("r2", "c2")
    assert not pool.spare("r2", "c3", predecessor="c2"), "the next renewal's copy"
    pool.left_line("c2")  # into the room
    assert not pool.spare("r2", "retry-of-r2"), "none holds r2's turn any more"


def test_copies_of_one_request_take_one_place() -> None:
    """The copies of a message SQS stored twice share its place in line: deferred, they are
    one request ahead of the next, not two."""
    world = keyed_world(limit=4, per_key_limit=1, max_waiting=100)
    pool = world.pool
    measured(world, 10.0)
    assert pool.defer_seconds(key_tag("A"), ident="r1") == 1
    assert pool.defer_seconds(key_tag("A"), ident="r1") == 1
    assert pool.defer_seconds(key_tag("A"), ident="r2") == 10
    assert pool.deferrals_pending == 2


def test_deferrals_that_came_back_are_forgotten_whatever_the_number_of_keys() -> None:
    """20,000 tenants deferred once each leave nothing behind once their requests are back
    in the queue for a while (or got into the waiting room); a key with deferrals still out
    keeps them, its next one spaced after."""
    world = keyed_world(limit=4, per_key_limit=2, max_waiting=100)
    pool = world.pool
    measured(world, 3.0)
    for i in range(20_000):
        assert pool.defer_seconds(key_tag(f"tenant-{i}")) == 1  # nothing ahead: 1 s
    assert (pool.deferral_keys, pool.deferrals_pending) == (20_000, 20_000)
    world.clock.advance(1.0 + FORGET_AFTER_TURN)  # every one of them is long back
    for i in range(12):
        assert pool.room.offer(i, priority=0, key=key_tag("A"))
    assert [pool.defer_seconds(key_tag("A"), ident=i) for i in range(3)] == [18, 19, 21]
    assert (pool.deferral_keys, pool.deferrals_pending) == (1, 3)
    world.clock.advance(18.0)
    assert pool.room.offer(12, priority=0, key=key_tag("A"))  # A's first is back, in the room
    pool.left_line(0)  # two are still out
    assert pool.defer_seconds(key_tag("A")) == 22, "spaced after the two not back yet"
    assert (pool.deferral_keys, pool.deferrals_pending) == (1, 3)
    world.clock.advance(23.0 + FORGET_AFTER_TURN)
    pool.forget_returned_deferrals()
    assert (pool.deferral_keys, pool.deferrals_pending) == (0, 0)


def test_the_deferrals_remembered_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the cap the deferral back first is forgotten: memory is bounded even while
    every deferral is still out."""
    monkeypatch.setattr("dispatcher.daemon.pool.MAX_TRACKED_DEFERRALS", 3)
    world = keyed_world(limit=4, per_key_limit=2, max_waiting=100)
    pool = world.pool
    for i in range(5):
        pool.defer_seconds(key_tag(f"tenant-{i}"))
        world.clock.advance(0.1)  # still out: each is away for at least 1 s
    assert (pool.deferral_keys, pool.deferrals_pending) == (3, 3)


def measured(world: World, seconds: float) -> None:
    """Let the pool see one execution that ran ``seconds`` end."""
    world.pool.note_freed(Change.FREED, was_full=False, since=world.clock() - seconds)


def test_before_any_execution_ended_the_oldest_running_one_sizes_deferrals() -> None:
    """No run time measured yet: the age of the oldest running execution stands in."""
    world = build_world(limit=2)
    pool = world.pool
    pool.ledger.observe_running("arn:old", world.clock())
    world.clock.advance(7.0)
    pool.ledger.observe_running("arn:new", world.clock())
    assert pool.run_time() == 7.0


class HangingFirstBatchSQS:
    """Wraps the fake SQS: the first ``ChangeMessageVisibilityBatch`` is recorded, then
    its answer never comes (until ``release``); later calls answer at once."""

    def __init__(self, world: World) -> None:
        self.fake = world.sqs
        self.release = anyio.Event()
        self.hung = 0
        answer = world.sqs.change_message_visibility_batch

        async def change_message_visibility_batch(**kwargs: Any) -> dict[str, Any]:
            result = await answer(**kwargs)
            if self.hung == 0:
                self.hung += 1
                await self.release.wait()
            return result

        world.sqs.change_message_visibility_batch = change_message_visibility_batch  # type: ignore[method-assign]


def by_receipt_handle(world: World) -> dict[str, Any]:
    """Receipt handle -> the waiting entry holding it."""
    return {e.request.receipt_handle: e for e in world.pool.room.items()}


async def test_a_lost_visibility_answer_does_not_hold_back_the_other_batches() -> None:
    """Twenty requests due: the first batch's answer hangs, the second is still sent and
    its requests are extended at once (not after the first batch's retries)."""
    world = build_world(limit=0, max_waiting=30)
    world.pool.ledger.set_limit(0)
    intake = intake_of(world)
    queue = intake.queues[0]
    for n in range(20):
        await intake.admit(queue, request(f"r{n:02}"))
    assert len(world.pool.room) == 20
    hanging = HangingFirstBatchSQS(world)
    world.clock.advance(world.settings.visibility_timeout / 2)
    now = world.clock()
    results: list[int] = []
    async with anyio.create_task_group() as tg:

        async def one_pass() -> None:
            results.append(await intake.extend_waiting())

        tg.start_soon(one_pass)
        await anyio.wait_all_tasks_blocked()
        calls = world.sqs.calls_to("change_message_visibility_batch")
        assert len(calls) == 2, "the second batch waits behind the first one's answer"
        entries = by_receipt_handle(world)
        second = [e["ReceiptHandle"] for e in calls[1]["Entries"]]
        first = [e["ReceiptHandle"] for e in calls[0]["Entries"]]
        assert all(entries[h].hidden_since == now for h in second)
        assert all(entries[h].hidden_since < now for h in first)
        # A pass on schedule meanwhile leaves the batch in flight alone.
        world.clock.advance(1)
        assert await intake.extend_waiting() == 0
        assert len(world.sqs.calls_to("change_message_visibility_batch")) == 2
        hanging.release.set()
    assert results == [20]
    assert len(world.pool.room) == 20
    assert all(e.hidden_since == now for e in world.pool.room.items())


async def test_a_batch_without_an_answer_keeps_its_requests_for_the_next_pass() -> None:
    world = build_world(limit=0, max_waiting=30)
    world.pool.ledger.set_limit(0)
    intake = intake_of(world)
    await intake.admit(intake.queues[0], request("slow"))
    world.clock.advance(world.settings.visibility_timeout / 2)
    world.sqs.fail("change_message_visibility_batch", client_error("InternalError", 500))
    assert await intake.extend_waiting() == 0
    assert names(world.pool) == ["slow"], "its visibility has not run out: try again"
    assert await intake.extend_waiting() == 1


async def test_a_request_received_again_while_waiting_takes_the_newest_receipt_handle() -> None:
    world = build_world(limit=0, max_waiting=30)
    world.pool.ledger.set_limit(0)
    intake = intake_of(world)
    queue = intake.queues[0]
    await intake.admit(queue, request("again"))
    world.clock.advance(world.settings.visibility_timeout)
    again = request("again")
    again["ReceiptHandle"] = "rh-again-2"
    again["Attributes"]["ApproximateReceiveCount"] = "2"
    await intake.admit(queue, again)
    [entry] = world.pool.room.items()
    assert entry.request.receipt_handle == "rh-again-2"
    assert entry.hidden_since == world.clock()
    assert world.sample("dispatcher_requests_waiting", pool=world.pool.name) == 1
    world.clock.advance(world.settings.visibility_timeout / 2)
    assert await intake.extend_waiting() == 1
    [call] = world.sqs.calls_to("change_message_visibility_batch")
    assert [e["ReceiptHandle"] for e in call["Entries"]] == ["rh-again-2"]


async def test_another_copy_of_a_hidden_waiting_request_waits_as_its_own_entry() -> None:
    """SQS may store a message twice: a copy received while the first still waits hidden
    has its own receipt handle (and receive count), and both are kept hidden."""
    world = build_world(limit=0, max_waiting=30)
    world.pool.ledger.set_limit(0)
    intake = intake_of(world)
    queue = intake.queues[0]
    await intake.admit(queue, request("twice"))
    copy = request("twice")
    copy["ReceiptHandle"] = "rh-twice-copy"
    await intake.admit(queue, copy)
    assert [e.request.receipt_handle for e in world.pool.room.items()] == [
        "rh-twice",
        "rh-twice-copy",
    ]
    world.clock.advance(world.settings.visibility_timeout / 2)
    assert await intake.extend_waiting() == 2


async def test_a_last_receive_set_aside_at_stop_counts_as_hidden_from_that_call() -> None:
    """Stopping with a receive in flight, a request on its last receive is set aside and
    hidden for the visibility timeout. Its keeper used to count from its receive (40 s
    earlier), give it up as surely visible again while SQS still hid it for most of a
    minute, and SQS's redrive policy moved it without a reason."""
    world, pool, intake = two_queue_world()
    high, _ = intake.queues
    high.max_receive_count = 3
    world.sqs.refuse_sends_to.add(HIGH)  # no renewal: it waits in the room
    await intake.admit(high, sqs_message(
        '{"id": "h-0"}', message_id="h-0", system={"ApproximateReceiveCount": "3"}
    ))  # fmt: skip
    assert len(pool.room) == 1
    world.clock.advance(40)
    set_aside_at = world.clock()
    intake._polls[HIGH] = 1  # a long poll in flight
    intake.stop()
    await intake._set_aside_waiting()
    intake._polls[HIGH] = 0  # it answered
    await intake._hand_back_late()
    [kept] = list(intake.starter.last_receives)
    assert kept.entry.hidden_since == set_aside_at
