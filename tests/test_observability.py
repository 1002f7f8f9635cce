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
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from devtools.faults import FaultKind, FaultProxy, FaultRule
from devtools.polling import wait_until
from devtools.sandbox.provision import SandboxResources
from dispatcher.aws.api import attempt_outcome
from dispatcher.core.shared_limits import SharedLimitConfig
from dispatcher.daemon.metrics import Metrics
from dispatcher.daemon.service import Dispatcher
from tests.audit import send_requests, session
from tests.runner import running, settings_for

Factory = Callable[..., Awaitable[SandboxResources]]
ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "sfn-dispatcher.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
METRIC_RE = re.compile(r"\bdispatcher_[a-z0-9_]+")


async def get(port: int, path: str) -> tuple[int, str]:
    """GET a path of the dispatcher's HTTP port."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}{path}") as response,
    ):
        return response.status, await response.text()


async def busy_dispatcher_metrics(
    resources: SandboxResources, shared: SharedLimitConfig | None = None
) -> str:
    """Run a small workload with one bad request and one foreign execution; return /metrics.
    ``shared``: a named limit the pool uses (its series exist only with one)."""
    async with (
        session().client("sqs", endpoint_url=resources.endpoint) as sqs,
        session().client("stepfunctions", endpoint_url=resources.endpoint) as sfn,
    ):
        await sfn.start_execution(
            stateMachineArn=resources.state_machine_arn,
            name="foreign-1",
            input=json.dumps({"seconds": 1}),
        )
        bodies: list[dict[str, Any] | str] = [{"seconds": 0}] * 6 + ["not json"]
        await send_requests(sqs, resources.request_queue_url, bodies)
        # A request for an execution that ran already (same name, same input): StartExecution
        # answers ExecutionAlreadyExists, an expected answer (a duplicate), not an error.
        done = await sfn.start_execution(
            stateMachineArn=resources.state_machine_arn,
            name="done-1",
            input=json.dumps({"seconds": 0}),
        )

        async def ended() -> bool:
            described = await sfn.describe_execution(executionArn=done["executionArn"])
            return bool(described["status"] != "RUNNING")

        await wait_until(ended, within=30, interval=0.05)
        await send_requests(sqs, resources.request_queue_url, [{"seconds": 0}], ["done-1"])
        async with running(resources, shared=shared, limit=3) as dispatcher:
            assert dispatcher.http_port is not None

            async def settled() -> bool:
                intake = dispatcher.intake
                return (
                    intake is not None
                    and dispatcher.pool.finished_total >= 6
                    and intake.stats.dead_lettered == 1
                    and intake.stats.duplicates == 1
                )

            await wait_until(settled, within=60, interval=0.05)
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
    # The pool uses a named limit (as large as its own limit, so nothing changes), so the
    # per-limit series the dashboard draws exist, as in production with a named limit.
    text = await busy_dispatcher_metrics(resources, SharedLimitConfig(name="partner-api", limit=3))
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
    samples = [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]
    start_calls = {
        labels["outcome"]: value
        for name, labels, value in samples
        if name == "dispatcher_aws_calls_total" and labels["operation"] == "StartExecution"
    }
    assert start_calls["expected"] >= 1, start_calls  # ExecutionAlreadyExists
    assert start_calls["error"] == 0, start_calls
    # Events and reconcile series carry the pool, like every per-pool series.
    for name in ("dispatcher_events_total", "dispatcher_reconcile_runs_total"):
        assert any(
            n == name and labels.get("pool") == "default" and value > 0
            for n, labels, value in samples
        ), name
    assert any(
        n == "dispatcher_last_reconcile_timestamp_seconds" and labels == {"pool": "default"}
        for n, labels, _ in samples
    )

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
        shutil.copy(ALERTS, tmp_path / ALERTS.name)
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: [{ALERTS.name}]\n"
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

            await wait_until(scraped, within=60, interval=0.25)
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
            rules: list[dict[str, Any]] = []

            async def evaluated() -> bool:
                async with (
                    aiohttp.ClientSession() as http,
                    http.get(f"http://127.0.0.1:{port}/api/v1/rules") as response,
                ):
                    groups = (await response.json())["data"]["groups"]
                rules[:] = [rule for group in groups for rule in group["rules"]]
                return bool(rules) and all(r["lastEvaluation"] > "2000" for r in rules)

            await wait_until(evaluated, within=30, interval=0.25)
            broken = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
            assert not broken, f"rules failing on the live series: {broken}"
            firing = {r["name"] for r in rules if r["state"] == "firing"}
            assert "DispatcherDown" not in firing
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

        def bug(body: str, message_id: str = "", *, sent_ms: int | None = None) -> str:
            raise RuntimeError("a bug in event handling")

        dispatcher.events.apply = bug  # type: ignore[method-assign]
        async with session().client("stepfunctions", endpoint_url=resources.endpoint) as sfn:
            await sfn.start_execution(
                stateMachineArn=resources.state_machine_arn, name="wake-events", input="{}"
            )

        async def dead() -> bool:
            return dispatcher.health.loops.get("events") is False

        await wait_until(dead, within=30, interval=0.05)
        status, body = await get(dispatcher.http_port, "/healthz")
        assert status == 503
        assert json.loads(body)["dead_loops"] == ["events"]
        status, _ = await get(dispatcher.http_port, "/readyz")
        assert status == 503


# -- the dashboard and the label policy, without a dispatcher --------------------------------

# Process-wide series: one value per process, not per pool.
PROCESS_WIDE = {
    "dispatcher_ready",
    "dispatcher_build",
    "dispatcher_leader",
    "dispatcher_lease_epoch",
    "dispatcher_aws_calls",
    "dispatcher_start_rate_limit",
    "dispatcher_start_rate_throttles",
    "dispatcher_start_rate_wait_seconds",
    "dispatcher_read_budget_wait_seconds",
}
_SELECTOR_RE = re.compile(r"\b(dispatcher_[a-z0-9_]+)(\{[^}]*\})?")
_SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_info")


def _labels_by_metric() -> dict[str, tuple[str, ...]]:
    """Metric name (without suffix) -> label names, for every metric of ``Metrics``."""
    metrics = Metrics(CollectorRegistry())
    found: dict[str, tuple[str, ...]] = {}
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            found[metric._name] = tuple(metric._labelnames)
    return found


def _base(series: str) -> str:
    for suffix in _SUFFIXES:
        if series.endswith(suffix):
            return series.removesuffix(suffix)
    return series


def test_every_per_pool_metric_carries_the_pool_label() -> None:
    labels = _labels_by_metric()
    assert labels
    without = {
        name
        for name, names in labels.items()
        if "pool" not in names and "limit" not in names  # per named limit: labelled by it
    }
    assert without == PROCESS_WIDE, (
        f"metrics without a pool label: {sorted(without - PROCESS_WIDE)}; if one is truly "
        "process-wide, add it to PROCESS_WIDE (and docs/observability.md's list)"
    )


def test_dashboard_imports_anywhere_and_filters_every_query() -> None:
    """Datasource through a variable; job, instance and (per-pool series) pool on every
    selector, so the filters work on every panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    source = {"type": "prometheus", "uid": "${datasource}"}
    for name in ("job", "instance", "pool"):
        assert variables[name]["datasource"] == source, name
    assert "$job" in variables["instance"]["definition"]
    assert '$job"' in variables["pool"]["definition"]
    assert '$instance"' in variables["pool"]["definition"]
    assert 'uid": "prometheus"' not in DASHBOARD.read_text(), "a fixed datasource uid is left"
    labels = _labels_by_metric()
    checked = 0
    for panel in dashboard["panels"]:
        assert panel["datasource"] == source, panel["title"]
        for target in panel["targets"]:
            where = f"panel {panel['title']!r} {target['refId']}"
            assert target["datasource"] == source, where
            selectors = _SELECTOR_RE.findall(target["expr"])
            assert selectors, where
            for series, matchers in selectors:
                assert 'job=~"$job"' in matchers, f"{where}: {series} not filtered by job"
                assert 'instance=~"$instance"' in matchers, f"{where}: {series} by instance"
                if "pool" in labels[_base(series)]:
                    assert 'pool=~"$pool"' in matchers, f"{where}: {series} not filtered by pool"
                checked += 1
    assert checked >= 25


def test_expected_aws_answers_are_not_errors() -> None:
    cases = {
        ("StartExecution", 400, "ExecutionAlreadyExists"): "expected",
        ("DescribeExecution", 400, "ExecutionDoesNotExist"): "expected",
        ("SendTaskSuccess", 400, "TaskTimedOut"): "expected",
        ("SendTaskFailure", 400, "TaskDoesNotExist"): "expected",
        ("SendTaskHeartbeat", 400, "InvalidToken"): "expected",
        ("UpdateItem", 400, "ConditionalCheckFailedException"): "expected",
        # The same codes from other operations, and real failures, stay errors.
        ("StartExecution", 400, "ExecutionDoesNotExist"): "error",
        ("StartExecution", 400, "StateMachineDoesNotExist"): "error",
        ("StartExecution", 400, "AccessDeniedException"): "error",
        ("StartExecution", 500, "InternalServerError"): "error",
        ("StartExecution", 400, "ThrottlingException"): "throttled",
        ("ReceiveMessage", 200, ""): "ok",
    }
    for (operation, status, code), outcome in cases.items():
        assert attempt_outcome(operation, status, code) == outcome, (operation, code)
