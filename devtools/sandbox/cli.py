"""``python -m devtools sandbox``: a local AWS with everything the dispatcher needs, no account.

Without ``--endpoint`` it starts MiniStack on 127.0.0.1, provisions, prints the settings
and stays up until Ctrl-C / SIGTERM. With ``--endpoint`` it provisions into an emulator
that is already running (compose's one-shot provisioner), prints and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus
from botocore.exceptions import BotoCoreError, ClientError

from devtools.sandbox.emulator import Emulator, wait_healthy
from devtools.sandbox.provision import SandboxResources, provision
from dispatcher.errors import AwsSetupError, UserError
from dispatcher.settings.config import env_name

DEFAULT_PORT = 4566
DEFAULT_PREFIX = "sfn-dispatcher-demo"
DEFAULT_LIMIT = 10
DEFAULT_MAX_RECEIVE_COUNT = 20
DEFAULT_REGION = "us-east-1"
REGION_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d{1,2}$")
# Every `aws` command printed carries --endpoint-url. The AWS CLI v1 ignores
# AWS_ENDPOINT_URL(_SQS) for `aws sqs` in every region of its SSL common-name table
# (us-east-1 -> https://queue.amazonaws.com, eu-west-1 -> eu-west-1.queue.amazonaws.com,
# ...; awscli/customizations/overridesslcommonname.py): that customisation sets the
# endpoint itself unless --endpoint-url is on the command line. v2 (>= 2.13) honours the
# variable too, so the flag is merely redundant there.
AWS = 'aws --endpoint-url "$AWS_ENDPOINT_URL"'
# A request sent by hand, and what the dispatcher made of it.
SEND_EXAMPLE = (
    f'{AWS} sqs send-message --queue-url "${env_name("request_queue_url")}" '
    """--message-body '{"seconds": 2}'"""
)
LIST_EXAMPLE = (
    f'{AWS} stepfunctions list-executions --state-machine-arn "${env_name("state_machine_arn")}"'
)
# A parent run by hand: once a dispatcher runs, it succeeds with 3 results (one an error).
PARENT_EXAMPLE = (
    f'{AWS} stepfunctions start-execution --state-machine-arn "$SFN_DISPATCHER_PARENT_ARN" '
    """--input '{"items": [{"seconds": 2}, {"seconds": 1}, {"fail": true}]}'"""
)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``sandbox``."""
    parser = subparsers.add_parser(
        "sandbox",
        help="run a local AWS emulator with queues, rule and demo state machine",
        description="Start MiniStack on 127.0.0.1, create the request/dead-letter/events "
        "queues, the EventBridge status rule, a demo STANDARD state machine, a parent "
        "workflow that requests one child per item and waits for it (task tokens), and the "
        "limit parameter, print the settings as shell exports, and stay up until Ctrl-C.",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        metavar="N",
        help=f"emulator port (default {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--endpoint",
        metavar="URL",
        help="provision into an emulator already running at URL, print, and exit",
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="with --endpoint: how long to wait for it to become healthy (default 30)",
    )
    parser.add_argument(
        "--prefix", default=DEFAULT_PREFIX, help=f"name prefix (default {DEFAULT_PREFIX})"
    )
    parser.add_argument(
        "--region",
        default=DEFAULT_REGION,
        metavar="NAME",
        help=f"the region of the ARNs, printed as AWS_DEFAULT_REGION (default {DEFAULT_REGION})",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"concurrency limit (default {DEFAULT_LIMIT})",
    )
    parser.add_argument(
        "--max-receive-count",
        type=int,
        default=DEFAULT_MAX_RECEIVE_COUNT,
        metavar="N",
        help="receives before a request moves to the dead-letter queue "
        f"(default {DEFAULT_MAX_RECEIVE_COUNT})",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the settings as JSON, not export lines"
    )
    parser.add_argument(
        "--env-file",
        type=Path,
        metavar="PATH",
        help="also write the settings as KEY=VALUE lines to PATH (mode 0600)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``python -m devtools sandbox``."""
    if not 0 < args.port < 65_536:
        raise UserError(f"--port {args.port} is invalid: give 1 to 65535")
    if args.wait <= 0:
        raise UserError(f"--wait {args.wait:g} is invalid: give a positive number of seconds")
    if not REGION_RE.match(args.region):
        raise UserError(
            f"--region {args.region!r} is invalid: give a region name such as us-east-1 "
            "or eu-west-1"
        )
    try:
        result: int = anyio.run(_main, args)
    except BaseExceptionGroup as group:
        raise _single(group) from None
    return result


async def _main(args: argparse.Namespace) -> int:
    if args.endpoint:
        endpoint = args.endpoint.rstrip("/")
        await wait_healthy(endpoint, args.wait)
        _publish(await _provision(args, endpoint), args)
        return 0
    async with anyio.create_task_group() as group:
        await group.start(_cancel_on_signal, group.cancel_scope)
        async with Emulator(port=args.port) as emulator:
            resources = await _provision(args, emulator.endpoint)
            _publish(resources, args)
            _hint(emulator, args, resources)
            await anyio.sleep_forever()
    print("# sandbox stopped", file=sys.stderr, flush=True)
    return 0


async def _cancel_on_signal(
    scope: anyio.CancelScope, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Cancel ``scope`` on the first SIGINT or SIGTERM (the emulator then stops cleanly)."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for _ in signals:
            scope.cancel()
            return


async def _provision(args: argparse.Namespace, endpoint: str) -> SandboxResources:
    try:
        return await provision(
            endpoint,
            prefix=args.prefix,
            region=args.region,
            limit=args.limit,
            max_receive_count=args.max_receive_count,
        )
    except (BotoCoreError, ClientError) as exc:
        # The endpoint, not the flags: exit 3, as `run` does when AWS cannot be used.
        raise AwsSetupError(f"provisioning into {endpoint} failed: {exc}") from None


def _publish(resources: SandboxResources, args: argparse.Namespace) -> None:
    """Print the settings (exports or JSON) and write the env file when asked."""
    env = resources.env(live_limit=True)
    if args.env_file is not None:
        write_env_file(args.env_file, env)
    if args.json:
        print(json.dumps(env, indent=2), flush=True)
    else:
        for key, value in env.items():
            print(f"export {key}={shlex.quote(value)}")
        sys.stdout.flush()


def write_env_file(path: Path, env: dict[str, str]) -> None:
    """Write ``KEY=VALUE`` lines readable by ``set -a; . FILE`` and compose, mode 0600."""
    text = "".join(f"{key}={shlex.quote(value)}\n" for key, value in env.items())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            os.fchmod(file.fileno(), 0o600)  # an existing file keeps its mode otherwise
            file.write(text)
    except OSError as exc:
        raise UserError(f"cannot write --env-file {path}: {exc.strerror}") from None


def _hint(emulator: Emulator, args: argparse.Namespace, resources: SandboxResources) -> None:
    """Tell a human (on stderr) how to use the sandbox from another shell."""
    if args.env_file is not None:
        load = f"set -a; . {shlex.quote(str(args.env_file))}; set +a"
    else:
        # This interpreter and this checkout, whatever the other shell's PATH and directory.
        checkout = Path(__file__).resolve().parent.parent.parent
        command = [
            "env",
            f"PYTHONPATH={checkout}",
            sys.executable,
            "-m",
            "devtools",
            "sandbox",
            "--endpoint",
            emulator.endpoint,
        ]
        for flag, value, default in (
            ("--prefix", args.prefix, DEFAULT_PREFIX),
            ("--region", args.region, DEFAULT_REGION),
            ("--limit", args.limit, DEFAULT_LIMIT),
            ("--max-receive-count", args.max_receive_count, DEFAULT_MAX_RECEIVE_COUNT),
        ):
            if value != default:
                command += [flag, str(value)]
        load = f'eval "$({shlex.join(command)})"'
    lines = [
        f"# sandbox up: emulator pid {emulator.pid} at {emulator.endpoint} "
        f"(log {emulator.log_path}); Ctrl-C stops it",
        f"# in another shell: {load}",
        "# then: sfn-dispatcher submit --count 20",
        f"# the limit lives in {resources.limit_parameter} ({env_name('limit_parameter')}; it wins "
        "over --limit once read): sfn-dispatcher pause / resume / drain write it",
        "# or with the AWS CLI (v1 or v2; v1 needs --endpoint-url for sqs), a request and "
        "the executions:",
        f"#   {SEND_EXAMPLE}",
        f"#   {LIST_EXAMPLE}",
        "# a workflow waiting for 3 children (task tokens; one fails, caught by it):",
        f"#   {PARENT_EXAMPLE}",
    ]
    print("\n".join(lines), file=sys.stderr, flush=True)


def _single(group: BaseExceptionGroup[Any]) -> BaseException:
    """The one error inside a task group's exception group (the group itself if several)."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        current = pending.pop()
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        else:
            leaves.append(current)
    return leaves[0] if len(leaves) == 1 else group
