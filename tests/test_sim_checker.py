"""The checker catches every broken rule in hand-built histories and passes clean ones."""

from __future__ import annotations

import json
from typing import Any

import anyio

from dispatcher.core.requests import key_tag
from sim.aws import World
from sim.checker import CheckSpec, PoolSpec, Violation, check, limit_at, max_concurrency
from sim.copy_rules import check_renewed_first
from sim.history import ORIGINAL_ID_ATTRIBUTE, OUTSIDE, REASON_ATTRIBUTE, History
from tests.test_sim_aws import make_world, virtual

REGION_ACCOUNT = "eu-west-1:123456789012"
MACHINE = f"arn:aws:states:{REGION_ACCOUNT}:stateMachine:work"
QUEUE = "https://sqs.eu-west-1.amazonaws.com/123456789012/requests"
DLQ = "https://sqs.eu-west-1.amazonaws.com/123456789012/dead"


def spec(**overrides: Any) -> CheckSpec:
    """Limit 2 on one machine, one request queue, settled 60 s after quiet at 100."""
    values: dict[str, Any] = {
        "pools": {MACHINE: PoolSpec(limit=2)},
        "request_queues": frozenset({QUEUE}),
        "dead_letter_queue": DLQ,
        "quiet_at": 100.0,
        "settle_bound": 60.0,
    }
    values.update(overrides)
    return CheckSpec(**values)


def execution_arn(name: str) -> str:
    """The ARN of execution ``name`` of the machine."""
    return f"arn:aws:states:{REGION_ACCOUNT}:execution:work:{name}"


def run(
    history: History,
    name: str,
    start: float,
    stop: float | None = None,
    *,
    node: str = "d1",
    input: str | None = None,
) -> str:
    """An execution ``name`` running from ``start`` to ``stop``."""
    arn = execution_arn(name)
    history.execution_started(
        start,
        node,
        arn=arn,
        state_machine_arn=MACHINE,
        name=name,
        input=input if input is not None else json.dumps({"name": name}),
    )
    if stop is not None:
        history.execution_ended(stop, arn, "SUCCEEDED")
    return arn


def request(
    history: History,
    request_id: str,
    message_id: str,
    at: float = 0.0,
    *,
    body: str | None = None,
    attributes: dict[str, str] | None = None,
) -> None:
    """A producer's request message."""
    history.request_sent(
        at,
        "producer",
        request_id=request_id,
        queue_url=QUEUE,
        message_id=message_id,
        body=body if body is not None else json.dumps({"request": request_id}),
        attributes=attributes or {},
    )


def delete(history: History, message_id: str, at: float, *, deleted: bool = True) -> None:
    """A delete of a request message."""
    history.message_deleted(at, "d1", queue_url=QUEUE, message_id=message_id, deleted=deleted)


def dead_letter(history: History, message_id: str, at: float, reason: str = "invalid_json") -> None:
    """A dead-letter copy the dispatcher sent (as ``receive_limit``: after its renewal was
    tried, as the dispatcher does)."""
    if reason == "receive_limit":
        _copy_tried_of(history, message_id, at)
    history.message_sent(
        at,
        "d1",
        queue_url=DLQ,
        message_id=f"dl-{message_id}",
        body="not json",
        attributes={
            "dispatcher-reason": reason,
            "dispatcher-original-message-id": message_id,
        },
    )


def _copy_tried_of(history: History, message_id: str, at: float) -> None:
    """The dispatcher tried to renew ``message_id`` (a copy sent to its queue) at ``at``."""
    history.add(at, "d1", "copy_sent", "SendMessage tried", queue=QUEUE, original=message_id)


def kinds(violations: list[Violation]) -> list[str]:
    """The kinds of the violations, in order."""
    return [v.kind for v in violations]


def served(history: History, request_id: str, message_id: str, start: float, stop: float) -> None:
    """A request whose execution (named after the message) ran, then was deleted."""
    request(history, request_id, message_id, start - 1)
    run(history, message_id, start, stop, input=json.dumps({"request": request_id}))
    delete(history, message_id, start + 0.5)


# -- a clean history --------------------------------------------------------------------------


def test_a_clean_history_passes() -> None:
    history = History()
    served(history, "q1", "m1", 1, 10)
    served(history, "q2", "m2", 2, 11)
    served(history, "q3", "m3", 10, 20)  # starts as m1 ends: two running
    served(history, "q4", "m4", 11, 21)
    assert check(history, spec()) == []
    assert max_concurrency(history, MACHINE) == 2


# -- rule 1: limits ---------------------------------------------------------------------------


def test_one_too_many_running_is_caught() -> None:
    history = History()
    run(history, "a", 1, 10)
    run(history, "b", 2, 10)
    run(history, "c", 3, 10)
    [violation] = check(history, spec())
    assert violation.kind == "limit"
    assert violation.time == 3
    assert "3 running" in violation.message
    assert "limit 2" in violation.message
    assert MACHINE in violation.message
    assert max_concurrency(history, MACHINE) == 3


def test_simultaneous_starts_count_each_other() -> None:
    history = History()
    run(history, "a", 1, 10)
    run(history, "b", 1, 10)
    run(history, "c", 1, 10)
    assert kinds(check(history, spec())) == ["limit"]


def test_outside_runs_count_after_their_grace() -> None:
    history = History()
    run(history, "console", 0, 100, node=OUTSIDE)
    run(history, "a", 1, 100)
    run(history, "b", 2, 100)  # the outside run is not knowable yet: 2 of 2
    assert check(history, spec(outside_grace=5.0)) == []
    run(history, "c", 6, 100)  # now it counts: 4 of 2
    [violation] = check(history, spec(outside_grace=5.0))
    assert (violation.kind, violation.time) == ("limit", 6)
    assert "4 running" in violation.message


def test_redrives_are_outside_runs() -> None:
    history = History()
    a = run(history, "a", 0, 5)
    run(history, "b", 1, 100)
    history.execution_redriven(6, OUTSIDE, a)
    run(history, "c", 7, 100)  # b and c: the redrive is 1 s old, not knowable yet
    assert check(history, spec(outside_grace=2.0)) == []
    run(history, "d", 9, 100)  # b, c, d and the redriven a
    [violation] = check(history, spec(outside_grace=2.0))
    assert (violation.kind, violation.time) == ("limit", 9)
    assert "4 running" in violation.message


def _exists_then_redriven(*, described_at: float | None = None) -> History:
    """Execution a (started by d1.1) ended at 5, its end never delivered; d2.1, started
    after, is told at 10 that a exists; a is redriven at 11; b runs from 1, c starts at 12."""
    history = History()
    a = run(history, "a", 0, 5)
    run(history, "b", 1, 100)
    history.note(8, "d2.1", "process started")
    if described_at is not None:
        history.call(described_at, "d2.1", 1, "DescribeExecution name=a", "APPLIED")
    history.call(10, "d2.1", 2, "StartExecution name=a", "ERROR ExecutionAlreadyExists")
    history.execution_redriven(11, OUTSIDE, a)
    run(history, "c", 12, 100, node="d2.1")
    return history


def test_a_redrive_after_already_exists_counts_from_its_start() -> None:
    """Told the execution exists, a process that cannot know it ended holds its slot: the
    redrive counts at once, not after the grace for outside runs."""
    [violation] = check(_exists_then_redriven(), spec(outside_grace=50.0))
    assert (violation.kind, violation.time) == ("limit", 12)
    assert "3 running" in violation.message


def test_a_redrive_after_a_describe_showed_the_end_is_an_outside_run() -> None:
    history = _exists_then_redriven(described_at=9)
    assert check(history, spec(outside_grace=50.0)) == []


def test_a_lowered_limit_is_judged_after_the_staleness() -> None:
    history = History()
    for i in range(4):
        run(history, f"r{i}", i + 1, 100)
    history.parameter_put(10, "/limit", "2", 2)
    pool = {MACHINE: PoolSpec(limit=5, parameter="/limit")}
    run(history, "r4", 11, 100)  # 5 of 5: the old limit may still be in force
    assert check(history, spec(pools=pool, staleness=3.0)) == []
    run(history, "r5", 14, 100)  # 6 of 2
    [violation] = check(history, spec(pools=pool, staleness=3.0))
    assert (violation.kind, violation.time) == ("limit", 14)
    assert "limit 2" in violation.message


def test_a_lowered_limit_is_judged_from_the_first_attempt_of_a_start() -> None:
    """A start sent just before a lowered limit was read, held on the wire for its D, was
    judged against the new limit from its effect; one sent long after the change and
    admitted over it is judged from its send, however long the fallback window."""
    history = History()
    for i in range(4):
        run(history, f"r{i}", i + 1, 100)
    history.parameter_put(10, "/limit", "2", 2)
    pool = {MACHINE: PoolSpec(limit=5, parameter="/limit")}
    history.add(9, "d1", "start_sent", "StartExecution name=r4 sent", name="r4")
    run(history, "r4", 14, 100)  # sent before the change could be read: the old limit
    assert check(history, spec(pools=pool, staleness=20.0, read_lag=3.0)) == []
    history.add(20, "d1", "start_sent", "StartExecution name=r5 sent", name="r5")
    run(history, "r5", 21, 100)  # sent 10 s after the change: 6 of 2
    [violation] = check(history, spec(pools=pool, staleness=20.0, read_lag=3.0))
    assert (violation.kind, violation.time) == ("limit", 21)
    assert "limit 2" in violation.message


def test_a_value_that_is_not_a_limit_keeps_the_limit() -> None:
    history = History()
    history.parameter_put(0, "/limit", "lots", 1)
    pool = {MACHINE: PoolSpec(limit=1, parameter="/limit")}
    run(history, "a", 1, 10)
    run(history, "b", 2, 10)
    assert kinds(check(history, spec(pools=pool))) == ["limit"]
    timeline = history.limit_timeline("/limit", 1)
    assert limit_at(timeline, 5, 0) == 1


def test_per_key_limit() -> None:
    history = History()
    alice, bob = key_tag("alice"), key_tag("bob")
    run(history, f"k{alice}_1", 1, 10)
    run(history, f"k{bob}_1", 2, 10)
    pool = {MACHINE: PoolSpec(limit=10, per_key_limit=1)}
    assert check(history, spec(pools=pool)) == []
    run(history, f"k{alice}_2", 3, 10)
    [violation] = check(history, spec(pools=pool))
    assert violation.kind == "key_limit"
    assert alice in violation.message


def test_a_lowered_per_key_limit_is_judged_after_the_staleness() -> None:
    history = History()
    alice = key_tag("alice")
    run(history, f"k{alice}_1", 1, 100)
    history.parameter_put(10, "/key-limit", "1", 1)
    pool = {MACHINE: PoolSpec(limit=10, per_key_limit=2, key_limit_parameter="/key-limit")}
    run(history, f"k{alice}_2", 11, 100)  # 2 of 2: the old per-key limit may be in force
    assert check(history, spec(pools=pool, staleness=3.0)) == []
    run(history, f"k{alice}_3", 14, 100)  # 3 of 1
    [violation] = check(history, spec(pools=pool, staleness=3.0))
    assert (violation.kind, violation.time) == ("key_limit", 14)
    assert "per-key limit 1" in violation.message


def test_per_key_limit_counts_a_run_by_its_requests_key_when_its_name_lacks_the_tag() -> None:
    """Runs of two requests of key "alice" named without the key tag: over the per-key
    limit all the same (the pool is keyed the whole run); without the key attribute in the
    spec only the tag counts."""
    history = History()
    for index in (1, 2):
        request(history, f"q{index}", f"m{index}", attributes={"tenant": "alice"})
        run(history, f"m{index}", index, 10, input=json.dumps({"request": f"q{index}"}))
    request(history, "q3", "m3", attributes={"tenant": "bob"})
    run(history, "m3", 3, 10, input=json.dumps({"request": "q3"}))
    untagged = {MACHINE: PoolSpec(limit=10, per_key_limit=1)}
    assert check(history, spec(pools=untagged)) == []
    keyed = {MACHINE: PoolSpec(limit=10, per_key_limit=1, key_attribute="tenant")}
    [violation] = [v for v in check(history, spec(pools=keyed)) if v.kind == "key_limit"]
    assert "key alice" in violation.message
    assert "m2 started" in violation.message


# -- rule 2: one execution per request --------------------------------------------------------


def test_two_executions_for_one_request_are_caught() -> None:
    history = History()
    request(history, "q1", "m1", body='{"order": 1}')
    run(history, "m1", 1, 5, input='{"order": 1}')
    run(history, "random-name", 2, 5, input='{"order":1}')  # same input, another name
    violations = check(history, spec())
    assert kinds(violations) == ["duplicate_execution"]
    assert "q1" in violations[0].message


def test_a_producer_retry_with_the_same_key_is_one_request() -> None:
    history = History()
    tag = key_tag("tenant")
    for message_id in ("m1", "m2"):
        request(history, "q1", message_id, attributes={"idempotency-key": "order-1"})
    run(history, f"k{tag}_order-1", 1, 5)
    delete(history, "m1", 2)
    delete(history, "m2", 3)
    assert check(history, spec()) == []
    # Started again under the message id (the key ignored): a second execution.
    run(history, "m2", 4, 8, input=json.dumps({"request": "q1"}))
    assert "duplicate_execution" in kinds(check(history, spec()))


# -- rule 3: no request lost ------------------------------------------------------------------


def test_a_request_without_execution_is_lost() -> None:
    history = History()
    request(history, "q1", "m1", 5)
    [violation] = check(history, spec())
    assert (violation.kind, violation.time) == ("lost_request", 160.0)
    assert "q1" in violation.message
    run(history, "m1", 170, 175)  # too late
    assert kinds(check(history, spec())) == ["lost_request"]


def test_a_late_request_gets_its_own_settle_time() -> None:
    history = History()
    request(history, "q1", "m1", 150)
    run(history, "m1", 200, 205)
    assert check(history, spec()) == []


def test_a_dead_letter_copy_with_a_reason_settles_a_request() -> None:
    history = History()
    request(history, "q1", "m1", body="not json")
    dead_letter(history, "m1", 3)
    delete(history, "m1", 4)
    assert check(history, spec(expected_bad=frozenset({"q1"}))) == []
    assert check(history, spec()) == []


def test_a_copy_without_a_reason_does_not_count() -> None:
    history = History()
    request(history, "q1", "m1")
    history.message_sent(
        3, "d1", queue_url=DLQ, message_id="x", body="{}",
        attributes={"dispatcher-original-message-id": "m1"},
    )  # fmt: skip
    assert kinds(check(history, spec())) == ["lost_request"]


def test_a_redrive_move_is_a_violation_for_a_valid_request() -> None:
    history = History()
    request(history, "q1", "m1")
    history.message_moved(
        40, source_url=QUEUE, target_url=DLQ, message_id="m1", body="{}", attributes={}
    )
    assert kinds(check(history, spec())) == ["redrive_move", "lost_request"]
    assert check(history, spec(expected_bad=frozenset({"q1"}))) == []


def _moved_after_receives(*, lost: bool = False, crashed: bool = False) -> History:
    """Request q1 received twice by d1 (the second time its answer lost, or d1 killed
    after it), then moved by the redrive policy (maxReceiveCount 2)."""
    history = History()
    request(history, "q1", "m1")
    history.messages_received(1, "d1", QUEUE, [("m1", 1)], call_id=1)
    history.messages_received(62, "d1", QUEUE, [("m1", 2)], call_id=2)
    if lost:
        history.answer_lost(62, "d1", 2, "ReceiveMessage", "answer lost")
    if crashed:
        history.crash(70, "d1")
    history.message_moved(
        130, source_url=QUEUE, target_url=DLQ, message_id="m1", body="{}", attributes={}
    )
    return history


def test_a_move_after_receives_a_dispatcher_saw_is_a_violation() -> None:
    assert kinds(check(_moved_after_receives(), spec())) == ["redrive_move", "lost_request"]


def test_a_move_no_dispatcher_could_prevent_settles_the_request() -> None:
    """A receive whose answer was lost (SQS counted it, nobody saw it), or a receiver
    killed while it held the message: SQS's move is not the dispatcher's doing."""
    assert check(_moved_after_receives(lost=True), spec()) == []
    assert check(_moved_after_receives(crashed=True), spec()) == []
    history = _moved_after_receives()
    history.note(80, "d1", "SIGTERM")
    assert check(history, spec()) == []
    history = _moved_after_receives()
    history.crash(0.5, "d1")  # killed before: the receives' answers reached nobody
    assert check(history, spec()) == []


def test_a_move_after_a_receive_answered_while_its_receiver_stopped_settles_the_request() -> None:
    """Told to stop while its long poll was in flight, the receiver got the message on its
    last receive after the SIGTERM: kept, and let go hidden when shutdown could not settle
    it - SQS's move is not the dispatcher's doing."""
    history = History()
    request(history, "q1", "m1")
    history.messages_received(1, "d1", QUEUE, [("m1", 1)], call_id=1)  # handed back
    history.note(61.5, "d1.2", "SIGTERM")
    history.messages_received(62, "d1.2", QUEUE, [("m1", 2)], call_id=2)
    history.message_moved(
        130, source_url=QUEUE, target_url=DLQ, message_id="m1", body="{}", attributes={}
    )
    assert check(history, spec()) == []


def test_a_request_dead_lettered_for_a_redrive_while_its_execution_runs() -> None:
    """Dead-lettered as receive_limit (the detail says: redrive it to run it) although its
    execution had started: the redrive would start it again."""
    history = History()
    request(history, "q1", "m1")
    run(history, "m1", 5, 100, input=json.dumps({"request": "q1"}))
    dead_letter(history, "m1", 40, reason="receive_limit")
    delete(history, "m1", 41)
    assert kinds(check(history, spec())) == ["dead_letter_ran"]
    clean = History()
    request(clean, "q1", "m1")
    dead_letter(clean, "m1", 40, reason="receive_limit")  # never ran: a redrive runs it
    delete(clean, "m1", 41)
    assert check(clean, spec()) == []


def test_a_request_dead_lettered_while_its_process_holds_a_copy_it_then_starts() -> None:
    """SQS stored the request twice; the process dead-lettered one copy (receive_limit,
    "redrive it to run it") while it held the other, which it started afterwards: the
    dead letter said the execution does not exist while a copy in its hands was to start
    it. A copy received again after the dead letter (e.g. it came back) is another matter."""

    def history_with(received_again: bool, reason: str = "receive_limit") -> History:
        history = History()
        request(history, "q1", "m1")
        history.messages_received(1, "d1", QUEUE, [("m1", 1), ("m1", 1)], call_id=1)
        history.add(2, "d1", "start_sent", "StartExecution name=m1 sent", name="m1")
        dead_letter(history, "m1", 40, reason=reason)
        if received_again:
            history.messages_received(50, "d1", QUEUE, [("m1", 2)], call_id=2)
        history.add(60, "d1", "start_sent", "StartExecution name=m1 sent", name="m1")
        run(history, "m1", 60.01, 70, input=json.dumps({"request": "q1"}))
        delete(history, "m1", 61)
        return history

    assert kinds(check(history_with(received_again=False), spec())) == ["dead_letter_held_copy"]
    assert check(history_with(received_again=True), spec()) == []
    # Expired: that copy's own start-by passed; a producer's retry with a later one (or
    # none) may start afterwards.
    assert check(history_with(received_again=False, reason="expired"), spec()) == []


def test_a_slot_left_free_while_a_request_waits_is_caught_where_judged() -> None:
    """``idle_slot`` (late_running seeds): limit 2, three requests sent at 0; the third
    starts only 15 s after a slot came free (the first run ended at 5). Not judged without
    an idle bound; judged with one of 8 s; fine when it starts at once."""

    def history_with(third_at: float) -> History:
        history = History()
        for index, start, stop in ((1, 1.0, 5.0), (2, 1.0, 40.0), (3, third_at, 50.0)):
            request(history, f"q{index}", f"m{index}")
            run(history, f"m{index}", start, stop, input=json.dumps({"request": f"q{index}"}))
            delete(history, f"m{index}", start + 0.5)
        return history

    late = history_with(20.0)
    assert check(late, spec()) == []
    assert kinds(check(late, spec(idle_bound=8.0))) == ["idle_slot"]
    assert check(history_with(6.0), spec(idle_bound=8.0)) == []


def test_a_request_received_too_often_before_it_starts_is_caught_where_judged() -> None:
    """``receives`` (deep_backlog seeds): a request deferred again and again - received 3
    times before its execution started - breaks a bound of 2; receives after the start (a
    duplicate delivery) do not count."""
    history = History()
    request(history, "q1", "m1")
    for index, at in enumerate((1.0, 11.0, 21.0)):
        history.messages_received(at, "d1", QUEUE, [("m1", index + 1)], call_id=index)
    run(history, "m1", 22.0, 30.0, input=json.dumps({"request": "q1"}))
    delete(history, "m1", 22.5)
    history.messages_received(40.0, "d1", QUEUE, [("m1", 4)], call_id=9)
    assert check(history, spec()) == []
    assert kinds(check(history, spec(receive_bound=2))) == ["receives"]
    assert check(history, spec(receive_bound=3)) == []


def test_a_bad_request_must_not_start_and_must_be_dead_lettered() -> None:
    history = History()
    request(history, "q1", "m1", body="not json")
    assert kinds(check(history, spec(expected_bad=frozenset({"q1"})))) == ["lost_request"]
    run(history, "m1", 2, 3, input="{}")
    assert "bad_request_started" in kinds(check(history, spec(expected_bad=frozenset({"q1"}))))


# -- rule 4: no delete before the execution or the dead-letter copy ---------------------------


def test_a_delete_before_the_start_is_caught() -> None:
    history = History()
    request(history, "q1", "m1")
    delete(history, "m1", 1)
    run(history, "m1", 2, 5)
    [violation] = check(history, spec())
    assert (violation.kind, violation.time) == ("early_delete", 1)
    assert "m1" in violation.message


def test_a_delete_before_the_dead_letter_copy_is_caught() -> None:
    history = History()
    request(history, "q1", "m1", body="not json")
    delete(history, "m1", 1)
    dead_letter(history, "m1", 2)
    assert kinds(check(history, spec(expected_bad=frozenset({"q1"})))) == ["early_delete"]


def _renewed(history: History, at: float) -> None:
    """d1 renews request q1 (message m1) on its last receive: a copy on the request queue
    naming it, then the original deleted."""
    history.message_sent(
        at,
        "d1",
        queue_url=QUEUE,
        message_id="c1",
        body=json.dumps({"request": "q1"}),
        attributes={"dispatcher-request-id": "m1", "dispatcher-original-message-id": "m1"},
    )


def test_a_delete_after_the_request_was_renewed_is_fine() -> None:
    """Its copy carries the request on: the original may go before any execution exists
    (the copy starts it), but not before the copy was sent."""
    history = History()
    request(history, "q1", "m1")
    _renewed(history, 10)
    delete(history, "m1", 11)
    run(history, "m1", 50, 60, input=json.dumps({"request": "q1"}))
    assert check(history, spec()) == []
    early = History()
    request(early, "q1", "m1")
    delete(early, "m1", 9)
    _renewed(early, 10)
    run(early, "m1", 50, 60, input=json.dumps({"request": "q1"}))
    assert kinds(check(early, spec())) == ["early_delete"]


def test_a_renewed_copy_moved_by_the_redrive_policy_is_a_violation() -> None:
    """The copy is as much the request as the producer's message."""
    history = History()
    request(history, "q1", "m1")
    _renewed(history, 10)
    delete(history, "m1", 11)
    history.message_moved(
        90, source_url=QUEUE, target_url=DLQ, message_id="c1", body="{}", attributes={}
    )
    assert kinds(check(history, spec())) == ["redrive_move", "lost_request"]


def test_a_stale_handle_delete_deletes_nothing_and_is_fine() -> None:
    history = History()
    request(history, "q1", "m1")
    delete(history, "m1", 1, deleted=False)
    run(history, "m1", 2, 5)
    delete(history, "m1", 3)
    assert check(history, spec()) == []


def test_deleting_after_an_earlier_execution_of_the_request_is_fine() -> None:
    history = History()
    request(history, "q1", "m1", 0, attributes={"idempotency-key": "k"})
    run(history, "k", 1, 5)
    request(history, "q1", "m2", 10, attributes={"idempotency-key": "k"})  # retry
    delete(history, "m2", 11)  # ExecutionAlreadyExists on a closed execution: done
    delete(history, "m1", 12)
    assert check(history, spec()) == []


# -- histories recorded by the simulated world ------------------------------------------------


async def _mini_dispatcher(world: World, queue: str, machine: str, *, careful: bool) -> None:
    """Receive, start, delete; ``careful=False`` deletes first and ignores the limit."""
    sqs = world.client("sqs", "d1")
    sfn = world.client("stepfunctions", "d1")
    running: dict[str, float] = {}
    while anyio.current_time() < 60:
        now = anyio.current_time()
        running = {arn: end for arn, end in running.items() if end > now}
        if careful and len(running) >= 2:
            await anyio.sleep(min(running.values()) - now + 0.001)
            continue
        got = await sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=1, WaitTimeSeconds=1)
        for message in got.get("Messages", []):
            if not careful:
                await sqs.delete_message(QueueUrl=queue, ReceiptHandle=message["ReceiptHandle"])
            started = await sfn.start_execution(
                stateMachineArn=machine, name=message["MessageId"], input=message["Body"]
            )
            running[started["executionArn"]] = anyio.current_time() + 3.5
            if careful:
                await sqs.delete_message(QueueUrl=queue, ReceiptHandle=message["ReceiptHandle"])


def _simulate(*, careful: bool) -> list[Violation]:
    found: list[Violation] = []

    @virtual
    async def scenario() -> None:
        world = make_world()
        machine = world.create_state_machine("work")
        dead = world.create_queue("dead")
        queue = world.create_queue("requests", dead_letter=dead)
        for i in range(6):
            world.send_request(queue, json.dumps({"seconds": 3, "i": i}), {}, request_id=f"q{i}")
        async with anyio.create_task_group() as tg:
            tg.start_soon(world.run)
            await _mini_dispatcher(world, queue, machine, careful=careful)
            tg.cancel_scope.cancel()
        found.extend(
            check(
                world.history,
                CheckSpec(
                    pools={machine: PoolSpec(limit=2)},
                    request_queues=frozenset({queue}),
                    dead_letter_queue=dead,
                    quiet_at=0.0,
                    settle_bound=50.0,
                ),
            )
        )

    scenario()
    return found


def test_a_careful_dispatcher_in_the_world_passes() -> None:
    assert _simulate(careful=True) == []


def test_a_careless_dispatcher_in_the_world_is_caught() -> None:
    found = set(kinds(_simulate(careful=False)))
    assert found == {"limit", "early_delete"}


# -- copies SQS's move task makes of what the redrive policy moved ---------------------------


def _moved_back(history: History, new_id: str, at: float, attributes: dict[str, str]) -> None:
    """SQS's move task sends request q1's message back to the queue as ``new_id``."""
    history.message_sent(
        at,
        "move-task",
        queue_url=QUEUE,
        message_id=new_id,
        body=json.dumps({"request": "q1"}),
        attributes=attributes,
    )


def _fresh_copy_started(attributes: dict[str, str]) -> History:
    """q1 started under its message id; the redrive policy had also moved a copy of it
    (SQS stored it twice), which the move task sends back as m9, started under m9."""
    history = History()
    request(history, "q1", "m1")
    run(history, "m1", 5, 10, input=json.dumps({"request": "q1"}))
    delete(history, "m1", 6)
    _moved_back(history, "m9", 20, attributes)
    run(history, "m9", 25, 30, input=json.dumps({"request": "q1"}))
    delete(history, "m9", 26)
    return history


def test_a_move_task_copy_of_what_the_redrive_policy_moved_is_a_new_request() -> None:
    """Nothing on it names q1 and it has no idempotency key: the documented identity rules
    make it a new request (docs/requests.md, "Request identity"), not a second execution of q1."""
    assert check(_fresh_copy_started({}), spec()) == []


def test_a_move_task_copy_that_names_its_request_is_still_one_request() -> None:
    """The same copy carrying dispatcher-request-id (a dispatcher's dead letter moved back),
    or an idempotency key: started again under another name, it is a duplicate."""
    for attributes in (
        {"dispatcher-request-id": "m1", "dispatcher-original-message-id": "m1"},
        {"idempotency-key": "order-1"},
    ):
        history = _fresh_copy_started(attributes)
        assert kinds(check(history, spec())) == ["duplicate_execution"], attributes
    twice = _fresh_copy_started({})
    run(twice, "m9-again", 40, 45, input=json.dumps({"request": "q1"}))  # same input
    assert kinds(check(twice, spec())) == ["duplicate_execution"]
    again = _fresh_copy_started({})
    run(again, f"k{key_tag('t')}_m9", 40, 45)  # the fresh copy's identity started twice
    assert kinds(check(again, spec())) == ["duplicate_execution"]


def _fresh_copy_dead_lettered(*, fresh_ran: bool, attributes: dict[str, str]) -> History:
    """q1 ran under m1; a fresh copy m9 of it is dead-lettered as receive_limit, its detail
    saying m9's execution does not exist and to redrive it."""
    history = History()
    request(history, "q1", "m1")
    run(history, "m1", 5, 10, input=json.dumps({"request": "q1"}))
    delete(history, "m1", 6)
    _moved_back(history, "m9", 20, attributes)
    if fresh_ran:
        run(history, "m9", 25, 100, input=json.dumps({"request": "q1"}))
    _copy_tried_of(history, "m9", 39)
    history.message_sent(
        40,
        "d1",
        queue_url=DLQ,
        message_id="dl-m9",
        body=json.dumps({"request": "q1"}),
        attributes={
            "dispatcher-reason": "receive_limit",
            "dispatcher-request-id": "m9",
            "dispatcher-original-message-id": "m9",
            "dispatcher-detail": "its execution 'm9' is missing: redrive it to run it",
        },
    )
    delete(history, "m9", 41)
    return history


def test_a_dead_letter_of_a_fresh_copy_is_judged_by_its_own_execution() -> None:
    """The fresh copy never ran: its dead letter may invite a redrive (the request it
    came from is not its own). Had it run, or did the copy name q1, it is caught."""
    assert check(_fresh_copy_dead_lettered(fresh_ran=False, attributes={}), spec()) == []
    ran = _fresh_copy_dead_lettered(fresh_ran=True, attributes={})
    assert "dead_letter_ran" in kinds(check(ran, spec()))
    named = _fresh_copy_dead_lettered(fresh_ran=False, attributes={"dispatcher-request-id": "m1"})
    assert "dead_letter_ran" in kinds(check(named, spec()))


# -- a dead letter's reason -------------------------------------------------------------------


def test_a_dead_letter_named_after_an_exception_is_unwarranted() -> None:
    """A defect of the dispatcher (a NameError in its start path) once dead-lettered every
    request it met with reason "NameError", and every seed passed: a reason settled it."""
    history = History()
    request(history, "q1", "m1")
    dead_letter(history, "m1", 3, reason="NameError")
    delete(history, "m1", 4)
    assert kinds(check(history, spec())) == ["unwarranted_dead_letter"]


def test_an_aws_error_about_requests_warrants_a_dead_letter_only_once_aws_gave_it() -> None:
    history = History()
    request(history, "q1", "m1")
    dead_letter(history, "m1", 3, reason="InvalidExecutionInput")
    delete(history, "m1", 4)
    assert kinds(check(history, spec())) == ["unwarranted_dead_letter"]
    history.call(2.5, "d1", 7, "StartExecution name=m1", "ERROR InvalidExecutionInput")
    assert check(history, spec()) == []


# -- a request on its last receive is renewed before it is dead-lettered ---------------------


def _dead_lettered(history: History, at: float, reason: str = "receive_limit") -> None:
    history.message_sent(
        at,
        "d1",
        queue_url=DLQ,
        message_id=f"dl{at}",
        body="{}",
        attributes={REASON_ATTRIBUTE: reason, ORIGINAL_ID_ATTRIBUTE: "m1"},
    )


def _copy_tried(history: History, at: float, queue: str) -> None:
    history.add(at, "d1", "copy_sent", "SendMessage tried", queue=queue, original="m1")


def _own_attributes(count: int) -> History:
    history = History()
    attributes = {f"a{i}": "x" for i in range(count)}
    history.request_sent(
        0.0,
        "producer",
        request_id="r1",
        message_id="m1",
        queue_url=QUEUE,
        body="{}",
        attributes=attributes,
    )
    return history


def test_a_receive_limit_dead_letter_with_no_copy_tried_first_is_a_violation() -> None:
    history = _own_attributes(1)
    _copy_tried(history, 5.0, DLQ)  # the dead letter's own copy is not a renewal
    _dead_lettered(history, 10.0)
    [violation] = check_renewed_first(history, spec())
    assert violation.kind == "dead_letter_unrenewed"
    assert violation.time == 10.0
    assert "m1" in violation.message


def test_a_renewal_tried_first_or_another_reason_passes() -> None:
    history = _own_attributes(1)
    _copy_tried(history, 4.0, QUEUE)  # refused or unanswered: tried all the same
    _dead_lettered(history, 10.0)
    assert check_renewed_first(history, spec()) == []
    other = _own_attributes(1)
    _dead_lettered(other, 10.0, reason="invalid_json")
    assert check_renewed_first(other, spec()) == []
    late = _own_attributes(1)
    _dead_lettered(late, 10.0)
    _copy_tried(late, 11.0, QUEUE)
    assert [v.kind for v in check_renewed_first(late, spec())] == ["dead_letter_unrenewed"]


def test_a_message_whose_copy_has_no_room_to_name_it_is_not_judged() -> None:
    history = _own_attributes(9)
    _dead_lettered(history, 10.0)
    assert check_renewed_first(history, spec()) == []
