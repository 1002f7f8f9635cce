"""A few seeds of the simulation, one test each: the simulation's share of `make mutmut`.

Not collected by `make test` (the file name does not start with ``test_``; the 200-seed
subset in test_simulation.py runs there). `make mutmut` names this file explicitly, so
each mutant of the ledger that the unit and property tests let through also meets the
production dispatcher under the nemesis; one test per seed lets pytest stop at the first
seed that fails.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import structlog

from sim import __main__ as sim_cli
from sim.harness import simulate

SEEDS = int(os.environ.get("MUTMUT_SIM_SEEDS", "20"))


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    sim_cli._quiet_logs(verbose=False)
    yield
    structlog.reset_defaults()


@pytest.mark.parametrize("seed", range(SEEDS))
def test_a_seed_holds_every_invariant(seed: int) -> None:
    outcome = simulate(seed)
    assert outcome.ok, sim_cli.describe(outcome)
