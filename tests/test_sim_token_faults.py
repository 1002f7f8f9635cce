"""The token knobs (`sim.token_faults`): drawn from a stream of their own, only in seeds with
parents, within what AWS documents; each makes the simulation catch a rule of the task
token handling taken out of the dispatcher."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator

import pytest
import structlog

from sim import __main__ as sim_cli
from sim import buggify, token_faults
from sim.aws import World, WorldConfig
from sim.calls import NO_FAULT, CallFault
from sim.extras import ExtrasPlan
from sim.harness import scenario, simulate
from sim.parents import ParentPlan, ParentsPlan

SEEDS = range(200)


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    """The dispatcher's log lines are not what is tested here."""
    sim_cli._quiet_logs(verbose=False)
    yield
    structlog.reset_defaults()


def _knobs() -> dict[int, token_faults.TokenKnobs]:
    return {seed: scenario(seed).token_knobs for seed in SEEDS}


def test_the_knobs_are_on_only_in_seeds_with_parents() -> None:
    knobs = _knobs()
    for seed, on in knobs.items():
        if on.on:
            assert scenario(seed).parents.parents, seed
    for name in ("answer_storms", "token_copies", "awaited_orphans"):
        assert sum(bool(getattr(k, name)) for k in knobs.values()) >= 4, name


def test_a_seed_with_the_knobs_off_is_the_seed_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeds without parents, or with every token knob off, do not move: shaping them is
    the identity."""
    made = {seed: scenario(seed) for seed in range(60)}
    monkeypatch.setattr(token_faults, "draw", lambda _seed: token_faults.OFF)
    for seed, with_knobs in made.items():
        if not with_knobs.token_knobs.on:
            assert scenario(seed) == with_knobs, seed


def test_without_buggify_no_token_knob_is_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(buggify, "BUGGIFY", False)
    assert all(not scenario(seed).token_knobs.on for seed in range(60))


def test_answer_storms_fail_each_tokens_answers_for_a_while_from_its_first() -> None:
    now = [10.0]
    storms = token_faults.AnswerStorms(
        lambda *_: NO_FAULT, lambda: now[0], quiet_at=300.0, rng=random.Random(1)
    )
    first = storms("d1.1", "SendTaskSuccess", {"taskToken": "t1"})
    assert first.error in ("ThrottlingException", "ServiceUnavailable")
    assert not first.error_after  # never applied: the parent was not answered
    assert storms("d1.1", "SendTaskHeartbeat", {"taskToken": "t1"}) == NO_FAULT
    now[0] = 10.0 + token_faults.ANSWER_STORM[0] - 1
    assert storms("d1.1", "SendTaskFailure", {"taskToken": "t1"}).error is not None
    assert storms("d1.1", "SendTaskSuccess", {"taskToken": "t2"}).error is not None  # its own
    now[0] = 10.0 + token_faults.ANSWER_STORM[1]
    assert storms("d1.1", "SendTaskSuccess", {"taskToken": "t1"}) == NO_FAULT
    now[0] = 300.0  # the faults stop
    assert storms("d1.1", "SendTaskSuccess", {"taskToken": "t3"}) == NO_FAULT


def test_answer_storms_are_longer_than_an_answers_retries() -> None:
    """`Callbacks._call`: 5 attempts, jittered backoff of at most about 6 s in all."""
    assert token_faults.ANSWER_STORM[0] > 30.0


def test_answer_storms_start_the_parents_early_with_short_children() -> None:
    knobs = _knobs()
    seed = next(s for s, k in knobs.items() if k.answer_storms)
    made = scenario(seed)
    assert made.quiet_at >= 300.0
    for parent in made.parents.parents:
        assert parent.at <= 0.3 * made.quiet_at
        assert max(parent.seconds) <= token_faults.LIGHT_LOAD[1]
    assert not made.knobs.max_receive_count
    assert not made.extras.max_receive_count


def test_token_copies_store_every_token_message_twice_and_only_those() -> None:
    knobs = _knobs()
    seed = next(s for s, k in knobs.items() if k.token_copies)
    made = scenario(seed)
    assert made.knobs.max_receive_count == token_faults.COPIES_MAX_RECEIVE_COUNT
    assert all(p.abort_at is None for p in made.parents.parents)
    assert all(p.seconds[0] >= token_faults.COPIES_LONG_CHILD[0] for p in made.parents.parents)
    world = World(clock=lambda: 0.0, rng=random.Random(1), config=WorldConfig())
    world.sqs.token_duplicate_rate = token_faults.token_duplicates(made)
    queue = world.sqs.queue(world.create_queue("requests", visibility_timeout=60), "SendMessage")
    for _ in range(20):
        assert world.sqs.store(queue, "{}", {"task-token": {}}, sender="t")[1] == 2
        assert world.sqs.store(queue, "{}", {}, sender="t")[1] == 1


def test_awaited_orphans_retry_the_first_parent_and_abort_it_while_its_children_run() -> None:
    knobs = _knobs()
    seed = next(s for s, k in knobs.items() if k.awaited_orphans)
    plan = scenario(seed).parents
    first = plan.parents[0]
    retry = next(p for p in plan.parents if p.retry_of == first.name)
    assert plan.stop_orphans
    assert retry.items() == first.items()  # the same keys and bodies
    assert first.abort_at is not None
    assert first.at < retry.at < first.abort_at < first.at + min(first.seconds)


def test_a_retry_keeps_its_originals_items_when_children_are_lengthened() -> None:
    parent = ParentPlan("parent0", "p0", at=10.0, seconds=(5, 6))
    retry = dataclasses.replace(parent, name="parent0r", at=20.0, retry_of="parent0")
    made = dataclasses.replace(
        scenario(0),
        parents=ParentsPlan(parents=(parent, retry)),
        extras=ExtrasPlan(),
    )
    for seed in SEEDS:
        if token_faults.draw(seed).token_copies:
            shaped = token_faults.shape(seed, dataclasses.replace(made, seed=seed))
            if shaped.token_knobs.token_copies:
                first, again = shaped.parents.parents[:2]
                assert first.items() == again.items()
                return
    pytest.fail("no seed draws token_copies")


# -- each catches the rule it is about (seeds found by the kill matrix) ----------------------


@pytest.mark.parametrize(
    ("mutation", "seed", "kind"),
    [
        ("token-released-when-answer-failed", 0, "early_token_delete"),
        ("orphan-stopped-while-awaited", 100, "stopped_waited_child"),
        ("held-token-forgets-earlier-handles", 114, "redrive_move"),
    ],
)
def test_a_token_rule_taken_out_is_caught(mutation: str, seed: int, kind: str) -> None:
    assert simulate(seed).ok
    outcome = simulate(seed, bugs=(mutation,))
    assert kind in {v.kind for v in outcome.violations}


def test_a_call_fault_is_what_the_nemesis_decides_outside_the_answers() -> None:
    fault = CallFault(error="X")
    storms = token_faults.AnswerStorms(
        lambda *_: fault, lambda: 1.0, quiet_at=300.0, rng=random.Random(1)
    )
    assert storms("d1.1", "StartExecution", {}) is fault
    assert storms("producer", "SendTaskSuccess", {"taskToken": "t"}) is fault
