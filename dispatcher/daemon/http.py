"""/metrics, /healthz, /readyz and /status, served by aiohttp on the dispatcher's own loop."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

import anyio
from aiohttp import web
from anyio.abc import TaskStatus
from prometheus_client.exposition import choose_encoder

from dispatcher.daemon.health import Health
from dispatcher.daemon.metrics import Metrics
from dispatcher.errors import UserError
from dispatcher.settings.config import env_name

StatusFn = Callable[[], dict[str, Any]]


def build_app(health: Health, metrics: Metrics, status: StatusFn) -> web.Application:
    """The HTTP application; separate from serving so tests can drive it directly."""

    async def metrics_view(request: web.Request) -> web.Response:
        health.refresh()
        # prometheus_client's own negotiation: OpenMetrics for a scraper that asks for it
        # (Prometheus does), the text format otherwise, each with its matching header.
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(metrics.registry), headers={"Content-Type": content_type})

    async def healthz(_: web.Request) -> web.Response:
        dead = sorted(name for name, alive in health.loops.items() if not alive)
        code = 200 if not dead else 503
        return web.json_response({"live": not dead, "dead_loops": dead}, status=code)

    async def readyz(_: web.Request) -> web.Response:
        health.refresh()
        body = {
            "ready": health.ready,
            "started_up": health.started_up,
            "stopping": health.stopping,
            "aws_failures": health.aws_failures,
            "last_aws_error": health.last_aws_error,
        }
        return web.json_response(body, status=200 if health.ready else 503)

    async def status_view(_: web.Request) -> web.Response:
        return web.json_response(status())

    app = web.Application()
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status_view)
    return app


async def serve(
    app: web.Application,
    host: str,
    port: int,
    *,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until cancelled; reports the bound port (useful with port 0)."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        hint = "is in use" if exc.errno == errno.EADDRINUSE else f"is unavailable ({exc.strerror})"
        raise UserError(
            f"HTTP port {host}:{port} {hint}; set {env_name('http_port')} to a free port"
        ) from None
    bound = runner.addresses[0][1] if runner.addresses else port
    task_status.started(int(bound))
    try:
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            await runner.cleanup()
