"""The docs stay true: the README is a front door, the reference pages are what the code
declares, every invariant the code cites has its heading, and every figure is a stored one."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from dispatcher.daemon.metrics import Metrics
from dispatcher.settings.config import ConfigError, Settings, env_name
from dispatcher.settings.layout import parse
from scripts import reference
from tests.test_bench import _FIGURE, RESULTS, _stored, _stored_numbers
from tests.test_cli import _anchors

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = ROOT / "docs"


def _page(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def _user_docs() -> dict[str, str]:
    """The README and every page of the docs site (the benchmarks' own summary aside)."""
    pages = {"README.md": README}
    for path in sorted(DOCS.rglob("*.md")):
        if "bench" not in path.relative_to(DOCS).parts:
            pages[str(path.relative_to(ROOT))] = path.read_text(encoding="utf-8")
    return pages


def _prose(text: str) -> str:
    """A page's prose: without headings, fenced blocks, inline code and HTML comments."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"^#.*$", "", text, flags=re.M)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def test_the_readme_is_a_front_door_of_at_most_250_lines() -> None:
    assert len(README.splitlines()) <= 250


def test_quick_start_is_the_two_commands() -> None:
    quick = README.split("## Quick start", 1)[1].split("```", 2)[1]
    commands = [line.split("#")[0].strip() for line in quick.splitlines()[1:] if line.strip()]
    assert commands == ["make demo", "make test"]


def test_the_readme_says_how_to_reach_the_command_after_make_demo() -> None:
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert ". .venv/bin/activate" in quick
    assert ".venv/bin/sfn-dispatcher" in quick


def test_every_local_link_of_the_readme_resolves() -> None:
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), target


def test_the_reference_pages_are_what_the_code_declares() -> None:
    """docs/reference/*.md equal the generator's output (`make docs` rewrites them)."""
    stale = [
        str(path.relative_to(ROOT))
        for path, content in reference.render().items()
        if not path.exists() or path.read_text(encoding="utf-8") != content
    ]
    assert stale == [], f"run `make docs` and commit: {stale}"


def test_every_setting_and_metric_is_in_the_reference() -> None:
    settings = _page("reference/settings.md")
    for name in Settings.model_fields:
        assert f"| `{name}` | `{env_name(name)}` |" in settings, name
    metrics = _page("reference/metrics.md")
    for family in Metrics().registry.collect():
        if family.name.startswith("dispatcher_"):
            suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
            assert f"| `{family.name}{suffix}` |" in metrics, family.name
    starts = next(line for line in metrics.splitlines() if "`dispatcher_starts_total`" in line)
    assert "in\\_doubt" in starts, "every outcome of a start is documented"


def test_every_invariant_the_code_cites_has_its_heading_in_the_design_page() -> None:
    """ "invariant N" in dispatcher/, sim/ and bench/ resolves to docs/design.md#invariant-N."""
    design = _page("design.md")
    headings = dict(re.findall(r"^### Invariant (\d+): .* \{#(invariant-\d+)\}$", design, re.M))
    assert sorted(headings, key=int) == [str(n) for n in range(1, 9)]
    assert all(anchor == f"invariant-{n}" for n, anchor in headings.items())
    cited = set()
    for folder in ("dispatcher", "sim", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            cited |= set(re.findall(r"\binvariants? (\d+)", text, re.IGNORECASE))
    assert cited, "the code cites invariants by number"
    assert cited <= set(headings), sorted(cited - set(headings))


def test_user_docs_cite_no_issue_numbers_or_internal_words() -> None:
    """Nothing a reader outside the project cannot follow: issue numbers, numbered bugs,
    "teeth", or an invariant number that is not a link to its heading."""
    words = re.compile(
        r"(?<![\w/-])#\d+\b|\bissues? \d+|\bbugs? \d|\bteeth\b|(?<!\[)\binvariant \d", re.IGNORECASE
    )
    found = {
        name: sorted(set(words.findall(_prose(text))))
        for name, text in _user_docs().items()
        if words.search(_prose(text))
    }
    assert found == {}


def test_the_config_file_example_loads() -> None:
    """The pools page's complete config file is accepted, with every pool and queue it shows."""
    example = _page("pools.md").split("```toml\n", 1)[1].split("```", 1)[0]
    file_settings, loaded = parse(tomllib.loads(example), "docs/pools.md")
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
    """The testing page's figures are the ones `make simulate` and `make mutmut` stored."""
    page = _page("testing.md")
    results = ROOT / "sim" / "results"
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
    assert row in page
    assert (
        f"| faults injected | {run['faults_injected']:,} ({run['faults_per_seed']} per seed), "
        f"over {run['requests']:,} requests and {run['virtual_hours']} h of virtual time |"
    ) in page
    assert f"| CPU | {run['cpu_seconds']} s for the {run['seeds']:,} seeds" in page
    for name, defect in teeth.items():
        seed, needed = defect["found_at_seed"], defect["seeds_needed"]
        plural = "seed" if needed == 1 else "seeds"
        kinds = ", ".join(f"`{k}`" for k in defect["violations"])
        assert f"| `{name}` put back (" in page, name
        assert f"found by seed {seed} ({needed} {plural}): {kinds} |" in page, name
    mutmut = json.loads((results / "mutmut.json").read_text())
    assert f"{mutmut['score_text']} ({mutmut['score']:.1%}, {mutmut['tool']})" in page, (
        "the ledger's mutation score is the stored one"
    )


def test_the_readmes_figures_are_stored_benchmark_figures() -> None:
    """A figure the README quotes from the benchmarks is a number bench/results/ holds."""
    why = README.split("## Why", 1)[1].split("\n## ", 1)[0]
    numbers = [
        n for path in RESULTS.glob("*.json") for n in _stored_numbers(json.loads(path.read_text()))
    ]
    quoted = re.findall(r"(\d+\.\d+)\s+utilisation", why)
    assert quoted, "the README quotes the measured utilisation"
    figures = [*quoted, *(f for f, _ in _FIGURE.findall(why))]
    unstored = [f for f in figures if not _stored(f, "", numbers)]
    assert unstored == []


def test_every_alerts_runbook_url_is_a_docs_heading() -> None:
    """The alert rules' runbook links point at a page of the docs site and one of its
    headings (the README no longer holds them)."""
    prefix = "https://github.com/sfn-dispatcher/sfn-dispatcher/blob/main/"
    rules = (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text(encoding="utf-8")
    urls = re.findall(r"runbook_url: (\S+)", rules)
    assert urls
    for url in urls:
        assert url.startswith(prefix + "docs/"), url
        path, _, anchor = url.removeprefix(prefix).partition("#")
        assert (ROOT / path).is_file(), url
        assert anchor in _anchors(ROOT / path), url
