"""What the checks read: the settings (even invalid ones), the clients, memoised look-ups."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar, cast

import anyio
from aiobotocore.config import AioConfig
from pydantic import ValidationError

from dispatcher.aws.api import AWS_ERRORS, session
from dispatcher.core.shared_limits import SharedLimitConfig
from dispatcher.preflight.report import Finding, Skip, Status
from dispatcher.settings import config, layout
from dispatcher.settings.config import PoolSettings, Settings
from dispatcher.settings.layout import DEFAULT_POOL, PoolConfig, QueueConfig

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient
    from types_aiobotocore_events import EventBridgeClient
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_ssm import SSMClient
    from types_aiobotocore_stepfunctions import SFNClient
    from types_aiobotocore_stepfunctions.type_defs import DescribeStateMachineOutputTypeDef

T = TypeVar("T")

# Named in messages: both are settings (and config-file [dispatcher] keys) of their own.
LIMIT_PARAMETER_ENV = config.env_name("limit_parameter")
LEASE_TABLE_ENV = config.env_name("lease_table")


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

_PER_POOL = frozenset({*config.POOL_FIELDS, "request_queue_url"})


@dataclass(frozen=True)
class Target:
    """What is checked: the settings' values (None where unset or invalid), every pool and
    queue, and how the user named each setting (flag, variable or config-file key).

    A check of one pool or queue reads a `scoped` copy: its values are the pool's (state
    machine, limit, limit parameter, ...) or the queue's (request queue URL), and ``about``
    says which, so that each finding names what it is about.
    """

    region: str
    values: Mapping[str, Any]
    invalid: frozenset[str] = frozenset()  # given, but not valid on its own
    limit_parameter: str | None = None
    lease_table: str | None = None
    pools: tuple[PoolConfig, ...] = ()
    queues: tuple[QueueConfig, ...] = ()
    names: Mapping[str, str] = dataclasses.field(default_factory=dict)
    source: str = "environment"  # or the config file's path
    about: str = ""  # "pool NAME", "queue NAME" or "named limit NAME" for a scoped copy
    fed: tuple[PoolConfig, ...] = ()  # a queue's copy: the pools it feeds; a named limit's:
    # the pools that use it
    limits: tuple[SharedLimitConfig, ...] = ()  # the named limits ([limits.NAME])
    named: SharedLimitConfig | None = None  # a named limit's copy: that named limit

    def get(self, field: str) -> Any:
        """A setting's value, None when unset or invalid."""
        return self.values.get(field)

    def need(self, field: str) -> Any:
        """A setting's value; `Skip` naming it when it is unusable."""
        value = self.values.get(field)
        if value is None and self.from_file and field in _PER_POOL and not self.pools:
            raise Skip("the config file has no valid pools and queues (see settings)")
        if value is None:
            state = "invalid" if field in self.invalid else "unset"
            raise Skip(f"{self.name(field)} is {state} (see settings)")
        return value

    def name(self, field: str) -> str:
        """How the user gave setting ``field`` (``--limit``, ``DISPATCHER_LIMIT``,
        ``[pools.a] limit``); the variable when it was not given at all."""
        return self.names.get(field) or config.env_name(field)

    def for_pool(self, pool: PoolConfig) -> Target:
        """The copy a check of ``pool`` reads."""
        values = {
            f: getattr(pool, f)
            for f in config.POOL_FIELDS
            if f != "request_queue_url" and f not in self.invalid
        }
        names = dict(self.names)
        if self.from_file:
            names |= {f: f"[pools.{pool.name}] {f}" for f in values}
        queues = [q for q in self.queues if pool.name in q.pools]
        first = queues[0].url if queues else None
        return replace(
            self,
            values={**self.values, **values, "request_queue_url": first},
            invalid=self.invalid - set(values),
            limit_parameter=pool.limit_parameter,
            names=names,
            about=f"pool {pool.name}",
            fed=(pool,),
        )

    def for_queue(self, queue: QueueConfig) -> Target:
        """The copy a check of request queue ``queue`` reads."""
        names = dict(self.names)
        if self.from_file:
            index = self.queues.index(queue) + 1
            names["request_queue_url"] = f"[[queues]] #{index} url"
        return replace(
            self,
            values={**self.values, "request_queue_url": queue.url},
            invalid=self.invalid - {"request_queue_url"},
            names=names,
            about=f"queue {queue.url.rstrip('/').rsplit('/', 1)[-1]}",
            fed=tuple(p for p in self.pools if p.name in queue.pools),
        )

    def for_limit(self, named: SharedLimitConfig) -> Target:
        """The copy a check of named limit ``named`` reads."""
        return replace(
            self,
            about=f"named limit {named.name}",
            fed=tuple(p for p in self.pools if named.name in p.uses),
            named=named,
        )

    def queues_of(self, pool: str) -> list[QueueConfig]:
        """The request queues that feed ``pool``."""
        return [q for q in self.queues if pool in q.pools]

    @property
    def limit_parameters(self) -> set[str]:
        """Every SSM limit parameter to read: the pools' (or the single pool's) and the
        named limits'."""
        named = {p.limit_parameter for p in self.pools if p.limit_parameter}
        named |= {n.limit_parameter for n in self.limits if n.limit_parameter}
        return named | ({self.limit_parameter} if self.limit_parameter else set())

    @property
    def from_file(self) -> bool:
        """Whether the pools and queues come from a config file."""
        return self.source != "environment"


_SETTINGS_FIX = {
    False: "give the setting named a valid value; `sfn-dispatcher check --help` lists them, "
    "docs/configuration.md explains them",
    True: "fix the config file; docs/pools.md has a complete example",
}


def _from_loaded(loaded: layout.Config) -> dict[str, Any]:
    """The values of loaded settings; with one pool, its settings as the process's."""
    values = loaded.settings.model_dump()
    if len(loaded.layout.pools) == 1 and len(loaded.layout.queues) == 1:
        pool, queue = loaded.layout.pools[0], loaded.layout.queues[0]
        values |= {f: getattr(pool, f) for f in config.POOL_FIELDS if f != "request_queue_url"}
        values["request_queue_url"] = queue.url
    return values


def load_target(
    overrides: Mapping[str, Any], env: Mapping[str, str] | None
) -> tuple[Target, tuple[Finding, ...]]:
    """The values to check and the settings findings (one per problem); bad settings never
    stop it. Reads the settings with `run`'s own loader (`dispatcher.settings.layout.attempt`):
    flags, ``DISPATCHER_*`` variables and the config file with every pool and queue.

    When the settings are invalid each one is validated on its own, so that the checks of
    the valid ones still run: one run shows every problem.
    """
    environ = os.environ if env is None else env
    loaded = layout.attempt(overrides, environ)
    given, path = loaded.given, loaded.path
    pools: tuple[PoolConfig, ...] = ()
    queues: tuple[QueueConfig, ...] = ()
    limits: tuple[SharedLimitConfig, ...] = ()
    invalid: set[str] = set()
    if loaded.config is None:
        values: dict[str, Any] = {
            name: f.default for name, f in Settings.model_fields.items() if not f.is_required()
        }
        if loaded.file_layout is not None:  # the file alone may be fine: its pools are checked
            pools, queues = loaded.file_layout.pools, loaded.file_layout.queues
            limits = loaded.file_layout.limits
        for name in given.values:
            if name == "config" or (path and name in config.POOL_FIELDS):
                continue
            value, problem = given.alone(name)
            values[name] = value
            invalid |= {name} if problem else set()
        findings = tuple(
            Finding(Status.FAIL, problem, _SETTINGS_FIX[problem.startswith("config file ")])
            for problem in loaded.problems
        )
        if not path and values.get("state_machine_arn") and values.get("request_queue_url"):
            pools = (_single_pool(values),)
            queues = (layout.QueueConfig(url=values["request_queue_url"], pools=(DEFAULT_POOL,)),)
    else:
        settings = loaded.config.settings
        values = _from_loaded(loaded.config)
        pools, queues = loaded.config.layout.pools, loaded.config.layout.queues
        limits = loaded.config.layout.limits
        if path is not None:
            summary = (
                f"config file {path}: pools "
                + ", ".join(f"{p.name} (limit {p.limit})" for p in pools)
                + f", {len(queues)} request queue(s)"
            )
        else:
            summary = f"limit {values['limit']}"
        findings = (
            Finding(
                Status.OK,
                f"{summary}, visibility timeout {settings.visibility_timeout} s, "
                f"reconcile every {settings.reconcile_interval:g} s, "
                f"input {settings.input_format.value}",
            ),
            *(Finding(Status.WARN, line, "remove it") for line in given.ignored),
        )
    arns = [p.state_machine_arn for p in pools] or [values.get("state_machine_arn") or ""]
    arn = config.STATE_MACHINE_ARN_RE.match(arns[0])
    region = (
        environ.get("AWS_REGION")
        or environ.get("AWS_DEFAULT_REGION")
        or (arn["region"] if arn else "us-east-1")
    )
    target = Target(
        region=region,
        values=values,
        invalid=frozenset(invalid),
        limit_parameter=values.get("limit_parameter"),
        lease_table=values.get("lease_table"),
        pools=pools,
        queues=queues,
        names=dict(given.names),
        source=str(path) if path else "environment",
        limits=limits,
    )
    return target, findings


def _single_pool(values: Mapping[str, Any]) -> PoolConfig:
    """The single pool of settings that are not all valid: its valid values, defaults for
    the others (or, when they do not go together, its state machine and limit parameter)."""
    fields = [f for f in PoolSettings.model_fields if values.get(f) is not None]
    try:
        return PoolConfig.model_validate({"name": DEFAULT_POOL, **{f: values[f] for f in fields}})
    except ValidationError:
        return PoolConfig(
            name=DEFAULT_POOL,
            state_machine_arn=values["state_machine_arn"],
            limit_parameter=values.get("limit_parameter"),
        )


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
    aws = session(region=target.region)
    # A preflight answers in seconds: one retry, short timeouts.
    aio = AioConfig(
        retries={"mode": "standard", "max_attempts": 2}, connect_timeout=5, read_timeout=15
    )
    new = partial(aws.client, config=aio, endpoint_url=endpoint_url)
    credentials = await aws.get_credentials()
    async with AsyncExitStack() as stack:
        enter = stack.enter_async_context
        yield Clients(
            sqs=await enter(new("sqs")),
            sfn=await enter(new("stepfunctions")),
            events=await enter(new("events")),
            ssm=await enter(new("ssm")) if target.limit_parameters else None,
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

    def scoped(self, target: Target) -> Context:
        """The context of one pool's or queue's checks; look-ups stay shared (memoised once)."""
        ctx = Context(target, self.clients, self.endpoint)
        ctx._cells = self._cells
        return ctx

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
            f"state_machine:{arn}",
            partial(self.clients.sfn.describe_state_machine, stateMachineArn=arn),
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
