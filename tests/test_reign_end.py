"""Requests kept on their last receive when a reign ends (the lease lost): settled on after
it, none on a "does not exist" before D and the grace from its end (nor from a later
reign's end), given a stop's time when the process is stopped meanwhile, and abandoned
with everything else on a second signal. On fakes, on virtual time."""

from __future__ import annotations

from itertools import pairwise
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from dispatcher.daemon.deadletter import REASON_ATTRIBUTE
from dispatcher.daemon.intake import Intake
from dispatcher.daemon.lastreceive import LastReceives
from dispatcher.daemon.service import Dispatcher
from tests.fakes import FakeClock, World, client_error
from tests.test_last_receive import (
    ARN,
    GRACE,
    D,
    dead_letters,
    intake_for,
    last_receive,
    world_of,
)
from tests.virtual_time import on_virtual_time

pytestmark = [pytest.mark.timeout(20), pytest.mark.usefixtures("fast_retries")]

RETRY_ATTEMPTS = 2  # stamina's test mode (the fast_retries fixture)


class _VirtualClock(FakeClock):
    """The pool's clock on the event loop's virtual time (`on_virtual_time`)."""

    def __call__(self) -> float:
        return self.now + anyio.current_time()


def _on_virtual_clock(world: World) -> World:
    world.clock = world.pool.clock = _VirtualClock()
    return world


def _kept_by_a_reign(world: World) -> tuple[Intake, Dispatcher]:
    """A request kept on its last receive (waiting, no slot) by a reign about to end, its
    describes throttled (it stays kept); the service whose `_abdicate` ends that reign."""
    world.pool.ledger.set_limit(0)
    intake, _ = intake_for(world)
    world.sfn.fail_always(
        "describe_execution", client_error("ThrottlingException", 400, op="DescribeExecution")
    )
    service = Dispatcher(world.settings, clock=world.clock, serve_http=False)
    service.pools = {"default": world.pool}
    intake.keep_settling = True
    return intake, service


async def _kept_then(world: World, intake: Intake) -> LastReceives:
    await intake.admit(intake.queues[0], last_receive())
    assert await intake.hand_back_waiting() == 0
    assert len(intake.starter.last_receives) == 1
    return intake.starter.last_receives


@on_virtual_time
async def test_a_request_kept_by_an_earlier_reign_waits_again_when_a_later_reign_ends() -> None:
    """A request kept by a reign that ended is still being settled (describes throttled)
    when the process leads again. That second reign sends a start of another copy of it,
    given up in doubt, and loses its lease: the reset takes the doubt its settling read.
    It was dead-lettered at once, before that start took effect (a reviewer's test)."""
    world = _on_virtual_clock(world_of(limit=0))
    first, service = _kept_by_a_reign(world)
    kept = await _kept_then(world, first)
    async with anyio.create_task_group() as tg:
        service._background = tg
        await service._abdicate(first)  # the first reign lost: settled in the background
        await anyio.sleep(D + GRACE + 60)  # the lease taken again, its wait over
        assert len(kept) == 1
        assert dead_letters(world) == []
        world.pool.reset()  # the second reign
        second, _ = intake_for(world)
        world.pool.ledger.set_limit(1)
        [reservation] = world.pool.ledger.reserve(1, world.clock())
        world.pool.ledger.mark_sent(reservation)
        world.pool.ledger.doubt(reservation, ARN, world.clock())  # another copy's, in doubt
        second.keep_settling = True
        await service._abdicate(second)  # lost too: the doubt goes with the reset
        world.sfn.recover("describe_execution")
        await anyio.sleep(D / 2)
        assert dead_letters(world) == [], "dead-lettered while that start may take effect"
        world.sfn.add_execution("m-1", '{"n": 1}')  # it took effect, D after it was sent
        await anyio.sleep(D + GRACE)
        assert len(kept) == 0, "not settled"
        tg.cancel_scope.cancel()
    assert dead_letters(world) == []


@pytest.mark.parametrize("aws_answers", [True, False])
@on_virtual_time
async def test_a_stop_gives_what_an_ended_reign_keeps_the_time_a_reign_of_its_own_gets(
    aws_answers: bool,
) -> None:
    """Stopped while a request kept by a reign that ended is still being settled: it used to
    be let go at once, hidden, for the redrive policy to move without a reason. It gets
    what a stop gives a reign's own (D + grace + 5 s): AWS answering, it is dead-lettered
    with its reason before the process exits; AWS silent, the stop waits no longer."""
    world = _on_virtual_clock(world_of(limit=0))
    intake, service = _kept_by_a_reign(world)
    kept = await _kept_then(world, intake)
    async with anyio.create_task_group() as tg:
        service._background = tg
        await service._abdicate(intake)
        if aws_answers:
            world.sfn.recover("describe_execution")
        began = anyio.current_time()
        await service._finish_settling()
        waited = anyio.current_time() - began
        tg.cancel_scope.cancel()
    if aws_answers:
        assert waited < D + GRACE + 5, "waited out the whole bound"
        assert len(kept) == 0
        [copy] = dead_letters(world)
        assert copy["MessageAttributes"][REASON_ATTRIBUTE]["StringValue"] == "receive_limit"
    else:
        assert waited == pytest.approx(D + GRACE + 5)
        assert dead_letters(world) == []


@on_virtual_time
async def test_a_stops_wait_for_an_ended_reigns_requests_counts_from_the_stop() -> None:
    """They were settled in the background through the stop's other steps: the wait
    adds nothing past D + grace + 5 s from the stop."""
    world = _on_virtual_clock(world_of(limit=0))
    intake, service = _kept_by_a_reign(world)
    service.clock = world.clock
    await _kept_then(world, intake)
    async with anyio.create_task_group() as tg:
        service._background = tg
        await service._abdicate(intake)
        service.stop()
        await anyio.sleep(12)  # the stop's other steps
        began = anyio.current_time()
        await service._finish_settling()  # AWS never answers
        assert anyio.current_time() - began == pytest.approx(D + GRACE + 5 - 12)
        tg.cancel_scope.cancel()


@on_virtual_time
async def test_a_forced_stop_abandons_an_ended_reigns_dead_letter_delete() -> None:
    """The second signal abandoned only the current reign's deletes: an earlier reign's
    settling went on retrying its dead letter's delete, shielded, for a minute (a
    reviewer's test)."""
    world = _on_virtual_clock(world_of(limit=0))
    first, service = _kept_by_a_reign(world)
    await _kept_then(world, first)
    throttled = client_error("RequestThrottled", 400, op="DeleteMessage")
    async with anyio.create_task_group() as tg:
        service._background = tg
        await service._abdicate(first)
        second, _ = intake_for(world)  # a later reign of the same process
        service.intake = second
        world.sfn.recover("describe_execution")
        world.sqs.fail("delete_message", *[throttled] * 1000)
        await world.sqs.called("delete_message")  # the dead letter's delete, throttled
        service.stop()
        service._force_stop(tg.cancel_scope)  # the second signal
        forced = anyio.current_time()
    assert len(dead_letters(world)) == 1
    assert anyio.current_time() - forced < 1, "the forced exit waited for that delete"


class _Lease:
    """A lease for `_reign` and `Dispatcher._keep_lease`: renewed until ``lost`` is set,
    then someone else holds it."""

    def __init__(self) -> None:
        self.lost = anyio.Event()
        self.config = SimpleNamespace(renew_every=1.0, renew_timeout=5.0)
        self.epoch = 1
        self._valid = True

    def valid(self) -> bool:
        return self._valid

    def remaining(self) -> float:
        return 10.0

    async def renew(self) -> bool:
        await self.lost.wait()
        return False

    def lapse(self) -> None:
        self._valid = False

    async def release(self) -> None:
        return None

    def pass_on(self, _: Any) -> None:
        return None


def _without_aws(service: Dispatcher, intake: Intake, take_office: Any = None) -> None:
    """`_reign` with stand-ins for what needs AWS: building (``intake``), the start-up
    listing (``take_office``: none) and the event and reconcile loops."""

    def build(clients: Any, lease: Any) -> Any:
        del clients, lease
        service.intake, service.callbacks = intake, intake.starter.callbacks
        return intake, None

    async def no_listing(lease: Any, listing_at: float) -> None:
        del lease, listing_at

    async def run_loops(events: Any, *, task_status: Any) -> None:
        del events
        with anyio.CancelScope() as scope:
            task_status.started(scope)
            await anyio.sleep_forever()

    service._build = build  # type: ignore[method-assign]
    service._take_office = take_office or no_listing  # type: ignore[method-assign]
    service._run_loops = run_loops  # type: ignore[method-assign]


async def _reign_lost(
    world: World,
    *,
    stopped_while_draining: bool,
    drain: float = 0.0,
    hand_back: float = 0.0,
    lost_after: float = 0.0,
    kept_at: list[float] | None = None,
) -> LastReceives:
    """Run `Dispatcher._reign`: a request is kept, the lease is lost, and with
    ``stopped_while_draining`` a SIGTERM comes while intake drains (``drain`` seconds more:
    a long poll let answer), its parents' tokens handed back in ``hand_back`` seconds, the
    lease lost ``lost_after`` seconds after the request was kept (when: appended to
    ``kept_at``).
    Returns what the reign kept, once a stop has waited for it (what `run` does); AWS
    answers describes from the reign's end."""
    intake, service = _kept_by_a_reign(world)
    _without_aws(service, intake)
    lease = _Lease()
    stop_intake, run_intake = intake.stop, intake.run
    callbacks = intake.starter.callbacks
    assert callbacks is not None
    give_back = callbacks.hand_back

    def stop(*, force: bool = False) -> None:
        stop_intake(force=force)  # `_reign` has set `keep_settling`: intake drains from here
        world.sfn.recover("describe_execution")
        if stopped_while_draining:
            service.stop()  # SIGTERM

    async def run(**kwargs: Any) -> None:
        await run_intake(**kwargs)
        await anyio.sleep(drain)

    async def hand_back_slowly() -> int:
        await anyio.sleep(hand_back)  # last heartbeats throttled
        return await give_back()

    intake.stop = stop  # type: ignore[method-assign]
    intake.run = run  # type: ignore[method-assign]
    callbacks.hand_back = hand_back_slowly  # type: ignore[method-assign]

    async def keep_one() -> None:
        await service.started.wait()  # the reign governs
        await anyio.sleep(0.1)  # just after a pass of extensions
        await _kept_then(world, intake)
        if kept_at is not None:
            kept_at.append(anyio.current_time())
        await anyio.sleep(lost_after)
        lease.lost.set()

    async with anyio.create_task_group() as tg:
        service._background = tg
        tg.start_soon(keep_one)
        await service._reign(None, lease, anyio.TASK_STATUS_IGNORED, 0.0)  # type: ignore[arg-type]
        await service._finish_settling()
        tg.cancel_scope.cancel()
    return intake.starter.last_receives


@pytest.mark.parametrize(
    ("stopped_while_draining", "drain", "hand_back"),
    [(False, 0.0, 0.0), (True, 0.0, 0.0), (True, 8.0, 0.0), (True, 0.0, 8.0)],
)
@on_virtual_time
async def test_a_request_kept_when_the_lease_is_lost_is_settled_even_if_a_stop_comes(
    stopped_while_draining: bool, drain: float, hand_back: float
) -> None:
    """A SIGTERM while intake drained after the lease was lost used to skip the settling
    altogether: the kept request was neither settled nor let go with a log line, and the
    redrive policy moved it without a reason. Then its D + grace counted from the end of
    the step-down, not from the lease's loss: a slow step-down used up the stop's wait
    before any describe could settle it (reviewers' tests)."""
    world = _on_virtual_clock(world_of(limit=0))
    kept = await _reign_lost(
        world, stopped_while_draining=stopped_while_draining, drain=drain, hand_back=hand_back
    )
    assert len(kept) == 0
    [copy] = dead_letters(world)
    assert copy["MessageAttributes"][REASON_ATTRIBUTE]["StringValue"] == "receive_limit"


@on_virtual_time
async def test_a_lease_lost_during_the_start_up_listing_forgets_what_it_listed() -> None:
    """Lost before the reign governed: the ledger is forgotten all the same, or `/status`
    and the metrics of a standby report the listed executions as running here (a
    reviewer's test)."""
    world = _on_virtual_clock(world_of(limit=5))
    intake, service = _kept_by_a_reign(world)
    intake.keep_settling = False  # as `_reign` finds it: set only once the reign governed
    lease = _Lease()
    listed = "arn:aws:states:eu-west-1:123456789012:execution:governed:listed"

    async def slow_listing(_: Any, listing_at: float) -> None:
        del listing_at
        world.pool.ledger.observe_running(listed, world.clock())  # part way through
        lease.lost.set()
        await anyio.sleep_forever()  # ListExecutions throttled

    _without_aws(service, intake, slow_listing)
    async with anyio.create_task_group() as tg:
        service._background = tg
        await service._reign(None, lease, anyio.TASK_STATUS_IGNORED, 0.0)  # type: ignore[arg-type]
        tg.cancel_scope.cancel()
    assert world.pool.ledger.running_count == 0


@on_virtual_time
async def test_a_kept_request_stays_hidden_while_the_tokens_are_handed_back() -> None:
    """Intake stops extending what it keeps when the reign ends; the settling after it
    began only once the parents' tokens were handed back (up to 15 s): a request kept
    17 s before the loss was visible again before its next extension, for the redrive
    policy to move without a reason (a reviewer's test)."""
    visibility = 30
    world = _on_virtual_clock(world_of(limit=0, visibility_timeout=visibility))
    extended: list[float] = []
    extend = world.sqs.change_message_visibility_batch

    async def noting(**call: Any) -> dict[str, Any]:
        if any(e["ReceiptHandle"] == "rh-m-1" for e in call["Entries"]):
            extended.append(anyio.current_time())
        return await extend(**call)

    world.sqs.change_message_visibility_batch = noting  # type: ignore[method-assign]
    kept_at: list[float] = []
    await _reign_lost(
        world, stopped_while_draining=False, hand_back=14.9, lost_after=17.4, kept_at=kept_at
    )
    hidden = [*kept_at, *extended]
    gaps = [after - before for before, after in pairwise(hidden)]
    assert extended, "never extended"
    assert max(gaps) < visibility, f"visible again: {max(gaps):.1f} s without an extension"
