"""The ``sfn-dispatcher`` command's errors, exit statuses and ``--help`` texts.

Exit statuses are checked by running the command as a subprocess, as a user or a supervisor
sees it: one line per problem on stderr, no traceback, a status that tells the kinds apart.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.sandbox import free_port
from dispatcher.cli.check import CHECK_FIELDS
from dispatcher.cli.main import build_parser, main
from dispatcher.errors import EXIT_AWS, EXIT_STATUS_HELP, EXIT_STATUSES, EXIT_USAGE
from dispatcher.settings.config import Settings

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parent.parent
ARN = "arn:aws:states:us-east-1:123456789012:stateMachine:orders"
QUEUE = "https://sqs.us-east-1.amazonaws.com/123456789012/"


def command(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m dispatcher ARGV`` with no DISPATCHER_* or AWS_ENDPOINT_URL but ``env``."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("DISPATCHER_") and k != "AWS_ENDPOINT_URL"
    }
    return subprocess.run(
        [sys.executable, "-m", "dispatcher", *argv],
        env=base | env,
        capture_output=True,
        text=True,
        timeout=25,
        check=False,
    )


def error_lines(result: subprocess.CompletedProcess[str], name: str) -> list[str]:
    """The problems on stderr, one per line, with the common prefix removed."""
    prefix = f"sfn-dispatcher {name}: error: "
    lines = result.stderr.splitlines()
    assert all(line.startswith(prefix) for line in lines), result.stderr
    return [line.removeprefix(prefix) for line in lines]


# --- errors and exit statuses ----------------------------------------------------------------


def test_bad_settings_exit_2_one_line_each_named_as_given() -> None:
    result = command(
        "run",
        "--state-machine-arn",
        ARN,
        "--request-queue-url",
        QUEUE + "requests",
        "--limit",
        "-1",
        DISPATCHER_EVENTS_QUEUE_URL=QUEUE + "events",
        DISPATCHER_HTTP_PORT="eighty",
    )
    assert result.returncode == EXIT_USAGE
    assert error_lines(result, "run") == [
        "--limit='-1' is invalid: Input should be greater than or equal to 0",
        "DISPATCHER_HTTP_PORT='eighty' is invalid: Input should be a valid integer, unable to "
        "parse string as an integer",
    ]


def test_config_file_mistakes_exit_2_one_line_each_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "pools.toml"
    path.write_text(
        f"""
[dispatcher]
events_queue_url = "{QUEUE}events"
reconcile_interval = "often"

[pools.orders]
state_machine_arn = "{ARN}"
limit = -1

[[queues]]
url = "{QUEUE}requests"
pool = "order"
"""
    )
    result = command("run", "--config", str(path), DISPATCHER_LIMIT="3")
    assert result.returncode == EXIT_USAGE
    assert error_lines(result, "run") == [
        f"config file {path}: [pools.orders] limit=-1 is invalid: Input should be greater "
        "than or equal to 0",
        f"config file {path}: [[queues]] #1: unknown pool(s) order; defined are orders",
        "DISPATCHER_LIMIT cannot be combined with --config: set limit per pool in the config "
        "file's [pools.NAME] tables",
        f"config file {path}: [dispatcher] reconcile_interval='often' is invalid: Input should "
        "be a valid number, unable to parse string as a number",
    ]


def test_an_unreachable_endpoint_at_start_up_exits_3() -> None:
    """Not a usage error: the settings are fine, AWS is not there."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    result = command(
        "run",
        "--state-machine-arn",
        ARN,
        "--request-queue-url",
        QUEUE + "requests",
        "--events-queue-url",
        QUEUE + "events",
        "--http-port",
        "0",
        "--log-level",
        "ERROR",
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",  # noqa: S106 - nothing listens there
        AWS_DEFAULT_REGION="us-east-1",
    )
    assert result.returncode == EXIT_AWS, result.stderr
    [line] = error_lines(result, "run")
    assert line.startswith(f"cannot reach Step Functions at {endpoint}: ")
    assert "Traceback" not in result.stderr


def test_an_unknown_flag_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exited:
        main(["run", "--no-such-flag"])
    assert exited.value.code == EXIT_USAGE


# --- help -------------------------------------------------------------------------------------


def sub_commands() -> dict[str, argparse.ArgumentParser]:
    """Every sub-command's parser, by name."""
    parser = build_parser()
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def flat(text: str) -> str:
    """Help text with its line wrapping undone."""
    return " ".join(text.split())


def _anchors(page: Path) -> set[str]:
    """The anchors of a docs page's headings: an explicit ``{#id}``, else mkdocs' slug."""
    anchors = set()
    for line in page.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#") or line.startswith("#!"):
            continue
        heading = line.lstrip("#").strip()
        explicit = re.search(r"\{#([\w-]+)\}\s*$", heading)
        if explicit:
            anchors.add(explicit.group(1))
            continue
        slug = re.sub(r"[^\w\s-]", "", heading.lower())
        anchors.add(re.sub(r"[-\s]+", "-", slug).strip("-"))
    return anchors


def test_every_docs_page_named_in_a_help_text_exists() -> None:
    """Help texts point at docs pages (``docs/pools.md``, ``docs/x.md#heading``): each page
    exists, and each anchor is one of its headings."""
    texts = {"": build_parser().format_help()}
    texts |= {name: parser.format_help() for name, parser in sub_commands().items()}
    named = {
        (name, target)
        for name, text in texts.items()
        for target in re.findall(r"docs/[\w/.-]+\.md(?:#[\w-]+)?", flat(text))
    }
    assert {target.split("#")[0] for _, target in named} >= {
        "docs/configuration.md",
        "docs/reference/cli.md",
        "docs/pools.md",
        "docs/task-tokens.md",
    }
    missing = []
    for name, target in sorted(named):
        path, _, anchor = target.partition("#")
        page = ROOT / path
        if not page.is_file() or (anchor and anchor not in _anchors(page)):
            missing.append((name, target))
    assert missing == []


def test_exit_statuses_are_in_the_help_and_the_reference() -> None:
    for parser in (build_parser(), sub_commands()["run"], sub_commands()["check"]):
        assert flat(EXIT_STATUS_HELP) in flat(parser.format_help())
    codes = [code for code, _ in EXIT_STATUSES]
    assert codes == [0, 1, 2, 3, 4, 130]
    assert {EXIT_USAGE, EXIT_AWS} <= set(codes)
    assert all(f"; {code} " in EXIT_STATUS_HELP for code in codes[1:])


def test_every_setting_shows_what_it_accepts_and_its_default() -> None:
    run = sub_commands()["run"]
    actions = {a.dest: a for a in run._actions}
    for name in Settings.model_fields:
        text = actions[name].help or ""
        assert f"[DISPATCHER_{name.upper()};" in text
        assert "default: " in text or "required" in text, name
        assert actions[name].metavar != "VALUE", name
    assert actions["log_level"].metavar == "{DEBUG,INFO,WARNING,ERROR}"
    assert actions["log_format"].metavar == "{auto,json,console}"
    assert actions["input_format"].metavar == "{json,envelope}"
    assert actions["stop_orphaned_children"].metavar == "{true,false}"
    assert "0..20; default: 20]" in (actions["receive_wait_seconds"].help or "")
    assert "default: false]" in (actions["stop_orphaned_children"].help or "")
    assert "; required]" in (actions["events_queue_url"].help or "")


def test_check_takes_only_the_flags_that_matter_to_it() -> None:
    check = sub_commands()["check"]
    dests = {a.dest for a in check._actions} - {"help", "json"}
    assert dests == set(CHECK_FIELDS)
    assert {"log_level", "http_port", "reconcile_interval"}.isdisjoint(dests)
    with pytest.raises(SystemExit) as exited:
        main(["check", "--log-level", "DEBUG"])
    assert exited.value.code == EXIT_USAGE
