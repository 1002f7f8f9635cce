"""Against the emulator: a parent's child running across a restart that turns on a key
attribute (which renames every execution) is found under its former name, not started
again, and the parent gets its result."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import pytest

from devtools.polling import wait_until
from devtools.records import list_executions
from devtools.sandbox.provision import SandboxResources, child_key
from tests.audit import session
from tests.runner import running

Factory = Callable[..., Awaitable[SandboxResources]]


@pytest.mark.timeout(150)
async def test_a_child_running_across_a_key_attribute_change_is_not_started_again(
    sandbox_factory: Factory,
) -> None:
    resources = await sandbox_factory(limit=2)
    async with session().client("stepfunctions", endpoint_url=resources.endpoint) as sfn:
        item = {"seconds": 15}
        started = await sfn.start_execution(
            stateMachineArn=resources.parent_state_machine_arn,
            name="parent-0",
            input=json.dumps({"items": [item]}),
        )
        async with running(resources, limit=2) as before:

            async def token_held() -> bool:
                return before.callbacks is not None and before.callbacks.held == 1

            await wait_until(token_held, within=30)
        # Restarted with a per-parent key: the child's name would now carry a key tag. Its
        # token message comes back once its visibility ends (it is never handed back).
        async with running(resources, limit=2, key_attribute="parent-execution") as after:

            async def parent_ended() -> bool:
                described = await sfn.describe_execution(executionArn=started["executionArn"])
                return bool(described["status"] != "RUNNING")

            await wait_until(parent_ended, within=100, interval=0.5)
            found = after.metrics.registry.get_sample_value(
                "dispatcher_former_name_lookups_total", {"pool": "default", "result": "found"}
            )
        parent = await sfn.describe_execution(executionArn=started["executionArn"])
        assert parent["status"] == "SUCCEEDED", parent
        assert json.loads(parent["output"])["results"] == [item]
        executions = await list_executions(sfn, resources.state_machine_arn)
        child = child_key(started["executionArn"], 0)
        assert [e.name for e in executions] == [child], "the child started once"
        assert found == 1
