"""StartExecution rate control: one token bucket per AWS account and region, lowered on throttles.

Step Functions meters StartExecution per account and region, so every pool of one account
and region shares one limiter. The bucket and the AIMD controller are pure
(`dispatcher.core.rate`); only ``StartRateLimiter.acquire`` sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio
import structlog

from dispatcher.core.rate import (
    AdaptiveRate,
    TokenBucket,
    check_burst,
    check_rate,
    parse_state_machine_arn,
    standard_quota,
)
from dispatcher.daemon.metrics import Metrics

log = structlog.get_logger("dispatcher.rate")


class StartRateLimiter:
    """Paces StartExecution calls for one account and region, adapting to AWS throttles."""

    def __init__(
        self,
        account: str,
        region: str,
        *,
        rate: float,
        burst: int,
        floor: float,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        now = clock()
        self._adaptive = AdaptiveRate(rate, floor)
        self._bucket = TokenBucket(rate, burst, now)
        self._account = account
        self._region = region
        self._clock = clock
        labels = {"account": account, "region": region}
        self._gauge = metrics.start_rate.labels(**labels)
        self._throttles = metrics.start_rate_throttles.labels(**labels)
        self._wait = metrics.start_rate_wait.labels(**labels)
        self._gauge.set(rate)

    @property
    def account(self) -> str:
        """The AWS account this limiter paces."""
        return self._account

    @property
    def region(self) -> str:
        """The AWS region this limiter paces."""
        return self._region

    @property
    def rate(self) -> float:
        """StartExecution calls per second currently allowed."""
        return self._adaptive.current

    @property
    def burst(self) -> int:
        """Calls allowed back to back after a quiet spell."""
        return self._bucket.burst

    async def acquire(self) -> None:
        """Wait until one StartExecution call may be made."""
        wait = self.reserve()
        if wait > 0:
            await anyio.sleep(wait)

    def reserve(self) -> float:
        """Take the next StartExecution token; the seconds to wait before using it (0.0 if
        one was there). The token is reserved either way, so the wait counts even if the
        caller is cancelled."""
        wait = self._bucket.take(self._clock())
        if wait > 0:
            self._wait.inc(wait)
        return wait

    def throttled(self) -> None:
        """Record a throttled StartExecution: slow down and stop spending local tokens."""
        now = self._clock()
        before = self._adaptive.current
        after = self._adaptive.throttled(now)
        self._bucket.set_rate(after, now)
        # AWS's bucket is empty, whatever ours says (other clients share the quota).
        self._bucket.drain(now)
        self._throttles.inc()
        self._gauge.set(after)
        if after != before:
            log.warning(
                "dispatcher.start_rate_lowered",
                rate=after,
                previous=before,
                account=self._account,
                region=self._region,
            )

    def succeeded(self) -> None:
        """Record a successful StartExecution: let the rate recover."""
        now = self._clock()
        rate = self._adaptive.succeeded(now)
        if rate != self._bucket.rate:
            self._bucket.set_rate(rate, now)
        self._gauge.set(rate)

    def reconfigure(self, rate: float, burst: int, floor: float) -> None:
        """Apply a new rate ceiling, bucket size and floor (configuration reload)."""
        check_burst(burst)
        now = self._clock()
        self._adaptive.set_ceiling(rate, now, floor=floor)
        self._bucket.set_burst(burst, now)
        self._bucket.set_rate(self._adaptive.current, now)
        self._gauge.set(self._adaptive.current)


class RateLimiters:
    """One StartRateLimiter per (account, region), created on first use and shared by pools."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        rate: float | None,
        burst: int | None,
        floor: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._check(rate, burst, floor)
        self._metrics = metrics
        self._rate, self._burst, self._floor = rate, burst, floor
        self._clock = clock
        self._limiters: dict[tuple[str, str], StartRateLimiter] = {}

    @staticmethod
    def _check(rate: float | None, burst: int | None, floor: float) -> None:
        check_rate("floor", floor)
        if rate is not None:
            AdaptiveRate(rate, floor)  # validates rate and floor <= rate
        if burst is not None:
            check_burst(burst)

    def _settings(self, region: str) -> tuple[float, int, float]:
        quota_rate, quota_burst = standard_quota(region)
        rate = quota_rate if self._rate is None else self._rate
        burst = quota_burst if self._burst is None else self._burst
        # A floor meant for a large region must not exceed a smaller region's quota.
        floor = min(self._floor, rate) if self._rate is None else self._floor
        return rate, burst, floor

    def for_arn(self, state_machine_arn: str) -> StartRateLimiter:
        """The limiter for the account and region of ``state_machine_arn``."""
        account, region = parse_state_machine_arn(state_machine_arn)
        limiter = self._limiters.get((account, region))
        if limiter is None:
            rate, burst, floor = self._settings(region)
            limiter = StartRateLimiter(
                account,
                region,
                rate=rate,
                burst=burst,
                floor=floor,
                metrics=self._metrics,
                clock=self._clock,
            )
            self._limiters[account, region] = limiter
        return limiter

    def all(self) -> list[StartRateLimiter]:
        """Every limiter made so far."""
        return list(self._limiters.values())

    def reconfigure(self, *, rate: float | None, burst: int | None, floor: float) -> None:
        """Apply new settings to every limiter made so far and to those made later."""
        self._check(rate, burst, floor)
        self._rate, self._burst, self._floor = rate, burst, floor
        for limiter in self._limiters.values():
            limiter.reconfigure(*self._settings(limiter.region))
