"""The StartExecution client (`dispatcher.aws.open_clients`'s ``starts``): one attempt,
the deadline D, the start gate, and what each answer means for doubt and blame.

The tests talk HTTP to a small aiohttp server on 127.0.0.1 whose handler each test
writes (credentials: the test session's fixed ``AWS_*`` keys, see conftest.py).
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from aiohttp import web
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from dispatcher.aws.api import (
    USER_AGENT,
    Clients,
    ErrorKind,
    UnreadableAnswerError,
    classify,
    error_code,
    open_clients,
    outcome_unknown,
    session,
)
from dispatcher.daemon.metrics import Metrics

if TYPE_CHECKING:
    from types_aiobotocore_stepfunctions import SFNClient

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ARN = "arn:aws:states:us-east-1:123456789012:stateMachine:demo"
KWARGS: dict[str, Any] = {"stateMachineArn": ARN, "name": "order-42", "input": '{"a": 1}'}
TARGET = "AWSStepFunctions.StartExecution"

pytestmark = pytest.mark.timeout(20)


@asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[tuple[str, list[web.Request]]]:
    """An HTTP server on 127.0.0.1 (any port) answering every POST with ``handler``; the
    requests it received, bodies read."""
    seen: list[web.Request] = []

    async def record(request: web.Request) -> web.StreamResponse:
        await request.read()
        seen.append(request)
        return await handler(request)

    app = web.Application()
    app.router.add_post("/", record)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


@asynccontextmanager
async def starts(url: str, deadline: float = 5.0) -> AsyncIterator[tuple[Clients, Metrics]]:
    """The daemon's clients on ``url``, StartExecution bounded by ``deadline``."""
    metrics = Metrics()
    async with open_clients(
        metrics, region="us-east-1", endpoint_url=url, start_timeout=deadline
    ) as clients:
        yield clients, metrics


def client_of(clients: Clients) -> SFNClient:
    assert clients.starts is not None
    return clients.starts


def calls(metrics: Metrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "dispatcher_aws_calls_total", {"operation": "StartExecution", "outcome": outcome}
    )
    return float(value or 0)


def answer(status: int, body: Any = None, **headers: str) -> Handler:
    async def handler(_: web.Request) -> web.StreamResponse:
        text = None if body is None else json.dumps(body)
        return web.Response(status=status, text=text, headers=headers)

    return handler


async def failure(handler: Handler) -> tuple[BaseException, Metrics]:
    async with server(handler) as (url, _), starts(url) as (clients, metrics):
        with pytest.raises((ClientError, BotoCoreError)) as caught:
            await client_of(clients).start_execution(**KWARGS)
    return caught.value, metrics


async def test_a_success_is_one_attempt_with_the_fixed_user_agent() -> None:
    arn = "arn:aws:states:us-east-1:123456789012:execution:demo:order-42"
    ok = answer(200, {"executionArn": arn, "startDate": 1764270000.25})
    async with server(ok) as (url, seen), starts(url) as (clients, metrics):
        result = await client_of(clients).start_execution(**KWARGS)
    assert result["executionArn"] == arn
    assert result["startDate"] == datetime(2025, 11, 27, 19, 0, 0, 250000, tzinfo=UTC)
    assert json.loads(await seen[0].read()) == KWARGS
    assert seen[0].headers["X-Amz-Target"] == TARGET
    assert seen[0].headers["User-Agent"].startswith(USER_AGENT)
    assert calls(metrics, "ok") == 1


ALREADY = {"__type": "com.amazonaws.swf.service.v2.model#ExecutionAlreadyExists", "message": "m"}
HEADER_ONLY = {"x-amzn-ErrorType": "InvalidArn:http://internal.amazon.com/"}


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        ((400, ALREADY, {}), ("ExecutionAlreadyExists", ErrorKind.PERMANENT, False, "expected")),
        (
            (400, {"__type": "ThrottlingException"}, {}),
            ("ThrottlingException", ErrorKind.TRANSIENT, False, "throttled"),
        ),
        # Only a header names the error: botocore reads the code from a JSON body (none
        # here) and makes it up from the status: not an AWS error known here, in doubt.
        ((400, None, HEADER_ONLY), ("400", ErrorKind.UNKNOWN, True, "error")),
        (
            (500, {"__type": "InternalFailure"}, {}),
            ("InternalFailure", ErrorKind.TRANSIENT, True, "error"),
        ),
        ((503, None, {}), ("503", ErrorKind.TRANSIENT, True, "error")),
    ],
    ids=["already-exists", "throttled", "header-only", "500", "503-no-body"],
)
async def test_error_answers_are_one_attempt_classified(
    sent: tuple[int, Any, dict[str, str]], expected: tuple[str, ErrorKind, bool, str]
) -> None:
    """(status, JSON body, headers) -> (code, classify, outcome_unknown, counted as); a
    5xx or a throttle is not retried by the SDK (the caller retries, re-checking)."""
    status, body, headers = sent
    code, kind, unknown, outcome = expected
    error, metrics = await failure(answer(status, body, **headers))
    assert isinstance(error, ClientError)
    assert error_code(error) == code
    assert error.response["ResponseMetadata"]["HTTPStatusCode"] == status
    assert classify(error) is kind
    assert outcome_unknown(error) is unknown
    assert calls(metrics, outcome) == 1, "one attempt"


async def test_a_refused_connection_was_not_sent() -> None:
    with socket.socket() as probe:  # a port nobody listens on: bound, never listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        async with starts(f"http://127.0.0.1:{port}") as (clients, metrics):
            with pytest.raises(EndpointConnectionError) as caught:
                await client_of(clients).start_execution(**KWARGS)
    assert outcome_unknown(caught.value) is False
    assert classify(caught.value) is ErrorKind.TRANSIENT
    assert calls(metrics, "error") == 1


async def test_a_connection_closed_after_the_request_leaves_the_start_in_doubt() -> None:
    async def hang_up(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()
        return web.Response()

    error, metrics = await failure(hang_up)
    assert isinstance(error, ConnectionClosedError)
    assert outcome_unknown(error) is True
    assert calls(metrics, "error") == 1


async def test_an_answer_later_than_d_times_out_in_doubt() -> None:
    release = anyio.Event()

    async def slow(_: web.Request) -> web.StreamResponse:
        await release.wait()  # set only after the client gave up
        return web.Response()

    async with server(slow) as (url, seen), starts(url, deadline=0.3) as (clients, metrics):
        with anyio.fail_after(5), pytest.raises(ReadTimeoutError) as caught:
            await client_of(clients).start_execution(**KWARGS)
        release.set()  # the server's shutdown waits for its handler
    assert len(seen) == 1, "one attempt, no SDK retry"
    assert outcome_unknown(caught.value) is True
    assert classify(caught.value) is ErrorKind.TRANSIENT
    assert calls(metrics, "error") == 1


async def test_an_unreadable_success_is_in_doubt() -> None:
    async def garbage(_: web.Request) -> web.StreamResponse:
        return web.Response(status=200, text="<html>proxy</html>")

    async with server(garbage) as (url, _), starts(url) as (clients, _metrics):
        with pytest.raises(UnreadableAnswerError) as caught:
            await client_of(clients).start_execution(**KWARGS)
    assert outcome_unknown(caught.value) is True
    assert classify(caught.value) is ErrorKind.TRANSIENT


async def test_the_gate_is_checked_with_credentials_in_hand_just_before_sending() -> None:
    """A lease that lapsed while the attempt waited (for its credentials, its signature)
    stops it before it leaves: not sent, not in doubt, not counted as an attempt."""
    arn = "arn:aws:states:us-east-1:123456789012:execution:demo:order-42"
    ok = answer(200, {"executionArn": arn, "startDate": 1764270000.25})
    async with server(ok) as (url, seen), starts(url) as (clients, metrics):
        clients.start_gate.may_send = lambda: False
        with pytest.raises(EndpointConnectionError) as caught:
            await client_of(clients).start_execution(**KWARGS)
        assert outcome_unknown(caught.value) is False
        assert classify(caught.value) is ErrorKind.TRANSIENT
        assert seen == []
        assert calls(metrics, "error") == 0
        clients.start_gate.may_send = lambda: True
        await client_of(clients).start_execution(**KWARGS)
        assert len(seen) == 1
        await clients.sfn.list_state_machines()  # the other clients have no gate
        clients.start_gate.may_send = lambda: False
        await clients.sfn.list_state_machines()


async def test_the_starts_client_takes_the_endpoint_and_region_of_the_others() -> None:
    async with open_clients(
        Metrics(), region="eu-west-1", endpoint_url="http://127.0.0.1:9"
    ) as clients:
        starter = client_of(clients)
        assert starter is not clients.sfn
        assert starter.meta.endpoint_url == clients.sfn.meta.endpoint_url == "http://127.0.0.1:9"
        assert starter.meta.region_name == clients.sfn.meta.region_name
        assert starter.meta.config.retries == {"mode": "standard", "total_max_attempts": 1}  # type: ignore[attr-defined]


# -- the one session factory ------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def test_the_region_is_the_environments_else_the_default_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    assert session(default_region="eu-west-1").region_name == "eu-west-1"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
    assert session(default_region="eu-west-1").region_name == "us-west-2"
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    assert session(default_region="eu-west-1").region_name == "ap-south-1"
    assert session(region="eu-north-1").region_name == "eu-north-1", "a sandbox's, as given"


def test_one_module_makes_aws_sessions() -> None:
    """Every session comes from `dispatcher.aws.session` (endpoint, region, credentials
    from the usual places, one place to change them)."""
    makers = re.compile(r"^\s*(import aioboto3|from aioboto3|.*\baioboto3\.Session\()", re.M)
    found = [
        str(path.relative_to(REPO))
        for folder in ("dispatcher", "devtools", "sim", "bench", "tests", "scripts")
        for path in sorted((REPO / folder).rglob("*.py"))
        if makers.search(path.read_text(encoding="utf-8"))
    ]
    assert found == ["dispatcher/aws/api.py"]
