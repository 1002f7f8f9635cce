"""The checker's lease fence (`sim.fence`): a start attempt leaves a dispatcher process only
while the lease item names that process and has not expired, judged from the lease writes
and the attempts the simulated AWS recorded."""

from __future__ import annotations

import pytest

from sim.fence import check_fence
from sim.harness import simulate
from sim.history import History

EPOCH = 1_000_000.0
MACHINE = "arn:aws:states:eu-west-1:123456789012:stateMachine:governed-p0"


def _history(*sends: tuple[float, str]) -> History:
    """Two processes: d1.1 takes the lease at 0 (expires at 15), renews at 5 (expires at
    20), then d2.1 takes it at 40 (expires at 55) and releases it at 50."""
    history = History()
    for node in ("d1.1", "d2.1"):
        history.note(0.0, node, "process started")
    writes = [
        (0.0, "d1.1", 1, 15.0, "taken"),
        (5.0, "d1.1", 1, 20.0, "renewed"),
        (40.0, "d2.1", 2, 55.0, "taken"),
        (50.0, "d2.1", 2, 0.0, "released"),
    ]
    for time, owner, epoch, expires, what in writes:
        history.lease_written(
            time,
            owner,
            table="leases",
            pool=MACHINE,
            owner=owner,
            epoch=epoch,
            expires_at=EPOCH + expires if expires else 0.0,
            what=what,
        )
    for time, node in sends:
        history.add(time, node, "start_sent", "sent", name=f"n{time}", state_machine=MACHINE)
    return history


def test_starts_under_a_valid_lease_pass() -> None:
    assert check_fence(_history((1.0, "d1.1"), (19.9, "d1.1"), (45.0, "d2.1")), EPOCH) == []


@pytest.mark.parametrize(
    ("send", "why"),
    [
        ((20.5, "d1.1"), "0.500 s after its lease expired"),
        ((41.0, "d1.1"), "while the lease was d2.1's (epoch 2)"),
        ((51.0, "d2.1"), "after it released the lease"),
        ((3.0, "d2.1"), "while the lease was d1.1's"),
    ],
)
def test_a_start_outside_the_lease_is_a_violation(send: tuple[float, str], why: str) -> None:
    [violation] = check_fence(_history(send), EPOCH)
    assert violation.kind == "start_outside_lease"
    assert violation.time == send[0]
    assert why in violation.message


def test_starts_of_processes_outside_the_lease_or_without_one_are_not_judged() -> None:
    history = _history((30.0, "producer"))
    history.add(30.0, "d1.1", "start_sent", "sent", name="x", state_machine="arn:other")
    assert check_fence(history, EPOCH) == []
    assert check_fence(History(), EPOCH) == []


@pytest.mark.timeout(120)
def test_the_simulation_catches_starts_sent_after_the_lease_lapsed() -> None:
    """With every check of the lease before a send taken out (the mutation
    ``start-without-lease``), a start handled as the reign ends leaves after the lease
    expired (seed 7: 10.5 s after)."""
    outcome = simulate(7, bugs=("start-without-lease",))
    assert "start_outside_lease" in {v.kind for v in outcome.violations}
    assert not [v for v in simulate(7).violations if v.kind == "start_outside_lease"]
