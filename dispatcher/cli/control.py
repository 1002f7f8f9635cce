"""``status``, ``pause``, ``resume``, ``drain``: operate a running dispatcher without a redeploy.

``status`` reads the dispatcher's ``/status`` (a GET; read-only). The three others never
talk to the dispatcher: they write the SSM limit parameter of a pool or of a named limit
(``--named-limit NAME``: ``[limits.NAME]``, shared by pools), which the dispatcher
already re-reads every ``limit_refresh_interval`` (`dispatcher.daemon.limits`). So no mutating
endpoint listens anywhere, they work the same on ECS as on a laptop, and the IAM they need
is ``ssm:GetParameter``, ``ssm:PutParameter`` and ``ssm:GetParameterHistory`` on that one
parameter (plus ``states:ListExecutions`` for ``drain --wait``).

Limit 0 is paused: nothing is received and nothing is started, running executions carry
on. ``pause`` writes 0 (the limit it replaced stays in the parameter's history and
description), ``resume`` writes back the newest non-zero limit of that history, ``drain`` is
``pause`` that can wait until no execution of the pool runs. On a named limit the same: 0
pauses every pool that uses it, and ``drain --wait`` waits until its use (each user pool's
running executions times its weight) is 0.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio

from dispatcher.aws.api import AWS_ERRORS, error_code, open_client
from dispatcher.daemon.limits import parse_limit
from dispatcher.errors import EXIT_NOT_ANSWERING, UserError
from dispatcher.settings import layout
from dispatcher.settings.config import (
    STATUS_URL_VARIABLE,
    Given,
    Settings,
    accepted,
    accepted_range,
    env_name,
)
from dispatcher.settings.layout import DEFAULT_POOL

if TYPE_CHECKING:
    from types_aiobotocore_ssm import SSMClient
    from types_aiobotocore_stepfunctions import SFNClient

STATUS_URL_ENV = STATUS_URL_VARIABLE
HTTP_PORT_ENV = env_name("http_port")
DEFAULT_HTTP_PORT: int = Settings.model_fields["http_port"].default
EXIT_STILL_RUNNING = 1
PAUSE_SEEN_MARGIN = 5.0
"""Seconds beyond a refresh interval for a start already under way when the pause is read."""


class NotAnsweringError(UserError):
    """Nothing answers at the status URL: no dispatcher runs there (exit 4)."""

    exit_code = EXIT_NOT_ANSWERING


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``status``, ``pause``, ``resume`` and ``drain``."""
    status = subparsers.add_parser(
        "status",
        help="show a running dispatcher's pools (its /status) as a table",
        description="Read a running dispatcher's /status and show each pool: limit, running, "
        "starting, in doubt, waiting, queued, free, task tokens held; and its lease role. "
        f"Exit 0; {EXIT_NOT_ANSWERING} when nothing answers at the URL.",
    )
    status.add_argument(
        "--url",
        help="the dispatcher's base URL or its /status, e.g. http://127.0.0.1:8093 (default "
        f"${STATUS_URL_ENV}, else http://127.0.0.1:${HTTP_PORT_ENV}/status, port "
        f"{DEFAULT_HTTP_PORT} when unset)",
    )
    status.add_argument("--json", action="store_true", help="print /status as it is (JSON)")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    status.set_defaults(func=run_status)

    effect = (
        f"It writes the pool's SSM limit parameter ({env_name('limit_parameter')}, or "
        f"limit_parameter of [pools.NAME] in {env_name('config')}), or with --named-limit "
        "that of [limits.NAME] (a named limit shared by pools: 0 pauses every pool that uses "
        "it); a running dispatcher sees "
        f"it within {env_name('limit_refresh_interval')} "
        f"({Settings.model_fields['limit_refresh_interval'].default:g} s by default). Needs "
        "ssm:GetParameter, ssm:PutParameter and ssm:GetParameterHistory on that parameter only."
    )
    for name, help_, extra in (
        (
            "pause",
            "stop starting executions of a pool (limit 0); running ones finish",
            "Set the pool's limit to 0: nothing more is received or started, running "
            "executions finish, requests wait in the queue. `resume` restores the limit.",
        ),
        (
            "resume",
            "restore a paused pool's limit",
            "Write back the newest non-zero limit in the parameter's history (or --limit N).",
        ),
        (
            "drain",
            "pause a pool and (--wait) report when nothing of it runs any more",
            "Pause the pool, then with --wait count its RUNNING executions (ListExecutions, "
            "the truth, including ones started by others; needs states:ListExecutions) until "
            "none is left; for a named limit, those of every pool that uses it, times their "
            "weights, until its use is 0. Exit 0 when "
            f"drained, {EXIT_STILL_RUNNING} when --timeout passed first.",
        ),
    ):
        parser = subparsers.add_parser(name, help=help_, description=f"{extra} {effect}")
        which = parser.add_mutually_exclusive_group()
        which.add_argument("--pool", help="pool name (default: the only pool)")
        which.add_argument(
            "--named-limit",
            metavar="NAME",
            help=f"a named limit ([limits.NAME] in {env_name('config')}) instead of a pool",
        )
        parser.add_argument(
            "--parameter", metavar="NAME", help="the SSM parameter (default: from the settings)"
        )
        if name == "resume":
            parser.add_argument("--limit", type=int, help="set this limit instead")
        if name == "drain":
            parser.add_argument(
                "--wait", action="store_true", help="wait until no execution of the pool runs"
            )
            parser.add_argument(
                "--timeout",
                type=float,
                help="with --wait: give up after this many seconds (without --url at least "
                "the limit refresh interval + 5 s: the pause must be seen first)",
            )
            parser.add_argument(
                "--interval", type=float, default=5.0, help="seconds between counts (default 5)"
            )
            parser.add_argument(
                "--url",
                default=os.environ.get(STATUS_URL_ENV),
                help="with --wait: also wait for this dispatcher's /status (or base URL) to "
                "show the pool (or named limit) paused and empty (in doubt included)",
            )
        parser.set_defaults(func=partial(run_limit_command, name))


# -- status --------------------------------------------------------------------------------


def status_url(given: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The /status URL to ask: ``given`` (``--url``), else ``DISPATCHER_STATUS_URL``, else
    this host at ``DISPATCHER_HTTP_PORT`` - the variable `run` listens on. A base URL (no
    path) gets ``/status``; one without a scheme gets ``http://``."""
    environ = os.environ if environ is None else environ
    url = given or environ.get(STATUS_URL_ENV)
    if not url:
        port = environ.get(HTTP_PORT_ENV) or str(DEFAULT_HTTP_PORT)
        if not port.isdigit() or not 0 < int(port) <= 65_535:
            raise UserError(
                f"{HTTP_PORT_ENV}={port!r} is invalid: give the dispatcher's port 1-65535, "
                f"or --url / ${STATUS_URL_ENV}"
            )
        return f"http://127.0.0.1:{int(port)}/status"
    if "://" not in url:
        url = f"http://{url}"
    parts = urllib.parse.urlsplit(url)
    if parts.path in {"", "/"}:
        url = urllib.parse.urlunsplit(parts._replace(path="/status"))
    return url


def fetch_status(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """GET ``url`` as JSON; NotAnsweringError when nothing (or not a dispatcher) answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - any scheme the user names
            raw = response.read()
    except urllib.error.HTTPError as exc:
        raise NotAnsweringError(
            f"{url} answered HTTP {exc.code}, not a dispatcher's /status "
            "(give --url http://HOST:PORT/status)"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        why = getattr(exc, "reason", exc)
        raise NotAnsweringError(
            f"nothing answers at {url} ({why}): is the dispatcher running there? Its port is "
            f"{HTTP_PORT_ENV} (default {DEFAULT_HTTP_PORT}); give --url, ${STATUS_URL_ENV} or "
            f"{HTTP_PORT_ENV}"
        ) from None
    try:
        document = json.loads(raw)
    except ValueError:
        document = None
    if not isinstance(document, dict) or "pools" not in document:
        raise NotAnsweringError(f"{url} did not answer with a dispatcher's /status document")
    return document


COLUMNS: tuple[tuple[str, Callable[[Mapping[str, Any]], object]], ...] = (
    ("LIMIT", lambda p: p.get("limit")),
    ("RUNNING", lambda p: p.get("running")),
    ("STARTING", lambda p: p.get("starting")),
    ("IN DOUBT", lambda p: p.get("in_doubt")),
    ("WAITING", lambda p: p.get("waiting")),
    ("QUEUED", lambda p: p.get("queued_estimate")),
    ("FREE", lambda p: p.get("free")),
    ("TOKENS", lambda p: p.get("tokens_held")),
)


def render_status(document: Mapping[str, Any], url: str, now: float | None = None) -> str:
    """The /status document as a header line, one table row per pool, and how old QUEUED is.

    QUEUED is not live: the dispatcher reads SQS's approximate depth once per reconcile, and
    SQS's figure itself trails the queue; the note under the table says so and how old it
    is, so that an emptied queue still shown with messages is not mistaken for a backlog.
    """
    lease = document.get("lease")
    if not lease:
        lease_text = "no lease table"
    elif lease.get("held") is False:  # a standby (older versions say nothing: held)
        lease_text = f"lease not held by this process ({lease.get('owner')})"
    else:
        lease_text = (
            f"lease epoch {lease.get('epoch')} held by {lease.get('owner')}, "
            f"{lease.get('valid_for_seconds')} s left"
        )
    ready = "ready" if document.get("ready") else "NOT ready"
    header = (
        f"dispatcher at {url}: role {document.get('role', '?')}, {ready}, {lease_text}; "
        f"config {document.get('config', '?')}"
    )
    rows = [["POOL", *(title for title, _ in COLUMNS)]]
    for name, pool in sorted((document.get("pools") or {}).items()):
        cells = [_cell(get(pool)) for _, get in COLUMNS]
        if pool.get("limit") == 0:
            cells[0] = "0 paused"
        rows.append([name, *cells])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines += _limit_lines(document.get("limits") or {})
    read = [p.get("queued_read_at") for p in (document.get("pools") or {}).values()]
    read = [r for r in read if isinstance(r, int | float)]
    if read:
        age = max(0.0, (time.time() if now is None else now) - min(read))
        lines.append(
            f"QUEUED is SQS's approximate depth (ApproximateNumberOfMessages + Delayed), read "
            f"at each reconcile, last {age:.0f} s ago: it can show requests already taken"
        )
    return "\n".join([header, *lines])


def _limit_lines(limits: Mapping[str, Any]) -> list[str]:
    """One line per named limit: value, use, its users (pool x weight), who waits, why not."""
    out = []
    for name, named in sorted(limits.items()):
        users = ", ".join(f"{pool} x{weight}" for pool, weight in named.get("users", {}).items())
        text = f"named limit {name}: {named.get('in_use')} of {named.get('limit')} in use ({users})"
        blocked = named.get("blocked") or {}
        if named.get("limit") == 0:  # every user is blocked by the pause: said once
            text = text.replace(" in use (", " in use, paused (", 1)
            blocked = {}
        if named.get("waiting_pools"):
            text += f"; waiting: {', '.join(named['waiting_pools'])}"
        text += "".join(f"; {pool} blocked: {why}" for pool, why in sorted(blocked.items()))
        out.append(text)
    return out


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


def run_status(args: argparse.Namespace) -> int:
    """``sfn-dispatcher status``: 0 shown; 4 nothing answers."""
    url = status_url(args.url)
    document = fetch_status(url, args.timeout)
    if args.json:
        print(json.dumps(document, indent=2, sort_keys=True))
    else:
        print(render_status(document, url))
    return 0


# -- where a pool's (or a named limit's) limit is kept: the dispatcher's own settings ---------


@dataclass(frozen=True)
class User:
    """A pool that uses a named limit: its weight and its state machine."""

    pool: str
    weight: int
    state_machine_arn: str


@dataclass(frozen=True)
class LimitTarget:
    """Where the live limit of one pool or named limit is kept, as the dispatcher's own
    settings say."""

    name: str  # the pool's, or the named limit's
    parameter: str
    state_machine_arn: str | None  # a named limit: its first user's (for the region)
    refresh_interval: float  # how soon a running dispatcher sees a change
    source: str  # "environment" or the config file's path
    kind: str = "pool"  # or "named limit"
    users: tuple[User, ...] = ()  # a named limit's pools

    @property
    def label(self) -> str:
        """``pool NAME`` or ``named limit NAME``."""
        return f"{self.kind} {self.name}"

    @property
    def option(self) -> str:
        """The option that names it: ``--pool NAME`` or ``--named-limit NAME``."""
        return f"--{self.kind.replace(' ', '-')} {self.name}"


def limit_target(
    pool: str | None, parameter: str | None = None, environ: Mapping[str, str] | None = None
) -> LimitTarget:
    """The pool's limit parameter, read with the dispatcher's own loader (`layout.attempt`:
    the same ``DISPATCHER_*`` variables and config file, the same precedence), of which only
    the few settings needed must be valid: no queue URL is required here. ``parameter``
    names it directly and wins. UserError naming the setting to add."""
    loaded = layout.attempt({}, environ)
    given = loaded.given
    refresh = _setting(given, "limit_refresh_interval")
    if loaded.path is None:
        name = pool or DEFAULT_POOL
        if name != DEFAULT_POOL:
            raise UserError(
                f"--pool {name!r}: without a config file ({env_name('config')}) the only pool "
                f"is {DEFAULT_POOL!r}"
            )
        found = parameter or _setting(given, "limit_parameter")
        if not found:
            raise UserError(
                f"pool {name!r} has no limit parameter: set {env_name('limit_parameter')} "
                "(here and on the dispatcher, which then needs one restart) to an SSM "
                "parameter holding the limit, or pass --parameter NAME"
            )
        arn = _setting(given, "state_machine_arn")
        return LimitTarget(name, found, arn, refresh, "environment")
    path = str(loaded.path)
    if loaded.file_layout is None:
        raise UserError(str(loaded.file_error))
    names = [p.name for p in loaded.file_layout.pools]
    if pool is None:
        if len(names) > 1:
            raise UserError(f"give --pool: {path} has pools {', '.join(names)}")
        pool = names[0]
    if pool not in names:
        hint = ""
        if pool in {n.name for n in loaded.file_layout.limits}:
            hint = f"; {pool!r} is a named limit ([limits.{pool}]): give --named-limit {pool}"
        raise UserError(f"--pool {pool!r} is not in {path}: its pools are {', '.join(names)}{hint}")
    config = loaded.file_layout.pool(pool)
    found = parameter or config.limit_parameter
    if not found:
        raise UserError(
            f'pool {pool!r} has no limit parameter: add limit_parameter = "/NAME" to '
            f"[pools.{pool}] in {path} (an SSM parameter holding the limit; the dispatcher "
            "then needs one restart), or pass --parameter NAME"
        )
    return LimitTarget(pool, found, config.state_machine_arn, refresh, path)


def named_limit_target(
    name: str, parameter: str | None = None, environ: Mapping[str, str] | None = None
) -> LimitTarget:
    """A named limit's parameter (``[limits.NAME] limit_parameter``) and the pools that use
    it, from the config file the dispatcher reads; UserError saying what to add."""
    loaded = layout.attempt({}, environ)
    refresh = _setting(loaded.given, "limit_refresh_interval")
    if loaded.path is None:
        raise UserError(
            f"--named-limit {name!r}: named limits are [limits.NAME] tables of a config file, "
            f"and no config file is given ({env_name('config')})"
        )
    path = str(loaded.path)
    if loaded.file_layout is None:
        raise UserError(str(loaded.file_error))
    found_layout = loaded.file_layout
    limits = {n.name: n for n in found_layout.limits}
    if name not in limits:
        defined = ", ".join(limits) or "none ([limits.NAME] tables)"
        hint = ""
        if name in {p.name for p in found_layout.pools}:
            hint = f"; {name!r} is a pool: give --pool {name}"
        raise UserError(
            f"--named-limit {name!r} is not in {path}: its named limits are {defined}{hint}"
        )
    found = parameter or limits[name].limit_parameter
    if not found:
        raise UserError(
            f'named limit {name!r} has no limit parameter: add limit_parameter = "/NAME" to '
            f"[limits.{name}] in {path} (an SSM parameter holding its value; the dispatcher "
            "then needs one restart), or pass --parameter NAME"
        )
    users = tuple(
        User(p.name, p.uses[name], p.state_machine_arn)
        for p in found_layout.pools
        if name in p.uses
    )
    arn = users[0].state_machine_arn if users else found_layout.pools[0].state_machine_arn
    return LimitTarget(name, found, arn, refresh, path, "named limit", users)


def _setting(given: Given, field: str) -> Any:
    """One setting as given, validated on its own; UserError naming it and what it takes."""
    value, problem = given.alone(field)
    if problem is not None:
        what = accepted(field) if accepted_range(field) else ""  # else the check's own words
        raw = given.values[field]
        raise UserError(f"{given.name(field)}={raw!r} is invalid: give {what}" if what else problem)
    return value


async def read_limit(ssm: SSMClient, parameter: str) -> int:
    """The limit a parameter holds now; UserError when it is missing or holds no limit."""
    try:
        response = await ssm.get_parameter(Name=parameter)
    except AWS_ERRORS as exc:
        if error_code(exc) == "ParameterNotFound":
            raise UserError(
                f"SSM parameter {parameter} does not exist: create it with the limit, e.g. "
                f"aws ssm put-parameter --name {parameter} --type String --value 10"
            ) from None
        raise UserError(f"cannot read SSM parameter {parameter}: {exc}") from None
    try:
        return parse_limit(str(response.get("Parameter", {}).get("Value", "")))
    except ValueError as exc:
        raise UserError(f"SSM parameter {parameter}: {exc}") from None


async def write_limit(ssm: SSMClient, parameter: str, limit: int, note: str) -> None:
    """Overwrite the parameter with ``limit``; ``note`` becomes its description (shown in
    the console and the parameter's history, so a pause says who paused and from what)."""
    try:
        await ssm.put_parameter(
            Name=parameter, Value=str(limit), Overwrite=True, Description=note[:1024]
        )
    except AWS_ERRORS as exc:
        raise UserError(
            f"cannot write SSM parameter {parameter}: {exc} (needs ssm:PutParameter on it)"
        ) from None


async def last_running_limit(ssm: SSMClient, parameter: str) -> int | None:
    """The newest non-zero limit in the parameter's history (what ``resume`` restores),
    or None when every version kept (SSM keeps the last 100) is 0 or not a limit."""
    found: tuple[int, int] | None = None  # (version, limit)
    kwargs: dict[str, Any] = {"Name": parameter, "MaxResults": 50}
    try:
        while True:
            page = await ssm.get_parameter_history(**kwargs)
            for entry in page.get("Parameters", []):
                try:
                    limit = parse_limit(str(entry.get("Value", "")))
                except ValueError:
                    continue
                version = int(entry.get("Version", 0))
                if limit > 0 and (found is None or version > found[0]):
                    found = (version, limit)
            if not page.get("NextToken"):
                break
            kwargs["NextToken"] = page["NextToken"]
    except AWS_ERRORS as exc:
        raise UserError(
            f"cannot read the history of SSM parameter {parameter}: {exc} (needs "
            "ssm:GetParameterHistory on it; or pass --limit N)"
        ) from None
    return None if found is None else found[1]


# -- pause, resume, drain ------------------------------------------------------------------


@asynccontextmanager
async def _client(service: str, target: LimitTarget) -> AsyncIterator[Any]:
    """A client configured by ``AWS_*`` (endpoint too); the region defaults to the pool's."""
    arn = target.state_machine_arn
    async with open_client(service, default_region=arn.split(":")[3] if arn else None) as client:
        yield client


def run_limit_command(name: str, args: argparse.Namespace) -> int:
    """``pause``, ``resume`` or ``drain``."""
    if args.named_limit is not None:
        target = named_limit_target(args.named_limit, args.parameter)
    else:
        target = limit_target(args.pool, args.parameter)
    if name == "resume" and args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit} is invalid: give 1 or more (pause sets 0)")
    if name == "drain" and args.wait:
        if args.interval <= 0 or (args.timeout is not None and args.timeout <= 0):
            raise UserError("--interval and --timeout are seconds > 0")
        if target.state_machine_arn is None:
            raise UserError(
                f"drain --wait counts the pool's executions: set {env_name('state_machine_arn')}"
            )
        seen = target.refresh_interval + PAUSE_SEEN_MARGIN
        if args.url is None and args.timeout is not None and args.timeout <= seen:
            raise UserError(
                f"--timeout {args.timeout:g} is too short: without --url, drain --wait first "
                f"waits {seen:g} s for a running dispatcher to see the pause (its limit "
                f"refresh interval {target.refresh_interval:g} s + {PAUSE_SEEN_MARGIN:g} s) "
                f"and would give up before counting anything; give --timeout over {seen:g}, "
                "or --url to watch its /status; nothing was changed"
            )
        if args.url is not None:
            args.url = status_url(args.url)
    return anyio.run(partial(_limit_command, name, args, target))


async def _limit_command(name: str, args: argparse.Namespace, target: LimitTarget) -> int:
    async with _client("ssm", target) as ssm:
        if name == "resume":
            await resume(ssm, target, args.limit)
            return 0
        await pause(ssm, target, drain=name == "drain")
    if name == "drain" and args.wait:
        async with _client("stepfunctions", target) as sfn:
            return await wait_drained(sfn, target, args.interval, args.timeout, args.url)
    return 0


def _say(text: str) -> None:
    print(text, flush=True)


def _stops(target: LimitTarget) -> str:
    """What a running dispatcher stops doing on a pause."""
    if target.kind == "pool":
        return "stops receiving and starting"
    pools = ", ".join(u.pool for u in target.users) or "none"
    return f"stops receiving and starting for the pools that use it ({pools})"


async def pause(ssm: SSMClient, target: LimitTarget, *, drain: bool = False) -> int:
    """Write limit 0 unless already 0; returns the limit it replaced (0: was paused)."""
    where = f"{target.label} (SSM parameter {target.parameter})"
    before = await read_limit(ssm, target.parameter)
    if before == 0:
        _say(f"{where} is already paused (limit 0)")
        return 0
    verb = "drain" if drain else "pause"
    await write_limit(
        ssm, target.parameter, 0, f"paused by sfn-dispatcher {verb}; resume restores {before}"
    )
    _say(
        f"paused {where}: limit {before} -> 0. A running dispatcher {_stops(target)} within "
        f"{target.refresh_interval:g} s (its limit refresh interval); running executions "
        f"finish. `sfn-dispatcher resume {target.option}` restores {before}."
    )
    return before


async def resume(ssm: SSMClient, target: LimitTarget, limit: int | None) -> int:
    """Write back ``limit`` or the newest non-zero limit in the history; returns it."""
    where = f"{target.label} (SSM parameter {target.parameter})"
    current = await read_limit(ssm, target.parameter)
    if limit is None:
        if current > 0:
            _say(f"{where} is not paused (limit {current}); nothing changed")
            return current
        limit = await last_running_limit(ssm, target.parameter)
        if limit is None:
            raise UserError(
                f"{where}: no earlier non-zero limit in the parameter's history; "
                "give one with --limit N"
            )
    await write_limit(ssm, target.parameter, limit, "resumed by sfn-dispatcher resume")
    _say(
        f"resumed {where}: limit {current} -> {limit}; a running dispatcher starts again within "
        f"{target.refresh_interval:g} s"
    )
    return limit


async def count_running(sfn: SFNClient, state_machine_arn: str) -> int:
    """RUNNING executions of the state machine, every page."""
    count = 0
    kwargs: dict[str, Any] = {
        "stateMachineArn": state_machine_arn,
        "statusFilter": "RUNNING",
        "maxResults": 1000,
    }
    while True:
        page = await sfn.list_executions(**kwargs)
        count += len(page.get("executions", []))
        if not page.get("nextToken"):
            return count
        kwargs["nextToken"] = page["nextToken"]


async def count_in_use(sfn: SFNClient, target: LimitTarget) -> int:
    """What holds the target as Step Functions says: a pool's RUNNING executions; a named
    limit's units (each user pool's RUNNING executions times its weight)."""
    if target.kind == "pool":
        assert target.state_machine_arn is not None  # noqa: S101 - checked by the caller
        arns = [(target.state_machine_arn, 1)]
    else:
        arns = [(u.state_machine_arn, u.weight) for u in target.users]
    total = 0
    for arn, weight in arns:
        try:
            total += weight * await count_running(sfn, arn)
        except AWS_ERRORS as exc:
            raise UserError(f"cannot list the executions of {arn}: {exc}") from None
    return total


async def wait_drained(
    sfn: SFNClient,
    target: LimitTarget,
    interval: float,
    timeout: float | None,  # noqa: ASYNC109 - the drain's deadline, reported on expiry
    url: str | None = None,
) -> int:
    """Wait until the pool (or named limit) is paused in effect and nothing holds it; 0
    drained, 1 timed out.

    The pause is in effect once ``url``'s /status shows limit 0 (without a URL: one refresh
    interval plus a few seconds for a start already under way). ListExecutions is
    eventually consistent, so drained means two counts of 0, ``interval`` apart.
    """
    counting = False
    held = "running" if target.kind == "pool" else "in use"
    if url and (await anyio.to_thread.run_sync(fetch_status, url)).get("role") == "standby":
        # It governs nothing (another process holds the lease): its figures say nothing.
        _say(f"the dispatcher at {url} is a standby: judging from the executions alone")
        url = None
    with anyio.move_on_after(timeout) as scope:
        if url:
            while True:  # another process's state: nothing to wait on but polling it
                limit, _ = await _figures(url, target)
                if limit == 0:
                    break
                await anyio.sleep(min(interval, 1.0))
        else:
            seen = target.refresh_interval + PAUSE_SEEN_MARGIN
            then = f"counting RUNNING executions every {interval:g} s"
            until = "" if timeout is None else f" (giving up {timeout:g} s from now: --timeout)"
            _say(f"waiting {seen:g} s for the dispatcher to see the pause, then {then}{until}")
            await anyio.sleep(seen)
        zeros, shown, counting = 0, None, True
        while zeros < 2:
            count = await count_in_use(sfn, target)
            if url:
                _, reported = await _figures(url, target)
                count = max(count, reported)
            if count != shown:
                _say(f"{target.label}: {count} {held}")
                shown = count
            zeros = zeros + 1 if count == 0 else 0
            if zeros < 2:
                await anyio.sleep(interval)
    if scope.cancelled_caught and not counting:
        _say(f"{target.label}: {url} did not show the pause within {timeout:g} s; it stays paused")
        return EXIT_STILL_RUNNING
    if scope.cancelled_caught:
        _say(f"{target.label}: still {held} after {timeout:g} s; it stays paused")
        return EXIT_STILL_RUNNING
    nothing = "nothing running" if target.kind == "pool" else "nothing uses it"
    _say(f"{target.label} drained: {nothing}; it stays paused until `resume`")
    return 0


async def _figures(url: str, target: LimitTarget) -> tuple[Any, int]:
    """The limit in force and what holds it, as the dispatcher at ``url`` reports them: a
    pool's running, starting and in-doubt executions; a named limit's units in use."""
    document = await anyio.to_thread.run_sync(fetch_status, url)
    section = "pools" if target.kind == "pool" else "limits"
    known = document.get(section) or {}
    if target.name not in known:
        what = "pools" if target.kind == "pool" else "named limits"
        raise UserError(f"{url} governs {what} {', '.join(known) or '(none)'}, not {target.name!r}")
    figures: Mapping[str, Any] = known[target.name]
    if target.kind == "pool":
        held = sum(int(figures.get(k) or 0) for k in ("running", "starting", "in_doubt"))
    else:
        held = int(figures.get("in_use") or 0)
    return figures.get("limit"), held
