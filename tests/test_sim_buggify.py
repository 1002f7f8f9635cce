"""Buggify (`sim.buggify`): the knobs are drawn from the seed, stay within what AWS
documents or the dispatcher assumes, and make the simulation notice a safety rule taken
out of the dispatcher."""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import structlog

from dispatcher.core.ledger import Change, Ledger
from sim import __main__ as sim_cli
from sim import backlog, buggify, exists, harness, late_running, twin_waits, twins
from sim.aws import EventFault, EventInfo
from sim.calls import NO_FAULT
from sim.extras import ExtrasPlan
from sim.harness import DISPATCHER, PoolPlan, Run, Scenario, scenario, simulate
from sim.nemesis import SLOW_START_GAP, Action, Nemesis, plan


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
        if name in ("twin_waits", "exists_full", "late_running", "deep_backlog"):  # alone
            assert 0.03 <= share <= 0.15, (name, share)
            continue
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


# -- the hunt knobs: their own stream, and the conditions they make ---------------------------

POOLS = {"p0": (2, False)}
OPERATIONS = ("StartExecution", "DescribeExecution", "ListExecutions", "ReceiveMessage")


def _plan(knobs: buggify.Knobs, hunt: random.Random | None) -> Nemesis:
    return plan(
        random.Random("nemesis-7"),
        lambda: 0.0,
        quiet_at=300.0,
        nodes=("d1", "d2"),
        pools=POOLS,
        operations=OPERATIONS,
        knobs=knobs,
        give_up_after=30.0,
        hunt_rng=hunt,
    )


def _fate(nemesis: Nemesis) -> tuple[object, ...]:
    return (
        nemesis.storms,
        nemesis.actions,
        nemesis.event_storms,
        nemesis.refusal_windows,
        nemesis.drizzle,
        nemesis.rng.random(),  # the stream the faults are drawn from, after the plan
    )


def test_the_hunt_knobs_move_no_other_draw() -> None:
    """A seed whose hunt knobs are off draws the plan (and the fault stream) it drew before
    they were added; a seed with one on keeps every other knob as it was."""
    classic = buggify.Knobs(late_starts=True, event_storms=True)
    assert _fate(_plan(classic, None)) == _fate(_plan(classic, random.Random(1)))
    assert _fate(_plan(buggify.OFF, None)) == _fate(_plan(buggify.OFF, random.Random(1)))
    for seed in range(300):
        knobs = buggify.draw(seed)
        assert knobs.classic == tuple(n for n in knobs.on if n not in buggify.HUNT + buggify.OWN)
    assert {"unknown_starts", "last_receive_doubts"} <= set(buggify.HUNT)


def test_unknown_starts_applies_first_attempts_and_refuses_retries() -> None:
    nemesis = _plan(buggify.Knobs(unknown_starts=True), random.Random(3))
    start, end, first = nemesis.refusal_windows[0]
    assert first == "5xx_after"
    assert end - start > 30.0  # longer than the start retry timeout
    assert nemesis.burst_at is not None
    assert start <= nemesis.burst_at <= start + 5
    storm = nemesis.event_storms[0]
    assert storm.lost
    assert storm.start <= start
    assert storm.end >= end
    made = scenario(next(s for s in range(200) if scenario(s).knobs.unknown_starts))
    assert made.max_seconds >= 120
    assert made.quiet_at >= 300.0
    assert float(dict(made.settings)["start_retry_timeout"]) <= 30.0


def test_last_receive_doubts_keeps_describes_failing_past_two_receives() -> None:
    nemesis = _plan(buggify.Knobs(last_receive_doubts=True), random.Random(5))
    start, end, first = nemesis.refusal_windows[0]
    assert first in ("5xx_after", "lost_answer")
    assert end - start > 2 * 30.0 + 30.0  # two receives give up, 30 s apart
    failing = nemesis.storms[0]
    assert failing.operations == ("DescribeExecution",)
    assert failing.rate == 1.0
    assert failing.start <= start
    assert failing.end > end + DISPATCHER["start_grace"]
    # Visibility extensions are spared (a known gap: see `Nemesis.call_fault`).
    assert nemesis.call_fault("d1", "ChangeMessageVisibilityBatch", {}) is NO_FAULT


def test_last_receive_doubts_is_never_on_with_the_lease() -> None:
    drawn = [s for s in range(300) if buggify.draw(s).last_receive_doubts]
    made = [scenario(s) for s in drawn]
    assert any(m.knobs.last_receive_doubts for m in made)
    assert not any(m.lease and m.knobs.last_receive_doubts for m in made)
    # Dropped with the lease: the seed is exactly as if the knob had not been drawn.
    for seed, m in zip(drawn, made, strict=True):
        if not m.knobs.last_receive_doubts:
            without = dataclasses.replace(
                buggify.draw(seed),
                last_receive_doubts=False,
                slow_starts=m.knobs.slow_starts,
                late_redrives=m.knobs.late_redrives,
                key_limit_drops=m.knobs.key_limit_drops,
                exists_unknown=m.knobs.exists_unknown,
                twin_keeps=m.knobs.twin_keeps,
            )
            assert m == harness._scenario(seed, without, None)


def test_slow_starts_lowers_the_limit_while_starts_wait_for_their_tokens() -> None:
    nemesis = _plan(buggify.Knobs(slow_starts=True), random.Random(11))
    lost = nemesis.storms[0]
    assert lost.kind == "lost_answers"
    assert lost.operations == ("StartExecution",)
    assert nemesis.burst_at is not None
    assert lost.start <= nemesis.burst_at <= lost.start + 2
    [lowered] = {(a.pool, a.value) for a in nemesis.actions if a.kind in ("set_limit", "sighup")}
    assert lowered == ("p0", 1)
    drop = min(a.time for a in nemesis.actions if a.kind in ("set_limit", "sighup"))
    staleness = DISPATCHER["limit_refresh_interval"] + 2.0
    # The start after the first waits a rate token: it comes after the checker's staleness.
    assert nemesis.burst_at + SLOW_START_GAP - drop > staleness
    # Two starts waiting their tokens stay within half the visibility timeout.
    assert DISPATCHER["visibility_timeout"] / 2 > 2 * SLOW_START_GAP
    made = [scenario(s) for s in range(200) if buggify.draw(s).slow_starts]
    on = [m for m in made if m.knobs.slow_starts]
    assert on
    assert all(len(m.pools) == 1 and m.pools[0].limit == 2 for m in on)
    assert all(dict(m.settings)["start_burst"] == 1 for m in on)


def test_early_answers_holds_the_last_attempts_of_dark_starts_past_the_give_up() -> None:
    """The held attempts of a dark start begin 1 to 3 s before it gives up (in doubt),
    each answered 5xx at once and applied at D: after the give-up."""
    nemesis = _plan(buggify.Knobs(early_answers=True), random.Random(13))
    assert nemesis.dark_share == 0.5
    assert nemesis.dark_failure == ("ServiceUnavailable", False)
    held_from = nemesis.dark_for - nemesis.held_from_end  # after the first attempt
    assert 30.0 - 3 <= held_from <= 30.0 - 1  # give_up_after is 30 s
    assert nemesis.dark_for > 30.0
    assert nemesis.dark_events is not None
    assert nemesis.dark_events.lost
    names = [f"start-{i}" for i in range(40)]
    first = {n: nemesis.call_fault("d1", "StartExecution", {"name": n}) for n in names}
    dark = [n for n in names if nemesis._dark[n] is not None]
    assert 0 < len(dark) < len(names)
    assert all(first[n].drop_request for n in dark)  # lost until the last seconds
    made = [scenario(s) for s in range(200) if scenario(s).knobs.early_answers]
    assert made
    assert all(dict(m.settings)["reconcile_interval"] == 2.0 for m in made)


def test_renewals_denied_refuses_only_the_dispatchers_sends_to_request_queues() -> None:
    """An IAM policy without sqs:SendMessage on the request queues: the dispatchers' sends
    there are AccessDenied (no renewal), producers' and dead letters are not."""
    seed = next(
        s
        for s in range(300)
        if scenario(s).knobs.renewals_denied and scenario(s).knobs.max_receive_count
    )
    result = simulate(seed)
    assert result.ok, sim_cli.describe(result)
    history, deny = result.world.history, result.world.sqs.deny_send
    names = {url: url.rsplit("/", 1)[-1] for url in result.world.sqs.queues}
    requests = {url for url, name in names.items() if name.startswith(("requests", "urgent"))}
    assert requests
    assert all(deny("d1.1", url) for url in requests)
    assert not any(deny("producer", url) for url in requests)
    assert not any(deny("d1.1", url) for url in set(names) - requests)
    assert not [m for m in history.sends if m.node.startswith("d") and m.queue_url in requests]


# -- twin_keeps (sim.twins) ---------------------------------------------------------------------


def test_twin_keeps_moves_no_other_draw() -> None:
    """Drawn from a stream of its own: every other knob of every seed is as it was, and
    the nemesis plans nothing else for it (its storms are `sim.twins`')."""
    for seed in range(300):
        knobs = buggify.draw(seed)
        assert "twin_keeps" not in knobs.classic
        without = dataclasses.replace(knobs, twin_keeps=False)
        assert without.on == tuple(n for n in knobs.on if n != "twin_keeps")
    twin = buggify.Knobs(twin_keeps=True)
    assert _fate(_plan(twin, random.Random(1))) == _fate(_plan(buggify.OFF, random.Random(1)))


def test_twin_keeps_throttles_starts_until_the_first_copy_gives_up_and_a_tail_more() -> None:
    storms = twins.TwinStorms([twins.Episode(at=10.0, tail=1.5)], give_up_after=30.0)
    start = {"name": "twin"}
    assert storms.fault(9.0, start) is None  # before the episode
    assert storms.fault(10.2, start) is not None  # its first attempt: throttled
    assert storms.fault(25.0, {"name": "other"}) is not None  # every start meanwhile
    assert storms.fault(39.0, start) is not None  # still within the retry timeout
    last = storms.fault(40.5, start)  # the first attempt past it: the start gives up
    assert last is not None
    assert last.error == "ThrottlingException"
    assert storms.episodes[0].ends == 40.5 + 1.5
    assert storms.fault(41.0, start) is not None  # the twin's attempts, in the tail
    assert storms.fault(42.1, start) is None  # then the twin's start gets through


def test_twin_keeps_plans_short_and_long_tails_before_the_faults_stop() -> None:
    storms = twins.plan(random.Random(3), quiet_at=300.0, give_up_after=30.0)
    assert len(storms.episodes) >= 2
    assert all(e.at + 30.0 + twins.CAP < 300.0 for e in storms.episodes)
    tails = [e.tail for e in storms.episodes]
    assert any(twins.SHORT_TAIL[0] <= t <= twins.SHORT_TAIL[1] for t in tails)
    assert any(twins.LONG_TAIL[0] <= t <= twins.LONG_TAIL[1] for t in tails)
    gaps = [b.at - a.at for a, b in itertools.pairwise(storms.episodes)]
    assert min(gaps) >= twins.EPISODE_GAP


def test_twin_keeps_describe_lag_stays_under_what_the_doubt_rule_needs() -> None:
    """A doubt is settled by "does not exist" the start grace after its last attempt ended,
    and that attempt may take effect D after it was sent: the describe lag stays under
    grace - D (docs/testing.md)."""
    grace, d = float(DISPATCHER["start_grace"]), float(DISPATCHER["start_timeout"])
    lag = twins.describe_lag(grace, d)
    assert grace - d - lag == pytest.approx(buggify.GRACE_MARGIN)
    assert twins.describe_lag(10.0, 15.0) == 0.0


def test_twin_keeps_runs_one_pool_of_limit_1_alone() -> None:
    on = [scenario(s) for s in range(200) if scenario(s).knobs.twin_keeps]
    assert len(on) >= 15
    for made in on:
        pool = made.pools[0]  # (a named limit may add a pool of its own: `sim.named`)
        assert (pool.limit, pool.per_key_limit, pool.priorities) == (1, None, True)
        assert not made.lease
        assert not made.parents.parents
        assert made.extras.rolling is None
        assert not made.knobs.slow_starts
        assert dict(made.settings)["start_retry_timeout"] == twins.START_RETRY_TIMEOUT
    # Visibility extensions are spared (every receive is the last: see `Nemesis._spared`).
    nemesis = _plan(buggify.Knobs(twin_keeps=True), None)
    nemesis.knobs = on[0].knobs  # (as the harness does)
    assert nemesis.call_fault("d1", "ChangeMessageVisibilityBatch", {}) is NO_FAULT


def test_twin_keeps_is_dropped_with_parents_rolling_deploys_or_slow_starts() -> None:
    drawn = [s for s in range(200) if buggify.draw(s).twin_keeps]
    dropped = [scenario(s) for s in drawn if not scenario(s).knobs.twin_keeps]
    assert dropped
    for made in dropped:
        crowded = made.parents.parents or made.extras.rolling is not None
        assert crowded or buggify.draw(made.seed).slow_starts


# -- scenarios of their own: twin_waits (sim.twin_waits), exists_full (sim.exists) --------------


def test_a_scenario_knob_moves_no_seed_where_it_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Drawn from streams of their own: a seed where neither is on - not drawn, or dropped
    because it cannot run there - is exactly the scenario it was before they existed."""
    before = {seed: scenario(seed) for seed in range(200)}
    drawn = [s for s in range(200) if buggify.scenario_knobs(s) is not None]
    monkeypatch.setattr(buggify, "TWIN_WAITS_SHARE", 0.0)
    monkeypatch.setattr(buggify, "EXISTS_FULL_SHARE", 0.0)
    monkeypatch.setattr(buggify, "LATE_RUNNING_SHARE", 0.0)
    monkeypatch.setattr(buggify, "DEEP_BACKLOG_SHARE", 0.0)
    special = ("twin_waits", "exists_full", "late_running", "deep_backlog")
    for seed, made in before.items():
        if not any(getattr(made.knobs, name) for name in special):
            assert scenario(seed) == made, seed
    # Some were drawn and dropped (they could not run there): those ran as before too.
    assert any(not any(getattr(before[s].knobs, name) for name in special) for s in drawn)


def test_twin_waits_runs_twin_keeps_alone_with_its_limit_in_the_file() -> None:
    on = [scenario(s) for s in range(200) if scenario(s).knobs.twin_waits]
    assert len(on) >= 5
    for made in on:
        assert made.knobs == buggify.Knobs(twin_keeps=True, twin_waits=True, renewals_denied=True)
        assert not made.pools[0].parameter  # a SIGHUP applies a change at once
        assert made.pools[0].limit == 1
    assert not any(buggify.draw(s).twin_waits for s in range(200) if buggify.classic(s).twin_keeps)


def test_twin_waits_lowers_the_limit_at_the_first_copys_give_up() -> None:
    told: list[twins.Episode] = []
    storms = twins.TwinStorms([twins.Episode(at=10.0, tail=1.5)], give_up_after=30.0)
    storms.on_give_up = told.append
    start = {"name": "twin"}
    assert storms.fault(10.2, start) is not None
    assert storms.fault(39.0, start) is not None
    assert not told
    storms.fault(40.5, start)  # the first attempt past the retry timeout: it gives up
    assert told == storms.episodes
    storms.fault(41.0, start)
    assert len(told) == 1
    assert twin_waits.HOLD[0] > DISPATCHER["start_timeout"] + DISPATCHER["start_grace"]


def test_exists_full_runs_exists_unknown_alone_without_limits_that_hold_the_burst() -> None:
    on = [scenario(s) for s in range(200) if scenario(s).knobs.exists_full]
    assert len(on) >= 3
    for made in on:
        assert made.knobs == buggify.Knobs(exists_unknown=True, exists_full=True)
        assert made.named is None
        assert all(p.per_key_limit is None for p in made.pools)
        assert made.requests == exists.FULL_REQUESTS
        assert not made.parents.parents


def test_late_running_runs_a_backlog_alone_without_faults() -> None:
    on = [s for s in range(200) if scenario(s).knobs.late_running]
    assert len(on) >= 3
    for seed in on:
        made = scenario(seed)
        assert made.knobs == buggify.Knobs(late_running=True)
        [pool] = made.pools
        assert pool.limit in late_running.LIMITS
        assert pool.per_key_limit is None
        assert not made.lease
        assert made.named is None
        assert not made.parents.parents
        assert made.extras == ExtrasPlan()
        assert len(made.request_times) == made.requests > 3 * pool.limit
        assert all(late_running.BURST[0] <= t <= late_running.BURST[1] for t in made.request_times)
    result = simulate(on[0])
    assert result.ok, sim_cli.describe(result)
    assert not result.nemesis.actions
    assert not result.nemesis.storms
    assert not result.world.history.crashes


def test_late_running_copies_each_running_event_after_its_run_ended() -> None:
    """Within what EventBridge may do (a duplicate, late by at most 60 s): the copy comes
    0.5 to 3 s after the end of a run of at most MAX_SECONDS."""
    arn = "arn:aws:states:eu-west-1:123456789012:execution:governed-p0:x"
    ending_at_17 = SimpleNamespace(runs=[SimpleNamespace(stop=17.0)])
    world = SimpleNamespace(event_faults=None, sfn=SimpleNamespace(executions={arn: ending_at_17}))
    copies = late_running.LateCopies(SimpleNamespace(seed=1, world=world))  # type: ignore[arg-type]
    assert world.event_faults == copies.event_fault
    info = EventInfo(arn, "machine", "RUNNING", 0, 10.0)
    fault = copies.event_fault(info)
    assert fault.duplicate
    assert not fault.lost
    assert fault.delay == 0.0
    assert 7.0 + 0.5 <= fault.duplicate_delay <= 7.0 + 3.0
    assert late_running.MAX_SECONDS + late_running.COPY_AFTER_END[1] < 60.0
    ended = copies.event_fault(dataclasses.replace(info, status="SUCCEEDED"))
    assert ended == EventFault()


def test_deep_backlog_runs_a_keyed_backlog_deeper_than_the_room_alone() -> None:
    on = [s for s in range(200) if scenario(s).knobs.deep_backlog]
    assert len(on) >= 3
    for seed in on:
        made = scenario(seed)
        assert made.knobs == buggify.Knobs(deep_backlog=True)
        [pool] = made.pools
        assert pool.per_key_limit == 1
        assert pool.max_waiting == backlog.MAX_WAITING
        assert made.tenants == 3
        assert made.requests > 10 * pool.max_waiting
        assert not made.lease
        assert made.named is None
        assert not made.parents.parents
        assert made.extras == ExtrasPlan()
