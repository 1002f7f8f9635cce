"""``sfn-dispatcher submit``: send demo requests or a JSON Lines file to the request queue.

The sending itself (batches, concurrency, rate, retries, the report) is
`dispatcher.producer.submit_requests`, re-exported here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path

import anyio

from dispatcher.errors import UserError
from dispatcher.producer import (
    DEFAULT_CONCURRENCY,
    IDEMPOTENCY_ATTRIBUTE,
    FailedEntry,
    SubmitItem,
    SubmitReport,
    submit_requests,
)

__all__ = [
    "IDEMPOTENCY_ATTRIBUTE",
    "FailedEntry",
    "SubmitItem",
    "SubmitReport",
    "add_parser",
    "generate",
    "parse_seconds",
    "read_jsonl",
    "submit_requests",
]

QUEUE_URL_ENV = "DISPATCHER_REQUEST_QUEUE_URL"
KEY_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]{1,60}$")  # PREFIX-<n> stays a valid name (<= 80)
MAX_INPUT_BYTES = 256 * 1024  # the Step Functions input limit
_SHOWN_FAILURES = 20


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``submit``."""
    parser = subparsers.add_parser(
        "submit",
        help="send requests to the request queue",
        description="Send requests to the request queue, 10 per SendMessageBatch. Each "
        "request body is the execution input. Generate them with --count (and --seconds, "
        "--fail-ratio for the demo machine) or read them with --from-file.",
    )
    parser.add_argument(
        "--queue-url", metavar="URL", help=f"request queue (default: ${QUEUE_URL_ENV})"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--count", type=int, metavar="N", help="generate N requests")
    source.add_argument(
        "--from-file",
        type=Path,
        metavar="PATH",
        help="JSON Lines: each non-blank line is one JSON object, sent verbatim as one "
        "request body (the execution input); the whole file is checked before anything "
        "is sent",
    )
    parser.add_argument(
        "--seconds",
        metavar="MIN:MAX",
        help='with --count: body {"seconds": S}, S random in MIN..MAX, rounded to 0.1',
    )
    parser.add_argument(
        "--fail-ratio",
        type=float,
        default=0.0,
        metavar="F",
        help='with --count: this share (0..1) of bodies get "fail": true',
    )
    parser.add_argument("--rate", type=float, metavar="R", help="at most R messages per second")
    parser.add_argument(
        "--idempotency-keys",
        metavar="PREFIX",
        help=f"give request n (from 1) the {IDEMPOTENCY_ATTRIBUTE} attribute PREFIX-n",
    )
    parser.add_argument("--seed", type=int, help="random seed, for repeatable bodies")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        metavar="N",
        help=f"batches in flight at once (default {DEFAULT_CONCURRENCY})",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``sfn-dispatcher submit``: 0 all sent, 1 some failed, 2 bad input."""
    queue_url = args.queue_url or os.environ.get(QUEUE_URL_ENV)
    if not queue_url:
        raise UserError(
            f"no request queue: pass --queue-url or set {QUEUE_URL_ENV} "
            "(`sfn-dispatcher sandbox` prints it)"
        )
    if args.rate is not None and args.rate <= 0:
        raise UserError(f"--rate {args.rate:g} is invalid: give messages per second > 0")
    if not 1 <= args.concurrency <= 64:
        raise UserError(f"--concurrency {args.concurrency} is invalid: give 1 to 64")
    if args.idempotency_keys is not None and not KEY_PREFIX_RE.match(args.idempotency_keys):
        raise UserError(
            f"--idempotency-keys {args.idempotency_keys!r} is invalid: "
            "1-60 characters of A-Z a-z 0-9 - _"
        )
    count, labels, source = _requests(args)
    report = anyio.run(
        partial(
            submit_requests,
            queue_url,
            source,
            rate=args.rate,
            progress=sys.stderr.isatty() and count > 100,
            total=count,
            concurrency=args.concurrency,
        )
    )
    if report.sent == 0 and report.error is not None:
        raise UserError(
            f"nothing sent to {queue_url}: {report.error} "
            f"(check --queue-url/{QUEUE_URL_ENV}, AWS_ENDPOINT_URL and credentials; "
            "`sfn-dispatcher sandbox` prints them)"
        )
    for entry in report.failed[:_SHOWN_FAILURES]:
        label = labels[entry.index] if labels else f"request {entry.index + 1}"
        print(f"failed: {label}: {entry.code}: {entry.message}", file=sys.stderr)
    if len(report.failed) > _SHOWN_FAILURES:
        print(f"failed: ... and {len(report.failed) - _SHOWN_FAILURES} more", file=sys.stderr)
    if report.error is not None:
        print(f"stopped early: {report.error}", file=sys.stderr)
    print(report.summary(), flush=True)
    return 0 if report.ok else 1


def _requests(args: argparse.Namespace) -> tuple[int, list[str] | None, Iterable[SubmitItem]]:
    """The requests the flags ask for: (count, label per request or None, requests)."""
    if args.from_file is not None:
        if args.seconds is not None or args.fail_ratio:
            raise UserError("--seconds and --fail-ratio apply to --count, not --from-file")
        items = read_jsonl(args.from_file, args.idempotency_keys)
        return len(items), [f"line {line}" for line, _ in items], [item for _, item in items]
    if args.count < 1:
        raise UserError(f"--count {args.count} is invalid: give 1 or more")
    seconds = parse_seconds(args.seconds) if args.seconds is not None else None
    if not 0.0 <= args.fail_ratio <= 1.0:
        raise UserError(f"--fail-ratio {args.fail_ratio:g} is invalid: give 0 to 1")
    requests = generate(args.count, seconds, args.fail_ratio, args.idempotency_keys, args.seed)
    return args.count, None, requests


def parse_seconds(text: str) -> tuple[float, float]:
    """``MIN:MAX`` (or one number) as a range of seconds, both >= 0, MIN <= MAX."""
    low_text, _, high_text = text.partition(":")
    try:
        low = float(low_text)
        high = float(high_text) if high_text else low
    except ValueError:
        raise UserError(f"--seconds {text!r} is invalid: give MIN:MAX, e.g. 1:5") from None
    if not (math.isfinite(low) and math.isfinite(high)) or low < 0 or high < 0:
        raise UserError(f"--seconds {text!r} is invalid: MIN and MAX must be >= 0")
    if low > high:
        raise UserError(f"--seconds {text!r} is invalid: MIN must not exceed MAX, e.g. 1:5")
    return low, high


def generate(
    count: int,
    seconds: tuple[float, float] | None,
    fail_ratio: float,
    key_prefix: str | None,
    seed: int | None,
) -> Iterator[SubmitItem]:
    """Demo-machine requests: exactly ``round(count * fail_ratio)`` of them ask to fail."""
    rng = random.Random(seed)
    failing = set(rng.sample(range(count), round(count * fail_ratio)))
    for index in range(count):
        body: dict[str, object] = {}
        if seconds is not None:
            low, high = seconds
            body["seconds"] = min(max(round(rng.uniform(low, high), 1), low), high)
        if index in failing:
            body["fail"] = True
        key = f"{key_prefix}-{index + 1}" if key_prefix else None
        yield SubmitItem(json.dumps(body), idempotency_key=key)


def read_jsonl(path: Path, key_prefix: str | None) -> list[tuple[int, SubmitItem]]:
    """Read and check a whole JSON Lines file: (line number, request) per non-blank line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read --from-file {path}: {exc}") from None
    items: list[tuple[int, SubmitItem]] = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            continue
        where = f"{path}:{number}"
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: not JSON ({exc.msg}); nothing was sent") from None
        if not isinstance(value, dict):
            raise UserError(
                f"{where}: expected a JSON object (the execution input), got "
                f"{type(value).__name__}; nothing was sent"
            )
        if len(text.encode()) > MAX_INPUT_BYTES:
            raise UserError(
                f"{where}: {len(text.encode())} bytes is over the 256 KiB execution input "
                "limit; nothing was sent"
            )
        key = f"{key_prefix}-{len(items) + 1}" if key_prefix else None
        items.append((number, SubmitItem(text, idempotency_key=key)))
    if not items:
        raise UserError(f"--from-file {path} has no requests (no non-blank lines)")
    return items
