"""The one path every simulated AWS call takes: faults, two latency legs, timeouts, retries.

A call is a request leg (the request travelling to AWS), the effect (applied atomically
on the world's state), and a response leg. A caller cancelled during the request leg
never reaches AWS (the TCP model: a client that gives up closes the connection first),
unless its process was killed (`Transport.crash`): packets already on the wire still
arrive, and `World.run` applies them at their time. Cancelled during the response leg,
the effect stands and the answer is lost.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import anyio
from botocore.exceptions import ClientError, ConnectionClosedError, ReadTimeoutError

from sim.history import ORIGINAL_ID_ATTRIBUTE

if TYPE_CHECKING:
    from sim.history import History

Answer = dict[str, Any]
Apply = Callable[[float], Awaitable[Answer]]
"""The effect of a call; takes the client's deadline (a long poll stops waiting there)."""


@dataclass(frozen=True, slots=True)
class CallFault:
    """What the network and AWS do to one call (default: nothing)."""

    request_delay: float = 0.0  # extra seconds on the way to AWS
    response_delay: float = 0.0  # extra seconds on the way back
    error: str | None = None  # an AWS error code answered instead of applying
    error_after: bool = False  # a 5xx answered after the effect was applied
    drop_request: bool = False  # the request never arrives: the client times out
    drop_answer: bool = False  # applied, the answer is lost: the client times out
    status: int | None = None  # the HTTP status of ``error`` (None: the code's usual one)
    # Held on the wire and applied at the client's deadline (sent + read timeout: for a
    # start, D - the latest a start may take effect), whatever the client does meanwhile:
    # it times out then, or earlier gets ``error`` (a 5xx) or a reset connection (``reset``).
    apply_at_deadline: bool = False
    reset: bool = False


NO_FAULT = CallFault()

CURRENT_CALL: ContextVar[int | None] = ContextVar("CURRENT_CALL", default=None)
"""The id of the call whose effect is being applied (records link to its fate)."""

CallFaults = Callable[[str, str, Mapping[str, Any]], CallFault]
"""``faults(node, operation, params)``: the fate of one call (operation as AWS names it)."""


def no_faults(node: str, operation: str, params: Mapping[str, Any]) -> CallFault:
    """The default: every call goes through untouched."""
    del node, operation, params
    return NO_FAULT


_STATUS = {
    "ThrottlingException": 400,
    "Throttling": 400,
    "RequestThrottled": 400,
    "ProvisionedThroughputExceededException": 400,
    "TooManyRequestsException": 429,
    "ServiceUnavailable": 503,
    "ServiceUnavailableException": 503,
    "InternalFailure": 500,
    "InternalServerError": 500,
    "InternalError": 500,
    "InternalServerErrorException": 500,
}
_THROTTLE_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "TransactionInProgressException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "LimitExceededException",
        "RequestThrottled",
        "SlowDown",
    }
)
_TRANSIENT_CODES = frozenset(
    {"RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete"}
)


def aws_error(code: str, message: str, operation: str, status: int | None = None) -> ClientError:
    """A ``ClientError`` shaped exactly as botocore raises it."""
    http = status if status is not None else _STATUS.get(code, 400)
    return ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {
                "RequestId": "00000000-0000-4000-8000-000000000000",
                "HostId": "",
                "HTTPStatusCode": http,
                "HTTPHeaders": {},
                "RetryAttempts": 0,
            },
        },
        operation,
    )


def error_code(exc: BaseException) -> str:
    """The AWS error code of a ClientError ('' otherwise)."""
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def sdk_retries(exc: BaseException) -> bool:
    """Whether botocore's standard retry mode retries this failure."""
    if isinstance(exc, ReadTimeoutError | ConnectionClosedError):
        return True
    if isinstance(exc, ClientError):
        code = error_code(exc)
        return (
            code in _THROTTLE_CODES
            or code in _TRANSIENT_CODES
            or _status(exc) in (500, 502, 503, 504)
        )
    return False


class Signal:
    """Wake waiters when something changed (created lazily: works outside an event loop)."""

    def __init__(self) -> None:
        self._event: anyio.Event | None = None

    def notify(self) -> None:
        """Wake everyone waiting now."""
        if self._event is not None:
            self._event.set()
            self._event = None

    async def wait(self, seconds: float) -> None:
        """Wait for the next `notify`, at most ``seconds``."""
        if self._event is None:
            self._event = anyio.Event()
        event = self._event
        with anyio.move_on_after(max(0.0, seconds)):
            await event.wait()


class TokenBucket:
    """An AWS API quota: ``capacity`` tokens, refilled at ``refill`` per second."""

    def __init__(self, capacity: float, refill: float) -> None:
        self.capacity = capacity
        self.refill = refill
        self.tokens = capacity
        self.updated: float | None = None  # full until first used

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        if self.updated is not None:
            refilled = self.tokens + (now - self.updated) * self.refill
            self.tokens = min(self.capacity, refilled)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass(eq=False)
class _Call:
    """One attempt of one call, from send to answer."""

    ident: int
    node: str
    operation: str
    label: str
    fault: CallFault
    arrival: float
    deadline: float
    apply: Apply
    orphaned: bool = False
    note: str = " (arrived after the sender died)"
    outcome: _Outcome | None = None
    done: anyio.Event | None = None


@dataclass
class _Outcome:
    """What AWS answered (``answer_at``: when the answer reaches the client)."""

    answer: Answer | None
    error: ClientError | None
    answer_at: float
    lost: bool  # the client never gets it
    applied: bool = field(default=True)


class Transport:
    """Carries every call of every client; owns the calls a crash left on the wire."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        rng: random.Random,
        history: History,
        faults: Callable[[], CallFaults],
        latency: tuple[float, float],
        buckets: Mapping[str, tuple[float, float]],
        advance: Callable[[], None],
        wake: Callable[[], None],
    ) -> None:
        self._clock = clock
        self._rng = rng
        self._history = history
        self._faults = faults
        self._latency = latency
        self._buckets = {op: TokenBucket(c, r) for op, (c, r) in buckets.items()}
        self._advance = advance
        self._wake = wake
        self._ids = itertools.count(1)
        self._in_flight: dict[str, dict[int, _Call]] = {}
        self._orphans: list[tuple[float, int, _Call]] = []

    # -- crashes -------------------------------------------------------------------------

    def crash(self, node: str) -> None:
        """``node`` died: its requests still on the wire will arrive all the same."""
        for call in self._in_flight.pop(node, {}).values():
            call.orphaned = True
            call.done = None
            heapq.heappush(self._orphans, (call.arrival, call.ident, call))
        self._wake()

    def next_orphan(self) -> float:
        """When the next request of a dead node arrives (inf: none pending)."""
        return self._orphans[0][0] if self._orphans else math.inf

    def due_orphans(self, now: float) -> list[_Call]:
        """The requests of dead nodes that have arrived by ``now``."""
        due: list[_Call] = []
        while self._orphans and self._orphans[0][0] <= now:
            due.append(heapq.heappop(self._orphans)[2])
        return due

    async def deliver(self, call: _Call) -> None:
        """Apply a request whose sender died while it travelled (run by `World.run`)."""
        call.outcome = await self._serve(call, note=call.note)
        if call.done is not None:
            call.done.set()

    # -- calls ---------------------------------------------------------------------------

    async def call(
        self,
        node: str,
        operation: str,
        params: Mapping[str, Any],
        apply: Apply,
        *,
        summary: str,
        read_timeout: float,
        endpoint: str,
        max_attempts: int = 1,
    ) -> Answer:
        """Make one call, with botocore's standard retries when ``max_attempts`` > 1."""
        attempt = 1
        while True:
            try:
                return await self._attempt(
                    node,
                    operation,
                    params,
                    apply,
                    summary=summary,
                    read_timeout=read_timeout,
                    endpoint=endpoint,
                    attempt=attempt,
                )
            except (ClientError, ReadTimeoutError, ConnectionClosedError) as exc:
                if attempt >= max_attempts or not sdk_retries(exc):
                    raise
            await anyio.sleep(self._rng.random() * min(20.0, 2.0 ** (attempt - 1)))
            attempt += 1

    async def _held_until_deadline(self, call: _Call, start: float, endpoint: str) -> NoReturn:
        """A request held on the wire (a proxy, a slow front end) that AWS applies at the
        client's deadline, after the client gave up: `World.run` applies it then, as it
        applies a dead node's requests. The client times out, or fails earlier."""
        node, ident, label, fault, deadline = (
            call.node,
            call.ident,
            call.label,
            call.fault,
            call.deadline,
        )
        call.orphaned = True
        call.fault = CallFault()  # the client's failure below is not AWS's answer
        call.note = " (held on the wire, applied at the client's deadline)"
        heapq.heappush(self._orphans, (deadline, ident, call))
        self._wake()
        if fault.error is None and not fault.reset:
            why = "request HELD until the client's deadline: applied then, client times out"
            self._history.call(start, node, ident, label, why)
            await _time_out(deadline - start, endpoint)
        await anyio.sleep(min(self._draw_latency() * 2, max(0.0, deadline - start) / 2))
        failure = "connection reset" if fault.reset else f"{fault.error}"
        self._history.call(
            self._clock(),
            node,
            ident,
            label,
            f"request HELD until the client's deadline: client got {failure} first",
        )
        if fault.reset:
            raise ConnectionClosedError(endpoint_url=endpoint)
        assert fault.error is not None  # noqa: S101 - checked above
        status = fault.status or max(_STATUS.get(fault.error, 500), 500)
        raise aws_error(fault.error, f"simulated {fault.error}", call.operation, status)

    def _draw_latency(self) -> float:
        low, high = self._latency
        return self._rng.uniform(low, high) if high > 0 else 0.0

    async def _attempt(
        self,
        node: str,
        operation: str,
        params: Mapping[str, Any],
        apply: Apply,
        *,
        summary: str,
        read_timeout: float,
        endpoint: str,
        attempt: int,
    ) -> Answer:
        fault = self._faults()(node, operation, params)
        start = self._clock()
        deadline = start + read_timeout
        ident = next(self._ids)
        label = f"{operation} {summary}".rstrip()
        if attempt > 1:
            label += f" (attempt {attempt})"
        if operation == "StartExecution":  # when it left its node (sim.deadlines)
            self._history.add(
                start,
                node,
                "start_sent",
                f"{label} sent",
                name=params.get("name"),
                state_machine=params.get("stateMachineArn"),
            )
        original = _original_id(operation, params)
        if original is not None:  # a copy of a message tried (sim.copy_rules: renewed first)
            self._history.add(
                start,
                node,
                "copy_sent",
                f"{label} tried",
                queue=params.get("QueueUrl"),
                original=original,
            )
        if fault.apply_at_deadline:
            held = _Call(ident, node, operation, label, fault, deadline, deadline, apply)
            await self._held_until_deadline(held, start, endpoint)
        arrival = start + self._draw_latency() + fault.request_delay
        if fault.drop_request or arrival >= deadline:
            why = "request LOST" if fault.drop_request else "request too slow"
            self._history.call(start, node, ident, label, f"{why}: never applied, client times out")
            await _time_out(deadline - start, endpoint)
        call = _Call(ident, node, operation, label, fault, arrival, deadline, apply)
        on_wire = self._in_flight.setdefault(node, {})
        on_wire[ident] = call
        try:
            await anyio.sleep(arrival - start)
        except anyio.get_cancelled_exc_class():
            if not call.orphaned:
                on_wire.pop(ident, None)
                self._history.call(
                    self._clock(), node, ident, label, "caller gave up in flight: never applied"
                )
            raise
        on_wire.pop(ident, None)
        if call.orphaned:  # the node was killed; World.run applies it, we learn the answer
            if call.outcome is None:
                call.done = anyio.Event()
                await call.done.wait()
            outcome = call.outcome
            assert outcome is not None  # noqa: S101 - set by deliver before done
        else:
            outcome = await self._serve(call)
        return await self._answer(call, outcome, endpoint)

    async def _serve(self, call: _Call, note: str = "") -> _Outcome:
        """AWS's side: refuse, throttle or apply; decide the answer's fate."""
        fault, now = call.fault, self._clock()
        self._advance()
        if fault.error is not None and not fault.error_after:
            error = aws_error(fault.error, f"simulated {fault.error}", call.operation, fault.status)
            self._history.call(
                now, call.node, call.ident, call.label, f"REFUSED {fault.error}{note}"
            )
            return self._fate(call, None, error, applied=False)
        bucket = self._buckets.get(call.operation)
        if bucket is not None and not bucket.take(now):
            error = aws_error("ThrottlingException", "Rate exceeded", call.operation)
            self._history.call(now, call.node, call.ident, call.label, f"THROTTLED{note}")
            return self._fate(call, None, error, applied=False)
        try:
            answer = await _apply(call)
        except ClientError as exc:
            outcome = self._fate(call, None, exc, applied=False)
            self._history.call(
                self._clock(),
                call.node,
                call.ident,
                call.label,
                f"ERROR {error_code(exc)}{note}{' answer LOST' if outcome.lost else ''}",
            )
            return outcome
        except anyio.get_cancelled_exc_class():
            self._history.call(
                self._clock(), call.node, call.ident, call.label, "caller gave up while AWS waited"
            )
            raise
        after: ClientError | None = None
        if fault.error_after:
            code = fault.error or "InternalFailure"
            status = fault.status or max(_STATUS.get(code, 500), 500)  # always a 5xx
            after = aws_error(code, f"simulated {code}", call.operation, status)
        outcome = self._fate(call, answer, after, applied=True)
        text = "APPLIED" + note
        if after is not None:
            text += f" then {_status(after)} {error_code(after)}: outcome unknown to the caller"
        if outcome.lost:
            text += " answer LOST"
        self._history.call(self._clock(), call.node, call.ident, call.label, text)
        if outcome.lost or after is not None:
            why = (
                "answer lost"
                if outcome.lost or after is None
                else f"{error_code(after)} after applying"
            )
            self._history.answer_lost(self._clock(), call.node, call.ident, call.operation, why)
        return outcome

    def _fate(
        self, call: _Call, answer: Answer | None, error: ClientError | None, *, applied: bool
    ) -> _Outcome:
        answer_at = self._clock() + self._draw_latency() + call.fault.response_delay
        lost = call.fault.drop_answer or answer_at > call.deadline
        return _Outcome(answer, error, answer_at, lost, applied)

    async def _answer(self, call: _Call, outcome: _Outcome, endpoint: str) -> Answer:
        """The response leg."""
        now = self._clock()
        if outcome.lost:
            await _time_out(call.deadline - now, endpoint)
        try:
            await anyio.sleep(outcome.answer_at - now)
        except anyio.get_cancelled_exc_class():
            if outcome.applied:
                self._history.answer_lost(
                    self._clock(), call.node, call.ident, call.operation, "caller gave up"
                )
            raise
        if outcome.error is not None:
            raise outcome.error
        assert outcome.answer is not None  # noqa: S101 - an outcome has one or the other
        return outcome.answer


async def _apply(call: _Call) -> Answer:
    """Apply a call's effect, with `CURRENT_CALL` telling the world which call it is."""
    current = CURRENT_CALL.set(call.ident)
    try:
        return await call.apply(call.deadline)
    finally:
        CURRENT_CALL.reset(current)


async def _time_out(seconds: float, endpoint: str) -> NoReturn:
    """Wait out the client's read timeout, then fail as botocore does."""
    await anyio.sleep(max(0.0, seconds))
    raise ReadTimeoutError(endpoint_url=endpoint)


def _original_id(operation: str, params: Mapping[str, Any]) -> str | None:
    """The ``dispatcher-original-message-id`` a SendMessage carries (a copy of a message:
    renewed, dead-lettered, redriven), if any."""
    if operation != "SendMessage":
        return None
    attribute = (params.get("MessageAttributes") or {}).get(ORIGINAL_ID_ATTRIBUTE) or {}
    value = attribute.get("StringValue")
    return str(value) if value is not None else None
