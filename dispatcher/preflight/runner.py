"""Running the checks: all of them concurrently, in a fixed report order, never a traceback."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import anyio

from dispatcher.aws.api import AWS_ERRORS
from dispatcher.preflight.checks import (
    CREDENTIALS_FIX,
    check_dead_letter_size,
    check_endpoint,
    check_list_executions,
    check_redrive,
    check_standard,
    check_state_machine,
    check_stop_executions,
    check_task_tokens,
    check_visibility,
    queue_exists,
)
from dispatcher.preflight.context import (
    DEAD_LETTERS,
    EVENTS,
    REQUESTS,
    Context,
    Target,
    load_target,
    open_clients,
)
from dispatcher.preflight.report import (
    Check,
    Finding,
    Report,
    Result,
    Scope,
    Skip,
    Status,
    is_denied,
    text,
)
from dispatcher.preflight.wiring import (
    check_lease_table,
    check_limit_parameter,
    check_named_limit_parameter,
    check_policy,
    check_rule,
)

# The endpoint goes first, alone: when AWS cannot be reached the rest are skipped.
ENDPOINT = Check("endpoint", "AWS endpoint and credentials", check_endpoint)
# In report order; a pool's check runs once per pool, a queue's once per request queue.
CHECKS: tuple[Check, ...] = (
    Check("state_machine", "state machine exists", check_state_machine, Scope.POOL),
    Check("state_machine_type", "state machine is STANDARD", check_standard, Scope.POOL),
    Check("list_executions", "ListExecutions permitted", check_list_executions, Scope.POOL),
    Check("task_tokens", "parents answered (task tokens)", check_task_tokens),
    Check("stop_executions", "orphaned children stopped", check_stop_executions, Scope.POOL),
    Check("request_queue", "requests queue exists", queue_exists(REQUESTS), Scope.QUEUE),
    Check("redrive", "requests dead-lettering", check_redrive, Scope.QUEUE),
    Check("dead_letter_queue", "dead-letter queue exists", queue_exists(DEAD_LETTERS)),
    Check("dead_letter_size", "dead-letter message size", check_dead_letter_size, Scope.QUEUE),
    Check("visibility_timeout", "visibility timeout", check_visibility, Scope.QUEUE),
    Check("events_queue", "events queue exists", queue_exists(EVENTS)),
    Check("events_rule", "EventBridge rule to events queue", check_rule, Scope.POOL),
    Check("events_queue_policy", "events queue policy", check_policy, Scope.POOL),
    Check("limit_parameter", "limit parameter (SSM)", check_limit_parameter, Scope.POOL),
    Check(
        "named_limit_parameter",
        "named limit parameter (SSM)",
        check_named_limit_parameter,
        Scope.LIMIT,
    ),
    Check("lease_table", "lease table (DynamoDB)", check_lease_table),
)


async def run_checks(
    overrides: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    endpoint_url: str | None = None,
) -> Report:
    """Run every check, of every pool and request queue; ``env`` stands in for the process
    environment (``DISPATCHER_*``, and ``DISPATCHER_CONFIG`` naming the config file).

    Credentials and endpoint come from the standard ``AWS_*`` variables; ``endpoint_url``
    wins over ``AWS_ENDPOINT_URL``. The endpoint is checked first: when AWS cannot be
    reached the other checks are skipped rather than failing one by one.
    """
    target, settings = load_target(overrides or {}, env)
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    if len(target.pools) > 1:
        machines = f"{len(target.pools)} pools ({', '.join(p.name for p in target.pools)})"
    else:
        machines = target.get("state_machine_arn") or (
            target.pools[0].state_machine_arn if target.pools else "(no state machine)"
        )
    subject = f"{machines} in {target.region}" + (f" at {endpoint}" if endpoint else "")
    scoped = [(check, about) for check in CHECKS for about in _subjects(check, target)]
    results: list[Result | None] = [None] * len(scoped)
    try:
        async with open_clients(target, endpoint_url) as clients:
            ctx = Context(target, clients, endpoint)
            first = await run_one(ENDPOINT, ctx)
            if first.status is not Status.FAIL:
                async with anyio.create_task_group() as tg:
                    for index, (check, about) in enumerate(scoped):
                        tg.start_soon(_store, results, index, check, ctx.scoped(about))
    except AWS_ERRORS as exc:  # e.g. AWS_PROFILE names no profile: fails before any call
        first = _result(ENDPOINT, Finding(Status.FAIL, text(exc), CREDENTIALS_FIX))
    skipped = Finding(Status.SKIP, "AWS cannot be reached (see above)")
    rest = [
        r or _result(c, skipped, about.about) for r, (c, about) in zip(results, scoped, strict=True)
    ]
    lines = tuple(Result.of("settings", "settings", finding) for finding in settings)
    return Report(subject, (*lines, first, *rest))


def _subjects(check: Check, target: Target) -> list[Target]:
    """The targets ``check`` runs on: the whole target, or each pool's, queue's or named
    limit's copy (a check of named limits runs on none when there are none)."""
    if check.scope is Scope.LIMIT:
        return [target.for_limit(named) for named in target.limits]
    if check.scope is Scope.POOL and target.pools:
        return [target.for_pool(pool) for pool in target.pools]
    if check.scope is Scope.QUEUE and target.queues:
        return [target.for_queue(queue) for queue in target.queues]
    return [target]


async def run_one(check: Check, ctx: Context) -> Result:
    """One check; an AWS error it did not expect is a FAIL line, never a traceback."""
    try:
        finding = await check.run(ctx)
    except Skip as exc:
        finding = Finding(Status.SKIP, str(exc))
    except AWS_ERRORS as exc:
        hint = "grant the permission named in the error to the role" if is_denied(exc) else ""
        finding = Finding(Status.FAIL, text(exc), hint)
    except Exception as exc:  # noqa: BLE001 - an answer of a shape we did not expect (or a bug
        # here) must not hide the other checks' lines; unverified counts as failed.
        finding = Finding(Status.FAIL, f"could not evaluate: {type(exc).__name__}: {exc}")
    return _result(check, finding, ctx.target.about)


async def _store(into: list[Result | None], index: int, check: Check, ctx: Context) -> None:
    into[index] = await run_one(check, ctx)


def _result(check: Check, finding: Finding, about: str = "") -> Result:
    return Result.of(check.id, check.title, finding, about)
