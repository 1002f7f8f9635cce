"""Starts in doubt (invariant 1): a start whose outcome is unknown keeps its slot until
evidence settles it - never freed on a guess. On fakes, one request at a time."""

from __future__ import annotations

import json

import anyio
import pytest

from dispatcher.core.ledger import Change
from dispatcher.core.requests import execution_arn
from dispatcher.daemon.events import Events
from dispatcher.daemon.reconcile import Reconciler
from tests.fake_intake import handle, intake_of
from tests.fakes import STATE_MACHINE_ARN, World, build_world, client_error, sqs_message

pytestmark = [pytest.mark.timeout(10), pytest.mark.usefixtures("fast_retries")]

GRACE = 10.0


RETRY_ATTEMPTS = 3  # stamina's test mode (the fast_retries fixture)


def world_of(limit: int = 1) -> World:
    return build_world(limit=limit, start_grace=GRACE)


def reconciler_of(world: World) -> Reconciler:
    return Reconciler(world.settings, world.clients, world.pool, world.metrics, world.health)


def arn_of(message_id: str) -> str:
    return execution_arn(STATE_MACHINE_ARN, message_id)


def running_in_fake(world: World) -> list[str]:
    """The fake AWS's own record of what runs: the judge, not the ledger."""
    return sorted(a for a, e in world.sfn.executions.items() if e.status == "RUNNING")


async def test_a_start_accepted_whose_answers_are_lost_keeps_its_slot() -> None:
    """The repro of issue 11 bug 1: every attempt takes effect and loses its answer until
    the retries give up, status events are lost and no listing has run. The next request
    must not start (it did: 2 running under limit 1)."""
    world = world_of(limit=1)
    world.sfn.answers_lost = 10
    first = sqs_message(message_id="first")
    intake = await handle(world, first)
    assert running_in_fake(world) == [arn_of("first")]
    assert world.pool.ledger.in_doubt == {arn_of("first")}
    assert world.pool.ledger.free == 0
    assert world.sample("dispatcher_in_doubt", pool="default") == 1
    assert world.sample("dispatcher_starts_total", pool="default", outcome="in_doubt") == 1
    # Handed back, not deleted: its next delivery (same name) or evidence settles it.
    assert "delete_message" not in world.sqs.names()
    await handle(world, sqs_message(message_id="second"), intake)
    assert running_in_fake(world) == [arn_of("first")]  # held back: the limit holds


async def test_a_listing_turns_the_doubt_into_a_running_execution() -> None:
    world = world_of(limit=1)
    world.sfn.answers_lost = 10
    await handle(world, sqs_message(message_id="first"))
    await reconciler_of(world).run_once()
    assert world.pool.ledger.in_doubt == frozenset()
    assert world.pool.ledger.running == {arn_of("first")}
    assert world.pool.ledger.free == 0


async def test_does_not_exist_settles_a_doubt_only_after_the_grace() -> None:
    """A refused-looking outcome (5xx) that in truth did nothing: describe says "does not
    exist", which frees the slot only once the listing-consistency grace has passed since
    the last attempt - the same rule reconcile applies to what it holds."""
    world = world_of(limit=1)
    world.sfn.fail_always("start_execution", client_error("InternalFailure", 500))
    await handle(world, sqs_message(message_id="first"))
    ledger = world.pool.ledger
    assert ledger.in_doubt == {arn_of("first")}
    reconciler = reconciler_of(world)
    world.clock.advance(GRACE / 2)
    report = await reconciler.run_once()  # within the grace: not even a suspect
    assert (report.freed, ledger.free) == (0, 0)
    assert ledger.observe_missing(arn_of("first"), world.clock(), GRACE) is Change.UNCHANGED
    world.clock.advance(GRACE)
    report = await reconciler.run_once()
    assert report.freed == 1
    assert ledger.in_doubt == frozenset()
    assert ledger.free == 1
    assert world.sfn.calls_to("describe_execution") == [{"executionArn": arn_of("first")}]


async def test_a_terminal_event_settles_a_doubt() -> None:
    world = world_of(limit=1)
    world.sfn.answers_lost = 10
    await handle(world, sqs_message(message_id="first"))
    events = Events(
        world.settings,
        world.clients,
        {STATE_MACHINE_ARN: world.pool},
        world.metrics,
        world.health,
    )
    body = {
        "source": "aws.states",
        "detail-type": "Step Functions Execution Status Change",
        "detail": {
            "executionArn": arn_of("first"),
            "stateMachineArn": STATE_MACHINE_ARN,
            "status": "SUCCEEDED",
        },
    }
    assert events.apply(json.dumps(body)) == "applied"
    assert world.pool.ledger.in_doubt == frozenset()
    assert world.pool.ledger.free == 1


async def test_a_later_attempt_that_is_answered_settles_the_doubt() -> None:
    """The first attempt's answer is lost, the retry (same name, same input, still
    running) is answered with the same ARN, as AWS does: one running execution, no doubt."""
    world = world_of(limit=2)
    world.sfn.answers_lost = 1
    intake = await handle(world, sqs_message(message_id="first"))
    assert world.pool.ledger.running == {arn_of("first")}
    assert world.pool.ledger.in_doubt == frozenset()
    assert world.pool.ledger.free == 1
    assert intake.stats.started == 1


async def test_a_start_cut_short_on_the_wire_is_in_doubt() -> None:
    """A forced stop cancels a start while it is on the wire: it may have arrived."""
    world = world_of(limit=1)
    world.sfn.start_gate = anyio.Event()  # the call hangs on the wire
    intake = intake_of(world)
    await intake.admit(intake.queues[0], sqs_message(message_id="first"))
    async with anyio.create_task_group() as handlers:
        intake.dispatch_once(world.pool, handlers)
        await anyio.wait_all_tasks_blocked()
        intake.stop(force=True)
    assert world.pool.ledger.in_doubt == {arn_of("first")}
    assert world.pool.ledger.free == 0


async def test_a_doubt_outlives_an_attempt_that_may_take_effect_after_the_grace() -> None:
    """D (the start timeout) longer than the grace: an attempt answered with a 5xx at once
    may still take effect D after it was sent. "Does not exist" the grace after the give-up
    proves nothing then: the slot stays held until the grace has passed since the attempt
    could last take effect. It was freed, and a second request started beside the first."""
    d = 25.0
    world = build_world(limit=1, start_grace=GRACE, start_timeout=d)
    world.sfn.fail_always("start_execution", client_error("InternalFailure", 500))
    intake = await handle(world, sqs_message(message_id="first"))
    sent = world.clock()  # (the fake clock stands still meanwhile)
    ledger = world.pool.ledger
    assert ledger.in_doubt == {arn_of("first")}
    reconciler = reconciler_of(world)
    world.clock.advance(GRACE + 1)
    assert (await reconciler.run_once()).freed == 0
    assert ledger.free == 0
    world.sfn.recover("start_execution")
    await handle(world, sqs_message(message_id="second"), intake)
    world.sfn.add_execution("first", "{}")  # the first's attempt takes effect, within D
    assert world.clock() < sent + d
    assert running_in_fake(world) == [arn_of("first")], "two running under limit 1"
    world.clock.advance(sent + d + GRACE - world.clock())
    assert (await reconciler.run_once()).freed == 0  # listed now: it runs
    assert ledger.running == {arn_of("first")}
