"""Parent workflows and task tokens in the simulated Step Functions follow AWS's documented
semantics: the callback requests a parent sends, SendTaskSuccess / SendTaskFailure /
SendTaskHeartbeat, heartbeat and execution timeouts, aborts, StopExecution, and what a
child returns (virtual time)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import anyio
import pytest
import structlog
from botocore.exceptions import ClientError, ParamValidationError

from dispatcher.settings.config import Settings
from sim import __main__ as sim_cli
from sim import buggify
from sim.aws import World
from sim.calls import NO_FAULT, CallFault
from sim.harness import Scenario, scenario, simulate
from sim.token_log import IssuedToken
from tests.test_sim_aws import code_of, lines, make_world, virtual

ITEMS = [{"seconds": 1}, {"seconds": 2}]


def parent(world: World, name: str = "p", items: Any = ITEMS, **options: Any) -> tuple[str, str]:
    """A parent machine, a request queue and parent ``name`` started on it: (ARN, queue)."""
    machine = world.create_state_machine(f"parents-{name}")
    queue = world.create_queue(f"requests-{name}")
    return world.start_parent(machine, name, queue, items, **options), queue


def tokens(world: World, arn: str) -> list[IssuedToken]:
    """The tokens a parent issued, in item order."""
    return world.history.tokens.parents[arn].tokens


async def refused(call: Any) -> str:
    """The AWS error code a call answers."""
    with pytest.raises(ClientError) as info:
        await call
    return code_of(info)


@virtual
async def test_a_parent_sends_one_callback_request_per_item() -> None:
    world = make_world()
    arn, queue = parent(world, items=[{"seconds": 1}, {"seconds": 2, "fail": True}])
    sqs = world.client("sqs", "d1")
    got = await sqs.receive_message(
        QueueUrl=queue, MaxNumberOfMessages=10, MessageAttributeNames=["All"]
    )
    messages = sorted(got["Messages"], key=lambda m: json.loads(m["Body"])["req"])
    assert [json.loads(m["Body"]) for m in messages] == [
        {"req": "p-0", "seconds": 1},
        {"req": "p-1", "seconds": 2, "fail": True},
    ]
    issued = tokens(world, arn)
    for index, message in enumerate(messages):
        attributes = message["MessageAttributes"]
        assert attributes["idempotency-key"]["StringValue"] == f"p-{index}"
        token = attributes["task-token"]["StringValue"]
        assert token == issued[index].token
        assert 500 < len(token) <= 2048
        assert issued[index].message_id == message["MessageId"]
    assert len({t.token for t in issued}) == 2
    assert [r.request_id for r in world.history.requests] == ["p-0", "p-1"]
    sfn = world.client("stepfunctions", "d1")
    described = await sfn.describe_execution(executionArn=arn)
    assert described["status"] == "RUNNING"
    assert json.loads(described["input"])["items"][1] == {"req": "p-1", "seconds": 2, "fail": True}


@virtual
async def test_a_parent_succeeds_when_every_token_succeeded() -> None:
    world = make_world()
    arn, _ = parent(world)
    first, second = tokens(world, arn)
    sfn = world.client("stepfunctions", "d1")
    assert await refused(sfn.send_task_success(taskToken=first.token, output="{bad")) == (
        "InvalidOutput"
    )
    big = json.dumps({"x": "a" * 262_144})
    assert await refused(sfn.send_task_success(taskToken=first.token, output=big)) == (
        "ValidationException"
    )
    assert await refused(sfn.send_task_success(taskToken="AAAA" * 100, output="{}")) == (
        "InvalidToken"
    )
    with pytest.raises(ParamValidationError):
        await sfn.send_task_success(taskToken="", output="{}")
    await sfn.send_task_success(taskToken=second.token, output='{"n": 2}')  # out of order
    assert (await sfn.describe_execution(executionArn=arn))["status"] == "RUNNING"
    await sfn.send_task_success(taskToken=first.token, output='{"n": 1}')
    described = await sfn.describe_execution(executionArn=arn)
    assert described["status"] == "SUCCEEDED"
    assert json.loads(described["output"]) == [{"n": 1}, {"n": 2}]  # item order
    # Answered: the task is closed (AWS: TaskTimedOut, "already been closed").
    assert await refused(sfn.send_task_success(taskToken=first.token, output="{}")) == (
        "TaskTimedOut"
    )
    assert await refused(sfn.send_task_heartbeat(taskToken=second.token)) == "TaskTimedOut"
    log = world.history.tokens
    answer = log.answer_of(first.token)
    assert answer is not None
    assert answer.output == '{"n": 1}'
    assert [c.result for c in log.calls if c.token == first.token] == [
        "InvalidOutput",
        "ValidationException",
        "ok",
        "TaskTimedOut",
    ]
    assert log.parents[arn].status == "SUCCEEDED"


@virtual
async def test_the_first_failure_fails_the_parent_and_closes_the_rest() -> None:
    world = make_world(closed_task_error="TaskDoesNotExist")
    arn, _ = parent(world, items=[{}, {}, {}])
    one, two, _ = tokens(world, arn)
    sfn = world.client("stepfunctions", "d1")
    assert await refused(sfn.send_task_failure(taskToken=one.token, error="E" * 257)) == (
        "ValidationException"
    )
    assert await refused(sfn.send_task_failure(taskToken=one.token, cause="c" * 32_769)) == (
        "ValidationException"
    )
    await sfn.send_task_failure(taskToken=one.token, error="Child.Failed", cause="on purpose")
    described = await sfn.describe_execution(executionArn=arn)
    assert (described["status"], described["error"], described["cause"]) == (
        "FAILED",
        "Child.Failed",
        "on purpose",
    )
    assert await refused(sfn.send_task_success(taskToken=two.token, output="{}")) == (
        "TaskDoesNotExist"
    )
    assert await refused(sfn.send_task_heartbeat(taskToken=two.token)) == "TaskDoesNotExist"
    assert world.history.tokens.parents[arn].error == "Child.Failed"


@virtual
async def test_a_missed_heartbeat_fails_the_parent_by_itself() -> None:
    world = make_world()
    arn, _ = parent(world, heartbeat_seconds=10.0)
    kept, forgotten = tokens(world, arn)
    sfn = world.client("stepfunctions", "d1")
    async with anyio.create_task_group() as tg:
        tg.start_soon(world.run)
        await anyio.sleep(5)
        await sfn.send_task_heartbeat(taskToken=kept.token)
        await sfn.send_task_heartbeat(taskToken=forgotten.token)
        await anyio.sleep(9)  # t=14: both beat at 5, due at 15
        await sfn.send_task_heartbeat(taskToken=kept.token)
        await anyio.sleep(3)  # t=17: the forgotten one expired at 15
        assert world.history.tokens.parents[arn].ended == pytest.approx(15.02, abs=0.01)
        tg.cancel_scope.cancel()
    described = await sfn.describe_execution(executionArn=arn)
    assert (described["status"], described["error"]) == ("FAILED", "States.HeartbeatTimeout")
    assert await refused(sfn.send_task_success(taskToken=forgotten.token, output="{}")) == (
        "TaskTimedOut"
    )
    assert await refused(sfn.send_task_success(taskToken=kept.token, output="{}")) == (
        "TaskTimedOut"
    )
    assert world.history.tokens.parents[arn].expired == forgotten.token
    assert any("got no heartbeat" in text for text in lines(world.history, "parent_ended"))


@virtual
async def test_the_execution_timeout_and_an_abort() -> None:
    world = make_world()
    timed, _ = parent(world, "t", timeout_seconds=30.0, heartbeat_seconds=100.0)
    aborted, _ = parent(world, "a")
    sfn = world.client("stepfunctions", "d1")
    assert world.stop_outside(aborted)
    [token, _] = tokens(world, aborted)
    assert await refused(sfn.send_task_success(taskToken=token.token, output="{}")) == (
        "TaskTimedOut"
    )
    assert (await sfn.describe_execution(executionArn=aborted))["status"] == "ABORTED"
    await anyio.sleep(31)
    described = await sfn.describe_execution(executionArn=timed)
    assert (described["status"], described["error"]) == ("TIMED_OUT", "States.Timeout")
    assert world.history.tokens.parents[timed].ended == pytest.approx(30.0, abs=0.01)
    assert not world.redrive(timed, 10.0)  # a parent is not redriven here


@virtual
async def test_a_lost_answer_then_a_retry_finds_the_task_closed() -> None:
    attempts: list[str] = []

    def first_answer_lost(node: str, op: str, params: Mapping[str, Any]) -> CallFault:
        if op != "SendTaskSuccess":
            return NO_FAULT
        attempts.append(op)
        return CallFault(drop_answer=True) if len(attempts) == 1 else NO_FAULT

    world = make_world(faults=first_answer_lost)
    arn, _ = parent(world, items=[{}])
    [token] = tokens(world, arn)
    sfn = world.client("stepfunctions", "d1", read_timeout=5.0, max_attempts=3)
    assert await refused(sfn.send_task_success(taskToken=token.token, output='{"ok": 1}')) == (
        "TaskTimedOut"
    )
    assert attempts == ["SendTaskSuccess", "SendTaskSuccess"]
    assert world.history.tokens.parents[arn].status == "SUCCEEDED"
    assert [a.operation for a in world.history.lost_answers] == ["SendTaskSuccess"]


@virtual
async def test_stop_execution() -> None:
    world = make_world()
    machine = world.create_state_machine("work")
    events = world.create_queue("events")
    world.route_events([machine], events)
    sfn = world.client("stepfunctions", "d1")
    sqs = world.client("sqs", "d1")
    started = await sfn.start_execution(stateMachineArn=machine, name="c", input='{"seconds": 9}')
    child = started["executionArn"]
    stopped = await sfn.stop_execution(executionArn=child, error="Dispatcher.ParentGone", cause="x")
    again = await sfn.stop_execution(executionArn=child)  # closed: nothing changes
    assert again["stopDate"] == stopped["stopDate"]
    described = await sfn.describe_execution(executionArn=child)
    assert (described["status"], described["error"], described["cause"]) == (
        "ABORTED",
        "Dispatcher.ParentGone",
        "x",
    )
    [stop] = world.history.tokens.stops
    assert (stop.node, stop.arn, stop.error) == ("d1", child, "Dispatcher.ParentGone")
    await anyio.sleep(1)  # both events on the queue
    got = await sqs.receive_message(QueueUrl=events, MaxNumberOfMessages=10)
    details = [json.loads(m["Body"])["detail"] for m in got["Messages"]]
    assert sorted((d["status"], d["error"] or "") for d in details) == [
        ("ABORTED", "Dispatcher.ParentGone"),
        ("RUNNING", ""),
    ]
    missing = child.replace(":c", ":nope")
    assert await refused(sfn.stop_execution(executionArn=missing)) == "ExecutionDoesNotExist"
    assert await refused(sfn.stop_execution(executionArn="arn:nope")) == "InvalidArn"
    arn, _ = parent(world, items=[{}])  # a parent stopped through the API: its tasks close
    await sfn.stop_execution(executionArn=arn)
    [token] = tokens(world, arn)
    assert await refused(sfn.send_task_heartbeat(taskToken=token.token)) == "TaskTimedOut"


@virtual
async def test_a_child_returns_what_its_input_says() -> None:
    world = make_world()
    machine = world.create_state_machine("work")
    events = world.create_queue("events")
    world.route_events([machine], events)
    sfn = world.client("stepfunctions", "d1")
    inputs = {
        "plain": {"req": "r1", "seconds": 1},
        "failing": {"req": "r2", "seconds": 1, "fail": True},
        "own-error": {"seconds": 1, "fail": True, "error": "Mine", "cause": "because"},
        "large": {"req": "r3", "seconds": 1, "output_bytes": 255_000},
        "too-large": {"req": "r4", "seconds": 1, "output_bytes": 300_000},
    }
    for name, child in inputs.items():
        await sfn.start_execution(stateMachineArn=machine, name=name, input=json.dumps(child))
    await anyio.sleep(2)
    arn = machine.replace(":stateMachine:", ":execution:") + ":"
    result = {}
    for name in inputs:
        described = await sfn.describe_execution(executionArn=arn + name)
        result[name] = (described["status"], described.get("error"), described.get("output"))
    assert result["plain"] == ("SUCCEEDED", None, '{"req": "r1", "done": true}')
    assert result["failing"] == ("FAILED", "Simulated.Failure", None)
    assert result["own-error"] == ("FAILED", "Mine", None)
    status, _, output = result["large"]
    assert status == "SUCCEEDED"
    assert output is not None
    assert len(output) == 255_000
    assert json.loads(output)["req"] == "r3"
    assert result["too-large"][:2] == ("FAILED", "States.DataLimitExceeded")
    # EventBridge leaves out an output over 248 KiB: the event says so; describe has it.
    sqs = world.client("sqs", "d1")
    ends: dict[str, dict[str, Any]] = {}
    while len(ends) < len(inputs):
        got = await sqs.receive_message(QueueUrl=events, MaxNumberOfMessages=10)
        for message in got.get("Messages", []):
            detail = json.loads(message["Body"])["detail"]
            if detail["status"] != "RUNNING":
                ends[detail["name"]] = detail
            await sqs.delete_message(QueueUrl=events, ReceiptHandle=message["ReceiptHandle"])
    assert ends["plain"]["output"] == '{"req": "r1", "done": true}'
    assert ends["large"]["output"] is None
    assert ends["large"]["outputDetails"] == {"included": False}
    assert (ends["own-error"]["error"], ends["own-error"]["cause"]) == ("Mine", "because")


@virtual
async def test_bad_items_carry_an_invalid_key_and_the_parent_passes_attributes() -> None:
    world = make_world()
    arn, queue = parent(world, items=[{}, {}], bad_items={1}, attributes={"pool": "p0"})
    sqs = world.client("sqs", "d1")
    got = await sqs.receive_message(
        QueueUrl=queue, MaxNumberOfMessages=10, MessageAttributeNames=["All"]
    )
    keys = sorted(m["MessageAttributes"]["idempotency-key"]["StringValue"] for m in got["Messages"])
    assert keys == ["p-0", "p-1 bad!"]
    assert {m["MessageAttributes"]["pool"]["StringValue"] for m in got["Messages"]} == {"p0"}
    assert len(tokens(world, arn)) == 2
    machine = world.history.executions[arn].state_machine_arn
    with pytest.raises(ClientError) as taken:
        world.start_parent(machine, "p", queue, [{}])
    assert code_of(taken) == "ExecutionAlreadyExists"


# -- the harness ------------------------------------------------------------------------------


def _parents_only(on: Scenario, off: Scenario) -> Scenario:
    """``on`` with the draws that come with parents taken from ``off``: the parents and the
    operator scenarios that act on them (their retries, deploys while they heartbeat, their
    children's redrives)."""
    extras = dataclasses.replace(
        on.extras,
        parent_retries=off.extras.parent_retries,
        deploys=off.extras.deploys,
        child_redrives=off.extras.child_redrives,
    )
    return dataclasses.replace(on, parents=off.parents, extras=extras)


@pytest.mark.parametrize("buggified", [False, True])
def test_parents_change_only_the_seeds_that_get_them(
    buggified: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Turned on, parents come to about a third of the seeds; every draw of a seed without
    parents stays as it was (the parents have a generator of their own). Without buggify,
    so does every other draw of a seed with parents; with it, such a seed's other draws may
    follow from the knobs that depend on parents: token knobs (drawn only with parents) and
    knobs dropped with parents as if not drawn (twin_keeps, exists_unknown, late_redrives,
    key_limit_drops...), the seed drawn anew without them."""
    monkeypatch.setattr(buggify, "BUGGIFY", buggified)
    with_parents = redrawn = by_knobs = 0
    for seed in range(200):
        on, off = scenario(seed, parents=True), scenario(seed, parents=False)
        assert not off.parents.parents
        if not on.parents.parents:
            assert on == off, f"seed {seed} has no parents, yet parents moved its draws"
            continue
        with_parents += 1
        knobbed = on.knobs != off.knobs or on.token_knobs != off.token_knobs
        if on.named != off.named and not knobbed:
            # A named limit is not drawn where parents heartbeat (sim/named.py): such a
            # seed's other draws (pools, queues, knobs) follow from that, drawn anew.
            assert on.named is None, "left out, never added, for parents"
            redrawn += 1
            continue
        if _parents_only(on, off) == off:
            continue
        assert buggified, f"seed {seed}: without buggify only the parents' draws change"
        assert knobbed, f"seed {seed}: its other draws moved, not by a knob that needs parents"
        by_knobs += 1
    assert 30 <= with_parents <= 90
    assert redrawn <= 30, "most seeds with parents keep every other draw"
    assert (by_knobs > 0) == buggified


@pytest.mark.skipif(
    "heartbeat_interval" not in Settings.model_fields,
    reason="the dispatcher does not answer task tokens yet",
)
@pytest.mark.timeout(120)
def test_a_seed_with_parents_holds_every_invariant_and_replays() -> None:
    sim_cli._quiet_logs(verbose=False)
    try:
        plan = scenario(0, parents=True)
        assert plan.parents.parents
        first, again = simulate(0, plan=plan), simulate(0, plan=plan)
    finally:
        structlog.reset_defaults()
    assert first.ok, sim_cli.describe(first)
    log = first.world.history.tokens
    assert len(log.issued) == plan.parents.items
    assert any(c.operation == "SendTaskHeartbeat" and c.accepted for c in log.calls)
    assert [r.line() for r in first.world.history.records] == [
        r.line() for r in again.world.history.records
    ]
