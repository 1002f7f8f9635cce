"""Start-up checks of `run`: the state machine and queues exist and fit, or a UserError says
what to fix. (`sfn-dispatcher check` goes much further; this is the minimum to start.)"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from botocore.exceptions import BotoCoreError, ClientError

from dispatcher.aws.api import Clients, error_code
from dispatcher.daemon.deadletter import DEFAULT_MAX_SIZE
from dispatcher.errors import UserError
from dispatcher.settings.config import Settings, env_name
from dispatcher.settings.layout import Layout


@dataclass(frozen=True)
class Preflight:
    """What the start-up checks read that the run needs."""

    dead_letter_max_size: int = DEFAULT_MAX_SIZE  # the dead-letter queue's MaximumMessageSize
    max_receive_counts: Mapping[str, int] = field(default_factory=dict)
    """Request queue URL -> its redrive policy's maxReceiveCount (queues that have one)."""


async def preflight(settings: Settings, layout: Layout, clients: Clients) -> Preflight:
    """Check the state machines and queues exist and fit; raise UserError naming the fix.
    Returns what the run needs of what was read."""
    for pool in layout.pools:
        await _check_state_machine(pool.state_machine_arn, pool.name, layout, clients)
    queues = {q.url: f"request queue of {', '.join(q.pools)}" for q in layout.queues}
    queues[settings.events_queue_url] = _named("events_queue_url", layout)
    if settings.dead_letter_queue_url:
        queues[settings.dead_letter_queue_url] = _named("dead_letter_queue_url", layout)
    attributes: dict[str, dict[str, str]] = {}
    for url, role in queues.items():
        try:
            response = await clients.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])
        except (ClientError, BotoCoreError) as exc:
            raise UserError(
                f"cannot use queue {url} ({role}): {exc}; check the URL and "
                "sqs:GetQueueAttributes permission"
            ) from None
        attributes[url] = {str(k): v for k, v in response.get("Attributes", {}).items()}
    receives = {q.url: n for q in layout.queues if (n := _max_receives(attributes[q.url]))}
    if settings.dead_letter_queue_url:
        return Preflight(_max_size(attributes[settings.dead_letter_queue_url]), receives)
    for queue in layout.queues:
        if not attributes[queue.url].get("RedrivePolicy"):
            raise UserError(
                f"bad requests on {queue.url} would have nowhere to go: set "
                f"{_named('dead_letter_queue_url', layout)}, or give the request queue a "
                "redrive policy (maxReceiveCount) to a dead-letter queue"
            )
    return Preflight(max_receive_counts=receives)


def _named(setting: str, layout: Layout) -> str:
    """How the user set ``setting``: its variable, or also its key when a config file is used."""
    variable = env_name(setting)
    if layout.source == "environment":
        return variable
    return f"{variable} or {setting} in the [dispatcher] table of {layout.source}"


def _max_receives(attributes: Mapping[str, str]) -> int | None:
    """The maxReceiveCount of a queue's redrive policy (None: no policy, or unreadable)."""
    try:
        return int(json.loads(attributes["RedrivePolicy"])["maxReceiveCount"])
    except (KeyError, ValueError, TypeError):
        return None


def _max_size(attributes: Mapping[str, str]) -> int:
    """A queue's MaximumMessageSize; the default when missing or not a number."""
    try:
        return int(attributes["MaximumMessageSize"])
    except (KeyError, ValueError):
        return DEFAULT_MAX_SIZE


async def _check_state_machine(arn: str, pool: str, layout: Layout, clients: Clients) -> None:
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "the AWS endpoint")
    where = env_name("state_machine_arn") if layout.source == "environment" else f"pool {pool}"
    try:
        described = await clients.sfn.describe_state_machine(stateMachineArn=arn)
    except ClientError as exc:
        raise UserError(
            f"cannot use state machine {arn} ({where}): {error_code(exc)}: {exc}; check the "
            "ARN, its region and states:DescribeStateMachine permission"
        ) from None
    except BotoCoreError as exc:
        raise UserError(
            f"cannot reach Step Functions at {endpoint}: {exc}; check AWS_ENDPOINT_URL, "
            "the network and credentials"
        ) from None
    if described.get("type") != "STANDARD":
        raise UserError(
            f"state machine {arn} ({where}) is {described.get('type')}; only "
            "STANDARD state machines can be governed: EXPRESS executions have no idempotent "
            "names, send no status-change events and are not listed by ListExecutions"
        )
