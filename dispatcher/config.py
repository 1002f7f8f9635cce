"""Settings: read once at start-up from ``DISPATCHER_*`` variables and CLI flags, then frozen.

AWS endpoint, region and credentials are *not* settings of ours: the standard ``AWS_*``
variables (``AWS_ENDPOINT_URL`` included) are read by botocore as usual.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from enum import StrEnum
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

    state_machine_arn: str = Field(
        description="ARN of the STANDARD state machine whose executions are limited."
    )
    request_queue_url: str = Field(description="SQS queue the requests arrive on.")
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

    @field_validator("state_machine_arn")
    @classmethod
    def _check_arn(cls, value: str) -> str:
        if not STATE_MACHINE_ARN_RE.match(value):
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
    def _distinct_queues(self) -> Self:
        urls = [self.request_queue_url, self.events_queue_url, self.dead_letter_queue_url]
        given = [u for u in urls if u]
        if len(set(given)) != len(given):
            raise ValueError(
                "request, events and dead-letter queues must be three different queues"
            )
        return self

    @property
    def region(self) -> str:
        """The state machine's region (used when no AWS region is configured)."""
        match = STATE_MACHINE_ARN_RE.match(self.state_machine_arn)
        assert match is not None  # validated  # noqa: S101
        return match["region"]

    @classmethod
    def load(
        cls, overrides: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
    ) -> Settings:
        """Build settings from ``env`` (default: the process environment) and ``overrides``.

        Raises `ConfigError` with one line per bad setting, naming the variable.
        """
        kwargs = {k: v for k, v in (overrides or {}).items() if v is not None}
        try:
            if env is None:
                return cls(**kwargs)
            scoped = {
                k[len(ENV_PREFIX) :].lower(): v
                for k, v in env.items()
                if k.upper().startswith(ENV_PREFIX)
            }
            scoped = {k: v for k, v in scoped.items() if k in cls.model_fields}
            return _Given.model_validate({**scoped, **kwargs})
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None


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


def env_name(field: str) -> str:
    """The environment variable of a settings field."""
    return ENV_PREFIX + field.upper()


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else ""
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            lines.append(
                f"{env_name(field)} is required: {Settings.model_fields[field].description}"
            )
        elif field:
            lines.append(f"{env_name(field)}={err.get('input')!r} is invalid: {msg}")
        else:
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
