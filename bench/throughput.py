"""Scenario 2: how fast the dispatcher starts executions, against what the emulator can take.

Zero-length executions and a limit far above what is ever running, so nothing but start
speed counts. The emulator's raw ``StartExecution`` capacity is measured in the same run,
on the same emulator, by a bare aioboto3 loop with as many tasks as the dispatcher has
pooled connections to Step Functions (64), once before and once after the dispatcher.
The dispatcher runs as a child process, so its CPU and RSS are its own. A second run at
limit 200 shows the rate when slots must be handed over (freed by terminal events), and
the events loop is measured on its own (`bench.events_capacity`).

Yardsticks in the same run: the bare loop with the dispatcher's client options
(``tuned``: fixed User-Agent, no client-side validation) and through a hand-written client
(``thin``: aiohttp and a SigV4 signer, no botocore); the emulator's CPU per receive and
delete at two queue depths (it scans the queue on every call, which real SQS does not);
DeleteMessageBatch calls per start on each queue, from the deleters' closing lines.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Awaitable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import anyio

from bench import events_capacity, prom
from bench.analysis import percentile
from bench.aws import session
from bench.capacity import delete_costs, raw_capacity, sqs_cost_by_depth, thin_capacity
from bench.child import Child, dispatcher_child
from bench.proc import LoadMeter, ProcSample, sample
from bench.workload import Request, stream, submit
from devtools.records import list_executions, max_overlap
from devtools.sandbox import Emulator, provision

CONNECTIONS = 64  # max_pool_connections of the dispatcher's clients (dispatcher/aws/api.py)
LATENCY = "dispatcher_start_execution_seconds"


@dataclass(frozen=True)
class Config:
    """The throughput run's size."""

    requests: int = 3000
    raw_starts: int = 2000
    limit: int = 10_000  # above the request count: never what holds starts back
    concurrency: int = CONNECTIONS
    delete_messages: int = 1000  # for the DeleteMessage vs DeleteMessageBatch comparison
    warm_up: int = 200  # raw starts before measuring: connections, first-call costs
    events: int = 5000  # synthetic status events for the events-loop capacity
    bounded_limit: int = 200  # a second run where the limit binds: hand-over speed counts


async def _emulator_cpu(
    pid: int, measured: Awaitable[dict[str, Any]], count: int
) -> dict[str, Any]:
    """Run ``measured`` and add the emulator's CPU per start during it."""
    began = sample(pid).cpu_seconds
    result = await measured
    result["emulator_cpu_ms_per_start"] = round((sample(pid).cpu_seconds - began) / count * 1000, 3)
    return result


def sustained_rate(starts: list[float]) -> dict[str, float]:
    """Starts per second over the whole run and over its middle 80% (no ramp-up/down)."""
    ordered = sorted(starts)
    n = len(ordered)
    whole = (n - 1) / (ordered[-1] - ordered[0]) if n > 1 and ordered[-1] > ordered[0] else 0.0
    lo, hi = int(n * 0.1), int(n * 0.9)
    span = ordered[hi] - ordered[lo] if hi > lo else 0.0
    middle = (hi - lo) / span if span > 0 else 0.0
    return {"whole_run": round(whole, 1), "middle_80_percent": round(middle, 1)}


async def _until_done(
    child: Child, count: int, emulator_pid: int
) -> tuple[ProcSample, ProcSample, ProcSample]:
    """Samples of the child when all were started and when every end was seen, and of
    the emulator when all were started."""
    started: tuple[ProcSample, ProcSample] | None = None
    with anyio.fail_after(600):
        # Polling the child's /status: the only way to watch another process.
        while True:
            status = await child.status()
            if started is None and status["started"] >= count:
                started = child.sample(), sample(emulator_pid)
            if status["finished"] >= count:
                if started is None:
                    started = child.sample(), sample(emulator_pid)
                return started[0], child.sample(), started[1]
            await anyio.sleep(0.5)


def deletes_per_queue(
    lines: Iterable[str], queues: dict[str, str], count: int
) -> dict[str, dict[str, float]]:
    """``DeleteMessageBatch`` calls and handles per call on each queue (name -> URL), from
    the deleters' closing lines (``dispatcher.deletes_flushed``), per start."""
    out: dict[str, dict[str, float]] = {}
    by_url = {url: name for name, url in queues.items()}
    for line in lines:
        if '"dispatcher.deletes_flushed"' not in line:
            continue
        record = json.loads(line)
        name = by_url.get(record["queue"])
        if name is None:
            continue
        calls, deleted = int(record["calls"]), int(record["deleted"])
        out[name] = {
            "calls": calls,
            "deleted": deleted,
            "calls_per_start": round(calls / count, 3),
            "handles_per_call": round(deleted / calls, 2) if calls else 0.0,
        }
    return out


async def _dispatcher_run(
    endpoint: str, emulator_pid: int, prefix: str, requests: list[Request], limit: int
) -> dict[str, Any]:
    """Start ``requests`` with a dispatcher child at ``limit``; its rate, CPU, RSS, calls."""
    resources = await provision(endpoint, prefix=prefix, limit=limit)
    await submit(resources.request_queue_url, requests, endpoint)
    count = len(requests)
    async with dispatcher_child(resources, {"limit": limit}) as child:
        ready, emulator_ready = child.sample(), sample(emulator_pid)
        started_at, finished_at, emulator_started = await _until_done(child, count, emulator_pid)
        emulator_done = sample(emulator_pid)
        samples = await child.metrics()
    async with session().client("stepfunctions", endpoint_url=endpoint) as sfn:
        executions = await list_executions(sfn, resources.state_machine_arn)
    starts = sorted(e.start for e in executions)
    cpu = finished_at.cpu_seconds - ready.cpu_seconds
    calls = prom.by_label(samples, "dispatcher_aws_calls_total", "operation")
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    return {
        "limit": limit,
        "started": len(executions),
        "starts_per_second": sustained_rate(starts),
        "cpu_seconds": round(cpu, 3),
        "cpu_ms_per_start": round(cpu / count * 1000, 3),
        "max_concurrency_from_records": max_overlap(executions),
        "held_at_most": (child.summary or {}).get("max_running"),
        "rss_mib_at_ready": round(ready.rss_mib, 1),
        "rss_mib_at_end": round(finished_at.rss_mib, 1),
        "peak_rss_mib": round(finished_at.peak_rss_mib, 1),
        "seconds_ready_to_all_started": round(started_at.at - ready.at, 3),
        "seconds_all_started_to_all_ends_seen": round(finished_at.at - started_at.at, 3),
        "cores_used_while_starting": round(
            (started_at.cpu_seconds - ready.cpu_seconds) / (started_at.at - ready.at), 2
        ),
        "emulator_cores_used_while_starting": round(
            (emulator_started.cpu_seconds - emulator_ready.cpu_seconds)
            / (emulator_started.at - emulator_ready.at),
            2,
        ),
        "emulator_cpu_ms_per_start": round(
            (emulator_done.cpu_seconds - emulator_ready.cpu_seconds) / count * 1000, 3
        ),
        "api_calls_per_start": {op: round(n / count, 3) for op, n in sorted(calls.items())},
        "delete_batches": deletes_per_queue(
            child.tail,
            {"requests": resources.request_queue_url, "events": resources.events_queue_url},
            count,
        ),
        "start_execution_latency_p50_s": round(prom.histogram_quantile(samples, LATENCY, 0.5), 4),
        "start_execution_latency_p99_s": round(prom.histogram_quantile(samples, LATENCY, 0.99), 4),
        "median_gap_between_starts_ms": round(percentile(gaps, 50) * 1000, 3),
        "exit_summary": child.summary,
    }


async def run(cfg: Config) -> dict[str, Any]:
    """Raw capacity, the dispatcher's sustained rate, CPU per start, peak RSS, call costs."""
    requests = stream(cfg.requests, None, None, prefix="tp")
    print(f"[bench] throughput: {cfg.requests} zero-length requests, raw loop {cfg.raw_starts}")
    async with Emulator() as emulator:
        endpoint = emulator.endpoint
        assert emulator.pid is not None
        meter = LoadMeter()
        meter.track(emulator.pid)
        meter.track(os.getpid())
        raw = await provision(endpoint, prefix="tp-raw", limit=cfg.limit)
        arn = raw.state_machine_arn
        await raw_capacity(endpoint, arn, cfg.warm_up, "warm-up", cfg.concurrency)
        before = await _emulator_cpu(
            emulator.pid,
            raw_capacity(endpoint, arn, cfg.raw_starts, "before", cfg.concurrency),
            cfg.raw_starts,
        )
        tuned = await _emulator_cpu(
            emulator.pid,
            raw_capacity(endpoint, arn, cfg.raw_starts, "tuned", cfg.concurrency, tuned=True),
            cfg.raw_starts,
        )
        # The floor a hand-written client (no botocore) would reach: a yardstick only.
        thin = await _emulator_cpu(
            emulator.pid,
            thin_capacity(endpoint, arn, cfg.raw_starts, "thin", cfg.concurrency),
            cfg.raw_starts,
        )
        unbounded = await _dispatcher_run(
            endpoint, emulator.pid, "tp-dispatcher", requests, cfg.limit
        )
        load = meter.stop()
        after = await _emulator_cpu(
            emulator.pid,
            raw_capacity(endpoint, arn, cfg.raw_starts, "after", cfg.concurrency),
            cfg.raw_starts,
        )
        print(f"[bench] throughput: the same at limit {cfg.bounded_limit}")
        bounded = await _dispatcher_run(
            endpoint,
            emulator.pid,
            "tp-bounded",
            stream(cfg.requests, None, None, prefix="tb"),
            cfg.bounded_limit,
        )
        costs = await delete_costs(
            endpoint, raw.request_queue_url, cfg.delete_messages, emulator.pid
        )
        depth_costs = await sqs_cost_by_depth(endpoint, emulator.pid)
        print(f"[bench] throughput: events loop, {cfg.events} status events")
        spare = await provision(endpoint, prefix="tp-events", limit=0)
        events = await events_capacity.run(spare, cfg.events)
    raw_rate = (before["starts_per_second"] + after["starts_per_second"]) / 2
    # The machine's speed drifts (a shared VM): judge CPU against a bare call made in the
    # same run, before and after, as well as in absolute terms.
    bare_cpu = (before["client_cpu_ms_per_start"] + after["client_cpu_ms_per_start"]) / 2
    bare_emulator = (before["emulator_cpu_ms_per_start"] + after["emulator_cpu_ms_per_start"]) / 2
    for result in (unbounded, bounded):
        # The same call with the dispatcher's client options: the floor for its own calls.
        result["cpu_per_start_over_tuned_start_execution"] = round(
            result["cpu_ms_per_start"] / tuned["client_cpu_ms_per_start"], 2
        )
        # The emulator's extra work (receives, deletes, events) shares the cores: the ratio
        # to raw charges the dispatcher for it.
        result["emulator_cpu_over_bare_start"] = round(
            result["emulator_cpu_ms_per_start"] / bare_emulator, 2
        )
        rate = result["starts_per_second"]["middle_80_percent"]
        result["ratio_to_raw"] = round(rate / raw_rate, 3) if raw_rate else None
        result["cpu_per_start_over_bare_start_execution"] = round(
            result["cpu_ms_per_start"] / bare_cpu, 2
        )
    return {
        "config": asdict(cfg),
        "raw_start_execution": {
            "before": before,
            "after": after,
            "mean_starts_per_second": round(raw_rate, 1),
            "tuned": tuned,
            "thin": thin,
        },
        "dispatcher": unbounded,
        "dispatcher_bounded": bounded,
        "delete_costs": costs,
        "emulator_sqs_cost_by_depth": depth_costs,
        "events_loop": events,
        "load": asdict(load) | {"others_busy_cores": round(load.others_busy_cores, 3)},
    }
