"""`compose.yaml` brought up for real: `docker compose up` against the container engine.

With podman, Debian's docker-compose (v1) drives it through podman's Docker-compatible
socket, which this test starts and stops. Where no registry is reachable, the third-party
images are replaced through an override file (tests/containers/compose.standins.yaml) by
stand-ins that `scripts/image standins` builds: MiniStack from PyPI at the pinned version,
Prometheus from Debian's package. Grafana is left out: it has no Debian or PyPI package to
build a stand-in from, so its dashboard's queries are run against Prometheus instead.

Checked: provision exits 0, the dispatcher's healthcheck passes and /readyz answers, the
limit holds (from the executions' own start/stop dates), Prometheus scrapes the dispatcher,
loads every alert rule and answers every dashboard query, and `down -v` leaves no
container, volume or network behind.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

from devtools.records import Execution, list_executions, max_overlap
from devtools.sandbox import free_port
from devtools.sandbox.provision import TEST_CREDENTIALS
from dispatcher.aws.api import session
from tests.containers.engine import (
    ROOT,
    STANDIN_OVERRIDE,
    Engine,
    http_get,
    report,
    requires_container_tests,
    until,
)

pytestmark = [requires_container_tests]

COMPOSE = ROOT / "compose.yaml"
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
# Every service but grafana (no stand-in: see the module docstring).
SERVICES = ("ministack", "provision", "dispatcher", "loadgen", "prometheus")
PORT_VARIABLES = (
    "SFN_STACK_EMULATOR_PORT",
    "SFN_STACK_DISPATCHER_PORT",
    "SFN_STACK_PROMETHEUS_PORT",
    "SFN_STACK_GRAFANA_PORT",
)
# The dashboard's most important panels: these must show data, the rest must be valid.
MAIN_PANELS = ("Ready", "Version", "Limit", "Running", "Running vs limit", "Starts/s by outcome")


# --- the engine's Docker API and its healthchecks ------------------------------------------


def _answers(sock_path: Path) -> bool:
    """True when the Docker-compatible API on the unix socket answers ``GET /_ping``."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(str(sock_path))
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: d\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.")
    except OSError:
        return False


@pytest.fixture(scope="module")
def docker_host(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str | None]:
    """DOCKER_HOST for compose: podman's Docker-compatible socket (started here and stopped
    by its PID), or None with docker (its own daemon's socket)."""
    if engine.name != "podman":
        yield None
        return
    sock = tmp_path_factory.mktemp("podman") / "podman.sock"
    log = (sock.parent / "service.log").open("wb")
    service = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{sock}"],
        env=engine.env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    try:
        until("podman's API socket answers", lambda: service.poll() is None and _answers(sock), 30)
        yield f"unix://{sock}"
    finally:
        service.terminate()
        try:
            service.wait(timeout=15)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()


class HealthChecks(threading.Thread):
    """Runs the project's container healthchecks where nothing else would.

    Podman schedules healthchecks with systemd timers; without systemd (a container, a CI
    sandbox) none ever runs, every container stays "starting", and compose waits forever
    on ``service_healthy``. This does what the timers do: ``podman healthcheck run`` for
    each running container of the project, at the interval its healthcheck sets. The
    checks themselves (the command, retries, the verdict) are podman's.
    """

    def __init__(self, engine: Engine, project: str) -> None:
        super().__init__(daemon=True, name=f"healthchecks-{project}")
        self.engine = engine
        self.project = project
        self.stopped = threading.Event()
        self.intervals: dict[str, float | None] = {}
        self.last: dict[str, float] = {}

    def _interval(self, container: str) -> float | None:
        if container not in self.intervals:
            document = self.engine.inspect(container)
            check = document["Config"].get("Healthcheck") or {}
            test = check.get("Test") or ["NONE"]
            interval = float(check.get("Interval") or 30e9) / 1e9
            self.intervals[container] = None if test[0] == "NONE" else interval
        return self.intervals[container]

    def run(self) -> None:
        while not self.stopped.wait(0.5):
            listed = self.engine(
                "ps",
                "--quiet",
                "--filter",
                f"label=com.docker.compose.project={self.project}",
                check=False,
            )
            for container in listed.stdout.split():
                try:
                    interval = self._interval(container)
                except AssertionError:
                    continue  # removed meanwhile
                now = time.monotonic()
                if interval is None or now - self.last.get(container, -1e9) < interval:
                    continue
                self.last[container] = now
                self.engine("healthcheck", "run", container, check=False, timeout=60)

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=70)


def needs_health_driver(engine: Engine) -> bool:
    return engine.name == "podman" and not Path("/run/systemd/system").is_dir()


# --- compose -------------------------------------------------------------------------------


def compose_cli(engine: Engine) -> list[str]:
    """`docker compose` (v2) with docker when it has the plugin, else `docker-compose` (v1)."""
    if engine.name == "docker" and engine("compose", "version", check=False).returncode == 0:
        return ["docker", "compose"]
    found = shutil.which("docker-compose")
    if found is None:
        pytest.fail("no docker-compose: `scripts/image install` installs it")
    return [found]


class Stack:
    """One compose project: ``up``, ``ps``, ``down``, with its own free host ports."""

    def __init__(self, engine: Engine, docker_host: str | None) -> None:
        self.engine = engine
        self.project = f"sfn-test-{uuid.uuid4().hex[:8]}"
        self.ports = {name: free_port() for name in PORT_VARIABLES}
        self.env = {**engine.env, **{k: str(v) for k, v in self.ports.items()}}
        if docker_host is not None:
            self.env["DOCKER_HOST"] = docker_host
        self.files = ["-f", str(COMPOSE)]
        if not _registry_images_available(engine):
            self.files += ["-f", str(STANDIN_OVERRIDE)]
        self.cli = [*compose_cli(engine), "--project-name", self.project, *self.files]

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*self.cli, *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
        assert result.returncode == 0, f"compose {' '.join(args)}: {result.stderr[-3000:]}"
        return result

    def container(self, service: str) -> str:
        ids = self("ps", "--all", "--quiet", service).stdout.split()
        assert len(ids) == 1, f"{service}: containers {ids}"
        return ids[0]

    def logs(self, service: str) -> str:
        return self.engine.logs(self.container(service))[-3000:]

    def config(self) -> dict[str, Any]:
        return dict(yaml.safe_load(self("config").stdout))

    def left_behind(self) -> list[str]:
        """Containers, volumes and networks of this project that still exist."""
        label = f"label=com.docker.compose.project={self.project}"
        found = [
            *self.engine("ps", "--all", "--quiet", "--filter", label).stdout.split(),
            *self.engine("volume", "ls", "--quiet", "--filter", label).stdout.split(),
        ]
        networks = self.engine("network", "ls", "--format", "{{.Name}}").stdout.split()
        return found + [n for n in networks if n.startswith(f"{self.project}_")]


def _registry_images_available(engine: Engine) -> bool:
    """Whether the engine has or can pull compose.yaml's third-party images."""
    services = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"]
    for name in ("ministack", "prometheus"):
        image = services[name]["image"]
        have = engine("image", "inspect", image, check=False).returncode == 0
        if not have and engine("pull", "--quiet", image, check=False, timeout=300).returncode:
            return False
    return True


# --- Prometheus and the dashboard ----------------------------------------------------------


def promql(base: str, query: str) -> dict[str, Any]:
    status, body = http_get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query}))
    document: dict[str, Any] = json.loads(body) if body else {"status": "unreachable"}
    assert status == 200, (query, status, document)
    assert document["status"] == "success", (query, document)
    return dict(document["data"])


def dashboard_queries() -> Iterator[tuple[str, str, str]]:
    """(dashboard, panel title, expr) of every panel target of every dashboard."""
    for path in sorted(DASHBOARDS.glob("*.json")):
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        panels = list(dashboard.get("panels", []))
        while panels:
            panel = panels.pop(0)
            panels.extend(panel.get("panels", []))  # collapsed rows hold their panels
            for target in panel.get("targets", []):
                if target.get("expr"):
                    yield path.name, str(panel.get("title")), str(target["expr"])


def _regex_in_string(value: str) -> str:
    """``value`` as a literal inside a regex inside a PromQL double-quoted string."""
    return re.escape(value).replace("\\", "\\\\")


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """Grafana's variables in ``expr``: the built-in intervals, then the dashboard's own."""
    expr = expr.replace("$__rate_interval", "20s").replace("$__interval", "5s")
    expr = expr.replace("$__range", "5m")
    for name, value in sorted(values.items(), key=lambda item: -len(item[0])):
        expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
    return expr


NO_NAMED_LIMIT = frozenset({"limit"})
"""Dashboard variables with no values in the compose stack (it configures no named limit)."""


def template_values(base: str) -> dict[str, str]:
    """Each query variable's values, as Grafana's "All" substitutes them: ``(a|b)``."""
    values: dict[str, str] = {}
    for path in sorted(DASHBOARDS.glob("*.json")):
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        for variable in dashboard.get("templating", {}).get("list", []):
            if variable.get("type") in ("custom", "constant", "interval", "textbox"):
                current = variable.get("current", {}).get("value") or variable.get("query", "")
                values[variable["name"]] = str(current)
                continue
            if variable.get("type") != "query":
                continue  # datasource: not in any expr
            query = (
                variable["query"]["query"]
                if isinstance(variable["query"], dict)
                else variable["query"]
            )
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", str(query).strip())
            assert match is not None, f"{path.name}: variable {variable['name']}: {query}"
            selector, label = substitute(match[1], values), match[2]
            url = f"{base}/api/v1/label/{label}/values?" + urllib.parse.urlencode(
                {"match[]": selector}
            )
            status, body = http_get(url)
            found = json.loads(body)["data"] if status == 200 else []
            values[variable["name"]] = (
                "(" + "|".join(_regex_in_string(v) for v in found) + ")" if found else ""
            )
    return values


def rules_loaded(prometheus: str) -> tuple[int, int]:
    """(alert rules Prometheus loaded, alert rules in the files prometheus.yml names)."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text(encoding="utf-8"))
    expected = sum(
        len(group.get("rules", []))
        for pattern in config.get("rule_files") or []
        for path in PROMETHEUS_DIR.glob(pattern)
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
    )
    status, body = http_get(f"{prometheus}/api/v1/rules")
    assert status == 200, body
    loaded = sum(len(group["rules"]) for group in json.loads(body)["data"]["groups"])
    return loaded, expected


# --- the stack -----------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_the_compose_stack_comes_up_holds_the_limit_is_scraped_and_goes_away(
    engine: Engine, image: str, docker_host: str | None
) -> None:
    stack = Stack(engine, docker_host)
    health = HealthChecks(engine, stack.project) if needs_health_driver(engine) else None
    config = stack.config()
    assert set(config["services"]) - {"grafana"} == set(SERVICES), "a service the test skips"
    assert config["services"]["dispatcher"]["image"] == image
    dispatcher_env = config["services"]["dispatcher"]["environment"]
    limit = int(dispatcher_env["DISPATCHER_LIMIT"])
    if health is not None:
        health.start()
    before = time.monotonic()
    try:
        stack("up", "--detach", "--no-build", *SERVICES, timeout=400)
        report(f"compose up ({', '.join(SERVICES)}): {time.monotonic() - before:.1f} s")

        provision = stack.container("provision")
        assert engine.exit_code(provision) == 0, stack.logs("provision")
        dispatcher = stack.container("dispatcher")

        def healthy() -> bool:
            state = engine.inspect(dispatcher)["State"]
            assert state["Running"], stack.logs("dispatcher")
            return bool((state.get("Health") or {}).get("Status") == "healthy")

        until("the dispatcher's healthcheck passes", healthy, 90)
        http = f"http://127.0.0.1:{stack.ports['SFN_STACK_DISPATCHER_PORT']}"
        until(
            "/readyz answers 200 on the published port",
            lambda: http_get(f"{http}/readyz")[0] == 200,
            60,
        )

        # The limit, from the executions' own start/stop dates in the emulator.
        endpoint = f"http://127.0.0.1:{stack.ports['SFN_STACK_EMULATOR_PORT']}"
        machine = dispatcher_env["DISPATCHER_STATE_MACHINE_ARN"]

        def executions() -> list[Execution] | None:
            """Every execution, once there are two limits' worth (else None: not yet)."""

            async def listed() -> list[Execution]:
                region = dispatcher_env["AWS_DEFAULT_REGION"]
                emulator = session(region=region, credentials=TEST_CREDENTIALS)
                async with emulator.client("stepfunctions", endpoint_url=endpoint) as sfn:
                    return await list_executions(sfn, machine)

            found = anyio.run(listed)
            return found if len(found) >= 2 * limit else None

        seen = until(f"{2 * limit} executions started by the dispatcher", executions, 120)
        peak = max_overlap(seen)
        assert peak <= limit, f"limit {limit} exceeded: {peak} at once"
        assert peak >= 2, "the load generator keeps several running at once"

        # Prometheus scrapes the dispatcher, loads the alert rules, answers the dashboard.
        prometheus = f"http://127.0.0.1:{stack.ports['SFN_STACK_PROMETHEUS_PORT']}"
        until(
            "Prometheus scrapes the dispatcher (up == 1)",
            lambda: [
                r
                for r in promql(prometheus, 'up{job="sfn-dispatcher"}')["result"]
                if r["value"][1] == "1"
            ],
            60,
        )
        loaded, expected = rules_loaded(prometheus)
        assert expected > 0
        assert loaded == expected, f"{loaded} alert rules loaded, {expected} in the rule files"

        def variables() -> dict[str, str] | None:
            values = template_values(prometheus)
            # `limit` lists named limits shared by pools: the stack's one pool uses none.
            needed = [v for name, v in values.items() if name not in NO_NAMED_LIMIT]
            return values if all(needed) else None

        values = until("every dashboard variable has values", variables, 60)
        queries = [(t, substitute(e, values)) for _, t, e in dashboard_queries()]
        assert queries
        until(
            "the main panels show data",
            lambda: all(promql(prometheus, e)["result"] for t, e in queries if t in MAIN_PANELS),
            60,
        )
        for _, expr in queries:
            promql(prometheus, expr)  # valid: Prometheus answers success
        for service in ("ministack", "dispatcher", "loadgen", "prometheus"):
            assert engine.inspect(stack.container(service))["State"]["Running"], stack.logs(service)

        # `compose stop`: SIGTERM, then SIGKILL after the grace period. The dispatcher exits
        # 0 at once, and every service stops on SIGTERM (without an init, the load
        # generator, PID 1 with no SIGTERM handler, held `stop` up for 20 s).
        before = time.monotonic()
        stack("stop", "--timeout", "30", timeout=180)
        took = time.monotonic() - before
        codes = {s: engine.exit_code(stack.container(s)) for s in SERVICES}
        report(f"compose stop: {took:.1f} s, exit codes {codes}")
        assert codes["dispatcher"] == 0, stack.logs("dispatcher")
        killed = [s for s, code in codes.items() if code == 137]
        assert not killed, f"ignored SIGTERM and were killed after 30 s: {killed}"
        # The dispatcher's orderly stop may give requests kept on their last receive their
        # renewals and describes (seconds); under the 30 s grace, as ECS's stop timeout.
        assert took < 28, f"compose stop took {took:.1f} s: a service ignores SIGTERM ({codes})"
    finally:
        started_down = time.monotonic()
        down = subprocess.run(
            [*stack.cli, "down", "--volumes", "--timeout", "30"],
            cwd=ROOT,
            env=stack.env,
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        if health is not None:
            health.stop()
    report(f"compose down -v: {time.monotonic() - started_down:.1f} s")
    assert down.returncode == 0, down.stderr[-3000:]
    assert stack.left_behind() == [], "compose down -v left these behind"
