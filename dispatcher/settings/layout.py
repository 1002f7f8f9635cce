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
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dispatcher.core.shared_limits import LIMIT_NAME_RE, SharedLimitConfig
from dispatcher.settings.config import (
    POOL_FIELDS,
    PROCESS_FIELDS,
    RETIRED,
    AttributeName,
    ConfigError,
    Given,
    PoolConfig,
    PoolSettings,
    QueueUrl,
    Settings,
    did_you_mean,
    gather,
)

__all__ = ["DEFAULT_POOL", "Config", "Layout", "PoolConfig", "QueueConfig", "load"]

DEFAULT_POOL = "default"
POOL_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")


class QueueConfig(BaseModel):
    """One request queue: ``[[queues]]``; feeds one pool, or several by message attribute."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: QueueUrl = Field(description="The request queue's URL.")
    pools: tuple[str, ...] = Field(
        description="The pool it feeds (`pool = NAME`), or several (`pools = [...]`): each "
        "message then names its pool in pool_attribute."
    )
    priority: int = Field(
        default=0, ge=-1000, le=1000, description="Higher first, among a pool's queues."
    )
    pool_attribute: AttributeName = Field(
        default="pool",
        description="The message attribute naming a message's pool, for a queue feeding "
        "several pools (an unknown or missing pool: dead-lettered).",
    )


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
    ignored: tuple[str, ...] = ()
    """Removed settings still given (`dispatcher.settings.config.RETIRED`): one warning line
    each."""


@dataclass(frozen=True)
class Attempt:
    """What loading found, also when it failed: `check` reports every problem and still
    checks what is valid; the control commands need only a few settings."""

    given: Given  # the settings as given, by precedence (the file's valid ones included)
    path: Path | None  # the config file, when one is named
    file_layout: Layout | None  # the config file's pools and queues, when the file is valid
    file_error: ConfigError | None  # what is wrong with the file itself
    problems: tuple[str, ...]  # every problem, one line each
    config: Config | None  # the settings and layout, when there is no problem


def attempt(
    overrides: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
) -> Attempt:
    """Load the settings and the layout (from the config file when one is named), keeping
    every problem instead of raising: the one loader of `run`, `check`, the control commands
    and a reload. Precedence: `dispatcher.settings.config.PRECEDENCE`."""
    environ = os.environ if env is None else env
    given = gather(overrides, environ)
    raw_path = given.values.get("config")
    if not raw_path:
        return _attempted(given, None, None, None)
    path = Path(raw_path)
    try:
        globals_, file_layout = read_file(path)
    except FileError as exc:  # also name what is wrong with the flags and variables
        with_file = gather(overrides, environ, file=exc.globals_, file_source=str(path))
        return _attempted(with_file, path, None, exc)
    except ConfigError as exc:  # unreadable: nothing else is looked at
        return Attempt(given, path, None, exc, exc.problems, None)
    with_file = gather(overrides, environ, file=globals_, file_source=str(path))
    return _attempted(with_file, path, file_layout, None)


def _attempted(
    given: Given, path: Path | None, file_layout: Layout | None, file_error: ConfigError | None
) -> Attempt:
    problems = list(file_error.problems) if file_error else []
    settings: Settings | None = None
    try:
        settings = given.settings()
    except ConfigError as exc:
        problems += [p for p in exc.problems if p not in problems]
    config = None
    if settings is not None and not problems:
        config = Config(settings, file_layout or from_settings(settings), given.ignored)
    return Attempt(given, path, file_layout, file_error, tuple(problems), config)


def load(
    overrides: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
) -> Config:
    """Load the settings and the layout (from the config file when one is named).

    Raises `ConfigError` naming every bad value and what is accepted.
    """
    loaded = attempt(overrides, env)
    if loaded.config is None:
        raise ConfigError(*loaded.problems)
    return loaded.config


def from_settings(settings: Settings) -> Layout:
    """The one-pool layout of the ``DISPATCHER_*`` variables."""
    assert settings.request_queue_url is not None  # noqa: S101 - Settings checks it
    pool = PoolConfig.model_validate(
        {"name": DEFAULT_POOL, **{f: getattr(settings, f) for f in PoolSettings.model_fields}}
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
        if key in RETIRED:
            out[key] = value  # ignored, with a warning (`Config.ignored`)
        elif key in POOL_FIELDS:
            problems.append(f"[dispatcher] {key}: set it per pool, in [pools.NAME]")
        elif key not in PROCESS_FIELDS:
            close = did_you_mean(key, PROCESS_FIELDS)
            hint = (
                close
                if close.startswith("did you")
                else (
                    "accepted are the settings of the configuration table in lower case (e.g. "
                    "events_queue_url, reconcile_interval)"
                )
            )
            problems.append(f"[dispatcher] {key}: unknown setting; {hint}")
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
            problems.extend(_explain(exc, where, PoolConfig))
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
                problems.extend(_explain(exc, where, SharedLimitConfig))
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
            problems.extend(_explain(exc, where, QueueConfig))
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


def _explain(exc: ValidationError, where: str, model: type[BaseModel]) -> list[str]:
    out = []
    for err in exc.errors():
        field = ".".join(str(part) for part in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            out.append(f"{where} {field} is required")
        elif err["type"] == "extra_forbidden":
            known = set(model.model_fields) - {"name"}
            close = did_you_mean(field, known)
            hint = f"; {close}" if close.startswith("did you") else ""
            out.append(f"{where} {field}: unknown key{hint}")
        elif field:
            out.append(f"{where} {field}={err.get('input')!r} is invalid: {msg}")
        else:
            out.append(f"{where}: {msg}")
    return out
