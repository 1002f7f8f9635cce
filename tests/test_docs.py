"""The README stays true: every setting and every metric the code has is documented."""

from __future__ import annotations

import re
from pathlib import Path

from dispatcher.config import Settings, env_name
from dispatcher.metrics import Metrics

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_in_the_configuration_table() -> None:
    rows = set(re.findall(r"^\| `(DISPATCHER_[A-Z_]+)` \| `--([a-z-]+)` \|", README, re.M))
    expected = {(env_name(name), name.replace("_", "-")) for name in Settings.model_fields}
    assert expected <= rows, f"undocumented: {sorted(expected - rows)}"
    assert rows <= expected, f"documented but gone: {sorted(rows - expected)}"


def test_every_metric_is_in_the_metrics_table() -> None:
    documented = set(re.findall(r"^\| `(dispatcher_[a-z_]+)` \|", README, re.M))
    metrics = Metrics()
    exported = set()
    for family in metrics.registry.collect():
        suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
        exported.add(family.name + suffix)
    assert exported <= documented, f"undocumented: {sorted(exported - documented)}"
    assert documented <= exported, f"documented but gone: {sorted(documented - exported)}"


def test_quick_start_is_the_two_commands() -> None:
    quick = README.split("## Quick start", 1)[1].split("```", 2)[1]
    commands = [line.split("#")[0].strip() for line in quick.splitlines()[1:] if line.strip()]
    assert commands == ["make demo", "make test"]
