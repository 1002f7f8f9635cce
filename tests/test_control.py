"""``status``, ``pause``, ``resume``, ``drain``: a running dispatcher operated through its SSM
limit parameter and read through ``/status``; judged from the executions' own records."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

from devtools.polling import wait_until
from devtools.sandbox import SandboxResources
from dispatcher.cli.control import last_running_limit, limit_target, render_status, status_url
from dispatcher.cli.main import main
from dispatcher.cli.submit import SubmitItem, submit_requests
from dispatcher.errors import UserError
from tests.conftest import SandboxFactory
from tests.helpers import queue_depth, sfn_client, ssm_client
from tests.runner import running, running_config
from tests.test_pools import share_events
from tests.test_shared_limits_live import write_shared_config

pytestmark = pytest.mark.timeout(60)

ARN = "arn:aws:states:eu-west-1:123456789012:stateMachine:reports"
QUEUE = "https://sqs.eu-west-1.amazonaws.com/123456789012/requests"


async def _cli(*argv: str) -> int:
    """Run the command in a worker thread (it starts its own event loop)."""
    return await anyio.to_thread.run_sync(main, list(argv))


# --- against a running dispatcher and the emulator ------------------------------------------


async def test_pause_drain_resume_a_running_dispatcher(
    sandbox: SandboxResources,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Paused: requests sent afterwards stay queued; drain returns only once every execution
    has stopped (by their stop dates); resume brings the old limit back and they start."""
    for name, value in {
        "AWS_ENDPOINT_URL": sandbox.endpoint,
        "DISPATCHER_LIMIT_PARAMETER": sandbox.limit_parameter,
        "DISPATCHER_STATE_MACHINE_ARN": sandbox.state_machine_arn,
        "DISPATCHER_LIMIT_REFRESH_INTERVAL": "0.2",
    }.items():
        monkeypatch.setenv(name, value)
    async with ssm_client(sandbox.endpoint) as ssm:
        await ssm.put_parameter(Name=sandbox.limit_parameter, Value="3", Overwrite=True)

    async def submit(prefix: str, seconds: int = 2) -> None:
        body = json.dumps({"seconds": seconds})
        items = [SubmitItem(body, f"{prefix}-{n}") for n in (1, 2)]
        report = await submit_requests(
            sandbox.request_queue_url, items, endpoint_url=sandbox.endpoint
        )
        assert report.ok

    async with (
        sfn_client(sandbox.endpoint) as sfn,
        running(
            sandbox, limit_parameter=sandbox.limit_parameter, limit_refresh_interval=0.2
        ) as dispatcher,
    ):
        pool = dispatcher.pools["default"]
        url = f"http://127.0.0.1:{dispatcher.http_port}/status"

        async def executions() -> dict[str, Any]:
            listed = await sfn.list_executions(stateMachineArn=sandbox.state_machine_arn)
            return {e["name"]: e for e in listed["executions"]}

        async def names_are(*names: str) -> bool:
            return set(await executions()) == set(names)

        await wait_until(
            lambda: _true(pool.ledger.limit == 3), within=10, interval=0.05, message="limit 3 read"
        )
        # long enough to be still running when the table is read, on a loaded machine too
        await submit("a", seconds=8)
        await wait_until(
            lambda: names_are("a-1", "a-2"), within=10, interval=0.05, message="a-1, a-2 started"
        )

        assert await _cli("pause") == 0
        assert "limit 3 -> 0" in capsys.readouterr().out
        await wait_until(
            lambda: _true(pool.ledger.limit == 0), within=10, interval=0.05, message="pause seen"
        )
        await submit("b")

        assert await _cli("status", "--url", url) == 0
        table = capsys.readouterr().out  # the in-process dispatcher logs to stdout too
        row = next(line for line in table.splitlines() if line.startswith("default "))
        assert row.split()[:4] == ["default", "0", "paused", "2"]

        assert await _cli("drain", "--wait", "--interval", "0.2", "--url", url) == 0
        drained_at = datetime.now(UTC)  # the emulator runs on this machine's clock
        out = capsys.readouterr().out
        assert "already paused" in out
        assert out.strip().endswith("it stays paused until `resume`")
        records = await executions()
        assert set(records) == {"a-1", "a-2"}, "nothing starts while paused"
        stopped = [
            (await sfn.describe_execution(executionArn=e["executionArn"])) for e in records.values()
        ]
        assert all(e["status"] == "SUCCEEDED" for e in stopped)
        assert all(e["stopDate"] <= drained_at for e in stopped)
        assert await queue_depth(sandbox.endpoint, sandbox.request_queue_url) == 2

        assert await _cli("resume") == 0
        assert "limit 0 -> 3" in capsys.readouterr().out
        await wait_until(
            lambda: names_are("a-1", "a-2", "b-1", "b-2"),
            within=10,
            interval=0.05,
            message="b-1, b-2 started",
        )
    async with ssm_client(sandbox.endpoint) as ssm:
        parameter = await ssm.get_parameter(Name=sandbox.limit_parameter)
    assert parameter["Parameter"]["Value"] == "3"


async def _true(value: bool) -> bool:
    return value


@pytest.mark.timeout(120)
async def test_pause_drain_resume_a_named_limit_of_a_running_dispatcher(
    sandbox_factory: SandboxFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Two state machines share partner-api (weights 1 and 2). Paused by name: nothing of
    either starts; drain returns only once both machines' executions have stopped (by their
    stop dates); resume brings the old value back and both start again."""
    light = await sandbox_factory(limit=4)  # its limit parameter holds partner-api's value
    heavy = await sandbox_factory()
    await share_events(light, heavy)
    path = write_shared_config(
        tmp_path / "named.toml", light, heavy, limit=3, parameter=light.limit_parameter
    )
    for name, value in {
        "AWS_ENDPOINT_URL": light.endpoint,
        "DISPATCHER_CONFIG": path,
        "DISPATCHER_LIMIT_REFRESH_INTERVAL": "0.2",
    }.items():
        monkeypatch.setenv(name, value)

    async def submit(prefix: str, seconds: int = 2) -> None:
        for resources, pool in ((light, "i"), (heavy, "r")):
            item = SubmitItem(json.dumps({"seconds": seconds}), f"{prefix}-{pool}")
            report = await submit_requests(
                resources.request_queue_url, [item], endpoint_url=light.endpoint
            )
            assert report.ok

    async with (
        sfn_client(light.endpoint) as sfn,
        running_config(light, path, DISPATCHER_LIMIT_REFRESH_INTERVAL="0.2") as dispatcher,
    ):
        shared = dispatcher.shared
        assert shared is not None
        url = f"http://127.0.0.1:{dispatcher.http_port}/status"

        async def executions() -> dict[str, Any]:
            found: dict[str, Any] = {}
            for machine in (light.state_machine_arn, heavy.state_machine_arn):
                listed = await sfn.list_executions(stateMachineArn=machine)
                found |= {e["name"]: e for e in listed["executions"]}
            return found

        async def names_are(*names: str) -> bool:
            return set(await executions()) == set(names)

        await wait_until(lambda: _true(shared.limit("partner-api") == 4), within=10, interval=0.05)
        # long enough to be still running when the table is read, on a loaded machine too
        await submit("a", seconds=8)
        await wait_until(lambda: names_are("a-i", "a-r"), within=10, interval=0.05)

        assert await _cli("pause", "--named-limit", "partner-api") == 0
        assert "limit 4 -> 0" in capsys.readouterr().out
        await wait_until(lambda: _true(shared.limit("partner-api") == 0), within=10, interval=0.05)
        await submit("b")

        assert await _cli("status", "--url", url) == 0
        lines = capsys.readouterr().out.splitlines()
        named = next(line for line in lines if line.startswith("named limit partner-api:"))
        assert named == "named limit partner-api: 3 of 0 in use, paused (invoices x1, refunds x2)"

        argv = ("--named-limit", "partner-api", "--wait", "--interval", "0.2", "--url", url)
        assert await _cli("drain", *argv) == 0
        drained_at = datetime.now(UTC)  # the emulator runs on this machine's clock
        out = capsys.readouterr().out
        assert "already paused" in out
        assert out.strip().endswith(
            "named limit partner-api drained: nothing uses it; it stays paused until `resume`"
        )
        records = await executions()
        assert set(records) == {"a-i", "a-r"}, "nothing of either pool starts while paused"
        stopped = [
            (await sfn.describe_execution(executionArn=e["executionArn"])) for e in records.values()
        ]
        assert all(e["status"] == "SUCCEEDED" for e in stopped)
        assert all(e["stopDate"] <= drained_at for e in stopped)

        assert await _cli("resume", "--named-limit", "partner-api") == 0
        assert "limit 0 -> 4" in capsys.readouterr().out
        await wait_until(lambda: names_are("a-i", "a-r", "b-i", "b-r"), within=10, interval=0.05)
    async with ssm_client(light.endpoint) as ssm:
        parameter = await ssm.get_parameter(Name=light.limit_parameter)
    assert parameter["Parameter"]["Value"] == "4"


async def test_status_json_is_the_dispatchers_document(
    sandbox: SandboxResources, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running(sandbox) as dispatcher:
        url = f"http://127.0.0.1:{dispatcher.http_port}"  # the base URL is enough
        assert await _cli("status", "--url", url, "--json") == 0
        out = capsys.readouterr().out  # the in-process dispatcher logs to stdout too
        document, _ = json.JSONDecoder().raw_decode(out, out.index("{\n"))
        assert document["pools"]["default"]["limit"] == dispatcher.pool.ledger.limit
        assert document["pools"]["default"]["tokens_held"] == 0
        assert "queued_read_at" in document["pools"]["default"], "how old QUEUED is"
        assert document["role"] == dispatcher.status()["role"]


async def test_status_asks_the_port_the_dispatcher_listens_on(
    sandbox: SandboxResources,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`run` listens on DISPATCHER_HTTP_PORT: with the same variable `status` finds it."""
    monkeypatch.delenv("DISPATCHER_STATUS_URL", raising=False)
    async with running(sandbox) as dispatcher:
        monkeypatch.setenv("DISPATCHER_HTTP_PORT", str(dispatcher.http_port))
        assert await _cli("status") == 0
        out = capsys.readouterr().out
        assert f"dispatcher at http://127.0.0.1:{dispatcher.http_port}/status: role " in out


async def test_resume_restores_the_newest_non_zero_limit(sandbox: SandboxResources) -> None:
    async with ssm_client(sandbox.endpoint) as ssm:
        for value in ("4", "7", "0", "lots", "0"):
            await ssm.put_parameter(Name=sandbox.limit_parameter, Value=value, Overwrite=True)
        assert await last_running_limit(ssm, sandbox.limit_parameter) == 7


# --- without AWS ----------------------------------------------------------------------------


def test_nothing_answering_is_one_line_and_its_own_exit_status(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["status", "--url", "http://127.0.0.1:1/status", "--timeout", "2"]) == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(
        "sfn-dispatcher status: error: nothing answers at http://127.0.0.1:1/status ("
    )
    assert "DISPATCHER_HTTP_PORT" in err


@pytest.mark.parametrize(
    ("given", "env", "url"),
    [
        ("http://127.0.0.1:8093", {}, "http://127.0.0.1:8093/status"),
        ("http://127.0.0.1:8093/", {}, "http://127.0.0.1:8093/status"),
        ("127.0.0.1:8093", {}, "http://127.0.0.1:8093/status"),
        ("http://h:1/status", {"DISPATCHER_HTTP_PORT": "2"}, "http://h:1/status"),
        ("http://h:1/custom/status", {}, "http://h:1/custom/status"),
        (None, {}, "http://127.0.0.1:8080/status"),
        (None, {"DISPATCHER_HTTP_PORT": "8093"}, "http://127.0.0.1:8093/status"),
        (
            None,
            {"DISPATCHER_HTTP_PORT": "8093", "DISPATCHER_STATUS_URL": "http://other:9"},
            "http://other:9/status",
        ),
    ],
)
def test_the_status_url_takes_a_base_url_and_the_dispatchers_port(
    given: str | None, env: dict[str, str], url: str
) -> None:
    assert status_url(given, env) == url


def test_an_invalid_port_variable_is_named() -> None:
    with pytest.raises(UserError, match="DISPATCHER_HTTP_PORT='http' is invalid"):
        status_url(None, {"DISPATCHER_HTTP_PORT": "http"})


def test_a_drain_timeout_shorter_than_the_pause_takes_is_refused_before_anything_changes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --url, drain --wait sleeps a refresh interval + 5 s before it counts: a
    shorter --timeout would always give up, after saying it waits longer."""
    monkeypatch.setenv("DISPATCHER_LIMIT_PARAMETER", "/nowhere/limit")
    monkeypatch.setenv("DISPATCHER_STATE_MACHINE_ARN", ARN)
    monkeypatch.delenv("DISPATCHER_STATUS_URL", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # any call would fail
    assert main(["drain", "--wait", "--timeout", "15"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "sfn-dispatcher drain: error: --timeout 15 is too short: without --url, drain --wait "
        "first waits 35 s for a running dispatcher to see the pause"
    )
    assert err.strip().endswith("nothing was changed")


def test_the_table_says_how_old_queued_is() -> None:
    """QUEUED is read once per reconcile, from a figure SQS itself gives late: an emptied
    queue still shows its old depth until the next reading, so the table says how old."""
    pool = {"limit": 5, "queued_estimate": 7, "queued_read_at": 1000.0}
    lines = render_status({"pools": {"a": pool}}, "http://x/status", now=1025.4).splitlines()
    assert lines[-1] == (
        "QUEUED is SQS's approximate depth (ApproximateNumberOfMessages + Delayed), read at "
        "each reconcile, last 25 s ago: it can show requests already taken"
    )


def test_the_table_shows_every_pool_and_the_lease() -> None:
    pool = {"limit": 5, "running": 2, "starting": 1, "in_doubt": 0, "waiting": 3}
    document = {
        "role": "leader",
        "ready": True,
        "config": "c.toml",
        "lease": {"owner": "task-1", "epoch": 4, "valid_for_seconds": 9.5},
        "pools": {
            "b": {**pool, "queued_estimate": 40, "free": 2, "tokens_held": 1},
            "a": {**pool, "limit": 0},
        },
    }
    lines = render_status(document, "http://x/status").splitlines()
    assert lines[0] == (
        "dispatcher at http://x/status: role leader, ready, lease epoch 4 held by task-1, "
        "9.5 s left; config c.toml"
    )
    assert lines[1].split() == [
        "POOL", "LIMIT", "RUNNING", "STARTING", "IN", "DOUBT", "WAITING", "QUEUED", "FREE",
        "TOKENS",
    ]  # fmt: skip
    assert lines[2].split() == ["a", "0", "paused", "2", "1", "0", "3", "-", "-", "-"]
    assert lines[3].split() == ["b", "5", "2", "1", "0", "3", "40", "2", "1"]


@pytest.mark.parametrize(
    ("env", "pool", "message"),
    [
        ({}, None, "pool 'default' has no limit parameter: set DISPATCHER_LIMIT_PARAMETER"),
        (
            {},
            "other",
            "--pool 'other': without a config file (DISPATCHER_CONFIG) the only pool is 'default'",
        ),
        ({"DISPATCHER_CONFIG": "TWO"}, None, "give --pool: TWO has pools a, b"),
        ({"DISPATCHER_CONFIG": "TWO"}, "c", "--pool 'c' is not in TWO: its pools are a, b"),
        (
            {"DISPATCHER_CONFIG": "TWO"},
            "b",
            "pool 'b' has no limit parameter: add limit_parameter = \"/NAME\" to [pools.b]",
        ),
        (
            {"DISPATCHER_LIMIT_PARAMETER": "/p", "DISPATCHER_LIMIT_REFRESH_INTERVAL": "soon"},
            None,
            "DISPATCHER_LIMIT_REFRESH_INTERVAL='soon' is invalid: give seconds > 0",
        ),
    ],
)
def test_a_pool_without_a_parameter_names_the_setting_to_add(
    tmp_path: Path, env: dict[str, str], pool: str | None, message: str
) -> None:
    two = _two_pools(tmp_path)
    env = {k: two if v == "TWO" else v for k, v in env.items()}
    with pytest.raises(UserError) as caught:
        limit_target(pool, environ=env)
    assert str(caught.value).startswith(message.replace("TWO", two))


def test_the_parameter_comes_from_the_dispatchers_settings(tmp_path: Path) -> None:
    two = _two_pools(tmp_path)
    target = limit_target("a", environ={"DISPATCHER_CONFIG": two})
    assert (target.parameter, target.state_machine_arn, target.refresh_interval) == (
        "/limits/a",
        ARN,
        7.0,
    )
    env = {"DISPATCHER_LIMIT_PARAMETER": "/l", "DISPATCHER_STATE_MACHINE_ARN": ARN}
    target = limit_target(None, environ=env)
    assert (target.name, target.parameter, target.refresh_interval) == ("default", "/l", 30.0)
    assert limit_target(None, "/given", environ={}).parameter == "/given"


def _two_pools(tmp_path: Path) -> str:
    path = tmp_path / "two.toml"
    path.write_text(
        "[dispatcher]\nlimit_refresh_interval = 7\n"
        f'[pools.a]\nstate_machine_arn = "{ARN}"\nlimit_parameter = "/limits/a"\n'
        f'[pools.b]\nstate_machine_arn = "{ARN}2"\n'
        f'[[queues]]\nurl = "{QUEUE}"\npools = ["a", "b"]\n',
        encoding="utf-8",
    )
    return str(path)


def test_a_standby_says_it_does_not_hold_the_lease() -> None:
    document = {
        "role": "standby",
        "ready": False,
        "config": "c.toml",
        "lease": {"owner": "task-2", "held": False, "epoch": 4, "valid_for_seconds": 0},
        "pools": {"a": {"limit": 5, "running": 0}},
    }
    header = render_status(document, "http://x/status").splitlines()[0]
    assert header == (
        "dispatcher at http://x/status: role standby, NOT ready, lease not held by this "
        "process (task-2); config c.toml"
    )


async def test_drain_against_a_standby_judges_from_the_executions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A standby governs nothing: its figures (limit never 0, counts of a reign it lost)
    say nothing, so `drain --wait --url` pointed at it goes by the executions alone."""
    from dispatcher.cli import control  # noqa: PLC0415
    from dispatcher.cli.control import LimitTarget  # noqa: PLC0415

    standby = {
        "role": "standby",
        "pools": {"reports": {"limit": 5, "running": 3, "starting": 0, "in_doubt": 0}},
    }
    monkeypatch.setattr(control, "fetch_status", lambda _url: standby)

    class NothingRuns:
        async def list_executions(self, **_: Any) -> dict[str, Any]:
            return {"executions": []}

    target = LimitTarget("reports", "/limit", ARN, 0.01, "c.toml")
    sfn: Any = NothingRuns()
    assert await control.wait_drained(sfn, target, 0.01, 20, url="http://x/status") == 0


# --- named limits: the same commands on [limits.NAME] ------------------------------------------

SECOND_ARN = f"{ARN}-refunds"


def _named(tmp_path: Path, parameter: str | None = '"/limits/partner-api"') -> str:
    """Pools a (weight 1) and b (weight 2) share partner-api; pool c uses nothing."""
    named = f"limit_parameter = {parameter}\n" if parameter else ""
    path = tmp_path / "named.toml"
    path.write_text(
        "[dispatcher]\nlimit_refresh_interval = 3\n"
        f"[limits.partner-api]\nlimit = 4\n{named}"
        "[limits.licences]\nlimit = 2\n"
        f'[pools.a]\nstate_machine_arn = "{ARN}"\nuses = {{ partner-api = 1 }}\n'
        f'[pools.b]\nstate_machine_arn = "{SECOND_ARN}"\nuses = {{ partner-api = 2 }}\n'
        f'[pools.c]\nstate_machine_arn = "{ARN}3"\nlimit_parameter = "/limits/c"\n'
        f'[[queues]]\nurl = "{QUEUE}"\npools = ["a", "b", "c"]\n',
        encoding="utf-8",
    )
    return str(path)


class FakeSSM:
    """One parameter with its history, as SSM keeps them."""

    def __init__(self, name: str, *values: str) -> None:
        self.name = name
        self.history: list[str] = list(values)
        self.notes: list[str] = []

    async def get_parameter(self, **kwargs: Any) -> dict[str, Any]:
        assert kwargs["Name"] == self.name
        return {"Parameter": {"Name": self.name, "Value": self.history[-1]}}

    async def put_parameter(self, **kwargs: Any) -> dict[str, Any]:
        assert (kwargs["Name"], kwargs["Overwrite"]) == (self.name, True)
        self.history.append(kwargs["Value"])
        self.notes.append(kwargs["Description"])
        return {"Version": len(self.history)}

    async def get_parameter_history(self, **kwargs: Any) -> dict[str, Any]:
        assert kwargs["Name"] == self.name
        entries = [{"Value": v, "Version": n} for n, v in enumerate(self.history, 1)]
        return {"Parameters": entries}


class FakeSFN:
    """RUNNING executions per state machine, changed by the test between counts."""

    def __init__(self, running: dict[str, int]) -> None:
        self.running = running
        self.counted: list[str] = []

    async def list_executions(self, **kwargs: Any) -> dict[str, Any]:
        assert kwargs["statusFilter"] == "RUNNING"
        arn = kwargs["stateMachineArn"]
        self.counted.append(arn)
        return {"executions": [{"name": str(n)} for n in range(self.running.get(arn, 0))]}


def test_a_named_limit_is_found_in_the_config_file_with_the_pools_that_use_it(
    tmp_path: Path,
) -> None:
    from dispatcher.cli.control import User, named_limit_target  # noqa: PLC0415

    target = named_limit_target("partner-api", environ={"DISPATCHER_CONFIG": _named(tmp_path)})
    assert (target.label, target.option) == (
        "named limit partner-api",
        "--named-limit partner-api",
    )
    assert (target.parameter, target.refresh_interval) == ("/limits/partner-api", 3.0)
    assert target.users == (User("a", 1, ARN), User("b", 2, SECOND_ARN))


@pytest.mark.parametrize(
    ("config", "name", "message"),
    [
        (
            None,
            "partner-api",
            "--named-limit 'partner-api': named limits are [limits.NAME] tables of a config "
            "file, and no config file is given (DISPATCHER_CONFIG)",
        ),
        (
            "NAMED",
            "partner",
            "--named-limit 'partner' is not in NAMED: its named limits are partner-api, licences",
        ),
        (
            "NAMED",
            "licences",
            "named limit 'licences' has no limit parameter: add limit_parameter = \"/NAME\" to "
            "[limits.licences] in NAMED (an SSM parameter holding its value; the dispatcher "
            "then needs one restart), or pass --parameter NAME",
        ),
        (
            "NAMED",
            "a",
            "--named-limit 'a' is not in NAMED: its named limits are partner-api, licences; "
            "'a' is a pool: give --pool a",
        ),
        ("TWO", "partner-api", "--named-limit 'partner-api' is not in TWO: its named limits "),
    ],
)
def test_a_named_limit_that_cannot_be_paused_says_what_to_add(
    tmp_path: Path, config: str | None, name: str, message: str
) -> None:
    from dispatcher.cli.control import named_limit_target  # noqa: PLC0415

    paths = {"NAMED": _named(tmp_path), "TWO": _two_pools(tmp_path)}
    env = {} if config is None else {"DISPATCHER_CONFIG": paths[config]}
    with pytest.raises(UserError) as caught:
        named_limit_target(name, environ=env)
    expected = message
    for key, path in paths.items():
        expected = expected.replace(key, path)
    assert str(caught.value).startswith(expected)


def test_a_named_limit_given_as_a_pool_is_pointed_at_named_limit(tmp_path: Path) -> None:
    with pytest.raises(UserError) as caught:
        limit_target("partner-api", environ={"DISPATCHER_CONFIG": _named(tmp_path)})
    assert str(caught.value).endswith(
        "its pools are a, b, c; 'partner-api' is a named limit ([limits.partner-api]): give "
        "--named-limit partner-api"
    )


def test_pool_and_named_limit_together_are_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["pause", "--pool", "a", "--named-limit", "partner-api"])
    assert caught.value.code == 2
    assert "argument --named-limit: not allowed with argument --pool" in capsys.readouterr().err


async def test_pause_and_resume_of_a_named_limit_write_its_parameter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dispatcher.cli import control  # noqa: PLC0415

    env = {"DISPATCHER_CONFIG": _named(tmp_path)}
    target = control.named_limit_target("partner-api", environ=env)
    ssm: Any = FakeSSM("/limits/partner-api", "6", "5")
    assert await control.pause(ssm, target) == 5
    assert ssm.history[-1] == "0"
    assert ssm.notes == ["paused by sfn-dispatcher pause; resume restores 5"]
    out = capsys.readouterr().out
    assert out.startswith(
        "paused named limit partner-api (SSM parameter /limits/partner-api): limit 5 -> 0. A "
        "running dispatcher stops receiving and starting for the pools that use it (a, b) "
        "within 3 s"
    )
    assert "`sfn-dispatcher resume --named-limit partner-api` restores 5." in out
    assert await control.pause(ssm, target, drain=True) == 0
    assert "named limit partner-api (SSM parameter /limits/partner-api) is already paused" in (
        capsys.readouterr().out
    )
    assert await control.resume(ssm, target, None) == 5
    assert ssm.history == ["6", "5", "0", "5"]
    assert capsys.readouterr().out.startswith(
        "resumed named limit partner-api (SSM parameter /limits/partner-api): limit 0 -> 5"
    )


async def test_drain_of_a_named_limit_waits_until_no_user_pool_holds_a_unit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The use is each user pool's RUNNING executions times its weight, as Step Functions
    lists them; drained is two counts of 0 in a row."""
    from dispatcher.cli import control  # noqa: PLC0415

    env = {"DISPATCHER_CONFIG": _named(tmp_path)}
    target = control.named_limit_target("partner-api", environ=env)
    target = dataclasses.replace(target, refresh_interval=0.0)
    monkeypatch.setattr(control, "PAUSE_SEEN_MARGIN", 0.0)  # no dispatcher to see the pause

    class Ending(FakeSFN):
        """One of b's executions ends at each count of b; a's ended already."""

        async def list_executions(self, **kwargs: Any) -> dict[str, Any]:
            page = await super().list_executions(**kwargs)
            if kwargs["stateMachineArn"] == SECOND_ARN and self.running[SECOND_ARN]:
                self.running[SECOND_ARN] -= 1
            return page

    sfn: Any = Ending({ARN: 0, SECOND_ARN: 2, f"{ARN}3": 9})
    assert await control.wait_drained(sfn, target, 0.001, 20) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1:] == [
        "named limit partner-api: 4 in use",
        "named limit partner-api: 2 in use",
        "named limit partner-api: 0 in use",
        "named limit partner-api drained: nothing uses it; it stays paused until `resume`",
    ]
    assert f"{ARN}3" not in sfn.counted, "pool c does not use the limit"


async def test_drain_of_a_named_limit_reads_its_use_from_the_dispatchers_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --url: the pause is seen when /status shows the named limit at 0, and its use
    (in doubt and starting included) counts even when ListExecutions shows nothing."""
    from dispatcher.cli import control  # noqa: PLC0415

    env = {"DISPATCHER_CONFIG": _named(tmp_path)}
    target = control.named_limit_target("partner-api", environ=env)
    documents = [
        {"role": "leader", "pools": {}, "limits": {"partner-api": {"limit": 4, "in_use": 2}}},
        {"role": "leader", "pools": {}, "limits": {"partner-api": {"limit": 4, "in_use": 2}}},
        {"role": "leader", "pools": {}, "limits": {"partner-api": {"limit": 0, "in_use": 2}}},
        {"role": "leader", "pools": {}, "limits": {"partner-api": {"limit": 0, "in_use": 2}}},
        {"role": "leader", "pools": {}, "limits": {"partner-api": {"limit": 0, "in_use": 0}}},
    ]
    monkeypatch.setattr(
        control,
        "fetch_status",
        lambda _url: documents.pop(0) if len(documents) > 1 else documents[0],
    )
    sfn: Any = FakeSFN({})
    assert await control.wait_drained(sfn, target, 0.001, 20, url="http://x/status") == 0
    assert capsys.readouterr().out.splitlines() == [
        "named limit partner-api: 2 in use",
        "named limit partner-api: 0 in use",
        "named limit partner-api drained: nothing uses it; it stays paused until `resume`",
    ]
    monkeypatch.setattr(control, "fetch_status", lambda _url: {"role": "leader", "pools": {}})
    with pytest.raises(UserError, match="http://x/status governs named limits \\(none\\), not"):
        await control.wait_drained(sfn, target, 0.001, 20, url="http://x/status")


def test_a_paused_named_limit_is_one_line_that_says_paused() -> None:
    blocked = "named limit api is paused (limit 0)"
    named = {"limit": 0, "in_use": 3, "users": {"a": 1, "b": 2}}
    named |= {"waiting_pools": [], "blocked": {"a": blocked, "b": blocked}}
    lines = render_status({"pools": {}, "limits": {"api": named}}, "http://x").splitlines()
    assert lines[-1] == "named limit api: 3 of 0 in use, paused (a x1, b x2)"
