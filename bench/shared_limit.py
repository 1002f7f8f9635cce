"""Two state machines sharing one limit: named limits against the DynamoDB semaphore.

Invoices take 1 unit of the shared limit, refunds 2. The same two request streams (sent to
two queues at once) go to:

- **sfn-dispatcher**: the real dispatcher, in this process, with a config file of two pools
  (``invoices``, ``refunds``) that use one named limit with those weights. A request holds
  its units for its whole execution, so the hold is the execution's start and stop dates
  (``ListExecutions``).
- **dynamodb-semaphore**: the AWS sample's state machine (`bench.patterns.semaphore`) for
  each workflow, both on one lock item; a refund acquires and releases 2 units. Every
  request's execution starts at once. The hold is read from each execution's history: from
  the acquire's ``UpdateItem`` succeeding to the release's.

Both run against their own MiniStack with DynamoDB writes made atomic (as the comparison).
Every figure comes from those records: the weighted use at every instant, utilisation,
hand-over (an end to the next start while work waits) and make-span.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from bench.analysis import percentile
from bench.aws import CallCounter, session
from bench.comparison import emulator_env
from bench.figures import num
from bench.patterns import semaphore, wait_finished
from bench.proc import LoadMeter
from bench.workload import Request, stream, submit
from devtools.records import Execution, list_executions, weighted_series
from devtools.sandbox import Emulator, SandboxResources, provision
from devtools.sandbox.provision import RULE_TARGET_ID
from dispatcher.daemon.service import Dispatcher
from dispatcher.settings import layout
from dispatcher.settings.config import POOL_FIELDS, env_name

if TYPE_CHECKING:
    from types_aiobotocore_stepfunctions import SFNClient

COMMAND = ".venv/bin/python -m bench --only shared_limit"
LIMIT_NAME = "partner-api"
DISPATCHER = "sfn-dispatcher"
SEMAPHORE = "dynamodb-semaphore"
KINDS = ("invoices", "refunds")


@dataclass(frozen=True)
class Config:
    """The scenario's size: two streams of whole-second requests, one shared limit."""

    limit: int = 4
    invoices: int = 32
    refunds: int = 16
    invoice_weight: int = 1
    refund_weight: int = 2
    low: float = 1.0
    high: float = 3.0
    seed: int = 11
    within: float = 420.0  # seconds allowed to each run

    def weights(self) -> dict[str, int]:
        """Units one execution of each workflow takes."""
        return {"invoices": self.invoice_weight, "refunds": self.refund_weight}

    def streams(self) -> dict[str, list[Request]]:
        """The two request streams (seeded; the same for both patterns)."""
        return {
            "invoices": stream(self.invoices, self.low, self.high, seed=self.seed, prefix="inv"),
            "refunds": stream(self.refunds, self.low, self.high, seed=self.seed + 1, prefix="ref"),
        }


QUICK = Config(invoices=6, refunds=3, limit=2, low=1, high=1, within=120.0)


@dataclass(frozen=True, slots=True)
class Hold:
    """When one request held its units of the shared limit (Unix seconds)."""

    key: str
    kind: str
    weight: int
    start: float
    stop: float


@dataclass
class SharedRun:
    """What one pattern did with both streams."""

    name: str
    holds: list[Hold]
    sent_at: dict[str, float]
    requests: int
    complete: bool
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


HANDOVER_DEFINITION = (
    "for every hold that ended while a request was waiting (sent, not yet holding): the "
    "time from that end to the next hold start of either workflow; *with room*: only the "
    "ends after which that next request fitted at once"
)


def _series(holds: Sequence[Hold], end: float) -> list[tuple[float, int]]:
    runs = [(Execution(h.key, h.key, "SUCCEEDED", h.start, h.stop), h.weight) for h in holds]
    return weighted_series(runs, now=end)


def _mean_use(series: Sequence[tuple[float, int]], begin: float, end: float) -> float:
    """Mean units in use over [begin, end]."""
    total = 0.0
    for (at, units), (after, _) in itertools.pairwise(series):
        lo, hi = max(at, begin), min(after, end)
        if hi > lo:
            total += units * (hi - lo)
    return total / (end - begin) if end > begin else float("nan")


def handovers(
    holds: Sequence[Hold], sent_at: dict[str, float], limit: int | None = None
) -> list[float]:
    """Seconds from each end to the next start, for ends while a request waited.

    With ``limit``, only the ends after which the request that started next fitted at once
    (its weight within the units free just after the end): the reaction to a freed slot,
    without the time freed units stay idle because the next request needs more of them.
    """
    starts = sorted((h.start, h.weight) for h in holds)
    waiting = sorted((sent_at[h.key], h.start) for h in holds)
    gaps: list[float] = []
    for end in sorted(h.stop for h in holds):
        if not any(sent <= end < began for sent, began in waiting):
            continue
        later = [(s, w) for s, w in starts if s >= end]
        if not later:
            continue
        began, weight = later[0]
        if limit is not None:
            in_use = sum(h.weight for h in holds if h.start <= end < h.stop)
            if in_use + weight > limit:
                continue
        gaps.append(began - end)
    return gaps


def _spread(gaps: Sequence[float]) -> dict[str, Any]:
    return {
        "count": len(gaps),
        "p50": round(percentile(gaps, 50), 4),
        "p95": round(percentile(gaps, 95), 4),
        "max": round(max(gaps), 4) if gaps else None,
    }


def figures(run: SharedRun, limit: int) -> dict[str, Any]:
    """The run's figures from its holds: weighted use, utilisation, hand-over, make-span."""
    holds = run.holds
    out: dict[str, Any] = {
        "requests": run.requests,
        "completed": len(holds),
        "complete": run.complete,
        "notes": run.notes,
        "extra": run.extra,
    }
    if not holds:
        return out
    first_sent = min(run.sent_at.values())
    first_start = min(h.start for h in holds)
    last_start = max(h.start for h in holds)
    last_end = max(h.stop for h in holds)
    series = _series(holds, last_end)
    gaps = handovers(holds, run.sent_at)
    above = sum(
        after - at for (at, units), (after, _) in itertools.pairwise(series) if units > limit
    )
    out |= {
        "max_weighted_use": max(units for _, units in series),
        "seconds_above_limit": round(above, 3),
        # While work waited: first request sent to the last hold start.
        "utilisation_while_backlog": round(_mean_use(series, first_sent, last_start) / limit, 4),
        "utilisation_first_start_to_last_end": round(
            _mean_use(series, first_start, last_end) / limit, 4
        ),
        "backlog_seconds": round(last_start - first_sent, 3),
        "makespan_seconds": round(last_end - first_sent, 3),
        "handover_seconds": _spread(gaps),
        "handover_with_room_seconds": _spread(handovers(holds, run.sent_at, limit)),
        "by_workflow": {
            kind: _workflow([h for h in holds if h.kind == kind], run.sent_at) for kind in KINDS
        },
        "series": [(round(at - first_sent, 3), units) for at, units in series],
        # Every hold, seconds after the first request was sent: kind, sent, start, stop.
        "holds": [
            (h.kind, *(round(t - first_sent, 3) for t in (run.sent_at[h.key], h.start, h.stop)))
            for h in sorted(holds, key=lambda h: h.start)
        ],
    }
    return out


def _workflow(holds: Sequence[Hold], sent_at: dict[str, float]) -> dict[str, Any]:
    waits = [h.start - sent_at[h.key] for h in holds]
    return {
        "completed": len(holds),
        "wait_p50": round(percentile(waits, 50), 3),
        "wait_max": round(max(waits), 3) if waits else None,
        "last_end": round(max(h.stop for h in holds) - min(sent_at.values()), 3) if holds else None,
    }


async def _submit_both(
    queues: dict[str, str], streams: dict[str, list[Request]], endpoint: str
) -> dict[str, float]:
    """Send both streams at once (each queue its own producer); when each was sent."""
    sent_at: dict[str, float] = {}

    async def one(kind: str) -> None:
        submitted = await submit(queues[kind], streams[kind], endpoint)
        sent_at.update(submitted.sent_at)

    async with anyio.create_task_group() as tg:
        for kind in KINDS:
            tg.start_soon(one, kind)
    return sent_at


async def _share_events(main: SandboxResources, other: SandboxResources) -> None:
    """Point ``other``'s status-change rule at ``main``'s events queue (one for both)."""
    async with (
        session().client("events", endpoint_url=main.endpoint) as events,
        session().client("sqs", endpoint_url=main.endpoint) as sqs,
    ):
        attributes = await sqs.get_queue_attributes(
            QueueUrl=main.events_queue_url, AttributeNames=["QueueArn"]
        )
        arn = attributes["Attributes"]["QueueArn"]
        await events.put_targets(Rule=other.rule_name, Targets=[{"Id": RULE_TARGET_ID, "Arn": arn}])


def config_file(path: Path, sandboxes: dict[str, SandboxResources], cfg: Config) -> Path:
    """Two pools using one named limit; each pool's own limit never the one that binds."""
    weights = cfg.weights()
    lines = [f"[limits.{LIMIT_NAME}]", f"limit = {cfg.limit}", ""]
    for kind in KINDS:
        lines += [
            f"[pools.{kind}]",
            f'state_machine_arn = "{sandboxes[kind].state_machine_arn}"',
            f"limit = {max(1, cfg.limit // weights[kind])}",
            f"uses = {{ {LIMIT_NAME} = {weights[kind]} }}",
            "",
        ]
    for kind in KINDS:
        lines += ["[[queues]]", f'url = "{sandboxes[kind].request_queue_url}"', f'pool = "{kind}"']
        lines.append("")
    path.write_text("\n".join(lines))
    return path


async def run_dispatcher(endpoint: str, cfg: Config) -> SharedRun:
    """The real dispatcher, default settings, two pools sharing the named limit."""
    sandboxes = {
        kind: await provision(endpoint, prefix=f"shared-{kind}", limit=cfg.limit) for kind in KINDS
    }
    await _share_events(sandboxes["invoices"], sandboxes["refunds"])
    folder = Path(tempfile.mkdtemp(prefix="bench-shared-"))
    path = config_file(folder / "shared.toml", sandboxes, cfg)
    pool_variables = {env_name(f) for f in POOL_FIELDS}
    env = {k: v for k, v in sandboxes["invoices"].env().items() if k not in pool_variables}
    env |= {"DISPATCHER_CONFIG": str(path), "DISPATCHER_HTTP_PORT": "0"}
    loaded = layout.load(env=env)
    dispatcher = Dispatcher(
        loaded.settings, layout=loaded.layout, endpoint_url=endpoint, environ=env
    )
    streams = cfg.streams()
    total = sum(len(s) for s in streams.values())
    queues = {kind: sandboxes[kind].request_queue_url for kind in KINDS}
    async with anyio.create_task_group() as tg:
        await tg.start(partial(dispatcher.run, handle_signals=False))
        sent_at = await _submit_both(queues, streams, endpoint)
        with anyio.move_on_after(cfg.within):
            # The pools offer no "finished" event to wait on: an attribute read, 5 a second.
            while sum(p.finished_total for p in dispatcher.pools.values()) < total:  # noqa: ASYNC110
                await anyio.sleep(0.2)
        tg.cancel_scope.cancel()  # every request ran: skip the ordered shutdown's long poll
    shutil.rmtree(folder, ignore_errors=True)
    weights = cfg.weights()
    holds: list[Hold] = []
    started: dict[str, int] = {}
    async with session().client("stepfunctions", endpoint_url=endpoint) as sfn:
        for kind in KINDS:
            executions = await list_executions(sfn, sandboxes[kind].state_machine_arn)
            started[kind] = len(executions)
            holds += [
                Hold(e.name, kind, weights[kind], e.start, e.stop)
                for e in executions
                if e.stop is not None
            ]
    return SharedRun(
        name=DISPATCHER,
        holds=holds,
        sent_at=sent_at,
        requests=total,
        complete=len(holds) == total,
        notes=[
            f"the real dispatcher in the benchmark process, default settings, a config file "
            f"of two pools (invoices, refunds) using the named limit {LIMIT_NAME} = "
            f"{cfg.limit} with weights {cfg.invoice_weight} and {cfg.refund_weight}; a "
            "request holds its units for its whole execution (start and stop dates from "
            "ListExecutions)",
        ],
        extra={"executions_started": started},
    )


async def _start_all(
    endpoint: str, queue_url: str, machine_arn: str, count: int, counter: CallCounter
) -> None:
    """Start an execution per message as it arrives (two receivers), as the comparison's
    semaphore does: nothing waits outside the workflow."""
    await semaphore.start_each(endpoint, queue_url, machine_arn, count, counter, receivers=2)


async def held(sfn: SFNClient, execution: Execution) -> tuple[float | None, float | None, int]:
    """From one semaphore execution's history: (acquired, released, DynamoDB calls).

    Acquired: the last ``UpdateItem`` that succeeded before the ``Do Work`` state (the
    conditional add that went through); released: the ``UpdateItem`` of ``Release Lock``
    succeeding (its state's exit if that call failed).
    """
    acquired = released = None
    calls = 0
    phase = "acquiring"
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"nextToken": token} if token else {}
        page = await sfn.get_execution_history(
            executionArn=execution.arn, maxResults=1000, includeExecutionData=False, **kwargs
        )
        for event in page["events"]:
            kind, at = event["type"], event["timestamp"].timestamp()
            state = event.get("stateEnteredEventDetails", {}).get("name")
            if kind == "TaskScheduled":
                calls += 1
            elif state == "Do Work":
                phase = "working"
            elif state == "Release Lock":
                phase = "releasing"
            elif kind == "TaskSucceeded" and phase == "acquiring":
                if event["taskSucceededEventDetails"]["resource"] == semaphore.UPDATE_ITEM:
                    acquired = at
            elif phase == "releasing" and (
                kind == "TaskSucceeded" or (kind == "TaskStateExited" and released is None)
            ):
                released = at
        token = page.get("nextToken")
        if not token:
            return acquired, released, calls


async def _machines(endpoint: str, prefix: str, cfg: Config) -> tuple[str, dict[str, str]]:
    """One lock table (count 0), and per workflow the sample's machine with its weight and
    its clean-up machine with the sample's EventBridge rule."""
    table = f"{prefix}-locktable"
    role = f"arn:aws:iam::000000000000:role/{prefix}"
    machines: dict[str, str] = {}
    async with (
        session().client("dynamodb", endpoint_url=endpoint) as ddb,
        session().client("stepfunctions", endpoint_url=endpoint) as sfn,
        session().client("events", endpoint_url=endpoint) as events,
    ):
        await ddb.create_table(
            TableName=table,
            KeySchema=[{"AttributeName": "LockName", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "LockName", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        await ddb.put_item(
            TableName=table,
            Item={"LockName": {"S": semaphore.LOCK_NAME}, "currentlockcount": {"N": "0"}},
        )
        for kind, weight in cfg.weights().items():
            machine = (
                await sfn.create_state_machine(
                    name=f"{prefix}-{kind}",
                    definition=json.dumps(semaphore.definition(table, cfg.limit, weight)),
                    roleArn=role,
                    type="STANDARD",
                )
            )["stateMachineArn"]
            cleanup = (
                await sfn.create_state_machine(
                    name=f"{prefix}-{kind}-cleanup",
                    definition=json.dumps(semaphore.cleanup_definition(table, weight)),
                    roleArn=role,
                    type="STANDARD",
                )
            )["stateMachineArn"]
            pattern = {
                "source": ["aws.states"],
                "detail": {
                    "stateMachineArn": [machine],
                    "status": ["FAILED", "TIMED_OUT", "ABORTED"],
                },
            }
            await events.put_rule(
                Name=f"{prefix}-{kind}-cleanup", EventPattern=json.dumps(pattern), State="ENABLED"
            )
            await events.put_targets(
                Rule=f"{prefix}-{kind}-cleanup",
                Targets=[{"Id": "cleanup", "Arn": cleanup, "RoleArn": role}],
            )
            machines[kind] = machine
    return table, machines


async def run_semaphore(endpoint: str, cfg: Config) -> SharedRun:
    """The AWS sample's semaphore for both workflows on one lock item."""
    prefix = "shared-semaphore"
    queues = {
        kind: (await provision(endpoint, prefix=f"{prefix}-queue-{kind}", limit=cfg.limit))
        for kind in KINDS
    }
    table, machines = await _machines(endpoint, prefix, cfg)
    streams = cfg.streams()
    counter = CallCounter()
    with anyio.move_on_after(cfg.within):
        async with anyio.create_task_group() as tg:
            for kind in KINDS:
                tg.start_soon(
                    _start_all,
                    endpoint,
                    queues[kind].request_queue_url,
                    machines[kind],
                    len(streams[kind]),
                    counter,
                )
            sent_at = await _submit_both(
                {k: queues[k].request_queue_url for k in KINDS}, streams, endpoint
            )
    weights = cfg.weights()
    holds: list[Hold] = []
    lives: list[tuple[Execution, int]] = []
    calls = 0
    finished = True
    async with session().client("stepfunctions", endpoint_url=endpoint) as sfn:
        deadline = time.monotonic() + cfg.within
        for kind in KINDS:
            left = max(1.0, deadline - time.monotonic())
            finished &= await wait_finished(sfn, machines[kind], within=left)
            for execution in await list_executions(sfn, machines[kind]):
                lives.append((execution, weights[kind]))
                start, stop, made = await held(sfn, execution)
                calls += made
                if start is not None and stop is not None:
                    holds.append(Hold(execution.name, kind, weights[kind], start, stop))
    async with session().client("dynamodb", endpoint_url=endpoint) as ddb:
        item = await ddb.get_item(TableName=table, Key={"LockName": {"S": semaphore.LOCK_NAME}})
    count_after = int(item["Item"]["currentlockcount"]["N"])
    total = sum(len(s) for s in streams.values())
    running = max(
        (n for _, n in weighted_series(((e, 1) for e, _ in lives), now=time.time())), default=0
    )
    return SharedRun(
        name=SEMAPHORE,
        holds=holds,
        sent_at=sent_at,
        requests=total,
        complete=finished and len(holds) == total,
        notes=[
            "the AWS sample's state machine (aws-samples/aws-stepfunctions-examples, "
            "app-control-concurrency-with-dynamodb) for each workflow, run for real in "
            "MiniStack on one lock item; a refund adds and removes 2 units (condition "
            f"count <= {cfg.limit - cfg.refund_weight}), an invoice is the sample's text "
            f"(count <> {cfg.limit}); the Lambda work task replaced by a Wait state; every "
            "execution started on arrival; a hold is from the acquire's UpdateItem "
            "succeeding to the release's (execution histories); MiniStack's DynamoDB writes "
            "serialised (bench/emulator_patches/), as DynamoDB applies a conditional write "
            "atomically",
        ],
        extra={
            "lock_count_after": count_after,
            "max_executions_running": running,
            "dynamodb_calls_in_workflows": calls,
            "driver_calls": dict(sorted(counter.calls.items())),
        },
    )


RUNNERS = {DISPATCHER: run_dispatcher, SEMAPHORE: run_semaphore}


async def run(cfg: Config) -> dict[str, Any]:
    """Both patterns, one after the other, each against its own emulator."""
    out: dict[str, Any] = {
        "config": asdict(cfg),
        "command": COMMAND,
        "handover_definition": HANDOVER_DEFINITION,
        "patterns": {},
    }
    for name, runner in RUNNERS.items():
        print(f"[bench] shared_limit: {name}")
        marker = Path(tempfile.mkdtemp(prefix="bench-")) / "dynamodb-atomic"
        async with Emulator(env=emulator_env(marker)) as emulator:
            meter = LoadMeter()
            assert emulator.pid is not None
            meter.track(emulator.pid)
            meter.track(os.getpid())
            result = await runner(emulator.endpoint, cfg)
            load = asdict(meter.stop())
        result.extra["emulator_dynamodb_writes_atomic"] = marker.exists()
        shutil.rmtree(marker.parent, ignore_errors=True)
        out["patterns"][name] = figures(result, cfg.limit) | {"load": load}
        brief = {k: out["patterns"][name].get(k) for k in ("max_weighted_use", "makespan_seconds")}
        print(f"[bench]   done: {brief}")
    return out


def section(doc: dict[str, Any]) -> list[str]:
    """The performance page's paragraph and table, from ``shared_limit.json``."""
    r = doc["results"]
    c = r["config"]
    lines = [
        f"Two state machines sharing one limit (`{r['command']}`, "
        f"{doc['duration_seconds'] / 60:.1f} min): {c['invoices']} invoices (weight "
        f"{c['invoice_weight']}) and {c['refunds']} refunds (weight {c['refund_weight']}) of "
        f"{c['low']:g}-{c['high']:g} s sent at once to two queues, shared limit "
        f"{c['limit']}. The dispatcher runs both as pools using one named limit; the "
        "semaphore runs the AWS sample's machine for each on one lock item. From the "
        "records: a request's hold is its execution (dispatcher) or its history from the "
        "acquire to the release (semaphore); hand-over is " + r["handover_definition"] + ".",
        "",
        f"| pattern | max weighted use (limit {c['limit']}) | seconds above limit | "
        "utilisation while backlog | utilisation first start to last end | hand-overs | "
        "hand-over p50 / p95 (s) | with room: count, p50 / p95 (s) | refunds: wait p50 / "
        "max (s) | makespan (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, p in r["patterns"].items():
        done = "" if p["complete"] else f" ({p['completed']}/{p['requests']} done)"
        if "max_weighted_use" not in p:
            lines.append(f"| {name}{done} |" + " n/a |" * 9)
            continue
        hand, room = p["handover_seconds"], p["handover_with_room_seconds"]
        refunds = p["by_workflow"]["refunds"]
        lines.append(
            f"| {name}{done} | {p['max_weighted_use']} | {num(p['seconds_above_limit'], 1)} | "
            f"{num(p['utilisation_while_backlog'])} | "
            f"{num(p['utilisation_first_start_to_last_end'])} | {hand['count']} | "
            f"{num(hand['p50'], 3)} / {num(hand['p95'], 3)} | {room['count']}, "
            f"{num(room['p50'], 3)} / {num(room['p95'], 3)} | {num(refunds['wait_p50'], 1)} / "
            f"{num(refunds['wait_max'], 1)} | {num(p['makespan_seconds'], 1)} |"
        )
    lines += [
        "",
        "The hand-overs without room (all but those *with room*) are ends that freed fewer "
        "units than the request that started next needed (a refund, 2 units). The dispatcher "
        "keeps such units for the waiting refund until enough are free (the claim rule of "
        "named limits: no pool waits forever), so an invoice that would fit waits too. The "
        "semaphore has no order: whichever execution retries first after its back-off takes "
        "the units.",
        "",
    ]
    for name, p in r["patterns"].items():
        lines.append(f"- **{name}**: " + "; ".join(p["notes"]) + ".")
    return [*lines, "", load_line(doc)]


def load_line(doc: dict[str, Any]) -> str:
    """The machine's load around the runs (the cores are shared with other work)."""
    busy = ", ".join(
        f"{name} {num(p['load']['machine_busy_cores'])}"
        for name, p in doc["results"]["patterns"].items()
        if "load" in p
    )
    return (
        f"Uptime before: `{doc['uptime_before']}`; after: `{doc['uptime_after']}`. Cores busy "
        f"on the machine ({doc['machine']['nproc']}) during each run: {busy}."
    )
