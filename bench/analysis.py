"""Turn work intervals (from the executions' own records) into the comparison's figures."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from devtools.records import Execution, concurrency_series, max_overlap


@dataclass(frozen=True, slots=True)
class Interval:
    """When one request's work ran (Unix seconds); ``key`` is the request's key."""

    key: str
    start: float
    stop: float


def as_executions(intervals: Iterable[Interval]) -> list[Execution]:
    """Intervals in the shape `devtools.records` works on."""
    return [Execution(i.key, i.key, "SUCCEEDED", i.start, i.stop) for i in intervals]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between closest ranks; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def time_above(series: Sequence[tuple[float, int]], limit: int) -> float:
    """Seconds during which more than ``limit`` ran at once."""
    total = 0.0
    for (at, count), (after, _) in itertools.pairwise(series):
        if count > limit:
            total += after - at
    return total


def busy_slot_seconds(
    series: Sequence[tuple[float, int]], limit: int, begin: float, end: float
) -> float:
    """Integral of min(running, limit) over [begin, end]: slot-seconds that did work."""
    total = 0.0
    for (at, count), (after, _) in itertools.pairwise(series):
        lo, hi = max(at, begin), min(after, end)
        if hi > lo:
            total += min(count, limit) * (hi - lo)
    return total


def refill_gaps(intervals: Sequence[Interval], limit: int) -> list[float]:
    """Slot hand-over gaps: the k-th work end to the (k + limit)-th work start, seconds.

    At full utilisation the k-th end frees the slot the (k + limit)-th start takes, so the
    gap is how long a freed slot stayed idle. Negative: a start came before any slot was
    free (the limit was exceeded).
    """
    starts = sorted(i.start for i in intervals)
    stops = sorted(i.stop for i in intervals)
    return [starts[k + limit] - stops[k] for k in range(len(stops)) if k + limit < len(starts)]


def summarise(
    intervals: Sequence[Interval], sent_at: Mapping[str, float], limit: int
) -> dict[str, Any]:
    """Max concurrency, time above the limit, utilisation, queue wait, makespan."""
    executions = as_executions(intervals)
    end = max(i.stop for i in intervals)
    series = concurrency_series(executions, now=end)
    first_sent = min(sent_at.values())
    backlog_end = max(i.start for i in intervals)  # the last request began its work
    window = backlog_end - first_sent
    busy = busy_slot_seconds(series, limit, first_sent, backlog_end)
    waits = [i.start - sent_at[i.key] for i in intervals if i.key in sent_at]
    gaps = refill_gaps(intervals, limit)
    return {
        "completed": len(intervals),
        "max_concurrency": max_overlap(executions, now=end),
        "seconds_above_limit": round(time_above(series, limit), 3),
        "utilisation_while_backlog": round(busy / (limit * window), 4) if window > 0 else None,
        "backlog_seconds": round(window, 3),
        "queue_wait_p50": round(percentile(waits, 50), 3),
        "queue_wait_p99": round(percentile(waits, 99), 3),
        "queue_wait_max": round(max(waits), 3),
        "makespan_seconds": round(end - first_sent, 3),
        "refill_gap_p50": round(percentile(gaps, 50), 4),
        "refill_gap_p99": round(percentile(gaps, 99), 4),
        "starts_before_a_slot_was_free": sum(1 for g in gaps if g < 0),
    }


def series_since(intervals: Iterable[Interval], origin: float) -> list[tuple[float, int]]:
    """The concurrency step series with times relative to ``origin`` (for plots)."""
    executions = as_executions(intervals)
    end = max((e.stop or e.start for e in executions), default=origin)
    return [(round(at - origin, 3), count) for at, count in concurrency_series(executions, end)]
