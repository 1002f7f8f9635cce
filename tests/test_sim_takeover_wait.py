"""Buggify's ``long_d_takeover`` (`sim.takeover_wait`): a long-D leader's starts land after
a short-D successor took its lease over; a successor that waits only its own D + grace is
caught."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog

from sim import __main__ as sim_cli
from sim import buggify, takeover_wait
from sim.calls import NO_FAULT, CallFault
from sim.harness import scenario, simulate

SEEDS = range(200)


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    """The dispatcher's log lines are not what is tested here."""
    sim_cli._quiet_logs(verbose=False)
    yield
    structlog.reset_defaults()


def _on() -> list[int]:
    return [seed for seed in SEEDS if takeover_wait.long_d_nodes(scenario(seed))]


def test_the_knob_is_on_only_in_rolling_seeds_with_a_long_d_pair() -> None:
    on = _on()
    assert len(on) >= 3
    for seed in on:
        plan = scenario(seed).extras.rolling
        assert plan is not None
        assert plan.burst_first
        assert plan.long_d_hang is not None


def test_the_deploys_wait_until_the_take_over_is_over() -> None:
    for seed in _on():
        made = scenario(seed)
        plan = made.extras.rolling
        assert plan is not None
        assert min(s.at for s in plan.steps) >= takeover_wait.CLEAR
        assert all(h.at >= takeover_wait.CLEAR for h in plan.hangs)
        assert made.quiet_at >= max(takeover_wait.QUIET_AT, *(s.at for s in plan.steps))
        assert not made.knobs.long_outside


def test_a_seed_without_the_knob_is_the_seed_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    made = {seed: scenario(seed) for seed in range(60)}
    off = [seed for seed, m in made.items() if not takeover_wait.long_d_nodes(m)]
    monkeypatch.setattr(takeover_wait, "SHARE", 0.0)
    for seed in off:
        assert scenario(seed) == made[seed], seed


def test_without_buggify_the_knob_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(buggify, "BUGGIFY", False)
    assert not any(takeover_wait.long_d_nodes(scenario(seed)) for seed in range(120))


def test_only_the_long_d_process_starts_are_held_to_its_d() -> None:
    seed = _on()[0]
    made = scenario(seed)
    (node,) = takeover_wait.long_d_nodes(made)
    fault = CallFault(error="X")
    decide = takeover_wait.faults(lambda *_: fault, made, lambda: 1.0)
    held = decide(f"{node}.1", "StartExecution", {})
    assert held.apply_at_deadline
    assert held.error is None  # the client times out at D: applied then
    assert decide(f"{node}.1", "ListExecutions", {}) is fault
    assert decide("d2.1", "StartExecution", {}) is fault
    after = takeover_wait.faults(lambda *_: NO_FAULT, made, lambda: made.quiet_at)
    assert after(f"{node}.1", "StartExecution", {}) == NO_FAULT  # the faults stopped


def test_a_successor_that_ignores_the_recorded_wait_is_caught() -> None:
    """Seed 115: d1 (D 40 s) sends three starts as its renewal hangs; d2 (D 3 s, grace
    10 s) takes the lease over and, waiting only its own 13 s, lists before they land."""
    assert simulate(115).ok
    outcome = simulate(115, bugs=("takeover-ignores-recorded-wait",))
    assert "limit" in {v.kind for v in outcome.violations}
