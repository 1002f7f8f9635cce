"""Scenario 4: memory and reconcile time at scale; the backlog stays in SQS, not in memory.

Part one: the dispatcher starts 10,000 long executions (limit 10,000) and holds them;
then its RSS, and the duration of its reconcile passes (``ListExecutions`` over every
page plus the ledger update) from its own ``dispatcher_reconcile_duration_seconds``.
Part two: RSS with 500 requests queued vs 50,000 queued, limit 20, long executions.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import anyio

from bench import prom
from bench.aws import session
from bench.child import Child, dispatcher_child
from bench.proc import sample
from bench.workload import stream, submit
from devtools.polling import wait_until
from devtools.sandbox import Emulator, SandboxResources, provision

RECONCILE = "dispatcher_reconcile_duration_seconds"


@dataclass(frozen=True)
class Config:
    """The scale run's sizes."""

    running: int = 10_000
    wait_seconds: int = 900  # executions outlive the measurement
    reconcile_interval: float = 10.0
    reconcile_passes: int = 2
    ramp_within: float = 300.0  # give up growing the running set after this long
    queued_small: int = 500
    queued_large: int = 50_000
    queued_limit: int = 20


async def _reconcile_passes(child: Child, passes: int, within: float) -> dict[str, Any]:
    """Wait for ``passes`` more reconcile passes; their mean duration from the histogram."""
    total0, count0 = prom.histogram_mean(await child.metrics(), RECONCILE)
    with anyio.fail_after(within):
        # Polling the child's metrics: the only way to watch another process.
        while True:
            total, count = prom.histogram_mean(samples := await child.metrics(), RECONCILE)
            if count >= count0 + passes:
                break
            await anyio.sleep(0.5)
    return {
        "passes": int(count - count0),
        "mean_seconds": round((total - total0) / (count - count0), 4),
        "histogram_p99_seconds_all_passes": round(
            prom.histogram_quantile(samples, RECONCILE, 0.99), 4
        ),
    }


async def _listing_seconds(endpoint: str, machine_arn: str) -> tuple[int, float]:
    """How long listing every RUNNING execution takes from here (the emulator's share)."""
    async with session().client("stepfunctions", endpoint_url=endpoint) as sfn:
        began, listed = time.perf_counter(), 0
        paginator = sfn.get_paginator("list_executions")
        async for page in paginator.paginate(
            stateMachineArn=machine_arn,
            statusFilter="RUNNING",
            PaginationConfig={"PageSize": 1000},
        ):
            listed += len(page["executions"])
        return listed, round(time.perf_counter() - began, 4)


async def running_set(cfg: Config) -> dict[str, Any]:
    """Hold ``cfg.running`` executions; RSS and reconcile duration at that size."""
    print(f"[bench] scale: {cfg.running} running executions")
    async with Emulator() as emulator:
        assert emulator.pid is not None
        resources = await provision(emulator.endpoint, prefix="scale-running", limit=cfg.running)
        requests = stream(cfg.running, cfg.wait_seconds, cfg.wait_seconds, prefix="run")
        await submit(resources.request_queue_url, requests, emulator.endpoint)
        settings = {"limit": cfg.running, "reconcile_interval": cfg.reconcile_interval}
        async with dispatcher_child(resources, settings) as child:
            ready = child.sample()
            ramp: list[tuple[float, int, float]] = []  # seconds, running, RSS MiB
            with anyio.move_on_after(cfg.ramp_within):
                # Polling the child's /status: the only way to watch another process.
                while True:
                    running = int((await child.status())["running"])
                    ramp.append(
                        (round(time.monotonic() - ready.at, 2), running, child.sample().rss_mib)
                    )
                    if running >= cfg.running:
                        break
                    await anyio.sleep(1.0)
            held = ramp[-1][1]
            reconcile = await _reconcile_passes(
                child,
                cfg.reconcile_passes,
                cfg.reconcile_interval * (cfg.reconcile_passes + 2) + 120,
            )
            at_size = child.sample()
            listed, listing_seconds = await _listing_seconds(
                emulator.endpoint, resources.state_machine_arn
            )
            emulator_sample = sample(emulator.pid)
    return {
        "target_running": cfg.running,
        "running_held": held,
        "reached_target": held >= cfg.running,
        "seconds_to_hold_all": ramp[-1][0],
        "rss_mib_at_ready": round(ready.rss_mib, 1),
        "rss_mib_holding": round(at_size.rss_mib, 1),
        "peak_rss_mib": round(at_size.peak_rss_mib, 1),
        "reconcile": reconcile | {"interval_seconds": cfg.reconcile_interval},
        "listing_from_driver": {"listed": listed, "seconds": listing_seconds},
        "emulator": {
            "rss_mib": round(emulator_sample.rss_mib, 1),
            "threads": emulator_sample.threads,
        },
        "ramp": ramp,
    }


async def _idle_with_backlog(
    resources: SandboxResources, cfg: Config, queued: int
) -> dict[str, Any]:
    """Run a dispatcher on a queue holding ``queued`` requests until its slots are full."""
    settings = {"limit": cfg.queued_limit, "reconcile_interval": 5}
    async with dispatcher_child(resources, settings) as child:

        async def full() -> bool:
            return int((await child.status())["running"]) >= cfg.queued_limit

        await wait_until(full, within=120)
        await _reconcile_passes(child, 2, 60)
        held = child.sample()
        status = await child.status()
        async with session().client("sqs", endpoint_url=resources.endpoint) as sqs:
            attrs = await sqs.get_queue_attributes(
                QueueUrl=resources.request_queue_url,
                AttributeNames=["ApproximateNumberOfMessages"],
            )
    return {
        "queued": queued,
        "still_queued": int(attrs["Attributes"]["ApproximateNumberOfMessages"]),
        "received_by_dispatcher": status["intake"]["received"],
        "running": status["running"],
        "rss_mib": round(held.rss_mib, 1),
        "peak_rss_mib": round(held.peak_rss_mib, 1),
    }


async def backlog(cfg: Config) -> dict[str, Any]:
    """RSS with a small and a large backlog; the backlog must stay in SQS."""
    print(f"[bench] scale: RSS with {cfg.queued_small} vs {cfg.queued_large} queued")
    out: dict[str, Any] = {}
    async with Emulator() as emulator:
        for label, count in (("small", cfg.queued_small), ("large", cfg.queued_large)):
            resources = await provision(
                emulator.endpoint, prefix=f"scale-queued-{label}", limit=cfg.queued_limit
            )
            requests = stream(count, cfg.wait_seconds, cfg.wait_seconds, prefix=f"q{label}")
            await submit(resources.request_queue_url, requests, emulator.endpoint)
            out[label] = await _idle_with_backlog(resources, cfg, count)
    small, large = out["small"]["rss_mib"], out["large"]["rss_mib"]
    out["large_over_small"] = round(large / small, 4) if small else None
    return out


async def run(cfg: Config) -> dict[str, Any]:
    """Both parts."""
    return {
        "config": asdict(cfg),
        "running_set": await running_set(cfg),
        "backlog": await backlog(cfg),
    }
