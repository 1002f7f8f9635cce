"""Task tokens: a parent workflow waits for its child; the dispatcher answers it.

A request may carry a parent's task token (message attribute ``task-token``). Its child
is started under the limit like any request, but the request message is not deleted: it
is the durable record of the callback, kept in flight (visibility extended) until the
parent was answered - ``SendTaskSuccess`` with the child's output, ``SendTaskFailure``
with its error - and deleted only then. After a restart the message comes back, its
deterministic name meets ``ExecutionAlreadyExists``, and the describe answers at once
(closed) or the token is held again (running). Memory is O(children running).

Answers are idempotent: ``TaskDoesNotExist``, ``TaskTimedOut`` or ``InvalidToken`` after a
send that may have succeeded (or for a parent aborted or timed out) means done. Every
``heartbeat_interval`` each token held is heartbeated, those of requests still waiting in
memory too; a parent found gone drops the request (never started) or, with
``stop_orphaned_children``, stops the child.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import stamina
import structlog

from dispatcher.aws import AWS_ERRORS, Clients, error_code, is_retryable
from dispatcher.config import Settings
from dispatcher.metrics import Metrics

if TYPE_CHECKING:
    from dispatcher.pool import Pool
    from dispatcher.queues import RequestQueue

log = structlog.get_logger("dispatcher.callbacks")

PARENT_GONE = frozenset({"TaskDoesNotExist", "TaskTimedOut", "InvalidToken"})
"""Answers that say the parent no longer waits (or was already answered)."""
MAX_OUTPUT_BYTES = 262_144  # SendTaskSuccess output, as the Step Functions input limit
MAX_ERROR_CHARS = 256
MAX_CAUSE_CHARS = 32_768
ERRORS = {
    "FAILED": "Dispatcher.ChildFailed",
    "TIMED_OUT": "Dispatcher.ChildTimedOut",
    "ABORTED": "Dispatcher.ChildAborted",
}
"""The error a parent gets for a child that ended so (FAILED: the child's own error first)."""
OUTPUT_TOO_LARGE = "Dispatcher.OutputTooLarge"
BAD_REQUEST = "Dispatcher.BadRequest"
DEAD_LETTERED = "Dispatcher.DeadLettered"
CLOSED = frozenset({"SUCCEEDED", "FAILED", "TIMED_OUT", "ABORTED"})


@dataclass(frozen=True, slots=True)
class Answer:
    """What a parent is told about its child."""

    success: bool
    output: str = ""  # success: the child's output (JSON text)
    error: str = ""
    cause: str = ""


def answer_for(status: str, result: Mapping[str, Any]) -> Answer:
    """The answer for a child that ended with ``status``; ``result`` is its describe (or
    its terminal event's detail): ``output``, ``error``, ``cause``."""
    if status == "SUCCEEDED":
        output = str(result.get("output") or "null")
        size = len(output.encode())
        if size > MAX_OUTPUT_BYTES:
            return Answer(
                False,
                error=OUTPUT_TOO_LARGE,
                cause=f"the child's output is {size} bytes; a task token's answer holds at "
                f"most {MAX_OUTPUT_BYTES}",
            )
        return Answer(True, output=output)
    error = str(result.get("error") or "") if status == "FAILED" else ""
    return Answer(
        False,
        error=(error or ERRORS.get(status, ERRORS["FAILED"]))[:MAX_ERROR_CHARS],
        cause=str(result.get("cause") or f"the child execution ended {status}")[:MAX_CAUSE_CHARS],
    )


@dataclass(eq=False)
class Held:
    """A token whose child runs: answer it when the child ends."""

    token: str
    arn: str  # the child
    pool: Pool
    queue: RequestQueue
    receipt_handle: str
    hidden_since: float
    bound: Any


class Callbacks:
    """The tokens of one reign: held while children run, answered when they end."""

    def __init__(
        self,
        settings: Settings,
        clients: Clients,
        metrics: Metrics,
        pools: Mapping[str, Pool],
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.sfn = clients.sfn
        self.sqs = clients.sqs
        self.metrics = metrics
        self.pools = pools
        self.clock = clock
        self._held: dict[str, list[Held]] = {}  # child ARN -> tokens waiting on it
        self._due: dict[str, tuple[str, Mapping[str, Any] | None]] = {}  # ended, to answer
        self._wake = anyio.Event()

    # -- what the rest of the dispatcher tells -------------------------------------------

    def hold(
        self, pool: Pool, *, queue: RequestQueue, token: str, arn: str, receipt: str, bound: Any
    ) -> None:
        """The child of a request carrying ``token`` runs (started, or adopted): answer the
        parent when it ends. Its message stays in flight until then."""
        tokens = self._held.setdefault(arn, [])
        for held in tokens:
            if held.token == token:  # received again (SQS's 12 h visibility cap): newer handle
                held.queue, held.receipt_handle, held.hidden_since = queue, receipt, self.clock()
                return
        held = Held(token, arn, pool, queue, receipt, self.clock(), bound)
        tokens.append(held)
        self._gauge(pool)
        bound.info("dispatcher.token_held", child_arn=arn)
        if pool.ledger.is_tombstoned(arn):  # it ended before its start was answered
            self.ended(arn, "", None)

    def ended(self, arn: str, status: str, result: Mapping[str, Any] | None) -> None:
        """A child ended (a status event, or a describe): answer its parents (idempotent;
        ``status`` and ``result`` may be empty: the child is described)."""
        if arn in self._held:
            self._due[arn] = (status, result)
            self._wake.set()

    @property
    def held(self) -> int:
        """Tokens held for running children."""
        return sum(len(h) for h in self._held.values())

    def held_for(self, pool: Pool) -> int:
        """Tokens held for running children of ``pool`` (its `/status` figure)."""
        return sum(1 for hs in self._held.values() for h in hs if h.pool is pool)

    def tokens(self) -> list[tuple[str, str]]:
        """(task token, child ARN) of every token held."""
        return [(h.token, h.arn) for hs in self._held.values() for h in hs]

    async def hand_back_all(self) -> int:
        """The lease is gone: make every held request visible again at once and forget it
        (the new leader meets its child by name: adopts it running, answers the parent if
        closed). Returns how many went back."""
        held = [h for hs in self._held.values() for h in hs]
        self._held.clear()
        self._due.clear()
        for queue in {id(h.queue): h.queue for h in held}.values():
            await queue.set_visibility([h.receipt_handle for h in held if h.queue is queue], 0)
        for pool in {id(h.pool): h.pool for h in held}.values():
            self._gauge(pool)
        if held:
            log.info("dispatcher.tokens_handed_back", count=len(held))
        return len(held)

    # -- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """Answer ended children as they end; heartbeat and keep messages hidden."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._heartbeat_loop)
            tg.start_soon(self._keep_hidden_loop)
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                await self.answer_due()

    async def answer_due(self) -> int:
        """Answer every parent whose child has ended; returns how many were answered."""
        answered = 0
        while self._due:
            arn, (status, result) = next(iter(self._due.items()))
            del self._due[arn]
            try:
                answer = await self._answer_of(arn, status, result)
            except AWS_ERRORS as exc:  # kept: tried again at the next heartbeat
                log.warning("dispatcher.child_describe_failed", child_arn=arn, error=str(exc))
                continue
            for held in list(self._held.get(arn, [])):
                if await self._send(held, answer):
                    answered += 1
        return answered

    async def answer_closed(
        self,
        pool: Pool,
        *,
        queue: RequestQueue,
        token: str,
        receipt: str,
        described: Mapping[str, Any],
        bound: Any,
    ) -> None:
        """A request whose child had already ended (a restart, a redelivery): answer now."""
        held = Held(token, str(described["executionArn"]), pool, queue, receipt, 0.0, bound)
        await self._send(held, answer_for(str(described["status"]), described), keep=False)

    async def fail_request(self, pool: str, token: str, error: str, cause: str, bound: Any) -> None:
        """A request that will never start (bad, dead-lettered): its parent must not wait."""
        try:
            await self._call(
                "send_task_failure",
                taskToken=token,
                error=error[:MAX_ERROR_CHARS],
                cause=cause[:MAX_CAUSE_CHARS],
            )
        except AWS_ERRORS as exc:
            if error_code(exc) not in PARENT_GONE:
                self.metrics.callbacks.labels(pool=pool, outcome="error").inc()
                bound.warning("dispatcher.callback_failed", error=str(exc))
                return
            self.metrics.callbacks.labels(pool=pool, outcome="parent_gone").inc()
            return
        self.metrics.callbacks.labels(pool=pool, outcome="failure").inc()
        bound.info("dispatcher.parent_answered", error=error)

    # -- heartbeats ------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await anyio.sleep(self.settings.heartbeat_interval)
            await self.heartbeat_once()

    async def heartbeat_once(self) -> int:
        """Heartbeat every token held (children running, requests waiting in memory); act on
        parents gone; retry answers that failed. Returns how many heartbeats were sent."""
        for arn in [a for a in self._held if a not in self._due]:
            if any(h.pool.ledger.is_tombstoned(arn) for h in self._held[arn]):
                self._due[arn] = ("", None)  # ended, its answer not sent yet
        if self._due:
            self._wake.set()
        sent = 0
        for held in [h for hs in list(self._held.values()) for h in hs]:
            sent += 1
            if not await self._heartbeat(held.token, held.bound, held.pool.name):
                await self._orphaned(held)
        for pool in self.pools.values():
            for entry in list(pool.room.items()):
                token = entry.request.task_token
                if token is None:
                    continue
                sent += 1
                if not await self._heartbeat(token, entry.bound, pool.name) and pool.room.remove(
                    entry
                ):
                    # Its parent no longer waits: drop it, never start it.
                    self.metrics.orphans.labels(pool=pool.name, action="dropped").inc()
                    entry.bound.info("dispatcher.request_dropped", why="parent gone")
                    await entry.queue.delete(entry.request.receipt_handle, entry.bound)
                    pool.update()
        return sent

    async def _heartbeat(self, token: str, bound: Any, pool: str) -> bool:
        """One heartbeat; False when the parent no longer waits."""
        try:
            await self._call("send_task_heartbeat", taskToken=token)
        except AWS_ERRORS as exc:
            if error_code(exc) in PARENT_GONE:
                self.metrics.heartbeats.labels(pool=pool, outcome="parent_gone").inc()
                return False
            self.metrics.heartbeats.labels(pool=pool, outcome="error").inc()
            bound.warning("dispatcher.heartbeat_failed", error=str(exc))
            return True
        self.metrics.heartbeats.labels(pool=pool, outcome="ok").inc()
        return True

    async def _orphaned(self, held: Held) -> None:
        """The parent of a running child stopped waiting: stop the child if so configured,
        and let the request go."""
        action = "left"
        if self.settings.stop_orphaned_children:
            try:
                await self._call(
                    "stop_execution",
                    executionArn=held.arn,
                    error="Dispatcher.ParentGone",
                    cause="the parent no longer waits for this child",
                )
                action = "stopped"
            except AWS_ERRORS as exc:
                held.bound.warning("dispatcher.stop_child_failed", error=str(exc))
        self.metrics.orphans.labels(pool=held.pool.name, action=action).inc()
        held.bound.info("dispatcher.child_orphaned", child_arn=held.arn, action=action)
        await self._release(held)

    # -- answering -------------------------------------------------------------------------

    async def _answer_of(self, arn: str, status: str, result: Mapping[str, Any] | None) -> Answer:
        """The answer, from the terminal event when it carries what is needed, else from
        DescribeExecution."""
        usable = result is not None and status in CLOSED
        if usable and status == "SUCCEEDED" and result is not None and "output" not in result:
            usable = False
        if usable and status == "FAILED" and result is not None and "error" not in result:
            usable = False
        if not usable:
            described = await self._call("describe_execution", executionArn=arn)
            status, result = str(described["status"]), described
        assert result is not None  # noqa: S101 - set just above
        return answer_for(status, result)

    async def _send(self, held: Held, answer: Answer, *, keep: bool = True) -> bool:
        """Send one answer; the message is deleted once the parent was answered (or gone).
        Returns whether it is done; a failure leaves it held (tried again later)."""
        pool = held.pool.name
        try:
            if answer.success:
                await self._call("send_task_success", taskToken=held.token, output=answer.output)
            else:
                await self._call(
                    "send_task_failure",
                    taskToken=held.token,
                    error=answer.error,
                    cause=answer.cause,
                )
            outcome = "success" if answer.success else "failure"
        except AWS_ERRORS as exc:
            if error_code(exc) not in PARENT_GONE:
                self.metrics.callbacks.labels(pool=pool, outcome="error").inc()
                held.bound.warning("dispatcher.callback_failed", error=str(exc))
                return False
            outcome = "parent_gone"  # answered before (a lost answer), or aborted
        self.metrics.callbacks.labels(pool=pool, outcome=outcome).inc()
        held.bound.info(
            "dispatcher.parent_answered", child_arn=held.arn, outcome=outcome, error=answer.error
        )
        if keep:
            await self._release(held)
        else:
            await held.queue.delete(held.receipt_handle, held.bound)
        return True

    async def _release(self, held: Held) -> None:
        """Forget a token and delete its request message: the parent was dealt with."""
        tokens = self._held.get(held.arn, [])
        if held in tokens:
            tokens.remove(held)
            if not tokens:
                del self._held[held.arn]
        self._gauge(held.pool)
        await held.queue.delete(held.receipt_handle, held.bound)

    async def _call(self, operation: str, **kwargs: Any) -> Any:
        """A Step Functions call with jittered retries of transient errors."""
        method = getattr(self.sfn, operation)
        async for attempt in stamina.retry_context(
            on=lambda e: is_retryable(e) and error_code(e) not in PARENT_GONE,
            attempts=5,
            timeout=30.0,
        ):
            with attempt:
                return await method(**kwargs)
        raise AssertionError("unreachable: stamina either returns or raises")  # pragma: no cover

    # -- the messages ----------------------------------------------------------------------

    async def _keep_hidden_loop(self) -> None:
        while True:
            await anyio.sleep(self.settings.visibility_timeout / 4)
            await self.keep_hidden_once()

    async def keep_hidden_once(self) -> int:
        """Extend the visibility of every held token's message hidden for half its
        visibility or more (batched per queue); returns how many were extended."""
        visibility = self.settings.visibility_timeout
        now = self.clock()
        due = [
            h for hs in self._held.values() for h in hs if now - h.hidden_since >= visibility / 2
        ]
        extended = 0
        for queue in {id(h.queue): h.queue for h in due}.values():
            mine = [h for h in due if h.queue is queue]
            failed = await queue.set_visibility([h.receipt_handle for h in mine], visibility)
            for held in mine:
                if held.receipt_handle not in failed:
                    held.hidden_since = now
                    extended += 1
        return extended

    def _gauge(self, pool: Pool) -> None:
        count = sum(1 for hs in self._held.values() for h in hs if h.pool is pool)
        self.metrics.tokens_held.labels(pool=pool.name).set(count)


def result_of_event(detail: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a terminal event's detail an answer uses (output, error, cause)."""
    return {k: detail[k] for k in ("output", "error", "cause") if detail.get(k) is not None}
