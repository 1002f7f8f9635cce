"""The benchmark harness works: its arithmetic on hand-made intervals, and one toy run.

The toy run is the comparison's dispatcher pattern at 20 requests against its own
emulator, then the whole reporting path (JSON, summary, plots) on what it measured.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

from bench import comparison, fairness, plots, reads, report, shared_limit, start_cost, summary
from bench.__main__ import _configs
from bench.analysis import (
    Interval,
    busy_slot_seconds,
    percentile,
    refill_gaps,
    summarise,
    time_above,
)
from bench.history import trace
from bench.patterns import semaphore
from bench.prom import Sample, histogram_quantile
from bench.workload import stream
from devtools.records import Execution, concurrency_series
from dispatcher.core.requests import key_tag
from dispatcher.daemon import readbudget

MACHINE = {
    "nproc": 2,
    "cpu_model": "test",
    "memory_mib": 1,
    "kernel": "test",
    "python": "3",
    "python_implementation": "CPython",
    "emulator": "ministack",
    "dispatcher": "0",
}


def test_figures_from_hand_made_intervals() -> None:
    # Limit 2. a and b run 0-2; c starts at 1 (over the limit for 1 s); d refills at 2.5.
    work = [
        Interval("a", 0.0, 2.0),
        Interval("b", 0.0, 2.0),
        Interval("c", 1.0, 3.0),
        Interval("d", 2.5, 3.5),
    ]
    sent = {"a": 0.0, "b": 0.0, "c": 0.0, "d": 0.5}
    figures = summarise(work, sent, limit=2)
    assert figures["max_concurrency"] == 3
    assert figures["seconds_above_limit"] == pytest.approx(1.0)
    # Backlog from 0 to 2.5: 2 slots busy all the way except 2.0-2.5 (only c) -> 4.5 / 5.
    assert figures["utilisation_while_backlog"] == pytest.approx(0.9)
    assert figures["queue_wait_p50"] == pytest.approx(0.5)  # waits 0, 0, 1, 2
    assert figures["makespan_seconds"] == pytest.approx(3.5)
    # Stops 2, 2, 3, 3.5 against starts 0, 0, 1, 2.5 shifted by the limit: 1 - 2, 2.5 - 2.
    assert refill_gaps(work, 2) == pytest.approx([-1.0, 0.5])
    series = concurrency_series(
        [Execution(i.key, i.key, "SUCCEEDED", i.start, i.stop) for i in work], now=3.5
    )
    assert time_above(series, 2) == pytest.approx(1.0)
    assert busy_slot_seconds(series, 2, 0.0, 3.5) == pytest.approx(6.0)


def test_percentile_and_histogram_quantile() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert math.isnan(percentile([], 99))
    buckets = [
        Sample("h_bucket", {"le": "0.01"}, 50.0),
        Sample("h_bucket", {"le": "0.02"}, 100.0),
        Sample("h_bucket", {"le": "+Inf"}, 100.0),
    ]
    # Rank 75 of 100 lies halfway through the (0.01, 0.02] bucket.
    assert histogram_quantile(buckets, "h", 0.75) == pytest.approx(0.015)


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_toy_comparison_run_and_report(tmp_path: Path) -> None:
    config = comparison.Config(
        requests=20, limit=4, low=1, high=1, event_delay=2, delayed_requests=8, start_grace=0
    )
    document, runs = await comparison.run(config, only=["sfn-dispatcher"])
    figures = document["patterns"]["sfn-dispatcher"]
    assert figures["complete"], figures["notes"]
    assert figures["completed"] == 20
    assert figures["max_concurrency"] <= 4
    assert figures["api_calls"]["StartExecution"] == 20
    assert figures["state_transitions_per_request"] > 0
    hand = comparison.handover(runs)
    assert hand["dispatcher_share_seconds"]["count"] > 0
    assert 0 < hand["dispatcher_share_seconds"]["p50"] < 5
    # From the records: 20 ends, the first 16 each hand a slot to start number k + 4.
    assert hand["refill_gap_seconds"]["sfn-dispatcher"]["count"] == 16
    assert hand["refill_gap_seconds"]["sfn-dispatcher"]["negative"] == 0
    # The same dispatcher with its status events held back 0-2 s: slower hand-overs.
    delayed = document[comparison.DELAYED]
    assert delayed["completed"] == 8
    assert delayed["max_concurrency"] <= 4
    assert delayed["extra"]["events_delayed"] > 0
    assert max(hand["refill_gap_seconds"][comparison.DELAYED]["samples"]) >= 0.9

    for name, results in (("comparison", document), ("handover", hand)):
        report.write_json(
            tmp_path,
            name,
            {
                "scenario": name,
                "started_at": "2026-01-01T00:00:00+00:00",
                "duration_seconds": 1.0,
                "uptime_before": "load average: 0.00",
                "uptime_after": "load average: 0.00",
                "machine": MACHINE,
                "results": results,
            },
        )
    text = summary.write(tmp_path).read_text()
    assert "| sfn-dispatcher | " in text
    assert "| dispatcher max concurrency <= limit | " in text
    assert (tmp_path / "concurrency.png").stat().st_size > 10_000
    assert (tmp_path / "handover.png").stat().st_size > 10_000


def test_fairness_sizes_put_the_big_tenant_first() -> None:
    full, quick = _configs(quick=False)[3], _configs(quick=True)[3]
    sent = list(fairness.requests(full))
    assert len(sent) == 1000 + 10 * 10
    assert [t for t, _ in sent[:1000]] == ["big"] * 1000
    assert sent[1000] == ("small-0", "small-0-0000")
    assert len(list(fairness.requests(quick))) == 100 + 10 * 5
    assert [v.name for v in fairness.variants(full)] == ["fifo", "round-robin", "per-key"]
    per_key = fairness.variants(full)[-1].settings(full)
    assert per_key == {"limit": 20, "key_attribute": "tenant", "per_key_limit": 5}
    assert fairness.variants(full)[0].settings(full) == {"limit": 20}


def _keyed(tenant: str, i: int, start: float, stop: float | None, tag_of: str = "") -> Execution:
    name = f"k{key_tag(tag_of or tenant)}_{tenant}-{i:04d}"
    return Execution(name, name, "SUCCEEDED" if stop else "RUNNING", start, stop)


def test_fairness_figures_and_section_from_hand_made_records(tmp_path: Path) -> None:
    # Per-key 2: big runs 2 at a time from t=100; the small tenants are done by 102.5.
    records = [
        _keyed("big", 0, 100.0, 102.0),
        _keyed("big", 1, 100.0, 102.0),
        _keyed("big", 2, 102.0, 104.0),
        _keyed("small-0", 0, 100.5, 101.5),
        _keyed("small-1", 0, 100.5, 102.5),
        _keyed("small-1", 1, 101.0, 102.0),
        _keyed("big", 3, 103.0, 110.0, tag_of="small-0"),  # the tag names another tenant
    ]
    tenants = ["big", "small-0", "small-1"]
    got = fairness.figures(records, tenants)
    assert got["unknown_tenant"] == 1
    assert got["small_finished"] == {"min": 1.5, "median": 2.0, "max": 2.5}
    assert got["big_finished"] == 4.0
    assert got["big_finished_before_last_small"] == 2
    assert got["peak_concurrency"] == 5  # 100.5-101.5: big x2, small-0, small-1 x2 from 101
    assert got["peak_per_key"] == 2
    assert got["peak_small_key"] == 2
    assert got["wall_seconds"] == 10.0
    assert got["tenants"]["small-0"] == {
        "executions": 1,
        "ended": 1,
        "first_start": 0.5,
        "finished": 1.5,
        "peak": 1,
    }
    # Without a key attribute the names carry no tag: the tenant comes from the name.
    plain = [Execution("big-0000", "a", "SUCCEEDED", 5.0, 6.0)]
    assert fairness.figures(plain, tenants)["big_finished"] == 1.0

    cfg = fairness.Config(big=6, small_tenants=2, small=2, limit=5, per_key_limit=2)
    run = {
        "label": "key tenant, per-key limit 2",
        "settings": {},
        "requests": 8,
        "complete": False,
        "seconds_ready_to_done": 12.0,
        "deferred": 3,
        "dead_lettered": 0,
        "left_in_queue": 0,
        "api_calls": {"StartExecution": 6},
        "load": {"others_busy_cores": 0.5},
        **got,
    }
    report.write_json(
        tmp_path,
        "fairness",
        {
            "scenario": "fairness",
            "started_at": "2026-01-01T00:00:00+00:00",
            "duration_seconds": 1.0,
            "uptime_before": "load average: 0.00",
            "uptime_after": "load average: 0.00",
            "machine": MACHINE,
            "results": {"config": asdict(cfg), "runs": {"per-key": run}},
        },
    )
    text = summary.write(tmp_path).read_text()
    assert "## Fairness" in text
    row = (
        "| key tenant, per-key limit 2 (**stopped**) | 1.5 / 2.0 / 2.5 (3 of 4 ended) | not "
        "done: 3 of 6 ended | 5 | 2 (2) | stopped after 12 | 3 | 0 |"
    )
    assert row in text
    assert "had not ended every request after 600 s" in text
    # Busy: big 2 x 2 s + 1 x 2 s, small 1 + 2 + 1 s = 10 s of 5 slots x 10 s.
    assert "slots busy 20% of the wall time; the big tenant ended 3 executions at 0.75/s" in text
    assert "`.venv/bin/python -m bench --only fairness`" in text
    assert "at per-key limit 2 the big tenant alone at least 3 s" in text
    assert (tmp_path / "fairness.png").stat().st_size > 10_000


def test_requests_carry_whole_seconds() -> None:
    requests = stream(200, 1, 3, seed=5)
    assert {r.seconds for r in requests} == {1, 2, 3}
    assert all(isinstance(r.seconds, int) for r in requests)
    assert json.loads(requests[0].body)["seconds"] == requests[0].seconds
    assert stream(3, 2.5, 3.5)[0].seconds == 3  # bounds rounded inwards
    assert stream(2, None, None)[0].body == '{"req": "req-00000"}'
    with pytest.raises(ValueError, match=r"no whole second between low=0.2 and high=0.5"):
        stream(1, 0.2, 0.5)


def _states(machine: dict[str, Any]) -> dict[str, Any]:
    """Every state of a definition, Parallel branches included, by name."""
    out: dict[str, Any] = {}
    for name, state in machine["States"].items():
        out[name] = state
        for branch in state.get("Branches", []):
            out |= _states(branch)
    return out


def test_semaphore_is_the_aws_sample() -> None:
    states = _states(semaphore.definition("t", 20))
    assert states["Get Lock"]["Type"] == states["Do Work"]["Type"] == "Parallel"
    acquire = states["Acquire Lock"]
    # The sample's Retry on States.ALL catches ConditionalCheckFailed before its Catch does.
    assert acquire["Retry"][1] == {
        "ErrorEquals": ["States.ALL"],
        "MaxAttempts": 6,
        "BackoffRate": 2,
    }
    assert [c["Next"] for c in acquire["Catch"]] == [
        "Initialize Lock Item",
        "Get Current Lock Record",
    ]
    params = acquire["Parameters"]
    assert params["ExpressionAttributeNames"]["#lockownerid.$"] == "$$.Execution.Id"
    assert params["ConditionExpression"] == (
        "currentlockcount <> :limit and attribute_not_exists(#lockownerid)"
    )
    assert params["ExpressionAttributeValues"][":limit"] == {"N": "20"}
    assert states["Get Current Lock Record"]["Next"] == "Check If Lock Already Acquired"
    assert states["Wait to Get Lock"] == {"Type": "Wait", "Seconds": 3, "Next": "Acquire Lock"}
    assert states["Work"] == {"Type": "Wait", "SecondsPath": "$.seconds", "End": True}
    assert states["Release Lock"]["Parameters"]["ConditionExpression"] == (
        "attribute_exists(#lockownerid)"
    )
    cleanup = _states(semaphore.cleanup_definition("t"))
    assert cleanup["Clean Up Lock"]["Parameters"]["UpdateExpression"].endswith(
        "REMOVE #lockownerid"
    )
    # The simplified loop stays available, without the sample's Retry.
    simple = _states(semaphore.simplified_definition("t", 20))
    assert [r["ErrorEquals"] for r in simple["Acquire"]["Retry"]] == [
        ["DynamoDB.ProvisionedThroughputExceededException"]
    ]


class _History:
    """Stands in for Step Functions' GetExecutionHistory: one page of hand-made events."""

    def __init__(self, events: list[tuple[str, str, str]]) -> None:
        at = datetime(2026, 1, 1, tzinfo=UTC)
        self.events = []
        for i, (kind, name, resource) in enumerate(events):
            event: dict[str, Any] = {"type": kind, "timestamp": at + timedelta(seconds=i)}
            if kind.endswith("StateEntered"):
                event["stateEnteredEventDetails"] = {"name": name}
            elif kind.endswith("StateExited"):
                event["stateExitedEventDetails"] = {"name": name}
            elif kind == "TaskScheduled":
                event["taskScheduledEventDetails"] = {"resource": resource}
            self.events.append(event)

    async def get_execution_history(self, **_: Any) -> dict[str, Any]:
        return {"events": self.events}


async def test_trace_counts_retries_and_the_calls_of_unrecorded_branch_states() -> None:
    update, get = semaphore.UPDATE_ITEM, semaphore.GET_ITEM
    # As MiniStack records the sample: nothing of the Parallel branches but their calls.
    history = _History(
        [
            ("ParallelStateEntered", "Get Lock", ""),
            *[("TaskScheduled", "", update)] * 7,  # first round: 1 + 6 retries
            ("TaskScheduled", "", get),  # GetItem, Choice, Wait 3 s
            ("TaskScheduled", "", update),  # second round: acquired
            ("ParallelStateExited", "Get Lock", ""),
            ("ParallelStateEntered", "Do Work", ""),
            ("ParallelStateExited", "Do Work", ""),
            ("TaskStateEntered", "Release Lock", ""),
            ("TaskScheduled", "", update),
            ("TaskScheduled", "", update),  # one retry of a recorded Task state
            ("TaskStateExited", "Release Lock", ""),
            ("SucceedStateEntered", "Success State", ""),
        ]
    )
    execution = Execution("arn", "req-1", "SUCCEEDED", 0.0, 20.0)
    got = await trace(history, execution, work_state="Do Work")  # type: ignore[arg-type]
    assert (got.work_stop or 0) - (got.work_start or 0) == 1.0
    assert got.task_calls == 11
    assert got.retries == 1
    assert got.unrecorded_calls == {update: 8, get: 1}
    assert got.transitions == 4 + 1  # recorded states entered + the recorded retry
    # Get Lock branch: Acquire x2, 6 retries, GetItem, Choice, Wait; Do Work branch: 5.
    assert semaphore.branch_transitions(got) == 2 + 6 + 3 + 5


def _sweep_run(max_concurrency: int, dead: int) -> dict[str, Any]:
    return {
        "requests": 10,
        "max_concurrency": max_concurrency,
        "seconds_above_limit": 1.25,
        "starts_before_a_slot_was_free": 3,
        "utilisation_while_backlog": 0.5,
        "makespan_seconds": 40.0,
        "backlog_seconds": 20.0,
        "api_calls": {"ListExecutions": 100},
        "extra": {"dead_lettered": dead},
        "load": {"machine_busy_cores": 1.0},
        "series": {"work": [(0.0, 0), (1.0, max_concurrency), (3.0, 0)]},
    }


def test_lag_sweep_section_and_plot(tmp_path: Path) -> None:
    doc = {
        "results": {
            "config": asdict(comparison.Config(lags=(0.0, 2.0))),
            "patterns": {},
            comparison.SWEEP: {"0": _sweep_run(20, 0), "2": _sweep_run(31, 4)},
        }
    }
    lines = report.lag_sweep_section(doc)
    assert "| 2 | 10 | 31 | 1.2 | 3 | 4 | 0.50 | 40.0 | 5.0 |" in lines
    assert any("may not reflect very recent updates and changes" in line for line in lines)
    plots.lag_sweep(doc["results"], tmp_path / "lag.png")
    assert (tmp_path / "lag.png").stat().st_size > 10_000


PAGE = report.PAGE  # docs/performance.md
RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
# A figure typed by hand: a number with a unit or a percent sign.
_FIGURE = re.compile(r"(\d[\d,]*(?:\.\d+)?)\s*(%|ms\b|s\b|/s\b|MB\b|MiB\b|min\b)")
_SCALE = {"%": (1.0, 100.0), "ms": (1000.0, 1.0), "min": (1 / 60, 1.0)}


def _stored_numbers(value: Any) -> list[float]:
    """Every number in a results document, but the long sample and series lists."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _stored_numbers(v)]
    if isinstance(value, list) and len(value) <= 50:
        return [n for v in value for n in _stored_numbers(v)]
    return []


def _stored(figure: str, unit: str, numbers: list[float]) -> bool:
    """Whether a hand-typed figure is one of the stored numbers, at its shown precision."""
    shown = float(figure.replace(",", ""))
    digits = len(figure.partition(".")[2])
    scales = _SCALE.get(unit, (1.0, 1.0))
    return any(round(n * k, digits) == shown for n in numbers for k in scales)


def test_the_performance_page_figures_match_the_stored_results() -> None:
    text = PAGE.read_text()
    assert report.readme_section(text) == report.readme_block(RESULTS), (
        "docs/performance.md's figures differ from bench/results/: run "
        "`.venv/bin/python -m bench.report --write` after `make bench`"
    )
    # Figures typed by hand around the generated block must be stored numbers too.
    performance = text[: text.index("## Fairness")]
    begin, end = performance.index(report.BEGIN), performance.index(report.END)
    hand_written = performance[:begin] + performance[end:]
    numbers = [
        n for path in RESULTS.glob("*.json") for n in _stored_numbers(json.loads(path.read_text()))
    ]
    unstored = [f"{f} {u}" for f, u in _FIGURE.findall(hand_written) if not _stored(f, u, numbers)]
    assert unstored == [], f"figures with nothing stored behind them: {unstored}"
    # The check has teeth: a made-up figure is caught.
    assert not _stored("12345.678", "ms", numbers)


@pytest.mark.integration
@pytest.mark.timeout(90)
async def test_check_then_act_overshoots_when_the_listing_lags() -> None:
    # Six 3 s requests, threshold 3, listings 2 s stale: every check in the first 2 s sees
    # the first listing (nothing running), so all six start; the records show it.
    config = comparison.Config(
        requests=6, limit=3, low=3, high=3, list_lag=2.0, lags=(), event_delay=0
    )
    document, _ = await comparison.run(config, only=["check-then-act"])
    figures = document["patterns"]["check-then-act"]
    assert figures["complete"], figures["notes"]
    assert figures["max_concurrency"] > 3
    assert figures["seconds_above_limit"] > 0
    assert figures["api_calls"]["GetParameter"] == figures["extra"]["invocations"]
    assert figures["extra"]["stale_listings_served"] > 0
    assert figures["extra"]["dead_lettered"] == 0


@pytest.mark.integration
@pytest.mark.timeout(90)
async def test_semaphore_as_the_aws_sample_runs_in_the_emulator() -> None:
    config = comparison.Config(requests=4, limit=2, low=1, high=1, lags=(), event_delay=0)
    document, _ = await comparison.run(config, only=["dynamodb-semaphore"])
    figures = document["patterns"]["dynamodb-semaphore"]
    assert figures["complete"], figures["notes"]
    assert figures["max_concurrency"] <= 2  # from the Work states' records
    assert figures["max_executions_running"] == 4  # all started at once, two waited
    assert figures["extra"]["holders_after"] == 0
    assert figures["extra"]["task_retries"] > 0  # the sample's Retry on States.ALL fired
    # Uncontended: 4 recorded + 1 acquire + 5 work states; the waiters paid more.
    assert figures["state_transitions_per_request"] > 10


def test_start_cost_takes_the_median_round_and_says_the_goal() -> None:
    runs = [{"cpu_ms_per_start": ms, "n": i} for i, ms in enumerate([1.4, 1.1, 1.2])]
    assert start_cost.median_of(runs, "cpu_ms_per_start") == {
        "cpu_ms_per_start": 1.2,
        "n": 2,
        "rounds": [1.4, 1.1, 1.2],
    }
    assert start_cost.per_half_core(1.25) == 400.0
    fast: dict[str, Any] = {"cpu_ms_per_start": 1.0, "starts_per_second": 500.0}
    fast |= {"starts_per_second_per_half_core": 500.0, "rounds": [1.0]}
    paced: dict[str, Any] = {"cpu_ms_per_start": 1.2, "starts_per_second": 300.0}
    paced |= {"cores_used": 0.36, "settings": {"start_rate": 300.0}, "rounds": [1.2]}
    client = {"client_cpu_ms_per_start": 0.5, "starts_per_second_per_half_core": 1000.0}
    goal = {"quota_starts_per_second": 300.0, "max_cores": 0.5, "cores_at_quota": 0.36}
    results = {
        "client": client,
        "bare_client": {"client_cpu_ms_per_start": 0.6},
        "dispatcher": fast,
        "paced": paced,
        "goal": goal | {"met": True},
        "compared": {
            "source": "/old",
            "fast": {"cpu_ms_per_start": 0.9, "rounds": [0.9]},
            "paced": {"cpu_ms_per_start": 1.0, "rounds": [1.0]},
        },
    }
    lines = start_cost.summary(results).splitlines()
    assert lines[3] == "goal 300/s on <= 0.5 core: 0.36 core (met)"
    assert (
        lines[-1]
        == "  paced: 1.0 ms per start there, 1.2 here (+0.200 ms; rounds [1.0] there, [1.2] here)"
    )


def _overdrawn(times: list[float], rate: float, burst: int) -> bool:
    """Whether some window [a, b] of the record holds more than burst + rate * (b - a) calls
    (checked pair by pair: the plain definition, not the O(n) one under test)."""
    return any(
        j - i + 1 > burst + rate * (times[j] - times[i]) + 1e-6
        for i in range(len(times))
        for j in range(i, len(times))
    )


def test_reconcile_reads_stay_within_the_budget_and_unpaced_ones_do_not() -> None:
    config = reads.Config(seconds=60.0, churn=0.1, stress=None)
    budget = {
        reads.LIST: (reads.PACED.rates.list_executions, readbudget.LIST_BURST),
        reads.DESCRIBE: (reads.PACED.rates.describe_execution, readbudget.DESCRIBE_BURST),
    }
    with structlog.testing.capture_logs():  # a line per adoption and per slot freed
        paced = reads.simulate(config, 80, 8000, reads.PACED)
        unpaced = reads.simulate(config, 80, 8000, reads.UNPACED)
    for operation, (rate, burst) in budget.items():
        times = paced["_calls"][operation]
        assert len(times) > burst  # enough calls for the budget to matter
        assert not _overdrawn(times, rate, burst), operation
        assert paced["operations"][operation]["budget_excess"] <= 1e-6
        assert _overdrawn(unpaced["_calls"][operation], rate, burst), operation
        assert unpaced["operations"][operation]["budget_excess"] > 0
    # 80 pools of 100: one page each, 0.2 s a page. The start-up listing fits the burst of
    # 50 plus what refills meanwhile; after it, unpaced, every pool lists at once.
    assert paced["operations"][reads.LIST]["calls_before_ready"] == 80
    assert unpaced["operations"][reads.LIST]["calls_before_ready"] == 80
    assert paced["ready_seconds"] >= unpaced["ready_seconds"] == pytest.approx(16.0)
    assert unpaced["operations"][reads.LIST]["per_second_max_1s"] == 80  # every pool at once
    assert paced["operations"][reads.LIST]["per_second_max_1s"] <= 6
    assert unpaced["pools_without_a_pass"] == 0  # paced, the last pools' phases come later
    # Ends are found by describes only (no status events): each one frees a slot.
    assert paced["end_to_free_seconds_mean"] > 0


def test_reads_windows_and_aws_bucket_on_hand_made_times() -> None:
    times = [0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0, 3.0]
    assert reads.most_in_window(times, 1.0) == 5
    # Burst 2, 1/s: [0, 1] holds 6 calls where 2 + 1 are allowed.
    assert reads.budget_excess(times, 1.0, 2) == pytest.approx(3.0)
    assert reads.budget_excess([0.0, 1.0, 2.0], 1.0, 1) == pytest.approx(0.0)
    bucket = reads.aws_bucket([0.0, 0.0, 0.0, 0.5], 2, 2.0)
    assert bucket == {"lowest": 0.0, "lowest_share": 0.0, "throttled": 1}


def test_shared_limit_figures_from_hand_made_holds() -> None:
    # Limit 2, all sent at 0. Invoices a, b (1 unit) run 0-2 and d 1-1.5 (3 units in use:
    # over for 0.5 s); refund r (2 units) waits for both a and b to end, starts at 2.5.
    holds = [
        shared_limit.Hold("a", "invoices", 1, 0.0, 2.0),
        shared_limit.Hold("b", "invoices", 1, 0.0, 2.0),
        shared_limit.Hold("d", "invoices", 1, 1.0, 1.5),
        shared_limit.Hold("r", "refunds", 2, 2.5, 3.5),
    ]
    sent = dict.fromkeys("abdr", 0.0)
    run = shared_limit.SharedRun("x", holds, sent, requests=4, complete=True)
    got = shared_limit.figures(run, limit=2)
    assert got["max_weighted_use"] == 3
    assert got["seconds_above_limit"] == pytest.approx(0.5)
    # Until the last start (2.5): 2 x 1 + 3 x 0.5 + 2 x 0.5 + 0 x 0.5 = 4.5 unit-seconds.
    assert got["utilisation_while_backlog"] == pytest.approx(4.5 / (2 * 2.5))
    assert got["utilisation_first_start_to_last_end"] == pytest.approx(6.5 / (2 * 3.5), abs=1e-4)
    # Ends at 1.5, 2, 2 while r waited, each to the next start (2.5); r's end: nobody waits.
    assert shared_limit.handovers(holds, sent) == pytest.approx([1.0, 0.5, 0.5])
    assert got["handover_seconds"]["count"] == 3
    # With room: the end at 1.5 left 2 units in use, no room for r; the ends at 2 did.
    assert shared_limit.handovers(holds, sent, limit=2) == pytest.approx([0.5, 0.5])
    assert got["handover_with_room_seconds"]["count"] == 2
    assert got["handover_seconds"]["p50"] == pytest.approx(0.5)
    assert got["makespan_seconds"] == pytest.approx(3.5)
    assert got["by_workflow"]["refunds"]["wait_max"] == pytest.approx(2.5)

    doc = {
        "duration_seconds": 60.0,
        "uptime_before": "load average: 0.00",
        "uptime_after": "load average: 0.00",
        "machine": MACHINE,
        "results": {
            "config": asdict(shared_limit.Config(limit=2)),
            "command": shared_limit.COMMAND,
            "handover_definition": shared_limit.HANDOVER_DEFINITION,
            "patterns": {"x": got | {"load": {"machine_busy_cores": 1.0}}},
        },
    }
    lines = shared_limit.section(doc)
    assert (
        "| x | 3 | 0.5 | 0.90 | 0.93 | 3 | 0.500 / 0.950 | 2, 0.500 / 0.500 | 2.5 / 2.5 | 3.5 |"
        in lines
    )
    assert shared_limit.COMMAND in lines[0]


def test_the_weighted_semaphore_adds_its_weight_under_the_limit_less_it() -> None:
    states = _states(semaphore.definition("t", 4, weight=2))
    acquire = states["Acquire Lock"]["Parameters"]
    assert acquire["ExpressionAttributeValues"][":increase"] == {"N": "2"}
    assert acquire["ExpressionAttributeValues"][":ceiling"] == {"N": "2"}
    assert acquire["ConditionExpression"].startswith("currentlockcount <= :ceiling and ")
    release = states["Release Lock"]["Parameters"]
    assert release["ExpressionAttributeValues"] == {":decrease": {"N": "2"}}
    cleanup = _states(semaphore.cleanup_definition("t", weight=2))["Clean Up Lock"]
    assert cleanup["Parameters"]["ExpressionAttributeValues"] == {":decrease": {"N": "2"}}


@pytest.mark.integration
@pytest.mark.timeout(180)
async def test_two_state_machines_share_a_limit_under_both_patterns() -> None:
    # Limit 2: three invoices (1 unit) and two refunds (2 units) of 1 s, to both patterns.
    cfg = shared_limit.Config(invoices=3, refunds=2, limit=2, low=1, high=1, within=120)
    results = await shared_limit.run(cfg)
    for name, figures in results["patterns"].items():
        assert figures["complete"], (name, figures["notes"])
        assert figures["max_weighted_use"] <= 2, name  # from the records
        assert figures["by_workflow"]["refunds"]["completed"] == 2, name
        assert figures["handover_seconds"]["count"] > 0, name
    dispatcher = results["patterns"][shared_limit.DISPATCHER]["extra"]
    assert dispatcher["executions_started"] == {"invoices": 3, "refunds": 2}
    held = results["patterns"][shared_limit.SEMAPHORE]["extra"]
    assert held["lock_count_after"] == 0
    assert held["max_executions_running"] == 5  # all started at once; they wait inside
