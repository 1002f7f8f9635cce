"""Task tokens: a parent workflow waits for its child; the dispatcher answers it.

A request may carry a parent's task token (message attribute ``task-token``). Its child
is started under the limit like any request, but the request message is not deleted: it
is the durable record of the callback, kept in flight (visibility extended) until the
parent was answered - ``SendTaskSuccess`` with the child's output, ``SendTaskFailure``
with its error - and deleted only then. After a restart the message comes back, its
deterministic name meets ``ExecutionAlreadyExists``, and the describe answers at once
(closed) or the token is held again (running). Memory is O(children running).

Answers are idempotent: ``TaskDoesNotExist``, ``TaskTimedOut`` or ``InvalidToken`` after a
send that may have succeeded (or for a parent aborted or timed out) means done. A parent is
answered only with its child's final result: from a closed describe (or a ``SUCCEEDED``
event, final by nature), never from a run that a redrive has reopened.

A token is heartbeated as soon as it is held (its request received, or its child found
running), then every ``heartbeat_interval``; a token request is checked once more just
before its child is started. A parent found gone drops the request (never started, unless
its child may exist), or lets its child go - stopped, with ``stop_orphaned_children``, only
once no other token waits on it. At an orderly end of a reign every token held gets a last
heartbeat and its message is handed back (visible at once), so the successor takes it over
without waiting for the visibility timeout.

A successor may not receive those messages soon: it receives only for free slots, and a
kill -9 hands nothing back. So, with a lease table, the tokens whose parents wait on a reign
(held, waiting in memory or kept on their last receive, deferred, handed back) are also
written into the lease item (`dispatcher.daemon.lease`); a successor takes them over at
once: it heartbeats each until its message is received (then it is held as any), its parent
is gone, or its child ended (then its parent is answered, and the message deleted when it
comes), and keeps the child it waits on from being stopped as an orphan.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import stamina
import structlog

from dispatcher.aws.api import AWS_ERRORS, Clients, error_code, is_retryable
from dispatcher.core.requests import execution_arn
from dispatcher.daemon.metrics import Metrics
from dispatcher.settings.config import Settings

FIRST_RECEIVE_SKEW = 5.0
"""Seconds of clock difference allowed between this host and SQS when telling whether a
message was first received before this reign began (as the starter's)."""

if TYPE_CHECKING:
    from dispatcher.daemon.pool import Pool
    from dispatcher.daemon.queues import RequestQueue
    from dispatcher.daemon.starter import Waiting

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
"""A child in any other status (RUNNING, PENDING_REDRIVE) has not ended: no answer yet."""
LAST_BEATS = 16
"""Heartbeats sent at once when a reign ends (each token's last one)..."""
LAST_BEATS_SECONDS = 5.0
"""...for at most this long: then the messages go back all the same."""


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
    before_reign: bool = True
    """Whether its message may have been received before this reign (a predecessor may
    have started the child for it); False: first received in this reign."""
    unsure: bool = True
    """Whether a retry's token for its child may wait unseen (see `Callbacks.unsure_before`)."""
    earlier: list[tuple[RequestQueue, str]] = field(default_factory=list)
    """Other receipt handles of the token's message still in flight: SQS delivered it
    again (a duplicate copy) while the first was held. Each is kept hidden and deleted
    with the newest, or it would come back and be received again, over and over, until
    the redrive policy moved it without a reason."""

    def handles(self) -> list[tuple[RequestQueue, str]]:
        """Every receipt handle of the token's message(s), newest first."""
        return [(self.queue, self.receipt_handle), *self.earlier]

    async def delete(self) -> None:
        """Delete the message under every handle held (an invalid one only logs)."""
        for queue, handle in self.handles():
            await queue.delete(handle, self.bound)


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
        self._beaten: dict[str, float] = {}  # token -> when its parent last took a heartbeat
        self._fresh: dict[str, tuple[Pool, Any]] = {}  # tokens to heartbeat now: just held
        self._wake = anyio.Event()
        self.starting: Callable[[str], bool] = lambda _arn: False
        """Whether a request for this child is being started now (the service points this
        at the starter): its token will wait on the child too."""
        self.reign_began = math.inf
        """When this reign began, wall-clock like SQS's timestamps (the service sets it)."""
        self._ours: set[str] = set()  # children started in this reign
        self._starter_gone: set[str] = set()  # adopted children a former token let go of
        # Child ARN -> until when a token request for it, deferred to its queue (a full
        # waiting room), may still be on its way back: a child it awaits is kept for it.
        self._deferred: dict[str, float] = {}
        self._deferred_tokens: dict[str, tuple[Pool, str, float]] = {}  # token -> ..., until
        # Token -> (pool, child ARN): passed on by a predecessor, its message not received yet.
        self._handed: dict[str, tuple[Pool, str]] = {}
        # Token -> (pool, child ARN): its message went back at the end of this reign.
        self._passing: dict[str, tuple[Pool, str]] = {}
        self.kept: Callable[[], Iterable[Waiting]] = lambda: ()
        """Token requests kept on their last receive (the service points this at them)."""
        self.unsure_before = math.inf
        """Wall-clock time before which a token first received may have had siblings no
        reign passed on here (a retry's request a former process deferred, handed back, or
        took and then died with): every time without a lease table; with one, when a
        holder lost its lease or was killed instead of releasing it (`Lease.unsure_before`)."""

    # -- what the rest of the dispatcher tells -------------------------------------------

    def hold(
        self,
        pool: Pool,
        *,
        queue: RequestQueue,
        token: str,
        arn: str,
        receipt: str,
        bound: Any,
        message: Mapping[str, Any] | None = None,
        hidden_since: float | None = None,
    ) -> None:
        """The child of a request carrying ``token`` (received as ``message``) runs
        (started, or adopted): answer the parent when it ends. Its message stays in flight
        until then; ``hidden_since`` is when its visibility was last set (default: now),
        so its next extension is not put off past the end of the current one."""
        since = self.clock() if hidden_since is None else hidden_since
        self._forget_passed(token)
        tokens = self._held.setdefault(arn, [])
        for held in tokens:
            if held.token == token:  # received again: a copy, or SQS's 12 h visibility cap
                if receipt != held.receipt_handle:
                    held.earlier.append((held.queue, held.receipt_handle))
                held.queue, held.receipt_handle, held.hidden_since = queue, receipt, since
                return
        held = Held(token, arn, pool, queue, receipt, since, bound)
        held.before_reign = self.before_reign(message)
        held.unsure = self.unsure(message)
        tokens.append(held)
        self._gauge(pool)
        bound.info("dispatcher.token_held", child_arn=arn)
        self._beat_soon(token, pool, bound)
        if pool.ledger.is_tombstoned(arn):  # it ended before its start was answered
            self.ended(arn, "", None)

    def waiting(self, entry: Waiting) -> None:
        """A request carrying a token entered its pool's waiting room: heartbeat it now, not
        an interval later (after a restart its parent has had no heartbeat for a while)."""
        if entry.request.task_token is not None:
            self._forget_passed(entry.request.task_token)
            self._beat_soon(entry.request.task_token, entry.pool, entry.bound)

    def deferred(self, entry: Waiting, seconds: float) -> None:
        """A token request went back to its queue for ``seconds`` (no room): until it is
        received again (a visibility timeout after it is visible, at the latest), its
        parent waits for the child of its name as much as one whose token is held."""
        if entry.request.task_token is None:
            return
        now = self.clock()
        self._deferred = {arn: until for arn, until in self._deferred.items() if until > now}
        arn = execution_arn(entry.pool.state_machine_arn, entry.request.name)
        until = now + seconds + self.settings.visibility_timeout
        self._deferred[arn] = max(self._deferred.get(arn, until), until)
        self._deferred_tokens = {t: d for t, d in self._deferred_tokens.items() if d[2] > now}
        self._deferred_tokens[entry.request.task_token] = (entry.pool, arn, until)

    def adopt(self, pool: Pool, tokens: Iterable[tuple[str, str]]) -> None:
        """Tokens (token, child ARN) a predecessor passed on for ``pool``'s state machine:
        heartbeated now and every interval, until their messages are received, their
        parents are gone or their children end (then answered)."""
        for token, arn in tokens:
            if token in self._handed or any(h.token == token for h in self._held.get(arn, [])):
                continue
            self._handed[token] = (pool, arn)
            self._beat_soon(token, pool, log.bind(pool=pool.name, child_arn=arn))
        if self._handed:
            log.info("dispatcher.tokens_taken_over", count=len(self._handed))

    def _forget_passed(self, token: str) -> None:
        """Its message was received here: it is held, waits or is answered as any token."""
        self._handed.pop(token, None)
        self._passing.pop(token, None)

    def passing_on(self, entry: Waiting) -> None:
        """A token request's message goes back to its queue at the end of this reign (it
        waited, or was kept on its last receive): passed on to the successor."""
        token = entry.request.task_token
        if token is not None:
            arn = execution_arn(entry.pool.state_machine_arn, entry.request.name)
            self._passing[token] = (entry.pool, arn)

    def waiting_tokens(self, state_machine_arn: str) -> list[tuple[str, str]]:
        """(token, child ARN) of every token whose parent waits on this reign, for
        ``state_machine_arn``'s children: what a successor takes over (the lease item)."""
        now = self.clock()
        found: dict[str, str] = {}
        for hs in self._held.values():
            for held in hs:
                found.setdefault(held.token, held.arn)
        entries = [e for p in self.pools.values() for e in p.room.items()]
        for entry in [*entries, *self.kept()]:
            if entry.request.task_token is not None:
                arn = execution_arn(entry.pool.state_machine_arn, entry.request.name)
                found.setdefault(entry.request.task_token, arn)
        for token, (pool, arn, until) in self._deferred_tokens.items():
            if until > now and pool.state_machine_arn == state_machine_arn:
                found.setdefault(token, arn)
        for token, (_pool, arn) in [*self._handed.items(), *self._passing.items()]:
            found.setdefault(token, arn)
        prefix = state_machine_arn.replace(":stateMachine:", ":execution:", 1) + ":"
        return sorted((t, a) for t, a in found.items() if a.startswith(prefix))

    def started(self, arn: str) -> None:
        """This reign started child ``arn``: it knows every token it started it for."""
        self._ours.add(arn)

    def unsure(self, message: Mapping[str, Any] | None) -> bool:
        """Whether ``message`` may have been first received before `unsure_before` (unknown:
        True): a token for its child may then wait unseen."""
        if self.unsure_before <= 0.0:  # every holder passed its tokens on
            return False
        system = (message or {}).get("Attributes") or {}
        try:
            first = int(system["ApproximateFirstReceiveTimestamp"]) / 1000
        except (KeyError, ValueError):
            return True
        return first < self.unsure_before + FIRST_RECEIVE_SKEW

    def before_reign(self, message: Mapping[str, Any] | None) -> bool:
        """Whether ``message`` may have been received before this reign began (unknown:
        True), so that a predecessor may have started a child for it."""
        system = (message or {}).get("Attributes") or {}
        try:
            first = int(system["ApproximateFirstReceiveTimestamp"]) / 1000
        except (KeyError, ValueError):
            return True
        return first < self.reign_began + FIRST_RECEIVE_SKEW

    def ended(self, arn: str, status: str, result: Mapping[str, Any] | None) -> None:
        """A child ended (a status event, or a describe): answer its parents (idempotent;
        ``status`` and ``result`` may be empty: the child is described)."""
        self._ours.discard(arn)
        self._starter_gone.discard(arn)
        if arn in self._held or self._handed_for(arn):
            self._due[arn] = (status, result)
            self._wake.set()

    def _handed_for(self, arn: str) -> list[tuple[str, Pool]]:
        """(token, pool) of the tokens passed on by a predecessor that wait on ``arn``."""
        return [(t, pool) for t, (pool, a) in self._handed.items() if a == arn]

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

    # -- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """Answer ended children as they end; heartbeat tokens as they come and then every
        interval; keep messages hidden."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._heartbeat_loop)
            tg.start_soon(self._keep_hidden_loop)
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                await self.answer_due()
                await self.heartbeat_new()

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
            if answer is None:  # redriven: it runs again, its next end is answered
                log.info("dispatcher.child_runs_again", child_arn=arn)
                continue
            for held in list(self._held.get(arn, [])):
                if await self._send(held, answer):
                    answered += 1
            for token, pool in self._handed_for(arn):
                if await self._answer_handed(token, pool, arn, answer):
                    answered += 1
        return answered

    async def _answer_handed(self, token: str, pool: Pool, arn: str, answer: Answer) -> bool:
        """Answer a token passed on by a predecessor whose message was not received yet (it
        is deleted when it comes: its parent is gone by then). False: tried again later."""
        bound = log.bind(pool=pool.name, child_arn=arn)
        try:
            if answer.success:
                await self._call("send_task_success", taskToken=token, output=answer.output)
            else:
                await self._call(
                    "send_task_failure", taskToken=token, error=answer.error, cause=answer.cause
                )
            outcome = "success" if answer.success else "failure"
        except AWS_ERRORS as exc:
            if error_code(exc) not in PARENT_GONE:
                self.metrics.callbacks.labels(pool=pool.name, outcome="error").inc()
                bound.warning("dispatcher.callback_failed", error=str(exc))
                return False
            outcome = "parent_gone"
        self.metrics.callbacks.labels(pool=pool.name, outcome=outcome).inc()
        bound.info("dispatcher.parent_answered", outcome=outcome, error=answer.error)
        self._handed.pop(token, None)
        return True

    async def answer_closed(
        self,
        pool: Pool,
        *,
        queue: RequestQueue,
        token: str,
        receipt: str,
        described: Mapping[str, Any],
        bound: Any,
    ) -> bool:
        """A request whose child had already ended (a restart, a redelivery): answer now.
        A child about to run again (``PENDING_REDRIVE``) is awaited instead. Returns False
        when the answer failed (the message is left as it is)."""
        arn, status = str(described["executionArn"]), str(described["status"])
        self._forget_passed(token)
        if status not in CLOSED:
            self.hold(pool, queue=queue, token=token, arn=arn, receipt=receipt, bound=bound)
            return True
        held = Held(token, arn, pool, queue, receipt, 0.0, bound)
        return await self._send(held, answer_for(status, described), keep=False)

    async def fail_request(self, pool: str, token: str, error: str, cause: str, bound: Any) -> bool:
        """A request that will never start (bad, dead-lettered): its parent must not wait.
        Returns whether the parent was answered (or is gone); False: it may still wait."""
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
                return False
            self.metrics.callbacks.labels(pool=pool, outcome="parent_gone").inc()
            return True
        self.metrics.callbacks.labels(pool=pool, outcome="failure").inc()
        bound.info("dispatcher.parent_answered", error=error)
        return True

    async def dropped_unstarted(
        self, entry: Waiting, *, others: Callable[[], bool] = lambda: False
    ) -> bool:
        """Just before a token request's child is started: does its parent still wait? (One
        heartbeat, which also counts as one.) If the parent is gone and no child of the
        request can exist, the request is deleted unstarted and True returned.

        A child that may exist - running or in doubt in the ledger, being started by
        another copy (``others()``: one past its own check, read after this copy's
        heartbeat and describe, so that two copies that both hear "gone" both drop), or
        found by a describe - is left to the start, which finds it and lets it go as an
        orphan; a failed check lets the start go ahead."""
        token, pool, bound = entry.request.task_token, entry.pool, entry.bound
        if token is None:
            return False
        outcome = await self._heartbeat(token, bound, pool.name, attempts=1)
        if outcome != "parent_gone":
            if outcome == "ok":
                self._beaten[token] = self.clock()
            return False
        arn = execution_arn(pool.state_machine_arn, entry.request.name)
        if others() or pool.ledger.holds(arn) or arn in pool.ledger.in_doubt:
            return False
        # others() again: another copy may have passed its check during the describe.
        if await self._child_may_run(arn) or others():
            return False
        self.metrics.orphans.labels(pool=pool.name, action="dropped").inc()
        bound.info("dispatcher.request_dropped", why="parent gone before the start")
        await entry.queue.delete(entry.request.receipt_handle, bound)
        return True

    async def _child_may_run(self, arn: str) -> bool:
        """Whether child ``arn`` runs (started before a restart: the start finds it), or may
        (the describe failed)."""
        try:
            described = await self._call("describe_execution", executionArn=arn)
        except AWS_ERRORS as exc:
            return error_code(exc) != "ExecutionDoesNotExist"
        return str(described["status"]) not in CLOSED

    async def hand_back(self) -> int:
        """The reign ends (an orderly stop, or the lease lost): give every token held a last
        heartbeat (its parent's clock starts again now), then make its message visible at
        once, for the successor to take over; returns how many went back. The children run
        on, untouched; the tokens are forgotten here."""
        held = [h for hs in self._held.values() for h in hs]
        self._held.clear()
        self._due.clear()
        for one in held:
            self._passing[one.token] = (one.pool, one.arn)
        for pool in self.pools.values():
            self._gauge(pool)
        # Every token passed on gets a last heartbeat: held, or waiting (its message already
        # handed back by intake), or taken over from a predecessor and not received yet.
        beats = {h.token: (h.pool, h.bound) for h in held}
        for token, (pool, arn) in [*self._passing.items(), *self._handed.items()]:
            beats.setdefault(token, (pool, log.bind(pool=pool.name, child_arn=arn)))
        limiter = anyio.CapacityLimiter(LAST_BEATS)

        async def last_beat(token: str, pool: Pool, bound: Any) -> None:
            async with limiter:
                await self._heartbeat(token, bound, pool.name, attempts=1)

        with anyio.move_on_after(LAST_BEATS_SECONDS):
            async with anyio.create_task_group() as tg:
                for token, (pool, bound) in beats.items():
                    tg.start_soon(last_beat, token, pool, bound)
        if not held:
            return 0
        handed = 0
        every = [pair for h in held for pair in h.handles()]
        for queue in {id(q): q for q, _ in every}.values():
            handles = [handle for q, handle in every if q is queue]
            handed += len(handles) - len(await queue.set_visibility(handles, 0))
        log.info("dispatcher.tokens_handed_back", count=handed)
        return handed

    # -- heartbeats ------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await anyio.sleep(self.settings.heartbeat_interval)
            await self.heartbeat_once()

    def _beat_soon(self, token: str, pool: Pool, bound: Any) -> None:
        """Heartbeat ``token`` from the loop at once, unless it had one within the interval."""
        if self.clock() - self._beaten.get(token, -math.inf) < self.settings.heartbeat_interval:
            return
        self._fresh[token] = (pool, bound)
        self._wake.set()

    async def heartbeat_new(self) -> int:
        """Heartbeat the tokens held since the last pass that had none yet; returns how many
        heartbeats were sent."""
        fresh, self._fresh = self._fresh, {}
        now, interval = self.clock(), self.settings.heartbeat_interval
        return await self._beat(
            [
                (token, pool, bound)
                for token, (pool, bound) in fresh.items()
                if now - self._beaten.get(token, -math.inf) >= interval  # none since
            ]
        )

    async def heartbeat_once(self) -> int:
        """Heartbeat every token held (children running, requests waiting in memory); act on
        parents gone; retry answers that failed. Returns how many heartbeats were sent."""
        for arn in [a for a in self._held if a not in self._due]:
            if any(h.pool.ledger.is_tombstoned(arn) for h in self._held[arn]):
                self._due[arn] = ("", None)  # ended, its answer not sent yet
        for pool, arn in self._handed.values():
            if arn not in self._due and pool.ledger.is_tombstoned(arn):
                self._due[arn] = ("", None)
        if self._due:
            self._wake.set()
        targets = self._targets()
        self._beaten = {t: at for t, at in self._beaten.items() if t in targets}
        return await self._beat([(t, pool, bound) for t, (pool, bound) in targets.items()])

    def _targets(self) -> dict[str, tuple[Pool, Any]]:
        """Token -> (pool, logger) of every token to heartbeat: held (children running),
        waiting in memory, kept on its last receive, or passed on by a predecessor."""
        targets: dict[str, tuple[Pool, Any]] = {}
        for hs in self._held.values():
            for held in hs:
                targets.setdefault(held.token, (held.pool, held.bound))
        for pool in self.pools.values():
            for entry in pool.room.items():
                if entry.request.task_token is not None:
                    targets.setdefault(entry.request.task_token, (pool, entry.bound))
        for entry in self.kept():  # kept on its last receive: its parent waits all the same
            if entry.request.task_token is not None:
                targets.setdefault(entry.request.task_token, (entry.pool, entry.bound))
        for token, (pool, arn) in self._handed.items():
            targets.setdefault(token, (pool, log.bind(pool=pool.name, child_arn=arn)))
        return targets

    async def _beat(self, targets: list[tuple[str, Pool, Any]]) -> int:
        """Heartbeat each token, then let go of those whose parent is gone."""
        gone: set[str] = set()
        for token, pool, bound in targets:
            outcome = await self._heartbeat(token, bound, pool.name)
            if outcome == "ok":
                self._beaten[token] = self.clock()
            elif outcome == "parent_gone":
                gone.add(token)
        if gone:
            await self._let_go(gone)
        return len(targets)

    async def _heartbeat(self, token: str, bound: Any, pool: str, *, attempts: int = 5) -> str:
        """One heartbeat: ``ok``, ``parent_gone`` (it no longer waits) or ``error``."""
        try:
            await self._call("send_task_heartbeat", attempts=attempts, taskToken=token)
        except AWS_ERRORS as exc:
            if error_code(exc) in PARENT_GONE:
                self.metrics.heartbeats.labels(pool=pool, outcome="parent_gone").inc()
                return "parent_gone"
            self.metrics.heartbeats.labels(pool=pool, outcome="error").inc()
            bound.warning("dispatcher.heartbeat_failed", error=str(exc))
            return "error"
        self.metrics.heartbeats.labels(pool=pool, outcome="ok").inc()
        return "ok"

    async def _let_go(self, gone: set[str]) -> None:
        """The parents of ``gone`` no longer wait: forget their tokens and delete their
        requests; a child no token waits on any more is let go (or stopped). A request still
        waiting in a room is dropped unstarted - unless a start of it may have run (in
        doubt): its start settles it, finds the child and lets it go. A token passed on by
        a predecessor is only forgotten: its child is left to whoever started it."""
        for token in gone:
            self._handed.pop(token, None)
        for arn in [a for a, hs in self._held.items() if any(h.token in gone for h in hs)]:
            leaving = [h for h in self._held.get(arn, []) if h.token in gone]
            if leaving:
                former = any(h.before_reign for h in leaving)
                unsure = any(h.unsure for h in leaving)
                await self._orphaned(
                    arn, leaving[0].pool, leaving[0].bound, gone, former, unsure=unsure
                )
                for held in leaving:
                    await self._release(held)
        for pool in self.pools.values():
            for entry in pool.room.items():
                token = entry.request.task_token
                if token is None or token not in gone:
                    continue
                arn = execution_arn(pool.state_machine_arn, entry.request.name)
                if arn in pool.ledger.in_doubt or not pool.room.remove(entry):
                    continue
                pool.update()
                if pool.ledger.holds(arn):  # its child runs (started before a restart)
                    former = self.before_reign(entry.message)
                    unsure = self.unsure(entry.message)
                    await self._orphaned(arn, pool, entry.bound, gone, former, unsure=unsure)
                else:  # never started: dropped
                    self.metrics.orphans.labels(pool=pool.name, action="dropped").inc()
                    entry.bound.info("dispatcher.request_dropped", why="parent gone")
                await entry.queue.delete(entry.request.receipt_handle, entry.bound)

    def _waiters(self, arn: str, gone: set[str]) -> int:
        """Tokens other than ``gone`` that wait on child ``arn``: held for it, in a waiting
        room for its name (a parent's retry with the same key), set aside to be passed on
        (the rooms are emptied when the reign or the process ends), deferred to its queue
        (not back yet), or being started."""
        count = sum(1 for h in self._held.get(arn, []) if h.token not in gone)
        count += sum(1 for t, _ in self._handed_for(arn) if t not in gone)
        count += sum(1 for t, (_, a) in self._passing.items() if a == arn and t not in gone)
        count += int(self._deferred.get(arn, -math.inf) > self.clock())
        count += sum(
            1
            for entry in self.kept()
            if entry.request.task_token not in (None, *gone)
            and execution_arn(entry.pool.state_machine_arn, entry.request.name) == arn
        )
        for pool in self.pools.values():
            count += sum(
                1
                for entry in pool.room.items()
                if entry.request.task_token not in (None, *gone)
                and execution_arn(pool.state_machine_arn, entry.request.name) == arn
            )
        return count + int(self.starting(arn))

    async def _orphaned(
        self,
        arn: str,
        pool: Pool,
        bound: Any,
        gone: set[str],
        former: bool,
        *,
        unsure: bool = True,
    ) -> None:
        """A parent of running child ``arn`` stopped waiting. Another token may still wait on
        the same child (a parent's retry with the same key): then the child is kept for it.
        A child a predecessor started is kept too while only tokens first received in this
        reign let go of it (``former`` False): it was started for another request, which
        may be back in the queue, handed back at the restart. A child a token first received
        before `unsure_before` waited on (``unsure``) is left to run, never stopped: a former
        process may have deferred or handed back a retry's request for it, or taken it and
        died, and no reign passed that token on: it waits unseen in the queue. Otherwise it
        is orphaned: stopped if so configured, else left to run."""
        if former and arn not in self._ours:
            self._starter_gone.add(arn)
        if self._waiters(arn, gone):
            bound.info("dispatcher.parent_gone", child_arn=arn, child="awaited by another token")
            return
        if arn not in self._ours and arn not in self._starter_gone:
            bound.info("dispatcher.parent_gone", child_arn=arn, child="started for another request")
            return
        self._starter_gone.discard(arn)
        action = "left"
        if unsure:
            bound.info("dispatcher.parent_gone", child_arn=arn, child="may be awaited unseen")
        elif self.settings.stop_orphaned_children:
            try:
                await self._call(
                    "stop_execution",
                    executionArn=arn,
                    error="Dispatcher.ParentGone",
                    cause="the parent no longer waits for this child",
                )
                action = "stopped"
            except AWS_ERRORS as exc:
                bound.warning("dispatcher.stop_child_failed", error=str(exc))
        self.metrics.orphans.labels(pool=pool.name, action=action).inc()
        bound.info("dispatcher.child_orphaned", child_arn=arn, action=action)

    # -- answering -------------------------------------------------------------------------

    async def _answer_of(
        self, arn: str, status: str, result: Mapping[str, Any] | None
    ) -> Answer | None:
        """The answer for an ended child: its final result, or None while it runs again.

        A ``SUCCEEDED`` event carrying the output is final (a run that succeeded cannot be
        redriven). Anything else - a failure, an event without what is needed, a child
        known only to have ended - is described: a redrive may have reopened the child
        since that event was sent, and then the answer waits for its next end. A describe
        that does not show it closed is never answered."""
        if status == "SUCCEEDED" and result is not None and "output" in result:
            return answer_for(status, result)
        described = await self._call("describe_execution", executionArn=arn)
        if str(described["status"]) not in CLOSED:
            return None
        return answer_for(str(described["status"]), described)

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
            await held.delete()
        return True

    async def _release(self, held: Held) -> None:
        """Forget a token and delete its request message: the parent was dealt with."""
        tokens = self._held.get(held.arn, [])
        if held in tokens:
            tokens.remove(held)
            if not tokens:
                del self._held[held.arn]
        self._gauge(held.pool)
        await held.delete()

    async def _call(self, operation: str, *, attempts: int = 5, **kwargs: Any) -> Any:
        """A Step Functions call with jittered retries of transient errors."""
        method = getattr(self.sfn, operation)
        async for attempt in stamina.retry_context(
            on=lambda e: is_retryable(e) and error_code(e) not in PARENT_GONE,
            attempts=attempts,
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
        failed: set[str] = set()
        every = [pair for h in due for pair in h.handles()]
        for queue in {id(q): q for q, _ in every}.values():
            handles = [handle for q, handle in every if q is queue]
            failed |= await queue.set_visibility(handles, visibility)
        for held in due:
            # An earlier handle that can no longer be extended is stale (the message was
            # received again after its visibility lapsed): forgotten.
            held.earlier = [(q, h) for q, h in held.earlier if h not in failed]
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
