"""Scenario 1 and 3: the patterns on the same request stream; hand-over from the records.

Each run gets a fresh emulator (the same starting point: no executions left over from the
run before), the same seeded request stream (or its first requests), and the same limit.
Besides the side-by-side runs: check-then-act at several ``ListExecutions`` lags (the
fault proxy serves stale listings), and the dispatcher with its status events delayed
(the chaos relay). Every figure comes from the executions' own records and histories.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio

from bench.analysis import percentile, refill_gaps, series_since, summarise
from bench.patterns import PatternRun, check_then_act, semaphore, sfn_dispatcher
from bench.proc import LoadMeter
from bench.workload import Request, stream
from devtools.sandbox import Emulator

Runner = Callable[..., Awaitable[PatternRun]]
PATCHES = Path(__file__).resolve().parent / "emulator_patches"

PATTERNS: dict[str, tuple[Runner, float]] = {
    # name -> (run, seconds allowed); 500 requests of 1-3 s at limit 20 take ~50 s at best
    sfn_dispatcher.NAME: (sfn_dispatcher.run, 300.0),
    check_then_act.NAME: (check_then_act.run, 420.0),
    semaphore.NAME: (semaphore.run, 420.0),
    semaphore.SIMPLIFIED: (semaphore.run_simplified, 300.0),
}
# Run unless --pattern names others; the simplified semaphore only on request.
DEFAULT_PATTERNS = (sfn_dispatcher.NAME, check_then_act.NAME, semaphore.NAME)
SWEEP = "check_then_act_lag_sweep"
DELAYED = "dispatcher_events_delayed"


@dataclass(frozen=True)
class Config:
    """The comparison's size."""

    requests: int = 500
    limit: int = 20
    low: float = 1.0
    high: float = 3.0
    seed: int = 5
    budget_scale: float = 1.0  # multiplies each pattern's time allowance
    # check-then-act's listing served this many seconds old in the side-by-side run
    list_lag: float = 0.0
    # check-then-act, ListExecutions served this many seconds old: one short run per lag
    lags: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)
    sweep_requests: int = 100
    # the dispatcher with each status event delayed 0..event_delay whole seconds
    event_delay: int = 1
    delayed_requests: int = 300
    start_grace: float | None = None  # the dispatcher's start_grace (None: its default)


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


HANDOVER_DEFINITION = (
    "from the records: the k-th work end to the (k + limit)-th work start, over the "
    "backlog (how long a freed slot stayed idle; negative: a start before any slot was free)"
)


def handover(runs: Sequence[PatternRun]) -> dict[str, Any]:
    """Every run's hand-over from the records, and the dispatcher's own share of it."""
    out: dict[str, Any] = {"definition": HANDOVER_DEFINITION, "refill_gap_seconds": {}}
    for run in runs:
        gaps = refill_gaps(run.work, run.limit)
        out["refill_gap_seconds"][run.name] = {
            "count": len(gaps),
            "p50": round(percentile(gaps, 50), 4),
            "p90": round(percentile(gaps, 90), 4),
            "p99": round(percentile(gaps, 99), 4),
            "negative": sum(1 for g in gaps if g < 0),
            "requests": run.requests,
            "notes": run.notes,
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


async def _one(
    label: str,
    runner: Callable[..., Awaitable[PatternRun]],
    requests: Sequence[Request],
    config: Config,
    within: float,
    **options: Any,
) -> tuple[PatternRun, dict[str, Any]]:
    """One run against a fresh emulator; returns the run and its JSON document."""
    print(f"[bench] comparison: {label}, {len(requests)} requests, limit {config.limit}")
    marker = Path(tempfile.mkdtemp(prefix="bench-")) / "dynamodb-atomic"
    async with Emulator(env=emulator_env(marker)) as emulator:
        meter = LoadMeter()
        assert emulator.pid is not None
        meter.track(emulator.pid)
        meter.track(os.getpid())
        result = await runner(
            emulator.endpoint,
            requests,
            config.limit,
            within=within * config.budget_scale,
            **options,
        )
        load = asdict(meter.stop())
    result.extra["emulator_dynamodb_writes_atomic"] = marker.exists()
    if result.name in {semaphore.NAME, semaphore.SIMPLIFIED} and marker.exists():
        result.notes.append(
            "MiniStack's DynamoDB writes were serialised (bench/emulator_patches/), as "
            "DynamoDB applies a conditional write atomically; unpatched, MiniStack 1.5.33 "
            "lets two acquires pass together"
        )
    shutil.rmtree(marker.parent, ignore_errors=True)
    document = describe(result, load)
    brief = {k: document.get(k) for k in ("max_concurrency", "makespan_seconds")}
    print(f"[bench]   done: {brief}")
    return result, document


async def run(
    config: Config, only: Sequence[str] | None = None
) -> tuple[dict[str, Any], list[PatternRun]]:
    """Run the patterns (the defaults, or ``only`` these), the lag sweep and the
    delayed-events run (skipped when ``only`` leaves out their pattern); JSON and runs.

    The dispatcher and check-then-act run alone. The semaphore and the lag sweep's short
    runs go side by side, each against its own emulator: they spend their time waiting out
    retry back-offs and visibility timeouts, not on the CPU (each run's load is recorded).
    """
    requests: list[Request] = stream(config.requests, config.low, config.high, seed=config.seed)
    chosen = only or DEFAULT_PATTERNS
    runs: dict[str, PatternRun] = {}
    documents: dict[str, Any] = {}
    out: dict[str, Any] = {"config": asdict(config), "patterns": documents}
    sweep: dict[str, Any] = {}

    async def pattern(name: str) -> None:
        runner, budget = PATTERNS[name]
        options: dict[str, Any] = {}
        if name == check_then_act.NAME:
            options["list_lag"] = config.list_lag
        if name == sfn_dispatcher.NAME:
            options["start_grace"] = config.start_grace
        runs[name], documents[name] = await _one(name, runner, requests, config, budget, **options)

    async def one_lag(lag: float) -> None:
        _, sweep[f"{lag:g}"] = await _one(
            f"{check_then_act.NAME}, ListExecutions {lag:g} s old",
            check_then_act.run,
            requests[: config.sweep_requests],
            config,
            PATTERNS[check_then_act.NAME][1],
            list_lag=lag,
        )

    for name in (sfn_dispatcher.NAME, check_then_act.NAME):
        if name in chosen:
            await pattern(name)
    async with anyio.create_task_group() as tg:
        if semaphore.NAME in chosen:
            tg.start_soon(pattern, semaphore.NAME)
        if check_then_act.NAME in chosen:
            for lag in config.lags:
                tg.start_soon(one_lag, lag)
    if semaphore.SIMPLIFIED in chosen:
        await pattern(semaphore.SIMPLIFIED)
    if sweep:
        out[SWEEP] = {f"{lag:g}": sweep[f"{lag:g}"] for lag in config.lags}
    if sfn_dispatcher.NAME in chosen and config.event_delay:
        result, out[DELAYED] = await _one(
            f"{sfn_dispatcher.NAME}, events delayed 0-{config.event_delay} s",
            sfn_dispatcher.run,
            requests[: config.delayed_requests],
            config,
            PATTERNS[sfn_dispatcher.NAME][1],
            event_delay=config.event_delay,
            start_grace=config.start_grace,
        )
        result.name = DELAYED
        runs[DELAYED] = result
    ordered = [runs[n] for n in (*PATTERNS, DELAYED) if n in runs]
    out["patterns"] = {n: documents[n] for n in PATTERNS if n in documents}
    return out, ordered
