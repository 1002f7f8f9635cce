"""``docker compose up``, run the way compose would, as host processes on loopback.

No container engine exists where this project is built, so `compose.yaml` is read (YAML
anchors and merge keys, ``${VAR:-default}`` interpolation) and each service is started as a
host process: the project image's ENTRYPOINT (read from the Dockerfile) from ``.venv``,
MiniStack from ``.venv-emulator``, Prometheus as the Debian ``prometheus`` binary on a copy
of its mounted directory. Service hostnames become 127.0.0.1 with the published ports, which
the port variables set to free ports. Services start in ``depends_on`` order and wait on
their conditions (``service_healthy`` runs the healthcheck ``test`` until it passes,
``service_completed_successfully`` waits for exit 0). Grafana is skipped: there is no
Grafana binary here (not on PyPI, not in Debian); its dashboard's queries are run against
the Prometheus instead.

The stack test judges the limit from the emulator's own execution records and checks that
Prometheus scrapes the dispatcher and answers every dashboard query. The mutation tests show
that a misspelt variable, a wrong command or a healthcheck that never passes fails it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aioboto3
import anyio
import pytest
import yaml

from dispatcher.config import Settings
from dispatcher.records import list_executions, max_overlap
from dispatcher.sandbox import free_port
from dispatcher.sandbox.emulator import pdeathsig_preexec
from dispatcher.sandbox.provision import TEST_CREDENTIALS

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
EMULATOR_BIN = ROOT / ".venv-emulator" / "bin"
PROJECT_BIN = Path(sys.executable).parent
PROMETHEUS = shutil.which("prometheus")
# What the two third-party images run when compose gives no command (their Dockerfiles).
MINISTACK_IMAGE = "ministackorg/ministack:"
PROMETHEUS_IMAGE = "prom/prometheus:"
PROMETHEUS_CMD = ("--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus")
SKIPPED = {"grafana": "no Grafana binary on this machine; its dashboard queries are run below"}
# Variables of the image that are not settings: `sfn-dispatcher sandbox` reads this one.
OTHER_DISPATCHER_VARIABLES = {"DISPATCHER_SANDBOX_EMULATOR"}
# The dashboard's most important panels: these must show data, the rest must be valid.
MAIN_PANELS = ("Ready", "Version", "Limit", "Running", "Running vs limit", "Starts/s by outcome")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="no prometheus binary (Debian package `prometheus`; CI installs it)"
)
_POLL = 0.2  # seconds between looks at other processes: nothing to wait on but their answers

_VARIABLE_RE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})"
)


class StackError(Exception):
    """The stack would not come up (or not stay up) the way compose.yaml says."""


# --- the compose file --------------------------------------------------------------------------


def interpolate(value: Any, env: Mapping[str, str], used: set[str]) -> Any:
    """Compose's ``$VAR`` interpolation over every string of a loaded document."""
    if isinstance(value, dict):
        return {key: interpolate(item, env, used) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env, used) for item in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name, op, arg = match["name"], match["op"], match["arg"]
        used.add(name)
        given = env.get(name)
        if (op in (":-", ":?") and not given) or (op in ("-", "?") and given is None):
            if op.endswith("?"):
                raise StackError(f"variable {name} is required: {arg}")
            return str(arg)
        return given or ""

    return _VARIABLE_RE.sub(one, value)


def load_compose(text: str, env: Mapping[str, str]) -> tuple[dict[str, Any], set[str]]:
    """The services (anchors and merge keys resolved, interpolated) and the variables used."""
    document = yaml.safe_load(text)  # SafeLoader resolves `<<: *a` and `<<: [*a, *b]`
    used: set[str] = set()
    services = interpolate(document["services"], env, used)
    return services, used


def dockerfile_final_stage() -> tuple[list[str], list[str], dict[str, str]]:
    """(ENTRYPOINT, CMD, ENV) of the Dockerfile's final stage (exec forms), with what it
    inherits from an earlier stage it is built ``FROM``."""
    stages: dict[str, tuple[list[str], list[str], dict[str, str]]] = {}
    entrypoint: list[str] = []
    command: list[str] = []
    env: dict[str, str] = {}
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending = ""
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            parent = stages.get(words[0], ([], [], {}))
            entrypoint, command, env = list(parent[0]), list(parent[1]), dict(parent[2])
            if len(words) == 3 and words[1].upper() == "AS":
                stages[words[2]] = (entrypoint, command, env)  # the same objects: updated below
        elif keyword == "ENTRYPOINT":
            entrypoint[:] = json.loads(args)
        elif keyword == "CMD":
            command[:] = json.loads(args)
        elif keyword == "ENV":
            for word in shlex.split(args):
                key, _, value = word.partition("=")
                env[key] = value
    return entrypoint, command, env


@dataclass
class Service:
    """One compose service as a host process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    healthcheck: list[str] | None  # argv; None when there is none
    health_deadline: float
    depends_on: dict[str, str]  # service -> condition


@dataclass
class Stack:
    """compose.yaml's services as host processes; ``up()``, then ``down()``."""

    compose_text: str
    workdir: Path
    max_health_wait: float = 30.0
    services: dict[str, Service] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)  # variable -> host port
    published: dict[tuple[str, int], int] = field(default_factory=dict)  # (svc, inside) -> host
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _, used = load_compose(self.compose_text, {})
        documented = documented_variables(self.compose_text)
        if used != set(documented):
            raise StackError(
                f"compose.yaml interpolates {sorted(used)} but its header documents "
                f"{sorted(documented)}: a misspelt or undocumented variable"
            )
        self.ports = {name: free_port() for name in sorted(used)}
        services, _ = load_compose(self.compose_text, {k: str(v) for k, v in self.ports.items()})
        for name, spec in services.items():
            for mapping in spec.get("ports", []):
                host, _, inside = str(mapping).rpartition(":")
                address, _, host_port = host.rpartition(":")
                if address != "127.0.0.1":
                    raise StackError(f"{name} publishes {mapping} beyond loopback")
                if int(host_port) not in self.ports.values():
                    raise StackError(
                        f"{name} publishes {mapping}: its host port is fixed, not one of the "
                        f"port variables {sorted(self.ports)}"
                    )
                self.published[(name, int(inside))] = int(host_port)
        for name, spec in services.items():
            if name in SKIPPED:
                continue
            self.services[name] = self._service(name, spec, services)

    # -- translating a service into a host process -------------------------------------------

    def _rewrite(self, text: str, own: str) -> str:
        """Service hostnames (and a service's own loopback) -> 127.0.0.1:<published port>."""
        for (service, inside), host in self.published.items():
            names = [re.escape(service)] + (
                ["127\\.0\\.0\\.1", "localhost"] if service == own else []
            )
            pattern = rf"(?<![\w.-])(?:{'|'.join(names)}):{inside}(?!\d)"
            text = re.sub(pattern, f"127.0.0.1:{host}", text)
        return text

    def _service(self, name: str, spec: dict[str, Any], all_specs: dict[str, Any]) -> Service:
        environment = spec.get("environment", {})
        if isinstance(environment, list):
            environment = dict(item.split("=", 1) for item in environment)
        env = {key: self._rewrite(str(value), name) for key, value in environment.items()}
        healthcheck = spec.get("healthcheck") or {}
        test = None if healthcheck.get("disable") else self._healthcheck(name, healthcheck)
        workdir = self.workdir / name
        workdir.mkdir(parents=True, exist_ok=True)
        image = str(spec.get("image", ""))
        if "build" in spec:
            argv, env = self._project(name, spec, env)
        elif image.startswith(MINISTACK_IMAGE):
            argv, env = self._ministack(name, env, workdir)
            if test and test[0] == "python":
                test[0] = str(EMULATOR_BIN / "python")  # the image's interpreter
        elif image.startswith(PROMETHEUS_IMAGE):
            argv = self._prometheus(name, spec, workdir)
        else:
            raise StackError(f"{name}: this runner cannot run image {image!r}")
        depends = spec.get("depends_on", {})
        if isinstance(depends, list):
            depends = {dependency: {"condition": "service_started"} for dependency in depends}
        for dependency in depends:
            if dependency not in all_specs:
                raise StackError(f"{name} depends on {dependency}, which is not a service")
        deadline = _seconds(healthcheck.get("start_period", "0s")) + _seconds(
            healthcheck.get("interval", "30s")
        ) * int(healthcheck.get("retries", 3))
        return Service(
            name=name,
            argv=argv,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir), **env},
            healthcheck=test,
            health_deadline=min(deadline, self.max_health_wait),
            depends_on={d: str(c.get("condition", "service_started")) for d, c in depends.items()},
        )

    def _healthcheck(self, name: str, healthcheck: dict[str, Any]) -> list[str] | None:
        """The healthcheck's ``test`` as an argv (CMD, CMD-SHELL or a string), rewritten."""
        raw = healthcheck.get("test")
        if not raw or raw == ["NONE"]:
            return None
        if isinstance(raw, str):
            return ["bash", "-c", self._rewrite(raw, name)]
        if raw[0] == "CMD-SHELL":
            return ["bash", "-c", self._rewrite(str(raw[1]), name)]
        if raw[0] == "CMD":
            return [self._rewrite(str(word), name) for word in raw[1:]]
        raise StackError(f"{name}: healthcheck test {raw!r} is neither CMD nor CMD-SHELL")

    def _project(
        self, name: str, spec: dict[str, Any], env: dict[str, str]
    ) -> tuple[list[str], dict[str, str]]:
        """The project's image: its ENTRYPOINT from .venv, its ENV under the service's."""
        entrypoint, command, image_env = dockerfile_final_stage()
        words = [*entrypoint[1:], *spec.get("command", command)]
        argv = [str(PROJECT_BIN / entrypoint[0]), *(self._rewrite(str(w), name) for w in words)]
        env = {**{k: v for k, v in image_env.items() if k != "PATH"}, **env}
        unknown = {
            key
            for key in env
            if key.startswith("DISPATCHER_")
            and key.removeprefix("DISPATCHER_").lower() not in Settings.model_fields
            and key not in OTHER_DISPATCHER_VARIABLES
        }
        if unknown:
            # The dispatcher ignores unknown DISPATCHER_* variables: a typo would be silent.
            raise StackError(f"{name}: {sorted(unknown)} name no dispatcher setting")
        inside = int(env.get("DISPATCHER_HTTP_PORT", "8080"))
        env["DISPATCHER_HTTP_PORT"] = str(self.published.get((name, inside), free_port()))
        env["DISPATCHER_HTTP_HOST"] = "127.0.0.1"  # a container's 0.0.0.0 is its own
        return argv, env

    def _ministack(
        self, name: str, env: dict[str, str], workdir: Path
    ) -> tuple[list[str], dict[str, str]]:
        """MiniStack's image: the emulator from .venv-emulator on the published port."""
        inside = int(env.get("GATEWAY_PORT", "4566"))
        port = self.published.get((name, inside))
        if port is None:
            raise StackError(f"{name}: GATEWAY_PORT {inside} is not a published port")
        return [str(EMULATOR_BIN / "ministack")], {
            **env,
            "GATEWAY_PORT": str(port),
            "BIND_HOST": "127.0.0.1",
            # In a container these have the network to themselves; here they would collide.
            "IOT_MTLS_ENABLED": "0",
            "SFTP_ENABLED": "0",
            "TMPDIR": str(workdir),
            "STATE_DIR": str(workdir / "state"),
            "DOCKER_HOST": f"unix://{workdir / 'no-docker.sock'}",
        }

    def _prometheus(self, name: str, spec: dict[str, Any], workdir: Path) -> list[str]:
        """Prometheus's image: the Debian binary on copies of the mounted config."""
        mounts = self._mounts(name, spec.get("volumes", []), workdir)
        # Without the binary only the tests that start Prometheus fail (they skip instead).
        argv = [
            PROMETHEUS or "prometheus",
            *(self._mapped(a, mounts) for a in spec.get("command", PROMETHEUS_CMD)),
        ]
        argv.append(f"--web.listen-address=127.0.0.1:{self.published[(name, 9090)]}")
        return [a.replace("=/prometheus", f"={workdir / 'data'}") for a in argv]

    def _mounts(self, name: str, volumes: list[str], workdir: Path) -> dict[str, Path]:
        """Bind mounts copied into ``workdir`` with hostnames rewritten: container -> host path."""
        mounts: dict[str, Path] = {}
        for number, volume in enumerate(volumes):
            source, target, *_ = str(volume).split(":")
            origin = (COMPOSE.parent / source).resolve()
            if not origin.exists():
                raise StackError(f"{name} mounts {source}, which does not exist")
            copy = workdir / f"mount-{number}"
            if origin.is_dir():
                shutil.copytree(origin, copy)
                files = [p for p in copy.rglob("*") if p.is_file()]
            else:
                copy.mkdir()
                copy = copy / origin.name
                shutil.copy(origin, copy)
                files = [copy]
            for path in files:
                if path.suffix in (".yml", ".yaml"):
                    path.write_text(self._rewrite(path.read_text(encoding="utf-8"), name))
            mounts[target] = copy
        return mounts

    @staticmethod
    def _mapped(argument: str, mounts: Mapping[str, Path]) -> str:
        for target, host in sorted(mounts.items(), key=lambda item: -len(item[0])):
            key, equals, value = argument.partition("=")
            if equals and (value == target or value.startswith(target + "/")):
                return f"{key}={host}{value[len(target) :]}"
        return argument

    # -- up and down ------------------------------------------------------------------------

    def order(self, targets: tuple[str, ...] | None = None) -> list[str]:
        """The services to start (``targets`` and what they depend on), dependencies first."""
        wanted = list(targets or self.services)
        done: list[str] = []

        def visit(name: str, path: tuple[str, ...]) -> None:
            if name in done:
                return
            if name in path:
                raise StackError(f"depends_on cycle: {' -> '.join((*path, name))}")
            if name not in self.services:
                raise StackError(f"{path[-1] if path else 'up'} needs {name}, which is skipped")
            for dependency in self.services[name].depends_on:
                visit(dependency, (*path, name))
            done.append(name)

        for name in wanted:
            visit(name, ())
        return done

    def up(self, targets: tuple[str, ...] | None = None) -> None:
        """Start the services in order, each after its dependencies met their conditions."""
        for name in self.order(targets):
            service = self.services[name]
            for dependency, condition in service.depends_on.items():
                self._await(dependency, condition)
            log = (self.workdir / f"{name}.log").open("wb")
            self.processes[name] = subprocess.Popen(
                service.argv,
                env=service.env,
                cwd=self.workdir / name,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # down() signals its whole group
                preexec_fn=pdeathsig_preexec(),  # noqa: PLW1509 - gone with pytest, even on kill -9
            )
            log.close()

    def _await(self, name: str, condition: str) -> None:
        service, process = self.services[name], self.processes[name]
        if condition == "service_started":
            return
        if condition == "service_completed_successfully":
            try:
                code = process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                raise StackError(f"{name} did not complete within 60 s") from None
            if code != 0:
                raise StackError(f"{name} exited with {code}: {self.log_tail(name)}")
            return
        if condition != "service_healthy":
            raise StackError(f"unknown depends_on condition {condition!r}")
        if service.healthcheck is None:
            raise StackError(f"{name} has no healthcheck, yet a service waits for it healthy")
        deadline = time.monotonic() + service.health_deadline
        while True:
            if process.poll() is not None:
                raise StackError(f"{name} exited with {process.returncode}: {self.log_tail(name)}")
            check = subprocess.run(
                service.healthcheck, capture_output=True, timeout=10, check=False
            )
            if check.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise StackError(
                    f"{name} never became healthy in {service.health_deadline:g} s: "
                    f"{shlex.join(service.healthcheck)} -> {check.stderr.decode()[-300:]}"
                )
            time.sleep(_POLL)

    def running(self) -> None:
        """StackError when a long-running service has exited (compose shows it Exited)."""
        for name, process in self.processes.items():
            depends = [
                s
                for s in self.services.values()
                if s.depends_on.get(name, "").endswith("successfully")
            ]
            if process.poll() is not None and not depends:
                raise StackError(f"{name} exited with {process.returncode}: {self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 8) -> str:
        text = (self.workdir / f"{name}.log").read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) or "(no output)"

    def down(self) -> None:
        """SIGTERM every process group in reverse start order, SIGKILL after 10 s."""
        for name in reversed(list(self.processes)):
            process = self.processes[name]
            if process.poll() is None:
                _killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    _killpg(process.pid, signal.SIGKILL)
                    process.wait()
            _killpg(process.pid, signal.SIGKILL)  # anything left in its group


def _killpg(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def documented_variables(text: str) -> dict[str, int]:
    """``#   NAME   (default N)`` lines of compose.yaml's header: name -> default port."""
    header = text.split("\nservices:", 1)[0]
    return {
        m[1]: int(m[2])
        for m in re.finditer(r"^#\s+([A-Z][A-Z0-9_]*)\s+\(default (\d+)\)", header, re.M)
    }


def _seconds(duration: str | int | float) -> float:
    """Compose durations: ``1m30s``, ``5s``, ``500ms``."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration):
        total += float(number) * units[unit]
    return total


@pytest.fixture
def stack_factory(tmp_path: Path) -> Iterator[Any]:
    """Build a `Stack` from compose text; every one built is taken down at the end."""
    stacks: list[Stack] = []

    def make(text: str | None = None, **kwargs: Any) -> Stack:
        stack = Stack(
            text or COMPOSE.read_text(encoding="utf-8"), tmp_path / f"stack-{len(stacks)}", **kwargs
        )
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.down()


# --- helpers on the running stack ------------------------------------------------------------


def _get(url: str, timeout: float = 3.0) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def _until(what: str, check: Any, stack: Stack, timeout: float) -> Any:
    """Poll ``check()`` until it returns a truthy value; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        stack.running()
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s (last: {result!r})")
        time.sleep(_POLL)


def _promql(base: str, query: str) -> dict[str, Any]:
    status, body = _get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query}))
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
            selector, label = _substitute(match[1], values), match[2]
            url = f"{base}/api/v1/label/{label}/values?" + urllib.parse.urlencode(
                {"match[]": selector}
            )
            status, body = _get(url)
            found = json.loads(body)["data"] if status == 200 else []
            values[variable["name"]] = (
                "(" + "|".join(_regex_in_string(v) for v in found) + ")" if found else ""
            )
    return values


def assert_rules_loaded(prometheus: str) -> None:
    """Every alert rule in the rule files prometheus.yml names is loaded."""
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    expected = sum(
        len(group.get("rules", []))
        for pattern in config.get("rule_files") or []
        for path in (ROOT / "deploy/prometheus").glob(pattern)
        for group in yaml.safe_load(path.read_text())["groups"]
    )
    status, body = _get(f"{prometheus}/api/v1/rules")
    assert status == 200, body
    loaded = sum(len(group["rules"]) for group in json.loads(body)["data"]["groups"])
    assert loaded == expected, f"{loaded} alert rules loaded, {expected} in the rule files"


def _regex_in_string(value: str) -> str:
    """``value`` as a literal inside a regex inside a PromQL double-quoted string."""
    return re.escape(value).replace("\\", "\\\\")


def _substitute(expr: str, values: Mapping[str, str]) -> str:
    expr = expr.replace("$__rate_interval", "20s").replace("$__interval", "5s")
    expr = expr.replace("$__range", "5m")
    for name, value in sorted(values.items(), key=lambda item: -len(item[0])):
        expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
    return expr


# --- the stack ---------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(150)
@needs_prometheus
def test_the_compose_stack_runs_holds_the_limit_and_feeds_its_dashboard(
    stack_factory: Any,
) -> None:
    """About 35 s: the dispatcher's start-up wait, then two scrapes for the rates."""
    stack: Stack = stack_factory()
    assert set(stack.services) == {"ministack", "provision", "dispatcher", "loadgen", "prometheus"}
    stack.up()
    dispatcher = stack.services["dispatcher"]
    http = f"http://127.0.0.1:{dispatcher.env['DISPATCHER_HTTP_PORT']}"
    _until(
        "the dispatcher's /readyz answers 200", lambda: _get(f"{http}/readyz")[0] == 200, stack, 60
    )

    # The limit, from the executions' own start/stop dates in the emulator.
    limit = int(dispatcher.env["DISPATCHER_LIMIT"])
    machine = dispatcher.env["DISPATCHER_STATE_MACHINE_ARN"]
    region = dispatcher.env["AWS_DEFAULT_REGION"]
    endpoint = dispatcher.env["AWS_ENDPOINT_URL"]
    assert endpoint.startswith("http://127.0.0.1:")

    async def executions() -> list[Any]:
        session = aioboto3.Session(region_name=region, **TEST_CREDENTIALS)
        async with session.client("stepfunctions", endpoint_url=endpoint) as sfn:
            return await list_executions(sfn, machine)

    seen = _until(
        f"{2 * limit} executions started by the dispatcher",
        lambda: (found := anyio.run(executions)) and len(found) >= 2 * limit and found,
        stack,
        60,
    )
    assert max_overlap(seen) <= limit, f"limit {limit} exceeded: {max_overlap(seen)}"
    assert max_overlap(seen) >= 2, "the load generator keeps several running at once"

    # Prometheus scrapes the dispatcher and answers every dashboard query.
    prometheus = f"http://127.0.0.1:{stack.published[('prometheus', 9090)]}"
    _until(
        "Prometheus scrapes the dispatcher (up == 1)",
        lambda: [
            r
            for r in _promql(prometheus, 'up{job="sfn-dispatcher"}')["result"]
            if r["value"][1] == "1"
        ],
        stack,
        30,
    )
    assert_rules_loaded(prometheus)
    try:
        values = _until(
            "every dashboard variable has values",
            lambda: (v := template_values(prometheus)) and all(v.values()) and v,
            stack,
            30,
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {template_values(prometheus)}") from None
    queries = [
        (board, title, _substitute(expr, values)) for board, title, expr in dashboard_queries()
    ]
    assert queries

    def main_panels_have_data() -> bool:
        return all(
            _promql(prometheus, expr)["result"]
            for _, title, expr in queries
            if title in MAIN_PANELS
        )

    _until("the main panels show data", main_panels_have_data, stack, 40)
    for _, _, expr in queries:
        _promql(prometheus, expr)  # valid: Prometheus answers success
    stack.running()


# --- the runner catches what `docker compose up` would trip on -------------------------------


def _mutated(old: str, new: str) -> str:
    text = COMPOSE.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"compose.yaml no longer has exactly one {old!r}"
    return text.replace(old, new)


def test_interpolation_follows_compose() -> None:
    used: set[str] = set()
    env = {"SET": "1", "EMPTY": ""}
    assert interpolate("${SET:-2}${UNSET:-3}${EMPTY:-4}${EMPTY-5}$$x", env, used) == "134$x"
    assert used == {"SET", "UNSET", "EMPTY"}
    with pytest.raises(StackError, match="NEEDED is required: give it"):
        interpolate("${NEEDED:?give it}", env, used)
    services, _ = load_compose(COMPOSE.read_text(encoding="utf-8"), {})
    # Merge keys: the dispatcher has both anchors' variables and its own.
    assert {"AWS_ENDPOINT_URL", "DISPATCHER_REQUEST_QUEUE_URL", "DISPATCHER_LIMIT"} <= set(
        services["dispatcher"]["environment"]
    )


def test_a_misspelt_dispatcher_variable_fails(tmp_path: Path) -> None:
    """The dispatcher ignores unknown DISPATCHER_* variables (pydantic extra="ignore"), so
    compose's DISPATCHER_LIMT would silently run with the default limit."""
    text = _mutated('DISPATCHER_LIMIT: "10"', 'DISPATCHER_LIMT: "10"')
    with pytest.raises(StackError, match=r"dispatcher: \['DISPATCHER_LIMT'\] name no dispatcher"):
        Stack(text, tmp_path)


def test_a_misspelt_or_fixed_port_variable_fails(tmp_path: Path) -> None:
    text = _mutated("${SFN_STACK_DISPATCHER_PORT:-8080}", "${SFN_STACK_DISPATCHR_PORT:-8080}")
    with pytest.raises(StackError, match=r"SFN_STACK_DISPATCHR_PORT.*misspelt or undocumented"):
        Stack(text, tmp_path)
    text = _mutated('"127.0.0.1:${SFN_STACK_GRAFANA_PORT:-3000}:3000"', '"127.0.0.1:3000:3000"')
    with pytest.raises(StackError, match="misspelt or undocumented"):
        Stack(text, tmp_path)


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_wrong_command_fails(stack_factory: Any) -> None:
    """About 4 s: the load generator's `submitt` exits 2, and the stack is not up."""
    stack: Stack = stack_factory(_mutated("      - submit\n", "      - submitt\n"))
    stack.up(("loadgen",))
    assert stack.processes["loadgen"].wait(timeout=30) == 2
    with pytest.raises(StackError, match=r"loadgen exited with 2: .*invalid choice: 'submitt'"):
        stack.running()


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_healthcheck_that_never_passes_fails(stack_factory: Any) -> None:
    """About 4 s (the wait is cut to 3 s; compose would wait start_period + retries x interval)."""
    stack: Stack = stack_factory(
        _mutated("/_ministack/health'", "/_ministack/healthz'"), max_health_wait=3
    )
    with pytest.raises(StackError, match="ministack never became healthy in 3 s"):
        stack.up(("provision",))


@pytest.mark.integration
@pytest.mark.timeout(60)
@needs_prometheus
def test_mounting_only_prometheus_yml_loses_the_alert_rules(stack_factory: Any) -> None:
    """About 5 s. The old mount (the file alone) left the rule file it names behind."""
    if not yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text()).get(
        "rule_files"
    ):
        pytest.skip("prometheus.yml names no rule files")
    stack: Stack = stack_factory(
        _mutated(
            "./deploy/prometheus:/etc/prometheus:ro",
            "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro",
        )
    )
    stack.up(("prometheus",))
    stack._await("prometheus", "service_healthy")
    prometheus = f"http://127.0.0.1:{stack.published[('prometheus', 9090)]}"
    # A rule file pattern that matches nothing is no error to Prometheus: it runs without.
    with pytest.raises(AssertionError, match=r"^0 alert rules loaded, [1-9]\d* in the rule files"):
        assert_rules_loaded(prometheus)
