"""The AWS boundary: the one place sessions and clients are made (aioboto3 only), error
classification and per-attempt call metrics."""

from __future__ import annotations

import os
import platform
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import aioboto3
import aiobotocore
import aiohttp
from aiobotocore.config import AioConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from dispatcher import __version__
from dispatcher.daemon.metrics import Metrics

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_ssm import SSMClient
    from types_aiobotocore_stepfunctions import SFNClient

THROTTLE_CODES = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "TooManyRequestsException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "ProvisionedThroughputExceededException",
    }
)
TRANSIENT_CODES = THROTTLE_CODES | frozenset(
    {
        "ServiceUnavailable",
        "InternalServerError",
        "InternalFailure",
        "InternalError",
        "RequestTimeout",
        "RequestTimeoutException",
        "ExecutionLimitExceeded",  # the account's open-execution quota: wait, don't drop
    }
)
# Errors that say the deployment is wrong, not the request: never dead-letter for these.
SETUP_CODES = frozenset(
    {
        "StateMachineDoesNotExist",
        "StateMachineDeleting",
        "AccessDeniedException",
        "AccessDenied",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "ExpiredTokenException",
        "InvalidClientTokenId",
        "KmsAccessDeniedException",
        "KmsThrottlingException",
        "KmsInvalidStateException",
        "InvalidArn",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "SignatureDoesNotMatch",
        "RequestExpired",
        "NotAuthorized",
        "OptInRequired",
    }
)
# Errors that blame the request itself (or, for the other calls, their arguments): only
# these dead-letter a request. StartExecution's own: a bad input, a bad name, a value AWS
# refused; the rest are the answers other calls act on (not retried).
REQUEST_CODES = frozenset(
    {
        "InvalidExecutionInput",
        "InvalidName",
        "ValidationException",
        "ExecutionAlreadyExists",
        "ExecutionDoesNotExist",
        "InvalidOutput",
        "InvalidToken",
        "TaskDoesNotExist",
        "TaskTimedOut",
    }
)
KNOWN_CODES = TRANSIENT_CODES | SETUP_CODES | REQUEST_CODES
"""Error codes the dispatcher recognises: any other answer (a proxy's HTML page, a wrong
endpoint's 404, a code AWS added since) says nothing about the request."""


class ErrorKind(StrEnum):
    """What to do about a failed call."""

    TRANSIENT = "transient"  # retry with back-off
    SETUP = "setup"  # the deployment is broken: keep the request, alert, retry later
    UNKNOWN = "unknown"  # not an AWS error we know (a proxy, a wrong endpoint): as SETUP,
    # and whether the call took effect is unknown (`outcome_unknown`)
    PERMANENT = "permanent"  # the request itself is bad: dead-letter it


def error_code(exc: BaseException) -> str:
    """The AWS error code of a ``ClientError`` ('' for anything else)."""
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def classify(exc: BaseException) -> ErrorKind:
    """Sort a failure into retry / hold / dead-letter. Only a recognised AWS error about
    the request is permanent: an answer without one (an HTML page from a proxy or a wrong
    endpoint, whose code botocore makes up from the HTTP status) or with a code not known
    here is the deployment's or AWS's, never the request's."""
    if isinstance(exc, ClientError):
        code = error_code(exc)
        status = _status(exc)
        if code in TRANSIENT_CODES or status >= 500 or status == 429:
            return ErrorKind.TRANSIENT
        if code in SETUP_CODES or (code not in REQUEST_CODES and status in (401, 403)):
            return ErrorKind.SETUP
        return ErrorKind.PERMANENT if code in REQUEST_CODES else ErrorKind.UNKNOWN
    if isinstance(
        exc, BotoConnectionError | BotoCoreError | OSError | TimeoutError | aiohttp.ClientError
    ):
        # aiohttp's own errors: aiobotocore reads an answer's body outside its error
        # mapping, so a connection cut mid-answer surfaces as ClientPayloadError.
        return ErrorKind.TRANSIENT
    # Not an answer at all: a defect of this process (it once dead-lettered every request
    # with reason "NameError"), never the request's.
    return ErrorKind.UNKNOWN


def outcome_unknown(exc: BaseException) -> bool:
    """Whether a failed call may still have taken effect on AWS's side.

    An AWS error answer below 500 (a throttle, a validation error) says the request was
    refused; so does a connection that was never made. A 5xx, a timeout, a reset, a lost
    answer or an answer that is not an AWS error we know (a proxy's page, which may come
    after the request went on) says nothing: the request may have arrived and been applied.
    """
    if isinstance(exc, ClientError):
        status = _status(exc)
        if status >= 500 or status == 0:
            return True
        return status != 429 and error_code(exc) not in KNOWN_CODES
    return not isinstance(exc, EndpointConnectionError | ConnectTimeoutError)


AWS_ERRORS = (ClientError, BotoCoreError, OSError, TimeoutError, aiohttp.ClientError)
"""What a failed AWS call raises; anything else escaping a loop is a bug and ends it."""


def is_retryable(exc: Exception) -> bool:
    """Retry predicate for stamina: transient and setup errors are retried (not an error
    about the request, nor anything that is not an AWS call's failure)."""
    return isinstance(exc, AWS_ERRORS) and classify(exc) is not ErrorKind.PERMANENT


class UnreadableAnswerError(BotoCoreError):
    """A success answer without what the operation returns (a proxy's 200 page, which botocore
    parses into an empty answer): the call may have taken effect (`outcome_unknown` says so
    for any BotoCoreError), and it says nothing about the request."""

    fmt = "{operation} answered {status} without {missing}"


def _check_answer(
    http_response: Any = None, parsed: Any = None, model: Any = None, **_: Any
) -> None:
    """A botocore ``after-call`` hook: a success must carry the operation's required output
    (an error answer goes on to be raised as a ClientError)."""
    status = int(getattr(http_response, "status_code", 0) or 0)
    if status >= 300 or "Error" in (parsed or {}):
        return
    shape = getattr(model, "output_shape", None)
    required = shape.required_members if shape is not None else ()
    missing = [name for name in required if name not in (parsed or {})]
    if missing:
        raise UnreadableAnswerError(operation=model.name, status=status, missing=missing)


class LeaseLapsedError(Exception):
    """The start gate (the lease) closed before the request left: it was not sent."""


class StartGate:
    """Whether a ``StartExecution`` may still leave: checked once the attempt has its
    credentials and signature (a credentials refresh may take long, and a lease checked
    before it may have lapsed meanwhile), just before the request is handed to the
    connection pool. A closed gate fails the attempt as a connection never made (not sent,
    not in doubt)."""

    def __init__(self) -> None:
        self.may_send: Callable[[], bool] = lambda: True

    def before_send(self, request: Any = None, **_: Any) -> None:
        """A botocore ``before-send`` hook."""
        if not self.may_send():
            url = getattr(request, "url", "")
            raise EndpointConnectionError(
                endpoint_url=url, error=LeaseLapsedError("the lease lapsed before it was sent")
            )


@dataclass(frozen=True)
class Clients:
    """The AWS clients the dispatcher uses (DynamoDB only with a lease, SSM only for
    limits kept in parameters)."""

    sqs: SQSClient
    sfn: SFNClient
    dynamodb: DynamoDBClient | None = None
    ssm: SSMClient | None = None
    starts: SFNClient | None = None
    """The client StartExecution goes through: one attempt per call, no SDK retries, so
    every attempt re-checks the lease (None: ``sfn``)."""
    start_gate: StartGate = field(default_factory=StartGate)
    """Checked by ``starts`` just before each request leaves (the lease sets it)."""


PARENT_GONE_CODES = frozenset({"TaskDoesNotExist", "TaskTimedOut", "InvalidToken"})
EXPECTED_CODES: dict[str, frozenset[str]] = {
    # A redelivered request meets its own execution: "already done", not a failure.
    "StartExecution": frozenset({"ExecutionAlreadyExists"}),
    # A describe right after a start (or of a name never started) lags: asked again.
    "DescribeExecution": frozenset({"ExecutionDoesNotExist"}),
    # The parent stopped waiting, or an earlier answer arrived: nothing left to do.
    "SendTaskSuccess": PARENT_GONE_CODES,
    "SendTaskFailure": PARENT_GONE_CODES,
    "SendTaskHeartbeat": PARENT_GONE_CODES,
    # The lease's conditional writes: someone else holds it, which is what they ask.
    "UpdateItem": frozenset({"ConditionalCheckFailedException"}),
    "PutItem": frozenset({"ConditionalCheckFailedException"}),
}
"""Error answers the dispatcher asks for and acts on, per operation: counted as
``outcome="expected"`` so that error panels and alerts see only failures."""


def attempt_outcome(operation: str, status: int, code: str) -> str:
    """The ``dispatcher_aws_calls_total`` outcome of one answered attempt."""
    if code in THROTTLE_CODES or status == 429:
        return "throttled"
    if code in EXPECTED_CODES.get(operation, ()):
        return "expected"
    if status >= 400 or code:
        return "error"
    return "ok"


def _count_attempt(metrics: Metrics) -> Any:
    """A botocore ``needs-retry`` hook: one count per HTTP attempt, retries included."""

    def hook(
        response: Any = None,
        caught_exception: BaseException | None = None,
        operation: Any = None,
        **_: Any,
    ) -> None:
        name = getattr(operation, "name", "unknown")
        if isinstance(getattr(caught_exception, "kwargs", {}).get("error"), LeaseLapsedError):
            return  # stopped before it was sent: no attempt
        if caught_exception is not None:
            outcome = "error"
        else:
            http, parsed = response if response is not None else (None, {})
            status = int(getattr(http, "status_code", 200) or 200)
            code = str((parsed or {}).get("Error", {}).get("Code", ""))
            outcome = attempt_outcome(name, status, code)
        metrics.aws_calls.labels(operation=name, outcome=outcome).inc()

    return hook


USER_AGENT = (
    f"sfn-dispatcher/{__version__} aiobotocore/{aiobotocore.__version__} "
    f"Python/{platform.python_version()}"
)
"""Sent as is (the session adds ``botocore/<version>``): botocore otherwise rebuilds its
User-Agent twice per request (feature ids, read from a context variable)."""


def client_config(**options: Any) -> AioConfig:
    """A client configuration for the hot path: a fixed User-Agent and no client-side
    parameter validation (AWS validates every request anyway: a bad value comes back as a
    ``ValidationException``, which `classify` sorts as permanent, as it would the
    client's ``ParamValidationError``). A bare StartExecution costs the client about 0.1 ms
    less CPU with it (``raw_start_execution.tuned`` in bench/results/throughput.json)."""
    return AioConfig(user_agent=USER_AGENT, parameter_validation=False, **options)


def region_from_env(
    default: str | None = None, environ: Mapping[str, str] | None = None
) -> str | None:
    """``AWS_REGION``, else ``AWS_DEFAULT_REGION``, else ``default`` (None: botocore's own
    choice, the profile's region)."""
    env = os.environ if environ is None else environ
    return env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or default


def session(
    *,
    region: str | None = None,
    default_region: str | None = None,
    credentials: Mapping[str, str] | None = None,
) -> Any:
    """A new aioboto3 session: the only place one is made (the daemon, the operator CLI,
    preflight, the sandbox, the tests and the benchmarks all come here).

    Endpoint, region and credentials come from where botocore looks for them (``AWS_*``
    variables, ``AWS_ENDPOINT_URL`` included, the shared config and credentials files, the
    container or instance role). ``region`` is used as given (a sandbox's region);
    ``default_region`` only when no ``AWS_REGION``/``AWS_DEFAULT_REGION`` is set (the
    daemon passes its state machines' region). ``credentials`` (``aws_access_key_id``,
    ``aws_secret_access_key``) are for a local emulator's fixed test keys only.

    A session re-reads every service model for its first client of each (about 0.1 s):
    callers that open many clients keep one.
    """
    return aioboto3.Session(
        region_name=region or region_from_env(default_region), **(credentials or {})
    )


@asynccontextmanager
async def open_client(
    service: str,
    *,
    region: str | None = None,
    default_region: str | None = None,
    endpoint_url: str | None = None,
    config: AioConfig | None = None,
) -> AsyncIterator[Any]:
    """One client of a new `session` (a CLI command's single client)."""
    async with session(region=region, default_region=default_region).client(
        service, endpoint_url=endpoint_url, config=config
    ) as client:
        yield client


@asynccontextmanager
async def open_clients(
    metrics: Metrics,
    *,
    region: str,
    long_poll_seconds: int = 20,
    max_attempts: int = 3,
    endpoint_url: str | None = None,
    dynamodb: bool = False,
    ssm: bool = False,
    start_timeout: float = 5.0,
) -> AsyncIterator[Clients]:
    """Open the daemon's SQS and Step Functions clients (`session`: endpoint and credentials
    from ``AWS_*``).

    ``region`` is used only when no ``AWS_REGION``/``AWS_DEFAULT_REGION`` is set (the
    dispatcher passes the state machine's region). ``endpoint_url`` overrides
    ``AWS_ENDPOINT_URL`` (tests point one dispatcher at a fault proxy this way).
    StartExecution goes through a Step Functions client of its own: one attempt (no SDK
    retries, so every retry of the caller re-checks the lease), connect and read timeouts
    within the start deadline D (``start_timeout``; the caller also holds D as a hard
    deadline), and `Clients.start_gate` checked just before each request leaves.
    """
    aws = session(default_region=region)
    config = client_config(
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=5,
        # A long poll holds the connection for up to 20 s: the read timeout must outlast it.
        read_timeout=long_poll_seconds + 15,
        max_pool_connections=64,
    )
    hook = _count_attempt(metrics)
    gate = StartGate()
    async with AsyncExitStack() as stack:
        sqs = await stack.enter_async_context(
            aws.client("sqs", config=config, endpoint_url=endpoint_url)
        )
        sfn = await stack.enter_async_context(
            aws.client("stepfunctions", config=config, endpoint_url=endpoint_url)
        )
        starts = await stack.enter_async_context(
            aws.client(
                "stepfunctions",
                config=client_config(
                    retries={"mode": "standard", "total_max_attempts": 1},
                    connect_timeout=min(5.0, start_timeout),
                    read_timeout=start_timeout,
                    max_pool_connections=64,
                ),
                endpoint_url=endpoint_url,
            )
        )
        starts.meta.events.register("before-send.sfn.StartExecution", gate.before_send)
        starts.meta.events.register("after-call.sfn.StartExecution", _check_answer)
        ddb = None
        if dynamodb:
            ddb = await stack.enter_async_context(
                aws.client("dynamodb", config=config, endpoint_url=endpoint_url)
            )
        parameters = None
        if ssm:
            parameters = await stack.enter_async_context(
                aws.client("ssm", config=config, endpoint_url=endpoint_url)
            )
        for client in (sqs, sfn, starts, ddb, parameters):
            if client is not None:
                client.meta.events.register("needs-retry.*.*", hook)
        yield Clients(
            sqs=sqs, sfn=sfn, dynamodb=ddb, ssm=parameters, starts=starts, start_gate=gate
        )
