"""The issue's targets, judged from the results on disk: (target, measured, met)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.figures import MIB_PER_MB, load, num

Row = tuple[str, str, bool | None]  # None: not measured at the target's size


def _comparison(doc: dict[str, Any]) -> list[Row]:
    patterns = doc["results"]["patterns"]
    limit = doc["results"]["config"]["limit"]
    d = patterns.get("sfn-dispatcher")
    if not d:
        return []
    utilisation = d["utilisation_while_backlog"]
    rows: list[Row] = [
        (
            "dispatcher max concurrency <= limit",
            f"{d['max_concurrency']} (limit {limit})",
            d["max_concurrency"] <= limit,
        ),
        (
            "utilisation >= 0.95 while a backlog exists",
            num(utilisation, 3),
            utilisation is not None and utilisation >= 0.95,
        ),
    ]
    others = {n: p["queue_wait_p99"] for n, p in patterns.items() if n != "sfn-dispatcher"}
    if others:
        versus = ", ".join(f"{n} {num(v, 1)} s" for n, v in others.items())
        rows.append(
            (
                "queue wait p99 not worse than either other pattern",
                f"{num(d['queue_wait_p99'], 1)} s vs {versus}",
                d["queue_wait_p99"] <= min(others.values()),
            )
        )
    return rows


def _throughput(doc: dict[str, Any]) -> list[Row]:
    r = doc["results"]["dispatcher"]
    raw = doc["results"]["raw_start_execution"]["mean_starts_per_second"]
    rate = r["starts_per_second"]["middle_80_percent"]
    ratio = r["ratio_to_raw"]
    over_bare = r["cpu_per_start_over_bare_start_execution"]
    rows: list[Row] = [
        (
            "throughput >= 0.85 of raw StartExecution capacity (limit 10,000)",
            f"{num(ratio)} ({num(rate, 0)} vs {num(raw, 0)} starts/s; the emulator's CPU per "
            f"start x{num(r.get('emulator_cpu_over_bare_start'))} a bare start's)",
            ratio is not None and ratio >= 0.85,
        ),
        (
            "client CPU per start <= 1.3x a bare StartExecution call's (same run)",
            f"x{num(over_bare)} ({num(r['cpu_ms_per_start'])} ms per start)",
            over_bare is not None and over_bare <= 1.3,
        ),
        (
            "dispatcher max concurrency <= limit (throughput run, from records)",
            f"{r['max_concurrency_from_records']} (limit {doc['results']['config']['limit']:,})",
            r["max_concurrency_from_records"] <= doc["results"]["config"]["limit"],
        ),
    ]
    for queue, batches in sorted(r.get("delete_batches", {}).items()):
        per_start = batches["calls_per_start"]
        rows.append(
            (
                f"<= 0.15 DeleteMessageBatch calls per start on the {queue} queue",
                f"{num(per_start, 3)} ({num(batches['handles_per_call'], 1)} handles a call)",
                per_start <= 0.15,
            )
        )
    return rows


def _scale(doc: dict[str, Any]) -> list[Row]:
    running, backlog = doc["results"]["running_set"], doc["results"]["backlog"]
    megabytes = running["rss_mib_holding"] / MIB_PER_MB
    held = running["running_held"]
    ratio = backlog["large_over_small"]
    small, large = backlog["small"], backlog["large"]
    return [
        (
            "RSS <= 150 MB at 10,000 running",
            f"{num(megabytes, 1)} MB at {held:,} running",
            megabytes <= 150 if held >= 10_000 else None,
        ),
        (
            f"RSS with 50,000 queued within 10% of 500 queued ({large['queued']:,} vs "
            f"{small['queued']:,} run)",
            f"{num(large['rss_mib'], 1)} vs {num(small['rss_mib'], 1)} MiB (x{num(ratio, 3)})",
            ratio is not None and abs(ratio - 1) <= 0.10,
        ),
    ]


def targets(out: Path) -> list[Row]:
    """Every target of the issue that has a measurement in ``out``."""
    rows: list[Row] = []
    comparison, handover = load(out, "comparison"), load(out, "handover")
    throughput, scale = load(out, "throughput"), load(out, "scale")
    if comparison:
        rows += _comparison(comparison)
    if throughput:
        rows += _throughput(throughput)
    # Judged on the records (work end to next start, events delivered by MiniStack at once).
    gaps = handover["results"]["refill_gap_seconds"].get("sfn-dispatcher") if handover else None
    share = handover["results"].get("dispatcher_share_seconds") if handover else None
    if gaps:
        own = f"; its own share {num(share['p99'] * 1000, 1)} ms" if share else ""
        rows.append(
            (
                "hand-over p99 <= 20 ms (from the records)",
                f"{num(gaps['p99'] * 1000, 1)} ms{own}",
                gaps["p99"] <= 0.020,
            )
        )
    if scale:
        rows += _scale(scale)
    return rows
