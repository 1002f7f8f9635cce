"""Buggify's ``late_redrives`` (`sim.redrives`): a governed execution fails while its pool
is full and is redriven seconds later; the failure's status event arrives after the
redriven run is counted against the limit, or on time."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog

from sim import __main__ as sim_cli
from sim import buggify, redrives
from sim.harness import scenario, simulate
from sim.nemesis import STORM_MAX


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    """The dispatcher's log lines are not what is tested here."""
    sim_cli._quiet_logs(verbose=False)
    yield
    structlog.reset_defaults()


SEED = 31
"""A seed with the knob on (no parent workflows)."""
GRACE = 30.0 + STORM_MAX + 45.0
"""The checker's grace for outside runs in that seed (its reconcile interval is 30 s)."""


def test_the_knob_draws_from_its_own_stream() -> None:
    """A seed's other knobs are what they were before the knob was added."""
    for seed in range(100):
        knobs = buggify.draw(seed)
        if not buggify.own_scenario(knobs):
            assert knobs.late_redrives == redrives.drawn(seed)
    assert scenario(SEED).knobs.late_redrives


def test_never_with_parent_workflows() -> None:
    """A failed child answers its parent: seeds with parents run as if it was not drawn."""
    for seed in range(200):
        made = scenario(seed)
        if redrives.drawn(seed) and made.parents.parents:
            assert not made.knobs.late_redrives


def test_late_news_arrives_while_the_redriven_run_is_counted() -> None:
    grace = 225.0
    planned = redrives.plan(SEED, 50.0, grace)
    assert sorted(r.late for r in planned) == [False, True]
    for redrive in planned:
        assert redrive.fail_at > 50.0
        if redrive.late:
            # Counted from the redrive plus the grace; still running when the news comes.
            assert redrive.delay > redrive.gap + grace
            assert redrive.gap + redrive.duration > redrive.delay
        else:
            assert redrive.delay == 0.0
            assert redrive.duration > grace


def test_a_run_fails_and_redrives_with_late_news_and_news_on_time() -> None:
    outcome = simulate(SEED)
    assert outcome.ok, outcome.violations
    history = outcome.world.history
    failed = {
        e.arn: e.runs[0].stop
        for e in history.executions.values()
        if len(e.runs) > 1 and e.runs[0].status == "FAILED"
    }
    assert len(failed) >= redrives.REDRIVES
    late = {
        min(event.deliveries) - event.time > GRACE
        for event in history.events
        if event.execution_arn in failed
        and event.status == "FAILED"
        and event.redrive_count == 0
        and event.deliveries
    }
    assert late == {False, True}
