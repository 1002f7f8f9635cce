"""Start-up checks of `run`: the state machine and queues exist and fit, or a UserError says
what to fix. (`sfn-dispatcher check` goes much further; this is the minimum to start.)"""

from __future__ import annotations

import os

from botocore.exceptions import BotoCoreError, ClientError

from dispatcher.aws import Clients, error_code
from dispatcher.config import Settings
from dispatcher.errors import UserError


async def preflight(settings: Settings, clients: Clients) -> None:
    """Check the state machine and queues exist and fit; raise UserError naming the fix."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "the AWS endpoint")
    try:
        described = await clients.sfn.describe_state_machine(
            stateMachineArn=settings.state_machine_arn
        )
    except ClientError as exc:
        raise UserError(
            f"cannot use state machine {settings.state_machine_arn} "
            f"(DISPATCHER_STATE_MACHINE_ARN): {error_code(exc)}: {exc}; check the ARN, "
            "its region and states:DescribeStateMachine permission"
        ) from None
    except BotoCoreError as exc:
        raise UserError(
            f"cannot reach Step Functions at {endpoint}: {exc}; check AWS_ENDPOINT_URL, "
            "the network and credentials"
        ) from None
    if described.get("type") != "STANDARD":
        raise UserError(
            f"state machine {settings.state_machine_arn} is {described.get('type')}; only "
            "STANDARD state machines can be governed: EXPRESS executions have no idempotent "
            "names, send no status-change events and are not listed by ListExecutions"
        )
    queues = {
        "DISPATCHER_REQUEST_QUEUE_URL": settings.request_queue_url,
        "DISPATCHER_EVENTS_QUEUE_URL": settings.events_queue_url,
    }
    if settings.dead_letter_queue_url:
        queues["DISPATCHER_DEAD_LETTER_QUEUE_URL"] = settings.dead_letter_queue_url
    attributes: dict[str, dict[str, str]] = {}
    for variable, url in queues.items():
        try:
            response = await clients.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])
        except (ClientError, BotoCoreError) as exc:
            raise UserError(
                f"cannot use queue {url} ({variable}): {exc}; check the URL and "
                "sqs:GetQueueAttributes permission"
            ) from None
        attributes[variable] = {str(k): v for k, v in response.get("Attributes", {}).items()}
    if not settings.dead_letter_queue_url and not attributes["DISPATCHER_REQUEST_QUEUE_URL"].get(
        "RedrivePolicy"
    ):
        raise UserError(
            "bad requests would have nowhere to go: set DISPATCHER_DEAD_LETTER_QUEUE_URL, or "
            "give the request queue a redrive policy (maxReceiveCount) to a dead-letter queue"
        )
