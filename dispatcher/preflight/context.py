"""What the checks read: the settings (even invalid ones), the clients, memoised look-ups."""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar, cast

import aioboto3
import anyio
from aiobotocore.config import AioConfig

from dispatcher import config, layout
from dispatcher.aws import AWS_ERRORS
from dispatcher.config import ConfigError, Settings
from dispatcher.preflight.report import Finding, Skip, Status

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


def _from_config_file(
    overrides: Mapping[str, Any], environ: Mapping[str, str], values: dict[str, Any]
) -> tuple[dict[str, Any], Finding]:
    """Validate the config file; the AWS checks then look at its first pool and queue."""
    try:
        loaded = layout.load(overrides, environ)
    except ConfigError as exc:
        return values, Finding(Status.FAIL, str(exc), "fix the config file (see the README)")
    first = loaded.layout.pools[0]
    queue = loaded.layout.queues_of(first.name)[0]
    values = {
        **loaded.settings.model_dump(),
        "state_machine_arn": first.state_machine_arn,
        "request_queue_url": queue.url,
        "limit": first.limit,
    }
    names = ", ".join(p.name for p in loaded.layout.pools)
    return values, Finding(
        Status.OK,
        f"config file {loaded.layout.source}: pools {names}; the checks below look at pool "
        f"{first.name} and its queue {queue.url} (the other pools are not checked yet)",
    )


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
        if settings.config is not None:
            values, finding = _from_config_file(overrides, environ, values)
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
        return await self.queue_at(self.target.need(role.field))

    async def queue_at(self, url: str) -> dict[str, str]:
        """All attributes of the queue at ``url`` (also a redrive policy's target)."""

        async def fetch() -> dict[str, str]:
            got = await self.clients.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])
            return {str(k): v for k, v in got.get("Attributes", {}).items()}

        return await self.once(f"queue-at:{url}", fetch)

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
