"""Settings from variables and flags, and the preflight that checks them against AWS (fakes)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

import pytest

from dispatcher.daemon.deadletter import DEFAULT_MAX_SIZE
from dispatcher.daemon.startup import preflight
from dispatcher.errors import UserError
from dispatcher.settings.config import (
    ConfigError,
    InputFormat,
    LogFormat,
    LogLevel,
    Settings,
    add_arguments,
    overrides_from,
)
from dispatcher.settings.layout import Layout, from_settings
from tests.fakes import (
    DEAD_LETTER_QUEUE,
    EVENTS_QUEUE,
    REQUEST_QUEUE,
    REQUIRED_ENV,
    STATE_MACHINE_ARN,
    FakeSFN,
    FakeSQS,
    make_clients,
    make_settings,
)

pytestmark = pytest.mark.timeout(10)


def load(**env: str) -> Settings:
    """Settings from exactly ``REQUIRED_ENV`` plus ``env`` (variable names given in full)."""
    return Settings.load(env={**REQUIRED_ENV, **env})


def test_defaults() -> None:
    settings = load()
    assert settings.state_machine_arn == STATE_MACHINE_ARN
    assert settings.request_queue_url == REQUEST_QUEUE
    assert settings.events_queue_url == EVENTS_QUEUE
    assert settings.dead_letter_queue_url is None
    assert settings.limit == 10
    assert settings.reconcile_interval == 30.0
    assert settings.start_grace == 10.0
    assert settings.visibility_timeout == 60
    assert settings.receive_wait_seconds == 20
    assert settings.http_host == "127.0.0.1"
    assert settings.http_port == 8080
    assert settings.log_level is LogLevel.INFO
    assert settings.log_format is LogFormat.AUTO
    assert settings.input_format is InputFormat.JSON


def test_every_missing_required_variable_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load(env={})
    message = str(info.value)
    for variable in REQUIRED_ENV:
        assert f"{variable} is required" in message


def test_one_missing_variable_is_the_only_one_named() -> None:
    env = {k: v for k, v in REQUIRED_ENV.items() if k != "DISPATCHER_EVENTS_QUEUE_URL"}
    with pytest.raises(ConfigError, match="DISPATCHER_EVENTS_QUEUE_URL is required") as info:
        Settings.load(env=env)
    assert "DISPATCHER_STATE_MACHINE_ARN" not in str(info.value)


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("DISPATCHER_LIMIT", "abc", "valid integer"),
        ("DISPATCHER_LIMIT", "-1", "greater than or equal to 0"),
        ("DISPATCHER_STATE_MACHINE_ARN", "arn:aws:lambda:eu-west-1:1:function:f", "stateMachine"),
        (
            "DISPATCHER_STATE_MACHINE_ARN",
            "arn:aws:states:eu-west-1:123456789012:execution:m:e",
            "stateMachine",
        ),
        ("DISPATCHER_REQUEST_QUEUE_URL", "requests", "SQS queue URL"),
        ("DISPATCHER_EVENTS_QUEUE_URL", "https://sqs.eu-west-1.amazonaws.com/", "SQS queue URL"),
        ("DISPATCHER_LOG_LEVEL", "verbose", "DEBUG"),
        ("DISPATCHER_VISIBILITY_TIMEOUT", "43201", "less than or equal to 43200"),
        ("DISPATCHER_RECEIVE_WAIT_SECONDS", "21", "less than or equal to 20"),
    ],
)
def test_invalid_value_names_the_variable_and_the_value(
    variable: str, value: str, says: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load(**{variable: value})
    message = str(info.value)
    assert message.startswith(f"{variable}=")
    assert repr(value) in message or repr(value.upper()) in message
    assert says in message


def test_the_same_url_for_two_queues_is_refused() -> None:
    with pytest.raises(ConfigError, match="three different queues"):
        load(DISPATCHER_EVENTS_QUEUE_URL=REQUEST_QUEUE)
    with pytest.raises(ConfigError, match="three different queues"):
        load(DISPATCHER_DEAD_LETTER_QUEUE_URL=EVENTS_QUEUE)


def test_log_level_is_case_insensitive() -> None:
    assert load(DISPATCHER_LOG_LEVEL="debug").log_level is LogLevel.DEBUG
    assert load(DISPATCHER_LOG_LEVEL="Warning").log_level is LogLevel.WARNING


def test_variable_names_are_case_insensitive_and_foreign_ones_ignored() -> None:
    settings = load(dispatcher_limit="4", DISPATCHER_STATUS_URL="http://x/status", OTHER="y")
    assert settings.limit == 4


def test_a_misspelt_variable_is_refused_with_the_setting_it_resembles() -> None:
    # Ignored, it would leave the limit at its default (10) without a word.
    with pytest.raises(ConfigError) as info:
        load(DISPATCHER_LIMT="2", DISPATCHER_NOT_A_SETTING="x", DISPATCHER_LIMIT="bad")
    lines = str(info.value).splitlines()
    assert "DISPATCHER_LIMT is not a setting: did you mean DISPATCHER_LIMIT?" in lines
    assert any(line.startswith("DISPATCHER_NOT_A_SETTING is not a setting") for line in lines)
    assert any("DISPATCHER_LIMIT" in line and "bad" in line for line in lines)


def test_values_are_converted() -> None:
    settings = load(
        DISPATCHER_LIMIT="0",
        DISPATCHER_START_GRACE="2.5",
        DISPATCHER_INPUT_FORMAT="envelope",
        DISPATCHER_DEAD_LETTER_QUEUE_URL=DEAD_LETTER_QUEUE,
    )
    assert settings.limit == 0  # 0 pauses starts: allowed
    assert settings.start_grace == 2.5
    assert settings.input_format is InputFormat.ENVELOPE
    assert settings.dead_letter_queue_url == DEAD_LETTER_QUEUE


def test_flags_override_variables() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--limit", "7", "--log-level", "error"])
    overrides = overrides_from(args)
    assert overrides == {"limit": "7", "log_level": "error"}
    settings = Settings.load(
        overrides, env={**REQUIRED_ENV, "DISPATCHER_LIMIT": "3", "DISPATCHER_HTTP_PORT": "9000"}
    )
    assert settings.limit == 7
    assert settings.log_level is LogLevel.ERROR
    assert settings.http_port == 9000  # not given as a flag: the variable stands


def test_every_setting_has_a_flag_that_names_its_variable() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    helps = {action.dest: action.help or "" for action in parser._actions}
    for name in Settings.model_fields:
        assert f"DISPATCHER_{name.upper()}" in helps[name]


def test_a_bad_value_is_named_as_the_user_gave_it() -> None:
    """The flag if a flag was used, the variable if the variable, the key in the file."""
    with pytest.raises(ConfigError) as info:
        Settings.load({"limit": "many"}, env=REQUIRED_ENV)
    assert str(info.value) == (
        "--limit='many' is invalid: Input should be a valid integer, unable to parse string "
        "as an integer"
    )
    with pytest.raises(ConfigError) as info:
        Settings.load(env={**REQUIRED_ENV, "DISPATCHER_LIMIT": "many"})
    assert str(info.value).startswith("DISPATCHER_LIMIT='many' is invalid: ")
    with pytest.raises(ConfigError) as info:
        Settings.load(
            env={**REQUIRED_ENV, "DISPATCHER_START_RATE": "5"},
            overrides={"start_rate_floor": "9"},
            base={"reconcile_interval": "soon"},
            base_source="d.toml",
        )
    assert info.value.problems == (
        "config file d.toml: [dispatcher] reconcile_interval='soon' is invalid: Input should "
        "be a valid number, unable to parse string as a number",
    )
    with pytest.raises(ConfigError) as info:
        Settings.load({"start_rate_floor": "9"}, env={**REQUIRED_ENV, "DISPATCHER_START_RATE": "5"})
    assert str(info.value) == (
        "--start-rate-floor=9 is above DISPATCHER_START_RATE=5: give a floor <= the rate"
    )


def test_every_problem_is_a_line_of_its_own() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load({"limit": "-1", "log_level": "loud"}, env={})
    problems = info.value.problems
    assert str(info.value).splitlines() == list(problems)
    assert [p.split(" ", 1)[0] for p in problems] == [
        "--state-machine-arn",
        "--request-queue-url",
        "--events-queue-url",
        "--limit='-1'",
        "--log-level='LOUD'",
    ]
    assert all(";" not in p.split(":", 1)[0] for p in problems)


def test_single_pool_flags_next_to_a_config_file_are_refused_by_their_names() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load(
            {"config": "pools.toml", "limit": "3"},
            env={"DISPATCHER_EVENTS_QUEUE_URL": EVENTS_QUEUE, "DISPATCHER_MAX_WAITING": "5"},
        )
    assert info.value.problems == (
        "--limit cannot be combined with --config: set limit per pool in the config file's "
        "[pools.NAME] tables",
        "DISPATCHER_MAX_WAITING cannot be combined with --config: set max_waiting per pool in "
        "the config file's [pools.NAME] tables",
    )


def test_region_is_derived_from_the_state_machine_arn() -> None:
    arn = "arn:aws-cn:states:cn-north-1:123456789012:stateMachine:m"
    assert load(DISPATCHER_STATE_MACHINE_ARN=arn).region == "cn-north-1"
    assert load().region == "eu-west-1"


def test_an_explicit_env_is_the_only_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPATCHER_LIMIT", "77")
    assert load().limit == 10


@pytest.mark.parametrize(
    "variable", ["DISPATCHER_STATE_MACHINE_ARN", "DISPATCHER_REQUEST_QUEUE_URL"]
)
def test_a_trailing_newline_is_refused(variable: str) -> None:
    with pytest.raises(ConfigError):
        load(**{variable: REQUIRED_ENV[variable] + "\n"})


# -- preflight: the settings checked against the account (fakes) ---------------------------


def settled(**overrides: Any) -> tuple[Settings, Layout]:
    """Unit-test settings and their one-pool layout."""
    settings = make_settings(**overrides)
    return settings, from_settings(settings)


def deployment(*, redrive: bool = True) -> tuple[FakeSQS, FakeSFN]:
    """A state machine and the two queues; the request queue has a redrive policy."""
    sqs, sfn = FakeSQS(), FakeSFN()
    policy = json.dumps({"deadLetterTargetArn": "arn:aws:sqs:eu-west-1:1:dl", "maxReceiveCount": 5})
    sqs.create_queue(REQUEST_QUEUE, **({"RedrivePolicy": policy} if redrive else {}))
    sqs.create_queue(EVENTS_QUEUE)
    return sqs, sfn


async def test_preflight_accepts_a_standard_machine_and_existing_queues() -> None:
    sqs, sfn = deployment()
    await preflight(*settled(), make_clients(sqs, sfn))
    assert [kwargs["QueueUrl"] for kwargs in sqs.calls_to("get_queue_attributes")] == [
        REQUEST_QUEUE,
        EVENTS_QUEUE,
    ]


async def test_preflight_refuses_an_express_machine_and_says_why() -> None:
    sqs, sfn = deployment()
    sfn.state_machines[STATE_MACHINE_ARN] = "EXPRESS"
    with pytest.raises(UserError) as info:
        await preflight(*settled(), make_clients(sqs, sfn))
    message = str(info.value)
    assert "EXPRESS" in message
    assert "only STANDARD" in message
    assert "idempotent" in message
    assert "status-change events" in message


async def test_preflight_names_a_missing_state_machine() -> None:
    sqs, sfn = deployment()
    sfn.state_machines.clear()
    with pytest.raises(UserError, match=r"DISPATCHER_STATE_MACHINE_ARN.*StateMachineDoesNotExist"):
        await preflight(*settled(), make_clients(sqs, sfn))


@pytest.mark.parametrize(
    ("variable", "url"),
    [
        ("DISPATCHER_EVENTS_QUEUE_URL", EVENTS_QUEUE),
        ("DISPATCHER_DEAD_LETTER_QUEUE_URL", DEAD_LETTER_QUEUE),
    ],
)
async def test_preflight_names_the_variable_of_a_missing_queue(variable: str, url: str) -> None:
    sqs, sfn = deployment()
    sqs.create_queue(DEAD_LETTER_QUEUE)
    del sqs.visible[url]
    settings = make_settings(dead_letter_queue_url=DEAD_LETTER_QUEUE)
    with pytest.raises(UserError) as info:
        await preflight(settings, from_settings(settings), make_clients(sqs, sfn))
    assert f"({variable})" in str(info.value)
    assert url in str(info.value)


async def test_preflight_refuses_nowhere_to_put_bad_requests() -> None:
    sqs, sfn = deployment(redrive=False)
    with pytest.raises(UserError, match=r"DISPATCHER_DEAD_LETTER_QUEUE_URL.*redrive policy"):
        await preflight(*settled(), make_clients(sqs, sfn))
    sqs.create_queue(DEAD_LETTER_QUEUE)
    await preflight(*settled(dead_letter_queue_url=DEAD_LETTER_QUEUE), make_clients(sqs, sfn))


@pytest.mark.parametrize(
    ("attributes", "size"),
    [({"MaximumMessageSize": "1048576"}, 1_048_576), ({}, DEFAULT_MAX_SIZE)],
)
async def test_preflight_reads_the_dead_letter_queues_maximum_message_size(
    attributes: dict[str, str], size: int
) -> None:
    """What the dead-letter copies are fitted to; 256 KiB when the queue does not say."""
    sqs, sfn = deployment()
    sqs.create_queue(DEAD_LETTER_QUEUE, **attributes)
    found = await preflight(
        *settled(dead_letter_queue_url=DEAD_LETTER_QUEUE), make_clients(sqs, sfn)
    )
    assert found.dead_letter_max_size == size
    assert (await preflight(*settled(), make_clients(sqs, sfn))).dead_letter_max_size == (
        DEFAULT_MAX_SIZE
    )


async def test_preflight_names_the_file_key_when_a_config_file_is_used() -> None:
    sqs, sfn = deployment()
    del sqs.visible[EVENTS_QUEUE]
    settings, layout = settled()
    from_file = dataclasses.replace(layout, source="/etc/sfn-dispatcher.toml")
    with pytest.raises(UserError) as info:
        await preflight(settings, from_file, make_clients(sqs, sfn))
    assert "events_queue_url in the [dispatcher] table of /etc/sfn-dispatcher.toml" in str(
        info.value
    )
