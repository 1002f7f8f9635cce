"""Pattern 3, the in-workflow DynamoDB semaphore, as a real state machine in MiniStack.

Every request starts its execution at once (four consumers, batches of ten). The machine
acquires the semaphore with a conditional increment (``holders < limit``); on
``ConditionalCheckFailedException`` it waits 3 s and tries again; then does its work
(Wait ``$.seconds``) and releases with a decrement, retried on any error. MiniStack runs
the ``arn:aws:states:::dynamodb:updateItem`` integration for real, with Catch and Retry.

Two concurrencies matter: executions *holding* the semaphore (doing the work, what the
limit is about) and executions *running* (paying state transitions while they wait).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import anyio

from bench.aws import CallCounter, config, session
from bench.patterns import PatternRun, collect, wait_finished
from bench.workload import Request, submit
from dispatcher.sandbox import provision

NAME = "dynamodb-semaphore"
RETRY_WAIT_SECONDS = 3
STARTERS = 4


def definition(table: str, limit: int) -> dict[str, Any]:
    """acquire (conditional increment) -> on failure wait 3 s, retry -> Work -> release."""
    key = {"pk": {"S": "semaphore"}}
    return {
        "Comment": "DynamoDB semaphore inside the workflow (the pattern compared against)",
        "StartAt": "Acquire",
        "States": {
            "Acquire": {
                "Type": "Task",
                "Resource": "arn:aws:states:::dynamodb:updateItem",
                "Parameters": {
                    "TableName": table,
                    "Key": key,
                    "UpdateExpression": "SET #h = #h + :one",
                    "ConditionExpression": "#h < :limit",
                    "ExpressionAttributeNames": {"#h": "holders"},
                    "ExpressionAttributeValues": {
                        ":one": {"N": "1"},
                        ":limit": {"N": str(limit)},
                    },
                },
                "ResultPath": None,
                "Retry": [
                    {
                        "ErrorEquals": ["DynamoDB.ProvisionedThroughputExceededException"],
                        "IntervalSeconds": 1,
                        "MaxAttempts": 5,
                        "BackoffRate": 2,
                    }
                ],
                "Catch": [
                    {
                        "ErrorEquals": ["DynamoDB.ConditionalCheckFailedException"],
                        "ResultPath": None,
                        "Next": "WaitForSlot",
                    }
                ],
                "Next": "Work",
            },
            "WaitForSlot": {"Type": "Wait", "Seconds": RETRY_WAIT_SECONDS, "Next": "Acquire"},
            "Work": {"Type": "Wait", "SecondsPath": "$.seconds", "Next": "Release"},
            "Release": {
                "Type": "Task",
                "Resource": "arn:aws:states:::dynamodb:updateItem",
                "Parameters": {
                    "TableName": table,
                    "Key": key,
                    "UpdateExpression": "SET #h = #h - :one",
                    "ExpressionAttributeNames": {"#h": "holders"},
                    "ExpressionAttributeValues": {":one": {"N": "1"}},
                },
                "ResultPath": None,
                "Retry": [{"ErrorEquals": ["States.ALL"], "IntervalSeconds": 1, "MaxAttempts": 5}],
                "End": True,
            },
        },
    }


async def _machine(endpoint: str, prefix: str, limit: int) -> tuple[str, str]:
    """Create the table (holders = 0) and the state machine; return (table, machine ARN)."""
    table = f"{prefix}-semaphore"
    async with (
        session().client("dynamodb", endpoint_url=endpoint) as ddb,
        session().client("stepfunctions", endpoint_url=endpoint) as sfn,
    ):
        await ddb.create_table(
            TableName=table,
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        await ddb.put_item(TableName=table, Item={"pk": {"S": "semaphore"}, "holders": {"N": "0"}})
        created = await sfn.create_state_machine(
            name=f"{prefix}-semaphore",
            definition=json.dumps(definition(table, limit)),
            roleArn=f"arn:aws:iam::000000000000:role/{prefix}",
            type="STANDARD",
        )
    return table, created["stateMachineArn"]


async def _holders(endpoint: str, table: str) -> int:
    async with session().client("dynamodb", endpoint_url=endpoint) as ddb:
        item = await ddb.get_item(TableName=table, Key={"pk": {"S": "semaphore"}})
    return int(item["Item"]["holders"]["N"])


async def run(
    endpoint: str, requests: Sequence[Request], limit: int, *, within: float
) -> PatternRun:
    """Start an execution per request at once; wait until every one released and ended."""
    prefix = "cmp-semaphore"
    resources = await provision(endpoint, prefix=prefix, limit=limit)
    table, machine_arn = await _machine(endpoint, prefix, limit)
    counter = CallCounter()
    started: set[str] = set()
    all_started = anyio.Event()

    async def starter() -> None:
        async with (
            session().client("sqs", endpoint_url=endpoint, config=config(2)) as sqs,
            session().client("stepfunctions", endpoint_url=endpoint, config=config(2)) as sfn,
        ):
            counter.attach(sqs)
            counter.attach(sfn)
            while not all_started.is_set():
                got = await sqs.receive_message(
                    QueueUrl=resources.request_queue_url,
                    MaxNumberOfMessages=10,
                    WaitTimeSeconds=1,
                    MessageAttributeNames=["All"],
                )
                messages = got.get("Messages", [])
                for message in messages:
                    key = message["MessageAttributes"]["idempotency-key"]["StringValue"]
                    await sfn.start_execution(
                        stateMachineArn=machine_arn, name=key, input=message["Body"]
                    )
                    started.add(key)
                if messages:
                    await sqs.delete_message_batch(
                        QueueUrl=resources.request_queue_url,
                        Entries=[
                            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                            for i, m in enumerate(messages)
                        ],
                    )
                if len(started) >= len(requests):
                    all_started.set()

    async with anyio.create_task_group() as tg:
        for _ in range(STARTERS):
            tg.start_soon(starter)
        submitted = await submit(resources.request_queue_url, requests, endpoint)
        with anyio.move_on_after(within):
            await all_started.wait()
        all_started.set()
    async with session().client("stepfunctions", endpoint_url=endpoint) as sfn:
        finished = await wait_finished(sfn, machine_arn, within=within)
        _, traces, work, lives = await collect(sfn, machine_arn, with_work_state=True)
    holders_after = await _holders(endpoint, table)
    complete = finished and len(work) == len(requests)
    calls = counter.calls.copy()
    calls["UpdateItem (in workflow)"] = sum(t.task_calls for t in traces.values())
    notes = [
        "real state machine in MiniStack: dynamodb:updateItem service integration with "
        "ConditionExpression, Catch (ConditionalCheckFailed -> Wait 3 s -> retry) and Retry",
        "work = time in the Work state (holding the semaphore); queue wait = until work began",
        "no clean-up on failure (the AWS sample wraps the work in a Parallel with a Catch "
        "that releases); none of these executions fails",
    ]
    if holders_after != 0:
        notes.append(
            f"the semaphore counter ended at {holders_after}, not 0: updates were lost, so "
            "the limit did not hold (a real deployment drifts the same way when a release "
            "never runs)"
        )
    if not complete:
        notes.append(f"not finished within {within:.0f} s: {len(work)} of {len(requests)}")
    return PatternRun(
        name=NAME,
        title="DynamoDB semaphore (in workflow)",
        limit=limit,
        requests=len(requests),
        submitted=submitted,
        work=work,
        executions=lives,
        calls=calls,
        traces=traces,
        complete=complete,
        notes=notes,
        extra={"holders_after": holders_after},
    )
