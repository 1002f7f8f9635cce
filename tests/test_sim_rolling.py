"""The rolling-deploy scenario of the simulation (`sim.rolling`): its plan, the config
files of processes that differ, and the checker judging one state machine's limit across
processes whose configurations differ."""

from __future__ import annotations

import random
import tomllib
from typing import Any

from sim import loop, rolling
from sim.checker import PoolSpec, check
from sim.extras import ExtrasPlan
from sim.harness import DISPATCHER, Run, scenario, simulate
from sim.history import History
from sim.nemesis import Action
from sim.parameters import config_record, limit_parameter
from sim.rolling import RollingPlan, Step, Variant
from tests.test_sim_checker import MACHINE, REGION_ACCOUNT, kinds, run, spec

OTHER = f"arn:aws:states:{REGION_ACCOUNT}:stateMachine:other"
SEEDS = range(200)


def rolling_seeds(count: int = 200) -> list[int]:
    """The seeds among the first ``count`` that run the scenario."""
    return [s for s in range(count) if scenario(s).extras.rolling is not None]


def test_a_share_of_the_seeds_rolls_with_two_pools_and_the_lease() -> None:
    seeds = rolling_seeds()
    assert 20 <= len(seeds) <= 80
    for seed in seeds[:10]:
        made = scenario(seed)
        assert made.lease
        assert not made.shared_queue
        assert [p.name for p in made.pools] == ["p0", "p1"]
        assert made.extras.reconfigures == ()  # each process's file is the deploy's


def test_the_plan_differs_between_processes_and_ends_governing_every_pool() -> None:
    differing_pools = differing_d = both_sources = 0
    for seed in range(100):
        plan = rolling.draw(random.Random(seed), quiet_at=120.0)
        assert 2 <= len(plan.initial) <= 3
        nodes = plan.nodes
        assert nodes[: len(plan.initial)] == tuple(f"d{i + 1}" for i in range(len(plan.initial)))
        assert len(set(nodes)) == len(nodes)
        # Each step starts a new process before its old one stops; every old one goes.
        for step in plan.steps:
            assert step.overlap >= rolling.PROCESS_STARTS
            assert plan.born_at(step.node) == step.at
            assert nodes.index(step.replaces) < nodes.index(step.node)
        replaced = {s.replaces for s in plan.steps}
        survivors = [n for n in nodes if n not in replaced]
        assert len(survivors) == len(plan.initial)
        assert all(plan.variant_of(n).pools == rolling.POOLS for n in survivors)
        assert all(h.seconds > 15.0 for h in plan.hangs)  # past the lease
        variants = [plan.variant_of(n) for n in nodes]
        differing_pools += len({v.pools for v in variants}) > 1
        differing_d += len({v.start_timeout for v in variants}) > 1
        both_sources += any(v.in_ssm for v in variants) and any(
            set(v.pools) - set(v.in_ssm) for v in variants
        )
    assert differing_pools > 80
    assert differing_d > 50
    assert both_sources > 80


PLAN = RollingPlan(
    initial=(
        Variant(("p0", "p1"), ("p0",), start_timeout=3.0, start_grace=10.0),
        Variant(("p0",), (), start_timeout=15.0, start_grace=25.0),
    ),
    steps=(Step(50.0, "d3", Variant(("p0", "p1"), ("p1",), 5.0, 15.0), "d1", 10.0),),
    hangs=(),
)


def _with_run(check_run: Any) -> Any:
    """Build the run of seed 3 with `PLAN` (on the simulation's loop) and check it."""
    made = scenario(3)
    assert made.extras.rolling is not None
    made = made.__class__(**{**made.__dict__, "extras": ExtrasPlan(rolling=PLAN)})

    async def body() -> Any:
        built = Run(3, plan=made)
        try:
            return check_run(built)
        finally:
            built._tmp.cleanup()

    return loop.run(body)


def _config(built: Run, node: str) -> dict[str, Any]:
    return tomllib.loads(built._config_of(f"{node}.1").read_text(encoding="utf-8"))


def test_each_process_has_its_own_config_file() -> None:
    def look(built: Run) -> None:
        assert built.nodes == ("d1", "d2", "d3")
        one, two, three = (_config(built, n) for n in built.nodes)
        assert sorted(one["pools"]) == ["p0", "p1"]
        assert sorted(two["pools"]) == ["p0"]  # a pool removed
        assert [q["pool"] for q in two["queues"]] == ["p0"] * len(two["queues"])
        assert one["pools"]["p0"]["limit_parameter"] == limit_parameter("p0")
        assert "limit_parameter" not in two["pools"]["p0"]  # the same pool, in the file
        assert "limit_parameter" not in one["pools"]["p1"]
        assert three["pools"]["p1"]["limit_parameter"] == limit_parameter("p1")
        assert (one["dispatcher"]["start_timeout"], two["dispatcher"]["start_timeout"]) == (3, 15)
        assert two["dispatcher"]["start_grace"] == 25
        assert one["dispatcher"]["lease_table"] == two["dispatcher"]["lease_table"]
        # The checker reads every pool's limit from the harness's record, and allows
        # starts given up to land within the longest D.
        made = built.spec()
        assert {p.parameter for p in made.pools.values()} == {
            config_record("p0"),
            config_record("p1"),
        }
        assert made.late_start == 15.0
        # ... and a start sent before a limit was lowered to land within its sender's D.
        assert made.staleness == DISPATCHER["limit_refresh_interval"] + 2.0 + 15.0
        assert made.read_lag == DISPATCHER["limit_refresh_interval"] + 2.0

    _with_run(look)


def test_a_limit_change_goes_everywhere_at_once() -> None:
    def change(built: Run) -> None:
        built._set_limit(Action(0.0, "sighup", "d1", 7, "p0"))
        ssm = built.world.ssm.parameters
        assert ssm[limit_parameter("p0")].value == "7"
        assert ssm[config_record("p0")].value == "7"
        assert all(_config(built, n)["pools"]["p0"]["limit"] == 7 for n in built.nodes)

    _with_run(change)


def test_a_rolling_seed_runs_clean_through_its_deploys() -> None:
    seed = rolling_seeds()[0]
    outcome = simulate(seed)
    assert outcome.ok, outcome.violations[:3] or outcome.errors[:1]
    notes = [r.text for r in outcome.world.history.records if r.kind == "note"]
    assert any(t.startswith("deploy: d3 with pools") for t in notes)
    assert any("replaced by d3" in t for t in notes)
    started = {r.node.split(".")[0] for r in outcome.world.history.records if r.kind == "note"}
    assert {"d1", "d2", "d3"} <= started


# -- the checker: one limit per state machine, whichever process starts -------------------


def test_two_leaders_over_the_limit_are_caught() -> None:
    """d1 (governing {work, other}) and d2 (governing {work}) each start two executions of
    ``work`` within a limit of 2: four run at once, from the records."""
    history = History()
    run(history, "a", 1, 50, node="d1.1")
    run(history, "b", 2, 50, node="d1.1")
    run(history, "c", 3, 50, node="d2.1")
    run(history, "d", 4, 50, node="d2.1")
    pools = {MACHINE: PoolSpec(limit=2), OTHER: PoolSpec(limit=2)}
    found = check(history, spec(pools=pools))
    assert kinds(found) == ["limit", "limit"]
    assert "3 running when c started (limit 2)" in found[0].message


def test_a_limit_whose_source_moves_is_judged_from_its_record() -> None:
    """The limit in force is what the file or the parameter says when: recorded once per
    change, whichever process reads it from where."""
    history = History()
    record = config_record("p0")
    history.parameter_put(0, record, "3", 1)
    pool = {MACHINE: PoolSpec(limit=3, parameter=record)}
    run(history, "a", 1, 100, node="d1.1")  # d1 reads it from SSM
    run(history, "b", 2, 100, node="d1.1")
    history.parameter_put(20, record, "1", 2)  # lowered in the file and the parameter
    run(history, "c", 21, 100, node="d2.1")  # d2 reads it from its file: 3 of 3 still
    assert check(history, spec(pools=pool, staleness=5.0)) == []
    run(history, "d", 30, 100, node="d3.1")  # 4 of 1
    found = check(history, spec(pools=pool, staleness=5.0))
    assert [(v.kind, v.time) for v in found] == [("limit", 30)]


def test_other_state_machines_do_not_count() -> None:
    history = History()
    run(history, "a", 1, 50, node="d1.1")
    run(history, "b", 2, 50, node="d1.1")
    history.execution_started(
        3, "d2.1", arn=f"{OTHER}:x", state_machine_arn=OTHER, name="x", input="{}"
    )
    pools = {MACHINE: PoolSpec(limit=2), OTHER: PoolSpec(limit=1)}
    assert check(history, spec(pools=pools)) == []


# -- long D: a leader whose starts land long after its lease lapsed -----------------------


def test_long_d_files_change_no_other_draw() -> None:
    long_seen = pairs = 0
    for seed in range(100):
        plain = rolling.draw(random.Random(seed), quiet_at=120.0)
        plan = rolling.draw(random.Random(seed), 120.0, random.Random(f"{seed}:long-d"))
        assert [(s.at, s.node, s.replaces) for s in plan.steps] == [
            (s.at, s.node, s.replaces) for s in plain.steps
        ]
        assert plan.hangs == plain.hangs
        assert plan.listing_lag == plain.listing_lag
        for node in plan.nodes:
            a, b = plain.variant_of(node), plan.variant_of(node)
            assert b.start_timeout in {a.start_timeout, 3.0, *rolling.LONG_D}
        long_seen += plan != plain
        if plan.burst_first:
            pairs += 1
            first, second = plan.initial[:2]
            assert first.start_timeout in rolling.LONG_D[1:]
            assert (second.start_timeout, second.start_grace) == (3.0, 10.0)
            assert second.pools == first.pools  # the successor of every lease of the first
            assert plan.long_d_hang is not None
            assert plan.long_d_hang > 15.0  # past the lease
    assert 20 <= long_seen <= 80
    assert pairs >= 5


def test_a_long_d_leader_hangs_as_it_starts_a_burst_and_the_seed_holds() -> None:
    """Seed 44: d1 (D 40) leads, its renewal hangs as it starts a burst; d2 (D 3, grace 10)
    takes the lease and must wait the D + grace the lease records (55 s) before it lists:
    d1's last start lands 40 s after it was sent."""
    made = scenario(44).extras.rolling
    assert made is not None
    assert made.burst_first
    assert (made.initial[0].start_timeout, made.initial[1].start_timeout) == (40.0, 3.0)
    outcome = simulate(44)
    assert outcome.ok, outcome.violations[:3] or outcome.errors[:1]
    notes = [r.text for r in outcome.world.history.records if r.kind == "note"]
    assert "burst of requests to p0" in notes
    assert any(t.startswith("renewal of leader d1") for t in notes)
