"""Executions as Step Functions records them: the ground truth for demos, tests and benchmarks."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types_aiobotocore_stepfunctions import SFNClient


@dataclass(frozen=True, slots=True)
class Execution:
    """One execution's name, status and start/stop times (Unix seconds)."""

    name: str
    arn: str
    status: str
    start: float
    stop: float | None


async def list_executions(sfn: SFNClient, state_machine_arn: str) -> list[Execution]:
    """Every execution of the machine, all statuses, all pages."""
    out: list[Execution] = []
    paginator = sfn.get_paginator("list_executions")
    async for page in paginator.paginate(
        stateMachineArn=state_machine_arn, PaginationConfig={"PageSize": 1000}
    ):
        for item in page["executions"]:
            stop: datetime | None = item.get("stopDate")
            out.append(
                Execution(
                    name=item["name"],
                    arn=item["executionArn"],
                    status=item["status"],
                    start=item["startDate"].timestamp(),
                    stop=stop.timestamp() if stop else None,
                )
            )
    return out


def concurrency_series(
    executions: Iterable[Execution], now: float | None = None
) -> list[tuple[float, int]]:
    """(time, running) at every start and stop, for plots."""
    return weighted_series(((ex, 1) for ex in executions), now)


def max_overlap(executions: Iterable[Execution], now: float | None = None) -> int:
    """The most executions running at one instant (a stop at t sorts before a start at t)."""
    return max((running for _, running in concurrency_series(executions, now)), default=0)


def weighted_series(
    runs: Iterable[tuple[Execution, int]], now: float | None = None
) -> list[tuple[float, int]]:
    """(time, units in use) at every start and stop, each execution counting its weight:
    the use of a named limit shared by several state machines (``runs``: execution and
    the weight of its pool). A stop at t sorts before a start at t."""
    end = now if now is not None else time.time()
    points: list[tuple[float, int]] = []
    for ex, weight in runs:
        points.append((ex.start, weight))
        points.append((ex.stop if ex.stop is not None else end, -weight))
    points.sort()
    series: list[tuple[float, int]] = []
    current = 0
    for at, delta in points:
        current += delta
        series.append((at, current))
    return series


def max_weighted_overlap(runs: Iterable[tuple[Execution, int]], now: float | None = None) -> int:
    """The most units of a named limit in use at one instant (see `weighted_series`)."""
    return max((units for _, units in weighted_series(runs, now)), default=0)


def weighted_at(runs: Iterable[tuple[Execution, int]], instant: float) -> int:
    """Units in use at ``instant`` (an execution starting then counts itself)."""
    return sum(
        weight
        for ex, weight in runs
        if ex.start <= instant and (ex.stop is None or ex.stop > instant)
    )
