"""Rate control without I/O: a token bucket, an AIMD controller, AWS's default quotas.

Time is passed in; `dispatcher.daemon.ratelimit` builds the StartExecution limiters (one
per AWS account and region) on them and is the only part that sleeps.
"""

from __future__ import annotations

# Standard workflows' StartExecution quota: (refill per second, bucket size).
_LARGE_REGIONS = frozenset({"us-east-1", "us-west-2", "eu-west-1"})
_LARGE_QUOTA = (300.0, 1300)
_OTHER_QUOTA = (150.0, 800)


def standard_quota(region: str) -> tuple[float, int]:
    """AWS's default StartExecution token bucket for ``region``: (refill rate per second, size)."""
    return _LARGE_QUOTA if region in _LARGE_REGIONS else _OTHER_QUOTA


def check_rate(name: str, value: float) -> None:
    # `not value > 0` also refuses NaN.
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value:g}")


def check_burst(burst: int) -> None:
    if burst < 1:
        raise ValueError(f"burst must be an integer >= 1, got {burst}")


class TokenBucket:
    """A token bucket that hands out reservations: callers queue by waiting, in call order."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        check_rate("rate", rate)
        check_burst(burst)
        self._rate = rate
        self._burst = burst
        self._tokens = float(burst)
        self._at = now

    @property
    def rate(self) -> float:
        """Tokens added per second."""
        return self._rate

    @property
    def burst(self) -> int:
        """Most tokens the bucket holds."""
        return self._burst

    def tokens(self, now: float) -> float:
        """Tokens available at ``now``; negative while reservations are outstanding."""
        # A clock that steps back must not drain the bucket.
        return min(float(self._burst), self._tokens + max(0.0, now - self._at) * self._rate)

    def _settle(self, now: float) -> None:
        self._tokens = self.tokens(now)
        self._at = max(self._at, now)

    def take(self, now: float) -> float:
        """Take one token; return the seconds to wait before using it (0.0 if one was there)."""
        self._settle(now)
        self._tokens -= 1.0
        # Debt is repaid at the refill rate, so each later taker waits 1/rate longer.
        return 0.0 if self._tokens >= 0 else -self._tokens / self._rate

    def drain(self, now: float) -> None:
        """Empty the bucket (keeping reservations): AWS's own bucket is known to be empty."""
        self._settle(now)
        self._tokens = min(self._tokens, 0.0)

    def set_rate(self, rate: float, now: float) -> None:
        """Change the refill rate; tokens accrued so far count at the old rate."""
        check_rate("rate", rate)
        self._settle(now)
        self._rate = rate

    def set_burst(self, burst: int, now: float) -> None:
        """Change the bucket size; tokens above the new size are dropped."""
        check_burst(burst)
        self._settle(now)
        self._burst = burst
        self._tokens = min(self._tokens, float(burst))


class AdaptiveRate:
    """AIMD control of the allowed rate: halve on a throttle, recover linearly on success."""

    def __init__(
        self,
        ceiling: float,
        floor: float,
        *,
        decrease: float = 0.5,
        recovery_seconds: float = 30.0,
        window: float = 1.0,
    ) -> None:
        check_rate("ceiling", ceiling)
        self._check_floor(floor, ceiling)
        if not 0 < decrease < 1:
            raise ValueError(f"decrease must be > 0 and < 1, got {decrease:g}")
        check_rate("recovery_seconds", recovery_seconds)
        if not window >= 0:
            raise ValueError(f"window must be >= 0 seconds, got {window:g}")
        self._ceiling = ceiling
        self._floor = floor
        self._decrease = decrease
        self._recovery_seconds = recovery_seconds
        self._window = window
        self._current = ceiling
        self._last_decrease: float | None = None
        self._last_adjust: float | None = None

    @staticmethod
    def _check_floor(floor: float, ceiling: float) -> None:
        if not 0 < floor <= ceiling:
            raise ValueError(
                f"floor must be > 0 and <= ceiling, got {floor:g} (ceiling {ceiling:g})"
            )

    @property
    def current(self) -> float:
        """The rate currently allowed."""
        return self._current

    @property
    def ceiling(self) -> float:
        """The rate recovery climbs back to."""
        return self._ceiling

    @property
    def floor(self) -> float:
        """The rate throttles never push below."""
        return self._floor

    def throttled(self, now: float) -> float:
        """Lower the rate after a throttle (once per window) and return it."""
        # Calls already in flight when AWS started throttling all fail together; they are
        # one signal, not fifty.
        if self._last_decrease is not None and now - self._last_decrease < self._window:
            return self._current
        self._current = max(self._floor, self._current * self._decrease)
        self._last_decrease = now
        self._last_adjust = now
        return self._current

    def succeeded(self, now: float) -> float:
        """Raise the rate after a success, in proportion to the time since the last change."""
        if self._last_adjust is not None:
            step = (self._ceiling - self._floor) / self._recovery_seconds
            elapsed = max(0.0, now - self._last_adjust)
            self._current = min(self._ceiling, self._current + step * elapsed)
        self._last_adjust = now if self._last_adjust is None else max(self._last_adjust, now)
        return self._current

    def set_ceiling(self, ceiling: float, now: float, *, floor: float | None = None) -> None:
        """Reconfigure the ceiling (and floor); the current rate is clamped between them."""
        floor = self._floor if floor is None else floor
        check_rate("ceiling", ceiling)
        self._check_floor(floor, ceiling)
        self.succeeded(now)  # settle recovery earned under the old limits
        self._ceiling, self._floor = ceiling, floor
        self._current = min(ceiling, max(floor, self._current))


def parse_state_machine_arn(arn: str) -> tuple[str, str]:
    """The (account, region) of a state machine ARN; ValueError if it is not one."""
    parts = arn.split(":")
    if len(parts) < 7 or parts[0] != "arn" or parts[2] != "states" or parts[5] != "stateMachine":
        raise ValueError(
            f"not a state machine ARN: {arn!r} "
            "(expected arn:PARTITION:states:REGION:ACCOUNT:stateMachine:NAME)"
        )
    return parts[4], parts[3]
