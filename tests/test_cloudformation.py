"""The ECS/Fargate deploy template: cfn-lint clean, and the properties the design relies on.

Each test reads the real ``deploy/cloudformation.yaml``; none of them is a tautology about
a copy of it. The IAM tests pin the task role to exactly the calls the dispatcher makes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

TEMPLATE = Path(__file__).resolve().parents[1] / "deploy" / "cloudformation.yaml"

# Every short-form intrinsic function CloudFormation accepts in YAML.
_SHORT_TAGS = (
    "Base64",
    "Cidr",
    "Condition",
    "Contains",
    "EachMemberEquals",
    "EachMemberIn",
    "Equals",
    "FindInMap",
    "GetAZs",
    "GetAtt",
    "If",
    "ImportValue",
    "Join",
    "Length",
    "Not",
    "Or",
    "And",
    "Ref",
    "RefAll",
    "Select",
    "Split",
    "Sub",
    "ToJsonString",
    "Transform",
    "ValueOf",
    "ValueOfAll",
)


class CloudFormationLoader(yaml.SafeLoader):
    """SafeLoader that reads ``!Ref X`` as ``{"Ref": "X"}`` and ``!Sub s`` as ``{"Fn::Sub": s}``."""


def _construct_intrinsic(loader: yaml.SafeLoader, node: yaml.Node) -> dict[str, Any]:
    tag = node.tag.removeprefix("!")
    key = tag if tag in ("Ref", "Condition") else f"Fn::{tag}"
    value: Any
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
        if tag == "GetAtt":  # the short form is "Resource.Attribute"
            value = value.split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        assert isinstance(node, yaml.MappingNode)
        value = loader.construct_mapping(node, deep=True)
    return {key: value}


for _tag in _SHORT_TAGS:
    CloudFormationLoader.add_constructor(f"!{_tag}", _construct_intrinsic)


def load_template(text: str) -> Any:
    """Parse CloudFormation YAML; safe, since the loader only adds plain-data constructors."""
    return yaml.load(text, Loader=CloudFormationLoader)  # noqa: S506 - a SafeLoader subclass


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    """The parsed template, intrinsic functions in their long (JSON) form."""
    loaded = load_template(TEMPLATE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def _resource(template: dict[str, Any], type_: str) -> tuple[str, dict[str, Any]]:
    """The one resource of ``type_`` as (logical id, resource)."""
    found = [(k, v) for k, v in template["Resources"].items() if v["Type"] == type_]
    assert len(found) == 1, f"expected exactly one {type_}, found {[k for k, _ in found]}"
    return found[0]


def _container(template: dict[str, Any]) -> dict[str, Any]:
    _, task = _resource(template, "AWS::ECS::TaskDefinition")
    containers = task["Properties"]["ContainerDefinitions"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def _branches(item: Any) -> Iterator[Any]:
    """An item of a list, or both branches of an ``Fn::If`` standing in for one."""
    if isinstance(item, dict) and set(item) == {"Fn::If"}:
        _, when_true, when_false = item["Fn::If"]
        for branch in (when_true, when_false):
            yield from _branches(branch)
    elif item != {"Ref": "AWS::NoValue"}:
        yield item


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _task_role_statements(template: dict[str, Any]) -> list[dict[str, Any]]:
    _, task = _resource(template, "AWS::ECS::TaskDefinition")
    role_id = task["Properties"]["TaskRoleArn"]["Fn::GetAtt"][0]
    role = template["Resources"][role_id]
    assert role["Type"] == "AWS::IAM::Role"
    assert "ManagedPolicyArns" not in role["Properties"], "the task role must be inline-only"
    statements: list[dict[str, Any]] = []
    for policy in role["Properties"]["Policies"]:
        for item in policy["PolicyDocument"]["Statement"]:
            statements.extend(_branches(item))
    return statements


def _describe(resource: Any) -> str:
    """A readable key for an IAM resource expression: ``Queue.Arn``, ``StateMachineArn``, ..."""
    if isinstance(resource, dict) and "Fn::GetAtt" in resource:
        return ".".join(resource["Fn::GetAtt"])
    if isinstance(resource, dict) and "Ref" in resource:
        return str(resource["Ref"])
    if isinstance(resource, dict) and "Fn::Sub" in resource:
        sub = resource["Fn::Sub"]
        return str(sub[0] if isinstance(sub, list) else sub)
    return str(resource)


def _cfn_lint() -> str:
    beside = Path(sys.executable).parent / "cfn-lint"
    found = str(beside) if beside.exists() else shutil.which("cfn-lint")
    assert found, "cfn-lint is not installed (it is in the dev extra)"
    return found


@pytest.mark.timeout(120)
def test_cfn_lint_passes_including_informational_checks() -> None:
    result = subprocess.run(
        [_cfn_lint(), "--include-checks", "I", "--", str(TEMPLATE)],
        capture_output=True,
        text=True,
        check=False,
        timeout=110,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_plain_cloudformation_without_transforms(template: dict[str, Any]) -> None:
    assert "Transform" not in template
    assert template["AWSTemplateFormatVersion"] == "2010-09-09"


def test_service_stops_the_old_task_before_starting_the_new_one(template: dict[str, Any]) -> None:
    _, service = _resource(template, "AWS::ECS::Service")
    props = service["Properties"]
    assert props["DesiredCount"] == 1
    assert props["LaunchType"] == "FARGATE"
    deployment = props["DeploymentConfiguration"]
    assert deployment["MinimumHealthyPercent"] == 0
    assert deployment["MaximumPercent"] == 100
    assert deployment["DeploymentCircuitBreaker"] == {"Enable": True, "Rollback": True}
    assert props.get("AvailabilityZoneRebalancing") == "DISABLED"


def test_container_shuts_down_inside_the_stop_timeout(template: dict[str, Any]) -> None:
    container = _container(template)
    assert container["StopTimeout"] == 120
    env = {e["Name"]: e["Value"] for item in container["Environment"] for e in _branches(item)}
    assert 0 < float(env["DISPATCHER_SHUTDOWN_TIMEOUT"]) < container["StopTimeout"]


def test_container_health_check_and_hardening(template: dict[str, Any]) -> None:
    container = _container(template)
    command = container["HealthCheck"]["Command"]
    assert command[0] == "CMD"
    assert "curl" not in command, "the image has no curl"
    assert any("/healthz" in part for part in command)
    assert container["Essential"] is True
    assert container["ReadonlyRootFilesystem"] is True
    assert container["User"] not in ("0", "root")
    assert container["User"].split(":")[0] == "10001"
    assert [p["ContainerPort"] for p in container["PortMappings"]] == [8080]
    assert container["LogConfiguration"]["LogDriver"] == "awslogs"


def test_container_environment_is_the_dispatchers(template: dict[str, Any]) -> None:
    container = _container(template)
    env = {e["Name"]: e["Value"] for item in container["Environment"] for e in _branches(item)}
    assert env["DISPATCHER_HTTP_HOST"] == "0.0.0.0"  # noqa: S104 - the task's own ENI
    assert env["DISPATCHER_HTTP_PORT"] == "8080"
    assert env["DISPATCHER_LOG_FORMAT"] == "json"
    assert env["DISPATCHER_STATE_MACHINE_ARN"] == {"Ref": "StateMachineArn"}
    assert env["DISPATCHER_LIMIT"] == {"Ref": "Limit"}
    for name, resource in (
        ("DISPATCHER_REQUEST_QUEUE_URL", "RequestQueue"),
        ("DISPATCHER_EVENTS_QUEUE_URL", "EventsQueue"),
        ("DISPATCHER_DEAD_LETTER_QUEUE_URL", "DeadLetterQueue"),
    ):
        assert env[name] == {"Ref": resource}
    # The optional features are switched by conditions, never on by default.
    optional = {
        e["Name"]: item["Fn::If"][0]
        for item in container["Environment"]
        if isinstance(item, dict) and "Fn::If" in item
        for e in _branches(item)
    }
    assert optional == {
        "DISPATCHER_LIMIT_PARAMETER": "UseLimitParameter",
        "DISPATCHER_LEASE_TABLE": "UseLeaseTable",
    }
    params = template["Parameters"]
    assert params["EnableLimitParameter"]["Default"] == "false"
    assert params["CreateLeaseTable"]["Default"] == "false"


EXPECTED_ACTIONS = {
    "states:DescribeStateMachine",
    "states:ListExecutions",
    "states:StartExecution",
    "states:DescribeExecution",
    "sqs:ReceiveMessage",
    "sqs:DeleteMessage",
    "sqs:ChangeMessageVisibility",
    "sqs:GetQueueAttributes",
    "sqs:SendMessage",
    "ssm:GetParameter",
    "dynamodb:GetItem",
    "dynamodb:UpdateItem",
    "states:SendTaskSuccess",
    "states:SendTaskFailure",
    "states:SendTaskHeartbeat",
    "states:StopExecution",
}
# Answering a parent's task token: no resource-level permissions exist for these actions.
TOKEN_ACTIONS = {"states:SendTaskSuccess", "states:SendTaskFailure", "states:SendTaskHeartbeat"}

EXECUTION_ARN = "arn:${AWS::Partition}:states:${AWS::Region}:${AWS::AccountId}:execution:${Name}:*"
PARAMETER_ARN = (
    "arn:${AWS::Partition}:ssm:${AWS::Region}:${AWS::AccountId}:parameter${LimitParameter}"
)

EXPECTED_GRANTS = {
    ("states:DescribeStateMachine", "StateMachineArn"),
    ("states:ListExecutions", "StateMachineArn"),
    ("states:StartExecution", "StateMachineArn"),
    ("states:DescribeExecution", EXECUTION_ARN),
    *(
        (action, queue)
        for action in (
            "sqs:ReceiveMessage",
            "sqs:DeleteMessage",
            "sqs:ChangeMessageVisibility",
            "sqs:GetQueueAttributes",
        )
        for queue in ("RequestQueue.Arn", "EventsQueue.Arn")
    ),
    ("sqs:SendMessage", "RequestQueue.Arn"),
    ("sqs:SendMessage", "DeadLetterQueue.Arn"),
    ("sqs:GetQueueAttributes", "DeadLetterQueue.Arn"),
    ("ssm:GetParameter", PARAMETER_ARN),
    ("dynamodb:GetItem", "LeaseTable.Arn"),
    ("dynamodb:UpdateItem", "LeaseTable.Arn"),
    *((action, "*") for action in TOKEN_ACTIONS),
    ("states:StopExecution", EXECUTION_ARN),
}


def test_task_role_has_no_wildcards(template: dict[str, Any]) -> None:
    """Only the task-token answers are on "*": AWS allows no other Resource for them."""
    for statement in _task_role_statements(template):
        assert statement["Effect"] == "Allow"
        assert "NotAction" not in statement
        assert "NotResource" not in statement
        for action in _as_list(statement["Action"]):
            assert "*" not in action, statement
        for resource in _as_list(statement["Resource"]):
            if resource == "*":
                assert set(_as_list(statement["Action"])) == TOKEN_ACTIONS, statement
                assert "Condition" not in statement


def test_parents_are_answered_and_orphans_stopped_only_when_asked(
    template: dict[str, Any],
) -> None:
    [answers] = [
        s for s in _task_role_statements(template) if TOKEN_ACTIONS & set(_as_list(s["Action"]))
    ]
    assert set(answers["Action"]) == TOKEN_ACTIONS
    assert answers["Resource"] == "*"
    conditions = _conditional_statements(template)
    stop, otherwise = conditions["StopChildren"]
    assert _as_list(stop["Action"]) == ["states:StopExecution"]
    _, variables = stop["Resource"]["Fn::Sub"]
    assert variables["Name"] == {
        "Fn::Select": [6, {"Fn::Split": [":", {"Ref": "StateMachineArn"}]}]
    }
    assert otherwise == {"Ref": "AWS::NoValue"}
    assert template["Conditions"]["StopChildren"] == {
        "Fn::Equals": [{"Ref": "StopOrphanedChildren"}, "true"]
    }
    parameter = template["Parameters"]["StopOrphanedChildren"]
    assert (parameter["Default"], parameter["AllowedValues"]) == ("false", ["true", "false"])
    container = _container(template)
    env = {e["Name"]: e["Value"] for item in container["Environment"] for e in _branches(item)}
    assert env["DISPATCHER_STOP_ORPHANED_CHILDREN"] == {"Ref": "StopOrphanedChildren"}
    groups = template["Metadata"]["AWS::CloudFormation::Interface"]["ParameterGroups"]
    assert any("StopOrphanedChildren" in g["Parameters"] for g in groups)


def _conditional_statements(template: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The task role's ``Fn::If`` statements: condition -> (statement, otherwise)."""
    _, task = _resource(template, "AWS::ECS::TaskDefinition")
    role = template["Resources"][task["Properties"]["TaskRoleArn"]["Fn::GetAtt"][0]]
    found: dict[str, tuple[Any, Any]] = {}
    for policy in role["Properties"]["Policies"]:
        for item in policy["PolicyDocument"]["Statement"]:
            if "Fn::If" in item:
                condition, statement, otherwise = item["Fn::If"]
                assert condition not in found
                found[condition] = (statement, otherwise)
    return found


def test_task_role_actions_are_exactly_the_dispatchers(template: dict[str, Any]) -> None:
    actions = {a for s in _task_role_statements(template) for a in _as_list(s["Action"])}
    assert actions == EXPECTED_ACTIONS


def test_task_role_grants_each_action_only_on_its_resources(template: dict[str, Any]) -> None:
    grants = {
        (action, _describe(resource))
        for statement in _task_role_statements(template)
        for action in _as_list(statement["Action"])
        for resource in _as_list(statement["Resource"])
    }
    assert grants == EXPECTED_GRANTS


def test_describe_execution_resource_takes_the_name_from_the_arn(
    template: dict[str, Any],
) -> None:
    [statement] = [
        s
        for s in _task_role_statements(template)
        if "states:DescribeExecution" in _as_list(s["Action"])
    ]
    _, variables = statement["Resource"]["Fn::Sub"]
    # arn:aws:states:REGION:ACCOUNT:stateMachine:NAME - the name is field 6.
    assert variables["Name"] == {
        "Fn::Select": [6, {"Fn::Split": [":", {"Ref": "StateMachineArn"}]}]
    }


def test_lease_permissions_and_table_exist_only_with_the_condition(
    template: dict[str, Any],
) -> None:
    conditional = _conditional_statements(template)
    assert set(conditional) == {"UseLeaseTable", "StopChildren"}
    statement, otherwise = conditional["UseLeaseTable"]
    assert all(a.startswith("dynamodb:") for a in statement["Action"])
    assert otherwise == {"Ref": "AWS::NoValue"}
    table_id, table = _resource(template, "AWS::DynamoDB::Table")
    assert table["Condition"] == "UseLeaseTable"
    assert table["Properties"]["KeySchema"] == [{"AttributeName": "pool", "KeyType": "HASH"}]
    assert table["Properties"]["TimeToLiveSpecification"] == {
        "AttributeName": "expires_at",
        "Enabled": True,
    }
    assert template["Conditions"]["UseLeaseTable"] == {
        "Fn::Equals": [{"Ref": "CreateLeaseTable"}, "true"]
    }
    assert table_id == "LeaseTable"


def test_requests_queue_redrives_to_the_dead_letter_queue(template: dict[str, Any]) -> None:
    redrive = template["Resources"]["RequestQueue"]["Properties"]["RedrivePolicy"]
    assert redrive["deadLetterTargetArn"] == {"Fn::GetAtt": ["DeadLetterQueue", "Arn"]}
    assert redrive["maxReceiveCount"] == {"Ref": "MaxReceiveCount"}
    assert template["Parameters"]["MaxReceiveCount"]["Default"] == 20


def test_the_dead_letter_queue_takes_the_largest_request(template: dict[str, Any]) -> None:
    """A request as large as its queue allows, plus the reason, fits the dead-letter queue
    (SQS's maximum and the default of queues made since 2025: 1 MiB)."""
    resources = template["Resources"]
    dead = resources["DeadLetterQueue"]["Properties"]["MaximumMessageSize"]
    requests = resources["RequestQueue"]["Properties"].get("MaximumMessageSize", 1_048_576)
    assert dead == 1_048_576
    assert dead >= requests


def test_events_queue_accepts_only_the_rule(template: dict[str, Any]) -> None:
    rule_id, _ = _resource(template, "AWS::Events::Rule")
    (props,) = (
        r["Properties"]
        for r in template["Resources"].values()
        if r["Type"] == "AWS::SQS::QueuePolicy"
        and r["Properties"]["Queues"] == [{"Ref": "EventsQueue"}]
    )
    assert props["Queues"] == [{"Ref": "EventsQueue"}]
    rule_arn = {"Fn::GetAtt": [rule_id, "Arn"]}
    statements = props["PolicyDocument"]["Statement"]
    allows = [s for s in statements if s["Effect"] == "Allow"]
    assert len(allows) == 1
    [allow] = allows
    assert allow["Principal"] == {"Service": "events.amazonaws.com"}
    assert _as_list(allow["Action"]) == ["sqs:SendMessage"]
    assert allow["Resource"] == {"Fn::GetAtt": ["EventsQueue", "Arn"]}
    assert allow["Condition"] == {"ArnEquals": {"aws:SourceArn": rule_arn}}
    # ...and everyone else is denied, so a same-account principal cannot forge events.
    denies = [s for s in statements if s["Effect"] == "Deny"]
    assert len(denies) == 1
    [deny] = denies
    assert deny["Principal"] == "*"
    assert _as_list(deny["Action"]) == ["sqs:SendMessage"]
    assert deny["Condition"] == {"ArnNotEquals": {"aws:SourceArn": rule_arn}}


def test_rule_matches_this_state_machines_status_changes(template: dict[str, Any]) -> None:
    _, rule = _resource(template, "AWS::Events::Rule")
    props = rule["Properties"]
    assert props["EventPattern"] == {
        "source": ["aws.states"],
        "detail-type": ["Step Functions Execution Status Change"],
        "detail": {
            "stateMachineArn": [{"Ref": "StateMachineArn"}],
            # StatusEvents=terminal: only the statuses that free a slot.
            "status": {
                "Fn::If": [
                    "TerminalEventsOnly",
                    ["SUCCEEDED", "FAILED", "TIMED_OUT", "ABORTED"],
                    {"Ref": "AWS::NoValue"},
                ]
            },
        },
    }
    assert template["Conditions"]["TerminalEventsOnly"] == {
        "Fn::Equals": [{"Ref": "StatusEvents"}, "terminal"]
    }
    assert template["Parameters"]["StatusEvents"]["Default"] == "all"
    assert [t["Arn"] for t in props["Targets"]] == [{"Fn::GetAtt": ["EventsQueue", "Arn"]}]
    assert props.get("State", "ENABLED") == "ENABLED"


def test_outputs_give_what_producers_and_operators_need(template: dict[str, Any]) -> None:
    outputs = template["Outputs"]
    for name in (
        "RequestQueueUrl",
        "DeadLetterQueueUrl",
        "EventsQueueUrl",
        "LimitParameterName",
        "MetricsEndpoint",
        "ServiceName",
    ):
        assert name in outputs, name
    assert outputs["RequestQueueUrl"]["Value"] == {"Ref": "RequestQueue"}
    assert ":8080/metrics" in outputs["MetricsEndpoint"]["Value"]["Fn::Sub"]


def test_loader_understands_every_short_tag() -> None:
    loaded = load_template(
        "a: !GetAtt Queue.Arn\nb: !Sub [x, {y: !Ref Z}]\nc: !If [C, 1, !Ref AWS::NoValue]\n"
    )
    assert loaded == {
        "a": {"Fn::GetAtt": ["Queue", "Arn"]},
        "b": {"Fn::Sub": ["x", {"y": {"Ref": "Z"}}]},
        "c": {"Fn::If": ["C", 1, {"Ref": "AWS::NoValue"}]},
    }


# -- the rule's delivery guarantees ---------------------------------------------------------


def _queues(template: dict[str, Any]) -> set[str]:
    return {k for k, v in template["Resources"].items() if v["Type"] == "AWS::SQS::Queue"}


def test_rule_target_retries_then_dead_letters_undeliverable_events(
    template: dict[str, Any],
) -> None:
    rule_id, rule = _resource(template, "AWS::Events::Rule")
    (target,) = rule["Properties"]["Targets"]
    retry = target["RetryPolicy"]
    # EventBridge's limits: 0-185 attempts, 60-86400 seconds.
    assert 0 < retry["MaximumRetryAttempts"] <= 185
    assert 60 <= retry["MaximumEventAgeInSeconds"] <= 86_400
    # Past an hour an event is stale: reconcile has corrected the ledger long before.
    assert retry["MaximumEventAgeInSeconds"] <= 3600
    dead_letter = target["DeadLetterConfig"]["Arn"]["Fn::GetAtt"]
    queue_id = dead_letter[0]
    assert dead_letter == [queue_id, "Arn"]
    assert queue_id in _queues(template)
    assert queue_id not in {"EventsQueue", "DeadLetterQueue", "RequestQueue"}, (
        "undelivered events must not mix with requests or feed the dispatcher"
    )
    assert template["Resources"][queue_id]["Properties"]["SqsManagedSseEnabled"] is True
    # EventBridge may send to it only on behalf of this rule.
    (policy,) = (
        r["Properties"]
        for r in template["Resources"].values()
        if r["Type"] == "AWS::SQS::QueuePolicy" and r["Properties"]["Queues"] == [{"Ref": queue_id}]
    )
    (statement,) = policy["PolicyDocument"]["Statement"]
    assert statement["Effect"] == "Allow"
    assert statement["Principal"] == {"Service": "events.amazonaws.com"}
    assert _as_list(statement["Action"]) == ["sqs:SendMessage"]
    assert statement["Resource"] == {"Fn::GetAtt": [queue_id, "Arn"]}
    assert statement["Condition"] == {
        "ArnEquals": {"aws:SourceArn": {"Fn::GetAtt": [rule_id, "Arn"]}}
    }


# -- alarms --------------------------------------------------------------------------------


def _alarms(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        k: v["Properties"]
        for k, v in template["Resources"].items()
        if v["Type"] == "AWS::CloudWatch::Alarm"
    }


def _alarm_metrics(alarm: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(namespace, metric name, {dimension: value}) of a plain or a metric-math alarm."""
    if "MetricName" in alarm:
        metrics = [alarm]
    else:
        metrics = [m["MetricStat"]["Metric"] for m in alarm["Metrics"] if "MetricStat" in m]
    return [
        (m["Namespace"], m["MetricName"], {d["Name"]: d["Value"] for d in m["Dimensions"]})
        for m in metrics
    ]


def _resource_of(template: dict[str, Any], value: Any, type_: str, attribute: str | None) -> str:
    """The logical id ``value`` refers to (``Ref``, or ``GetAtt`` of ``attribute``); asserts
    that it is a resource of ``type_`` in this template."""
    if attribute is None:
        assert set(value) == {"Ref"}, value
        logical_id = value["Ref"]
    else:
        assert set(value) == {"Fn::GetAtt"}, value
        logical_id, got = value["Fn::GetAtt"]
        assert got == attribute, value
    resource = template["Resources"].get(logical_id)
    assert resource is not None, f"{logical_id} is not a resource of the template"
    assert resource["Type"] == type_, f"{logical_id} is a {resource['Type']}, not a {type_}"
    return str(logical_id)


# Every dimension an alarm may use, and what its value must be: a resource of this template
# (resolved by _resource_of) or the governed state machine.
def _dimension_target(template: dict[str, Any], namespace: str, name: str, value: Any) -> str:
    match namespace, name:
        case "AWS/SQS", "QueueName":
            return _resource_of(template, value, "AWS::SQS::Queue", "QueueName")
        case "ECS/ContainerInsights", "ClusterName":
            return _resource_of(template, value, "AWS::ECS::Cluster", None)
        case "ECS/ContainerInsights", "ServiceName":
            return _resource_of(template, value, "AWS::ECS::Service", "Name")
        case "AWS/States", "StateMachineArn":
            assert value == {"Ref": "StateMachineArn"}
            return "StateMachineArn"
        case "AWS/States", "APIName":
            assert value == "StartExecution", "the only API the dispatcher calls at volume"
            return "StartExecution"
    raise AssertionError(f"unexpected dimension {namespace} {name}={value!r}")


# Documented metric names per namespace (SQS, ECS Container Insights, Step Functions).
KNOWN_METRICS = {
    "AWS/SQS": {"ApproximateAgeOfOldestMessage", "ApproximateNumberOfMessagesVisible"},
    "ECS/ContainerInsights": {"RunningTaskCount", "DesiredTaskCount"},
    "AWS/States": {"ExecutionThrottled", "ThrottledEvents"},
}


def test_every_alarm_watches_a_resource_of_this_template(template: dict[str, Any]) -> None:
    alarms = _alarms(template)
    assert alarms
    for alarm_id, alarm in alarms.items():
        metrics = _alarm_metrics(alarm)
        assert metrics, alarm_id
        for namespace, metric, dimensions in metrics:
            assert metric in KNOWN_METRICS.get(namespace, set()), (alarm_id, namespace, metric)
            assert dimensions, f"{alarm_id}: a metric without dimensions watches everything"
            for name, value in dimensions.items():
                _dimension_target(template, namespace, name, value)


def test_alarms_cover_the_signals_aws_already_has(template: dict[str, Any]) -> None:
    watched = {
        (metric, tuple(sorted(_dimension_target(template, ns, n, v) for n, v in dims.items())))
        for alarm in _alarms(template).values()
        for ns, metric, dims in _alarm_metrics(alarm)
    }
    (events_dead_letters,) = _queues(template) - {"RequestQueue", "DeadLetterQueue", "EventsQueue"}
    assert watched == {
        ("ApproximateAgeOfOldestMessage", ("RequestQueue",)),
        ("ApproximateNumberOfMessagesVisible", ("DeadLetterQueue",)),
        ("ApproximateAgeOfOldestMessage", ("EventsQueue",)),
        ("ApproximateNumberOfMessagesVisible", (events_dead_letters,)),
        ("RunningTaskCount", ("Cluster", "Service")),
        ("DesiredTaskCount", ("Cluster", "Service")),
        ("ExecutionThrottled", ("StateMachineArn",)),
        ("ThrottledEvents", ("StartExecution",)),
    }


def test_dead_letter_alarms_fire_on_the_first_message(template: dict[str, Any]) -> None:
    for alarm in _alarms(template).values():
        if alarm.get("MetricName") == "ApproximateNumberOfMessagesVisible":
            assert alarm["ComparisonOperator"] == "GreaterThanThreshold"
            assert alarm["Threshold"] == 0
            assert alarm["EvaluationPeriods"] == 1
            assert alarm["Statistic"] == "Maximum"


def test_request_age_alarm_threshold_is_a_parameter(template: dict[str, Any]) -> None:
    (alarm,) = (
        a
        for a in _alarms(template).values()
        if a.get("MetricName") == "ApproximateAgeOfOldestMessage"
        and a["Dimensions"][0]["Value"] == {"Fn::GetAtt": ["RequestQueue", "QueueName"]}
    )
    assert alarm["Threshold"] == {"Ref": "RequestAgeAlarmSeconds"}
    parameter = template["Parameters"]["RequestAgeAlarmSeconds"]
    # A backlog is normal while the limit is reached: the default allows an hour of it.
    assert parameter["Default"] == 3600
    assert parameter["MaxValue"] == 1_209_600, "the request queue's retention"


def test_task_count_alarm_compares_running_with_desired(template: dict[str, Any]) -> None:
    (alarm,) = (a for a in _alarms(template).values() if "Metrics" in a)
    by_id = {m["Id"]: m for m in alarm["Metrics"]}
    (expression,) = (m for m in alarm["Metrics"] if m.get("ReturnData", True))
    assert expression["Expression"] == "FILL(desired, 1) - FILL(running, 0)"
    assert by_id["desired"]["MetricStat"]["Metric"]["MetricName"] == "DesiredTaskCount"
    assert by_id["running"]["MetricStat"]["Metric"]["MetricName"] == "RunningTaskCount"
    assert alarm["ComparisonOperator"] == "GreaterThanThreshold"
    assert alarm["Threshold"] == 0
    # No data at all (Container Insights silent) counts as not running.
    assert alarm["TreatMissingData"] == "breaching"
    # Deployments stop the old task first: shorter gaps than 5 minutes are expected.
    assert alarm["EvaluationPeriods"] * by_id["running"]["MetricStat"]["Period"] >= 300
    # Those metrics exist only with Container Insights on the cluster.
    _, cluster = _resource(template, "AWS::ECS::Cluster")
    settings = cluster["Properties"]["ClusterSettings"]
    assert {"Name": "containerInsights", "Value": "enabled"} in settings


def test_alarms_notify_the_topic_only_when_one_is_given(template: dict[str, Any]) -> None:
    notify = {"Fn::If": ["HasAlarmTopic", [{"Ref": "AlarmTopicArn"}], {"Ref": "AWS::NoValue"}]}
    for alarm_id, alarm in _alarms(template).items():
        assert alarm["AlarmActions"] == notify, alarm_id
        assert alarm["OKActions"] == notify, alarm_id
        assert alarm.get("ActionsEnabled", True) is True
        assert "AlarmName" not in alarm, "generated names: two stacks must not collide"
    assert template["Conditions"]["HasAlarmTopic"] == {
        "Fn::Not": [{"Fn::Equals": [{"Ref": "AlarmTopicArn"}, ""]}]
    }
    parameter = template["Parameters"]["AlarmTopicArn"]
    assert parameter["Default"] == ""
    pattern = re.compile(parameter["AllowedPattern"])
    assert pattern.fullmatch("")
    assert pattern.fullmatch("arn:aws:sns:eu-west-1:123456789012:oncall")
    assert pattern.fullmatch("arn:aws-us-gov:sns:us-gov-west-1:123456789012:alerts.fifo")
    assert not pattern.fullmatch("oncall")
    assert not pattern.fullmatch("arn:aws:sqs:eu-west-1:123456789012:oncall")
    assert "SNS topic ARN" in parameter["ConstraintDescription"]
    groups = template["Metadata"]["AWS::CloudFormation::Interface"]["ParameterGroups"]
    assert any({"AlarmTopicArn", "RequestAgeAlarmSeconds"} <= set(g["Parameters"]) for g in groups)
