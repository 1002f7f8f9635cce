"""``sfn-dispatcher check``: the preflight to run before deploying or when something looks wrong.

One line per finding, each naming the pool or queue it is about, with the fix for each failure.
It reads the settings exactly as ``run`` does (flags, ``DISPATCHER_*`` variables, the config
file) and checks every pool and request queue. Every AWS call is harmless (describe, get, or
list one item; the task-token answers with a made-up token, StopExecution of an execution that
cannot exist): nothing is started, stopped, answered, received or deleted. The checks
themselves live in `dispatcher.preflight`; this module is the sub-command around them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial

import anyio

from dispatcher.errors import EXIT_CHECK_FAILED, EXIT_OK, EXIT_STATUS_HELP
from dispatcher.preflight import render, run_checks
from dispatcher.settings import config

CHECK_FIELDS = config.CHECK_FIELDS
"""The settings ``check`` takes as flags (declared in `dispatcher.settings.config`): those that name
what it checks (resources, the config file) or change a verdict. The others (log level,
ports, intervals, ...) are still read from their variables and the config file and validated
as ``run`` does; they are not flags of ``check`` because nothing it checks depends on them."""


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``check``: the settings that matter to it as flags, plus ``--json``."""
    parser = subparsers.add_parser(
        "check",
        help="check settings, permissions and wiring (harmless calls only)",
        description="Verify the settings (read as `run` reads them, config file included) and, "
        "for every pool and request queue, the state machine, the queues, redrive policies, "
        "the dead-letter queue, the EventBridge rule and queue policy, the permissions to "
        "answer parent workflows (task tokens) and to stop their orphaned children, the "
        "optional limit parameters (SSM) of pools and named limits, and the lease table "
        "(DynamoDB), with harmless calls only; print one line per finding, naming the pool, "
        "queue or named limit, and the fix for each failure. "
        "Settings not listed below are read from their DISPATCHER_* variables and the config "
        "file. See docs/configuration.md#preflight.",
        epilog=EXIT_STATUS_HELP,
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    config.add_arguments(parser, CHECK_FIELDS)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the checks, print the table (or JSON); 0 when no check failed, else 1."""
    report = anyio.run(partial(run_checks, config.overrides_from(args)))
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        colour = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        print(render(report, colour=colour))
    return EXIT_OK if report.ok else EXIT_CHECK_FAILED
