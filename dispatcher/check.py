"""``sfn-dispatcher check``: the preflight to run before deploying or when something looks wrong.

One line per check, with the fix for each failure. Every AWS call is harmless (describe, get,
or list one item; the task-token answers with a made-up token, StopExecution of an execution
that cannot exist): nothing is started, stopped, answered, received or deleted. The checks
themselves live in `dispatcher.preflight`; this module is the sub-command around them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial

import anyio

from dispatcher import config
from dispatcher.preflight import LEASE_TABLE_ENV, LIMIT_PARAMETER_ENV, render, run_checks


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``check``: the same settings and flags as ``run``, plus ``--json``."""
    parser = subparsers.add_parser(
        "check",
        help="check settings, permissions and wiring (harmless calls only)",
        description="Verify the settings, the state machine, the permissions to answer "
        "parent workflows (task tokens) and to stop their orphaned children, the queues, the "
        "EventBridge rule and queue policy, and the optional limit parameter "
        f"(${LIMIT_PARAMETER_ENV}) and lease table (${LEASE_TABLE_ENV}), with harmless "
        "calls only; print one line per check and the fix for each failure. Exit 0 when "
        "nothing failed, 1 otherwise. Takes the same settings as `run`.",
    )
    config.add_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the checks, print the table (or JSON); 0 when no check failed, else 1."""
    report = anyio.run(partial(run_checks, config.overrides_from(args)))
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        colour = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        print(render(report, colour=colour))
    return 0 if report.ok else 1
