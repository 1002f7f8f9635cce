"""Reconcile: the API is the truth. List RUNNING executions, adopt and free accordingly.

A listing is eventually consistent, so nothing is freed on its word alone: a held
execution missing from it (and older than the grace window) is confirmed with
``DescribeExecution`` first. Every correction is logged and counted as drift. With
every status event lost, reconcile alone keeps the pool moving.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import anyio
import structlog

from dispatcher.aws.api import AWS_ERRORS, Clients, error_code
from dispatcher.core.ledger import Change
from dispatcher.daemon.health import Health
from dispatcher.daemon.metrics import Metrics
from dispatcher.daemon.pool import Pool
from dispatcher.daemon.readbudget import ReadBudget
from dispatcher.settings.config import Settings

if TYPE_CHECKING:
    from types_aiobotocore_stepfunctions.type_defs import ListExecutionsInputTypeDef

log = structlog.get_logger("dispatcher.reconcile")

_DESCRIBE_CONCURRENCY = 8  # DescribeExecution refills at 10-15/s per account


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    """What one pass found."""

    listed: int
    adopted: int
    freed: int
    confirmed: int


class Reconciler:
    """Periodic ListExecutions + DescribeExecution for one pool."""

    def __init__(
        self,
        settings: Settings,
        clients: Clients,
        pool: Pool,
        metrics: Metrics,
        health: Health,
        *,
        queue_urls: Sequence[str] = (),
        budget: ReadBudget | None = None,
        phase: float = 0.0,
    ) -> None:
        """``budget`` paces the pass's reads (none: unpaced); ``phase`` (0 to 1) offsets the
        first pass by that share of the interval, so that pools do not reconcile together."""
        self.settings = settings
        self.queue_urls = tuple(queue_urls) or (
            (settings.request_queue_url,) if settings.request_queue_url else ()
        )
        self.sfn = clients.sfn
        self.sqs = clients.sqs
        self.pool = pool
        self.metrics = metrics
        self.health = health
        self.budget = budget
        self.phase = phase
        self.passes = 0

    async def run(self) -> None:
        """Reconcile every interval until cancelled; a failed pass is retried next interval."""
        await anyio.sleep(self.settings.reconcile_interval * self.phase)
        while True:
            await anyio.sleep(self.settings.reconcile_interval)
            try:
                await self.run_once()
            except AWS_ERRORS as exc:  # a bug is not caught: the loop dies, /healthz says so
                self.metrics.reconcile_runs.labels(pool=self.pool.name, result="error").inc()
                self.health.aws_failed("ListExecutions", exc)
                log.warning("dispatcher.reconcile_failed", error=str(exc))

    async def list_running(self) -> dict[str, int]:
        """Every RUNNING execution of the pool's state machine (all pages): ARN -> redrives."""
        listed: dict[str, int] = {}
        token: str | None = None
        while True:
            await self._spend("ListExecutions")
            request: ListExecutionsInputTypeDef = {
                "stateMachineArn": self.pool.state_machine_arn,
                "statusFilter": "RUNNING",
                "maxResults": 1000,
            }
            if token:
                request["nextToken"] = token
            page = await self.sfn.list_executions(**request)
            for item in page.get("executions", []):
                listed[item["executionArn"]] = int(item.get("redriveCount", 0) or 0)
            token = page.get("nextToken")
            if not token:
                return listed

    async def _spend(self, operation: str) -> None:
        if self.budget is not None:
            await self.budget.spend(operation)

    async def run_once(self, *, estimate_backlog: bool = True) -> ReconcileReport:
        """One pass: list, adopt unknown runners, confirm and free the missing ones; then
        read the request queues' depth (not at start-up: an estimate must not hold up
        readiness)."""
        began = time.perf_counter()
        listed_at = self.pool.clock()
        listed = await self.list_running()
        self.health.aws_ok()
        result = self.pool.ledger.apply_listing(listed, listed_at, self.settings.start_grace)
        self.pool.update()
        for arn in result.adopted:
            log.info("dispatcher.reconcile_adopted", execution_arn=arn)
        if result.adopted:
            self.metrics.reconcile_corrections.labels(pool=self.pool.name, kind="adopted").inc(
                len(result.adopted)
            )
        freed = confirmed = 0
        limiter = anyio.CapacityLimiter(_DESCRIBE_CONCURRENCY)

        async def confirm(arn: str) -> None:
            nonlocal freed, confirmed
            async with limiter:
                await self._spend("DescribeExecution")
                try:
                    ended = await self._confirm(arn)
                except AWS_ERRORS as exc:  # keep it held: nothing is freed on a guess
                    self.health.aws_failed("DescribeExecution", exc)
                    log.warning(
                        "dispatcher.reconcile_describe_failed", execution_arn=arn, error=str(exc)
                    )
                    return
            if ended:
                freed += 1
            else:
                confirmed += 1

        async with anyio.create_task_group() as tg:
            for arn in result.suspects:
                tg.start_soon(confirm, arn)
        if freed:
            self.metrics.reconcile_corrections.labels(pool=self.pool.name, kind="freed").inc(freed)
        self.passes += 1
        self.metrics.reconcile_runs.labels(pool=self.pool.name, result="ok").inc()
        self.metrics.reconcile_duration.labels(pool=self.pool.name).observe(
            time.perf_counter() - began
        )
        self.metrics.last_reconcile.labels(pool=self.pool.name).set(time.time())
        self.health.last_reconcile_at = time.time()
        if estimate_backlog:
            await self._estimate_backlog()
        report = ReconcileReport(len(listed), len(result.adopted), freed, confirmed)
        log.debug("dispatcher.reconciled", **asdict(report))
        return report

    async def _estimate_backlog(self) -> None:
        """Read the request queues' approximate depth (for /status and the dashboard)."""
        queued = 0
        for url in self.queue_urls:
            try:
                response = await self.sqs.get_queue_attributes(
                    QueueUrl=url,
                    AttributeNames=[
                        "ApproximateNumberOfMessages",
                        "ApproximateNumberOfMessagesDelayed",
                    ],
                )
            except AWS_ERRORS as exc:  # an estimate only: keep the last one
                log.debug("dispatcher.queue_depth_unavailable", error=str(exc))
                return
            attributes = response.get("Attributes", {})
            queued += sum(int(value) for value in attributes.values())
        self.pool.queued = queued
        self.pool.queued_at = time.time()
        self.metrics.queued.labels(pool=self.pool.name).set(self.pool.queued)

    async def _confirm(self, arn: str) -> bool:
        """Describe a suspect; free it when it is not running. Returns whether it was freed."""
        ledger = self.pool.ledger
        was_full = ledger.free == 0
        try:
            described = await self.sfn.describe_execution(executionArn=arn)
        except Exception as exc:
            if error_code(exc) != "ExecutionDoesNotExist":
                raise
            # Describes lag too: the ledger's one rule frees only past the grace window.
            status = "MISSING"
            change = ledger.observe_missing(arn, self.pool.clock(), self.settings.start_grace)
        else:
            status = described["status"]
            redrives = int(described.get("redriveCount", 0) or 0)
            if status == "RUNNING":
                ledger.confirm_running(arn, self.pool.clock(), redrives)
                self.pool.update()
                return False
            change = ledger.observe_terminal(arn, redrives)
            if change is not Change.STALE:
                self.pool.ended(arn, status, described)
        if change is not Change.FREED:
            return False
        self.pool.note_freed(change, was_full)
        self.pool.update()
        log.info("dispatcher.reconcile_freed", execution_arn=arn, status=status)
        return True
