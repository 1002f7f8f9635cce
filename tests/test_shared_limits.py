"""Named limits shared by pools, with weights, on ledgers and fakes: weighted use, all at
once, a lowered limit, a weight above the limit, a restart, and the claim rule that keeps a
heavier pool from starving behind lighter starts."""

from __future__ import annotations

import functools
import heapq
import json
import random
import tomllib
from pathlib import Path
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from dispatcher.cli.control import render_status
from dispatcher.core.ledger import Ledger, Reservation
from dispatcher.core.requests import execution_arn
from dispatcher.core.shared_limits import SharedLimitConfig, SharedLimits
from dispatcher.daemon.limits import LiveLimits
from dispatcher.daemon.metrics import Metrics
from dispatcher.daemon.pool import Pool, share_limits
from dispatcher.daemon.ratelimit import RateLimiters
from dispatcher.settings.config import ConfigError
from dispatcher.settings.layout import PoolConfig, QueueConfig, load, parse
from tests.fake_intake import build_layout_world, dispatch_all, finish, intake_of
from tests.fakes import ACCOUNT, QUEUE_BASE, REGION, STATE_MACHINE_ARN, sqs_message

pytestmark = pytest.mark.timeout(20)

SECOND_ARN = f"arn:aws:states:{REGION}:{ACCOUNT}:stateMachine:refunds"
QUEUE_A = f"{QUEUE_BASE}/invoices"
QUEUE_B = f"{QUEUE_BASE}/refunds"
EVENTS = f"{QUEUE_BASE}/events"


class Pools:
    """Ledgers of pools sharing named limits, driven by hand (no intake)."""

    def __init__(
        self, limits: dict[str, int], uses: dict[str, dict[str, int]], own: int = 100
    ) -> None:
        self.ledgers = {pool: Ledger(own) for pool in uses}
        self.shared = SharedLimits(
            [SharedLimitConfig(name=n, limit=v) for n, v in limits.items()],
            uses,
            self.ledgers.__getitem__,
        )
        for pool, ledger in self.ledgers.items():
            ledger.gate = functools.partial(self.shared.admits, pool)
        self.names = iter(range(1_000_000))

    def reserve(self, pool: str) -> Reservation | None:
        """What dispatch does: reserve one start if the named limits let it."""
        if not self.shared.may_reserve(pool):
            return None
        [reservation] = self.ledgers[pool].reserve(1, 0.0)
        return reservation

    def start(self, pool: str) -> str | None:
        """Reserve, send and start one execution of ``pool``; its ARN, or None."""
        reservation = self.reserve(pool)
        if reservation is None:
            return None
        ledger = self.ledgers[pool]
        assert ledger.admitted(reservation)
        ledger.mark_sent(reservation)
        arn = f"arn:{pool}:{next(self.names)}"
        ledger.started(reservation, arn, 0.0)
        return arn

    def end(self, pool: str, arn: str) -> None:
        self.ledgers[pool].observe_terminal(arn)


# -- weighted use, all at once ---------------------------------------------------------


def test_use_is_the_weighted_sum_of_running_starting_and_in_doubt() -> None:
    pools = Pools({"api": 10}, {"invoices": {"api": 1}, "refunds": {"api": 2}})
    pools.start("invoices")
    pools.start("refunds")
    starting = pools.reserve("refunds")  # in flight
    assert starting is not None
    doubted = pools.reserve("invoices")
    assert doubted is not None
    pools.ledgers["invoices"].doubt(doubted, "arn:invoices:doubt", 0.0)
    assert pools.shared.in_use("api") == 1 + 2 + 2 + 1
    assert pools.shared.free("api") == 4


def test_a_start_goes_only_when_its_weight_fits() -> None:
    pools = Pools({"api": 5}, {"invoices": {"api": 1}, "refunds": {"api": 2}})
    assert pools.start("invoices") is not None
    assert [pools.start("refunds") is not None for _ in range(3)] == [True, True, False]
    assert pools.shared.in_use("api") == 5
    assert pools.start("invoices") is None


def test_every_named_limit_must_have_room_at_once_and_none_is_held_partly() -> None:
    pools = Pools(
        {"api": 5, "db": 2},
        {"report": {"api": 1, "db": 1}, "batch": {"db": 2}},
    )
    assert pools.start("batch") is not None  # db full
    assert pools.start("report") is None  # api has room, db has not
    assert pools.shared.in_use("api") == 0  # nothing taken of api meanwhile
    assert pools.ledgers["report"].held == 0


def test_a_pool_without_named_limits_is_never_held_back() -> None:
    pools = Pools({"api": 1}, {"a": {"api": 1}, "free": {}})
    pools.start("a")
    assert pools.start("free") is not None
    assert pools.shared.in_use("api") == 1


# -- lowered limit, limits at send time ------------------------------------------------


def test_a_lowered_limit_stops_new_starts_until_use_is_under_it() -> None:
    pools = Pools({"api": 6}, {"a": {"api": 1}, "b": {"api": 2}})
    running = [pools.start("a") for _ in range(2)] + [pools.start("b") for _ in range(2)]
    assert pools.shared.in_use("api") == 6
    assert pools.shared.set_limit("api", 3)
    pools.end("b", str(running[2]))
    assert pools.shared.in_use("api") == 4
    assert pools.start("a") is None  # 4 + 1 > 3
    pools.end("a", str(running[0]))
    assert pools.start("a") is None  # 3 + 1 > 3
    pools.end("a", str(running[1]))
    assert pools.start("a") is not None  # 2 + 1 = 3


def test_reserved_starts_not_sent_wait_when_the_limit_is_lowered_oldest_first() -> None:
    """Between reservation and send the limit may fall (or executions started elsewhere
    take units): starts already sent keep their units, of the others only the oldest that
    fit go, across pools."""
    pools = Pools({"api": 5}, {"a": {"api": 1}, "b": {"api": 2}})
    first_b = pools.reserve("b")
    a_one = pools.reserve("a")
    second_b = pools.reserve("b")
    assert first_b is not None
    assert a_one is not None
    assert second_b is not None
    pools.ledgers["a"].mark_sent(a_one)  # a_one is on the wire
    pools.shared.set_limit("api", 3)
    assert pools.ledgers["a"].admitted(a_one)  # sent: 1 <= 3, it keeps its unit
    assert pools.ledgers["b"].admitted(first_b)  # 1 sent + 2 = 3
    assert not pools.ledgers["b"].admitted(second_b)  # 1 + 2 + 2 > 3
    pools.shared.set_limit("api", 2)
    assert not pools.ledgers["b"].admitted(first_b)
    assert pools.ledgers["a"].admitted(a_one)  # 1 <= 2
    pools.shared.set_limit("api", 0)
    assert not pools.ledgers["a"].admitted(a_one)  # a retry goes only while all sent fit


def test_executions_started_elsewhere_count_with_their_pools_weight() -> None:
    pools = Pools({"api": 4}, {"a": {"api": 1}, "b": {"api": 2}})
    pools.ledgers["b"].observe_running("arn:b:console", 0.0)  # adopted from a listing
    assert pools.shared.in_use("api") == 2
    pools.start("b")
    assert pools.start("a") is None


def test_use_is_rebuilt_from_listings_alone_after_a_restart() -> None:
    before = Pools({"api": 8}, {"a": {"api": 1}, "b": {"api": 3}})
    running = {pool: [before.start(pool) for _ in range(2)] for pool in ("a", "b")}
    assert before.shared.in_use("api") == 2 * 1 + 2 * 3
    after = Pools({"api": 7}, {"a": {"api": 1}, "b": {"api": 3}})  # a new process, lowered
    for pool, arns in running.items():
        after.ledgers[pool].apply_listing([str(arn) for arn in arns], 0.0, 5.0)
    assert after.shared.in_use("api") == 8  # over the limit: nothing starts
    assert after.start("a") is None


# -- a weight above the limit ----------------------------------------------------------


def config_file(tmp_path: Path, limits: str, uses_a: str, uses_b: str) -> Path:
    path = tmp_path / "dispatcher.toml"
    path.write_text(
        f"{limits}\n"
        f'[pools.invoices]\nstate_machine_arn = "{STATE_MACHINE_ARN}"\nlimit = 5\n{uses_a}\n'
        f'[pools.refunds]\nstate_machine_arn = "{SECOND_ARN}"\nlimit = 3\n{uses_b}\n'
        f'[[queues]]\nurl = "{QUEUE_A}"\npool = "invoices"\n'
        f'[[queues]]\nurl = "{QUEUE_B}"\npool = "refunds"\n'
    )
    return path


def load_file(path: Path) -> Any:
    return load(env={"DISPATCHER_CONFIG": str(path), "DISPATCHER_EVENTS_QUEUE_URL": EVENTS})


def test_the_config_file_declares_named_limits_and_weights(tmp_path: Path) -> None:
    path = config_file(
        tmp_path,
        '[limits.partner-api]\nlimit = 5\nlimit_parameter = "/sfn/partner-api"',
        "uses = { partner-api = 1 }",
        "uses = { partner-api = 2 }",
    )
    layout = load_file(path).layout
    assert layout.limits == (
        SharedLimitConfig(name="partner-api", limit=5, limit_parameter="/sfn/partner-api"),
    )
    assert [p.uses for p in layout.pools] == [{"partner-api": 1}, {"partner-api": 2}]


@pytest.mark.parametrize(
    ("limits", "uses", "message"),
    [
        (
            "[limits.api]\nlimit = 1",
            "uses = { api = 2 }",
            "[pools.refunds] uses api = 2: the weight is above [limits.api] limit 1",
        ),
        ("[limits.api]\nlimit = 4", "uses = { db = 1 }", "[pools.refunds] uses db: no [limits.db]"),
        ("[limits.api]\nlimit = 4", "uses = { api = 0 }", "api = 0: a weight is a whole number"),
        ("[limits.api]\nlimit = -1", "", "[limits.api] limit=-1 is invalid"),
        ("[limits.api]\nlimit = 4\nlimt = 5", "", "[limits.api] limt: unknown key"),
        ("[limits]\napi = 4", "", "[limits.api] must be a table"),
    ],
)
def test_mistakes_in_named_limits_are_refused_naming_limit_and_pool(
    tmp_path: Path, limits: str, uses: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_file(config_file(tmp_path, limits, "", uses))
    assert message in str(caught.value)


def test_a_live_value_below_a_weight_blocks_only_that_pool_and_says_why() -> None:
    pools = Pools({"api": 4}, {"a": {"api": 1}, "b": {"api": 3}})
    pools.shared.set_limit("api", 2)
    assert pools.start("b") is None
    assert not pools.shared.claimed("b")  # it cannot fit: it holds nobody back
    assert pools.start("a") is not None
    status = pools.shared.status()["api"]
    assert status["blocked"] == {
        "b": "weight 3 is above named limit api's value 2: the pool waits until the limit is raised"
    }
    pools.shared.set_limit("api", 4)
    assert pools.start("b") is not None


# -- no starvation: the claim rule -----------------------------------------------------


def test_a_heavier_pool_is_served_as_soon_as_its_weight_has_freed() -> None:
    """Limit 5, all taken by weight-1 starts, and both pools always have work: once the
    weight-2 pool waits, units freed are kept for it, not handed to the next weight-1."""
    pools = Pools({"api": 5}, {"light": {"api": 1}, "heavy": {"api": 2}})
    light = [pools.start("light") for _ in range(5)]
    assert pools.start("heavy") is None  # claims
    assert pools.shared.claims("api") == ["heavy"]
    pools.end("light", str(light.pop(0)))
    assert pools.start("light") is None  # one unit free, kept for heavy
    assert pools.start("heavy") is None  # 4 + 2 > 5
    pools.end("light", str(light.pop(0)))
    assert pools.start("light") is None
    assert pools.start("heavy") is not None  # 3 + 2 = 5
    assert pools.shared.claims("api") == ["light"]  # light claimed meanwhile: next


def run_stream(seed: int, *, claims: bool = True, steps: int = 400) -> list[float]:
    """Both pools always have work (light tries first at every change), executions run 1
    to 10 s (seeded); the times the heavy pool waited from its first refusal to its start."""
    rng = random.Random(seed)
    pools = Pools({"api": 5}, {"light": {"api": 1}, "heavy": {"api": 2}})
    if not claims:
        pools.shared._older_claim = lambda *_: False  # type: ignore[method-assign]
    ends: list[tuple[float, str, str]] = []
    waits: list[float] = []
    refused_at: float | None = None
    now = 0.0
    for _ in range(steps):
        for pool in ("light", "heavy"):
            while (arn := pools.start(pool)) is not None:
                if pool == "heavy" and refused_at is not None:
                    waits.append(now - refused_at)
                    refused_at = None
                heapq.heappush(ends, (now + rng.uniform(1.0, 10.0), pool, arn))
            if pool == "heavy" and refused_at is None:
                refused_at = now
            assert pools.shared.in_use("api") <= 5
        now, pool, arn = heapq.heappop(ends)
        pools.end(pool, arn)
    if refused_at is not None:
        waits.append(now - refused_at)  # still waiting at the end
    return waits


@pytest.mark.parametrize("seed", range(5))
def test_the_heavier_pool_waits_at_most_two_runs_behind_a_stream_of_lighter_starts(
    seed: int,
) -> None:
    """The stated bound: n x T with n = 2 pools sharing the limit, T = 10 s the longest run
    (ends are learnt at once here)."""
    waits = run_stream(seed)
    assert len(waits) > 20
    assert max(waits) <= 2 * 10.0


def test_without_claims_the_heavier_pool_starves() -> None:
    """The rule's reason: light starts first on every freed unit, so heavy never sees two."""
    waits = run_stream(0, claims=False)
    assert len(waits) == 1  # it never started: the one wait is still open at the end
    assert waits[0] > 20 * 2 * 10.0  # far past the bound: it would wait forever


def test_a_claim_is_dropped_when_the_pool_has_nothing_left_to_start() -> None:
    world, pools, intake = two_pools(limit=3)
    shared = pools["invoices"].shared
    assert shared is not None
    for n in range(3):
        world.sqs.put(QUEUE_A, request(f"a{n}"))
    world.sqs.put(QUEUE_B, request("b0"))

    async def go() -> None:
        for queue in intake.queues:
            await intake.receive_once(queue)
        assert await dispatch_all(intake, pools["invoices"]) == 3
        assert await dispatch_all(intake, pools["refunds"]) == 0  # claims
        assert shared.claims("partner-api") == ["refunds"]
        assert pools["refunds"].room.drain()  # its request left (handed back)
        pools["refunds"].update()
        assert await dispatch_all(intake, pools["refunds"]) == 0
        assert shared.claims("partner-api") == []

    anyio.run(go)


# -- through intake, status and metrics ------------------------------------------------


def request(name: str) -> dict[str, Any]:
    return sqs_message(json.dumps({"id": name}), message_id=name)


def two_pools(limit: int = 5) -> tuple[Any, dict[str, Pool], Any]:
    world, pools = build_layout_world(
        [
            PoolConfig(
                name="invoices",
                state_machine_arn=STATE_MACHINE_ARN,
                limit=5,
                uses={"partner-api": 1},
            ),
            PoolConfig(
                name="refunds", state_machine_arn=SECOND_ARN, limit=3, uses={"partner-api": 2}
            ),
        ],
        [
            QueueConfig(url=QUEUE_A, pools=("invoices",)),
            QueueConfig(url=QUEUE_B, pools=("refunds",)),
        ],
    )
    shared = share_limits(
        pools, [SharedLimitConfig(name="partner-api", limit=limit)], world.metrics
    )
    assert shared is not None
    return world, pools, intake_of(world, pools=pools)


def gauge(world: Any, name: str, **labels: str) -> float | None:
    value: float | None = world.metrics.registry.get_sample_value(name, labels)
    return value


async def test_intake_starts_each_pool_within_the_weighted_limit_and_wakes_the_other() -> None:
    world, pools, intake = two_pools()
    for n in range(4):
        world.sqs.put(QUEUE_A, request(f"a{n}"))
        world.sqs.put(QUEUE_B, request(f"b{n}"))
    for queue in intake.queues:
        await intake.receive_once(queue)
    assert await dispatch_all(intake, pools["invoices"]) == 4  # 4 units of 5
    assert await dispatch_all(intake, pools["refunds"]) == 0  # 4 + 2 > 5: claims
    assert gauge(world, "dispatcher_shared_limit_in_use", limit="partner-api") == 4
    assert gauge(world, "dispatcher_shared_limit", limit="partner-api") == 5
    # refunds (3 slots) received all 4 of its requests: one queue, its room kept full.
    assert gauge(world, "dispatcher_shared_limit_waiting", limit="partner-api") == 4
    world.sqs.put(QUEUE_A, request("a4"))
    await intake.receive_once(intake.queues[0])
    assert await dispatch_all(intake, pools["invoices"]) == 0  # the free unit is kept
    changed = anyio.Event()

    async def watch() -> None:
        await pools["refunds"].changed()
        changed.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        await anyio.wait_all_tasks_blocked()
        finish(pools["invoices"], execution_arn(STATE_MACHINE_ARN, "a0"))  # wakes refunds
        await changed.wait()
    assert await dispatch_all(intake, pools["refunds"]) == 1  # 3 + 2 = 5
    assert await dispatch_all(intake, pools["invoices"]) == 0
    starts = [c["name"] for c in world.sfn.calls_to("start_execution")]
    assert starts == ["a0", "a1", "a2", "a3", "b0"]


async def test_a_paused_named_limit_receives_nothing_for_its_pools() -> None:
    world, pools, _intake = two_pools(limit=0)
    world.sqs.put(QUEUE_A, request("a0"))
    assert pools["invoices"].wanted(0, 0) == 0
    shared = pools["invoices"].shared
    assert shared is not None
    shared.set_limit("partner-api", 2)
    assert pools["invoices"].wanted(0, 0) > 0
    assert pools["refunds"].wanted(0, 0) > 0


async def test_a_live_parameter_sets_the_named_limit_and_a_blocked_pool_is_logged(
    tmp_path: Path,
) -> None:
    path = config_file(
        tmp_path,
        '[limits.partner-api]\nlimit = 5\nlimit_parameter = "/sfn/partner-api"',
        "uses = { partner-api = 1 }",
        "uses = { partner-api = 2 }",
    )
    loaded = load_file(path)
    metrics = Metrics(CollectorRegistry())
    pools = {p.name: Pool(p, metrics) for p in loaded.layout.pools}
    shared = share_limits(pools, loaded.layout.limits, metrics)

    class Ssm:
        value = "1"

        async def get_parameter(self, **kwargs: Any) -> dict[str, Any]:
            return {"Parameter": {"Name": kwargs["Name"], "Value": self.value}}

    ssm = Ssm()
    limits = LiveLimits(
        loaded.settings,
        loaded.layout,
        pools,
        ssm=ssm,  # type: ignore[arg-type]
        metrics=metrics,
        limiters=RateLimiters(metrics, rate=None, burst=None, floor=1.0),
    )
    limits.shared = shared
    assert limits.shared_parameters == {"/sfn/partner-api": "partner-api"}
    with capture_logs() as logs:
        assert await limits.refresh_once() == 1
    assert shared is not None
    assert shared.limit("partner-api") == 1
    blocked = [e for e in logs if e["event"] == "dispatcher.pool_blocked"]
    assert [e["pool"] for e in blocked] == ["refunds"]
    assert "weight 2 is above named limit partner-api's value 1" in blocked[0]["why"]
    labels = {"limit": "partner-api", "pool": "refunds"}
    assert metrics.registry.get_sample_value("dispatcher_shared_limit_blocked", labels) == 1
    ssm.value = "lots"
    with capture_logs() as logs:
        assert await limits.refresh_once() == 0
    assert shared.limit("partner-api") == 1  # kept
    assert [e["event"] for e in logs] == ["dispatcher.limit_rejected"]
    ssm.value = "6"
    assert await limits.refresh_once() == 1
    assert metrics.registry.get_sample_value("dispatcher_shared_limit_blocked", labels) == 0


def test_the_worked_example_of_the_docs_loads() -> None:
    page = (Path(__file__).resolve().parent.parent / "docs" / "shared-limits.md").read_text()
    example = page.split("```toml\n", 1)[1].split("```", 1)[0]
    _, layout = parse(tomllib.loads(example), "docs/shared-limits.md")
    assert [(n.name, n.limit) for n in layout.limits] == [("partner-api", 5)]
    assert {p.name: p.uses for p in layout.pools} == {
        "invoices": {"partner-api": 1},
        "refunds": {"partner-api": 2},
    }


def test_status_shows_each_named_limit_its_users_and_what_waits() -> None:
    pools = Pools({"api": 4}, {"a": {"api": 1}, "b": {"api": 3}})
    pools.start("a")
    pools.start("a")
    assert pools.start("b") is None  # 2 + 3 > 4: b claims
    document = {"pools": {}, "limits": pools.shared.status()}
    lines = render_status(document, "http://x/status").splitlines()
    assert lines[-1] == "named limit api: 2 of 4 in use (a x1, b x3); waiting: b"
    pools.shared.set_limit("api", 2)
    lines = render_status({"limits": pools.shared.status()}, "u").splitlines()
    assert lines[-1] == (
        "named limit api: 2 of 2 in use (a x1, b x3); b blocked: weight 3 is above named "
        "limit api's value 2: the pool waits until the limit is raised"
    )
