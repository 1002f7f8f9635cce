"""A thin StartExecution client: SigV4, one aiohttp session, one attempt.

botocore's per-request machinery (event hooks, serialisers, the retry handler, the
response parser) costs the dispatcher more CPU per start than the start's own work
(issue #13). This client does only what a StartExecution needs - JSON 1.0 body, a SigV4
signature equal to botocore's, one POST - and raises the exceptions botocore would, so
that `dispatcher.aws.api.classify` / `outcome_unknown` / `error_code` read them unchanged.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import aiohttp
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from dispatcher.aws.api import attempt_outcome
from dispatcher.daemon.metrics import Metrics

if TYPE_CHECKING:
    from aiobotocore.credentials import AioCredentials

OPERATION = "StartExecution"
TARGET = "AWSStepFunctions.StartExecution"
SIGNING_NAME = "states"
_BODYLESS_CODES = {500: "InternalFailure", 503: "ServiceUnavailable", 429: "ThrottlingException"}
"""The code of an error answer without one (a proxy's bare 5xx): what AWS sends for it."""


class NotSentError(Exception):
    """The gate (`ThinStarts.may_send`: the lease) closed before the request left."""


class UnreadableAnswerError(BotoCoreError):
    """A 200 answer that is not the JSON StartExecution returns: the start may have
    happened (`dispatcher.aws.api.outcome_unknown` says so for any BotoCoreError)."""

    fmt = "StartExecution answered {status} with an unreadable body: {detail}"


def error_of(status: int, headers: Any, body: bytes) -> tuple[str, str]:
    """(code, message) of an error answer: JSON ``__type`` (after any ``prefix#``), else
    the ``x-amzn-ErrorType`` header (before any ``:``), else a code for the status."""
    code, message = "", ""
    try:
        parsed = json.loads(body) if body else {}
    except ValueError:
        parsed = {}
    if isinstance(parsed, dict):
        code = str(parsed.get("__type") or parsed.get("code") or "").rsplit("#", 1)[-1]
        message = str(parsed.get("message") or parsed.get("Message") or "")
    if not code:
        code = str(headers.get("x-amzn-ErrorType", "")).split(":", 1)[0]
    if not code:
        code = _BODYLESS_CODES.get(status, str(status))
    return code, message


class Signer:
    """SigV4 for a JSON 1.0 ``StartExecution`` POST: the same signature as botocore's
    ``SigV4Auth`` (tests/test_startclient.py compares them), written out because the
    library's costs a start too much CPU.

    Measured against the emulator (``bench/capacity.py``'s loops, 64 tasks,
    1500 starts, client CPU per start): this client with botocore's ``SigV4Auth`` on an
    ``AWSRequest`` 0.39-0.43 ms, with this signer 0.26-0.33 ms, aiobotocore tuned
    0.59-0.69 ms, defaults 0.71-0.73 ms; the dispatcher with the library signer still
    spent 1.58x a bare start (target 1.3x). ``awscrt``'s signer is not installed (a new
    native dependency) and builds several objects per request of its own.
    """

    def __init__(self, url: str, region: str) -> None:
        parts = urlsplit(url)
        # As botocore's SigV4Auth: no default port, no user info; sent as signed.
        if parts.port == {"http": 80, "https": 443}.get(parts.scheme):
            self.host = parts.hostname or ""
        else:
            self.host = parts.netloc.rsplit("@", 1)[-1]
        self.path = quote(parts.path or "/", safe="/~")
        self.region = region
        self._keys: dict[tuple[str, str], bytes] = {}

    def _key(self, secret: str, day: str) -> bytes:
        """The day's signing key (derived once per day and secret, not per request)."""
        key = self._keys.get((secret, day))
        if key is None:
            key = ("AWS4" + secret).encode()
            for part in (day, self.region, SIGNING_NAME, "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            self._keys = {(secret, day): key}  # rotated credentials: forget the old key
        return key

    def headers(
        self, body: bytes, access_key: str, secret: str, token: str | None, now: datetime
    ) -> dict[str, str]:
        """Headers of the signed request at ``now`` (UTC)."""
        stamp = now.strftime("%Y%m%dT%H%M%SZ")
        day = stamp[:8]
        headers = {
            "content-type": "application/x-amz-json-1.0",
            "host": self.host,
            "x-amz-date": stamp,
        }
        if token:
            headers["x-amz-security-token"] = token
        headers["x-amz-target"] = TARGET  # every name in sorted order, as SigV4 wants
        signed = ";".join(headers)
        canonical = (
            f"POST\n{self.path}\n\n"
            + "".join(f"{name}:{value}\n" for name, value in headers.items())
            + f"\n{signed}\n{hashlib.sha256(body).hexdigest()}"
        )
        scope = f"{day}/{self.region}/{SIGNING_NAME}/aws4_request"
        to_sign = (
            f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n" + hashlib.sha256(canonical.encode()).hexdigest()
        )
        signature = hmac.new(self._key(secret, day), to_sign.encode(), hashlib.sha256)
        headers["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders={signed}, "
            f"Signature={signature.hexdigest()}"
        )
        return headers


class ThinStarts:
    """``start_execution(**kwargs)`` with aiobotocore's arguments and answer shape."""

    def __init__(
        self,
        *,
        endpoint_url: str,
        region: str,
        credentials: AioCredentials | None,
        metrics: Metrics,
        timeout: float,
        user_agent: str,
        http: aiohttp.ClientSession | None = None,
    ) -> None:
        self.url = endpoint_url.rstrip("/") + "/"
        self.region = region
        self._signer = Signer(self.url, region)
        self._credentials = credentials
        self._metrics = metrics
        self._user_agent = user_agent
        self.may_send: Callable[[], bool] = lambda: True
        """Checked again once the credentials and a connection are in hand, just before
        the request is written: waiting for either may have taken long (a freeze, a
        credentials refresh, a new TLS connection), and a lease checked before the wait may
        have lapsed meanwhile. A closed gate raises as a connection never made: not sent."""
        self._own_http = http is None
        gate = aiohttp.TraceConfig()
        gate.on_connection_create_end.append(self._gate)
        gate.on_connection_reuseconn.append(self._gate)
        self._http = http or aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64),
            timeout=aiohttp.ClientTimeout(total=timeout, connect=min(5.0, timeout)),
            trace_configs=[gate],
        )

    async def close(self) -> None:
        """Close the HTTP session (only one this client made itself)."""
        if self._own_http:
            await self._http.close()

    async def __aenter__(self) -> ThinStarts:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def _signed(self, body: bytes) -> dict[str, str]:
        """The request's headers, SigV4-signed with the session's current credentials."""
        if self._credentials is None:
            raise NoCredentialsError()
        # Refreshable credentials (ECS task role, IRSA) refresh themselves in here.
        frozen = await self._credentials.get_frozen_credentials()
        if frozen.access_key is None or frozen.secret_key is None:
            raise NoCredentialsError()
        headers = self._signer.headers(
            body, frozen.access_key, frozen.secret_key, frozen.token, datetime.now(UTC)
        )
        headers["user-agent"] = self._user_agent  # never signed (botocore leaves it out too)
        return headers

    async def _gate(self, *_: object) -> None:
        if not self.may_send():
            raise NotSentError("the lease lapsed before the request left")

    def _count(self, outcome: str) -> None:
        self._metrics.aws_calls.labels(operation=OPERATION, outcome=outcome).inc()

    async def start_execution(self, **kwargs: Any) -> dict[str, Any]:
        """One StartExecution attempt; raises what botocore would for each failure."""
        body = json.dumps(kwargs, separators=(",", ":")).encode()
        headers = await self._signed(body)
        try:
            await self._gate()  # the credentials may have taken long
            async with self._http.post(self.url, data=body, headers=headers) as response:
                status, answer = response.status, await response.read()
                answer_headers = response.headers
        except NotSentError as exc:  # the lease lapsed while it waited: not sent
            raise EndpointConnectionError(endpoint_url=self.url, error=exc) from exc
        except aiohttp.ClientConnectorError as exc:  # never connected: not sent
            self._count("error")
            raise EndpointConnectionError(endpoint_url=self.url, error=exc) from exc
        except aiohttp.ConnectionTimeoutError as exc:  # no connection within the limit
            self._count("error")
            raise ConnectTimeoutError(endpoint_url=self.url, error=exc) from exc
        except (TimeoutError, asyncio.TimeoutError) as exc:  # noqa: UP041 - aiohttp's own
            self._count("error")
            raise ReadTimeoutError(endpoint_url=self.url, error=exc) from exc
        except (aiohttp.ClientError, OSError) as exc:  # reset or closed once it was sent
            self._count("error")
            raise ConnectionClosedError(endpoint_url=self.url, error=exc) from exc
        metadata: dict[str, Any] = {
            "HTTPStatusCode": status,
            "RequestId": answer_headers.get("x-amzn-RequestId", ""),
            "HTTPHeaders": {k.lower(): v for k, v in answer_headers.items()},
            "RetryAttempts": 0,
        }
        if status >= 300:
            code, message = error_of(status, answer_headers, answer)
            self._count(attempt_outcome(OPERATION, status, code))
            error: Any = {"Error": {"Code": code, "Message": message}}
            error["ResponseMetadata"] = metadata
            raise ClientError(error, OPERATION)
        try:
            parsed = json.loads(answer)
            result = {
                "executionArn": str(parsed["executionArn"]),
                "startDate": datetime.fromtimestamp(float(parsed["startDate"]), UTC),
                "ResponseMetadata": metadata,
            }
        except (ValueError, KeyError, TypeError) as exc:
            self._count("error")
            raise UnreadableAnswerError(status=status, detail=repr(answer[:200])) from exc
        self._count(attempt_outcome(OPERATION, status, ""))
        return result
