"""Create (or bring up to date) everything the dispatcher needs, in an emulator or account.

Idempotent by construction: queues are created by name and then configured, the state
machines are described by their derived ARNs and updated in place when their definition or
role differ, the rule and its single target are upserts, the parameter is overwritten.
Running it twice returns the same URLs and ARNs and creates nothing new.

Two machines: the governed demo child ``<prefix>`` and ``<prefix>-parent``, a workflow that
asks the dispatcher for one child per item and waits for each (task tokens).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from dispatcher.aws import api as aws
from dispatcher.errors import UserError
from dispatcher.settings.config import env_name

if TYPE_CHECKING:
    from types_aiobotocore_events import EventBridgeClient
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_sqs.literals import QueueAttributeNameType
    from types_aiobotocore_ssm import SSMClient
    from types_aiobotocore_stepfunctions import SFNClient

TEST_CREDENTIALS = {"aws_access_key_id": "test", "aws_secret_access_key": "test"}
STATUS_DETAIL_TYPE = "Step Functions Execution Status Change"
RULE_TARGET_ID = "events-queue"
# The message attributes a parent sets (the dispatcher's defaults).
TASK_TOKEN_ATTRIBUTE = "task-token"  # noqa: S105 - an attribute's name, not a secret
IDEMPOTENCY_KEY_ATTRIBUTE = "idempotency-key"
PARENT_ATTRIBUTE = "parent-execution"
PARENT_SUFFIX = "-parent"
PARENT_ARN_ENV = "SFN_DISPATCHER_PARENT_ARN"
SQS_MAX_MESSAGE_SIZE = 1_048_576
# Every derived name must stay valid: queue and state machine names <= 80 (the longest is
# `<prefix>-requests-dlq`), rule names <= 64 characters.
PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,49}$")


@dataclass(frozen=True)
class SandboxResources:
    """What `provision` made: the names and addresses the dispatcher and tests use."""

    endpoint: str
    region: str
    prefix: str
    state_machine_arn: str
    parent_state_machine_arn: str
    request_queue_url: str
    dead_letter_queue_url: str
    events_queue_url: str
    raw_events_queue_url: str | None
    rule_name: str
    limit_parameter: str
    limit: int

    def env(self, *, live_limit: bool = False) -> dict[str, str]:
        """The variables ``sfn-dispatcher run`` (and ``submit``) read, for this sandbox.

        Also ``SFN_DISPATCHER_PARENT_ARN``, the parent machine, for trying task tokens by
        hand; the dispatcher does not read it. With ``live_limit`` (what ``sandbox`` prints)
        also ``DISPATCHER_LIMIT_PARAMETER``: the limit is then the parameter's, which
        ``pause``, ``resume`` and ``drain`` write; without it (tests, the demo, benchmarks)
        ``DISPATCHER_LIMIT`` alone sets it.
        """
        live = {env_name("limit_parameter"): self.limit_parameter} if live_limit else {}
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ACCESS_KEY_ID": TEST_CREDENTIALS["aws_access_key_id"],
            "AWS_SECRET_ACCESS_KEY": TEST_CREDENTIALS["aws_secret_access_key"],
            env_name("state_machine_arn"): self.state_machine_arn,
            env_name("request_queue_url"): self.request_queue_url,
            env_name("events_queue_url"): self.events_queue_url,
            env_name("dead_letter_queue_url"): self.dead_letter_queue_url,
            env_name("limit"): str(self.limit),
            **live,
            PARENT_ARN_ENV: self.parent_state_machine_arn,
        }


def demo_definition() -> dict[str, Any]:
    """The demo machine: wait ``$.seconds`` if given, then fail if ``$.fail`` is true."""
    return {
        "Comment": "sfn-dispatcher demo: Wait $.seconds, Fail when $.fail is true",
        "StartAt": "HasSeconds",
        "States": {
            "HasSeconds": {
                "Type": "Choice",
                "Choices": [{"Variable": "$.seconds", "IsPresent": True, "Next": "Work"}],
                "Default": "ShouldFail",
            },
            "Work": {"Type": "Wait", "SecondsPath": "$.seconds", "Next": "ShouldFail"},
            "ShouldFail": {
                "Type": "Choice",
                "Choices": [
                    {
                        "And": [
                            {"Variable": "$.fail", "IsPresent": True},
                            {"Variable": "$.fail", "BooleanEquals": True},
                        ],
                        "Next": "Failed",
                    }
                ],
                "Default": "Done",
            },
            "Failed": {"Type": "Fail", "Error": "DemoFailure", "Cause": "the input asked to fail"},
            "Done": {"Type": "Succeed"},
        },
    }


CHILD_KEY = "States.Format('{}-{}', States.Hash($$.Execution.Id, 'SHA-1'), $$.Map.Item.Index)"
"""The parent's idempotency key for its child: the SHA-1 of the parent's ARN and the index."""
PARENT_STEP_TIMEOUT = 3600
"""How long the parent waits for one child, backlog included (seconds)."""


def child_key(parent_arn: str, index: int) -> str:
    """The idempotency key `CHILD_KEY` gives item ``index`` of the parent ``parent_arn``."""
    return f"{hashlib.sha1(parent_arn.encode()).hexdigest()}-{index}"  # noqa: S324 - a name


def parent_definition(request_queue_url: str) -> dict[str, Any]:
    """The parent machine: one governed child per item of ``$.items``, each awaited.

    Every item is sent to the requests queue as a child's input, with the task token and an
    idempotency key ``<SHA-1 of the parent's ARN>-<item index>`` (`child_key`) as message
    attributes, and waits at most `PARENT_STEP_TIMEOUT` seconds for its answer; the dispatcher
    starts the child under the limit and answers the token when the child ends. A child
    that fails is caught per item: the parent still succeeds, and its ``$.results`` lists
    every child's output in item order, a failed child's slot holding the item with
    ``error`` = ``{"Error", "Cause"}`` (e.g. ``DemoFailure``, ``Dispatcher.ChildTimedOut``).
    """
    return {
        "Comment": "sfn-dispatcher demo parent: one governed child per item of $.items, "
        "all requested at once; $.results holds their outputs in order, a failed child's "
        "item with its error",
        "StartAt": "Children",
        "States": {
            "Children": {
                "Type": "Map",
                "ItemsPath": "$.items",
                # 0: every child is requested at once; the dispatcher holds the limit.
                "MaxConcurrency": 0,
                "ItemProcessor": {
                    "ProcessorConfig": {"Mode": "INLINE"},
                    "StartAt": "RunChild",
                    "States": {
                        "RunChild": {
                            "Type": "Task",
                            "Resource": "arn:aws:states:::sqs:sendMessage.waitForTaskToken",
                            "Parameters": {
                                "QueueUrl": request_queue_url,
                                "MessageBody.$": "$",
                                "MessageAttributes": {
                                    TASK_TOKEN_ATTRIBUTE: {
                                        "DataType": "String",
                                        "StringValue.$": "$$.Task.Token",
                                    },
                                    # 40 hex digits, a dash, the index: fits even a
                                    # keyed pool's 68 characters, whatever the parent's
                                    # name, and is unique across parent machines.
                                    IDEMPOTENCY_KEY_ATTRIBUTE: {
                                        "DataType": "String",
                                        "StringValue.$": CHILD_KEY,
                                    },
                                    # Optional: the dispatcher logs it with the child's ARN.
                                    PARENT_ATTRIBUTE: {
                                        "DataType": "String",
                                        "StringValue.$": "$$.Execution.Id",
                                    },
                                },
                            },
                            # The whole wait (backlog, start, the child's run) is bounded.
                            "TimeoutSeconds": PARENT_STEP_TIMEOUT,
                            "Catch": [
                                {
                                    "ErrorEquals": ["States.ALL"],
                                    "ResultPath": "$.error",
                                    "Next": "ChildFailed",
                                }
                            ],
                            "End": True,
                        },
                        "ChildFailed": {"Type": "Pass", "End": True},
                    },
                },
                "ResultPath": "$.results",
                "End": True,
            }
        },
    }


def status_event_pattern(state_machine_arn: str) -> dict[str, Any]:
    """EventBridge pattern for the status changes of one state machine."""
    return {
        "source": ["aws.states"],
        "detail-type": [STATUS_DETAIL_TYPE],
        "detail": {"stateMachineArn": [state_machine_arn]},
    }


async def provision(
    endpoint: str,
    *,
    prefix: str = "sfn-dispatcher-demo",
    region: str = "us-east-1",
    limit: int = 10,
    max_receive_count: int = 20,
    visibility_timeout: int = 60,
    raw_events: bool = False,
) -> SandboxResources:
    """Create or update the sandbox's queues, state machine, rule and limit parameter.

    With ``raw_events`` the rule targets ``{prefix}-events-raw`` instead of
    ``{prefix}-events``, so that a test relay can move events across with faults.
    """
    _validate(prefix, limit, max_receive_count, visibility_timeout)
    session = _session(region)
    async with AsyncExitStack() as stack:
        sqs: SQSClient = await stack.enter_async_context(
            session.client("sqs", endpoint_url=endpoint)
        )
        sfn: SFNClient = await stack.enter_async_context(
            session.client("stepfunctions", endpoint_url=endpoint)
        )
        events: EventBridgeClient = await stack.enter_async_context(
            session.client("events", endpoint_url=endpoint)
        )
        ssm: SSMClient = await stack.enter_async_context(
            session.client("ssm", endpoint_url=endpoint)
        )

        # The SQS maximum: a bad request's copy, reason attached, fits whatever the request
        # queue takes (`sfn-dispatcher check` verifies it).
        dlq_url, dlq_arn = await _queue(
            sqs, f"{prefix}-requests-dlq", {"MaximumMessageSize": str(SQS_MAX_MESSAGE_SIZE)}
        )
        request_url, _ = await _queue(
            sqs,
            f"{prefix}-requests",
            {
                "VisibilityTimeout": str(visibility_timeout),
                "RedrivePolicy": json.dumps(
                    {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receive_count)}
                ),
            },
        )
        events_url, events_arn = await _queue(sqs, f"{prefix}-events", {})
        raw_url, raw_arn = (
            await _queue(sqs, f"{prefix}-events-raw", {}) if raw_events else (None, None)
        )

        machine_arn = await _state_machine(
            sfn, prefix, _sibling_arn(dlq_arn, "states", prefix), demo_definition()
        )
        parent = prefix + PARENT_SUFFIX
        parent_arn = await _state_machine(
            sfn, parent, _sibling_arn(dlq_arn, "states", parent), parent_definition(request_url)
        )

        rule_name = f"{prefix}-status"
        rule = await events.put_rule(
            Name=rule_name,
            EventPattern=json.dumps(status_event_pattern(machine_arn)),
            State="ENABLED",
            Description=f"Status changes of {prefix} to its events queue",
        )
        target_arn = raw_arn or events_arn
        for url, arn in ((events_url, events_arn), (raw_url, raw_arn)):
            if url is not None and arn is not None:
                await sqs.set_queue_attributes(
                    QueueUrl=url, Attributes={"Policy": _events_policy(arn, rule["RuleArn"])}
                )
        # The target's Id is fixed, so this replaces the old target instead of adding one.
        result = await events.put_targets(
            Rule=rule_name, Targets=[{"Id": RULE_TARGET_ID, "Arn": target_arn}]
        )
        if result.get("FailedEntryCount"):
            raise UserError(f"could not point rule {rule_name} at {target_arn}: {result}")

        parameter = f"/{prefix}/limit"
        await ssm.put_parameter(Name=parameter, Value=str(limit), Type="String", Overwrite=True)

    return SandboxResources(
        endpoint=endpoint,
        region=region,
        prefix=prefix,
        state_machine_arn=machine_arn,
        parent_state_machine_arn=parent_arn,
        request_queue_url=request_url,
        dead_letter_queue_url=dlq_url,
        events_queue_url=events_url,
        raw_events_queue_url=raw_url,
        rule_name=rule_name,
        limit_parameter=parameter,
        limit=limit,
    )


@functools.cache
def _session(region: str) -> Any:
    """One session per region: a new one re-reads every service model (~0.1 s a client)."""
    return aws.session(region=region, credentials=TEST_CREDENTIALS)


def _validate(prefix: str, limit: int, max_receive_count: int, visibility_timeout: int) -> None:
    if not PREFIX_RE.match(prefix):
        raise UserError(
            f"prefix {prefix!r} is invalid: 1-50 characters of A-Z a-z 0-9 - _, "
            "starting with a letter or digit"
        )
    if limit < 0:
        raise UserError(f"limit {limit} is invalid: give 0 or more")
    if not 1 <= max_receive_count <= 1000:
        raise UserError(f"max receive count {max_receive_count} is invalid: give 1 to 1000")
    if not 0 <= visibility_timeout <= 43_200:
        raise UserError(f"visibility timeout {visibility_timeout} is invalid: give 0 to 43200")


async def _queue(
    sqs: SQSClient, name: str, attributes: Mapping[QueueAttributeNameType, str]
) -> tuple[str, str]:
    """Create the queue if missing, then set ``attributes``; returns (URL, ARN)."""
    # Created bare and configured after: CreateQueue fails on an existing queue whose
    # attributes differ, SetQueueAttributes updates in place.
    url = (await sqs.create_queue(QueueName=name))["QueueUrl"]
    if attributes:
        await sqs.set_queue_attributes(QueueUrl=url, Attributes=attributes)
    found = await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
    return url, found["Attributes"]["QueueArn"]


def _sibling_arn(queue_arn: str, service: str, machine: str) -> str:
    """The state machine's ARN, from partition, region and account of one of our queues."""
    partition, region, account = queue_arn.split(":")[1], *queue_arn.split(":")[3:5]
    return f"arn:{partition}:{service}:{region}:{account}:stateMachine:{machine}"


async def _state_machine(sfn: SFNClient, name: str, arn: str, definition: dict[str, Any]) -> str:
    """Create a machine, or update it in place when definition or role differ."""
    role = f"arn:aws:iam::000000000000:role/{name}"
    try:
        current = await sfn.describe_state_machine(stateMachineArn=arn)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "StateMachineDoesNotExist":
            raise
    else:
        if current.get("type", "STANDARD") != "STANDARD":
            raise UserError(
                f"state machine {arn} exists but is {current['type']}; the dispatcher needs "
                "STANDARD: delete it or pick another --prefix"
            )
        if json.loads(current["definition"]) != definition or current["roleArn"] != role:
            await sfn.update_state_machine(
                stateMachineArn=arn, definition=json.dumps(definition), roleArn=role
            )
        return arn
    created = await sfn.create_state_machine(
        name=name, definition=json.dumps(definition), roleArn=role, type="STANDARD"
    )
    return created["stateMachineArn"]


def _events_policy(queue_arn: str, rule_arn: str) -> str:
    """Queue policy that lets EventBridge deliver this rule's events (required on AWS)."""
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "EventBridgeStatusEvents",
                    "Effect": "Allow",
                    "Principal": {"Service": "events.amazonaws.com"},
                    "Action": "sqs:SendMessage",
                    "Resource": queue_arn,
                    "Condition": {"ArnEquals": {"aws:SourceArn": rule_arn}},
                }
            ],
        }
    )
