"""Named limits in the simulation (sim/named.py): the checker's ``named_limit`` rule fires
on hand-built histories and passes clean ones; seeds with a named limit hold it, and a
mutation that ignores the weights is caught by a seed of the fast subset."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog

from dispatcher.core.shared_limits import SharedLimits
from sim import __main__ as sim_cli
from sim import named
from sim.bugs import patched
from sim.harness import scenario, simulate
from sim.history import OUTSIDE, History
from sim.mutations import Edit, Mutation
from tests.test_sim_checker import spec

A = "arn:aws:states:eu-west-1:123456789012:stateMachine:a"
B = "arn:aws:states:eu-west-1:123456789012:stateMachine:b"
ARNS = {"p0": A, "p1": B}
PLAN = named.NamedPlan(limit=4, parameter=True, weights=(("p0", 1), ("p1", 2)))


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    sim_cli._quiet_logs(verbose=False)
    yield
    structlog.reset_defaults()


def started(
    history: History, machine: str, name: str, start: float, stop: float, *, node: str = "d1"
) -> None:
    arn = f"{machine}:{name}".replace("stateMachine", "execution")
    history.execution_started(
        start, node, arn=arn, state_machine_arn=machine, name=name, input="{}"
    )
    history.execution_ended(stop, arn, "SUCCEEDED")


def kinds(history: History, plan: named.NamedPlan = PLAN) -> list[str]:
    return [v.kind for v in named.check(history, plan, ARNS, spec(staleness=5.0))]


def test_starts_within_the_weighted_limit_pass() -> None:
    history = History()
    started(history, A, "a1", 0.0, 10.0)
    started(history, A, "a2", 1.0, 10.0)
    started(history, B, "b1", 2.0, 10.0)  # 1 + 1 + 2 = 4
    started(history, B, "b2", 10.0, 20.0)  # the others ended at 10: 2
    assert kinds(history) == []


def test_a_start_over_the_weighted_limit_is_caught() -> None:
    history = History()
    started(history, A, "a1", 0.0, 10.0)
    started(history, B, "b1", 1.0, 10.0)
    started(history, B, "b2", 2.0, 10.0)  # 1 + 2 + 2 = 5 > 4
    [violation] = named.check(history, PLAN, ARNS, spec())
    assert violation.kind == "named_limit"
    assert "5 units in use when b2 started (limit 4" in violation.message


def test_the_value_in_force_is_read_from_the_parameter_with_its_staleness() -> None:
    history = History()
    history.parameter_put(5.0, named.PARAMETER, "2", 2)
    started(history, B, "b1", 6.0, 30.0)  # 2 of 4: the old value still may be in force
    started(history, A, "a1", 8.0, 30.0)  # 3 > 2, within staleness (5 s) of the change: 4
    started(history, A, "a2", 20.0, 30.0)  # 4 > 2, long after the change
    found = named.check(history, PLAN, ARNS, spec(staleness=5.0))
    assert [(v.kind, v.time) for v in found] == [("named_limit", 20.0)]


def test_an_outside_start_counts_once_its_grace_is_over() -> None:
    history = History()
    started(history, B, "console", 0.0, 100.0, node=OUTSIDE)
    started(history, B, "b1", 1.0, 100.0)  # the outside run is not known yet
    started(history, A, "a1", 50.0, 100.0)  # 2 + 2 + 1 > 4: it has been known for long
    found = named.check(history, PLAN, ARNS, spec(outside_grace=30.0))
    assert [v.time for v in found] == [50.0]


def test_a_seed_without_a_named_limit_is_as_it_was() -> None:
    plain = [s for s in range(40) if scenario(s).named is None]
    assert plain, "most seeds have no named limit"
    drawn = [scenario(s) for s in range(200) if scenario(s).named is not None]
    assert len(drawn) > 20
    for made in drawn:
        plan = made.named
        assert plan is not None
        assert len(made.pools) >= 2
        assert made.extras.rolling is None
        assert max(w for _, w in plan.weights) <= plan.limit  # the file is valid
        assert len({w for _, w in plan.weights}) > 1 or len(plan.weights) > 2


@pytest.mark.timeout(300)
def test_seeds_with_a_named_limit_hold_it() -> None:
    seeds = [s for s in range(120) if scenario(s).named is not None]
    failed = [o for o in (simulate(s) for s in seeds) if not o.ok]
    assert not failed, "\n\n".join(sim_cli.describe(o) for o in failed[:2])


def test_ignoring_the_weights_is_caught_by_a_seed() -> None:
    """The first seed of the fast subset with a named limit (its weights 3 and 2)."""
    assert simulate(1).ok
    mutated = simulate(1, bugs=("named-limit-ignores-weight",))
    assert {v.kind for v in mutated.violations} == {"named_limit"}


IGNORES_DOUBT = Mutation(
    "named-limit-ignores-doubt",
    "named limits",
    "a start in doubt holds its units of every named limit until evidence settles it",
    Edit(
        SharedLimits,
        "in_use",
        "return sum(w * self._ledger_of(p).held for p, w in self._users[name].items())",
        "return sum(\n    w * (self._ledger_of(p).held - self._ledger_of(p).doubt_count)\n"
        "    for p, w in self._users[name].items()\n)",
    ),
    also=(
        Edit(
            SharedLimits,
            "admits",
            "committed += users[user] * (\n"
            "    ledger.running_count + ledger.doubt_count + ledger.sent_count\n"
            ")",
            "committed += users[user] * (ledger.running_count + ledger.sent_count)",
        ),
    ),
)
"""Not in the catalogue: no seed of the fast subset catches it (seed 251 does, the first
of the 2,000 seeds `make simulate` runs): starts in doubt while a named limit is full are
rare in the drawn scenarios."""


@pytest.mark.timeout(120)
def test_ignoring_starts_in_doubt_is_caught_by_a_seed_beyond_the_fast_subset() -> None:
    assert simulate(251).ok
    with patched(IGNORES_DOUBT.patches()):
        mutated = simulate(251)
    assert {v.kind for v in mutated.violations} == {"named_limit"}
