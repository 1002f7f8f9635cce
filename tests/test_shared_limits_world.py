"""Named limits in any interleaving (hypothesis): starts reserved, sent, answered, lost,
refused and cancelled across three pools and two named limits, executions started
elsewhere, ends and live changes of the limits. No start is ever sent that puts a named
limit over its value in force, and the use read from the ledgers is their weighted sum."""

from __future__ import annotations

import functools
import itertools

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from dispatcher.core.ledger import Ledger, Reservation
from dispatcher.core.shared_limits import SharedLimitConfig, SharedLimits

USES = {"a": {"api": 1}, "b": {"api": 2}, "c": {"api": 1, "db": 2}}
POOLS = tuple(USES)
LIMITS = ("api", "db")


class SharedWorld(RuleBasedStateMachine):
    """The ledgers of three pools sharing named limits, driven as the starter drives them."""

    def __init__(self) -> None:
        super().__init__()
        self.ledgers = {pool: Ledger(4) for pool in POOLS}
        self.shared = SharedLimits(
            [SharedLimitConfig(name="api", limit=5), SharedLimitConfig(name="db", limit=3)],
            USES,
            self.ledgers.__getitem__,
        )
        for pool, ledger in self.ledgers.items():
            ledger.gate = functools.partial(self.shared.admits, pool)
        self.unsent: list[tuple[str, Reservation]] = []
        self.sent: list[tuple[str, Reservation, str]] = []
        self.unknown: dict[str, Reservation] = {}  # token retried after a lost answer
        self.running: list[tuple[str, str]] = []
        self.doubted: list[tuple[str, str]] = []
        self.names = itertools.count()

    def committed(self, limit: str) -> int:
        return sum(
            w
            * (
                self.ledgers[p].running_count
                + self.ledgers[p].doubt_count
                + self.ledgers[p].sent_count
            )
            for p, w in self.shared.users(limit).items()
        )

    @rule(pool=st.sampled_from(POOLS))
    def reserve(self, pool: str) -> None:
        if self.ledgers[pool].free and self.shared.may_reserve(pool):
            [reservation] = self.ledgers[pool].reserve(1, 0.0)
            self.unsent.append((pool, reservation))

    @precondition(lambda self: self.unsent)
    @rule(data=st.data())
    def send(self, data: st.DataObject) -> None:
        pool, reservation = data.draw(st.sampled_from(self.unsent))
        ledger = self.ledgers[pool]
        if not ledger.admitted(reservation):
            return
        ledger.mark_sent(reservation)
        for limit in self.shared.uses(pool):
            assert self.committed(limit) <= self.shared.limit(limit), limit
        self.unsent.remove((pool, reservation))
        self.sent.append((pool, reservation, f"arn:{pool}:{next(self.names)}"))

    @precondition(lambda self: self.sent)
    @rule(data=st.data(), outcome=st.sampled_from(["started", "unknown", "refused"]))
    def answer(self, data: st.DataObject, outcome: str) -> None:
        pool, reservation, arn = data.draw(st.sampled_from(self.sent))
        ledger = self.ledgers[pool]
        self.sent.remove((pool, reservation, arn))
        if outcome == "started":
            ledger.started(reservation, arn, 0.0)
            self.running.append((pool, arn))
        elif outcome == "refused":
            ledger.unsend(reservation)
            self.unsent.append((pool, reservation))
        elif ledger.admitted(reservation):
            for limit in self.shared.uses(pool):
                assert self.committed(limit) <= self.shared.limit(limit), limit
            self.sent.append((pool, reservation, arn))
        else:
            ledger.doubt(reservation, arn, 0.0)
            self.doubted.append((pool, arn))

    @precondition(lambda self: self.unsent)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        pool, reservation = data.draw(st.sampled_from(self.unsent))
        self.ledgers[pool].cancel(reservation)
        self.unsent.remove((pool, reservation))

    @precondition(lambda self: self.running or self.doubted)
    @rule(data=st.data())
    def end(self, data: st.DataObject) -> None:
        pool, arn = data.draw(st.sampled_from(self.running + self.doubted))
        self.ledgers[pool].observe_terminal(arn)
        for held in (self.running, self.doubted):
            if (pool, arn) in held:
                held.remove((pool, arn))

    @precondition(lambda self: self.doubted)
    @rule(data=st.data())
    def doubt_settles_running(self, data: st.DataObject) -> None:
        pool, arn = data.draw(st.sampled_from(self.doubted))
        self.ledgers[pool].observe_running(arn, 0.0)
        self.doubted.remove((pool, arn))
        self.running.append((pool, arn))

    @rule(pool=st.sampled_from(POOLS))
    def started_elsewhere(self, pool: str) -> None:
        arn = f"arn:{pool}:outside:{next(self.names)}"
        self.ledgers[pool].observe_running(arn, 0.0)
        self.running.append((pool, arn))

    @rule(limit=st.sampled_from(LIMITS), value=st.integers(0, 6))
    def set_limit(self, limit: str, value: int) -> None:
        self.shared.set_limit(limit, value)

    @invariant()
    def use_is_the_weighted_sum(self) -> None:
        for limit in LIMITS:
            expected = sum(w * self.ledgers[p].held for p, w in self.shared.users(limit).items())
            assert self.shared.in_use(limit) == expected

    @invariant()
    def a_blocked_pool_holds_no_claim(self) -> None:
        for pool in POOLS:
            if self.shared.blocked(pool):
                assert not self.shared.claimed(pool)


WORLD = settings(
    max_examples=200,
    stateful_step_count=60,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def test_no_start_is_sent_over_a_named_limit_in_any_interleaving() -> None:
    run_state_machine_as_test(SharedWorld, settings=WORLD)
