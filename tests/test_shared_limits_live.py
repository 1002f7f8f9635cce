"""Named limits against the emulator: two state machines sharing one limit with weights 1
and 2, judged from the executions' own start and stop dates (the weighted sum of the
executions running at once), across a live change of the limit and a kill -9."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import anyio
import pytest

from devtools.polling import wait_until
from devtools.records import Execution, list_executions, max_weighted_overlap, weighted_at
from devtools.sandbox.provision import SandboxResources
from tests.audit import send_requests, workload
from tests.conftest import SandboxFactory
from tests.helpers import depth, session
from tests.runner import child_process, config_env, running_config
from tests.test_pools import share_events

pytestmark = pytest.mark.timeout(300)

LIGHT, HEAVY = 1, 2


def write_shared_config(
    path: Path,
    light: SandboxResources,
    heavy: SandboxResources,
    *,
    limit: int,
    parameter: str | None = None,
) -> str:
    """Pool ``invoices`` (weight 1, limit 4) and ``refunds`` (weight 2, limit 3) sharing
    the named limit ``partner-api``."""
    named = f'limit_parameter = "{parameter}"\n' if parameter else ""
    path.write_text(
        f"[limits.partner-api]\nlimit = {limit}\n{named}\n"
        f'[pools.invoices]\nstate_machine_arn = "{light.state_machine_arn}"\nlimit = 4\n'
        f"uses = {{ partner-api = {LIGHT} }}\n\n"
        f'[pools.refunds]\nstate_machine_arn = "{heavy.state_machine_arn}"\nlimit = 3\n'
        f"uses = {{ partner-api = {HEAVY} }}\n\n"
        f'[[queues]]\nurl = "{light.request_queue_url}"\npool = "invoices"\n\n'
        f'[[queues]]\nurl = "{heavy.request_queue_url}"\npool = "refunds"\n'
    )
    return str(path)


async def weighted_runs(
    light: SandboxResources, heavy: SandboxResources
) -> tuple[list[Execution], list[Execution], list[tuple[Execution, int]]]:
    """Both state machines' executions, and every one paired with its pool's weight."""
    async with session().client("stepfunctions", endpoint_url=light.endpoint) as sfn:
        ones = await list_executions(sfn, light.state_machine_arn)
        twos = await list_executions(sfn, heavy.state_machine_arn)
    return ones, twos, [(e, LIGHT) for e in ones] + [(e, HEAVY) for e in twos]


async def all_served(
    light: SandboxResources, heavy: SandboxResources, names: dict[str, list[str]], within: float
) -> None:
    """Wait until every request's execution exists and has ended and both queues are empty."""

    async def done() -> bool:
        ones, twos, _ = await weighted_runs(light, heavy)
        async with session().client("sqs", endpoint_url=light.endpoint) as sqs:
            empty = (
                await depth(sqs, light.request_queue_url) == 0
                and await depth(sqs, heavy.request_queue_url) == 0
            )
        ended = {
            "invoices": {e.name for e in ones if e.status != "RUNNING"},
            "refunds": {e.name for e in twos if e.status != "RUNNING"},
        }
        return empty and all(set(names[p]) <= ended[p] for p in names)

    await wait_until(done, within=within, interval=0.5)


def exactly_once(executions: list[Execution], names: list[str]) -> None:
    started = sorted(e.name for e in executions)
    assert started == sorted(names), "every request started exactly once"


def over(runs: list[tuple[Execution, int]], limit: int, since: float, until: float) -> list[str]:
    """Starts in [since, until) that put the weighted use above ``limit``."""
    return [
        f"{e.name} at {e.start:.3f}: {weighted_at(runs, e.start)} > {limit}"
        for e, _ in runs
        if since <= e.start < until and weighted_at(runs, e.start) > limit
    ]


async def test_two_state_machines_hold_a_weighted_limit_across_a_live_change(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """Limit 4 (the parameter), lowered to 2 then raised to 5 mid-run: every start fits the
    value in force when it was made, counting refunds twice; every request starts once;
    refunds (weight 2) are served while invoices (weight 1) still wait."""
    light = await sandbox_factory(limit=4)  # its limit parameter holds the named limit
    heavy = await sandbox_factory()
    await share_events(light, heavy)
    path = write_shared_config(
        tmp_path / "shared.toml", light, heavy, limit=3, parameter=light.limit_parameter
    )
    async with session().client("sqs", endpoint_url=light.endpoint) as sqs:
        names = {
            "invoices": await send_requests(sqs, light.request_queue_url, workload(30, 0.6, 1.4)),
            "refunds": await send_requests(
                sqs, heavy.request_queue_url, workload(14, 0.6, 1.4, seed=5)
            ),
        }
    refresh = 0.25
    async with (
        session().client("ssm", endpoint_url=light.endpoint) as ssm,
        running_config(light, path, DISPATCHER_LIMIT_REFRESH_INTERVAL=str(refresh)) as dispatcher,
    ):
        shared = dispatcher.shared
        assert shared is not None
        assert shared.limit("partner-api") == 4, "the parameter wins over the file's limit"
        pools = dispatcher.pools

        def started(n: int) -> bool:
            return pools["invoices"].started_total + pools["refunds"].started_total >= n

        async def reached(n: int) -> bool:
            return started(n)

        await wait_until(lambda: reached(10), within=60, interval=0.05)
        lowered_at = time.time()
        await ssm.put_parameter(Name=light.limit_parameter, Value="2", Overwrite=True)
        await wait_until(lambda: reached(22), within=120, interval=0.05)
        raised_at = time.time()
        await ssm.put_parameter(Name=light.limit_parameter, Value="5", Overwrite=True)
        await all_served(light, heavy, names, within=150)
        status = dispatcher.status()["limits"]["partner-api"]
        assert status["users"] == {"invoices": LIGHT, "refunds": HEAVY}
        assert status["limit"] == 5
    ones, twos, runs = await weighted_runs(light, heavy)
    exactly_once(ones, names["invoices"])
    exactly_once(twos, names["refunds"])
    slack = 4 * refresh + 0.5  # a change reaches the dispatcher within one refresh
    assert not over(runs, 4, 0.0, lowered_at + slack)
    assert not over(runs, 2, lowered_at + slack, raised_at)
    assert not over(runs, 5, raised_at, float("inf"))
    assert max_weighted_overlap(runs) <= 5
    after = [e for e, _ in runs if e.start >= raised_at + slack]
    assert max(weighted_at(runs, e.start) for e in after) > 2, "the raise took effect"
    # Not starved: refunds started throughout, not only once invoices ran out.
    last_invoice = max(e.start for e in ones)
    assert sum(1 for e in twos if e.start < last_invoice) >= len(twos) // 2


async def test_a_kill_9_and_a_restart_rebuild_the_weighted_use_from_the_listings(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """A dispatcher process killed mid-run; its successor counts what runs of both state
    machines, with their weights, before it starts anything."""
    light = await sandbox_factory()
    heavy = await sandbox_factory()
    await share_events(light, heavy)
    path = write_shared_config(tmp_path / "kill.toml", light, heavy, limit=4)
    async with session().client("sqs", endpoint_url=light.endpoint) as sqs:
        names = {
            "invoices": await send_requests(sqs, light.request_queue_url, workload(24, 1.0, 2.0)),
            "refunds": await send_requests(
                sqs, heavy.request_queue_url, workload(12, 1.0, 2.0, seed=5)
            ),
        }

    async def some_started() -> bool:
        ones, twos, _ = await weighted_runs(light, heavy)
        return len(ones) + len(twos) >= 8

    env = config_env(light, path)
    async with child_process(light, base_env=env) as first:
        with anyio.fail_after(60):
            await first.ready.wait()
        await wait_until(some_started, within=60, interval=0.05)
        first.process.send_signal(signal.SIGKILL)
        with anyio.fail_after(10):
            await first.process.wait()
    assert first.process.returncode == -signal.SIGKILL
    async with child_process(light, base_env=env) as second:
        with anyio.fail_after(60):
            await second.ready.wait()
        await all_served(light, heavy, names, within=180)
        second.process.send_signal(signal.SIGTERM)
        with anyio.fail_after(15):
            assert await second.process.wait() == 0
    ones, twos, runs = await weighted_runs(light, heavy)
    exactly_once(ones, names["invoices"])
    exactly_once(twos, names["refunds"])
    assert not over(runs, 4, 0.0, float("inf"))
    assert max_weighted_overlap(runs) <= 4
