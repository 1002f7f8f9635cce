"""What a start costs: CPU per ``StartExecution`` on aiobotocore, against Step Functions'
StartExecution quota (300 per second refill in the largest regions, 150 in the others).
The goal: 300 starts/s on at most half a core, i.e. at most 1.667 ms of CPU per start.

Three measurements on one local emulator (MiniStack), zero-length executions:

- ``client``: ``StartExecution`` through the dispatcher's own start client
  (`dispatcher.aws.open_clients`'s ``starts``: one attempt, the lease gate, the answer
  check, per-attempt metrics) from 64 concurrent tasks, nothing else: the driver's CPU per
  call. ``bare`` is the same call on a client with botocore's defaults, for scale.
- ``dispatcher``: the whole dispatcher as a child process (``python -m dispatcher run``,
  INFO logs in JSON) starting queued requests as fast as it can, with everything a start
  brings: receive, start, delete, status events, reconcile, log lines, metrics. CPU per
  start over the middle 80% of the starts (no start-up, no tail).
- ``paced``: the same at ``DISPATCHER_START_RATE=300``: the cores it used while it started
  300 per second.

``python -m bench.start_cost`` (``make bench-start-cost``; ``make bench`` runs it too)
writes ``bench/results/start_cost.json``; ``--quick`` runs small sizes to check the
harness (``start_cost-quick.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from bench import report
from bench.aws import config
from bench.capacity import raw_capacity
from bench.child import Child, dispatcher_child
from bench.machine import machine_info, uptime
from bench.proc import LoadMeter, ProcSample
from bench.workload import stream, submit
from devtools.sandbox import Emulator, provision
from dispatcher import logs
from dispatcher.aws.api import open_clients
from dispatcher.daemon.metrics import Metrics
from dispatcher.settings.config import LogFormat

RESULTS = Path(__file__).resolve().parent / "results"
QUOTA = 300.0  # StartExecution refill per second, the largest regions' default
HALF_CORE_MS = 500.0  # CPU milliseconds in one second of half a core
TASKS = 64  # the start client's pooled connections (dispatcher/aws.py)
LIMIT = 100_000  # never what holds starts back


@dataclass(frozen=True)
class Config:
    """The run's size."""

    client_starts: int = 3000
    warm_up: int = 300
    dispatcher_starts: int = 3000
    paced_starts: int = 4500  # 15 s at 300/s
    paced_rate: float = QUOTA
    fast_rate: float = 100_000.0  # the rate limiter out of the way: as fast as it can
    rounds: int = 3  # each measurement this often, interleaved; the median is reported


QUICK = Config(client_starts=300, warm_up=50, dispatcher_starts=300, paced_starts=600, rounds=1)
"""Small sizes: checks the harness, not the published figures."""


def per_half_core(cpu_ms_per_start: float) -> float:
    """Starts per second that half a core sustains at this CPU per start."""
    return round(HALF_CORE_MS / cpu_ms_per_start, 1)


async def _client(endpoint: str, machine_arn: str, count: int, tag: str) -> dict[str, Any]:
    """``count`` starts through the dispatcher's start client from `TASKS` tasks."""
    numbers = iter(range(count))
    body = json.dumps({"req": tag})
    async with open_clients(Metrics(), region="us-east-1", endpoint_url=endpoint) as clients:
        starts = clients.starts
        assert starts is not None

        async def caller() -> None:
            for i in numbers:  # shared: each number is taken by exactly one caller
                await starts.start_execution(
                    stateMachineArn=machine_arn, name=f"{tag}-{i:05d}", input=body
                )

        cpu, began = time.process_time(), time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(TASKS):
                tg.start_soon(caller)
        elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
    ms = cpu / count * 1000
    return {
        "starts": count,
        "tasks": TASKS,
        "seconds": round(elapsed, 3),
        "starts_per_second": round(count / elapsed, 1),
        "client_cpu_ms_per_start": round(ms, 3),
        "starts_per_second_per_half_core": per_half_core(ms),
    }


Mark = tuple[ProcSample, int]  # the child's CPU and RSS, and how many it had started


async def _window(child: Child, count: int) -> tuple[Mark, Mark]:
    """The child's CPU when a tenth of ``count`` had started and when nine tenths had,
    with the started counts then (its /status: the only way to watch another process)."""
    low: Mark | None = None
    with anyio.fail_after(900):
        while True:
            at, started = child.sample(), int((await child.status())["started"])
            if low is None and started >= count // 10:
                low = at, started
            if low is not None and started >= count * 9 // 10:
                return low, (at, started)
            await anyio.sleep(0.2)


def _child_command(source: Path | None) -> tuple[str, ...]:
    """``python -m dispatcher run``, of this checkout or of the one at ``source``."""
    if source is None:
        return (sys.executable, "-m", "dispatcher", "run")
    boot = f"import sys; sys.path.insert(0, {str(source)!r}); from dispatcher.cli import main; "
    return (sys.executable, "-c", boot + "sys.exit(main())", "run")


async def _dispatcher(
    endpoint: str,
    prefix: str,
    count: int,
    settings: dict[str, Any],
    source: Path | None = None,
) -> dict[str, Any]:
    """The dispatcher child starting ``count`` queued requests; CPU per start, cores used."""
    resources = await provision(endpoint, prefix=prefix, limit=LIMIT)
    await submit(resources.request_queue_url, stream(count, None, None, prefix=prefix), endpoint)
    given = {"limit": LIMIT, "start_grace": 1, **settings}
    async with dispatcher_child(resources, given, command=_child_command(source)) as child:
        (first, low), (last, high) = await _window(child, count)
    cpu, seconds, started = last.cpu_seconds - first.cpu_seconds, last.at - first.at, high - low
    ms = cpu / started * 1000
    return {
        "settings": given,
        "starts": count,
        "measured_starts": started,
        "seconds": round(seconds, 3),
        "starts_per_second": round(started / seconds, 1),
        "cpu_ms_per_start": round(ms, 3),
        "cores_used": round(cpu / seconds, 3),
        "starts_per_second_per_half_core": per_half_core(ms),
        "cores_at_quota": round(ms * QUOTA / 1000, 3),
        "rss_mib": round(last.rss_mib, 1),
    }


def median_of(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run with the median ``key`` (the lower middle one of an even count), and every
    run's ``key`` under ``rounds``."""
    ordered = sorted(runs, key=lambda r: float(r[key]))
    return ordered[(len(ordered) - 1) // 2] | {"rounds": [r[key] for r in runs]}


async def run(cfg: Config, compare_with: Path | None = None) -> dict[str, Any]:
    """The measurements (see the module's docstring), ``cfg.rounds`` times each, interleaved;
    with ``compare_with`` (another checkout), its dispatcher too, in the same rounds."""
    sources: dict[str, Path | None] = {"this": None}
    if compare_with is not None:
        sources["compared"] = compare_with
    clients, bares = [], []
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        name: {"fast": [], "paced": []} for name in sources
    }
    async with Emulator() as emulator:
        endpoint = emulator.endpoint
        assert emulator.pid is not None
        meter = LoadMeter()
        meter.track(emulator.pid)
        meter.track(os.getpid())
        raw = await provision(endpoint, prefix="sc-client", limit=LIMIT)
        arn = raw.state_machine_arn
        await _client(endpoint, arn, cfg.warm_up, "warm-up")
        for round_ in range(cfg.rounds):
            tag = f"r{round_}"
            print(f"[bench] start cost, round {round_ + 1} of {cfg.rounds}: the start client")
            clients.append(await _client(endpoint, arn, cfg.client_starts, f"client-{tag}"))
            bare = await raw_capacity(endpoint, arn, cfg.client_starts, f"bare-{tag}", TASKS)
            bares.append(
                bare
                | {
                    "starts_per_second_per_half_core": per_half_core(
                        bare["client_cpu_ms_per_start"]
                    )
                }
            )
            for name, source in sources.items():
                print(
                    f"[bench] start cost: the dispatcher ({name}), fast, then {cfg.paced_rate:g}/s"
                )
                fast = {"start_rate": cfg.fast_rate}
                runs[name]["fast"].append(
                    await _dispatcher(
                        endpoint, f"sc-{name}-f-{tag}", cfg.dispatcher_starts, fast, source
                    )
                )
                paced = {"start_rate": cfg.paced_rate}
                runs[name]["paced"].append(
                    await _dispatcher(
                        endpoint, f"sc-{name}-p-{tag}", cfg.paced_starts, paced, source
                    )
                )
        load = meter.stop()
    measured = {
        name: {kind: median_of(r, "cpu_ms_per_start") for kind, r in kinds.items()}
        for name, kinds in runs.items()
    }
    paced = measured["this"]["paced"]
    results = {
        "config": asdict(cfg) | {"tasks": TASKS, "bare_client_config": str(config(TASKS))},
        "client": median_of(clients, "client_cpu_ms_per_start"),
        "bare_client": median_of(bares, "client_cpu_ms_per_start"),
        "dispatcher": measured["this"]["fast"],
        "paced": paced,
        "goal": {
            "quota_starts_per_second": QUOTA,
            "max_cores": 0.5,
            "max_cpu_ms_per_start": round(HALF_CORE_MS / QUOTA, 3),
            "cores_at_quota": paced["cores_at_quota"],
            "met": paced["cores_at_quota"] <= 0.5,
        },
        "load": asdict(load) | {"others_busy_cores": round(load.others_busy_cores, 3)},
    }
    if compare_with is not None:
        results["compared"] = {"source": str(compare_with), **measured["compared"]}
    return results


def summary(results: dict[str, Any]) -> str:
    """The figures in a few lines."""
    client, fast, paced, goal = (results[k] for k in ("client", "dispatcher", "paced", "goal"))
    return "\n".join(
        [
            f"start client: {client['client_cpu_ms_per_start']} ms CPU per StartExecution "
            f"({client['starts_per_second_per_half_core']:,}/s per half core; botocore defaults "
            f"{results['bare_client']['client_cpu_ms_per_start']} ms)",
            f"dispatcher, as fast as it can: {fast['cpu_ms_per_start']} ms CPU per start at "
            f"{fast['starts_per_second']:,}/s ({fast['starts_per_second_per_half_core']:,}/s "
            "per half core)",
            f"dispatcher at {paced['settings']['start_rate']:g}/s: {paced['cpu_ms_per_start']} ms "
            f"per start, {paced['cores_used']} cores at {paced['starts_per_second']:,}/s",
            f"goal {goal['quota_starts_per_second']:g}/s on <= {goal['max_cores']} core: "
            f"{goal['cores_at_quota']} core ({'met' if goal['met'] else 'missed'})",
            *_compared_lines(results),
        ]
    )


def _compared_lines(results: dict[str, Any]) -> list[str]:
    compared = results.get("compared")
    if compared is None:
        return []
    lines = [f"compared with {compared['source']}, same rounds:"]
    for kind, here in (("fast", results["dispatcher"]), ("paced", results["paced"])):
        there = compared[kind]
        ours, theirs = here["cpu_ms_per_start"], there["cpu_ms_per_start"]
        lines.append(
            f"  {kind}: {theirs} ms per start there, {ours} here ({ours - theirs:+.3f} ms; "
            f"rounds {there['rounds']} there, {here['rounds']} here)"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run, write ``start_cost.json``, print the figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.start_cost", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes: checks the harness")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results folder ({RESULTS})")
    parser.add_argument(
        "--compare-with",
        type=Path,
        metavar="DIR",
        help="also run the dispatcher of another checkout (a folder holding its dispatcher/ "
        "package, e.g. from `git archive REV dispatcher | tar -x -C DIR`) in the same rounds",
    )
    args = parser.parse_args(argv)
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        os.environ.pop(name, None)
    os.environ.update(
        {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}  # the emulator's
        | {"AWS_DEFAULT_REGION": "us-east-1"}
    )
    logs.configure("WARNING", LogFormat.JSON)
    cfg = QUICK if args.quick else Config()
    began_at, before, began = (
        datetime.now(UTC).isoformat(timespec="seconds"),
        uptime(),
        time.monotonic(),
    )
    compare_with = args.compare_with.resolve() if args.compare_with else None
    results = anyio.run(run, cfg, compare_with)
    document = {
        "scenario": "start_cost",
        "started_at": began_at,
        "duration_seconds": round(time.monotonic() - began, 1),
        "uptime_before": before,
        "uptime_after": uptime(),
        "machine": machine_info(),
        "command": " ".join(["python -m bench.start_cost", *(argv or sys.argv[1:])]),
        "nice": os.nice(0),  # on a shared machine a run may be given a larger CPU share
        "results": results,
    }
    path = report.write_json(args.out, "start_cost-quick" if args.quick else "start_cost", document)
    print(summary(results))
    print(f"[bench] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
