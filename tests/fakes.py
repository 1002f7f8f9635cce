"""Hand-written in-memory fakes of the SQS and Step Functions clients, for unit tests.

They implement only the calls the dispatcher makes, with the keyword names botocore uses
(a misspelt argument is a ``TypeError``, as it would be against AWS). Every call is
recorded as ``(operation, kwargs)`` in a log both fakes can share, so tests can assert
the order of calls across services. Failures are scripted per operation as a list of
exceptions, raised one per call before the call takes effect.
"""

# ruff: noqa: N803 - the fakes take botocore's keyword names (QueueUrl, stateMachineArn)
from __future__ import annotations

import itertools
import json
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import anyio
from botocore.exceptions import ClientError, ReadTimeoutError
from prometheus_client import CollectorRegistry

from dispatcher.aws.api import Clients
from dispatcher.core.requests import execution_arn
from dispatcher.daemon.health import Health
from dispatcher.daemon.metrics import Metrics
from dispatcher.daemon.pool import Pool
from dispatcher.settings.config import Settings
from dispatcher.settings.layout import Layout, from_settings

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_stepfunctions import SFNClient

REGION = "eu-west-1"
ACCOUNT = "123456789012"
STATE_MACHINE_ARN = f"arn:aws:states:{REGION}:{ACCOUNT}:stateMachine:governed"
QUEUE_BASE = f"https://sqs.{REGION}.amazonaws.com/{ACCOUNT}"
REQUEST_QUEUE = f"{QUEUE_BASE}/requests"
EVENTS_QUEUE = f"{QUEUE_BASE}/events"
DEAD_LETTER_QUEUE = f"{QUEUE_BASE}/dead-letters"
REQUIRED_ENV = {
    "DISPATCHER_STATE_MACHINE_ARN": STATE_MACHINE_ARN,
    "DISPATCHER_REQUEST_QUEUE_URL": REQUEST_QUEUE,
    "DISPATCHER_EVENTS_QUEUE_URL": EVENTS_QUEUE,
}

Call = tuple[str, dict[str, Any]]

DEFAULT_MAX_MESSAGE_SIZE = 262_144  # a queue's MaximumMessageSize unless created with one


def client_error(code: str, status: int = 400, message: str = "", op: str = "Op") -> ClientError:
    """A botocore ``ClientError`` shaped like the one AWS answers with."""
    return ClientError(
        {
            "Error": {"Code": code, "Message": message or code},
            "ResponseMetadata": {
                "RequestId": "fake",
                "HostId": "fake",
                "HTTPStatusCode": status,
                "HTTPHeaders": {},
                "RetryAttempts": 0,
            },
        },
        op,
    )


def throttled() -> ClientError:
    """What Step Functions answers when its StartExecution token bucket is empty."""
    return client_error("ThrottlingException", 400, "Rate exceeded", "StartExecution")


class _Recorder:
    """Call log and scripted failures shared by both fakes."""

    def __init__(self, log: list[Call] | None) -> None:
        self.calls: list[Call] = log if log is not None else []
        self._failures: dict[str, deque[BaseException]] = {}
        self._always: dict[str, BaseException] = {}
        self._awaited: dict[str, anyio.Event] = {}  # operation -> set at its next call

    def fail(self, operation: str, *errors: BaseException) -> None:
        """Make the next calls of ``operation`` raise ``errors``, one per call, in order."""
        self._failures.setdefault(operation, deque()).extend(errors)

    def fail_always(self, operation: str, error: BaseException) -> None:
        """Make every later call of ``operation`` raise ``error``."""
        self._always[operation] = error

    def recover(self, operation: str) -> None:
        """Let the later calls of ``operation`` through again (after `fail_always`)."""
        self._always.pop(operation, None)

    def _record(self, operation: str, arguments: dict[str, Any]) -> None:
        """Log a call (its keyword arguments, ``None`` ones left out), then fail if scripted."""
        kwargs = {k: v for k, v in arguments.items() if k != "self" and v is not None}
        self.calls.append((operation, kwargs))
        awaited = self._awaited.pop(operation, None)
        if awaited is not None:
            awaited.set()
        scripted = self._failures.get(operation)
        if scripted:
            raise scripted.popleft()
        if operation in self._always:
            raise self._always[operation]

    async def called(self, operation: str) -> None:
        """Wait until ``operation`` has been called (at once if it has been)."""
        if operation not in self.names():
            await self._awaited.setdefault(operation, anyio.Event()).wait()

    def names(self) -> list[str]:
        """The operations called so far, in order (the shared log: both fakes)."""
        return [name for name, _ in self.calls]

    def calls_to(self, operation: str) -> list[dict[str, Any]]:
        """The kwargs of every call of ``operation``, in order."""
        return [kwargs for name, kwargs in self.calls if name == operation]


def sqs_message(
    body: str = "{}",
    *,
    message_id: str = "6f0c1f43-6d55-4f73-a3d8-8c2f5a1d9e01",
    receipt_handle: str | None = None,
    attributes: dict[str, str] | None = None,
    system: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A message as ``ReceiveMessage`` returns it (String message attributes)."""
    message: dict[str, Any] = {
        "MessageId": message_id,
        "ReceiptHandle": receipt_handle or f"rh-{message_id}",
        "Body": body,
        "Attributes": {"ApproximateReceiveCount": "1", **(system or {})},
    }
    if attributes:
        message["MessageAttributes"] = {
            name: {"DataType": "String", "StringValue": value} for name, value in attributes.items()
        }
    return message


class FakeSQS(_Recorder):
    """Queues by URL; a receive hands out visible messages, a delete removes them."""

    def __init__(self, log: list[Call] | None = None) -> None:
        super().__init__(log)
        self.visible: dict[str, deque[dict[str, Any]]] = {}
        self.in_flight: dict[str, dict[str, Any]] = {}  # receipt handle -> message
        self.refuse_sends_to: set[str] = set()  # queue URLs whose sends are refused
        self.attributes: dict[str, dict[str, str]] = {}
        self._ids = itertools.count(1)
        # Set: a receive takes its messages (they are in flight, hidden), then its answer
        # waits for the event - as a long poll's answer may arrive after its caller gave up.
        self.receive_gate: anyio.Event | None = None
        self._arrived: dict[str, anyio.Event] = {}  # url -> set when a message is put there

    def create_queue(self, url: str, **attributes: str) -> None:
        """Make ``url`` exist, with these queue attributes (``RedrivePolicy=...``)."""
        self.visible.setdefault(url, deque())
        self.attributes[url] = dict(attributes)

    def put(self, url: str, message: dict[str, Any]) -> None:
        """Make a ready-made message (see `sqs_message`) visible on ``url``."""
        self.visible[url].append(message)
        self._visible_now(url)

    def _visible_now(self, url: str) -> None:
        """A message became visible on ``url``: long polls waiting there answer."""
        arrived = self._arrived.pop(url, None)
        if arrived is not None:
            arrived.set()

    def _queue(self, url: str) -> deque[dict[str, Any]]:
        if url not in self.visible:
            raise client_error("AWS.SimpleQueueService.NonExistentQueue", 400, op="SQS")
        return self.visible[url]

    async def receive_message(
        self,
        *,
        QueueUrl: str,
        MaxNumberOfMessages: int = 1,
        WaitTimeSeconds: int | None = None,
        VisibilityTimeout: int | None = None,
        MessageAttributeNames: list[str] | None = None,
        MessageSystemAttributeNames: list[str] | None = None,
    ) -> dict[str, Any]:
        """Up to ``MaxNumberOfMessages`` visible messages. A long poll (``WaitTimeSeconds``
        > 0) on a queue with none waits, as SQS does, until one is put there or the wait is
        over (anyio's clock: run the test on virtual time, `tests.virtual_time`, where a
        whole wait passes at once when every task waits), then answers with what is there."""
        self._record("receive_message", locals())
        if not 1 <= MaxNumberOfMessages <= 10:
            raise client_error("InvalidParameterValue", 400, op="ReceiveMessage")
        if WaitTimeSeconds is not None and not 0 <= WaitTimeSeconds <= 20:
            raise client_error("InvalidParameterValue", 400, op="ReceiveMessage")
        queue = self._queue(QueueUrl)
        if WaitTimeSeconds:
            with anyio.move_on_after(WaitTimeSeconds):
                while not queue:
                    await self._arrived.setdefault(QueueUrl, anyio.Event()).wait()
        out: list[dict[str, Any]] = []
        while queue and len(out) < MaxNumberOfMessages:
            message = dict(queue.popleft())
            message["ReceiptHandle"] = f"{message['ReceiptHandle']}#{next(self._ids)}"
            self.in_flight[message["ReceiptHandle"]] = message
            out.append(message)
        if self.receive_gate is not None:
            await self.receive_gate.wait()
        return {"Messages": out} if out else {}

    async def delete_message(self, *, QueueUrl: str, ReceiptHandle: str) -> dict[str, Any]:
        """Forget the message (AWS also accepts handles it no longer knows)."""
        self._record("delete_message", locals())
        self.in_flight.pop(ReceiptHandle, None)
        return {}

    async def delete_message_batch(
        self, *, QueueUrl: str, Entries: list[dict[str, str]]
    ) -> dict[str, Any]:
        """Delete up to ten messages; every entry succeeds."""
        self._record("delete_message_batch", locals())
        if not 1 <= len(Entries) <= 10:
            raise client_error("AWS.SimpleQueueService.TooManyEntriesInBatchRequest", 400)
        for entry in Entries:
            self.in_flight.pop(entry["ReceiptHandle"], None)
        return {"Successful": [{"Id": e["Id"]} for e in Entries], "Failed": []}

    async def change_message_visibility(
        self, *, QueueUrl: str, ReceiptHandle: str, VisibilityTimeout: int
    ) -> dict[str, Any]:
        """Record the new timeout (the fake has no timers: nothing reappears by itself)."""
        self._record("change_message_visibility", locals())
        return {}

    async def change_message_visibility_batch(
        self, *, QueueUrl: str, Entries: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """Record the new timeouts; every entry succeeds unless failures were queued."""
        self._record("change_message_visibility_batch", locals())
        return {"Successful": [{"Id": e["Id"]} for e in Entries], "Failed": []}

    async def send_message(
        self,
        *,
        QueueUrl: str,
        MessageBody: str,
        MessageAttributes: dict[str, Any] | None = None,
        DelaySeconds: int = 0,
    ) -> dict[str, Any]:
        """Append a message to ``QueueUrl`` (visible at once, whatever ``DelaySeconds``);
        refused, as SQS does, over ten attributes or over the queue's
        ``MaximumMessageSize`` (body plus each attribute's name, data type and value), and
        when ``QueueUrl`` is in ``refuse_sends_to``."""
        self._record("send_message", locals())
        if QueueUrl in self.refuse_sends_to:
            raise client_error("AccessDenied", 403, op="SendMessage")
        queue = self._queue(QueueUrl)
        attributes = MessageAttributes or {}
        if len(attributes) > 10:
            raise client_error(
                "InvalidParameterValue",
                message=f"Number of message attributes [{len(attributes)}] exceeds the "
                "allowed maximum [10].",
                op="SendMessage",
            )
        limit = int(self.attributes[QueueUrl].get("MaximumMessageSize", DEFAULT_MAX_MESSAGE_SIZE))
        size = len(MessageBody.encode("utf-8"))
        for name, value in attributes.items():
            size += len(name.encode("utf-8")) + len(value["DataType"].encode("utf-8"))
            if "StringValue" in value:
                size += len(value["StringValue"].encode("utf-8"))
            if "BinaryValue" in value:
                size += len(value["BinaryValue"])
        if size > limit:
            raise client_error(
                "InvalidParameterValue",
                message="One or more parameters are invalid. Reason: Message must be shorter "
                f"than {limit} bytes.",
                op="SendMessage",
            )
        message_id = f"sent-{next(self._ids)}"
        queue.append(
            {
                "MessageId": message_id,
                "ReceiptHandle": f"rh-{message_id}",
                "Body": MessageBody,
                "MessageAttributes": MessageAttributes or {},
            }
        )
        self._visible_now(QueueUrl)
        return {"MessageId": message_id}

    async def get_queue_attributes(
        self, *, QueueUrl: str, AttributeNames: list[str]
    ) -> dict[str, Any]:
        """The queue's attributes; an unknown URL is ``NonExistentQueue``."""
        self._record("get_queue_attributes", locals())
        self._queue(QueueUrl)
        return {"Attributes": dict(self.attributes[QueueUrl])}


@dataclass
class FakeExecution:
    """One execution the fake Step Functions knows."""

    arn: str
    name: str
    state_machine_arn: str
    input: str
    status: str = "RUNNING"
    redrive_count: int = 0
    listed: bool = True  # False: ListExecutions lags behind and does not show it yet
    output: str | None = None
    error: str | None = None
    cause: str | None = None


class FakeSFN(_Recorder):
    """State machines and executions; StartExecution is idempotent the way AWS is.

    ``aws_exact=False`` behaves like MiniStack: same name and input while RUNNING is
    ``ExecutionAlreadyExists`` instead of a success with the same ARN.
    """

    def __init__(
        self, log: list[Call] | None = None, *, aws_exact: bool = True, page_size: int = 100
    ) -> None:
        super().__init__(log)
        self.state_machines: dict[str, str] = {STATE_MACHINE_ARN: "STANDARD"}
        self.executions: dict[str, FakeExecution] = {}
        self.aws_exact = aws_exact
        self.page_size = page_size
        self.start_gate: anyio.Event | None = None  # set: StartExecution waits for it
        self.answers_lost = 0  # the next starts take effect, then their answers are lost
        self.answers: dict[str, tuple[Any, ...]] = {}  # task token -> the answer it got
        self.gone_tokens: set[str] = set()  # parents that no longer wait

    def add_execution(
        self,
        name: str,
        input: str = "{}",
        status: str = "RUNNING",
        *,
        state_machine_arn: str = STATE_MACHINE_ARN,
        listed: bool = True,
    ) -> str:
        """An execution started by someone else (console, another tool); returns its ARN."""
        arn = execution_arn(state_machine_arn, name)
        self.executions[arn] = FakeExecution(arn, name, state_machine_arn, input, status)
        self.executions[arn].listed = listed
        return arn

    def finish(
        self,
        arn: str,
        status: str = "SUCCEEDED",
        *,
        output: str | None = None,
        error: str | None = None,
        cause: str | None = None,
    ) -> None:
        """End a running execution (with its output, or error and cause)."""
        execution = self.executions[arn]
        execution.status, execution.output = status, output
        execution.error, execution.cause = error, cause

    def redrive(self, arn: str) -> None:
        """Redrive a closed execution (RedriveExecution): it runs again, one redrive more."""
        execution = self.executions[arn]
        execution.status, execution.redrive_count = "RUNNING", execution.redrive_count + 1
        execution.output = execution.error = execution.cause = None

    async def start_execution(
        self, *, stateMachineArn: str, name: str, input: str = "{}", traceHeader: str | None = None
    ) -> dict[str, Any]:
        """Start (or, same name + input while RUNNING, return the existing) execution."""
        self._record("start_execution", locals())
        if self.start_gate is not None:
            await self.start_gate.wait()
        if stateMachineArn not in self.state_machines:
            raise client_error("StateMachineDoesNotExist", op="StartExecution")
        try:
            json.loads(input)
        except ValueError:
            raise client_error("InvalidExecutionInput", op="StartExecution") from None
        arn = execution_arn(stateMachineArn, name)
        existing = self.executions.get(arn)
        if existing is not None:
            same = existing.status == "RUNNING" and existing.input == input
            if not (same and self.aws_exact):
                raise client_error("ExecutionAlreadyExists", op="StartExecution")
        else:
            self.executions[arn] = FakeExecution(arn, name, stateMachineArn, input)
        if self.answers_lost > 0:
            self.answers_lost -= 1
            raise ReadTimeoutError(endpoint_url="https://states.fake")
        return {"executionArn": arn, "startDate": 0}

    async def describe_execution(self, *, executionArn: str) -> dict[str, Any]:
        """The execution, or ``ExecutionDoesNotExist``."""
        self._record("describe_execution", locals())
        execution = self.executions.get(executionArn)
        if execution is None:
            raise client_error("ExecutionDoesNotExist", op="DescribeExecution")
        return {
            "executionArn": execution.arn,
            "stateMachineArn": execution.state_machine_arn,
            "name": execution.name,
            "status": execution.status,
            "input": execution.input,
            "redriveCount": execution.redrive_count,
            **{
                k: v
                for k, v in (
                    ("output", execution.output),
                    ("error", execution.error),
                    ("cause", execution.cause),
                )
                if v is not None
            },
        }

    async def send_task_success(self, *, taskToken: str, output: str) -> dict[str, Any]:
        """Answer a parent's task (``TaskDoesNotExist`` once answered or gone)."""
        self._record("send_task_success", locals())
        self._answer(taskToken, ("success", output))
        return {}

    async def send_task_failure(
        self, *, taskToken: str, error: str | None = None, cause: str | None = None
    ) -> dict[str, Any]:
        """Fail a parent's task (``TaskDoesNotExist`` once answered or gone)."""
        self._record("send_task_failure", locals())
        self._answer(taskToken, ("failure", error, cause))
        return {}

    async def send_task_heartbeat(self, *, taskToken: str) -> dict[str, Any]:
        """A heartbeat (``TaskTimedOut`` for a token marked gone)."""
        self._record("send_task_heartbeat", locals())
        if taskToken in self.gone_tokens or taskToken in self.answers:
            raise client_error("TaskTimedOut", op="SendTaskHeartbeat")
        return {}

    async def stop_execution(
        self, *, executionArn: str, error: str | None = None, cause: str | None = None
    ) -> dict[str, Any]:
        """Stop a running execution (ABORTED)."""
        self._record("stop_execution", locals())
        self.finish(executionArn, "ABORTED", error=error, cause=cause)
        return {"stopDate": 0}

    def _answer(self, token: str, answer: tuple[Any, ...]) -> None:
        if token in self.gone_tokens or token in self.answers:
            raise client_error("TaskDoesNotExist", op="SendTask")
        self.answers[token] = answer

    async def describe_state_machine(self, *, stateMachineArn: str) -> dict[str, Any]:
        """The state machine's type, or ``StateMachineDoesNotExist``."""
        self._record("describe_state_machine", locals())
        if stateMachineArn not in self.state_machines:
            raise client_error("StateMachineDoesNotExist", op="DescribeStateMachine")
        return {"stateMachineArn": stateMachineArn, "type": self.state_machines[stateMachineArn]}

    async def list_executions(
        self,
        *,
        stateMachineArn: str,
        statusFilter: str | None = None,
        maxResults: int | None = None,
        nextToken: str | None = None,
    ) -> dict[str, Any]:
        """One page; the fake's ``page_size`` caps it (the server decides page size too)."""
        self._record("list_executions", locals())
        matching = [
            e
            for e in self.executions.values()
            if e.state_machine_arn == stateMachineArn
            and e.listed
            and (statusFilter is None or e.status == statusFilter)
        ]
        start = int(nextToken or 0)
        size = min(self.page_size, maxResults or 100)
        page = matching[start : start + size]
        out: dict[str, Any] = {
            "executions": [
                {"executionArn": e.arn, "name": e.name, "status": e.status, "redriveCount": 0}
                for e in page
            ]
        }
        if start + size < len(matching):
            out["nextToken"] = str(start + size)
        return out

    def get_paginator(self, operation: str) -> ListExecutionsPaginator:
        """Only ``list_executions`` is paginated by the dispatcher."""
        if operation != "list_executions":
            raise NotImplementedError(operation)
        return ListExecutionsPaginator(self)


@dataclass
class ListExecutionsPaginator:
    """``paginate(...)`` is an async iterator of pages, one ListExecutions call per page."""

    sfn: FakeSFN

    async def paginate(
        self,
        *,
        stateMachineArn: str,
        statusFilter: str | None = None,
        PaginationConfig: dict[str, int] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Follow ``nextToken`` until the last page."""
        token: str | None = None
        page_size = (PaginationConfig or {}).get("PageSize")
        while True:
            page = await self.sfn.list_executions(
                stateMachineArn=stateMachineArn,
                statusFilter=statusFilter,
                maxResults=page_size,
                nextToken=token,
            )
            yield page
            token = page.get("nextToken")
            if token is None:
                return


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        self.now += seconds


def make_settings(env: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings for unit tests: the fake ARNs and URLs, every default given explicitly.

    Defaults are passed as overrides so a stray ``DISPATCHER_*`` variable in the process
    environment cannot change a unit test.
    """
    defaults = {
        name: field.default
        for name, field in Settings.model_fields.items()
        if not field.is_required() and field.default is not None
    }
    return Settings.load({**defaults, **overrides}, env={**REQUIRED_ENV, **(env or {})})


def make_clients(sqs: FakeSQS, sfn: FakeSFN) -> Clients:
    """The dispatcher's client pair, made of fakes (typed as the real clients)."""
    return Clients(sqs=cast("SQSClient", sqs), sfn=cast("SFNClient", sfn))


@dataclass
class World:
    """Everything one unit test of intake, events or reconcile needs, wired together."""

    settings: Settings
    sqs: FakeSQS
    sfn: FakeSFN
    clients: Clients
    clock: FakeClock
    metrics: Metrics
    health: Health
    pool: Pool
    log: list[Call] = field(default_factory=list)
    layout: Layout | None = None

    def sample(self, name: str, **labels: str) -> float:
        """A metric sample's value (0 when it has not been recorded); labels left out are
        summed over."""
        value = self.metrics.registry.get_sample_value(name, labels)
        if value is not None:
            return float(value)
        return sum(
            sample.value
            for family in self.metrics.registry.collect()
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )


def build_world(
    *,
    limit: int = 3,
    dead_letter: bool = True,
    aws_exact: bool = True,
    page_size: int = 100,
    queues: Iterable[str] = (REQUEST_QUEUE, EVENTS_QUEUE, DEAD_LETTER_QUEUE),
    **overrides: Any,
) -> World:
    """A pool of ``limit`` slots over fresh fakes, metrics on a fresh registry."""
    log: list[Call] = []
    sqs = FakeSQS(log)
    sfn = FakeSFN(log, aws_exact=aws_exact, page_size=page_size)
    for url in queues:
        sqs.create_queue(url)
    settings = make_settings(
        limit=limit, dead_letter_queue_url=DEAD_LETTER_QUEUE if dead_letter else None, **overrides
    )
    clock = FakeClock()
    metrics = Metrics(CollectorRegistry())
    health = Health(metrics)
    layout = from_settings(settings)
    pool = Pool(layout.pools[0], metrics, clock)
    clients = make_clients(sqs, sfn)
    return World(settings, sqs, sfn, clients, clock, metrics, health, pool, log, layout)
