"""The service: preflight, start-up listing, then intake, events, reconcile and HTTP in one
task group, with an ordered, bounded shutdown on SIGTERM/SIGINT (a second signal: at once).
"""

from __future__ import annotations

import signal
import time
from dataclasses import asdict, dataclass
from typing import Any

import anyio
import stamina
import structlog
from anyio.abc import TaskStatus

from dispatcher.aws import AWS_ERRORS, Clients, is_retryable, open_clients
from dispatcher.config import Settings
from dispatcher.events import Events
from dispatcher.health import Health
from dispatcher.http import build_app, serve
from dispatcher.intake import Intake
from dispatcher.lease import Lease, LeaseConfig
from dispatcher.ledger import Ledger
from dispatcher.metrics import Metrics
from dispatcher.pool import Clock, Pool
from dispatcher.reconcile import Reconciler
from dispatcher.startup import preflight

log = structlog.get_logger("dispatcher.service")

DEFAULT_POOL = "default"


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
    """One dispatcher process governing one pool."""

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics | None = None,
        clock: Clock = time.monotonic,
        endpoint_url: str | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else Metrics()
        self.health = Health(self.metrics)
        self.health.refresh()
        self.clock = clock
        self.endpoint_url = endpoint_url
        self.pool = Pool(
            DEFAULT_POOL,
            settings.state_machine_arn,
            Ledger(settings.limit),
            self.metrics,
            clock,
        )
        self.http_port: int | None = None
        self.intake: Intake | None = None
        self.events: Events | None = None
        self.reconciler: Reconciler | None = None
        self.serving = anyio.Event()  # HTTP endpoints answer (start-up may still run)
        self.started = anyio.Event()  # start-up listing done: ready
        self._stop = anyio.Event()
        self._reported = False
        self.role = "starting"  # single | leader | standby
        self.lease: Lease | None = None
        self._signals = 0
        self._began = time.monotonic()

    # -- control -----------------------------------------------------------------------

    def stop(self) -> None:
        """Begin the ordered shutdown (what SIGTERM does)."""
        self._stop.set()

    def status(self) -> dict[str, Any]:
        """The `/status` document."""
        ledger = self.pool.ledger
        return {
            "pool": self.pool.name,
            "role": self.role,
            "lease": None
            if self.lease is None
            else {
                "owner": self.lease.owner,
                "epoch": self.lease.epoch,
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
            open_clients(
                self.metrics,
                region=settings.region,
                long_poll_seconds=settings.receive_wait_seconds,
                endpoint_url=self.endpoint_url,
                dynamodb=settings.lease_table is not None,
            ) as clients,
            anyio.create_task_group() as tg,
        ):
            app = build_app(self.health, self.metrics, self.status)
            self.http_port = await tg.start(serve, app, settings.http_host, settings.http_port)
            self.serving.set()
            if handle_signals:
                tg.start_soon(self._watch_signals, tg.cancel_scope)
            await preflight(settings, clients)
            if settings.lease_table is None:
                await self._reign(clients, None, task_status)
            else:
                await self._standby(clients, task_status)
            tg.cancel_scope.cancel()
        summary = self.summary()
        log.info("dispatcher.stopped", **asdict(summary))
        return summary

    async def _standby(self, clients: Clients, task_status: TaskStatus[Dispatcher]) -> None:
        """Try for the lease until stopped; govern the pool whenever it is ours."""
        assert clients.dynamodb is not None  # noqa: S101 - opened when a table is set
        assert self.settings.lease_table is not None  # noqa: S101
        ttl = self.settings.lease_ttl
        self.lease = Lease(
            clients.dynamodb,
            LeaseConfig(self.settings.lease_table, self.pool.state_machine_arn, ttl, ttl / 5),
        )
        while not self._stop.is_set():
            try:
                acquired = await self.lease.try_acquire()
            except AWS_ERRORS as exc:
                self.health.aws_failed("UpdateItem", exc)
                log.warning("dispatcher.lease_unavailable", error=str(exc))
                acquired = False
            if acquired:
                self.metrics.lease_epoch.set(self.lease.epoch)
                # Let starts the previous holder still had in flight land before listing.
                await self._sleep_unless_stopped(self.lease.config.margin)
                if not self._stop.is_set():
                    await self._reign(clients, self.lease, task_status)
                continue
            self.role = "standby"
            self._report_started(task_status)
            await self._sleep_unless_stopped(self.lease.config.renew_every)

    async def _reign(
        self, clients: Clients, lease: Lease | None, task_status: TaskStatus[Dispatcher]
    ) -> None:
        """Govern the pool: start-up listing, then events, reconcile and intake, until a stop
        (ordered shutdown) or the loss of the lease (intake stops at once)."""
        settings = self.settings
        self.pool.ledger = Ledger(settings.limit)  # each reign starts from the listing
        self.pool.update()
        self.reconciler = Reconciler(settings, clients, self.pool, self.metrics, self.health)
        self.events = Events(
            settings, clients, {self.pool.state_machine_arn: self.pool}, self.metrics, self.health
        )
        self.intake = intake = Intake(settings, clients, self.pool, self.metrics, self.health)
        if lease is not None:
            intake.may_start = lease.valid
        await self._startup_listing()
        self.role = "single" if lease is None else "leader"
        self.metrics.leader.set(1)
        self.health.loops.clear()
        self.health.stopping = False
        self.health.started_up = True
        self.health.refresh()
        log.info(
            "dispatcher.ready",
            role=self.role,
            limit=self.pool.ledger.limit,
            running=self.pool.ledger.running_count,
            http_port=self.http_port,
        )
        over = anyio.Event()
        intake_done = anyio.Event()

        async def run_intake() -> None:
            try:
                await self.health.supervise("intake", intake.run)
            finally:
                intake_done.set()

        async def stop_requested() -> None:
            await self._stop.wait()
            over.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(self.health.supervise, "events", self.events.run)
            tg.start_soon(self.health.supervise, "reconcile", self.reconciler.run)
            tg.start_soon(run_intake)
            tg.start_soon(stop_requested)
            if lease is not None:
                tg.start_soon(self._keep_lease, lease, over)
            self.started.set()
            self._report_started(task_status)
            await over.wait()
            # Ordered: stop intake, drain starts in flight (bounded), then the rest.
            log.info("dispatcher.stopping", in_flight=len(intake.stats.in_flight))
            self.health.stopping = True
            self.health.refresh()
            intake.stop()
            await intake_done.wait()
            tg.cancel_scope.cancel()
        self.metrics.leader.set(0)
        self.health.started_up = False
        self.health.refresh()
        if lease is not None and self._stop.is_set():
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await lease.release()

    async def _keep_lease(self, lease: Lease, over: anyio.Event) -> None:
        """Renew well inside the TTL; end the reign once the lease is gone or lapses."""
        while lease.valid():
            await anyio.sleep(max(0.0, min(lease.config.renew_every, lease.remaining())))
            try:
                await lease.renew()
            except AWS_ERRORS as exc:  # keep governing while the lease is still valid here
                self.health.aws_failed("UpdateItem", exc)
                log.warning("dispatcher.lease_renew_failed", error=str(exc))
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
            reconcile_passes=self.reconciler.passes if self.reconciler else 0,
            max_running=self.pool.max_running_seen,
            uptime_seconds=round(time.monotonic() - self._began, 3),
        )

    async def _startup_listing(self) -> None:
        """Rebuild the running set from ListExecutions before anything is started."""
        assert self.reconciler is not None  # noqa: S101
        async for attempt in stamina.retry_context(on=is_retryable, attempts=None, timeout=60.0):
            with attempt:
                report = await self.reconciler.run_once()
        log.info("dispatcher.startup_listing", running=report.listed, adopted=report.adopted)

    async def _watch_signals(self, scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                self._signals += 1
                if self._signals == 1:
                    log.info("dispatcher.signal", signal=signal.Signals(signum).name)
                    self.stop()
                else:
                    log.warning("dispatcher.forced_exit", signal=signal.Signals(signum).name)
                    if self.intake is not None:
                        self.intake.stop(force=True)
                    scope.cancel()
                    return
