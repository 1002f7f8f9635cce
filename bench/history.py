"""Read what each execution did from its own history: when its work ran, what it cost."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from dispatcher.records import Execution

if TYPE_CHECKING:
    from types_aiobotocore_stepfunctions import SFNClient

WORK_STATE = "Work"  # the Wait state that stands for the request's work, in every machine


@dataclass(frozen=True, slots=True)
class Trace:
    """One execution's history, boiled down."""

    name: str
    work_start: float | None  # entered the Work state (Unix seconds)
    work_stop: float | None  # left it
    transitions: int  # states entered: what Step Functions Standard bills
    task_calls: int  # service integrations called (DynamoDB requests, for the semaphore)


async def trace(sfn: SFNClient, execution: Execution) -> Trace:
    """Page through one execution's history."""
    work_start = work_stop = None
    transitions = task_calls = 0
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"nextToken": token} if token else {}
        page = await sfn.get_execution_history(
            executionArn=execution.arn, maxResults=1000, includeExecutionData=False, **kwargs
        )
        for event in page["events"]:
            kind = event["type"]
            if kind.endswith("StateEntered"):
                transitions += 1
                if event.get("stateEnteredEventDetails", {}).get("name") == WORK_STATE:
                    work_start = event["timestamp"].timestamp()
            elif kind.endswith("StateExited"):
                if event.get("stateExitedEventDetails", {}).get("name") == WORK_STATE:
                    work_stop = event["timestamp"].timestamp()
            elif kind == "TaskScheduled":
                task_calls += 1
        token = page.get("nextToken")
        if not token:
            return Trace(execution.name, work_start, work_stop, transitions, task_calls)


async def trace_all(
    sfn: SFNClient, executions: Sequence[Execution], concurrency: int = 16
) -> dict[str, Trace]:
    """Trace every execution, ``concurrency`` at a time; keyed by execution name."""
    out: dict[str, Trace] = {}
    limiter = anyio.CapacityLimiter(concurrency)

    async def one(execution: Execution) -> None:
        async with limiter:
            out[execution.name] = await trace(sfn, execution)

    async with anyio.create_task_group() as tg:
        for execution in executions:
            tg.start_soon(one, execution)
    return out
