"""Live limits without AWS: parsing a limit, and what a config reload may change."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from dispatcher.layout import load
from dispatcher.limits import LiveLimits, parse_limit
from dispatcher.metrics import Metrics
from dispatcher.pool import Pool
from dispatcher.rate import RateLimiters

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
