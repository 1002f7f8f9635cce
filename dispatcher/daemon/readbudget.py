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

DEFAULT_LIST_RATE = 1.0
"""ListExecutions pages per second: half the refill of the smaller regions (2/s), a fifth of
the largest regions' (5/s)."""
DEFAULT_DESCRIBE_RATE = 5.0
"""DescribeExecution calls per second: a third of the largest regions' refill (15/s)."""
LIST_BURST = 20
"""ListExecutions pages that may go at once (AWS's bucket holds 100 in the smaller regions)."""
DESCRIBE_BURST = 50
"""DescribeExecution calls that may go at once (AWS's bucket holds 250-300)."""


@dataclass(frozen=True, slots=True)
class ReadRates:
    """Calls per second this process may spend on each read, per account and region."""

    list_executions: float
    describe_execution: float


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
