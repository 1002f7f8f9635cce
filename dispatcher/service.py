"""The service: preflight, start-up listing, then intake, events, reconcile and HTTP in one
task group, with an ordered, bounded shutdown on SIGTERM/SIGINT (a second signal: at once).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import asdict, dataclass
from typing import Any

import anyio
import stamina
import structlog
from anyio.abc import TaskStatus
from botocore.exceptions import BotoCoreError, ClientError

from dispatcher.aws import Clients, error_code, is_retryable, open_clients
from dispatcher.config import Settings
from dispatcher.errors import UserError
from dispatcher.events import Events
from dispatcher.health import Health
from dispatcher.http import build_app, serve
from dispatcher.intake import Intake
from dispatcher.ledger import Ledger
from dispatcher.metrics import Metrics
from dispatcher.pool import Clock, Pool
from dispatcher.reconcile import Reconciler

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
            "state_machine_arn": self.pool.state_machine_arn,
            "limit": ledger.limit,
            "running": ledger.running_count,
            "starting": self.pool.starting,
            "receiving": self.pool.receiving,
            "free": ledger.free,
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
        """Run until `stop` (or a signal); return the summary. Raises UserError on bad setup."""
        settings = self.settings
        async with (
            open_clients(
                self.metrics,
                region=settings.region,
                long_poll_seconds=settings.receive_wait_seconds,
                endpoint_url=self.endpoint_url,
            ) as clients,
            anyio.create_task_group() as tg,
        ):
            app = build_app(self.health, self.metrics, self.status)
            self.http_port = await tg.start(serve, app, settings.http_host, settings.http_port)
            self.serving.set()
            if handle_signals:
                tg.start_soon(self._watch_signals, tg.cancel_scope)
            await preflight(settings, clients)
            self.reconciler = Reconciler(settings, clients, self.pool, self.metrics, self.health)
            self.events = Events(
                settings,
                clients,
                {self.pool.state_machine_arn: self.pool},
                self.metrics,
                self.health,
            )
            self.intake = Intake(settings, clients, self.pool, self.metrics, self.health)
            await self._startup_listing()
            self.health.started_up = True
            self.health.refresh()
            log.info(
                "dispatcher.ready",
                limit=self.pool.ledger.limit,
                running=self.pool.ledger.running_count,
                http_port=self.http_port,
            )
            intake_done = anyio.Event()

            async def run_intake() -> None:
                assert self.intake is not None  # noqa: S101 - set just above
                try:
                    await self.health.supervise("intake", self.intake.run)
                finally:
                    intake_done.set()

            tg.start_soon(self.health.supervise, "events", self.events.run)
            tg.start_soon(self.health.supervise, "reconcile", self.reconciler.run)
            tg.start_soon(run_intake)
            self.started.set()
            task_status.started(self)
            await self._stop.wait()
            # Ordered shutdown: stop intake, drain starts in flight (bounded), then the rest.
            log.info("dispatcher.stopping", in_flight=len(self.intake.stats.in_flight))
            self.health.stopping = True
            self.health.refresh()
            self.intake.stop()
            await intake_done.wait()
            tg.cancel_scope.cancel()
        summary = self.summary()
        log.info("dispatcher.stopped", **asdict(summary))
        return summary

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


async def preflight(settings: Settings, clients: Clients) -> None:
    """Check the state machine and queues exist and fit; raise UserError naming the fix."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "the AWS endpoint")
    try:
        described = await clients.sfn.describe_state_machine(
            stateMachineArn=settings.state_machine_arn
        )
    except ClientError as exc:
        raise UserError(
            f"cannot use state machine {settings.state_machine_arn} "
            f"(DISPATCHER_STATE_MACHINE_ARN): {error_code(exc)}: {exc}; check the ARN, "
            "its region and states:DescribeStateMachine permission"
        ) from None
    except BotoCoreError as exc:
        raise UserError(
            f"cannot reach Step Functions at {endpoint}: {exc}; check AWS_ENDPOINT_URL, "
            "the network and credentials"
        ) from None
    if described.get("type") != "STANDARD":
        raise UserError(
            f"state machine {settings.state_machine_arn} is {described.get('type')}; only "
            "STANDARD state machines can be governed: EXPRESS executions have no idempotent "
            "names, send no status-change events and are not listed by ListExecutions"
        )
    queues = {
        "DISPATCHER_REQUEST_QUEUE_URL": settings.request_queue_url,
        "DISPATCHER_EVENTS_QUEUE_URL": settings.events_queue_url,
    }
    if settings.dead_letter_queue_url:
        queues["DISPATCHER_DEAD_LETTER_QUEUE_URL"] = settings.dead_letter_queue_url
    attributes: dict[str, dict[str, str]] = {}
    for variable, url in queues.items():
        try:
            response = await clients.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])
        except (ClientError, BotoCoreError) as exc:
            raise UserError(
                f"cannot use queue {url} ({variable}): {exc}; check the URL and "
                "sqs:GetQueueAttributes permission"
            ) from None
        attributes[variable] = {str(k): v for k, v in response.get("Attributes", {}).items()}
    if not settings.dead_letter_queue_url and not attributes["DISPATCHER_REQUEST_QUEUE_URL"].get(
        "RedrivePolicy"
    ):
        raise UserError(
            "bad requests would have nowhere to go: set DISPATCHER_DEAD_LETTER_QUEUE_URL, or "
            "give the request queue a redrive policy (maxReceiveCount) to a dead-letter queue"
        )
