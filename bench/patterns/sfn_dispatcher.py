"""Pattern 1, sfn-dispatcher: the real dispatcher, in this process, on the request stream.

In-process so that every hand-over can be recorded exactly: the pool's refill histogram
(`dispatcher_slot_refill_seconds`) is wrapped by a recorder that keeps each observation
and passes it on. CPU and memory are measured elsewhere, on a child process.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import anyio

from bench import prom
from bench.aws import session
from bench.patterns import PatternRun, collect
from bench.workload import Request, submit
from devtools.chaos import EventChaos
from devtools.sandbox import provision
from dispatcher.daemon.metrics import Metrics
from dispatcher.daemon.service import Dispatcher
from dispatcher.settings.config import Settings

NAME = "sfn-dispatcher"


class RecordingHistogram:
    """Stands in for a labelled histogram: keeps every observation, then passes it on."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.samples: list[float] = []

    def labels(self, **labels: str) -> _RecordingChild:
        """The child for ``labels``, recording into this histogram's samples."""
        return _RecordingChild(self.real.labels(**labels), self.samples)


class _RecordingChild:
    def __init__(self, real: Any, samples: list[float]) -> None:
        self.real = real
        self.samples = samples

    def observe(self, value: float) -> None:
        self.samples.append(value)
        self.real.observe(value)


async def run(
    endpoint: str,
    requests: Sequence[Request],
    limit: int,
    *,
    within: float,
    event_delay: int = 0,
    start_grace: float | None = None,
) -> PatternRun:
    """Run the dispatcher (defaults, but the limit) until every request's execution ended.

    With ``event_delay`` each status event reaches the dispatcher through the chaos relay,
    held back a random 0..``event_delay`` whole seconds (SQS ``DelaySeconds``): MiniStack
    delivers them almost at once, AWS (best effort, through EventBridge) does not.
    ``start_grace`` overrides the dispatcher's default (its start-up waits for it).
    """
    resources = await provision(
        endpoint, prefix="cmp-dispatcher", limit=limit, raw_events=event_delay > 0
    )
    relay = (
        EventChaos(
            endpoint,
            resources.raw_events_queue_url,
            resources.events_queue_url,
            max_delay=event_delay,
            seed=7,
        )
        if resources.raw_events_queue_url
        else None
    )
    fields: dict[str, object] = {"limit": limit, "http_port": 0}
    if start_grace is not None:
        fields["start_grace"] = start_grace
    settings = Settings.load(fields, env=resources.env())
    metrics = Metrics()
    refill = RecordingHistogram(metrics.refill)
    # Same labels().observe() surface as the Histogram it wraps.
    metrics.refill = refill  # type: ignore[assignment]
    dispatcher = Dispatcher(settings, metrics=metrics, endpoint_url=endpoint)
    async with anyio.create_task_group() as relaying:
        if relay is not None:
            await relaying.start(relay.run)
        async with anyio.create_task_group() as tg:
            await tg.start(partial(dispatcher.run, handle_signals=False))
            submitted = await submit(resources.request_queue_url, requests, endpoint)
            with anyio.move_on_after(within):
                # The driver's only work while the dispatcher runs: an attribute read, 5 per
                # second (the pool offers no "finished" event to wait on).
                while dispatcher.pool.finished_total < len(requests):  # noqa: ASYNC110
                    await anyio.sleep(0.2)
            # Every request ran: nothing is in flight, so skip the ordered shutdown (it lets
            # the intake's 20 s long poll answer) and cancel.
            tg.cancel_scope.cancel()
        relaying.cancel_scope.cancel()  # the relay runs until cancelled
    samples = prom.from_registry(metrics.registry)
    async with session().client("stepfunctions", endpoint_url=endpoint) as sfn:
        _, traces, work, lives = await collect(sfn, resources.state_machine_arn)
    name = "dispatcher_slot_refill_seconds"
    notes = [
        f"the real dispatcher, default settings but the limit ({limit}), in the benchmark "
        "process (hand-overs recorded exactly)",
    ]
    if relay is not None:
        notes.append(
            f"status events relayed with a random 0-{event_delay} s delay each (SQS "
            "DelaySeconds, whole seconds) plus one relay hop"
        )
    return PatternRun(
        name=NAME,
        title="sfn-dispatcher",
        limit=limit,
        requests=len(requests),
        submitted=submitted,
        work=work,
        executions=lives,
        calls=prom.by_label(samples, "dispatcher_aws_calls_total", "operation"),
        traces=traces,
        complete=len(work) == len(requests),
        notes=notes,
        extra={
            "handover_samples": refill.samples,
            "handover_histogram_p50": prom.histogram_quantile(samples, name, 0.50),
            "handover_histogram_p99": prom.histogram_quantile(samples, name, 0.99),
            "events_received": int(prom.total(samples, "dispatcher_events_total")),
            "dispatcher_max_running_seen": dispatcher.pool.max_running_seen,
            "started": dispatcher.pool.started_total,
            "event_delay_max_seconds": event_delay,
            "events_delayed": relay.stats["delayed"] if relay else 0,
        },
    )
