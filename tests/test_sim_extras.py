"""The operator scenarios' checker rules each fire on a hand-built history and pass a clean
one (sim/copy_rules.py, sim/token_rules.py); the move task and the CLI redrive behave as
the scenarios need (sim/move_task.py, sim/operators.py); the scenarios are drawn per seed
and leave a seed without them as it was (sim/extras.py)."""

from __future__ import annotations

import functools
import json
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

import dispatcher.cli.redrive as redrive_module
from sim import extras, operators
from sim.checker import check
from sim.extras import CliRedrive, ExtrasPlan
from sim.harness import scenario
from sim.history import History
from sim.move_task import move_task
from sim.operators import _cli_redrive
from sim.token_log import HEARTBEAT
from tests.test_sim_aws import make_world, virtual
from tests.test_sim_checker import DLQ, QUEUE, delete, kinds, request, run, spec
from tests.test_sim_token_rules import child, end, fail, parent, succeed

BODY = json.dumps({"req": "r1", "seconds": 3})


def dead_letter(
    history: History, original: str, at: float, reason: str, *, detail: str, body: str = BODY
) -> None:
    """The dispatcher's dead-letter copy of message ``original`` (as ``receive_limit``: after
    its renewal was tried, as the dispatcher does)."""
    if reason == "receive_limit":
        history.add(at, "d1", "copy_sent", "SendMessage tried", queue="requests", original=original)
    history.message_sent(
        at,
        "d1",
        queue_url=DLQ,
        message_id=f"dl-{original}",
        body=body,
        attributes={
            "dispatcher-reason": reason,
            "dispatcher-original-message-id": original,
            "dispatcher-detail": detail,
        },
    )


# -- rule 9: a dead-lettered request's execution never ran ------------------------------------


INVITING = "received 20 times (start outcome unknown). Raise maxReceiveCount; redrive it to run it"


def test_a_dead_letter_of_a_request_that_ran_is_caught() -> None:
    history = History()
    request(history, "r1", "m1", body=BODY)
    run(history, "m1", 1.0, 4.0, input=BODY)
    dead_letter(history, "m1", 5.0, "receive_limit", detail=INVITING)
    [violation] = check(history, spec())
    assert violation.kind == "dead_letter_ran"
    assert "does not say so" in violation.message


def test_a_dead_letter_that_says_it_ran_must_not_invite_a_redrive() -> None:
    history = History()
    request(history, "r1", "m1", body=BODY)
    run(history, "m1", 1.0, 4.0, input=BODY)
    dead_letter(history, "m1", 5.0, "receive_limit", detail=f"execution m1 ran; {INVITING}")
    assert kinds(check(history, spec())) == ["dead_letter_ran"]
    honest = History()
    request(honest, "r1", "m1", body=BODY)
    run(honest, "m1", 1.0, 4.0, input=BODY)
    dead_letter(
        honest, "m1", 5.0, "receive_limit", detail="execution m1 ran: do not redrive this copy"
    )
    assert check(honest, spec()) == []


def test_a_dead_letter_of_a_request_that_never_ran_is_fine() -> None:
    history = History()
    request(history, "r1", "m1", body=BODY)
    dead_letter(history, "m1", 5.0, "receive_limit", detail=INVITING)
    assert check(history, spec()) == []


def test_a_start_applied_after_the_dead_letter_counts_within_the_late_start_bound() -> None:
    history = History()
    request(history, "r1", "m1", body=BODY)
    dead_letter(history, "m1", 5.0, "receive_limit", detail=INVITING)
    run(history, "m1", 8.0, 9.0, input=BODY)  # a start sent before, applied late
    assert check(history, spec()) == []
    assert kinds(check(history, spec(late_start=5.0))) == ["dead_letter_ran"]


def test_a_conflict_with_the_request_itself_is_caught() -> None:
    """Envelope format: the input embeds the message id, so a producer's retry of the same
    key and body looks like a conflict; it is the same request."""
    history = History()
    attributes = {"idempotency-key": "key-r1"}
    request(history, "r1", "m1", body=BODY, attributes=attributes)
    request(history, "r1", "m2", 2.0, body=BODY, attributes=attributes)
    envelope = json.dumps({"body": BODY, "messageId": "m1", "attributes": attributes})
    run(history, "key-r1", 1.0, 9.0, input=envelope)
    dead_letter(history, "m2", 3.0, "idempotency_conflict", detail="already exists", body=BODY)
    assert kinds(check(history, spec())) == ["false_conflict"]


def test_a_true_conflict_is_fine() -> None:
    history = History()
    attributes = {"idempotency-key": "shared"}
    other = json.dumps({"req": "r2"})
    request(history, "r1", "m1", body=BODY, attributes=attributes)
    request(history, "r2", "m2", 2.0, body=other, attributes=attributes)
    run(history, "shared", 1.0, 9.0, input=BODY)
    dead_letter(history, "m2", 3.0, "idempotency_conflict", detail="already exists", body=other)
    assert "false_conflict" not in kinds(check(history, spec()))


# -- one identity through every copy ------------------------------------------------------------


def redrive_copy(
    history: History, message_id: str, at: float, body: str = BODY, **extra: str
) -> None:
    """A copy a redrive (the CLI, or the move task) sent back to the request queue."""
    history.message_sent(
        at, "redrive.1", queue_url=QUEUE, message_id=message_id, body=body, attributes=extra
    )


def test_a_redrive_copy_started_again_is_a_duplicate() -> None:
    history = History()
    request(history, "r1", "m1", body=BODY)
    run(history, "m1", 1.0, 4.0, input=BODY)
    dead_letter(history, "m1", 5.0, "receive_limit", detail="execution m1 ran; do not redrive")
    redrive_copy(history, "m2", 10.0)
    envelope = json.dumps({"body": BODY, "messageId": "m2", "attributes": {}})
    run(history, "m2", 11.0, 12.0, input=envelope)  # named after the copy's new id
    assert "duplicate_execution" in kinds(check(history, spec()))


def test_a_move_task_copy_is_traced_through_its_original_id() -> None:
    """The move task keeps the dead letter's attributes: the original id names the request
    even when several requests share the body."""
    history = History()
    request(history, "r1", "m1", body=BODY)
    request(history, "r2", "m9", body=BODY)
    dead_letter(history, "m1", 5.0, "receive_limit", detail=INVITING)
    redrive_copy(history, "m3", 10.0, **{"dispatcher-original-message-id": "m1"})
    run(history, "m3", 11.0, 12.0, input="{}")
    run(history, "m1", 20.0, 21.0, input="{}")
    [found] = [v for v in check(history, spec()) if v.kind == "duplicate_execution"]
    assert "request r1 has 2 executions: m3, m1" in found.message


def test_one_execution_across_copies_is_fine() -> None:
    history = History()
    attributes = {"idempotency-key": "key-r1"}
    request(history, "r1", "m1", body=BODY, attributes=attributes)
    dead_letter(history, "m1", 5.0, "receive_limit", detail=INVITING)
    delete(history, "m1", 5.1)
    redrive_copy(history, "m2", 10.0, **attributes)
    run(history, "key-r1", 11.0, 12.0, input=BODY)
    delete(history, "m2", 11.5)
    assert check(history, spec()) == []


# -- superseded answers --------------------------------------------------------------------------


def test_an_answer_from_a_run_a_redrive_replaced_is_caught() -> None:
    history = History()
    [token] = parent(history)
    arn = child(history, 0, 1, 5, "FAILED", error="Boom")
    history.execution_redriven(6.0, "outside", arn, 100.0)
    fail(history, token, 50.0, "Boom")
    end(history, 50.0, "FAILED")
    delete(history, "m0", 51.0)
    found = [v for v in check(history, spec(settle_bound=900.0)) if v.kind != "lost_request"]
    assert kinds(found) == ["superseded_answer"]
    assert "running again since 6.000" in found[0].message


def test_an_answer_racing_a_redrive_is_fine() -> None:
    history = History()
    [token] = parent(history)
    arn = child(history, 0, 1, 5, "FAILED", error="Boom")
    history.execution_redriven(5.2, "outside", arn, 100.0)
    fail(history, token, 5.4, "Boom")
    end(history, 5.4, "FAILED")
    delete(history, "m0", 5.5)
    assert check(history, spec(settle_bound=900.0)) == []


def test_an_answer_that_says_running_is_caught() -> None:
    history = History()
    [token] = parent(history)
    child(history, 0, 1, 5, "FAILED")
    fail(history, token, 6.0, "Dispatcher.ChildFailed", "the child execution ended RUNNING")
    end(history, 6.0, "FAILED")
    delete(history, "m0", 6.5)
    assert kinds(check(history, spec())) == ["superseded_answer"]


# -- heartbeat gaps across restarts and deploys ------------------------------------------------


def beat(history: History, token: str, at: float) -> None:
    """A heartbeat AWS accepted."""
    history.tokens.token_call(at, "d1", operation=HEARTBEAT, token=token, result="ok")


GAPS = {
    "settle_bound": 900.0,
    "heartbeat_every": 60.0,
    "heartbeat_restart_gap": 140.0,
    "heartbeat_deploy_gap": 100.0,
}


def held(
    beats: list[float],
    *,
    sigterm: float | None = None,
    exited: float | None = None,
    crash: float | None = None,
    received: float = 140.0,
) -> History:
    """Item 0's child runs 150-600 (faults over at 100), heartbeated at ``beats``; answered
    at 601. Its token's message is first received at ``received``."""
    history = History()
    [token] = parent(history, heartbeat=300.0)
    history.messages_received(received, "d1.1", QUEUE, [("m0", 1)])
    child(history, 0, 150, 600)
    for at in beats:
        beat(history, token, at)
    if sigterm is not None:
        history.note(sigterm, "d1.1", "SIGTERM")
    if exited is not None:
        history.note(exited, "d1.1", "process exited 0")
    if crash is not None:
        history.crash(crash, "d1.1")
    succeed(history, token, 601.0, '{"req": "p-0", "done": true}')
    end(history, 601.0)
    delete(history, "m0", 602.0)
    return history


EVERY_30 = [float(t) for t in range(160, 600, 30)]


def test_heartbeats_every_interval_pass() -> None:
    assert check(held(EVERY_30), spec(**GAPS)) == []


def test_a_gap_without_a_restart_is_judged_by_the_interval() -> None:
    beats = [t for t in EVERY_30 if not 280 < t < 370]  # 280, then 370
    [violation] = check(held(beats), spec(**GAPS))
    assert violation.kind == "heartbeat_gap"
    assert "from 280.000 to 370.000 (90 s > 60 s)" in violation.message


def test_a_gap_across_a_deploy_is_judged_by_the_deploy_bound() -> None:
    beats = [t for t in EVERY_30 if not 280 < t < 370]
    assert check(held(beats, sigterm=300.0), spec(**GAPS)) == []  # 90 s
    beats = [t for t in EVERY_30 if not 280 < t < 430]
    [violation] = check(held(beats, sigterm=300.0), spec(**GAPS))
    assert "across a deploy (150 s > 100 s)" in violation.message


def test_a_deploy_lasts_from_the_signal_to_the_exit() -> None:
    """The stopping process heartbeats while it drains: a gap from its last heartbeat,
    after the signal, to its successor's first spans the deploy all the same."""
    beats = [t for t in EVERY_30 if not 310 < t < 400] + [325.0]  # 325, then 400
    assert check(held(beats, sigterm=300.0, exited=330.0), spec(**GAPS)) == []  # 75 s
    beats = [t for t in EVERY_30 if not 310 < t < 460] + [325.0]  # 325, then 460
    [violation] = check(held(beats, sigterm=300.0, exited=330.0), spec(**GAPS))
    assert "from 325.000 to 460.000 across a deploy (135 s > 100 s)" in violation.message
    beats = [t for t in EVERY_30 if not 340 < t < 430]  # 340 (after the exit), then 430
    [violation] = check(held(beats, sigterm=300.0, exited=330.0), spec(**GAPS))
    assert "from 340.000 to 430.000 (90 s > 60 s)" in violation.message


def test_a_gap_across_a_crash_is_judged_by_the_restart_bound() -> None:
    beats = [t for t in EVERY_30 if not 280 < t < 400]
    assert check(held(beats, crash=300.0), spec(**GAPS)) == []  # 120 s
    beats = [t for t in EVERY_30 if not 280 < t < 430]
    [violation] = check(held(beats, crash=300.0), spec(**GAPS))
    assert "across a restart (150 s > 140 s)" in violation.message


def test_a_token_no_dispatcher_received_yet_is_judged_from_its_receive() -> None:
    """A parent's retry waits in the backlog while the child started for another token
    runs: no dispatcher can know of it, so its gaps count from its message's receive."""
    assert check(held([460.0, 490.0, 520.0, 550.0, 580.0], received=450.0), spec(**GAPS)) == []
    [violation] = check(held([520.0, 550.0, 580.0], received=450.0), spec(**GAPS))
    assert "from 450.000 to 520.000 (70 s > 60 s)" in violation.message


def test_gaps_during_the_faults_are_not_judged() -> None:
    beats = [t for t in EVERY_30 if t > 400]
    assert kinds(check(held(beats), spec(**GAPS))) == ["heartbeat_gap"]
    assert check(held(beats), spec(**GAPS, heartbeat_grace=300.0)) == []


# -- the move task and the CLI redrive ---------------------------------------------------------


@virtual
async def test_the_move_task_moves_what_was_there_with_every_attribute() -> None:
    world = make_world()
    dlq = world.create_queue("dead")
    queue = world.create_queue("requests", dead_letter=dlq)
    attributes = {"dispatcher-reason": "receive_limit", "tenant": "a"}
    first = world.send_request(dlq, "one", attributes, request_id="r1")
    world.send_request(dlq, "two", {}, request_id="r2")
    moved = await move_task(world, dlq, queue)
    assert moved == 2
    sqs = world.client("sqs", "reader")
    got = await sqs.receive_message(
        QueueUrl=queue, MaxNumberOfMessages=10, MessageAttributeNames=["All"]
    )
    bodies = {m["Body"]: m for m in got["Messages"]}
    assert set(bodies) == {"one", "two"}
    assert bodies["one"]["MessageId"] != first
    assert bodies["one"]["MessageAttributes"]["tenant"]["StringValue"] == "a"
    assert world.sqs.queues[dlq].messages == {}


def fake_run(world: Any, dlq: str, queue: str) -> Any:
    """What `_cli_redrive` reads of a harness run."""
    return SimpleNamespace(
        world=world,
        dlq=dlq,
        queues={"p0": [queue]},
        plan=SimpleNamespace(pools=[SimpleNamespace(name="p0")]),
        clock=anyio.current_time,
        extra_violations=[],
    )


@virtual
async def test_a_redrive_that_ends_is_fine_and_a_killed_one_leaves_its_dead_letters() -> None:
    world = make_world()
    dlq = world.create_queue("dead")
    queue = world.create_queue("requests", dead_letter=dlq)
    world.send_request(dlq, BODY, {"dispatcher-reason": "receive_limit"}, request_id="r1")
    run_ = fake_run(world, dlq, queue)
    await _cli_redrive(run_, CliRedrive(0.0, None, killed=True), 1)
    assert len(world.sqs.queues[dlq].messages) == 1  # sent, never deleted
    assert len(world.sqs.queues[queue].messages) == 1
    await anyio.sleep(extras.REDRIVE_VISIBILITY + 1)
    await _cli_redrive(run_, CliRedrive(0.0, None), 2)
    assert world.sqs.queues[dlq].messages == {}
    assert len(world.sqs.queues[queue].messages) == 2  # the second run sent it again
    assert run_.extra_violations == []


@virtual
async def test_a_redrive_that_never_ends_is_caught() -> None:
    """A consumer that dead-letters every copy again under a new id (invalid JSON): a
    redrive that keeps taking what arrives (here: one whose start bound lies in the far
    future and that does not count what the queue held, as the redrive was before it
    stopped at what the queue held) never ends."""
    names = vars(operators)  # the module's own names: what _cli_redrive calls
    bounded = names["redrive"]
    names["redrive"] = functools.partial(bounded, started_ms=10**15)
    counted = redrive_module.queue_depth

    async def uncounted(*_: Any) -> int:
        return 10**9  # no bound by the depth read at the start

    redrive_module.queue_depth = uncounted  # type: ignore[assignment]
    try:
        await _never_ending_redrive()
    finally:
        names["redrive"] = bounded
        redrive_module.queue_depth = counted


async def _never_ending_redrive() -> None:
    world = make_world()
    dlq = world.create_queue("dead")
    queue = world.create_queue("requests", dead_letter=dlq)
    world.send_request(dlq, "{not json", {"dispatcher-reason": "invalid_json"}, request_id="r1")
    run_ = fake_run(world, dlq, queue)

    async def dead_lettering_consumer() -> None:
        sqs = world.client("sqs", "d1")
        while True:
            got = await sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=20)
            for message in got.get("Messages", []):
                await sqs.send_message(
                    QueueUrl=dlq,
                    MessageBody=message["Body"],
                    MessageAttributes={
                        "dispatcher-reason": {"DataType": "String", "StringValue": "invalid_json"}
                    },
                )
                await sqs.delete_message(QueueUrl=queue, ReceiptHandle=message["ReceiptHandle"])

    async with anyio.create_task_group() as tg:
        tg.start_soon(dead_lettering_consumer)
        await _cli_redrive(run_, CliRedrive(0.0, ("invalid_json",)), 1)
        tg.cancel_scope.cancel()
    [violation] = run_.extra_violations
    assert violation.kind == "redrive_unbounded"


# -- drawing -------------------------------------------------------------------------------------


def test_without_extras_a_seed_draws_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(extras, "ENABLED", frozenset())
    assert all(scenario(seed).extras == ExtrasPlan() for seed in range(50))


def test_each_scenario_is_drawn_by_some_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(extras, "ENABLED", extras.parse("all"))
    seen = {
        name.split(":")[0].split("(")[0] for s in range(200) for name in scenario(s).extras.names
    }
    assert seen == set(extras.SCENARIOS)


def test_parse_names_the_scenarios() -> None:
    assert extras.parse("all") == frozenset(extras.SCENARIOS)
    assert extras.parse("envelope, retries") == {"envelope", "retries"}
    assert extras.parse("") == frozenset()
    with pytest.raises(ValueError, match="unknown"):
        extras.parse("everything")


# -- a parent's retry: two tokens on one request ---------------------------------------------


RETRY = "arn:aws:states:eu-west-1:123456789012:execution:parents:pr"
RETRY_TOKEN = "tokr"  # noqa: S105 - a made-up task token


def retried(history: History) -> tuple[str, str]:
    """Parent ``p`` (token tok0, message m0) and its retry ``pr`` (token tokr, message mr),
    both waiting on request p-0; returns the tokens."""
    [first] = parent(history)
    history.tokens.parent_started(1.0, arn=RETRY, items=1, heartbeat_seconds=None)
    request(
        history,
        "p-0",
        "mr",
        1.0,
        body=json.dumps({"req": "p-0"}),
        attributes={"idempotency-key": "p-0", "task-token": RETRY_TOKEN},
    )
    history.tokens.token_issued(
        1.0, token=RETRY_TOKEN, parent_arn=RETRY, index=0, request_id="p-0", message_id="mr"
    )
    return first, RETRY_TOKEN


def test_a_token_message_may_go_once_its_own_parent_ended() -> None:
    history = History()
    _, second = retried(history)
    end(history, 3.0, "ABORTED")  # the first parent: its caller gave up
    delete(history, "m0", 4.0)  # its message let go while the retry still waits
    child(history, 0, 5, 9)
    succeed(history, second, 9.5)
    history.tokens.parent_ended(9.5, RETRY, "SUCCEEDED")
    delete(history, "mr", 9.6)
    assert check(history, spec()) == []


def test_a_request_a_retry_still_waits_for_is_not_released() -> None:
    history = History()
    retried(history)
    end(history, 3.0, "ABORTED")
    delete(history, "m0", 4.0)
    found = kinds(check(history, spec()))
    assert "lost_request" in found  # the retry's request still needs its child
    assert "parent_waiting" in found
