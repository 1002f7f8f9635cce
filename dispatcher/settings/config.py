"""Settings: each declared once here, read once at start-up, then frozen.

Every setting is one pydantic field (type, default, range, description); its environment
variable (``DISPATCHER_LIMIT``), flag (``--limit``) and config-file key (``limit`` in
``[dispatcher]``, or in ``[pools.NAME]`` for a pool's settings) are derived from the field's
name by `env_name`, `flag_name` and `file_key`. `SETTINGS_TABLE` lists them all, for
``--help`` and the docs.

Where values come from, highest precedence first (`PRECEDENCE`): flags, then ``DISPATCHER_*``
variables, then the config file's ``[dispatcher]`` table, then the field's default. Each is
a pydantic-settings source (`gather`); the winner of each setting is remembered with the name
the user gave it, so that every message names the setting as it was typed.

AWS endpoint, region and credentials are *not* settings of ours: the standard ``AWS_*``
variables (``AWS_ENDPOINT_URL`` included) are read by botocore as usual.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
from collections.abc import Callable, Iterable, Mapping
from copy import copy
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from dispatcher.core.shared_limits import LIMIT_NAME_RE, MAX_WEIGHT
from dispatcher.errors import UserError

ENV_PREFIX = "DISPATCHER_"

STATE_MACHINE_ARN_RE = re.compile(
    r"^arn:aws[a-z-]*:states:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):stateMachine:"
    r"(?P<name>[A-Za-z0-9_-]{1,80})\Z"
)
QUEUE_URL_RE = re.compile(r"^https?://[^\s/]+(/[^\s/]+)*/[^\s/]+\Z")
ATTRIBUTE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,256}\Z")  # SQS message attribute names


class ConfigError(UserError):
    """Settings are missing or invalid: one line per problem, naming the setting as the user
    gave it (flag, variable or config-file key) and what is accepted. Exit status 2."""

    def __init__(self, *problems: str) -> None:
        self.problems = tuple(line for p in problems for line in p.splitlines() if line)
        super().__init__("\n".join(self.problems))


class LogFormat(StrEnum):
    """How log lines are rendered."""

    AUTO = "auto"  # console on a terminal, JSON otherwise
    JSON = "json"
    CONSOLE = "console"


class LogLevel(StrEnum):
    """Lowest level that is logged."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


class InputFormat(StrEnum):
    """How a request message becomes an execution input."""

    JSON = "json"  # the body is the input, verbatim JSON
    ENVELOPE = "envelope"  # {"body": <text>, "requestId": ..., "attributes": {...}}


# --- what a field declares besides its type, default and range ---------------------------------


class Scope(StrEnum):
    """Where a setting can be given."""

    FILE = "file"  # names the config file: a variable or a flag, not a key of the file
    POOL = "pool"  # one pool's: a key of [pools.NAME]; without a file, a variable or a flag
    SINGLE_POOL = "single_pool"  # the single pool's queue: without a file only ([[queues]])
    PROCESS = "process"  # the process's: a variable, a flag or a key of [dispatcher]
    POOL_FILE = "pool_file"  # one pool's, in the config file only (a key of [pools.NAME])


@dataclass(frozen=True)
class Spec:
    """What a settings field declares besides pydantic's own: ``Annotated[int, Spec(...)]``."""

    metavar: str | None = None  # what --help shows the flag takes; derived from the type if None
    check: bool = False  # also a flag of `check`: it names what is checked or changes a verdict
    live: bool = False  # a config reload (SIGHUP) applies it; the others need a restart
    scope: Scope | None = None  # None: POOL for `PoolSettings`' fields, PROCESS for the others
    single_pool_needs: bool = False  # required without a config file (None in the model)


def _arn(value: str) -> str:
    if not STATE_MACHINE_ARN_RE.match(value):
        raise ValueError("must look like arn:aws:states:REGION:ACCOUNT:stateMachine:NAME")
    return value


def _queue_url(value: str) -> str:
    if not QUEUE_URL_RE.match(value):
        raise ValueError(
            "must be an SQS queue URL like https://sqs.REGION.amazonaws.com/ACCOUNT/NAME"
        )
    return value


def _attribute(value: str) -> str:
    if not ATTRIBUTE_RE.match(value):
        raise ValueError("must be an SQS message attribute name (A-Z a-z 0-9 _ - .)")
    return value


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


StateMachineArn = Annotated[str, AfterValidator(_arn)]
QueueUrl = Annotated[str, AfterValidator(_queue_url)]
AttributeName = Annotated[str, AfterValidator(_attribute)]


def _names(info: ValidationInfo) -> Mapping[str, str]:
    """How the user named each given setting (`Given.names`), passed as validation context."""
    context = info.context if isinstance(info.context, Mapping) else {}
    names = context.get("names")
    return names if isinstance(names, Mapping) else {}


# --- the settings ---------------------------------------------------------------------------


class PoolSettings(BaseModel):
    """The settings of one pool: ``[pools.NAME]`` in a config file, or, without one, the
    single pool's ``DISPATCHER_*`` variables and flags (`Settings` inherits these fields)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    state_machine_arn: Annotated[
        StateMachineArn | None, Spec(metavar="ARN", check=True, single_pool_needs=True)
    ] = Field(
        default=None,
        description="ARN of the STANDARD state machine whose executions are limited.",
    )
    limit: Annotated[int, Spec(check=True, live=True)] = Field(
        default=10, ge=0, description="Most executions running at once (0 pauses starts)."
    )
    limit_parameter: Annotated[str | None, Spec(check=True)] = Field(
        default=None,
        description="SSM parameter holding the limit, re-read every limit_refresh_interval "
        "(wins over DISPATCHER_LIMIT once read; an invalid value is refused, the old limit kept).",
    )
    key_attribute: Annotated[AttributeName | None, Spec(check=True)] = Field(
        default=None,
        description="Message attribute holding a request's concurrency key (e.g. a tenant id); "
        "requests are served round-robin by key.",
    )
    per_key_limit: Annotated[int | None, Spec(live=True)] = Field(
        default=None,
        ge=1,
        description="Most executions of one key running at once (needs key_attribute).",
    )
    max_waiting: Annotated[int, Spec(live=True)] = Field(
        default=100,
        ge=0,
        le=100_000,
        description="Requests a pool holds in memory (visibility extended) while their key is at "
        "its limit or higher priorities go first; beyond it they go back to the queue for later.",
    )

    @model_validator(mode="after")
    def _key_needs_attribute(self) -> Self:
        if self.per_key_limit is not None and self.key_attribute is None:
            raise ValueError("per_key_limit needs key_attribute (the attribute holding the key)")
        return self


def _required(field: str) -> Any:
    """``PoolSettings``' declaration of ``field``, without its default (a pool needs it)."""
    info = copy(PoolSettings.model_fields[field])
    info.default = PydanticUndefined
    return info


class PoolConfig(PoolSettings):
    """One governed state machine: a config file's ``[pools.NAME]``, or the single pool of
    the settings (`dispatcher.settings.layout.from_settings`)."""

    name: str = Field(
        description="The pool's name: the `NAME` of its table, the metrics' pool label."
    )
    state_machine_arn: StateMachineArn = _required("state_machine_arn")
    reserved_share: Annotated[float, Spec(metavar="FRACTION", live=True)] = Field(
        default=0.1,
        ge=0.0,
        le=0.9,
        description="Share of the starts kept for lower priorities while higher ones wait.",
    )
    uses: Annotated[dict[str, int], Spec(metavar="WEIGHTS")] = Field(
        default_factory=dict,
        description="Named limits (`[limits.NAME]`) this pool's executions use, with the "
        "units each execution takes of each (its weight), e.g. `{ partner-api = 2 }`.",
    )

    @field_validator("uses")
    @classmethod
    def _check_uses(cls, value: dict[str, int]) -> dict[str, int]:
        for name, weight in value.items():
            if not LIMIT_NAME_RE.match(name):
                raise ValueError(f"{name!r}: named limits are 1-64 characters of A-Z a-z 0-9 _ -")
            if not 1 <= weight <= MAX_WEIGHT:
                raise ValueError(f"{name} = {weight}: a weight is a whole number >= 1")
        return value

    @property
    def region(self) -> str:
        """The region of the pool's state machine."""
        return _arn_part(self.state_machine_arn, "region")

    @property
    def account(self) -> str:
        """The account of the pool's state machine."""
        return _arn_part(self.state_machine_arn, "account")


def _arn_part(arn: str, part: str) -> str:
    match = STATE_MACHINE_ARN_RE.match(arn)
    assert match is not None  # validated  # noqa: S101
    return match[part]


class Settings(PoolSettings):
    """Every setting of ``sfn-dispatcher run``; field ``x`` is ``DISPATCHER_X`` / ``--x``.

    A plain model: `Settings.load` reads the sources (`gather`) and validates it with the
    name each setting was given as validation context (a `BaseSettings` would read the
    process environment again on validation, and drop the context).
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    config: Annotated[Path | None, Spec(metavar="FILE", check=True, scope=Scope.FILE)] = Field(
        default=None,
        description="TOML file with several pools, queues and priorities (see "
        "docs/pools.md); unset: one pool from the settings below. SIGHUP "
        "reloads it.",
    )
    request_queue_url: Annotated[
        QueueUrl | None,
        Spec(metavar="URL", check=True, scope=Scope.SINGLE_POOL, single_pool_needs=True),
    ] = Field(
        default=None,
        description="SQS queue the requests arrive on.",
    )
    events_queue_url: Annotated[QueueUrl, Spec(metavar="URL", check=True)] = Field(
        description="SQS queue the EventBridge rule sends Execution Status Change events to."
    )
    dead_letter_queue_url: Annotated[QueueUrl | None, Spec(metavar="URL", check=True)] = Field(
        default=None,
        description="Where bad requests go with the reason attached; unset: left to the "
        "request queue's redrive policy (reason only in logs and metrics).",
    )
    limit_refresh_interval: Annotated[float, Spec(live=True)] = Field(
        default=30.0, gt=0, description="Seconds between reads of the limit parameters."
    )
    start_rate: Annotated[float | None, Spec(metavar="PER_SECOND", live=True)] = Field(
        default=None,
        gt=0,
        description="StartExecution calls per second per account and region (unset: the "
        "Standard quota, 300/s in us-east-1, us-west-2, eu-west-1, else 150/s).",
    )
    start_burst: Annotated[int | None, Spec(live=True)] = Field(
        default=None,
        ge=1,
        description="Token bucket size for StartExecution (unset: 1300 or 800, as the quota).",
    )
    start_rate_floor: Annotated[float, Spec(metavar="PER_SECOND", live=True)] = Field(
        default=1.0,
        gt=0,
        description="Lowest rate the adaptive back-off falls to when AWS throttles starts.",
    )
    reconcile_interval: Annotated[float, Spec(live=True)] = Field(
        default=30.0, gt=0, description="Seconds between ListExecutions reconciles."
    )
    reconcile_list_rate: float = Field(
        default=2.0,
        gt=0,
        le=1000,
        description="ListExecutions pages per second that reconcile and the start-up listing "
        "may use, shared by every pool of one account and region (a burst of 50 at once). "
        "AWS refills 5/s in the largest regions, 2/s in the others, for the whole account.",
    )
    reconcile_describe_rate: float = Field(
        default=8.0,
        gt=0,
        le=1000,
        description="DescribeExecution calls per second that reconcile may use to confirm "
        "executions a listing no longer shows, shared by every pool of one account and region "
        "(a burst of 100 at once). AWS refills 15/s in the largest regions, 10/s in the others.",
    )
    start_grace: float = Field(
        default=10.0,
        ge=0,
        description="Seconds a just-started execution may be missing from ListExecutions "
        "(eventual consistency) before reconcile describes it.",
    )
    shutdown_timeout: float = Field(
        default=20.0, gt=0, description="Seconds to let starts in flight finish on SIGTERM."
    )
    visibility_timeout: Annotated[int, Spec(check=True)] = Field(
        default=60,
        ge=10,
        le=43_200,
        description="Seconds a received request stays hidden; extended while a start retries.",
    )
    start_retry_timeout: float = Field(
        default=120.0,
        gt=0,
        description="Seconds to keep retrying a throttled/failed StartExecution before the "
        "request is handed back to the queue.",
    )
    start_timeout: float = Field(
        default=5.0,
        gt=0,
        le=60,
        description="Client-side deadline D of one StartExecution attempt (no hidden SDK "
        "retries): a start takes effect within D of being sent or never. A start whose "
        "answer did not come in time stays in doubt (its slot held) until evidence settles "
        "it; a new lease holder waits D + DISPATCHER_START_GRACE before it lists.",
    )
    receive_wait_seconds: int = Field(
        default=20, ge=0, le=20, description="SQS long-poll wait per receive."
    )
    receive_concurrency: int = Field(
        default=4, ge=1, le=64, description="Concurrent receives on the request queue."
    )
    lease_table: Annotated[str | None, Spec(check=True)] = Field(
        default=None,
        description="DynamoDB table (key 'pool') for a single-active lease; unset: no lease, "
        "this process always governs the pool.",
    )
    lease_ttl: float = Field(
        default=15.0,
        ge=3,
        le=300,
        description="Seconds a lease lasts; renewed every third of it. A standby takes over "
        "within about this long after the holder dies.",
    )
    events_concurrency: int = Field(
        default=4, ge=1, le=64, description="Concurrent receives on the events queue."
    )
    http_host: Annotated[str, Spec(metavar="ADDRESS")] = Field(
        default="127.0.0.1", description="Address of /metrics, /healthz, /readyz, /status."
    )
    http_port: int = Field(default=8080, ge=0, le=65_535, description="Port of the same (0: any).")
    log_level: Annotated[LogLevel, BeforeValidator(_upper)] = Field(
        default=LogLevel.INFO, description="Lowest level logged."
    )
    log_format: LogFormat = Field(
        default=LogFormat.AUTO, description="json, console, or auto (console on a terminal)."
    )
    input_format: InputFormat = Field(
        default=InputFormat.JSON,
        description="json: body is the input; envelope: input wraps a plain-text body.",
    )
    task_token_attribute: Annotated[str, Spec(check=True)] = Field(
        default="task-token",
        pattern=r"^[A-Za-z0-9_.-]{1,256}$",
        description="Message attribute carrying a parent workflow's task token: the "
        "dispatcher answers it with the child's result (see "
        "docs/task-tokens.md).",
    )
    heartbeat_interval: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="Seconds between SendTaskHeartbeat calls for every task token held "
        "(waiting in memory, or child running).",
    )
    stop_orphaned_children: Annotated[bool, Spec(check=True)] = Field(
        default=False,
        description="Stop (StopExecution) a child whose parent no longer waits (its token "
        "timed out or its execution ended); false: let it run to its end.",
    )

    @model_validator(mode="after")
    def _key_needs_attribute(self) -> Self:
        """The pool's rule, replaced: `_one_pool_or_a_file` names the settings as given."""
        return self

    @model_validator(mode="after")
    def _one_pool_or_a_file(self, info: ValidationInfo) -> Self:
        """One pool from the settings, or a config file: not both, not neither."""
        named = _namer(_names(info))
        if self.config is not None:
            given = [f for f in POOL_FIELDS if f in self.model_fields_set]
            if given:
                raise ValueError("\n".join(_not_with_a_file(given, named)))
            return self
        missing = [f for f in SINGLE_POOL_NEEDS if getattr(self, f) is None]
        if missing:
            raise ValueError("\n".join(required_line(f) for f in missing))
        if self.per_key_limit is not None and self.key_attribute is None:
            raise ValueError(
                f"{named('per_key_limit')} needs {either('key_attribute')}: the message "
                "attribute that holds the key"
            )
        return self

    @model_validator(mode="after")
    def _floor_below_rate(self, info: ValidationInfo) -> Self:
        named = _namer(_names(info))
        if self.start_rate is not None and self.start_rate_floor > self.start_rate:
            raise ValueError(
                f"{named('start_rate_floor')}={self.start_rate_floor:g} is above "
                f"{named('start_rate')}={self.start_rate:g}: give a floor <= the rate"
            )
        return self

    @model_validator(mode="after")
    def _distinct_queues(self) -> Self:
        urls = [self.request_queue_url, self.events_queue_url, self.dead_letter_queue_url]
        given = [u for u in urls if u]
        if len(set(given)) != len(given):
            raise ValueError(
                "request, events and dead-letter queues must be three different queues "
                f"({either('request_queue_url')}, {either('events_queue_url')}, "
                f"{either('dead_letter_queue_url')})"
            )
        return self

    @property
    def region(self) -> str | None:
        """The state machine's region (used when no AWS region is configured)."""
        match = STATE_MACHINE_ARN_RE.match(self.state_machine_arn or "")
        return match["region"] if match else None

    @classmethod
    def load(
        cls,
        overrides: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        *,
        base: Mapping[str, Any] | None = None,
        base_source: str = "",
    ) -> Settings:
        """Build settings from ``base`` (a config file's ``[dispatcher]`` table), then ``env``
        (default: the process environment), then ``overrides`` (flags): later ones win.

        Raises `ConfigError` with one line per bad setting, naming it as it was given: the
        flag (``--limit``), the variable (``DISPATCHER_LIMIT``) or the file's key.
        """
        return gather(overrides, env, file=base, file_source=base_source).settings()


# --- names derived from a field's name, and what each field declares --------------------------


def env_name(field: str) -> str:
    """The environment variable of a settings field."""
    return ENV_PREFIX + field.upper()


def flag_name(field: str) -> str:
    """The command-line flag of a settings field."""
    return "--" + field.replace("_", "-")


def file_key(field: str) -> str | None:
    """Where a setting goes in the config file (``[dispatcher] reconcile_interval``,
    ``[pools.NAME] limit``, ``[[queues]] url`` for the single pool's request queue); None
    for ``config``, which names the file."""
    where = scope(field)
    if where is Scope.SINGLE_POOL:  # the single pool's queue; a file lists its queues
        return "[[queues]] url"
    table = {
        Scope.PROCESS: "[dispatcher]",
        Scope.POOL: "[pools.NAME]",
        Scope.POOL_FILE: "[pools.NAME]",
    }.get(where)
    return f"{table} {field}" if table else None


def either(field: str) -> str:
    """A setting named both ways, for a message about a value that was not given."""
    return f"{flag_name(field)} / {env_name(field)}"


def _field(name: str) -> FieldInfo:
    """A field of `Settings`, or a file-only one of the pools (``reserved_share``)."""
    if name in Settings.model_fields:
        return Settings.model_fields[name]
    return PoolConfig.model_fields[name]


def spec(field: str) -> Spec:
    """What a field declares besides its type, default and range."""
    return next((m for m in _field(field).metadata if isinstance(m, Spec)), Spec())


def scope(field: str) -> Scope:
    """Where setting ``field`` can be given (see `Scope`)."""
    declared = spec(field).scope
    if declared is not None:
        return declared
    if field in PoolSettings.model_fields:
        return Scope.POOL
    return Scope.PROCESS if field in Settings.model_fields else Scope.POOL_FILE


POOL_FIELDS = tuple(
    name for name in Settings.model_fields if scope(name) in {Scope.POOL, Scope.SINGLE_POOL}
)
"""Settings of the single pool; in a config file they are set per pool instead."""
SINGLE_POOL_NEEDS = tuple(name for name in POOL_FIELDS if spec(name).single_pool_needs)
"""The settings a single pool cannot do without (a config file's pools have them instead)."""
PROCESS_FIELDS = tuple(name for name in Settings.model_fields if scope(name) is Scope.PROCESS)
"""Settings of the process: the keys of a config file's ``[dispatcher]`` table."""
LIVE_FIELDS = frozenset(name for name in PROCESS_FIELDS if spec(name).live)
"""Process settings a config reload applies (the others need a restart, and say so)."""
POOL_STRUCTURE = tuple(name for name in PoolSettings.model_fields if not spec(name).live)
"""Pool settings a reload cannot change (routing, counting and limit source hang on them)."""
_ORDER = {Scope.FILE: 0, Scope.POOL: 1, Scope.SINGLE_POOL: 1, Scope.PROCESS: 2, Scope.POOL_FILE: 3}


def ordered(fields: Iterable[str]) -> tuple[str, ...]:
    """Fields in the order of ``--help``: the config file, the single pool's, the process's."""
    fields = list(fields)
    return tuple(sorted(fields, key=lambda n: (_ORDER[scope(n)], fields.index(n))))


CHECK_FIELDS = ordered(name for name in Settings.model_fields if spec(name).check)
"""The settings ``check`` takes as flags: those that name what it checks (resources, the
config file) or change a verdict. The others are still read from their variables and the
config file and validated as ``run`` does."""


# --- where values come from ---------------------------------------------------------------------

PRECEDENCE = ("flag", "variable", "config file", "default")
"""Where a setting's value comes from, the first that gives it wins (`gather` merges so):
a flag, its ``DISPATCHER_*`` variable, its key in the config file's ``[dispatcher]`` table,
the field's default. A reload of the file keeps it."""

STATUS_URL_VARIABLE = ENV_PREFIX + "STATUS_URL"
"""Where `status` and `drain --url` find a running dispatcher: not a setting of `run`."""
OTHER_VARIABLES = frozenset(
    {
        STATUS_URL_VARIABLE,
        ENV_PREFIX + "SANDBOX_EMULATOR",  # the sandbox's emulator command
    }
)
"""``DISPATCHER_*`` variables that are not settings of `run` but are read elsewhere."""

RETIRED = MappingProxyType(
    {
        "start_client": "StartExecution always goes through the AWS SDK's client now "
        "(one attempt, deadline DISPATCHER_START_TIMEOUT)",
    }
)
"""Removed settings still accepted as flag, variable or config-file key, ignored with a
warning (`Given.ignored`), so that a rolling upgrade does not fail on them."""


class _Sourced(BaseSettings, Settings):
    """`Settings` as pydantic-settings' sources read it: ``DISPATCHER_`` and the field's name,
    in any case. Never built (see `Settings`)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, case_sensitive=False, extra="ignore", frozen=True
    )


class _EnvSource(EnvSettingsSource):
    """pydantic-settings' variables source over a given mapping (tests, `check`) instead of
    the process environment."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._given_env = env
        super().__init__(_Sourced)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k.lower(): v for k, v in self._given_env.items()}


@dataclass(frozen=True)
class Given:
    """The settings as given, before validation: each one's value from the source that wins
    (`PRECEDENCE`) and the name the user gave it there."""

    values: Mapping[str, Any]
    names: Mapping[str, str]  # field -> "--limit", "DISPATCHER_LIMIT", "config file f: ..."
    unknown: tuple[str, ...]  # one line per DISPATCHER_* variable that names nothing
    ignored: tuple[str, ...] = ()  # one line per removed setting still given (`RETIRED`)

    def name(self, field: str) -> str:
        """How the user named ``field``; its variable when it was not given."""
        return self.names.get(field) or env_name(field)

    def settings(self) -> Settings:
        """The validated settings; `ConfigError` with one line per problem."""
        try:
            settings = Settings.model_validate(dict(self.values), context={"names": self.names})
        except ValidationError as exc:
            raise ConfigError(*self.unknown, *_describe(exc, self.values, self.names)) from None
        if self.unknown:
            raise ConfigError(*self.unknown)
        return settings

    def alone(self, field: str) -> tuple[Any, str | None]:
        """Setting ``field`` validated on its own: (value, None), or (None, the problem).
        Its default when it was not given."""
        if field not in self.values:
            info = _field(field)
            return (None if info.is_required() else info.default), None
        raw = self.values[field]
        try:
            return _adapter(field).validate_python(raw), None
        except ValidationError as exc:
            err = exc.errors()[0]
            msg = err["msg"].removeprefix("Value error, ")
            return None, f"{self.name(field)}={err.get('input', raw)!r} is invalid: {msg}"


@cache
def _adapter(field: str) -> TypeAdapter[Any]:
    return TypeAdapter(_field(field).rebuild_annotation())


def gather(
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    file: Mapping[str, Any] | None = None,
    file_source: str = "",
) -> Given:
    """The settings given by ``overrides`` (flags; None values are not given), ``env``
    (default: the process environment) and ``file`` (a config file's ``[dispatcher]``
    table, from ``file_source``), merged by `PRECEDENCE`."""
    environ = os.environ if env is None else env
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    sources: dict[str, tuple[PydanticBaseSettingsSource, Callable[[str], str]]] = {
        "flag": (InitSettingsSource(_Sourced, flags), flag_name),
        "variable": (_EnvSource(environ), env_name),
        "config file": (InitSettingsSource(_Sourced, dict(file or {})), _in_file(file_source)),
    }
    values: dict[str, Any] = {}
    names: dict[str, str] = {}
    for kind in reversed(PRECEDENCE[:-1]):  # the lowest first: a higher one overwrites it
        source, named = sources[kind]
        for field, value in source().items():
            if field in Settings.model_fields:
                values[field] = value
                names[field] = named(field)
    variables = {k.upper() for k in environ}
    ignored = tuple(
        f"{name} is no longer a setting and is ignored: {why}"
        for key, why in RETIRED.items()
        for name, given in (
            (_in_file(file_source)(key), key in (file or {})),
            (env_name(key), env_name(key) in variables),
            (flag_name(key), key in flags),
        )
        if given
    )
    return Given(values, names, tuple(unknown_variables(environ)), ignored)


def _in_file(source: str) -> Callable[[str], str]:
    return lambda field: f"config file {source}: [dispatcher] {field}"


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """One line per ``DISPATCHER_*`` variable that names nothing (a typo would otherwise
    leave the setting at its default, silently), with the closest setting's name."""
    known = {env_name(k) for k in Settings.model_fields} | OTHER_VARIABLES
    retired = {env_name(k) for k in RETIRED}
    problems = []
    for name in sorted(k for k in env if k.upper().startswith(ENV_PREFIX)):
        if name.upper() in known or name.upper() in retired:
            continue
        problems.append(f"{name} is not a setting: {did_you_mean(name.upper(), known)}")
    return problems


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """The hint for an unknown name: the closest known one, else where to look."""
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f"did you mean {close[0]}?" if close else "see `sfn-dispatcher run --help`"


# --- messages ---------------------------------------------------------------------------------


def required_line(field: str) -> str:
    """The line for a missing setting of the single pool."""
    return (
        f"{either(field)} is required (or {either('config')} with [pools]): "
        f"{Settings.model_fields[field].description}"
    )


def _namer(names: Mapping[str, str]) -> Callable[[str], str]:
    """How to name a field in a message: as it was given, else by its variable."""
    return lambda field: names.get(field, env_name(field))


def _not_with_a_file(fields: Iterable[str], named: Callable[[str], str]) -> list[str]:
    """The lines for single-pool settings given next to a config file."""
    return [
        f"{named(f)} cannot be combined with {named('config')}: set {f} per pool in the "
        "config file's [pools.NAME] tables"
        for f in fields
    ]


def _describe(
    exc: ValidationError, values: Mapping[str, Any], names: Mapping[str, str]
) -> list[str]:
    lines = [  # without a file, the single pool's two required settings, named up front
        required_line(field)
        for field in SINGLE_POOL_NEEDS
        if not values.get("config") and not values.get(field)
    ]
    if values.get("config"):  # also when another setting is invalid (no model validation)
        given = [f for f in POOL_FIELDS if values.get(f) is not None]
        lines += _not_with_a_file(given, _namer(names))
    errors = sorted(exc.errors(), key=lambda err: err["type"] != "missing")  # missing first
    for err in errors:
        field = str(err["loc"][0]) if err["loc"] else ""
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            lines.append(f"{either(field)} is required: {Settings.model_fields[field].description}")
        elif field:
            lines.append(f"{_namer(names)(field)}={err.get('input')!r} is invalid: {msg}")
        else:
            lines += [line for line in msg.splitlines() if line not in lines]
    return lines


# --- flags --------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, fields: Iterable[str] | None = None) -> None:
    """Add one ``--flag`` per setting (or per setting of ``fields``); each defaults to its
    ``DISPATCHER_*`` variable, and its help shows the accepted values and the default."""
    group = parser.add_argument_group(
        "settings",
        "each flag can also be given as the DISPATCHER_* variable shown (flags win), or, except "
        "for the single-pool ones, in the config file's [dispatcher] table",
    )
    for name in ordered(Settings.model_fields if fields is None else fields):
        group.add_argument(
            flag_name(name),
            dest=name,
            default=None,
            metavar=metavar(name),
            help=f"{_field(name).description} [{env_name(name)}; {_bounds(name)}{_default(name)}]",
        )
    if fields is None:  # accepted and ignored, with a warning (RETIRED)
        for name in RETIRED:
            group.add_argument(flag_name(name), dest=name, default=None, help=argparse.SUPPRESS)


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags (flags win over environment variables)."""
    return {
        name: getattr(args, name)
        for name in (*Settings.model_fields, *RETIRED)
        if getattr(args, name, None) is not None
    }


def metavar(name: str) -> str:
    """What a setting takes: the choices of an enum or a switch, else the kind of value."""
    declared = spec(name).metavar
    if declared:
        return declared
    annotation = _field(name).annotation
    kinds = getattr(annotation, "__args__", None) or (annotation,)
    for kind in kinds:
        if isinstance(kind, type) and issubclass(kind, StrEnum):
            return "{" + ",".join(member.value for member in kind) + "}"
        if kind is bool:
            return "{true,false}"
    if int in kinds:
        return "N"
    if float in kinds:
        return "SECONDS"
    return "NAME"


def _bounds(name: str) -> str:
    """The accepted range of a number, as ``--help`` shows it (``0..20; ``), or nothing."""
    text = accepted_range(name)
    return f"{text}; " if text else ""


def accepted_range(name: str) -> str:
    """The accepted range of a number (``0..20``, ``>= 1``, ``> 0, <= 60``), or ``""``."""
    low = high = ""
    for rule in _field(name).metadata:
        for attr, sign in (("ge", ">="), ("gt", ">")):
            if getattr(rule, attr, None) is not None:
                low = f"{sign} {getattr(rule, attr):g}" if attr == "gt" else f"{rule.ge:g}"
        for attr in ("le", "lt"):
            if getattr(rule, attr, None) is not None:
                high = f"{getattr(rule, attr):g}"
    if low and high:
        return f"{low}, <= {high}" if low.startswith(">") else f"{low}..{high}"
    if low:
        return low if low.startswith(">") else f">= {low}"
    return f"<= {high}" if high else ""


_KINDS = {
    "N": "a whole number",
    "SECONDS": "seconds",
    "PER_SECOND": "starts per second",
    "FRACTION": "a fraction",
    "FILE": "a file path",
    "ARN": "a state machine ARN",
    "URL": "an SQS queue URL",
    "ADDRESS": "a host address",
    "NAME": "a name",
    "WEIGHTS": "a table of NAME = weight (a whole number >= 1)",
}


def accepted(name: str) -> str:
    """What a setting accepts, in words: ``seconds > 0``, ``a whole number 0..20``, ``one
    of json, envelope``, ``an SQS queue URL``."""
    kind = metavar(name)
    if kind == "{true,false}":
        return "true or false"
    if kind.startswith("{"):
        return "one of " + kind.strip("{}").replace(",", ", ")
    return f"{_KINDS[kind]} {accepted_range(name)}".strip()


def _default(name: str) -> str:
    """The default shown in ``--help``."""
    if name in SINGLE_POOL_NEEDS:
        return "required without --config"
    if _field(name).is_required():
        return "required"
    return f"default: {default_text(name)}"


def default_value(name: str) -> str | None:
    """A setting's default as a user would type it; None when it has none (unset, or
    required)."""
    return (
        None if _field(name).is_required() or _field(name).default is None else (default_text(name))
    )


def default_text(name: str) -> str:
    """A setting's default as a user would type it (``unset`` when it has none)."""
    value = _field(name).default
    if value is None or _field(name).default_factory is not None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, StrEnum):
        return value.value
    return f"{value:g}" if isinstance(value, float) else str(value)


# --- the table a reference is generated from -----------------------------------------------


@dataclass(frozen=True)
class SettingInfo:
    """One setting as the docs show it: every name it has and what it accepts."""

    name: str  # the field name
    variable: str | None  # DISPATCHER_LIMIT; None for a setting of the config file only
    flag: str | None  # --limit (of `run`; `check` takes those with ``check``)
    file_key: str | None  # "[dispatcher] reconcile_interval", "[pools.NAME] limit", or None
    scope: Scope
    metavar: str  # N, SECONDS, URL, {json,envelope}, ...
    range: str  # the range of a number ("0..20", "> 0"), else ""
    accepted: str  # in words: "seconds > 0", "one of json, envelope", "an SQS queue URL"
    default: str | None  # as typed ("10", "false", "task-token"); None: unset or required
    required: bool  # must be given (events_queue_url)
    required_without_file: bool  # must be given unless a config file names the pools
    description: str
    check: bool  # also a flag of `check`
    live: bool  # applied by a config reload (SIGHUP); the others need a restart


def _info(name: str) -> SettingInfo:
    in_file_only = scope(name) is Scope.POOL_FILE
    return SettingInfo(
        name=name,
        variable=None if in_file_only else env_name(name),
        flag=None if in_file_only else flag_name(name),
        file_key=file_key(name),
        scope=scope(name),
        metavar=metavar(name),
        range=accepted_range(name),
        accepted=accepted(name),
        default=default_value(name),
        required=_field(name).is_required(),
        required_without_file=name in SINGLE_POOL_NEEDS,
        description=_field(name).description or "",
        check=spec(name).check,
        live=spec(name).live,
    )


def settings_table() -> tuple[SettingInfo, ...]:
    """Every setting, in ``--help`` order: those of `Settings`, then the pools' file-only
    ones (``reserved_share``)."""
    file_only = [n for n in PoolConfig.model_fields if n not in {"name", *Settings.model_fields}]
    return tuple(_info(name) for name in (*ordered(Settings.model_fields), *file_only))


SETTINGS_TABLE = settings_table()
"""Every setting with its variable, flag, config-file key, range, default and description:
what a reference of the settings is generated from."""
