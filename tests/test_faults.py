"""The fault injectors against a real MiniStack: what botocore sees through FaultProxy, and
what EventChaos does to events on their way to the events queue."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aioboto3
import anyio
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectionClosedError

from devtools import EventChaos, FaultKind, FaultProxy, FaultRule
from devtools.polling import wait_until

if TYPE_CHECKING:
    from types_aiobotocore_events import EventBridgeClient
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_stepfunctions import SFNClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parent.parent
ROLE = "arn:aws:iam::000000000000:role/faults-test"
PASS_MACHINE = json.dumps({"StartAt": "P", "States": {"P": {"Type": "Pass", "End": True}}})
# One attempt and no retry: the test sees exactly what the proxy answered.
ONE_ATTEMPT = Config(retries={"total_max_attempts": 1, "mode": "standard"})
SESSION = aioboto3.Session(
    aws_access_key_id="test",
    aws_secret_access_key="test",  # noqa: S106 - the emulator accepts any credentials
    region_name="us-east-1",
)


def _ministack() -> str:
    """The emulator executable: the variable the sandbox honours, the repo's venv, PATH."""
    candidates = [
        os.environ.get("DISPATCHER_SANDBOX_EMULATOR", ""),
        str(REPO / ".venv-emulator" / "bin" / "ministack"),
        shutil.which("ministack") or "",
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail("MiniStack not found: run `make test` (it installs .venv-emulator)")


def _healthy(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint}/_ministack/health", timeout=1) as response:  # noqa: S310 - loopback http
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A MiniStack of this module's own on a free loopback port; stopped by PID."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("ministack") / "ministack.log"
    env = {**os.environ, "BIND_HOST": "127.0.0.1", "GATEWAY_PORT": str(port)}
    with log_path.open("wb") as log:
        proc = subprocess.Popen([_ministack()], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while not _healthy(endpoint):
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"MiniStack did not start: {log_path.read_text()[-2000:]}")
                time.sleep(0.05)  # polling a health check against a deadline
            yield endpoint
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@dataclass
class FakeClock:
    """A monotonic clock the test moves by hand."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Aws:
    """Clients through the proxy (what the dispatcher would see) and straight to MiniStack."""

    proxy: FaultProxy
    sfn: SFNClient
    sqs: SQSClient
    direct_sfn: SFNClient
    machine_arn: str


@asynccontextmanager
async def open_aws(endpoint: str, proxy: FaultProxy) -> AsyncIterator[Aws]:
    """Clients on both sides of `proxy` and a fresh Pass state machine."""
    async with AsyncExitStack() as stack:
        sfn = await stack.enter_async_context(
            SESSION.client("stepfunctions", endpoint_url=proxy.url, config=ONE_ATTEMPT)
        )
        sqs = await stack.enter_async_context(
            SESSION.client("sqs", endpoint_url=proxy.url, config=ONE_ATTEMPT)
        )
        direct = await stack.enter_async_context(
            SESSION.client("stepfunctions", endpoint_url=endpoint)
        )
        created = await direct.create_state_machine(
            name=f"faults-{uuid.uuid4().hex[:12]}", definition=PASS_MACHINE, roleArn=ROLE
        )
        yield Aws(proxy, sfn, sqs, direct, created["stateMachineArn"])


@pytest.fixture
async def aws(emulator: str) -> AsyncIterator[Aws]:
    """A seeded proxy in front of the module's emulator, with clients on both sides."""
    async with FaultProxy(emulator, seed=1) as proxy, open_aws(emulator, proxy) as clients:
        yield clients


async def _execution_names(sfn: SFNClient, machine_arn: str) -> set[str]:
    listed = await sfn.list_executions(stateMachineArn=machine_arn)
    return {execution["name"] for execution in listed["executions"]}


async def test_throttle_raises_throttling_exception(aws: Aws) -> None:
    aws.proxy.add(FaultRule("StartExecution", FaultKind.THROTTLE))
    with pytest.raises(ClientError) as caught:
        await aws.sfn.start_execution(stateMachineArn=aws.machine_arn, name="t1", input="{}")
    assert caught.value.response["Error"]["Code"] == "ThrottlingException"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert await _execution_names(aws.direct_sfn, aws.machine_arn) == set()

    aws.proxy.clear()
    await aws.sfn.start_execution(stateMachineArn=aws.machine_arn, name="t1", input="{}")
    assert aws.proxy.stats[("StartExecution", "throttle")] == 1
    assert aws.proxy.stats[("StartExecution", "forwarded")] == 1


async def test_sqs_throttle_is_request_throttled(aws: Aws) -> None:
    aws.proxy.add(FaultRule("ListQueues", FaultKind.THROTTLE))
    with pytest.raises(aws.sqs.exceptions.RequestThrottled):
        await aws.sqs.list_queues()
    assert aws.proxy.stats[("ListQueues", "throttle")] == 1


async def test_server_error_503(aws: Aws) -> None:
    aws.proxy.add(FaultRule("DescribeStateMachine", FaultKind.SERVER_ERROR, status=503))
    with pytest.raises(ClientError) as caught:
        await aws.sfn.describe_state_machine(stateMachineArn=aws.machine_arn)
    assert caught.value.response["Error"]["Code"] == "ServiceUnavailable"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503


async def test_probability_is_seeded_and_reproducible(emulator: str) -> None:
    calls, probability, seed = 60, 0.3, 7
    rolls = random.Random(seed)
    expected = sum(rolls.random() < probability for _ in range(calls))
    assert 0.15 * calls <= expected <= 0.45 * calls  # the seed gives a "roughly 30%" run
    async with FaultProxy(emulator, seed=seed) as proxy, open_aws(emulator, proxy) as aws:
        rule = proxy.add(FaultRule("StartExecution", FaultKind.THROTTLE, probability=probability))
        codes = []
        for index in range(calls):
            try:
                await aws.sfn.start_execution(
                    stateMachineArn=aws.machine_arn, name=f"p{index}", input="{}"
                )
            except ClientError as exc:
                codes.append(exc.response["Error"]["Code"])
    assert codes == ["ThrottlingException"] * expected
    assert rule.fired == expected
    assert proxy.stats[("StartExecution", "throttle")] == expected
    assert proxy.stats[("StartExecution", "forwarded")] == calls - expected


async def test_max_count_limits_a_rule(aws: Aws) -> None:
    aws.proxy.add(FaultRule("DescribeStateMachine", FaultKind.THROTTLE, max_count=2))
    outcomes = []
    for _ in range(4):
        try:
            await aws.sfn.describe_state_machine(stateMachineArn=aws.machine_arn)
            outcomes.append("ok")
        except ClientError:
            outcomes.append("throttled")
    assert outcomes == ["throttled", "throttled", "ok", "ok"]


async def test_body_contains_rejects_only_marked_inputs(aws: Aws) -> None:
    aws.proxy.add(
        FaultRule(
            "StartExecution",
            FaultKind.ERROR,
            body_contains="poison-pill",
            status=400,
            error_code="InvalidExecutionInput",
        )
    )
    with pytest.raises(aws.sfn.exceptions.InvalidExecutionInput):
        await aws.sfn.start_execution(
            stateMachineArn=aws.machine_arn, name="bad", input='{"marker": "poison-pill"}'
        )
    await aws.sfn.start_execution(
        stateMachineArn=aws.machine_arn, name="good", input='{"marker": "fine"}'
    )
    assert await _execution_names(aws.direct_sfn, aws.machine_arn) == {"good"}


async def test_drop_is_a_connection_error_and_starts_nothing(aws: Aws) -> None:
    aws.proxy.add(FaultRule("StartExecution", FaultKind.DROP))
    with pytest.raises(ConnectionClosedError):
        await aws.sfn.start_execution(stateMachineArn=aws.machine_arn, name="d1", input="{}")
    assert await _execution_names(aws.direct_sfn, aws.machine_arn) == set()
    assert aws.proxy.stats[("StartExecution", "drop")] == 1


async def test_drop_response_starts_the_execution_anyway(aws: Aws) -> None:
    aws.proxy.add(FaultRule("StartExecution", FaultKind.DROP_RESPONSE))
    with pytest.raises(ConnectionClosedError):
        await aws.sfn.start_execution(stateMachineArn=aws.machine_arn, name="lost", input="{}")
    assert await _execution_names(aws.direct_sfn, aws.machine_arn) == {"lost"}
    # The retry the client would make now meets the name it already used.
    aws.proxy.clear()
    with pytest.raises(aws.sfn.exceptions.ExecutionAlreadyExists):
        await aws.sfn.start_execution(stateMachineArn=aws.machine_arn, name="lost", input="{}")


async def test_latency_delays_then_forwards(aws: Aws) -> None:
    aws.proxy.add(FaultRule("DescribeStateMachine", FaultKind.LATENCY, delay=0.3))
    started = time.monotonic()
    described = await aws.sfn.describe_state_machine(stateMachineArn=aws.machine_arn)
    assert time.monotonic() - started >= 0.3
    assert described["stateMachineArn"] == aws.machine_arn
    assert aws.proxy.stats[("DescribeStateMachine", "latency")] == 1


async def test_a_delayed_request_whose_client_gave_up_is_never_forwarded(aws: Aws) -> None:
    """TCP, not a mailbox: a request held on the wire past its client's deadline never
    reaches AWS (the lease fence relies on it: a start lands within D or never)."""
    aws.proxy.add(FaultRule("StartExecution", FaultKind.LATENCY, delay=1.0, max_count=1))
    with pytest.raises(TimeoutError), anyio.fail_after(0.2):
        await aws.sfn.start_execution(stateMachineArn=aws.machine_arn, name="late", input="{}")

    async def abandoned() -> bool:
        return aws.proxy.stats[("StartExecution", "abandoned")] == 1

    await wait_until(abandoned, within=5, message="the proxy drops the abandoned request")
    assert await _execution_names(aws.direct_sfn, aws.machine_arn) == set()


async def test_list_lag_serves_an_old_listing(emulator: str) -> None:
    clock = FakeClock()
    async with (
        FaultProxy(emulator, list_lag=5.0, clock=clock) as proxy,
        open_aws(emulator, proxy) as aws,
    ):
        assert await _execution_names(aws.sfn, aws.machine_arn) == set()
        await aws.sfn.start_execution(stateMachineArn=aws.machine_arn, name="new", input="{}")
        assert await _execution_names(aws.direct_sfn, aws.machine_arn) == {"new"}
        clock.now += 1.0  # the proxy's first listing that sees "new" happens here...
        assert await _execution_names(aws.sfn, aws.machine_arn) == set()
        clock.now += 4.9
        assert await _execution_names(aws.sfn, aws.machine_arn) == set()
        clock.now += 0.1  # ...and is served 5 s later
        assert await _execution_names(aws.sfn, aws.machine_arn) == {"new"}
        proxy.list_lag = 0.0
        await aws.sfn.start_execution(stateMachineArn=aws.machine_arn, name="newer", input="{}")
        assert await _execution_names(aws.sfn, aws.machine_arn) == {"new", "newer"}
    assert proxy.stats[("ListExecutions", "stale")] == 3
    assert proxy.stats[("ListExecutions", "forwarded")] == 2


# --- EventChaos --------------------------------------------------------------------------


@dataclass
class Queues:
    """A raw queue (the rule's target in tests) and the events queue behind the relay."""

    sqs: SQSClient
    source: str
    target: str


@pytest.fixture
async def queues(emulator: str) -> AsyncIterator[Queues]:
    """Two fresh queues on the module's emulator."""
    async with SESSION.client("sqs", endpoint_url=emulator) as sqs:
        tag = uuid.uuid4().hex[:10]
        source = (await sqs.create_queue(QueueName=f"raw-{tag}"))["QueueUrl"]
        target = (await sqs.create_queue(QueueName=f"events-{tag}"))["QueueUrl"]
        yield Queues(sqs, source, target)


async def _drain(sqs: SQSClient, queue_url: str, expected: int) -> list[str]:
    """Every body in the queue: `expected` of them, then one empty receive proving no more."""
    bodies: list[str] = []
    with anyio.fail_after(15):
        while True:
            wait = 1 if len(bodies) < expected else 0
            received = await sqs.receive_message(
                QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=wait
            )
            messages = received.get("Messages", [])
            bodies.extend(message["Body"] for message in messages)
            if not messages and len(bodies) >= expected:
                return bodies


async def _send_numbered(queues: Queues, count: int) -> list[str]:
    bodies = [json.dumps({"n": n}) for n in range(count)]
    for start in range(0, count, 10):
        await queues.sqs.send_message_batch(
            QueueUrl=queues.source,
            Entries=[
                {"Id": str(i), "MessageBody": body}
                for i, body in enumerate(bodies[start : start + 10])
            ],
        )
    return bodies


async def test_chaos_drop_all_forwards_nothing(emulator: str, queues: Queues) -> None:
    await _send_numbered(queues, 12)
    chaos = EventChaos(emulator, queues.source, queues.target, drop=1.0, wait_seconds=0)
    with anyio.fail_after(15):
        await chaos.run(burst=True)
    assert chaos.stats["dropped"] == 12
    assert await _drain(queues.sqs, queues.target, 0) == []
    assert chaos.stats["forwarded"] == 0
    assert await _drain(queues.sqs, queues.source, 0) == []  # consumed, not left behind


async def test_chaos_duplicate_forwards_each_twice(emulator: str, queues: Queues) -> None:
    bodies = await _send_numbered(queues, 12)
    chaos = EventChaos(emulator, queues.source, queues.target, duplicate=1.0, wait_seconds=0)
    with anyio.fail_after(15):
        await chaos.run(burst=True)
    assert sorted(await _drain(queues.sqs, queues.target, 24)) == sorted(bodies * 2)
    assert chaos.stats["duplicated"] == 12


async def test_chaos_reorder_loses_nothing(emulator: str, queues: Queues) -> None:
    bodies = await _send_numbered(queues, 25)
    chaos = EventChaos(emulator, queues.source, queues.target, reorder=True, seed=3, wait_seconds=0)
    with anyio.fail_after(15):
        await chaos.run(burst=True)  # the last held-back message is flushed on the way out
    assert chaos.stats["held"] >= 1
    assert sorted(await _drain(queues.sqs, queues.target, 25)) == sorted(bodies)
    assert chaos.stats["forwarded"] == 25


async def test_chaos_defaults_relay_real_events_once(emulator: str, queues: Queues) -> None:
    """Status-change events from a real rule reach the events queue exactly once each."""
    async with AsyncExitStack() as stack:
        sfn: SFNClient = await stack.enter_async_context(
            SESSION.client("stepfunctions", endpoint_url=emulator)
        )
        events: EventBridgeClient = await stack.enter_async_context(
            SESSION.client("events", endpoint_url=emulator)
        )
        machine = await sfn.create_state_machine(
            name=f"chaos-{uuid.uuid4().hex[:12]}", definition=PASS_MACHINE, roleArn=ROLE
        )
        machine_arn = machine["stateMachineArn"]
        await _route_events(events, queues, machine_arn)
        chaos = EventChaos(emulator, queues.source, queues.target)
        for name in ("a", "b", "c"):
            await sfn.start_execution(stateMachineArn=machine_arn, name=name, input="{}")
        # A Pass machine says RUNNING then SUCCEEDED: two events per execution.
        with anyio.fail_after(15):
            while chaos.stats["forwarded"] < 6:
                await chaos.run_once(queues.sqs)
    relayed = [json.loads(body)["detail"] for body in await _drain(queues.sqs, queues.target, 6)]
    assert sorted((d["name"], d["status"]) for d in relayed) == sorted(
        (name, status) for name in "abc" for status in ("RUNNING", "SUCCEEDED")
    )
    assert chaos.stats == {"received": 6, "forwarded": 6}


async def _route_events(events: EventBridgeClient, queues: Queues, machine_arn: str) -> None:
    """The EventBridge rule the sandbox creates, aimed at the raw queue."""
    attributes = await queues.sqs.get_queue_attributes(
        QueueUrl=queues.source, AttributeNames=["QueueArn"]
    )
    rule = f"chaos-{uuid.uuid4().hex[:12]}"
    pattern = {"source": ["aws.states"], "detail": {"stateMachineArn": [machine_arn]}}
    pattern["detail-type"] = ["Step Functions Execution Status Change"]
    await events.put_rule(Name=rule, EventPattern=json.dumps(pattern))
    await events.put_targets(
        Rule=rule, Targets=[{"Id": "raw", "Arn": attributes["Attributes"]["QueueArn"]}]
    )
