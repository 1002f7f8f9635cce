"""The simulation's power, measured: each mutation of `sim.mutations` takes one safety
rule out of the dispatcher, and some seed of the fast subset must catch it.

`make mutate` prints the whole kill matrix (`python -m sim --mutate`); here every
mutation is hunted over the same 200 seeds, stopping at the first that catches it.
"""

from __future__ import annotations

import importlib
import inspect
import json
import textwrap
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import anyio
import pytest
import stamina
import structlog

from dispatcher.core.ledger import Change, Ledger
from sim import __main__ as sim_cli
from sim.bugs import patched
from sim.changes import put_back
from sim.harness import simulate
from sim.killmatrix import README_MARKERS, markdown, probes, survey
from sim.mutations import (
    CATALOGUE,
    MUTATIONS,
    NOT_YET_CAUGHT,
    OUTSIDE_MODEL,
    SEEDS,
    Edit,
    Mutation,
    MutationError,
    function_of,
)
from tests.test_simulation import digest


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    """The dispatcher's log lines, thousands per seed, are not what is tested here."""
    sim_cli._quiet_logs(verbose=False)
    yield
    structlog.reset_defaults()


KINDS = {
    "outcome classification",
    "retry admission",
    "doubt settlement",
    "listing cutoff",
    "take-over wait",
    "tombstones",
    "redrive counts",
    "adoption",
    "deferral memory",
    "token answer and deletion",
    "orphan checks",
    "name derivation",
    "dead-lettering while in doubt",
    "redrive identity",
}


def test_the_catalogue_covers_every_class_with_at_least_twenty_mutations() -> None:
    assert len(CATALOGUE) >= 20
    assert len(MUTATIONS) == len(CATALOGUE), "two mutations share a name"
    assert {m.kind for m in CATALOGUE} >= KINDS
    for mutation in CATALOGUE:
        assert mutation.rule, mutation.name
        assert "\n" not in mutation.rule, mutation.name


@pytest.mark.parametrize("mutation", CATALOGUE, ids=lambda m: m.name)
def test_each_mutation_changes_the_code_it_names(mutation: Mutation) -> None:
    """The target exists, its text is found once, the edit compiles to other code, and a
    run with the mutation sees the edited function (put back afterwards)."""
    edited = []
    for edit in mutation.edits:
        function = function_of(edit.original())
        source = textwrap.dedent(inspect.getsource(function))
        assert edit.apply(source) != source
        changed = function_of(edit.compile()).__code__
        assert (changed.co_code, changed.co_consts) != (
            function.__code__.co_code,
            function.__code__.co_consts,
        )
        edited.append((edit, inspect.getattr_static(edit.owner, edit.attribute), changed))
    patches = {(id(owner), attribute): new for owner, attribute, new in mutation.patches()}
    with put_back((mutation.name,)):
        for edit, before, _ in edited:
            live = inspect.getattr_static(edit.owner, edit.attribute)
            assert live is not before
            new = function_of(patches[id(edit.owner), edit.attribute]).__code__
            assert function_of(live).__code__.co_code == new.co_code
    for edit, before, _ in edited:
        assert inspect.getattr_static(edit.owner, edit.attribute) is before


def test_an_edit_whose_text_is_gone_is_refused() -> None:
    edit = Edit(Ledger, "observe_missing", "if now - doubt.since < grazie:", "if False:")
    with pytest.raises(MutationError, match="found 0 times"):
        edit.compile()


def test_a_mutation_takes_its_rule_out_for_the_run_only() -> None:
    """Missing right after the last attempt: the rule keeps the doubt; the mutation frees."""

    def freed_at_once() -> bool:
        ledger = Ledger(1)
        [reservation] = ledger.reserve(1, 0.0)
        ledger.doubt(reservation, "arn", 100.0)
        return ledger.observe_missing("arn", 100.5, grace=10.0) is Change.FREED

    assert not freed_at_once()
    with put_back(("missing-frees-doubt-without-grace",)):
        assert freed_at_once()
    assert not freed_at_once()


def test_the_gaps_name_mutations_of_the_catalogue() -> None:
    assert set(MUTATIONS) >= NOT_YET_CAUGHT


def test_the_probes_change_nothing_but_record_the_lines_reached() -> None:
    """The hunt skips the seeds whose unmutated run never reaches a mutation's line: sound
    only if the probes leave the run as it is."""
    plain = simulate(11)
    found = survey(list(MUTATIONS), [11])
    again = simulate(11)
    assert found[11][0] == plain.ok
    assert set(found[11][1]) <= set(MUTATIONS)
    assert "message-deleted-before-start" in found[11][1]  # every start reaches it
    assert digest(plain) == digest(again)
    with patched(probes(list(MUTATIONS))):
        probed = simulate(11)
    assert digest(probed) == digest(plain)


def test_the_replay_command_of_a_mutation_names_it() -> None:
    assert sim_cli.replay_command(7, ("no-tombstone",)).endswith("--replay 7 --bug no-tombstone")


def _replayed(name: str, seed: int) -> tuple[str, bool, bool, list[str]]:
    """(name, whether the seed holds unmutated, whether it holds mutated, violations)."""
    sim_cli._quiet_logs(verbose=False)
    plain = simulate(seed)
    mutated = simulate(seed, bugs=(name,))
    return name, plain.ok, mutated.ok, sorted({v.kind for v in mutated.violations})


@pytest.mark.timeout(600)
def test_every_mutation_is_caught_within_the_fast_subset() -> None:
    """Each mutation's first catching seed, as `make mutate` stored it in
    sim/results/mutations.json, is within the 200 seeds, holds unmutated and still catches
    it (runs are deterministic: a change that moves it fails here - run `make mutate`
    again). Only `NOT_YET_CAUGHT` may be missing."""
    root = Path(__file__).resolve().parent.parent
    stored = json.loads((root / "sim/results/mutations.json").read_text(encoding="utf-8"))
    seeds = {n: r["caught_at_seed"] for n, r in stored["matrix"].items()}
    missed = {n for n, seed in seeds.items() if seed is None or seed >= SEEDS}
    assert missed <= NOT_YET_CAUGHT, f"not caught within {SEEDS} seeds: {missed - NOT_YET_CAUGHT}"
    assert not NOT_YET_CAUGHT - missed - (set(MUTATIONS) - set(seeds)), "caught now: remove"
    hunted = {n: seeds[n] for n in MUTATIONS if n not in NOT_YET_CAUGHT}
    assert set(hunted) <= set(seeds), f"not in the stored matrix: {set(hunted) - set(seeds)}"
    with ProcessPoolExecutor(max_workers=2) as pool:
        replays = [f.result() for f in [pool.submit(_replayed, n, s) for n, s in hunted.items()]]
    for name, plain_ok, mutated_ok, violations in replays:
        assert plain_ok, f"seed {hunted[name]} fails without {name}"
        assert not mutated_ok, f"seed {hunted[name]} no longer catches {name}"
        assert violations, f"{name} was caught only by an error at seed {hunted[name]}"


def test_the_docs_show_the_stored_kill_matrix() -> None:
    """docs/testing.md carries the table of sim/results/mutations.json (regenerate with
    `python -m sim.killmatrix` after `make mutate`)."""
    root = Path(__file__).resolve().parent.parent
    summary = json.loads((root / "sim/results/mutations.json").read_text(encoding="utf-8"))
    assert set(summary["matrix"]) == set(MUTATIONS), "the stored matrix is of another catalogue"
    begin, end = README_MARKERS
    page = (root / "docs" / "testing.md").read_text(encoding="utf-8")
    assert begin + markdown(summary) + end in page
    assert f"{summary['caught']} of {summary['mutations']}" in page


def _run_unit_test(path: str) -> None:
    """Run the async unit test ``tests/module.py::name`` as pytest would (its module's
    stamina test mode, `tests.conftest.fast_retries`)."""
    module_path, name = path.split("::")
    module = importlib.import_module(module_path.removesuffix(".py").replace("/", "."))
    with stamina.set_testing(True, attempts=getattr(module, "RETRY_ATTEMPTS", 5)):
        anyio.run(getattr(module, name))


@pytest.mark.parametrize("name", sorted(OUTSIDE_MODEL))
def test_a_mutation_outside_the_model_is_killed_by_its_unit_test(name: str) -> None:
    """A rule against AWS behaving beyond the simulation's model: kept out of the kill
    matrix, and its unit test fails with the rule taken out (and passes with it)."""
    mutation, unit_test = OUTSIDE_MODEL[name]
    assert mutation.name == name
    assert name not in MUTATIONS, "in the kill matrix and outside the model"
    assert mutation.kind in KINDS
    _run_unit_test(unit_test)
    with patched(mutation.patches()), pytest.raises(AssertionError):
        _run_unit_test(unit_test)
