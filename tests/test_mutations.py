"""The simulation's power, measured: each mutation of `sim.mutations` takes one safety
rule out of the dispatcher, and some seed of the fast subset must catch it.

`make mutate` prints the whole kill matrix (`python -m sim --mutate`); here every
mutation is hunted over the same 200 seeds, stopping at the first that catches it.
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Iterator

import pytest
import structlog

from dispatcher.ledger import Change, Ledger
from sim import __main__ as sim_cli
from sim.bugs import patched, put_back
from sim.harness import simulate
from sim.mutations import (
    CATALOGUE,
    MUTATIONS,
    NOT_YET_CAUGHT,
    SEEDS,
    Edit,
    Mutation,
    MutationError,
    function_of,
    matrix,
    probes,
    survey,
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


@pytest.mark.timeout(900)
def test_every_mutation_is_caught_within_the_fast_subset() -> None:
    """The kill matrix over the 200 seeds `make test` runs (two processes, each mutation
    stopped at its first catching seed)."""
    hunted = [n for n in MUTATIONS if n not in NOT_YET_CAUGHT]
    results = matrix(hunted, range(SEEDS), workers=2).results
    missed = {n: r["rule"] for n, r in results.items() if r["caught_at_seed"] is None}
    assert not missed, f"not caught within {SEEDS} seeds: {missed}"
    for name, result in results.items():
        assert result["violations"], f"{name} was caught only by an error: {result['errors']}"
