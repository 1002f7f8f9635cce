"""The ``sfn-dispatcher`` command: one sub-command per module; errors one line per problem.

The exit status says what kind of problem it was (see `dispatcher.errors`): 2 for a usage or
configuration error, 3 when AWS cannot be used at start-up.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Protocol

from dispatcher import __version__
from dispatcher.errors import EXIT_INTERRUPTED, EXIT_STATUS_HELP, UserError

# Each module has `add_parser(subparsers)`, which registers its sub-command and sets
# `func` (args -> exit code) as a default. Imported lazily-by-name so `--help` stays fast.
COMMAND_MODULES: tuple[str, ...] = (
    "dispatcher.cli.run",
    "dispatcher.cli.submit",
    "dispatcher.cli.check",
    "dispatcher.cli.control",
    "dispatcher.cli.redrive",
)


class _CommandModule(Protocol):
    def add_parser(self, subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        """Register the sub-command."""


def build_parser(
    modules: Sequence[str] = COMMAND_MODULES,
    prog: str = "sfn-dispatcher",
    description: str = "Cross-execution concurrency limits for AWS Step Functions.",
) -> argparse.ArgumentParser:
    """The full argument parser, every sub-command of ``modules`` registered."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=EXIT_STATUS_HELP,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks for errors (default: one line)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in modules:
        try:
            module: _CommandModule = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue  # a command still being built in this source tree
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Entry point of the console script; returns the process exit status."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (UserError, BaseExceptionGroup) as exc:
        user_error = _user_error(exc)
        if args.debug or user_error is None:
            raise
        for line in str(user_error).splitlines() or [type(user_error).__name__]:
            print(f"{parser.prog} {args.command}: error: {line}", file=sys.stderr)
        return user_error.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _user_error(exc: BaseException) -> UserError | None:
    """The user-fixable error in ``exc``, looking inside task-group exception groups."""
    if isinstance(exc, UserError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _user_error(inner)
            if found is not None:
                return found
    return None


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
