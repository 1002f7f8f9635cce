"""Start-by deadlines against the emulator: a request whose start-by passes while the pool
is full is dead-lettered as expired within seconds of its deadline and never started -
judged from the executions' own records (ListExecutions) and the dead letter's SQS
timestamp."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import pytest

from devtools.polling import wait_until
from devtools.records import list_executions
from devtools.sandbox.provision import SandboxResources
from dispatcher.core.deadline import format_deadline
from tests.audit import drain
from tests.helpers import session
from tests.runner import running

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient

Factory = Callable[..., Awaitable[SandboxResources]]


async def send(sqs: SQSClient, url: str, body: dict[str, Any], **attributes: str) -> str:
    """Send one request; returns its message id."""
    sent = await sqs.send_message(
        QueueUrl=url,
        MessageBody=json.dumps(body),
        MessageAttributes={
            name: {"DataType": "String", "StringValue": value} for name, value in attributes.items()
        },
    )
    return sent["MessageId"]


async def expired_letter(sqs: SQSClient, url: str, message_id: str, within: float) -> Any:
    """Wait for the dead letter of ``message_id``; returns it."""
    found: list[dict[str, Any]] = []

    async def arrived() -> bool:
        found.extend(await drain(sqs, url))
        return any(
            m["MessageAttributes"]["dispatcher-original-message-id"]["StringValue"] == message_id
            for m in found
        )

    await wait_until(arrived, within=within, interval=0.2)
    [letter] = found
    return letter


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("keyed", "ahead"), [(True, 3), (False, 5)], ids=["keyed-pool", "plain-pool"]
)
async def test_a_request_whose_start_by_passes_while_the_pool_is_full_expires_unstarted(
    sandbox_factory: Factory, keyed: bool, ahead: float
) -> None:
    """Limit 1, one long execution holds the slot; a request with a start-by a few seconds
    ahead arrives behind it.

    Either pool - with a key attribute, or plain (one queue, no key attribute) - receives
    it ahead into its waiting room, and dead-letters it as expired within seconds of its
    deadline though the slot never frees; never started. (A plain pool used to receive
    only for free slots: the request stayed in the queue until the slot freed.)"""
    resources = await sandbox_factory(limit=1)
    overrides: dict[str, Any] = {"limit": 1}
    attributes: dict[str, str] = {}
    if keyed:
        overrides["key_attribute"] = "tenant"
        attributes["tenant"] = "a"
    hold = 40  # the slot stays taken well past the deadline
    async with (
        session().client("sqs", endpoint_url=resources.endpoint) as sqs,
        session().client("stepfunctions", endpoint_url=resources.endpoint) as sfn,
        running(resources, **overrides),
    ):
        await send(sqs, resources.request_queue_url, {"seconds": hold}, **attributes)

        async def occupied() -> bool:
            runs = await list_executions(sfn, resources.state_machine_arn)
            return any(e.status == "RUNNING" for e in runs)

        await wait_until(occupied, within=20)
        deadline = time.time() + ahead
        late = await send(
            sqs,
            resources.request_queue_url,
            {"seconds": 0, "late": True},
            **{**attributes, "start-by": format_deadline(deadline)},
        )
        letter = await expired_letter(sqs, resources.dead_letter_queue_url, late, within=ahead + 10)
        executions = await list_executions(sfn, resources.state_machine_arn)
        for execution in executions:
            if execution.status == "RUNNING":
                await sfn.stop_execution(executionArn=execution.arn)
    assert letter["MessageAttributes"]["dispatcher-reason"]["StringValue"] == "expired"
    dead_lettered_at = int(letter["Attributes"]["SentTimestamp"]) / 1000
    assert dead_lettered_at >= deadline - 0.01, "dead-lettered before its deadline"
    assert dead_lettered_at - deadline < 3, f"{dead_lettered_at - deadline:.1f} s late"
    [first] = executions
    assert first.status == "RUNNING", "the slot was taken all along"
    assert late not in first.name, "the expired request started"
    print(  # the measurement, for the report (pytest -s)
        f"keyed={keyed}: dead-lettered {dead_lettered_at - deadline:.2f} s after its start-by"
    )


def deadline_parent(request_queue_url: str) -> dict[str, Any]:
    """A parent that asks for one child through a task token, with the start-by its input
    gives, and catches the answer's error into its output."""
    return {
        "StartAt": "Child",
        "States": {
            "Child": {
                "Type": "Task",
                "Resource": "arn:aws:states:::sqs:sendMessage.waitForTaskToken",
                "Parameters": {
                    "QueueUrl": request_queue_url,
                    "MessageBody.$": "$.child",
                    "MessageAttributes": {
                        "task-token": {"DataType": "String", "StringValue.$": "$$.Task.Token"},
                        "tenant": {"DataType": "String", "StringValue": "b"},
                        "start-by": {"DataType": "String", "StringValue.$": "$.startBy"},
                    },
                },
                "TimeoutSeconds": 60,
                "Catch": [{"ErrorEquals": ["States.ALL"], "ResultPath": "$.error", "Next": "Done"}],
                "End": True,
            },
            "Done": {"Type": "Pass", "End": True},
        },
    }


@pytest.mark.timeout(120)
async def test_a_parent_waiting_on_an_expired_request_gets_dispatcher_expired(
    sandbox_factory: Factory,
) -> None:
    """Limit 1 held by a long execution; a parent asks for a child with a start-by 3 s
    ahead: the parent's task fails with Dispatcher.Expired, the cause naming the deadline,
    and no child starts."""
    resources = await sandbox_factory(limit=1)
    async with (
        session().client("sqs", endpoint_url=resources.endpoint) as sqs,
        session().client("stepfunctions", endpoint_url=resources.endpoint) as sfn,
        running(resources, limit=1, key_attribute="tenant"),
    ):
        machine = await sfn.create_state_machine(
            name=f"{resources.prefix}-deadline-parent",
            definition=json.dumps(deadline_parent(resources.request_queue_url)),
            roleArn="arn:aws:iam::000000000000:role/deadline-parent",
            type="STANDARD",
        )
        await send(sqs, resources.request_queue_url, {"seconds": 25}, tenant="a")

        async def occupied() -> bool:
            runs = await list_executions(sfn, resources.state_machine_arn)
            return any(e.status == "RUNNING" for e in runs)

        await wait_until(occupied, within=20)
        deadline = format_deadline(time.time() + 3)
        parent = await sfn.start_execution(
            stateMachineArn=machine["stateMachineArn"],
            input=json.dumps({"child": json.dumps({"seconds": 0}), "startBy": deadline}),
        )

        async def parent_done() -> bool:
            described = await sfn.describe_execution(executionArn=parent["executionArn"])
            return str(described["status"]) != "RUNNING"

        await wait_until(parent_done, within=20, interval=0.2)
        described = await sfn.describe_execution(executionArn=parent["executionArn"])
        executions = await list_executions(sfn, resources.state_machine_arn)
        for execution in executions:
            if execution.status == "RUNNING":
                await sfn.stop_execution(executionArn=execution.arn)
        await sfn.delete_state_machine(stateMachineArn=machine["stateMachineArn"])
    error = json.loads(described["output"])["error"]
    assert error["Error"] == "Dispatcher.Expired"
    assert deadline in error["Cause"]
    assert len(executions) == 1, "no child started"
