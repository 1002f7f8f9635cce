"""Pools, priorities, live limits, start rate and per-key fairness against the emulator,
each judged from the executions' own records (start and stop dates), not from the
dispatcher's opinion of itself."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import anyio
import pytest

from devtools.polling import wait_until
from devtools.records import Execution, list_executions, max_overlap
from devtools.sandbox.provision import RULE_TARGET_ID, SandboxResources
from dispatcher.core.rate import parse_state_machine_arn
from dispatcher.core.requests import key_tag, tag_of
from tests.audit import send_requests, verdict, workload
from tests.conftest import SandboxFactory
from tests.helpers import depth, session
from tests.runner import running_config

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parent.parent


# -- set-up helpers --------------------------------------------------------------------


def write_config(path: Path, pools: dict[str, dict[str, Any]], queues: list[dict[str, Any]]) -> str:
    """Write a config file with these pools and queues; return its path."""
    lines = []
    for name, body in pools.items():
        lines.append(f"[pools.{name}]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in body.items())
    for queue in queues:
        lines.append("[[queues]]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in queue.items())
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def overwrite(path: str, text: str) -> None:
    """Replace a file's text."""
    Path(path).write_text(text)


async def share_events(main: SandboxResources, other: SandboxResources) -> None:
    """Point ``other``'s status-change rule at ``main``'s events queue (one events queue
    serves every pool)."""
    async with (
        session().client("events", endpoint_url=main.endpoint) as events,
        session().client("sqs", endpoint_url=main.endpoint) as sqs,
    ):
        attributes = await sqs.get_queue_attributes(
            QueueUrl=main.events_queue_url, AttributeNames=["QueueArn"]
        )
        arn = attributes["Attributes"]["QueueArn"]
        await events.put_targets(Rule=other.rule_name, Targets=[{"Id": RULE_TARGET_ID, "Arn": arn}])


async def extra_queue(resources: SandboxResources, name: str) -> str:
    """One more request queue in the sandbox (deleted with it: same prefix)."""
    async with session().client("sqs", endpoint_url=resources.endpoint) as sqs:
        created = await sqs.create_queue(
            QueueName=f"{resources.prefix}-{name}", Attributes={"VisibilityTimeout": "10"}
        )
        return str(created["QueueUrl"])


async def send_with(
    resources: SandboxResources, url: str, bodies: list[Any], attributes: dict[str, str]
) -> None:
    """Send requests carrying the same string message attributes."""
    async with session().client("sqs", endpoint_url=resources.endpoint) as sqs:
        for start in range(0, len(bodies), 10):
            entries: list[Any] = [
                {
                    "Id": str(i),
                    "MessageBody": json.dumps(body),
                    "MessageAttributes": {
                        k: {"DataType": "String", "StringValue": v} for k, v in attributes.items()
                    },
                }
                for i, body in enumerate(bodies[start : start + 10])
            ]
            result = await sqs.send_message_batch(QueueUrl=url, Entries=entries)
            assert not result.get("Failed"), result.get("Failed")


async def records(resources: SandboxResources, arn: str | None = None) -> list[Execution]:
    """Every execution of the state machine, with start and stop dates."""
    async with session().client("stepfunctions", endpoint_url=resources.endpoint) as sfn:
        return await list_executions(sfn, arn or resources.state_machine_arn)


async def wait_all_ended(resources: SandboxResources, count: int, *, within: float) -> None:
    """Wait until ``count`` executions exist and none is running."""

    async def ended() -> bool:
        executions = await records(resources)
        return len(executions) >= count and all(e.status != "RUNNING" for e in executions)

    await wait_until(ended, within=within)


def running_at(executions: Iterable[Execution], instant: float) -> int:
    """How many executions were running at ``instant`` (a start counts itself)."""
    return sum(1 for e in executions if e.start <= instant and (e.stop is None or e.stop > instant))


# -- pools -----------------------------------------------------------------------------


async def test_two_pools_each_hold_their_own_limit(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """One dispatcher, two state machines with limits 2 and 4, one events queue."""
    a = await sandbox_factory()
    b = await sandbox_factory()
    await share_events(a, b)
    path = write_config(
        tmp_path / "pools.toml",
        {
            "a": {"state_machine_arn": a.state_machine_arn, "limit": 2},
            "b": {"state_machine_arn": b.state_machine_arn, "limit": 4},
        },
        [{"url": a.request_queue_url, "pool": "a"}, {"url": b.request_queue_url, "pool": "b"}],
    )
    async with session().client("sqs", endpoint_url=a.endpoint) as sqs:
        names_a = await send_requests(sqs, a.request_queue_url, workload(12, 0.3, 0.8))
        names_b = await send_requests(sqs, b.request_queue_url, workload(16, 0.3, 0.8, seed=3))
    async with running_config(a, path) as dispatcher:
        await verdict(a, names_a, 2, within=120)
        await verdict(b, names_b, 4, within=120)
        assert dispatcher.pools["a"].max_running_seen <= 2
    assert max_overlap(await records(a)) == 2, "pool a used its two slots"
    assert max_overlap(await records(b)) == 4, "pool b used its four slots"


async def test_a_shared_queue_routes_by_the_pool_attribute(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """One queue feeds two pools; a request naming no pool is dead-lettered with the reason."""
    a = await sandbox_factory()
    b = await sandbox_factory()
    await share_events(a, b)
    path = write_config(
        tmp_path / "shared.toml",
        {
            "a": {"state_machine_arn": a.state_machine_arn, "limit": 3},
            "b": {"state_machine_arn": b.state_machine_arn, "limit": 3},
        },
        [{"url": a.request_queue_url, "pools": ["a", "b"], "pool_attribute": "pool"}],
    )
    await send_with(a, a.request_queue_url, [{"seconds": 0}] * 5, {"pool": "a"})
    await send_with(a, a.request_queue_url, [{"seconds": 0}] * 4, {"pool": "b"})
    await send_with(a, a.request_queue_url, [{"seconds": 0}], {"pool": "nowhere"})
    async with running_config(a, path):
        await wait_all_ended(a, 5, within=60)
        await wait_all_ended(b, 4, within=60)

        async def dead_lettered() -> bool:
            async with session().client("sqs", endpoint_url=a.endpoint) as sqs:
                return await depth(sqs, a.dead_letter_queue_url) == 1

        await wait_until(dead_lettered, within=30)
    assert len(await records(a)) == 5
    assert len(await records(b)) == 4
    async with session().client("sqs", endpoint_url=a.endpoint) as sqs:
        got = await sqs.receive_message(
            QueueUrl=a.dead_letter_queue_url, MessageAttributeNames=["All"], WaitTimeSeconds=1
        )
    attributes = got["Messages"][0]["MessageAttributes"]
    assert attributes["dispatcher-reason"]["StringValue"] == "unknown_pool"
    assert "accepted: a, b" in attributes["dispatcher-detail"]["StringValue"]


# -- priorities ------------------------------------------------------------------------


async def test_priorities_go_first_with_a_share_reserved_for_the_lower(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """Limit 1, twelve urgent and twelve batch requests waiting: urgent ones go first, but
    a quarter of the starts stay reserved for batch while both wait."""
    a = await sandbox_factory()
    low = await extra_queue(a, "batch")
    path = write_config(
        tmp_path / "priorities.toml",
        {"p": {"state_machine_arn": a.state_machine_arn, "limit": 1, "reserved_share": 0.25}},
        [
            {"url": a.request_queue_url, "pool": "p", "priority": 10},
            {"url": low, "pool": "p", "priority": 0},
        ],
    )
    await send_with(a, a.request_queue_url, [{"seconds": 0, "urgent": True}] * 12, {})
    await send_with(a, low, [{"seconds": 0, "urgent": False}] * 12, {})
    async with running_config(a, path):
        await wait_all_ended(a, 24, within=150)
    executions = sorted(await records(a), key=lambda e: e.start)
    assert max_overlap(executions) == 1
    async with session().client("stepfunctions", endpoint_url=a.endpoint) as sfn:
        urgent = [
            json.loads((await sfn.describe_execution(executionArn=e.arn))["input"])["urgent"]
            for e in executions
        ]
    last_urgent = max(i for i, u in enumerate(urgent) if u)
    # The first start may race the other queue's first receive; judge the rest.
    batch_while_urgent_waited = urgent[1:last_urgent].count(False)
    assert 2 <= batch_while_urgent_waited <= 5, urgent
    assert urgent[last_urgent + 1 :] == [False] * (23 - last_urgent), "batch finishes last"


# -- live limits -----------------------------------------------------------------------


async def test_a_limit_lowered_and_raised_through_ssm_holds_at_every_start(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """4, then 1, then 6 through the SSM parameter mid-run: every start fits the limit in
    force when it was made; lowering stops no execution; raising fills the new slots."""
    a = await sandbox_factory(limit=4)
    path = write_config(
        tmp_path / "live.toml",
        {
            "p": {
                "state_machine_arn": a.state_machine_arn,
                "limit": 2,
                "limit_parameter": a.limit_parameter,
            }
        },
        [{"url": a.request_queue_url, "pool": "p"}],
    )
    async with session().client("sqs", endpoint_url=a.endpoint) as sqs:
        names = await send_requests(sqs, a.request_queue_url, workload(40, 0.6, 1.0))
    refresh = 0.25
    async with (
        session().client("ssm", endpoint_url=a.endpoint) as ssm,
        running_config(a, path, DISPATCHER_LIMIT_REFRESH_INTERVAL=str(refresh)) as dispatcher,
    ):
        pool = dispatcher.pools["p"]
        assert pool.ledger.limit == 4, "the parameter wins over the file's limit"

        async def started(n: int) -> bool:
            return pool.started_total >= n

        await wait_until(lambda: started(8), within=60, interval=0.05)
        lowered_at = time.time()
        await ssm.put_parameter(Name=a.limit_parameter, Value="1", Overwrite=True)
        await wait_until(lambda: started(16), within=90, interval=0.05)
        raised_at = time.time()
        await ssm.put_parameter(Name=a.limit_parameter, Value="6", Overwrite=True)
        await verdict(a, names, 6, within=120)
    executions = await records(a)
    slack = 4 * refresh + 0.5  # the change reaches the dispatcher within one refresh
    for e in executions:
        if lowered_at + slack <= e.start < raised_at:
            assert running_at(executions, e.start) <= 1, f"start at {e.start} over 1"
        elif e.start < lowered_at + slack:
            assert running_at(executions, e.start) <= 4, f"start at {e.start} over 4"
    after = [e for e in executions if e.start >= raised_at + slack]
    assert max(running_at(executions, e.start) for e in after) > 4, "the raise took effect"
    assert max_overlap(executions) <= 6


async def test_an_invalid_ssm_value_is_refused_and_the_limit_kept(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """'lots' in the parameter: a log line and a metric, the old limit stays, no crash."""
    a = await sandbox_factory(limit=3)
    path = write_config(
        tmp_path / "bad-ssm.toml",
        {"p": {"state_machine_arn": a.state_machine_arn, "limit_parameter": a.limit_parameter}},
        [{"url": a.request_queue_url, "pool": "p"}],
    )
    async with (
        session().client("ssm", endpoint_url=a.endpoint) as ssm,
        running_config(a, path) as dispatcher,
    ):
        assert dispatcher.limits is not None
        await ssm.put_parameter(Name=a.limit_parameter, Value="lots", Overwrite=True)
        assert await dispatcher.limits.refresh_once() == 0
        assert dispatcher.pools["p"].ledger.limit == 3
        rejected = dispatcher.metrics.registry.get_sample_value(
            "dispatcher_limit_updates_total", {"pool": "p", "source": "ssm", "result": "rejected"}
        )
        assert rejected == 1
        await ssm.put_parameter(Name=a.limit_parameter, Value="5", Overwrite=True)
        assert await dispatcher.limits.refresh_once() == 1
        assert dispatcher.pools["p"].ledger.limit == 5
        assert dispatcher.health.ready


async def test_a_broken_config_reload_keeps_the_running_config(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """SIGHUP with a file that no longer parses changes nothing; a good one applies."""
    a = await sandbox_factory()
    pools = {"p": {"state_machine_arn": a.state_machine_arn, "limit": 3}}
    queues = [{"url": a.request_queue_url, "pool": "p"}]
    path = write_config(tmp_path / "reload.toml", pools, queues)
    async with running_config(a, path) as dispatcher:
        overwrite(path, "[pools.p]\nlimit = 'many'\n")
        assert dispatcher.reload() is False
        assert dispatcher.pools["p"].ledger.limit == 3
        write_config(Path(path), {"p": {**pools["p"], "limit": 7, "per_key_limit": 2}}, queues)
        assert dispatcher.reload() is False, "per_key_limit without key_attribute is refused"
        write_config(Path(path), {"p": {**pools["p"], "limit": 7}}, queues)
        assert dispatcher.reload() is True
        assert dispatcher.pools["p"].ledger.limit == 7
        assert dispatcher.health.ready


# -- start rate ------------------------------------------------------------------------


async def test_the_start_rate_holds_the_configured_rate(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """Rate 4/s, burst 2, 24 requests and room for all: the starts are spread at 4/s."""
    a = await sandbox_factory()
    path = write_config(
        tmp_path / "rate.toml",
        {"p": {"state_machine_arn": a.state_machine_arn, "limit": 50}},
        [{"url": a.request_queue_url, "pool": "p"}],
    )
    async with session().client("sqs", endpoint_url=a.endpoint) as sqs:
        names = await send_requests(sqs, a.request_queue_url, workload(24, 0.2, 0.4))
    async with running_config(
        a, path, DISPATCHER_START_RATE="4", DISPATCHER_START_BURST="2"
    ) as dispatcher:
        await verdict(a, names, 50, within=120)
        account, region = parse_state_machine_arn(a.state_machine_arn)
        gauge = dispatcher.metrics.registry.get_sample_value(
            "dispatcher_start_rate_limit", {"account": account, "region": region}
        )
    starts = sorted(e.start for e in await records(a))
    # The emulator's start dates vs our sends: a loaded machine (make test runs tests in
    # parallel) delays some requests and bunches the next ones by a few hundred ms.
    tolerance = 0.4
    for i, first in enumerate(starts):
        for j in range(i + 1, len(starts)):
            window = starts[j] - first
            assert j - i + 1 <= 2 + 4 * (window + tolerance), f"{j - i + 1} starts in {window:.3f}s"
    assert starts[-1] - starts[0] >= (24 - 2) / 4 - tolerance
    assert gauge == 4


# -- per-key limits --------------------------------------------------------------------


async def test_per_key_limits_hold_and_small_tenants_are_not_starved(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """Limit 6, per-key 2; one tenant sends 40 requests first, five tenants 3 each after.
    No key ever runs more than 2; the small tenants finish long before the big one."""
    a = await sandbox_factory(max_receive_count=50)
    path = write_config(
        tmp_path / "keys.toml",
        {
            "p": {
                "state_machine_arn": a.state_machine_arn,
                "limit": 6,
                "key_attribute": "tenant",
                "per_key_limit": 2,
            }
        },
        [{"url": a.request_queue_url, "pool": "p"}],
    )
    await send_with(
        a, a.request_queue_url, [{"seconds": i % 2} for i in range(40)], {"tenant": "big"}
    )
    small = [f"small-{i}" for i in range(5)]
    for tenant in small:
        await send_with(
            a, a.request_queue_url, [{"seconds": i % 2} for i in range(3)], {"tenant": tenant}
        )
    async with running_config(a, path):
        await wait_all_ended(a, 55, within=200)
    executions = await records(a)
    assert len(executions) == 55
    assert max_overlap(executions) <= 6
    tenant_of = {key_tag(t): t for t in ["big", *small]}
    by_tenant: dict[str, list[Execution]] = {}
    for e in executions:
        tag = tag_of(e.name)
        assert tag in tenant_of, f"{e.name} carries no known key tag"
        by_tenant.setdefault(tenant_of[tag], []).append(e)
    for tenant, runs in by_tenant.items():
        assert max_overlap(runs) <= 2, f"{tenant} ran more than 2 at once"
    small_done = max(e.stop or 0 for t in small for e in by_tenant[t])
    big_after = [e for e in by_tenant["big"] if e.start > small_done]
    assert len(big_after) >= 20, "the small tenants finished long before the big one"
    async with session().client("sqs", endpoint_url=a.endpoint) as sqs:
        assert await depth(sqs, a.dead_letter_queue_url) == 0, "nothing dead-lettered"


async def test_a_malformed_config_file_stops_start_up_with_the_reason(tmp_path: Path) -> None:
    """`run` with a broken file exits 2 naming what is wrong (no traceback)."""
    path = tmp_path / "broken.toml"
    path.write_text("[pools.p]\nstate_machine_arn = 'nope'\nlimit = -2\n")
    process = await anyio.run_process(
        [sys.executable, "-m", "dispatcher", "run", "--config", str(path)],
        check=False,
        cwd=REPO,
        env={"PATH": os.environ["PATH"], "DISPATCHER_EVENTS_QUEUE_URL": "https://sqs.x/1/e"},
    )
    err = process.stderr.decode()
    assert process.returncode == 2, err
    assert "Traceback" not in err
    assert "[pools.p] state_machine_arn='nope' is invalid" in err
    assert "[pools.p] limit=-2 is invalid" in err
    assert "no queues" in err
