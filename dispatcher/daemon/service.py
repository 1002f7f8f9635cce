"""The service: preflight, start-up listing, then intake, events, reconcile, live limits
and HTTP in one task group, with an ordered, bounded shutdown on SIGTERM/SIGINT (a second
signal: at once); SIGHUP reloads the config file.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass
from typing import Any

import anyio
import stamina
import structlog
from anyio.abc import TaskGroup, TaskStatus

from dispatcher.aws.api import AWS_ERRORS, Clients, is_retryable, open_clients
from dispatcher.daemon.callbacks import Callbacks
from dispatcher.daemon.events import Events
from dispatcher.daemon.health import Health
from dispatcher.daemon.http import build_app, serve
from dispatcher.daemon.intake import Intake
from dispatcher.daemon.lastreceive import LastReceives
from dispatcher.daemon.lease import Leases
from dispatcher.daemon.limits import LiveLimits
from dispatcher.daemon.metrics import Metrics
from dispatcher.daemon.pool import Clock, Pool, share_limits
from dispatcher.daemon.ratelimit import RateLimiters
from dispatcher.daemon.readbudget import ReadBudgets, ReadRates
from dispatcher.daemon.reconcile import Reconciler
from dispatcher.daemon.startup import Preflight, preflight
from dispatcher.errors import AwsSetupError, UserError
from dispatcher.settings.config import Settings
from dispatcher.settings.layout import Layout, from_settings

log = structlog.get_logger("dispatcher.service")

ClientsFactory = Callable[..., AbstractAsyncContextManager[Clients]]
"""Opens the AWS clients (`dispatcher.aws.api.open_clients`'s signature); the simulation
passes one that hands out its simulated AWS."""


class RestartNeededError(UserError):
    """The config file changed, under a standby, in ways only a restart applies: the
    process exits (status 2) instead of governing by the rules it started with."""


@dataclass(frozen=True)
class Summary:
    """The one-line account logged at exit."""

    started: int
    duplicates: int
    dead_lettered: int
    handed_back: int
    events_applied: int
    reconcile_passes: int
    max_running: int
    uptime_seconds: float


class Dispatcher:
    """One dispatcher process governing its pools."""

    def __init__(
        self,
        settings: Settings,
        *,
        layout: Layout | None = None,
        metrics: Metrics | None = None,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
        endpoint_url: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        clients: ClientsFactory = open_clients,
        serve_http: bool = True,
        lease_owner: str | None = None,
    ) -> None:
        self.settings = settings
        self.layout = layout if layout is not None else from_settings(settings)
        self.overrides = dict(overrides or {})
        self.environ = environ if environ is not None else os.environ  # re-read on SIGHUP
        self.metrics = metrics if metrics is not None else Metrics()
        self.health = Health(self.metrics)
        self.health.refresh()
        self.clock = clock
        self.wall = wall  # the lease's expiry is written in wall-clock seconds
        self._born = clock()
        self._open_clients = clients
        self._serve_http = serve_http
        self._lease_owner = lease_owner  # None: host, pid and a random suffix
        self._reload_pending = False  # a SIGHUP came before the limits were set up
        self._restart_needed: list[str] = []  # the file changed under a standby: see below
        self.endpoint_url = endpoint_url
        self.pools = {
            p.name: Pool(p, self.metrics, clock, queues=len(self.layout.queues_of(p.name)))
            for p in self.layout.pools
        }
        self.pool = next(iter(self.pools.values()))  # the first (with no file: the only) pool
        self.shared = share_limits(self.pools, self.layout.limits, self.metrics)
        self.limiters = RateLimiters(
            self.metrics,
            rate=settings.start_rate,
            burst=settings.start_burst,
            floor=settings.start_rate_floor,
            clock=clock,
        )
        for pool in self.pools.values():
            self.limiters.for_arn(pool.state_machine_arn)  # export the rate from the start
        self.read_budgets = ReadBudgets(ReadRates.of(settings), self.metrics, clock)
        self.limits: LiveLimits | None = None
        self.http_port: int | None = None
        self.intake: Intake | None = None
        self.events: Events | None = None
        self.reconcilers: dict[str, Reconciler] = {}
        self.callbacks: Callbacks | None = None
        self._background: TaskGroup | None = None  # `run`'s: work that outlives a reign
        # Requests kept on their last receive by reigns that ended, still being settled
        # (`_settle_left`): each reign's end is theirs too (`LastReceives.reign_over`).
        self._settling: list[LastReceives] = []
        self._all_settled: anyio.Event | None = None  # set when `_settling` empties
        self._stop_began: float | None = None  # (self.clock) when `stop` was first called
        self._lease_lost_at: float | None = None  # (self.clock) this reign's lease lost
        self.serving = anyio.Event()  # HTTP endpoints answer (start-up may still run)
        self.started = anyio.Event()  # start-up listing done: ready
        self._stop = anyio.Event()
        self._reported = False
        self.role = "starting"  # single | leader | standby
        self.lease: Leases | None = None
        self.preflight = Preflight()  # what start-up read (the dead-letter queue's size)
        self._signals = 0
        self._began = time.monotonic()

    # -- control -----------------------------------------------------------------------

    def stop(self) -> None:
        """Begin the ordered shutdown (what SIGTERM does)."""
        if not self._stop.is_set():
            self._stop_began = self.clock()
        self._stop.set()

    @property
    def reconciler(self) -> Reconciler | None:
        """The first pool's reconciler (the only one without a config file)."""
        return self.reconcilers.get(self.pool.name)

    def pool_status(self, pool: Pool) -> dict[str, Any]:
        """One pool's part of `/status`."""
        ledger = pool.ledger
        return {
            "state_machine_arn": pool.state_machine_arn,
            "limit": ledger.limit,
            "per_key_limit": ledger.per_key_limit,
            "running": ledger.running_count,
            "starting": pool.starting,
            "in_doubt": ledger.doubt_count,
            "waiting": len(pool.room),
            "keys_at_limit": ledger.keys_at_limit,
            "free": ledger.free,
            "queued_estimate": pool.queued,
            "queued_read_at": pool.queued_at,
            "started": pool.started_total,
            "finished": pool.finished_total,
            "tokens_held": 0 if self.callbacks is None else self.callbacks.held_for(pool),
        }

    def status(self) -> dict[str, Any]:
        """The `/status` document: the first pool's figures at the top, every pool under
        ``pools``."""
        ledger = self.pool.ledger
        return {
            "pool": self.pool.name,
            "pools": {name: self.pool_status(pool) for name, pool in self.pools.items()},
            "limits": {}
            if self.shared is None
            else self.shared.status(lambda name: len(self.pools[name].room)),
            "start_rate": {
                f"{lim.account}/{lim.region}": round(lim.rate, 3) for lim in self.limiters.all()
            },
            "config": self.layout.source,
            "role": self.role,
            "lease": None
            if self.lease is None
            else {
                "owner": self.lease.owner,
                "held": self.role == "leader" and self.lease.valid(),
                "epoch": self.lease.epoch,
                "epochs": self.lease.epochs,
                "valid_for_seconds": round(max(0.0, self.lease.remaining()), 3),
            },
            "state_machine_arn": self.pool.state_machine_arn,
            "limit": ledger.limit,
            "running": ledger.running_count,
            "starting": self.pool.starting,
            "receiving": self.pool.receiving,
            "free": ledger.free,
            "queued_estimate": self.pool.queued,
            "ready": self.health.ready,
            "started": self.pool.started_total,
            "finished": self.pool.finished_total,
            "last_reconcile_at": self.health.last_reconcile_at,
            "last_event_at": self.health.last_event_at,
            "intake": None
            if self.intake is None
            else {
                "received": self.intake.stats.received,
                "in_flight": len(self.intake.stats.in_flight),
                "dead_lettered": self.intake.stats.dead_lettered,
                "handed_back": self.intake.stats.handed_back,
                "deferred": self.intake.stats.deferred,
            },
        }

    # -- running -----------------------------------------------------------------------

    async def run(
        self,
        *,
        handle_signals: bool = True,
        task_status: TaskStatus[Dispatcher] = anyio.TASK_STATUS_IGNORED,
    ) -> Summary:
        """Run until `stop` (or a signal); return the summary. Raises UserError on bad setup.

        Without a lease table this process governs the pool from start-up to shutdown. With
        one, it waits as a standby until it holds the lease, and governs only while it does.
        """
        settings = self.settings
        async with (
            self._open_clients(
                self.metrics,
                region=self.layout.region,
                long_poll_seconds=settings.receive_wait_seconds,
                endpoint_url=self.endpoint_url,
                dynamodb=settings.lease_table is not None,
                ssm=any(p.limit_parameter for p in self.layout.pools)
                or any(n.limit_parameter for n in self.layout.limits),
                start_timeout=settings.start_timeout,
            ) as clients,
            anyio.create_task_group() as tg,
        ):
            if self._serve_http:
                app = build_app(self.health, self.metrics, self.status)
                self.http_port = await tg.start(serve, app, settings.http_host, settings.http_port)
            self.serving.set()
            if handle_signals:
                tg.start_soon(self._watch_signals, tg.cancel_scope)
            self._background = tg
            try:
                self.preflight = await preflight(settings, self.layout, clients)
            except UserError as exc:  # unreachable, refused, missing or denied: exit 3, not 2
                raise AwsSetupError(str(exc)) from None
            self.limits = LiveLimits(
                settings,
                self.layout,
                self.pools,
                ssm=clients.ssm,
                metrics=self.metrics,
                limiters=self.limiters,
            )
            self.limits.overrides = self.overrides
            self.limits.shared = self.shared
            self.limits.environ = self.environ
            if self._reload_pending:
                self.reload()
            await self.limits.refresh_once()  # the limits in force before the first start
            if settings.lease_table is None:
                # A predecessor (killed, or stopped by a deploy) died before this process
                # was born: its last starts land within D of then.
                await self._reign(clients, None, task_status, self._born)
            else:
                await self._standby(clients, task_status)
                await self._finish_settling()
            tg.cancel_scope.cancel()
        summary = self.summary()
        log.info("dispatcher.stopped", **asdict(summary))
        if self._restart_needed:
            raise RestartNeededError(
                "the config file changed since this process started ("
                + "; ".join(self._restart_needed)
                + "): it did not take over, restart it to apply the file"
            )
        return summary

    async def _standby(self, clients: Clients, task_status: TaskStatus[Dispatcher]) -> None:
        """Try for the lease until stopped; govern the pool whenever it is ours."""
        assert clients.dynamodb is not None  # noqa: S101 - opened when a table is set
        assert self.settings.lease_table is not None  # noqa: S101
        ttl = self.settings.lease_ttl
        self.lease = Leases(
            clients.dynamodb,
            self.settings.lease_table,
            self.lease_keys,
            ttl=ttl,
            margin=ttl / 5,
            start_timeout=self.settings.start_timeout,
            start_grace=self.settings.start_grace,
            owner=self._lease_owner,
            monotonic=self.clock,
            wall=self.wall,
        )
        while not self._stop.is_set():
            try:
                acquired = False
                # A table that does not answer must not keep a standby from trying again.
                with anyio.move_on_after(self.lease.config.renew_timeout):
                    acquired = await self.lease.try_acquire()
            except AWS_ERRORS as exc:
                self.health.aws_failed("UpdateItem", exc)
                log.warning("dispatcher.lease_unavailable", error=str(exc))
                acquired = False
            if acquired:
                self.metrics.lease_epoch.set(self.lease.epoch)
                # The previous holder sent its last start before its lease lapsed, which
                # was before now: it lands within D of now, or never (see `_reign`).
                await self._reign(clients, self.lease, task_status, self.clock())
                continue
            self.role = "standby"
            self._report_started(task_status)
            await self._sleep_unless_stopped(self.lease.config.renew_every)

    def _build(self, clients: Clients, lease: Leases | None) -> tuple[Intake, Events]:
        """Fresh ledgers, reconcilers, events and intake for a reign."""
        settings = self.settings
        for pool in self.pools.values():
            pool.reset()  # each reign starts from the listing
        count = len(self.pools)
        self.reconcilers = {
            name: Reconciler(
                settings,
                clients,
                pool,
                self.metrics,
                self.health,
                queue_urls=[q.url for q in self.layout.queues_of(name)],
                budget=self.read_budgets.for_arn(pool.state_machine_arn),
                phase=index / count,  # the pools' passes spread over the interval
            )
            for index, (name, pool) in enumerate(self.pools.items())
        }
        by_arn = {pool.state_machine_arn: pool for pool in self.pools.values()}
        self.events = Events(settings, clients, by_arn, self.metrics, self.health)
        self.intake = Intake(
            settings,
            clients,
            self.pools,
            self.layout,
            metrics=self.metrics,
            health=self.health,
            limiters=self.limiters,
            dead_letter_max_size=self.preflight.dead_letter_max_size,
            max_receive_counts=self.preflight.max_receive_counts,
        )
        # Wall-clock time like SQS's timestamps: a message first received before now may have
        # been started by a predecessor, under a name its configuration gave it.
        self.intake.starter.reign_began = self.wall()
        if lease is not None:
            self.intake.set_may_start(lease.valid)
            clients.start_gate.may_send = lease.valid  # checked again just before it leaves
        self.callbacks = Callbacks(settings, clients, self.metrics, self.pools, self.clock)
        self.callbacks.reign_began = self.intake.starter.reign_began
        self.intake.starter.callbacks = self.callbacks
        self.callbacks.starting = self.intake.starter.starting
        last_receives = self.intake.starter.last_receives
        self.callbacks.kept = lambda: [kept.entry for kept in last_receives]
        for pool in self.pools.values():
            pool.on_ended = self.callbacks.ended
        # Tokens first received before this may have had siblings no reign passed on.
        self.callbacks.unsure_before = self.intake.starter.reign_began
        if lease is not None:
            # The tokens a predecessor passed on are heartbeated from now; this reign's are
            # written into the lease items as they change, for its successor.
            self.callbacks.unsure_before = lease.unsure_before
            for arn, tokens in lease.handed.items():
                if arn in by_arn:
                    self.callbacks.adopt(by_arn[arn], tokens)
            lease.pass_on(self.callbacks.waiting_tokens)
        return self.intake, self.events

    async def _reign(
        self,
        clients: Clients,
        lease: Leases | None,
        task_status: TaskStatus[Dispatcher],
        predecessor_gone: float,
    ) -> None:
        """Govern the pools: start-up listing, then events, reconcile and intake, until a
        stop (ordered shutdown) or the loss of the lease.

        ``predecessor_gone`` is when the previous governor could send no more starts (this
        process's birth; the moment the lease was taken). Its last start takes effect within
        D of then, and shows in listings within the start grace after that: the start-up
        listing waits for both (the longer of this process's and the lease's record of the
        previous holder's), or it could miss executions and start too many.

        Losing the lease (or not renewing it in time) ends the reign at once: nothing more
        is received, no event consumed, what is held goes back to its queue, and the role,
        ledger, metrics and `/status` say standby (`_abdicate`).
        """
        intake, events = self._build(clients, lease)
        over = anyio.Event()
        intake_done = anyio.Event()
        settle = self.settle_seconds()

        async def settle_and_list() -> None:
            await self._take_office(lease, predecessor_gone + settle)

        async def run_intake() -> None:
            try:
                await self.health.supervise("intake", intake.run)
            finally:
                intake_done.set()

        async def stop_requested() -> None:
            await self._stop.wait()
            over.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_requested)
            if lease is not None:
                tg.start_soon(self._keep_lease, lease, over)  # kept while settling, too
            if await _unless(over, settle_and_list):
                self._ready(lease)
                loops: anyio.CancelScope = await tg.start(self._run_loops, events)
                tg.start_soon(run_intake)
                self.started.set()
                self._report_started(task_status)
                await over.wait()
                if not self._stop.is_set():
                    # Not the leader any more: the status events are the new leader's.
                    self._step_down()
                    loops.cancel()
                    intake.keep_settling = True  # settled after the reign (`_abdicate`)
                # Ordered: stop intake, drain starts in flight (bounded), then the rest.
                log.info("dispatcher.stopping", in_flight=len(intake.stats.in_flight))
                self.health.stopping = True
                self.health.refresh()
                intake.stop()
                await intake_done.wait()
            tg.cancel_scope.cancel()
        self._step_down()
        if lease is not None and (intake.keep_settling or not self._stop.is_set()):
            # The lease was lost (a stop may have come since, while intake drained; or it
            # was lost before the reign governed): the ledger is forgotten, and what intake
            # keeps on its last receive is settled on (`_abdicate`), not dropped unlogged.
            await self._abdicate(intake)
        elif self.callbacks is not None and not intake.starter.force:
            # Tokens held go back to the queue at once, each after a last heartbeat: the
            # successor takes them over without waiting for their visibility to run out.
            with anyio.CancelScope(shield=True), anyio.move_on_after(15):
                await self.callbacks.hand_back()
        if lease is not None:
            # Shutdown: a successor need not wait for the TTL. Lost: give back what is
            # still ours (another lease of ours may be valid yet).
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                try:
                    await lease.release()
                except AWS_ERRORS as exc:  # it lapses on its own within the TTL
                    log.warning("dispatcher.lease_release_failed", error=str(exc))
            lease.pass_on(None)  # a later reign writes its own

    async def _take_office(self, lease: Leases | None, listing_at: float) -> None:
        """Before the first start: wait until the predecessor's starts show in listings,
        list, then read everything that sets the limits afresh (the file and the
        parameters)."""
        await anyio.sleep(max(0.0, listing_at - self.clock()))
        await self._startup_listing()
        if self.limits is not None:
            # A standby read them when it started, maybe hours ago: the file may have
            # changed since (and been reloaded by the previous leader only), and the listing
            # may have taken long.
            if self.settings.config is not None and lease is not None:
                self.reload(why="taking over")
                if self.limits.structure_changed:
                    # Governing under the file this process started with would count,
                    # name or limit by rules the operator has replaced (a limit moved to a
                    # parameter that is then lowered, a key attribute turned on): hand the
                    # lease on and exit, so that a process started with the file leads.
                    self._restart_needed = list(self.limits.structure_changed)
                    log.error(
                        "dispatcher.restart_needed",
                        changes=self._restart_needed,
                        why="the config file changed the pools or queues, which a reload "
                        "cannot apply: not taking over, exiting to be restarted with it",
                    )
                    self.stop()
                    await anyio.sleep_forever()  # cancelled by the stop: no reign
            await self.limits.refresh_once()
        if lease is not None:
            lease.settled()  # the predecessor's starts are all in the listing now

    async def _run_loops(
        self, events: Events, *, task_status: TaskStatus[anyio.CancelScope]
    ) -> None:
        """Events, callbacks, reconcile and live limits, under a scope of their own (given to
        the caller: the loss of the lease cancels them at once, before intake stops)."""
        with anyio.CancelScope() as scope:
            task_status.started(scope)
            async with anyio.create_task_group() as loops:
                loops.start_soon(self.health.supervise, "events", events.run)
                if self.callbacks is not None:
                    loops.start_soon(self.health.supervise, "callbacks", self.callbacks.run)
                for name, reconciler in self.reconcilers.items():
                    loop = "reconcile" if len(self.reconcilers) == 1 else f"reconcile:{name}"
                    loops.start_soon(self.health.supervise, loop, reconciler.run)
                limits = self.limits
                if limits is not None and (limits.parameters or limits.shared_parameters):
                    loops.start_soon(self.health.supervise, "limits", limits.run)

    def _step_down(self) -> None:
        """Report not governing: role, leader gauge, readiness."""
        if self.role in ("leader", "starting") and self.lease is not None:
            self.role = "standby"
        self.metrics.leader.set(0)
        self.health.started_up = False
        self.health.refresh()

    def _settle_later(self, last_receives: LastReceives, ended: float) -> None:
        """The lease was lost (at ``ended``) with requests kept on their last receive:
        counted as being settled at once (a stop that comes before `_settle_left` begins
        waits for them too), none on a "does not exist" before D + grace after ``ended``
        (`LastReceives.reign_over`)."""
        last_receives.reign_over(ended)
        if not self._settling:
            self._all_settled = anyio.Event()
        self._settling.append(last_receives)

    async def _settle_left(self, last_receives: LastReceives) -> None:
        """The lease was lost with requests kept on their last receive (see
        `dispatcher.daemon.lastreceive`, and `_settle_later` first): the process goes on, so
        they are kept hidden and settled to the end, each once a describe shows whether its
        execution exists - not let go at a deadline, for SQS's redrive policy to move
        without a reason. Only an exit lets them go (logged), after `_finish_settling`."""
        log.info("dispatcher.settling_after_reign", count=len(last_receives))
        try:
            await last_receives.finish()
        except Exception:  # a defect here must not take the process (and a reign) down
            log.exception("dispatcher.loop_died", loop="settling_after_reign")
            self.health.loops["settling_after_reign"] = False
            self.health.refresh()
        finally:
            self._settling.remove(last_receives)
            if not self._settling and self._all_settled is not None:
                self._all_settled.set()

    async def _finish_settling(self) -> None:
        """Stopping while requests kept by a reign that ended are still being settled
        (`_settle_left`): they get what a stop gives the requests a reign keeps (D + grace
        + 5 s, docs/operations.md "Shutdown"), not cancelled at once to be let go, hidden,
        for the redrive policy to move without a reason. A second signal cuts it short."""
        if not self._settling or self._all_settled is None:
            return
        # Counted from the stop: they were settled in the background through its other
        # steps (the shutdown's table), so this adds to none of them.
        now = self.clock()
        began = now if self._stop_began is None else self._stop_began
        left = began + self.settings.start_timeout + self.settings.start_grace + 5 - now
        log.info("dispatcher.settling_before_exit", count=sum(map(len, self._settling)))
        with anyio.move_on_after(max(0.0, left)):
            await self._all_settled.wait()

    async def _abdicate(self, intake: Intake) -> None:
        """After the lease was lost and intake stopped: hand back the requests whose parents
        wait (task tokens held) and forget the ledger, so that `/status`, the metrics and
        the control CLI report nothing running here (the new leader counts them). Requests
        kept on their last receive are settled on (`_settle_left`) - begun first: intake
        no longer extends their visibility, and the hand-back may take its 15 s."""
        ended = self.clock() if self._lease_lost_at is None else self._lease_lost_at
        for settling in self._settling:
            # Kept by an earlier reign, settled through this one: its `_may_run` reads this
            # reign's ledger, whose doubts the reset below takes (a start of another copy).
            settling.reign_over(ended)
        kept = intake.starter.last_receives
        settling_here = intake.keep_settling and len(kept) > 0
        if settling_here:
            self._settle_later(kept, ended)
            if self._background is not None:
                self._background.start_soon(self._settle_left, kept)
        if self.callbacks is not None and not intake.starter.force:
            with anyio.CancelScope(shield=True), anyio.move_on_after(15):
                await self.callbacks.hand_back()
        for pool in self.pools.values():
            pool.reset()
        log.info("dispatcher.abdicated", role=self.role)
        if settling_here and self._background is None:  # not under `run` (tests): bounded
            settle = self.settings.start_timeout + self.settings.start_grace + 5
            with anyio.CancelScope(shield=True), anyio.move_on_after(settle):
                await self._settle_left(kept)

    def settle_seconds(self) -> float:
        """How long after its predecessor could last send a start this process waits before
        it lists: D (the start lands within D of being sent, or never) plus the start grace
        (then the listing shows it). The bound docs/architecture.md states. After a take-over, the
        longer of this process's and the predecessor's, as the lease records them."""
        own = self.settings.start_timeout + self.settings.start_grace
        return own if self.lease is None else max(own, self.lease.owed)

    def _ready(self, lease: Leases | None) -> None:
        """The start-up listing is in: this process governs the pools now."""
        self.role = "single" if lease is None else "leader"
        self.metrics.leader.set(1)
        self.health.loops.clear()
        self.health.stopping = False
        self.health.started_up = True
        self.health.refresh()
        log.info(
            "dispatcher.ready",
            role=self.role,
            pools={name: pool.ledger.limit for name, pool in self.pools.items()},
            running=sum(pool.ledger.running_count for pool in self.pools.values()),
            http_port=self.http_port,
        )

    async def _keep_lease(self, lease: Leases, over: anyio.Event) -> None:
        """Renew well inside the TTL, each renewal under its own deadline (shorter than the
        lease, and never past it); end the reign once the lease is gone or lapses."""
        self._lease_lost_at = None
        retry = False
        while lease.valid():
            pause = min(1.0 if retry else lease.config.renew_every, lease.remaining())
            await anyio.sleep(max(0.0, pause))
            if not lease.valid():
                break
            deadline = max(0.0, min(lease.config.renew_timeout, lease.remaining()))
            retry = True
            with anyio.move_on_after(deadline) as renewal:
                try:
                    if not await lease.renew():
                        break  # someone else holds it
                    retry = False
                except AWS_ERRORS as exc:  # keep governing while the lease is still valid here
                    self.health.aws_failed("UpdateItem", exc)
                    log.warning("dispatcher.lease_renew_failed", error=str(exc))
            if renewal.cancelled_caught:
                log.warning("dispatcher.lease_renew_timed_out", after_seconds=round(deadline, 3))
        lease.lapse()  # one lost: none is trusted
        self._lease_lost_at = self.clock()  # no start leaves from here (`StartGate`)
        log.warning("dispatcher.reign_over", why="lease lost or lapsed", epoch=lease.epoch)
        self.role = "standby"
        over.set()

    def _report_started(self, task_status: TaskStatus[Dispatcher]) -> None:
        if not self._reported:
            self._reported = True
            task_status.started(self)

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        with anyio.move_on_after(seconds):
            await self._stop.wait()

    def summary(self) -> Summary:
        """Counters for the exit line."""
        stats = self.intake.stats if self.intake else None
        return Summary(
            started=stats.started if stats else 0,
            duplicates=stats.duplicates if stats else 0,
            dead_lettered=stats.dead_lettered if stats else 0,
            handed_back=stats.handed_back if stats else 0,
            events_applied=self.events.applied if self.events else 0,
            reconcile_passes=sum(r.passes for r in self.reconcilers.values()),
            max_running=max(pool.max_running_seen for pool in self.pools.values()),
            uptime_seconds=round(time.monotonic() - self._began, 3),
        )

    async def _startup_listing(self) -> None:
        """Rebuild the running sets from ListExecutions before anything is started."""
        for name, reconciler in self.reconcilers.items():
            async for attempt in stamina.retry_context(
                on=is_retryable, attempts=None, timeout=60.0
            ):
                with attempt:
                    report = await reconciler.run_once(estimate_backlog=False)
            log.info(
                "dispatcher.startup_listing",
                pool=name,
                running=report.listed,
                adopted=report.adopted,
            )

    @property
    def lease_keys(self) -> list[str]:
        """The leases this process must hold to lead: one per governed state machine (its
        ARN), whatever its pools, queues or settings (invariant 8)."""
        return sorted({pool.state_machine_arn for pool in self.pools.values()})

    def reload(self, why: str = "SIGHUP") -> bool:
        """Re-read the config file (what SIGHUP does); returns whether it was applied.

        A SIGHUP during start-up (before the limits are set up) is kept, not dropped: the
        file is re-read as soon as they are, before anything is started."""
        if self.limits is None:
            self._reload_pending = True
            log.info("dispatcher.reload_deferred", why="still starting up")
            return False
        self._reload_pending = False
        applied = self.limits.reload(why=why)
        if applied:
            self.layout = self.limits.layout
            self.settings = self.limits.settings  # with the settings applied live
            for reconciler in self.reconcilers.values():
                reconciler.settings = self.settings
        return applied

    async def _watch_signals(self, scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.info("dispatcher.signal", signal="SIGHUP")
                    self.reload()
                    continue
                self._signals += 1
                if self._signals == 1:
                    log.info("dispatcher.signal", signal=signal.Signals(signum).name)
                    self.stop()
                else:
                    log.warning("dispatcher.forced_exit", signal=signal.Signals(signum).name)
                    self._force_stop(scope)
                    return

    def _force_stop(self, scope: anyio.CancelScope) -> None:
        """A second signal: abandon everything now (``scope``: `run`'s), the deletes an
        ended reign's settling goes on with through a stop too."""
        if self.intake is not None:
            self.intake.stop(force=True)
        for settling in self._settling:
            settling.starter.dead_letters.abandon()
        scope.cancel()


async def _unless(event: anyio.Event, work: Callable[[], Any]) -> bool:
    """Run ``work()`` unless ``event`` is set first (then cancel it); return whether it ran
    to the end."""
    done = False
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            await event.wait()
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        await work()
        done = True
        tg.cancel_scope.cancel()
    return done
