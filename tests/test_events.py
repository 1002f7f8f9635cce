"""Status-change events on fakes: each status, duplicates, reorders, junk, batches, refill."""

from __future__ import annotations

import json
from typing import Any

import pytest
import structlog
import structlog.testing
from botocore.exceptions import ClientError

from dispatcher.core.requests import execution_arn
from dispatcher.daemon.events import DETAIL_TYPE, Events, parse_event
from tests.fake_intake import handle
from tests.fakes import (
    ACCOUNT,
    EVENTS_QUEUE,
    REGION,
    STATE_MACHINE_ARN,
    World,
    build_world,
    client_error,
    sqs_message,
)
from tests.virtual_time import on_virtual_time

pytestmark = pytest.mark.timeout(10)

ARN = execution_arn(STATE_MACHINE_ARN, "run-1")
OTHER_MACHINE = STATE_MACHINE_ARN.replace(":governed", ":other")


def event(
    status: str,
    arn: str = ARN,
    *,
    machine: str = STATE_MACHINE_ARN,
    redrive: int = 0,
    **extra: Any,
) -> str:
    """An EventBridge envelope as the rule delivers it to SQS (MiniStack's shape)."""
    return json.dumps(
        {
            "version": "0",
            "id": "9f3b1c2d-0000-4000-8000-000000000001",
            "detail-type": DETAIL_TYPE,
            "source": "aws.states",
            "account": ACCOUNT,
            "time": "2026-11-26T19:00:00Z",
            "region": REGION,
            "resources": [arn],
            "detail": {
                "executionArn": arn,
                "stateMachineArn": machine,
                "name": arn.rsplit(":", 1)[-1],
                "status": status,
                "startDate": 1_764_183_600_000,
                "stopDate": None if status == "RUNNING" else 1_764_183_601_000,
                "input": "{}",
                "output": None,
                "redriveCount": redrive,
                **extra,
            },
        }
    )


def events_of(world: World) -> Events:
    """The events consumer under test, routing the fake state machine to the world's pool."""
    return Events(
        world.settings, world.clients, {STATE_MACHINE_ARN: world.pool}, world.metrics, world.health
    )


def hold(world: World, arn: str = ARN) -> None:
    """Make the ledger hold ``arn``, as a start would."""
    [reservation] = world.pool.ledger.reserve(1, world.clock())
    world.pool.ledger.started(reservation, arn, world.clock())
    world.pool.update()


def end(world: World, arn: str = ARN) -> None:
    """Make the ledger know ``arn`` ended (held before, tombstoned now)."""
    hold(world, arn)
    world.pool.ledger.observe_terminal(arn)
    world.pool.update()


SETUPS = {"held": hold, "unknown": lambda world: None, "ended": end}


@pytest.mark.parametrize(
    ("before", "status", "redrive", "result", "after"),
    [
        ("unknown", "RUNNING", 0, "applied", "held"),  # started elsewhere: counted
        ("held", "RUNNING", 0, "duplicate", "held"),
        ("held", "SUCCEEDED", 0, "applied", "tombstoned"),
        ("held", "FAILED", 0, "applied", "tombstoned"),
        ("held", "TIMED_OUT", 0, "applied", "tombstoned"),
        ("held", "ABORTED", 0, "applied", "tombstoned"),
        ("unknown", "SUCCEEDED", 0, "applied", "tombstoned"),  # a tombstone only
        ("ended", "SUCCEEDED", 0, "duplicate", "tombstoned"),
        ("ended", "RUNNING", 0, "stale", "tombstoned"),  # late RUNNING after the end
        ("ended", "RUNNING", 1, "applied", "held"),  # redriven: runs again
        ("held", "PENDING_REDRIVE", 0, "ignored", "held"),
        ("unknown", "PENDING_REDRIVE", 0, "ignored", "absent"),
    ],
)
def test_each_status(
    before: str,
    status: str,
    redrive: int,
    result: str,
    after: str,
) -> None:
    world = build_world()
    SETUPS[before](world)
    events = events_of(world)
    assert events.apply(event(status, redrive=redrive), "msg-1") == result
    held_after = after == "held"
    assert world.pool.ledger.holds(ARN) is held_after
    assert world.pool.ledger.is_tombstoned(ARN) is (after == "tombstoned")
    assert world.pool.ledger.reserved_count == 0
    assert world.sample("dispatcher_events_total", status=status, result=result) == 1
    assert world.sample("dispatcher_running", pool="default") == int(held_after)


def test_event_of_another_state_machine_is_foreign() -> None:
    world = build_world()
    hold(world)
    events = events_of(world)
    assert events.apply(event("SUCCEEDED", machine=OTHER_MACHINE)) == "foreign"
    assert world.pool.ledger.holds(ARN)
    assert world.sample("dispatcher_events_total", status="SUCCEEDED", result="foreign") == 1
    assert events.applied == 0


def test_unknown_fields_are_ignored() -> None:
    world = build_world()
    hold(world)
    body = json.loads(event("SUCCEEDED", redriveStatus="REDRIVABLE", newField={"x": [1]}))
    body["brandNewEnvelopeField"] = True
    assert events_of(world).apply(json.dumps(body)) == "applied"
    assert not world.pool.ledger.holds(ARN)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ("not json", "Expecting value"),
        ("[1, 2]", "not a JSON object"),
        (json.dumps({"source": "aws.ec2", "detail-type": DETAIL_TYPE}), "not a status-change"),
        (json.dumps({"source": "aws.states", "detail-type": "Other"}), "not a status-change"),
        (json.dumps({"source": "aws.states", "detail-type": DETAIL_TYPE}), "no detail"),
        (json.dumps({"source": "aws.states", "detail-type": DETAIL_TYPE, "detail": 3}), "detail"),
    ],
)
def test_parse_event_says_what_is_wrong(body: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_event(body)


@pytest.mark.parametrize("missing", ["executionArn", "stateMachineArn", "status"])
def test_detail_lacking_a_field_is_malformed(missing: str) -> None:
    body = json.loads(event("SUCCEEDED"))
    del body["detail"][missing]
    with pytest.raises(ValueError, match=missing):
        parse_event(json.dumps(body))
    world = build_world()
    hold(world)
    assert events_of(world).apply(json.dumps(body)) == "malformed"
    assert world.pool.ledger.holds(ARN)
    assert world.sample("dispatcher_events_total", status="unknown", result="malformed") == 1


DEEP = "[" * 100_000 + "]" * 100_000  # valid JSON, 200 KB, deeper than json.loads goes


@pytest.mark.parametrize(
    "body",
    [
        event("SUCCEEDED", redriveCount={"n": 1}),
        DEEP,
    ],
    ids=["redrive-count-object", "deep-nesting"],
)
def test_any_junk_is_malformed_never_a_crash(body: str) -> None:
    world = build_world()
    hold(world)
    assert events_of(world).apply(body) == "malformed"
    assert world.pool.ledger.holds(ARN)


# -- one pass ----------------------------------------------------------------------------


def put_events(world: World, *bodies: str) -> list[str]:
    """Queue event bodies; return their receipt handles' prefixes in order."""
    for i, body in enumerate(bodies):
        world.sqs.put(EVENTS_QUEUE, sqs_message(body, message_id=f"ev-{i}"))
    return [f"rh-ev-{i}" for i in range(len(bodies))]


async def test_a_batch_is_applied_then_deleted() -> None:
    world = build_world()
    second = execution_arn(STATE_MACHINE_ARN, "run-2")
    hold(world)
    hold(world, second)
    put_events(world, event("SUCCEEDED"), event("FAILED", second), event("SUCCEEDED"))
    events = events_of(world)
    assert await events.run_once() == 3
    assert world.pool.ledger.running_count == 0
    assert world.sqs.names() == ["receive_message", "delete_message_batch"]
    [receive] = world.sqs.calls_to("receive_message")
    assert receive["QueueUrl"] == EVENTS_QUEUE
    assert receive["MaxNumberOfMessages"] == 10
    [delete] = world.sqs.calls_to("delete_message_batch")
    assert delete["QueueUrl"] == EVENTS_QUEUE
    assert [e["Id"] for e in delete["Entries"]] == ["0", "1", "2"]
    assert [e["ReceiptHandle"].split("#")[0] for e in delete["Entries"]] == [
        "rh-ev-0",
        "rh-ev-1",
        "rh-ev-2",
    ]
    assert not world.sqs.in_flight  # every received event was deleted
    assert world.sample("dispatcher_events_total", status="SUCCEEDED", result="duplicate") == 1
    assert events.applied == 3
    assert world.health.last_event_at is not None


async def test_events_are_applied_before_the_batch_is_deleted() -> None:
    world = build_world()
    hold(world)
    put_events(world, event("SUCCEEDED"))
    world.sqs.fail("delete_message_batch", client_error("InternalError", 500))
    with pytest.raises(ClientError):
        await events_of(world).run_once()
    assert not world.pool.ledger.holds(ARN)  # applied; redelivery will be a duplicate


async def test_junk_is_counted_and_deleted_and_the_batch_goes_on() -> None:
    world = build_world()
    hold(world)
    no_detail = json.dumps({"source": "aws.states", "detail-type": DETAIL_TYPE})
    put_events(world, "{not json", no_detail, event("SUCCEEDED"))
    assert await events_of(world).run_once() == 3
    assert world.sample("dispatcher_events_total", status="unknown", result="malformed") == 2
    assert world.sample("dispatcher_events_total", status="SUCCEEDED", result="applied") == 1
    assert not world.pool.ledger.holds(ARN)
    [delete] = world.sqs.calls_to("delete_message_batch")
    assert len(delete["Entries"]) == 3


async def test_the_applied_line_says_when_the_event_reached_the_queue() -> None:
    """bench/cycle.py times the slot cycle with it: stop -> queued -> applied."""
    world = build_world()
    hold(world)
    world.sqs.put(
        EVENTS_QUEUE,
        sqs_message(event("SUCCEEDED"), message_id="ev-0", system={"SentTimestamp": "1700"}),
    )
    with structlog.testing.capture_logs() as lines:
        assert await events_of(world).run_once() == 1
    [receive] = world.sqs.calls_to("receive_message")
    assert receive["MessageSystemAttributeNames"] == ["SentTimestamp"]
    [applied] = [line for line in lines if line["event"] == "dispatcher.event_applied"]
    assert applied["sent_ms"] == 1700
    assert applied["execution_arn"] == ARN


@on_virtual_time
async def test_empty_receive_deletes_nothing() -> None:
    world = build_world()
    world.health.aws_failures = 2
    assert await events_of(world).run_once() == 0  # a long poll: its wait, on virtual time
    assert world.sqs.names() == ["receive_message"]
    assert world.health.aws_failures == 0  # the queue answered


# -- refill: freed slot -> next start -------------------------------------------------------


def test_a_slot_freed_while_full_starts_the_refill_clock() -> None:
    world = build_world(limit=1)
    hold(world)
    events_of(world).apply(event("SUCCEEDED"))
    world.clock.advance(0.25)
    world.pool.note_start_sent()
    assert world.sample("dispatcher_slot_refill_seconds_count", pool="default") == 1
    assert world.sample("dispatcher_slot_refill_seconds_sum", pool="default") == 0.25
    world.pool.note_start_sent()  # the hand-over was closed: no second observation
    assert world.sample("dispatcher_slot_refill_seconds_count", pool="default") == 1
    assert world.pool.finished_total == 1


def test_a_slot_freed_with_room_to_spare_is_no_hand_over() -> None:
    world = build_world(limit=2)
    hold(world)
    events_of(world).apply(event("SUCCEEDED"))
    world.pool.note_start_sent()
    assert world.sample("dispatcher_slot_refill_seconds_count", pool="default") == 0


async def test_the_next_start_closes_the_hand_over() -> None:
    world = build_world(limit=1)
    hold(world)
    events_of(world).apply(event("ABORTED"))
    world.clock.advance(0.02)
    await handle(world, sqs_message(message_id="next"))
    assert world.sample("dispatcher_slot_refill_seconds_count", pool="default") == 1
    assert world.sample("dispatcher_slot_refill_seconds_sum", pool="default") == pytest.approx(0.02)
    assert world.pool.ledger.running == {execution_arn(STATE_MACHINE_ARN, "next")}
