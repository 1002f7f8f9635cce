"""The real dispatcher against the real emulator: the limit holds, nothing is lost or doubled.

Every verdict comes from the executions' own records (ListExecutions start/stop dates),
never from the dispatcher's opinion of itself. The first tests count starts on fakes, under
both answers a repeated start can get: AWS's success with the same ARN, MiniStack's
``ExecutionAlreadyExists``.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import anyio
import pytest

from devtools.chaos import EventChaos
from devtools.faults import FaultKind, FaultProxy, FaultRule
from devtools.polling import wait_until
from devtools.sandbox.provision import SandboxResources
from dispatcher.core.requests import IDEMPOTENCY_ATTRIBUTE, execution_arn
from tests.audit import (
    Execution,
    drain,
    list_executions,
    no_slot_leaked,
    send_requests,
    session,
    verdict,
    workload,
)
from tests.fake_intake import intake_of
from tests.fakes import REQUEST_QUEUE, STATE_MACHINE_ARN, build_world, sqs_message
from tests.runner import Child, child_process, running

Factory = Callable[..., Awaitable[SandboxResources]]

ORDER_ARN = execution_arn(STATE_MACHINE_ARN, "order-42")


# -- counting starts (fakes) -------------------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "aws_exact", [True, False], ids=["repeat-answered-success", "repeat-answered-already-exists"]
)
async def test_two_copies_in_flight_at_once_count_one_start(aws_exact: bool) -> None:
    """Two copies of one request (same key) call StartExecution at the same time: one
    execution, counted once as started and once as a duplicate, whatever AWS answers
    the repeat (success with the same ARN, or ExecutionAlreadyExists)."""
    world = build_world(limit=3, aws_exact=aws_exact)
    for message_id in ("copy-1", "copy-2"):
        world.sqs.put(
            REQUEST_QUEUE,
            sqs_message(
                '{"seconds": 1}',
                message_id=message_id,
                attributes={IDEMPOTENCY_ATTRIBUTE: "order-42"},
            ),
        )
    world.sfn.start_gate = anyio.Event()
    intake = intake_of(world)
    assert await intake.receive_once(intake.queues[0]) == 2
    async with anyio.create_task_group() as handlers:
        while intake.dispatch_once(world.pool, handlers):
            pass
        await anyio.wait_all_tasks_blocked()  # both copies wait inside StartExecution
        assert len(world.sfn.calls_to("start_execution")) == 2
        world.sfn.start_gate.set()
    assert list(world.sfn.executions) == [ORDER_ARN]
    assert world.pool.ledger.running == {ORDER_ARN}
    assert world.pool.ledger.reserved_count == 0
    assert (intake.stats.started, intake.stats.duplicates) == (1, 1)
    assert world.pool.started_total == 1
    assert world.sample("dispatcher_starts_total", pool="default", outcome="started") == 1
    assert world.sample("dispatcher_starts_total", pool="default", outcome="duplicate") == 1
    assert len(world.sqs.calls_to("delete_message")) == 2


@pytest.mark.timeout(10)
async def test_a_running_event_before_the_start_answer_still_counts_a_start() -> None:
    """The status event of our own start may be applied before StartExecution answers:
    the ledger then holds the ARN already, yet the start is ours (not a duplicate)."""
    world = build_world(limit=3)
    world.sqs.put(
        REQUEST_QUEUE,
        sqs_message("{}", message_id="m-1", attributes={IDEMPOTENCY_ATTRIBUTE: "order-42"}),
    )
    world.sfn.start_gate = anyio.Event()
    intake = intake_of(world)
    assert await intake.receive_once(intake.queues[0]) == 1
    async with anyio.create_task_group() as handlers:
        intake.dispatch_once(world.pool, handlers)
        await anyio.wait_all_tasks_blocked()
        world.pool.ledger.observe_running(ORDER_ARN, world.clock())  # the RUNNING event
        world.pool.update()
        world.sfn.start_gate.set()
    assert world.pool.ledger.running == {ORDER_ARN}
    assert (intake.stats.started, intake.stats.duplicates) == (1, 0)
    assert world.sample("dispatcher_starts_total", pool="default", outcome="started") == 1
    assert world.sample("dispatcher_starts_total", pool="default", outcome="duplicate") == 0


# -- the real dispatcher against the emulator ---------------------------------------------


@pytest.mark.timeout(180)
async def test_limit_held_for_200_requests(sandbox_factory: Factory) -> None:
    resources = await sandbox_factory(limit=5)
    async with session().client("sqs", endpoint_url=resources.endpoint) as sqs:
        names = await send_requests(sqs, resources.request_queue_url, workload(200, 0.2, 1.0))
    async with running(resources, limit=5) as dispatcher:
        await verdict(resources, names, 5, within=150)
        await no_slot_leaked(dispatcher)
        assert dispatcher.pool.started_total == 200


@pytest.mark.timeout(240)
async def test_limit_held_under_throttling_lag_and_damaged_events(
    sandbox_factory: Factory,
) -> None:
    resources = await sandbox_factory(limit=5, raw_events=True)
    assert resources.raw_events_queue_url is not None
    async with session().client("sqs", endpoint_url=resources.endpoint) as sqs:
        names = await send_requests(sqs, resources.request_queue_url, workload(200, 0.2, 1.0))
    chaos = EventChaos(
        resources.endpoint,
        resources.raw_events_queue_url,
        resources.events_queue_url,
        drop=0.5,
        duplicate=0.3,
        reorder=True,
        max_delay=1,
        seed=3,
    )
    async with (
        FaultProxy(resources.endpoint, seed=5, list_lag=1.0) as proxy,
        anyio.create_task_group() as tg,
    ):
        proxy.add(FaultRule("StartExecution", FaultKind.THROTTLE, probability=0.3))
        await tg.start(chaos.run)
        async with running(
            resources, proxy.url, limit=5, reconcile_interval=0.5, start_grace=1.5
        ) as dispatcher:
            await verdict(resources, names, 5, within=200)
            throttled = proxy.stats[("StartExecution", "throttle")]
            assert throttled >= 40, f"faults really injected ({throttled} throttles)"
            assert chaos.stats["dropped"] >= 50
            await no_slot_leaked(dispatcher)
        tg.cancel_scope.cancel()


@pytest.mark.timeout(180)
async def test_reconcile_alone_when_every_event_is_lost(sandbox_factory: Factory) -> None:
    resources = await sandbox_factory(limit=5, raw_events=True)
    assert resources.raw_events_queue_url is not None
    async with session().client("sqs", endpoint_url=resources.endpoint) as sqs:
        names = await send_requests(sqs, resources.request_queue_url, workload(60, 0.2, 0.6))
    chaos = EventChaos(
        resources.endpoint, resources.raw_events_queue_url, resources.events_queue_url, drop=1.0
    )
    async with anyio.create_task_group() as tg:
        await tg.start(chaos.run)
        async with running(resources, limit=5, reconcile_interval=0.5, start_grace=1) as d:
            await verdict(resources, names, 5, within=150)
            assert d.events is not None
            assert d.events.applied == 0, "no event reached the dispatcher"
            await no_slot_leaked(d)
        tg.cancel_scope.cancel()


async def interrupt_then_resume(
    resources: SandboxResources, requests: int, after: int, signum: signal.Signals
) -> Child:
    """Run the CLI dispatcher until ``after`` executions exist, send ``signum``, start a new
    one and check the whole run from the records. Returns the first (interrupted) child."""
    async with (
        session().client("sqs", endpoint_url=resources.endpoint) as sqs,
        session().client("stepfunctions", endpoint_url=resources.endpoint) as sfn,
    ):
        names = await send_requests(sqs, resources.request_queue_url, workload(requests, 0.3, 1.0))

        async def some_started() -> bool:
            return len(await list_executions(sfn, resources.state_machine_arn)) >= after

        async with child_process(resources) as first:
            with anyio.fail_after(60):
                await first.ready.wait()
            await wait_until(some_started, within=60, interval=0.05)
            first.process.send_signal(signum)
            with anyio.fail_after(5 + 5):  # shutdown timeout + margin
                await first.process.wait()
        async with child_process(resources) as second:
            with anyio.fail_after(60):
                await second.ready.wait()
            await verdict(resources, names, 5, within=150)
            second.process.send_signal(signal.SIGTERM)
            with anyio.fail_after(15):
                assert await second.process.wait() == 0
    return first


@pytest.mark.timeout(180)
async def test_kill_9_mid_run_then_restart_loses_and_doubles_nothing(
    sandbox_factory: Factory,
) -> None:
    resources = await sandbox_factory(limit=5)
    first = await interrupt_then_resume(resources, 80, 20, signal.SIGKILL)
    assert first.process.returncode == -signal.SIGKILL


@pytest.mark.timeout(180)
async def test_sigterm_under_load_exits_0_and_next_run_completes(
    sandbox_factory: Factory,
) -> None:
    resources = await sandbox_factory(limit=5)
    first = await interrupt_then_resume(resources, 60, 10, signal.SIGTERM)
    assert first.process.returncode == 0, "orderly exit within the shutdown timeout"
    stopped = first.events("dispatcher.stopped")
    assert len(stopped) == 1, "one summary line at exit"
    assert stopped[0]["started"] >= 10


@pytest.mark.timeout(150)
async def test_a_request_sent_during_shutdown_starts_once_the_next_dispatcher_is_ready(
    sandbox_factory: Factory,
) -> None:
    """SIGTERM while long polls are in flight, then a request: the stopping dispatcher's
    poll takes it and gives it back at once, so it starts as soon as the next dispatcher is
    ready instead of hiding for the visibility timeout (60 s here)."""
    resources = await sandbox_factory(limit=5)
    slow = {"DISPATCHER_RECEIVE_WAIT_SECONDS": "10", "DISPATCHER_VISIBILITY_TIMEOUT": "60"}
    async with (
        session().client("sqs", endpoint_url=resources.endpoint) as sqs,
        session().client("stepfunctions", endpoint_url=resources.endpoint) as sfn,
    ):

        async def started(name: str) -> Execution | None:
            executions = await list_executions(sfn, resources.state_machine_arn)
            return next((e for e in executions if e.name == name), None)

        [probe] = await send_requests(sqs, resources.request_queue_url, [{"seconds": 0}])
        async with child_process(resources, slow) as first:
            with anyio.fail_after(60):
                await first.ready.wait()

            async def probe_started() -> bool:
                return await started(probe) is not None

            # Once the probe started, the receive loops are polling (10 s long polls).
            await wait_until(probe_started, within=30, interval=0.05)
            first.process.send_signal(signal.SIGTERM)
            [late] = await send_requests(sqs, resources.request_queue_url, [{"seconds": 0}])
            with anyio.fail_after(10 + 5 + 10):  # the long poll answers, then the exit
                assert await first.process.wait() == 0
        assert first.events("dispatcher.received_while_stopping"), "taken while stopping"
        async with child_process(resources) as second:
            with anyio.fail_after(60):
                await second.ready.wait()
            [ready] = second.events("dispatcher.ready")
            ready_at = datetime.fromisoformat(ready["timestamp"]).timestamp()

            async def late_started() -> bool:
                return await started(late) is not None

            await wait_until(late_started, within=90, interval=0.1)
            execution = await started(late)
            assert execution is not None
            waited = execution.start - ready_at
            assert waited < 5, f"started {waited:.1f} s after the new dispatcher was ready"
            second.process.send_signal(signal.SIGTERM)
            with anyio.fail_after(15):
                assert await second.process.wait() == 0


@pytest.mark.timeout(120)
async def test_executions_started_elsewhere_count_against_the_limit(
    sandbox_factory: Factory,
) -> None:
    resources = await sandbox_factory(limit=5)
    async with (
        session().client("sqs", endpoint_url=resources.endpoint) as sqs,
        session().client("stepfunctions", endpoint_url=resources.endpoint) as sfn,
    ):
        # Two started before the dispatcher (found by the start-up listing) ...
        for i in range(2):
            await sfn.start_execution(
                stateMachineArn=resources.state_machine_arn,
                name=f"console-before-{i}",
                input=json.dumps({"seconds": 3}),
            )
        async with running(resources, limit=5) as dispatcher:
            ledger = dispatcher.pool.ledger
            assert ledger.running_count == 2
            # ... and two while it runs idle (found through their RUNNING events).
            for i in range(2):
                await sfn.start_execution(
                    stateMachineArn=resources.state_machine_arn,
                    name=f"console-during-{i}",
                    input=json.dumps({"seconds": 3}),
                )

            async def four_counted() -> bool:
                return ledger.running_count >= 4

            await wait_until(four_counted, within=30, interval=0.02)
            names = await send_requests(sqs, resources.request_queue_url, workload(20, 0.2, 0.5))
            foreign = [f"console-before-{i}" for i in range(2)] + [
                f"console-during-{i}" for i in range(2)
            ]
            await verdict(resources, names + foreign, 5, within=90)


@pytest.mark.timeout(120)
async def test_bad_requests_are_dead_lettered_with_reasons(sandbox_factory: Factory) -> None:
    resources = await sandbox_factory(limit=5)
    good = workload(20, 0.1, 0.3)
    bad: list[dict[str, Any] | str] = [
        "this is not json",
        json.dumps({"pad": "x" * (300 * 1024)}),
        json.dumps({"seconds": 0}),  # sent with an invalid idempotency key
        json.dumps({"seconds": 0, "marker": "reject-me"}),  # the state machine refuses it
    ]
    async with (
        session().client("sqs", endpoint_url=resources.endpoint) as sqs,
        FaultProxy(resources.endpoint) as proxy,
    ):
        proxy.add(
            FaultRule(
                "StartExecution",
                FaultKind.ERROR,
                status=400,
                error_code="InvalidExecutionInput",
                message="Invalid State Machine Execution Input",
                body_contains="reject-me",
            )
        )
        bodies = good[:10] + bad + good[10:]
        keys: list[str | None] = [None] * len(bodies)
        keys[12] = "not a valid key!"
        names = await send_requests(sqs, resources.request_queue_url, bodies, keys)
        valid_names = names[:10] + names[14:]
        async with running(resources, proxy.url, limit=5) as dispatcher:
            await verdict(resources, valid_names, 5, within=90)
            assert dispatcher.health.live
        dead = await drain(sqs, resources.dead_letter_queue_url)
    reasons = sorted(m["MessageAttributes"]["dispatcher-reason"]["StringValue"] for m in dead)
    assert reasons == sorted(
        ["invalid_json", "input_too_large", "invalid_idempotency_key", "InvalidExecutionInput"]
    )
    for message in dead:
        detail = message["MessageAttributes"]["dispatcher-detail"]["StringValue"]
        assert len(detail) > 10, "a readable reason travels with the request"


@pytest.mark.timeout(60)
async def test_envelope_format_accepts_plain_text_producers(sandbox_factory: Factory) -> None:
    resources = await sandbox_factory(limit=3)
    async with (
        session().client("sqs", endpoint_url=resources.endpoint) as sqs,
        session().client("stepfunctions", endpoint_url=resources.endpoint) as sfn,
    ):
        texts: list[dict[str, Any] | str] = [f"test message {i}" for i in range(6)]
        names = await send_requests(sqs, resources.request_queue_url, texts)
        async with running(resources, limit=3, input_format="envelope"):
            await verdict(resources, names, 3, within=45)
        described = await sfn.describe_execution(
            executionArn=resources.state_machine_arn.replace(":stateMachine:", ":execution:")
            + ":"
            + names[0]
        )
    document = json.loads(described["input"])
    assert document["body"] == "test message 0"
    assert document["requestId"] == names[0]


@pytest.mark.timeout(60)
async def test_idempotency_key_maps_repeated_requests_to_one_execution(
    sandbox_factory: Factory,
) -> None:
    resources = await sandbox_factory(limit=2)
    body = {"seconds": 1}
    async with session().client("sqs", endpoint_url=resources.endpoint) as sqs:
        names = await send_requests(
            sqs, resources.request_queue_url, [body, body, body], ["order-42", "order-42", None]
        )
        async with running(resources, limit=2) as dispatcher:
            await verdict(resources, names, 2, within=45)
            assert dispatcher.intake is not None
            assert dispatcher.intake.stats.duplicates == 1
            assert dispatcher.intake.stats.started == 2


@pytest.mark.timeout(60)
async def test_express_state_machine_is_refused_with_a_reason(
    sandbox_factory: Factory, tmp_path: Any
) -> None:
    resources = await sandbox_factory(limit=2)
    async with session().client("stepfunctions", endpoint_url=resources.endpoint) as sfn:
        created = await sfn.create_state_machine(
            name=f"{resources.prefix}-express",
            definition=json.dumps({"StartAt": "P", "States": {"P": {"Type": "Pass", "End": True}}}),
            roleArn="arn:aws:iam::000000000000:role/x",
            type="EXPRESS",
        )
    env = {"DISPATCHER_STATE_MACHINE_ARN": created["stateMachineArn"]}
    async with child_process(resources, env) as child:
        with anyio.fail_after(30):
            code = await child.process.wait()
    assert code == 3  # AWS not usable as configured (errors.EXIT_AWS), not a usage error
    text = " ".join(line.get("text", "") for line in child.lines)
    assert "EXPRESS" in text
    assert "STANDARD" in text
