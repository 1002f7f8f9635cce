"""The Kubernetes manifests (deploy/kubernetes): valid offline, one active replica, hardened,
configured with the dispatcher's own settings, scraped, and alerting exactly like
deploy/prometheus/alerts.yml.

Core kinds are validated with kubernetes-validate's bundled schemas (no cluster, no
network) against a pinned Kubernetes version; the Prometheus Operator kinds, which it has
no schema for, get a structural check here.

The PrometheusRule is generated from alerts.yml; after changing the alerts run
``.venv/bin/python tests/test_kubernetes.py`` to regenerate it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from dispatcher.settings.config import ConfigError, Settings, env_name
from dispatcher.settings.layout import load as load_layout

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS_RULE = KUBERNETES / "prometheusrule.yaml"
# The oldest minor version still in EKS standard support when this was written; kubernetes-
# validate ships its schemas, so the check is offline.
KUBERNETES_VERSION = "1.33.0"
CORE_FILES = (
    "namespace.yaml",
    "serviceaccount.yaml",
    "configmap.yaml",
    "deployment.yaml",
    "service.yaml",
)
OPERATOR_API = "monitoring.coreos.com/v1"

_RULE_HEADER = """\
# GENERATED from deploy/prometheus/alerts.yml - do not edit; change alerts.yml, then run
#   .venv/bin/python tests/test_kubernetes.py
# tests/test_kubernetes.py fails when the two differ. The Prometheus Operator loads this rule
# only if its ruleSelector matches these labels (kube-prometheus-stack: add
# `release: <your helm release>` in the kustomization, or set ruleSelectorNilUsesHelmValues).
"""


# -- generation ----------------------------------------------------------------------------


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (PromQL, descriptions) as ``|`` blocks, so the file stays readable."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


def render_prometheus_rule() -> str:
    """The PrometheusRule manifest holding alerts.yml's groups, unchanged."""
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    rule = {
        "apiVersion": OPERATOR_API,
        "kind": "PrometheusRule",
        "metadata": {
            "name": "sfn-dispatcher",
            "labels": {"app.kubernetes.io/name": "sfn-dispatcher"},
        },
        "spec": {"groups": groups},
    }
    body = yaml.dump(rule, Dumper=_BlockDumper, sort_keys=False, width=100, allow_unicode=True)
    return _RULE_HEADER + body


# -- loading -------------------------------------------------------------------------------


def _load(name: str) -> dict[str, Any]:
    loaded = yaml.safe_load((KUBERNETES / name).read_text(encoding="utf-8"))
    assert isinstance(loaded, dict), name
    return loaded


def _manifests() -> dict[str, dict[str, Any]]:
    """kind -> manifest, for every resource the kustomization applies."""
    found: dict[str, dict[str, Any]] = {}
    for name in _load("kustomization.yaml")["resources"]:
        manifest = _load(name)
        assert manifest["kind"] not in found, f"two {manifest['kind']}s"
        found[manifest["kind"]] = manifest
    return found


def _pod(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = manifests["Deployment"]["spec"]["template"]["spec"]
    return spec


def _container(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (container,) = _pod(manifests)["containers"]
    assert isinstance(container, dict)
    return container


def _kubernetes_validate() -> str:
    beside = Path(sys.executable).parent / "kubernetes-validate"
    found = str(beside) if beside.exists() else shutil.which("kubernetes-validate")
    assert found, "kubernetes-validate is not installed (it is in the dev extra)"
    return found


def _validate(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_kubernetes_validate(), "-k", KUBERNETES_VERSION, "--strict", *map(str, paths)],
        capture_output=True,
        text=True,
        check=False,
        timeout=50,
    )


# -- validity ------------------------------------------------------------------------------


def test_kustomization_applies_every_manifest_in_the_directory() -> None:
    kustomization = _load("kustomization.yaml")
    on_disk = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk
    assert kustomization["namespace"] == _manifests()["Namespace"]["metadata"]["name"]


@pytest.mark.timeout(60)
def test_core_manifests_pass_kubernetes_validate_offline() -> None:
    result = _validate(*(KUBERNETES / name for name in CORE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr
    # Each file really was checked against a schema (an unknown kind only warns).
    for name in CORE_FILES:
        assert f"{name} passed" in result.stdout + result.stderr, name


@pytest.mark.timeout(60)
def test_kubernetes_validate_rejects_a_broken_deployment(tmp_path: Path) -> None:
    """The validator is not a rubber stamp offline: a wrong type and an unknown field fail."""
    deployment = _load("deployment.yaml")
    deployment["spec"]["replicas"] = "one"
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    broken = tmp_path / "deployment.yaml"
    broken.write_text(yaml.safe_dump(deployment), encoding="utf-8")
    result = _validate(broken)
    assert result.returncode != 0, result.stdout + result.stderr


@pytest.mark.timeout(60)
def test_kustomize_build_renders_valid_namespaced_resources(tmp_path: Path) -> None:
    """What `kubectl apply -k` sends: every resource in the namespace, all still valid."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    built = subprocess.run(
        [kubectl, "kustomize", str(KUBERNETES)],
        capture_output=True,
        text=True,
        check=False,
        timeout=50,
    )
    assert built.returncode == 0, built.stderr
    rendered = [d for d in yaml.safe_load_all(built.stdout) if d]
    assert len(rendered) == len(_load("kustomization.yaml")["resources"])
    for manifest in rendered:
        if manifest["kind"] != "Namespace":
            assert manifest["metadata"]["namespace"] == "sfn-dispatcher", manifest["kind"]
        assert manifest["metadata"]["labels"]["app.kubernetes.io/part-of"] == "sfn-dispatcher"
    out = tmp_path / "rendered.yaml"
    out.write_text(built.stdout, encoding="utf-8")
    result = _validate(out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (result.stdout + result.stderr).count(" passed for resource ") == len(CORE_FILES)


# -- several pools from a config file (deploy/kubernetes-pools) ------------------------------

POOLS = ROOT / "deploy" / "kubernetes-pools"


def _kustomize(directory: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize DIRECTORY``: what ``kubectl apply -k`` would send."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    built = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        check=False,
        timeout=50,
    )
    assert built.returncode == 0, built.stderr
    return [d for d in yaml.safe_load_all(built.stdout) if d]


@pytest.mark.timeout(60)
def test_the_config_file_overlay_renders_valid_resources(tmp_path: Path) -> None:
    rendered = _kustomize(POOLS)
    kinds = sorted(m["kind"] for m in rendered)
    assert kinds.count("ConfigMap") == 2, "the settings and the config file"
    for manifest in rendered:
        if manifest["kind"] != "Namespace":
            assert manifest["metadata"]["namespace"] == "sfn-dispatcher", manifest["kind"]
        assert manifest["metadata"]["labels"]["app.kubernetes.io/part-of"] == "sfn-dispatcher"
    out = tmp_path / "rendered.yaml"
    out.write_text(yaml.safe_dump_all(rendered), encoding="utf-8")
    result = _validate(out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (result.stdout + result.stderr).count(" passed for resource ") == len(CORE_FILES) + 1


@pytest.mark.timeout(60)
def test_the_pod_reads_several_pools_from_the_mounted_file_on_a_read_only_root(
    tmp_path: Path,
) -> None:
    """The settings the pod gets - the ConfigMap's variables and the file at DISPATCHER_CONFIG,
    from the volume the rendered ConfigMap fills - load as `run` loads them."""
    rendered = {(m["kind"], m["metadata"]["name"]): m for m in _kustomize(POOLS)}
    deployment = rendered["Deployment", "sfn-dispatcher"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    env = {e["name"]: e["value"] for e in container["env"]}
    path = Path(env["DISPATCHER_CONFIG"])
    [mount] = [m for m in container["volumeMounts"] if path.is_relative_to(m["mountPath"])]
    assert mount["readOnly"] is True
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    files = rendered["ConfigMap", volume["configMap"]["name"]]["data"]
    assert files.keys() == {path.name}
    (tmp_path / path.name).write_text(files[path.name], encoding="utf-8")
    [source] = container["envFrom"]
    variables = rendered["ConfigMap", source["configMapRef"]["name"]]["data"]
    loaded = load_layout(env={**variables, "DISPATCHER_CONFIG": str(tmp_path / path.name)})
    assert [p.name for p in loaded.layout.pools] == ["reports", "exports"]
    assert len(loaded.layout.queues) == 3
    assert loaded.settings.http_host == "0.0.0.0"  # noqa: S104 - the pod's interface
    assert loaded.settings.shutdown_timeout < pod["terminationGracePeriodSeconds"]
    assert "REPLACE-ME" in files[path.name], "every value to replace is marked"


def test_the_base_variables_next_to_the_file_would_be_refused(tmp_path: Path) -> None:
    """Why the overlay takes the pool variables out of the base's ConfigMap."""
    config = tmp_path / "dispatcher.toml"
    config.write_text((POOLS / "dispatcher.toml").read_text(encoding="utf-8"), encoding="utf-8")
    data = _load("configmap.yaml")["data"]
    with pytest.raises(ConfigError, match="cannot be combined with DISPATCHER_CONFIG"):
        load_layout(env={**data, "DISPATCHER_CONFIG": str(config)})
    removed = yaml.safe_load((POOLS / "configmap-patch.yaml").read_text(encoding="utf-8"))
    kept = {k: v for k, v in data.items() if k not in removed["data"]}
    load_layout(env={**kept, "DISPATCHER_CONFIG": str(config)})


def test_core_kinds_are_the_expected_ones() -> None:
    kinds = {_load(name)["kind"] for name in CORE_FILES}
    assert kinds == {"Namespace", "ServiceAccount", "ConfigMap", "Deployment", "Service"}


def test_operator_kinds_have_their_required_fields() -> None:
    """ServiceMonitor and PrometheusRule: no bundled schema, so the fields the operator
    needs are checked by hand."""
    manifests = _manifests()
    for kind in ("ServiceMonitor", "PrometheusRule"):
        manifest = manifests[kind]
        assert manifest["apiVersion"] == OPERATOR_API, kind
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", manifest["metadata"]["name"])
        assert set(manifest) == {"apiVersion", "kind", "metadata", "spec"}, kind
    monitor = manifests["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"]
    assert monitor["endpoints"]
    for endpoint in monitor["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
        assert re.fullmatch(r"\d+s", endpoint["interval"])
        assert int(endpoint["scrapeTimeout"][:-1]) < int(endpoint["interval"][:-1])
    rule = manifests["PrometheusRule"]["spec"]
    assert rule["groups"]
    for group in rule["groups"]:
        assert group["name"]
        assert group["rules"]
        for item in group["rules"]:
            assert ("alert" in item) != ("record" in item), item
            assert isinstance(item["expr"], str)
            assert item["expr"].strip()


# -- one active dispatcher -----------------------------------------------------------------


def test_exactly_one_replica_and_the_old_pod_stops_first() -> None:
    deployment = _manifests()["Deployment"]["spec"]
    assert deployment["replicas"] == 1
    assert deployment["strategy"] == {"type": "Recreate"}, "RollingUpdate would run two"


def test_shutdown_finishes_before_sigkill() -> None:
    manifests = _manifests()
    settings = Settings.load(env=manifests["ConfigMap"]["data"])
    grace = _pod(manifests)["terminationGracePeriodSeconds"]
    assert 0 < settings.shutdown_timeout < grace


# -- probes, hardening, resources ----------------------------------------------------------


def test_probes_use_healthz_for_liveness_and_readyz_for_readiness() -> None:
    container = _container(_manifests())
    (port,) = container["ports"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60, "time for the listing"


def test_pod_runs_non_root_read_only_without_capabilities() -> None:
    manifests = _manifests()
    pod = _pod(manifests)
    container = _container(manifests)
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    (user,) = re.findall(r"^USER (\d+):(\d+)$", dockerfile, re.M)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (
        int(user[0]),
        int(user[1]),
    )
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False
    labels = manifests["Namespace"]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_resources_are_requested_and_memory_is_limited() -> None:
    resources = _container(_manifests())["resources"]
    assert set(resources["requests"]) == {"cpu", "memory"}
    assert "memory" in resources["limits"]


def test_image_is_the_released_one_at_the_package_version() -> None:
    image = _container(_manifests())["image"]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "version"
    ]
    assert image == f"ghcr.io/sfn-dispatcher/sfn-dispatcher:{version}"


# -- IRSA and configuration ----------------------------------------------------------------


def test_service_account_is_annotated_for_irsa_with_a_marked_placeholder() -> None:
    manifests = _manifests()
    account = manifests["ServiceAccount"]
    role = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/REPLACE-ME-[\w+=,.@-]+", role), role
    assert _pod(manifests)["serviceAccountName"] == account["metadata"]["name"]


def test_configmap_holds_only_dispatcher_settings_and_they_load() -> None:
    manifests = _manifests()
    data = manifests["ConfigMap"]["data"]
    known = {env_name(field) for field in Settings.model_fields}
    assert set(data) - {"AWS_REGION"} <= known, sorted(set(data) - known - {"AWS_REGION"})
    assert all(isinstance(v, str) for v in data.values()), "ConfigMap values are strings"
    settings = Settings.load(env=data)  # the dispatcher's own validation
    assert settings.http_host == "0.0.0.0"  # noqa: S104 - the pod's interface
    container = _container(manifests)
    assert [p["containerPort"] for p in container["ports"]] == [settings.http_port]
    assert container["envFrom"] == [
        {"configMapRef": {"name": manifests["ConfigMap"]["metadata"]["name"]}}
    ]
    # Every value to replace is marked, and the region agrees with the ARN and queues.
    for key in ("DISPATCHER_STATE_MACHINE_ARN", "DISPATCHER_REQUEST_QUEUE_URL"):
        assert "REPLACE-ME" in data[key], key
        assert data["AWS_REGION"] in data[key], key


def test_configmap_values_are_validated_like_the_dispatcher_does() -> None:
    data = dict(_manifests()["ConfigMap"]["data"])
    data["DISPATCHER_LIMIT"] = "-1"
    with pytest.raises(ConfigError, match="DISPATCHER_LIMIT"):
        Settings.load(env=data)


# -- scraping and alerts -------------------------------------------------------------------


def test_service_and_service_monitor_reach_the_pod() -> None:
    manifests = _manifests()
    pod_labels = manifests["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = manifests["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert manifests["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # A not-ready dispatcher is still scraped (DispatcherNotReady needs its metrics).
    assert service["spec"]["publishNotReadyAddresses"] is True
    (port,) = service["spec"]["ports"]
    container_ports = {p["name"] for p in _container(manifests)["ports"]}
    assert port["targetPort"] in container_ports
    monitor = manifests["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["endpoints"]] == [port["name"]]
    assert [e["path"] for e in monitor["endpoints"]] == ["/metrics"]
    # The alerts select job="sfn-dispatcher": the job label must come out as that.
    job = service["metadata"]["labels"][monitor["jobLabel"]]
    scrape = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text("utf-8"))
    assert job in {j["job_name"] for j in scrape["scrape_configs"]}
    assert job == "sfn-dispatcher"


def test_prometheus_rule_groups_equal_alerts_yml_exactly() -> None:
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    rule = _manifests()["PrometheusRule"]
    assert rule["spec"]["groups"] == groups, (
        "deploy/kubernetes/prometheusrule.yaml drifted from deploy/prometheus/alerts.yml: "
        "run `.venv/bin/python tests/test_kubernetes.py`"
    )


def test_prometheus_rule_file_is_what_the_generator_writes() -> None:
    """Also byte for byte, so the header and layout are the generator's too."""
    assert PROMETHEUS_RULE.read_text(encoding="utf-8") == render_prometheus_rule()


if __name__ == "__main__":
    PROMETHEUS_RULE.write_text(render_prometheus_rule(), encoding="utf-8")
    print(f"wrote {PROMETHEUS_RULE.relative_to(ROOT)} from {ALERTS.relative_to(ROOT)}")
