"""A pytest plugin for `make mutmut` only (``-p tests.mutation_plugin``).

Two things make a mutation run affordable on two shared cores without changing what the
tests check:

- Hypothesis does not shrink: a mutant is killed by the first failing example, and
  shrinking a failing stateful run (60 steps, 500 sequences) can take minutes. The
  ledger's property tests pass explicit settings; those inherit the profile loaded here,
  before the test modules are imported, for everything they leave unset (``phases``).
- The cheap tests run first (pytest stops at the first failure): unit tests, then the
  keyed property test, then the simulation seeds, then the 11 s stateful test.
"""

from __future__ import annotations

import pytest
from hypothesis import Phase, settings

settings.register_profile(
    "mutmut", phases=[Phase.explicit, Phase.reuse, Phase.generate], print_blob=False
)
settings.load_profile("mutmut")

_LAST = (
    "test_per_key_limits_survive_the_world",
    "mutation_sim_seeds.py::",
    "test_the_ledger_survives_the_world",
)


def _cost(item: pytest.Item) -> int:
    for rank, marker in enumerate(_LAST, start=1):
        if marker in item.nodeid:
            return rank
    return 0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_cost)
