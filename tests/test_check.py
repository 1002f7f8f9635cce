"""``sfn-dispatcher check``: green on a fresh sandbox, red with the fix on a broken one.

The pure parts (pattern matching, queue policies, settings, rendering) are tested on their
own; everything else runs against the emulator with real clients.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any, cast

import anyio
import pytest
from botocore.exceptions import ClientError

from devtools.sandbox import SandboxResources, free_port
from dispatcher.cli.main import main
from dispatcher.preflight import (
    ALL_STATUSES,
    CHECKS,
    Check,
    Clients,
    Context,
    Report,
    Result,
    Scope,
    Skip,
    Status,
    UnsupportedPatternError,
    check_lease_table,
    check_named_limit_parameter,
    check_policy,
    check_rule,
    check_stop_executions,
    check_task_tokens,
    load_target,
    matches,
    mismatch,
    policy_allows,
    render,
    run_checks,
    run_one,
    sample_event,
    status_pattern,
)
from tests.conftest import SandboxFactory
from tests.helpers import (
    create_lease_table,
    events_client,
    session,
    sfn_client,
    sqs_client,
    ssm_client,
)

pytestmark = pytest.mark.timeout(60)

ARN = "arn:aws:states:us-east-1:123456789012:stateMachine:orders"
QUEUE = "arn:aws:sqs:us-east-1:123456789012:orders-events"
RULE = "arn:aws:events:us-east-1:123456789012:rule/orders-status"
VALID_ENV = {
    "DISPATCHER_STATE_MACHINE_ARN": ARN,
    "DISPATCHER_REQUEST_QUEUE_URL": "https://sqs.us-east-1.amazonaws.com/123456789012/orders",
    "DISPATCHER_EVENTS_QUEUE_URL": "https://sqs.us-east-1.amazonaws.com/123456789012/orders-ev",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def by_id(report: Report) -> dict[str, Result]:
    """The results keyed by check id."""
    return {r.id: r for r in report.results}


def statuses(report: Report) -> dict[str, Status]:
    """Each check's status, keyed by id."""
    return {r.id: r.status for r in report.results}


def env_of(sandbox: SandboxResources, **extra: str) -> dict[str, str]:
    """The sandbox's variables without AWS_ENDPOINT_URL (tests pass the endpoint explicitly)."""
    env = {k: v for k, v in sandbox.env().items() if k != "AWS_ENDPOINT_URL"}
    return env | extra


# --- event patterns --------------------------------------------------------------------------


def test_the_needed_pattern_matches_every_status_of_the_machine_only() -> None:
    pattern = status_pattern(ARN)
    assert all(matches(pattern, sample_event(ARN, s)) for s in ALL_STATUSES)
    other = ARN.replace("orders", "billing")
    assert not matches(pattern, sample_event(other, "SUCCEEDED"))
    assert mismatch(pattern, sample_event(other, "SUCCEEDED")) == ["detail.stateMachineArn"]


@pytest.mark.parametrize(
    ("pattern", "matched"),
    [
        ({"detail": {"status": [{"anything-but": "RUNNING"}]}}, set(ALL_STATUSES) - {"RUNNING"}),
        ({"detail": {"status": ["FAILED", "TIMED_OUT"]}}, {"FAILED", "TIMED_OUT"}),
        ({"detail": {"stateMachineArn": [{"prefix": ARN[:-3]}]}}, set(ALL_STATUSES)),
        ({"detail": {"stateMachineArn": [{"wildcard": "*:orders"}]}}, set(ALL_STATUSES)),
        ({"detail": {"status": [{"equals-ignore-case": "aborted"}]}}, {"ABORTED"}),
        ({"detail": {"redriveCount": [{"exists": False}]}}, set(ALL_STATUSES)),
        ({"detail": {"redriveCount": [{"exists": True}]}}, set()),
        ({"resources": [{"suffix": ":check"}]}, set(ALL_STATUSES)),
        ({"$or": [{"source": ["aws.batch"]}, {"detail": {"status": ["RUNNING"]}}]}, {"RUNNING"}),
        ({"source": ["aws.batch"]}, set()),
    ],
)
def test_pattern_operators(pattern: dict[str, Any], matched: set[str]) -> None:
    assert {s for s in ALL_STATUSES if matches(pattern, sample_event(ARN, s))} == matched


def test_an_operator_it_cannot_evaluate_is_said_so_not_guessed() -> None:
    with pytest.raises(UnsupportedPatternError, match="cidr"):
        matches({"detail": {"name": [{"cidr": "10.0.0.0/24"}]}}, sample_event(ARN, "FAILED"))
    # On a missing field no operator but "exists" can match: no need to understand it.
    assert not matches({"detail": {"x": [{"numeric": [">", 0]}]}}, sample_event(ARN, "FAILED"))


# --- queue policies --------------------------------------------------------------------------


def allow(**condition: Any) -> dict[str, Any]:
    """An Allow statement for EventBridge with an optional condition block."""
    statement: dict[str, Any] = {
        "Effect": "Allow",
        "Principal": {"Service": "events.amazonaws.com"},
        "Action": "sqs:SendMessage",
        "Resource": QUEUE,
    }
    if condition:
        statement["Condition"] = condition
    return statement


@pytest.mark.parametrize(
    ("statements", "verdict"),
    [
        ([allow(ArnEquals={"aws:SourceArn": RULE})], True),
        ([allow(ArnEquals={"aws:SourceArn": RULE + "-other"})], False),
        ([allow(ArnLike={"aws:SourceArn": "arn:aws:events:*:123456789012:rule/*"})], True),
        ([allow(StringEquals={"aws:SourceAccount": "123456789012"})], True),
        ([allow()], True),
        ([{**allow(), "Principal": "*", "Action": "sqs:*"}], True),
        ([{**allow(), "Principal": {"AWS": "arn:aws:iam::123456789012:root"}}], False),
        ([{**allow(), "Action": "sqs:ReceiveMessage"}], False),
        ([{**allow(), "Resource": QUEUE + "-other"}], False),
        ([allow(IpAddress={"aws:SourceIp": "10.0.0.0/8"})], None),
        ([allow(StringEquals={"aws:SourceVpce": "vpce-1"})], None),
        # The CloudFormation template's pair: allow the rule, deny everyone else.
        (
            [
                allow(ArnEquals={"aws:SourceArn": RULE}),
                {**allow(ArnNotEquals={"aws:SourceArn": RULE}), "Effect": "Deny", "Principal": "*"},
            ],
            True,
        ),
        ([allow(), {**allow(), "Effect": "Deny"}], False),
        ([allow(), {**allow(), "Effect": "Deny", "NotPrincipal": {"AWS": "x"}}], None),
        ([], False),
    ],
)
def test_queue_policy_verdicts(statements: list[dict[str, Any]], verdict: bool | None) -> None:
    document = {"Version": "2012-10-17", "Statement": statements}
    assert policy_allows(document, QUEUE, RULE) is verdict


# --- settings and rendering ------------------------------------------------------------------


def test_a_bad_setting_fails_its_line_and_keeps_the_valid_ones() -> None:
    target, (finding,) = load_target({}, {**VALID_ENV, "DISPATCHER_LIMIT": "-1"})
    assert finding.status is Status.FAIL
    assert "DISPATCHER_LIMIT='-1' is invalid" in finding.detail
    assert target.get("state_machine_arn") == ARN
    assert target.get("limit") is None
    assert target.invalid == {"limit"}
    assert target.get("visibility_timeout") == 60  # defaults still apply
    assert target.region == "us-east-1"


def test_a_removed_setting_is_a_warn_line_valid_or_not_the_rest() -> None:
    env = {**VALID_ENV, "DISPATCHER_START_CLIENT": "thin"}
    _, (ok, warn) = load_target({}, env)
    assert (ok.status, warn.status) == (Status.OK, Status.WARN)
    assert warn.detail.startswith("DISPATCHER_START_CLIENT is no longer a setting and is ignored")
    target, (finding,) = load_target({}, {**env, "DISPATCHER_LIMIT": "-1"})
    assert finding.status is Status.FAIL, "only the invalid setting: no traceback, no error"
    assert target.invalid == {"limit"}


def test_flags_win_over_variables_and_extras_come_from_the_environment() -> None:
    env = {**VALID_ENV, "DISPATCHER_LEASE_TABLE": "leases", "DISPATCHER_LIMIT_PARAMETER": "/l"}
    env.pop("AWS_DEFAULT_REGION")
    target, (finding,) = load_target({"limit": "3"}, env)
    assert finding.status is Status.OK
    assert target.get("limit") == 3
    assert (target.lease_table, target.limit_parameter) == ("leases", "/l")
    assert target.region == "us-east-1"  # from the state machine's ARN


def test_the_table_shows_each_fix_under_its_line_and_json_round_trips() -> None:
    report = Report(
        "subject",
        (
            Result("a", "first check", Status.OK, "fine"),
            Result("b", "second", Status.FAIL, "broken", "aws one\naws two"),
            Result("c", "third", Status.SKIP, "needs b"),
        ),
    )
    lines = render(report).splitlines()
    assert lines[2].split() == ["OK", "first", "check", "fine"]
    assert lines[3].startswith("FAIL  second ")
    assert lines[4].strip() == "fix: aws one"
    assert lines[5].strip() == "aws two"
    assert lines[4].index("fix:") == lines[3].index("broken")
    assert lines[-1] == "1 OK, 1 FAIL, 1 SKIP: not ready: fix the FAIL lines and run check again"
    document = json.loads(json.dumps(report.to_json()))
    assert document["ok"] is False
    assert [c["status"] for c in document["checks"]] == ["OK", "FAIL", "SKIP"]


async def test_an_unreachable_endpoint_fails_once_and_skips_the_rest() -> None:
    report = await run_checks(env=VALID_ENV, endpoint_url=f"http://127.0.0.1:{free_port()}")
    got = statuses(report)
    assert got.pop("settings") is Status.OK
    assert got.pop("endpoint") is Status.FAIL
    assert set(got.values()) == {Status.SKIP}
    assert "AWS_ENDPOINT_URL" in by_id(report)["endpoint"].fix
    assert not report.ok


# --- against the emulator --------------------------------------------------------------------


@pytest.fixture
async def lease_table(emulator: str, sandbox: SandboxResources) -> AsyncIterator[str]:
    """A lease table keyed by ``pool`` in the emulator, deleted afterwards."""
    name = await create_lease_table(emulator, f"{sandbox.prefix}-lease")
    yield name
    async with session().client("dynamodb", endpoint_url=emulator) as dynamodb:
        await dynamodb.delete_table(TableName=name)


async def test_a_fresh_sandbox_is_all_green(sandbox: SandboxResources, lease_table: str) -> None:
    env = env_of(
        sandbox,
        DISPATCHER_LIMIT_PARAMETER=sandbox.limit_parameter,
        DISPATCHER_LEASE_TABLE=lease_table,
        DISPATCHER_STOP_ORPHANED_CHILDREN="true",
    )
    async with sqs_client(sandbox.endpoint) as sqs:
        await sqs.send_message(QueueUrl=sandbox.request_queue_url, MessageBody="{}")
    report = await run_checks(env=env, endpoint_url=sandbox.endpoint)
    assert statuses(report) == {r.id: Status.OK for r in report.results}, render(report)
    assert len(report.results) == 17
    assert report.ok
    found = by_id(report)
    assert found["request_queue"].detail.endswith("-requests (1 waiting)")
    assert found["dead_letter_size"].detail == (
        f"{sandbox.prefix}-requests-dlq 1048576 bytes >= {sandbox.prefix}-requests 1048576 bytes"
    )
    assert found["events_rule"].detail.startswith(f"{sandbox.rule_name} (ENABLED)")
    assert found["limit_parameter"].detail == f"{sandbox.limit_parameter} = {sandbox.limit}"
    assert found["task_tokens"].detail == (
        "SendTaskSuccess, SendTaskFailure, SendTaskHeartbeat permitted (a made-up token: "
        "TaskDoesNotExist)"
    )
    assert found["stop_executions"].detail == f"permitted on the executions of {sandbox.prefix}"
    # Harmless: the request is still there, visible, and nothing was started.
    async with sqs_client(sandbox.endpoint) as sqs, sfn_client(sandbox.endpoint) as sfn:
        attributes = await sqs.get_queue_attributes(
            QueueUrl=sandbox.request_queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )
        executions = await sfn.list_executions(stateMachineArn=sandbox.state_machine_arn)
    assert attributes["Attributes"] == {
        "ApproximateNumberOfMessages": "1",
        "ApproximateNumberOfMessagesNotVisible": "0",
    }
    assert executions["executions"] == []


async def test_without_the_optional_settings_those_checks_are_skipped(
    sandbox: SandboxResources,
) -> None:
    report = await run_checks(env=env_of(sandbox), endpoint_url=sandbox.endpoint)
    got = statuses(report)
    assert (got.pop("limit_parameter"), got.pop("lease_table")) == (Status.SKIP, Status.SKIP)
    assert got.pop("stop_executions") is Status.SKIP  # DISPATCHER_STOP_ORPHANED_CHILDREN false
    assert "runs to its end" in by_id(report)["stop_executions"].detail
    assert set(got.values()) == {Status.OK}
    assert report.ok


async def delete_rule(sandbox: SandboxResources) -> None:
    """Remove the sandbox's rule the way AWS requires: targets first."""
    async with events_client(sandbox.endpoint) as events:
        targets = await events.list_targets_by_rule(Rule=sandbox.rule_name)
        ids = [t["Id"] for t in targets["Targets"]]
        await events.remove_targets(Rule=sandbox.rule_name, Ids=ids)
        await events.delete_rule(Name=sandbox.rule_name)


async def test_a_missing_rule_fails_with_the_commands_that_create_it(
    sandbox: SandboxResources,
) -> None:
    await delete_rule(sandbox)
    report = await run_checks(env=env_of(sandbox), endpoint_url=sandbox.endpoint)
    rule = by_id(report)["events_rule"]
    assert rule.status is Status.FAIL
    assert "no EventBridge rule" in rule.detail
    put_rule, put_targets, _ = rule.fix.splitlines()
    assert put_rule.startswith("aws events put-rule --name ")
    pattern = json.loads(put_rule.split("--event-pattern ")[1].split("'")[1])
    assert pattern == status_pattern(sandbox.state_machine_arn)
    assert put_targets.startswith("aws events put-targets --rule ")
    assert f"Arn=arn:aws:sqs:us-east-1:000000000000:{sandbox.prefix}-events" in put_targets
    assert f"--endpoint-url {sandbox.endpoint}" in put_rule
    assert by_id(report)["events_queue_policy"].status is Status.SKIP
    assert not report.ok


async def test_a_missing_request_queue_names_its_variable(sandbox: SandboxResources) -> None:
    async with sqs_client(sandbox.endpoint) as sqs:
        await sqs.delete_queue(QueueUrl=sandbox.request_queue_url)
    report = await run_checks(env=env_of(sandbox), endpoint_url=sandbox.endpoint)
    queue = by_id(report)["request_queue"]
    assert queue.status is Status.FAIL
    assert queue.detail.startswith("DISPATCHER_REQUEST_QUEUE_URL: ")
    assert f"check DISPATCHER_REQUEST_QUEUE_URL={sandbox.request_queue_url}" in queue.fix
    assert f"aws sqs create-queue --queue-name {sandbox.prefix}-requests" in queue.fix
    got = statuses(report)
    needs_it = (got.pop("redrive"), got.pop("visibility_timeout"), got.pop("dead_letter_size"))
    assert needs_it == (Status.SKIP, Status.SKIP, Status.SKIP)
    assert got.pop("request_queue") is Status.FAIL
    optional = (got.pop("limit_parameter"), got.pop("lease_table"), got.pop("stop_executions"))
    assert optional == (Status.SKIP, Status.SKIP, Status.SKIP)
    assert set(got.values()) == {Status.OK}  # everything else is still checked


async def test_an_express_machine_fails_and_says_why(sandbox: SandboxResources) -> None:
    async with sfn_client(sandbox.endpoint) as sfn:
        created = await sfn.create_state_machine(
            name=f"{sandbox.prefix}-express",
            definition=json.dumps({"StartAt": "A", "States": {"A": {"Type": "Pass", "End": True}}}),
            roleArn="arn:aws:iam::000000000000:role/express",
            type="EXPRESS",
        )
        try:
            env = env_of(sandbox, DISPATCHER_STATE_MACHINE_ARN=created["stateMachineArn"])
            report = await run_checks(env=env, endpoint_url=sandbox.endpoint)
        finally:
            await sfn.delete_state_machine(stateMachineArn=created["stateMachineArn"])
    kind = by_id(report)["state_machine_type"]
    assert kind.status is Status.FAIL
    assert "is EXPRESS" in kind.detail
    assert "no idempotent names" in kind.detail
    assert "STANDARD" in kind.fix
    assert by_id(report)["state_machine"].status is Status.OK


async def test_a_bad_setting_is_a_fail_line_and_the_rest_still_runs(
    sandbox: SandboxResources,
) -> None:
    env = env_of(sandbox, DISPATCHER_LIMIT="-1")
    report = await run_checks(env=env, endpoint_url=sandbox.endpoint)
    got = statuses(report)
    assert got.pop("settings") is Status.FAIL
    assert "DISPATCHER_LIMIT='-1' is invalid" in by_id(report)["settings"].detail
    optional = (got.pop("limit_parameter"), got.pop("lease_table"), got.pop("stop_executions"))
    assert optional == (Status.SKIP, Status.SKIP, Status.SKIP)
    assert set(got.values()) == {Status.OK}
    assert not report.ok


async def test_a_disabled_or_narrowed_rule(sandbox: SandboxResources) -> None:
    async with events_client(sandbox.endpoint) as events:
        await events.disable_rule(Name=sandbox.rule_name)
        report = await run_checks(env=env_of(sandbox), endpoint_url=sandbox.endpoint)
        rule = by_id(report)["events_rule"]
        assert (rule.status, rule.detail) == (Status.FAIL, f"{sandbox.rule_name} is DISABLED")
        assert rule.fix.startswith(f"aws events enable-rule --name {sandbox.rule_name} ")

        # Only failures reach the queue: the other endings free their slots late. A warning.
        pattern = status_pattern(sandbox.state_machine_arn)
        pattern["detail"]["status"] = ["FAILED"]
        await events.put_rule(
            Name=sandbox.rule_name, EventPattern=json.dumps(pattern), State="ENABLED"
        )
        report = await run_checks(env=env_of(sandbox), endpoint_url=sandbox.endpoint)
    rule = by_id(report)["events_rule"]
    assert rule.status is Status.WARN
    assert "drops ABORTED, SUCCEEDED, TIMED_OUT events" in rule.detail
    assert report.ok


async def test_no_dead_letter_route_and_no_queue_policy_fail(sandbox: SandboxResources) -> None:
    async with sqs_client(sandbox.endpoint) as sqs:
        # An empty value removes the attribute.
        await sqs.set_queue_attributes(
            QueueUrl=sandbox.request_queue_url, Attributes={"RedrivePolicy": ""}
        )
        await sqs.set_queue_attributes(QueueUrl=sandbox.events_queue_url, Attributes={"Policy": ""})
    env = env_of(sandbox)
    del env["DISPATCHER_DEAD_LETTER_QUEUE_URL"]
    report = await run_checks(env=env, endpoint_url=sandbox.endpoint)
    redrive, policy = by_id(report)["redrive"], by_id(report)["events_queue_policy"]
    assert redrive.status is Status.FAIL
    assert "refuses to start" in redrive.detail
    assert "set DISPATCHER_DEAD_LETTER_QUEUE_URL, or" in redrive.fix
    assert (policy.status, policy.detail) == (
        Status.FAIL,
        "no queue policy: EventBridge may not send to it",
    )
    attributes = json.loads(policy.fix.split("--attributes ")[1].split("'")[1])
    statement = json.loads(attributes["Policy"])["Statement"][0]
    assert statement["Principal"] == {"Service": "events.amazonaws.com"}
    assert statement["Condition"]["ArnEquals"]["aws:SourceArn"].endswith(
        f"rule/{sandbox.rule_name}"
    )


async def test_a_dead_letter_queue_smaller_than_the_request_queue_fails(
    sandbox: SandboxResources,
) -> None:
    """Both routes are checked, on one line: the variable's queue, the redrive target."""
    prefix = sandbox.prefix
    async with sqs_client(sandbox.endpoint) as sqs:
        created = await sqs.create_queue(
            QueueName=f"{prefix}-small-dlq", Attributes={"MaximumMessageSize": "1024"}
        )
        small = created["QueueUrl"]
        env = env_of(sandbox, DISPATCHER_DEAD_LETTER_QUEUE_URL=small)
        report = await run_checks(env=env, endpoint_url=sandbox.endpoint)
        size = by_id(report)["dead_letter_size"]
        assert size.status is Status.FAIL
        assert size.detail.startswith(
            f"{prefix}-small-dlq takes at most 1024 bytes, {prefix}-requests 1048576 bytes: "
        )
        assert "cannot be dead-lettered with its reason" in size.detail
        assert size.fix == (
            f"aws sqs set-queue-attributes --queue-url {small} --attributes "
            f"MaximumMessageSize=1048576 --region us-east-1 --endpoint-url {sandbox.endpoint}"
        )
        assert not report.ok

        await sqs.set_queue_attributes(
            QueueUrl=sandbox.dead_letter_queue_url, Attributes={"MaximumMessageSize": "2048"}
        )
        report = await run_checks(env=env, endpoint_url=sandbox.endpoint)
    size = by_id(report)["dead_letter_size"]
    assert size.status is Status.FAIL
    assert size.detail.startswith(
        f"{prefix}-small-dlq takes at most 1024 bytes, {prefix}-requests 1048576 bytes; "
        f"{prefix}-requests-dlq takes at most 2048 bytes, {prefix}-requests 1048576 bytes: "
    )
    assert len(size.fix.splitlines()) == 2


async def test_a_bad_limit_parameter_and_a_wrong_lease_table(
    sandbox: SandboxResources, emulator: str
) -> None:
    async with ssm_client(emulator) as ssm:
        await ssm.put_parameter(
            Name=sandbox.limit_parameter, Value="ten", Type="String", Overwrite=True
        )
    table = f"{sandbox.prefix}-wrong"
    async with session().client("dynamodb", endpoint_url=emulator) as dynamodb:
        await dynamodb.create_table(
            TableName=table,
            AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
            KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
            BillingMode="PAY_PER_REQUEST",
        )
        try:
            env = env_of(
                sandbox,
                DISPATCHER_LIMIT_PARAMETER=sandbox.limit_parameter,
                DISPATCHER_LEASE_TABLE=table,
                DISPATCHER_LIMIT="0",
            )
            report = await run_checks(env=env, endpoint_url=emulator)
        finally:
            await dynamodb.delete_table(TableName=table)
    limit, lease = by_id(report)["limit_parameter"], by_id(report)["lease_table"]
    assert (limit.status, lease.status) == (Status.FAIL, Status.FAIL)
    assert "'ten', not a non-negative integer" in limit.detail
    assert f"aws ssm put-parameter --name {sandbox.limit_parameter} " in limit.fix
    assert "--value 0 --overwrite" in limit.fix  # the fix proposes the configured limit
    assert "partition key pool" in lease.detail
    assert "aws dynamodb create-table" in lease.fix


# --- the command -----------------------------------------------------------------------------


async def cli(*argv: str) -> int:
    """Run the command in a worker thread (it starts its own event loop)."""
    return await anyio.to_thread.run_sync(main, list(argv))


async def test_the_command_reads_the_environment_and_exits_by_result(
    sandbox: SandboxResources,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in sandbox.env().items():
        monkeypatch.setenv(name, value)
    assert await cli("check") == 0
    out = capsys.readouterr().out
    assert out.startswith(f"checking {sandbox.state_machine_arn} in us-east-1 at ")
    assert out.rstrip().endswith(": ready")
    assert "\x1b[" not in out  # no colour when not on a terminal

    assert await cli("check", "--json") == 0
    document = json.loads(capsys.readouterr().out)
    assert document["ok"] is True
    assert document["counts"]["FAIL"] == 0
    assert {c["id"] for c in document["checks"]} >= {"settings", "events_rule", "lease_table"}

    # A flag is a setting like any other: invalid is a FAIL line (exit 1), not a usage error.
    assert await cli("check", "--limit", "-1") == 1
    assert "FAIL  settings" in capsys.readouterr().out

    await delete_rule(sandbox)
    assert await cli("check", "--json") == 1
    document = json.loads(capsys.readouterr().out)
    failed = [c["id"] for c in document["checks"] if c["status"] == "FAIL"]
    assert failed == ["events_rule"]


def test_an_unknown_flag_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exited:
        main(["check", "--no-such-flag"])
    assert exited.value.code == 2


async def test_two_sandboxes_side_by_side_are_checked_apart(
    sandbox_factory: SandboxFactory,
) -> None:
    first, second = await sandbox_factory(), await sandbox_factory()
    report = await run_checks(env=env_of(first), endpoint_url=first.endpoint)
    assert by_id(report)["events_rule"].detail.startswith(f"{first.rule_name} ")
    assert second.rule_name not in render(report)


async def test_an_answer_of_an_unexpected_shape_is_a_fail_line_not_a_traceback(
    sandbox: SandboxResources,
) -> None:
    async with sqs_client(sandbox.endpoint) as sqs:
        await sqs.set_queue_attributes(
            QueueUrl=sandbox.events_queue_url,
            Attributes={"Policy": json.dumps({"Statement": ["not", "statements"]})},
        )
    report = await run_checks(env=env_of(sandbox), endpoint_url=sandbox.endpoint)
    policy = by_id(report)["events_queue_policy"]
    assert policy.status is Status.FAIL
    assert policy.detail.startswith("could not evaluate: AttributeError: ")
    assert by_id(report)["events_rule"].status is Status.OK  # the others still reported


# --- permissions the emulator does not enforce: hand-written fakes ----------------------------


def denied(operation: str) -> ClientError:
    """What AWS answers when the role lacks the permission."""
    message = f"not authorized to {operation}"
    return ClientError({"Error": {"Code": "AccessDeniedException", "Message": message}}, operation)


class FakeSQS:
    """Answers GetQueueAttributes for any queue with an ARN and nothing else."""

    async def get_queue_attributes(self, **_: Any) -> dict[str, Any]:
        return {"Attributes": {"QueueArn": QUEUE}}


class DeniedPages:
    """A paginator whose first page is refused."""

    def paginate(self, **_: Any) -> DeniedPages:
        return self

    def __aiter__(self) -> DeniedPages:
        return self

    async def __anext__(self) -> dict[str, Any]:
        raise denied("ListRuleNamesByTarget")


class DeniedEvents:
    """An EventBridge client for a role without events:List*."""

    def get_paginator(self, _: str) -> DeniedPages:
        return DeniedPages()


class DeniedDynamoDB:
    """A DynamoDB client for a role with item access only (the template's task role)."""

    async def describe_table(self, **_: Any) -> dict[str, Any]:
        raise denied("DescribeTable")


async def test_reads_the_dispatcher_never_makes_warn_when_denied() -> None:
    target, _ = load_target({}, {**VALID_ENV, "DISPATCHER_LEASE_TABLE": "leases"})
    clients = Clients(
        sqs=cast(Any, FakeSQS()),
        sfn=cast(Any, None),
        events=cast(Any, DeniedEvents()),
        ssm=None,
        dynamodb=cast(Any, DeniedDynamoDB()),
        credentials="container-role",
    )
    ctx = Context(target, clients, None)
    for check, reason in ((check_rule, "ListRuleNamesByTarget"), (check_lease_table, "Describe")):
        finding = await check(ctx)
        assert finding.status is Status.WARN
        assert reason in finding.detail
        assert finding.fix.startswith("the dispatcher itself does not need this permission")


class FakeSFN:
    """Step Functions for a role that may or may not make the callback and stop calls."""

    def __init__(self, denied: set[str], answer: str = "InvalidToken") -> None:
        self.denied = denied
        self.answer = answer  # the error code for the made-up token
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def _call(self, operation: str, code: str, **kwargs: Any) -> dict[str, Any]:
        self.calls.append((operation, kwargs))
        if operation in self.denied:
            raise denied(operation)
        raise ClientError({"Error": {"Code": code, "Message": "no such thing"}}, operation)

    async def send_task_success(self, **kwargs: Any) -> dict[str, Any]:
        return await self._call("SendTaskSuccess", self.answer, **kwargs)

    async def send_task_failure(self, **kwargs: Any) -> dict[str, Any]:
        return await self._call("SendTaskFailure", self.answer, **kwargs)

    async def send_task_heartbeat(self, **kwargs: Any) -> dict[str, Any]:
        return await self._call("SendTaskHeartbeat", self.answer, **kwargs)

    async def stop_execution(self, **kwargs: Any) -> dict[str, Any]:
        return await self._call("StopExecution", "ExecutionDoesNotExist", **kwargs)


def fake_context(sfn: FakeSFN, **env: str) -> Context:
    """A context on ``sfn`` alone, for the checks that call nothing else."""
    target, _ = load_target({}, {**VALID_ENV, **env})
    clients = Clients(
        sqs=cast(Any, None),
        sfn=cast(Any, sfn),
        events=cast(Any, None),
        ssm=None,
        dynamodb=None,
        credentials="container-role",
    )
    return Context(target, clients, None)


async def test_callbacks_to_parents_are_tried_with_a_made_up_token() -> None:
    sfn = FakeSFN(denied=set())
    finding = await check_task_tokens(fake_context(sfn))
    assert finding.status is Status.OK
    assert finding.detail.endswith("permitted (a made-up token: InvalidToken)")
    assert [name for name, _ in sfn.calls] == [
        "SendTaskSuccess",
        "SendTaskFailure",
        "SendTaskHeartbeat",
    ]
    assert {kwargs["taskToken"] for _, kwargs in sfn.calls} == {
        "sfn-dispatcher-check-made-up-task-token"
    }


async def test_callbacks_denied_warn_with_the_statement_to_grant() -> None:
    sfn = FakeSFN(denied={"SendTaskHeartbeat", "SendTaskFailure"})
    finding = await check_task_tokens(
        fake_context(sfn, **{"DISPATCHER_TASK_TOKEN_ATTRIBUTE": "cb"})
    )
    assert finding.status is Status.WARN
    assert finding.detail.startswith("SendTaskFailure, SendTaskHeartbeat denied: ")
    assert "message attribute cb" in finding.detail
    statement = json.loads(finding.fix.split("grant the role ", 1)[1].split(" (", 1)[0])
    assert statement == {
        "Effect": "Allow",
        "Action": ["states:SendTaskSuccess", "states:SendTaskFailure", "states:SendTaskHeartbeat"],
        "Resource": "*",
    }


async def test_an_unexpected_callback_answer_is_a_fail_line() -> None:
    sfn = FakeSFN(denied=set(), answer="ThrottlingException")
    ctx = fake_context(sfn)
    result = await run_one(Check("task_tokens", "parents answered", check_task_tokens), ctx)
    assert result.status is Status.FAIL
    assert result.detail.startswith("ThrottlingException")


async def test_stopping_orphans_is_checked_only_when_switched_on() -> None:
    sfn = FakeSFN(denied=set())
    result = await run_one(
        Check("stop_executions", "orphans", check_stop_executions), fake_context(sfn)
    )
    assert result.status is Status.SKIP
    assert sfn.calls == []

    finding = await check_stop_executions(
        fake_context(sfn, DISPATCHER_STOP_ORPHANED_CHILDREN="true")
    )
    assert finding.status is Status.OK
    [(operation, kwargs)] = sfn.calls
    assert operation == "StopExecution"
    prefix = "arn:aws:states:us-east-1:123456789012:execution:orders:sfn-dispatcher-check-"
    assert kwargs["executionArn"].startswith(prefix)

    denying = FakeSFN(denied={"StopExecution"})
    finding = await check_stop_executions(
        fake_context(denying, DISPATCHER_STOP_ORPHANED_CHILDREN="true")
    )
    assert finding.status is Status.FAIL
    assert "keep running and holding their slots" in finding.detail
    assert finding.fix.startswith(
        "grant states:StopExecution on arn:aws:states:us-east-1:123456789012:execution:orders:*"
    )


# --- a config file: read as `run` reads it, every pool and queue checked ---------------------

POOLS_FILE = """
[dispatcher]
events_queue_url = "https://sqs.us-east-1.amazonaws.com/123456789012/shared-events"

[pools.orders]
state_machine_arn = "arn:aws:states:us-east-1:123456789012:stateMachine:orders"
limit = 4

[pools.billing]
state_machine_arn = "arn:aws:states:us-east-1:123456789012:stateMachine:billing"
limit_parameter = "/billing/limit"

[[queues]]
url = "https://sqs.us-east-1.amazonaws.com/123456789012/orders"
pool = "orders"

[[queues]]
url = "https://sqs.us-east-1.amazonaws.com/123456789012/billing"
pool = "billing"
"""


def test_the_config_file_is_read_as_run_reads_it(tmp_path: Any) -> None:
    path = tmp_path / "pools.toml"
    path.write_text(POOLS_FILE)
    for overrides, env in (({}, {"DISPATCHER_CONFIG": str(path)}), ({"config": str(path)}, {})):
        target, findings = load_target(overrides, env)
        assert [f.status for f in findings] == [Status.OK], findings
        assert findings[0].detail.startswith(
            f"config file {path}: pools orders (limit 4), billing (limit 10), 2 request queue(s)"
        )
        assert target.get("events_queue_url").endswith("/shared-events")
        assert [p.name for p in target.pools] == ["orders", "billing"]
        billing = target.for_pool(target.pools[1])
        assert billing.limit_parameter == "/billing/limit"
        assert billing.name("limit_parameter") == "[pools.billing] limit_parameter"
        assert billing.about == "pool billing"
        queue = target.for_queue(target.queues[0])
        assert queue.get("request_queue_url").endswith("/orders")
        assert queue.name("request_queue_url") == "[[queues]] #1 url"
        assert target.limit_parameters == {"/billing/limit"}


def test_a_single_pool_variable_next_to_the_file_is_refused_as_run_refuses_it(
    tmp_path: Any,
) -> None:
    path = tmp_path / "pools.toml"
    path.write_text(POOLS_FILE)
    env = {"DISPATCHER_CONFIG": str(path), "DISPATCHER_LIMIT": "3", "DISPATCHER_HTTP_PORT": "x"}
    target, findings = load_target({}, env)
    assert [(f.status, f.detail) for f in findings] == [
        (
            Status.FAIL,
            "DISPATCHER_LIMIT cannot be combined with DISPATCHER_CONFIG: set limit per pool in "
            "the config file's [pools.NAME] tables",
        ),
        (
            Status.FAIL,
            "DISPATCHER_HTTP_PORT='x' is invalid: Input should be a valid integer, unable to "
            "parse string as an integer",
        ),
    ]
    # The file itself is fine: its pools and queues are still checked.
    assert [p.name for p in target.pools] == ["orders", "billing"]
    assert target.get("events_queue_url").endswith("/shared-events")


async def test_every_pool_and_queue_of_a_config_file_is_checked(
    sandbox_factory: SandboxFactory, tmp_path: Any
) -> None:
    """Two pools from two sandboxes, one events queue: each finding names its pool or queue.

    The second sandbox's rule sends to its own events queue, not the shared one; its request
    queue dead-letters after 3 receives; the first pool has keys (it defers requests), so
    its queue's 20 receives are too few.
    """
    first = await sandbox_factory()
    second = await sandbox_factory(max_receive_count=3)
    path = tmp_path / "pools.toml"
    path.write_text(
        f"""
[dispatcher]
events_queue_url = "{first.events_queue_url}"
dead_letter_queue_url = "{first.dead_letter_queue_url}"

[pools.first]
state_machine_arn = "{first.state_machine_arn}"
limit_parameter = "{first.limit_parameter}"
key_attribute = "tenant"

[pools.second]
state_machine_arn = "{second.state_machine_arn}"

[[queues]]
url = "{first.request_queue_url}"
pool = "first"

[[queues]]
url = "{second.request_queue_url}"
pool = "second"
"""
    )
    env = {"DISPATCHER_CONFIG": str(path), "AWS_DEFAULT_REGION": "us-east-1"}
    report = await run_checks(env=env, endpoint_url=first.endpoint)
    lines = {(r.id, r.about): r for r in report.results}
    table = render(report)
    assert lines["settings", ""].status is Status.OK, table
    for pool, sandbox in (("first", first), ("second", second)):
        machine = lines["state_machine", f"pool {pool}"]
        assert (machine.status, machine.detail) == (Status.OK, f"{sandbox.prefix} (ACTIVE)")
        assert lines["state_machine_type", f"pool {pool}"].status is Status.OK
        queue = lines["request_queue", f"queue {sandbox.prefix}-requests"]
        assert queue.status is Status.OK, table
    assert lines["events_rule", "pool first"].status is Status.OK, table
    rule = lines["events_rule", "pool second"]
    assert rule.status is Status.FAIL, table
    assert f"no rule sends this machine's events to {first.prefix}" in rule.detail.replace(
        "arn:aws:sqs:us-east-1:000000000000:", ""
    )
    assert json.dumps(status_pattern(second.state_machine_arn)) in rule.fix.replace("'", "")
    assert lines["events_queue_policy", "pool first"].status is Status.OK, table
    assert lines["events_queue_policy", "pool second"].status is Status.SKIP, table
    deferring = lines["redrive", f"queue {first.prefix}-requests"]
    assert deferring.status is Status.WARN, table
    assert "pool(s) first hand requests back" in deferring.detail
    assert '\\"maxReceiveCount\\": \\"100\\"' in deferring.fix
    few = lines["redrive", f"queue {second.prefix}-requests"]
    assert few.status is Status.WARN
    assert "after 3 receives: a request handed back" in few.detail
    parameter = lines["limit_parameter", "pool first"]
    assert (parameter.status, parameter.detail) == (
        Status.OK,
        f"{first.limit_parameter} = {first.limit}",
    )
    skipped = lines["limit_parameter", "pool second"]
    assert skipped.status is Status.SKIP
    assert skipped.detail.startswith("[pools.second] limit_parameter unset: the limit is ")
    # One line per finding, each naming what it is about.
    assert f"[queue {second.prefix}-requests]" in table
    assert "[pool second]" in table
    assert not report.ok


class RulesEvents:
    """EventBridge with one rule per pool, each sending its machine's events to the queue."""

    def __init__(self, machines: dict[str, str]) -> None:
        self.rules = {
            f"{name}-status": (f"arn:aws:events:us-east-1:123456789012:rule/{name}-status", arn)
            for name, arn in machines.items()
        }

    def get_paginator(self, _: str) -> Any:
        names = list(self.rules)

        class Pages:
            async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
                yield {"RuleNames": names}

        return type("Paginator", (), {"paginate": lambda _self, **_: Pages()})()

    async def describe_rule(self, Name: str) -> dict[str, Any]:  # noqa: N803 - AWS's name
        arn, machine = self.rules[Name]
        return {"Arn": arn, "State": "ENABLED", "EventPattern": json.dumps(status_pattern(machine))}

    async def list_targets_by_rule(self, **_: Any) -> dict[str, Any]:
        return {"Targets": [{"Id": "events", "Arn": QUEUE}]}


class PolicySQS:
    """GetQueueAttributes of the events queue, with a given policy."""

    def __init__(self, policy: dict[str, Any]) -> None:
        self.policy = policy

    async def get_queue_attributes(self, **_: Any) -> dict[str, Any]:
        return {"Attributes": {"QueueArn": QUEUE, "Policy": json.dumps(self.policy)}}


async def test_two_pools_on_one_events_queue_get_one_merged_policy_fix(tmp_path: Any) -> None:
    """The policy allows only the first pool's rule (with the template's deny-all-others):
    the second pool's fix must allow both rules, or applying it breaks the first pool."""
    path = tmp_path / "pools.toml"
    path.write_text(POOLS_FILE)
    target, _ = load_target({"config": str(path)}, {})
    events = RulesEvents({p.name: p.state_machine_arn for p in target.pools})
    orders_rule, billing_rule = (arn for arn, _ in events.rules.values())
    other = {"Sid": "Ops", "Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::1:root"}}
    other |= {"Action": "sqs:GetQueueAttributes", "Resource": QUEUE}
    guard = {**allow(ArnNotEquals={"aws:SourceArn": orders_rule}), "Effect": "Deny"}
    policy = {"Statement": [allow(ArnEquals={"aws:SourceArn": orders_rule}), guard, other]}
    clients = Clients(
        sqs=cast(Any, PolicySQS(policy)),
        sfn=cast(Any, None),
        events=cast(Any, events),
        ssm=None,
        dynamodb=None,
        credentials="container-role",
    )
    ctx = Context(target, clients, None)
    orders, billing = [await check_policy(ctx.scoped(target.for_pool(p))) for p in target.pools]
    assert orders.status is Status.OK
    assert billing.status is Status.FAIL
    assert billing.fix.startswith("allow the rules of every pool on this queue (keeps the ")
    fixed = json.loads(json.loads(billing.fix.split("--attributes ")[1].split("'")[1])["Policy"])
    assert policy_allows(fixed, QUEUE, orders_rule) is True
    assert policy_allows(fixed, QUEUE, billing_rule) is True
    assert policy_allows(fixed, QUEUE, orders_rule + "-someone-else") is False  # guard kept
    assert other in fixed["Statement"]
    # Applied, it is the policy both pools pass with: no fix puts the other pool back.
    ctx = Context(target, dataclasses.replace(clients, sqs=cast(Any, PolicySQS(fixed))), None)
    for pool in target.pools:
        assert (await check_policy(ctx.scoped(target.for_pool(pool)))).status is Status.OK


def test_a_broken_config_file_is_a_line_per_mistake_and_the_pool_checks_say_why(
    tmp_path: Any,
) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('[pools.a]\nstate_machine_arn = "nope"\n')
    target, findings = load_target({"config": str(path)}, {})
    assert [f.detail for f in findings] == [
        f"config file {path}: [pools.a] state_machine_arn='nope' is invalid: must look like "
        "arn:aws:states:REGION:ACCOUNT:stateMachine:NAME",
        f"config file {path}: no queues: add at least one [[queues]] entry with url and pool",
        "--events-queue-url / DISPATCHER_EVENTS_QUEUE_URL is required: SQS queue the "
        "EventBridge rule sends Execution Status Change events to.",
    ]
    assert {f.status for f in findings} == {Status.FAIL}
    assert "docs/pools.md" in findings[0].fix
    assert "docs/configuration.md" in findings[2].fix
    with pytest.raises(Skip, match="the config file has no valid pools and queues"):
        target.need("state_machine_arn")


# --- named limits: each one's parameter --------------------------------------------------------

NAMED_FILE = (
    POOLS_FILE.replace(
        'limit_parameter = "/billing/limit"\n',
        'limit_parameter = "/billing/limit"\nuses = { partner-api = 3 }\n',
    ).replace("limit = 4\n", "limit = 4\nuses = { partner-api = 1, licences = 1 }\n")
    + '\n[limits.partner-api]\nlimit = 5\nlimit_parameter = "/limits/partner-api"\n'
    + "\n[limits.licences]\nlimit = 2\n"
)


class ParameterSSM:
    """GetParameter of one parameter: its value, or the error AWS would answer."""

    def __init__(self, value: str | None = None, error: str = "ParameterNotFound") -> None:
        self.value = value
        self.error = error

    async def get_parameter(self, **kwargs: Any) -> dict[str, Any]:
        if self.value is None:
            message = f"parameter {kwargs['Name']} not found"
            error = {"Error": {"Code": self.error, "Message": message}}
            raise ClientError(error, "GetParameter")  # type: ignore[arg-type]
        return {"Parameter": {"Name": kwargs["Name"], "Value": self.value}}


def named_context(tmp_path: Any, ssm: ParameterSSM, name: str = "partner-api") -> Context:
    """The context of named limit ``name``'s check, on ``ssm`` alone."""
    path = tmp_path / "named.toml"
    path.write_text(NAMED_FILE)
    target, findings = load_target({"config": str(path)}, {})
    assert [f.status for f in findings] == [Status.OK], findings
    clients = Clients(
        sqs=cast(Any, None),
        sfn=cast(Any, None),
        events=cast(Any, None),
        ssm=cast(Any, ssm),
        dynamodb=None,
        credentials="container-role",
    )
    named = next(n for n in target.limits if n.name == name)
    return Context(target, clients, None).scoped(target.for_limit(named))


def test_named_limits_are_checked_one_line_each_and_their_parameters_read(
    tmp_path: Any,
) -> None:
    path = tmp_path / "named.toml"
    path.write_text(NAMED_FILE)
    target, _ = load_target({"config": str(path)}, {})
    assert [n.name for n in target.limits] == ["partner-api", "licences"]
    assert target.limit_parameters == {"/billing/limit", "/limits/partner-api"}
    scoped = target.for_limit(target.limits[0])
    assert scoped.about == "named limit partner-api"
    assert [p.name for p in scoped.fed] == ["orders", "billing"]
    (check,) = [c for c in CHECKS if c.id == "named_limit_parameter"]
    assert check.scope is Scope.LIMIT


@pytest.mark.parametrize(
    ("value", "status", "detail", "fix"),
    [
        ("5", Status.OK, "/limits/partner-api = 5 (used by orders x1, billing x3)", ""),
        (
            " 3 ",
            Status.OK,
            "/limits/partner-api = 3 (used by orders x1, billing x3)",
            "",
        ),
        (
            "2",
            Status.FAIL,
            "/limits/partner-api = 2: below the weight of pool billing (3) (uses partner-api): "
            "it could start nothing",
            "raise the value to 3 or more: aws ssm put-parameter --name /limits/partner-api "
            "--type String --value 5 --overwrite --region us-east-1\n"
            "or lower the weight in [pools.billing] uses",
        ),
        (
            "0",
            Status.WARN,
            "/limits/partner-api = 0: named limit partner-api is paused; its pools (orders x1, "
            "billing x3) start nothing",
            "sfn-dispatcher resume --named-limit partner-api (when the pause is over)",
        ),
        (
            "ten",
            Status.FAIL,
            "[limits.partner-api] limit_parameter=/limits/partner-api: 'ten' is not a limit: "
            "use a whole number from 0 to 100000",
            "aws ssm put-parameter --name /limits/partner-api --type String --value 5 "
            "--overwrite --region us-east-1",
        ),
        (
            "100001",
            Status.FAIL,
            "[limits.partner-api] limit_parameter=/limits/partner-api: '100001' is not a limit: "
            "use a whole number from 0 to 100000",
            "aws ssm put-parameter --name /limits/partner-api --type String --value 5 "
            "--overwrite --region us-east-1",
        ),
        (
            None,
            Status.FAIL,
            "[limits.partner-api] limit_parameter=/limits/partner-api: ParameterNotFound: "
            "parameter /limits/partner-api not found",
            "aws ssm put-parameter --name /limits/partner-api --type String --value 5 "
            "--overwrite --region us-east-1",
        ),
    ],
)
async def test_a_named_limits_parameter_holds_a_value_every_user_pool_fits_under(
    tmp_path: Any, value: str | None, status: Status, detail: str, fix: str
) -> None:
    finding = await check_named_limit_parameter(named_context(tmp_path, ParameterSSM(value)))
    assert (finding.status, finding.detail, finding.fix) == (status, detail, fix)


async def test_a_named_limits_parameter_denied_names_the_permission(tmp_path: Any) -> None:
    ssm = ParameterSSM(None, error="AccessDeniedException")
    finding = await check_named_limit_parameter(named_context(tmp_path, ssm))
    assert finding.status is Status.FAIL
    assert finding.detail.startswith("AccessDeniedException: ")
    assert finding.fix == "grant ssm:GetParameter on /limits/partner-api"


async def test_a_named_limit_without_a_parameter_is_skipped_with_its_value(
    tmp_path: Any,
) -> None:
    ctx = named_context(tmp_path, ParameterSSM("9"), "licences")
    check = Check("named_limit_parameter", "named limit", check_named_limit_parameter)
    result = await run_one(check, ctx)
    assert (result.status, result.about) == (Status.SKIP, "named limit licences")
    assert (
        result.detail
        == "[limits.licences] limit_parameter unset: the value is [limits.licences] limit (2)"
    )


async def test_a_named_limits_parameter_is_read_from_aws_when_no_pool_has_one(
    sandbox: SandboxResources, tmp_path: Any
) -> None:
    """The SSM client is opened for a named limit's parameter alone, and the line names
    the named limit."""
    path = tmp_path / "named.toml"
    path.write_text(
        f"""
[dispatcher]
events_queue_url = "{sandbox.events_queue_url}"
dead_letter_queue_url = "{sandbox.dead_letter_queue_url}"

[limits.partner-api]
limit = 1
limit_parameter = "{sandbox.limit_parameter}"

[pools.orders]
state_machine_arn = "{sandbox.state_machine_arn}"
uses = {{ partner-api = 1 }}

[[queues]]
url = "{sandbox.request_queue_url}"
pool = "orders"
"""
    )
    env = {"DISPATCHER_CONFIG": str(path), "AWS_DEFAULT_REGION": "us-east-1"}
    report = await run_checks(env=env, endpoint_url=sandbox.endpoint)
    lines = {(r.id, r.about): r for r in report.results}
    named = lines["named_limit_parameter", "named limit partner-api"]
    assert (named.status, named.detail) == (
        Status.OK,
        f"{sandbox.limit_parameter} = {sandbox.limit} (used by orders x1)",
    )
    (line,) = [x for x in render(report).splitlines() if "[named limit partner-api]" in x]
    assert line.startswith("OK    named limit parameter (SSM) [named limit partner-api] ")
