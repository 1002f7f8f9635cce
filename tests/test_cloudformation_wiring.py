"""The wiring-only template: cfn-lint clean, nothing of a runtime, and the same wiring as
the ECS template - resource for resource, and the same permissions.

Each test reads the real ``deploy/cloudformation-wiring.yaml`` next to the real
``deploy/cloudformation.yaml``, so the two cannot drift apart unnoticed.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.test_cloudformation import (
    EXPECTED_GRANTS,
    TEMPLATE,
    _as_list,
    _branches,
    _cfn_lint,
    _describe,
    _task_role_statements,
    load_template,
)

WIRING = Path(TEMPLATE).with_name("cloudformation-wiring.yaml")

# What both templates create alike: the queues, the rule and its policies, the lease table
# and the alarms on AWS's own metrics.
SHARED = (
    "DeadLetterQueue",
    "RequestQueue",
    "EventsQueue",
    "EventsQueuePolicy",
    "StatusChangeRule",
    "EventsDeadLetterQueue",
    "EventsDeadLetterQueuePolicy",
    "LeaseTable",
    "RequestsWaitingTooLongAlarm",
    "DeadLettersAlarm",
    "EventsWaitingAlarm",
    "EventsUndeliveredAlarm",
    "ExecutionsThrottledAlarm",
    "StartExecutionThrottledAlarm",
)


@pytest.fixture(scope="module")
def full() -> dict[str, Any]:
    """The ECS template."""
    loaded: dict[str, Any] = load_template(TEMPLATE.read_text(encoding="utf-8"))
    return loaded


@pytest.fixture(scope="module")
def wiring() -> dict[str, Any]:
    """The wiring-only template."""
    loaded: dict[str, Any] = load_template(WIRING.read_text(encoding="utf-8"))
    return loaded


@pytest.mark.timeout(120)
def test_cfn_lint_passes_including_informational_checks() -> None:
    result = subprocess.run(
        [_cfn_lint(), "--include-checks", "I", "--", str(WIRING)],
        capture_output=True,
        text=True,
        check=False,
        timeout=110,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_nothing_of_a_runtime(wiring: dict[str, Any]) -> None:
    types = {r["Type"] for r in wiring["Resources"].values()}
    assert not {t for t in types if t.startswith(("AWS::ECS::", "AWS::Logs::", "AWS::EC2::"))}
    for name in ("ImageUri", "Subnets", "SecurityGroups", "Cpu", "Memory"):
        assert name not in wiring["Parameters"]
    assert "Transform" not in wiring


@pytest.mark.parametrize("name", SHARED)
def test_the_wiring_is_the_ecs_templates(
    name: str, full: dict[str, Any], wiring: dict[str, Any]
) -> None:
    assert wiring["Resources"][name] == full["Resources"][name]


def test_the_parameters_they_share_are_the_same(
    full: dict[str, Any], wiring: dict[str, Any]
) -> None:
    for name in (
        "StateMachineArn",
        "MaxReceiveCount",
        "VisibilityTimeout",
        "CreateLeaseTable",
        "StopOrphanedChildren",
        "AlarmTopicArn",
        "RequestAgeAlarmSeconds",
    ):
        mine, theirs = wiring["Parameters"][name], full["Parameters"][name]
        assert {k: v for k, v in mine.items() if k != "Description"} == {
            k: v for k, v in theirs.items() if k != "Description"
        }, name
    for name in ("UseLeaseTable", "StopChildren", "TerminalEventsOnly", "HasAlarmTopic"):
        assert wiring["Conditions"][name] == full["Conditions"][name]


def _policy_statements(wiring: dict[str, Any]) -> list[dict[str, Any]]:
    [policy] = [r for r in wiring["Resources"].values() if r["Type"] == "AWS::IAM::ManagedPolicy"]
    statements: list[dict[str, Any]] = []
    for item in policy["Properties"]["PolicyDocument"]["Statement"]:
        statements.extend(_branches(item))
    return statements


def test_the_policy_grants_what_the_task_role_grants(
    full: dict[str, Any], wiring: dict[str, Any]
) -> None:
    def grants(statements: list[dict[str, Any]]) -> set[tuple[str, str]]:
        return {
            (action, _describe(resource))
            for statement in statements
            for action in _as_list(statement["Action"])
            for resource in _as_list(statement["Resource"])
        }

    assert grants(_policy_statements(wiring)) == grants(_task_role_statements(full))
    assert grants(_policy_statements(wiring)) == EXPECTED_GRANTS
    by_sid = {s["Sid"]: s for s in _policy_statements(wiring)}
    assert by_sid == {s["Sid"]: s for s in _task_role_statements(full)}


def test_optional_parts_come_with_their_grants_only(wiring: dict[str, Any]) -> None:
    resources = wiring["Resources"]
    assert resources["LimitParameter"]["Condition"] == "UseLimitParameter"
    assert resources["LeaseTable"]["Condition"] == "UseLeaseTable"
    policy = resources["DispatcherPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    conditional = {
        item["Fn::If"][0]: item["Fn::If"][1]["Sid"] for item in policy if "Fn::If" in item
    }
    assert conditional == {
        "UseLimitParameter": "ReadTheLimit",
        "UseLeaseTable": "SingleActiveLease",
        "StopChildren": "StopOrphanedChildren",
    }
    outputs = wiring["Outputs"]
    assert outputs["LimitParameterName"]["Condition"] == "UseLimitParameter"
    assert outputs["LeaseTableName"]["Condition"] == "UseLeaseTable"
    assert outputs["RoleArn"]["Condition"] == "HasOidcProvider"


def test_the_irsa_role_trusts_only_the_service_account(wiring: dict[str, Any]) -> None:
    """The trust policy, rendered as CloudFormation would for a given provider."""
    role = wiring["Resources"]["DispatcherRole"]
    assert role["Condition"] == "HasOidcProvider"
    assert role["Properties"]["ManagedPolicyArns"] == [{"Ref": "DispatcherPolicy"}]
    text, variables = role["Properties"]["AssumeRolePolicyDocument"]["Fn::Sub"]
    assert variables["Issuer"] == {
        "Fn::Select": [1, {"Fn::Split": ["oidc-provider/", {"Ref": "EksOidcProviderArn"}]}]
    }
    issuer = "oidc.eks.eu-west-1.amazonaws.com/id/EXAMPLE0123456789"
    values = {
        "EksOidcProviderArn": f"arn:aws:iam::123456789012:oidc-provider/{issuer}",
        "Issuer": issuer,
        "KubernetesNamespace": "sfn-dispatcher",
        "KubernetesServiceAccount": "sfn-dispatcher",
    }
    for name, value in values.items():
        text = text.replace("${" + name + "}", value)
    [statement] = json.loads(text)["Statement"]
    assert statement["Principal"] == {"Federated": values["EksOidcProviderArn"]}
    assert statement["Action"] == "sts:AssumeRoleWithWebIdentity"
    assert statement["Condition"] == {
        "StringEquals": {
            f"{issuer}:sub": "system:serviceaccount:sfn-dispatcher:sfn-dispatcher",
            f"{issuer}:aud": "sts.amazonaws.com",
        }
    }
    # The Kubernetes manifests' service account is the default one.
    manifests = WIRING.parent / "kubernetes"
    assert "name: sfn-dispatcher" in (manifests / "serviceaccount.yaml").read_text()
    assert wiring["Parameters"]["KubernetesServiceAccount"]["Default"] == "sfn-dispatcher"


def test_outputs_name_the_dispatchers_variables(wiring: dict[str, Any]) -> None:
    outputs = wiring["Outputs"]
    for name, variable in (
        ("RequestQueueUrl", "DISPATCHER_REQUEST_QUEUE_URL"),
        ("EventsQueueUrl", "DISPATCHER_EVENTS_QUEUE_URL"),
        ("DeadLetterQueueUrl", "DISPATCHER_DEAD_LETTER_QUEUE_URL"),
        ("LimitParameterName", "DISPATCHER_LIMIT_PARAMETER"),
        ("LeaseTableName", "DISPATCHER_LEASE_TABLE"),
    ):
        assert variable in outputs[name]["Description"], name
    assert outputs["PolicyArn"]["Value"] == {"Ref": "DispatcherPolicy"}
