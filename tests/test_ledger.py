"""The slot ledger: unit tests of every input, and a simulated world that tries to break it.

The state machine below plays the world the dispatcher lives in - a truth of which
executions really run (ours, the console's, redriven ones), an event channel that
duplicates, reorders, delays and drops, listings that lag, describes that answer from the
truth, a limit that changes - and checks the ledger against that truth after every step.
"""

from __future__ import annotations

import itertools
import os
import traceback
from dataclasses import dataclass
from typing import ClassVar

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    MultipleResults,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from dispatcher.ledger import TERMINAL_STATUSES, Change, Ledger, Reservation

GRACE = 5.0

# -- unit tests: one input at a time -----------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [({"limit": -1}, "-1"), ({"limit": 3, "tombstone_capacity": 0}, "0")],
)
def test_invalid_constructor_values_raise_naming_the_value(
    kwargs: dict[str, int], named: str
) -> None:
    """A bad limit or tombstone capacity is refused, and the message shows what was given."""
    with pytest.raises(ValueError, match=rf"got {named}$"):
        Ledger(kwargs["limit"], tombstone_capacity=kwargs.get("tombstone_capacity", 1))


def test_invalid_limit_change_raises_and_keeps_the_old_limit() -> None:
    """A negative limit is refused by set_limit too; the ledger keeps its limit."""
    ledger = Ledger(2)
    with pytest.raises(ValueError, match=r"got -3$"):
        ledger.set_limit(-3)
    assert ledger.limit == 2


def test_reserve_never_grants_more_than_free() -> None:
    """Reservations count against the limit exactly like running executions do."""
    ledger = Ledger(3)
    first = ledger.reserve(2, 0.0)
    assert len(first) == 2
    assert len(ledger.reserve(5, 0.0)) == 1
    assert ledger.reserve(1, 0.0) == []
    assert (ledger.reserved_count, ledger.free) == (3, 0)
    assert len({r.token for r in first}) == 2
    assert Ledger(0).reserve(3, 0.0) == []
    assert Ledger(3).reserve(-1, 0.0) == []


def test_reserve_counts_running_executions() -> None:
    """Slots held by running executions, ours or not, are not free."""
    ledger = Ledger(2)
    ledger.observe_running("console-1", 0.0)
    assert len(ledger.reserve(2, 0.0)) == 1


def test_cancel_gives_the_slot_back_once() -> None:
    """Cancelling frees the slot; cancelling again is a harmless no-op."""
    ledger = Ledger(1)
    (res,) = ledger.reserve(1, 0.0)
    assert ledger.cancel(res) is True
    assert ledger.cancel(res) is False
    assert (ledger.reserved_count, ledger.free) == (0, 1)


def test_started_turns_the_reservation_into_a_running_execution() -> None:
    """After StartExecution answered, the slot is held by the ARN, not the reservation."""
    ledger = Ledger(2)
    (res,) = ledger.reserve(1, 0.0)
    assert ledger.started(res, "a", 1.0) is Change.ADDED
    assert (ledger.running, ledger.reserved_count, ledger.free) == (frozenset({"a"}), 0, 1)


def test_started_after_the_running_event_drops_the_reservation() -> None:
    """The RUNNING event may beat StartExecution's answer: one slot, not two."""
    ledger = Ledger(2)
    (res,) = ledger.reserve(1, 0.0)
    assert ledger.observe_running("a", 1.0) is Change.ADDED
    assert ledger.running_count + ledger.reserved_count == 2  # conservative until started()
    assert ledger.started(res, "a", 2.0) is Change.UNCHANGED
    assert (ledger.running_count, ledger.reserved_count) == (1, 0)


def test_started_after_the_terminal_event_is_stale_and_holds_nothing() -> None:
    """An execution that already finished before its start returned takes no slot."""
    ledger = Ledger(1)
    (res,) = ledger.reserve(1, 0.0)
    assert ledger.observe_terminal("a") is Change.NOTED
    assert ledger.started(res, "a", 1.0) is Change.STALE
    assert not ledger.holds("a")
    assert (ledger.reserved_count, ledger.free) == (0, 1)


def test_running_events_are_idempotent_and_count_foreign_executions() -> None:
    """An unknown RUNNING execution is counted (console start); a duplicate changes nothing."""
    ledger = Ledger(1)
    assert ledger.observe_running("console", 0.0) is Change.ADDED
    assert ledger.observe_running("console", 1.0) is Change.UNCHANGED
    assert ledger.observe_running("other", 1.0) is Change.ADDED
    assert (ledger.running_count, ledger.free) == (2, 0)


def test_terminal_frees_once_and_notes_unknown_executions() -> None:
    """Terminal frees a held execution; its duplicate is UNCHANGED; an unknown one is NOTED."""
    ledger = Ledger(1)
    ledger.observe_running("a", 0.0)
    assert ledger.observe_terminal("a") is Change.FREED
    assert ledger.observe_terminal("a") is Change.UNCHANGED
    assert ledger.observe_terminal("never-seen") is Change.NOTED
    assert ledger.is_tombstoned("a")
    assert ledger.is_tombstoned("never-seen")
    assert (ledger.running_count, ledger.free) == (0, 1)


def test_late_running_after_terminal_is_stale() -> None:
    """A RUNNING event reordered after the terminal one cannot bring the execution back."""
    ledger = Ledger(1)
    assert ledger.observe_terminal("a") is Change.NOTED
    assert ledger.observe_running("a", 1.0) is Change.STALE
    assert not ledger.holds("a")


def test_a_redrive_revives_a_tombstoned_execution_once() -> None:
    """RUNNING with a higher redrive count is a new run; its own late duplicate is stale."""
    ledger = Ledger(2)
    ledger.observe_running("a", 0.0)
    ledger.observe_terminal("a", 0)
    assert ledger.observe_running("a", 1.0, redrive_count=0) is Change.STALE
    assert ledger.observe_running("a", 1.0, redrive_count=1) is Change.ADDED
    assert not ledger.is_tombstoned("a")
    assert ledger.observe_terminal("a", 1) is Change.FREED
    assert ledger.observe_running("a", 2.0, redrive_count=1) is Change.STALE
    assert ledger.observe_terminal("a", 0) is Change.UNCHANGED  # the first run's late event
    assert ledger.observe_running("a", 2.0, redrive_count=1) is Change.STALE


def test_a_late_terminal_of_an_earlier_run_does_not_free_the_redriven_run() -> None:
    """Run 0's terminal event reordered after run 1's RUNNING event: run 1 still holds a slot.

    Found by the state machine below: the ledger freed the redriven execution, so it
    counted one slot fewer than were really held until the next reconcile.
    """
    ledger = Ledger(1)
    (res,) = ledger.reserve(1, 0.0)
    ledger.started(res, "a", 0.0)
    assert ledger.observe_running("a", 1.0, redrive_count=1) is Change.UNCHANGED
    assert ledger.observe_terminal("a", 0) is Change.STALE
    assert ledger.holds("a")
    assert ledger.reserve(1, 2.0) == []
    assert ledger.observe_terminal("a", 1) is Change.FREED
    assert ledger.observe_running("a", 3.0, redrive_count=1) is Change.STALE


def test_tombstones_are_bounded_and_the_oldest_goes_first() -> None:
    """Past the capacity the least recently observed tombstone is evicted."""
    ledger = Ledger(1, tombstone_capacity=2)
    for arn in ("a", "b"):
        ledger.observe_terminal(arn)
    ledger.observe_terminal("a")  # seen again: now the newest
    ledger.observe_terminal("c")
    assert [ledger.is_tombstoned(arn) for arn in ("a", "b", "c")] == [True, False, True]
    assert ledger.observe_running("b", 1.0) is Change.ADDED  # forgotten: counted again


def test_lowering_the_limit_never_evicts_and_raising_it_frees_slots() -> None:
    """set_limit only changes what may start next."""
    ledger = Ledger(3)
    for arn in ("a", "b"):
        ledger.observe_running(arn, 0.0)
    ledger.reserve(1, 0.0)
    ledger.set_limit(1)
    assert (ledger.limit, ledger.running_count, ledger.reserved_count) == (1, 2, 1)
    assert ledger.free == 0
    assert ledger.reserve(1, 1.0) == []
    ledger.set_limit(5)
    assert ledger.free == 2


def test_listing_adopts_unknown_executions_and_is_idempotent() -> None:
    """Running executions the ledger did not know are counted once."""
    ledger = Ledger(5)
    ledger.observe_running("a", 0.0)
    result = ledger.apply_listing({"a": 0, "console": 0}, 10.0, GRACE)
    assert (result.adopted, result.suspects) == (("console",), ())
    again = ledger.apply_listing(["a", "console"], 11.0, GRACE)
    assert (again.adopted, again.suspects) == ((), ())
    assert ledger.running == {"a", "console"}


def test_listing_only_suspects_executions_held_past_the_grace_window() -> None:
    """A lagging listing may miss a just-started execution: only older ones are suspects."""
    ledger = Ledger(5)
    for arn, since in (("old", 0.0), ("edge", 5.0), ("new", 8.0)):
        ledger.observe_running(arn, since)
    result = ledger.apply_listing({}, 10.0, GRACE)
    assert set(result.suspects) == {"old", "edge"}
    assert ledger.running == {"old", "edge", "new"}  # a listing never frees by itself
    ledger.confirm_running("old", 10.0)
    assert ledger.apply_listing({}, 12.0, GRACE).suspects == ("edge",)


def test_confirm_running_never_adds() -> None:
    """Confirming an execution the ledger does not hold changes nothing."""
    ledger = Ledger(5)
    ledger.confirm_running("a", 1.0)
    ledger.observe_terminal("b")
    ledger.confirm_running("b", 1.0)
    assert ledger.running == frozenset()


def test_stale_listing_cannot_revive_a_finished_execution() -> None:
    """A listing still showing a finished run is ignored; one showing a redrive is not."""
    ledger = Ledger(5)
    ledger.observe_running("a", 0.0)
    ledger.observe_terminal("a", 0)
    assert ledger.apply_listing({"a": 0}, 10.0, GRACE).adopted == ()
    assert ledger.apply_listing({"a": 1}, 11.0, GRACE).adopted == ("a",)


# -- the simulated world -----------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One status-change event in flight on the events queue."""

    arn: str
    status: str
    redrives: int


@dataclass(frozen=True)
class Call:
    """A StartExecution that the service has answered but the dispatcher has not applied."""

    reservation: Reservation
    arn: str


class World(RuleBasedStateMachine):
    """The dispatcher's ledger against a truth it only sees through hints and the API."""

    ledger_class: ClassVar[type[Ledger]] = Ledger
    reservations = Bundle[Reservation]("reservations")
    calls = Bundle[Call]("calls")

    def __init__(self) -> None:
        super().__init__()
        self.ledger = self.ledger_class(1)
        self.clock = 0.0
        self.truth: dict[str, int] = {}  # running arn -> redrive count of its current run
        self.ended: dict[str, int] = {}  # finished arn -> redrive count of its last run
        self.ours: set[str] = set()  # ARNs we started and whose start we applied
        self.pending: dict[int, str | None] = {}  # token -> ARN once StartExecution answered
        self.events: list[Event] = []
        self.snapshots: list[dict[str, int]] = []  # what lagging listings will show
        self.suspects: list[str] = []  # awaiting DescribeExecution
        self.told_running: dict[str, int] = {}  # highest run the ledger was told is running
        self.told_ended: dict[str, int] = {}  # highest run the ledger was told has ended
        self.names = itertools.count(1)
        self.foreign = self.redriven = self.lowered = False

    @initialize(limit=st.integers(0, 5))
    def open_pool(self, limit: int) -> None:
        """Start from an empty pool with a random limit."""
        self.ledger = self.ledger_class(limit)

    # -- what the ledger is told ---------------------------------------------------------

    def _running(self, arn: str, redrives: int) -> Change:
        self.told_running[arn] = max(redrives, self.told_running.get(arn, -1))
        return self.ledger.observe_running(arn, self.clock, redrives)

    def _terminal(self, arn: str, redrives: int) -> Change:
        self.told_ended[arn] = max(redrives, self.told_ended.get(arn, -1))
        return self.ledger.observe_terminal(arn, redrives)

    def _started(self, reservation: Reservation, arn: str) -> Change:
        self.pending.pop(reservation.token)
        self.told_running[arn] = max(0, self.told_running.get(arn, -1))
        self.ours.add(arn)
        return self.ledger.started(reservation, arn, self.clock)

    # -- the dispatcher ------------------------------------------------------------------

    @rule(target=reservations, n=st.integers(0, 4))
    def reserve(self, n: int) -> MultipleResults[Reservation]:
        """Intake reserves before receiving; (a) a start is only ever made into a free slot."""
        held = self.ledger.running_count + self.ledger.reserved_count
        granted = self.ledger.reserve(n, self.clock)
        assert len(granted) <= min(n, max(0, self.ledger.limit - held))
        self.pending.update((r.token, None) for r in granted)
        if granted:
            answered = {arn for arn in self.pending.values() if arn is not None}
            ours_running = {a for a, r in self.truth.items() if a in self.ours and r == 0}
            assert len(ours_running - answered) + len(self.pending) <= self.ledger.limit
        return multiple(*granted)

    @rule(target=calls, reservation=consumes(reservations))
    def start_execution(self, reservation: Reservation) -> Call:
        """StartExecution succeeds: the execution runs and will send RUNNING."""
        arn = f"ours-{next(self.names)}"
        self.truth[arn] = 0
        self.pending[reservation.token] = arn
        self.events.append(Event(arn, "RUNNING", 0))
        return Call(reservation, arn)

    @rule(call=consumes(calls))
    def start_answered(self, call: Call) -> None:
        """The dispatcher applies StartExecution's answer, maybe after events about it."""
        # Stale when the latest run the ledger knows of has already been reported ended.
        ended_first = self.told_ended.get(call.arn, -1) >= max(
            0, self.told_running.get(call.arn, -1)
        )
        change = self._started(call.reservation, call.arn)
        assert (change is Change.STALE) == ended_first
        assert self.ledger.holds(call.arn) != ended_first

    @rule(reservation=consumes(reservations))
    def start_failed(self, reservation: Reservation) -> None:
        """StartExecution failed (or the request was bad): the slot goes back."""
        self.pending.pop(reservation.token)
        assert self.ledger.cancel(reservation) is True

    @precondition(lambda self: bool(self.ours))
    @rule(reservation=consumes(reservations), data=st.data())
    def redelivered_request(self, reservation: Reservation, data: st.DataObject) -> None:
        """ExecutionAlreadyExists: running -> adopt, closed -> give the slot back."""
        arn = data.draw(st.sampled_from(sorted(self.ours)))
        if arn in self.truth:
            self._started(reservation, arn)
        else:
            self.pending.pop(reservation.token)
            self.ledger.cancel(reservation)
            self._terminal(arn, self.ended[arn])

    @rule(limit=st.integers(0, 6))
    def set_limit(self, limit: int) -> None:
        """The operator changes the limit; nothing already held is evicted."""
        before = (self.ledger.running, self.ledger.reserved_count)
        self.lowered |= limit < self.ledger.limit
        self.ledger.set_limit(limit)
        assert (self.ledger.running, self.ledger.reserved_count) == before

    # -- the world -----------------------------------------------------------------------

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 3.0, GRACE + 1]))
    def tick(self, dt: float) -> None:
        """Monotonic time passes."""
        self.clock += dt

    @rule()
    def console_start(self) -> None:
        """Someone else starts an execution of the same state machine."""
        arn = f"console-{next(self.names)}"
        self.foreign = True
        self.truth[arn] = 0
        self.events.append(Event(arn, "RUNNING", 0))

    @precondition(lambda self: bool(self.truth))
    @rule(data=st.data(), status=st.sampled_from(sorted(TERMINAL_STATUSES)))
    def execution_ends(self, data: st.DataObject, status: str) -> None:
        """A running execution finishes and sends its terminal event."""
        arn = data.draw(st.sampled_from(sorted(self.truth)))
        self.ended[arn] = self.truth.pop(arn)
        self.events.append(Event(arn, status, self.ended[arn]))

    @precondition(lambda self: bool(self.ended))
    @rule(data=st.data())
    def redrive(self, data: st.DataObject) -> None:
        """Someone redrives a finished execution: the same ARN runs again, one run later."""
        arn = data.draw(st.sampled_from(sorted(self.ended)))
        self.redriven = True
        self.truth[arn] = self.ended.pop(arn) + 1
        self.events.append(Event(arn, "RUNNING", self.truth[arn]))

    @precondition(lambda self: bool(self.events))
    @rule(data=st.data(), duplicate=st.booleans())
    def deliver_event(self, data: st.DataObject, duplicate: bool) -> None:
        """Deliver any queued event (reordering); keep it queued to deliver it again."""
        index = data.draw(st.integers(0, len(self.events) - 1))
        event = self.events[index] if duplicate else self.events.pop(index)
        if event.status == "RUNNING":
            self._running(event.arn, event.redrives)
        else:
            self._terminal(event.arn, event.redrives)

    @precondition(lambda self: bool(self.events))
    @rule(data=st.data())
    def drop_event(self, data: st.DataObject) -> None:
        """An event is lost for good."""
        self.events.pop(data.draw(st.integers(0, len(self.events) - 1)))

    @rule()
    def snapshot(self) -> None:
        """Record what a listing taken now would show; it may be applied much later."""
        self.snapshots.append(dict(self.truth))

    @precondition(lambda self: bool(self.snapshots))
    @rule(data=st.data())
    def lagging_reconcile(self, data: st.DataObject) -> None:
        """Apply an old snapshot as if ListExecutions returned it now; queue the suspects."""
        listed = data.draw(st.sampled_from(self.snapshots))
        held = self.ledger.running
        for arn, redrives in listed.items():
            self.told_running[arn] = max(redrives, self.told_running.get(arn, -1))
        result = self.ledger.apply_listing(listed, self.clock, GRACE)
        assert set(result.adopted) <= set(listed) - held
        assert set(result.suspects) <= held - set(listed)
        self.suspects.extend(result.suspects)

    @precondition(lambda self: bool(self.suspects))
    @rule(data=st.data())
    def describe_suspect(self, data: st.DataObject) -> None:
        """DescribeExecution answers from the truth as it is now."""
        arn = self.suspects.pop(data.draw(st.integers(0, len(self.suspects) - 1)))
        if arn in self.truth:
            self.ledger.confirm_running(arn, self.clock)
        else:
            self._terminal(arn, self.ended[arn])

    @rule()
    def fresh_reconcile(self) -> None:
        """(c) No leak: a listing equal to the truth, past the grace window, then describes."""
        self.clock += GRACE + 1
        held = self.ledger.running
        for arn, redrives in self.truth.items():
            self.told_running[arn] = max(redrives, self.told_running.get(arn, -1))
        result = self.ledger.apply_listing(dict(self.truth), self.clock, GRACE)
        assert set(result.adopted) <= set(self.truth) - held
        assert set(result.suspects) == held - set(self.truth)
        for arn in result.suspects:
            assert self._terminal(arn, self.ended[arn]) is Change.FREED
        assert self.ledger.running == set(self.truth)

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def within_the_limit(self) -> None:
        """(b) With only our own starts and a limit never lowered, slots held <= limit.

        A RUNNING event applied before started() counts the execution and its reservation
        both (conservative, until started() drops the reservation): count that slot once.
        """
        if self.foreign or self.redriven or self.lowered:
            return
        answered = {arn for arn in self.pending.values() if arn is not None}
        both = len(answered & self.ledger.running)
        assert self.ledger.running_count + self.ledger.reserved_count - both <= self.ledger.limit

    @invariant()
    def finished_runs_stay_finished(self) -> None:
        """(d) A held execution was told running in a later run than any it was told ended."""
        for arn in self.ledger.running:
            assert self.told_running.get(arn, -1) > self.told_ended.get(arn, -1), arn

    @invariant()
    def never_forgets_a_run_it_has_seen(self) -> None:
        """No under-count: a running execution whose current run the ledger saw is held."""
        for arn, redrives in self.truth.items():
            if self.told_running.get(arn, -1) >= redrives:
                assert self.ledger.holds(arn), arn

    @invariant()
    def reservations_match(self) -> None:
        """Every start in flight, and nothing else, holds a reservation."""
        assert self.ledger.reserved_count == len(self.pending)


# Settings profile: 300 sequences of up to 60 steps take ~3.5 s on 2 cores; over 30 random
# seeds that budget caught the redrive bug fixed above 29 times. derandomize keeps CI
# deterministic (the seed follows the test's source). For a soak run with fresh random
# seeds: LEDGER_EXAMPLES=5000 pytest tests/test_ledger.py --timeout=0 (about a minute).
_SOAK = int(os.environ.get("LEDGER_EXAMPLES", "0"))
STATEFUL = settings(
    max_examples=_SOAK or 300,
    stateful_step_count=60,
    derandomize=not _SOAK,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def test_the_ledger_survives_the_world() -> None:
    """Random interleavings of starts, events, listings and limits never break an invariant."""
    run_state_machine_as_test(World, settings=STATEFUL)


# -- the state machine can fail ----------------------------------------------------------


class GreedyLedger(Ledger):
    """Forgets that starts in flight hold slots: two intakes could both fill the last one."""

    def reserve(self, n: int, now: float, key: str | None = None) -> list[Reservation]:
        """Grant against running executions only."""
        in_flight, self._reserved = self._reserved, {}
        try:
            return super().reserve(n, now, key)
        finally:
            self._reserved = in_flight | self._reserved


class CounterLedger(Ledger):
    """Behaves like a counter: a duplicate or unknown terminal event frees someone's slot."""

    def observe_terminal(self, arn: str, redrive_count: int = 0) -> Change:
        """Decrement even when this ARN was not held."""
        change = super().observe_terminal(arn, redrive_count)
        if change is not Change.FREED and self.running:
            return super().observe_terminal(min(self.running), redrive_count)
        return change


class ForgetfulLedger(Ledger):
    """Frees without a tombstone: a late RUNNING event resurrects a finished execution."""

    def observe_terminal(self, arn: str, redrive_count: int = 0) -> Change:
        """Free the slot and forget the execution entirely."""
        change = super().observe_terminal(arn, redrive_count)
        self._tombstones.pop(arn, None)
        return change


class RedriveBlindLedger(Ledger):
    """The ledger before it tracked runs: a late terminal of run 0 frees the redriven run 1."""

    def observe_terminal(self, arn: str, redrive_count: int = 0) -> Change:
        """Forget which run is held before applying the terminal."""
        held = self._running.get(arn)
        if held is not None:
            held.redrives = redrive_count
        return super().observe_terminal(arn, redrive_count)


@pytest.mark.parametrize(
    ("broken", "caught_by"),
    [
        (GreedyLedger, {"reserve"}),
        (CounterLedger, {"never_forgets_a_run_it_has_seen"}),
        (ForgetfulLedger, {"finished_runs_stay_finished", "start_answered"}),
        (RedriveBlindLedger, {"never_forgets_a_run_it_has_seen"}),
    ],
)
def test_the_state_machine_catches_a_broken_ledger(
    broken: type[Ledger], caught_by: set[str]
) -> None:
    """Each deliberately broken ledger fails the check meant for it, on a small budget."""
    machine = type(f"WorldWith{broken.__name__}", (World,), {"ledger_class": broken})
    quick = settings(
        STATEFUL,
        max_examples=1000,  # stops at the first failure: usually < 1 s, 40/40 seeds < 10 s
        derandomize=True,
        phases=[Phase.generate],
        report_multiple_bugs=False,
    )
    with pytest.raises(AssertionError) as caught:
        run_state_machine_as_test(machine, settings=quick)
    ours = [f.name for f in traceback.extract_tb(caught.tb) if f.filename == __file__]
    assert ours[-1] in caught_by


def test_only_the_oldest_reservations_within_the_headroom_are_admitted() -> None:
    ledger = Ledger(5)
    first, second, third = ledger.reserve(3, now=0.0)
    assert all(ledger.admitted(r) for r in (first, second, third))
    # Executions started elsewhere appear while the three requests are being received.
    for i in range(3):
        ledger.observe_running(f"arn:foreign:{i}", now=1.0)
    assert ledger.admitted(first)
    assert ledger.admitted(second)
    assert not ledger.admitted(third), "the start would make 6 > 5"
    assert ledger.observe_terminal("arn:foreign:0") is Change.FREED
    assert ledger.admitted(third)
    ledger.set_limit(2)
    assert not ledger.admitted(first), "a lowered limit holds starts back"
    ledger.cancel(first)
    assert not ledger.admitted(first), "a cancelled reservation is never admitted"
