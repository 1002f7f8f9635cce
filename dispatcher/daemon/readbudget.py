"""The reads of reconcile, paced within a share of the account's Step Functions quotas.

``ListExecutions`` (a refill of 5 per second in the largest regions, 2 in the others) and
``DescribeExecution`` are metered per AWS account and region, and shared with everything
else in the account: consoles, other services, other dispatchers. Every pool's reconcile
lists its state machine each interval and describes the executions a listing missed, so
with many pools (and many running executions, 1,000 per page) the calls grow with both.
The dispatcher spends at most a fixed share of each quota on them: one token bucket per
account and region and operation, shared by every pool of the process, which every page
and every describe waits on. A pass that needs more than its share takes longer instead
of bursting; the pools' passes are also spread over the interval (`phase`), never all at
once. The start-up listing uses the same buckets: with many pools, readiness waits for
them rather than take the account's whole quota.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio

from dispatcher.core.rate import TokenBucket, parse_state_machine_arn
from dispatcher.daemon.metrics import Metrics
from dispatcher.settings.config import Settings

LIST_BURST = 50
"""ListExecutions pages that may go at once: half of AWS's bucket in the smaller regions (100)."""
DESCRIBE_BURST = 100
"""DescribeExecution calls that may go at once: under half of AWS's bucket (250-300)."""


@dataclass(frozen=True, slots=True)
class ReadRates:
    """Calls per second this process may spend on each read, per account and region."""

    list_executions: float
    describe_execution: float

    @classmethod
    def of(cls, settings: Settings) -> ReadRates:
        """The rates ``settings`` give (``reconcile_list_rate``, ``reconcile_describe_rate``)."""
        return cls(settings.reconcile_list_rate, settings.reconcile_describe_rate)

    @classmethod
    def defaults(cls) -> ReadRates:
        """The rates when the settings say nothing."""
        fields = Settings.model_fields
        return cls(fields["reconcile_list_rate"].default, fields["reconcile_describe_rate"].default)


class ReadBudget:
    """The reconcile reads of one account and region: ListExecutions pages and describes."""

    def __init__(
        self,
        account: str,
        region: str,
        rates: ReadRates,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        now = clock()
        self.account = account
        self.region = region
        self._clock = clock
        self._buckets = {
            "ListExecutions": TokenBucket(rates.list_executions, LIST_BURST, now),
            "DescribeExecution": TokenBucket(rates.describe_execution, DESCRIBE_BURST, now),
        }
        self._waited = {
            operation: metrics.read_budget_wait.labels(operation=operation, region=region)
            for operation in self._buckets
        }

    async def spend(self, operation: str) -> None:
        """Wait for one call of ``operation`` within the budget (in call order)."""
        wait = self._buckets[operation].take(self._clock())
        if wait > 0:
            self._waited[operation].inc(wait)
            await anyio.sleep(wait)


class ReadBudgets:
    """One `ReadBudget` per (account, region), created on first use and shared by pools."""

    def __init__(
        self,
        rates: ReadRates,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rates = rates
        self._metrics = metrics
        self._clock = clock
        self._budgets: dict[tuple[str, str], ReadBudget] = {}

    def for_arn(self, state_machine_arn: str) -> ReadBudget:
        """The budget of the account and region of ``state_machine_arn``."""
        account, region = parse_state_machine_arn(state_machine_arn)
        budget = self._budgets.get((account, region))
        if budget is None:
            budget = ReadBudget(account, region, self.rates, self._metrics, self._clock)
            self._budgets[(account, region)] = budget
        return budget
