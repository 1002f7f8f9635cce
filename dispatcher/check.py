"""``sfn-dispatcher check``: the preflight to run before deploying or when something looks wrong.

One line per check, with the fix for each failure. Every AWS call is harmless (describe, get,
or list one item): nothing is started, received or deleted. The checks share one `Context`
whose look-ups are memoised, run concurrently, and never stop at the first failure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar, cast

import aioboto3
import anyio
from aiobotocore.config import AioConfig
from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

from dispatcher import config
from dispatcher.aws import AWS_ERRORS, error_code
from dispatcher.config import ConfigError, Settings
from dispatcher.events import DETAIL_TYPE, SOURCE
from dispatcher.ledger import TERMINAL_STATUSES

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient
    from types_aiobotocore_events import EventBridgeClient
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_ssm import SSMClient
    from types_aiobotocore_stepfunctions import SFNClient
    from types_aiobotocore_stepfunctions.type_defs import DescribeStateMachineOutputTypeDef

T = TypeVar("T")

# Not settings yet (issue 6): read from the environment so that `check` verifies them today.
LIMIT_PARAMETER_ENV = "DISPATCHER_LIMIT_PARAMETER"
LEASE_TABLE_ENV = "DISPATCHER_LEASE_TABLE"
LEASE_KEY = "pool"
AUTH_CODES = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "ExpiredToken",
        "ExpiredTokenException",
        "AuthFailure",
    }
)
NO_QUEUE_CODES = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"})
ALL_STATUSES = ("RUNNING", *sorted(TERMINAL_STATUSES))
# Below this, a request handed back a few times (throttling) dead-letters without a reason.
MIN_RECEIVE_COUNT = 3


class Status(StrEnum):
    """How a check came out; only FAIL makes the exit status 1."""

    OK = "OK"
    FAIL = "FAIL"
    WARN = "WARN"
    INFO = "INFO"
    SKIP = "SKIP"


@dataclass(frozen=True)
class Finding:
    """What one check found: a status, one line of detail, and the fix when it is not OK."""

    status: Status
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class Result:
    """One line of the report: a stable id (for machines), a title, and the finding."""

    id: str
    title: str
    status: Status
    detail: str
    fix: str = ""

    @classmethod
    def of(cls, id_: str, title: str, finding: Finding) -> Result:
        """The line for ``finding``."""
        return cls(id_, title, finding.status, finding.detail, finding.fix)


class Skip(Exception):  # noqa: N818 - a signal ("cannot run"), not an error
    """A check cannot run because something it needs is unset or failed; says which."""


@dataclass(frozen=True)
class Report:
    """Every check's result, in a fixed order."""

    subject: str
    results: tuple[Result, ...]

    @property
    def ok(self) -> bool:
        """True when no check failed (WARN, INFO and SKIP do not fail the preflight)."""
        return all(r.status is not Status.FAIL for r in self.results)

    def counts(self) -> dict[str, int]:
        """How many checks ended in each status."""
        return {s.value: sum(r.status is s for r in self.results) for s in Status}

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document."""
        checks = [{**r.__dict__, "status": r.status.value} for r in self.results]
        return {"ok": self.ok, "subject": self.subject, "counts": self.counts(), "checks": checks}


# --- what is checked: the settings, also when some are invalid --------------------------------


@dataclass(frozen=True)
class QueueRole:
    """One of the dispatcher's queues: its settings field and its name in prose."""

    field: str
    title: str

    @property
    def variable(self) -> str:
        """The environment variable that names the queue."""
        return config.env_name(self.field)


REQUESTS = QueueRole("request_queue_url", "requests queue")
EVENTS = QueueRole("events_queue_url", "events queue")
DEAD_LETTERS = QueueRole("dead_letter_queue_url", "dead-letter queue")

# Valid stand-ins for the required settings, to validate one setting on its own.
_PLACEHOLDERS = {
    "state_machine_arn": "arn:aws:states:us-east-1:000000000000:stateMachine:placeholder",
    "request_queue_url": "https://sqs.us-east-1.amazonaws.com/000000000000/placeholder-requests",
    "events_queue_url": "https://sqs.us-east-1.amazonaws.com/000000000000/placeholder-events",
}
_INVALID = object()


@dataclass(frozen=True)
class Target:
    """What is checked: the settings' values (None where unset or invalid) and the extras."""

    region: str
    values: Mapping[str, Any]
    invalid: frozenset[str] = frozenset()  # given, but not valid on its own
    limit_parameter: str | None = None
    lease_table: str | None = None

    def get(self, field: str) -> Any:
        """A setting's value, None when unset or invalid."""
        return self.values.get(field)

    def need(self, field: str) -> Any:
        """A setting's value; `Skip` naming its variable when it is unusable."""
        value = self.values.get(field)
        if value is None:
            state = "invalid" if field in self.invalid else "unset"
            raise Skip(f"{config.env_name(field)} is {state} (see settings)")
        return value


def load_target(
    overrides: Mapping[str, Any], env: Mapping[str, str] | None
) -> tuple[Target, Finding]:
    """The values to check and the settings check's finding; bad settings never stop it.

    When the settings are invalid each one is validated on its own, so that the checks of
    the valid ones still run: one run shows every problem.
    """
    environ = os.environ if env is None else env
    values: dict[str, Any]
    invalid: set[str] = set()
    try:
        settings = Settings.load(overrides, env)
    except ConfigError as exc:
        fields = Settings.model_fields
        values = {name: f.default for name, f in fields.items() if not f.is_required()}
        for name, raw in _raw_settings(overrides, environ).items():
            parsed = _alone(name, raw)
            values[name] = None if parsed is _INVALID else parsed
            invalid |= {name} if parsed is _INVALID else set()
        finding = Finding(
            Status.FAIL,
            str(exc),
            "give the variables named valid values (or use the matching flags); "
            "`sfn-dispatcher check --help` lists every setting",
        )
    else:
        values = settings.model_dump()
        finding = Finding(
            Status.OK,
            f"limit {settings.limit}, visibility timeout {settings.visibility_timeout} s, "
            f"reconcile every {settings.reconcile_interval:g} s, "
            f"input {settings.input_format.value}",
        )
    arn = config.STATE_MACHINE_ARN_RE.match(values.get("state_machine_arn") or "")
    region = (
        environ.get("AWS_REGION")
        or environ.get("AWS_DEFAULT_REGION")
        or (arn["region"] if arn else "us-east-1")
    )
    target = Target(
        region=region,
        values=values,
        invalid=frozenset(invalid),
        limit_parameter=environ.get(LIMIT_PARAMETER_ENV) or None,
        lease_table=environ.get(LEASE_TABLE_ENV) or None,
    )
    return target, finding


def _raw_settings(overrides: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """The settings as given (variables, then flags), before validation."""
    prefix = config.ENV_PREFIX
    raw = {k[len(prefix) :].lower(): v for k, v in environ.items() if k.upper().startswith(prefix)}
    given: dict[str, Any] = {k: v for k, v in raw.items() if k in Settings.model_fields}
    return given | {k: v for k, v in overrides.items() if v is not None}


def _alone(name: str, raw: Any) -> Any:
    """``raw`` parsed as setting ``name`` next to valid stand-ins, or ``_INVALID``."""
    try:
        return getattr(Settings.load({**_PLACEHOLDERS, name: raw}, env={}), name)
    except ConfigError:
        return _INVALID


# --- the context every check reads -----------------------------------------------------------


@dataclass(frozen=True)
class Clients:
    """The AWS clients of one run (SSM and DynamoDB only when configured)."""

    sqs: SQSClient
    sfn: SFNClient
    events: EventBridgeClient
    ssm: SSMClient | None
    dynamodb: DynamoDBClient | None
    credentials: str | None  # where botocore found them: "env", "container-role", ...


@asynccontextmanager
async def open_clients(target: Target, endpoint_url: str | None) -> AsyncIterator[Clients]:
    """Open the clients; endpoint and credentials from ``AWS_*`` unless ``endpoint_url``."""
    session = aioboto3.Session(region_name=target.region)
    # A preflight answers in seconds: one retry, short timeouts.
    aio = AioConfig(
        retries={"mode": "standard", "max_attempts": 2}, connect_timeout=5, read_timeout=15
    )
    new = partial(session.client, config=aio, endpoint_url=endpoint_url)
    credentials = await session.get_credentials()
    async with AsyncExitStack() as stack:
        enter = stack.enter_async_context
        yield Clients(
            sqs=await enter(new("sqs")),
            sfn=await enter(new("stepfunctions")),
            events=await enter(new("events")),
            ssm=await enter(new("ssm")) if target.limit_parameter else None,
            dynamodb=await enter(new("dynamodb")) if target.lease_table else None,
            credentials=getattr(credentials, "method", None),
        )


@dataclass
class _Cell:
    done: anyio.Event
    value: Any = None
    error: Exception | None = None


@dataclass(frozen=True)
class Rule:
    """An EventBridge rule that targets the events queue."""

    name: str
    arn: str
    state: str
    pattern: Any  # the parsed event pattern; None for a scheduled rule
    targets: tuple[Mapping[str, Any], ...]  # those of its targets that are the events queue


class Context:
    """What every check reads: the target, the clients and memoised AWS look-ups."""

    def __init__(self, target: Target, clients: Clients, endpoint: str | None) -> None:
        self.target = target
        self.clients = clients
        self.endpoint = endpoint
        self._cells: dict[str, _Cell] = {}

    async def once(self, key: str, fetch: Callable[[], Awaitable[T]]) -> T:
        """``fetch()``, called once per key however many checks ask; errors re-raised to all."""
        cell = self._cells.get(key)
        if cell is None:
            cell = self._cells[key] = _Cell(anyio.Event())
            try:
                cell.value = await fetch()
            except Exception as exc:  # noqa: BLE001 - kept, and re-raised to every caller below
                cell.error = exc
            finally:
                cell.done.set()
        else:
            await cell.done.wait()
        if cell.error is not None:
            raise cell.error
        return cast(T, cell.value)

    def aws(self, *argv: str) -> str:
        """An AWS CLI command for a fix, in this region (and at this endpoint, if one is set)."""
        extra = ["--region", self.target.region]
        if self.endpoint:
            extra += ["--endpoint-url", self.endpoint]
        return shlex.join(["aws", *argv, *extra])

    async def state_machine(self) -> DescribeStateMachineOutputTypeDef:
        """DescribeStateMachine of the governed machine."""
        arn = self.target.need("state_machine_arn")
        return await self.once(
            "state_machine", partial(self.clients.sfn.describe_state_machine, stateMachineArn=arn)
        )

    async def queue(self, role: QueueRole) -> dict[str, str]:
        """All attributes of one of the dispatcher's queues."""
        url = self.target.need(role.field)

        async def fetch() -> dict[str, str]:
            got = await self.clients.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])
            return {str(k): v for k, v in got.get("Attributes", {}).items()}

        return await self.once(f"queue:{role.field}", fetch)

    async def queue_or_skip(self, role: QueueRole) -> dict[str, str]:
        """As `queue`, for a check that needs a queue another check reports on."""
        try:
            return await self.queue(role)
        except AWS_ERRORS:
            raise Skip(f"the {role.title} cannot be read (see above)") from None

    async def rules(self) -> list[Rule]:
        """The rules on the default bus that target the events queue, described."""
        queue_arn = (await self.queue_or_skip(EVENTS))["QueueArn"]
        events = self.clients.events

        async def fetch() -> list[Rule]:
            names: list[str] = []
            paginator = events.get_paginator("list_rule_names_by_target")
            async for page in paginator.paginate(TargetArn=queue_arn):
                names += page.get("RuleNames", [])
            rules = []
            for name in names:
                rule = await events.describe_rule(Name=name)
                targets = (await events.list_targets_by_rule(Rule=name)).get("Targets", [])
                pattern = rule.get("EventPattern")
                rules.append(
                    Rule(
                        name=name,
                        arn=rule.get("Arn", ""),
                        state=rule.get("State", "ENABLED"),
                        pattern=json.loads(pattern) if pattern else None,
                        targets=tuple(t for t in targets if t.get("Arn") == queue_arn),
                    )
                )
            return rules

        return await self.once("rules", fetch)

    async def rules_or_skip(self) -> list[Rule]:
        """As `rules`, for a check that needs them after the rule check reported on them."""
        try:
            return await self.rules()
        except AWS_ERRORS:
            raise Skip("the EventBridge rules cannot be listed (see above)") from None


# --- the checks, in report order -------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One line of the report: an id, a title, and the coroutine that decides it."""

    id: str
    title: str
    run: Callable[[Context], Awaitable[Finding]]


def text(exc: BaseException) -> str:
    """One line for an AWS error: its code and message."""
    if isinstance(exc, ClientError):
        message = exc.response.get("Error", {}).get("Message", "")
        return f"{error_code(exc)}: {message}" if message else error_code(exc)
    return f"{type(exc).__name__}: {exc}"


def is_denied(exc: BaseException) -> bool:
    """True for an authorisation failure: the call reached AWS, the role lacks a permission."""
    code = error_code(exc)
    return "AccessDenied" in code or code in {"AuthorizationError", "UnauthorizedOperation"}


def queue_arn(url: str, region: str) -> str:
    """A queue's ARN from its URL (``.../ACCOUNT/NAME``), for fixes and IAM hints."""
    parts = url.rstrip("/").split("/")
    account = parts[-2] if len(parts) >= 2 and re.fullmatch(r"\d{12}", parts[-2]) else "ACCOUNT"
    return f"arn:aws:sqs:{region}:{account}:{parts[-1]}"


async def check_endpoint(ctx: Context) -> Finding:
    """Any answer from AWS, even "not found" or "access denied", proves endpoint and keys."""
    where = ctx.endpoint or f"AWS {ctx.target.region}"
    try:
        if ctx.target.get("state_machine_arn"):
            await ctx.state_machine()
        else:
            await ctx.clients.sfn.list_state_machines(maxResults=1)
    except ClientError as exc:
        if error_code(exc) in AUTH_CODES:
            return Finding(Status.FAIL, f"{where} rejected the credentials: {text(exc)}", _KEYS)
    except (NoCredentialsError, PartialCredentialsError) as exc:
        return Finding(Status.FAIL, f"no usable AWS credentials: {exc}", _KEYS)
    except AWS_ERRORS as exc:
        return Finding(
            Status.FAIL,
            f"cannot reach {where}: {text(exc)}",
            "check AWS_ENDPOINT_URL (unset for real AWS), AWS_REGION, the network, "
            "proxies and VPC endpoints",
        )
    return Finding(
        Status.OK, f"{where} answers; credentials from {ctx.clients.credentials or 'unknown'}"
    )


_KEYS = (
    "give the process credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
    "or an IAM role (ECS task role, instance profile); renew expired session tokens"
)


async def check_state_machine(ctx: Context) -> Finding:
    """The governed state machine exists and is not being deleted."""
    arn = ctx.target.need("state_machine_arn")
    try:
        machine = await ctx.state_machine()
    except ClientError as exc:
        if is_denied(exc):
            fix = f"grant states:DescribeStateMachine on {arn} to the dispatcher's role"
        else:
            fix = "check DISPATCHER_STATE_MACHINE_ARN: account, region and name"
            arn_region = arn.split(":")[3]
            if arn_region != ctx.target.region:
                fix += (
                    f"; the clients use region {ctx.target.region} (AWS_REGION / "
                    f"AWS_DEFAULT_REGION) but the machine is in {arn_region}"
                )
        return Finding(Status.FAIL, text(exc), fix)
    status = machine.get("status", "ACTIVE")
    if status != "ACTIVE":
        return Finding(Status.FAIL, f"{machine['name']} is {status}", "govern an ACTIVE machine")
    return Finding(Status.OK, f"{machine['name']} ({status})")


async def check_standard(ctx: Context) -> Finding:
    """Only STANDARD machines can be governed: say why when it is EXPRESS."""
    try:
        machine = await ctx.state_machine()
    except AWS_ERRORS:
        raise Skip("the state machine cannot be described (see above)") from None
    kind = machine.get("type", "STANDARD")
    if kind == "STANDARD":
        return Finding(Status.OK, "STANDARD")
    return Finding(
        Status.FAIL,
        f"{machine['name']} is {kind}: Express executions have no idempotent names (a "
        "redelivered request would run twice), send no status-change events and are not "
        "listed by ListExecutions, so the limit cannot be held",
        "govern a STANDARD machine (the type cannot be changed: create one with --type "
        "STANDARD); to keep the Express workflow, call it from a STANDARD parent with the "
        "arn:aws:states:::states:startExecution.sync:2 integration",
    )


async def check_list_executions(ctx: Context) -> Finding:
    """Reconcile and start-up listing need ListExecutions on the machine."""
    arn = ctx.target.need("state_machine_arn")
    try:
        await ctx.state_machine()
    except ClientError as exc:
        if not is_denied(exc):  # denied to describe says nothing about listing
            raise Skip("the state machine cannot be described (see above)") from None
    try:
        listed = await ctx.clients.sfn.list_executions(
            stateMachineArn=arn, statusFilter="RUNNING", maxResults=1
        )
    except ClientError as exc:
        if is_denied(exc):
            return Finding(
                Status.FAIL, text(exc), f"grant states:ListExecutions on {arn} to the role"
            )
        raise Skip(f"{text(exc)} (see the state machine lines)") from None
    running = "executions are running" if listed.get("executions") else "none running"
    return Finding(Status.OK, f"permitted ({running})")


def queue_exists(role: QueueRole) -> Callable[[Context], Awaitable[Finding]]:
    """The check that one of the queues exists and can be read."""

    async def check(ctx: Context) -> Finding:
        unset = role.field not in ctx.target.invalid and ctx.target.get(role.field) is None
        if role is DEAD_LETTERS and unset:
            raise Skip(f"{role.variable} unset: bad requests are left to the redrive policy")
        url = ctx.target.need(role.field)
        try:
            attributes = await ctx.queue(role)
        except ClientError as exc:
            arn = queue_arn(url, ctx.target.region)
            if is_denied(exc):
                return Finding(
                    Status.FAIL, text(exc), f"grant sqs:GetQueueAttributes on {arn} to the role"
                )
            fix = f"check {role.variable}={url} (account, region, name)"
            if error_code(exc) in NO_QUEUE_CODES:
                fix += "; or create it: " + ctx.aws(
                    "sqs", "create-queue", "--queue-name", arn.rsplit(":", 1)[-1]
                )
            return Finding(Status.FAIL, f"{role.variable}: {text(exc)}", fix)
        waiting = attributes.get("ApproximateNumberOfMessages", "?")
        return Finding(Status.OK, f"{attributes.get('QueueArn', url)} ({waiting} waiting)")

    return check


async def check_redrive(ctx: Context) -> Finding:
    """Bad requests need somewhere to go; `run` refuses to start without it."""
    attributes = await ctx.queue_or_skip(REQUESTS)
    dead_letter_url = ctx.target.get(DEAD_LETTERS.field)
    raw = attributes.get("RedrivePolicy")
    if not raw:
        if dead_letter_url:
            return Finding(
                Status.OK, "no redrive policy; bad requests go to DISPATCHER_DEAD_LETTER_QUEUE_URL"
            )
        url = ctx.target.need(REQUESTS.field)
        dlq_arn = queue_arn(url, ctx.target.region) + "-dlq"
        policy = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "5"})
        return Finding(
            Status.FAIL,
            "no redrive policy and no DISPATCHER_DEAD_LETTER_QUEUE_URL: bad requests would "
            "have nowhere to go (sfn-dispatcher run refuses to start)",
            "set DISPATCHER_DEAD_LETTER_QUEUE_URL, or give the queue a redrive policy: "
            + ctx.aws(
                "sqs",
                "set-queue-attributes",
                "--queue-url",
                url,
                "--attributes",
                json.dumps({"RedrivePolicy": policy}),
            ),
        )
    policy = json.loads(raw)
    target = str(policy.get("deadLetterTargetArn", "?"))
    receives = int(policy.get("maxReceiveCount", 0))
    detail = f"to {target.rsplit(':', 1)[-1]} after {receives} receives"
    if receives < MIN_RECEIVE_COUNT:
        return Finding(
            Status.WARN,
            detail + ": a request handed back after retrying a throttled start is dead-lettered "
            "without a reason after so few receives",
            "raise maxReceiveCount to 5 or more (the CloudFormation template's default)",
        )
    return Finding(Status.OK, detail)


async def check_visibility(ctx: Context) -> Finding:
    """The queue's default visibility only matters to consumers other than the dispatcher."""
    attributes = await ctx.queue_or_skip(REQUESTS)
    want = ctx.target.need("visibility_timeout")
    have = int(attributes.get("VisibilityTimeout", "30"))
    if have == want:
        return Finding(Status.OK, f"{have} s, as DISPATCHER_VISIBILITY_TIMEOUT")
    return Finding(
        Status.INFO,
        f"queue default {have} s, DISPATCHER_VISIBILITY_TIMEOUT {want} s: the dispatcher sets "
        f"{want} s on every receive, the queue default applies only to other consumers",
        "to align them: "
        + ctx.aws(
            "sqs",
            "set-queue-attributes",
            "--queue-url",
            ctx.target.need(REQUESTS.field),
            "--attributes",
            f"VisibilityTimeout={want}",
        ),
    )


def status_pattern(state_machine_arn: str) -> dict[str, Any]:
    """The EventBridge pattern the dispatcher needs: this machine's status changes."""
    return {
        "source": [SOURCE],
        "detail-type": [DETAIL_TYPE],
        "detail": {"stateMachineArn": [state_machine_arn]},
    }


def sample_event(state_machine_arn: str, status: str) -> dict[str, Any]:
    """A status-change event of this machine as EventBridge delivers it (for matching)."""
    _, partition, _, region, account, _, name = state_machine_arn.split(":")
    execution = f"arn:{partition}:states:{region}:{account}:execution:{name}:check"
    return {
        "version": "0",
        "id": "00000000-0000-0000-0000-000000000000",
        "detail-type": DETAIL_TYPE,
        "source": SOURCE,
        "account": account,
        "region": region,
        "resources": [execution],
        "detail": {
            "executionArn": execution,
            "stateMachineArn": state_machine_arn,
            "name": "check",
            "status": status,
        },
    }


class UnsupportedPatternError(Exception):
    """The pattern uses an operator this check does not evaluate."""


_MISSING = object()


def matches(pattern: Mapping[str, Any], event: Mapping[str, Any]) -> bool:
    """EventBridge pattern matching: exact values, prefix, suffix, wildcard, anything-but,
    exists, equals-ignore-case and ``$or``; `UnsupportedPatternError` for anything else."""
    for key, expected in pattern.items():
        if key == "$or":
            if not any(matches(alternative, event) for alternative in expected):
                return False
            continue
        value = event.get(key, _MISSING)
        if isinstance(expected, Mapping):
            if not isinstance(value, Mapping) or not matches(expected, value):
                return False
        elif isinstance(expected, list):
            if not any(_matches_one(alternative, value) for alternative in expected):
                return False
        else:
            raise UnsupportedPatternError(f"{key}: {expected!r} is not a list")
    return True


def _matches_one(expected: Any, value: Any) -> bool:
    values = value if isinstance(value, list) else [value]
    if not isinstance(expected, Mapping):
        return value is not _MISSING and expected in values
    if len(expected) != 1:
        raise UnsupportedPatternError(json.dumps(expected))
    ((operator, argument),) = expected.items()
    if operator == "exists":
        return (value is not _MISSING) == bool(argument)
    if value is _MISSING:
        return False
    if operator == "anything-but" and not isinstance(argument, Mapping):
        excluded = argument if isinstance(argument, list) else [argument]
        return all(v not in excluded for v in values)
    test = _STRING_OPERATORS.get(operator)
    if test is None or not isinstance(argument, str):
        raise UnsupportedPatternError(json.dumps(expected))
    return any(test(v, argument) for v in values if isinstance(v, str))


_STRING_OPERATORS: dict[str, Callable[[str, str], bool]] = {
    "prefix": str.startswith,
    "suffix": str.endswith,
    "equals-ignore-case": lambda value, wanted: value.lower() == wanted.lower(),
    "wildcard": lambda value, pattern: glob(pattern, value),
}


def glob(pattern: str, value: str, *, ignore_case: bool = False) -> bool:
    """Wildcard match as IAM and EventBridge do it: ``*`` any run, ``?`` one character."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.IGNORECASE if ignore_case else 0) is not None


def mismatch(pattern: Mapping[str, Any], event: Mapping[str, Any]) -> list[str]:
    """The fields (``detail.x`` for nested ones) on which ``pattern`` rejects ``event``."""
    failing = []
    for key, expected in pattern.items():
        if matches({key: expected}, event):
            continue
        inner = event.get(key)
        if isinstance(expected, Mapping) and isinstance(inner, Mapping) and key != "$or":
            failing += [f"{key}.{name}" for name in mismatch(expected, inner)]
        else:
            failing.append(key)
    return failing


def rule_fix(ctx: Context, name: str, queue: str, *, target: bool) -> str:
    """The commands that create (or correct) the rule and point it at the events queue."""
    pattern = json.dumps(status_pattern(ctx.target.need("state_machine_arn")))
    lines = [ctx.aws("events", "put-rule", "--name", name, "--event-pattern", pattern)]
    if target:
        targets = f"Id=dispatcher-events-queue,Arn={queue}"
        lines.append(ctx.aws("events", "put-targets", "--rule", name, "--targets", targets))
    return "\n".join(lines)


async def check_rule(ctx: Context) -> Finding:
    """An ENABLED rule sends this machine's status changes, untransformed, to the events queue."""
    arn = ctx.target.need("state_machine_arn")
    queue = (await ctx.queue_or_skip(EVENTS))["QueueArn"]
    try:
        rules = await ctx.rules()
    except ClientError as exc:
        if not is_denied(exc):
            raise
        return Finding(Status.WARN, f"cannot inspect the rules: {text(exc)}", _NOT_NEEDED)
    if not rules:
        name = f"sfn-dispatcher-{arn.rsplit(':', 1)[-1]}"[:64]
        return Finding(
            Status.FAIL,
            f"no EventBridge rule on the default bus targets {queue}: finished executions "
            "free their slots only at the next reconcile",
            rule_fix(ctx, name, queue, target=True)
            + "\nthen run check again: the events queue policy line says whether it may send",
        )
    problems: list[str] = []
    fixes: list[str] = []
    for rule in rules:
        if rule.pattern is None:
            problems.append(f"{rule.name} has no event pattern")
            continue
        try:
            matched = {s for s in ALL_STATUSES if matches(rule.pattern, sample_event(arn, s))}
        except UnsupportedPatternError as exc:
            problems.append(f"{rule.name}: cannot evaluate {exc}")
            continue
        if not matched & TERMINAL_STATUSES:
            fields = ", ".join(mismatch(rule.pattern, sample_event(arn, "SUCCEEDED")))
            problems.append(f"{rule.name} does not match this machine's events (on {fields})")
            fixes.append(rule_fix(ctx, rule.name, queue, target=False))
        elif rule.state != "ENABLED":
            problems.append(f"{rule.name} is {rule.state}")
            fixes.append(ctx.aws("events", "enable-rule", "--name", rule.name))
        elif any(k in t for t in rule.targets for k in ("Input", "InputPath", "InputTransformer")):
            problems.append(f"{rule.name} rewrites the event; the dispatcher reads the envelope")
            fixes.append(f"remove Input/InputPath/InputTransformer from {rule.name}'s target")
        elif missing := TERMINAL_STATUSES - matched:
            return Finding(
                Status.WARN,
                f"{rule.name} drops {', '.join(sorted(missing))} events: those executions "
                "free their slots only at the next reconcile",
                rule_fix(ctx, rule.name, queue, target=False),
            )
        else:
            return Finding(Status.OK, f"{rule.name} (ENABLED) sends this machine's events")
    status = Status.FAIL if fixes or not problems else Status.WARN
    return Finding(status, "; ".join(problems), "\n".join(fixes) or "check the rule by hand")


_NOT_NEEDED = (
    "the dispatcher itself does not need this permission: run check with credentials that "
    "may read it (events:ListRuleNamesByTarget, events:DescribeRule, "
    "events:ListTargetsByRule, dynamodb:DescribeTable)"
)


def policy_allows(document: Mapping[str, Any], queue: str, rule_arn: str) -> bool | None:
    """Whether a queue policy lets EventBridge send for ``rule_arn`` (None: cannot tell)."""
    statements = document.get("Statement", [])
    statements = [statements] if isinstance(statements, Mapping) else statements
    allow: bool | None = False
    deny: bool | None = False
    for statement in statements:
        applies = _applies(statement, queue, rule_arn)
        if statement.get("Effect") == "Deny":
            deny = True if applies is True else (None if applies is None and not deny else deny)
        elif applies is True or (applies is None and allow is False):
            allow = applies
    if deny is True:
        return False
    if allow is True and deny is False:
        return True
    return None if allow is not False else False


def _applies(statement: Mapping[str, Any], queue: str, rule_arn: str) -> bool | None:
    """Whether a statement covers EventBridge sending to ``queue`` for ``rule_arn``."""
    if any(k in statement for k in ("NotPrincipal", "NotAction", "NotResource")):
        return None
    principal = statement.get("Principal")
    if isinstance(principal, Mapping):
        principals = [*_listed(principal.get("AWS")), *_listed(principal.get("Service"))]
    else:
        principals = _listed(principal)
    actions = _listed(statement.get("Action"))
    covered = (
        bool({"*", "events.amazonaws.com"} & set(principals))
        and any(glob(a, "sqs:SendMessage", ignore_case=True) for a in actions)
        and any(glob(r, queue) for r in _listed(statement.get("Resource", "*")))
    )
    return _conditions_hold(statement.get("Condition", {}), rule_arn) if covered else False


def _conditions_hold(conditions: Mapping[str, Any], rule_arn: str) -> bool | None:
    """Evaluate ARN and string conditions on the source rule; None for any other kind."""
    known = {"aws:sourcearn": rule_arn, "aws:sourceaccount": rule_arn.split(":")[4]}
    for operator, block in conditions.items():
        base = operator.removesuffix("IfExists")
        kind = base.replace("Not", "")
        if kind not in {"ArnEquals", "ArnLike", "StringEquals", "StringLike"}:
            return None
        for key, expected in block.items():
            actual = known.get(key.lower())
            if actual is None:
                return None
            like = kind.endswith("Like")
            hit = any(glob(e, actual) if like else e == actual for e in _listed(expected))
            if hit == ("Not" in base):
                return False
    return True


def _listed(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


async def check_policy(ctx: Context) -> Finding:
    """On AWS a queue takes EventBridge's messages only if its policy allows the rule."""
    attributes = await ctx.queue_or_skip(EVENTS)
    queue = attributes["QueueArn"]
    rules = await ctx.rules_or_skip()
    if not rules:
        raise Skip("no rule targets the events queue (see above)")
    statement = {
        "Sid": "AllowTheStatusChangeRule",
        "Effect": "Allow",
        "Principal": {"Service": "events.amazonaws.com"},
        "Action": "sqs:SendMessage",
        "Resource": queue,
        "Condition": {"ArnEquals": {"aws:SourceArn": rules[0].arn}},
    }
    policy = json.dumps({"Version": "2012-10-17", "Statement": [statement]})
    fix = (
        "allow the rule (this replaces the queue's policy: merge by hand if it has other "
        "statements): "
        + ctx.aws(
            "sqs",
            "set-queue-attributes",
            "--queue-url",
            ctx.target.need(EVENTS.field),
            "--attributes",
            json.dumps({"Policy": policy}),
        )
    )
    raw = attributes.get("Policy")
    if not raw:
        return Finding(Status.FAIL, "no queue policy: EventBridge may not send to it", fix)
    verdicts = {rule.name: policy_allows(json.loads(raw), queue, rule.arn) for rule in rules}
    allowed = [name for name, verdict in verdicts.items() if verdict is True]
    if allowed:
        return Finding(Status.OK, f"events.amazonaws.com may send for {', '.join(allowed)}")
    if None in verdicts.values():
        return Finding(
            Status.WARN,
            "the policy has statements or conditions this check cannot evaluate",
            "make sure it allows events.amazonaws.com sqs:SendMessage with aws:SourceArn "
            + rules[0].arn,
        )
    names = ", ".join(verdicts)
    return Finding(Status.FAIL, f"the policy does not let EventBridge send for {names}", fix)


async def check_limit_parameter(ctx: Context) -> Finding:
    """The SSM limit parameter is readable and holds a non-negative integer."""
    name = ctx.target.limit_parameter
    if name is None or ctx.clients.ssm is None:
        limit = ctx.target.get("limit")
        raise Skip(f"{LIMIT_PARAMETER_ENV} unset: the limit is DISPATCHER_LIMIT ({limit})")
    limit = ctx.target.get("limit")
    value = str(10 if limit is None else limit)
    put = ctx.aws(
        "ssm", "put-parameter", "--name", name, "--type", "String", "--value", value, "--overwrite"
    )
    try:
        got = await ctx.clients.ssm.get_parameter(Name=name)
    except ClientError as exc:
        if is_denied(exc):
            return Finding(Status.FAIL, text(exc), f"grant ssm:GetParameter on {name}")
        return Finding(Status.FAIL, f"{LIMIT_PARAMETER_ENV}={name}: {text(exc)}", put)
    found = got.get("Parameter", {}).get("Value", "")
    if not re.fullmatch(r"\d+", found.strip()):
        return Finding(Status.FAIL, f"{name} is {found!r}, not a non-negative integer", put)
    return Finding(Status.OK, f"{name} = {int(found)}")


async def check_lease_table(ctx: Context) -> Finding:
    """The lease table exists, is usable, and is keyed by ``pool`` alone."""
    table = ctx.target.lease_table
    if table is None or ctx.clients.dynamodb is None:
        raise Skip(f"{LEASE_TABLE_ENV} unset: no single-active lease")
    create = ctx.aws(
        "dynamodb",
        "create-table",
        "--table-name",
        table,
        "--attribute-definitions",
        f"AttributeName={LEASE_KEY},AttributeType=S",
        "--key-schema",
        f"AttributeName={LEASE_KEY},KeyType=HASH",
        "--billing-mode",
        "PAY_PER_REQUEST",
    )
    try:
        described = (await ctx.clients.dynamodb.describe_table(TableName=table))["Table"]
    except ClientError as exc:
        if is_denied(exc):
            return Finding(Status.WARN, f"cannot describe {table}: {text(exc)}", _NOT_NEEDED)
        return Finding(Status.FAIL, f"{LEASE_TABLE_ENV}={table}: {text(exc)}", create)
    keys = {k["KeyType"]: k["AttributeName"] for k in described.get("KeySchema", [])}
    types = {
        a["AttributeName"]: a["AttributeType"] for a in described.get("AttributeDefinitions", [])
    }
    if keys != {"HASH": LEASE_KEY} or types.get(LEASE_KEY) != "S":
        return Finding(
            Status.FAIL,
            f"{table} is keyed by {keys}; the lease needs partition key {LEASE_KEY} (string) "
            "and no sort key",
            "a key schema cannot change: create a new table and point the variable at it: "
            + create,
        )
    state = described.get("TableStatus", "ACTIVE")
    if state not in {"ACTIVE", "UPDATING"}:
        return Finding(Status.WARN, f"{table} is {state}", "wait until it is ACTIVE")
    return Finding(Status.OK, f"{table} ({state}, key {LEASE_KEY})")


ENDPOINT = Check("endpoint", "AWS endpoint and credentials", check_endpoint)
CHECKS: tuple[Check, ...] = (
    Check("state_machine", "state machine exists", check_state_machine),
    Check("state_machine_type", "state machine is STANDARD", check_standard),
    Check("list_executions", "ListExecutions permitted", check_list_executions),
    Check("request_queue", "requests queue exists", queue_exists(REQUESTS)),
    Check("redrive", "requests dead-lettering", check_redrive),
    Check("dead_letter_queue", "dead-letter queue exists", queue_exists(DEAD_LETTERS)),
    Check("visibility_timeout", "visibility timeout", check_visibility),
    Check("events_queue", "events queue exists", queue_exists(EVENTS)),
    Check("events_rule", "EventBridge rule to events queue", check_rule),
    Check("events_queue_policy", "events queue policy", check_policy),
    Check("limit_parameter", "limit parameter (SSM)", check_limit_parameter),
    Check("lease_table", "lease table (DynamoDB)", check_lease_table),
)


# --- running them --------------------------------------------------------------------------


async def run_checks(
    overrides: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    endpoint_url: str | None = None,
) -> Report:
    """Run every check; ``env`` stands in for the process environment's ``DISPATCHER_*``.

    Credentials and endpoint come from the standard ``AWS_*`` variables; ``endpoint_url``
    wins over ``AWS_ENDPOINT_URL``. The endpoint is checked first: when AWS cannot be
    reached the other checks are skipped rather than failing one by one.
    """
    target, settings = load_target(overrides or {}, env)
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    subject = f"{target.get('state_machine_arn') or '(no state machine)'} in {target.region}"
    subject += f" at {endpoint}" if endpoint else ""
    results: list[Result | None] = [None] * len(CHECKS)
    try:
        async with open_clients(target, endpoint_url) as clients:
            ctx = Context(target, clients, endpoint)
            first = await run_one(ENDPOINT, ctx)
            if first.status is not Status.FAIL:
                async with anyio.create_task_group() as tg:
                    for index, check in enumerate(CHECKS):
                        tg.start_soon(_store, results, index, check, ctx)
    except AWS_ERRORS as exc:  # e.g. AWS_PROFILE names no profile: fails before any call
        first = _result(ENDPOINT, Finding(Status.FAIL, text(exc), _KEYS))
    skipped = Finding(Status.SKIP, "AWS cannot be reached (see above)")
    rest = [r or _result(c, skipped) for r, c in zip(results, CHECKS, strict=True)]
    return Report(subject, (Result.of("settings", "settings", settings), first, *rest))


async def run_one(check: Check, ctx: Context) -> Result:
    """One check; an AWS error it did not expect is a FAIL line, never a traceback."""
    try:
        finding = await check.run(ctx)
    except Skip as exc:
        finding = Finding(Status.SKIP, str(exc))
    except AWS_ERRORS as exc:
        hint = "grant the permission named in the error to the role" if is_denied(exc) else ""
        finding = Finding(Status.FAIL, text(exc), hint)
    except Exception as exc:  # noqa: BLE001 - an answer of a shape we did not expect (or a bug
        # here) must not hide the other checks' lines; unverified counts as failed.
        finding = Finding(Status.FAIL, f"could not evaluate: {type(exc).__name__}: {exc}")
    return _result(check, finding)


async def _store(into: list[Result | None], index: int, check: Check, ctx: Context) -> None:
    into[index] = await run_one(check, ctx)


def _result(check: Check, finding: Finding) -> Result:
    return Result.of(check.id, check.title, finding)


_COLOURS = {
    Status.OK: "32",
    Status.FAIL: "31",
    Status.WARN: "33",
    Status.INFO: "36",
    Status.SKIP: "2",
}


def render(report: Report, *, colour: bool = False) -> str:
    """The readable table: status, check, detail, and each fix on the lines below."""
    width = max(len(r.title) for r in report.results)
    lines = [f"checking {report.subject}", ""]
    for r in report.results:
        status = f"{r.status.value:<4}"
        if colour:
            status = f"\x1b[{_COLOURS[r.status]}m{status}\x1b[0m"
        lines.append(f"{status}  {r.title:<{width}}  {r.detail}")
        for i, fix in enumerate(r.fix.splitlines()):
            lines.append(" " * (width + 8) + ("fix: " if i == 0 else "     ") + fix)
    counts = ", ".join(f"{n} {s}" for s, n in report.counts().items() if n)
    verdict = "ready" if report.ok else "not ready: fix the FAIL lines and run check again"
    lines += ["", f"{counts}: {verdict}"]
    return "\n".join(lines)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``check``: the same settings and flags as ``run``, plus ``--json``."""
    parser = subparsers.add_parser(
        "check",
        help="check settings, permissions and wiring (harmless calls only)",
        description="Verify the settings, the state machine, the queues, the EventBridge "
        "rule and queue policy, and the optional limit parameter "
        f"(${LIMIT_PARAMETER_ENV}) and lease table (${LEASE_TABLE_ENV}), with harmless "
        "calls only; print one line per check and the fix for each failure. Exit 0 when "
        "nothing failed, 1 otherwise. Takes the same settings as `run`.",
    )
    config.add_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the checks, print the table (or JSON); 0 when no check failed, else 1."""
    report = anyio.run(partial(run_checks, config.overrides_from(args)))
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        colour = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        print(render(report, colour=colour))
    return 0 if report.ok else 1
