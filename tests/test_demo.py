"""``python -m devtools demo``: the command line, the parents' inputs, and the closing summary
computed from made-up outcomes; one run of the real thing (parents included) in a child
process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.__main__ import DEV_MODULES
from devtools.demo import (
    DemoResult,
    ParentOutcome,
    Plan,
    deadline_line,
    default_timeout,
    demo_requests,
    new_log_file,
    parent_inputs,
    plan_from,
    summary,
)
from devtools.records import Execution
from devtools.sandbox import child_key, find_executable
from dispatcher.cli.main import build_parser
from dispatcher.errors import UserError

REPO = Path(__file__).resolve().parent.parent


def plan(*argv: str) -> Plan:
    """The plan of ``sfn-dispatcher demo ARGV``."""
    return plan_from(build_parser(DEV_MODULES).parse_args(["demo", *argv]))


# --- the command line ------------------------------------------------------------------------


def test_plain_requests_by_default_and_none_with_parents() -> None:
    assert (plan().count, plan().parents) == (200, 0)
    with_parents = plan("--parents", "3", "--items", "5")
    assert (with_parents.count, with_parents.parents, with_parents.items) == (0, 3, 5)
    both = plan("--parents", "2", "--count", "50")
    assert (both.count, both.parents, both.items) == (50, 2, 4)


def test_the_timeout_is_given_or_grows_with_the_work() -> None:
    assert plan("--timeout", "30").timeout == 30
    assert default_timeout(0, 12, (1, 3), 3) == 60 + 3 * 12 * 4 / 3
    assert plan("--parents", "10", "--items", "10").timeout > plan("--parents", "1").timeout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--count", "0"], "nothing to run"),
        (["--count", "-1"], "--count must be >= 0"),
        (["--limit", "0"], "--limit >= 1"),
        (["--parents", "-1"], "--parents must be >= 0"),
        (["--parents", "1", "--items", "0"], "--items >= 1"),
        (["--parents", "1", "--timeout", "0"], "--timeout 0 is invalid"),
        (["--seconds", "3:1"], "MIN must not exceed MAX"),
    ],
)
def test_bad_flags_are_user_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        plan(*argv)


def test_each_parent_maps_whole_seconds_and_its_last_child_fails() -> None:
    inputs = parent_inputs(3, 4, (0.5, 2.5), seed=7)
    assert list(inputs) == ["parent-001", "parent-002", "parent-003"]
    for given in inputs.values():
        children = given["items"]
        assert len(children) == 4
        assert all(isinstance(c["seconds"], int) and 0 <= c["seconds"] <= 2 for c in children)
        assert [c.get("fail", False) for c in children] == [False, False, False, True]
    assert parent_inputs(3, 4, (0.5, 2.5), seed=7) == inputs, "a seed replays"
    assert parent_inputs(1, 1, (1, 1))["parent-001"] == {"items": [{"seconds": 1, "fail": True}]}


@pytest.mark.parametrize(
    ("seconds", "allowed"),
    [((1, 3), {1, 2, 3}), ((0.5, 2.5), {1, 2}), ((1.2, 1.8), {1, 2}), ((0, 0.4), {0})],
)
def test_plain_requests_wait_whole_seconds(seconds: tuple[float, float], allowed: set[int]) -> None:
    """AWS documents a Wait state's SecondsPath as an integer: never send 2.3."""
    bodies = [json.loads(item.body) for item in demo_requests(200, seconds, 0.05, seed=3)]
    assert all(type(body["seconds"]) is int for body in bodies), bodies[:5]
    assert {body["seconds"] for body in bodies} <= allowed
    assert sum(body.get("fail", False) for body in bodies) == 10
    assert all(set(body) <= {"seconds", "fail"} for body in bodies)


def test_each_demo_gets_its_own_log_file() -> None:
    first, second = new_log_file(), new_log_file()
    try:
        assert first != second
        assert first.name.startswith("sfn-dispatcher-demo-")
        assert first.suffix == ".log"
        assert first.stat().st_mode & 0o777 == 0o600
    finally:
        first.unlink()
        second.unlink()
    assert plan("--log-file", "demo.log").log_file == Path("demo.log")
    assert plan().log_file is None, "no fixed default path: run() makes a new file"


def _make_dry_run(target: str, tmp_path: Path) -> str:
    done = subprocess.run(
        [
            "make",
            "--dry-run",
            "--always-make",
            target,
            f"VENV={tmp_path / 'venv'}",
            f"EMULATOR_VENV={tmp_path / 'emulator'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout


def test_make_demo_installs_no_dev_extra(tmp_path: Path) -> None:
    """The first `make demo` installed mypy, cfn-lint, matplotlib, hypothesis: minutes."""
    demo = _make_dry_run("demo", tmp_path)
    assert "pip install --quiet --disable-pip-version-check -e '.[demo]'" in demo
    assert "[dev]" not in demo, demo
    assert "-r requirements-emulator.txt" in demo
    assert "-m devtools demo" in demo
    for target in ("test", "lint"):
        assert "-e '.[dev]'" in _make_dry_run(target, tmp_path), target


# --- what a parent saw -----------------------------------------------------------------------


def test_a_parent_output_gives_its_results_and_the_errors_it_caught() -> None:
    output = json.dumps(
        {
            "items": [{"seconds": 1}, {"seconds": 1, "fail": True}],
            "results": [
                {"seconds": 1},
                {"seconds": 1, "fail": True, "error": {"Error": "DemoFailure", "Cause": "x"}},
            ],
        }
    )
    outcome = ParentOutcome.of("parent-001", "SUCCEEDED", output)
    assert outcome == ParentOutcome("parent-001", "SUCCEEDED", 2, ("DemoFailure",))
    assert outcome.as_expected(2)
    assert not outcome.as_expected(3)
    assert ParentOutcome.of("p", "RUNNING", None) == ParentOutcome("p", "RUNNING", None, ())
    assert ParentOutcome.of("p", "SUCCEEDED", "not json").results is None
    assert ParentOutcome.of("p", "SUCCEEDED", '{"results": 3}').results is None
    timed_out = ParentOutcome.of(
        "p",
        "SUCCEEDED",
        json.dumps({"results": [{"error": {"Error": "Dispatcher.ChildTimedOut"}}]}),
    )
    assert not timed_out.as_expected(1), "only the deliberate failure is as designed"


# --- the summary -----------------------------------------------------------------------------


def result(**changes: object) -> DemoResult:
    """A run of 2 parents x 3 children next to 22 requests, everything as designed."""
    fields: dict[str, object] = {
        "requests": 22,
        "succeeded": 19,
        "failed": 1,
        "dead_lettered": 2,
        "limit": 5,
        "max_concurrency": 5,
        "seconds": 20.1,
        "items": 3,
        "parents": (
            ParentOutcome("parent-001", "SUCCEEDED", 3, ("DemoFailure",)),
            ParentOutcome("parent-002", "SUCCEEDED", 3, ("DemoFailure",)),
        ),
        "children": 6,
    }
    return DemoResult(**{**fields, **changes})  # type: ignore[arg-type]


def test_the_summary_of_a_run_as_designed() -> None:
    done = result()
    assert done.ok
    assert summary(done).splitlines() == [
        "22 requests in 20.1 s: 19 succeeded, 1 failed (asked to), 2 dead-lettered (bad input).",
        "2 parents, 3 children each (the last asked to fail), in 20.1 s: 2 SUCCEEDED; 2 of 2 "
        "with 3 results and the failing child's error caught (DemoFailure x2).",
        "  parent-001  SUCCEEDED  3 results, caught DemoFailure",
        "  parent-002  SUCCEEDED  3 results, caught DemoFailure",
        "Maximum concurrency from the executions' own start/stop dates: 5 (limit 5: held), "
        "across the parents' 6 children and the requests.",
    ]


def test_without_parents_the_summary_is_the_plain_one() -> None:
    plain = result(parents=(), children=0, items=0)
    assert summary(plain).splitlines() == [
        "22 requests in 20.1 s: 19 succeeded, 1 failed (asked to), 2 dead-lettered (bad input).",
        "Maximum concurrency from the executions' own start/stop dates: 5 (limit 5: held).",
    ]
    assert plain.ok


def test_parents_left_waiting_are_named_and_fail_the_run() -> None:
    waiting = result(
        requests=0,
        parents=(
            ParentOutcome("parent-001", "RUNNING", None, ()),
            ParentOutcome("parent-002", "SUCCEEDED", 3, ("DemoFailure",)),
        ),
        timed_out=90.0,
    )
    assert not waiting.ok
    lines = summary(waiting).splitlines()
    assert lines[0].endswith(
        "1 RUNNING, 1 SUCCEEDED; 1 of 2 with 3 results and the failing "
        "child's error caught (DemoFailure x1)."
    )
    assert "  parent-001  RUNNING    no output" in lines
    assert lines[-1].startswith("Gave up waiting after 90 s: 1 parent(s) still RUNNING.")
    assert "never answered their task tokens" in lines[-1]


def test_an_exceeded_limit_or_a_parent_gone_wrong_fails_the_run() -> None:
    over = result(max_concurrency=6)
    assert not over.ok
    assert "6 (limit 5: EXCEEDED)" in summary(over)
    wrong = result(
        parents=(
            ParentOutcome("parent-001", "FAILED", None, ()),
            ParentOutcome("parent-002", "SUCCEEDED", 3, ("DemoFailure",)),
        )
    )
    assert not wrong.ok


def test_many_parents_show_only_those_not_as_designed() -> None:
    parents = tuple(
        ParentOutcome(f"parent-{i:03d}", "SUCCEEDED", 3, ("DemoFailure",)) for i in range(1, 31)
    )
    parents += (ParentOutcome("parent-031", "SUCCEEDED", 2, ("DemoFailure",)),)
    lines = summary(result(parents=parents)).splitlines()
    assert "  parent-031  SUCCEEDED  2 results, caught DemoFailure" in lines
    assert "  (the other 30 as designed)" in lines
    assert not any(line.startswith("  parent-001") for line in lines)


def test_the_line_before_the_run_says_what_will_happen() -> None:
    """Not "giving up after 300 s" before anything ran: the timeout is a bound."""
    line = deadline_line(plan("--count", "200", "--parents", "2", "--items", "3"))
    assert line.startswith(
        "running 200 requests and 2 parents of 3 children at limit 10; the summary follows "
        "when everything has finished, or after "
    )
    assert "giving up" not in line


def test_children_of_parents_are_told_apart_from_plain_requests() -> None:
    from devtools.demo import _split  # noqa: PLC0415 - a private helper, tested alone

    inputs = parent_inputs(1, 2, (1, 1))
    arns = {"parent-001": "arn:aws:states:us-east-1:000000000000:execution:parent:parent-001"}
    keys = [child_key(arns["parent-001"], i) for i in (0, 1)]
    named = [
        Execution(name, f"arn:{name}", "SUCCEEDED", 0.0, 1.0)
        for name in (*keys, "0b9c4b1e-5a4e-4e47-9d4b-7c2c5a0f1e11")
    ]
    plain, children = _split(named, inputs, arns)
    assert [e.name for e in children] == keys
    assert len(plain) == 1


# --- the real thing --------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_the_demo_with_parents_holds_the_limit_and_every_parent_gets_its_answers() -> None:
    find_executable()  # a clear error when the emulator is missing
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "devtools",
            "demo",
            "--parents",
            "3",
            "--items",
            "3",
            "--limit",
            "2",
            "--seconds",
            "1:1",
            "--timeout",
            "120",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("3 parents, 3 children each (the last asked to fail)")
    assert lines[0].endswith(
        "3 SUCCEEDED; 3 of 3 with 3 results and the failing child's error caught (DemoFailure x3)."
    )
    assert lines[-1] == (
        "Maximum concurrency from the executions' own start/stop dates: 2 (limit 2: held), "
        "across the parents' 9 children."
    )
    # No --log-file: a log of its own, named at the end (two demos never share one).
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("dispatcher log: "), done.stderr[-500:]
    log = Path(last.removeprefix("dispatcher log: "))
    try:
        assert log.name.startswith("sfn-dispatcher-demo-")
        assert log.name != "sfn-dispatcher-demo.log"
        events = [json.loads(line)["event"] for line in log.read_text().splitlines()]
        assert "dispatcher.execution_started" in events, events[:20]
    finally:
        log.unlink(missing_ok=True)
