"""Read the dispatcher's Prometheus metrics: from its registry (in-process) or /metrics text."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True, slots=True)
class Sample:
    """One exposed sample: full name (with ``_total``/``_bucket``...), labels, value."""

    name: str
    labels: dict[str, str]
    value: float


def from_registry(registry: Any) -> list[Sample]:
    """Every sample of an in-process registry."""
    return [
        Sample(s.name, dict(s.labels), float(s.value))
        for family in registry.collect()
        for s in family.samples
    ]


def from_text(text: str) -> list[Sample]:
    """Every sample of a /metrics response."""
    return [
        Sample(s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def by_label(samples: Iterable[Sample], name: str, label: str) -> Counter[str]:
    """Sum of sample ``name`` per value of ``label`` (e.g. calls per operation)."""
    out: Counter[str] = Counter()
    for s in samples:
        if s.name == name:
            out[s.labels.get(label, "")] += int(s.value)
    return out


def total(samples: Iterable[Sample], name: str) -> float:
    """Sum of sample ``name`` over all labels."""
    return sum(s.value for s in samples if s.name == name)


def histogram_quantile(samples: Iterable[Sample], name: str, q: float) -> float:
    """Prometheus' ``histogram_quantile``: linear inside the bucket that holds rank q."""
    buckets: dict[float, float] = {}
    for s in samples:
        if s.name == f"{name}_bucket":
            bound = float(s.labels["le"])
            buckets[bound] = buckets.get(bound, 0.0) + s.value
    if not buckets:
        return math.nan
    bounds = sorted(buckets)
    count = buckets[bounds[-1]]
    if count == 0:
        return math.nan
    rank = q * count
    previous_bound, previous_count = 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if math.isinf(bound):
                return previous_bound  # beyond the last finite bucket: its bound is all we know
            inside = buckets[bound] - previous_count
            share = (rank - previous_count) / inside if inside else 0.0
            return previous_bound + (bound - previous_bound) * share
        previous_bound, previous_count = bound, buckets[bound]
    return previous_bound


def histogram_mean(samples: Iterable[Sample], name: str) -> tuple[float, float]:
    """(sum, count) of a histogram, all labels."""
    listed = list(samples)
    return total(listed, f"{name}_sum"), total(listed, f"{name}_count")
