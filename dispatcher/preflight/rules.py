"""EventBridge pattern matching and queue-policy evaluation, as AWS does them: pure, no I/O."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from dispatcher.daemon.events import DETAIL_TYPE, SOURCE


def status_pattern(state_machine_arn: str) -> dict[str, Any]:
    """The EventBridge pattern the dispatcher needs: this machine's status changes."""
    return {
        "source": [SOURCE],
        "detail-type": [DETAIL_TYPE],
        "detail": {"stateMachineArn": [state_machine_arn]},
    }


def sample_event(state_machine_arn: str, status: str) -> dict[str, Any]:
    """A status-change event of this machine as EventBridge delivers it (for matching)."""
    _, partition, _, region, account, _, name = state_machine_arn.split(":")
    execution = f"arn:{partition}:states:{region}:{account}:execution:{name}:check"
    return {
        "version": "0",
        "id": "00000000-0000-0000-0000-000000000000",
        "detail-type": DETAIL_TYPE,
        "source": SOURCE,
        "account": account,
        "region": region,
        "resources": [execution],
        "detail": {
            "executionArn": execution,
            "stateMachineArn": state_machine_arn,
            "name": "check",
            "status": status,
        },
    }


class UnsupportedPatternError(Exception):
    """The pattern uses an operator this check does not evaluate."""


_MISSING = object()


def matches(pattern: Mapping[str, Any], event: Mapping[str, Any]) -> bool:
    """EventBridge pattern matching: exact values, prefix, suffix, wildcard, anything-but,
    exists, equals-ignore-case and ``$or``; `UnsupportedPatternError` for anything else."""
    for key, expected in pattern.items():
        if key == "$or":
            if not any(matches(alternative, event) for alternative in expected):
                return False
            continue
        value = event.get(key, _MISSING)
        if isinstance(expected, Mapping):
            if not isinstance(value, Mapping) or not matches(expected, value):
                return False
        elif isinstance(expected, list):
            if not any(_matches_one(alternative, value) for alternative in expected):
                return False
        else:
            raise UnsupportedPatternError(f"{key}: {expected!r} is not a list")
    return True


def _matches_one(expected: Any, value: Any) -> bool:
    values = value if isinstance(value, list) else [value]
    if not isinstance(expected, Mapping):
        return value is not _MISSING and expected in values
    if len(expected) != 1:
        raise UnsupportedPatternError(json.dumps(expected))
    ((operator, argument),) = expected.items()
    if operator == "exists":
        return (value is not _MISSING) == bool(argument)
    if value is _MISSING:
        return False
    if operator == "anything-but" and not isinstance(argument, Mapping):
        excluded = argument if isinstance(argument, list) else [argument]
        return all(v not in excluded for v in values)
    test = _STRING_OPERATORS.get(operator)
    if test is None or not isinstance(argument, str):
        raise UnsupportedPatternError(json.dumps(expected))
    return any(test(v, argument) for v in values if isinstance(v, str))


_STRING_OPERATORS: dict[str, Callable[[str, str], bool]] = {
    "prefix": str.startswith,
    "suffix": str.endswith,
    "equals-ignore-case": lambda value, wanted: value.lower() == wanted.lower(),
    "wildcard": lambda value, pattern: glob(pattern, value),
}


def glob(pattern: str, value: str, *, ignore_case: bool = False) -> bool:
    """Wildcard match as IAM and EventBridge do it: ``*`` any run, ``?`` one character."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.IGNORECASE if ignore_case else 0) is not None


def mismatch(pattern: Mapping[str, Any], event: Mapping[str, Any]) -> list[str]:
    """The fields (``detail.x`` for nested ones) on which ``pattern`` rejects ``event``."""
    failing = []
    for key, expected in pattern.items():
        if matches({key: expected}, event):
            continue
        inner = event.get(key)
        if isinstance(expected, Mapping) and isinstance(inner, Mapping) and key != "$or":
            failing += [f"{key}.{name}" for name in mismatch(expected, inner)]
        else:
            failing.append(key)
    return failing


def policy_allows(document: Mapping[str, Any], queue: str, rule_arn: str) -> bool | None:
    """Whether a queue policy lets EventBridge send for ``rule_arn`` (None: cannot tell)."""
    statements = document.get("Statement", [])
    statements = [statements] if isinstance(statements, Mapping) else statements
    allow: bool | None = False
    deny: bool | None = False
    for statement in statements:
        applies = _applies(statement, queue, rule_arn)
        if statement.get("Effect") == "Deny":
            deny = True if applies is True else (None if applies is None and not deny else deny)
        elif applies is True or (applies is None and allow is False):
            allow = applies
    if deny is True:
        return False
    if allow is True and deny is False:
        return True
    return None if allow is not False else False


def _applies(statement: Mapping[str, Any], queue: str, rule_arn: str) -> bool | None:
    """Whether a statement covers EventBridge sending to ``queue`` for ``rule_arn``."""
    if any(k in statement for k in ("NotPrincipal", "NotAction", "NotResource")):
        return None
    principal = statement.get("Principal")
    if isinstance(principal, Mapping):
        principals = [*_listed(principal.get("AWS")), *_listed(principal.get("Service"))]
    else:
        principals = _listed(principal)
    actions = _listed(statement.get("Action"))
    covered = (
        bool({"*", "events.amazonaws.com"} & set(principals))
        and any(glob(a, "sqs:SendMessage", ignore_case=True) for a in actions)
        and any(glob(r, queue) for r in _listed(statement.get("Resource", "*")))
    )
    return _conditions_hold(statement.get("Condition", {}), rule_arn) if covered else False


def _conditions_hold(conditions: Mapping[str, Any], rule_arn: str) -> bool | None:
    """Evaluate ARN and string conditions on the source rule; None for any other kind."""
    known = {"aws:sourcearn": rule_arn, "aws:sourceaccount": rule_arn.split(":")[4]}
    for operator, block in conditions.items():
        base = operator.removesuffix("IfExists")
        kind = base.replace("Not", "")
        if kind not in {"ArnEquals", "ArnLike", "StringEquals", "StringLike"}:
            return None
        for key, expected in block.items():
            actual = known.get(key.lower())
            if actual is None:
                return None
            like = kind.endswith("Like")
            hit = any(glob(e, actual) if like else e == actual for e in _listed(expected))
            if hit == ("Not" in base):
                return False
    return True


def _listed(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


RULES_SID = "AllowTheStatusChangeRules"


def merged_policy(
    document: Mapping[str, Any] | None, queue: str, rule_arns: list[str]
) -> dict[str, Any]:
    """A queue policy that lets EventBridge send for every rule in ``rule_arns`` and keeps the
    rest of ``document``: what one pool's fix must be when several pools share the queue.

    Statements about EventBridge sending for one of those rules are replaced by one Allow
    naming them all; a Deny that keeps out every other rule (``ArnNotEquals`` on
    ``aws:SourceArn``, as the CloudFormation template writes it) is kept, widened to them all.
    Statements about anything else are kept as they are.
    """
    statements = (document or {}).get("Statement", [])
    statements = [statements] if isinstance(statements, Mapping) else list(statements)
    source: str | list[str] = rule_arns[0] if len(rule_arns) == 1 else rule_arns
    kept: list[Any] = []
    for statement in statements:
        if not isinstance(statement, Mapping) or statement.get("Sid") == RULES_SID:
            continue
        if not any(_applies(statement, queue, arn) is not False for arn in rule_arns):
            kept.append(statement)
        elif statement.get("Effect") == "Deny" and _guards_source(statement):
            kept.append({**statement, "Condition": {"ArnNotEquals": {"aws:SourceArn": source}}})
    allow = {
        "Sid": RULES_SID,
        "Effect": "Allow",
        "Principal": {"Service": "events.amazonaws.com"},
        "Action": "sqs:SendMessage",
        "Resource": queue,
        "Condition": {"ArnEquals": {"aws:SourceArn": source}},
    }
    return {"Version": (document or {}).get("Version", "2012-10-17"), "Statement": [allow, *kept]}


def _guards_source(statement: Mapping[str, Any]) -> bool:
    """Whether a statement's only condition is ``ArnNotEquals``/``ArnNotLike`` on the source."""
    conditions = statement.get("Condition", {})
    return (
        isinstance(conditions, Mapping)
        and len(conditions) == 1
        and next(iter(conditions)) in {"ArnNotEquals", "ArnNotLike"}
        and [k.lower() for k in next(iter(conditions.values()))] == ["aws:sourcearn"]
    )
