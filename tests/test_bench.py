"""The benchmark harness works: its arithmetic on hand-made intervals, and one toy run.

The toy run is the comparison's dispatcher pattern at 20 requests against its own
emulator, then the whole reporting path (JSON, summary, plots) on what it measured.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench import comparison, report, summary
from bench.analysis import (
    Interval,
    busy_slot_seconds,
    percentile,
    refill_gaps,
    summarise,
    time_above,
)
from bench.prom import Sample, histogram_quantile
from dispatcher.records import Execution, concurrency_series


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
    config = comparison.Config(requests=20, limit=4, low=0.2, high=0.5)
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
                "machine": {
                    "nproc": 2,
                    "cpu_model": "test",
                    "memory_mib": 1,
                    "kernel": "test",
                    "python": "3",
                    "python_implementation": "CPython",
                    "emulator": "ministack",
                    "dispatcher": "0",
                },
                "results": results,
            },
        )
    text = summary.write(tmp_path).read_text()
    assert "| sfn-dispatcher | " in text
    assert "| dispatcher max concurrency <= limit | " in text
    assert (tmp_path / "concurrency.png").stat().st_size > 10_000
    assert (tmp_path / "handover.png").stat().st_size > 10_000
