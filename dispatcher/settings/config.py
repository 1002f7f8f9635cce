"""Settings: read once at start-up from ``DISPATCHER_*`` variables and CLI flags, then frozen.

AWS endpoint, region and credentials are *not* settings of ours: the standard ``AWS_*``
variables (``AWS_ENDPOINT_URL`` included) are read by botocore as usual.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any, Self

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from dispatcher.errors import UserError

ENV_PREFIX = "DISPATCHER_"

STATE_MACHINE_ARN_RE = re.compile(
    r"^arn:aws[a-z-]*:states:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):stateMachine:"
    r"(?P<name>[A-Za-z0-9_-]{1,80})\Z"
)
QUEUE_URL_RE = re.compile(r"^https?://[^\s/]+(/[^\s/]+)*/[^\s/]+\Z")


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


class StartClient(StrEnum):
    """The client StartExecution goes through."""

    THIN = "thin"  # dispatcher.aws.startclient: botocore's signer, aiohttp, no SDK pipeline
    BOTOCORE = "botocore"  # an aiobotocore Step Functions client


class Settings(BaseSettings):
    """Every setting of ``sfn-dispatcher run``; field ``x`` is ``DISPATCHER_X`` / ``--x``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="ignore", case_sensitive=False
    )

    config: Path | None = Field(
        default=None,
        description="TOML file with several pools, queues and priorities (see "
        "docs/pools.md); unset: one pool from the settings below. SIGHUP "
        "reloads it.",
    )
    state_machine_arn: str | None = Field(
        default=None,
        description="ARN of the STANDARD state machine whose executions are limited "
        "(required without a config file).",
    )
    request_queue_url: str | None = Field(
        default=None,
        description="SQS queue the requests arrive on (required without a config file).",
    )
    events_queue_url: str = Field(
        description="SQS queue the EventBridge rule sends Execution Status Change events to."
    )
    dead_letter_queue_url: str | None = Field(
        default=None,
        description="Where bad requests go with the reason attached; unset: left to the "
        "request queue's redrive policy (reason only in logs and metrics).",
    )
    limit: int = Field(
        default=10, ge=0, description="Most executions running at once (0 pauses starts)."
    )
    limit_parameter: str | None = Field(
        default=None,
        description="SSM parameter holding the limit, re-read every limit_refresh_interval "
        "(wins over DISPATCHER_LIMIT once read; an invalid value is refused, the old limit kept).",
    )
    limit_refresh_interval: float = Field(
        default=30.0, gt=0, description="Seconds between reads of the limit parameters."
    )
    key_attribute: str | None = Field(
        default=None,
        description="Message attribute holding a request's concurrency key (e.g. a tenant id); "
        "requests are served round-robin by key.",
    )
    per_key_limit: int | None = Field(
        default=None,
        ge=1,
        description="Most executions of one key running at once (needs key_attribute).",
    )
    max_waiting: int = Field(
        default=100,
        ge=0,
        le=100_000,
        description="Requests a pool holds in memory (visibility extended) while their key is at "
        "its limit or higher priorities go first; beyond it they go back to the queue for later.",
    )
    start_rate: float | None = Field(
        default=None,
        gt=0,
        description="StartExecution calls per second per account and region (unset: the "
        "Standard quota, 300/s in us-east-1, us-west-2, eu-west-1, else 150/s).",
    )
    start_burst: int | None = Field(
        default=None,
        ge=1,
        description="Token bucket size for StartExecution (unset: 1300 or 800, as the quota).",
    )
    start_rate_floor: float = Field(
        default=1.0,
        gt=0,
        description="Lowest rate the adaptive back-off falls to when AWS throttles starts.",
    )
    reconcile_interval: float = Field(
        default=30.0, gt=0, description="Seconds between ListExecutions reconciles."
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
    visibility_timeout: int = Field(
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
    start_client: StartClient = Field(
        default=StartClient.THIN,
        description="StartExecution client: thin (SigV4 over one aiohttp session, less CPU "
        "per start) or botocore (the SDK client).",
    )
    receive_wait_seconds: int = Field(
        default=20, ge=0, le=20, description="SQS long-poll wait per receive."
    )
    receive_concurrency: int = Field(
        default=4, ge=1, le=64, description="Concurrent receives on the request queue."
    )
    lease_table: str | None = Field(
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
    http_host: str = Field(
        default="127.0.0.1", description="Address of /metrics, /healthz, /readyz, /status."
    )
    http_port: int = Field(default=8080, ge=0, le=65_535, description="Port of the same (0: any).")
    log_level: LogLevel = Field(default=LogLevel.INFO, description="Lowest level logged.")
    log_format: LogFormat = Field(
        default=LogFormat.AUTO, description="json, console, or auto (console on a terminal)."
    )
    input_format: InputFormat = Field(
        default=InputFormat.JSON,
        description="json: body is the input; envelope: input wraps a plain-text body.",
    )
    task_token_attribute: str = Field(
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
    stop_orphaned_children: bool = Field(
        default=False,
        description="Stop (StopExecution) a child whose parent no longer waits (its token "
        "timed out or its execution ended); false: let it run to its end.",
    )

    @field_validator("state_machine_arn")
    @classmethod
    def _check_arn(cls, value: str | None) -> str | None:
        if value is not None and not STATE_MACHINE_ARN_RE.match(value):
            raise ValueError("must look like arn:aws:states:REGION:ACCOUNT:stateMachine:NAME")
        return value

    @field_validator("request_queue_url", "events_queue_url", "dead_letter_queue_url")
    @classmethod
    def _check_queue_url(cls, value: str | None) -> str | None:
        if value is not None and not QUEUE_URL_RE.match(value):
            raise ValueError(
                "must be an SQS queue URL like https://sqs.REGION.amazonaws.com/ACCOUNT/NAME"
            )
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_pool_or_a_file(self) -> Self:
        named = _named
        if self.config is not None:
            given = [f for f in POOL_FIELDS if f in self.model_fields_set]
            if given:
                raise ValueError("\n".join(_not_with_a_file(given, named)))
            return self
        missing = [
            f for f in ("state_machine_arn", "request_queue_url") if getattr(self, f) is None
        ]
        if missing:
            raise ValueError("\n".join(required_line(f) for f in missing))
        if self.per_key_limit is not None and self.key_attribute is None:
            raise ValueError(
                f"{named('per_key_limit')} needs {either('key_attribute')}: the message "
                "attribute that holds the key"
            )
        return self

    @model_validator(mode="after")
    def _floor_below_rate(self) -> Self:
        named = _named
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
        kwargs = {k: v for k, v in (overrides or {}).items() if v is not None}
        scoped = scoped_env(os.environ if env is None else env)
        values = {**(base or {}), **scoped, **kwargs}
        names = given_names(kwargs, env, base=base, base_source=base_source)
        unknown = unknown_variables(os.environ if env is None else env)
        token = _GIVEN_NAMES.set(names)
        try:
            settings = _Given.model_validate(values)
        except ValidationError as exc:
            raise ConfigError(*unknown, *_describe(exc, values, names)) from None
        finally:
            _GIVEN_NAMES.reset(token)
        if unknown:
            raise ConfigError(*unknown)
        return settings


# DISPATCHER_* variables that are not settings of `run` but are read elsewhere.
OTHER_VARIABLES = frozenset(
    {
        "DISPATCHER_CONFIG",  # the config file (layout.load)
        "DISPATCHER_STATUS_URL",  # `status`, `drain --url`
        "DISPATCHER_SANDBOX_EMULATOR",  # the sandbox's emulator command
    }
)


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """One line per ``DISPATCHER_*`` variable that names nothing (a typo would otherwise
    leave the setting at its default, silently), with the closest setting's name."""
    known = {env_name(k) for k in Settings.model_fields} | OTHER_VARIABLES
    problems = []
    for name in sorted(k for k in env if k.upper().startswith(ENV_PREFIX)):
        if name.upper() in known:
            continue
        close = difflib.get_close_matches(name.upper(), sorted(known), n=1)
        hint = f"did you mean {close[0]}?" if close else "see `sfn-dispatcher run --help`"
        problems.append(f"{name} is not a setting: {hint}")
    return problems


def given_names(
    overrides: Mapping[str, Any] | None,
    env: Mapping[str, str] | None,
    *,
    base: Mapping[str, Any] | None = None,
    base_source: str = "",
) -> dict[str, str]:
    """How each given setting was named by the user, the source that wins last: the flag
    (``--limit``), the variable (``DISPATCHER_LIMIT``) or the file's ``[dispatcher]`` key."""
    scoped = scoped_env(os.environ if env is None else env)
    names = {k: f"config file {base_source}: [dispatcher] {k}" for k in base or {}}
    names |= {k: env_name(k) for k in scoped}
    return names | {k: flag_name(k) for k, v in (overrides or {}).items() if v is not None}


def scoped_env(env: Mapping[str, str]) -> dict[str, str]:
    """The ``DISPATCHER_*`` variables that name settings, keyed by field name."""
    scoped = {
        k[len(ENV_PREFIX) :].lower(): v for k, v in env.items() if k.upper().startswith(ENV_PREFIX)
    }
    return {k: v for k, v in scoped.items() if k in Settings.model_fields}


class _Given(Settings):
    """Settings from the values given to `Settings.load` only (no process environment)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


POOL_FIELDS = (
    "state_machine_arn",
    "request_queue_url",
    "limit",
    "limit_parameter",
    "key_attribute",
    "per_key_limit",
    "max_waiting",
)
"""Settings of the single pool; in a config file they are set per pool instead."""


def env_name(field: str) -> str:
    """The environment variable of a settings field."""
    return ENV_PREFIX + field.upper()


def flag_name(field: str) -> str:
    """The command-line flag of a settings field."""
    return "--" + field.replace("_", "-")


def either(field: str) -> str:
    """A setting named both ways, for a message about a value that was not given."""
    return f"{flag_name(field)} / {env_name(field)}"


def required_line(field: str) -> str:
    """The line for a missing setting of the single pool."""
    return (
        f"{either(field)} is required (or {either('config')} with [pools]): "
        f"{Settings.model_fields[field].description}"
    )


_GIVEN_NAMES: ContextVar[Mapping[str, str]] = ContextVar(
    "given_names", default=MappingProxyType({})
)
"""How `Settings.load`'s caller named each given setting, for the cross-field validators.
(Not pydantic's validation context: pydantic-settings validates without it.)"""


def _named(field: str) -> str:
    """How to name a field in a message: as it was given (see `Settings.load`)."""
    return _GIVEN_NAMES.get().get(field, env_name(field))


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
        for field in ("state_machine_arn", "request_queue_url")
        if not values.get("config") and not values.get(field)
    ]
    if values.get("config"):  # also when another setting is invalid (no model validation)
        given = [f for f in POOL_FIELDS if values.get(f) is not None]
        lines += _not_with_a_file(given, lambda f: names.get(f, env_name(f)))
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else ""
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            lines.append(f"{either(field)} is required: {Settings.model_fields[field].description}")
        elif field:
            named = names.get(field, env_name(field))
            lines.append(f"{named}={err.get('input')!r} is invalid: {msg}")
        else:
            lines += [line for line in msg.splitlines() if line not in lines]
    return lines


def add_arguments(parser: argparse.ArgumentParser, fields: Iterable[str] | None = None) -> None:
    """Add one ``--flag`` per setting (or per setting of ``fields``); each defaults to its
    ``DISPATCHER_*`` variable, and its help shows the accepted values and the default."""
    group = parser.add_argument_group(
        "settings",
        "each flag can also be given as the DISPATCHER_* variable shown (flags win), or, except "
        "for the single-pool ones, in the config file's [dispatcher] table",
    )
    for name in Settings.model_fields if fields is None else fields:
        field = Settings.model_fields[name]
        group.add_argument(
            flag_name(name),
            dest=name,
            default=None,
            metavar=_metavar(name),
            help=f"{field.description} [{env_name(name)}; {_bounds(name)}{_default(name)}]",
        )


def _metavar(name: str) -> str:
    """What a flag takes: the choices of an enum or a switch, else the kind of value."""
    annotation = Settings.model_fields[name].annotation
    kinds = getattr(annotation, "__args__", None) or (annotation,)
    for kind in kinds:
        if isinstance(kind, type) and issubclass(kind, StrEnum):
            return "{" + ",".join(member.value for member in kind) + "}"
        if kind is bool:
            return "{true,false}"
    if int in kinds:
        return "N"
    if float in kinds:
        return "PER_SECOND" if name in {"start_rate", "start_rate_floor"} else "SECONDS"
    if name.endswith("_url"):
        return "URL"
    return {"config": "FILE", "state_machine_arn": "ARN", "http_host": "ADDRESS"}.get(name, "NAME")


def _bounds(name: str) -> str:
    """The accepted range of a number, as ``--help`` shows it (``0..20; ``), or nothing."""
    low = high = ""
    for rule in Settings.model_fields[name].metadata:
        for attr, sign in (("ge", ">="), ("gt", ">")):
            if getattr(rule, attr, None) is not None:
                low = f"{sign} {getattr(rule, attr):g}" if attr == "gt" else f"{rule.ge:g}"
        for attr in ("le", "lt"):
            if getattr(rule, attr, None) is not None:
                high = f"{getattr(rule, attr):g}"
    if low and high:
        return f"{low}, <= {high}; " if low.startswith(">") else f"{low}..{high}; "
    if low:
        return (low if low.startswith(">") else f">= {low}") + "; "
    return f"<= {high}; " if high else ""


def _default(name: str) -> str:
    """The default shown in ``--help``."""
    field = Settings.model_fields[name]
    if name in {"state_machine_arn", "request_queue_url"}:
        return "required without --config"
    if field.is_required():
        return "required"
    return f"default: {_shown(field.default)}"


def _shown(value: Any) -> str:
    """A default as a user would type it."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, StrEnum):
        return value.value
    return f"{value:g}" if isinstance(value, float) else str(value)


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags (flags win over environment variables)."""
    return {
        name: getattr(args, name)
        for name in Settings.model_fields
        if getattr(args, name, None) is not None
    }
