"""An HTTP proxy on loopback that injects AWS faults between a client and the emulator.

The dispatcher under test is pointed at the proxy (`AWS_ENDPOINT_URL`), so it meets
throttling, 5xx answers, dropped connections and a lagging `ListExecutions` through real
botocore parsing: the local emulator produces none of them on its own.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from typing import Self
from urllib.parse import parse_qs
from xml.sax.saxutils import escape

import aiohttp
from aiohttp import web
from yarl import URL

# Never forwarded: they describe one hop, and aiohttp recomputes framing for the next.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "content-length",
        "expect",
        "host",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# The proxy sends exactly the client's headers upstream, so aiohttp must add none of its own.
_NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "Content-Type", "User-Agent")
# JSON services that replaced a query protocol: botocore takes the error code from the
# x-amzn-query-error header for them (`awsQueryCompatible` in the service model).
_QUERY_COMPATIBLE = frozenset({"AmazonSQS"})
_LISTING = "ListExecutions"


class FaultKind(StrEnum):
    """What a rule does to a request it fires on."""

    THROTTLE = "throttle"
    SERVER_ERROR = "server_error"
    ERROR = "error"
    LATENCY = "latency"
    DROP = "drop"
    DROP_RESPONSE = "drop_response"
    HTML_PAGE = "html_page"
    """An HTML page (404 unless ``status``), as a proxy or a wrong endpoint answers: no
    AWS error type; the request is not forwarded."""
    HTML_PAGE_AFTER = "html_page_after"
    """The request is forwarded (it takes effect), then answered with the HTML page, as a
    gateway in front of AWS may answer once its own deadline passed."""


@dataclass(frozen=True)
class _Call:
    """Which AWS operation a request is, and which wire protocol its error must use."""

    operation: str
    service: str  # the X-Amz-Target prefix ("AWSStepFunctions", "AmazonSQS"); "" otherwise
    query: bool  # form-encoded query protocol: errors are XML


@dataclass
class FaultRule:
    """One fault: the operation it hits ("*" for any), how often, how many times, what it does.

    `error_code`, `status` and `message` default to what AWS answers for the kind and the
    protocol; `fired` counts the requests the rule took.
    """

    operation: str
    kind: FaultKind
    probability: float = 1.0
    max_count: int | None = None
    body_contains: str | None = None
    delay: float = 0.0
    error_code: str | None = None
    status: int | None = None
    message: str | None = None
    fired: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        """Reject rules that could never behave as written."""
        self.kind = FaultKind(self.kind)
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be within [0, 1], got {self.probability}")
        if self.max_count is not None and self.max_count < 0:
            raise ValueError(f"max_count must be >= 0, got {self.max_count}")
        if self.delay < 0:
            raise ValueError(f"delay must be >= 0, got {self.delay}")
        if self.kind is FaultKind.ERROR and not self.error_code:
            raise ValueError("an `error` rule needs error_code (and usually status)")

    def matches(self, operation: str, body: bytes) -> bool:
        """Whether the rule applies to this request, before its probability is rolled."""
        if self.operation not in ("*", operation):
            return False
        if self.max_count is not None and self.fired >= self.max_count:
            return False
        return self.body_contains is None or self.body_contains.encode() in body

    def answer(self, call: _Call) -> tuple[int, str, str]:
        """The status, error code and message an error-kind rule answers with."""
        if self.kind is FaultKind.THROTTLE:
            # SQS models throttling as RequestThrottled; the other JSON services say
            # ThrottlingException; query services say Throttling. botocore retries all three.
            if call.service in _QUERY_COMPATIBLE:
                default = "RequestThrottled"
            else:
                default = "Throttling" if call.query else "ThrottlingException"
            return self.status or 400, self.error_code or default, self.message or "Rate exceeded"
        if self.kind is FaultKind.SERVER_ERROR:
            status = self.status or 500
            default = "ServiceUnavailable" if status == 503 else "InternalServerError"
            code = self.error_code or default
            return status, code, self.message or "Injected server error"
        code = self.error_code or "ValidationException"
        return self.status or 400, code, self.message or f"Injected {code}"


@dataclass(frozen=True)
class _Captured:
    """An upstream answer held as bytes, so it can be served now or replayed later."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def to_response(self) -> web.Response:
        """A fresh aiohttp response carrying the captured answer verbatim."""
        return web.Response(status=self.status, headers=list(self.headers), body=self.body)


class _ListingHistory:
    """Recent ListExecutions answers per distinct request, bounded in time and in size."""

    def __init__(self, horizon: float, max_keys: int = 256, max_per_key: int = 512) -> None:
        self._horizon = horizon
        self._max_keys = max_keys
        self._max_per_key = max_per_key
        self._entries: OrderedDict[str, deque[tuple[float, _Captured]]] = OrderedDict()

    def record_and_pick(self, key: str, now: float, fresh: _Captured, lag: float) -> _Captured:
        """Remember `fresh`, then return the answer as it was `lag` seconds ago."""
        entries = self._entries.pop(key, None) or deque(maxlen=self._max_per_key)
        self._entries[key] = entries
        while len(self._entries) > self._max_keys:
            self._entries.popitem(last=False)
        entries.append((now, fresh))
        # Keep one answer older than the window: it is the one a lagged read serves.
        cutoff = now - max(self._horizon, lag)
        while len(entries) > 1 and entries[1][0] <= cutoff:
            entries.popleft()
        if lag <= 0:
            return fresh
        # Before the history is `lag` deep, the oldest answer is the nearest to the truth
        # of `lag` ago; serving the fresh one would hide exactly the lag under test.
        served = entries[0][1]
        for recorded_at, captured in entries:
            if now - recorded_at < lag:
                break
            served = captured
        return served


class FaultProxy:
    """A reverse proxy on 127.0.0.1 that forwards to `upstream` and applies rules in order.

    Rules and `list_lag` can change while it runs; `stats` counts (operation, outcome),
    where the outcome is "forwarded", a fault kind, "stale" (a lagged listing) or
    "upstream_error". The seed makes every probability roll reproducible.

    With `list_lag` > 0, every ListExecutions is still forwarded (and recorded), but the
    answer served is the newest recorded one at least `list_lag` old, else the oldest on
    record: a new execution shows `list_lag` after the first listing that saw it, and a
    finished one stays RUNNING as long. `clock` drives this history, so tests need not sleep.
    """

    def __init__(
        self,
        upstream: str,
        *,
        seed: int = 0,
        rules: Iterable[FaultRule] = (),
        list_lag: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        port: int = 0,
        history_seconds: float = 60.0,
        upstream_timeout: float = 60.0,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.list_lag = list_lag
        self.stats: Counter[tuple[str, str]] = Counter()
        self._rules = list(rules)
        self._rng = random.Random(seed)
        self._clock = clock
        self._port = port
        self._history = _ListingHistory(history_seconds)
        self._upstream_timeout = upstream_timeout
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        """The endpoint URL to give the client under test."""
        if self._url is None:
            raise RuntimeError("FaultProxy is not running: use `async with FaultProxy(...)`")
        return self._url

    @property
    def rules(self) -> tuple[FaultRule, ...]:
        """The rules, in evaluation order."""
        return tuple(self._rules)

    def add(self, rule: FaultRule) -> FaultRule:
        """Append a rule (evaluated after the existing ones) and return it."""
        self._rules.append(rule)
        return rule

    def clear(self) -> None:
        """Drop every rule: from now on requests are forwarded untouched."""
        self._rules.clear()

    async def start(self) -> None:
        """Open the upstream session and listen on loopback."""
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            skip_auto_headers=_NO_AUTO_HEADERS,
            timeout=aiohttp.ClientTimeout(total=self._upstream_timeout),
        )
        # Inputs and messages go up to 256 KiB; leave room for the JSON around them.
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # A long poll in flight must not hold the exit for aiohttp's default 60 s.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self._port).start()
        host, port = self._runner.addresses[0][:2]
        self._url = f"http://{host}:{port}"

    async def close(self) -> None:
        """Stop listening, close client connections, then the upstream session."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._url = None

    async def __aenter__(self) -> Self:
        """Start the proxy."""
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the proxy."""
        await self.close()

    def _pick(self, operation: str, body: bytes) -> FaultRule | None:
        """The first rule that fires on this request, if any (rules are tried in order)."""
        for rule in self._rules:
            if not rule.matches(operation, body):
                continue
            if rule.probability < 1.0 and self._rng.random() >= rule.probability:
                continue
            rule.fired += 1
            return rule
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        """Apply the first firing rule to the request, else forward it; count the outcome."""
        body = await request.read()
        call = _identify(request, body)
        rule = self._pick(call.operation, body)
        try:
            response, outcome = await self._respond(request, body, call, rule)
        except (aiohttp.ClientError, TimeoutError) as exc:
            response, outcome = (
                web.Response(status=502, text=f"upstream: {exc!r}"),
                "upstream_error",
            )
        self.stats[(call.operation, outcome)] += 1
        return response

    async def _respond(
        self, request: web.Request, body: bytes, call: _Call, rule: FaultRule | None
    ) -> tuple[web.StreamResponse, str]:
        """The response to one request, and its outcome for `stats`."""
        if rule is not None:
            if rule.kind is FaultKind.DROP:
                return _drop(request), rule.kind.value
            if rule.kind in (FaultKind.DROP_RESPONSE, FaultKind.HTML_PAGE_AFTER):
                await self._forward(request, body)  # the side effect happens; the answer is lost
            if rule.kind is FaultKind.DROP_RESPONSE:
                return _drop(request), rule.kind.value
            if rule.kind is not FaultKind.LATENCY:
                return self._fault_answer(call, rule), rule.kind.value
            # Latency the way TCP has it: the request is held *before* it reaches AWS, and
            # one whose client gave up meanwhile (connection closed) never reaches it.
            await asyncio.sleep(rule.delay)
            if _client_gone(request):
                return _drop(request), "abandoned"
        outcome = "forwarded" if rule is None else rule.kind.value
        fresh = await self._forward(request, body)
        if call.operation != _LISTING or fresh.status != 200:
            return fresh.to_response(), outcome
        served = self._history.record_and_pick(
            _listing_key(body), self._clock(), fresh, self.list_lag
        )
        return served.to_response(), outcome if served is fresh else "stale"

    @staticmethod
    def _fault_answer(call: _Call, rule: FaultRule) -> web.Response:
        """What an answering rule answers: an HTML page, or an AWS error."""
        if rule.kind in (FaultKind.HTML_PAGE, FaultKind.HTML_PAGE_AFTER):
            return _html_response(rule.status or 404, rule.message)
        return _error_response(call, *rule.answer(call))

    async def _forward(self, request: web.Request, body: bytes) -> _Captured:
        """Send the request upstream verbatim and read the whole answer."""
        if self._session is None:
            raise RuntimeError("FaultProxy is not running")
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP]
        async with self._session.request(
            request.method,
            URL(self.upstream + request.raw_path, encoded=True),
            headers=headers,
            data=body,
            allow_redirects=False,
        ) as upstream:
            data = await upstream.read()
            kept = tuple(
                (k, v) for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP
            )
            return _Captured(upstream.status, kept, data)


def _identify(request: web.Request, body: bytes) -> _Call:
    """The operation from X-Amz-Target (JSON protocols), else the query protocol's Action."""
    target = request.headers.get("X-Amz-Target", "")
    if target:
        service, _, operation = target.rpartition(".")
        return _Call(operation, service, query=False)
    action = request.query.get("Action")
    if action is None and request.content_type == "application/x-www-form-urlencoded":
        action = parse_qs(body.decode("utf-8", "replace")).get("Action", [None])[0]
    if action:
        return _Call(action, "", query=True)
    return _Call(f"{request.method} {request.path}", "", query=False)


def _listing_key(body: bytes) -> str:
    """One key per distinct listing (state machine, status filter, page token, page size)."""
    try:
        return json.dumps(json.loads(body), sort_keys=True)
    except ValueError:
        return body.decode("utf-8", "replace")


def _client_gone(request: web.Request) -> bool:
    """Whether the client closed its connection (it gave up waiting)."""
    transport = request.transport
    return transport is None or transport.is_closing()


def _drop(request: web.Request) -> web.Response:
    """Close the client's connection with no answer: botocore sees ConnectionClosedError."""
    if request.transport is not None:
        request.transport.close()
    # Never written: aiohttp finds the transport closed and gives up quietly.
    return web.Response(status=503)


def _html_response(status: int, message: str | None) -> web.Response:
    """A proxy's or web server's own error page: HTML, no AWS error type anywhere."""
    title = f"{status} {message or 'Not Found'}"
    page = f"<html><head><title>{escape(title)}</title></head><body><h1>{escape(title)}</h1>"
    return web.Response(status=status, text=page + "</body></html>", content_type="text/html")


def _error_response(call: _Call, status: int, code: str, message: str) -> web.Response:
    """An error shaped as AWS sends it for the call's protocol, so botocore parses the code."""
    request_id = str(uuid.uuid4())
    if call.query:
        fault = "Sender" if status < 500 else "Receiver"
        xml = (
            '<?xml version="1.0"?><ErrorResponse><Error>'
            f"<Type>{fault}</Type><Code>{escape(code)}</Code>"
            f"<Message>{escape(message)}</Message></Error>"
            f"<RequestId>{request_id}</RequestId></ErrorResponse>"
        )
        return web.Response(
            status=status,
            body=xml.encode(),
            content_type="text/xml",
            headers={"x-amzn-RequestId": request_id},
        )
    headers = {"x-amzn-RequestId": request_id, "x-amzn-ErrorType": code}
    if call.service in _QUERY_COMPATIBLE:
        fault = "Sender" if status < 500 else "Receiver"
        headers["x-amzn-query-error"] = f"{code};{fault}"
    return web.Response(
        status=status,
        body=json.dumps({"__type": code, "message": message}).encode(),
        content_type="application/x-amz-json-1.0",
        headers=headers,
    )
