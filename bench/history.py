"""Read what each execution did from its own history: when its work ran, what it cost."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from devtools.records import Execution

if TYPE_CHECKING:
    from types_aiobotocore_stepfunctions import SFNClient

WORK_STATE = "Work"  # the Wait state that stands for the request's work, in every machine


@dataclass(frozen=True, slots=True)
class Trace:
    """One execution's history, boiled down."""

    name: str
    work_start: float | None  # entered the Work state (Unix seconds)
    work_stop: float | None  # left it
    states_entered: int
    task_calls: int  # service integrations called, retries included (DynamoDB, semaphore)
    retries: int  # task attempts after the first, per state entered (Retry fields)
    # Service calls made by states the history does not show (MiniStack records no events
    # of states inside a Parallel branch), by resource ARN.
    unrecorded_calls: Counter[str] = field(default_factory=Counter)

    @property
    def transitions(self) -> int:
        """What Step Functions Standard bills: every state entered, and every retry."""
        return self.states_entered + self.retries


async def trace(sfn: SFNClient, execution: Execution, work_state: str = WORK_STATE) -> Trace:
    """Page through one execution's history; the work is the time in ``work_state``."""
    work_start = work_stop = None
    entered = task_calls = retries = 0
    attempts: int | None = None  # attempts in the recorded Task state we are in, if any
    unrecorded: Counter[str] = Counter()
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"nextToken": token} if token else {}
        page = await sfn.get_execution_history(
            executionArn=execution.arn, maxResults=1000, includeExecutionData=False, **kwargs
        )
        for event in page["events"]:
            kind = event["type"]
            if kind.endswith("StateEntered"):
                entered += 1
                attempts = 0 if kind == "TaskStateEntered" else None
                if event.get("stateEnteredEventDetails", {}).get("name") == work_state:
                    work_start = event["timestamp"].timestamp()
            elif kind.endswith("StateExited"):
                attempts = None
                if event.get("stateExitedEventDetails", {}).get("name") == work_state:
                    work_stop = event["timestamp"].timestamp()
            elif kind == "TaskScheduled":
                task_calls += 1
                if attempts is None:
                    unrecorded[event["taskScheduledEventDetails"]["resource"]] += 1
                else:
                    retries += attempts > 0
                    attempts += 1
        token = page.get("nextToken")
        if not token:
            return Trace(
                execution.name, work_start, work_stop, entered, task_calls, retries, unrecorded
            )


async def trace_all(
    sfn: SFNClient,
    executions: Sequence[Execution],
    concurrency: int = 16,
    work_state: str = WORK_STATE,
) -> dict[str, Trace]:
    """Trace every execution, ``concurrency`` at a time; keyed by execution name."""
    out: dict[str, Trace] = {}
    limiter = anyio.CapacityLimiter(concurrency)

    async def one(execution: Execution) -> None:
        async with limiter:
            out[execution.name] = await trace(sfn, execution, work_state)

    async with anyio.create_task_group() as tg:
        for execution in executions:
            tg.start_soon(one, execution)
    return out
