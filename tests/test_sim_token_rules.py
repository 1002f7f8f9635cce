"""The checker's task-token rules catch each broken rule in hand-built histories of parent
workflows and pass clean ones (see sim/token_rules.py)."""

from __future__ import annotations

import json

from sim.checker import check
from sim.history import Execution, History, Run
from sim.token_log import FAILURE, SUCCESS, IssuedToken, TokenCall
from sim.token_rules import _check_superseded, _through_copies
from tests.test_sim_checker import (
    DLQ,
    MACHINE,
    QUEUE,
    dead_letter,
    delete,
    execution_arn,
    kinds,
    request,
    spec,
)

PARENT = "arn:aws:states:eu-west-1:123456789012:execution:parents:p"
OUTPUT = '{"req": "p-0", "done": true}'


def parent(history: History, items: int = 1, *, heartbeat: float | None = None) -> list[str]:
    """Parent ``p`` started at 0 with ``items`` tokens (``tok<i>``, message ``m<i>``,
    request ``p-<i>``); returns the tokens."""
    history.tokens.parent_started(0.0, arn=PARENT, items=items, heartbeat_seconds=heartbeat)
    out = []
    for i in range(items):
        token = f"tok{i}"
        request(
            history,
            f"p-{i}",
            f"m{i}",
            body=json.dumps({"req": f"p-{i}"}),
            attributes={"idempotency-key": f"p-{i}", "task-token": token},
        )
        history.tokens.token_issued(
            0.0, token=token, parent_arn=PARENT, index=i, request_id=f"p-{i}", message_id=f"m{i}"
        )
        out.append(token)
    return out


def child(
    history: History,
    index: int,
    start: float,
    stop: float | None,
    status: str = "SUCCEEDED",
    **result: str,
) -> str:
    """Item ``index``'s child, named after its idempotency key."""
    arn = execution_arn(f"p-{index}")
    history.execution_started(
        start,
        "d1",
        arn=arn,
        state_machine_arn=MACHINE,
        name=f"p-{index}",
        input=json.dumps({"req": f"p-{index}"}),
    )
    if stop is not None:
        output = result.get("output", f'{{"req": "p-{index}", "done": true}}')
        history.execution_ended(
            stop,
            arn,
            status,
            output=output if status == "SUCCEEDED" else None,
            error=result.get("error"),
            cause=result.get("cause"),
        )
    return arn


def succeed(history: History, token: str, at: float, output: str = OUTPUT) -> None:
    """A dispatcher's accepted SendTaskSuccess."""
    history.tokens.token_call(at, "d1", operation=SUCCESS, token=token, result="ok", output=output)


def fail(history: History, token: str, at: float, error: str, cause: str = "") -> None:
    """A dispatcher's accepted SendTaskFailure."""
    history.tokens.token_call(
        at, "d1", operation=FAILURE, token=token, result="ok", error=error, cause=cause
    )


def end(history: History, at: float, status: str = "SUCCEEDED", **why: str) -> None:
    """The parent ends."""
    history.tokens.parent_ended(at, PARENT, status, **why)


def served(history: History) -> str:
    """One item whose child ran 1-5, answered at 5.5, its message deleted at 5.6."""
    [token] = parent(history)
    child(history, 0, 1, 5)
    succeed(history, token, 5.5)
    end(history, 5.5)
    delete(history, "m0", 5.6)
    return token


# -- clean histories ----------------------------------------------------------------------------


def test_a_clean_callback_history_passes() -> None:
    history = History()
    one, two = parent(history, 2)
    child(history, 0, 1, 5)
    child(history, 1, 2, 6, "FAILED", error="Child.Failed", cause="on purpose")
    succeed(history, one, 5.5)
    fail(history, two, 6.5, "Child.Failed", "on purpose")
    end(history, 6.5, "FAILED", error="Child.Failed")
    delete(history, "m0", 5.6)
    delete(history, "m1", 6.6)
    assert check(history, spec()) == []


def test_an_aborted_parent_needs_no_child_and_no_answer() -> None:
    history = History()
    one, two = parent(history, 2)
    child(history, 0, 1, 20)
    end(history, 3, "ABORTED")
    history.tokens.token_call(
        21, "d1", operation=SUCCESS, token=one, result="TaskTimedOut", output=OUTPUT
    )  # the answer found the parent gone: refused, not an answer
    delete(history, "m0", 21)
    history.tokens.token_call(10, "d1", operation="SendTaskHeartbeat", token=two, result="ok")
    delete(history, "m1", 4)  # dropped before its start: the parent was gone
    assert check(history, spec()) == []


# -- rule 5: no parent waits forever -------------------------------------------------------------


def test_a_parent_never_answered_is_caught() -> None:
    history = History()
    parent(history)
    child(history, 0, 1, 5)
    found = check(history, spec())
    assert kinds(found) == ["parent_waiting", "token_message_kept"]
    assert found[0].time == 160.0
    assert "item 0" in found[0].message


def _token_moved(*, crashed: bool) -> History:
    """Parent p's token message m0 received by d1, then moved by the redrive policy; d1
    killed after its receive (``crashed``) or not."""
    history = History()
    parent(history)
    history.messages_received(1, "d1", QUEUE, [("m0", 1)], call_id=1)
    if crashed:
        history.crash(2, "d1")
    history.message_moved(
        70, source_url=QUEUE, target_url=DLQ, message_id="m0", body="{}", attributes={}
    )
    return history


def test_a_parent_whose_token_message_was_moved_out_of_reach_is_not_waiting() -> None:
    """Its receiver killed, SQS's redrive policy moved the token's message: as
    ``lost_request`` excuses the request, ``parent_waiting`` excuses its parent - but only
    then: a move after a receive a dispatcher saw leaves the parent waiting."""
    assert "parent_waiting" not in kinds(check(_token_moved(crashed=True), spec()))
    assert "parent_waiting" in kinds(check(_token_moved(crashed=False), spec()))


def test_a_message_never_let_go_is_caught() -> None:
    history = History()
    [token] = parent(history)
    child(history, 0, 1, 5)
    succeed(history, token, 5.5)
    end(history, 5.5)
    assert kinds(check(history, spec())) == ["token_message_kept"]
    delete(history, "m0", 170)  # too late
    assert kinds(check(history, spec())) == ["token_message_kept"]


def test_a_heartbeat_lapse_after_the_faults_is_caught() -> None:
    history = History()
    parent(history, heartbeat=300.0)
    history.messages_received(240, "d1", QUEUE, [("m0", 1)])
    child(history, 0, 250, None)  # runs on
    end(history, 400, "FAILED", error="States.HeartbeatTimeout", expired="tok0")
    delete(history, "m0", 401)
    judged = {"settle_bound": 900.0, "heartbeat_every": 60.0}
    assert check(history, spec(settle_bound=900.0)) == []  # not judged unless asked
    # From 100 + 250 on, the child ran 50 s without a heartbeat: less than 60 s.
    assert check(history, spec(**judged, heartbeat_grace=250.0)) == []
    [violation] = check(history, spec(**judged, heartbeat_grace=50.0))  # 150 s from 250
    assert (violation.kind, violation.time) == ("heartbeat_lapse", 400)
    assert "p-0" in violation.message
    assert "250.000" in violation.message
    # A token whose message no dispatcher had received (a retry in the backlog while the
    # child started for another token runs) is judged from its receive only.
    late = History()
    parent(late, heartbeat=300.0)
    child(late, 0, 250, None)
    late.messages_received(350, "d1", QUEUE, [("m0", 1)])
    end(late, 400, "FAILED", error="States.HeartbeatTimeout", expired="tok0")
    delete(late, "m0", 401)
    assert check(late, spec(**judged, heartbeat_grace=50.0)) == []  # 50 s from 350


# -- rules 6 and 7: the right answer, after the child ended ---------------------------------------


def test_a_wrong_output_is_caught() -> None:
    history = History()
    [token] = parent(history)
    child(history, 0, 1, 5)
    succeed(history, token, 5.5, output='{"req": "p-1", "done": true}')
    end(history, 5.5)
    delete(history, "m0", 5.6)
    [violation] = check(history, spec())
    assert violation.kind == "wrong_answer"
    assert "p-1" in violation.message


def test_failures_must_carry_the_childs_error_or_the_documented_names() -> None:
    cases = [
        ("FAILED", {"error": "E", "cause": "C"}, "E", "C", True),
        ("FAILED", {"error": "E", "cause": "C"}, "Dispatcher.ChildFailed", "C", False),
        ("FAILED", {"error": "E", "cause": "C"}, "E", "another cause", False),
        ("FAILED", {}, "Dispatcher.ChildFailed", "anything", True),
        ("TIMED_OUT", {"error": "States.Timeout"}, "Dispatcher.ChildTimedOut", "", True),
        ("ABORTED", {}, "Dispatcher.ChildAborted", "", True),
        ("ABORTED", {}, "Dispatcher.ChildFailed", "", False),
        ("SUCCEEDED", {}, "Dispatcher.OutputTooLarge", "", False),
        ("SUCCEEDED", {"output": '"' + "x" * 262_200 + '"'}, "Dispatcher.OutputTooLarge", "", True),
    ]
    for status, result, error, cause, fine in cases:
        history = History()
        [token] = parent(history)
        child(history, 0, 1, 5, status, **result)
        fail(history, token, 5.5, error, cause)
        end(history, 5.5, "FAILED", error=error)
        delete(history, "m0", 5.6)
        expected = [] if fine else ["wrong_answer"]
        assert kinds(check(history, spec())) == expected, (status, result, error, cause)


def test_a_token_without_a_child_is_failed_with_a_dispatcher_error() -> None:
    for error, bad, fine in [
        ("Dispatcher.BadRequest", True, True),
        ("Dispatcher.DeadLettered", True, False),
        ("Dispatcher.DeadLettered", False, True),
        ("Child.Failed", False, False),
    ]:
        history = History()
        [token] = parent(history)
        history.message_sent(
            2,
            "d1",
            queue_url=spec().dead_letter_queue or "",
            message_id="dl-m0",
            body="{}",
            attributes={
                "dispatcher-reason": "invalid_idempotency_key",
                "dispatcher-original-message-id": "m0",
            },
        )
        fail(history, token, 2.5, error, "invalid_key: ...")
        end(history, 2.5, "FAILED", error=error)
        delete(history, "m0", 3)
        expected_bad = frozenset({"p-0"}) if bad else frozenset()
        expected = [] if fine else ["wrong_answer"]
        assert kinds(check(history, spec(expected_bad=expected_bad))) == expected, (error, bad)
    history = History()
    [token] = parent(history)
    succeed(history, token, 2)
    end(history, 2)
    delete(history, "m0", 3)
    assert "wrong_answer" in kinds(check(history, spec()))


def test_a_valid_item_failed_without_a_child_or_a_copy_is_lost() -> None:
    """The parent's end is that answer: it does not excuse the request."""
    history = History()
    [token] = parent(history)
    fail(history, token, 2, "Dispatcher.BadRequest")
    end(history, 2, "FAILED", error="Dispatcher.BadRequest")
    delete(history, "m0", 3)
    assert kinds(check(history, spec())) == ["early_delete", "lost_request"]


def test_an_answer_before_the_child_ended_is_caught() -> None:
    history = History()
    [token] = parent(history)
    child(history, 0, 1, 5)
    succeed(history, token, 3)
    end(history, 3)
    delete(history, "m0", 5.6)
    [violation] = check(history, spec())
    assert (violation.kind, violation.time) == ("early_answer", 3)
    # Failed as dead-lettered while a start sent before was still on its way: it landed
    # after the answer, which came before the child ended too.
    history = History()
    [token] = parent(history)
    history.add(0.5, "d1", "start_sent", "StartExecution name=p-0 sent", name="p-0")
    fail(history, token, 1, "Dispatcher.DeadLettered")
    end(history, 1, "FAILED")
    child(history, 0, 2, 5)
    delete(history, "m0", 5.6)
    assert kinds(check(history, spec())) == ["early_answer"]


def test_a_child_first_sent_after_the_answer_is_not_the_answers() -> None:
    """Dead-lettered on its last receive, its child never started: the parent is told so.
    An operator redrives the dead letter later and the child runs then, as the dead
    letter's detail says: the answer came before any start of it, not before its end."""
    history = History()
    [token] = parent(history)
    fail(history, token, 1, "Dispatcher.DeadLettered")
    end(history, 1, "FAILED")
    history.add(2, "d1", "start_sent", "StartExecution name=p-0 sent", name="p-0")
    child(history, 0, 2, 5)
    delete(history, "m0", 5.6)
    assert "early_answer" not in kinds(check(history, spec()))
    # A success is never an answer for a child that did not exist yet.
    history = History()
    [token] = parent(history)
    succeed(history, token, 1)
    end(history, 1)
    history.add(2, "d1", "start_sent", "StartExecution name=p-0 sent", name="p-0")
    child(history, 0, 2, 5)
    delete(history, "m0", 5.6)
    assert "wrong_answer" in kinds(check(history, spec()))


# -- rule 8: deletes and stops -------------------------------------------------------------------


def test_a_delete_after_the_token_request_was_renewed_is_not_early() -> None:
    """Renewed on its last receive: its copy (with the token) carries the request on, so
    the original may be deleted while the parent waits; the copy is deleted once the
    parent was answered."""
    history = History()
    [token] = parent(history)
    child(history, 0, 1, 5)
    history.message_sent(
        1.5,
        "d1",
        queue_url=QUEUE,
        message_id="c0",
        body=json.dumps({"req": "p-0"}),
        attributes={
            "idempotency-key": "p-0",
            "task-token": token,
            "dispatcher-request-id": "p-0",
            "dispatcher-original-message-id": "m0",
        },
    )
    delete(history, "m0", 2)
    succeed(history, token, 5.5)
    end(history, 5.5)
    delete(history, "c0", 5.6)
    assert check(history, spec()) == []


def test_a_renewed_copy_of_a_token_whose_parent_ended_may_be_deleted_unstarted() -> None:
    """The parent timed out before its request started; the request, renewed on its last
    receive, comes back as a copy carrying the token, and the dispatcher drops it: not an
    early delete (whatever another parent's retry of the same request waits for)."""
    history = History()
    [token] = parent(history)
    retry = "arn:aws:states:eu-west-1:123456789012:execution:parents:p-retry"
    history.tokens.parent_started(0.5, arn=retry, items=1, heartbeat_seconds=None)
    request(
        history,
        "p-0",
        "m9",
        0.5,
        body=json.dumps({"req": "p-0"}),
        attributes={"idempotency-key": "p-0", "task-token": "tok-retry"},
    )
    history.tokens.token_issued(
        0.5,
        token="tok-retry",  # noqa: S106 - a test's token, not a secret
        parent_arn=retry,
        index=0,
        request_id="p-0",
        message_id="m9",
    )
    end(history, 2, "TIMED_OUT", error="States.Timeout")
    history.message_sent(
        3,
        "d1",
        queue_url=QUEUE,
        message_id="c0",
        body=json.dumps({"req": "p-0"}),
        attributes={
            "idempotency-key": "p-0",
            "task-token": token,
            "dispatcher-request-id": "p-0",
            "dispatcher-original-message-id": "m0",
        },
    )
    delete(history, "m0", 3.1)
    delete(history, "c0", 4)
    assert "early_delete" not in kinds(check(history, spec()))


def _retry_with_a_copy_each(history: History) -> None:
    """Parent ``p`` (token ``tok0``, message ``m0``) and its retry ``pr`` with the same key
    (request ``p-0``, token ``tokr``, message ``mr``) each renewed on a last receive: copies
    ``c0`` and ``cr`` carry their tokens on; ``p`` is aborted at 3, ``pr`` still waits."""
    parent(history)
    retry, tokr = PARENT + "r", "tokr"
    history.tokens.parent_started(0.5, arn=retry, items=1, heartbeat_seconds=None)
    attributes = {"idempotency-key": "p-0", "task-token": tokr}
    request(history, "p-0", "mr", at=0.5, body=json.dumps({"req": "p-0"}), attributes=attributes)
    history.tokens.token_issued(
        0.5, token=tokr, parent_arn=retry, index=0, request_id="p-0", message_id="mr"
    )
    for original, copy, token in (("m0", "c0", "tok0"), ("mr", "cr", tokr)):
        history.message_sent(
            1.5,
            "d1",
            queue_url=QUEUE,
            message_id=copy,
            body=json.dumps({"req": "p-0"}),
            attributes={
                "idempotency-key": "p-0",
                "task-token": token,
                "dispatcher-request-id": "p-0",
                "dispatcher-original-message-id": original,
            },
        )
        delete(history, original, 2)
    end(history, 3, "ABORTED")


def test_a_copy_of_a_token_whose_parent_ended_may_be_dropped_while_a_retry_waits() -> None:
    """The aborted parent's copy is dropped unstarted: its token's parent is gone, whatever
    the retry (same request) still waits for. The retry's copy dropped so is caught."""
    history = History()
    _retry_with_a_copy_each(history)
    delete(history, "c0", 4)
    assert not [v for v in check(history, spec()) if v.kind == "early_delete"]
    history = History()
    _retry_with_a_copy_each(history)
    delete(history, "cr", 4)
    early = [v for v in check(history, spec()) if v.kind == "early_delete"]
    assert [v.kind for v in early] == ["early_delete"]
    assert "message cr of request p-0" in early[0].message


def test_a_delete_before_the_answer_is_caught() -> None:
    history = History()
    [token] = parent(history)
    child(history, 0, 1, 5)
    delete(history, "m0", 2)  # the execution exists: rule 4 holds, rule 8 does not
    succeed(history, token, 5.5)
    end(history, 5.5)
    [violation] = check(history, spec())
    assert (violation.kind, violation.time) == ("early_token_delete", 2)
    assert check(history, spec()) != []
    clean = History()
    served(clean)
    assert check(clean, spec()) == []


def test_stopping_a_child_its_parent_waits_for_is_caught() -> None:
    history = History()
    [token] = parent(history)
    history.messages_received(0.5, "d1", QUEUE, [("m0", 1)])
    arn = child(history, 0, 1, None)
    history.tokens.child_stopped(3, "d1", arn, "Dispatcher.ParentGone", "gone")
    history.execution_ended(3, arn, "ABORTED", error="Dispatcher.ParentGone")
    fail(history, token, 3.5, "Dispatcher.ChildAborted")
    end(history, 3.5, "FAILED")
    delete(history, "m0", 3.6)
    assert kinds(check(history, spec())) == ["stopped_waited_child"]
    # A token no dispatcher had received by the stop (a retry still in the backlog) cannot
    # be known: it finds the child aborted, as documented.
    history = History()
    [token] = parent(history)
    arn = child(history, 0, 1, None)
    history.tokens.child_stopped(3, "d1", arn, "Dispatcher.ParentGone", "gone")
    history.execution_ended(3, arn, "ABORTED", error="Dispatcher.ParentGone")
    history.messages_received(3.2, "d1", QUEUE, [("m0", 1)])
    fail(history, token, 3.5, "Dispatcher.ChildAborted")
    end(history, 3.5, "FAILED")
    delete(history, "m0", 3.6)
    assert check(history, spec()) == []
    # Stopped after its parent ended: fine.
    history = History()
    [token] = parent(history)
    arn = child(history, 0, 1, None)
    end(history, 2, "ABORTED")
    history.tokens.child_stopped(3, "d1", arn, "Dispatcher.ParentGone", "gone")
    history.execution_ended(3, arn, "ABORTED", error="Dispatcher.ParentGone")
    delete(history, "m0", 3.6)
    assert check(history, spec()) == []


def test_two_children_for_one_item_are_caught() -> None:
    history = History()
    served(history)
    history.execution_started(
        6,
        "d1",
        arn=execution_arn("another"),
        state_machine_arn=MACHINE,
        name="another",
        input=json.dumps({"req": "p-0"}),
    )  # started again under another name
    assert kinds(check(history, spec())) == ["duplicate_execution"]


def test_tokens_issued_are_recorded_in_item_order() -> None:
    history = History()
    parent(history, 3)
    issued: list[IssuedToken] = history.tokens.parents[PARENT].tokens
    assert [t.index for t in issued] == [0, 1, 2]
    assert history.tokens.label("tok2") == "token p#2"
    assert history.tokens.label("unknown-token-xyz") == "token unknown-toke..."


def _redriven_after_the_answer(received: float) -> History:
    """Item 0 dead-lettered and its parent failed at 5; a copy of the request (a redrive of
    its dead letter) is received at ``received`` and deleted unstarted at 20."""
    history = History()
    [token] = parent(history)
    history.messages_received(1, "d1", QUEUE, [("m0", 1)])
    dead_letter(history, "m0", 4, reason="receive_limit")
    fail(history, token, 5, "Dispatcher.DeadLettered")
    end(history, 5, "FAILED")
    delete(history, "m0", 5.5)
    request(history, "p-0", "m0-copy", at=8, attributes={"idempotency-key": "p-0"})
    history.messages_received(received, "d1", QUEUE, [("m0-copy", 1)])
    delete(history, "m0-copy", 20)
    return history


def test_a_copy_received_after_every_parent_ended_may_be_dropped() -> None:
    """Its parent gone, a request not started is dropped unstarted (docs/task-tokens.md):
    a redriven copy received after every parent of the request ended is not early_delete."""
    assert "early_delete" not in kinds(check(_redriven_after_the_answer(10), spec()))
    # Received while a parent still waited, the same delete is judged as any request's.
    history = History()
    [token] = parent(history)
    history.messages_received(1, "d1", QUEUE, [("m0", 1)])
    delete(history, "m0", 3)
    fail(history, token, 5, "Dispatcher.DeadLettered")
    end(history, 5, "FAILED")
    assert "early_delete" in kinds(check(history, spec()))


def test_an_answer_is_judged_against_the_execution_it_came_from_not_a_namesake() -> None:
    """A parent's retry sent after `key_attribute` changed gets a second execution under
    the new name (the README's stated limit of request identity); answered with that
    execution's result, it is not "superseded" by the first execution's earlier run. A
    redrive of the answering execution still is."""
    answer = TokenCall(130.0, "d1", SUCCESS, "tok", "ok", output='{"run": "second"}')
    first = Execution("arn:first", MACHINE, "ka_p-0", "{}", "d1", "ka")
    first.runs.append(Run(10.0, "d1", 0, 0, 20.0, "SUCCEEDED", output='{"run": "first"}'))
    second = Execution("arn:second", MACHINE, "p-0", "{}", "d1", None)
    second.runs.append(Run(90.0, "d1", 1, 0, 95.0, "SUCCEEDED", output='{"run": "second"}'))
    assert _check_superseded(answer, "p item 0", SUCCESS, [first, second], spec()) == []
    second.runs.append(Run(96.0, "d1", 2, 1, 99.0, "SUCCEEDED", output='{"run": "again"}'))
    [violation] = _check_superseded(answer, "p item 0", SUCCESS, [first, second], spec())
    assert violation.kind == "superseded_answer"


def test_a_renewal_copy_moved_out_of_reach_counts_for_the_token_it_carries() -> None:
    """A token travels in its request's renewal copies: the copy (not the message the
    parent's token was issued in) is what the redrive policy moved after its receiver was
    killed, and the parent waiting on it is as unreachable as if the original had been."""
    history = History()
    history.message_sent(
        5.0, "d1", queue_url=QUEUE, message_id="c1", body="{}",
        attributes={"dispatcher-original-message-id": "m0"},
    )  # fmt: skip
    history.message_sent(
        9.0, "d1", queue_url=QUEUE, message_id="c2", body="{}",
        attributes={"dispatcher-original-message-id": "c1"},
    )  # fmt: skip
    moved = _through_copies(history, spec(), {"c2": 70.0})
    assert moved == {"c2": 70.0, "c1": 70.0, "m0": 70.0}
