"""Running the checks: all of them concurrently, in a fixed report order, never a traceback."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import anyio

from dispatcher.aws import AWS_ERRORS
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
    load_target,
    open_clients,
)
from dispatcher.preflight.report import (
    Check,
    Finding,
    Report,
    Result,
    Skip,
    Status,
    is_denied,
    text,
)
from dispatcher.preflight.wiring import (
    check_lease_table,
    check_limit_parameter,
    check_policy,
    check_rule,
)

# The endpoint goes first, alone: when AWS cannot be reached the rest are skipped.
ENDPOINT = Check("endpoint", "AWS endpoint and credentials", check_endpoint)
# In report order.
CHECKS: tuple[Check, ...] = (
    Check("state_machine", "state machine exists", check_state_machine),
    Check("state_machine_type", "state machine is STANDARD", check_standard),
    Check("list_executions", "ListExecutions permitted", check_list_executions),
    Check("task_tokens", "parents answered (task tokens)", check_task_tokens),
    Check("stop_executions", "orphaned children stopped", check_stop_executions),
    Check("request_queue", "requests queue exists", queue_exists(REQUESTS)),
    Check("redrive", "requests dead-lettering", check_redrive),
    Check("dead_letter_queue", "dead-letter queue exists", queue_exists(DEAD_LETTERS)),
    Check("dead_letter_size", "dead-letter message size", check_dead_letter_size),
    Check("visibility_timeout", "visibility timeout", check_visibility),
    Check("events_queue", "events queue exists", queue_exists(EVENTS)),
    Check("events_rule", "EventBridge rule to events queue", check_rule),
    Check("events_queue_policy", "events queue policy", check_policy),
    Check("limit_parameter", "limit parameter (SSM)", check_limit_parameter),
    Check("lease_table", "lease table (DynamoDB)", check_lease_table),
)


async def run_checks(
    overrides: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    endpoint_url: str | None = None,
) -> Report:
    """Run every check; ``env`` stands in for the process environment's ``DISPATCHER_*``.

    Credentials and endpoint come from the standard ``AWS_*`` variables; ``endpoint_url``
    wins over ``AWS_ENDPOINT_URL``. The endpoint is checked first: when AWS cannot be
    reached the other checks are skipped rather than failing one by one.
    """
    target, settings = load_target(overrides or {}, env)
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    subject = f"{target.get('state_machine_arn') or '(no state machine)'} in {target.region}"
    subject += f" at {endpoint}" if endpoint else ""
    results: list[Result | None] = [None] * len(CHECKS)
    try:
        async with open_clients(target, endpoint_url) as clients:
            ctx = Context(target, clients, endpoint)
            first = await run_one(ENDPOINT, ctx)
            if first.status is not Status.FAIL:
                async with anyio.create_task_group() as tg:
                    for index, check in enumerate(CHECKS):
                        tg.start_soon(_store, results, index, check, ctx)
    except AWS_ERRORS as exc:  # e.g. AWS_PROFILE names no profile: fails before any call
        first = _result(ENDPOINT, Finding(Status.FAIL, text(exc), CREDENTIALS_FIX))
    skipped = Finding(Status.SKIP, "AWS cannot be reached (see above)")
    rest = [r or _result(c, skipped) for r, c in zip(results, CHECKS, strict=True)]
    return Report(subject, (Result.of("settings", "settings", settings), first, *rest))


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
    return _result(check, finding)


async def _store(into: list[Result | None], index: int, check: Check, ctx: Context) -> None:
    into[index] = await run_one(check, ctx)


def _result(check: Check, finding: Finding) -> Result:
    return Result.of(check.id, check.title, finding)
