"""The three patterns compared, each run against a fresh emulator with the same requests.

Every pattern returns a `PatternRun`: when each request's work ran (from the executions'
own records), how many AWS calls it took, and what it left unfinished.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from bench.analysis import Interval
from bench.history import WORK_STATE, Trace, trace_all
from bench.workload import Submitted
from devtools.records import Execution, list_executions

if TYPE_CHECKING:
    from types_aiobotocore_stepfunctions import SFNClient


@dataclass
class PatternRun:
    """What one pattern did with the request stream."""

    name: str
    title: str
    limit: int
    requests: int
    submitted: Submitted
    work: list[Interval]  # when each request's work ran: what the limit is about
    executions: list[Interval]  # each execution's life (differs from work for the semaphore)
    calls: Counter[str]  # AWS API calls made by the pattern, by operation
    traces: dict[str, Trace]
    complete: bool
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    # Transitions the emulator's histories do not show (states inside Parallel branches),
    # worked out by the pattern from the calls those states made.
    unrecorded_transitions: int = 0

    @property
    def transitions(self) -> int:
        """State transitions of every execution (Standard workflows bill these, retries too)."""
        return sum(t.transitions for t in self.traces.values()) + self.unrecorded_transitions

    @property
    def task_calls(self) -> int:
        """Service-integration calls made from inside the workflows."""
        return sum(t.task_calls for t in self.traces.values())


async def wait_finished(sfn: SFNClient, machine_arn: str, *, within: float) -> bool:
    """Poll until no execution of the machine runs; False if ``within`` seconds pass first."""
    with anyio.move_on_after(within):
        # Polling: nothing pushes "all done" to us.
        while True:
            page = await sfn.list_executions(
                stateMachineArn=machine_arn, statusFilter="RUNNING", maxResults=1
            )
            if not page["executions"]:
                return True
            await anyio.sleep(1.0)
    return False


async def collect(
    sfn: SFNClient, machine_arn: str, *, work_state: str | None = None
) -> tuple[list[Execution], dict[str, Trace], list[Interval], list[Interval]]:
    """List and trace every finished execution; return (executions, traces, work, lives).

    Without ``work_state`` the work of a request is its whole execution (what the
    dispatcher and check-then-act limit); with it, the time spent in that state.
    """
    executions = [e for e in await list_executions(sfn, machine_arn) if e.stop is not None]
    traces = await trace_all(sfn, executions, work_state=work_state or WORK_STATE)
    lives = [Interval(e.name, e.start, e.stop) for e in executions if e.stop is not None]
    if work_state is None:
        return executions, traces, lives, lives
    work = [
        Interval(t.name, t.work_start, t.work_stop)
        for t in traces.values()
        if t.work_start is not None and t.work_stop is not None
    ]
    return executions, traces, work, lives


def by_operation(calls: Mapping[str, float]) -> Counter[str]:
    """Whole-number call counts (Prometheus reports floats)."""
    return Counter({op: int(n) for op, n in calls.items() if n})
