"""Pattern 3, the in-workflow DynamoDB semaphore, as real state machines in MiniStack.

Every request starts its execution at once (four starters, batches of ten). The machine is
the AWS sample's (see `definition`), run for real by MiniStack's ``dynamodb:updateItem``
and ``getItem`` integrations with Retry, Catch, Parallel and Choice; its clean-up machine
is deployed with the sample's EventBridge rule (it runs only for failed, timed-out or
aborted executions). A second pattern, ``dynamodb-semaphore-simplified``, runs the loop
this bench first used (acquire, Catch -> Wait 3 s -> acquire), labelled as such.

Two concurrencies matter: executions *holding* the semaphore (doing the work, what the
limit is about) and executions *running* (paying state transitions while they wait).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import partial
from typing import Any

import anyio

from bench.aws import CallCounter, config, session
from bench.history import Trace
from bench.patterns import PatternRun, collect, wait_finished
from bench.workload import Request, submit
from devtools.sandbox import provision

NAME = "dynamodb-semaphore"
SIMPLIFIED = "dynamodb-semaphore-simplified"
RETRY_WAIT_SECONDS = 3
STARTERS = 4


LOCK_NAME = "semaphore"
UPDATE_ITEM = "arn:aws:states:::dynamodb:updateItem"
GET_ITEM = "arn:aws:states:::dynamodb:getItem"


def definition(table: str, limit: int, weight: int = 1) -> dict[str, Any]:
    """The AWS sample's semaphore (aws-samples/aws-stepfunctions-examples,
    sam/app-control-concurrency-with-dynamodb/statemachines/dynamodb-semaphore.asl.json).

    State for state as the sample: the ``Get Lock`` Parallel (conditional increment that
    also writes a lock-owner attribute named after the execution; ``Retry`` on
    ``States.ALL``, 6 attempts, backoff 2, which catches ``ConditionalCheckFailed`` before
    the ``Catch`` does; then ``GetItem`` + ``Choice`` + ``Wait`` 3 s), the ``Do Work``
    Parallel (four Pass states, then the work: here a Wait of ``$.seconds`` named
    ``Work`` in place of the sample's Lambda task), and the conditional release.

    With ``weight`` above 1 (the sample has none) the acquire adds ``weight`` units under
    ``currentlockcount <= limit - weight`` (the sample's ``<> limit`` would let an add of
    2 step over the limit) and the release takes them back; weight 1 is the sample's text.
    """
    key = {"LockName": {"S": LOCK_NAME}}
    owner = {"#lockownerid.$": "$$.Execution.Id"}
    if weight == 1:
        room = "currentlockcount <> :limit"
        bound = {":limit": {"N": str(limit)}}
    else:
        room = "currentlockcount <= :ceiling"
        bound = {":ceiling": {"N": str(limit - weight)}}
    acquire = {
        "Type": "Task",
        "Resource": "arn:aws:states:::dynamodb:updateItem",
        "Parameters": {
            "TableName": table,
            "Key": key,
            "ExpressionAttributeNames": {"#currentlockcount": "currentlockcount", **owner},
            "ExpressionAttributeValues": {
                ":increase": {"N": str(weight)},
                **bound,
                ":lockacquiredtime": {"S.$": "$$.State.EnteredTime"},
            },
            "UpdateExpression": "SET #currentlockcount = #currentlockcount + :increase, "
            "#lockownerid = :lockacquiredtime",
            "ConditionExpression": f"{room} and attribute_not_exists(#lockownerid)",
            "ReturnValues": "UPDATED_NEW",
        },
        "Retry": [
            {"ErrorEquals": ["DynamoDB.AmazonDynamoDBException"], "MaxAttempts": 0},
            {"ErrorEquals": ["States.ALL"], "MaxAttempts": 6, "BackoffRate": 2},
        ],
        "Catch": [
            {
                "ErrorEquals": ["DynamoDB.AmazonDynamoDBException"],
                "Next": "Initialize Lock Item",
                "ResultPath": "$.lockinfo.acquisitionerror",
            },
            {
                "ErrorEquals": ["DynamoDB.ConditionalCheckFailedException"],
                "Next": "Get Current Lock Record",
                "ResultPath": "$.lockinfo.acquisitionerror",
            },
        ],
        "End": True,
    }
    get_lock_states = {
        "Acquire Lock": acquire,
        "Initialize Lock Item": {
            "Type": "Task",
            "Resource": "arn:aws:states:::dynamodb:putItem",
            "Parameters": {
                "TableName": table,
                "Item": {**key, "currentlockcount": {"N": "0"}},
                "ConditionExpression": "LockName <> :lockname",
                "ExpressionAttributeValues": {":lockname": {"S": LOCK_NAME}},
            },
            "Catch": [{"ErrorEquals": ["States.ALL"], "Next": "Acquire Lock", "ResultPath": None}],
            "Next": "Acquire Lock",
            "ResultPath": None,
        },
        "Get Current Lock Record": {
            "Type": "Task",
            "Resource": "arn:aws:states:::dynamodb:getItem",
            "Parameters": {
                "TableName": table,
                "ExpressionAttributeNames": owner,
                "Key": key,
                "ProjectionExpression": "#lockownerid",
            },
            "ResultSelector": {"Item.$": "$.Item", "ItemString.$": "States.JsonToString($.Item)"},
            "ResultPath": "$.lockinfo.currentlockitem",
            "Next": "Check If Lock Already Acquired",
        },
        "Check If Lock Already Acquired": {
            "Type": "Choice",
            "Choices": [
                {
                    "And": [
                        {"Variable": "$.lockinfo.currentlockitem.ItemString", "IsPresent": True},
                        {
                            "Variable": "$.lockinfo.currentlockitem.ItemString",
                            "StringMatches": "*Z*",
                        },
                    ],
                    "Next": "Continue Because Lock Was Already Acquired",
                }
            ],
            "Default": "Wait to Get Lock",
        },
        "Continue Because Lock Was Already Acquired": {"Type": "Pass", "End": True},
        "Wait to Get Lock": {
            "Type": "Wait",
            "Seconds": RETRY_WAIT_SECONDS,
            "Next": "Acquire Lock",
        },
    }
    passes = ["Here", "You", "Do", "Prepare"]  # the sample's Pass states ("Work" renamed)
    work_states: dict[str, Any] = {
        name: {"Type": "Pass", "Next": after}
        for name, after in zip(passes, [*passes[1:], "Work"], strict=True)
    }
    work_states["Work"] = {"Type": "Wait", "SecondsPath": "$.seconds", "End": True}
    return {
        "Comment": "The AWS sample's DynamoDB semaphore (the pattern compared against)",
        "StartAt": "Get Lock",
        "States": {
            "Get Lock": {
                "Type": "Parallel",
                "Branches": [{"StartAt": "Acquire Lock", "States": get_lock_states}],
                "ResultPath": None,
                "Next": "Do Work",
            },
            "Do Work": {
                "Type": "Parallel",
                "Branches": [{"StartAt": "Here", "States": work_states}],
                "Next": "Release Lock",
            },
            "Release Lock": {
                "Type": "Task",
                "Resource": "arn:aws:states:::dynamodb:updateItem",
                "Parameters": {
                    "TableName": table,
                    "Key": key,
                    "ExpressionAttributeNames": {"#currentlockcount": "currentlockcount", **owner},
                    "ExpressionAttributeValues": {":decrease": {"N": str(weight)}},
                    "UpdateExpression": "SET #currentlockcount = #currentlockcount - :decrease "
                    "REMOVE #lockownerid",
                    "ConditionExpression": "attribute_exists(#lockownerid)",
                    "ReturnValues": "UPDATED_NEW",
                },
                "Retry": [
                    {"ErrorEquals": ["DynamoDB.ConditionalCheckFailedException"], "MaxAttempts": 0},
                    {"ErrorEquals": ["States.ALL"], "MaxAttempts": 5, "BackoffRate": 1.5},
                ],
                "Catch": [
                    {
                        "ErrorEquals": ["DynamoDB.ConditionalCheckFailedException"],
                        "Next": "Success State",
                        "ResultPath": None,
                    }
                ],
                "ResultPath": None,
                "Next": "Success State",
            },
            "Success State": {"Type": "Succeed"},
        },
    }


def cleanup_definition(table: str, weight: int = 1) -> dict[str, Any]:
    """The sample's clean-up machine: run on FAILED/TIMED_OUT/ABORTED, releases a held lock
    (``weight`` units: see `definition`)."""
    key = {"LockName": {"S": LOCK_NAME}}
    retry = [
        {"ErrorEquals": ["States.ALL"], "IntervalSeconds": 5, "MaxAttempts": 20, "BackoffRate": 1.4}
    ]
    return {
        "Comment": "Clean up orphaned locks (the AWS sample's second machine)",
        "StartAt": "Get Current Lock Item",
        "States": {
            "Get Current Lock Item": {
                "Type": "Task",
                "Resource": "arn:aws:states:::dynamodb:getItem",
                "Parameters": {
                    "TableName": table,
                    "ExpressionAttributeNames": {"#lockowerid.$": "$.detail.executionArn"},
                    "Key": key,
                    "ProjectionExpression": "#lockowerid",
                },
                "Retry": retry,
                "ResultSelector": {
                    "Item.$": "$.Item",
                    "ItemString.$": "States.JsonToString($.Item)",
                },
                "ResultPath": "$.lockinfo.currentlockitem",
                "Next": "Check If Lock Is Held",
            },
            "Check If Lock Is Held": {
                "Type": "Choice",
                "Choices": [
                    {
                        "And": [
                            {
                                "Variable": "$.lockinfo.currentlockitem.ItemString",
                                "IsPresent": True,
                            },
                            {
                                "Variable": "$.lockinfo.currentlockitem.ItemString",
                                "StringMatches": "*Z*",
                            },
                        ],
                        "Next": "Clean Up Lock",
                    }
                ],
                "Default": "Success State",
            },
            "Clean Up Lock": {
                "Type": "Task",
                "Resource": "arn:aws:states:::dynamodb:updateItem",
                "Parameters": {
                    "TableName": table,
                    "Key": key,
                    "ExpressionAttributeNames": {
                        "#currentlockcount": "currentlockcount",
                        "#lockownerid.$": "$.detail.executionArn",
                    },
                    "ExpressionAttributeValues": {":decrease": {"N": str(weight)}},
                    "UpdateExpression": "SET #currentlockcount = #currentlockcount - :decrease "
                    "REMOVE #lockownerid",
                    "ConditionExpression": "attribute_exists(#lockownerid)",
                    "ReturnValues": "UPDATED_NEW",
                },
                "Retry": [
                    {"ErrorEquals": ["DynamoDB.ConditionalCheckFailedException"], "MaxAttempts": 0},
                    *retry,
                ],
                "Catch": [
                    {
                        "ErrorEquals": ["DynamoDB.ConditionalCheckFailedException"],
                        "Next": "Success State",
                        "ResultPath": None,
                    }
                ],
                "ResultPath": None,
                "Next": "Success State",
            },
            "Success State": {"Type": "Succeed"},
        },
    }


def simplified_definition(table: str, limit: int) -> dict[str, Any]:
    """The semaphore as this bench first modelled it (simplified, labelled as such).

    acquire (conditional increment) -> on failure wait 3 s, retry -> Work -> release; no
    retry on ``States.ALL``, no ``GetItem``/``Choice``, no lock owner, no Parallel states.
    """
    key = {"LockName": {"S": LOCK_NAME}}
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
                    "ExpressionAttributeNames": {"#h": "currentlockcount"},
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
                    "ExpressionAttributeNames": {"#h": "currentlockcount"},
                    "ExpressionAttributeValues": {":one": {"N": "1"}},
                },
                "ResultPath": None,
                "Retry": [{"ErrorEquals": ["States.ALL"], "IntervalSeconds": 1, "MaxAttempts": 5}],
                "End": True,
            },
        },
    }


def branch_transitions(trace: Trace) -> int:
    """The transitions inside the sample's Parallel branches, which MiniStack does not record.

    From the branch's DynamoDB calls: with ``u`` acquire attempts (``UpdateItem``, retries
    included) and ``g`` failed rounds (one ``GetItem`` each), the Get Lock branch enters
    Acquire Lock ``g + 1`` times, retries ``u - g - 1`` times, and enters GetItem, Choice
    and Wait ``g`` times each: ``u + 3g``; the Do Work branch enters its 5 states once.
    Zero when the history records the branches itself (no unrecorded calls).
    """
    if not trace.unrecorded_calls:
        return 0
    return trace.unrecorded_calls[UPDATE_ITEM] + 3 * trace.unrecorded_calls[GET_ITEM] + 5


def _branch_retries(trace: Trace) -> int:
    """Acquire attempts that were retries (``u - g - 1``, see `branch_transitions`)."""
    if not trace.unrecorded_calls:
        return 0
    return trace.unrecorded_calls[UPDATE_ITEM] - trace.unrecorded_calls[GET_ITEM] - 1


async def _machines(
    endpoint: str, prefix: str, limit: int, *, simplified: bool
) -> tuple[str, str, str | None]:
    """Create the table (count 0) and the machines; return (table, machine, clean-up machine)."""
    table = f"{prefix}-locktable"
    role = f"arn:aws:iam::000000000000:role/{prefix}"
    async with (
        session().client("dynamodb", endpoint_url=endpoint) as ddb,
        session().client("stepfunctions", endpoint_url=endpoint) as sfn,
        session().client("events", endpoint_url=endpoint) as events,
    ):
        await ddb.create_table(
            TableName=table,
            KeySchema=[{"AttributeName": "LockName", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "LockName", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        # The sample creates the item on first use; made here so that path is not timed.
        await ddb.put_item(
            TableName=table,
            Item={"LockName": {"S": LOCK_NAME}, "currentlockcount": {"N": "0"}},
        )
        document = simplified_definition(table, limit) if simplified else definition(table, limit)
        machine = (
            await sfn.create_state_machine(
                name=f"{prefix}-semaphore",
                definition=json.dumps(document),
                roleArn=role,
                type="STANDARD",
            )
        )["stateMachineArn"]
        if simplified:
            return table, machine, None
        cleanup = (
            await sfn.create_state_machine(
                name=f"{prefix}-cleanup",
                definition=json.dumps(cleanup_definition(table)),
                roleArn=role,
                type="STANDARD",
            )
        )["stateMachineArn"]
        pattern = {
            "source": ["aws.states"],
            "detail": {"stateMachineArn": [machine], "status": ["FAILED", "TIMED_OUT", "ABORTED"]},
        }
        await events.put_rule(
            Name=f"{prefix}-cleanup", EventPattern=json.dumps(pattern), State="ENABLED"
        )
        await events.put_targets(
            Rule=f"{prefix}-cleanup", Targets=[{"Id": "cleanup", "Arn": cleanup, "RoleArn": role}]
        )
    return table, machine, cleanup


async def _holders(endpoint: str, table: str) -> int:
    async with session().client("dynamodb", endpoint_url=endpoint) as ddb:
        item = await ddb.get_item(TableName=table, Key={"LockName": {"S": LOCK_NAME}})
    return int(item["Item"]["currentlockcount"]["N"])


async def run(
    endpoint: str, requests: Sequence[Request], limit: int, *, within: float
) -> PatternRun:
    """The AWS sample's semaphore: see `definition`."""
    return await _run(endpoint, requests, limit, within=within, simplified=False)


async def run_simplified(
    endpoint: str, requests: Sequence[Request], limit: int, *, within: float
) -> PatternRun:
    """The simplified loop: see `simplified_definition`."""
    return await _run(endpoint, requests, limit, within=within, simplified=True)


async def start_each(
    endpoint: str,
    queue_url: str,
    machine_arn: str,
    count: int,
    counter: CallCounter,
    *,
    receivers: int,
    done: anyio.Event | None = None,
) -> None:
    """Start an execution per message as it arrives (``receivers`` receiving at once), named
    by its idempotency key: nothing waits outside the workflow. Returns once ``count`` have
    started, or ``done`` is set (then set by this too)."""
    finished = done if done is not None else anyio.Event()
    started: set[str] = set()

    async def receiver() -> None:
        async with (
            session().client("sqs", endpoint_url=endpoint, config=config(2)) as sqs,
            session().client("stepfunctions", endpoint_url=endpoint, config=config(2)) as sfn,
        ):
            counter.attach(sqs)
            counter.attach(sfn)
            while not finished.is_set():
                got = await sqs.receive_message(
                    QueueUrl=queue_url,
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
                        QueueUrl=queue_url,
                        Entries=[
                            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                            for i, m in enumerate(messages)
                        ],
                    )
                if len(started) >= count:
                    finished.set()

    async with anyio.create_task_group() as tg:
        for _ in range(receivers):
            tg.start_soon(receiver)


async def _run(
    endpoint: str, requests: Sequence[Request], limit: int, *, within: float, simplified: bool
) -> PatternRun:
    """Start an execution per request at once; wait until every one released and ended."""
    prefix = "cmp-semaphore"
    resources = await provision(endpoint, prefix=prefix, limit=limit)
    table, machine_arn, cleanup_arn = await _machines(
        endpoint, prefix, limit, simplified=simplified
    )
    counter = CallCounter()
    all_started = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(
            partial(
                start_each,
                endpoint,
                resources.request_queue_url,
                machine_arn,
                len(requests),
                counter,
                receivers=STARTERS,
                done=all_started,
            )
        )
        submitted = await submit(resources.request_queue_url, requests, endpoint)
        with anyio.move_on_after(within):
            await all_started.wait()
        all_started.set()
    async with session().client("stepfunctions", endpoint_url=endpoint) as sfn:
        finished = await wait_finished(sfn, machine_arn, within=within)
        _, traces, work, lives = await collect(
            sfn, machine_arn, work_state="Work" if simplified else "Do Work"
        )
        cleanups = (
            len((await sfn.list_executions(stateMachineArn=cleanup_arn))["executions"])
            if cleanup_arn
            else 0
        )
    holders_after = await _holders(endpoint, table)
    complete = finished and len(work) == len(requests)
    calls = counter.calls.copy()
    calls["DynamoDB (in workflow)"] = sum(t.task_calls for t in traces.values())
    hidden = sum(branch_transitions(t) for t in traces.values())
    if simplified:
        notes = [
            "SIMPLIFIED, not the AWS sample: dynamodb:updateItem with a condition, Catch "
            "(ConditionalCheckFailed) -> Wait 3 s -> retry; no Retry on States.ALL, no "
            "GetItem/Choice, no lock owner, no Parallel states, no clean-up machine",
        ]
    else:
        notes = [
            "the AWS sample's machine (aws-samples/aws-stepfunctions-examples, "
            "app-control-concurrency-with-dynamodb), run for real in MiniStack: acquire's "
            "Retry on States.ALL (6 attempts, backoff 2) retries ConditionalCheckFailed "
            "before its Catch -> GetItem -> Choice -> Wait 3 s; lock-owner attribute; "
            "Parallel wrappers; the Lambda work task replaced by a Wait state",
            f"clean-up machine and its EventBridge rule deployed as in the sample; it ran "
            f"{cleanups} times (it runs only for failed, timed-out or aborted executions)",
        ]
    notes.append(
        "work = time in the Work state (holding the semaphore); queue wait = until work began"
    )
    if holders_after != 0:
        notes.append(
            f"the semaphore counter ended at {holders_after}, not 0: updates were lost, so "
            "the limit did not hold (a real deployment drifts the same way when a release "
            "never runs)"
        )
    if not complete:
        notes.append(f"not finished within {within:.0f} s: {len(work)} of {len(requests)}")
    return PatternRun(
        name=SIMPLIFIED if simplified else NAME,
        title="DynamoDB semaphore (simplified)"
        if simplified
        else "DynamoDB semaphore (AWS sample)",
        limit=limit,
        requests=len(requests),
        submitted=submitted,
        work=work,
        executions=lives,
        calls=calls,
        traces=traces,
        complete=complete,
        notes=notes,
        extra={
            "holders_after": holders_after,
            "cleanup_executions": cleanups,
            "task_retries": sum(t.retries + _branch_retries(t) for t in traces.values()),
            "branch_transitions_worked_out": hidden,
        },
        unrecorded_transitions=hidden,
    )
