"""The slot cycle at a bounded limit: where a slot's time goes, stage by stage.

Zero-length executions at limit 200: a slot is held from the moment its start is sent
until the execution's terminal event is applied, then handed to the next request. Each
stage is timed from the executions' records (start and stop dates, the emulator's clock)
and the dispatcher's own timestamps (its debug line per applied event, with the time the
event reached the queue), on one host clock:

- ``run``: execution start -> stop (the emulator runs a zero-length workflow);
- ``delivery``: stop -> the status event is in the events queue (EventBridge: the emulator);
- ``queued``: in the queue -> received and applied (the dispatcher's receive loop);
- ``refill``: applied -> the next ``StartExecution`` sent (the dispatcher:
  ``dispatcher_slot_refill_seconds``);
- ``start_call``: sent -> answered (``dispatcher_start_execution_seconds``; the record's
  start date falls inside it).

Each rule is run twice: at INFO (the throughput and the slots held against executions
running, judged from records) and at DEBUG (the per-event timestamps, which cost some
CPU). The same is then measured with an EventBridge rule that forwards terminal statuses
only (`TERMINAL_ONLY`): half the events to receive and delete.
"""

from __future__ import annotations

import io
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from bench import prom, report
from bench.analysis import percentile
from bench.aws import session, use_emulator_env
from bench.child import dispatcher_child
from bench.machine import machine_info, uptime
from bench.throughput import deletes_per_queue, sustained_rate
from bench.workload import stream, submit
from devtools.polling import wait_until
from devtools.records import Execution, list_executions, max_overlap
from devtools.sandbox import Emulator, SandboxResources, provision
from devtools.sandbox.provision import status_event_pattern

TERMINAL_STATUSES = ["SUCCEEDED", "FAILED", "TIMED_OUT", "ABORTED"]
REFILL = "dispatcher_slot_refill_seconds"
LATENCY = "dispatcher_start_execution_seconds"


def terminal_only_pattern(state_machine_arn: str) -> dict[str, Any]:
    """Today's rule narrowed to terminal statuses: no RUNNING (nor PENDING_REDRIVE) event."""
    pattern = status_event_pattern(state_machine_arn)
    pattern["detail"] = {**pattern["detail"], "status": TERMINAL_STATUSES}
    return pattern


@dataclass(frozen=True)
class Config:
    """The cycle run's size."""

    requests: int = 1500
    limit: int = 200


class _Tee(io.TextIOBase):
    """Writes to the real stderr (the bench reads its ready line) and to a file."""

    def __init__(self, first: Any, second: Any) -> None:
        self.first, self.second = first, second

    def write(self, text: str) -> int:
        self.second.write(text)
        return int(self.first.write(text))

    def flush(self) -> None:
        self.first.flush()
        self.second.flush()

    def isatty(self) -> bool:
        return False


def _child_main(path: str) -> int:
    """The dispatcher CLI with its log lines also written to ``path``."""
    from dispatcher.cli.main import main  # noqa: PLC0415 - after stderr is replaced

    with Path(path).open("w", encoding="utf-8") as copy:
        sys.stderr = _Tee(sys.stderr, copy)
        return main(["run"])


def _seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _quantiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean_ms": None, "p50_ms": None, "p90_ms": None, "p99_ms": None}
    out = {f"p{q}_ms": round(percentile(values, q) * 1000, 1) for q in (50, 90, 99)}
    return {"mean_ms": round(sum(values) / len(values) * 1000, 1), **out}


def _histogram(samples: list[prom.Sample], name: str) -> dict[str, float | None]:
    total, count = prom.histogram_mean(samples, name)
    out: dict[str, float | None] = {"mean_ms": round(total / count * 1000, 1) if count else None}
    for q in (50, 90, 99):
        value = prom.histogram_quantile(samples, name, q / 100)
        out[f"p{q}_ms"] = None if math.isnan(value) else round(value * 1000, 1)
    return out


def _mean_running(executions: list[Execution]) -> float:
    """Executions running on average (from records) while starts were being made."""
    starts = sorted(e.start for e in executions)
    lo, hi = starts[int(len(starts) * 0.1)], starts[int(len(starts) * 0.9)]
    busy = sum(
        max(0.0, min(e.stop or hi, hi) - max(e.start, lo)) for e in executions if e.stop is not None
    )
    return busy / (hi - lo) if hi > lo else 0.0


def attribute(executions: list[Execution], lines: list[str]) -> dict[str, Any]:
    """Per-stage times of the slot cycle, from records and the dispatcher's debug lines."""
    by_arn = {e.arn: e for e in executions}
    run, delivery, queued = [], [], []
    for line in lines:
        if '"dispatcher.event_applied"' not in line:
            continue
        record = json.loads(line)
        execution = by_arn.get(record.get("execution_arn", ""))
        if execution is None or record.get("status") == "RUNNING" or execution.stop is None:
            continue
        applied = _seconds(record["timestamp"])
        run.append(execution.stop - execution.start)
        if record.get("sent_ms"):
            sent = int(record["sent_ms"]) / 1000
            delivery.append(sent - execution.stop)
            queued.append(applied - sent)
    return {
        "terminal_events_timed": len(run),
        "run": _quantiles(run),
        "delivery": _quantiles(delivery),
        "queued": _quantiles(queued),
    }


async def _one(
    endpoint: str, prefix: str, cfg: Config, *, terminal_only: bool, debug: bool
) -> dict[str, Any]:
    resources: SandboxResources = await provision(endpoint, prefix=prefix, limit=cfg.limit)
    if terminal_only:
        async with session().client("events", endpoint_url=endpoint) as events:
            await events.put_rule(
                Name=resources.rule_name,
                EventPattern=json.dumps(terminal_only_pattern(resources.state_machine_arn)),
                State="ENABLED",
            )
    await submit(resources.request_queue_url, stream(cfg.requests, None, None), endpoint)
    settings: dict[str, object] = {
        "limit": cfg.limit,
        "log_level": "DEBUG" if debug else "INFO",
        # Shutdown lets a long poll in flight answer: 1 s, not 20, keeps the run short.
        "receive_wait_seconds": 1,
    }
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / "dispatcher.log"
        command = (sys.executable, "-m", "bench.cycle", "--tee", str(copy))
        async with dispatcher_child(resources, settings, command=command) as child:
            began = child.sample().cpu_seconds

            async def all_started() -> bool:
                return int((await child.status())["started"]) >= cfg.requests

            await wait_until(all_started, within=300, interval=0.25)
            cpu = child.sample().cpu_seconds - began
            samples = await child.metrics()
        lines = copy.read_text(encoding="utf-8").splitlines()
    async with session().client("stepfunctions", endpoint_url=endpoint) as sfn:
        executions = await list_executions(sfn, resources.state_machine_arn)
    summary = child.summary or {}
    result: dict[str, Any] = {
        "log_level": settings["log_level"],
        "started": len(executions),
        "starts_per_second": sustained_rate([e.start for e in executions]),
        "cpu_ms_per_start": round(cpu / cfg.requests * 1000, 3),
        "max_concurrency_from_records": max_overlap(executions),
        "mean_running_from_records": round(_mean_running(executions), 1),
        "events_applied_per_start": round(summary.get("events_applied", 0) / cfg.requests, 2),
        "delete_batches": deletes_per_queue(
            lines,
            {"requests": resources.request_queue_url, "events": resources.events_queue_url},
            cfg.requests,
        ),
        "refill": _histogram(samples, REFILL),
        "start_call": _histogram(samples, LATENCY),
    }
    if debug:
        result |= attribute(executions, lines)
        stages = ("start_call", "run", "delivery", "queued", "refill")
        means = [result[stage]["mean_ms"] for stage in stages]
        if all(mean is not None for mean in means):
            # Little's law: a full pool turns over `limit` slots every cycle.
            cycle = sum(means)
            result["cycle_mean_ms"] = round(cycle, 1)
            result["share_of_cycle"] = {
                stage: round(mean / cycle, 3) for stage, mean in zip(stages, means, strict=True)
            }
            result["starts_per_second_if_full"] = round(cfg.limit / cycle * 1000, 1)
    return result


async def run(cfg: Config) -> dict[str, Any]:
    """Today's rule and the terminal-only rule, each at INFO and at DEBUG."""
    out: dict[str, Any] = {"config": asdict(cfg)}
    async with Emulator() as emulator:
        for rule, terminal_only in (("all_statuses", False), ("terminal_only", True)):
            for debug in (False, True):
                name = f"{rule}_{'debug' if debug else 'info'}"
                print(f"[bench] cycle: {name}, {cfg.requests} requests at limit {cfg.limit}")
                out[name] = await _one(
                    emulator.endpoint,
                    f"cy-{rule.replace('_', '-')}-{'d' if debug else 'i'}",
                    cfg,
                    terminal_only=terminal_only,
                    debug=debug,
                )
    out["terminal_only_pattern_example"] = terminal_only_pattern(
        "arn:aws:states:us-east-1:123456789012:stateMachine:governed"
    )
    return out


async def _main(out: Path, cfg: Config) -> None:
    began_at = datetime.now(UTC).isoformat(timespec="seconds")
    before, began = uptime(), time.monotonic()
    results = await run(cfg)
    document = {
        "scenario": "cycle",
        "started_at": began_at,
        "duration_seconds": round(time.monotonic() - began, 1),
        "uptime_before": before,
        "uptime_after": uptime(),
        "machine": machine_info(),
        "results": results,
    }
    print(f"[bench] wrote {report.write_json(out, 'cycle', document)}")


def main(argv: list[str]) -> int:
    """``python -m bench.cycle [out]``: run the scenario, write ``<out>/cycle.json``
    (``python -m bench.cycle --tee FILE`` is the dispatcher child it runs)."""
    if argv[:1] == ["--tee"]:
        return _child_main(argv[1])
    from dispatcher import logs  # noqa: PLC0415
    from dispatcher.settings.config import LogFormat  # noqa: PLC0415

    use_emulator_env()
    logs.configure("WARNING", LogFormat.JSON)
    out = Path(argv[0]) if argv else Path(__file__).resolve().parent / "results"
    anyio.run(_main, out, Config())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
