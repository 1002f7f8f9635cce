"""Scenario 1 and 3: the three patterns on the same request stream; the dispatcher's hand-over.

Each pattern gets a fresh emulator (the same starting point: no executions left over
from the pattern before), the same seeded request stream, and the same limit. The figures
come from the executions' own records and histories.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.analysis import percentile, refill_gaps, series_since, summarise
from bench.patterns import PatternRun, check_then_act, semaphore, sfn_dispatcher
from bench.proc import LoadMeter
from bench.workload import Request, stream
from dispatcher.sandbox import Emulator

Runner = Callable[..., Awaitable[PatternRun]]
PATCHES = Path(__file__).resolve().parent / "emulator_patches"

PATTERNS: dict[str, tuple[Runner, float]] = {
    # name -> (run, seconds allowed); 1,000 requests of 1-3 s at limit 20 take ~100 s at best
    sfn_dispatcher.NAME: (sfn_dispatcher.run, 300.0),
    check_then_act.NAME: (check_then_act.run, 420.0),
    semaphore.NAME: (semaphore.run, 300.0),
}


@dataclass(frozen=True)
class Config:
    """The comparison's size."""

    requests: int = 1000
    limit: int = 20
    low: float = 1.0
    high: float = 3.0
    seed: int = 5
    budget_scale: float = 1.0  # multiplies each pattern's time allowance


def emulator_env(marker: Path) -> dict[str, str]:
    """The emulator's environment: DynamoDB writes made atomic (see emulator_patches/)."""
    return {"PYTHONPATH": str(PATCHES), "BENCH_DDB_ATOMIC_MARKER": str(marker)}


def describe(run: PatternRun, load: dict[str, Any]) -> dict[str, Any]:
    """The JSON document of one pattern's run."""
    sent_at = run.submitted.sent_at
    figures: dict[str, Any] = summarise(run.work, sent_at, run.limit) if run.work else {}
    calls = sum(run.calls.values())
    figures |= {
        "complete": run.complete,
        "requests": run.requests,
        "api_calls_per_request": round(calls / run.requests, 2),
        "api_calls": dict(sorted(run.calls.items())),
        "state_transitions_per_request": round(run.transitions / run.requests, 2),
        "max_executions_running": summarise(run.executions, sent_at, run.limit)["max_concurrency"]
        if run.executions
        else 0,
        "execution_seconds": round(sum(i.stop - i.start for i in run.executions), 1),
        "work_seconds": round(sum(i.stop - i.start for i in run.work), 1),
        "notes": run.notes,
        "extra": {k: v for k, v in run.extra.items() if k != "handover_samples"},
        "load": load,
    }
    origin = run.submitted.first
    series: dict[str, Any] = {"work": series_since(run.work, origin)}
    if run.executions is not run.work:
        series["executions"] = series_since(run.executions, origin)
    figures["series"] = series
    return figures


def handover(runs: Sequence[PatternRun]) -> dict[str, Any]:
    """The dispatcher's own share of each hand-over, and every pattern's slot refill gap."""
    out: dict[str, Any] = {"refill_gap_seconds": {}}
    for run in runs:
        gaps = refill_gaps(run.work, run.limit)
        out["refill_gap_seconds"][run.name] = {
            "count": len(gaps),
            "p50": round(percentile(gaps, 50), 4),
            "p90": round(percentile(gaps, 90), 4),
            "p99": round(percentile(gaps, 99), 4),
            "samples": [round(g, 4) for g in gaps],
        }
        if run.name == sfn_dispatcher.NAME:
            samples: list[float] = run.extra["handover_samples"]
            out["dispatcher_share_seconds"] = {
                "definition": "terminal status event applied (slot freed while the pool was "
                "full) -> the next StartExecution sent; includes one SQS ReceiveMessage, "
                "since the dispatcher receives only for free slots",
                "count": len(samples),
                "p50": round(percentile(samples, 50), 5),
                "p90": round(percentile(samples, 90), 5),
                "p99": round(percentile(samples, 99), 5),
                "max": round(max(samples), 5) if samples else None,
                "from_histogram_p50": round(run.extra["handover_histogram_p50"], 5),
                "from_histogram_p99": round(run.extra["handover_histogram_p99"], 5),
                "samples": [round(s, 6) for s in samples],
            }
    return out


async def run(
    config: Config, only: Sequence[str] | None = None
) -> tuple[dict[str, Any], list[PatternRun]]:
    """Run the patterns (all, or ``only`` these) one after another; return JSON and runs."""
    requests: list[Request] = stream(config.requests, config.low, config.high, seed=config.seed)
    runs: list[PatternRun] = []
    documents: dict[str, Any] = {}
    for name, (runner, budget) in PATTERNS.items():
        if only and name not in only:
            continue
        print(f"[bench] comparison: {name}, {config.requests} requests, limit {config.limit}")
        marker = Path(tempfile.mkdtemp(prefix="bench-")) / "dynamodb-atomic"
        async with Emulator(env=emulator_env(marker)) as emulator:
            meter = LoadMeter()
            assert emulator.pid is not None
            meter.track(emulator.pid)
            meter.track(os.getpid())
            result = await runner(
                emulator.endpoint, requests, config.limit, within=budget * config.budget_scale
            )
            load = asdict(meter.stop())
        result.extra["emulator_dynamodb_writes_atomic"] = marker.exists()
        if name == semaphore.NAME and marker.exists():
            result.notes.append(
                "MiniStack's DynamoDB writes were serialised (bench/emulator_patches/), as "
                "DynamoDB applies a conditional write atomically; unpatched, MiniStack 1.5.33 "
                "lets two acquires pass together (a run here reached 25 holders at limit 20 "
                "and the counter ended at -5)"
            )
        shutil.rmtree(marker.parent, ignore_errors=True)
        runs.append(result)
        documents[name] = describe(result, load)
        brief = {k: documents[name].get(k) for k in ("max_concurrency", "makespan_seconds")}
        print(f"[bench]   done: {brief}")
    return {"config": asdict(config), "patterns": documents}, runs
