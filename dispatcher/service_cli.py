"""``sfn-dispatcher run``: the long-running dispatcher."""

from __future__ import annotations

import argparse

import anyio
import structlog

from dispatcher import config, logs
from dispatcher.service import Dispatcher


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``run``; every setting is a flag and a ``DISPATCHER_*`` variable."""
    parser = subparsers.add_parser(
        "run",
        help="run the dispatcher (the daemon)",
        description="Start executions from the request queue, never more than the limit at once. "
        "Every flag can also be given as the DISPATCHER_* variable shown; flags win. AWS endpoint, "
        "region and credentials come from the standard AWS_* variables.",
    )
    config.add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load settings, run until SIGTERM/SIGINT, exit 0 after an orderly shutdown."""
    settings = config.Settings.load(config.overrides_from(args))
    logs.configure(settings.log_level.value, settings.log_format)
    structlog.get_logger("dispatcher").info(
        "dispatcher.starting",
        state_machine_arn=settings.state_machine_arn,
        limit=settings.limit,
        input_format=settings.input_format.value,
    )
    anyio.run(Dispatcher(settings).run)
    return 0
