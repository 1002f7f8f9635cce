"""The checks of what surrounds the dispatcher: EventBridge rule, queue policy, SSM, DynamoDB.

The rule and the events queue's policy decide whether status changes arrive at all; the limit
parameter and the lease table are optional and checked only when their variables are set.
"""

from __future__ import annotations

import json
import re

from botocore.exceptions import ClientError

from dispatcher.core.ledger import TERMINAL_STATUSES
from dispatcher.daemon.limits import parse_limit
from dispatcher.preflight.context import EVENTS, Context, Rule
from dispatcher.preflight.report import Finding, Skip, Status, is_denied, text
from dispatcher.preflight.rules import (
    UnsupportedPatternError,
    matches,
    merged_policy,
    mismatch,
    policy_allows,
    sample_event,
    status_pattern,
)

LEASE_KEY = "pool"
ALL_STATUSES = ("RUNNING", *sorted(TERMINAL_STATUSES))


def rule_fix(ctx: Context, name: str, queue: str, *, target: bool) -> str:
    """The commands that create (or correct) the rule and point it at the events queue."""
    pattern = json.dumps(status_pattern(ctx.target.need("state_machine_arn")))
    lines = [ctx.aws("events", "put-rule", "--name", name, "--event-pattern", pattern)]
    if target:
        targets = f"Id=dispatcher-events-queue,Arn={queue}"
        lines.append(ctx.aws("events", "put-targets", "--rule", name, "--targets", targets))
    return "\n".join(lines)


async def check_rule(ctx: Context) -> Finding:  # noqa: PLR0912 - a branch per way a rule fails
    """An ENABLED rule sends this machine's status changes, untransformed, to the events queue."""
    arn = ctx.target.need("state_machine_arn")
    queue = (await ctx.queue_or_skip(EVENTS))["QueueArn"]
    try:
        rules = await ctx.rules()
    except ClientError as exc:
        if not is_denied(exc):
            raise
        return Finding(Status.WARN, f"cannot inspect the rules: {text(exc)}", _NOT_NEEDED)
    if not rules:
        name = f"sfn-dispatcher-{arn.rsplit(':', 1)[-1]}"[:64]
        return Finding(
            Status.FAIL,
            f"no EventBridge rule on the default bus targets {queue}: finished executions "
            "free their slots only at the next reconcile",
            rule_fix(ctx, name, queue, target=True)
            + "\nthen run check again: the events queue policy line says whether it may send",
        )
    # Several pools share the events queue, each with its own rule: only the rules that match
    # this machine's events matter, and one good rule is enough.
    problems: list[str] = []
    fixes: list[str] = []
    unmatched: list[str] = []
    partial: Finding | None = None
    for rule in rules:
        if rule.pattern is None:
            problems.append(f"{rule.name} has no event pattern")
            continue
        try:
            matched = {s for s in ALL_STATUSES if matches(rule.pattern, sample_event(arn, s))}
        except UnsupportedPatternError as exc:
            problems.append(f"{rule.name}: cannot evaluate {exc}")
            continue
        if not matched & TERMINAL_STATUSES:
            fields = ", ".join(mismatch(rule.pattern, sample_event(arn, "SUCCEEDED")))
            unmatched.append(f"{rule.name} does not match this machine's events (on {fields})")
            fixes.append(rule_fix(ctx, rule.name, queue, target=False))
        elif rule.state != "ENABLED":
            problems.append(f"{rule.name} is {rule.state}")
            fixes.insert(0, ctx.aws("events", "enable-rule", "--name", rule.name))
        elif any(k in t for t in rule.targets for k in ("Input", "InputPath", "InputTransformer")):
            problems.append(f"{rule.name} rewrites the event; the dispatcher reads the envelope")
            fixes.insert(0, f"remove Input/InputPath/InputTransformer from {rule.name}'s target")
        elif missing := TERMINAL_STATUSES - matched:
            partial = partial or Finding(
                Status.WARN,
                f"{rule.name} drops {', '.join(sorted(missing))} events: those executions "
                "free their slots only at the next reconcile",
                rule_fix(ctx, rule.name, queue, target=False),
            )
        else:
            return Finding(Status.OK, f"{rule.name} (ENABLED) sends this machine's events")
    if partial is not None:
        return partial
    if problems:  # a rule for this machine, but disabled, rewriting or unreadable
        status = Status.FAIL if fixes else Status.WARN
        fixes = [f for f in fixes if not f.startswith("aws events put-rule")] or fixes
        return Finding(status, "; ".join(problems), "\n".join(fixes) or "check the rule by hand")
    name = f"sfn-dispatcher-{arn.rsplit(':', 1)[-1]}"[:64]
    return Finding(
        Status.FAIL,
        "; ".join(unmatched) + f": no rule sends this machine's events to {queue}",
        "\n".join(fixes)  # the one rule of the one pool: correct it
        if len(unmatched) == 1 and len(ctx.target.pools) <= 1
        else rule_fix(ctx, name, queue, target=True),
    )


def _sends_endings(rule: Rule, arn: str) -> bool:
    """Whether ``rule`` matches some of this machine's terminal status events."""
    if rule.pattern is None:
        return False
    try:
        return any(matches(rule.pattern, sample_event(arn, s)) for s in TERMINAL_STATUSES)
    except UnsupportedPatternError:
        return True  # cannot tell: let the policy be judged for it


_NOT_NEEDED = (
    "the dispatcher itself does not need this permission: run check with credentials that "
    "may read it (events:ListRuleNamesByTarget, events:DescribeRule, "
    "events:ListTargetsByRule, dynamodb:DescribeTable)"
)


async def check_policy(ctx: Context) -> Finding:
    """On AWS a queue takes EventBridge's messages only if its policy allows the rule: for
    each pool, one of the rules that send its machine's events.

    The fix is one policy for the whole queue: it allows the rules of every pool that shares
    it and keeps the policy's other statements, so that correcting one pool cannot break
    another.
    """
    attributes = await ctx.queue_or_skip(EVENTS)
    queue = attributes["QueueArn"]
    every = await ctx.rules_or_skip()
    if not every:
        raise Skip("no rule targets the events queue (see above)")
    rules = every
    arn = ctx.target.get("state_machine_arn")
    if arn is not None:
        rules = [rule for rule in every if _sends_endings(rule, arn)]
        if not rules:
            raise Skip("no rule sends this machine's events to the events queue (see above)")
    machines = [p.state_machine_arn for p in ctx.target.pools] or ([arn] if arn else [])
    needed = [r.arn for r in every if any(_sends_endings(r, m) for m in machines)]
    needed = needed or [r.arn for r in rules]
    raw = attributes.get("Policy")
    document = json.loads(raw) if raw else None
    policy = json.dumps(merged_policy(document, queue, needed))
    shared = len(machines) > 1
    fix = (
        ("allow the rules of every pool on this queue" if shared else "allow the rule")
        + (" (keeps the policy's other statements): " if raw else ": ")
        + ctx.aws(
            "sqs",
            "set-queue-attributes",
            "--queue-url",
            ctx.target.need(EVENTS.field),
            "--attributes",
            json.dumps({"Policy": policy}),
        )
    )
    if document is None:
        return Finding(Status.FAIL, "no queue policy: EventBridge may not send to it", fix)
    verdicts = {rule.name: policy_allows(document, queue, rule.arn) for rule in rules}
    allowed = [name for name, verdict in verdicts.items() if verdict is True]
    if allowed:
        return Finding(Status.OK, f"events.amazonaws.com may send for {', '.join(allowed)}")
    if None in verdicts.values():
        return Finding(
            Status.WARN,
            "the policy has statements or conditions this check cannot evaluate",
            "make sure it allows events.amazonaws.com sqs:SendMessage with aws:SourceArn "
            + ", ".join(needed),
        )
    names = ", ".join(verdicts)
    return Finding(Status.FAIL, f"the policy does not let EventBridge send for {names}", fix)


async def check_limit_parameter(ctx: Context) -> Finding:
    """The SSM limit parameter is readable and holds a non-negative integer."""
    name = ctx.target.limit_parameter
    if name is None or ctx.clients.ssm is None:
        limit = ctx.target.get("limit")
        raise Skip(
            f"{ctx.target.name('limit_parameter')} unset: the limit is "
            f"{ctx.target.name('limit')} ({limit})"
        )
    limit = ctx.target.get("limit")
    value = str(10 if limit is None else limit)
    put = ctx.aws(
        "ssm", "put-parameter", "--name", name, "--type", "String", "--value", value, "--overwrite"
    )
    try:
        got = await ctx.clients.ssm.get_parameter(Name=name)
    except ClientError as exc:
        if is_denied(exc):
            return Finding(Status.FAIL, text(exc), f"grant ssm:GetParameter on {name}")
        return Finding(
            Status.FAIL, f"{ctx.target.name('limit_parameter')}={name}: {text(exc)}", put
        )
    found = got.get("Parameter", {}).get("Value", "")
    if not re.fullmatch(r"\d+", found.strip()):
        return Finding(Status.FAIL, f"{name} is {found!r}, not a non-negative integer", put)
    return Finding(Status.OK, f"{name} = {int(found)}")


async def check_named_limit_parameter(ctx: Context) -> Finding:
    """A named limit's SSM parameter is readable, holds a limit (0 to the maximum), and is
    not below the weight of a pool that uses it (that pool could start nothing)."""
    named = ctx.target.named
    assert named is not None  # noqa: S101 - a named limit's copy only (Scope.LIMIT)
    where = f"[limits.{named.name}]"
    name = named.limit_parameter
    if name is None or ctx.clients.ssm is None:
        raise Skip(f"{where} limit_parameter unset: the value is {where} limit ({named.limit})")
    users = {p.name: p.uses[named.name] for p in ctx.target.fed}

    def put(value: int) -> str:
        return ctx.aws(
            "ssm", "put-parameter", "--name", name, "--type", "String", "--value", str(value),
            "--overwrite",
        )  # fmt: skip

    try:
        got = await ctx.clients.ssm.get_parameter(Name=name)
    except ClientError as exc:
        if is_denied(exc):
            return Finding(Status.FAIL, text(exc), f"grant ssm:GetParameter on {name}")
        return Finding(
            Status.FAIL, f"{where} limit_parameter={name}: {text(exc)}", put(named.limit)
        )
    try:
        value = parse_limit(str(got.get("Parameter", {}).get("Value", "")))
    except ValueError as exc:
        return Finding(Status.FAIL, f"{where} limit_parameter={name}: {exc}", put(named.limit))
    shown = ", ".join(f"{pool} x{weight}" for pool, weight in users.items()) or "no pool"
    if value == 0:
        return Finding(
            Status.WARN,
            f"{name} = 0: named limit {named.name} is paused; its pools ({shown}) start nothing",
            f"sfn-dispatcher resume --named-limit {named.name} (when the pause is over)",
        )
    above = {pool: weight for pool, weight in users.items() if weight > value}
    if above:
        heaviest = max(above.values())
        pools = ", ".join(f"{pool} ({weight})" for pool, weight in above.items())
        tables = ", ".join(f"[pools.{pool}]" for pool in above)
        plural = len(above) > 1
        return Finding(
            Status.FAIL,
            f"{name} = {value}: below the weight{'s' if plural else ''} of pool"
            f"{'s' if plural else ''} {pools} (uses {named.name}): "
            f"{'they' if plural else 'it'} could start nothing",
            f"raise the value to {heaviest} or more: {put(max(heaviest, named.limit))}\n"
            f"or lower the weight in {tables} uses",
        )
    return Finding(Status.OK, f"{name} = {value} (used by {shown})")


async def check_lease_table(ctx: Context) -> Finding:
    """The lease table exists, is usable, and is keyed by ``pool`` alone."""
    table = ctx.target.lease_table
    if table is None or ctx.clients.dynamodb is None:
        raise Skip(f"{ctx.target.name('lease_table')} unset: no single-active lease")
    create = ctx.aws(
        "dynamodb",
        "create-table",
        "--table-name",
        table,
        "--attribute-definitions",
        f"AttributeName={LEASE_KEY},AttributeType=S",
        "--key-schema",
        f"AttributeName={LEASE_KEY},KeyType=HASH",
        "--billing-mode",
        "PAY_PER_REQUEST",
    )
    try:
        described = (await ctx.clients.dynamodb.describe_table(TableName=table))["Table"]
    except ClientError as exc:
        if is_denied(exc):
            return Finding(Status.WARN, f"cannot describe {table}: {text(exc)}", _NOT_NEEDED)
        return Finding(
            Status.FAIL, f"{ctx.target.name('lease_table')}={table}: {text(exc)}", create
        )
    keys = {k["KeyType"]: k["AttributeName"] for k in described.get("KeySchema", [])}
    types = {
        a["AttributeName"]: a["AttributeType"] for a in described.get("AttributeDefinitions", [])
    }
    if keys != {"HASH": LEASE_KEY} or types.get(LEASE_KEY) != "S":
        return Finding(
            Status.FAIL,
            f"{table} is keyed by {keys}; the lease needs partition key {LEASE_KEY} (string) "
            "and no sort key",
            "a key schema cannot change: create a new table and point the variable at it: "
            + create,
        )
    state = described.get("TableStatus", "ACTIVE")
    if state not in {"ACTIVE", "UPDATING"}:
        return Finding(Status.WARN, f"{table} is {state}", "wait until it is ACTIVE")
    return Finding(Status.OK, f"{table} ({state}, key {LEASE_KEY})")
