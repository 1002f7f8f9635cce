"""``python -m devtools demo``: sandbox + dispatcher + a stream of requests, the limit shown held.

Everything runs locally: the emulator as a child process, the dispatcher in this
process. A live line shows running/limit, started, finished, queued and dead-lettered;
the closing summary takes the maximum concurrency from the executions' own records.

With ``--parents N`` it also starts N parent workflows at once (the sandbox's
``<prefix>-parent``), each asking for ``--items`` children through the requests queue with
a task token and waiting for them; the last child of each asks to fail and its parent
catches the error. The summary then says how each parent ended and what it saw.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aioboto3
import anyio
from tqdm import tqdm

from devtools.records import Execution, list_executions, max_overlap
from devtools.sandbox.emulator import Emulator
from devtools.sandbox.provision import child_key, provision
from dispatcher import logs
from dispatcher.daemon.service import Dispatcher
from dispatcher.producer import SubmitItem, submit_requests
from dispatcher.settings.config import LogFormat, Settings

if TYPE_CHECKING:
    from types_aiobotocore_stepfunctions import SFNClient

BAD_REQUESTS = ("this is not JSON", '{"unterminated": ')
DEFAULT_COUNT = 200
DEFAULT_ITEMS = 4
# The error the demo machine fails with (its Fail state), as a parent sees it.
CHILD_ERROR = "DemoFailure"
_POLL = 0.5  # seconds between looks at the parents' state in the emulator (a display refresh)


@dataclass(frozen=True)
class Plan:
    """What to run: the parsed and checked command line."""

    count: int
    limit: int
    seconds: tuple[float, float]
    fail_ratio: float
    parents: int
    items: int
    timeout: float
    port: int = 0
    log_file: Path | None = None


@dataclass(frozen=True)
class ParentOutcome:
    """How one parent ended, from its own DescribeExecution."""

    name: str
    status: str
    results: int | None  # children's outputs in its output; None without an output
    errors: tuple[str, ...]  # the errors of the children it caught, in item order

    @classmethod
    def of(cls, name: str, status: str, output: str | None) -> ParentOutcome:
        """Read a parent's output: ``{"items": [...], "results": [...]}``, a failed child's
        result being its item with ``error`` = ``{"Error", "Cause"}``."""
        try:
            document = json.loads(output) if output else None
        except ValueError:
            document = None
        results = document.get("results") if isinstance(document, dict) else None
        if not isinstance(results, list):
            return cls(name, status, None, ())
        errors = tuple(
            str(result["error"].get("Error", "?"))
            for result in results
            if isinstance(result, dict) and isinstance(result.get("error"), dict)
        )
        return cls(name, status, len(results), errors)

    def as_expected(self, items: int) -> bool:
        """Succeeded, one result per item, and only the deliberate failure caught."""
        return (
            self.status == "SUCCEEDED" and self.results == items and self.errors == (CHILD_ERROR,)
        )


@dataclass(frozen=True)
class DemoResult:
    """What the demo measured."""

    requests: int
    succeeded: int
    failed: int
    dead_lettered: int
    limit: int
    max_concurrency: int
    seconds: float
    items: int = 0  # children per parent
    parents: tuple[ParentOutcome, ...] = ()
    children: int = 0  # executions started for the parents
    timed_out: float | None = None  # the timeout, when the run gave up waiting

    @property
    def held(self) -> bool:
        """The limit held, by the executions' own start and stop dates."""
        return self.max_concurrency <= self.limit

    @property
    def ok(self) -> bool:
        """The limit held, nothing timed out, and every parent ended as designed."""
        return (
            self.held
            and self.timed_out is None
            and all(p.as_expected(self.items) for p in self.parents)
        )


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``demo``."""
    parser = subparsers.add_parser(
        "demo",
        help="run the whole thing locally and show the limit held",
        description="Start the emulator, provision the sandbox, run the dispatcher and send "
        "requests; print a live status line and a closing summary. With --parents, also "
        "start parent workflows that each wait for --items children (task tokens).",
    )
    parser.add_argument(
        "--count",
        type=int,
        default=None,
        help=f"requests to send ({DEFAULT_COUNT}; 0 with --parents)",
    )
    parser.add_argument("--limit", type=int, default=10, help="concurrency limit (10)")
    parser.add_argument(
        "--seconds", default="1:3", help="each execution waits MIN:MAX seconds (1:3)"
    )
    parser.add_argument(
        "--fail-ratio",
        type=float,
        default=0.05,
        help="share of the plain requests that fail (0.05)",
    )
    parser.add_argument(
        "--parents",
        type=int,
        default=0,
        metavar="N",
        help="also start N parent workflows at once, each waiting for --items children "
        "requested with task tokens; the last child of each fails on purpose and its parent "
        "catches the error (0)",
    )
    parser.add_argument(
        "--items",
        type=int,
        default=DEFAULT_ITEMS,
        metavar="M",
        help=f"children per parent, whole seconds from --seconds ({DEFAULT_ITEMS})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="give up waiting after SECONDS (default: from the work sent and the limit)",
    )
    parser.add_argument("--port", type=int, default=0, help="emulator port (default: any free)")
    parser.add_argument(
        "--log-file",
        type=Path,
        metavar="PATH",
        help="dispatcher log (default: a new sfn-dispatcher-demo-*.log in the temp directory, "
        "so two demos never share one); printed at the start and the end",
    )
    parser.set_defaults(func=run)


def plan_from(args: argparse.Namespace) -> Plan:
    """Check the command line; `UserError` naming the flag when something is off."""
    from dispatcher.cli.submit import parse_seconds  # noqa: PLC0415
    from dispatcher.errors import UserError  # noqa: PLC0415 - keep `--help` light

    count = args.count if args.count is not None else (0 if args.parents else DEFAULT_COUNT)
    if count < 0 or args.limit < 1:
        raise UserError(f"--count must be >= 0 and --limit >= 1 (got {count}, {args.limit})")
    if args.parents < 0 or args.items < 1:
        raise UserError(
            f"--parents must be >= 0 and --items >= 1 (got {args.parents}, {args.items})"
        )
    if count == 0 and args.parents == 0:
        raise UserError("nothing to run: give --count N or --parents N")
    if args.timeout is not None and args.timeout <= 0:
        raise UserError(f"--timeout {args.timeout:g} is invalid: give a positive number")
    seconds = parse_seconds(args.seconds)
    timeout = args.timeout or default_timeout(count, args.parents * args.items, seconds, args.limit)
    return Plan(
        count=count,
        limit=args.limit,
        seconds=seconds,
        fail_ratio=args.fail_ratio,
        parents=args.parents,
        items=args.items,
        timeout=timeout,
        port=args.port,
        log_file=args.log_file,
    )


def default_timeout(
    requests: int, children: int, seconds: tuple[float, float], limit: int
) -> float:
    """Three times the work at the limit, plus a minute: generous, but never forever."""
    work = (requests + children) * (seconds[1] + 1) / limit
    return round(60 + 3 * work)


def run(args: argparse.Namespace) -> int:
    """Run the demo; exit 0 when every request was served, the limit held, and every parent
    ended as designed."""
    plan = plan_from(args)
    log_path = plan.log_file or new_log_file()
    result = anyio.run(_demo, plan, log_path)
    print("\n" + summary(result))
    print(f"dispatcher log: {log_path}", file=sys.stderr)
    return 0 if result.ok else 1


def new_log_file() -> Path:
    """A fresh, uniquely named log file in the temp directory (created empty, mode 0600)."""
    import tempfile  # noqa: PLC0415 - keep `--help` light

    fd, name = tempfile.mkstemp(prefix="sfn-dispatcher-demo-", suffix=".log")
    os.close(fd)
    return Path(name)


def demo_requests(
    count: int, seconds: tuple[float, float], fail_ratio: float, seed: int | None = None
) -> list[SubmitItem]:
    """Plain demo requests: ``{"seconds": S}`` with S a whole number of seconds (a Wait
    state's ``SecondsPath`` must be an integer), exactly ``round(count * fail_ratio)`` of them
    also ``"fail": true``."""
    rng = random.Random(seed)
    low, high = seconds
    failing = set(rng.sample(range(count), round(count * fail_ratio)))
    items: list[SubmitItem] = []
    for index in range(count):
        body: dict[str, Any] = {"seconds": whole_seconds(rng.uniform(low, high), low, high)}
        if index in failing:
            body["fail"] = True
        items.append(SubmitItem(json.dumps(body)))
    return items


def whole_seconds(value: float, low: float, high: float) -> int:
    """``value`` rounded to an int, kept within ``[low, high]`` where a whole number fits
    (``1.5:1.7`` has none: then the nearest, never below 0)."""
    rounded = round(value)
    lowest, highest = math.ceil(low), math.floor(high)
    if lowest <= highest:
        rounded = min(max(rounded, lowest), highest)
    return max(0, rounded)


def summary(result: DemoResult) -> str:
    """The closing lines: requests, parents (one line each), and the limit."""
    lines: list[str] = []
    if result.requests:
        lines.append(
            f"{result.requests} requests in {result.seconds:.1f} s: "
            f"{result.succeeded} succeeded, {result.failed} failed (asked to), "
            f"{result.dead_lettered} dead-lettered (bad input)."
        )
    if result.parents:
        lines += _parent_lines(result)
    verdict = "held" if result.held else "EXCEEDED"
    across = f", across the parents' {result.children} children" if result.parents else ""
    if result.parents and result.requests:
        across += " and the requests"
    lines.append(
        f"Maximum concurrency from the executions' own start/stop dates: "
        f"{result.max_concurrency} (limit {result.limit}: {verdict}){across}."
    )
    if result.timed_out is not None:
        waiting = sum(p.status == "RUNNING" for p in result.parents)
        lines.append(
            f"Gave up waiting after {result.timed_out:g} s"
            + (
                f": {waiting} parent(s) still RUNNING. The dispatcher never answered their "
                "task tokens (a version without task-token support starts the children but "
                "does not answer); its log says more."
                if waiting
                else "; see the dispatcher log."
            )
        )
    return "\n".join(lines)


def _parent_lines(result: DemoResult) -> list[str]:
    parents = result.parents
    statuses = Counter(p.status for p in parents)
    expected = [p for p in parents if p.as_expected(result.items)]
    seen = Counter(error for p in parents for error in p.errors)
    said = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
    lines = [
        f"{len(parents)} parents, {result.items} children each (the last asked to fail), "
        f"in {result.seconds:.1f} s: {said}; {len(expected)} of {len(parents)} with "
        f"{result.items} results and the failing child's error caught"
        + (f" ({', '.join(f'{e} x{n}' for e, n in sorted(seen.items()))})." if seen else ".")
    ]
    width = max(len(p.name) for p in parents)
    shown = parents if len(parents) <= 20 else [p for p in parents if p not in expected]
    for parent in shown:
        results = "no output" if parent.results is None else f"{parent.results} results"
        caught = f", caught {', '.join(parent.errors)}" if parent.errors else ""
        lines.append(f"  {parent.name:<{width}}  {parent.status:<9}  {results}{caught}")
    if len(shown) < len(parents):
        lines.append(f"  (the other {len(parents) - len(shown)} as designed)")
    return lines


def deadline_line(plan: Plan) -> str:
    """What the run will do, said before it starts: a bound, not a prediction of failure."""
    work = []
    if plan.count:
        work.append(f"{plan.count} requests")
    if plan.parents:
        work.append(f"{plan.parents} parents of {plan.items} children")
    return (
        f"running {' and '.join(work)} at limit {plan.limit}; the summary follows when "
        f"everything has finished, or after {plan.timeout:g} s (--timeout) with what did"
    )


def parent_inputs(
    parents: int, items: int, seconds: tuple[float, float], seed: int | None = None
) -> dict[str, dict[str, Any]]:
    """Execution name -> input of each parent: ``items`` children of whole seconds (AWS's
    Wait takes whole seconds), the last asking to fail."""
    rng = random.Random(seed)
    low, high = seconds
    inputs: dict[str, dict[str, Any]] = {}
    for number in range(1, parents + 1):
        children: list[dict[str, Any]] = [
            {"seconds": whole_seconds(rng.uniform(low, high), low, high)} for _ in range(items)
        ]
        children[-1]["fail"] = True
        inputs[f"parent-{number:03d}"] = {"items": children}
    return inputs


async def _demo(plan: Plan, log_path: Path) -> DemoResult:
    try:
        log_file = log_path.open("w")
    except OSError as exc:
        from dispatcher.errors import UserError  # noqa: PLC0415

        raise UserError(f"cannot write --log-file {log_path}: {exc.strerror}") from None
    with log_file:
        logs.configure("INFO", LogFormat.JSON, stream=log_file)
        print(f"dispatcher log: {log_path}", file=sys.stderr)
        async with Emulator(port=plan.port) as emulator:
            resources = await provision(emulator.endpoint, limit=plan.limit)
            # The demo is self-contained: its clients use the sandbox's test credentials.
            os.environ.update(resources.env())
            # MiniStack's ListExecutions is immediately consistent: a 1 s start grace is
            # plenty, and the start-up wait (D + grace) stays short.
            settings = Settings.load(
                {
                    "http_port": 0,
                    "reconcile_interval": 5,
                    "receive_wait_seconds": 2,
                    "start_grace": 1,
                },
                env=resources.env(),
            )
            dispatcher = Dispatcher(settings, endpoint_url=emulator.endpoint)
            items: list[SubmitItem] = []
            bad = BAD_REQUESTS if plan.count else ()
            if plan.count:
                items = demo_requests(plan.count, plan.seconds, plan.fail_ratio)
                items += [SubmitItem(body) for body in bad]
            inputs = parent_inputs(plan.parents, plan.items, plan.seconds)
            print(deadline_line(plan), file=sys.stderr)
            session: Any = aioboto3.Session()
            parent_arns: dict[str, str] = {}  # name -> ARN, filled as they start
            began = time.monotonic()
            async with session.client("stepfunctions", endpoint_url=emulator.endpoint) as sfn:
                async with anyio.create_task_group() as tg:
                    await tg.start(dispatcher.run)
                    with anyio.move_on_after(plan.timeout) as deadline:
                        sent = 0
                        if items:
                            report = await submit_requests(
                                resources.request_queue_url, items, endpoint_url=emulator.endpoint
                            )
                            sent = report.sent
                        await _start_parents(
                            sfn, resources.parent_state_machine_arn, inputs, parent_arns
                        )
                        await _watch(dispatcher, sent + plan.parents * plan.items, len(bad))
                        if inputs:
                            await _await_parents(
                                sfn, resources.parent_state_machine_arn, len(inputs)
                            )
                    dispatcher.stop()
                elapsed = time.monotonic() - began
                executions = await list_executions(sfn, resources.state_machine_arn)
                outcomes = [
                    await _outcome(sfn, name, arn) for name, arn in sorted(parent_arns.items())
                ]
    plain, children = _split(executions, inputs, parent_arns)
    return DemoResult(
        requests=len(items),
        succeeded=sum(e.status == "SUCCEEDED" for e in plain),
        failed=sum(e.status == "FAILED" for e in plain),
        dead_lettered=dispatcher.intake.stats.dead_lettered if dispatcher.intake else 0,
        limit=plan.limit,
        max_concurrency=max_overlap(executions),
        seconds=elapsed,
        items=plan.items,
        parents=tuple(outcomes),
        children=len(children),
        timed_out=plan.timeout if deadline.cancelled_caught else None,
    )


def _split(
    executions: list[Execution], inputs: dict[str, dict[str, Any]], arns: Mapping[str, str]
) -> tuple[list[Execution], list[Execution]]:
    """(executions for plain requests, children of the parents: named by `child_key`)."""
    names = {
        child_key(arn, i) for name, arn in arns.items() for i in range(len(inputs[name]["items"]))
    }
    return [e for e in executions if e.name not in names], [
        e for e in executions if e.name in names
    ]


async def _start_parents(
    sfn: SFNClient, machine: str, inputs: dict[str, dict[str, Any]], arns: dict[str, str]
) -> None:
    """Start every parent at once; each one's ARN goes into ``arns`` as it starts."""
    if not inputs:
        return

    async def start(name: str, given: dict[str, Any]) -> None:
        started = await sfn.start_execution(
            stateMachineArn=machine, name=name, input=json.dumps(given)
        )
        arns[name] = started["executionArn"]

    async with anyio.create_task_group() as tg:
        for name, given in inputs.items():
            tg.start_soon(start, name, given)
    items = len(next(iter(inputs.values()))["items"])
    print(
        f"started {len(inputs)} parents, each waiting for {items} children requested with "
        "task tokens (the last of each fails on purpose)",
        file=sys.stderr,
    )


def _progress(total: int, desc: str, unit: str) -> tqdm[Any]:
    """A progress bar on stderr: lively on a terminal, a line every 5 s in a log."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.2 if sys.stderr.isatty() else 5.0,
    )


async def _await_parents(sfn: SFNClient, machine: str, count: int) -> None:
    """Show how many parents have been answered and ended, until all have."""
    with _progress(count, "parents ended", "parent") as bar:
        while True:
            running = 0
            paginator = sfn.get_paginator("list_executions")
            async for page in paginator.paginate(stateMachineArn=machine, statusFilter="RUNNING"):
                running += len(page["executions"])
            bar.update(count - running - bar.n)
            if running == 0:
                return
            await anyio.sleep(_POLL)  # another process's state: nothing to wait on


async def _outcome(sfn: SFNClient, name: str, arn: str) -> ParentOutcome:
    described = await sfn.describe_execution(executionArn=arn)
    return ParentOutcome.of(name, described["status"], described.get("output"))


async def _watch(dispatcher: Dispatcher, sent: int, bad: int) -> None:
    """Show the live line until every valid request has finished and every bad one is out."""
    pool = dispatcher.pool
    valid = sent - bad
    with _progress(valid, "finished", "exec") as bar:
        while True:
            intake = dispatcher.intake
            dead = intake.stats.dead_lettered if intake else 0
            ledger = pool.ledger
            queued = sent - pool.started_total - dead - ledger.reserved_count
            bar.set_postfix_str(
                f"running {ledger.running_count}/{ledger.limit} started {pool.started_total} "
                f"queued {max(queued, 0)} dead-lettered {dead}",
                refresh=False,
            )
            bar.update(pool.finished_total - bar.n)
            if (pool.finished_total >= valid and dead >= bad) or dispatcher.health.stopping:
                return
            await anyio.sleep(0.2)  # a display refresh, not synchronisation
