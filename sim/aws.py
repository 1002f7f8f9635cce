"""The simulated AWS world: Step Functions, SQS, EventBridge, SSM and DynamoDB in one
process, on one event loop, in virtual time, deterministic given its ``random.Random``.

The dispatcher talks to it through `World.client` objects (botocore's method and keyword
names). Every call passes through `sim.calls.Transport`, where a `CallFaults` callable
decides its fate. The harness sets the world up with the synchronous set-up methods,
runs `World.run` in its task group, and acts as the outside world (producers, console
starts, redrives, limit changes, kills) with the methods below; everything is recorded
in `World.history` for the checker.
"""

from __future__ import annotations

import json
import math
import random
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio

from sim.calls import CallFaults, Signal, Transport, no_faults
from sim.clients import Client, DynamoDBClient, SFNClient, SSMClient
from sim.history import OUTSIDE, History
from sim.sfn import REDRIVABLE, Change, StepFunctions
from sim.sfn_model import MAX_EVENT_PAYLOAD
from sim.sqs import SQS
from sim.sqs_client import SQSClient
from sim.sqs_model import check_message, flat
from sim.store import SSM, DynamoDB
from sim.tokens import Tokens

DETAIL_TYPE = "Step Functions Execution Status Change"
CLIENTS: dict[str, type[Client]] = {
    "stepfunctions": SFNClient,
    "sqs": SQSClient,
    "ssm": SSMClient,
    "dynamodb": DynamoDBClient,
}


def _default_duration(rng: random.Random) -> float:
    return rng.uniform(1.0, 10.0)


def _default_buckets() -> dict[str, tuple[float, float]]:
    # AWS's quotas in the largest regions: (bucket size, refill per second).
    return {
        "StartExecution": (1300.0, 300.0),
        "ListExecutions": (200.0, 5.0),
        "DescribeExecution": (300.0, 15.0),
    }


@dataclass(frozen=True)
class WorldConfig:
    """How the simulated AWS behaves when nothing is wrong."""

    region: str = "eu-west-1"
    account: str = "123456789012"
    epoch: float = 1_767_225_600.0  # wall-clock seconds at virtual time 0 (2026-01-01)
    latency: tuple[float, float] = (0.002, 0.020)  # each leg of each call, uniform
    listing_lag: float = 2.0  # a start (and an end) shows in listings within this
    listing_lag_at_max: float = 0.0  # share of changes that take the whole listing lag
    describe_lag: float = 1.0  # DescribeExecution may not know a new execution this long
    describe_lag_rate: float = 0.3  # ...for this share of executions
    default_duration: Callable[[random.Random], float] = _default_duration
    buckets: Mapping[str, tuple[float, float]] = field(default_factory=_default_buckets)
    sqs_duplicate_rate: float = 0.0  # share of messages SQS stores twice
    event_latency: tuple[float, float] = (0.05, 0.5)  # status change -> on the events queue
    # What a token whose task was closed (answered, parent ended) answers: TaskTimedOut as
    # the API reference says; TaskDoesNotExist to try a caller's handling of both.
    closed_task_error: str = "TaskTimedOut"


@dataclass(frozen=True, slots=True)
class EventInfo:
    """A status change about to be sent as an event (what `EventFaults` decides on)."""

    execution_arn: str
    state_machine_arn: str
    status: str
    redrive_count: int
    time: float


@dataclass(frozen=True, slots=True)
class EventFault:
    """What EventBridge does to one event (default: delivered once, on time)."""

    lost: bool = False
    duplicate: bool = False
    delay: float = 0.0  # extra seconds before it shows on the queue
    duplicate_delay: float = 0.0  # extra seconds for the second copy


EventFaults = Callable[[EventInfo], EventFault]


def no_event_faults(info: EventInfo) -> EventFault:
    """The default: every event delivered once."""
    del info
    return EventFault()


class World:
    """Simulated AWS for one simulation run."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        rng: random.Random,
        config: WorldConfig = WorldConfig(),  # frozen: sharing the default is safe
        faults: CallFaults | None = None,
        event_faults: EventFaults | None = None,
    ) -> None:
        self.clock = clock
        self.rng = rng
        self.config = config
        self.faults: CallFaults = faults or no_faults
        self.event_faults: EventFaults = event_faults or no_event_faults
        self.history = History()
        self._signal = Signal()
        self._routes: list[tuple[frozenset[str], str]] = []
        region, account = config.region, config.account
        self.sfn = StepFunctions(
            clock=clock,
            rng=rng,
            history=self.history,
            wall=self.wall,
            listing_lag=config.listing_lag,
            describe_lag=config.describe_lag,
            describe_lag_rate=config.describe_lag_rate,
            listing_lag_at_max=config.listing_lag_at_max,
            default_duration=config.default_duration,
            emit=self._emit,
            region=region,
            account=account,
        )
        self.sqs = SQS(
            clock=clock,
            rng=rng,
            history=self.history,
            wall=self.wall,
            duplicate_rate=config.sqs_duplicate_rate,
            advance=self.sfn.advance,
            next_change=self.sfn.next_change,
            region=region,
            account=account,
        )
        self.tokens = Tokens(
            sfn=self.sfn,
            history=self.history,
            clock=clock,
            rng=rng,
            send=lambda url, body, attributes, request_id: self.send_request(
                url, body, attributes, request_id=request_id, sender="aws"
            ),
            wake=self._signal.notify,
            closed_error=config.closed_task_error,
        )
        self.ssm = SSM(
            clock=clock, history=self.history, wall=self.wall, region=region, account=account
        )
        self.dynamodb = DynamoDB(
            clock=clock, history=self.history, wall=self.wall, region=region, account=account
        )
        self.transport = Transport(
            clock=clock,
            rng=rng,
            history=self.history,
            faults=lambda: self.faults,
            latency=config.latency,
            buckets=config.buckets,
            advance=self.sfn.advance,
            wake=self._signal.notify,
        )

    def wall(self, t: float) -> float:
        """Wall-clock (Unix) seconds at virtual time ``t``."""
        return self.config.epoch + t

    # -- set-up (no faults, no latency) --------------------------------------------------

    def create_state_machine(self, name: str, *, type: str = "STANDARD") -> str:
        """Create a state machine; returns its ARN."""
        return self.sfn.create_state_machine(name, type)

    def create_queue(
        self,
        name: str,
        *,
        visibility_timeout: int = 30,
        maximum_message_size: int = 262_144,
        dead_letter: str | None = None,
        max_receive_count: int = 10,
    ) -> str:
        """Create a standard queue (``dead_letter``: the URL of its dead-letter queue)."""
        return self.sqs.create_queue(
            name,
            visibility_timeout=visibility_timeout,
            maximum_message_size=maximum_message_size,
            dead_letter=dead_letter,
            max_receive_count=max_receive_count,
        )

    def route_events(self, state_machine_arns: Iterable[str], queue_url: str) -> None:
        """An EventBridge rule: status changes of these machines go to ``queue_url``."""
        if queue_url not in self.sqs.queues:
            raise ValueError(f"queue {queue_url} does not exist")
        self._routes.append((frozenset(state_machine_arns), queue_url))

    def put_parameter(self, name: str, value: str) -> None:
        """SSM PutParameter with overwrite (recorded: the limit timeline)."""
        self.ssm.put(name, value)

    def create_table(self, name: str) -> None:
        """A DynamoDB table keyed by ``pool`` (string), for the lease."""
        self.dynamodb.create_table(name, "pool")

    def client(
        self, service: str, node: str, *, read_timeout: float = 35.0, max_attempts: int = 1
    ) -> Any:
        """A client of ``service`` for process ``node`` (``max_attempts`` > 1: botocore's
        standard retries, each attempt a call of its own)."""
        try:
            kind = CLIENTS[service]
        except KeyError:
            raise ValueError(f"no simulated service {service!r}: {sorted(CLIENTS)}") from None
        return kind(self, node, read_timeout=read_timeout, max_attempts=max_attempts)

    # -- background ----------------------------------------------------------------------

    async def run(self) -> None:
        """Deliver requests that dead nodes left on the wire, and notice ended executions
        as they end (so events show up in time even when nobody calls). Runs until
        cancelled."""
        async with anyio.create_task_group() as tg:
            while True:
                self.sfn.advance()
                now = self.clock()
                for call in self.transport.due_orphans(now):
                    tg.start_soon(self.transport.deliver, call)
                wake = min(self.transport.next_orphan(), self.sfn.next_change())
                await self._signal.wait(wake - now if wake < math.inf else math.inf)

    # -- the outside world ---------------------------------------------------------------

    def start_outside(self, state_machine_arn: str, name: str, input: str, duration: float) -> str:
        """Someone else starts an execution (console, another tool); returns its ARN.
        Raises the ClientError StartExecution would answer (name taken, bad name...)."""
        self.sfn.advance()
        refused = self.sfn.check_start(state_machine_arn, name)
        if refused is not None:
            raise refused
        return self.sfn.start(OUTSIDE, state_machine_arn, name, input, duration).arn

    def redrive(self, execution_arn: str, duration: float, *, status: str = "SUCCEEDED") -> bool:
        """A closed FAILED/TIMED_OUT/ABORTED execution runs again (redriveCount + 1) for
        ``duration`` seconds and ends with ``status``; False if it cannot be redriven."""
        return self.sfn.redrive(execution_arn, duration, status)

    def stop_outside(self, execution_arn: str, *, status: str = "ABORTED") -> bool:
        """Someone stops a running execution now (StopExecution: ABORTED); False if it
        is not running."""
        if status not in REDRIVABLE:
            raise ValueError(f"an outside stop ends an execution {sorted(REDRIVABLE)}")
        return self.sfn.stop(execution_arn, status)

    def send_request(
        self,
        queue_url: str,
        body: str,
        attributes: Mapping[str, str],
        *,
        request_id: str,
        sender: str = "producer",
        twice: bool = False,
    ) -> str:
        """A producer's SendMessage (no faults) for logical request ``request_id``; returns
        the MessageId. Raises the ClientError SQS would answer (too large...)."""
        self.sfn.advance()
        queue = self.sqs.queue(queue_url, "SendMessage")
        typed = {k: {"DataType": "String", "StringValue": v} for k, v in attributes.items()}
        check_message(queue, body, typed, 0, "SendMessage")
        message_id, copies = self.sqs.store(queue, body, typed, sender=sender, twice=twice)
        self.history.request_sent(
            self.clock(),
            sender,
            request_id=request_id,
            queue_url=queue_url,
            message_id=message_id,
            body=body,
            attributes=flat(typed),
        )
        if copies > 1:
            self.history.note(self.clock(), "aws", f"{message_id} stored TWICE")
        return message_id

    def start_parent(
        self,
        state_machine_arn: str,
        name: str,
        request_queue_url: str,
        items: Sequence[Mapping[str, Any]],
        *,
        heartbeat_seconds: float | None = None,
        timeout_seconds: float | None = None,
        attributes: Mapping[str, str] | None = None,
        bad_items: Collection[int] = (),
        key_prefix: str | None = None,
    ) -> str:
        """Start parent workflow ``name`` (a Map of ``sqs:sendMessage.waitForTaskToken``
        tasks, see `sim.tokens`); returns its ARN. It sends one request per item to
        ``request_queue_url`` now: body ``{"req": "<name>-<i>", **item}`` (a child input:
        ``seconds``, ``fail``, ``output_bytes``...), attributes ``task-token`` (a fresh token),
        ``idempotency-key`` ``<name>-<i>`` (invalid for ``bad_items``) and ``attributes``;
        request id ``<name>-<i>``. ``heartbeat_seconds``: the task's HeartbeatSeconds;
        ``timeout_seconds``: the state machine's TimeoutSeconds. Abort it with
        `stop_outside`."""
        return self.tokens.start_parent(
            state_machine_arn,
            name,
            request_queue_url,
            items,
            heartbeat_seconds=heartbeat_seconds,
            timeout_seconds=timeout_seconds,
            attributes=attributes,
            bad_items=bad_items,
            key_prefix=key_prefix,
        )

    def crash(self, node: str) -> None:
        """``node`` was killed (kill -9). Call this *before* cancelling its tasks: its
        requests still on the wire arrive all the same (applied by `run`)."""
        self.history.crash(self.clock(), node)
        self.transport.crash(node)

    # -- EventBridge ---------------------------------------------------------------------

    def _emit(self, change: Change) -> None:
        """Send a status change to every queue routed for its machine, faults applied."""
        execution = change.execution
        for machines, url in self._routes:
            if execution.state_machine_arn not in machines:
                continue
            info = EventInfo(
                execution.arn,
                execution.state_machine_arn,
                change.status,
                change.run_index,
                change.time,
            )
            fault = self.event_faults(info)
            deliveries: list[float] = []
            if not fault.lost:
                deliveries.append(change.time + self._event_latency() + fault.delay)
                if fault.duplicate:
                    deliveries.append(change.time + self._event_latency() + fault.duplicate_delay)
            body = json.dumps(self._envelope(change))
            for at in deliveries:
                self.sqs.store(self.sqs.queues[url], body, {}, sender="events", at=at)
            self.history.event(
                change.time,
                execution_arn=execution.arn,
                status=change.status,
                redrive_count=change.run_index,
                queue_url=url,
                deliveries=deliveries,
            )
        self._signal.notify()

    def _event_latency(self) -> float:
        low, high = self.config.event_latency
        return self.rng.uniform(low, high) if high > 0 else 0.0

    def _ms(self, t: float) -> int:
        return round(self.wall(t) * 1000)

    def _envelope(self, change: Change) -> dict[str, Any]:
        """The event exactly as EventBridge puts it on a queue."""
        execution, status = change.execution, change.status
        run = execution.runs[change.run_index]
        closed = status != "RUNNING"
        succeeded = status == "SUCCEEDED"
        # EventBridge leaves out an input or output over its payload limit ("included": false).
        shows_input = len(execution.input.encode()) <= MAX_EVENT_PAYLOAD
        output = run.output if succeeded else None
        shows_output = output is not None and len(output.encode()) <= MAX_EVENT_PAYLOAD
        detail: dict[str, Any] = {
            "executionArn": execution.arn,
            "stateMachineArn": execution.state_machine_arn,
            "name": execution.name,
            "status": status,
            "startDate": self._ms(execution.key[0]),
            "stopDate": self._ms(change.time) if closed else None,
            "input": execution.input if shows_input else None,
            "output": output if shows_output else None,
            "inputDetails": {"included": shows_input},
            "outputDetails": {"included": shows_output} if succeeded else None,
            "error": run.error if closed else None,
            "cause": run.cause if closed else None,
            "redriveCount": change.run_index,
            "redriveDate": self._ms(run.start) if change.run_index else None,
            "redriveStatus": "REDRIVABLE" if status in REDRIVABLE else "NOT_REDRIVABLE",
            "redriveStatusReason": None
            if status in REDRIVABLE
            else f"Execution is {status} and cannot be redriven",
        }
        moment = datetime.fromtimestamp(self.wall(change.time), tz=UTC)
        return {
            "version": "0",
            "id": str(uuid.UUID(int=self.rng.getrandbits(128), version=4)),
            "detail-type": DETAIL_TYPE,
            "source": "aws.states",
            "account": self.config.account,
            "time": moment.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "region": self.config.region,
            "resources": [execution.arn],
            "detail": detail,
        }
