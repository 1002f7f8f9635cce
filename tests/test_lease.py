"""The single-active lease against the emulator's DynamoDB, and two dispatchers on one pool."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import anyio
import pytest

from devtools.polling import wait_until
from devtools.sandbox.provision import SandboxResources
from dispatcher.daemon.lease import Lease, LeaseConfig, Leases
from dispatcher.daemon.service import Dispatcher
from tests.audit import send_requests, session, verdict, workload
from tests.helpers import create_lease_table
from tests.runner import child_process, settings_for

Factory = Callable[..., Awaitable[SandboxResources]]


async def lease_table(endpoint: str) -> str:
    """A fresh lease table (partition key ``pool``)."""
    return await create_lease_table(endpoint, f"lease-{uuid.uuid4().hex[:8]}")


class Clock:
    """A hand-driven clock (wall and monotonic alike)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.mark.timeout(30)
async def test_lease_is_exclusive_fenced_and_taken_over_only_after_expiry(emulator: str) -> None:
    table = await lease_table(emulator)
    clock = Clock()
    config = LeaseConfig(table, "pool-a", ttl=10, margin=2)
    async with session().client("dynamodb", endpoint_url=emulator) as ddb:
        first = Lease(ddb, config, owner="first", monotonic=clock, wall=clock)
        second = Lease(ddb, config, owner="second", monotonic=clock, wall=clock)
        assert await first.try_acquire()
        assert first.epoch == 1
        assert first.valid()
        assert not await second.try_acquire(), "held and not expired"
        clock.now += 5
        assert await first.renew()
        clock.now += 9  # 14 s after taking it, 9 s after renewing: still ours
        assert not await second.try_acquire()
        assert not first.valid(), "first stops trusting it 2 s (margin) before expiry"
        clock.now += 1.5  # now past expires_at
        assert await second.try_acquire()
        assert second.epoch == 2, "a take-over increments the fencing epoch"
        assert not await first.renew(), "the old holder learns it lost the lease"
        assert not first.valid()
        await second.release()
        assert await first.try_acquire(), "a released lease is free at once"
        assert first.epoch == 3


@pytest.mark.timeout(150)
async def test_two_dispatchers_on_one_pool_never_exceed_the_limit(
    sandbox_factory: Factory,
) -> None:
    resources = await sandbox_factory(limit=4)
    table = await lease_table(resources.endpoint)
    async with session().client("sqs", endpoint_url=resources.endpoint) as sqs:
        names = await send_requests(sqs, resources.request_queue_url, workload(60, 0.2, 0.6))
    settings = settings_for(resources, limit=4, lease_table=table, lease_ttl=3)
    one, two = (Dispatcher(settings, endpoint_url=resources.endpoint) for _ in range(2))
    async with anyio.create_task_group() as tg:
        await tg.start(partial(one.run, handle_signals=False))
        await tg.start(partial(two.run, handle_signals=False))
        roles = sorted([one.role, two.role])
        assert roles in (["leader", "standby"], ["standby", "standby"])
        await verdict(resources, names, 4, within=120)
        assert sorted([one.role, two.role]) == ["leader", "standby"]
        standby = one if one.role == "standby" else two
        assert standby.intake is None or standby.intake.stats.started == 0
        one.stop()
        two.stop()


@pytest.mark.timeout(150)
async def test_killing_the_leader_hands_over_within_the_lease_ttl(
    sandbox_factory: Factory,
) -> None:
    resources = await sandbox_factory(limit=3)
    table = await lease_table(resources.endpoint)
    ttl = 3.0
    lease_env = {"DISPATCHER_LEASE_TABLE": table, "DISPATCHER_LEASE_TTL": str(ttl)}
    async with child_process(resources, lease_env) as leader:
        with anyio.fail_after(30):
            await leader.ready.wait()
        standby = Dispatcher(
            settings_for(resources, lease_table=table, lease_ttl=ttl),
            endpoint_url=resources.endpoint,
        )
        async with anyio.create_task_group() as tg:
            await tg.start(partial(standby.run, handle_signals=False))
            assert standby.role == "standby"
            leader.process.send_signal(signal.SIGKILL)
            killed_at = anyio.current_time()
            await leader.process.wait()
            with anyio.fail_after(30):
                await standby.started.wait()
            handover = anyio.current_time() - killed_at
            # Expiry (<= ttl after the last renewal) + one standby poll + the safety margin.
            assert handover <= ttl + ttl / 3 + ttl / 5 + 1.0, f"took {handover:.2f} s"
            assert standby.role == "leader"
            assert standby.lease is not None
            assert standby.lease.epoch == 2
            async with session().client("sqs", endpoint_url=resources.endpoint) as sqs:
                names = await send_requests(sqs, resources.request_queue_url, workload(9, 0.1, 0.3))
            await verdict(resources, names, 3, within=60)
            standby.stop()


@pytest.mark.timeout(150)
async def test_a_paused_leader_stops_starting_before_another_can_start(
    sandbox_factory: Factory,
) -> None:
    resources = await sandbox_factory(limit=3)
    table = await lease_table(resources.endpoint)
    ttl = 3.0
    lease_env = {"DISPATCHER_LEASE_TABLE": table, "DISPATCHER_LEASE_TTL": str(ttl)}
    async with session().client("sqs", endpoint_url=resources.endpoint) as sqs:
        names = await send_requests(sqs, resources.request_queue_url, workload(45, 0.5, 1.0))
    async with child_process(resources, lease_env) as leader:
        with anyio.fail_after(30):
            await leader.ready.wait()
        async with session().client("stepfunctions", endpoint_url=resources.endpoint) as sfn:

            async def started_some() -> bool:
                listed = await sfn.list_executions(stateMachineArn=resources.state_machine_arn)
                return len(listed["executions"]) >= 3

            await wait_until(started_some, within=30, interval=0.05)
        leader.process.send_signal(signal.SIGSTOP)  # paused mid-reign, lease in hand
        other = Dispatcher(
            settings_for(resources, lease_table=table, lease_ttl=ttl),
            endpoint_url=resources.endpoint,
        )
        async with anyio.create_task_group() as tg:
            await tg.start(partial(other.run, handle_signals=False))
            with anyio.fail_after(30):
                await other.started.wait()
            leader.process.send_signal(signal.SIGCONT)  # wakes with a lapsed lease

            async def leader_noticed() -> bool:
                return bool(leader.events("dispatcher.reign_over"))

            await wait_until(leader_noticed, within=30, interval=0.05)
            await verdict(resources, names, 3, within=120)
            took_over: Any = other.lease
            assert took_over is not None
            assert took_over.epoch == 2
            other.stop()
        leader.process.send_signal(signal.SIGTERM)
        with anyio.fail_after(15):
            assert await leader.process.wait() == 0


@pytest.mark.timeout(30)
async def test_leases_are_taken_all_or_none_and_record_what_a_successor_waits(
    emulator: str,
) -> None:
    """X governs {a, b}, Y only {b}: while Y holds b, X holds nothing (a given back at
    once, so Z governing {a} can lead). Each item records its holder's D and grace; a
    successor owes the longer of its own and the recorded, and records that until it has
    waited (settled), then its own."""
    table = await lease_table(emulator)
    clock = Clock()

    def leases(owner: str, keys: list[str], d: float, grace: float) -> Leases:
        return Leases(
            ddb,
            table,
            keys,
            ttl=10,
            margin=2,
            start_timeout=d,
            start_grace=grace,
            owner=owner,
            monotonic=clock,
            wall=clock,
        )

    async with session().client("dynamodb", endpoint_url=emulator) as ddb:
        y = leases("y", ["b"], d=8, grace=2)
        assert await y.try_acquire()
        x = leases("x", ["b", "a"], d=1, grace=1)
        assert not await x.try_acquire(), "b is Y's"
        assert not x.valid()
        z = leases("z", ["a"], d=1, grace=1)
        assert await z.try_acquire(), "X gave a back when it could not take b"
        await z.release()
        clock.now += 11  # Y's lease of b lapses (Y paused, say)
        assert await x.try_acquire()
        assert x.valid()
        assert x.epochs == {"a": 3, "b": 2}
        assert x.owed == 10, "Y's D + grace, recorded in b"
        key = {"pool": {"S": "b"}}

        async def recorded() -> tuple[float, float]:
            item = (await ddb.get_item(TableName=table, Key=key, ConsistentRead=True))["Item"]
            return float(item["start_timeout"]["N"]), float(item["start_grace"]["N"])

        assert await recorded() == (8, 2), "until X has waited, its successor owes Y's wait"
        assert await x.renew()
        assert await recorded() == (8, 2)
        x.settled()
        assert await x.renew()
        assert await recorded() == (1, 1)
        assert not await y.renew(), "Y learns it lost b"
