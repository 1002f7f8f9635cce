"""Test helpers: AWS clients on the emulator, waiting with a deadline, draining queues."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import aioboto3
import anyio
from botocore.exceptions import ClientError

from devtools.polling import wait_until
from devtools.sandbox import SandboxResources

if TYPE_CHECKING:
    from types_aiobotocore_events import EventBridgeClient
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_sqs.type_defs import MessageTypeDef
    from types_aiobotocore_ssm import SSMClient
    from types_aiobotocore_stepfunctions import SFNClient

REGION = "us-east-1"


@functools.cache
def session() -> Any:
    """The aioboto3 session with the emulator's test credentials (untyped: aioboto3 is).

    Shared: a new session re-reads every service model, ~0.1 s per client.
    """
    return aioboto3.Session(
        aws_access_key_id="test",
        aws_secret_access_key="test",  # noqa: S106 - the emulator's fixed test credentials
        region_name=REGION,
    )


@asynccontextmanager
async def sqs_client(endpoint: str) -> AsyncIterator[SQSClient]:
    """An SQS client on ``endpoint``."""
    async with session().client("sqs", endpoint_url=endpoint) as client:
        yield client


@asynccontextmanager
async def sfn_client(endpoint: str) -> AsyncIterator[SFNClient]:
    """A Step Functions client on ``endpoint``."""
    async with session().client("stepfunctions", endpoint_url=endpoint) as client:
        yield client


@asynccontextmanager
async def events_client(endpoint: str) -> AsyncIterator[EventBridgeClient]:
    """An EventBridge client on ``endpoint``."""
    async with session().client("events", endpoint_url=endpoint) as client:
        yield client


@asynccontextmanager
async def ssm_client(endpoint: str) -> AsyncIterator[SSMClient]:
    """An SSM client on ``endpoint``."""
    async with session().client("ssm", endpoint_url=endpoint) as client:
        yield client


async def receive_all(
    endpoint: str,
    queue_url: str,
    *,
    count: int | None = None,
    timeout: float = 10.0,  # noqa: ASYNC109 - the deadline is part of the failure message
    delete: bool = True,
) -> list[MessageTypeDef]:
    """Receive messages (with all attributes) from ``queue_url``.

    With ``count``: until exactly that many arrived (AssertionError after ``timeout``,
    showing what did arrive). Without: until the queue returns nothing.
    """
    got: list[MessageTypeDef] = []
    async with sqs_client(endpoint) as sqs:
        with anyio.move_on_after(timeout) as scope:
            while count is None or len(got) < count:
                response = await sqs.receive_message(
                    QueueUrl=queue_url,
                    MaxNumberOfMessages=10,
                    WaitTimeSeconds=0 if count is None else 1,
                    MessageAttributeNames=["All"],
                    MessageSystemAttributeNames=["All"],
                )
                messages = response.get("Messages", [])
                if not messages and count is None:
                    break
                got += messages
                if delete and messages:
                    await sqs.delete_message_batch(
                        QueueUrl=queue_url,
                        Entries=[
                            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                            for i, m in enumerate(messages)
                        ],
                    )
        if scope.cancelled_caught:
            raise AssertionError(
                f"expected {count} messages on {queue_url} within {timeout:g} s, got "
                f"{len(got)}: {[m.get('Body') for m in got]}"
            )
    return got


async def queue_depth(endpoint: str, queue_url: str) -> int:
    """Messages on the queue: visible, in flight and delayed."""
    async with sqs_client(endpoint) as sqs:
        return await depth(sqs, queue_url)


async def depth(sqs: SQSClient, queue_url: str) -> int:
    """Messages on the queue (visible, in flight and delayed), with an open client."""
    attributes = (
        await sqs.get_queue_attributes(
            QueueUrl=queue_url,
            AttributeNames=[
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesNotVisible",
                "ApproximateNumberOfMessagesDelayed",
            ],
        )
    )["Attributes"]
    return sum(int(value) for value in attributes.values())


async def drained(sqs: SQSClient, queue_url: str, *, within: float = 15) -> None:
    """Wait until no message is left on the queue. A parent's answer comes before its request
    is deleted (the delete is the last step), so a finished parent does not yet mean an
    empty queue."""

    async def empty() -> bool:
        return await depth(sqs, queue_url) == 0

    await wait_until(empty, within=within, message=f"{queue_url} empty")


async def delete_sandbox(resources: SandboxResources) -> None:
    """Remove what `provision` made (rule first, so no event lands in a dying queue)."""
    endpoint = resources.endpoint
    async with (
        events_client(endpoint) as events,
        sfn_client(endpoint) as sfn,
        sqs_client(endpoint) as sqs,
        ssm_client(endpoint) as ssm,
    ):
        with contextlib.suppress(ClientError):
            targets = await events.list_targets_by_rule(Rule=resources.rule_name)
            ids = [target["Id"] for target in targets.get("Targets", [])]
            if ids:
                await events.remove_targets(Rule=resources.rule_name, Ids=ids)
            await events.delete_rule(Name=resources.rule_name)
        # Parents first: a parent still waiting would otherwise request more children.
        for machine in (resources.parent_state_machine_arn, resources.state_machine_arn):
            paginator = sfn.get_paginator("list_executions")
            async for page in paginator.paginate(stateMachineArn=machine, statusFilter="RUNNING"):
                for execution in page["executions"]:
                    with contextlib.suppress(ClientError):
                        await sfn.stop_execution(executionArn=execution["executionArn"])
            await sfn.delete_state_machine(stateMachineArn=machine)
        prefix = f"{resources.prefix}-"
        listed = await sqs.list_queues(QueueNamePrefix=prefix)
        for url in listed.get("QueueUrls", []):
            if url.rsplit("/", 1)[-1].startswith(prefix):
                await sqs.delete_queue(QueueUrl=url)
        with contextlib.suppress(ClientError):
            await ssm.delete_parameter(Name=resources.limit_parameter)


async def create_lease_table(endpoint: str, name: str) -> str:
    """A lease table as the dispatcher expects it (string partition key ``pool``)."""
    async with session().client("dynamodb", endpoint_url=endpoint) as dynamodb:
        await dynamodb.create_table(
            TableName=name,
            AttributeDefinitions=[{"AttributeName": "pool", "AttributeType": "S"}],
            KeySchema=[{"AttributeName": "pool", "KeyType": "HASH"}],
            BillingMode="PAY_PER_REQUEST",
        )
    return name
