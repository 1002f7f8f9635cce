"""The request stream every pattern gets: the same seeded durations, sent the same way.

Each request carries an idempotency key (``req-00042``) that every pattern uses as the
execution name, so executions map back to requests, and the time it was handed to SQS,
recorded here, so queue wait is measured the same way for every pattern.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from dispatcher.producer import SubmitItem, SubmitReport, submit_requests


@dataclass(frozen=True, slots=True)
class Request:
    """One request: its key (= execution name) and how long its work takes (None: no wait).

    Whole seconds: AWS documents a Wait state's ``SecondsPath`` as a non-negative integer.
    """

    key: str
    seconds: int | None

    @property
    def body(self) -> str:
        """The execution input: the demo machine waits ``$.seconds`` if present."""
        document: dict[str, object] = {"req": self.key}
        if self.seconds is not None:
            document["seconds"] = self.seconds
        return json.dumps(document)


def stream(
    count: int, low: float | None, high: float | None, *, seed: int = 5, prefix: str = "req"
) -> list[Request]:
    """``count`` requests of ``low``-``high`` whole seconds (uniform, seeded; None: no wait).

    The bounds are rounded inwards to whole seconds, which must leave at least one.
    """
    if low is not None and high is not None and math.ceil(low) > math.floor(high):
        raise ValueError(
            f"no whole second between low={low} and high={high}: give bounds that span one"
        )
    rng = random.Random(seed)
    out: list[Request] = []
    for i in range(count):
        seconds = (
            None if low is None or high is None else rng.randint(math.ceil(low), math.floor(high))
        )
        out.append(Request(f"{prefix}-{i:05d}", seconds))
    return out


@dataclass
class Submitted:
    """When each request was handed to SQS (Unix seconds), and the producer's report."""

    sent_at: dict[str, float]
    report: SubmitReport

    @property
    def first(self) -> float:
        """When the first request was sent."""
        return min(self.sent_at.values())


async def submit(queue_url: str, requests: Sequence[Request], endpoint: str) -> Submitted:
    """Send ``requests`` with the project's producer, stamping each as its batch is cut."""
    sent_at: dict[str, float] = {}

    def items() -> Iterator[SubmitItem]:
        for request in requests:
            sent_at[request.key] = time.time()
            yield SubmitItem(request.body, idempotency_key=request.key)

    report = await submit_requests(queue_url, items(), endpoint_url=endpoint, concurrency=8)
    if not report.ok:
        raise RuntimeError(f"submitting the request stream failed: {report.summary()}")
    return Submitted(sent_at, report)
