"""The layout: which pools exist, which queues feed them, with what limits and priorities.

Without a config file the layout is one pool named ``default`` fed by one queue, built
from the ``DISPATCHER_*`` variables. With ``DISPATCHER_CONFIG`` it comes from a TOML file:
``[dispatcher]`` holds the process-wide settings (the variables still win over it),
``[pools.NAME]`` one table per pool, ``[[queues]]`` one entry per request queue. Every
mistake is reported with where it is in the file and what is accepted.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dispatcher.core.shared_limits import LIMIT_NAME_RE, MAX_WEIGHT, SharedLimitConfig
from dispatcher.settings.config import (
    ENV_PREFIX,
    POOL_FIELDS,
    QUEUE_URL_RE,
    STATE_MACHINE_ARN_RE,
    ConfigError,
    Settings,
)

DEFAULT_POOL = "default"
POOL_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
ATTRIBUTE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,256}\Z")  # SQS message attribute names


class PoolConfig(BaseModel):
    """One governed state machine: ``[pools.NAME]``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(
        description="The pool's name: the `NAME` of its table, the metrics' pool label."
    )
    state_machine_arn: str = Field(
        description="ARN of the STANDARD state machine whose executions are limited."
    )
    limit: int = Field(default=10, ge=0, description=Settings.model_fields["limit"].description)
    limit_parameter: str | None = Field(
        default=None, description=Settings.model_fields["limit_parameter"].description
    )
    key_attribute: str | None = Field(
        default=None, description=Settings.model_fields["key_attribute"].description
    )
    per_key_limit: int | None = Field(
        default=None, ge=1, description=Settings.model_fields["per_key_limit"].description
    )
    max_waiting: int = Field(
        default=100, ge=0, le=100_000, description=Settings.model_fields["max_waiting"].description
    )
    reserved_share: float = Field(
        default=0.1,
        ge=0.0,
        le=0.9,
        description="Share of the starts kept for lower priorities while higher ones wait.",
    )
    uses: dict[str, int] = Field(
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

    @field_validator("state_machine_arn")
    @classmethod
    def _check_arn(cls, value: str) -> str:
        if not STATE_MACHINE_ARN_RE.match(value):
            raise ValueError("must look like arn:aws:states:REGION:ACCOUNT:stateMachine:NAME")
        return value

    @field_validator("key_attribute")
    @classmethod
    def _check_attribute(cls, value: str | None) -> str | None:
        if value is not None and not ATTRIBUTE_RE.match(value):
            raise ValueError("must be an SQS message attribute name (A-Z a-z 0-9 _ - .)")
        return value

    @model_validator(mode="after")
    def _key_needs_attribute(self) -> Self:
        if self.per_key_limit is not None and self.key_attribute is None:
            raise ValueError("per_key_limit needs key_attribute (the attribute holding the key)")
        return self

    @property
    def region(self) -> str:
        """The region of the pool's state machine."""
        return _arn_part(self.state_machine_arn, "region")

    @property
    def account(self) -> str:
        """The account of the pool's state machine."""
        return _arn_part(self.state_machine_arn, "account")


class QueueConfig(BaseModel):
    """One request queue: ``[[queues]]``; feeds one pool, or several by message attribute."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field(description="The request queue's URL.")
    pools: tuple[str, ...] = Field(
        description="The pool it feeds (`pool = NAME`), or several (`pools = [...]`): each "
        "message then names its pool in pool_attribute."
    )
    priority: int = Field(
        default=0, ge=-1000, le=1000, description="Higher first, among a pool's queues."
    )
    pool_attribute: str = Field(
        default="pool",
        description="The message attribute naming a message's pool, for a queue feeding "
        "several pools (an unknown or missing pool: dead-lettered).",
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if not QUEUE_URL_RE.match(value):
            raise ValueError(
                "must be an SQS queue URL like https://sqs.REGION.amazonaws.com/ACCOUNT/NAME"
            )
        return value

    @field_validator("pool_attribute")
    @classmethod
    def _check_attribute(cls, value: str) -> str:
        if not ATTRIBUTE_RE.match(value):
            raise ValueError("must be an SQS message attribute name (A-Z a-z 0-9 _ - .)")
        return value


class FileError(ConfigError):
    """A config file with mistakes; ``globals_`` holds its valid ``[dispatcher]`` settings."""

    def __init__(self, *problems: str, globals_: Mapping[str, Any]) -> None:
        super().__init__(*problems)
        self.globals_ = dict(globals_)


@dataclass(frozen=True)
class Layout:
    """Every pool and queue of one dispatcher process."""

    pools: tuple[PoolConfig, ...]
    queues: tuple[QueueConfig, ...]
    source: str  # "environment" or the config file's path
    limits: tuple[SharedLimitConfig, ...] = ()  # named limits shared by pools

    def pool(self, name: str) -> PoolConfig:
        """The pool named ``name``."""
        return next(p for p in self.pools if p.name == name)

    def queues_of(self, pool: str) -> tuple[QueueConfig, ...]:
        """The queues that may carry requests for ``pool``."""
        return tuple(q for q in self.queues if pool in q.pools)

    @property
    def region(self) -> str:
        """The one region every pool is in."""
        return self.pools[0].region


@dataclass(frozen=True)
class Config:
    """Settings and layout, loaded and validated together."""

    settings: Settings
    layout: Layout


def load(
    overrides: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
) -> Config:
    """Load the settings and the layout (from the config file when one is named).

    Raises `ConfigError` naming every bad value and what is accepted.
    """
    environ = os.environ if env is None else env
    path = (overrides or {}).get("config") or environ.get(ENV_PREFIX + "CONFIG")
    if not path:
        settings = Settings.load(overrides, environ)
        return Config(settings, from_settings(settings))
    try:
        globals_, layout = read_file(Path(path))
    except FileError as exc:  # also name what is wrong with the flags and variables
        problems = list(exc.problems)
        try:
            Settings.load(overrides, environ, base=exc.globals_, base_source=str(path))
        except ConfigError as more:
            problems += [p for p in more.problems if p not in problems]
        raise ConfigError(*problems) from None
    settings = Settings.load(overrides, environ, base=globals_, base_source=str(path))
    return Config(settings, layout)


def from_settings(settings: Settings) -> Layout:
    """The one-pool layout of the ``DISPATCHER_*`` variables."""
    assert settings.state_machine_arn is not None  # noqa: S101 - Settings checks it
    assert settings.request_queue_url is not None  # noqa: S101
    pool = PoolConfig(
        name=DEFAULT_POOL,
        state_machine_arn=settings.state_machine_arn,
        limit=settings.limit,
        limit_parameter=settings.limit_parameter,
        key_attribute=settings.key_attribute,
        per_key_limit=settings.per_key_limit,
        max_waiting=settings.max_waiting,
    )
    queue = QueueConfig(url=settings.request_queue_url, pools=(DEFAULT_POOL,))
    return Layout((pool,), (queue,), "environment")


def read_file(path: Path) -> tuple[dict[str, Any], Layout]:
    """Parse a config file into its ``[dispatcher]`` table and the layout."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return parse(data, str(path))


def parse(data: Mapping[str, Any], source: str) -> tuple[dict[str, Any], Layout]:
    """Validate a parsed config file; every problem is listed with where it is."""
    problems: list[str] = []
    unknown = sorted(set(data) - {"dispatcher", "pools", "queues", "limits"})
    if unknown:
        problems.append(
            f"unknown table(s) {', '.join(unknown)}: accepted are [dispatcher], "
            "[pools.NAME], [[queues]] and [limits.NAME]"
        )
    globals_ = _globals(data.get("dispatcher", {}), problems)
    pools = _pools(data.get("pools"), problems)
    declared = set(data["pools"]) if isinstance(data.get("pools"), dict) else set()
    queues = _queues(data.get("queues"), declared, problems)
    limits = _limits(data.get("limits", {}), problems)
    if pools:
        _check_together(pools, queues, globals_, problems)
        _check_uses(pools, limits, problems)
    if problems:
        lines = (f"config file {source}: {problem}" for problem in problems)
        raise FileError(*lines, globals_=globals_)
    return globals_, Layout(tuple(pools), tuple(queues), source, tuple(limits))


def _globals(table: Any, problems: list[str]) -> dict[str, Any]:
    if not isinstance(table, dict):
        problems.append("[dispatcher] must be a table")
        return {}
    out = {}
    for key, value in table.items():
        if key in POOL_FIELDS:
            problems.append(f"[dispatcher] {key}: set it per pool, in [pools.NAME]")
        elif key == "config" or key not in Settings.model_fields:
            problems.append(
                f"[dispatcher] {key}: unknown setting; accepted are the settings of the "
                "configuration table in lower case (e.g. events_queue_url, reconcile_interval)"
            )
        else:
            out[key] = value
    return out


def _pools(table: Any, problems: list[str]) -> list[PoolConfig]:
    if not isinstance(table, dict) or not table:
        problems.append("no pools: add at least one [pools.NAME] table with state_machine_arn")
        return []
    pools = []
    for name, body in table.items():
        where = f"[pools.{name}]"
        if not POOL_NAME_RE.match(name):
            problems.append(f"{where}: pool names are 1-64 characters of A-Z a-z 0-9 _ -")
            continue
        if not isinstance(body, dict):
            problems.append(f"{where} must be a table")
            continue
        try:
            pools.append(PoolConfig.model_validate({**body, "name": name}))
        except ValidationError as exc:
            problems.extend(_explain(exc, where))
    return pools


def _limits(table: Any, problems: list[str]) -> list[SharedLimitConfig]:
    if not isinstance(table, dict):
        problems.append("[limits] must hold one [limits.NAME] table per named limit")
        return []
    limits = []
    for name, body in table.items():
        where = f"[limits.{name}]"
        if not LIMIT_NAME_RE.match(name):
            problems.append(f"{where}: named limits are 1-64 characters of A-Z a-z 0-9 _ -")
        elif not isinstance(body, dict):
            problems.append(f"{where} must be a table")
        else:
            try:
                limits.append(SharedLimitConfig.model_validate({**body, "name": name}))
            except ValidationError as exc:
                problems.extend(_explain(exc, where))
    return limits


def _check_uses(
    pools: list[PoolConfig], limits: list[SharedLimitConfig], problems: list[str]
) -> None:
    """Every named limit a pool uses exists, and has room for the pool's weight."""
    by_name = {limit.name: limit for limit in limits}
    for pool in pools:
        for name, weight in pool.uses.items():
            limit = by_name.get(name)
            if limit is None:
                problems.append(
                    f"[pools.{pool.name}] uses {name}: no [limits.{name}] table; defined are "
                    f"{', '.join(sorted(by_name)) or '(none)'}"
                )
            elif weight > limit.limit and limit.limit > 0:
                problems.append(
                    f"[pools.{pool.name}] uses {name} = {weight}: the weight is above "
                    f"[limits.{name}] limit {limit.limit}, so no execution of the pool could "
                    f"ever start; lower the weight or raise the limit"
                )


def _queues(entries: Any, pool_names: set[str], problems: list[str]) -> list[QueueConfig]:
    if not isinstance(entries, list) or not entries:
        problems.append("no queues: add at least one [[queues]] entry with url and pool")
        return []
    queues = []
    for index, body in enumerate(entries):
        where = f"[[queues]] #{index + 1}"
        if not isinstance(body, dict):
            problems.append(f"{where} must be a table")
            continue
        fields = dict(body)
        one, several = fields.pop("pool", None), fields.get("pools")
        if (one is None) == (several is None):
            problems.append(f'{where}: give exactly one of pool = "NAME" or pools = [...]')
            continue
        if one is not None:
            fields["pools"] = [one]
        try:
            queue = QueueConfig.model_validate(fields)
        except ValidationError as exc:
            problems.extend(_explain(exc, where))
            continue
        missing = [p for p in queue.pools if p not in pool_names]
        if missing or not queue.pools:
            problems.append(
                f"{where}: unknown pool(s) {', '.join(missing) or '(none given)'}; "
                f"defined are {', '.join(sorted(pool_names)) or '(none)'}"
            )
            continue
        queues.append(queue)
    return queues


def _check_together(
    pools: list[PoolConfig],
    queues: list[QueueConfig],
    globals_: Mapping[str, Any],
    problems: list[str],
) -> None:
    regions = {p.region for p in pools}
    if len(regions) > 1:
        problems.append(
            f"pools are in several regions ({', '.join(sorted(regions))}): one dispatcher "
            "serves one region; run one per region"
        )
    arns = [p.state_machine_arn for p in pools]
    if len(set(arns)) != len(arns):
        problems.append("two pools govern the same state machine; each needs its own")
    urls = [q.url for q in queues]
    if len(set(urls)) != len(urls):
        problems.append("a queue is listed twice in [[queues]]; list it once with pools = [...]")
    others = {globals_.get("events_queue_url"), globals_.get("dead_letter_queue_url")} - {None}
    if others & set(urls):
        problems.append("a request queue is also the events or dead-letter queue")
    fed = {p for q in queues for p in q.pools}
    problems.extend(
        f"[pools.{pool.name}]: no [[queues]] entry feeds it"
        for pool in pools
        if pool.name not in fed
    )


def _explain(exc: ValidationError, where: str) -> list[str]:
    out = []
    for err in exc.errors():
        field = ".".join(str(part) for part in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            out.append(f"{where} {field} is required")
        elif err["type"] == "extra_forbidden":
            out.append(f"{where} {field}: unknown key")
        elif field:
            out.append(f"{where} {field}={err.get('input')!r} is invalid: {msg}")
        else:
            out.append(f"{where}: {msg}")
    return out


def _arn_part(arn: str, part: str) -> str:
    match = STATE_MACHINE_ARN_RE.match(arn)
    assert match is not None  # validated  # noqa: S101
    return match[part]
