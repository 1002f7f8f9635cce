"""One identity per request, whatever copy of it arrives and whatever the configuration: a
dead-letter copy, a redrive by ``sfn-dispatcher redrive`` or by SQS's move task, a
producer's retry (with its key), a request in flight across a ``key_attribute`` change -
each maps to the request's one execution (on fakes)."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import pytest

from dispatcher.cli.redrive import request_attributes
from dispatcher.core.requests import (
    IDEMPOTENCY_ATTRIBUTE,
    REQUEST_ID_ATTRIBUTE,
    StartRequest,
    execution_arn,
    former_names,
    key_tag,
    parse,
)
from dispatcher.daemon.callbacks import Callbacks
from dispatcher.daemon.intake import Intake
from dispatcher.daemon.pastnames import MAX_PAGES
from dispatcher.settings.config import InputFormat
from tests.fake_intake import handle, intake_of
from tests.fakes import (
    DEAD_LETTER_QUEUE,
    STATE_MACHINE_ARN,
    World,
    build_world,
    client_error,
    sqs_message,
)

pytestmark = [pytest.mark.timeout(10), pytest.mark.usefixtures("fast_retries")]

MESSAGE_ID = "2f6c0f7e-8b1a-4c3d-9e5f-0a1b2c3d4e5f"
PLAIN_ARN = execution_arn(STATE_MACHINE_ARN, MESSAGE_ID)
TOKEN = "AQCEAAAAKgAAAAMAAAAAAAAAA" + "x" * 300


RETRY_ATTEMPTS = 3  # stamina's test mode (the fast_retries fixture)


def keyed_name(key: str, name: str) -> str:
    return f"k{key_tag(key)}_{name}"


def copy_of(letter: dict[str, Any], message_id: str, attributes: dict[str, Any]) -> dict[str, Any]:
    """The dead letter as it comes back to the request queue with a new message id."""
    return {
        "MessageId": message_id,
        "ReceiptHandle": f"rh-{message_id}",
        "Body": letter["Body"],
        "MessageAttributes": attributes,
        "Attributes": {"ApproximateReceiveCount": "1"},
    }


# -- every copy maps to the same execution --------------------------------------------------


@pytest.mark.parametrize("key_attribute", [None, "tenant"])
async def test_every_copy_of_a_dead_lettered_request_maps_to_its_one_execution(
    key_attribute: str | None,
) -> None:
    """The request started, then was dead-lettered anyway (say, on its last receive): the
    copy SQS's move task brings back (every attribute kept, new id) and the copy `redrive`
    sends (dispatcher-* dropped but the request id, new id) start nothing new."""
    world = build_world(key_attribute=key_attribute)
    message = sqs_message('{"n": 1}', message_id=MESSAGE_ID, attributes={"tenant": "t-1"})
    intake = await handle(world, message)
    [first] = world.sfn.executions
    await intake.starter.dead_letter(intake.queues[0], "default", message, "receive_limit", "why")
    [letter] = world.sqs.visible[DEAD_LETTER_QUEUE]
    assert letter["MessageAttributes"][REQUEST_ID_ATTRIBUTE]["StringValue"] == MESSAGE_ID
    moved = copy_of(letter, "moved-by-sqs", letter["MessageAttributes"])
    redriven = copy_of(letter, "redriven", request_attributes(letter))
    again = copy_of(letter, "redriven-again", request_attributes(letter))  # delete had failed
    for copy in (moved, redriven, again):
        await handle(world, copy, intake)
    assert list(world.sfn.executions) == [first], "one execution for the request and its copies"
    assert {call["name"] for call in world.sfn.calls_to("start_execution")} == {
        first.rsplit(":", 1)[-1]
    }
    assert intake.stats.started == 1
    assert intake.stats.duplicates == 3


async def test_a_producers_retry_in_envelope_format_is_the_same_request() -> None:
    """Same key, same text, sent twice: the second is a duplicate of the first execution,
    not an idempotency conflict (the envelope no longer embeds the message id)."""
    world = build_world(input_format="envelope")
    intake = intake_of(world)
    for message_id in ("m-1", "m-2"):
        attributes = {IDEMPOTENCY_ATTRIBUTE: "order-7", "customer": "c-1"}
        await handle(
            world, sqs_message("plain", message_id=message_id, attributes=attributes), intake
        )
    assert list(world.sfn.executions) == [execution_arn(STATE_MACHINE_ARN, "order-7")]
    assert "send_message" not in world.sqs.names(), "nothing dead-lettered"
    assert intake.stats.duplicates == 1
    [execution] = world.sfn.executions.values()
    assert json.loads(execution.input) == {
        "body": "plain",
        "requestId": "order-7",
        "attributes": {"customer": "c-1", IDEMPOTENCY_ATTRIBUTE: "order-7"},
    }


# -- names across a key_attribute change -----------------------------------------------------


def old_message(**attributes: str) -> dict[str, Any]:
    """A request first received (by the previous process) a minute ago."""
    first = str(int((time.time() - 60) * 1000))
    return sqs_message(
        '{"n": 1}',
        message_id=MESSAGE_ID,
        attributes=attributes,
        system={"ApproximateFirstReceiveTimestamp": first, "ApproximateReceiveCount": "2"},
    )


def restarted(world: World) -> Intake:
    """This reign's intake: its reign began now (after the message's first receive)."""
    return intake_of(world)


async def test_turning_on_a_key_attribute_adopts_the_running_execution_of_its_former_name() -> None:
    """Plain before the restart, keyed after: the start-up listing shows the request's
    execution under its plain name; the message comes back and starts nothing."""
    world = build_world(key_attribute="tenant")
    world.sfn.add_execution(MESSAGE_ID, '{"n": 1}')
    world.pool.ledger.observe_running(PLAIN_ARN, world.clock())  # the start-up listing
    intake = restarted(world)
    await handle(world, old_message(tenant="t-1"), intake)
    assert world.sfn.calls_to("start_execution") == []
    assert list(world.sfn.executions) == [PLAIN_ARN]
    assert world.pool.ledger.running == {PLAIN_ARN}
    assert world.pool.ledger.reserved_count == 0
    assert world.sqs.names() == ["describe_execution", "delete_message"]
    assert world.sample("dispatcher_former_name_lookups_total", result="found") == 1
    assert world.sample("dispatcher_former_name_describes_total") == 0, "the ledger knew it"


async def test_turning_off_a_key_attribute_finds_the_closed_execution_by_describing() -> None:
    """Keyed before, plain after; the execution already ended (the listing cannot show
    it): a describe of the former keyed name finds it, and the request is done."""
    world = build_world()
    former = execution_arn(STATE_MACHINE_ARN, keyed_name("t-1", MESSAGE_ID))
    world.sfn.add_execution(keyed_name("t-1", MESSAGE_ID), '{"n": 1}', status="SUCCEEDED")
    intake = restarted(world)
    await handle(world, old_message(tenant="t-1", region="eu"), intake)
    assert world.sfn.calls_to("start_execution") == []
    assert world.pool.ledger.is_tombstoned(former)
    assert world.pool.ledger.free == world.pool.ledger.limit
    assert "delete_message" in world.sqs.names()
    assert intake.stats.duplicates == 1
    described = [c["executionArn"] for c in world.sfn.calls_to("describe_execution")]
    # The plain name is the current one; then the other attributes' keys by name (region,
    # tenant): found at the second, then described once more to settle it.
    assert described == [
        execution_arn(STATE_MACHINE_ARN, keyed_name("eu", MESSAGE_ID)),
        former,
        former,
    ]


async def test_a_changed_key_attribute_answers_the_parent_of_a_child_that_ended() -> None:
    """A parent's token message across a restart that changed the key attribute: its child
    ended meanwhile, under the former keyed name. The parent gets the child's result; no
    second child starts."""
    world = build_world(key_attribute="region")
    callbacks = Callbacks(
        world.settings, world.clients, world.metrics, {"default": world.pool}, world.clock
    )
    child = keyed_name("t-1", "parent-1-0")
    arn = world.sfn.add_execution(child, '{"n": 1}')
    world.sfn.finish(arn, output='{"result": 42}')
    intake = restarted(world)
    intake.starter.callbacks = callbacks
    message = old_message(
        tenant="t-1", region="eu", **{"task-token": TOKEN, IDEMPOTENCY_ATTRIBUTE: "parent-1-0"}
    )
    await handle(world, message, intake)
    assert world.sfn.calls_to("start_execution") == []
    assert world.sfn.answers[TOKEN] == ("success", '{"result": 42}')


async def test_a_failed_describe_keeps_the_request_and_starts_nothing() -> None:
    world = build_world(key_attribute="tenant")
    world.sfn.fail_always("describe_execution", client_error("InternalFailure", 500))
    intake = restarted(world)
    await handle(world, old_message(tenant="t-1"), intake)
    assert world.sfn.calls_to("start_execution") == []
    assert world.sfn.executions == {}
    [back] = world.sqs.calls_to("change_message_visibility")
    assert back["VisibilityTimeout"] == 30
    assert world.pool.ledger.free == world.pool.ledger.limit
    assert world.sample("dispatcher_former_name_lookups_total", result="failed") == 1


async def test_a_request_first_received_in_this_reign_costs_no_lookup() -> None:
    """The rule's cost is paid only by requests older than the reign (and by copies)."""
    world = build_world(key_attribute="tenant")
    intake = restarted(world)
    later = str(int((intake.starter.reign_began + 10) * 1000))
    message = sqs_message(
        '{"n": 1}',
        message_id=MESSAGE_ID,
        attributes={"tenant": "t-1"},
        system={"ApproximateFirstReceiveTimestamp": later},
    )
    await handle(world, message, intake)
    assert world.sqs.names() == ["start_execution", "delete_message"]
    assert world.sample("dispatcher_former_name_lookups_total") == 0


def fresh_retry(sent_ago: float, **attributes: str) -> dict[str, Any]:
    """A producer's retry (or a copy SQS stored twice) with the request's idempotency key:
    a new message, first received by this process (just now), sent ``sent_ago`` s ago."""
    now = time.time()
    return sqs_message(
        '{"n": 1}',
        message_id="retry-1",
        attributes={IDEMPOTENCY_ATTRIBUTE: "order-7", **attributes},
        system={
            "SentTimestamp": str(int((now - sent_ago) * 1000)),
            "ApproximateFirstReceiveTimestamp": str(int(now * 1000) + 10_000),
        },
    )


async def test_a_retry_sent_before_the_reign_is_found_under_its_former_name() -> None:
    """Keyed before the restart, plain after: the request's first message started
    ``k<tag>_order-7``, which ended; the producer's retry (same key) was sent before this
    process began to govern but is first received now. It is looked for under its former
    names and starts nothing."""
    world = build_world()
    former = keyed_name("t-1", "order-7")
    world.sfn.add_execution(former, '{"n": 1}', status="SUCCEEDED")
    intake = restarted(world)
    await handle(world, fresh_retry(60, tenant="t-1"), intake)
    assert world.sfn.calls_to("start_execution") == []
    assert world.pool.ledger.is_tombstoned(execution_arn(STATE_MACHINE_ARN, former))
    assert intake.stats.duplicates == 1
    assert world.sample("dispatcher_former_name_lookups_total", result="found") == 1


async def test_a_retry_sent_in_this_reign_finds_a_running_former_name_for_free() -> None:
    """Plain before the restart, keyed after; the first execution still runs (the start-up
    listing showed it). A retry sent after the restart is matched against the ledger by its
    former names, without a describe, and starts nothing."""
    world = build_world(key_attribute="tenant")
    plain = world.sfn.add_execution("order-7", '{"n": 1}')
    world.pool.ledger.observe_running(plain, world.clock())  # the start-up listing
    intake = restarted(world)
    await handle(world, fresh_retry(-30, tenant="t-1"), intake)
    assert world.sfn.calls_to("start_execution") == []
    assert world.pool.ledger.running == {plain}
    assert world.sample("dispatcher_former_name_describes_total") == 0
    assert world.sample("dispatcher_former_name_lookups_total", result="found") == 1


def twin(sent_ago: float, **attributes: str) -> dict[str, Any]:
    """A request without an idempotency key, sent ``sent_ago`` s ago and first received by
    this process just now: a copy SQS stored twice, whose twin may have started before."""
    message = fresh_retry(sent_ago, **attributes)
    del message["MessageAttributes"][IDEMPOTENCY_ATTRIBUTE]
    message["MessageId"] = MESSAGE_ID
    return message


async def test_a_request_without_a_key_sent_before_the_reign_costs_no_describe() -> None:
    """The backlog of requests nobody received before the restart, without an idempotency
    key: only a twin SQS stored could have started, after it was sent. One listing of the
    executions started since answers for every such request; no describe."""
    world = build_world(key_attribute="tenant")
    intake = restarted(world)
    await handle(world, twin(60, tenant="t-1"), intake)
    await handle(world, twin(50, tenant="t-2") | {"MessageId": "other-1"}, intake)
    assert world.sfn.calls_to("describe_execution") == []
    assert len(world.sfn.calls_to("start_execution")) == 2
    [listing] = world.sfn.calls_to("list_executions")
    assert listing.get("statusFilter") is None, "every status: the twin's may have ended"
    assert world.sample("dispatcher_former_name_lookups_total", result="not_found") == 2


async def test_a_twin_sqs_stored_is_found_under_its_former_name_in_the_listing() -> None:
    """Plain before the restart, keyed after. SQS stored the request twice: one copy was
    started (and ended) before the restart, the other is first received now. It used to
    start a second execution under its keyed name."""
    world = build_world(key_attribute="tenant")
    world.sfn.add_execution(MESSAGE_ID, '{"n": 1}', status="SUCCEEDED")
    intake = restarted(world)
    await handle(world, twin(60, tenant="t-1"), intake)
    assert world.sfn.calls_to("start_execution") == []
    assert world.pool.ledger.is_tombstoned(PLAIN_ARN)
    assert intake.stats.duplicates == 1
    assert world.sample("dispatcher_former_name_lookups_total", result="found") == 1


async def test_nothing_under_a_former_name_starts_it_under_the_current_one() -> None:
    world = build_world(key_attribute="tenant")
    intake = restarted(world)
    await handle(world, old_message(tenant="t-1"), intake)
    [start] = world.sfn.calls_to("start_execution")
    assert start["name"] == keyed_name("t-1", MESSAGE_ID)
    described = world.sfn.calls_to("describe_execution")
    # The plain name; then the name a former key attribute the message lacks gave it.
    empty_key = execution_arn(STATE_MACHINE_ARN, keyed_name("", MESSAGE_ID))
    assert [c["executionArn"] for c in described] == [PLAIN_ARN, empty_key]
    assert world.sample("dispatcher_former_name_lookups_total", result="not_found") == 1
    assert world.sample("dispatcher_former_name_describes_total") == 2


def test_former_names_are_bounded_and_exclude_the_current_name() -> None:
    attributes = {f"a{i}": f"v{i}" for i in range(9)} | {
        "task-token": TOKEN,
        IDEMPOTENCY_ATTRIBUTE: "order-1",
        "tenant": "t-1",
        REQUEST_ID_ATTRIBUTE: "order-1",
    }
    message = sqs_message("{}", message_id=MESSAGE_ID, attributes=attributes)
    request = parse(message, InputFormat.JSON)
    assert isinstance(request, StartRequest)
    plain = former_names(request, message, None)
    assert plain[0] == keyed_name("v0", "order-1")
    assert len(plain) == 5  # four attribute values and the empty key
    assert "order-1" not in plain, "the current name"
    assert keyed_name(TOKEN, "order-1") not in plain
    keyed = former_names(
        dataclasses.replace(request, name=keyed_name("t-1", "order-1")), message, "tenant"
    )
    assert keyed[0] == "order-1"
    assert keyed_name("t-1", "order-1") not in keyed


async def test_an_envelope_written_before_the_upgrade_is_the_same_request() -> None:
    """An execution started with the former envelope (the message id, every attribute) and
    the request redelivered after the upgrade: a duplicate, not an idempotency conflict."""
    world = build_world(input_format="envelope", aws_exact=False)
    attributes = {IDEMPOTENCY_ATTRIBUTE: "order-7", "task-token": TOKEN}
    former = {"body": "plain", "messageId": "m-1", "attributes": attributes}
    world.sfn.add_execution("order-7", json.dumps(former))
    intake = await handle(world, sqs_message("plain", message_id="m-1", attributes=attributes))
    assert intake.stats.duplicates == 1
    assert "send_message" not in world.sqs.names()


async def test_a_request_started_raw_is_the_same_request_after_switching_to_envelope() -> None:
    """``input_format`` changed from raw to envelope across a restart: the request in flight
    meets its own execution (raw input, same body) - a duplicate, not a conflict."""
    world = build_world(input_format="envelope", aws_exact=False)
    attributes = {IDEMPOTENCY_ATTRIBUTE: "order-8"}
    world.sfn.add_execution("order-8", json.dumps({"amount": 3}))
    intake = await handle(world, sqs_message('{"amount": 3}', attributes=attributes))
    assert intake.stats.duplicates == 1
    assert "send_message" not in world.sqs.names()


async def test_a_request_started_as_envelope_is_the_same_request_after_switching_to_raw() -> None:
    """The other way: started as an envelope, redelivered with ``input_format`` raw."""
    world = build_world(aws_exact=False)
    attributes = {IDEMPOTENCY_ATTRIBUTE: "order-9"}
    envelope = {"body": '{"amount": 4}', "requestId": "order-9", "attributes": attributes}
    world.sfn.add_execution("order-9", json.dumps(envelope))
    intake = await handle(world, sqs_message('{"amount": 4}', attributes=attributes))
    assert intake.stats.duplicates == 1
    assert "send_message" not in world.sqs.names()


async def test_another_body_is_still_a_conflict_across_a_format_switch() -> None:
    """A raw execution of another body is a real conflict, whatever the format."""
    world = build_world(input_format="envelope", aws_exact=False)
    attributes = {IDEMPOTENCY_ATTRIBUTE: "order-10"}
    world.sfn.add_execution("order-10", json.dumps({"amount": 5}))
    intake = await handle(world, sqs_message('{"amount": 6}', attributes=attributes))
    assert intake.stats.duplicates == 0
    assert "send_message" in world.sqs.names()


async def test_a_twin_older_than_the_listing_reaches_costs_no_describe() -> None:
    """The listing stops after `MAX_PAGES` pages: an older request is not looked for (no
    describe per message of a deep backlog)."""
    world = build_world(key_attribute="tenant")
    world.sfn.page_size = 1
    for n in range(MAX_PAGES + 2):
        world.sfn.add_execution(f"other-{n}", status="SUCCEEDED")
    intake = restarted(world)
    await handle(world, twin(60, tenant="t-1"), intake)
    assert len(world.sfn.calls_to("list_executions")) == MAX_PAGES
    assert world.sfn.calls_to("describe_execution") == []
    assert len(world.sfn.calls_to("start_execution")) == 1


async def test_a_retry_sent_in_this_reign_finds_an_ended_former_name_in_the_listing() -> None:
    """Keyed before the restart, plain after; the first execution ended before it (no
    listing of running ones shows it). A retry (or SQS's move task's copy of a message its
    redrive policy moved) sent after the restart, with the same key, is looked for in the
    listing of the executions started before the reign - not described - and starts
    nothing. It used to start a second execution under the new name."""
    world = build_world()
    former = keyed_name("t-1", "order-7")
    world.sfn.add_execution(former, '{"n": 1}', status="SUCCEEDED")
    intake = restarted(world)
    await handle(world, fresh_retry(-30, tenant="t-1"), intake)
    assert world.sfn.calls_to("start_execution") == []
    assert len(world.sfn.calls_to("list_executions")) == 1
    assert world.sample("dispatcher_former_name_describes_total") == 0
    assert world.pool.ledger.is_tombstoned(execution_arn(STATE_MACHINE_ARN, former))
    assert intake.stats.duplicates == 1
