"""``sfn-dispatcher demo``: sandbox + dispatcher + a stream of requests, the limit shown held.

Everything runs locally: the emulator as a child process, the dispatcher in this
process. A live line shows running/limit, started, finished, queued and dead-lettered;
the closing summary takes the maximum concurrency from the executions' own records.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aioboto3
import anyio
from tqdm import tqdm

from dispatcher import logs
from dispatcher.config import LogFormat, Settings
from dispatcher.producer import SubmitItem, submit_requests
from dispatcher.records import list_executions, max_overlap
from dispatcher.sandbox.emulator import Emulator
from dispatcher.sandbox.provision import provision
from dispatcher.service import Dispatcher
from dispatcher.submit import generate

BAD_REQUESTS = ("this is not JSON", '{"unterminated": ')


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


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``demo``."""
    parser = subparsers.add_parser(
        "demo",
        help="run the whole thing locally and show the limit held",
        description="Start the emulator, provision the sandbox, run the dispatcher and send "
        "requests; print a live status line and a closing summary.",
    )
    parser.add_argument("--count", type=int, default=200, help="requests to send (200)")
    parser.add_argument("--limit", type=int, default=10, help="concurrency limit (10)")
    parser.add_argument(
        "--seconds", default="1:3", help="each execution waits MIN:MAX seconds (1:3)"
    )
    parser.add_argument(
        "--fail-ratio", type=float, default=0.05, help="share of executions that fail (0.05)"
    )
    parser.add_argument("--port", type=int, default=0, help="emulator port (default: any free)")
    parser.add_argument("--log-file", type=Path, help="dispatcher log (default: a temp file)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo; exit 0 when every request was served and the limit held."""
    from dispatcher.errors import UserError  # noqa: PLC0415 - keep `--help` light
    from dispatcher.submit import parse_seconds  # noqa: PLC0415

    if args.count < 1 or args.limit < 1:
        raise UserError(f"--count and --limit must be >= 1 (got {args.count}, {args.limit})")
    seconds = parse_seconds(args.seconds)
    result = anyio.run(_demo, args, seconds)
    verdict = "held" if result.max_concurrency <= result.limit else "EXCEEDED"
    print(
        f"\n{result.requests} requests in {result.seconds:.1f} s: "
        f"{result.succeeded} succeeded, {result.failed} failed (asked to), "
        f"{result.dead_lettered} dead-lettered (bad input).\n"
        f"Maximum concurrency from the executions' own start/stop dates: "
        f"{result.max_concurrency} (limit {result.limit}: {verdict})."
    )
    return 0 if verdict == "held" else 1


async def _demo(args: argparse.Namespace, seconds: tuple[float, float]) -> DemoResult:
    log_path = args.log_file or Path(_tempdir()) / "sfn-dispatcher-demo.log"
    with log_path.open("w") as log_file:
        logs.configure("INFO", LogFormat.JSON, stream=log_file)
        print(f"dispatcher log: {log_path}", file=sys.stderr)
        async with Emulator(port=args.port) as emulator:
            resources = await provision(emulator.endpoint, limit=args.limit)
            # The demo is self-contained: its clients use the sandbox's test credentials.
            os.environ.update(resources.env())
            settings = Settings.load(
                {"http_port": 0, "reconcile_interval": 5, "receive_wait_seconds": 2},
                env=resources.env(),
            )
            dispatcher = Dispatcher(settings, endpoint_url=emulator.endpoint)
            items = list(generate(args.count, seconds, args.fail_ratio, None, seed=None))
            items += [SubmitItem(body) for body in BAD_REQUESTS]
            began = time.monotonic()
            async with anyio.create_task_group() as tg:
                await tg.start(dispatcher.run)
                report = await submit_requests(
                    resources.request_queue_url, items, endpoint_url=emulator.endpoint
                )
                await _watch(dispatcher, report.sent, len(BAD_REQUESTS))
                dispatcher.stop()
            elapsed = time.monotonic() - began
            session: Any = aioboto3.Session()
            async with session.client("stepfunctions", endpoint_url=emulator.endpoint) as sfn:
                executions = await list_executions(sfn, resources.state_machine_arn)
    return DemoResult(
        requests=len(items),
        succeeded=sum(e.status == "SUCCEEDED" for e in executions),
        failed=sum(e.status == "FAILED" for e in executions),
        dead_lettered=dispatcher.intake.stats.dead_lettered if dispatcher.intake else 0,
        limit=args.limit,
        max_concurrency=max_overlap(executions),
        seconds=elapsed,
    )


async def _watch(dispatcher: Dispatcher, sent: int, bad: int) -> None:
    """Show the live line until every valid request has finished and every bad one is out."""
    pool = dispatcher.pool
    valid = sent - bad
    with tqdm(
        total=valid,
        desc="finished",
        unit="exec",
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.2 if sys.stderr.isatty() else 5.0,
    ) as bar:
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


def _tempdir() -> str:
    import tempfile  # noqa: PLC0415

    return tempfile.gettempdir()
