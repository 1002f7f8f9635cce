"""The start-by rules of the simulation's checker, on hand-built histories."""

from __future__ import annotations

import json

from sim.checker import check
from sim.deadlines import Producer, check_deadlines, deadline_of
from sim.history import History
from sim.loop import EPOCH
from tests.test_sim_checker import DLQ, QUEUE, kinds, request, run, spec


def start_sent(history: History, at: float, name: str) -> None:
    """A StartExecution attempt leaving its node (what `sim.calls` records)."""
    history.add(at, "d1", "start_sent", f"StartExecution name={name} sent", name=name)


def dead_letter(history: History, at: float, message_id: str, reason: str) -> None:
    history.message_sent(
        at,
        "d1",
        queue_url=DLQ,
        message_id=f"dl-{message_id}",
        body="{}",
        attributes={"dispatcher-reason": reason, "dispatcher-original-message-id": message_id},
    )


def test_the_checker_reads_start_by_in_every_format_the_producers_send() -> None:
    assert deadline_of(f"{EPOCH + 12.5:.3f}") == 12.5
    assert deadline_of("2026-01-01T00:00:10.000Z") == 10.0
    assert deadline_of("2026-01-01T01:00:10.000+01:00") == 10.0
    assert deadline_of("2026-01-01T00:00:00") is None  # no offset: invalid
    assert deadline_of("1e9") is None
    drawn = Producer(17, 10)
    assert drawn.enabled
    texts = [drawn.start_by(100.0)[0] for _ in range(200)]
    assert any(t is not None and deadline_of(t) is not None for t in texts)


def test_a_start_sent_after_the_start_by_is_a_violation() -> None:
    history = History()
    request(history, "r1", "m1", attributes={"start-by": f"{EPOCH + 10:.3f}"})
    start_sent(history, 9.999, "m1")
    assert check_deadlines(history, spec()) == []
    start_sent(history, 10.0, "k0123456789_m1")  # keyed: the same request
    [found] = check_deadlines(history, spec())
    assert found.kind == "start_after_deadline"


def test_a_redrive_without_the_start_by_frees_the_request_of_it() -> None:
    history = History()
    request(history, "r1", "m1", attributes={"start-by": f"{EPOCH + 10:.3f}"})
    dead_letter(history, 10.5, "m1", "expired")
    history.message_sent(
        20.0,
        "redrive",
        queue_url=QUEUE,
        message_id="copy-1",
        body="{}",
        attributes={"dispatcher-request-id": "m1"},
    )
    start_sent(history, 21.0, "m1")
    assert check_deadlines(history, spec()) == []


def test_a_request_expired_before_its_start_by_is_a_violation() -> None:
    history = History()
    request(history, "r1", "m1", attributes={"start-by": f"{EPOCH + 10:.3f}"})
    dead_letter(history, 9.0, "m1", "expired")
    [found] = check_deadlines(history, spec())
    assert found.kind == "expired_early"


def test_an_execution_a_later_copy_started_is_not_the_dead_letters() -> None:
    """Dead-lettered as expired at 40; a redrive sends a copy without the start-by at 41,
    whose start (sent at 41.2) takes effect at 41.5, within the late-start window. Rule 9
    tells it from a start sent before the dead letter by the record of each attempt."""
    late_copy = History()
    request(late_copy, "q1", "m1", attributes={"start-by": f"{EPOCH + 30:.3f}"})
    dead_letter(late_copy, 40, "m1", "expired")
    start_sent(late_copy, 41.2, "m1")
    run(late_copy, "m1", 41.5, 60, input=json.dumps({"request": "q1"}))
    assert "dead_letter_ran" not in kinds(check(late_copy, spec(late_start=5.0)))
    in_flight = History()
    request(in_flight, "q1", "m1", attributes={"start-by": f"{EPOCH + 30:.3f}"})
    start_sent(in_flight, 29.9, "m1")
    dead_letter(in_flight, 40, "m1", "expired")
    run(in_flight, "m1", 41.5, 60, input=json.dumps({"request": "q1"}))
    assert "dead_letter_ran" in kinds(check(in_flight, spec(late_start=5.0)))
