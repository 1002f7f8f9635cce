"""Buggify's ``key_limit_drops`` (`sim.key_limits`): a key's starts are lost on the wire while
its per-key limit is lowered; the checker judges the per-key limit in force."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import structlog

from sim import __main__ as sim_cli
from sim import buggify, harness, key_limits
from sim.harness import scenario, simulate

SEED = 14
"""A seed with the knob on."""


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    """The dispatcher's log lines are not what is tested here."""
    sim_cli._quiet_logs(verbose=False)
    yield
    structlog.reset_defaults()


def test_the_knob_draws_from_its_own_stream() -> None:
    for seed in range(100):
        knobs = buggify.draw(seed)
        if not buggify.own_scenario(knobs):
            assert knobs.key_limit_drops == key_limits.drawn(seed)
    made = scenario(SEED)
    assert made.knobs.key_limit_drops
    assert made.pools[0].per_key_limit == key_limits.KEY_LIMIT
    assert made.pools[0].limit >= 5


def test_left_out_where_it_cannot_work_as_if_not_drawn() -> None:
    """Not with a rolling deploy, a key_attribute reconfiguration, knobs that refuse every
    retry or send one start at a time, nor parents with heartbeats."""
    for seed in range(200):
        drawn = buggify.draw(seed)
        made = scenario(seed)
        if drawn.key_limit_drops and not made.knobs.key_limit_drops:
            without = dataclasses.replace(made.knobs, key_limit_drops=False)
            assert made == harness._scenario(seed, without, None)


def test_a_pair_of_one_keys_starts_on_the_wire_gets_the_per_key_limit_lowered() -> None:
    outcome = simulate(SEED)
    assert outcome.ok, outcome.violations
    history = outcome.world.history
    puts = [p for p in history.parameter_puts if p.name == key_limits.record(key_limits.POOL)]
    assert [p.value for p in puts] == [str(key_limits.LOWERED), str(key_limits.KEY_LIMIT)]
    lowered = puts[0].time
    assert outcome.nemesis.fired["key_limit_drop_lost"] > 0
    # Lost on the wire then: starts sent just before the drop never ran.
    lost = [
        r
        for r in history.records
        if r.kind == "call" and "StartExecution" in r.text and "LOST" in r.text
    ]
    assert any(lowered - 2.0 <= r.time <= lowered for r in lost)
