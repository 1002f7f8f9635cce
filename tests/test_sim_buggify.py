"""Buggify (`sim.buggify`): the knobs are drawn from the seed, stay within what AWS
documents or the dispatcher assumes, and make the simulation notice a safety rule taken
out of the dispatcher."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import structlog

from dispatcher.core.ledger import Change, Ledger
from sim import __main__ as sim_cli
from sim import buggify
from sim.harness import DISPATCHER, PoolPlan, Run, Scenario, scenario, simulate
from sim.nemesis import Action, Nemesis


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    """The dispatcher's log lines are not what is tested here."""
    sim_cli._quiet_logs(verbose=False)
    yield
    structlog.reset_defaults()


def test_each_knob_is_on_in_a_share_of_the_seeds() -> None:
    drawn = [buggify.draw(seed) for seed in range(1000)]
    for name in buggify.Knobs().__dataclass_fields__:
        share = sum(bool(getattr(k, name)) for k in drawn) / len(drawn)
        assert 0.2 <= share <= 0.4, (name, share)
    assert {k.max_receive_count for k in drawn} == {None, 2, 3, 5}
    assert buggify.draw(17) == buggify.draw(17)


def test_the_listing_lag_stays_under_the_start_grace() -> None:
    """docs/testing.md assumes ListExecutions lags by less than the start grace: at the grace
    means just under it, never beyond."""
    lags = {scenario(seed).listing_lag for seed in range(300)}
    grace = float(DISPATCHER["start_grace"])
    assert grace - buggify.GRACE_MARGIN in lags
    assert max(lags) < grace


def test_without_buggify_no_knob_is_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(buggify, "BUGGIFY", False)
    assert all(scenario(seed).knobs == buggify.OFF for seed in range(50))


# -- outside executions are judged ------------------------------------------------------------

CONSOLE_RUN_SECONDS = 500
OUTSIDE_RUNS = Scenario(
    seed=0,
    pools=(PoolPlan("p0", limit=2, parameter=False, per_key_limit=None, priorities=False),),
    lease=False,
    shared_queue=False,
    requests=6,
    quiet_at=300.0,
    max_seconds=60,
    request_times=(230.0, 235.0, 240.0, 245.0, 250.0, 255.0),
)


def two_console_runs(run: Run) -> Nemesis:
    """No faults; two executions started from the console early on, running for minutes:
    they hold both slots of the pool."""
    return Nemesis(
        rng=random.Random(0),
        clock=run.clock,
        quiet_at=run.plan.quiet_at,
        drizzle=0.0,
        actions=[
            Action(10.0, "outside_start", "", CONSOLE_RUN_SECONDS, "p0"),
            Action(15.0, "outside_start", "", CONSOLE_RUN_SECONDS, "p0"),
        ],
    )


def ignore_the_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Take a safety rule out: executions the dispatcher did not start are not counted."""
    observe = Ledger.observe_running

    def observe_running(self: Ledger, arn: str, now: float, redrive_count: int = 0) -> Change:
        if ":console-" in arn:
            return Change.UNCHANGED
        return observe(self, arn, now, redrive_count)

    monkeypatch.setattr(Ledger, "observe_running", observe_running)


def test_a_dispatcher_that_ignores_outside_runs_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Outside runs long enough to outlast the checker's grace (the time within which the
    dispatcher must know of them): ignoring them puts the pool over its limit."""
    held = simulate(0, plan=OUTSIDE_RUNS, nemesis=two_console_runs)
    assert held.ok, sim_cli.describe(held)
    ignore_the_console(monkeypatch)
    broken = simulate(0, plan=OUTSIDE_RUNS, nemesis=two_console_runs)
    assert "limit" in {v.kind for v in broken.violations}, sim_cli.describe(broken)
