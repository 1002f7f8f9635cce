"""Settings: read once at start-up from ``DISPATCHER_*`` variables and CLI flags, then frozen.

AWS endpoint, region and credentials are *not* settings of ours: the standard ``AWS_*``
variables (``AWS_ENDPOINT_URL`` included) are read by botocore as usual.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from enum import StrEnum
from pathlib import Path
from typing import Any, Self

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "DISPATCHER_"

STATE_MACHINE_ARN_RE = re.compile(
    r"^arn:aws[a-z-]*:states:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):stateMachine:"
    r"(?P<name>[A-Za-z0-9_-]{1,80})\Z"
)
QUEUE_URL_RE = re.compile(r"^https?://[^\s/]+(/[^\s/]+)*/[^\s/]+\Z")


class ConfigError(Exception):
    """A setting is missing or invalid; the message names it and what is accepted."""


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
    ENVELOPE = "envelope"  # {"body": <text>, "messageId": ..., "attributes": {...}}


class Settings(BaseSettings):
    """Every setting of ``sfn-dispatcher run``; field ``x`` is ``DISPATCHER_X`` / ``--x``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="ignore", case_sensitive=False
    )

    config: Path | None = Field(
        default=None,
        description="TOML file with several pools, queues and priorities (see 'Config file'); "
        "unset: one pool from the variables below. SIGHUP reloads it.",
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
    receive_wait_seconds: int = Field(
        default=20, ge=0, le=20, description="SQS long-poll wait per receive."
    )
    receive_concurrency: int = Field(
        default=2, ge=1, le=64, description="Concurrent receives on the request queue."
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
        "dispatcher answers it with the child's result (see 'From inside a workflow').",
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
        if self.config is not None:
            given = [f for f in POOL_FIELDS if f in self.model_fields_set]
            if given:
                names = ", ".join(env_name(f) for f in given)
                raise ValueError(
                    f"{names} cannot be combined with {env_name('config')}: set them per pool "
                    "in the config file's [pools.NAME] tables"
                )
            return self
        missing = [
            f for f in ("state_machine_arn", "request_queue_url") if getattr(self, f) is None
        ]
        if missing:
            raise ValueError(
                "; ".join(
                    f"{env_name(f)} is required (or {env_name('config')} with [pools]): "
                    f"{type(self).model_fields[f].description}"
                    for f in missing
                )
            )
        if self.per_key_limit is not None and self.key_attribute is None:
            raise ValueError(
                f"{env_name('per_key_limit')} needs {env_name('key_attribute')}: the message "
                "attribute that holds the key"
            )
        return self

    @model_validator(mode="after")
    def _floor_below_rate(self) -> Self:
        if self.start_rate is not None and self.start_rate_floor > self.start_rate:
            raise ValueError(
                f"{env_name('start_rate_floor')}={self.start_rate_floor} is above "
                f"{env_name('start_rate')}={self.start_rate}: the floor must be <= the rate"
            )
        return self

    @model_validator(mode="after")
    def _distinct_queues(self) -> Self:
        urls = [self.request_queue_url, self.events_queue_url, self.dead_letter_queue_url]
        given = [u for u in urls if u]
        if len(set(given)) != len(given):
            raise ValueError(
                "request, events and dead-letter queues must be three different queues"
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

        Raises `ConfigError` with one line per bad setting, naming the variable (or the file).
        """
        kwargs = {k: v for k, v in (overrides or {}).items() if v is not None}
        scoped = scoped_env(os.environ if env is None else env)
        values = {**(base or {}), **scoped, **kwargs}
        from_file = {k for k in (base or {}) if k not in scoped and k not in kwargs}
        try:
            return _Given.model_validate(values)
        except ValidationError as exc:
            raise ConfigError(_describe(exc, values, from_file, base_source)) from None


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


def _describe(
    exc: ValidationError, values: Mapping[str, Any], from_file: AbstractSet[str], source: str
) -> str:
    lines = [  # without a file, the single pool's two required settings, named up front
        f"{env_name(field)} is required (or {env_name('config')} with [pools]): "
        f"{Settings.model_fields[field].description}"
        for field in ("state_machine_arn", "request_queue_url")
        if not values.get("config") and not values.get(field)
    ]
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else ""
        msg = err["msg"].removeprefix("Value error, ")
        named = f"{source} [dispatcher] {field}" if field in from_file else env_name(field)
        if err["type"] == "missing":
            lines.append(f"{named} is required: {Settings.model_fields[field].description}")
        elif field:
            lines.append(f"{named}={err.get('input')!r} is invalid: {msg}")
        elif msg not in lines and not any(line.startswith(msg[:40]) for line in lines):
            lines.append(msg)
    return "; ".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--flag`` per setting; each defaults to its ``DISPATCHER_*`` variable."""
    for name, field in Settings.model_fields.items():
        default = "required" if field.is_required() else f"default {field.default!s}"
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=None,
            metavar="VALUE",
            help=f"{field.description} [{env_name(name)}, {default}]",
        )


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags (flags win over environment variables)."""
    return {
        name: getattr(args, name)
        for name in Settings.model_fields
        if getattr(args, name, None) is not None
    }
