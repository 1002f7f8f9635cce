"""The settings model: names derived from each declaration, one loader, one precedence."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from dispatcher.cli.check import CHECK_FIELDS
from dispatcher.cli.control import limit_target
from dispatcher.cli.main import build_parser
from dispatcher.errors import UserError
from dispatcher.settings import layout
from dispatcher.settings.config import (
    ENV_PREFIX,
    LIVE_FIELDS,
    POOL_FIELDS,
    POOL_STRUCTURE,
    PRECEDENCE,
    PROCESS_FIELDS,
    SETTINGS_TABLE,
    ConfigError,
    PoolConfig,
    PoolSettings,
    Scope,
    Settings,
    Spec,
    gather,
)
from tests.fakes import REQUIRED_ENV

pytestmark = pytest.mark.timeout(10)

ARN = "arn:aws:states:eu-west-1:123456789012:stateMachine:reports"
QUEUE = "https://sqs.eu-west-1.amazonaws.com/123456789012/requests"
EVENTS = "https://sqs.eu-west-1.amazonaws.com/123456789012/events"


def test_every_setting_has_one_variable_one_flag_and_one_file_key_derived_from_its_name() -> None:
    rows = {row.name: row for row in SETTINGS_TABLE}
    assert set(rows) == set(Settings.model_fields) | (set(PoolConfig.model_fields) - {"name"})
    assert len(rows) == len(SETTINGS_TABLE)
    for row in SETTINGS_TABLE:
        if row.scope is Scope.POOL_FILE:  # a config file's pools only
            assert (row.variable, row.flag) == (None, None), row
        else:
            assert row.variable == ENV_PREFIX + row.name.upper()
            assert row.flag == "--" + row.name.replace("_", "-")
        if row.scope is Scope.FILE:
            assert row.file_key is None, row  # names the file itself
        elif row.scope is Scope.SINGLE_POOL:
            assert row.file_key == "[[queues]] url", row  # a file lists its queues
        else:
            table = "[dispatcher]" if row.scope is Scope.PROCESS else "[pools.NAME]"
            assert row.file_key == f"{table} {row.name}"
        assert row.description, row.name
        assert row.accepted, row.name
        if row.required or row.required_without_file:
            assert row.default is None, row.name
    for column in ("variable", "flag", "file_key"):
        given = [getattr(row, column) for row in SETTINGS_TABLE if getattr(row, column)]
        assert len(given) == len(set(given)), column


def test_the_help_check_flags_and_the_table_agree() -> None:
    run = next(
        parser
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
        for name, parser in action.choices.items()
        if name == "run"
    )
    flags = {a.dest: a for a in run._actions if a.dest in Settings.model_fields}
    assert set(flags) == set(Settings.model_fields)
    for row in SETTINGS_TABLE:
        if row.flag is None:
            continue
        action = flags[row.name]
        assert action.option_strings == [row.flag]
        assert action.metavar == row.metavar
        assert f"[{row.variable};" in (action.help or "")
        if row.range:
            assert f"{row.range}; " in (action.help or "")
    assert set(CHECK_FIELDS) == {row.name for row in SETTINGS_TABLE if row.check}


def test_pool_settings_are_declared_once_for_the_variables_and_the_file() -> None:
    for name, field in PoolSettings.model_fields.items():
        for model in (Settings, PoolConfig):
            other = model.model_fields[name]
            assert other.description == field.description, (model, name)
            assert [m for m in other.metadata if isinstance(m, Spec)] == [
                m for m in field.metadata if isinstance(m, Spec)
            ], (model, name)
        if name != "state_machine_arn":  # required in [pools.NAME]
            assert PoolConfig.model_fields[name].default == field.default
    assert PoolConfig.model_fields["state_machine_arn"].is_required()
    assert set(POOL_FIELDS) == {*PoolSettings.model_fields, "request_queue_url"}
    assert set(POOL_STRUCTURE) == {"state_machine_arn", "key_attribute", "limit_parameter"}
    assert set(PROCESS_FIELDS) >= LIVE_FIELDS
    assert set(PROCESS_FIELDS).isdisjoint(POOL_FIELDS)


def test_the_single_pool_carries_every_pool_setting() -> None:
    given = {
        "DISPATCHER_LIMIT": "3",
        "DISPATCHER_LIMIT_PARAMETER": "/p",
        "DISPATCHER_KEY_ATTRIBUTE": "tenant",
        "DISPATCHER_PER_KEY_LIMIT": "2",
        "DISPATCHER_MAX_WAITING": "7",
    }
    loaded = layout.load(env={**REQUIRED_ENV, **given})
    (pool,) = loaded.layout.pools
    for name in PoolSettings.model_fields:
        assert getattr(pool, name) == getattr(loaded.settings, name), name
    assert (pool.limit, pool.limit_parameter, pool.key_attribute) == (3, "/p", "tenant")
    assert (pool.per_key_limit, pool.max_waiting) == (2, 7)


def _file(tmp_path: Path, dispatcher: str = "", pool: str = "") -> Path:
    path = tmp_path / "c.toml"
    path.write_text(
        f'[dispatcher]\n{dispatcher}\n[pools.reports]\nstate_machine_arn = "{ARN}"\n{pool}\n'
        f'[[queues]]\nurl = "{QUEUE}"\npool = "reports"\n',
        encoding="utf-8",
    )
    return path


def test_flags_win_over_variables_which_win_over_the_file_which_wins_over_the_default(
    tmp_path: Path,
) -> None:
    assert PRECEDENCE == ("flag", "variable", "config file", "default")
    path = _file(tmp_path, f'events_queue_url = "{EVENTS}"\nreconcile_interval = 3')
    env = {"DISPATCHER_CONFIG": str(path), "DISPATCHER_RECONCILE_INTERVAL": "2"}
    cases: list[tuple[dict[str, Any], dict[str, str], float, str]] = [
        ({"reconcile_interval": "1"}, env, 1.0, "--reconcile-interval"),
        ({}, env, 2.0, "DISPATCHER_RECONCILE_INTERVAL"),
        ({}, {"DISPATCHER_CONFIG": str(path)}, 3.0, f"config file {path}: [dispatcher] "),
    ]
    for flags, variables, value, named in cases:
        assert layout.load(flags, variables).settings.reconcile_interval == value
        assert layout.attempt(flags, variables).given.name("reconcile_interval").startswith(named)
    path = _file(tmp_path, f'events_queue_url = "{EVENTS}"')
    assert layout.load(env={"DISPATCHER_CONFIG": str(path)}).settings.reconcile_interval == 30.0


def test_a_bad_value_from_each_source_is_named_as_given(tmp_path: Path) -> None:
    path = _file(tmp_path, f'events_queue_url = "{EVENTS}"\nlease_ttl = 1')
    for flags, env, named in (
        ({"lease_ttl": "2"}, {}, "--lease-ttl='2'"),
        ({}, {"DISPATCHER_LEASE_TTL": "2"}, "DISPATCHER_LEASE_TTL='2'"),
        ({}, {}, f"config file {path}: [dispatcher] lease_ttl=1"),
    ):
        with pytest.raises(ConfigError) as info:
            layout.load(flags, {"DISPATCHER_CONFIG": str(path), **env})
        assert info.value.problems == (
            f"{named} is invalid: Input should be greater than or equal to 3",
        )


def test_a_misspelt_file_key_says_which_key_it_resembles(tmp_path: Path) -> None:
    path = _file(
        tmp_path,
        f'events_queue_url = "{EVENTS}"\nreconcile_intervall = 3\nsomething = 1',
        "limti = 3",
    )
    with pytest.raises(ConfigError) as info:
        layout.load(env={"DISPATCHER_CONFIG": str(path)})
    assert info.value.problems == (
        f"config file {path}: [dispatcher] reconcile_intervall: unknown setting; did you mean "
        "reconcile_interval?",
        f"config file {path}: [dispatcher] something: unknown setting; accepted are the "
        "settings of the configuration table in lower case (e.g. events_queue_url, "
        "reconcile_interval)",
        f"config file {path}: [pools.reports] limti: unknown key; did you mean limit?",
    )


def test_a_bad_key_attribute_variable_is_a_config_error_naming_it() -> None:
    """The pool's own rule for an attribute name applies to the single pool's variable too
    (it used to escape as a traceback when the pool was built)."""
    with pytest.raises(ConfigError) as info:
        layout.load(env={**REQUIRED_ENV, "DISPATCHER_KEY_ATTRIBUTE": "ten ant"})
    assert info.value.problems == (
        "DISPATCHER_KEY_ATTRIBUTE='ten ant' is invalid: must be an SQS message attribute name "
        "(A-Z a-z 0-9 _ - .)",
    )


@pytest.mark.parametrize(
    ("field", "raw"),
    [
        ("limit", "-1"),
        ("state_machine_arn", "arn:aws:lambda:eu-west-1:1:function:f"),
        ("events_queue_url", "events"),
        ("log_level", "loud"),
        ("task_token_attribute", "a b"),
        ("key_attribute", "a b"),
        ("start_timeout", "61"),
    ],
)
def test_a_setting_validated_alone_is_judged_as_the_whole_model_judges_it(
    field: str, raw: str
) -> None:
    """What `check` and the control commands validate on its own, `run` refuses too."""
    env = {**REQUIRED_ENV, f"DISPATCHER_{field.upper()}": raw}
    given = gather(env=env)
    value, problem = given.alone(field)
    assert value is None
    with pytest.raises(ConfigError) as info:
        given.settings()
    assert problem in info.value.problems


def test_the_control_commands_read_the_settings_with_the_same_precedence(tmp_path: Path) -> None:
    path = _file(tmp_path, "limit_refresh_interval = 7", 'limit_parameter = "/l"')
    env = {"DISPATCHER_CONFIG": str(path)}
    assert limit_target(None, environ=env).refresh_interval == 7.0
    env["DISPATCHER_LIMIT_REFRESH_INTERVAL"] = "4"
    assert limit_target(None, environ=env).refresh_interval == 4.0
    env["DISPATCHER_LIMIT_REFRESH_INTERVAL"] = "0"
    with pytest.raises(UserError, match=r"INTERVAL='0' is invalid: give seconds > 0"):
        limit_target(None, environ=env)
