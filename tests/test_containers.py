"""Static checks of the image, compose stack, Prometheus/Grafana config and lock file.

No engine, no emulator: the files are compared with each other and with what the dispatcher
really exports, so a renamed metric, moved port or missing pin fails here, not in `up`.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dispatcher.daemon.metrics import Metrics
from dispatcher.settings.config import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
LOCK = ROOT / "requirements.lock"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "sfn-dispatcher.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "dashboards.yml"

# Dev-only tools: none may end up in the image or in the runtime lock.
DEV_TOOLS = ("pytest", "ruff", "mypy", "hypothesis", "cfn-lint", "types-")


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _services() -> dict[str, Any]:
    return dict(_load_yaml(COMPOSE)["services"])


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, check=False, timeout=60
    )


# -- compose -------------------------------------------------------------------------------


def _compose_cli() -> list[str] | None:
    """`docker compose` (v2 plugin) where installed, else the standalone `docker-compose`."""
    docker = shutil.which("docker")
    if docker is not None and _run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy is not None else None


def test_compose_config_is_valid() -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` (v2 plugin) nor `docker-compose` is installed")
    result = _run([*cli, "--file", str(COMPOSE), "config", "--quiet"])
    assert result.returncode == 0, result.stderr


def test_published_ports_are_loopback_only() -> None:
    for name, service in _services().items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


PUBLISHED_PORT_RE = re.compile(r"^127\.0\.0\.1:\$\{(SFN_STACK_[A-Z]+_PORT):-(\d+)\}:(\d+)$")


def test_every_published_port_is_a_documented_variable() -> None:
    """Two stacks (or a stack and a sandbox) can run side by side: no host port is fixed."""
    header = COMPOSE.read_text(encoding="utf-8").split("\nservices:", 1)[0]
    guide = (ROOT / "docs" / "getting-started.md").read_text(encoding="utf-8")
    names: set[str] = set()
    for name, service in _services().items():
        for port in service.get("ports", []):
            match = PUBLISHED_PORT_RE.match(str(port))
            assert match is not None, f"{name} publishes {port}: use 127.0.0.1:${{VAR:-N}}:N"
            variable, default, inside = match.groups()
            assert default == inside, f"{name}: the default host port is the container's"
            assert re.search(rf"{variable}\s+\(default {default}\)", header), variable
            assert variable in guide, f"{variable} is not in docs/getting-started.md"
            names.add(variable)
    assert len(names) == 4, names


def test_third_party_images_are_pinned() -> None:
    emulator_pin = (ROOT / "requirements-emulator.txt").read_text(encoding="utf-8")
    match = re.search(r"^ministack==(\S+)$", emulator_pin, re.MULTILINE)
    assert match is not None
    services = _services()
    assert services["ministack"]["image"] == f"ministackorg/ministack:{match.group(1)}"
    for name, service in services.items():
        if "build" in service:
            continue
        repository, _, tag = service["image"].rpartition(":")
        assert repository, f"{name}: image {service['image']} has no tag"
        assert tag not in {"", "latest"}, f"{name}: image {service['image']} is not pinned"


def test_stack_wiring() -> None:
    services = _services()
    ministack, provision, dispatcher, loadgen = (
        services[name] for name in ("ministack", "provision", "dispatcher", "loadgen")
    )
    assert "/_ministack/health" in " ".join(ministack["healthcheck"]["test"])
    endpoint = dispatcher["environment"]["AWS_ENDPOINT_URL"]
    assert endpoint == "http://ministack:4566"
    assert provision["command"] == ["sandbox", "--endpoint", endpoint]
    assert provision["entrypoint"] == ["python", "-m", "devtools"], "the sandbox is not shipped"
    assert "./devtools:/opt/sfn-dev/devtools:ro" in provision["volumes"]
    assert provision["restart"] == "no"
    assert provision["depends_on"]["ministack"]["condition"] == "service_healthy"
    for service in (dispatcher, loadgen):
        assert service["depends_on"]["provision"]["condition"] == "service_completed_successfully"
    assert dispatcher["command"] == ["run"]
    assert loadgen["command"][0] == "submit"
    assert dispatcher["environment"]["DISPATCHER_LIMIT"] == "10"
    for key, value in dispatcher["environment"].items():
        if key.endswith("_QUEUE_URL"):
            assert value.startswith(f"{endpoint}/000000000000/sfn-dispatcher-demo-"), key
    assert (
        loadgen["environment"]["DISPATCHER_REQUEST_QUEUE_URL"]
        == dispatcher["environment"]["DISPATCHER_REQUEST_QUEUE_URL"]
    )
    for service in (provision, dispatcher, loadgen):
        assert service["build"] == "."


STANDINS = ROOT / "tests" / "containers" / "compose.standins.yaml"
# Variables of the image that are not settings: `python -m devtools sandbox` reads this one.
OTHER_DISPATCHER_VARIABLES = {"DISPATCHER_SANDBOX_EMULATOR"}


def test_every_dispatcher_variable_in_compose_names_a_setting() -> None:
    """The dispatcher ignores unknown DISPATCHER_* variables (pydantic extra="ignore"), so a
    misspelt DISPATCHER_LIMT in compose.yaml would silently run with the default limit."""
    for name, service in _services().items():
        unknown = {
            key
            for key in service.get("environment", {})
            if key.startswith("DISPATCHER_")
            and key.removeprefix("DISPATCHER_").lower() not in Settings.model_fields
            and key not in OTHER_DISPATCHER_VARIABLES
        }
        assert not unknown, f"{name}: {sorted(unknown)} name no dispatcher setting"


def test_compose_interpolates_only_documented_variables() -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    header, _, body = text.partition("\nservices:")
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", body))
    documented = set(re.findall(r"^#\s+([A-Z][A-Z0-9_]*)\s+\(default \d+\)", header, re.M))
    assert used == documented, f"interpolated {sorted(used)}, documented {sorted(documented)}"


def test_standin_override_replaces_only_third_party_images_at_their_pins() -> None:
    """The container tests' override (tests/containers/) swaps images, nothing else: the
    stack they bring up is compose.yaml's own."""
    override = _load_yaml(STANDINS)["services"]
    services = _services()
    for name, service in override.items():
        assert "build" not in services[name], f"{name} is the project's own image"
        assert set(service) == {"image"}, f"{name}: the override changes {sorted(service)}"
    assert "grafana" not in override  # no stand-in: the container tests leave it out
    pin = re.search(
        r"^ministack==(\S+)$", (ROOT / "requirements-emulator.txt").read_text(), re.MULTILINE
    )
    assert pin is not None
    assert override["ministack"]["image"].endswith(f":{pin.group(1)}")
    assert services["ministack"]["image"].endswith(f":{pin.group(1)}")


def test_compose_config_with_the_standin_override_is_valid() -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` (v2 plugin) nor `docker-compose` is installed")
    result = _run([*cli, "--file", str(COMPOSE), "--file", str(STANDINS), "config", "--quiet"])
    assert result.returncode == 0, result.stderr


def test_healthchecks_survive_podmans_docker_api() -> None:
    """Podman's Docker-compatible API (4.x) joins a CMD healthcheck's arguments and splits
    them again at spaces: `python -c "import a; b"` becomes `python -c import a; b`. An
    argument with a space must go through CMD-SHELL (one string for /bin/sh -c)."""
    for name, service in _services().items():
        test = (service.get("healthcheck") or {}).get("test")
        if isinstance(test, list) and test and test[0] == "CMD":
            spaced = [word for word in test[1:] if " " in word]
            assert not spaced, f"{name}: CMD healthcheck argument with spaces: {spaced}"


# -- Dockerfile ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction with its continuation lines joined."""

    keyword: str
    args: str
    stage: int


def _dockerfile() -> list[Instruction]:
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines, also between continuation lines
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending = ""
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, " ".join(args.split()), stage))
    return instructions


def _final_stage() -> list[Instruction]:
    instructions = _dockerfile()
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def _env(instructions: list[Instruction], keyword: str = "ENV") -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword != keyword:
            continue
        words = shlex.split(instruction.args)
        if keyword == "ENV" and "=" not in words[0]:  # legacy `ENV KEY value`
            env[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            key, _, value = word.partition("=")
            env[key] = value
    return env


def test_dockerfile_is_multi_stage_and_final_stage_copies_only_the_venv() -> None:
    instructions = _dockerfile()
    assert sum(i.keyword == "FROM" for i in instructions) >= 2
    final = _final_stage()
    assert " AS " not in final[0].args.upper(), "the last stage is the image: no build stage"
    copies = [i.args for i in final if i.keyword in {"COPY", "ADD"}]
    assert copies == ["--from=builder /opt/venv /opt/venv"]
    assert not [i for i in final if i.keyword == "RUN" and re.search(r"\bpip\b", i.args)]


def test_dockerfile_installs_from_the_lock_and_no_dev_tools() -> None:
    runs = " ".join(i.args for i in _dockerfile() if i.keyword == "RUN")
    assert "-r requirements.lock" in runs
    assert "--no-deps" in runs
    assert "[dev]" not in runs
    for tool in (*DEV_TOOLS, "build-essential", "gcc"):
        assert tool not in runs, f"{tool} installed in the image"


def test_dockerfile_runs_as_non_root() -> None:
    users = [i.args for i in _final_stage() if i.keyword == "USER"]
    assert users, "the final stage sets no USER: it would run as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert user.isdigit(), "numeric uid, so runAsNonRoot can verify it without /etc/passwd"


def test_dockerfile_health_entrypoint_and_port() -> None:
    final = _final_stage()
    env = _env(final)
    assert env["DISPATCHER_HTTP_HOST"] == "0.0.0.0"  # noqa: S104 - the container's only interface
    assert env["DISPATCHER_LOG_FORMAT"] == "json"
    assert env["PYTHONUNBUFFERED"] == "1"
    port = env["DISPATCHER_HTTP_PORT"]
    assert [i.args for i in final if i.keyword == "EXPOSE"] == [port]
    (healthcheck,) = (i.args for i in final if i.keyword == "HEALTHCHECK")
    assert "/healthz" in healthcheck
    assert "127.0.0.1" in healthcheck
    assert "urllib" in healthcheck, "slim has no curl or wget"
    (entrypoint,) = (i.args for i in final if i.keyword == "ENTRYPOINT")
    (cmd,) = (i.args for i in final if i.keyword == "CMD")
    assert json.loads(entrypoint) == ["sfn-dispatcher"]
    assert json.loads(cmd) == ["run"]


def test_dockerfile_has_no_secrets_and_labels_the_version() -> None:
    instructions = _dockerfile()
    names = {**_env(instructions), **_env(instructions, "ARG")}
    secretish = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
    assert not [name for name in names if secretish.search(name)]
    labels = " ".join(i.args for i in _final_stage() if i.keyword == "LABEL")
    assert "org.opencontainers.image.source=" in labels
    assert _env(_final_stage(), "ARG")["VERSION"] == _pyproject()["project"]["version"]


BUILD_TOOLS = ROOT / "requirements-build.txt"
PINNED_BASE_RE = re.compile(r"^python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}$")


def test_dockerfile_base_image_is_pinned_by_full_version_and_digest() -> None:
    froms = [i.args.split() for i in _dockerfile() if i.keyword == "FROM"]
    # One literal base (Dependabot updates no ARG in FROM); every other stage builds on it.
    image, as_, name = froms[0]
    assert PINNED_BASE_RE.match(image), f"{image}: pin python:3.11.X-slim-bookworm@sha256:..."
    assert as_.upper() == "AS"
    assert all(words[0] == name for words in froms[1:]), froms
    assert "ARG" not in [i.keyword for i in _dockerfile() if i.stage == -1]


def _hashed_pins(path: Path) -> dict[str, str]:
    """name -> version of a ``--require-hashes`` requirements file; asserts every pin is hashed."""
    text = path.read_text(encoding="utf-8")
    pins: dict[str, str] = {
        canonicalize_name(m.group(1)): m.group(2)
        for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+) \\$", text, re.M)
    }
    blocks = re.findall(r"^\S+==\S+ \\\n((?:\s+--hash=sha256:[0-9a-f]{64}\s*\\?\n)+)", text, re.M)
    assert len(blocks) == len(pins), f"{path.name}: a pin without --hash"
    return pins


def test_dockerfile_build_tools_are_pinned_and_nothing_unpinned_is_fetched() -> None:
    pins = _hashed_pins(BUILD_TOOLS)
    assert set(pins) == {"pip", "setuptools"}
    # The build backend pyproject asks for must be satisfied by the pinned setuptools,
    # since the wheel is built without isolation (isolation would fetch an unpinned one).
    (backend,) = (
        Requirement(r)
        for r in _pyproject()["build-system"]["requires"]
        if r.startswith("setuptools")
    )
    assert backend.specifier.contains(pins["setuptools"])
    runs = [i.args for i in _dockerfile() if i.keyword == "RUN"]
    installs = [r for r in runs if re.search(r"\bpip install\b", r)]
    wheels = "/tmp/wheels/"  # noqa: S108 - the builder stage's own directory, not the host's
    assert any("--require-hashes" in r and "-r requirements-build.txt" in r for r in installs)
    assert any("--require-hashes" in r and "-r requirements.lock" in r for r in installs)
    for run in installs:
        for command in run.split("&&"):
            if re.search(r"\bpip install\b", command):
                assert "--require-hashes" in command or (
                    "--no-deps" in command and wheels in command
                ), f"unpinned install: {command.strip()}"
    (wheel,) = (r for r in runs if "pip wheel" in r)
    assert "--no-build-isolation" in wheel
    assert "--no-deps" in wheel


def test_dockerignore_lets_in_exactly_what_the_dockerfile_copies() -> None:
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.startswith("!")
    }
    copied = {
        source.rstrip("/")
        for i in _dockerfile()
        if i.keyword == "COPY" and "--from=" not in i.args
        for source in i.args.split()[:-1]
    }
    assert copied == allowed


# -- Prometheus and Grafana ----------------------------------------------------------------


def test_prometheus_scrapes_the_dispatcher_service() -> None:
    services = _services()
    dispatcher = services["dispatcher"]
    port = _env(_final_stage())["DISPATCHER_HTTP_PORT"]
    port = dispatcher.get("environment", {}).get("DISPATCHER_HTTP_PORT", port)
    assert f"127.0.0.1:${{SFN_STACK_DISPATCHER_PORT:-{port}}}:{port}" in dispatcher["ports"]
    config = _load_yaml(PROMETHEUS_CONFIG)
    (job,) = (j for j in config["scrape_configs"] if j["job_name"] == "sfn-dispatcher")
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert targets == [f"dispatcher:{port}"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    # The whole directory, so that rule files named relative to prometheus.yml load too.
    assert services["prometheus"]["volumes"] == ["./deploy/prometheus:/etc/prometheus:ro"]
    for rule_file in config.get("rule_files", []):
        assert not Path(rule_file).is_absolute(), rule_file
        assert list(PROMETHEUS_CONFIG.parent.glob(rule_file)), f"{rule_file} is not in the mount"


def test_prometheus_config_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`)")
    result = _run([promtool, "check", "config", str(PROMETHEUS_CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr


def _datasource_uid() -> str:
    (source,) = _load_yaml(DATASOURCES)["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    return str(source["uid"])


def test_grafana_mounts_match_provisioning() -> None:
    grafana = _services()["grafana"]
    volumes = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"]}
    assert volumes["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert all(v.endswith(":ro") for v in grafana["volumes"])
    (provider,) = _load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert volumes["./deploy/grafana/dashboards"] == provider["options"]["path"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def _dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text(encoding="utf-8")))


def _queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            # label_values(metric, label) is Grafana's, not PromQL: check it as `metric by (label)`.
            definition = re.sub(
                r"label_values\((.+),\s*(\w+)\)", r"count by (\2) (\1)", variable["definition"]
            )
            yield f"variable {variable['name']!r}", definition


def test_dashboard_identity_and_layout() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "sfn-dispatcher"
    assert dashboard["title"] == "sfn-dispatcher"
    assert dashboard["schemaVersion"] >= 39
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["targets"], panel["title"]


def test_every_datasource_is_the_provisioned_one() -> None:
    # The provisioned source is the default, which the dashboard's ${datasource} picks.
    uid = "${datasource}" if _datasource_uid() else ""
    dashboard = _dashboard()
    refs = [panel["datasource"] for panel in dashboard["panels"]]
    refs += [
        t["datasource"] for p in dashboard["panels"] for t in p["targets"] if "datasource" in t
    ]
    refs += [v["datasource"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    assert refs
    for ref in refs:
        assert ref == {"type": "prometheus", "uid": uid}


def _exported_series() -> dict[str, set[str]]:
    """Series name -> label names, from the real exposition of a fresh ``Metrics``."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    # A labelled metric exports nothing until a child exists: make one of each.
    for metric in vars(metrics).values():
        labelnames = getattr(metric, "_labelnames", ())
        if labelnames:
            metric.labels(**dict.fromkeys(labelnames, "x"))
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        assert family.samples, f"{family.name} is not an attribute of Metrics: not checked"
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{([^}]*)\}")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})


def _parse(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) referred to by a PromQL expression."""
    text = _STRING.sub('""', expr)
    labels = {
        name for body in _MATCHERS.findall(text) for name in re.findall(r"(\w+)\s*[=!]", body)
    }
    labels |= {name for body in _GROUPING.findall(text) for name in re.findall(r"\w+", body)}
    text = _GROUPING.sub(" ", _MATCHERS.sub(" ", _RANGE.sub(" ", text)))
    text = _NUMBER.sub(" ", re.sub(r"\$\w+", " ", text))
    metrics = set()
    for match in _IDENTIFIER.finditer(text):
        followed_by_call = text[match.end() :].lstrip().startswith("(")
        if not followed_by_call and match.group() not in _KEYWORDS:
            metrics.add(match.group())
    return metrics, labels


def test_promql_parser_of_this_test() -> None:
    assert _parse(
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{pool=~"$pool",x!="}"}[5m])))'
    ) == ({"a_bucket"}, {"le", "pool", "x"})
    assert _parse("time() - max(b) * 1e3 > bool 0") == ({"b"}, set())


def test_dashboard_uses_only_exported_metrics_and_labels() -> None:
    series = _exported_series()
    used: set[str] = set()
    for where, expr in _queries(_dashboard()):
        metrics, labels = _parse(expr)
        assert metrics, f"{where}: no metric in {expr!r}"
        unknown = metrics - series.keys()
        assert not unknown, f"{where}: {sorted(unknown)} not exported by the dispatcher"
        available = set().union(*(series[m] for m in metrics))
        available |= {"job", "instance"}  # target labels: Prometheus adds them
        assert labels <= available, f"{where}: labels {sorted(labels - available)} unknown"
        used |= metrics
    required = {
        f"dispatcher_{name}"
        for name in (
            *("running", "starting", "limit", "ready", "starts_total", "events_total"),
            *("queue_wait_seconds_bucket", "slot_refill_seconds_bucket", "aws_calls_total"),
            *("dead_letters_total", "reconcile_corrections_total"),
            *("shared_limit", "shared_limit_in_use", "shared_limit_waiting"),
            "shared_limit_blocked",
        )
    }
    assert required <= used, f"dashboard lacks {sorted(required - used)}"


# -- requirements.lock ---------------------------------------------------------------------


def _locked() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if match:
            pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def test_lock_pins_every_runtime_dependency() -> None:
    pins = _locked()
    for spec in _pyproject()["project"]["dependencies"]:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not pinned in requirements.lock (run `make lock`)"
        assert requirement.specifier.contains(pins[name]), (
            f"{name}=={pins[name]} does not satisfy pyproject's {spec!r} (run `make lock`)"
        )


def test_lock_is_hashed_runtime_only_and_says_how_to_refresh() -> None:
    text = LOCK.read_text(encoding="utf-8")
    assert "make lock" in "\n".join(text.splitlines()[:5])
    pins = _locked()
    assert not [name for name in pins if name.startswith(DEV_TOOLS)]
    # --require-hashes needs a hash on every pin: one `name==version \` block per pin.
    blocks = re.findall(r"^\S+==\S+ \\\n((?:\s+--hash=sha256:[0-9a-f]{64}\s*\\?\n)+)", text, re.M)
    assert len(blocks) == len(pins)
