"""The local sandbox: the emulator process never outlives us, provisioning is idempotent,
the demo machine's status changes reach the events queue in EventBridge's envelope, and the
parent workflow requests its children through the requests queue with task tokens."""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

import aioboto3
import anyio
import pytest
from botocore.exceptions import ClientError

from devtools.__main__ import dev_main as main
from devtools.polling import wait_until
from devtools.sandbox import (
    Emulator,
    SandboxResources,
    child_key,
    demo_definition,
    free_port,
    parent_definition,
    provision,
)
from devtools.sandbox.emulator import probe
from devtools.sandbox.provision import TEST_CREDENTIALS
from dispatcher.errors import EXIT_AWS, UserError
from tests.conftest import SandboxFactory, unique_prefix
from tests.helpers import (
    delete_sandbox,
    events_client,
    queue_depth,
    receive_all,
    sfn_client,
    sqs_client,
    ssm_client,
)

if TYPE_CHECKING:
    from types_aiobotocore_stepfunctions import SFNClient
    from types_aiobotocore_stepfunctions.type_defs import DescribeExecutionOutputTypeDef

REPO = Path(__file__).resolve().parent.parent
ENV_KEYS = {
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "DISPATCHER_STATE_MACHINE_ARN",
    "DISPATCHER_REQUEST_QUEUE_URL",
    "DISPATCHER_EVENTS_QUEUE_URL",
    "DISPATCHER_DEAD_LETTER_QUEUE_URL",
    "DISPATCHER_LIMIT",
    "DISPATCHER_LIMIT_PARAMETER",
    "SFN_DISPATCHER_PARENT_ARN",
}


# --- the process: started, stopped, never orphaned ------------------------------------------


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (None when it is gone or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # dead, waiting to be reaped by whoever adopted it
        return None
    return int(fields[19])


def _wait_gone(pid: int, started: int, timeout: float) -> bool:
    """Wait until ``pid`` (the process started at ``started``) no longer runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _start_time(pid) != started:
            return True
        time.sleep(0.05)  # polling another process's existence: nothing to wait on
    return False


@pytest.mark.integration
def test_emulator_starts_and_stops_cleanly() -> None:
    emulator = Emulator()
    emulator.start()
    pid, log = emulator.pid, emulator.log_path
    assert pid is not None
    assert log is not None
    started = _start_time(pid)
    assert started is not None
    emulator.stop()
    assert _start_time(pid) != started, "the emulator process is gone after stop()"
    assert not log.parent.exists(), "its temporary directory is removed"
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", emulator.port)) != 0, "nothing listens any more"


@pytest.mark.integration
async def test_async_context_manager_starts_and_stops() -> None:
    async with Emulator() as emulator:
        pid = emulator.pid
        assert pid is not None
        started = _start_time(pid)
        assert await anyio.to_thread.run_sync(probe, emulator.endpoint)
    assert _start_time(pid) != started


def test_port_in_use_is_a_user_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=rf"port {port} is in use on 127.0.0.1; pass --port"):
            Emulator(port=port).start()


def test_emulator_that_exits_early_shows_its_last_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "ministack"
    fake.write_text("#!/bin/sh\necho starting\necho 'boom: bad config' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("DISPATCHER_SANDBOX_EMULATOR", str(fake))
    emulator = Emulator()
    with pytest.raises(UserError, match=r"exited with status 3 .*: starting \| boom: bad config"):
        emulator.start()
    assert emulator.pid is None
    log = emulator.log_path
    assert log is not None, "the log is kept for the user to read"
    shutil.rmtree(log.parent)


def test_missing_executable_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPATCHER_SANDBOX_EMULATOR", "/nonexistent/ministack")
    with pytest.raises(UserError, match="DISPATCHER_SANDBOX_EMULATOR=/nonexistent/ministack"):
        Emulator().start()


class _Lines:
    """Lines of a child's pipe, read by a thread so the test can wait with a deadline."""

    def __init__(self, pipe: IO[str]) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.pipe = pipe
        self.thread = threading.Thread(target=self._pump, args=(pipe,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        """After the child exited: the pipe is at its end, so the reader finishes."""
        self.thread.join(timeout=5)
        self.pipe.close()

    def _pump(self, pipe: IO[str]) -> None:
        for line in pipe:
            self.lines.put(line.rstrip("\n"))

    def until(self, pattern: str, timeout: float) -> tuple[list[str], re.Match[str]]:
        """Lines up to the first matching ``pattern``, and the match."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r}; got {seen}") from None
            seen.append(line)
            if match := re.search(pattern, line):
                return seen, match


@pytest.fixture
def sandbox_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], _Lines, _Lines]]:
    """``python -m devtools sandbox`` on a free port, killed at the end if still alive."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "devtools",
            "sandbox",
            "--port",
            str(free_port()),
            "--env-file",
            str(tmp_path / "sandbox.env"),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    stdout, stderr = _Lines(process.stdout), _Lines(process.stderr)
    try:
        yield process, stdout, stderr
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        stdout.close()
        stderr.close()


def _emulator_of(stdout: _Lines, stderr: _Lines) -> tuple[int, int, dict[str, str], Path]:
    """Wait for the exports and the hint; (pid, start time, exports, log directory)."""
    exports, _ = stdout.until(r"^export SFN_DISPATCHER_PARENT_ARN=", timeout=30)
    env = dict(shlex.split(line.removeprefix("export "))[0].split("=", 1) for line in exports)
    _, match = stderr.until(r"emulator pid (\d+) at \S+ \(log (\S+)\)", timeout=10)
    pid = int(match[1])
    started = _start_time(pid)
    assert started is not None, "the emulator runs while the sandbox is up"
    return pid, started, env, Path(match[2]).parent


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_sandbox_command_prints_settings_and_stops_on_sigterm(
    sandbox_process: tuple[subprocess.Popen[str], _Lines, _Lines], tmp_path: Path
) -> None:
    process, stdout, stderr = sandbox_process
    pid, started, env, _ = _emulator_of(stdout, stderr)
    assert set(env) == ENV_KEYS
    env_file = tmp_path / "sandbox.env"
    assert env_file.stat().st_mode & 0o777 == 0o600
    written = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    assert written == env

    # The sandbox's second shell (docs/getting-started.md): the exports, then `submit --count 20`.
    submit = subprocess.run(
        [sys.executable, "-m", "dispatcher", "submit", "--count", "20"],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert submit.returncode == 0, submit.stderr
    assert submit.stdout.startswith("sent 20, failed 0")
    depth = anyio.run(queue_depth, env["AWS_ENDPOINT_URL"], env["DISPATCHER_REQUEST_QUEUE_URL"])
    assert depth == 20
    # The exports name the limit parameter: pause and resume work without a restart.
    for command, said in (("pause", "limit 10 -> 0"), ("resume", "limit 0 -> 10")):
        done = subprocess.run(
            [sys.executable, "-m", "dispatcher", command],
            cwd=REPO,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert said in done.stdout

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0
    assert _wait_gone(pid, started, timeout=5), "SIGTERM stops the emulator too"
    stderr.until(r"sandbox stopped", timeout=5)


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_sigkill_of_the_sandbox_leaves_no_emulator_behind(
    sandbox_process: tuple[subprocess.Popen[str], _Lines, _Lines],
) -> None:
    process, stdout, stderr = sandbox_process
    pid, started, _, workdir = _emulator_of(stdout, stderr)

    process.kill()
    process.wait(timeout=5)
    try:
        assert _wait_gone(pid, started, timeout=10), "the emulator dies with its parent"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # nobody was left to clean it up


AWS_CLI_V1 = REPO / ".venv-emulator" / "bin" / "aws"


def _printed_commands(stderr: _Lines) -> list[str]:
    """The shell lines the sandbox's hint tells a human to run, in the order printed."""
    seen, _ = stderr.until(r"stepfunctions start-execution", timeout=10)
    commands = [m[1] for line in seen if (m := re.match(r"^# in another shell: (.+)$", line))]
    commands += [m[1] for line in seen if (m := re.match(r"^#\s+(aws .+)$", line))]
    return commands


@pytest.mark.integration
@pytest.mark.timeout(90)
@pytest.mark.parametrize("region", ["us-east-1", "eu-west-1"])
def test_the_printed_commands_work_with_the_real_aws_cli_v1(region: str, tmp_path: Path) -> None:
    """The AWS CLI v1 sends `aws sqs` to queue.amazonaws.com (us-east-1) or
    <region>.queue.amazonaws.com despite AWS_ENDPOINT_URL: what the sandbox prints must work
    anyway, in a second shell that loads the settings the way the hint says. (About 6 s.)"""
    assert AWS_CLI_V1.is_file(), f"{AWS_CLI_V1} is missing: `make test` installs it"
    version = subprocess.run(
        [str(AWS_CLI_V1), "--version"], capture_output=True, text=True, check=True, timeout=30
    )
    assert (version.stdout + version.stderr).startswith("aws-cli/1."), version
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "devtools",
            "sandbox",
            "--port",
            str(free_port()),
            "--region",
            region,
            "--prefix",
            "cli",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    stdout, stderr = _Lines(process.stdout), _Lines(process.stderr)
    try:
        _, _, env, _ = _emulator_of(stdout, stderr)
        assert env["AWS_DEFAULT_REGION"] == region
        assert f":states:{region}:" in env["DISPATCHER_STATE_MACHINE_ARN"]
        commands = _printed_commands(stderr)
        assert len(commands) == 4, commands
        assert f"--region {region}" in commands[0] or region == "us-east-1"
        # A second shell: no settings but what the printed `eval` line loads, no user config.
        bin_dirs = [str(AWS_CLI_V1.parent), str(Path(sys.executable).parent), "/usr/bin", "/bin"]
        shell_env = {
            "PATH": os.pathsep.join(bin_dirs),
            "HOME": str(tmp_path),
            "AWS_CONFIG_FILE": str(tmp_path / "config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials"),
            "AWS_MAX_ATTEMPTS": "1",
        }
        # One shell, as a human would: load the settings once, then each command.
        marker = "--- next ---"
        script = f"set -e; {commands[0]}; " + f"; echo '{marker}'; ".join(commands[1:])
        done = subprocess.run(
            ["bash", "-c", script],
            env=shell_env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, f"{script}\n{done.stderr[-2000:]}"
        outputs = [json.loads(part) for part in done.stdout.split(marker)]
        sent, listed, started = outputs
        assert listed == {"executions": []}, "nothing runs the requests yet"
        assert ":execution:cli-parent:" in started["executionArn"]
        assert f":states:{region}:" in started["executionArn"]

        async def check() -> None:
            session = aioboto3.Session(region_name=region, **TEST_CREDENTIALS)
            endpoint = env["AWS_ENDPOINT_URL"]
            async with session.client("sqs", endpoint_url=endpoint) as sqs:
                got = await sqs.receive_message(
                    QueueUrl=env["DISPATCHER_REQUEST_QUEUE_URL"], MaxNumberOfMessages=10
                )
            ids = {m["MessageId"] for m in got.get("Messages", [])}
            assert sent["MessageId"] in ids, "the CLI's message reached the sandbox's queue"
            async with session.client("stepfunctions", endpoint_url=endpoint) as sfn:
                described = await sfn.describe_execution(executionArn=started["executionArn"])
            assert described["stateMachineArn"] == env["SFN_DISPATCHER_PARENT_ARN"]

        anyio.run(check)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        stdout.close()
        stderr.close()


def test_every_printed_aws_command_names_the_endpoint() -> None:
    """The AWS CLI v1 ignores AWS_ENDPOINT_URL for `aws sqs`: only --endpoint-url works."""
    from devtools.sandbox.cli import LIST_EXAMPLE, PARENT_EXAMPLE, SEND_EXAMPLE  # noqa: PLC0415

    for command in (SEND_EXAMPLE, LIST_EXAMPLE, PARENT_EXAMPLE):
        assert shlex.split(command)[:3] == ["aws", "--endpoint-url", "$AWS_ENDPOINT_URL"]


def test_a_bad_region_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sandbox", "--region", "Mars"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "python -m devtools sandbox: error: --region 'Mars' is invalid: give a region name such as "
        "us-east-1 or eu-west-1"
    )


# --- provisioning ---------------------------------------------------------------------------


async def _counts(resources: SandboxResources) -> tuple[int, int, int]:
    """(queues with the prefix, targets of the rule, state machines: the child, the parent)."""
    async with (
        sqs_client(resources.endpoint) as sqs,
        events_client(resources.endpoint) as events,
        sfn_client(resources.endpoint) as sfn,
    ):
        queues = (await sqs.list_queues(QueueNamePrefix=resources.prefix)).get("QueueUrls", [])
        targets = (await events.list_targets_by_rule(Rule=resources.rule_name))["Targets"]
        machines = [
            machine
            async for page in sfn.get_paginator("list_state_machines").paginate()
            for machine in page["stateMachines"]
            if machine["name"] in (resources.prefix, f"{resources.prefix}-parent")
        ]
    return len(queues), len(targets), len(machines)


async def test_provisioning_twice_creates_nothing_new(sandbox: SandboxResources) -> None:
    again = await provision(sandbox.endpoint, prefix=sandbox.prefix)
    assert again == sandbox
    assert await _counts(again) == (3, 1, 2)
    assert again.parent_state_machine_arn.endswith(f":stateMachine:{sandbox.prefix}-parent")
    assert again.raw_events_queue_url is None
    assert again.dead_letter_queue_url.endswith(f"/{sandbox.prefix}-requests-dlq")


async def test_the_dead_letter_queue_takes_any_request_with_its_reason(
    sandbox: SandboxResources,
) -> None:
    sizes: list[int] = []
    async with sqs_client(sandbox.endpoint) as sqs:
        for url in (sandbox.dead_letter_queue_url, sandbox.request_queue_url):
            got = await sqs.get_queue_attributes(
                QueueUrl=url, AttributeNames=["MaximumMessageSize"]
            )
            sizes.append(int(got["Attributes"]["MaximumMessageSize"]))
    dead, requests = sizes
    assert dead == 1_048_576  # the SQS maximum
    assert dead >= requests


async def test_provisioning_updates_settings_in_place(
    sandbox_factory: SandboxFactory, emulator: str
) -> None:
    prefix = unique_prefix()
    # A machine of that name with another definition exists already: it is updated.
    async with sfn_client(emulator) as sfn:
        stale = {"StartAt": "P", "States": {"P": {"Type": "Pass", "End": True}}}
        created = await sfn.create_state_machine(
            name=prefix,
            definition=json.dumps(stale),
            roleArn="arn:aws:iam::000000000000:role/other",
        )
    first = await sandbox_factory(prefix=prefix, limit=3, max_receive_count=2)
    assert first.state_machine_arn == created["stateMachineArn"]
    second = await sandbox_factory(prefix=prefix, limit=7, max_receive_count=4, raw_events=True)
    assert second.state_machine_arn == first.state_machine_arn
    assert second.request_queue_url == first.request_queue_url
    assert second.raw_events_queue_url is not None
    assert await _counts(second) == (4, 1, 2)

    async with (
        sfn_client(emulator) as sfn,
        sqs_client(emulator) as sqs,
        events_client(emulator) as events,
        ssm_client(emulator) as ssm,
    ):
        machine = await sfn.describe_state_machine(stateMachineArn=second.state_machine_arn)
        assert json.loads(machine["definition"]) == demo_definition()
        assert machine["roleArn"] == f"arn:aws:iam::000000000000:role/{prefix}"
        parent = await sfn.describe_state_machine(stateMachineArn=second.parent_state_machine_arn)
        assert json.loads(parent["definition"]) == parent_definition(second.request_queue_url)
        assert parent["type"] == "STANDARD"
        attributes = (
            await sqs.get_queue_attributes(
                QueueUrl=second.request_queue_url, AttributeNames=["All"]
            )
        )["Attributes"]
        redrive = json.loads(attributes["RedrivePolicy"])
        assert int(redrive["maxReceiveCount"]) == 4
        assert redrive["deadLetterTargetArn"].endswith(f":{prefix}-requests-dlq")
        assert attributes["VisibilityTimeout"] == "60"
        (target,) = (await events.list_targets_by_rule(Rule=second.rule_name))["Targets"]
        assert target["Arn"].endswith(f":{prefix}-events-raw"), "raw events: the rule moved"
        rule = await events.describe_rule(Name=second.rule_name)
        assert json.loads(rule["EventPattern"]) == {
            "source": ["aws.states"],
            "detail-type": ["Step Functions Execution Status Change"],
            "detail": {"stateMachineArn": [second.state_machine_arn]},
        }
        parameter = await ssm.get_parameter(Name=f"/{prefix}/limit")
        assert parameter["Parameter"]["Value"] == "7"
    assert second.env()["DISPATCHER_LIMIT"] == "7"
    assert second.env()["SFN_DISPATCHER_PARENT_ARN"] == second.parent_state_machine_arn


async def test_bad_prefix_is_a_user_error(emulator: str) -> None:
    with pytest.raises(UserError, match="prefix 'no spaces' is invalid"):
        await provision(emulator, prefix="no spaces")


# --- the demo machine and its events --------------------------------------------------------


async def test_demo_machine_status_events_reach_the_events_queue(
    sandbox: SandboxResources,
) -> None:
    async with sfn_client(sandbox.endpoint) as sfn:
        waits = await sfn.start_execution(
            stateMachineArn=sandbox.state_machine_arn, input=json.dumps({"seconds": 1})
        )
        fails = await sfn.start_execution(
            stateMachineArn=sandbox.state_machine_arn, input=json.dumps({"fail": True})
        )
    messages = await receive_all(sandbox.endpoint, sandbox.events_queue_url, count=4, timeout=15)
    events = [json.loads(m["Body"]) for m in messages]
    statuses = {(e["detail"]["executionArn"], e["detail"]["status"]) for e in events}
    assert statuses == {
        (waits["executionArn"], "RUNNING"),
        (waits["executionArn"], "SUCCEEDED"),
        (fails["executionArn"], "RUNNING"),
        (fails["executionArn"], "FAILED"),
    }
    for event in events:
        assert {"version", "id", "detail-type", "source", "account", "time", "region"} <= set(event)
        assert event["detail-type"] == "Step Functions Execution Status Change"
        assert event["source"] == "aws.states"
        assert event["account"] == "000000000000"
        assert event["region"] == "us-east-1"
        assert event["resources"] == [event["detail"]["executionArn"]]
        detail = event["detail"]
        assert detail["stateMachineArn"] == sandbox.state_machine_arn
        assert {"executionArn", "name", "status", "startDate", "stopDate", "input"} <= set(detail)
    succeeded = next(e["detail"] for e in events if e["detail"]["status"] == "SUCCEEDED")
    assert succeeded["stopDate"] - succeeded["startDate"] >= 1000, "the Wait state waited"


async def test_input_without_seconds_succeeds_at_once(sandbox: SandboxResources) -> None:
    async with sfn_client(sandbox.endpoint) as sfn:
        started = await sfn.start_execution(stateMachineArn=sandbox.state_machine_arn, input="{}")
    messages = await receive_all(sandbox.endpoint, sandbox.events_queue_url, count=2)
    statuses = [json.loads(m["Body"])["detail"]["status"] for m in messages]
    assert sorted(statuses) == ["RUNNING", "SUCCEEDED"]
    async with sfn_client(sandbox.endpoint) as sfn:
        described = await sfn.describe_execution(executionArn=started["executionArn"])
    assert described["status"] == "SUCCEEDED"


# --- the parent workflow: children requested with task tokens --------------------------------


def test_the_parent_sends_each_item_with_its_token_and_key() -> None:
    queue = "https://sqs.us-east-1.amazonaws.com/123456789012/orders-requests"
    definition = parent_definition(queue)
    children = definition["States"]["Children"]
    assert children["Type"] == "Map"
    assert (children["ItemsPath"], children["ResultPath"]) == ("$.items", "$.results")
    assert children["MaxConcurrency"] == 0, "every child requested at once: the dispatcher limits"
    steps = children["ItemProcessor"]["States"]
    task = steps["RunChild"]
    assert task["Resource"] == "arn:aws:states:::sqs:sendMessage.waitForTaskToken"
    parameters = task["Parameters"]
    assert (parameters["QueueUrl"], parameters["MessageBody.$"]) == (queue, "$")
    assert parameters["MessageAttributes"] == {
        "task-token": {"DataType": "String", "StringValue.$": "$$.Task.Token"},
        "idempotency-key": {
            "DataType": "String",
            "StringValue.$": "States.Format('{}-{}', States.Hash($$.Execution.Id, 'SHA-1'), "
            "$$.Map.Item.Index)",
        },
        "parent-execution": {"DataType": "String", "StringValue.$": "$$.Execution.Id"},
    }
    assert task["TimeoutSeconds"] == 3600, "the whole wait is bounded"
    [catch] = task["Catch"]
    assert catch["ErrorEquals"] == ["States.ALL"]
    assert steps[catch["Next"]] == {"Type": "Pass", "End": True}


@pytest.mark.parametrize(
    ("document", "heading"),
    [("docs/task-tokens.md", "## The parent")],
)
def test_the_documented_parent_is_the_sandboxs(document: str, heading: str) -> None:
    """The copy-pasteable parent in the docs is exactly the one the sandbox provisions."""
    text = (REPO / document).read_text()
    if heading not in text:
        pytest.skip(f"{document} has no section {heading!r} yet")
    shown = json.loads(text.split(heading, 1)[1].split("```json\n", 1)[1].split("```", 1)[0])
    queue = shown["States"]["Children"]["ItemProcessor"]["States"]["RunChild"]["Parameters"]
    assert shown == parent_definition(queue["QueueUrl"])


async def _closed(sfn: SFNClient, arn: str) -> DescribeExecutionOutputTypeDef:
    """DescribeExecution once the execution has ended."""
    described: list[DescribeExecutionOutputTypeDef] = []

    async def ended() -> bool:
        described.append(await sfn.describe_execution(executionArn=arn))
        return described[-1]["status"] != "RUNNING"

    await wait_until(ended, within=15, message=f"{arn} ended")
    return described[-1]


@pytest.mark.timeout(60)
async def test_the_parent_waits_for_children_answered_through_their_tokens(
    sandbox: SandboxResources,
) -> None:
    """No dispatcher: this test plays its part, straight from the requests queue, to show the
    sandbox's parent works on the emulator on its own."""
    name = "parent-run-1"
    items = [{"seconds": 1}, {"fail": True}, {"seconds": 2}]
    async with sfn_client(sandbox.endpoint) as sfn:
        started = await sfn.start_execution(
            stateMachineArn=sandbox.parent_state_machine_arn,
            name=name,
            input=json.dumps({"items": items}),
        )
        messages = await receive_all(
            sandbox.endpoint, sandbox.request_queue_url, count=3, timeout=15
        )
        by_key = {m["MessageAttributes"]["idempotency-key"]["StringValue"]: m for m in messages}
        keys = [child_key(started["executionArn"], index) for index in range(3)]
        assert sorted(by_key) == sorted(keys), "the emulator's States.Hash is hashlib's SHA-1"
        tokens = []
        for index, item in enumerate(items):
            message = by_key[keys[index]]
            assert json.loads(message["Body"]) == item, "the item is the child's input"
            attribute = message["MessageAttributes"]["task-token"]
            assert attribute["DataType"] == "String"
            assert attribute["StringValue"]
            tokens.append(attribute["StringValue"])
        assert len(set(tokens)) == 3

        # Answered out of order; the results still come in item order.
        for token in tokens:
            await sfn.send_task_heartbeat(taskToken=token)
        await sfn.send_task_success(taskToken=tokens[2], output=json.dumps({"child": 2}))
        await sfn.send_task_success(taskToken=tokens[0], output=json.dumps({"child": 0}))
        running = await sfn.describe_execution(executionArn=started["executionArn"])
        assert running["status"] == "RUNNING", "one child is still unanswered"
        await sfn.send_task_failure(
            taskToken=tokens[1], error="DemoFailure", cause="the input asked to fail"
        )
        ended = await _closed(sfn, started["executionArn"])
        assert ended["status"] == "SUCCEEDED", "the failed child was caught by its parent"
        assert json.loads(ended["output"]) == {
            "items": items,
            "results": [
                {"child": 0},
                {
                    "fail": True,
                    "error": {"Error": "DemoFailure", "Cause": "the input asked to fail"},
                },
                {"child": 2},
            ],
        }
        with pytest.raises(ClientError) as again:
            await sfn.send_task_success(taskToken=tokens[0], output="{}")
        assert again.value.response["Error"]["Code"] == "TaskDoesNotExist"


# --- the command with --endpoint ------------------------------------------------------------


async def test_endpoint_mode_prints_json_and_writes_env_file(
    emulator: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = unique_prefix()
    env_file = tmp_path / "sandbox.env"
    env_file.write_text("old\n")
    env_file.chmod(0o644)
    argv = ["sandbox", "--endpoint", emulator, "--prefix", prefix, "--limit", "4", "--json"]
    code = await anyio.to_thread.run_sync(main, [*argv, "--env-file", str(env_file)])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == ENV_KEYS
    assert printed["AWS_ENDPOINT_URL"] == emulator
    assert printed["DISPATCHER_LIMIT"] == "4"
    assert printed["DISPATCHER_LIMIT_PARAMETER"] == f"/{prefix}/limit"
    assert printed["DISPATCHER_REQUEST_QUEUE_URL"].endswith(f"/{prefix}-requests")
    assert env_file.stat().st_mode & 0o777 == 0o600
    lines = env_file.read_text().splitlines()
    assert dict(line.split("=", 1) for line in lines) == printed

    # The same again: same output (idempotent), now as export lines.
    code = await anyio.to_thread.run_sync(main, argv[:-1])
    assert code == 0
    exports = capsys.readouterr().out.splitlines()
    assert exports == [f"export {k}={v}" for k, v in printed.items()]
    await delete_sandbox(await provision(emulator, prefix=prefix, limit=4))


def test_endpoint_that_never_answers_is_one_line_exit_3(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["sandbox", "--endpoint", url, "--wait", "0.3"]) == EXIT_AWS
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("python -m devtools sandbox: error: no AWS emulator answers at")


def test_sandbox_port_in_use_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["sandbox", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"python -m devtools sandbox: error: port {port} is in use on 127.0.0.1; "
        "pass --port N or stop what listens there"
    )
