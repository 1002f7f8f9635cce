"""Reconcile on fakes: adopt unknown runners, free only what DescribeExecution says ended."""

from __future__ import annotations

import anyio
import pytest
from botocore.exceptions import ClientError

from dispatcher.daemon.reconcile import Reconciler
from tests.fakes import STATE_MACHINE_ARN, World, build_world, client_error

pytestmark = pytest.mark.timeout(10)

GRACE = 10.0


def reconciler_of(world: World) -> Reconciler:
    """The reconciler under test, wired to the world's fakes."""
    return Reconciler(world.settings, world.clients, world.pool, world.metrics, world.health)


def world_with(limit: int = 5, page_size: int = 100) -> World:
    """A world whose grace window is ``GRACE`` seconds."""
    return build_world(limit=limit, page_size=page_size, start_grace=GRACE)


def hold(world: World, name: str) -> str:
    """Start ``name`` through the fake and the ledger, as intake would; returns its ARN."""
    arn = world.sfn.add_execution(name)
    [reservation] = world.pool.ledger.reserve(1, world.clock())
    world.pool.ledger.started(reservation, arn, world.clock())
    world.pool.update()
    return arn


def corrections(world: World, kind: str) -> float:
    """``dispatcher_reconcile_corrections_total`` of one kind."""
    return world.sample("dispatcher_reconcile_corrections_total", pool="default", kind=kind)


async def test_unknown_runners_are_adopted() -> None:
    world = world_with()
    elsewhere = {world.sfn.add_execution(f"console-{i}") for i in range(3)}
    world.sfn.add_execution("done", status="SUCCEEDED")
    report = await reconciler_of(world).run_once()
    assert world.pool.ledger.running == elsewhere
    assert (report.listed, report.adopted, report.freed) == (3, 3, 0)
    assert corrections(world, "adopted") == 3
    assert world.sample("dispatcher_running", pool="default") == 3
    [listing] = world.sfn.calls_to("list_executions")
    assert listing["stateMachineArn"] == STATE_MACHINE_ARN
    assert listing["statusFilter"] == "RUNNING"
    assert world.sample("dispatcher_reconcile_runs_total", result="ok") == 1
    assert world.health.last_reconcile_at is not None


async def test_known_runners_are_no_correction() -> None:
    world = world_with()
    hold(world, "ours")
    world.clock.advance(GRACE + 1)
    report = await reconciler_of(world).run_once()
    assert (report.adopted, report.freed, report.confirmed) == (0, 0, 0)
    assert corrections(world, "adopted") == 0
    assert world.sfn.calls_to("describe_execution") == []


async def test_ended_execution_is_freed_after_describe_says_so() -> None:
    world = world_with()
    arn = hold(world, "ours")
    world.sfn.finish(arn, "FAILED")  # the FAILED event was lost
    world.clock.advance(GRACE + 1)
    report = await reconciler_of(world).run_once()
    assert world.sfn.calls_to("describe_execution") == [{"executionArn": arn}]
    assert not world.pool.ledger.holds(arn)
    assert world.pool.ledger.is_tombstoned(arn)
    assert report.freed == 1
    assert corrections(world, "freed") == 1
    assert world.pool.finished_total == 1


async def test_missing_execution_within_the_grace_window_is_left_alone() -> None:
    world = world_with()
    arn = hold(world, "just-started")
    world.sfn.executions[arn].listed = False  # the listing lags behind the start
    world.clock.advance(GRACE - 1)
    report = await reconciler_of(world).run_once()
    assert world.sfn.calls_to("describe_execution") == []
    assert world.pool.ledger.holds(arn)
    assert (report.freed, report.confirmed) == (0, 0)


async def test_missing_execution_that_describe_says_runs_is_kept() -> None:
    world = world_with()
    arn = hold(world, "lagging")
    world.sfn.executions[arn].listed = False
    world.clock.advance(GRACE + 1)
    reconciler = reconciler_of(world)
    report = await reconciler.run_once()
    assert world.sfn.calls_to("describe_execution") == [{"executionArn": arn}]
    assert world.pool.ledger.holds(arn)
    assert (report.freed, report.confirmed) == (0, 1)
    assert corrections(world, "freed") == 0
    # The describe restarted its grace window: the next pass does not describe it again.
    world.clock.advance(GRACE - 1)
    await reconciler.run_once()
    assert len(world.sfn.calls_to("describe_execution")) == 1


async def test_execution_that_does_not_exist_is_freed() -> None:
    world = world_with()
    arn = hold(world, "vanished")
    del world.sfn.executions[arn]
    world.clock.advance(GRACE + 1)
    report = await reconciler_of(world).run_once()
    assert report.freed == 1
    assert not world.pool.ledger.holds(arn)


async def test_failed_describe_frees_nothing() -> None:
    world = world_with()
    arn = hold(world, "unknown-state")
    world.sfn.finish(arn)
    world.sfn.fail("describe_execution", client_error("ThrottlingException", 400))
    world.clock.advance(GRACE + 1)
    try:
        await reconciler_of(world).run_once()
    except* ClientError:
        pass  # raising is allowed; freeing on a guess is not
    assert world.sfn.calls_to("describe_execution") == [{"executionArn": arn}]
    assert world.pool.ledger.holds(arn)
    assert corrections(world, "freed") == 0


async def test_reconcile_loop_survives_a_failed_describe() -> None:
    world = build_world(limit=5, start_grace=GRACE, reconcile_interval=0.001)
    arn = hold(world, "ours")
    world.sfn.finish(arn)
    world.clock.advance(GRACE + 1)
    world.sfn.fail("describe_execution", client_error("ThrottlingException", 400))
    loops = world.health.loops
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(world.health.supervise, "reconcile", reconciler_of(world).run)
            # Poll a condition under the deadline: the next pass frees it, or the loop died.
            while world.pool.ledger.holds(arn) and loops.get("reconcile", True):  # noqa: ASYNC110
                await anyio.sleep(0.001)
            tg.cancel_scope.cancel()
    assert loops["reconcile"] is True
    assert not world.pool.ledger.holds(arn)


async def test_failed_listing_changes_nothing() -> None:
    world = world_with()
    arn = hold(world, "ours")
    world.sfn.fail("list_executions", client_error("ThrottlingException", 400))
    world.clock.advance(GRACE + 1)
    with pytest.raises(ClientError):
        await reconciler_of(world).run_once()
    assert world.pool.ledger.running == {arn}
    assert world.sfn.calls_to("describe_execution") == []


async def test_every_page_is_followed() -> None:
    world = world_with(limit=10, page_size=3)
    arns = {world.sfn.add_execution(f"e-{i}") for i in range(8)}
    report = await reconciler_of(world).run_once()
    assert report.listed == 8
    assert world.pool.ledger.running == arns
    listings = world.sfn.calls_to("list_executions")
    assert [call.get("nextToken") for call in listings] == [None, "3", "6"]
    assert all(call["statusFilter"] == "RUNNING" for call in listings)


async def test_execution_on_a_later_page_is_not_freed() -> None:
    world = world_with(limit=10, page_size=2)
    for i in range(4):
        world.sfn.add_execution(f"before-{i}")
    arn = hold(world, "ours")  # fifth: listed on the third page only
    world.clock.advance(GRACE + 1)
    await reconciler_of(world).run_once()
    assert world.sfn.calls_to("describe_execution") == []
    assert world.pool.ledger.holds(arn)
    assert world.pool.ledger.running_count == 5


async def test_adopting_over_the_limit_holds_starts_back() -> None:
    world = world_with(limit=2)
    for i in range(3):
        world.sfn.add_execution(f"console-{i}")
    await reconciler_of(world).run_once()
    assert world.pool.ledger.running_count == 3
    assert world.pool.ledger.free == 0
    assert world.pool.ledger.reserve(1, world.clock()) == []


async def test_late_listing_does_not_revive_an_ended_execution() -> None:
    world = world_with()
    arn = hold(world, "ended")
    world.pool.ledger.observe_terminal(arn)  # its SUCCEEDED event arrived
    # ...but the (eventually consistent) listing still shows it running.
    await reconciler_of(world).run_once()
    assert not world.pool.ledger.holds(arn)
    assert corrections(world, "adopted") == 0
