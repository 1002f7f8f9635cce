"""From inside a workflow, against the emulator: parents map over items, each item asks the
dispatcher for a child through a task token and waits; the limit holds across every parent
and each parent gets exactly its children's results. Judged from the executions' records.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import pytest

from devtools.polling import wait_until
from devtools.records import list_executions, max_overlap
from devtools.sandbox.provision import SandboxResources, child_key
from dispatcher.daemon.callbacks import FIRST_RECEIVE_SKEW
from tests.audit import session
from tests.helpers import depth, drained
from tests.runner import child_process, running

if TYPE_CHECKING:
    from types_aiobotocore_stepfunctions import SFNClient

Factory = Callable[..., Awaitable[SandboxResources]]


async def start_parents(
    sfn: SFNClient, resources: SandboxResources, items: list[list[Any]], prefix: str = "parent"
) -> list[str]:
    """Start one parent per list of items; returns their ARNs."""
    arns = []
    for index, children in enumerate(items):
        started = await sfn.start_execution(
            stateMachineArn=resources.parent_state_machine_arn,
            name=f"{prefix}-{index}",
            input=json.dumps({"items": children}),
        )
        arns.append(started["executionArn"])
    return arns


async def finished(sfn: SFNClient, arns: list[str], within: float) -> list[dict[str, Any]]:
    """Wait until every parent has ended; their describes."""

    async def ended() -> bool:
        for arn in arns:
            if (await sfn.describe_execution(executionArn=arn))["status"] == "RUNNING":
                return False
        return True

    await wait_until(ended, within=within, interval=0.5)
    return [dict(await sfn.describe_execution(executionArn=arn)) for arn in arns]


@pytest.mark.timeout(180)
async def test_three_parents_of_twenty_items_hold_the_limit_and_get_their_results(
    sandbox_factory: Factory,
) -> None:
    resources = await sandbox_factory(limit=5)
    items = [[{"seconds": 1, "parent": p, "item": i} for i in range(20)] for p in range(3)]
    async with (
        running(resources, limit=5),
        session().client("stepfunctions", endpoint_url=resources.endpoint) as sfn,
        session().client("sqs", endpoint_url=resources.endpoint) as sqs,
    ):
        parents = await start_parents(sfn, resources, items)
        described = await finished(sfn, parents, within=150)
        for parent, children in zip(described, items, strict=True):
            assert parent["status"] == "SUCCEEDED", parent
            assert json.loads(parent["output"])["results"] == children, "in item order"
        executions = await list_executions(sfn, resources.state_machine_arn)
        assert sorted(e.name for e in executions) == sorted(
            child_key(arn, i) for arn in parents for i in range(20)
        ), "each child started once"
        assert max_overlap(executions) <= 5
        await drained(sqs, resources.request_queue_url)  # every message deleted


@pytest.mark.timeout(120)
async def test_a_failing_child_fails_its_parents_step_with_its_error(
    sandbox_factory: Factory,
) -> None:
    resources = await sandbox_factory(limit=2)
    async with (
        running(resources, limit=2),
        session().client("stepfunctions", endpoint_url=resources.endpoint) as sfn,
    ):
        [parent] = await start_parents(sfn, resources, [[{"seconds": 0}, {"fail": True}]])
        [described] = await finished(sfn, [parent], within=60)
    results = json.loads(described["output"])["results"]
    assert results[0] == {"seconds": 0}
    assert results[1]["error"]["Error"] == "DemoFailure", "caught by the parent's Catch"


@pytest.mark.timeout(150)
async def test_kill_9_while_children_run_and_tokens_wait_then_every_parent_completes(
    sandbox_factory: Factory,
) -> None:
    resources = await sandbox_factory(limit=3)
    items = [[{"seconds": 2, "item": i} for i in range(6)] for _ in range(2)]
    async with session().client("stepfunctions", endpoint_url=resources.endpoint) as sfn:
        parents = await start_parents(sfn, resources, items)
        async with child_process(resources, {"DISPATCHER_LIMIT": "3"}) as first:

            async def some_started() -> bool:
                return len(await list_executions(sfn, resources.state_machine_arn)) >= 3

            await wait_until(some_started, within=60)
            first.process.send_signal(signal.SIGKILL)
            await first.process.wait()
        async with child_process(resources, {"DISPATCHER_LIMIT": "3"}):
            described = await finished(sfn, parents, within=120)
        for parent, children in zip(described, items, strict=True):
            assert parent["status"] == "SUCCEEDED", parent
            assert json.loads(parent["output"])["results"] == children
        executions = await list_executions(sfn, resources.state_machine_arn)
        assert len(executions) == 12, "no child started twice"
        assert max_overlap(executions) <= 3


@pytest.mark.timeout(120)
async def test_a_bad_request_with_a_token_fails_the_parents_step_and_is_dead_lettered(
    sandbox_factory: Factory,
) -> None:
    """An item that is not a JSON object is sent as a body that is not JSON: a request no
    retry can fix."""
    resources = await sandbox_factory(limit=2)
    async with (
        running(resources, limit=2),
        session().client("stepfunctions", endpoint_url=resources.endpoint) as sfn,
        session().client("sqs", endpoint_url=resources.endpoint) as sqs,
    ):
        [parent] = await start_parents(sfn, resources, [["not json"]])
        [described] = await finished(sfn, [parent], within=60)
        [result] = json.loads(described["output"])["results"]
        assert result["error"]["Error"] == "Dispatcher.BadRequest"
        assert result["error"]["Cause"].startswith("invalid_json: ")
        got = await sqs.receive_message(
            QueueUrl=resources.dead_letter_queue_url,
            MessageAttributeNames=["All"],
            WaitTimeSeconds=1,
        )
        [dead] = got["Messages"]
        assert dead["MessageAttributes"]["dispatcher-reason"]["StringValue"] == "invalid_json"
        assert await list_executions(sfn, resources.state_machine_arn) == []


@pytest.mark.timeout(120)
async def test_a_parent_of_the_longest_name_gets_its_child_in_a_keyed_pool(
    sandbox_factory: Factory,
) -> None:
    """With per-key limits an idempotency key may be 68 characters at most: the documented
    key (a hash of the parent's ARN and the index) fits whatever the parent's name (80)."""
    resources = await sandbox_factory(limit=2)
    async with (
        running(resources, limit=2, key_attribute="tenant", per_key_limit=1),
        session().client("stepfunctions", endpoint_url=resources.endpoint) as sfn,
    ):
        [parent] = await start_parents(sfn, resources, [[{"seconds": 0}]], prefix="p" * 78)
        [described] = await finished(sfn, [parent], within=60)
        assert json.loads(described["output"])["results"] == [{"seconds": 0}]
        [child] = await list_executions(sfn, resources.state_machine_arn)
        assert child.name.endswith(f"_{child_key(parent, 0)}"), "keyed, and it fits"


@pytest.mark.timeout(120)
async def test_a_parent_that_stopped_waiting_lets_the_dispatcher_stop_the_child(
    sandbox_factory: Factory,
) -> None:
    """The parent's task is answered elsewhere while the child runs (as for a parent that
    was aborted or timed out: MiniStack keeps an aborted parent's tokens alive, AWS does
    not - the simulation covers the abort). The next heartbeat meets TaskDoesNotExist:
    the child is stopped (enabled here) and the request message deleted. (Its request is
    sent once the reign is older than the clock skew allowed: a request that may have been
    received before the reign is never stopped without a lease table, see callbacks.)"""
    resources = await sandbox_factory(limit=2)
    async with (
        running(resources, limit=2, heartbeat_interval=0.5, stop_orphaned_children=True) as d,
        session().client("stepfunctions", endpoint_url=resources.endpoint) as sfn,
        session().client("sqs", endpoint_url=resources.endpoint) as sqs,
    ):

        async def reign_older_than_the_skew() -> bool:
            began = d.callbacks.reign_began if d.callbacks is not None else math.inf
            return time.time() > began + FIRST_RECEIVE_SKEW

        await wait_until(reign_older_than_the_skew, within=FIRST_RECEIVE_SKEW + 10)
        [parent] = await start_parents(sfn, resources, [[{"seconds": 60}]])

        async def token_held() -> bool:
            return d.callbacks is not None and d.callbacks.held == 1

        await wait_until(token_held, within=30)
        assert d.callbacks is not None
        [(token, child_arn)] = d.callbacks.tokens()
        await sfn.send_task_failure(taskToken=token, error="Elsewhere", cause="not waiting")

        async def child_stopped() -> bool:
            child = await sfn.describe_execution(executionArn=child_arn)
            return bool(child["status"] == "ABORTED")

        await wait_until(child_stopped, within=30)

        async def released() -> bool:
            return d.callbacks is not None and d.callbacks.held == 0

        await wait_until(released, within=10)

        async def deleted() -> bool:  # deletes go out in batches: ten handles or 50 ms
            return await depth(sqs, resources.request_queue_url) == 0

        await wait_until(deleted, within=10)
        [described] = await finished(sfn, [parent], within=30)
        assert json.loads(described["output"])["results"][0]["error"]["Error"] == "Elsewhere"
        orphans = d.metrics.registry.get_sample_value(
            "dispatcher_orphaned_children_total", {"pool": "default", "action": "stopped"}
        )
        assert orphans == 1


@pytest.mark.timeout(150)
async def test_an_orderly_stop_hands_held_tokens_back_at_once_and_the_next_one_answers(
    sandbox_factory: Factory,
) -> None:
    """A deploy: the dispatcher stops while a child runs and its parent waits. The token's
    message is visible again as the process ends (not a visibility timeout later), after a
    last heartbeat; the next dispatcher takes it over and answers the parent once the child
    ends. One child, no second start."""
    resources = await sandbox_factory(limit=2)
    async with (
        session().client("stepfunctions", endpoint_url=resources.endpoint) as sfn,
        session().client("sqs", endpoint_url=resources.endpoint) as sqs,
    ):
        [parent] = await start_parents(sfn, resources, [[{"seconds": 6}]])
        async with running(resources, limit=2, visibility_timeout=300) as first:

            async def token_held() -> bool:
                return first.callbacks is not None and first.callbacks.held == 1

            await wait_until(token_held, within=30)
            beats = first.metrics.registry.get_sample_value(
                "dispatcher_heartbeats_total", {"pool": "default", "outcome": "ok"}
            )
        after = first.metrics.registry.get_sample_value(
            "dispatcher_heartbeats_total", {"pool": "default", "outcome": "ok"}
        )
        assert (after or 0) > (beats or 0), "a last heartbeat as it left"
        visible = await sqs.get_queue_attributes(
            QueueUrl=resources.request_queue_url, AttributeNames=["ApproximateNumberOfMessages"]
        )
        assert visible["Attributes"]["ApproximateNumberOfMessages"] == "1", "handed back"
        async with running(resources, limit=2, visibility_timeout=300):
            [described] = await finished(sfn, [parent], within=60)
            await drained(sqs, resources.request_queue_url)
        assert described["status"] == "SUCCEEDED", described
        assert json.loads(described["output"])["results"] == [{"seconds": 6}]
        assert len(await list_executions(sfn, resources.state_machine_arn)) == 1
        assert await depth(sqs, resources.request_queue_url) == 0
