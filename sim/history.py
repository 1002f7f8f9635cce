"""What happened in a simulated world: an append-only, time-ordered list of records, plus
the typed views the checker reads (executions and their runs, request messages, deletes,
dead-letter copies, limits, lease moves, crashes, lost answers).

The simulated AWS records as it acts; a hand-built history (the checker's tests) uses the
same methods. A few records are written a moment after their time (an execution's end is
noticed lazily); ``records`` stays sorted by time all the same.
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sim.token_log import TokenLog

OUTSIDE = "outside"
"""The node of people and systems outside the dispatcher (console, redrive, operator)."""
AWS = "aws"
"""The node of what AWS does by itself (an execution ends, an event is delivered)."""

MAX_LIMIT = 100_000  # the highest limit the dispatcher accepts
REASON_ATTRIBUTE = "dispatcher-reason"
ORIGINAL_ID_ATTRIBUTE = "dispatcher-original-message-id"
_KEY_TAG_RE = re.compile(r"^k(?P<tag>[0-9a-f]{10})_")  # as dispatcher/core/requests.py


def key_tag_of(name: str) -> str | None:
    """The key tag an execution name carries (``k<10 hex>_`` prefix), or None."""
    match = _KEY_TAG_RE.match(name)
    return match["tag"] if match else None


def short(arn_or_url: str) -> str:
    """The last part of an ARN or queue URL, for trace lines."""
    return re.split(r"[:/]", arn_or_url)[-1]


@dataclass(frozen=True, slots=True)
class Record:
    """One thing that happened: when, on which node, what (``kind``), and its details."""

    seq: int
    time: float
    node: str
    kind: str
    text: str
    details: Mapping[str, Any]

    def line(self) -> str:
        """The record as one trace line."""
        return f"{self.time:9.3f} {self.node:<8} {self.text}"


@dataclass(slots=True)
class Run:
    """One run of an execution: the first start, or a redrive."""

    start: float
    started_by: str  # a dispatcher node, or OUTSIDE
    seq: int  # order among records at the same time
    redrive_count: int
    stop: float | None = None
    status: str | None = None
    output: str | None = None  # what it returned (SUCCEEDED)
    error: str | None = None  # its error and cause (FAILED, TIMED_OUT, a stop that gave one)
    cause: str | None = None

    def running_at(self, t: float) -> bool:
        """Whether this run is running at ``t`` (a run stopping at ``t`` is not)."""
        return self.start <= t and (self.stop is None or t < self.stop)


@dataclass(slots=True)
class Execution:
    """An execution, its input and its runs."""

    arn: str
    state_machine_arn: str
    name: str
    input: str
    started_by: str
    key_tag: str | None
    runs: list[Run] = field(default_factory=list)

    @property
    def first_start(self) -> float:
        """When the execution came to exist."""
        return self.runs[0].start


@dataclass(frozen=True, slots=True)
class RequestMessage:
    """A producer's request message (several may share one logical ``request_id``)."""

    request_id: str
    message_id: str
    queue_url: str
    body: str
    attributes: Mapping[str, str]
    sent_at: float
    node: str


@dataclass(frozen=True, slots=True)
class SentMessage:
    """A SendMessage that was applied (dead-letter copies are these)."""

    time: float
    node: str
    queue_url: str
    message_id: str
    body: str
    attributes: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Receive:
    """A receive that handed out messages: (message id, receive count) pairs, and the id
    of its call (None: not made through the transport)."""

    time: float
    node: str
    queue_url: str
    messages: tuple[tuple[str, int], ...]
    call_id: int | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    """A delete of a received message; ``deleted`` is False for a stale receipt handle."""

    time: float
    node: str
    queue_url: str
    message_id: str
    deleted: bool


@dataclass(frozen=True, slots=True)
class Move:
    """A message SQS moved to the dead-letter queue by the redrive policy."""

    time: float
    source_url: str
    target_url: str
    message_id: str
    body: str
    attributes: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class ParameterPut:
    """An SSM PutParameter (a live limit changed)."""

    time: float
    name: str
    value: str
    version: int


@dataclass(frozen=True, slots=True)
class LeaseWrite:
    """A successful conditional write of a lease item."""

    time: float
    node: str
    table: str
    pool: str
    owner: str
    epoch: int
    expires_at: float
    what: str  # taken | renewed | released


@dataclass(frozen=True, slots=True)
class Crash:
    """A node was killed."""

    time: float
    node: str


@dataclass(frozen=True, slots=True)
class LostAnswer:
    """A call AWS applied whose answer the caller never got (or got as a 5xx)."""

    time: float
    node: str
    call_id: int
    operation: str
    why: str


@dataclass(frozen=True, slots=True)
class EventFate:
    """What became of one status-change event: delivered at these times (none: lost)."""

    time: float
    execution_arn: str
    status: str
    redrive_count: int
    queue_url: str
    deliveries: tuple[float, ...]


class History:
    """The records of one simulation and the views built from them as they come."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.executions: dict[str, Execution] = {}
        self.requests: list[RequestMessage] = []
        self.sends: list[SentMessage] = []
        self.deletes: list[Delete] = []
        self.receives: list[Receive] = []
        self.moves: list[Move] = []
        self.parameter_puts: list[ParameterPut] = []
        self.lease_writes: list[LeaseWrite] = []
        self.crashes: list[Crash] = []
        self.lost_answers: list[LostAnswer] = []
        self.events: list[EventFate] = []
        self._seq = itertools.count()
        self.tokens = TokenLog(self.add)  # parent workflows and their task tokens

    def add(self, time: float, node: str, kind: str, text: str, **details: Any) -> Record:
        """Append a record (kept in time order)."""
        record = Record(next(self._seq), time, node, kind, text, details)
        if not self.records or self.records[-1].time <= time:
            self.records.append(record)
        else:
            bisect.insort(self.records, record, key=lambda r: (r.time, r.seq))
        return record

    # -- calls ---------------------------------------------------------------------------

    def call(self, time: float, node: str, call_id: int, label: str, outcome: str) -> None:
        """One attempt of an API call and its fate."""
        self.add(time, node, "call", f"{label} {outcome}", call_id=call_id, outcome=outcome)

    def answer_lost(
        self, time: float, node: str, call_id: int, operation: str, why: str
    ) -> LostAnswer:
        """An applied call whose answer the caller never got."""
        lost = LostAnswer(time, node, call_id, operation, why)
        self.lost_answers.append(lost)
        self.add(time, node, "answer_lost", f"{operation} #{call_id} answer lost: {why}")
        return lost

    def note(self, time: float, node: str, text: str) -> None:
        """Free text (the harness and nemesis say what they do)."""
        self.add(time, node, "note", text)

    def crash(self, time: float, node: str) -> Crash:
        """``node`` was killed."""
        crash = Crash(time, node)
        self.crashes.append(crash)
        self.add(time, node, "crash", "KILLED (requests on the wire may still arrive)")
        return crash

    # -- Step Functions ------------------------------------------------------------------

    def execution_started(
        self,
        time: float,
        node: str,
        *,
        arn: str,
        state_machine_arn: str,
        name: str,
        input: str,
        planned_stop: float | None = None,
    ) -> Execution:
        """A new execution's first run began (StartExecution applied, or an outside start)."""
        record = self.add(
            time,
            node,
            "execution_started",
            f"execution {name} STARTED"
            + (f" (runs until {planned_stop:.3f})" if planned_stop is not None else ""),
            arn=arn,
        )
        execution = Execution(arn, state_machine_arn, name, input, node, key_tag_of(name))
        execution.runs.append(Run(time, node, record.seq, 0))
        self.executions[arn] = execution
        return execution

    def execution_repeated(self, time: float, node: str, arn: str) -> None:
        """A StartExecution of a running execution with the same input: no new run."""
        self.add(time, node, "execution_repeated", f"execution {short(arn)} idempotent repeat")

    def execution_ended(
        self,
        time: float,
        arn: str,
        status: str,
        *,
        output: str | None = None,
        error: str | None = None,
        cause: str | None = None,
    ) -> None:
        """The current run of ``arn`` ended with ``status`` (and this result)."""
        run = self.executions[arn].runs[-1]
        run.stop, run.status = time, status
        run.output, run.error, run.cause = output, error, cause
        self.add(time, AWS, "execution_ended", f"execution {short(arn)} {status}", arn=arn)

    def execution_redriven(
        self, time: float, node: str, arn: str, planned_stop: float | None = None
    ) -> Run:
        """A closed execution runs again."""
        execution = self.executions[arn]
        count = len(execution.runs)
        record = self.add(
            time,
            node,
            "execution_redriven",
            f"execution {short(arn)} REDRIVEN (redriveCount {count})"
            + (f" (runs until {planned_stop:.3f})" if planned_stop is not None else ""),
            arn=arn,
        )
        run = Run(time, node, record.seq, count)
        execution.runs.append(run)
        return run

    def event(
        self,
        time: float,
        *,
        execution_arn: str,
        status: str,
        redrive_count: int,
        queue_url: str,
        deliveries: Iterable[float],
    ) -> EventFate:
        """A status-change event and when (if ever) it reaches the events queue."""
        fate = EventFate(
            time, execution_arn, status, redrive_count, queue_url, tuple(sorted(deliveries))
        )
        self.events.append(fate)
        if not fate.deliveries:
            how = "LOST"
        else:
            how = "delivered at " + ", ".join(f"{at:.3f}" for at in fate.deliveries)
            if len(fate.deliveries) > 1:
                how += " (DUPLICATED)"
        self.add(
            time,
            AWS,
            "event",
            f"event {status} of {short(execution_arn)} (redrive {redrive_count}): {how}",
        )
        return fate

    # -- SQS -----------------------------------------------------------------------------

    def request_sent(
        self,
        time: float,
        node: str,
        *,
        request_id: str,
        queue_url: str,
        message_id: str,
        body: str,
        attributes: Mapping[str, str],
    ) -> RequestMessage:
        """A producer sent a request message for logical request ``request_id``."""
        request = RequestMessage(
            request_id, message_id, queue_url, body, dict(attributes), time, node
        )
        self.requests.append(request)
        self.add(
            time,
            node,
            "request_sent",
            f"request {request_id} sent to {short(queue_url)} as {message_id}",
        )
        return request

    def message_sent(
        self,
        time: float,
        node: str,
        *,
        queue_url: str,
        message_id: str,
        body: str,
        attributes: Mapping[str, str],
        copies: int = 1,
    ) -> SentMessage:
        """A message was stored on a queue (``copies`` 2: SQS keeps it twice)."""
        sent = SentMessage(time, node, queue_url, message_id, body, dict(attributes))
        self.sends.append(sent)
        extra = " (stored TWICE)" if copies > 1 else ""
        reason = attributes.get(REASON_ATTRIBUTE)
        why = f" reason={reason}" if reason is not None else ""
        self.add(time, node, "message_sent", f"sent {message_id} to {short(queue_url)}{why}{extra}")
        return sent

    def messages_received(
        self,
        time: float,
        node: str,
        queue_url: str,
        received: Iterable[tuple[str, int]],
        *,
        call_id: int | None = None,
    ) -> None:
        """A receive handed out these (message id, receive count) pairs."""
        got = list(received)
        if got:
            self.receives.append(Receive(time, node, queue_url, tuple(got), call_id))
        listed = ", ".join(f"{mid}#{count}" for mid, count in got)
        self.add(
            time,
            node,
            "messages_received",
            f"received from {short(queue_url)}: {listed or 'nothing'}",
            messages=tuple(got),
        )

    def message_deleted(
        self, time: float, node: str, *, queue_url: str, message_id: str, deleted: bool
    ) -> Delete:
        """A delete with a receipt handle; ``deleted`` False: stale handle, nothing deleted."""
        delete = Delete(time, node, queue_url, message_id, deleted)
        self.deletes.append(delete)
        what = "deleted" if deleted else "delete with a stale handle: NOT deleted"
        self.add(time, node, "message_deleted", f"{message_id} on {short(queue_url)} {what}")
        return delete

    def visibility_changed(
        self, time: float, node: str, *, queue_url: str, message_id: str, timeout: int, result: str
    ) -> None:
        """A visibility change and its result ('ok' or the error code)."""
        self.add(
            time,
            node,
            "visibility_changed",
            f"{message_id} on {short(queue_url)} hidden for {timeout}s: {result}",
        )

    def message_moved(
        self,
        time: float,
        *,
        source_url: str,
        target_url: str,
        message_id: str,
        body: str,
        attributes: Mapping[str, str],
    ) -> Move:
        """SQS moved a message to its dead-letter queue (maxReceiveCount reached)."""
        move = Move(time, source_url, target_url, message_id, body, dict(attributes))
        self.moves.append(move)
        self.add(
            time,
            AWS,
            "message_moved",
            f"{message_id} moved from {short(source_url)} to {short(target_url)} "
            "by the redrive policy",
        )
        return move

    # -- SSM and DynamoDB ----------------------------------------------------------------

    def parameter_put(self, time: float, name: str, value: str, version: int) -> ParameterPut:
        """An SSM parameter got a new value."""
        put = ParameterPut(time, name, value, version)
        self.parameter_puts.append(put)
        self.add(time, OUTSIDE, "parameter_put", f"parameter {name} = {value!r} (v{version})")
        return put

    def lease_written(
        self,
        time: float,
        node: str,
        *,
        table: str,
        pool: str,
        owner: str,
        epoch: int,
        expires_at: float,
        what: str,
    ) -> LeaseWrite:
        """A lease item was written (taken, renewed or released)."""
        write = LeaseWrite(time, node, table, pool, owner, epoch, expires_at, what)
        self.lease_writes.append(write)
        self.add(
            time,
            node,
            "lease",
            f"lease {pool} epoch {epoch} {what} by {owner} (expires {expires_at:.3f})",
        )
        return write

    # -- views ---------------------------------------------------------------------------

    def runs_of(self, state_machine_arn: str) -> list[tuple[Execution, Run]]:
        """Every run of every execution of a state machine, in start order."""
        runs = [
            (execution, run)
            for execution in self.executions.values()
            if execution.state_machine_arn == state_machine_arn
            for run in execution.runs
        ]
        runs.sort(key=lambda pair: (pair[1].start, pair[1].seq))
        return runs

    def dead_letter_copies(self, queue_url: str | None = None) -> list[SentMessage]:
        """Messages a node sent with a ``dispatcher-reason`` (to ``queue_url`` if given)."""
        return [
            sent
            for sent in self.sends
            if REASON_ATTRIBUTE in sent.attributes
            and (queue_url is None or sent.queue_url == queue_url)
        ]

    def effective_deletes(self) -> list[Delete]:
        """Deletes that removed a message."""
        return [d for d in self.deletes if d.deleted]

    def limit_timeline(self, name: str, initial: int) -> list[tuple[float, int]]:
        """(time, limit) from a parameter's puts; a value that is not a limit is ignored
        (the dispatcher keeps the limit in force, as `dispatcher.daemon.limits.parse_limit`)."""
        timeline = [(float("-inf"), initial)]
        timeline += [
            (put.time, int(put.value))
            for put in self.parameter_puts
            if put.name == name
            and re.fullmatch(r"\s*\d{1,9}\s*", put.value)
            and int(put.value) <= MAX_LIMIT
        ]
        return timeline

    @property
    def end(self) -> float:
        """The time of the last record (0 when empty)."""
        return self.records[-1].time if self.records else 0.0

    def trace(self, around: float, window: float) -> str:
        """The records within ``window`` seconds of ``around``, one line each."""
        times = [r.time for r in self.records]
        lo = bisect.bisect_left(times, around - window)
        hi = bisect.bisect_right(times, around + window)
        return "\n".join(r.line() for r in self.records[lo:hi])
