"""StartExecution rate control: the token bucket, the AIMD controller, limiters and metrics."""

from __future__ import annotations

import itertools

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from dispatcher.core.rate import AdaptiveRate, TokenBucket, standard_quota
from dispatcher.daemon.metrics import Metrics
from dispatcher.daemon.ratelimit import RateLimiters, StartRateLimiter

EPS = 1e-9
ARN = "arn:aws:states:{region}:{account}:stateMachine:{name}"


class FakeClock:
    """A clock that moves only when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def sample(metrics: Metrics, name: str, account: str = "1", region: str = "r") -> float | None:
    value: float | None = metrics.registry.get_sample_value(
        name, {"account": account, "region": region}
    )
    return value


# -- standard quota ----------------------------------------------------------------------


@pytest.mark.parametrize("region", ["us-east-1", "us-west-2", "eu-west-1"])
def test_largest_regions_get_the_large_quota(region: str) -> None:
    """The three largest regions refill 300/s into a bucket of 1,300."""
    assert standard_quota(region) == (300.0, 1300)


@pytest.mark.parametrize("region", ["ap-south-1", "eu-central-1", "us-east-2"])
def test_other_regions_get_the_smaller_quota(region: str) -> None:
    """Every other region refills 150/s into a bucket of 800."""
    assert standard_quota(region) == (150.0, 800)


# -- token bucket ------------------------------------------------------------------------


def test_full_bucket_gives_burst_then_waits_one_interval_apart() -> None:
    """A full bucket grants `burst` tokens at once; later takers wait 1/r, 2/r, ..."""
    bucket = TokenBucket(rate=10.0, burst=3, now=0.0)
    waits = [bucket.take(0.0) for _ in range(6)]
    assert waits == pytest.approx([0.0, 0.0, 0.0, 0.1, 0.2, 0.3])
    assert bucket.tokens(0.0) == pytest.approx(-3.0)


def test_queued_takers_are_served_in_order_as_time_passes() -> None:
    """Reservations are repaid at the refill rate: a taker arriving later queues behind."""
    bucket = TokenBucket(rate=2.0, burst=1, now=0.0)
    assert bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == pytest.approx(0.5)  # usable at 0.5
    assert bucket.take(0.25) == pytest.approx(0.75)  # usable at 1.0
    assert bucket.take(2.0) == 0.0  # debt repaid, a token accrued since


def test_refill_caps_at_burst() -> None:
    """A long quiet spell refills the bucket to `burst`, not beyond."""
    bucket = TokenBucket(rate=100.0, burst=5, now=0.0)
    for _ in range(5):
        bucket.take(0.0)
    assert bucket.tokens(0.02) == pytest.approx(2.0)
    assert bucket.tokens(3600.0) == 5.0
    assert [bucket.take(3600.0) for _ in range(6)][-2:] == pytest.approx([0.0, 0.01])


def test_clock_stepping_back_does_not_drain() -> None:
    """A clock reading earlier than the last one adds no tokens and removes none."""
    bucket = TokenBucket(rate=1.0, burst=2, now=10.0)
    bucket.take(10.0)
    assert bucket.tokens(5.0) == pytest.approx(1.0)


def test_set_rate_settles_tokens_at_the_old_rate_first() -> None:
    """Tokens accrued before the change count at the old rate; later ones at the new rate."""
    bucket = TokenBucket(rate=10.0, burst=100, now=0.0)
    for _ in range(100):
        bucket.take(0.0)
    bucket.set_rate(1.0, now=2.0)  # 20 tokens accrued at 10/s
    assert bucket.rate == 1.0
    assert bucket.tokens(2.0) == pytest.approx(20.0)
    assert bucket.tokens(4.0) == pytest.approx(22.0)


def test_drain_empties_but_keeps_reservations() -> None:
    """drain() leaves no free tokens, and does not forgive debt already handed out."""
    bucket = TokenBucket(rate=10.0, burst=5, now=0.0)
    bucket.drain(0.0)
    assert bucket.take(0.0) == pytest.approx(0.1)
    bucket.drain(0.0)
    assert bucket.tokens(0.0) == pytest.approx(-1.0)


def test_set_burst_drops_tokens_above_the_new_size() -> None:
    """Shrinking the bucket drops the surplus; growing it does not add tokens."""
    bucket = TokenBucket(rate=1.0, burst=10, now=0.0)
    bucket.set_burst(4, 0.0)
    assert (bucket.burst, bucket.tokens(0.0)) == (4, 4.0)
    bucket.set_burst(8, 0.0)
    assert bucket.tokens(0.0) == 4.0


@pytest.mark.parametrize(
    ("rate", "burst", "message"),
    [
        (0.0, 1, r"rate must be > 0, got 0$"),
        (-2.5, 1, r"rate must be > 0, got -2.5$"),
        (float("nan"), 1, r"rate must be > 0, got nan$"),
        (1.0, 0, r"burst must be an integer >= 1, got 0$"),
    ],
)
def test_bucket_rejects_bad_values_naming_them(rate: float, burst: int, message: str) -> None:
    """A bad rate or burst is refused with a message that shows what was given."""
    with pytest.raises(ValueError, match=message):
        TokenBucket(rate, burst, 0.0)


def test_set_rate_rejects_zero_and_keeps_the_rate() -> None:
    """A bad rate change is refused; the bucket keeps its rate."""
    bucket = TokenBucket(rate=3.0, burst=1, now=0.0)
    with pytest.raises(ValueError, match=r"got 0$"):
        bucket.set_rate(0.0, 1.0)
    assert bucket.rate == 3.0


@given(
    rate=st.floats(min_value=0.1, max_value=1000.0),
    burst=st.integers(min_value=1, max_value=20),
    gaps=st.lists(
        st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=2.0)), min_size=1, max_size=80
    ),
)
def test_grants_in_any_window_never_exceed_burst_plus_rate_times_length(
    rate: float, burst: int, gaps: list[float]
) -> None:
    """Whatever the arrival times, tokens usable within [a, b] <= burst + rate * (b - a)."""
    bucket = TokenBucket(rate, burst, now=0.0)
    usable = []
    now = 0.0
    for gap in gaps:
        now += gap
        wait = bucket.take(now)
        assert wait >= 0.0
        usable.append(now + wait)
    usable.sort()
    # The busiest window starts and ends at a grant, so checking those pairs is enough.
    for i, j in itertools.combinations_with_replacement(range(len(usable)), 2):
        granted = j - i + 1
        allowed = burst + rate * (usable[j] - usable[i])
        assert granted <= allowed + 1e-6 * max(1.0, allowed), (i, j, usable)


# -- AIMD --------------------------------------------------------------------------------


def test_throttle_halves_the_rate_once_per_window() -> None:
    """A burst of throttles from calls in flight counts once; a later one halves again."""
    aimd = AdaptiveRate(ceiling=300.0, floor=10.0)
    assert aimd.current == 300.0
    assert aimd.throttled(0.0) == 150.0
    assert [aimd.throttled(0.0 + k * 0.019) for k in range(50)] == [150.0] * 50
    assert aimd.throttled(1.0) == 75.0


def test_throttles_never_push_below_the_floor() -> None:
    """Repeated throttles stop at the floor."""
    aimd = AdaptiveRate(ceiling=300.0, floor=100.0, decrease=0.5)
    assert aimd.throttled(0.0) == 150.0
    assert aimd.throttled(5.0) == 100.0
    assert aimd.throttled(10.0) == 100.0


def test_recovery_from_floor_to_ceiling_takes_recovery_seconds() -> None:
    """Additive increase: floor to ceiling in about `recovery_seconds` of successes."""
    aimd = AdaptiveRate(ceiling=300.0, floor=10.0, decrease=0.01, recovery_seconds=30.0)
    assert aimd.throttled(0.0) == 10.0
    rates = [aimd.succeeded(0.5 * k) for k in range(1, 61)]
    assert rates == sorted(rates)
    assert rates[29] == pytest.approx(155.0)  # halfway at 15 s
    assert rates[58] < 300.0
    assert rates[59] == pytest.approx(300.0)
    assert aimd.succeeded(1000.0) == 300.0


def test_recovery_is_proportional_to_elapsed_time_not_call_count() -> None:
    """Many successes at one instant add nothing; the rate follows the clock."""
    aimd = AdaptiveRate(ceiling=100.0, floor=10.0, recovery_seconds=9.0)
    aimd.throttled(0.0)  # 50
    assert [aimd.succeeded(0.0) for _ in range(100)] == [50.0] * 100
    assert aimd.succeeded(1.0) == pytest.approx(60.0)


def test_set_ceiling_clamps_the_current_rate() -> None:
    """Lowering the ceiling lowers the current rate with it; raising it lets recovery climb."""
    aimd = AdaptiveRate(ceiling=300.0, floor=10.0, recovery_seconds=10.0)
    aimd.set_ceiling(100.0, 0.0)
    assert (aimd.current, aimd.ceiling) == (100.0, 100.0)
    aimd.set_ceiling(200.0, 0.0, floor=150.0)
    assert (aimd.current, aimd.floor) == (150.0, 150.0)
    assert aimd.succeeded(10.0) == 200.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ceiling": 0.0, "floor": 1.0}, r"^ceiling must be > 0, got 0$"),
        (
            {"ceiling": 300.0, "floor": 500.0},
            r"^floor must be > 0 and <= ceiling, got 500 \(ceiling 300\)$",
        ),
        ({"ceiling": 300.0, "floor": 0.0}, r"^floor must be > 0 and <= ceiling, got 0"),
        ({"ceiling": 300.0, "floor": 1.0, "decrease": 1.0}, r"^decrease must be > 0 and < 1"),
        ({"ceiling": 300.0, "floor": 1.0, "recovery_seconds": 0.0}, r"^recovery_seconds must"),
    ],
)
def test_adaptive_rate_rejects_bad_values_naming_them(
    kwargs: dict[str, float], message: str
) -> None:
    """Each bad argument is refused with its name, its value and what is accepted."""
    with pytest.raises(ValueError, match=message):
        AdaptiveRate(**kwargs)


def test_set_ceiling_rejects_a_floor_above_it_and_changes_nothing() -> None:
    """A reconfiguration that would invert floor and ceiling is refused whole."""
    aimd = AdaptiveRate(ceiling=300.0, floor=10.0)
    with pytest.raises(ValueError, match=r"got 10 \(ceiling 5\)$"):
        aimd.set_ceiling(5.0, 0.0)
    assert (aimd.current, aimd.ceiling, aimd.floor) == (300.0, 300.0, 10.0)


# -- limiter, registry and metrics -------------------------------------------------------


def make_limiter(
    clock: FakeClock, *, rate: float = 100.0, burst: int = 2, floor: float = 10.0
) -> tuple[StartRateLimiter, Metrics]:
    metrics = Metrics()
    limiter = StartRateLimiter(
        "1", "r", rate=rate, burst=burst, floor=floor, metrics=metrics, clock=clock
    )
    return limiter, metrics


async def test_acquire_within_burst_does_not_wait() -> None:
    """Tokens in the bucket are granted at once and no wait is counted."""
    limiter, metrics = make_limiter(FakeClock(), burst=3)
    for _ in range(3):
        await limiter.acquire()
    assert sample(metrics, "dispatcher_start_rate_wait_seconds_total") == 0.0


async def test_acquire_beyond_burst_waits_and_counts_the_wait() -> None:
    """With the bucket empty, acquire waits 1/rate (a microsecond here) and counts it."""
    limiter, metrics = make_limiter(FakeClock(), rate=1e6, burst=1, floor=1.0)
    await limiter.acquire()
    await limiter.acquire()
    await limiter.acquire()
    assert sample(metrics, "dispatcher_start_rate_wait_seconds_total") == pytest.approx(3e-6)


def test_throttle_lowers_rate_counts_every_throttle_and_logs_once() -> None:
    """Every throttle counts; the rate halves once per window and each change is logged."""
    clock = FakeClock()
    limiter, metrics = make_limiter(clock, rate=100.0)
    assert sample(metrics, "dispatcher_start_rate_limit") == 100.0
    with structlog.testing.capture_logs() as logs:
        for _ in range(5):
            limiter.throttled()
    assert limiter.rate == 50.0
    assert sample(metrics, "dispatcher_start_rate_limit") == 50.0
    assert sample(metrics, "dispatcher_start_rate_throttles_total") == 5.0
    assert [(e["event"], e["rate"], e["account"], e["region"]) for e in logs] == [
        ("dispatcher.start_rate_lowered", 50.0, "1", "r")
    ]


async def test_throttle_empties_the_local_bucket() -> None:
    """After a throttle the next start waits, even though our own bucket had tokens left."""
    clock = FakeClock()
    limiter, metrics = make_limiter(clock, rate=1e6, burst=10, floor=1e5)
    limiter.throttled()  # 5e5/s, bucket emptied
    await limiter.acquire()
    assert sample(metrics, "dispatcher_start_rate_wait_seconds_total") == pytest.approx(2e-6)


def test_success_recovers_the_rate_and_the_gauge() -> None:
    """Successes raise the allowed rate back over time, and the gauge follows."""
    clock = FakeClock()
    limiter, metrics = make_limiter(clock, rate=100.0, floor=10.0)
    limiter.throttled()
    clock.now += 15.0
    limiter.succeeded()
    assert limiter.rate == pytest.approx(95.0)  # 50 + 90/30 * 15
    assert sample(metrics, "dispatcher_start_rate_limit") == pytest.approx(95.0)
    clock.now += 60.0
    limiter.succeeded()
    assert limiter.rate == 100.0


def test_reconfigure_applies_new_limits() -> None:
    """A reload lowers the ceiling, resizes the bucket and moves the gauge."""
    clock = FakeClock()
    limiter, metrics = make_limiter(clock, rate=100.0, burst=5)
    limiter.reconfigure(rate=40.0, burst=1, floor=4.0)
    assert (limiter.rate, limiter.burst) == (40.0, 1)
    assert sample(metrics, "dispatcher_start_rate_limit") == 40.0
    with pytest.raises(ValueError, match=r"burst must be an integer >= 1, got 0$"):
        limiter.reconfigure(rate=40.0, burst=0, floor=4.0)


def test_registry_shares_one_limiter_per_account_and_region() -> None:
    """Pools of one account and region share a limiter; other accounts or regions do not."""
    limiters = RateLimiters(Metrics(), rate=None, burst=None, floor=1.0, clock=FakeClock())
    a = limiters.for_arn(ARN.format(region="us-east-1", account="111", name="a"))
    b = limiters.for_arn(ARN.format(region="us-east-1", account="111", name="b"))
    other_account = limiters.for_arn(ARN.format(region="us-east-1", account="222", name="a"))
    other_region = limiters.for_arn(ARN.format(region="ap-south-1", account="111", name="a"))
    assert a is b
    assert len({id(a), id(other_account), id(other_region)}) == 3
    assert (a.account, a.region, a.rate, a.burst) == ("111", "us-east-1", 300.0, 1300)
    assert (other_region.rate, other_region.burst) == (150.0, 800)


def test_registry_throttle_in_one_pool_slows_its_sibling_only() -> None:
    """A throttle seen by one pool lowers the rate its same-account sibling gets."""
    metrics = Metrics()
    limiters = RateLimiters(metrics, rate=200.0, burst=10, floor=5.0, clock=FakeClock())
    limiters.for_arn(ARN.format(region="eu-west-1", account="1", name="a")).throttled()
    assert limiters.for_arn(ARN.format(region="eu-west-1", account="1", name="b")).rate == 100.0
    assert limiters.for_arn(ARN.format(region="eu-west-1", account="2", name="a")).rate == 200.0
    assert sample(metrics, "dispatcher_start_rate_limit", "1", "eu-west-1") == 100.0


def test_registry_clamps_a_default_floor_to_a_small_regions_quota() -> None:
    """A floor above a region's standard rate is capped there rather than failing later."""
    limiters = RateLimiters(Metrics(), rate=None, burst=None, floor=200.0, clock=FakeClock())
    limiter = limiters.for_arn(ARN.format(region="ap-south-1", account="1", name="a"))
    limiter.throttled()
    assert limiter.rate == 150.0


def test_registry_reconfigure_reaches_existing_limiters() -> None:
    """A reload changes limiters already made and those made afterwards."""
    limiters = RateLimiters(Metrics(), rate=None, burst=None, floor=1.0, clock=FakeClock())
    before = limiters.for_arn(ARN.format(region="us-west-2", account="1", name="a"))
    limiters.reconfigure(rate=50.0, burst=20, floor=2.0)
    after = limiters.for_arn(ARN.format(region="sa-east-1", account="1", name="a"))
    assert [(x.rate, x.burst) for x in (before, after)] == [(50.0, 20), (50.0, 20)]


@pytest.mark.parametrize(
    "arn",
    [
        "arn:aws:states:us-east-1:1:execution:sm:run",
        "arn:aws:lambda:us-east-1:1:function:f",
        "not-an-arn",
    ],
)
def test_registry_rejects_what_is_not_a_state_machine_arn(arn: str) -> None:
    """Only state machine ARNs name an account and region to pace."""
    limiters = RateLimiters(Metrics(), rate=None, burst=None, floor=1.0)
    with pytest.raises(ValueError, match="not a state machine ARN"):
        limiters.for_arn(arn)


@pytest.mark.parametrize(
    ("rate", "burst", "floor", "message"),
    [
        (None, None, 0.0, r"^floor must be > 0, got 0$"),
        (10.0, None, 20.0, r"got 20 \(ceiling 10\)$"),
        (None, 0, 1.0, r"got 0$"),
    ],
)
def test_registry_validates_settings_up_front(
    rate: float | None, burst: int | None, floor: float, message: str
) -> None:
    """Bad settings fail at construction, not at the first start."""
    with pytest.raises(ValueError, match=message):
        RateLimiters(Metrics(), rate=rate, burst=burst, floor=floor)
