"""The shipped alert rules: valid, unit-tested with promtool, and built on metrics that exist.

`promtool check rules` and `promtool test rules` (deploy/prometheus/alerts_test.yml) run
here so CI runs them; a rename of a metric the rules read breaks
`test_rules_read_only_metrics_the_dispatcher_exports`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from dispatcher.core.shared_limits import SharedLimitConfig, SharedLimits
from dispatcher.daemon.http import build_app
from dispatcher.daemon.pool import publish_shared
from dispatcher.daemon.reconcile import Reconciler
from tests.fakes import build_world

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "alerts.yml"
RULE_TESTS = PROMETHEUS / "alerts_test.yml"
REPO_URL = "https://github.com/sfn-dispatcher/sfn-dispatcher/blob/main/"
SEVERITIES = {"critical", "warning", "info"}
# Series Prometheus makes itself (scrape health), not the dispatcher.
PROMETHEUS_SERIES = {"up"}
_SERIES_RE = re.compile(r"\b((?:dispatcher|process|python)_[a-z0-9_]+|up)\b(\{[^}]*\})?")


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package 'prometheus'; .ci/run installs it)")
    return promtool


def test_rules_and_config_pass_promtool_check() -> None:
    promtool = _promtool()
    for args in (["check", "rules", RULES.name], ["check", "config", "prometheus.yml"]):
        done = subprocess.run(
            [promtool, *args], cwd=PROMETHEUS, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr
    # prometheus.yml loads the rules, by a path relative to itself (compose mounts the folder).
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text(encoding="utf-8"))
    assert config["rule_files"] == [RULES.name]


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    done = subprocess.run(
        [_promtool(), "test", "rules", RULE_TESTS.name],
        cwd=PROMETHEUS,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)  # comments in code blocks
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


def test_every_alert_has_for_severity_annotations_and_a_runbook_that_exists() -> None:
    tested = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"]
    firing: dict[str, list[dict[str, str]]] = {}
    quiet: set[str] = set()
    for case in tested:
        for check in case["alert_rule_test"]:
            name = check["alertname"]
            if check["exp_alerts"]:
                firing.setdefault(name, []).extend(a["exp_labels"] for a in check["exp_alerts"])
            else:
                quiet.add(name)
    rules = _rules()
    assert len(rules) >= 10
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"Dispatcher[A-Z][A-Za-z]+", name), name
        assert rule.get("for"), f"{name} has no for:"
        assert rule["labels"]["severity"] in SEVERITIES, name
        notes = rule["annotations"]
        assert notes["summary"], name
        assert notes["description"], name
        url = notes["runbook_url"]
        assert url.startswith(REPO_URL), f"{name}: {url}"
        path, _, anchor = url.removeprefix(REPO_URL).partition("#")
        assert anchor in _anchors(ROOT / path), f"{name}: {path} has no section #{anchor}"
        assert name in firing, f"{name} has no promtool case in which it fires"
        assert name in quiet, f"{name} has no promtool case in which it stays quiet"
        if any("pool" in labels for labels in firing[name]):
            assert "{{ $labels.pool }}" in notes["summary"], f"{name}: summary names no pool"
        else:
            text = notes["summary"] + notes["description"]
            assert "$labels.instance" in text or "$labels.job" in text, name


async def _exported() -> dict[str, set[str]]:
    """Series name -> label names, from the /metrics of a dispatcher's app after a reconcile,
    its pool using a named limit (whose series exist only then)."""
    world = build_world()
    await Reconciler(
        world.settings, world.clients, world.pool, world.metrics, world.health
    ).run_once()
    shared = SharedLimits(
        [SharedLimitConfig(name="partner-api", limit=2)],
        {world.pool.name: {"partner-api": 1}},
        lambda _: world.pool.ledger,
    )
    publish_shared(shared, world.metrics, lambda _: 0)
    async with TestClient(TestServer(build_app(world.health, world.metrics, dict))) as client:
        text = await (await client.get("/metrics")).text()
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


async def test_rules_read_only_metrics_the_dispatcher_exports() -> None:
    exported = await _exported()
    used: set[str] = set()
    for rule in _rules():
        for name, matchers in _SERIES_RE.findall(rule["expr"]):
            used.add(name)
            if name in PROMETHEUS_SERIES:
                continue
            assert name in exported, f"{rule['alert']} reads {name}, which /metrics lacks"
            labels = set(re.findall(r"(\w+)\s*[=!]", matchers)) - {"job", "instance"}
            assert labels <= exported[name], f"{rule['alert']}: {name} has no {labels}"
    assert {"dispatcher_aws_calls_total", "process_start_time_seconds", "up"} <= used
    assert {"dispatcher_shared_limit_in_use", "dispatcher_shared_limit_blocked"} <= used
