"""The thin StartExecution client: botocore's answers, errors, signature and counts.

Unit tests talk HTTP to a small aiohttp server on 127.0.0.1 whose handler each test
writes; the integration test runs the real dispatcher against the emulator through both
clients and judges the limit from the executions' records.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest
from aiobotocore.credentials import AioCredentials
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from devtools.sandbox.provision import SandboxResources
from dispatcher.aws.api import ErrorKind, classify, error_code, open_clients, outcome_unknown
from dispatcher.aws.startclient import TARGET, Signer, ThinStarts, UnreadableAnswerError
from dispatcher.daemon.metrics import Metrics
from tests.audit import send_requests, session, verdict, workload
from tests.runner import running

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ARN = "arn:aws:states:us-east-1:123456789012:stateMachine:demo"
KWARGS: dict[str, Any] = {"stateMachineArn": ARN, "name": "order-42", "input": '{"a": 1}'}
CREDENTIALS = AioCredentials("AKIDTEST", "not-a-real-secret", "a-session-token")


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
async def thin(url: str, deadline: float = 5.0) -> AsyncIterator[tuple[ThinStarts, Metrics]]:
    metrics = Metrics()
    async with ThinStarts(
        endpoint_url=url,
        region="us-east-1",
        credentials=CREDENTIALS,
        metrics=metrics,
        timeout=deadline,
        user_agent="sfn-dispatcher/test",
    ) as client:
        yield client, metrics


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
    async with server(handler) as (url, _), thin(url) as (client, metrics):
        with pytest.raises((ClientError, BotoCoreError)) as caught:
            await client.start_execution(**KWARGS)
    return caught.value, metrics


pytestmark = pytest.mark.timeout(10)


async def test_a_success_is_parsed_like_botocore() -> None:
    arn = "arn:aws:states:us-east-1:123456789012:execution:demo:order-42"
    ok = answer(200, {"executionArn": arn, "startDate": 1764270000.25})
    async with server(ok) as (url, seen), thin(url) as (client, metrics):
        result = await client.start_execution(**KWARGS)
    assert result["executionArn"] == arn
    assert result["startDate"] == datetime(2025, 11, 27, 19, 0, 0, 250000, tzinfo=UTC)
    assert result["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert json.loads(await seen[0].read()) == KWARGS
    assert seen[0].headers["X-Amz-Target"] == TARGET
    assert seen[0].headers["Content-Type"] == "application/x-amz-json-1.0"
    assert seen[0].headers["User-Agent"] == "sfn-dispatcher/test"
    assert calls(metrics, "ok") == 1


def botocore_signature(
    url: str, sent: dict[str, str], body: bytes, token: str | None, region: str = "r"
) -> str:
    """botocore's SigV4Auth over the same request, at the time the request carries."""
    request = AWSRequest(
        method="POST",
        url=url,
        data=body,
        headers={
            "Content-Type": sent["content-type"],
            "X-Amz-Target": sent["x-amz-target"],
            "X-Amz-Date": sent["x-amz-date"],
            **({"X-Amz-Security-Token": token} if token else {}),
        },
    )
    request.context["timestamp"] = sent["x-amz-date"]
    auth = SigV4Auth(ReadOnlyCredentials("AKIDTEST", "not-a-real-secret", token), "states", region)
    return auth.signature(auth.string_to_sign(request, auth.canonical_request(request)), request)


@pytest.mark.parametrize("token", ["a-session-token", None], ids=["session", "long-term"])
@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:4566/", "https://states.r.amazonaws.com:443/", "https://h/"]
)
def test_the_signature_equals_botocores(url: str, token: str | None) -> None:
    body = json.dumps(KWARGS).encode()
    now = datetime(2026, 11, 27, 23, 59, 59, tzinfo=UTC)
    sent = Signer(url, "r").headers(body, "AKIDTEST", "not-a-real-secret", token, now)
    assert sent["x-amz-date"] == "20261127T235959Z"
    assert sent["authorization"].endswith("Signature=" + botocore_signature(url, sent, body, token))


async def test_the_request_sent_carries_that_signature() -> None:
    ok = answer(200, {"executionArn": "arn", "startDate": 0})
    async with server(ok) as (url, seen), thin(url) as (client, _):
        await client.start_execution(**KWARGS)
    sent = {k.lower(): v for k, v in seen[0].headers.items()}
    signature = botocore_signature(
        url + "/", sent, await seen[0].read(), "a-session-token", "us-east-1"
    )
    assert sent["authorization"].endswith("Signature=" + signature)
    assert sent["x-amz-security-token"] == "a-session-token"


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
        ((400, None, HEADER_ONLY), ("InvalidArn", ErrorKind.SETUP, False, "error")),
        (
            (500, {"__type": "InternalFailure"}, {}),
            ("InternalFailure", ErrorKind.TRANSIENT, True, "error"),
        ),
        ((503, None, {}), ("ServiceUnavailable", ErrorKind.TRANSIENT, True, "error")),
    ],
    ids=["already-exists", "throttled", "header-only", "500", "503-no-body"],
)
async def test_error_answers_raise_what_botocore_raises(
    sent: tuple[int, Any, dict[str, str]], expected: tuple[str, ErrorKind, bool, str]
) -> None:
    """(status, JSON body, headers) -> (code, classify, outcome_unknown, counted as)."""
    status, body, headers = sent
    code, kind, unknown, outcome = expected
    error, metrics = await failure(answer(status, body, **headers))
    assert isinstance(error, ClientError)
    assert error_code(error) == code
    assert error.response["ResponseMetadata"]["HTTPStatusCode"] == status
    assert classify(error) is kind
    assert outcome_unknown(error) is unknown
    assert calls(metrics, outcome) == 1


async def test_a_refused_connection_was_not_sent() -> None:
    with socket.socket() as probe:  # a port nobody listens on: bound, never listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        async with thin(f"http://127.0.0.1:{port}") as (client, metrics):
            with pytest.raises(EndpointConnectionError) as caught:
                await client.start_execution(**KWARGS)
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
        await release.wait()  # never set: the client's deadline ends the call
        return web.Response()

    async with server(slow) as (url, _), thin(url, deadline=0.3) as (client, metrics):
        with pytest.raises(ReadTimeoutError) as caught:
            await client.start_execution(**KWARGS)
        release.set()  # the server's shutdown waits for its handler
    error = caught.value
    assert isinstance(error, ReadTimeoutError)
    assert outcome_unknown(error) is True
    assert classify(error) is ErrorKind.TRANSIENT
    assert calls(metrics, "error") == 1


async def test_an_unreadable_success_is_in_doubt() -> None:
    async def garbage(_: web.Request) -> web.StreamResponse:
        return web.Response(status=200, text="<html>proxy</html>")

    error, metrics = await failure(garbage)
    assert isinstance(error, UnreadableAnswerError)
    assert outcome_unknown(error) is True
    assert calls(metrics, "error") == 1


@pytest.mark.parametrize("choice", ["thin", "botocore"])
async def test_open_clients_builds_the_chosen_starts_client(choice: str) -> None:
    """The thin client takes the SFN client's endpoint and region (an endpoint_url
    override such as the fault proxy's included)."""
    async with open_clients(
        Metrics(),
        region="eu-west-1",
        endpoint_url="http://127.0.0.1:9",
        start_client=choice,
    ) as clients:
        assert isinstance(clients.starts, ThinStarts) is (choice == "thin")
        if isinstance(clients.starts, ThinStarts):
            assert clients.starts.url == "http://127.0.0.1:9/"
            assert clients.starts.region == clients.sfn.meta.region_name


@pytest.mark.integration
@pytest.mark.timeout(90)
@pytest.mark.parametrize("choice", ["thin", "botocore"])
async def test_limit_held_through_either_start_client(
    sandbox_factory: Callable[..., Awaitable[SandboxResources]], choice: str
) -> None:
    resources = await sandbox_factory(limit=3)
    async with session().client("sqs", endpoint_url=resources.endpoint) as sqs:
        names = await send_requests(sqs, resources.request_queue_url, workload(8, 0.2, 1.0))
    async with running(resources, limit=3, start_client=choice) as dispatcher:
        await verdict(resources, names, 3, within=60)
        assert dispatcher.pool.started_total == 8


async def test_a_lease_that_lapses_while_a_start_waits_for_its_connection_stops_it() -> None:
    """The lease is checked again once a connection is in hand (new or pooled), just before
    the request is written: a process frozen while it connected, or while it waited for a
    pooled connection or its credentials, sends nothing when it resumes with a lapsed
    lease; the start was not sent (not in doubt)."""
    arn = "arn:aws:states:us-east-1:123456789012:execution:demo:order-42"
    ok = answer(200, {"executionArn": arn, "startDate": 1764270000.25})
    async with server(ok) as (url, seen), thin(url) as (client, _):
        checks = iter([True, False])  # valid before the connection, lapsed once it is made
        client.may_send = lambda: next(checks)
        with pytest.raises(EndpointConnectionError) as caught:
            await client.start_execution(**KWARGS)
        assert outcome_unknown(caught.value) is False
        assert seen == []
        client.may_send = lambda: True
        await client.start_execution(**KWARGS)  # leaves a connection in the pool
        assert len(seen) == 1
        checks = iter([True, False])  # lapsed while it waited for the pooled connection
        client.may_send = lambda: next(checks)
        with pytest.raises(EndpointConnectionError):
            await client.start_execution(**KWARGS)
        assert len(seen) == 1
