"""The HTTP endpoints, driven through aiohttp's own test server and client on loopback."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from dispatcher.daemon.health import AWS_FAILURES_BEFORE_UNREADY, Health
from dispatcher.daemon.http import build_app, serve
from dispatcher.errors import UserError
from tests.fakes import World, build_world

pytestmark = pytest.mark.timeout(10)


@asynccontextmanager
async def client_for(
    world: World, status: Callable[[], dict[str, Any]] | None = None
) -> AsyncIterator[TestClient[Any, Any]]:
    """A client talking to the app over a real socket on 127.0.0.1."""
    app = build_app(world.health, world.metrics, status or dict)
    async with TestClient(TestServer(app, host="127.0.0.1", port=0)) as client:
        yield client


async def test_readyz_is_503_until_the_startup_listing_is_done() -> None:
    world = build_world()
    async with client_for(world) as client:
        response = await client.get("/readyz")
        assert response.status == 503
        body = await response.json()
        assert body["ready"] is False
        assert body["started_up"] is False
        assert world.sample("dispatcher_ready") == 0
        world.health.started_up = True
        response = await client.get("/readyz")
        assert response.status == 200
        assert (await response.json())["ready"] is True
        assert world.sample("dispatcher_ready") == 1


async def test_readyz_is_503_while_stopping_or_aws_keeps_failing() -> None:
    world = build_world()
    world.health.started_up = True
    async with client_for(world) as client:
        world.health.stopping = True
        assert (await client.get("/readyz")).status == 503
        world.health.stopping = False
        for _ in range(AWS_FAILURES_BEFORE_UNREADY):
            world.health.aws_failed("StartExecution", RuntimeError("throttled"))
        response = await client.get("/readyz")
        assert response.status == 503
        assert "StartExecution" in (await response.json())["last_aws_error"]
        world.health.aws_ok()
        assert (await client.get("/readyz")).status == 200


async def test_healthz_is_503_once_a_loop_died() -> None:
    world = build_world()
    world.health.started_up = True

    async def healthy() -> None:
        await anyio.sleep_forever()

    async def dying() -> None:
        raise RuntimeError("boom")

    async with client_for(world) as client, anyio.create_task_group() as tg:
        tg.start_soon(world.health.supervise, "reconcile", healthy)
        await anyio.wait_all_tasks_blocked()
        response = await client.get("/healthz")
        assert response.status == 200
        assert await response.json() == {"live": True, "dead_loops": []}
        await world.health.supervise("events", dying)  # returns: the loop died
        response = await client.get("/healthz")
        assert response.status == 503
        assert await response.json() == {"live": False, "dead_loops": ["events"]}
        assert (await client.get("/readyz")).status == 503
        tg.cancel_scope.cancel()


async def test_a_loop_that_returns_while_not_stopping_is_dead() -> None:
    health = Health(build_world().metrics)

    async def returns() -> None:
        return

    await health.supervise("intake", returns)
    assert health.loops == {"intake": False}
    health.stopping = True
    await health.supervise("events", returns)
    assert health.loops["events"] is True


# What Prometheus 2.x and 3.x send when they scrape.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


async def test_metrics_use_the_text_format_by_default() -> None:
    world = build_world(limit=3)
    world.pool.ledger.observe_running("arn:x", world.clock())
    world.pool.update()
    async with client_for(world) as client:
        response = await client.get("/metrics")
        assert response.status == 200
        # The body is the 0.0.4 text format: the header says so (it said version=1.0.0).
        assert response.headers["Content-Type"] == CONTENT_TYPE_PLAIN_0_0_4
        text = await response.text()
    assert 'dispatcher_running{pool="default"} 1.0' in text
    assert 'dispatcher_limit{pool="default"} 3.0' in text
    assert "dispatcher_ready 0.0" in text
    assert "# TYPE dispatcher_starts_total counter" in text


async def test_metrics_negotiate_openmetrics_for_prometheus() -> None:
    world = build_world(limit=3)
    async with client_for(world) as client:
        response = await client.get("/metrics", headers={"Accept": PROMETHEUS_ACCEPT})
        assert response.status == 200
        assert response.headers["Content-Type"].startswith(
            "application/openmetrics-text; version=1.0.0"
        )
        text = await response.text()
    assert text.endswith("# EOF\n")
    assert "# TYPE dispatcher_starts counter" in text
    assert 'dispatcher_limit{pool="default"} 3.0' in text


async def test_metrics_export_process_and_python_but_no_created_series() -> None:
    world = build_world()
    async with client_for(world) as client:
        text = await (await client.get("/metrics")).text()
        openmetrics = await (
            await client.get("/metrics", headers={"Accept": PROMETHEUS_ACCEPT})
        ).text()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
    assert "process_cpu_seconds_total" in names
    assert "process_resident_memory_bytes" in names
    assert "python_info" in names
    assert "python_gc_collections_total" in names
    assert "dispatcher_starts_total" in names
    for exposition in (text, openmetrics):
        assert "_created" not in exposition


async def test_status_returns_the_status_document() -> None:
    world = build_world()
    document = {"pool": "default", "running": 2, "intake": {"received": 5}}
    async with client_for(world, lambda: document) as client:
        response = await client.get("/status")
        assert response.status == 200
        assert response.content_type == "application/json"
        assert await response.json() == document
        assert (await client.get("/nothing-here")).status == 404


async def test_serve_reports_the_port_it_bound() -> None:
    world = build_world()
    app = build_app(world.health, world.metrics, dict)
    async with anyio.create_task_group() as tg:
        port = await tg.start(serve, app, "127.0.0.1", 0)
        assert isinstance(port, int)
        assert port > 0
        stream = await anyio.connect_tcp("127.0.0.1", port)
        await stream.aclose()
        tg.cancel_scope.cancel()


async def test_serve_on_a_port_in_use_is_a_user_error() -> None:
    world = build_world()
    app = build_app(world.health, world.metrics, dict)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with anyio.create_task_group() as tg:
            with pytest.raises(UserError, match=f"127.0.0.1:{port} is in use.*HTTP_PORT"):
                await tg.start(serve, app, "127.0.0.1", port)
