"""The README stays true: every setting and every metric the code has is documented."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from dispatcher.config import ConfigError, Settings, env_name
from dispatcher.layout import parse
from dispatcher.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
USER_DOCS = README + "".join(page.read_text() for page in sorted((ROOT / "docs").glob("*.md")))
"""The README and the pages under docs/: a metric of one feature may be listed on its page."""


def test_every_setting_is_in_the_configuration_table() -> None:
    rows = set(re.findall(r"^\| `(DISPATCHER_[A-Z_]+)` \| `--([a-z-]+)` \|", README, re.M))
    expected = {(env_name(name), name.replace("_", "-")) for name in Settings.model_fields}
    assert expected <= rows, f"undocumented: {sorted(expected - rows)}"
    assert rows <= expected, f"documented but gone: {sorted(rows - expected)}"


def test_every_metric_is_in_the_metrics_table() -> None:
    documented = set(re.findall(r"^\| `(dispatcher_[a-z_]+)` \|", USER_DOCS, re.M))
    metrics = Metrics()
    exported = set()
    for family in metrics.registry.collect():
        if not family.name.startswith("dispatcher_"):
            continue  # process_* and python_*: prometheus_client's own, documented there
        suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
        exported.add(family.name + suffix)
    assert exported <= documented, f"undocumented: {sorted(exported - documented)}"
    assert documented <= exported, f"documented but gone: {sorted(documented - exported)}"


def test_quick_start_is_the_two_commands() -> None:
    quick = README.split("## Quick start", 1)[1].split("```", 2)[1]
    commands = [line.split("#")[0].strip() for line in quick.splitlines()[1:] if line.strip()]
    assert commands == ["make demo", "make test"]


def test_the_config_file_example_loads() -> None:
    """The README's complete config file is accepted, with every pool and queue it shows."""
    example = README.split("```toml\n", 1)[1].split("```", 1)[0]
    file_settings, loaded = parse(tomllib.loads(example), "README.md")
    assert [p.name for p in loaded.pools] == ["reports", "exports"]
    assert [q.priority for q in loaded.queues] == [10, 0, 0]
    assert loaded.queues[2].pools == ("reports", "exports")
    assert loaded.pool("reports").per_key_limit == 3
    assert file_settings["start_rate"] == 100


def test_a_config_file_mistake_names_where_it_is() -> None:
    """A wrong value and an unknown pool are both reported, each with its place."""
    bad = tomllib.loads(
        '[pools.a]\nstate_machine_arn = "arn:aws:states:us-east-1:123456789012:stateMachine:a"\n'
        'limit = -1\nlimti = 3\n[[queues]]\nurl = "https://sqs.us-east-1.amazonaws.com/1/q"\n'
        'pool = "b"\n'
    )
    with pytest.raises(ConfigError) as info:
        parse(bad, "f.toml")
    message = str(info.value)
    assert "[pools.a] limit=-1 is invalid" in message
    assert "[pools.a] limti: unknown key" in message
    assert "[[queues]] #1: unknown pool(s) b; defined are a" in message


def test_the_simulation_figures_come_from_the_stored_results() -> None:
    """The README's "How we test" figures are the ones `make simulate` stored."""
    results = Path(__file__).resolve().parent.parent / "sim" / "results"
    run = json.loads((results / "simulate.json").read_text())
    teeth = json.loads((results / "teeth.json").read_text())
    failed = run["failed_seeds"]
    held = run["seeds"] - len(failed)
    if failed:
        listed = ", ".join(str(seed) for seed in failed)
        row = (
            f"| seeds run | {run['seeds']:,}: {held:,} hold every invariant; "
            f"{len(failed)} fail (seeds {listed})"
        )
    else:
        row = f"| seeds run | {run['seeds']:,}, 0 violations |"
    assert row in README
    assert (
        f"| faults injected | {run['faults_injected']:,} ({run['faults_per_seed']} per seed), "
        f"over {run['requests']:,} requests and {run['virtual_hours']} h of virtual time |"
    ) in README
    assert f"| CPU | {run['cpu_seconds']} s for the {run['seeds']:,} seeds" in README
    for bug in teeth.values():
        seed, needed = bug["found_at_seed"], bug["seeds_needed"]
        plural = "seed" if needed == 1 else "seeds"
        kinds = ", ".join(f"`{k}`" for k in bug["violations"])
        assert f"found by seed {seed} ({needed} {plural}): {kinds} |" in README, bug["issue"]


def test_the_parent_definition_in_the_readme_is_the_sandboxs() -> None:
    """The copy-pasteable parent is the one the sandbox runs (and the tests drive)."""
    from dispatcher.sandbox.provision import parent_definition  # noqa: PLC0415

    section = README.split("## From inside a workflow", 1)[1]
    shown = json.loads(section.split("```json\n", 1)[1].split("\n```", 1)[0])
    url = shown["States"]["Children"]["ItemProcessor"]["States"]["RunChild"]["Parameters"][
        "QueueUrl"
    ]
    assert shown == parent_definition(url)


def test_the_configuration_table_gives_each_settings_default() -> None:
    rows = dict(
        re.findall(r"^\| `(DISPATCHER_[A-Z_]+)` \| `--[a-z-]+` \| ([^|]+) \|", README, re.M)
    )
    wrong = {}
    for name, field in Settings.model_fields.items():
        shown = rows[env_name(name)].strip()
        default = field.default
        if default is None or not shown.startswith("`"):
            continue  # unset, required or described in words (quota)
        value = default.value if hasattr(default, "value") else default
        text = (
            str(value).lower()
            if isinstance(value, bool)
            else f"{value:g}"
            if isinstance(value, float)
            else str(value)
        )
        if shown.strip("`") != text:
            wrong[env_name(name)] = (shown, text)
    assert wrong == {}
