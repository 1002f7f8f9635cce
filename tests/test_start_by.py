"""Start-by deadlines: a request not started by its ``start-by`` is dead-lettered as
expired and never started; a start in doubt is never expired; a parent waiting on a token
gets ``Dispatcher.Expired``. On fakes, with an injected wall clock."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import pytest

from dispatcher.cli.main import build_parser
from dispatcher.cli.redrive import request_attributes
from dispatcher.cli.submit import _requests as submit_requests_of
from dispatcher.cli.submit import parse_start_by_flag
from dispatcher.core.deadline import (
    EXPIRED_ERROR,
    format_deadline,
    parse_start_by,
    start_by_of,
)
from dispatcher.core.requests import BadRequest, StartRequest, execution_arn, parse
from dispatcher.daemon.callbacks import Callbacks
from dispatcher.daemon.deadletter import DETAIL_ATTRIBUTE, REASON_ATTRIBUTE
from dispatcher.daemon.intake import Intake
from dispatcher.errors import UserError
from dispatcher.producer import SubmitItem
from dispatcher.settings.config import InputFormat
from tests.fake_intake import dispatch_all, intake_of, waiting
from tests.fakes import (
    DEAD_LETTER_QUEUE,
    REQUEST_QUEUE,
    STATE_MACHINE_ARN,
    FakeClock,
    World,
    build_world,
    sqs_message,
)
from tests.virtual_time import on_virtual_time

pytestmark = [pytest.mark.timeout(10), pytest.mark.usefixtures("fast_retries")]
RETRY_ATTEMPTS = 2  # stamina's test mode (the fast_retries fixture)

T0 = 1_796_464_800.0  # 2026-12-05T10:00:00Z
TOKEN = "AQCEAAAAKgAAAAMAAAAAAAAAA" + "t" * 100
ARN = execution_arn(STATE_MACHINE_ARN, "m-1")


# -- parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-12-05T10:00:00Z", T0),
        ("2026-12-05t10:00:00z", T0),
        ("2026-12-05 10:00:00Z", T0),
        ("2026-12-05T11:00:00+01:00", T0),
        ("2026-12-05T04:30:00-05:30", T0),
        ("2026-12-05T10:00:00.5Z", T0 + 0.5),
        ("2026-12-05T10:00:00.123456789Z", T0 + 0.123456),
        ("1796464800", T0),
        ("1796464800.25", T0 + 0.25),
        (" 1796464800 ", T0),
    ],
)
def test_start_by_formats(text: str, expected: float) -> None:
    assert parse_start_by(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "soon",
        "2026-12-05T10:00:00",  # no offset: which zone?
        "2026-12-05",
        "2026-13-05T10:00:00Z",
        "2026-02-30T10:00:00Z",
        "2026-12-05T25:00:00Z",
        "1796464800000",  # milliseconds
        "-1",
        "1e9",
        "+10m",
    ],
)
def test_invalid_start_by_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        parse_start_by(text)


def test_a_deadline_is_shown_in_rfc_3339_utc() -> None:
    assert format_deadline(T0) == "2026-12-05T10:00:00Z"
    assert format_deadline(T0 + 0.5) == "2026-12-05T10:00:00.500Z"


@pytest.mark.parametrize("fraction", [0.0, 0.0004, 0.0009, 0.001, 0.4999, 0.9996])
def test_a_shown_deadline_parses_back_to_the_same_text(fraction: float) -> None:
    """Under 1 ms past the second once read "...00.000Z" while the parsed value read
    "...00Z": the dead letter's detail did not contain the deadline the producer sent."""
    shown = format_deadline(T0 + fraction)
    assert ".000Z" not in shown
    assert format_deadline(parse_start_by(shown)) == shown


def message(start_by: str | None = None, **attributes: str) -> dict[str, Any]:
    """Request m-1, first received at T0 - 10 s (in this reign: see `intake_for`)."""
    if start_by is not None:
        attributes["start-by"] = start_by
    return sqs_message(
        '{"n": 1}',
        message_id="m-1",
        attributes=attributes or None,
        system={"ApproximateFirstReceiveTimestamp": str(int((T0 - 10) * 1000))},
    )


def test_an_invalid_start_by_is_a_bad_request_naming_the_attribute_and_value() -> None:
    bad = parse(message("next tuesday"), InputFormat.JSON)
    assert isinstance(bad, BadRequest)
    assert bad.reason == "invalid_start_by"
    assert "start-by 'next tuesday' is invalid" in bad.detail
    assert start_by_of({}) == (None, None)


@pytest.mark.parametrize("fmt", [InputFormat.JSON, InputFormat.ENVELOPE])
def test_the_deadline_is_read_in_either_input_format_and_kept_out_of_the_envelope(
    fmt: InputFormat,
) -> None:
    request = parse(message("2026-12-05T10:00:00Z", region="eu"), fmt)
    assert isinstance(request, StartRequest)
    assert request.start_by == T0
    if fmt is InputFormat.ENVELOPE:
        # Said to the dispatcher, not the execution: a retry with a later deadline is the
        # same request (same input), not an idempotency conflict.
        assert json.loads(request.input)["attributes"] == {"region": "eu"}


# -- expiring ------------------------------------------------------------------------------


def intake_for(world: World, now: float = T0 - 60) -> tuple[Intake, FakeClock, Callbacks]:
    """Intake with a wall clock at ``now`` and callbacks, its reign begun at T0 - 1000 s."""
    intake = intake_of(world)
    wall = FakeClock(now)
    intake.starter.expiries.clock = wall
    intake.starter.reign_began = T0 - 1000
    callbacks = Callbacks(
        world.settings, world.clients, world.metrics, {"default": world.pool}, world.clock
    )
    callbacks.reign_began = T0 - 1000
    intake.starter.callbacks = callbacks
    world.pool.on_ended = callbacks.ended
    return intake, wall, callbacks


def dead_letters(world: World) -> list[dict[str, Any]]:
    return [c for c in world.sqs.calls_to("send_message") if c["QueueUrl"] == DEAD_LETTER_QUEUE]


def reason_of(letter: dict[str, Any]) -> str:
    return str(letter["MessageAttributes"][REASON_ATTRIBUTE]["StringValue"])


def deleted(world: World) -> list[str]:
    single = [c["ReceiptHandle"] for c in world.sqs.calls_to("delete_message")]
    batched = [
        e["ReceiptHandle"] for c in world.sqs.calls_to("delete_message_batch") for e in c["Entries"]
    ]
    return single + batched


def occupy_the_slot(world: World) -> None:
    """An execution (started by someone else) takes the pool's only slot."""
    world.pool.ledger.observe_running(world.sfn.add_execution("long"), world.clock())
    world.pool.update()


async def test_a_request_received_after_its_start_by_is_dead_lettered_at_once() -> None:
    world = build_world(limit=1)
    intake, _, _ = intake_for(world, now=T0 + 1)
    await intake.admit(intake.queues[0], message("2026-12-05T10:00:00Z"))
    assert world.sfn.calls_to("start_execution") == []
    [letter] = dead_letters(world)
    assert reason_of(letter) == "expired"
    detail = letter["MessageAttributes"][DETAIL_ATTRIBUTE]["StringValue"]
    assert "start-by 2026-12-05T10:00:00Z passed 1.0 s ago" in detail
    assert deleted(world), "the request leaves its queue once dead-lettered"
    assert waiting(world) == []
    assert world.sample("dispatcher_dead_letters_total", reason="expired") == 1


async def test_a_request_expires_while_waiting_though_no_slot_frees() -> None:
    world = build_world(limit=1)
    occupy_the_slot(world)
    intake, wall, _ = intake_for(world, now=T0 - 3)
    await intake.admit(intake.queues[0], message("2026-12-05T10:00:00Z"))
    assert len(waiting(world)) == 1
    async with anyio.create_task_group() as handlers:
        # The expiry loop sleeps until the deadline: exactly the 3 s left.
        assert intake.expire_waiting(handlers) == pytest.approx(3.0)
    assert dead_letters(world) == []
    wall.advance(3)
    async with anyio.create_task_group() as handlers:
        assert intake.expire_waiting(handlers) is None
    [letter] = dead_letters(world)
    assert reason_of(letter) == "expired"
    assert waiting(world) == []
    assert world.sfn.calls_to("start_execution") == []
    assert await dispatch_all(intake, world.pool) == 0


@on_virtual_time
async def test_a_plain_full_pool_expires_a_request_behind_it_at_its_deadline() -> None:
    """One queue, no key attribute, its one slot held by a long execution; a request with a
    start-by 5 s ahead arrives behind it. The running intake receives it ahead into the
    waiting room and dead-letters it as expired at its deadline though the slot never
    frees; never started. (It used to stay in the queue, unseen, until the slot freed.)
    On virtual time: the wall clock, the long polls and the expiry timer all follow it."""
    world = build_world(limit=1, receive_concurrency=2)
    occupy_the_slot(world)
    intake = intake_of(world)
    intake.starter.reign_began = time.time() - 1000
    deadline = time.time() + 5
    request = sqs_message(
        '{"n": 1}',
        message_id="m-1",
        attributes={"start-by": format_deadline(deadline)},
        system={"ApproximateFirstReceiveTimestamp": str(int(time.time() * 1000))},
    )
    async with anyio.create_task_group() as tg:
        await tg.start(intake.run)
        await anyio.wait_all_tasks_blocked()  # the receives long-poll the empty queue
        world.sqs.put(REQUEST_QUEUE, request)
        with anyio.fail_after(60):
            await world.sqs.called("send_message")
        late = time.time() - deadline
        intake.stop()
    [letter] = dead_letters(world)
    assert reason_of(letter) == "expired"
    assert 0 <= late < 0.1, f"dead-lettered {late:.3f} s after its deadline"
    assert world.sfn.calls_to("start_execution") == []
    [handle] = deleted(world)
    assert handle.startswith("rh-m-1#"), "the request leaves its queue once dead-lettered"


async def test_no_start_is_sent_after_the_deadline_even_once_picked() -> None:
    """Picked before its start-by, sent after it: the check right before the call stops it."""
    world = build_world(limit=1)
    intake, wall, _ = intake_for(world, now=T0 - 1)
    await intake.admit(intake.queues[0], message("2026-12-05T10:00:00Z"))
    wall.advance(1)  # the deadline passes between the pick and the call
    assert await dispatch_all(intake, world.pool) == 1
    assert world.sfn.calls_to("start_execution") == []
    assert [reason_of(letter) for letter in dead_letters(world)] == ["expired"]
    assert world.pool.ledger.free == 1, "its reserved slot given back"


async def test_a_start_sent_before_the_deadline_runs() -> None:
    world = build_world(limit=1)
    intake, _, _ = intake_for(world, now=T0 - 0.001)
    await intake.admit(intake.queues[0], message("2026-12-05T10:00:00Z"))
    await dispatch_all(intake, world.pool)
    assert len(world.sfn.calls_to("start_execution")) == 1
    assert dead_letters(world) == []


async def test_a_start_in_doubt_is_not_expired() -> None:
    """The first attempt's answer is lost (it started the execution); the deadline passes
    before the retry: no retry is sent, and the request is handed back, its slot held in
    doubt - not dead-lettered while its execution may exist."""
    world = build_world(limit=1)
    world.sfn.answers_lost = 1
    intake, _, _ = intake_for(world, now=T0 - 1)
    # The wall clock passes the deadline as soon as the first attempt went out.
    intake.starter.expiries.clock = lambda: (
        T0 + (1 if world.sfn.calls_to("start_execution") else -1)
    )
    await intake.admit(intake.queues[0], message("2026-12-05T10:00:00Z"))
    await dispatch_all(intake, world.pool)
    assert len(world.sfn.calls_to("start_execution")) == 1, "no attempt after the deadline"
    assert dead_letters(world) == []
    assert world.pool.ledger.in_doubt == {ARN}
    handed = world.sqs.calls_to("change_message_visibility")
    assert handed, "handed back, to be judged again once the doubt is settled"
    assert deleted(world) == []
    # It comes back while still in doubt: still not expired.
    await intake.admit(intake.queues[0], message("2026-12-05T10:00:00Z"))
    assert dead_letters(world) == []
    assert len(world.sfn.calls_to("start_execution")) == 1


async def test_an_expired_request_whose_execution_exists_is_served_not_dead_lettered() -> None:
    """A producer's retry (same idempotency key) comes after the deadline; its first send
    was started: the describe finds the execution."""
    world = build_world(limit=1)
    world.sfn.add_execution("order-7", '{"n": 1}', status="SUCCEEDED")
    intake, _, _ = intake_for(world, now=T0 + 5)
    await intake.admit(
        intake.queues[0], message("2026-12-05T10:00:00Z", **{"idempotency-key": "order-7"})
    )
    assert dead_letters(world) == []
    assert world.sfn.calls_to("start_execution") == []
    assert world.sfn.calls_to("describe_execution")
    assert deleted(world), "already served"


async def test_an_expired_copy_is_not_dead_lettered_while_another_copy_begins_its_start() -> None:
    """A producer's retry past its start-by and a redrive's copy of the same request (no
    start-by) are received together. The retry's describes say "does not exist"; the
    redrive's start was sent meanwhile. The retry was dead-lettered as never started, its
    execution then running (seed 1109 of the simulation)."""
    world = build_world(limit=1)
    intake, _, _ = intake_for(world, now=T0 + 5)
    world.sfn.start_gate = anyio.Event()  # the redrive's start stays on the wire
    describe = world.sfn.describe_execution

    describing = anyio.Event()

    async def after_that_start(**call: Any) -> dict[str, Any]:
        describing.set()
        await world.sfn.called("start_execution")
        return await describe(**call)

    world.sfn.describe_execution = after_that_start  # type: ignore[method-assign]
    retry = message("2026-12-05T10:00:00Z", **{"idempotency-key": "order-7"})
    redriven = sqs_message('{"n": 1}', message_id="m-2", attributes={"idempotency-key": "order-7"})
    settled = anyio.Event()

    async def the_retry() -> None:
        await intake.admit(intake.queues[0], retry)
        settled.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(the_retry)
            await describing.wait()  # the retry is being described
            await intake.admit(intake.queues[0], redriven)
            tg.start_soon(dispatch_all, intake, world.pool)  # its start: on the wire
            await settled.wait()
            world.sfn.start_gate.set()
    assert dead_letters(world) == []
    assert len(world.sfn.calls_to("start_execution")) == 1
    assert "rh-m-1" not in deleted(world), "the retry stays: its copy's start settles it"


async def test_a_request_maybe_started_by_a_predecessor_waits_for_its_starts_to_settle() -> None:
    """Received before this reign (a predecessor may have sent its start), described as
    missing within D + grace of the reign's start: not yet proof; handed back."""
    world = build_world(limit=1)
    intake, wall, _ = intake_for(world, now=T0 + 1)
    intake.starter.reign_began = T0  # began 1 s ago
    first = message("2026-12-05T10:00:00Z")
    first["Attributes"]["ApproximateFirstReceiveTimestamp"] = str(int((T0 - 100) * 1000))
    await intake.admit(intake.queues[0], first)
    assert dead_letters(world) == []
    assert world.sfn.calls_to("describe_execution")
    [back] = world.sqs.calls_to("change_message_visibility")
    settle = world.settings.start_timeout + world.settings.start_grace
    assert back["VisibilityTimeout"] == int(settle)
    wall.advance(settle)
    await intake.admit(intake.queues[0], first)
    assert [reason_of(letter) for letter in dead_letters(world)] == ["expired"]


async def test_a_parent_of_an_expired_request_gets_dispatcher_expired() -> None:
    world = build_world(limit=1)
    occupy_the_slot(world)
    intake, wall, _ = intake_for(world, now=T0 - 3)
    await intake.admit(
        intake.queues[0], message("2026-12-05T11:00:00+01:00", **{"task-token": TOKEN})
    )
    wall.advance(4)
    async with anyio.create_task_group() as handlers:
        intake.expire_waiting(handlers)
    outcome, error, cause = world.sfn.answers[TOKEN]
    assert (outcome, error) == ("failure", EXPIRED_ERROR)
    assert "2026-12-05T10:00:00Z" in cause
    assert [reason_of(letter) for letter in dead_letters(world)] == ["expired"]
    assert world.sfn.calls_to("start_execution") == []


async def test_an_invalid_start_by_is_dead_lettered_and_its_parent_told() -> None:
    world = build_world(limit=1)
    intake, _, _ = intake_for(world)
    await intake.admit(intake.queues[0], message("tomorrow", **{"task-token": TOKEN}))
    [letter] = dead_letters(world)
    assert reason_of(letter) == "invalid_start_by"
    assert world.sfn.answers[TOKEN][:2] == ("failure", "Dispatcher.BadRequest")
    assert "start-by 'tomorrow' is invalid" in world.sfn.answers[TOKEN][2]


async def test_a_deferred_request_comes_back_by_its_deadline() -> None:
    world = build_world(limit=1, max_waiting=0)
    occupy_the_slot(world)
    intake, _, _ = intake_for(world, now=T0 - 7.5)
    await intake.admit(intake.queues[0], message("2026-12-05T10:00:00Z"))
    [back] = world.sqs.calls_to("change_message_visibility")
    assert back["VisibilityTimeout"] <= 8


# -- producers -----------------------------------------------------------------------------


def test_submit_start_by_accepts_times_epochs_and_offsets_from_now() -> None:
    assert parse_start_by_flag("+10m", now=T0) == "2026-12-05T10:10:00Z"
    assert parse_start_by_flag("+90s", now=T0) == "2026-12-05T10:01:30Z"
    assert parse_start_by_flag("+2h", now=T0) == "2026-12-05T12:00:00Z"
    assert parse_start_by_flag("2026-12-05T12:00:00+01:00", now=T0) == "2026-12-05T11:00:00Z"
    assert parse_start_by_flag("1796468400", now=T0) == "2026-12-05T11:00:00Z"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("soon", "--start-by 'soon' is invalid: not an RFC 3339 timestamp"),
        ("+10y", "--start-by '+10y' is invalid"),
        ("2026-12-05T09:00:00Z", "--start-by '2026-12-05T09:00:00Z' is 2026-12-05T09:00:00Z, "),
    ],
)
def test_submit_start_by_refuses_garbage_and_the_past(text: str, message: str) -> None:
    with pytest.raises(UserError) as caught:
        parse_start_by_flag(text, now=T0)
    assert str(caught.value).startswith(message)


def test_submit_puts_the_start_by_on_every_request(tmp_path: Path) -> None:
    argv = ["submit", "--count", "3", "--start-by", "+5m", "--queue-url", "http://q"]
    _, _, items = submit_requests_of(build_parser().parse_args(argv))
    deadlines = {item.attributes["start-by"] for item in items}
    [deadline] = deadlines
    assert parse_start_by(deadline) == pytest.approx(time.time() + 300, abs=5)
    both = [*argv, "--attribute", "start-by=2030-01-01T00:00:00Z"]
    with pytest.raises(UserError, match=r"--attribute start-by=\.\.\. and --start-by: give one"):
        submit_requests_of(build_parser().parse_args(both))
    source = tmp_path / "requests.jsonl"
    source.write_text('{"input": {"n": 1}, "attributes": {"start-by": "tomorrow"}}\n')
    argv = ["submit", "--from-file", str(source), "--queue-url", "http://q"]
    with pytest.raises(UserError, match=r"requests.jsonl:1: attribute 'start-by'='tomorrow' is "):
        submit_requests_of(build_parser().parse_args(argv))


def test_the_producer_library_sends_a_start_by_in_rfc_3339_utc() -> None:
    item = SubmitItem("{}", idempotency_key="o-1", start_by=T0)
    assert item.message_attributes() == {
        "idempotency-key": "o-1",
        "start-by": "2026-12-05T10:00:00Z",
    }
    paris = datetime(2026, 12, 5, 11, 0, tzinfo=timezone(timedelta(hours=1)))
    assert SubmitItem("{}", start_by=paris).message_attributes() == {
        "start-by": "2026-12-05T10:00:00Z"
    }
    with pytest.raises(ValueError, match="no time zone"):
        SubmitItem("{}", start_by=datetime(2026, 12, 5, 10)).message_attributes()


def test_an_expired_request_is_redriven_without_its_start_by() -> None:
    def letter(reason: str) -> dict[str, Any]:
        return sqs_message(
            "{}",
            attributes={
                "dispatcher-reason": reason,
                "dispatcher-request-id": "m-1",
                "start-by": "2026-12-05T10:00:00Z",
                "tenant": "a",
            },
        )

    expired = request_attributes(letter("expired"))
    assert sorted(expired) == ["dispatcher-request-id", "tenant"]
    assert sorted(request_attributes(letter("invalid_json"))) == [
        "dispatcher-request-id",
        "start-by",
        "tenant",
    ]
