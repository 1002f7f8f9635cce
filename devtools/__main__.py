"""``python -m devtools``: the developer tools of a source checkout (not shipped).

``sandbox`` brings up a local AWS (MiniStack) with everything the dispatcher needs;
``demo`` runs the sandbox, a dispatcher and a stream of requests and shows the limit held.
Errors and exit statuses as the ``sfn-dispatcher`` command's.
"""

from __future__ import annotations

from collections.abc import Sequence

from dispatcher.cli.main import build_parser, main

DEV_MODULES: tuple[str, ...] = ("devtools.sandbox.cli", "devtools.demo")


def dev_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m devtools``; returns the process exit status."""
    parser = build_parser(
        DEV_MODULES,
        prog="python -m devtools",
        description="sfn-dispatcher's developer tools: a local sandbox and the demo.",
    )
    return main(argv, parser)


if __name__ == "__main__":
    raise SystemExit(dev_main())
