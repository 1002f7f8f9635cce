"""The simulated AWS follows AWS's documented semantics, faults included (virtual time)."""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import anyio
import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ParamValidationError,
    ReadTimeoutError,
)

from dispatcher.aws.api import ErrorKind, classify, error_code, outcome_unknown
from dispatcher.daemon.events import parse_event
from dispatcher.daemon.lease import Lease, LeaseConfig
from sim import loop
from sim.aws import EventFault, EventInfo, World, WorldConfig
from sim.calls import NO_FAULT, CallFault
from sim.history import History

# -- helpers --------------------------------------------------------------------------------


def virtual(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run an async test on the virtual-time loop (sleeping costs no real time)."""

    def run() -> None:
        loop.run(test)

    run.__doc__ = test.__doc__
    return run


def make_world(
    *, faults: Any = None, event_faults: Any = None, seed: int = 7, **config: Any
) -> World:
    """A world on the running loop's clock, 10 ms each way per call and DescribeExecution
    consistent, unless told."""
    config.setdefault("latency", (0.01, 0.01))
    config.setdefault("describe_lag_rate", 0.0)
    return World(
        clock=anyio.current_time,
        rng=random.Random(seed),
        config=WorldConfig(**config),
        faults=faults,
        event_faults=event_faults,
    )


def code_of(info: pytest.ExceptionInfo[ClientError]) -> str:
    """The AWS error code of a raised ClientError."""
    return error_code(info.value)


def only(operation: str, fault: CallFault) -> Callable[[str, str, Mapping[str, Any]], CallFault]:
    """Faults: ``fault`` for every call of ``operation``, nothing for the rest."""

    def decide(node: str, op: str, params: Mapping[str, Any]) -> CallFault:
        del node, params
        return fault if op == operation else NO_FAULT

    return decide


def lines(history: History, kind: str) -> list[str]:
    """The text of every record of one kind."""
    return [r.text for r in history.records if r.kind == kind]


# -- Step Functions ---------------------------------------------------------------------------


@virtual
async def test_start_is_idempotent_while_running_with_the_same_input() -> None:
    world = make_world()
    arn = world.create_state_machine("work")
    sfn = world.client("stepfunctions", "d1")
    first = await sfn.start_execution(stateMachineArn=arn, name="r1", input='{"seconds": 10}')
    again = await sfn.start_execution(stateMachineArn=arn, name="r1", input='{"seconds": 10}')
    assert again["executionArn"] == first["executionArn"]
    assert first["executionArn"].endswith(":execution:work:r1")
    assert len(world.history.executions) == 1
    assert lines(world.history, "execution_repeated")
    described = await sfn.describe_execution(executionArn=first["executionArn"])
    assert described["status"] == "RUNNING"
    assert described["input"] == '{"seconds": 10}'


@virtual
async def test_already_exists_for_another_input_or_a_closed_execution() -> None:
    world = make_world()
    arn = world.create_state_machine("work")
    sfn = world.client("stepfunctions", "d1")
    started = await sfn.start_execution(stateMachineArn=arn, name="r1", input='{"seconds": 2}')
    with pytest.raises(ClientError) as other_input:
        await sfn.start_execution(stateMachineArn=arn, name="r1", input='{"seconds": 3}')
    assert code_of(other_input) == "ExecutionAlreadyExists"
    await anyio.sleep(3)
    described = await sfn.describe_execution(executionArn=started["executionArn"])
    assert described["status"] == "SUCCEEDED"
    assert "stopDate" in described
    assert described["output"] == '{"req": null, "done": true}'  # from its input
    with pytest.raises(ClientError) as closed:
        await sfn.start_execution(stateMachineArn=arn, name="r1", input='{"seconds": 2}')
    assert code_of(closed) == "ExecutionAlreadyExists"
    assert classify(closed.value) is ErrorKind.PERMANENT


@virtual
async def test_start_validates_name_input_and_machine() -> None:
    world = make_world()
    arn = world.create_state_machine("work")
    sfn = world.client("stepfunctions", "d1")
    cases = [
        ({"name": "bad name!"}, "InvalidName"),
        ({"name": "x" * 81}, "InvalidName"),
        ({"name": "ok", "input": "{not json"}, "InvalidExecutionInput"),
        ({"name": "ok", "input": json.dumps({"x": "a" * 262_144})}, "InvalidExecutionInput"),
        ({"name": "ok", "stateMachineArn": arn + "-gone"}, "StateMachineDoesNotExist"),
    ]
    for kwargs, code in cases:
        with pytest.raises(ClientError) as refused:
            await sfn.start_execution(**{"stateMachineArn": arn, **kwargs})
        assert code_of(refused) == code
    assert world.history.executions == {}


@virtual
async def test_failing_input_ends_failed_and_status_follows_time() -> None:
    world = make_world()
    arn = world.create_state_machine("work")
    sfn = world.client("stepfunctions", "d1")
    started = await sfn.start_execution(
        stateMachineArn=arn, name="f", input='{"seconds": 5, "fail": true}'
    )
    await anyio.sleep(4.9)
    assert (await sfn.describe_execution(executionArn=started["executionArn"]))[
        "status"
    ] == "RUNNING"
    await anyio.sleep(0.2)
    described = await sfn.describe_execution(executionArn=started["executionArn"])
    assert described["status"] == "FAILED"
    assert described["error"]
    run = world.history.executions[started["executionArn"]].runs[0]
    assert run.stop == pytest.approx(run.start + 5)
    assert run.status == "FAILED"


async def _running(sfn: Any, arn: str, page_size: int = 1000) -> list[str]:
    names: list[str] = []
    async for page in sfn.get_paginator("list_executions").paginate(
        stateMachineArn=arn, statusFilter="RUNNING", PaginationConfig={"PageSize": page_size}
    ):
        names += [item["name"] for item in page["executions"]]
    return names


@virtual
async def test_listing_lags_behind_starts_and_ends() -> None:
    world = make_world(listing_lag=5.0)
    arn = world.create_state_machine("work")
    sfn = world.client("stepfunctions", "d1")
    for i in range(20):
        await sfn.start_execution(stateMachineArn=arn, name=f"r{i}", input='{"seconds": 10}')
    early = await _running(sfn, arn)
    assert 0 < len(early) < 20  # some not visible yet
    await anyio.sleep(5)
    assert sorted(await _running(sfn, arn)) == sorted(f"r{i}" for i in range(20))
    await anyio.sleep(5.5)  # all ended (the last started ~0.4 s after the first)
    stale = await _running(sfn, arn)
    assert 0 < len(stale) < 20  # some ends not visible yet
    await anyio.sleep(5)
    assert await _running(sfn, arn) == []
    done = await sfn.list_executions(stateMachineArn=arn, statusFilter="SUCCEEDED")
    assert len(done["executions"]) == 20
    assert all("stopDate" in item for item in done["executions"])


@virtual
async def test_pagination_holds_across_changes() -> None:
    world = make_world(listing_lag=0.0)
    arn = world.create_state_machine("work")
    sfn = world.client("stepfunctions", "d1")
    for i in range(25):
        await sfn.start_execution(stateMachineArn=arn, name=f"r{i:02d}", input='{"seconds": 99}')
    first = await sfn.list_executions(stateMachineArn=arn, statusFilter="RUNNING", maxResults=10)
    assert [e["name"] for e in first["executions"]] == [f"r{i:02d}" for i in range(24, 14, -1)]
    await sfn.start_execution(stateMachineArn=arn, name="late", input='{"seconds": 99}')
    seen = [e["name"] for e in first["executions"]]
    token = first["nextToken"]
    while token:
        page = await sfn.list_executions(
            stateMachineArn=arn, statusFilter="RUNNING", maxResults=10, nextToken=token
        )
        seen += [e["name"] for e in page["executions"]]
        token = page.get("nextToken")
    assert sorted(seen) == [f"r{i:02d}" for i in range(25)]  # the newcomer is not in it
    assert len(await _running(sfn, arn, page_size=7)) == 26
    pages = [p async for p in sfn.get_paginator("list_executions").paginate(stateMachineArn=arn)]
    assert len(pages) == 1  # default page of 100
    with pytest.raises(ClientError) as bad:
        await sfn.list_executions(stateMachineArn=arn, nextToken="garbage")
    assert code_of(bad) == "InvalidToken"
    listed_calls = [r for r in world.history.records if "ListExecutions" in r.text]
    assert len(listed_calls) > 5  # every page is a call of its own


@virtual
async def test_describe_may_not_know_a_new_execution_yet() -> None:
    world = make_world(describe_lag=2.0, describe_lag_rate=1.0)
    arn = world.create_state_machine("work")
    sfn = world.client("stepfunctions", "d1")
    started = await sfn.start_execution(stateMachineArn=arn, name="r", input='{"seconds": 9}')
    with pytest.raises(ClientError) as missing:
        await sfn.describe_execution(executionArn=started["executionArn"])
    assert code_of(missing) == "ExecutionDoesNotExist"
    await anyio.sleep(2)
    described = await sfn.describe_execution(executionArn=started["executionArn"])
    assert described["status"] == "RUNNING"
    with pytest.raises(ClientError) as again:  # the name is taken all the same
        await sfn.start_execution(stateMachineArn=arn, name="r", input="{}")
    assert code_of(again) == "ExecutionAlreadyExists"


@virtual
async def test_throttling_buckets_refuse_without_applying() -> None:
    world = make_world(buckets={"StartExecution": (3.0, 1.0)})
    arn = world.create_state_machine("work")
    sfn = world.client("stepfunctions", "d1")
    for i in range(3):
        await sfn.start_execution(stateMachineArn=arn, name=f"r{i}", input="{}")
    with pytest.raises(ClientError) as throttled:
        await sfn.start_execution(stateMachineArn=arn, name="r3", input="{}")
    assert code_of(throttled) == "ThrottlingException"
    assert throttled.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert classify(throttled.value) is ErrorKind.TRANSIENT
    assert len(world.history.executions) == 3
    await anyio.sleep(1)
    await sfn.start_execution(stateMachineArn=arn, name="r3", input="{}")
    assert len(world.history.executions) == 4


@virtual
async def test_outside_start_redrive_and_stop() -> None:
    world = make_world(listing_lag=0.0, describe_lag_rate=0.0)
    arn = world.create_state_machine("work")
    events = world.create_queue("events")
    world.route_events([arn], events)
    sfn = world.client("stepfunctions", "d1")
    execution = world.start_outside(arn, "console-1", '{"fail": true}', 2.0)
    with pytest.raises(ClientError):
        world.start_outside(arn, "console-1", "{}", 2.0)
    assert not world.redrive(execution, 5.0)  # still running
    await anyio.sleep(2.5)
    assert (await sfn.describe_execution(executionArn=execution))["status"] == "FAILED"
    assert world.redrive(execution, 5.0)
    described = await sfn.describe_execution(executionArn=execution)
    assert described["status"] == "RUNNING"
    assert described["redriveCount"] == 1
    listed = await sfn.list_executions(stateMachineArn=arn, statusFilter="RUNNING")
    assert listed["executions"][0]["redriveCount"] == 1
    assert world.stop_outside(execution)
    assert (await sfn.describe_execution(executionArn=execution))["status"] == "ABORTED"
    runs = world.history.executions[execution].runs
    assert [(r.started_by, r.status, r.redrive_count) for r in runs] == [
        ("outside", "FAILED", 0),
        ("outside", "ABORTED", 1),
    ]
    other = world.start_outside(arn, "console-2", "{}", 1.0)
    await anyio.sleep(1.5)
    assert not world.redrive(other, 1.0)  # SUCCEEDED cannot be redriven
    await anyio.sleep(1.0)
    sqs = world.client("sqs", "d1")
    got = await sqs.receive_message(QueueUrl=events, MaxNumberOfMessages=10)
    got_more = await sqs.receive_message(QueueUrl=events, MaxNumberOfMessages=10)
    changes = sorted(
        (
            parse_event(m["Body"]).execution_arn[-9:],
            parse_event(m["Body"]).status,
            parse_event(m["Body"]).redrive_count,
        )
        for m in got.get("Messages", []) + got_more.get("Messages", [])
    )
    assert changes == [
        ("console-1", "ABORTED", 1),
        ("console-1", "FAILED", 0),
        ("console-1", "RUNNING", 0),
        ("console-1", "RUNNING", 1),
        ("console-2", "RUNNING", 0),
        ("console-2", "SUCCEEDED", 0),
    ]


@virtual
async def test_status_events_have_the_eventbridge_envelope() -> None:
    world = make_world()
    arn = world.create_state_machine("work")
    events = world.create_queue("events")
    world.route_events([arn], events)
    sfn = world.client("stepfunctions", "d1")
    sqs = world.client("sqs", "d1")
    await sfn.start_execution(stateMachineArn=arn, name="r", input='{"seconds": 1}')
    got = await sqs.receive_message(QueueUrl=events, WaitTimeSeconds=20)
    envelope = json.loads(got["Messages"][0]["Body"])
    assert set(envelope) == {
        "version", "id", "detail-type", "source", "account", "time", "region", "resources",
        "detail",
    }  # fmt: skip
    assert envelope["source"] == "aws.states"
    assert envelope["detail-type"] == "Step Functions Execution Status Change"
    detail = envelope["detail"]
    assert detail["status"] == "RUNNING"
    assert isinstance(detail["startDate"], int)
    assert detail["stopDate"] is None
    assert detail["input"] == '{"seconds": 1}'
    assert detail["redriveCount"] == 0
    # The terminal event arrives by itself: the long poll wakes for it (no World.run here).
    got = await sqs.receive_message(QueueUrl=events, WaitTimeSeconds=20)
    change = parse_event(got["Messages"][0]["Body"])
    assert change.status == "SUCCEEDED"
    assert anyio.current_time() < 2.0


@virtual
async def test_event_faults_lose_duplicate_and_delay() -> None:
    def fate(info: EventInfo) -> EventFault:
        name = info.execution_arn.rsplit(":", 1)[-1]
        if name == "lost":
            return EventFault(lost=True)
        if name == "twice":
            return EventFault(duplicate=True, duplicate_delay=3.0)
        if name == "late":
            return EventFault(delay=10.0)
        return EventFault()

    world = make_world(event_faults=fate, event_latency=(0.1, 0.1))
    arn = world.create_state_machine("work")
    events = world.create_queue("events")
    world.route_events([arn], events)
    sfn = world.client("stepfunctions", "d1")
    sqs = world.client("sqs", "d1")
    for name in ("lost", "twice", "late"):
        await sfn.start_execution(stateMachineArn=arn, name=name, input='{"seconds": 100}')
    seen: list[tuple[float, str]] = []
    while anyio.current_time() < 15:
        got = await sqs.receive_message(QueueUrl=events, MaxNumberOfMessages=10, WaitTimeSeconds=5)
        for message in got.get("Messages", []):
            seen.append((anyio.current_time(), parse_event(message["Body"]).execution_arn))
            await sqs.delete_message(QueueUrl=events, ReceiptHandle=message["ReceiptHandle"])
    names = [arn.rsplit(":", 1)[-1] for _, arn in seen]
    assert names == ["twice", "twice", "late"]
    assert seen[1][0] > 3.0
    assert seen[2][0] > 10.0
    fates = {e.execution_arn.rsplit(":", 1)[-1]: e.deliveries for e in world.history.events}
    assert fates["lost"] == ()
    assert len(fates["twice"]) == 2
    assert any("LOST" in text for text in lines(world.history, "event"))


# -- SQS --------------------------------------------------------------------------------------


@virtual
async def test_visibility_timeout_and_new_receipt_handles() -> None:
    world = make_world()
    queue = world.create_queue("requests", visibility_timeout=30)
    world.send_request(queue, '{"a": 1}', {"idempotency-key": "k1"}, request_id="q1")
    sqs = world.client("sqs", "d1")
    first = (
        await sqs.receive_message(
            QueueUrl=queue,
            MessageAttributeNames=["All"],
            MessageSystemAttributeNames=["All"],
        )
    )["Messages"][0]
    assert first["MessageAttributes"] == {
        "idempotency-key": {"DataType": "String", "StringValue": "k1"}
    }
    assert first["Attributes"]["ApproximateReceiveCount"] == "1"
    assert int(first["Attributes"]["SentTimestamp"]) > 1_700_000_000_000
    assert await sqs.receive_message(QueueUrl=queue) == {}  # hidden
    await anyio.sleep(30)
    second = (await sqs.receive_message(QueueUrl=queue, AttributeNames=["All"]))["Messages"][0]
    assert second["MessageId"] == first["MessageId"]
    assert second["ReceiptHandle"] != first["ReceiptHandle"]
    assert second["Attributes"]["ApproximateReceiveCount"] == "2"
    assert "MessageAttributes" not in second  # not asked for
    # The older handle: delete "succeeds" and deletes nothing; visibility change refused.
    await sqs.delete_message(QueueUrl=queue, ReceiptHandle=first["ReceiptHandle"])
    assert [d.deleted for d in world.history.deletes] == [False]
    with pytest.raises(ClientError) as stale:
        await sqs.change_message_visibility(
            QueueUrl=queue, ReceiptHandle=first["ReceiptHandle"], VisibilityTimeout=0
        )
    assert code_of(stale) == "InvalidParameterValue"
    await sqs.change_message_visibility(
        QueueUrl=queue, ReceiptHandle=second["ReceiptHandle"], VisibilityTimeout=0
    )
    third = (await sqs.receive_message(QueueUrl=queue))["Messages"][0]
    await sqs.delete_message(QueueUrl=queue, ReceiptHandle=third["ReceiptHandle"])
    assert [d.deleted for d in world.history.deletes] == [False, True]
    await anyio.sleep(60)
    assert await sqs.receive_message(QueueUrl=queue) == {}
    with pytest.raises(ClientError) as invalid:
        await sqs.delete_message(QueueUrl=queue, ReceiptHandle="not-a-handle")
    assert code_of(invalid) == "ReceiptHandleIsInvalid"


@virtual
async def test_change_visibility_of_a_message_not_in_flight() -> None:
    world = make_world()
    queue = world.create_queue("requests", visibility_timeout=5)
    world.send_request(queue, "{}", {}, request_id="q1")
    sqs = world.client("sqs", "d1")
    message = (await sqs.receive_message(QueueUrl=queue))["Messages"][0]
    await anyio.sleep(6)
    with pytest.raises(ClientError) as not_in_flight:
        await sqs.change_message_visibility(
            QueueUrl=queue, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=30
        )
    assert code_of(not_in_flight) == "AWS.SimpleQueueService.MessageNotInflight"
    result = await sqs.change_message_visibility_batch(
        QueueUrl=queue,
        Entries=[
            {"Id": "0", "ReceiptHandle": message["ReceiptHandle"], "VisibilityTimeout": 1},
            {"Id": "1", "ReceiptHandle": "junk", "VisibilityTimeout": 1},
        ],
    )
    assert [f["Code"] for f in result["Failed"]] == [
        "AWS.SimpleQueueService.MessageNotInflight",
        "ReceiptHandleIsInvalid",
    ]


@virtual
async def test_visibility_is_capped_at_12_hours_from_the_receive() -> None:
    """SQS: a message stays in flight at most 12 hours from its receive; an extension
    beyond that is rejected, not shortened."""
    world = make_world()
    queue = world.create_queue("requests", visibility_timeout=60)
    world.send_request(queue, "{}", {}, request_id="q1")
    sqs = world.client("sqs", "d1")
    message = (await sqs.receive_message(QueueUrl=queue))["Messages"][0]
    received = world.history.receives[0].time
    handle = message["ReceiptHandle"]
    await sqs.change_message_visibility(
        QueueUrl=queue, ReceiptHandle=handle, VisibilityTimeout=21_600
    )
    await anyio.sleep(21_000)
    left = int(received + 43_200 - anyio.current_time()) - 1  # the request leg takes 10 ms
    with pytest.raises(ClientError) as beyond:
        await sqs.change_message_visibility(
            QueueUrl=queue, ReceiptHandle=handle, VisibilityTimeout=left + 2
        )
    assert code_of(beyond) == "InvalidParameterValue"
    assert "Total VisibilityTimeout" in str(beyond.value)
    await sqs.change_message_visibility(
        QueueUrl=queue, ReceiptHandle=handle, VisibilityTimeout=left
    )
    await anyio.sleep(left - 10)
    assert "Messages" not in await sqs.receive_message(QueueUrl=queue)
    await anyio.sleep(20)
    again = await sqs.receive_message(QueueUrl=queue)
    assert again["Messages"][0]["MessageId"] == message["MessageId"]


@virtual
async def test_redrive_policy_moves_after_max_receive_count() -> None:
    world = make_world()
    dlq = world.create_queue("dead")
    queue = world.create_queue("requests", dead_letter=dlq, max_receive_count=2)
    world.send_request(queue, '{"bad": 1}', {"x": "y"}, request_id="q1")
    sqs = world.client("sqs", "d1")
    for count in (1, 2):
        got = await sqs.receive_message(QueueUrl=queue, AttributeNames=["ApproximateReceiveCount"])
        message = got["Messages"][0]
        assert message["Attributes"] == {"ApproximateReceiveCount": str(count)}
        await sqs.change_message_visibility(
            QueueUrl=queue, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0
        )
    assert await sqs.receive_message(QueueUrl=queue) == {}
    moved = (await sqs.receive_message(QueueUrl=dlq, MessageAttributeNames=["All"]))["Messages"]
    assert moved[0]["MessageId"] == message["MessageId"]
    assert moved[0]["Body"] == '{"bad": 1}'
    assert moved[0]["MessageAttributes"]["x"]["StringValue"] == "y"
    [move] = world.history.moves
    assert (move.source_url, move.target_url) == (queue, dlq)
    attributes = (await sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["All"]))[
        "Attributes"
    ]
    assert json.loads(attributes["RedrivePolicy"]) == {
        "deadLetterTargetArn": "arn:aws:sqs:eu-west-1:123456789012:dead",
        "maxReceiveCount": 2,
    }
    assert attributes["ApproximateNumberOfMessages"] == "0"


@virtual
async def test_size_limit_counts_attributes() -> None:
    world = make_world()
    queue = world.create_queue("small", maximum_message_size=1024)
    sqs = world.client("sqs", "d1")
    body = "x" * 1000
    await sqs.send_message(QueueUrl=queue, MessageBody=body)
    attribute = {"dispatcher-reason": {"DataType": "String", "StringValue": "invalid_json"}}
    with pytest.raises(ClientError) as too_big:
        await sqs.send_message(QueueUrl=queue, MessageBody=body, MessageAttributes=attribute)
    assert code_of(too_big) == "InvalidParameterValue"
    assert "shorter than 1024 bytes" in str(too_big.value)
    with pytest.raises(ClientError):
        world.send_request(queue, body, {"dispatcher-reason": "invalid_json"}, request_id="q")
    assert len(world.history.sends) == 1


@virtual
async def test_at_least_once_stores_some_messages_twice() -> None:
    world = make_world(sqs_duplicate_rate=1.0)
    queue = world.create_queue("requests")
    message_id = world.send_request(queue, "{}", {}, request_id="q1")
    sqs = world.client("sqs", "d1")
    got = await sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10)
    assert [m["MessageId"] for m in got["Messages"]] == [message_id, message_id]
    handles = [m["ReceiptHandle"] for m in got["Messages"]]
    assert handles[0] != handles[1]
    result = await sqs.delete_message_batch(
        QueueUrl=queue, Entries=[{"Id": str(i), "ReceiptHandle": h} for i, h in enumerate(handles)]
    )
    assert len(result["Successful"]) == 2
    assert [d.deleted for d in world.history.deletes] == [True, True]


@virtual
async def test_long_poll_wakes_on_send_and_on_visibility() -> None:
    world = make_world()
    queue = world.create_queue("requests", visibility_timeout=7)
    sqs = world.client("sqs", "d1")
    woke: list[float] = []

    async def poll() -> str:
        got = await sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=20)
        woke.append(anyio.current_time())
        return str(got["Messages"][0]["ReceiptHandle"])

    async with anyio.create_task_group() as tg:
        tg.start_soon(poll)
        await anyio.sleep(3)
        world.send_request(queue, "{}", {}, request_id="q1")
    assert woke == [pytest.approx(3.01)]
    handle = await poll()  # the message is hidden until 3.01 + 7
    assert woke[1] == pytest.approx(3.01 + 7 + 0.01, abs=0.02)
    await sqs.delete_message(QueueUrl=queue, ReceiptHandle=handle)
    started = anyio.current_time()
    assert await sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=20) == {}
    assert anyio.current_time() - started == pytest.approx(20.02)


@virtual
async def test_batches_are_checked_like_aws() -> None:
    world = make_world()
    queue = world.create_queue("requests")
    sqs = world.client("sqs", "d1")
    with pytest.raises(ClientError) as too_many:
        await sqs.delete_message_batch(
            QueueUrl=queue, Entries=[{"Id": str(i), "ReceiptHandle": "h"} for i in range(11)]
        )
    assert code_of(too_many) == "AWS.SimpleQueueService.TooManyEntriesInBatchRequest"
    with pytest.raises(ClientError) as same_ids:
        await sqs.delete_message_batch(
            QueueUrl=queue, Entries=[{"Id": "a", "ReceiptHandle": "h"}] * 2
        )
    assert code_of(same_ids) == "AWS.SimpleQueueService.BatchEntryIdsNotDistinct"
    sent = await sqs.send_message_batch(
        QueueUrl=queue,
        Entries=[{"Id": "a", "MessageBody": "{}"}, {"Id": "b", "MessageBody": ""}],
    )
    assert [s["Id"] for s in sent["Successful"]] == ["a"]
    assert sent["Failed"][0]["Code"] == "MissingParameter"
    with pytest.raises(ClientError) as gone:
        await sqs.receive_message(QueueUrl=queue + "-nope")
    assert code_of(gone) == "AWS.SimpleQueueService.NonExistentQueue"
    with pytest.raises(ClientError) as eleven:
        await sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=11)
    assert code_of(eleven) == "InvalidParameterValue"


@virtual
async def test_misspelt_or_mistyped_arguments_are_refused() -> None:
    world = make_world()
    queue = world.create_queue("requests")
    sqs = world.client("sqs", "d1")
    sfn = world.client("stepfunctions", "d1")
    with pytest.raises(TypeError):
        await sqs.receive_message(QueueUrl=queue, MaxMessages=1)
    with pytest.raises(TypeError):
        await sfn.start_execution(stateMachineArn="x", Name="r")
    with pytest.raises(TypeError):
        await sqs.delete_message(QueueUrl=queue)
    with pytest.raises(ParamValidationError):
        await sqs.receive_message(QueueUrl=queue, WaitTimeSeconds="20")
    with pytest.raises(ParamValidationError):
        await sqs.delete_message_batch(QueueUrl=queue, Entries=[{"Id": "0", "Handle": "h"}])
    with pytest.raises(ParamValidationError):
        await sqs.send_message(
            QueueUrl=queue, MessageBody="{}", MessageAttributes={"a": {"StringValue": "b"}}
        )
    assert world.history.records == []  # nothing was sent


# -- SSM and DynamoDB -------------------------------------------------------------------------


@virtual
async def test_parameters() -> None:
    world = make_world()
    ssm = world.client("ssm", "d1")
    with pytest.raises(ClientError) as missing:
        await ssm.get_parameter(Name="/limits/work")
    assert code_of(missing) == "ParameterNotFound"
    world.put_parameter("/limits/work", "5")
    world.put_parameter("/limits/work", "7")
    got = (await ssm.get_parameter(Name="/limits/work"))["Parameter"]
    assert (got["Value"], got["Version"], got["Type"]) == ("7", 2, "String")
    assert [p.value for p in world.history.parameter_puts] == ["5", "7"]
    assert [value for _, value in world.history.limit_timeline("/limits/work", 3)] == [3, 5, 7]


@virtual
async def test_lease_conditional_writes_with_the_real_lease() -> None:
    world = make_world()
    world.create_table("leases")
    config = LeaseConfig(table="leases", pool="work", ttl=15.0, margin=3.0)
    clocks = {"monotonic": anyio.current_time, "wall": anyio.current_time}
    one = Lease(world.client("dynamodb", "d1"), config, owner="d1", **clocks)
    two = Lease(world.client("dynamodb", "d2"), config, owner="d2", **clocks)
    assert await one.try_acquire()
    assert one.epoch == 1
    assert not await two.try_acquire()
    await anyio.sleep(5)
    assert await one.renew()
    await anyio.sleep(16)  # one is paused: its lease expires
    assert await two.try_acquire()
    assert two.epoch == 2
    assert not await one.renew()
    await one.release()  # not ours any more: refused quietly
    await two.release()
    assert await one.try_acquire()
    assert one.epoch == 3
    moves = [(w.node, w.epoch, w.what) for w in world.history.lease_writes]
    assert moves == [
        ("d1", 1, "taken"),
        ("d1", 1, "renewed"),
        ("d2", 2, "taken"),
        ("d2", 2, "released"),
        ("d1", 3, "taken"),
    ]
    described = await world.client("dynamodb", "d1").describe_table(TableName="leases")
    assert described["Table"]["KeySchema"] == [{"AttributeName": "pool", "KeyType": "HASH"}]


@virtual
async def test_dynamodb_refuses_bad_expressions() -> None:
    world = make_world()
    world.create_table("leases")
    db = world.client("dynamodb", "d1")
    key = {"pool": {"S": "work"}}
    cases: list[dict[str, Any]] = [
        {"UpdateExpression": "SET owner = :me", "ExpressionAttributeValues": {":me": {"S": "a"}}},
        {
            "UpdateExpression": "SET #o = :me",
            "ExpressionAttributeNames": {"#o": "owner", "#unused": "x"},
            "ExpressionAttributeValues": {":me": {"S": "a"}},
        },
        {"UpdateExpression": "SET a = :missing"},
        {"UpdateExpression": "SET #p = :v", "ExpressionAttributeNames": {"#p": "pool"},
         "ExpressionAttributeValues": {":v": {"S": "b"}}},
    ]  # fmt: skip
    for case in cases:
        with pytest.raises(ClientError) as refused:
            await db.update_item(TableName="leases", Key=key, **case)
        assert code_of(refused) == "ValidationException"
    with pytest.raises(ClientError) as absent:
        await db.update_item(TableName="nope", Key=key, UpdateExpression="SET a = :v",
                             ExpressionAttributeValues={":v": {"N": "1"}})  # fmt: skip
    assert code_of(absent) == "ResourceNotFoundException"
    result = await db.update_item(
        TableName="leases",
        Key=key,
        UpdateExpression="SET n = if_not_exists(n, :zero) + :one, s = :s",
        ConditionExpression="attribute_not_exists(n) OR (n < :ten AND NOT s = :s)",
        ExpressionAttributeValues={
            ":zero": {"N": "0"},
            ":one": {"N": "1"},
            ":ten": {"N": "10"},
            ":s": {"S": "x"},
        },
        ReturnValues="ALL_NEW",
    )
    assert result["Attributes"] == {"pool": {"S": "work"}, "n": {"N": "1"}, "s": {"S": "x"}}


# -- the call path: latency, cancellation, lost answers, crashes ------------------------------


@virtual
async def test_cancelled_in_the_request_leg_is_never_applied() -> None:
    world = make_world(faults=only("StartExecution", CallFault(request_delay=1.0)))
    arn = world.create_state_machine("work")
    sfn = world.client("stepfunctions", "d1")
    with anyio.move_on_after(0.5):
        await sfn.start_execution(stateMachineArn=arn, name="r", input="{}")
    await anyio.sleep(5)
    assert world.history.executions == {}
    assert any("never applied" in text for text in lines(world.history, "call"))


@virtual
async def test_cancelled_in_the_response_leg_is_applied() -> None:
    world = make_world(faults=only("StartExecution", CallFault(response_delay=1.0)))
    arn = world.create_state_machine("work")
    sfn = world.client("stepfunctions", "d1")
    with anyio.move_on_after(0.5) as scope:
        await sfn.start_execution(stateMachineArn=arn, name="r", input="{}")
    assert scope.cancelled_caught
    assert len(world.history.executions) == 1
    [lost] = world.history.lost_answers
    assert (lost.node, lost.operation, lost.why) == ("d1", "StartExecution", "caller gave up")


@virtual
async def test_a_dropped_answer_times_out_after_the_read_timeout() -> None:
    world = make_world(faults=only("StartExecution", CallFault(drop_answer=True)))
    arn = world.create_state_machine("work")
    sfn = world.client("stepfunctions", "d1", read_timeout=5.0)
    with pytest.raises(ReadTimeoutError):
        await sfn.start_execution(stateMachineArn=arn, name="r", input="{}")
    assert anyio.current_time() == pytest.approx(5.0)
    assert len(world.history.executions) == 1
    assert classify(ReadTimeoutError(endpoint_url="x")) is ErrorKind.TRANSIENT
    trace = world.history.trace(around=0.0, window=1.0).splitlines()
    assert trace[0] == "    0.000 d1       StartExecution name=r sent"
    assert trace[1].startswith("    0.010 d1       execution r STARTED (runs until ")
    assert trace[2] == "    0.010 d1       StartExecution name=r APPLIED answer LOST"
    assert world.history.trace(around=100.0, window=1.0) == ""


@virtual
async def test_a_dropped_request_times_out_unapplied() -> None:
    world = make_world(faults=only("StartExecution", CallFault(drop_request=True)))
    arn = world.create_state_machine("work")
    sfn = world.client("stepfunctions", "d1", read_timeout=5.0)
    with pytest.raises(ReadTimeoutError):
        await sfn.start_execution(stateMachineArn=arn, name="r", input="{}")
    assert anyio.current_time() == pytest.approx(5.0)
    assert world.history.executions == {}


@virtual
async def test_errors_before_and_after_applying() -> None:
    faults = {
        "r1": CallFault(error="ServiceUnavailable"),
        "r2": CallFault(error_after=True),
        "r3": CallFault(error="ServiceUnavailable", error_after=True),
    }

    def decide(node: str, op: str, params: Mapping[str, Any]) -> CallFault:
        return faults.get(params.get("name", ""), NO_FAULT)

    world = make_world(faults=decide)
    arn = world.create_state_machine("work")
    sfn = world.client("stepfunctions", "d1")
    with pytest.raises(ClientError) as before:
        await sfn.start_execution(stateMachineArn=arn, name="r1", input="{}")
    assert before.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert classify(before.value) is ErrorKind.TRANSIENT
    with pytest.raises(ClientError) as after:
        await sfn.start_execution(stateMachineArn=arn, name="r2", input="{}")
    assert code_of(after) == "InternalFailure"
    assert after.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    assert classify(after.value) is ErrorKind.TRANSIENT
    with pytest.raises(ClientError) as unavailable:
        await sfn.start_execution(stateMachineArn=arn, name="r3", input="{}")
    assert unavailable.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert [e.name for e in world.history.executions.values()] == ["r2", "r3"]
    assert [a.why for a in world.history.lost_answers] == [
        "InternalFailure after applying",
        "ServiceUnavailable after applying",
    ]


@virtual
async def test_sdk_retries_when_asked() -> None:
    calls: list[str] = []

    def first_throttled(node: str, op: str, params: Mapping[str, Any]) -> CallFault:
        calls.append(op)
        return CallFault(error="ThrottlingException") if len(calls) == 1 else NO_FAULT

    world = make_world(faults=first_throttled)
    arn = world.create_state_machine("work")
    sfn = world.client("stepfunctions", "d1", max_attempts=3)
    await sfn.start_execution(stateMachineArn=arn, name="r", input="{}")
    assert calls == ["StartExecution", "StartExecution"]
    assert any("(attempt 2) APPLIED" in text for text in lines(world.history, "call"))


@virtual
async def test_a_request_on_the_wire_arrives_after_its_sender_died() -> None:
    world = make_world(faults=only("StartExecution", CallFault(request_delay=2.0)))
    arn = world.create_state_machine("work")
    sfn = world.client("stepfunctions", "d1")
    async with anyio.create_task_group() as outer:
        outer.start_soon(world.run)
        async with anyio.create_task_group() as node:
            node.start_soon(functools.partial(sfn.start_execution, stateMachineArn=arn, name="r"))
            await anyio.sleep(1)
            world.crash("d1")
            node.cancel_scope.cancel()
        assert world.history.executions == {}
        await anyio.sleep(2)
        outer.cancel_scope.cancel()
    [execution] = world.history.executions.values()
    assert execution.started_by == "d1"
    assert execution.first_start == pytest.approx(2.01)
    assert any("arrived after the sender died" in t for t in lines(world.history, "call"))
    assert [c.node for c in world.history.crashes] == ["d1"]
    # A new process under the same name is not affected by the old crash.
    await sfn.start_execution(stateMachineArn=arn, name="r2", input="{}")
    assert len(world.history.executions) == 2


@pytest.mark.parametrize(
    ("fault", "raised", "gave_up_at"),
    [
        (CallFault(apply_at_deadline=True), ReadTimeoutError, 5.0),
        (CallFault(apply_at_deadline=True, error="ServiceUnavailable"), ClientError, 0.02),
        (CallFault(apply_at_deadline=True, reset=True), ConnectionClosedError, 0.02),
    ],
)
def test_a_start_held_on_the_wire_is_applied_at_the_clients_deadline(
    fault: CallFault, raised: type[Exception], gave_up_at: float
) -> None:
    """Buggify's late starts: the request is applied at send + read timeout (D for the
    dispatcher's start client: the latest a start may take effect), after the client
    timed out - or failed earlier with a 5xx or a reset, an unknown outcome either way."""

    async def scenario() -> None:
        world = make_world(faults=only("StartExecution", fault))
        arn = world.create_state_machine("work")
        sfn = world.client("stepfunctions", "d1", read_timeout=5.0)
        async with anyio.create_task_group() as tg:
            tg.start_soon(world.run)
            with pytest.raises(raised) as failed:
                await sfn.start_execution(stateMachineArn=arn, name="r", input="{}")
            assert outcome_unknown(failed.value)
            assert anyio.current_time() == pytest.approx(gave_up_at, abs=0.01)
            assert world.history.executions == {}
            await anyio.sleep(10.0)
            tg.cancel_scope.cancel()
        [execution] = world.history.executions.values()
        assert execution.first_start == pytest.approx(5.0)
        assert [a.why for a in world.history.lost_answers] == ["answer lost"]
        assert any("applied at the client's deadline" in t for t in lines(world.history, "call"))

    loop.run(scenario)


@virtual
async def test_a_listing_lag_at_its_maximum() -> None:
    """Buggify's lag at the grace: a share of the changes take the whole listing lag."""
    world = make_world(listing_lag=9.999, listing_lag_at_max=1.0)
    arn = world.create_state_machine("work")
    sfn = world.client("stepfunctions", "d1")
    await sfn.start_execution(stateMachineArn=arn, name="r", input='{"seconds": 100}')
    [execution] = world.history.executions.values()
    # A listing's request takes 10 ms to arrive: this one arrives 2 ms before the lag ends.
    await anyio.sleep(execution.first_start + 9.999 - 0.012 - anyio.current_time())
    assert await _running(sfn, arn) == []
    await anyio.sleep(0.01)
    assert await _running(sfn, arn) == ["r"]


@virtual
async def test_a_receive_record_names_its_call() -> None:
    """A receive is linked to its call, so the checker can tell a receive whose answer
    was lost (nobody saw it) from one a dispatcher saw."""
    world = make_world(faults=only("ReceiveMessage", CallFault(drop_answer=True)))
    url = world.create_queue("q")
    world.send_request(url, "{}", {}, request_id="r1")
    sqs = world.client("sqs", "d1", read_timeout=1.0)
    with pytest.raises(ReadTimeoutError):
        await sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=1)
    [receive] = world.history.receives
    assert [lost.call_id for lost in world.history.lost_answers] == [receive.call_id]
    assert receive.messages[0][1] == 1


def test_the_same_seed_gives_the_same_history() -> None:
    def run(seed: int) -> str:
        out: list[str] = []

        @virtual
        async def scenario() -> None:
            world = make_world(seed=seed, latency=(0.001, 0.05), sqs_duplicate_rate=0.3)
            arn = world.create_state_machine("work")
            queue = world.create_queue("requests")
            events = world.create_queue("events")
            world.route_events([arn], events)
            sfn = world.client("stepfunctions", "d1")
            sqs = world.client("sqs", "d1")
            for i in range(10):
                world.send_request(queue, json.dumps({"i": i}), {}, request_id=str(i))
            async with anyio.create_task_group() as tg:
                tg.start_soon(world.run)
                for _ in range(5):
                    got = await sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10)
                    for message in got.get("Messages", []):
                        await sfn.start_execution(
                            stateMachineArn=arn, name=message["MessageId"], input=message["Body"]
                        )
                await anyio.sleep(15)
                tg.cancel_scope.cancel()
            out.append("\n".join(r.line() for r in world.history.records))

        scenario()
        return out[0]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_cancellation_reaches_tasks_in_the_order_they_started() -> None:
    """The simulation orders anyio's task sets (sim/loop.py): a cancelled task group's tasks
    see the cancellation in start order, whatever their memory addresses. Fails loudly, not
    silently, with an anyio whose internals changed."""
    order: list[int] = []

    async def sleeper(index: int) -> None:
        try:
            await anyio.sleep(10)
        finally:
            order.append(index)

    async def main() -> None:
        async with anyio.create_task_group() as group:
            for index in range(50):
                group.start_soon(sleeper, index)
            await anyio.sleep(1)
            group.cancel_scope.cancel()

    loop.run(main)
    assert order == list(range(50))


def test_an_anyio_whose_task_sets_changed_is_refused() -> None:
    class Changed:
        _tasks: list[object] = []  # noqa: RUF012 - a stand-in for a changed anyio internal

    with pytest.raises(RuntimeError, match=r"anyio .* changed Changed\._tasks"):
        loop._replace_set(Changed(), "_tasks")
