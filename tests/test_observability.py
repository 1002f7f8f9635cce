"""Metrics and health of a live dispatcher, checked with the operators' own tools.

promtool lints the live exposition, a real Prometheus server scrapes it, the Grafana
dashboard's expressions are checked against the names the dispatcher really exports,
and /readyz and /healthz are watched through start-up and a dying loop.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from dispatcher.sandbox.provision import SandboxResources
from dispatcher.service import Dispatcher
from dispatcher.testing.faults import FaultKind, FaultProxy, FaultRule
from tests.audit import send_requests, session, wait_for
from tests.runner import running, settings_for

Factory = Callable[..., Awaitable[SandboxResources]]
ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "sfn-dispatcher.json"
METRIC_RE = re.compile(r"\bdispatcher_[a-z0-9_]+")


async def get(port: int, path: str) -> tuple[int, str]:
    """GET a path of the dispatcher's HTTP port."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}{path}") as response,
    ):
        return response.status, await response.text()


async def busy_dispatcher_metrics(resources: SandboxResources) -> str:
    """Run a small workload with one bad request and one foreign execution; return /metrics."""
    async with (
        session().client("sqs", endpoint_url=resources.endpoint) as sqs,
        session().client("stepfunctions", endpoint_url=resources.endpoint) as sfn,
    ):
        await sfn.start_execution(
            stateMachineArn=resources.state_machine_arn,
            name="foreign-1",
            input=json.dumps({"seconds": 0.5}),
        )
        bodies: list[dict[str, Any] | str] = [{"seconds": 0.1}] * 6 + ["not json"]
        await send_requests(sqs, resources.request_queue_url, bodies)
        async with running(resources, limit=3) as dispatcher:
            assert dispatcher.http_port is not None

            async def settled() -> bool:
                intake = dispatcher.intake
                return (
                    intake is not None
                    and dispatcher.pool.finished_total >= 6
                    and intake.stats.dead_lettered == 1
                )

            await wait_for(settled, within=60, interval=0.05)
            status, text = await get(dispatcher.http_port, "/metrics")
            assert status == 200
            return text


def exported_names(exposition: str) -> set[str]:
    """Sample names present in an exposition."""
    return {
        line.split("{")[0].split(" ")[0]
        for line in exposition.splitlines()
        if line and not line.startswith("#")
    }


@pytest.mark.timeout(90)
async def test_live_metrics_pass_promtool_and_cover_the_dashboard(
    sandbox_factory: Factory,
) -> None:
    resources = await sandbox_factory(limit=3)
    text = await busy_dispatcher_metrics(resources)
    names = exported_names(text)
    for expected in (
        "dispatcher_running",
        "dispatcher_limit",
        "dispatcher_starting",
        "dispatcher_free_slots",
        "dispatcher_ready",
        "dispatcher_build_info",
        "dispatcher_starts_total",
        "dispatcher_dead_letters_total",
        "dispatcher_start_execution_seconds_bucket",
        "dispatcher_queue_wait_seconds_bucket",
        "dispatcher_events_total",
        "dispatcher_reconcile_runs_total",
        "dispatcher_reconcile_corrections_total",
        "dispatcher_aws_calls_total",
    ):
        assert expected in names, f"{expected} is exported"
    assert 'dispatcher_dead_letters_total{pool="default",reason="invalid_json"} 1.0' in text
    assert 'kind="adopted"' in text

    dashboard = DASHBOARD.read_text()
    used = set(METRIC_RE.findall(dashboard))
    assert used, "the dashboard queries dispatcher metrics"
    missing = sorted(name for name in used if name not in names)
    assert not missing, f"dashboard uses metrics the dispatcher does not export: {missing}"

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package 'prometheus'; .ci/run installs it)")
    checked = await anyio.run_process(
        [promtool, "check", "metrics"], input=text.encode(), check=False
    )
    assert checked.returncode == 0, (checked.stdout + checked.stderr).decode()


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.timeout(90)
async def test_prometheus_scrapes_the_running_dispatcher(
    sandbox_factory: Factory, tmp_path: Path
) -> None:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus not installed (Debian package 'prometheus'; .ci/run installs it)")
    resources = await sandbox_factory(limit=4)
    async with running(resources, limit=4) as dispatcher:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: sfn-dispatcher\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{dispatcher.http_port}']}}]\n"
        )
        port = free_port()
        process = await anyio.open_process(
            [
                prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            found: dict[str, Any] = {}

            async def scraped() -> bool:
                try:
                    async with (
                        aiohttp.ClientSession() as http,
                        http.get(
                            f"http://127.0.0.1:{port}/api/v1/query",
                            params={"query": "dispatcher_limit"},
                        ) as response,
                    ):
                        body = await response.json()
                except aiohttp.ClientError:
                    return False
                results = body.get("data", {}).get("result", [])
                if results:
                    found.update(results[0])
                return bool(results)

            await wait_for(scraped, within=60, interval=0.25)
            assert found["metric"]["pool"] == "default"
            assert float(found["value"][1]) == 4.0
            async with (
                aiohttp.ClientSession() as http,
                http.get(
                    f"http://127.0.0.1:{port}/api/v1/query", params={"query": "dispatcher_running"}
                ) as response,
            ):
                body = await response.json()
            assert body["data"]["result"], "dispatcher_running is read back through Prometheus"
        finally:
            process.terminate()
            with anyio.CancelScope(shield=True):
                await process.wait()


@pytest.mark.timeout(60)
async def test_readyz_waits_for_the_startup_listing(sandbox_factory: Factory) -> None:
    resources = await sandbox_factory(limit=2)
    async with FaultProxy(resources.endpoint) as proxy:
        gate = proxy.add(FaultRule("ListExecutions", FaultKind.LATENCY, delay=3.0, max_count=1))
        dispatcher = Dispatcher(settings_for(resources), endpoint_url=proxy.url)
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(dispatcher.run, handle_signals=False))
            with anyio.fail_after(20):
                await dispatcher.serving.wait()
            assert dispatcher.http_port is not None
            status, body = await get(dispatcher.http_port, "/readyz")
            assert status == 503, body
            assert json.loads(body)["started_up"] is False
            assert not dispatcher.started.is_set()
            with anyio.fail_after(20):
                await dispatcher.started.wait()
            assert gate.fired == 1
            status, body = await get(dispatcher.http_port, "/readyz")
            assert status == 200, body
            status, _ = await get(dispatcher.http_port, "/healthz")
            assert status == 200
            dispatcher.stop()


@pytest.mark.timeout(60)
async def test_healthz_fails_when_a_loop_dies(sandbox_factory: Factory) -> None:
    resources = await sandbox_factory(limit=2)
    async with running(resources, limit=2) as dispatcher:
        assert dispatcher.events is not None
        assert dispatcher.http_port is not None
        status, _ = await get(dispatcher.http_port, "/healthz")
        assert status == 200

        def bug(body: str, message_id: str = "") -> str:
            raise RuntimeError("a bug in event handling")

        dispatcher.events.apply = bug  # type: ignore[method-assign]
        async with session().client("stepfunctions", endpoint_url=resources.endpoint) as sfn:
            await sfn.start_execution(
                stateMachineArn=resources.state_machine_arn, name="wake-events", input="{}"
            )

        async def dead() -> bool:
            return dispatcher.health.loops.get("events") is False

        await wait_for(dead, within=30, interval=0.05)
        status, body = await get(dispatcher.http_port, "/healthz")
        assert status == 503
        assert json.loads(body)["dead_loops"] == ["events"]
        status, _ = await get(dispatcher.http_port, "/readyz")
        assert status == 503
