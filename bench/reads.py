"""Reconcile's reads against the account's Step Functions quotas, as pools and executions grow.

The real reconcilers (`dispatcher.daemon.reconcile.Reconciler`) of N pools, with the real
shared read budgets (`dispatcher.daemon.readbudget.ReadBudgets`), run for a few minutes
of virtual time (`sim.loop.run`) against a small in-process Step Functions that holds E
running executions spread over the N state machines, answers ``ListExecutions`` in pages
of 1,000 with a ``nextToken``, and records the virtual time of every call. A little churn
(executions ending between passes, replaced by new ones) makes reconcile describe what a
listing no longer shows, as it does when status events are lost. First the start-up
listing (every pool, one after the other, as the service does before it is ready), then
each pool's reconcile loop, its first pass offset by its phase.

Every figure comes from the record of calls: calls per second (mean after start-up, the
most in any 1 s and any 60 s window), how long a pass took, the time to ready, and how low
AWS's own token buckets (ListExecutions 200 at 5/s in the largest regions, 100 at 2/s in
the others; DescribeExecution 300 at 15/s, 250 at 10/s) would have fallen had these been
the account's only calls. The "budget off" variant is what an unpaced dispatcher would
do: the same code with rates too high to wait and every phase 0.

``python -m bench.reads`` (or ``python -m bench --only reads``) writes
bench/results/reads.json in a few seconds of CPU.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import anyio
from prometheus_client import CollectorRegistry

from bench.figures import num
from bench.machine import machine_info
from dispatcher import logs
from dispatcher.aws.api import Clients
from dispatcher.daemon.health import Health
from dispatcher.daemon.metrics import Metrics
from dispatcher.daemon.pool import Pool
from dispatcher.daemon.readbudget import DESCRIBE_BURST, LIST_BURST, ReadBudgets, ReadRates
from dispatcher.daemon.reconcile import Reconciler, ReconcileReport
from dispatcher.settings.config import LogFormat, Settings
from dispatcher.settings.layout import PoolConfig
from sim import loop

RESULTS = Path(__file__).resolve().parent / "results"
LIST, DESCRIBE = "ListExecutions", "DescribeExecution"
ACCOUNT, REGION = "123456789012", "us-east-1"
UNPACED_RATE = 1e9
"""Calls per second of the "budget off" variant: never a wait."""

AWS_QUOTAS = {
    # operation: {region kind: (bucket, refill per second)}, Standard workflows.
    LIST: {"largest regions": (200, 5.0), "other regions": (100, 2.0)},
    DESCRIBE: {"largest regions": (300, 15.0), "other regions": (250, 10.0)},
}


@dataclass(frozen=True)
class Config:
    """The grid of sizes and the simulated service's behaviour."""

    pools: tuple[int, ...] = (1, 10, 50)
    running: tuple[int, ...] = (100, 10_000)
    seconds: float = 300.0
    """Virtual seconds from start-up to the end of a run."""
    reconcile_interval: float = Settings.model_fields["reconcile_interval"].default
    start_grace: float = Settings.model_fields["start_grace"].default
    churn: float = 0.01
    """Share of the running executions that end (and are replaced) per reconcile interval."""
    list_latency: float = 0.2
    """Seconds a ListExecutions page takes to answer."""
    describe_latency: float = 0.05
    """Seconds a DescribeExecution takes to answer."""
    page_size: int = 1000
    seed: int = 1
    stress: tuple[int, int] | None = (50, 500_000)
    """One more run, budget on only: (pools, running) past what the budget can list in an
    interval (10 pages a pool), for ``stress_seconds``."""
    stress_seconds: float = 1800.0
    stress_churn: float = 0.0002
    """The stress run's churn: about as many ends per second as 10,000 running at ``churn``."""
    ends: tuple[int, int] | None = (1, 10_000)
    """Two more runs, budget on and off: (pools, running) ending faster than the describe
    budget (``ends_churn``) with no status events, for ``ends_seconds``."""
    ends_churn: float = 0.02
    ends_seconds: float = 900.0


QUICK = Config(running=(100, 2_000), seconds=120.0, stress=None, ends=None)
"""``python -m bench --quick``: the harness checked in a second."""


@dataclass(frozen=True)
class Variant:
    """A budget setting: paced (the defaults, phases spread) or not."""

    name: str
    rates: ReadRates
    spread: bool


PACED = Variant("budget", ReadRates.defaults(), spread=True)
UNPACED = Variant("budget off", ReadRates(UNPACED_RATE, UNPACED_RATE), spread=False)


@dataclass
class Record:
    """Every call the fake Step Functions answered, with its virtual time."""

    calls: dict[str, list[float]] = field(default_factory=lambda: {LIST: [], DESCRIBE: []})

    def add(self, operation: str) -> None:
        self.calls[operation].append(loop.now())


class FakeStepFunctions:
    """Just enough of Step Functions for reconcile: running executions per state machine,
    ``ListExecutions(RUNNING)`` newest first in pages with a ``nextToken`` (a snapshot
    taken at the first page), ``DescribeExecution``, and executions that end."""

    def __init__(self, machines: Sequence[str], running: int, config: Config) -> None:
        self.config = config
        self.record = Record()
        self._running: dict[str, dict[str, None]] = {m: {} for m in machines}
        self._machine_of: dict[str, str] = {}
        self._alive: list[str] = []
        self._status: dict[str, str] = {}
        self._snapshots: dict[str, list[str]] = {}
        self._ended_at: dict[str, float] = {}
        self.free_lags: list[float] = []
        """Per ended execution described: seconds from its end to the describe's answer."""
        self._serial = 0
        self._listings = 0
        for i in range(running):
            self.start(machines[i % len(machines)])

    def start(self, machine: str) -> str:
        """A new running execution of ``machine``."""
        self._serial += 1
        name = machine.rsplit(":", 1)[1]
        arn = f"arn:aws:states:{REGION}:{ACCOUNT}:execution:{name}:e{self._serial:07d}"
        self._running[machine][arn] = None
        self._machine_of[arn] = machine
        self._status[arn] = "RUNNING"
        self._alive.append(arn)
        return arn

    def end_one(self, rng: random.Random) -> None:
        """A random running execution succeeds; a new one of its state machine starts."""
        index = rng.randrange(len(self._alive))
        arn = self._alive[index]
        self._alive[index] = self._alive[-1]
        self._alive.pop()
        machine = self._machine_of[arn]
        del self._running[machine][arn]
        self._status[arn] = "SUCCEEDED"
        self._ended_at[arn] = loop.now()
        self.start(machine)

    def ended(self, arns: Iterable[str]) -> int:
        """How many of ``arns`` have ended."""
        return sum(1 for arn in arns if arn in self._ended_at)

    async def list_executions(
        self,
        *,
        stateMachineArn: str,  # noqa: N803 - the API's own argument names
        statusFilter: str,  # noqa: N803
        maxResults: int,  # noqa: N803
        nextToken: str | None = None,  # noqa: N803
    ) -> dict[str, Any]:
        self.record.add(LIST)
        assert statusFilter == "RUNNING"
        if nextToken is None:
            self._listings += 1
            token = f"t{self._listings}"
            self._snapshots[token] = list(reversed(self._running[stateMachineArn]))
            offset = 0
        else:
            token, _, at = nextToken.partition(":")
            offset = int(at)
        await anyio.sleep(self.config.list_latency)
        snapshot = self._snapshots[token]
        size = min(maxResults, self.config.page_size)
        page = snapshot[offset : offset + size]
        answer: dict[str, Any] = {
            "executions": [
                {"executionArn": arn, "stateMachineArn": stateMachineArn, "status": "RUNNING"}
                for arn in page
            ]
        }
        if offset + size < len(snapshot):
            answer["nextToken"] = f"{token}:{offset + size}"
        else:
            del self._snapshots[token]
        return answer

    async def describe_execution(self, *, executionArn: str) -> dict[str, Any]:  # noqa: N803
        self.record.add(DESCRIBE)
        await anyio.sleep(self.config.describe_latency)
        if executionArn in self._ended_at:
            self.free_lags.append(loop.now() - self._ended_at[executionArn])
        return {
            "executionArn": executionArn,
            "stateMachineArn": self._machine_of[executionArn],
            "status": self._status[executionArn],
            "redriveCount": 0,
        }


class _NoQueues:
    """Reconcile reads its request queue's depth after a pass: zero, no call recorded."""

    async def get_queue_attributes(self, **_: Any) -> dict[str, Any]:
        return {"Attributes": {}}


class TimedReconciler(Reconciler):
    """The real reconciler, its passes' start and end times kept."""

    passes_at: list[tuple[float, float]]

    async def run_once(self, *, estimate_backlog: bool = True) -> ReconcileReport:
        began = loop.now()
        report = await super().run_once(estimate_backlog=estimate_backlog)
        self.passes_at.append((began, loop.now()))
        return report


def _machines(pools: int) -> list[str]:
    return [f"arn:aws:states:{REGION}:{ACCOUNT}:stateMachine:m{i:02d}" for i in range(pools)]


def _settings(config: Config, machine: str) -> Settings:
    return Settings.load(
        {"reconcile_interval": config.reconcile_interval, "start_grace": config.start_grace},
        env={
            "DISPATCHER_STATE_MACHINE_ARN": machine,
            "DISPATCHER_REQUEST_QUEUE_URL": "https://sqs.us-east-1.amazonaws.com/1/requests",
            "DISPATCHER_EVENTS_QUEUE_URL": "https://sqs.us-east-1.amazonaws.com/1/events",
        },
    )


async def _churn(sfn: FakeStepFunctions, config: Config, per_second: float) -> None:
    """End ``per_second`` executions a second (on average), each replaced by a new one."""
    rng = random.Random(config.seed)
    owed = 0.0
    while True:
        await anyio.sleep(1.0)
        owed += per_second
        while owed >= 1.0:
            owed -= 1.0
            sfn.end_one(rng)


async def _simulate(
    config: Config, pools: int, running: int, variant: Variant, kind: str
) -> dict[str, Any]:
    machines = _machines(pools)
    sfn = FakeStepFunctions(machines, running, config)
    settings = _settings(config, machines[0])
    metrics = Metrics(CollectorRegistry())
    health = Health(metrics)
    clients = Clients(sqs=cast("Any", _NoQueues()), sfn=cast("Any", sfn))
    budgets = ReadBudgets(variant.rates, metrics, loop.now)
    reconcilers = []
    for index, machine in enumerate(machines):
        pool_config = PoolConfig(name=f"p{index:02d}", state_machine_arn=machine, limit=running)
        reconciler = TimedReconciler(
            settings,
            clients,
            Pool(pool_config, metrics, loop.now),
            metrics,
            health,
            budget=budgets.for_arn(machine),
            phase=index / pools if variant.spread else 0.0,
        )
        reconciler.passes_at = []
        reconcilers.append(reconciler)
    # The start-up listing, as `Service._startup_listing`: every pool in turn, then ready.
    for reconciler in reconcilers:
        await reconciler.run_once(estimate_backlog=False)
    ready = loop.now()
    startup_passes = [r.passes_at.pop() for r in reconcilers]
    with anyio.move_on_after(config.seconds - ready):
        async with anyio.create_task_group() as tg:
            tg.start_soon(_churn, sfn, config, config.churn * running / config.reconcile_interval)
            for reconciler in reconcilers:
                tg.start_soon(reconciler.run)
    end = loop.now()
    passes = [p for r in reconcilers for p in r.passes_at]
    unfinished = sum(1 for r in reconcilers if not r.passes_at)
    return {
        "pools": pools,
        "running": running,
        "variant": variant.name,
        "kind": kind,
        "churn": config.churn,
        "seconds": round(end, 3),
        "ready_seconds": round(ready, 3),
        "startup_pass_seconds_max": round(max(b - a for a, b in startup_passes), 3),
        "passes": len(passes),
        "pools_without_a_pass": unfinished,
        "pass_seconds_mean": _round(_mean([b - a for a, b in passes])),
        "pass_seconds_max": _round(max((b - a for a, b in passes), default=None)),
        "ended_but_held_at_end": sum(sfn.ended(r.pool.ledger.running) for r in reconcilers),
        "end_to_free_seconds_mean": _round(_mean(sfn.free_lags), 1),
        "end_to_free_seconds_max": _round(max(sfn.free_lags, default=None), 1),
        "operations": {
            operation: _figures(operation, times, ready, end, variant)
            for operation, times in sfn.record.calls.items()
        },
        "_calls": sfn.record.calls,  # dropped before storing: the test judges from it
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def most_in_window(times: Sequence[float], window: float) -> int:
    """The most calls in any half-open window ``[t, t + window)``."""
    most = first = 0
    for last, at in enumerate(times):
        while at - times[first] > window - 1e-9:  # sums of 0.2 s are not exact
            first += 1
        most = max(most, last - first + 1)
    return most


def budget_excess(times: Sequence[float], rate: float, burst: float) -> float:
    """The most calls by which any closed window ``[a, b]`` of the record goes over
    ``burst + rate * (b - a)`` (what a token bucket of ``burst`` refilled at ``rate``
    allows); 0 or less: the bucket was never overdrawn."""
    worst = float("-inf")
    lowest = float("inf")  # min over i <= j of (i - rate * t_i)
    for j, at in enumerate(times):
        lowest = min(lowest, j - rate * at)
        worst = max(worst, (j - rate * at) - lowest + 1 - burst)
    return worst if times else 0.0


def aws_bucket(times: Iterable[float], bucket: int, refill: float) -> dict[str, float | int]:
    """AWS's token bucket (full at the first call) fed these calls: its lowest level just
    before a call, and the calls it would have throttled (which take no token)."""
    tokens, at, low, throttled = float(bucket), None, float(bucket), 0
    for t in times:
        if at is not None:
            tokens = min(float(bucket), tokens + (t - at) * refill)
        at = t
        low = min(low, tokens)
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            throttled += 1
    return {"lowest": round(low, 2), "lowest_share": round(low / bucket, 3), "throttled": throttled}


def _figures(
    operation: str, times: list[float], ready: float, end: float, variant: Variant
) -> dict[str, Any]:
    after = [t for t in times if t >= ready]
    rate, burst = (
        (variant.rates.list_executions, LIST_BURST)
        if operation == LIST
        else (variant.rates.describe_execution, DESCRIBE_BURST)
    )
    return {
        "calls": len(times),
        "calls_before_ready": len(times) - len(after),
        "per_second_mean": round(len(after) / (end - ready), 3) if end > ready else None,
        "per_second_max_1s": most_in_window(times, 1.0),
        "per_second_max_60s": round(most_in_window(times, 60.0) / 60, 3),
        "budget_excess": round(
            budget_excess(
                times,
                PACED.rates.list_executions
                if operation == LIST
                else PACED.rates.describe_execution,
                LIST_BURST if operation == LIST else DESCRIBE_BURST,
            ),
            3,
        ),
        "own_rate": None if rate >= UNPACED_RATE else rate,
        "own_burst": burst,
        "aws": {kind: aws_bucket(times, *q) for kind, q in AWS_QUOTAS[operation].items()},
    }


def simulate(
    config: Config, pools: int, running: int, variant: Variant, kind: str = "grid"
) -> dict[str, Any]:
    """One run on a fresh virtual-time loop; its figures, and the call record in
    ``"_calls"`` (operation -> virtual times)."""
    return loop.run(lambda: _simulate(config, pools, running, variant, kind))


def run(config: Config) -> dict[str, Any]:
    """Every size of the grid, paced and unpaced."""
    runs = [
        simulate(config, pools, running, variant)
        for pools in config.pools
        for running in config.running
        for variant in (PACED, UNPACED)
    ]
    if config.stress:
        longer = replace(config, seconds=config.stress_seconds, churn=config.stress_churn)
        runs.append(simulate(longer, *config.stress, PACED, "pages"))
    if config.ends:
        longer = replace(config, seconds=config.ends_seconds, churn=config.ends_churn)
        runs += [simulate(longer, *config.ends, v, "ends") for v in (PACED, UNPACED)]
    for r in runs:
        r.pop("_calls")
    return {
        "config": asdict(config),
        "budget": {
            "list_rate": PACED.rates.list_executions,
            "list_burst": LIST_BURST,
            "describe_rate": PACED.rates.describe_execution,
            "describe_burst": DESCRIBE_BURST,
        },
        "aws_quotas": {op: {k: list(v) for k, v in q.items()} for op, q in AWS_QUOTAS.items()},
        "runs": runs,
    }


def document(config: Config) -> dict[str, Any]:
    """The stored JSON: the results with when, where and how long (CPU seconds)."""
    began_at = datetime.now(UTC).isoformat(timespec="seconds")
    began = time.monotonic()
    results = run(config)
    return {
        "scenario": "reads",
        "started_at": began_at,
        "duration_seconds": round(time.monotonic() - began, 1),
        "machine": machine_info(),
        "results": results,
    }


def _row(r: dict[str, Any]) -> str:
    lst, dsc = r["operations"][LIST], r["operations"][DESCRIBE]
    small = lst["aws"]["other regions"]
    longer = (
        ""
        if r["kind"] == "grid"
        else f", {num(r['seconds'], 0)} s, {num(r['churn'] * 100, 2)}% ending"
    )
    return (
        f"| {r['pools']} | {r['running']:,} | {r['variant']}{longer} | "
        f"{num(r['ready_seconds'], 1)} | {r['passes']} ({r['pools_without_a_pass']}) | "
        f"{num(r['pass_seconds_mean'], 1)} / {num(r['pass_seconds_max'], 1)} | "
        f"{num(lst['per_second_mean'])} / {lst['per_second_max_1s']} / "
        f"{num(lst['per_second_max_60s'])} | "
        f"{num(dsc['per_second_mean'])} / {dsc['per_second_max_1s']} | "
        f"{num(small['lowest_share'] * 100, 0)}% ({small['throttled']:,}) | "
        f"{num(r['end_to_free_seconds_mean'], 1)} / {num(r['end_to_free_seconds_max'], 1)} |"
    )


def table(doc: dict[str, Any]) -> list[str]:
    """One row per size and variant."""
    results = doc["results"]
    return [
        "| pools | running | reads | ready (s) | passes (pools with none) | pass mean / max (s) "
        "| ListExecutions/s: mean / most in 1 s / in 60 s | DescribeExecution/s: mean / most "
        "in 1 s | AWS ListExecutions bucket at its lowest, other regions (calls throttled) | "
        "ended to slot freed, mean / max (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(_row(r) for r in results["runs"]),
    ]


def _pages(r: dict[str, Any], config: dict[str, Any]) -> int:
    """ListExecutions pages in one pass of every pool (the executions spread evenly)."""
    per_pool = -(-r["running"] // r["pools"])
    return int(r["pools"] * max(1, -(-per_pool // config["page_size"])))


def section(doc: dict[str, Any]) -> list[str]:
    """The table and what it shows (docs/performance.md's generated block, summary.md)."""
    results = doc["results"]
    config, budget = results["config"], results["budget"]
    runs = results["runs"]
    grid = [r for r in runs if r["kind"] == "grid"]
    paced = [r for r in grid if r["variant"] == PACED.name]
    unpaced = [r for r in grid if r["variant"] == UNPACED.name]
    held = all(
        r["operations"][op]["budget_excess"] <= 0
        for r in runs
        if r["variant"] == PACED.name
        for op in (LIST, DESCRIBE)
    )

    def most(rows: list[dict[str, Any]], op: str) -> dict[str, Any]:
        return max(rows, key=lambda r: r["operations"][op]["per_second_max_1s"])

    def twin(r: dict[str, Any]) -> dict[str, Any]:
        return next(u for u in unpaced if (u["pools"], u["running"]) == (r["pools"], r["running"]))

    def peak(r: dict[str, Any], op: str) -> int:
        return int(r["operations"][op]["per_second_max_1s"])

    def aws_low(rows: list[dict[str, Any]]) -> str:
        share = min(r["operations"][LIST]["aws"]["other regions"]["lowest_share"] for r in rows)
        return f"{num(share * 100, 0)}%"

    throttled = sum(
        r["operations"][op]["aws"][kind]["throttled"]
        for r in grid
        for op in (LIST, DESCRIBE)
        for kind in AWS_QUOTAS[op]
    )
    list_burst = most(unpaced, LIST)
    longest = max(paced, key=lambda r: (_pages(r, config), r["pass_seconds_mean"] or 0.0))
    slowest = max(paced, key=lambda r: r["ready_seconds"])
    late = max(paced, key=lambda r: r["end_to_free_seconds_mean"] or 0.0)
    lines = [
        f"Reconcile's reads over {num(config['seconds'], 0)} s of virtual time per run "
        "(`python -m bench.reads`, a few seconds of CPU): the real reconcilers of N pools and "
        f"their shared read budget ({num(budget['list_rate'], 0)} ListExecutions page/s, burst "
        f"{budget['list_burst']}; {num(budget['describe_rate'], 0)} DescribeExecution/s, burst "
        f"{budget['describe_burst']}), a {num(config['reconcile_interval'], 0)} s interval, "
        "against an in-process Step Functions that holds the running executions spread over "
        f"N state machines (pages of {config['page_size']:,}, "
        f"{num(config['list_latency'] * 1000, 0)} ms a page) and records every call; "
        f"{num(config['churn'] * 100, 0)}% of the executions end per interval with no status "
        "event, so reconcile describes each before it frees the slot. *budget off*: the same "
        "code with rates too high to wait and every pool at the same phase. The AWS column is "
        "the bucket of the smaller regions (100, refilled at 2/s) fed these calls alone.",
        "",
        *table(doc),
        "",
        f"With the budget no window of the record went over it "
        f"({'held' if held else '**overdrawn**'}): at most {peak(most(paced, LIST), LIST)} "
        f"ListExecutions pages in any second, where without it {list_burst['pools']} pools "
        f"listed at once ({peak(list_burst, LIST)} pages in one second), and at most "
        f"{peak(most(paced, DESCRIBE), DESCRIBE)} describes in a second against "
        f"{peak(most(unpaced, DESCRIBE), DESCRIBE)}. At these sizes AWS would have throttled "
        f"{throttled} of either (its bucket fell to {aws_low(paced)} with the budget, "
        f"{aws_low(unpaced)} without): the budget keeps the rest of the quota for the rest of "
        f"the account. The price is time. {longest['pools']} pools want "
        f"{num(_pages(longest, config) / config['reconcile_interval'])} pages/s, so a pass "
        f"waits its turn ({num(longest['pass_seconds_mean'], 1)} s on average instead of "
        f"{num(twin(longest)['pass_seconds_mean'], 1)} s) and the start-up listing takes "
        f"{num(slowest['ready_seconds'], 1)} s to ready instead of "
        f"{num(twin(slowest)['ready_seconds'], 1)} s; past {budget['describe_burst']} describes "
        f"a pass waits at {num(budget['describe_rate'], 0)}/s, so a slot whose status event was "
        f"lost is freed later ({late['pools']} pool{'s' * (late['pools'] > 1)}, "
        f"{late['running']:,} running: {num(late['end_to_free_seconds_mean'], 1)} s after "
        f"the end on average instead of {num(twin(late)['end_to_free_seconds_mean'], 1)} s, "
        f"its passes {num(late['pass_seconds_mean'], 1)} s instead of "
        f"{num(twin(late)['pass_seconds_mean'], 1)} s).",
    ]
    for r in (r for r in runs if r["kind"] == "pages"):
        pages = _pages(r, config)
        lines += [
            "",
            f"Past the budget: {r['pools']} pools and {r['running']:,} running executions "
            f"({num(r['seconds'], 0)} s, {num(r['churn'] * 100, 2)}% ending per "
            f"interval) need {pages:,} pages a round. The start-up listing takes "
            f"{num(r['ready_seconds'], 1)} s, a pass {num(r['pass_seconds_mean'], 1)} s on "
            f"average ({num(r['pass_seconds_max'], 1)} s at most) instead of the "
            f"{num(config['reconcile_interval'], 0)} s interval, and a slot whose status event "
            f"was lost is freed {num(r['end_to_free_seconds_mean'], 1)} s after its execution "
            f"ended on average ({num(r['end_to_free_seconds_max'], 1)} s at most). At AWS's "
            f"own refill a round takes {num(pages / 5, 0)} s (5/s) or {num(pages / 2, 0)} s "
            "(2/s) at least.",
        ]
    ends = [r for r in runs if r["kind"] == "ends"]
    for r, off in zip(ends[::2], ends[1::2], strict=True):
        per_second = r["churn"] * r["running"] / config["reconcile_interval"]
        aws = off["operations"][DESCRIBE]["aws"]["other regions"]
        lines += [
            "",
            f"Past the describe budget: status events lost and {num(r['churn'] * 100, 0)}% of "
            f"{r['running']:,} running executions ending per interval ({num(per_second, 1)}/s, "
            f"under AWS's describe refill, over the budget's {num(budget['describe_rate'], 0)}/s)"
            f". Describes fall behind and a pass waits for its describes before the next "
            f"listing: {r['passes']} passes in {num(r['seconds'], 0)} s "
            f"({num(r['pass_seconds_max'], 1)} s the longest), a slot freed "
            f"{num(r['end_to_free_seconds_mean'], 1)} s after its execution ended on average "
            f"({num(r['end_to_free_seconds_max'], 1)} s at most), "
            f"{r['ended_but_held_at_end']:,} ended executions still holding slots at the end. "
            f"Without the budget: {off['passes']} passes, freed after "
            f"{num(off['end_to_free_seconds_mean'], 1)} s on average, "
            f"{off['ended_but_held_at_end']:,} held at the end, and AWS's describe bucket of "
            f"the other regions fell to {num(aws['lowest_share'] * 100, 0)}% "
            f"({aws['throttled']:,} throttled).",
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.reads``: run the grid, write reads.json."""
    parser = argparse.ArgumentParser(prog="python -m bench.reads", description=__doc__)
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results folder ({RESULTS})")
    args = parser.parse_args(argv)
    logs.configure("WARNING", LogFormat.JSON)
    doc = document(Config())
    print("\n".join(table(doc)))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "reads.json"  # as bench.report.write_json, which imports this module
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"[bench] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
