"""Buggify's ``exists_unknown`` (`sim.exists`): StartExecution says an execution exists,
DescribeExecution fails, and meanwhile the execution is redriven."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import structlog

from sim import __main__ as sim_cli
from sim import buggify, exists, harness
from sim.checker import told_exists
from sim.harness import scenario, simulate

SEED = 22
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
            assert knobs.exists_unknown == exists.drawn(seed)
    assert scenario(SEED).knobs.exists_unknown


def test_never_with_parents_a_rolling_deploy_or_a_new_key_attribute_as_if_not_drawn() -> None:
    for seed in range(200):
        made = scenario(seed)
        if buggify.own_scenario(made.knobs):
            continue  # a scenario of its own
        if exists.drawn(seed) and not made.knobs.exists_unknown:
            without = dataclasses.replace(made.knobs, exists_unknown=False)
            assert made == harness._scenario(seed, without, None)
        if made.knobs.exists_unknown:
            assert not made.parents.parents
            assert made.extras.rolling is None
            assert not any(r.what == "key_attribute" for r in made.extras.reconfigures)


def test_the_redrive_follows_already_exists_while_describes_fail() -> None:
    outcome = simulate(SEED)
    assert outcome.ok, outcome.violations
    history = outcome.world.history
    texts = [r.text for r in history.records]
    failed = next(t for t in texts if t.startswith("exists_unknown:") and t.endswith("fails"))
    name = failed.split()[1]
    exists_at = min(
        r.time
        for r in history.records
        if r.kind == "call"
        and r.text.startswith(f"StartExecution name={name} ")
        and r.details.get("outcome") == "ERROR ExecutionAlreadyExists"
        and r.time > 200
    )
    [execution] = [e for e in history.executions.values() if e.name == name]
    redrive = execution.runs[1]
    assert exists_at < redrive.start < exists_at + 1.0
    refused = [
        r
        for r in history.records
        if r.kind == "call"
        and r.text.startswith(f"DescribeExecution name={name}")
        and exists_at <= r.time <= redrive.start + 5
    ]
    assert refused
    assert all(str(r.details.get("outcome")).startswith("REFUSED") for r in refused)
    # The checker counts the redriven run from its start.
    assert (execution.arn, redrive.seq) in told_exists(history)
