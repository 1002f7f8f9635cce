"""High availability across rolling changes: processes whose configurations differ share
the lease table, a config change reaches the next leader, a leader that lost its lease (or
cannot renew it) lets go of everything, and lost answers do not bend the counts. Judged
from the executions' own records (start and stop dates) against the emulator, with real
child processes where a signal is part of the story."""

from __future__ import annotations

import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest

from devtools.faults import FaultKind, FaultProxy, FaultRule
from devtools.polling import wait_until
from devtools.records import list_executions
from devtools.sandbox.provision import SandboxResources
from dispatcher.daemon.service import Dispatcher
from dispatcher.settings import layout
from tests.audit import send_requests, verdict, workload
from tests.conftest import SandboxFactory
from tests.helpers import create_lease_table, session
from tests.runner import Child, child_process, config_env, settings_for
from tests.test_pools import share_events, write_config

pytestmark = pytest.mark.timeout(240)

TTL = 3.0


async def lease_table(endpoint: str) -> str:
    """A fresh lease table (partition key ``pool``)."""
    return await create_lease_table(endpoint, f"lease-{uuid.uuid4().hex[:8]}")


def free_port() -> int:
    """A port nothing listens on now (for a child's HTTP endpoints)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def append(path: str, text: str) -> None:
    """Add lines to a file."""
    with Path(path).open("a") as file:
        file.write(text)


def lease_env(table: str) -> dict[str, str]:
    return {"DISPATCHER_LEASE_TABLE": table, "DISPATCHER_LEASE_TTL": str(TTL)}


@asynccontextmanager
async def in_process(
    resources: SandboxResources, env: dict[str, str], endpoint: str | None = None
) -> AsyncIterator[Dispatcher]:
    """A dispatcher from these variables (a config file's), in this process."""
    loaded = layout.load(env=env)
    dispatcher = Dispatcher(
        loaded.settings,
        layout=loaded.layout,
        endpoint_url=endpoint or resources.endpoint,
        environ=env,
    )
    async with anyio.create_task_group() as tg:
        await tg.start(partial(dispatcher.run, handle_signals=False))
        try:
            yield dispatcher
        finally:
            dispatcher.stop()


async def governs(child: Child) -> bool:
    """Whether the child leads now (ready, and no reign ended since)."""
    return len(child.events("dispatcher.ready")) > len(child.events("dispatcher.reign_over"))


# -- exclusion by what is governed -------------------------------------------------------


async def test_processes_with_different_pools_never_both_start_one_state_machine(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """A governs pools {one, two}, B only {one}, one lease table: whatever their pool
    sets, one state machine has one starter at a time; when B (leading) goes, A takes
    over both (a rolling deploy that adds a pool)."""
    one = await sandbox_factory(limit=3)
    two = await sandbox_factory(limit=3)
    await share_events(one, two)
    table = await lease_table(one.endpoint)
    both = write_config(
        tmp_path / "both.toml",
        {
            "one": {"state_machine_arn": one.state_machine_arn, "limit": 3},
            "two": {"state_machine_arn": two.state_machine_arn, "limit": 3},
        },
        [
            {"url": one.request_queue_url, "pool": "one"},
            {"url": two.request_queue_url, "pool": "two"},
        ],
    )
    only_one = write_config(
        tmp_path / "one.toml",
        {"one": {"state_machine_arn": one.state_machine_arn, "limit": 3}},
        [{"url": one.request_queue_url, "pool": "one"}],
    )
    env_a = config_env(one, both, **lease_env(table))
    port = {"DISPATCHER_HTTP_PORT": str(free_port())}
    env_b = config_env(one, only_one, **lease_env(table))
    async with in_process(one, env_b) as b:
        assert b.role == "leader"
        async with child_process(one, port, base_env=env_a) as a:
            status_url = f"http://127.0.0.1:{port['DISPATCHER_HTTP_PORT']}/status"

            async def settled() -> bool:  # A is up, as leader or standby
                try:
                    role = (await fetch(status_url))["role"]
                except OSError:
                    return False
                return role in ("leader", "standby")

            await wait_until(settled, within=30, interval=0.1)
            async with session().client("sqs", endpoint_url=one.endpoint) as sqs:
                names_one = await send_requests(sqs, one.request_queue_url, workload(24, 3.0, 5.0))
                names_two = await send_requests(
                    sqs, two.request_queue_url, workload(6, 0.5, 1.0, seed=3)
                )
            await verdict(one, names_one, 3, within=150)
            assert b.role == "leader"
            assert not await governs(a), "A cannot lead: B holds the lease of `one`"
            b.stop()  # the old version goes: A (one more pool) takes over both
            with anyio.fail_after(30):
                await a.ready.wait()
            async with session().client("sqs", endpoint_url=one.endpoint) as sqs:
                more = await send_requests(sqs, one.request_queue_url, workload(9, 1.0, 2.0, 5))
            await verdict(one, names_one + more, 3, within=120)
            await verdict(two, names_two, 3, within=120)
            a.process.send_signal(signal.SIGTERM)
            with anyio.fail_after(20):
                assert await a.process.wait() == 0


# -- a new leader reads its limits afresh ------------------------------------------------


async def test_a_take_over_applies_the_config_file_as_it_is_now(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """The file's limit lowered 4 -> 1 and SIGHUP to the leader; kill -9 the leader; the
    standby, which read 4 at its start, takes over with 1."""
    resources = await sandbox_factory(limit=4)
    table = await lease_table(resources.endpoint)
    pool = {"state_machine_arn": resources.state_machine_arn}
    queues = [{"url": resources.request_queue_url, "pool": "one"}]
    path = write_config(tmp_path / "c.toml", {"one": {**pool, "limit": 4}}, queues)
    env = config_env(resources, path, **lease_env(table))
    async with child_process(resources, base_env=env) as leader:
        with anyio.fail_after(30):
            await leader.ready.wait()
        async with in_process(resources, env) as standby:
            assert standby.role == "standby"
            assert standby.pool.ledger.limit == 4
            write_config(tmp_path / "c.toml", {"one": {**pool, "limit": 1}}, queues)
            append(path, "[dispatcher]\nreceive_concurrency = 2\n")  # needs a restart
            leader.process.send_signal(signal.SIGHUP)

            async def lowered() -> bool:
                return bool(leader.events("dispatcher.limit_changed"))

            await wait_until(lowered, within=20, interval=0.05)
            [unapplied] = leader.events("dispatcher.reload_needs_restart")
            assert unapplied["change"] == "receive_concurrency 4 -> 2"
            leader.process.send_signal(signal.SIGKILL)
            await leader.process.wait()
            async with session().client("sqs", endpoint_url=resources.endpoint) as sqs:
                names = await send_requests(sqs, resources.request_queue_url, workload(8, 1.0, 2.0))
            with anyio.fail_after(30):
                await standby.started.wait()
            assert standby.pool.ledger.limit == 1
            await verdict(resources, names, 1, within=120)


async def test_a_new_holder_waits_for_the_start_timeout_its_predecessor_recorded(
    sandbox: SandboxResources,
) -> None:
    """The lease item says its last holder's D was 4 s and its grace 1 s; a process with
    D = 1 s, grace 0.5 s that takes it over lists no sooner than 5 s after, and once it
    has, the item carries its own D and grace for its successor."""
    table = await lease_table(sandbox.endpoint)
    async with session().client("dynamodb", endpoint_url=sandbox.endpoint) as ddb:
        key = {"pool": {"S": sandbox.state_machine_arn}}
        await ddb.put_item(
            TableName=table,
            Item={
                **key,
                "owner": {"S": "a-process-with-a-long-D"},
                "epoch": {"N": "7"},
                "expires_at": {"N": f"{time.time() - 1:.3f}"},  # it lapsed: free to take
                "start_timeout": {"N": "4"},
                "start_grace": {"N": "1"},
            },
        )
        settings = settings_for(sandbox, lease_table=table, lease_ttl=TTL)
        assert settings.start_timeout + settings.start_grace == 1.5
        dispatcher = Dispatcher(settings, endpoint_url=sandbox.endpoint)
        async with anyio.create_task_group() as tg:
            began = anyio.current_time()
            await tg.start(partial(dispatcher.run, handle_signals=False))
            with anyio.fail_after(30):
                await dispatcher.started.wait()
            waited = anyio.current_time() - began
            assert waited >= 5.0, f"listed {waited:.2f} s after taking the lease"
            assert dispatcher.lease is not None
            assert dispatcher.lease.epoch == 8

            async def records_its_own() -> bool:
                item = (await ddb.get_item(TableName=table, Key=key, ConsistentRead=True))["Item"]
                recorded = (float(item["start_timeout"]["N"]), float(item["start_grace"]["N"]))
                return recorded == (1.0, 0.5)

            await wait_until(records_its_own, within=10, interval=0.1)
            dispatcher.stop()


# -- losing the lease lets go of everything ----------------------------------------------


def sample(dispatcher: Dispatcher, name: str, **labels: str) -> float | None:
    return dispatcher.metrics.registry.get_sample_value(name, labels)


async def test_a_leader_whose_renewal_hangs_steps_down_within_its_lease(
    sandbox_factory: SandboxFactory,
) -> None:
    """Only the lease's UpdateItem is held (everything else answers): the leader gives up
    within the lease, stops consuming status events, hands back its waiting requests and
    reports standby, nothing running, not ready; the standby takes over and the limit
    holds from the records."""
    resources = await sandbox_factory(limit=2)
    table = await lease_table(resources.endpoint)
    async with session().client("sqs", endpoint_url=resources.endpoint) as sqs:
        names = await send_requests(sqs, resources.request_queue_url, workload(16, 2.0, 3.0))
    settings = settings_for(resources, lease_table=table, lease_ttl=TTL)
    async with FaultProxy(resources.endpoint, seed=3) as proxy:
        old = Dispatcher(settings, endpoint_url=proxy.url)
        new = Dispatcher(settings, endpoint_url=resources.endpoint)
        async with anyio.create_task_group() as tg:
            await tg.start(partial(old.run, handle_signals=False))
            assert old.role == "leader"
            await tg.start(partial(new.run, handle_signals=False))
            assert new.role == "standby"
            async with session().client("stepfunctions", endpoint_url=resources.endpoint) as sfn:

                async def started_two() -> bool:
                    return len(await list_executions(sfn, resources.state_machine_arn)) >= 2

                await wait_until(started_two, within=30, interval=0.05)
            proxy.add(FaultRule("UpdateItem", FaultKind.LATENCY, delay=120.0))
            held_at = anyio.current_time()
            events = old.events
            assert events is not None

            async def let_go() -> bool:
                return old.role == "standby" and old.status()["running"] == 0

            with anyio.fail_after(TTL + 5):
                await new.started.wait()
            await wait_until(let_go, within=TTL + 5, interval=0.05)
            # Within the lease (and the end of the intake's last one-second long poll).
            assert anyio.current_time() - held_at <= TTL + 3
            applied = events.applied
            status: dict[str, Any] = old.status()
            assert status["ready"] is False
            assert status["lease"]["held"] is False
            assert status["running"] == 0
            assert status["pools"]["default"]["waiting"] == 0
            assert sample(old, "dispatcher_running", pool="default") == 0
            assert sample(old, "dispatcher_leader") == 0
            await verdict(resources, names, 2, within=150)
            assert events.applied == applied, "events meant for the new leader consumed"
            new.stop()
            old.stop()


async def test_a_leader_paused_past_its_lease_reports_nothing_it_no_longer_governs(
    sandbox_factory: SandboxFactory,
) -> None:
    """SIGSTOP longer than the lease, SIGCONT: the old leader is a standby, and its /status
    and /metrics say so (nothing running, lease not held), so `drain --wait` and `status`
    judge from the executions and the real leader."""
    resources = await sandbox_factory(limit=3)
    table = await lease_table(resources.endpoint)
    async with session().client("sqs", endpoint_url=resources.endpoint) as sqs:
        names = await send_requests(sqs, resources.request_queue_url, workload(18, 3.0, 4.0))
    async with child_process(resources, lease_env(table)) as leader:
        with anyio.fail_after(30):
            await leader.ready.wait()
        async with session().client("stepfunctions", endpoint_url=resources.endpoint) as sfn:

            async def started_three() -> bool:
                return len(await list_executions(sfn, resources.state_machine_arn)) >= 3

            await wait_until(started_three, within=30, interval=0.05)
        leader.process.send_signal(signal.SIGSTOP)
        other = Dispatcher(
            settings_for(resources, lease_table=table, lease_ttl=TTL),
            endpoint_url=resources.endpoint,
        )
        async with anyio.create_task_group() as tg:
            await tg.start(partial(other.run, handle_signals=False))
            with anyio.fail_after(30):
                await other.started.wait()
            leader.process.send_signal(signal.SIGCONT)

            async def noticed() -> bool:
                return bool(leader.events("dispatcher.reign_over"))

            await wait_until(noticed, within=30, interval=0.05)
            url = f"http://127.0.0.1:{leader.http_port}"

            async def reports_nothing_running() -> bool:
                status = await fetch(f"{url}/status")
                return bool(status["role"] == "standby" and status["running"] == 0)

            await wait_until(reports_nothing_running, within=15, interval=0.1)
            status = await fetch(f"{url}/status")
            assert status["pools"]["default"]["running"] == 0
            assert status["lease"]["held"] is False
            metrics = await fetch_text(f"{url}/metrics")
            assert 'dispatcher_running{pool="default"} 0.0' in metrics
            assert "dispatcher_leader 0.0" in metrics
            await verdict(resources, names, 3, within=150)
            other.stop()
        leader.process.send_signal(signal.SIGTERM)
        with anyio.fail_after(15):
            assert await leader.process.wait() == 0


async def fetch(url: str) -> dict[str, Any]:
    import json  # noqa: PLC0415

    return dict(json.loads(await fetch_text(url)))


async def fetch_text(url: str) -> str:
    import aiohttp  # noqa: PLC0415

    async with aiohttp.ClientSession() as client, client.get(url) as response:
        return await response.text()


# -- counting that tells the truth -------------------------------------------------------


async def test_a_start_whose_answer_was_lost_is_counted_started_once(
    sandbox_factory: SandboxFactory,
) -> None:
    """A third of the StartExecution answers are lost (the execution starts, the answer
    does not arrive): the retry meets the execution, and every one counts as started,
    none as a duplicate - as many starts reported as the records show."""
    resources = await sandbox_factory(limit=5)
    async with session().client("sqs", endpoint_url=resources.endpoint) as sqs:
        names = await send_requests(sqs, resources.request_queue_url, workload(30, 0.0, 0.4))
    settings = settings_for(resources)
    async with FaultProxy(resources.endpoint, seed=11) as proxy:
        rule = proxy.add(FaultRule("StartExecution", FaultKind.DROP_RESPONSE, probability=0.3))
        dispatcher = Dispatcher(settings, endpoint_url=proxy.url)
        async with anyio.create_task_group() as tg:
            await tg.start(partial(dispatcher.run, handle_signals=False))
            await verdict(resources, names, 5, within=150)
            assert rule.fired >= 3
            assert dispatcher.intake is not None
            stats = dispatcher.intake.stats
            assert (stats.started, stats.duplicates) == (len(names), 0)
            dispatcher.stop()
