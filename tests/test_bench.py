"""The benchmark harness works: its arithmetic on hand-made intervals, and one toy run.

The toy run is the comparison's dispatcher pattern at 20 requests against its own
emulator, then the whole reporting path (JSON, summary, plots) on what it measured.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import pytest

from bench import comparison, fairness, report, summary
from bench.__main__ import _configs
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
from dispatcher.requests import key_tag

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
