"""Liveness and readiness, as the HTTP endpoints and the ``ready`` gauge report them."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from dispatcher.daemon.metrics import Metrics

log = structlog.get_logger("dispatcher.health")

# Consecutive failed AWS calls after which the dispatcher reports itself not ready.
AWS_FAILURES_BEFORE_UNREADY = 3


@dataclass
class Health:
    """What `/healthz` and `/readyz` answer from."""

    metrics: Metrics
    started_up: bool = False
    stopping: bool = False
    loops: dict[str, bool] = field(default_factory=dict)  # name -> alive
    aws_failures: int = 0
    last_aws_error: str | None = None
    last_event_at: float | None = None  # Unix seconds
    last_reconcile_at: float | None = None  # Unix seconds

    @property
    def live(self) -> bool:
        """All loops that were started are still running."""
        return all(self.loops.values())

    @property
    def ready(self) -> bool:
        """Start-up listing done, not stopping, loops alive, and AWS answering."""
        return (
            self.started_up
            and not self.stopping
            and self.live
            and self.aws_failures < AWS_FAILURES_BEFORE_UNREADY
        )

    def refresh(self) -> None:
        """Publish readiness as the ``dispatcher_ready`` gauge."""
        self.metrics.ready.set(1 if self.ready else 0)

    def aws_ok(self) -> None:
        """An AWS call answered."""
        if self.aws_failures:
            self.aws_failures = 0
            self.refresh()

    def aws_failed(self, operation: str, exc: BaseException) -> None:
        """An AWS call failed after botocore's own retries."""
        self.aws_failures += 1
        self.last_aws_error = f"{operation}: {exc}"
        self.refresh()

    async def supervise(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run one loop; if it dies, log why and report not live (the orchestrator restarts us).

        The process stays up so operators can still read /status and /metrics.
        """
        self.loops[name] = True
        try:
            await loop()
        except Exception:
            log.exception("dispatcher.loop_died", loop=name)
            self.loops[name] = False
            self.refresh()
            return
        if not self.stopping:
            log.error("dispatcher.loop_exited", loop=name)
            self.loops[name] = False
            self.refresh()

    def mark_event(self) -> None:
        """A status-change event was applied."""
        self.last_event_at = time.time()
