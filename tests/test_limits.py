"""Live limits without AWS: parsing a limit, what a config reload may change, and reading
the parameter for pause and resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog.testing
from botocore.exceptions import ClientError
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from dispatcher.cli.control import last_running_limit, read_limit
from dispatcher.daemon.limits import LiveLimits, parse_limit
from dispatcher.daemon.metrics import Metrics
from dispatcher.daemon.pool import Pool
from dispatcher.daemon.ratelimit import RateLimiters
from dispatcher.daemon.service import Dispatcher, RestartNeededError
from dispatcher.errors import UserError
from dispatcher.settings.layout import load

pytestmark = pytest.mark.timeout(10)

ARN = "arn:aws:states:eu-west-1:123456789012:stateMachine:reports"
QUEUE = "https://sqs.eu-west-1.amazonaws.com/123456789012/requests"
EVENTS = "https://sqs.eu-west-1.amazonaws.com/123456789012/events"


@pytest.mark.parametrize("text", ["7", " 12\n", "0", "100000"])
def test_whole_numbers_up_to_the_maximum_are_limits(text: str) -> None:
    assert parse_limit(text) == int(text)


@pytest.mark.parametrize("text", ["", "lots", "-1", "2.5", "100001", "1e3"])
def test_anything_else_is_refused_naming_the_value(text: str) -> None:
    with pytest.raises(ValueError, match="is not a limit: use a whole number from 0 to 100000"):
        parse_limit(text)


def write(path: Path, pool: str) -> None:
    """A one-pool config file with these extra pool lines."""
    path.write_text(
        f'[pools.reports]\nstate_machine_arn = "{ARN}"\n{pool}\n'
        f'[[queues]]\nurl = "{QUEUE}"\npool = "reports"\n'
    )


def live(path: Path) -> tuple[LiveLimits, Pool]:
    """Live limits over the file, as the service builds them (no SSM client needed)."""
    env = {"DISPATCHER_CONFIG": str(path), "DISPATCHER_EVENTS_QUEUE_URL": EVENTS}
    loaded = load(env=env)
    metrics = Metrics(CollectorRegistry())
    pool = Pool(loaded.layout.pools[0], metrics)
    limiters = RateLimiters(metrics, rate=None, burst=None, floor=1.0)
    limits = LiveLimits(
        loaded.settings,
        loaded.layout,
        {"reports": pool},
        ssm=None,
        metrics=metrics,
        limiters=limiters,
    )
    limits.environ = env
    return limits, pool


def test_a_reload_applies_limits_and_leaves_structure_alone(tmp_path: Path) -> None:
    """Limit and per-key limit change live; a new key attribute needs a restart, so the
    pool keeps counting as before rather than half-switching."""
    path = tmp_path / "c.toml"
    write(path, 'limit = 3\nkey_attribute = "tenant"\nper_key_limit = 1')
    limits, pool = live(path)
    write(path, 'limit = 5\nkey_attribute = "tenant"\nper_key_limit = 2')
    assert limits.reload() is True
    assert (pool.ledger.limit, pool.ledger.per_key_limit) == (5, 2)
    write(path, 'limit = 8\nkey_attribute = "customer"\nper_key_limit = 4')
    assert limits.reload() is True
    assert (pool.ledger.limit, pool.ledger.per_key_limit) == (5, 2)
    assert pool.config.key_attribute == "tenant"
    assert limits.layout.pools[0].key_attribute == "tenant"


# --- the operator's side: reading the parameter for pause/resume/drain ----------------------


class FakeSsm:
    """A parameter's history in pages of two (newest version last, as SSM lists it)."""

    def __init__(self, values: list[str]) -> None:
        self.values = values
        self.pages = 0

    async def get_parameter_history(self, **kwargs: Any) -> dict[str, Any]:
        """One page of two versions."""
        self.pages += 1
        start = int(kwargs.get("NextToken", 0))
        entries = [
            {"Version": n + 1, "Value": v}
            for n, v in enumerate(self.values)
            if start <= n < start + 2
        ]
        more = start + 2 < len(self.values)
        return {"Parameters": entries, **({"NextToken": str(start + 2)} if more else {})}

    async def get_parameter(self, **kwargs: Any) -> dict[str, Any]:
        """Missing, as SSM says it."""
        error = {"Error": {"Code": "ParameterNotFound", "Message": "nope"}}
        raise ClientError(error, "GetParameter")  # type: ignore[arg-type]


async def test_resume_finds_the_newest_non_zero_limit_across_pages() -> None:
    fake = FakeSsm(["5", "9", "0", "x", "0"])
    assert await last_running_limit(fake, "/l") == 9  # type: ignore[arg-type]
    assert fake.pages == 3
    assert await last_running_limit(FakeSsm(["0", "0"]), "/l") is None  # type: ignore[arg-type]


async def test_a_missing_parameter_says_how_to_create_it() -> None:
    with pytest.raises(UserError, match=r"SSM parameter /l does not exist: create it with"):
        await read_limit(FakeSsm([]), "/l")  # type: ignore[arg-type]


# --- which source sets the limit --------------------------------------------------------------


class ParameterSsm:
    """One parameter holding a limit."""

    def __init__(self, value: str) -> None:
        self.value = value

    async def get_parameter(self, **kwargs: Any) -> dict[str, Any]:
        return {"Parameter": {"Name": kwargs["Name"], "Value": self.value}}


def with_parameter(
    value: str, overrides: dict[str, Any], env: dict[str, str]
) -> tuple[LiveLimits, Pool]:
    """Live limits of one pool whose limit lives in SSM parameter /l, as `run` builds them."""
    env = {
        "DISPATCHER_STATE_MACHINE_ARN": ARN,
        "DISPATCHER_REQUEST_QUEUE_URL": QUEUE,
        "DISPATCHER_EVENTS_QUEUE_URL": EVENTS,
        "DISPATCHER_LIMIT_PARAMETER": "/l",
        **env,
    }
    loaded = load(overrides, env=env)
    metrics = Metrics(CollectorRegistry())
    pool = Pool(loaded.layout.pools[0], metrics)
    limits = LiveLimits(
        loaded.settings,
        loaded.layout,
        {pool.name: pool},
        ssm=ParameterSsm(value),  # type: ignore[arg-type]
        metrics=metrics,
        limiters=RateLimiters(metrics, rate=None, burst=None, floor=1.0),
    )
    limits.overrides, limits.environ = overrides, env
    return limits, pool


@pytest.mark.parametrize(
    ("overrides", "env", "given"),
    [
        ({"limit": 3}, {}, "--limit 3"),
        ({}, {"DISPATCHER_LIMIT": "3"}, "DISPATCHER_LIMIT=3"),
    ],
)
async def test_a_limit_the_parameter_overrides_is_a_warning_naming_both(
    overrides: dict[str, Any], env: dict[str, str], given: str
) -> None:
    limits, pool = with_parameter("10", overrides, env)
    with structlog.testing.capture_logs() as lines:
        assert await limits.refresh_once() == 1
        assert await limits.refresh_once() == 0
    assert pool.ledger.limit == 10
    [warning] = [line for line in lines if line["event"] == "dispatcher.limit_overridden"]
    assert warning["log_level"] == "warning"
    assert (warning["limit"], warning["source"], warning["overrides"]) == (
        10,
        "SSM parameter /l",
        given,
    )
    assert f"to use {given}, write it to the parameter" in warning["why"]


async def test_a_parameter_that_agrees_says_it_is_the_source() -> None:
    limits, _ = with_parameter("3", {"limit": 3}, {})
    with structlog.testing.capture_logs() as lines:
        await limits.refresh_once()
    assert [(line["event"], line["source"]) for line in lines] == [
        ("dispatcher.limit_source", "/l")
    ]


def test_a_reload_names_every_change_it_cannot_apply(tmp_path: Path) -> None:
    """Process settings in the file: the reconcile interval applies live; the others are
    each logged by name, old -> new, as needing a restart (with the pool's ARN and the
    queues), and the rest of the file still applies."""
    path = tmp_path / "c.toml"
    path.write_text(
        "[dispatcher]\nreconcile_interval = 60\nreceive_concurrency = 4\n"
        f'[pools.reports]\nstate_machine_arn = "{ARN}"\nlimit = 3\n'
        f'[[queues]]\nurl = "{QUEUE}"\npool = "reports"\n'
    )
    limits, pool = live(path)
    other = ARN.replace("reports", "invoices")
    path.write_text(
        "[dispatcher]\nreconcile_interval = 20\nreceive_concurrency = 2\nlease_ttl = 30\n"
        f'[pools.reports]\nstate_machine_arn = "{ARN}"\nlimit = 5\n'
        f'[pools.invoices]\nstate_machine_arn = "{other}"\nlimit = 1\n'
        f'[[queues]]\nurl = "{QUEUE}"\npool = "reports"\n'
        f'[[queues]]\nurl = "{QUEUE}-2"\npool = "invoices"\n'
    )
    with capture_logs() as logs:
        assert limits.reload() is True
    restart = [e["change"] for e in logs if e["event"] == "dispatcher.reload_needs_restart"]
    assert restart[0] == "pool invoices added"
    assert restart[1].startswith(f"queues {QUEUE} (reports) -> {QUEUE} (reports), {QUEUE}-2")
    assert restart[2:] == ["receive_concurrency 4 -> 2", "lease_ttl 15.0 -> 30.0"]
    assert all(e["why"] == "needs a restart" for e in logs if "change" in e)
    assert limits.settings.reconcile_interval == 20
    assert limits.settings.receive_concurrency == 4
    assert pool.ledger.limit == 5


class _Lease:
    """A lease just taken (`_take_office` tells it when the predecessor has settled)."""

    def __init__(self) -> None:
        self.settled_once = False

    def settled(self) -> None:
        self.settled_once = True


async def test_a_standby_taking_over_under_a_changed_pool_exits_to_be_restarted(
    tmp_path: Path,
) -> None:
    """The limit moves from the file to a parameter (then lowered there) while a standby
    waits: taking over, it would govern with the file's limit and never read the
    parameter. It starts nothing, hands the lease on and exits (status 2) to be restarted
    with the file."""
    path = tmp_path / "c.toml"
    write(path, "limit = 7")
    limits, _ = live(path)
    service = Dispatcher(limits.settings, layout=limits.layout, serve_http=False)
    service.limits = limits
    listed: list[bool] = []

    async def startup_listing() -> None:
        listed.append(True)

    service._startup_listing = startup_listing  # type: ignore[method-assign]
    write(path, 'limit = 7\nlimit_parameter = "/sfn-dispatcher/reports/limit"')
    lease = _Lease()
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(service._take_office, lease, 0.0)  # type: ignore[arg-type]
            with anyio.fail_after(5):
                await service._stop.wait()  # what ends the reign before its first start
            tg.cancel_scope.cancel()  # as the reign's stop does
    assert listed == [True]
    assert not lease.settled_once  # never ready: no reign begins
    [needed] = [e for e in logs if e["event"] == "dispatcher.restart_needed"]
    assert needed["changes"] == [
        "pool reports limit_parameter None -> '/sfn-dispatcher/reports/limit'"
    ]
    assert service._restart_needed == needed["changes"]  # `run` then raises, status 2:
    assert RestartNeededError.exit_code == 2


async def test_a_standby_taking_over_applies_limits_of_an_unchanged_structure(
    tmp_path: Path,
) -> None:
    """The same take-over with only a live value changed: it takes office, limit applied."""
    path = tmp_path / "c.toml"
    write(path, "limit = 7")
    limits, pool = live(path)
    service = Dispatcher(limits.settings, layout=limits.layout, serve_http=False)
    service.limits = limits

    async def startup_listing() -> None:
        pass

    service._startup_listing = startup_listing  # type: ignore[method-assign]
    write(path, "limit = 1")
    lease = _Lease()
    with anyio.fail_after(5):
        await service._take_office(lease, 0.0)  # type: ignore[arg-type]
    assert lease.settled_once
    assert not service._stop.is_set()
    assert pool.ledger.limit == 1
