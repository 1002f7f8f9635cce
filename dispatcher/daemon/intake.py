"""Intake: receive requests only as pools can use them, and start each in its turn.

Two kinds of passes, each a function of its own with a thin loop around it:

- `Intake.receive_once` (per request queue) waits until one of the queue's pools wants
  requests - free slots no waiting request can take, or room to receive ahead (a pool
  fed by one queue, or with keys, keeps its room full, so the start-by of every request
  held is watched in memory; one fed by several queues keeps a few of each waiting) -
  receives at most that many (<= 10), routes each to its pool (by message attribute
  where a queue feeds several), and puts it in the pool's waiting room; a bad request
  goes to the dead-letter queue, one the room has no space for goes back to its queue
  with a growing delay.
- `Intake.dispatch_once` (per pool) picks the next request from the waiting room
  (priorities with a reserved share, keys round-robin, keys at their limit skipped),
  reserves its slot and hands it to the `Starter`.

Requests waiting in a room keep their messages hidden (visibility extended in batches);
at shutdown they are handed back. A long poll in flight at shutdown is let answer, not cut
short, and what it brings goes straight back too: SQS may still hand messages to a long
poll whose caller gave up, and they would stay hidden for the visibility timeout with
nobody to give them back. Nothing is made visible while this process's own long polls may
still take it: each receive counts towards the queue's redrive policy, so a request taken
back by its own dispatcher's last poll could reach ``maxReceiveCount`` on the way out (and
be moved to the dead-letter queue without a reason). What waits is hidden until the polls
are surely over, and handed back at once when the last has answered.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus

from dispatcher.aws.api import AWS_ERRORS, Clients
from dispatcher.core.requests import (
    ORIGINAL_ID_ATTRIBUTE,
    PARENT_ATTRIBUTE,
    BadRequest,
    execution_arn,
    key_tag,
    keyed,
    parse,
    string_attributes,
)
from dispatcher.daemon.deadletter import DEFAULT_MAX_SIZE
from dispatcher.daemon.deleter import BATCH, DeleteBatcher
from dispatcher.daemon.health import Health
from dispatcher.daemon.metrics import Metrics
from dispatcher.daemon.pool import MAX_DEFER_SECONDS, Pool
from dispatcher.daemon.queues import RequestQueue
from dispatcher.daemon.ratelimit import RateLimiters
from dispatcher.daemon.renewal import handle_left, renew
from dispatcher.daemon.starter import IntakeStats, Starter, Waiting
from dispatcher.settings.config import Settings
from dispatcher.settings.layout import Layout

log = structlog.get_logger("dispatcher.intake")

UNROUTED = "unrouted"
"""The pool label of requests that named no pool their queue feeds."""
RECEIVE_GRACE = 5.0
"""Seconds beyond its long-poll wait a receive in flight at shutdown may take to answer."""


class Intake:
    """Receives the requests of every queue and starts them, pool by pool."""

    def __init__(
        self,
        settings: Settings,
        clients: Clients,
        pools: Mapping[str, Pool],
        layout: Layout,
        *,
        metrics: Metrics,
        health: Health,
        limiters: RateLimiters,
        dead_letter_max_size: int = DEFAULT_MAX_SIZE,
        max_receive_counts: Mapping[str, int] | None = None,
    ) -> None:
        self.settings = settings
        self.sqs = clients.sqs
        self.pools = pools
        self.metrics = metrics
        self.health = health
        self.starter = Starter(
            settings,
            clients,
            metrics,
            health,
            limiters,
            dead_letter_max_size=dead_letter_max_size,
        )
        self.queues = [RequestQueue(clients.sqs, q) for q in layout.queues]
        for queue in self.queues:
            queue.max_receive_count = (max_receive_counts or {}).get(queue.url)
            queue.last_chance = functools.partial(self._last_chance, queue)
            queue.min_delay = functools.partial(self._polls_may_take, queue)
        # Handed back at the end of a stop: (queue, message, since when it is hidden).
        self._late: list[tuple[RequestQueue, Mapping[str, Any], float]] = []
        self._polls = {q.url: 0 for q in layout.queues}  # receive calls in flight
        self._lingering = {q.url: -math.inf for q in layout.queues}  # see `_polls_may_take`
        self._waiting_from: dict[tuple[str, str], int] = {
            (q.url, p): 0 for q in layout.queues for p in q.pools
        }
        self._receiving = dict.fromkeys(self._waiting_from, 0)  # asked for, in flight
        self._pollers: anyio.CancelScope | None = None  # dispatch loops: cancelled at stop
        self._receives: anyio.CancelScope | None = None  # receive loops: let answer at stop
        self._stopped = anyio.Event()
        self._extending: set[Waiting] = set()  # waiting entries an extension is out for
        # Receipt handle -> since when SQS surely hides it: set aside while stopping, on its
        # last receive, and hidden then (`_hide_last_receives`).
        self._hidden_at_set_aside: dict[str, float] = {}
        self._deadline_added = anyio.Event()  # a request with a start-by entered a room
        # The reign ends but the process goes on (the lease lost): what is kept on its last
        # receive is left to `LastReceives.finish` (the service's), with no shutdown deadline.
        self.keep_settling = False

    @property
    def stats(self) -> IntakeStats:
        """Totals for the summary and `/status`."""
        return self.starter.stats

    def set_may_start(self, check: Any) -> None:
        """Starts are sent only while ``check()`` is true (the lease)."""
        self.starter.may_start = check

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Receive and start until `stop`; then hand back what waits, let started handlers
        finish within the shutdown timeout, and let receives in flight answer (what they
        bring goes straight back)."""
        async with anyio.create_task_group() as deleting:
            for queue in self.queues:
                queue.deleter = DeleteBatcher(self.sqs, queue.url)
                await deleting.start(queue.deleter.run)
            # Requests kept on their last receive stay hidden and are settled until the very
            # end (through the shutdown's drain too), then get one last bounded chance.
            keeping = anyio.CancelScope()
            deleting.start_soon(self._keep_last_receives, keeping)
            try:
                with anyio.CancelScope() as self._receives:
                    async with anyio.create_task_group() as receivers:
                        for queue in self.queues:
                            for _ in range(self.settings.receive_concurrency):
                                receivers.start_soon(self._receive_loop, queue)
                        await self._dispatch_until_stopped(task_status)
                # Receives admit nothing once stopping (what they brought goes back now that
                # the last has answered); this pass also catches a request admitted in a race
                # with `stop`, should there be one.
                with anyio.CancelScope(shield=not self.starter.force), anyio.move_on_after(10):
                    await self._hand_back_late()
                    await self.hand_back_waiting()
                keeping.cancel()
                if not self.keep_settling or self.starter.force:
                    settle = self.settings.start_timeout + self.settings.start_grace + 5
                    with (
                        anyio.CancelScope(shield=not self.starter.force),
                        anyio.move_on_after(settle),
                    ):
                        await self.starter.last_receives.finish()
            finally:
                keeping.cancel()
                for queue in self.queues:
                    if queue.deleter is not None:
                        queue.deleter.close()  # the queued deletes still go out
                        queue.deleter = None

    async def _keep_last_receives(self, scope: anyio.CancelScope) -> None:
        with scope:
            await self.starter.last_receives.run()

    async def _dispatch_until_stopped(self, task_status: TaskStatus[None]) -> None:
        """Pick and start requests until `stop`; then set aside what waits (handed back
        when the last receive has answered) and give the started handlers the shutdown
        timeout."""
        async with anyio.create_task_group() as handlers:
            with anyio.CancelScope() as self._pollers:
                if self.starter.stopping:  # stopped before it began
                    self._pollers.cancel()
                async with anyio.create_task_group() as loops:
                    for pool in self.pools.values():
                        loops.start_soon(self._dispatch_loop, pool, handlers)
                    loops.start_soon(self._keep_waiting_hidden)
                    loops.start_soon(self._expire_loop, handlers)
                    task_status.started()
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await self._set_aside_waiting()
            handlers.cancel_scope.deadline = anyio.current_time() + self.settings.shutdown_timeout
            self.starter.cut_short_waiting()

    def stop(self, *, force: bool = False) -> None:
        """Stop receiving and starting. A receive waiting for free slots returns at once; a
        long poll in flight is let answer (its wait, and `RECEIVE_GRACE`, at most) and what
        it brings goes back to its queue at once. With ``force``, abandon everything now."""
        self.starter.stopping = True
        self.starter.force = self.starter.force or force
        self._stopped.set()
        if self._pollers is not None:
            self._pollers.cancel()
        if self._receives is not None:
            if self.starter.force:
                self._receives.cancel()
            else:
                bound = anyio.current_time() + self.settings.receive_wait_seconds + RECEIVE_GRACE
                self._receives.deadline = min(self._receives.deadline, bound)
        for pool in self.pools.values():
            pool.update()  # wakes the receives waiting for slots: they see `stopping`
        self.starter.cut_short_waiting()

    async def _receive_loop(self, queue: RequestQueue) -> None:
        failures = 0
        while not self.starter.stopping:
            try:
                await self.receive_once(queue)
                failures = 0
            except AWS_ERRORS as exc:  # a bug is not caught: the loop dies, /healthz says so
                failures += 1
                self.health.aws_failed("ReceiveMessage", exc)
                log.warning("dispatcher.receive_failed", error=str(exc), failures=failures)
                with anyio.move_on_after(min(30.0, 0.5 * 2 ** min(failures, 6))):
                    await self._stopped.wait()

    async def _dispatch_loop(self, pool: Pool, handlers: TaskGroup) -> None:
        while not self.starter.stopping:
            if not self.dispatch_once(pool, handlers):
                await pool.changed()

    # -- receiving -----------------------------------------------------------------------

    def wanted(self, queue: RequestQueue) -> int:
        """How many messages a receive on ``queue`` may take now."""
        return max(
            self.pools[name].wanted(
                self._waiting_from[queue.url, name], self._receiving[queue.url, name]
            )
            for name in queue.config.pools
        )

    async def receive_once(self, queue: RequestQueue) -> int:
        """Wait until the queue's pools want requests, receive, route and hold them.

        Once stopping it receives nothing more, and what a receive already in flight
        brings goes straight back to the queue (visibility 0), never into a room.
        """
        pools = [self.pools[name] for name in queue.config.pools]
        while (wanted := self.wanted(queue)) == 0:
            if self.starter.stopping:
                return 0
            await _any_change(pools)
        if self.starter.stopping:
            return 0
        for pool in pools:
            pool.receiving += wanted
            self._receiving[queue.url, pool.name] += wanted
        self._polls[queue.url] += 1
        # Visibility runs from SQS's answer, after this: what it brings is hidden since then.
        asked = {pool.name: pool.clock() for pool in pools}
        try:
            response = await self.sqs.receive_message(
                QueueUrl=queue.url,
                MaxNumberOfMessages=wanted,
                WaitTimeSeconds=self.settings.receive_wait_seconds,
                VisibilityTimeout=self.settings.visibility_timeout,
                MessageAttributeNames=["All"],
                MessageSystemAttributeNames=["All"],
            )
        except BaseException:
            # Given up (cancelled, failed): its last attempt may still wait at SQS.
            self._lingering[queue.url] = max(
                self._lingering[queue.url],
                anyio.current_time() + self.settings.receive_wait_seconds,
            )
            raise
        finally:
            self._polls[queue.url] -= 1
            for pool in pools:
                pool.receiving -= wanted
                self._receiving[queue.url, pool.name] -= wanted
                pool.update()
        self.health.aws_ok()
        messages: list[Any] = list(response.get("Messages", []))
        if not messages:
            for pool in pools:
                pool.backlog_drained()
        self.stats.received += len(messages)
        queue.received += len(messages)
        # Admitted side by side: one message's slow call (a renewal whose delete is tried
        # again, a hand-back whose answer is lost) once held the others of its batch
        # unadmitted, unextended, until one on its last receive lapsed and SQS moved it.
        # Each admission is synchronous up to its first call, so the room takes them in
        # the order SQS gave them.
        async with anyio.create_task_group() as admissions:
            for index, message in enumerate(messages):
                if self.starter.stopping:
                    rest = messages[index:]
                    admissions.start_soon(
                        self._hand_back_received, queue, rest, min(asked.values())
                    )
                    break
                admissions.start_soon(self._admit_one, queue, message, asked)
        return len(messages)

    async def _admit_one(
        self, queue: RequestQueue, message: dict[str, Any], asked: dict[str, float]
    ) -> None:
        """`admit`, side by side with its batch: a failed AWS call leaves the message to
        come back (its visibility runs out) and cuts no other admission short."""
        try:
            await self.admit(queue, message, asked=asked)
        except AWS_ERRORS as exc:
            log.warning(
                "dispatcher.admission_failed",
                queue=queue.url,
                message_id=message.get("MessageId"),
                error=str(exc),
            )

    def _polls_may_take(self, queue: RequestQueue) -> int:
        """Stopping: seconds until no long poll of this process on ``queue`` can take a
        message any more (a hand back makes it visible no earlier; 0 when none can).

        A poll still in flight ends by the receives' deadline (see `stop`), and an SDK
        retry may have sent its last attempt just before: SQS may answer that one up to a
        long-poll wait later. One that was given up (cancelled, failed) may likewise still
        wait at SQS for a long-poll wait."""
        if not self.starter.stopping:
            return 0
        now = anyio.current_time()
        until = self._lingering[queue.url]
        if self._polls[queue.url]:
            wait = self.settings.receive_wait_seconds
            deadline = self._receives.deadline if self._receives is not None else math.inf
            until = max(until, min(deadline, now + wait + RECEIVE_GRACE) + wait)
        return math.ceil(until - now) if until > now else 0

    async def _set_aside_waiting(self) -> None:
        """Stopping: what waits in the rooms is handed back once the last receive in flight
        has answered (`_hand_back_late`), not before - one of this process's own polls would
        take it again, counting a receive. Meanwhile it is hidden until those polls are
        surely over (what happens should the process be killed before then). Every entry
        is set aside before any call is made: a slow call loses none."""
        if not any(self._polls.values()):
            await self.hand_back_waiting()
            return
        visibility = self.settings.visibility_timeout
        # Those on their last receive will be kept (`_hand_back_late`): hidden as long as
        # they would be waiting; the others only until the polls are surely over.
        seconds = {q.url: max(1, self._polls_may_take(q)) for q in self.queues}
        for pool in self.pools.values():
            entries: list[Waiting] = pool.room.drain()
            pool.update()
            for entry in entries:
                self._waiting_from[entry.queue.url, pool.name] -= 1
                self._passing_on(entry)
                hidden = visibility if entry.queue.is_last_receive(entry.message) else 0
                hidden = max(hidden, seconds[entry.queue.url])
                # As if hidden since then for the visibility timeout (or the call fails).
                since = min(entry.hidden_since, pool.clock() + hidden - visibility)
                self._late.append((entry.queue, entry.message, since))
        async with anyio.create_task_group() as calls:
            for queue in self.queues:
                mine = [m for q, m, _ in self._late if q is queue]
                if not mine:
                    continue
                log.info("dispatcher.waiting_set_aside", queue=queue.url, count=len(mine))
                last = [str(m["ReceiptHandle"]) for m in mine if queue.is_last_receive(m)]
                rest = [str(m["ReceiptHandle"]) for m in mine if not queue.is_last_receive(m)]
                if last:
                    now = min(p.clock() for p in self.pools.values())
                    calls.start_soon(self._hide_last_receives, queue, last, now)
                if rest:
                    calls.start_soon(queue.set_visibility, rest, max(seconds[queue.url], 1))

    async def _hide_last_receives(
        self, queue: RequestQueue, handles: list[str], since: float
    ) -> None:
        """Set aside while stopping, on their last receive: hidden for the visibility
        timeout. Those SQS hid are known hidden since before the call (what their keeper
        counts from: counted from their last extension instead, they were once given up
        as surely visible again while SQS still hid them for most of a minute)."""
        failed = await queue.set_visibility(handles, self.settings.visibility_timeout)
        for handle in handles:
            if handle not in failed:
                self._hidden_at_set_aside[handle] = since

    async def _hand_back_received(
        self, queue: RequestQueue, messages: list[Any], hidden_since: float
    ) -> None:
        """Stopping: keep what a receive brought aside; it goes back (visible at once) when
        the last receive in flight has answered, so another of this process's long polls
        cannot take it again (each receive counts towards the redrive policy)."""
        self._late += [(queue, m, hidden_since) for m in messages]
        log.info("dispatcher.received_while_stopping", queue=queue.url, count=len(messages))

    async def _hand_back_late(self) -> None:
        """Hand back what receives brought while stopping (see `_hand_back_received`) and
        what waited when they were still in flight (`_set_aside_waiting`); the queues
        concurrently (one slow to answer holds back no other). A valid request on its last
        receive is kept instead (`_last_chance`), hidden since when it is."""
        late, self._late = self._late, []
        why = "received or waiting while stopping"

        async def hand_back(queue: RequestQueue, mine: list[Mapping[str, Any]]) -> None:
            handed = await queue.hand_back_all(mine, why)
            log.info("dispatcher.late_requests_handed_back", queue=queue.url, count=handed)

        async with anyio.create_task_group() as calls:
            for queue in self.queues:
                mine = []
                for q, message, since in late:
                    if q is not queue:
                        continue
                    entry = self._entry_of(queue, dict(message))
                    if entry is not None and queue.is_last_receive(message):
                        entry.hidden_since = min(entry.hidden_since, since)
                        handle = str(message["ReceiptHandle"])
                        hidden = self._hidden_at_set_aside.pop(handle, None)
                        if hidden is not None:
                            entry.hidden_since = max(entry.hidden_since, hidden)
                        self.starter.last_receives.keep(entry, why)
                    else:
                        mine.append(message)
                if mine:
                    calls.start_soon(hand_back, queue, mine)

    async def _last_chance(self, queue: RequestQueue, message: Mapping[str, Any], why: str) -> bool:
        """A valid request that would be handed back on its last receive (SQS would move
        it to the dead-letter queue on its own, without a reason): kept hidden until its
        execution is known to exist (then served) or not (then dead-lettered with the
        reason); an earlier attempt, in an earlier process too, may have started it."""
        entry = self._entry_of(queue, dict(message))
        if entry is None:
            return False
        self.starter.last_receives.keep(entry, why)
        return True

    def _entry_of(self, queue: RequestQueue, message: dict[str, Any]) -> Waiting | None:
        """The request a valid message is, as `admit` makes it (None: not a valid one)."""
        pool = self._route(queue, message)
        if isinstance(pool, str):
            return None
        request = parse(message, self.settings.input_format, self.settings.task_token_attribute)
        key: str | None = None
        if not isinstance(request, BadRequest) and pool.config.key_attribute is not None:
            key = key_tag(string_attributes(message).get(pool.config.key_attribute, ""))
            request = keyed(request, key)
        if isinstance(request, BadRequest):
            return None
        bound = log.bind(
            message_id=message.get("MessageId"), pool=pool.name, execution_name=request.name
        )
        return Waiting(request, message, queue, pool, key, pool.clock(), bound)

    async def admit(
        self,
        queue: RequestQueue,
        message: dict[str, Any],
        *,
        asked: Mapping[str, float] | None = None,
    ) -> None:
        """Route one message to its pool's waiting room, dead-letter it, or defer it;
        ``asked``: per pool, when the receive that brought it was sent (its visibility runs
        from no earlier; default: now)."""
        bound = log.bind(message_id=message.get("MessageId"))
        pool = self._route(queue, message)
        if isinstance(pool, str):
            await self.starter.dead_letter(queue, UNROUTED, message, "unknown_pool", pool)
            return
        request = parse(message, self.settings.input_format, self.settings.task_token_attribute)
        key: str | None = None
        if not isinstance(request, BadRequest) and pool.config.key_attribute is not None:
            raw = string_attributes(message).get(pool.config.key_attribute, "")
            key = key_tag(raw)
            request = keyed(request, key)
            bound = bound.bind(key=raw[:64])
        parent = string_attributes(message).get(PARENT_ATTRIBUTE)
        if parent:
            bound = bound.bind(parent_arn=parent[:300])
        if isinstance(request, BadRequest):
            await self.starter.dead_letter(
                queue, pool.name, message, request.reason, request.detail
            )
            return
        hidden_since = (asked or {}).get(pool.name, pool.clock())
        if self._received_again(queue, pool, message, request, hidden_since):
            return
        entry = Waiting(
            request,
            message,
            queue,
            pool,
            key,
            hidden_since,
            bound.bind(pool=pool.name, execution_name=request.name),
        )
        if self.starter.expiries.due(entry):  # received after its start-by: never started
            await self.starter.expiries.expire(entry)
            return
        # A request a free slot is waiting for gets in even when the room is full; so does
        # one on its last receive (deferred, SQS would move it away without a reason), and
        # a parent's token for a child that runs or is being started (a retry with the same
        # key): deferred, its parent would get no heartbeat, and the child could be stopped
        # as an orphan.
        can_start_now = pool.key_ok(key) and pool.ledger.free > pool.room.startable(pool.key_ok)
        child = execution_arn(pool.state_machine_arn, request.name)
        awaits_running = request.task_token is not None and (
            pool.ledger.holds(child) or self.starter.starting(child)
        )
        last = queue.is_last_receive(message)
        if last and not can_start_now and await self._renewed(entry):
            return
        beyond = can_start_now or last or awaits_running
        if pool.room.offer(entry, priority=queue.priority, key=key, beyond_capacity=beyond):
            _leave_line(pool, message)
            self._waiting_from[queue.url, pool.name] += 1
            pool.update()
            if request.start_by is not None:
                self._deadline_added.set()
            if self.starter.callbacks is not None:  # a parent waits: heartbeat it now
                self.starter.callbacks.waiting(entry)
            return
        # No room (overall, or for this key): back to the queue until about when the
        # requests already waiting will have started.
        delay = self._deferral(entry)
        if request.start_by is not None:  # back by its start-by, to be expired then if need be
            left = request.start_by - self.starter.expiries.clock()
            delay = max(0, min(delay, math.ceil(left)))
        self.stats.deferred += 1
        self.metrics.deferred.labels(pool=pool.name).inc()
        if self.starter.callbacks is not None:  # a parent waits: its child is kept for it
            self.starter.callbacks.deferred(entry, delay)
        await queue.hand_back(
            request.receipt_handle, delay, entry.bound, "waiting room full", message=message
        )

    def _deferral(self, entry: Waiting) -> int:
        """How long ``entry`` stays in its queue, deferred. Its place in its key's line is
        its message's (a message SQS stored twice takes one place; a renewed copy, its
        original's). Another copy of the request (a producer's retry, a copy SQS stored
        twice and renewed) is a spare while one holds the request's turn: it comes back
        15 minutes later, not with it. Sharing the turn, copies renewed on a last receive
        came back together, each renewed again, each renewal may leave one more (a send
        stored twice, a delete unanswered), and they multiplied; each with a place of its
        own, the line grew with them, and the requests behind waited for ever. A copy of a
        request whose start is under way here comes back once that start has had its time
        (its retries and one more attempt): with ``maxReceiveCount`` 1 it came back every
        second for as long as the start retried. Not as a spare, for 15 minutes: the start
        may fail or expire, and this copy (a producer's retry with a later start-by, say)
        then carries the request."""
        pool, request = entry.pool, entry.request
        place, predecessor = _place(entry.message)
        if place is not None and pool.spare(request.name, place, predecessor):
            return MAX_DEFER_SECONDS
        if self.starter.starting(execution_arn(pool.state_machine_arn, request.name)):
            settings = self.settings
            return min(
                MAX_DEFER_SECONDS, math.ceil(settings.start_retry_timeout + settings.start_timeout)
            )
        return pool.defer_seconds(entry.key, place, predecessor=predecessor, name=request.name)

    async def _renewed(self, entry: Waiting) -> bool:
        """A request on its last receive that would wait: renewed at once (a fresh copy, the
        original deleted: `dispatcher.daemon.renewal`) rather than held in the room, where
        a process killed or paused past its visibility would let SQS's redrive policy move
        it without a reason. The copy comes back at once and waits as any request does.
        False (the copy refused): it waits here, on its last receive - unless the process
        began to stop meanwhile (its rooms were set aside already): then it is kept (True)."""
        delay = entry.queue.min_delay()
        if entry.queue.max_receive_count == 1:
            # Its copy is on its last receive too, and would be renewed at once again, a
            # send and a delete per receive while the pool is full: it comes back when a
            # request deferred now would.
            delay = max(delay, self._deferral(entry))
        why = "last receive, waiting"
        visibility = self.settings.visibility_timeout
        within = handle_left(entry.hidden_since, entry.pool.clock(), visibility)
        if await renew(entry.queue, entry.message, delay, entry.bound, why, delete_within=within):
            return True
        if self.starter.stopping:
            self.starter.last_receives.keep(entry, "waiting at shutdown")
            return True
        return False

    def _received_again(
        self,
        queue: RequestQueue,
        pool: Pool,
        message: dict[str, Any],
        request: Any,
        hidden_since: float,
    ) -> bool:
        """A message received again while it still waits (its visibility ran out before an
        extension got through): the waiting entry takes the newest receipt handle - only it
        can still change the message's visibility or delete it - and the message is not
        admitted a second time. False if it does not wait, or its waiting entry is still
        hidden: then this is another copy (SQS may store a message twice; each copy has its
        own receipt handle and receive count), which waits as an entry of its own."""
        message_id = message.get("MessageId")
        if message_id is None:
            return False
        now, visibility = pool.clock(), self.settings.visibility_timeout
        for entry in pool.room.items():
            if (
                entry.queue is queue
                and entry.message.get("MessageId") == message_id
                and now - entry.hidden_since >= visibility
            ):
                entry.request, entry.message = request, message
                entry.hidden_since = max(entry.hidden_since, hidden_since)
                entry.bound.info("dispatcher.waiting_received_again")
                return True
        return False

    def _route(self, queue: RequestQueue, message: dict[str, Any]) -> Pool | str:
        """The pool a message is for, or why it names none."""
        names = queue.config.pools
        if len(names) == 1:
            return self.pools[names[0]]
        attribute = queue.config.pool_attribute
        value = string_attributes(message).get(attribute)
        if value in names:
            return self.pools[value]
        return (
            f"message attribute {attribute}={value!r} names no pool this queue feeds; "
            f"accepted: {', '.join(names)}"
        )

    # -- dispatching ---------------------------------------------------------------------

    def dispatch_once(self, pool: Pool, handlers: TaskGroup) -> bool:
        """Reserve a slot for the next waiting request that may start; False if none may."""
        if not pool.may_reserve(self.starter.may_start()):
            return False
        entry: Waiting | None = pool.room.pick(pool.key_ok)
        if entry is None:
            return False
        self._waiting_from[entry.queue.url, pool.name] -= 1
        [reservation] = pool.ledger.reserve(1, pool.clock(), entry.key)
        pool.update()
        handlers.start_soon(self.starter.handle, entry, reservation)
        return True

    # -- start-by deadlines --------------------------------------------------------------

    async def _expire_loop(self, handlers: TaskGroup) -> None:
        """Expire waiting requests as their start-by passes: woken at the earliest one, or
        when a request with a start-by enters a room."""
        while True:
            self._deadline_added = anyio.Event()
            wait = self.expire_waiting(handlers)
            with anyio.move_on_after(math.inf if wait is None else wait):
                await self._deadline_added.wait()

    def expire_waiting(self, handlers: TaskGroup) -> float | None:
        """One pass: every waiting request whose start-by has passed leaves its room and is
        expired in ``handlers`` (`Expiries.expire`). Returns the seconds until the next
        start-by of a request still waiting (None: none has one)."""
        expiries = self.starter.expiries
        now = expiries.clock()
        soonest: float | None = None
        for pool in self.pools.values():
            for entry in pool.room.items():
                deadline = entry.request.start_by
                if deadline is None:
                    continue
                if now < deadline:
                    soonest = deadline if soonest is None else min(soonest, deadline)
                    continue
                self._leave_room(entry)
                pool.update()
                handlers.start_soon(expiries.expire, entry)
        return None if soonest is None else max(0.0, soonest - now)

    # -- the waiting room's messages -----------------------------------------------------

    async def _keep_waiting_hidden(self) -> None:
        """Extend the visibility of waiting requests before it runs out (batched). Each
        pass starts on schedule, whether or not an earlier one still waits for an answer."""
        async with anyio.create_task_group() as passes:
            while True:
                await anyio.sleep(self.settings.visibility_timeout / 4)
                passes.start_soon(self.extend_waiting)

    async def extend_waiting(self) -> int:
        """One pass: extend every waiting request hidden for half its visibility or more
        (and not already being extended by an earlier pass still in flight).

        Batches go out concurrently, each with its own deadline (a fifth of the
        visibility: over before the next pass, a quarter later, which tries it again), so
        one lost answer never holds back the others. A request SQS refused
        to extend leaves the room (it will be redelivered); one whose answer did not come
        (an error, the deadline) stays for the next pass, unless its visibility has surely
        run out. ``hidden_since`` only ever moves forward, and only for the receipt handle
        that was extended (a copy received again meanwhile carries a newer one). A request
        on its last receive (its renewal at admission failed) is renewed instead, when SQS
        takes the copy (`_renewed`)."""
        visibility = self.settings.visibility_timeout
        extended = 0

        async def extend(pool: Pool, queue: RequestQueue, batch: list[Waiting], now: float) -> None:
            nonlocal extended
            handles = [e.request.receipt_handle for e in batch]
            try:
                with anyio.move_on_after(visibility / 5):
                    failed, unknown = await queue.extend_visibility(handles, visibility)
                    for entry, handle in zip(batch, handles, strict=True):
                        if entry.request.receipt_handle != handle:
                            continue  # received again meanwhile: the newer handle counts
                        if handle in failed or (
                            handle in unknown and pool.clock() - entry.hidden_since >= visibility
                        ):
                            self._leave_room(entry)
                        elif handle not in unknown:
                            entry.hidden_since = max(entry.hidden_since, now)
                            extended += 1
            finally:
                self._extending.difference_update(batch)
            pool.update()

        async def renew_or_extend(pool: Pool, entry: Waiting, now: float) -> None:
            # On its last receive (its renewal at admission failed): renewed now if SQS
            # takes the copy, else extended.
            why = "last receive, waiting"
            within = handle_left(entry.hidden_since, pool.clock(), visibility)
            copy_delay = entry.queue.min_delay()
            if await renew(
                entry.queue, entry.message, copy_delay, entry.bound, why, delete_within=within
            ):
                self._extending.discard(entry)
                self._leave_room(entry)
                pool.update()
                return
            await extend(pool, entry.queue, [entry], now)

        async with anyio.create_task_group() as batches:
            for pool in self.pools.values():
                now = pool.clock()
                due = [
                    e
                    for e in pool.room.items()
                    if now - e.hidden_since >= visibility / 2 and e not in self._extending
                ]
                for entry in [e for e in due if e.queue.is_last_receive(e.message)]:
                    due.remove(entry)
                    self._extending.add(entry)
                    batches.start_soon(renew_or_extend, pool, entry, now)
                for queue in self.queues:
                    mine = [e for e in due if e.queue is queue]
                    for start in range(0, len(mine), BATCH):
                        batch = mine[start : start + BATCH]
                        self._extending.update(batch)
                        batches.start_soon(extend, pool, queue, batch, now)
        return extended

    def _passing_on(self, entry: Waiting) -> None:
        """A waiting request goes back at the end of the reign: its token (if it carries
        one) is passed on to the successor."""
        if self.starter.callbacks is not None:
            self.starter.callbacks.passing_on(entry)

    def _leave_room(self, entry: Waiting) -> None:
        """A waiting request whose message can no longer be kept hidden leaves the room."""
        if entry.pool.room.remove(entry):
            self._waiting_from[entry.queue.url, entry.pool.name] -= 1

    async def hand_back_waiting(self) -> int:
        """Make every waiting request visible again (shutdown, lease lost). Every entry is
        set aside (kept, or to go back) before any call is made: a call that hangs (the
        caller's deadline) loses none - one on its last receive would otherwise stay
        hidden, unkept, until the redrive policy moved it without a reason."""
        handed = 0
        back: list[tuple[RequestQueue, list[dict[str, Any]]]] = []
        for pool in self.pools.values():
            entries: list[Waiting] = pool.room.drain()
            pool.update()
            for queue in self.queues:
                mine = [e for e in entries if e.queue is queue]
                if not mine:
                    continue
                self._waiting_from[queue.url, pool.name] -= len(mine)
                messages = []
                for entry in mine:
                    self._passing_on(entry)
                    if queue.is_last_receive(entry.message):  # kept, hidden since it is
                        self.starter.last_receives.keep(entry, "waiting at shutdown")
                    else:
                        messages.append(entry.message)
                if messages:
                    back.append((queue, messages))
        for queue, messages in back:
            handed += await queue.hand_back_all(messages, "waiting at shutdown")
        if handed:
            log.info("dispatcher.waiting_handed_back", count=handed)
        return handed


async def _any_change(pools: list[Pool]) -> None:
    """Wait until any of ``pools`` changes."""
    if len(pools) == 1:
        await pools[0].changed()
        return
    async with anyio.create_task_group() as tg:

        async def wait(pool: Pool) -> None:
            await pool.changed()
            tg.cancel_scope.cancel()

        for pool in pools:
            tg.start_soon(wait, pool)


def _place(message: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """A message's place in line: its id, and the id of the message it is a renewed copy
    of (None if it is none)."""
    attributes = message.get("MessageAttributes") or {}
    predecessor = (attributes.get(ORIGINAL_ID_ATTRIBUTE) or {}).get("StringValue")
    return message.get("MessageId"), predecessor


def _leave_line(pool: Pool, message: Mapping[str, Any]) -> None:
    """A deferred request got into the room: its place in line is left (its message's, or
    the one it inherits from the message it is a renewed copy of)."""
    for place in _place(message):
        pool.left_line(place)
