"""``sfn-dispatcher submit``: send demo requests or a JSON Lines file to the request queue.

The sending itself (batches, concurrency, rate, retries, the report) is
`dispatcher.producer.submit_requests`, re-exported here.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from functools import partial
from pathlib import Path

import anyio

from dispatcher.core.deadline import START_BY_ATTRIBUTE, format_deadline, parse_start_by
from dispatcher.errors import UserError
from dispatcher.producer import (
    DEFAULT_CONCURRENCY,
    IDEMPOTENCY_ATTRIBUTE,
    FailedEntry,
    SubmitItem,
    SubmitReport,
    submit_requests,
)
from dispatcher.settings.config import env_name

__all__ = [
    "IDEMPOTENCY_ATTRIBUTE",
    "FailedEntry",
    "SubmitItem",
    "SubmitReport",
    "add_parser",
    "check_attributes",
    "generate",
    "parse_attribute",
    "parse_seconds",
    "parse_start_by_flag",
    "read_jsonl",
    "submit_requests",
]

QUEUE_URL_ENV = env_name("request_queue_url")
KEY_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]{1,60}$")  # PREFIX-<n> stays a valid name (<= 80)
MAX_INPUT_BYTES = 256 * 1024  # the Step Functions input limit
MAX_WAIT_SECONDS = 99_999_999  # a Wait state's Seconds range (SecondsPath: an integer)
MAX_ATTRIBUTES = 10  # SQS: message attributes per message
ATTRIBUTE_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,256}\Z")
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,80}\Z")  # an execution name (the idempotency key)
_REQUEST_KEYS = frozenset({"input", "attributes"})
RELATIVE_RE = re.compile(r"^\+(\d{1,9})([smhd])\Z")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
# Each example must be accepted as written and cannot conflict with itself (a test runs them).
EXAMPLES = f"""examples:
  sfn-dispatcher submit --count 20 --seconds 1:5 --attribute tenant=a
  sfn-dispatcher submit --count 3 --idempotency-keys order-7
      three requests, {IDEMPOTENCY_ATTRIBUTE} order-7-1, order-7-2, order-7-3
  sfn-dispatcher submit --count 3 --attribute {IDEMPOTENCY_ATTRIBUTE}=order-7
      the same request three times: one execution starts, two are duplicates
  sfn-dispatcher submit --from-file requests.jsonl --attribute tenant=a
  sfn-dispatcher submit --count 5 --start-by +10m
      start each within 10 minutes, or not at all (dead-lettered as expired)
"""
_SHOWN_FAILURES = 20


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``submit``."""
    parser = subparsers.add_parser(
        "submit",
        help="send requests to the request queue",
        description="Send requests to the request queue, 10 per SendMessageBatch. Each "
        "request body is the execution input. Generate them with --count (and --seconds, "
        "--fail-ratio for the demo machine) or read them with --from-file.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
        'request body (the execution input), or {"input": {...}, "attributes": {"tenant": '
        '"a"}} for an input with its message attributes; the whole file is checked before '
        "anything is sent",
    )
    parser.add_argument(
        "--verbatim",
        action="store_true",
        help='with --from-file: send every line as the body, even one shaped {"input": ..., '
        '"attributes": ...}',
    )
    parser.add_argument(
        "--attribute",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a String message attribute on every request, e.g. tenant=a or pool=reports "
        "(repeatable; a file line's own attributes win). The same "
        f"{IDEMPOTENCY_ATTRIBUTE} on several requests names one execution: they must have "
        "the same body (the others count as duplicates); --idempotency-keys gives each "
        "request its own",
    )
    parser.add_argument(
        "--seconds",
        metavar="MIN:MAX",
        help='with --count: body {"seconds": S}, S a whole number of seconds drawn from '
        f"MIN..MAX (0 to {MAX_WAIT_SECONDS}: a Wait state's SecondsPath takes an integer)",
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
    parser.add_argument(
        "--start-by",
        metavar="WHEN",
        help=f"the {START_BY_ATTRIBUTE} attribute on every request: not started by then, a "
        "request is dead-lettered as expired. An RFC 3339 time with its offset "
        "(2026-12-05T10:00:00Z), epoch seconds, or +N followed by s, m, h or d from now "
        "(+10m); sent as RFC 3339 UTC (a file line's own attribute wins)",
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
            "(`python -m devtools sandbox` prints it)"
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
            "`python -m devtools sandbox` prints them)"
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
    common = dict(parse_attribute(text) for text in args.attribute)
    if args.start_by is not None:
        if START_BY_ATTRIBUTE in common:
            raise UserError(f"--attribute {START_BY_ATTRIBUTE}=... and --start-by: give one")
        common[START_BY_ATTRIBUTE] = parse_start_by_flag(args.start_by)
    if IDEMPOTENCY_ATTRIBUTE in common and args.idempotency_keys is not None:
        raise UserError(
            f"--attribute {IDEMPOTENCY_ATTRIBUTE}=... and --idempotency-keys both name the "
            "execution: give one"
        )
    if args.from_file is not None:
        if args.seconds is not None or args.fail_ratio:
            raise UserError("--seconds and --fail-ratio apply to --count, not --from-file")
        items = read_jsonl(
            args.from_file, args.idempotency_keys, attributes=common, verbatim=args.verbatim
        )
        return len(items), [f"line {line}" for line, _ in items], [item for _, item in items]
    if args.verbatim:
        raise UserError("--verbatim applies to --from-file, not --count")
    if args.count < 1:
        raise UserError(f"--count {args.count} is invalid: give 1 or more")
    seconds = parse_seconds(args.seconds) if args.seconds is not None else None
    if not 0.0 <= args.fail_ratio <= 1.0:
        raise UserError(f"--fail-ratio {args.fail_ratio:g} is invalid: give 0 to 1")
    check_attributes(common, "--attribute")
    _one_body_per_key(args, common, seconds)
    requests = generate(
        args.count, seconds, args.fail_ratio, args.idempotency_keys, args.seed, attributes=common
    )
    return args.count, None, requests


def _one_body_per_key(
    args: argparse.Namespace, common: Mapping[str, str], seconds: tuple[int, int] | None
) -> None:
    """Refuse ``--count`` copies under one fixed key whose bodies would differ: the dispatcher
    would start the first and dead-letter the others as ``idempotency_conflict``."""
    key = common.get(IDEMPOTENCY_ATTRIBUTE)
    if key is None or args.count < 2:
        return
    varying = []
    if seconds is not None and seconds[0] != seconds[1]:
        varying.append(f"--seconds {args.seconds}")
    if 0 < round(args.count * args.fail_ratio) < args.count:
        varying.append(f"--fail-ratio {args.fail_ratio:g}")
    if varying:
        raise UserError(
            f"--count {args.count} with --attribute {IDEMPOTENCY_ATTRIBUTE}={key} names one "
            f"execution for all {args.count} requests, but {' and '.join(varying)} gives them "
            "different bodies: all but the first would be dead-lettered as "
            f"idempotency_conflict; give --idempotency-keys {key} instead ({key}-1 .. "
            f"{key}-{args.count}), or bodies that are all the same"
        )
    print(
        f"note: all {args.count} requests carry {IDEMPOTENCY_ATTRIBUTE}={key}: the dispatcher "
        f"starts one execution and counts the other {args.count - 1} as duplicates",
        file=sys.stderr,
    )


def parse_seconds(text: str) -> tuple[int, int]:
    """``MIN:MAX`` (or one number) as a range of whole seconds, 0 <= MIN <= MAX <= 99999999.

    Whole: the demo machine waits ``SecondsPath: $.seconds``, which AWS documents as an
    integer (a float fails the execution on AWS and on moto).
    """
    low_text, _, high_text = text.partition(":")
    accepted = f"give whole seconds MIN:MAX from 0 to {MAX_WAIT_SECONDS}, e.g. 1:5"
    try:
        low = int(low_text)
        high = int(high_text) if high_text else low
    except ValueError:
        raise UserError(f"--seconds {text!r} is invalid: {accepted}") from None
    if low < 0 or high < 0:
        raise UserError(f"--seconds {text!r} is invalid: MIN and MAX must be >= 0; {accepted}")
    if max(low, high) > MAX_WAIT_SECONDS:
        raise UserError(
            f"--seconds {text!r} is invalid: a Wait state waits at most {MAX_WAIT_SECONDS} s"
        )
    if low > high:
        raise UserError(f"--seconds {text!r} is invalid: MIN must not exceed MAX, e.g. 1:5")
    return low, high


def parse_start_by_flag(text: str, now: float | None = None) -> str:
    """``--start-by`` as the attribute's RFC 3339 UTC text: an RFC 3339 time with its
    offset, epoch seconds, or ``+N`` s/m/h/d from ``now``; a time already past is refused
    (every request would be dead-lettered at once)."""
    now = time.time() if now is None else now
    relative = RELATIVE_RE.match(text.strip())
    accepted = (
        "give an RFC 3339 time with its offset (2026-12-05T10:00:00Z), epoch seconds, "
        "or +N with s, m, h or d (+10m)"
    )
    if relative:
        deadline = now + int(relative[1]) * _UNIT_SECONDS[relative[2]]
    else:
        try:
            deadline = parse_start_by(text)
        except ValueError as exc:
            raise UserError(f"--start-by {text!r} is invalid: {exc}; {accepted}") from None
    if deadline <= now:
        raise UserError(
            f"--start-by {text!r} is {format_deadline(deadline)}, already past: every request "
            "would be dead-lettered as expired"
        )
    return format_deadline(deadline)


def parse_attribute(text: str) -> tuple[str, str]:
    """``NAME=VALUE`` from ``--attribute``, the name checked as SQS checks it."""
    name, equals, value = text.partition("=")
    if not equals:
        raise UserError(f"--attribute {text!r} is invalid: give NAME=VALUE, e.g. tenant=a")
    problem = _attribute_problem(name, value)
    if problem:
        raise UserError(f"--attribute {text!r} is invalid: {problem}")
    return name, value


def _attribute_problem(name: str, value: object) -> str | None:
    """Why SQS (or the dispatcher) would refuse this attribute, or None."""
    if not ATTRIBUTE_NAME_RE.match(name) or ".." in name or name[0] == "." or name[-1] == ".":
        return (
            "a name is 1-256 characters of A-Z a-z 0-9 _ - . (no leading, trailing or "
            "double period)"
        )
    if name.lower().startswith(("aws.", "amazon.")):
        return "names starting AWS. or Amazon. are reserved by SQS"
    if name.startswith("dispatcher-"):
        return "dispatcher-* names are reserved for the dispatcher's dead letters"
    if not isinstance(value, str) or not value:
        return "the value must be a non-empty string"
    if name == IDEMPOTENCY_ATTRIBUTE and not NAME_RE.match(value):
        return f"{IDEMPOTENCY_ATTRIBUTE} is 1-80 characters of A-Z a-z 0-9 - _ (an execution name)"
    return _start_by_problem(value) if name == START_BY_ATTRIBUTE else None


def _start_by_problem(value: str) -> str | None:
    """Why the dispatcher would dead-letter this start-by as invalid, or None."""
    try:
        parse_start_by(value)
    except ValueError as exc:
        return f"{START_BY_ATTRIBUTE} is {exc}"
    return None


def check_attributes(attributes: Mapping[str, object], where: str, suffix: str = "") -> None:
    """UserError naming ``where`` when the attributes break SQS's or the dispatcher's rules."""
    for name, value in attributes.items():
        problem = _attribute_problem(name, value)
        if problem:
            raise UserError(f"{where}: attribute {name!r}={value!r} is invalid: {problem}{suffix}")
    if len(attributes) > MAX_ATTRIBUTES:
        raise UserError(
            f"{where}: {len(attributes)} message attributes; SQS accepts at most "
            f"{MAX_ATTRIBUTES}{suffix}"
        )


def _item(body: str, attributes: Mapping[str, str], key: str | None) -> SubmitItem:
    """A request; the idempotency key travels in its own field whichever way it was given."""
    rest = dict(attributes)
    given = rest.pop(IDEMPOTENCY_ATTRIBUTE, None)
    return SubmitItem(body, idempotency_key=key or given, attributes=rest)


def generate(
    count: int,
    seconds: tuple[int, int] | None,
    fail_ratio: float,
    key_prefix: str | None,
    seed: int | None,
    *,
    attributes: Mapping[str, str] | None = None,
) -> Iterator[SubmitItem]:
    """Demo-machine requests: exactly ``round(count * fail_ratio)`` of them ask to fail;
    ``seconds`` are whole (the machine's ``SecondsPath`` takes an integer)."""
    rng = random.Random(seed)
    failing = set(rng.sample(range(count), round(count * fail_ratio)))
    for index in range(count):
        body: dict[str, object] = {}
        if seconds is not None:
            low, high = seconds
            body["seconds"] = rng.randint(int(low), int(high))
        if index in failing:
            body["fail"] = True
        key = f"{key_prefix}-{index + 1}" if key_prefix else None
        yield _item(json.dumps(body), attributes or {}, key)


def read_jsonl(
    path: Path,
    key_prefix: str | None,
    *,
    attributes: Mapping[str, str] | None = None,
    verbatim: bool = False,
) -> list[tuple[int, SubmitItem]]:
    """Read and check a whole JSON Lines file: (line number, request) per non-blank line.

    A line is the execution input itself, or (unless ``verbatim``) an object with exactly
    ``input`` and optionally ``attributes`` keys: the input and its message attributes,
    which win over ``attributes`` (the ``--attribute`` flags). Any bad line stops the whole
    file before anything is sent, so nothing goes half-way unnoticed.
    """
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
        except (json.JSONDecodeError, RecursionError) as exc:
            why = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            raise UserError(f"{where}: not JSON ({why}); nothing was sent") from None
        if not isinstance(value, dict):
            raise UserError(
                f"{where}: expected a JSON object (the execution input), got "
                f"{type(value).__name__}; nothing was sent"
            )
        merged = dict(attributes or {})
        if not verbatim and "input" in value and set(value) <= _REQUEST_KEYS:
            line_attributes = value.get("attributes", {})
            if not isinstance(line_attributes, dict):
                raise UserError(
                    f'{where}: "attributes" must be an object of name: "value" strings; '
                    "nothing was sent"
                )
            if not isinstance(value["input"], dict):
                raise UserError(
                    f'{where}: "input" must be a JSON object (the execution input), got '
                    f"{type(value['input']).__name__}; nothing was sent"
                )
            merged.update(line_attributes)
            text = json.dumps(value["input"])
        check_attributes(merged, where, "; nothing was sent")
        if IDEMPOTENCY_ATTRIBUTE in merged and key_prefix:
            raise UserError(
                f"{where}: has an {IDEMPOTENCY_ATTRIBUTE} attribute and --idempotency-keys "
                "names it too: give one; nothing was sent"
            )
        if len(text.encode()) > MAX_INPUT_BYTES:
            raise UserError(
                f"{where}: {len(text.encode())} bytes is over the 256 KiB execution input "
                "limit; nothing was sent"
            )
        key = f"{key_prefix}-{len(items) + 1}" if key_prefix else None
        items.append((number, _item(text, merged, key)))
    if not items:
        raise UserError(f"--from-file {path} has no requests (no non-blank lines)")
    _no_conflicts(path, items)
    return items


def _no_conflicts(path: Path, items: list[tuple[int, SubmitItem]]) -> None:
    """Refuse two lines with the same key and attributes but different inputs: whatever the
    pool's settings, the second would be dead-lettered as ``idempotency_conflict``."""
    seen: dict[tuple[str, str], tuple[int, object]] = {}
    for number, item in items:
        if item.idempotency_key is None:
            continue
        same = (item.idempotency_key, json.dumps(sorted(item.attributes.items())))
        body = json.loads(item.body)
        first = seen.setdefault(same, (number, body))
        if first[1] != body:
            raise UserError(
                f"{path}:{number}: {IDEMPOTENCY_ATTRIBUTE} {item.idempotency_key} with another "
                f"input than line {first[0]}: it would be dead-lettered as "
                "idempotency_conflict; give each request its own key; nothing was sent"
            )
