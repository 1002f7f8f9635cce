"""Parent workflows and task tokens in the simulated Step Functions.

A parent is a Map state over items whose iterations each run a
``arn:aws:states:::sqs:sendMessage.waitForTaskToken`` task: when it starts it sends one
request message per item (message attribute ``task-token`` = ``$$.Task.Token``,
``idempotency-key`` = ``<parent>-<index>``, body = the item's child input) and waits.

As on AWS: the parent SUCCEEDS once every token got ``SendTaskSuccess`` (its output: the
outputs in item order), FAILS at the first ``SendTaskFailure`` (with that error and cause;
the other iterations stop), FAILS with ``States.HeartbeatTimeout`` when a waiting task
goes ``HeartbeatSeconds`` without a heartbeat, TIMES OUT at the state machine's
``TimeoutSeconds``, and may be aborted (StopExecution). A token whose task is no longer
waiting answers ``TaskTimedOut`` ("the task token has either expired or the task associated
with the token has already been closed", the API reference; `WorldConfig` can make a
closed task answer ``TaskDoesNotExist`` instead); a token AWS never issued,
``InvalidToken``. A parent is an open-ended run of `sim.sfn`: its end is planned at its
earliest deadline and moved by every heartbeat and answer.
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError

from sim.calls import Answer, aws_error, error_code
from sim.history import OUTSIDE, History
from sim.sfn import StepFunctions
from sim.sfn_model import (
    MAX_CAUSE_CHARS,
    MAX_ERROR_CHARS,
    MAX_INPUT_BYTES,
    SimExecution,
    check_length,
    too_long,
)
from sim.token_log import FAILURE, HEARTBEAT, SUCCESS

TOKEN_ATTRIBUTE = "task-token"  # noqa: S105 - a message attribute name, not a secret
KEY_ATTRIBUTE = "idempotency-key"
TOKEN_BYTES = 480  # 640 base64 characters: opaque, long, within the 2,048 AWS allows
MAX_TOKEN_CHARS = 2048
MAX_OUTPUT_BYTES = 262_144
HEARTBEAT_TIMEOUT = "States.HeartbeatTimeout"
GONE_MESSAGE = "Provided task does not exist anymore"

Send = Callable[[str, str, Mapping[str, str], str], str]
"""``send(queue_url, body, attributes, request_id)`` -> message id (no faults)."""


@dataclass(slots=True, eq=False)
class _Task:
    token: str
    parent: _Parent
    index: int
    beat: float  # when its heartbeat clock last started (issued, or a heartbeat)
    state: str = "waiting"  # waiting | answered | timed_out | closed
    output: str | None = None


@dataclass(slots=True, eq=False)
class _Parent:
    execution: SimExecution
    heartbeat_seconds: float | None
    timeout_at: float | None
    tasks: list[_Task] = field(default_factory=list)
    expiring: _Task | None = None  # the task whose heartbeat deadline is planned


class Tokens:
    """The parents of one world and the SendTask* operations (one atomic step each)."""

    def __init__(
        self,
        *,
        sfn: StepFunctions,
        history: History,
        clock: Callable[[], float],
        rng: random.Random,
        send: Send,
        wake: Callable[[], None],
        closed_error: str = "TaskTimedOut",
    ) -> None:
        if closed_error not in ("TaskTimedOut", "TaskDoesNotExist"):
            raise ValueError(f"closed_error {closed_error!r}: TaskTimedOut or TaskDoesNotExist")
        self._sfn = sfn
        self._log = history.tokens
        self._clock = clock
        self._rng = rng
        self._send = send
        self._wake = wake
        self._closed_error = closed_error
        self._tasks: dict[str, _Task] = {}
        self._parents: dict[str, _Parent] = {}
        sfn.on_end = self._ended

    # -- parents ---------------------------------------------------------------------------

    def start_parent(
        self,
        machine_arn: str,
        name: str,
        queue_url: str,
        items: Sequence[Mapping[str, Any]],
        *,
        heartbeat_seconds: float | None = None,
        timeout_seconds: float | None = None,
        attributes: Mapping[str, str] | None = None,
        bad_items: Collection[int] = (),
        key_prefix: str | None = None,
    ) -> str:
        """Start a parent and send its requests (see `sim.aws.World.start_parent`);
        ``key_prefix``: its items' request ids, keys and ``req`` (default: its name)."""
        self._sfn.advance()
        refused = self._sfn.check_start(machine_arn, name)
        if refused is not None:
            raise refused
        prefix = key_prefix or name
        bodies = [json.dumps({"req": f"{prefix}-{i}", **item}) for i, item in enumerate(items)]
        document = json.dumps({"items": [json.loads(body) for body in bodies]})
        execution = self._sfn.start(OUTSIDE, machine_arn, name, document, open_ended=True)
        now = self._clock()
        self._log.parent_started(
            now,
            arn=execution.arn,
            items=len(bodies),
            heartbeat_seconds=heartbeat_seconds,
            timeout_seconds=timeout_seconds,
        )
        timeout_at = now + timeout_seconds if timeout_seconds is not None else None
        parent = _Parent(execution, heartbeat_seconds, timeout_at)
        self._parents[execution.arn] = parent
        for index, body in enumerate(bodies):
            token = self._new_token()
            request_id = f"{prefix}-{index}"
            key = f"{request_id} bad!" if index in bad_items else request_id
            sent = {**(attributes or {}), TOKEN_ATTRIBUTE: token, KEY_ATTRIBUTE: key}
            message_id = self._send(queue_url, body, sent, request_id)
            task = _Task(token, parent, index, now)
            parent.tasks.append(task)
            self._tasks[token] = task
            self._log.token_issued(
                now,
                token=token,
                parent_arn=execution.arn,
                index=index,
                request_id=request_id,
                message_id=message_id,
            )
        self._settle(parent)
        return execution.arn

    def _new_token(self) -> str:
        raw = self._rng.getrandbits(8 * TOKEN_BYTES).to_bytes(TOKEN_BYTES, "big")
        return base64.b64encode(raw).decode()

    def _settle(self, parent: _Parent) -> None:
        """End the parent if its tasks say so, else plan its earliest deadline."""
        if parent.execution.status(self._clock()) != "RUNNING":
            return
        tasks = parent.tasks
        if all(t.state == "answered" for t in tasks):
            output = "[" + ",".join(t.output or "null" for t in tasks) + "]"
            if len(output.encode()) > MAX_INPUT_BYTES:
                self._end_now(
                    parent,
                    "FAILED",
                    error="States.DataLimitExceeded",
                    cause=f"The Map state returned a result exceeding {MAX_INPUT_BYTES} bytes.",
                )
            else:
                self._end_now(parent, "SUCCEEDED", output=output)
            return
        deadlines: list[tuple[float, int, _Task | None]] = []
        if parent.heartbeat_seconds is not None:
            deadlines += [
                (t.beat + parent.heartbeat_seconds, t.index, t)
                for t in tasks
                if t.state == "waiting"
            ]
        if parent.timeout_at is not None:
            deadlines.append((parent.timeout_at, -1, None))
        execution = parent.execution
        parent.expiring = None
        if not deadlines:
            self._sfn.plan_stop(execution, None, "SUCCEEDED")
        else:
            at, _, task = min(deadlines, key=lambda d: (d[0], d[1]))
            if task is None:
                cause = "The execution ran longer than its TimeoutSeconds."
                self._sfn.plan_stop(execution, at, "TIMED_OUT", "States.Timeout", cause)
            else:
                parent.expiring = task
                cause = f"Item {task.index} got no heartbeat for {parent.heartbeat_seconds:g} s."
                self._sfn.plan_stop(execution, at, "FAILED", HEARTBEAT_TIMEOUT, cause)
        self._wake()

    def _end_now(
        self,
        parent: _Parent,
        status: str,
        *,
        output: str | None = None,
        error: str | None = None,
        cause: str | None = None,
    ) -> None:
        self._sfn.plan_stop(parent.execution, self._clock(), status, error, cause, output=output)
        self._sfn.advance()  # ends it now; `_ended` closes its other tasks

    def _ended(self, execution: SimExecution) -> None:
        """Any execution ended: a parent's waiting tasks stop waiting."""
        parent = self._parents.get(execution.arn)
        if parent is None:
            return
        run = execution.runs[-1]
        assert run.stop is not None  # noqa: S101 - an ended run has a stop
        expired = None
        if run.final == "FAILED" and run.error == HEARTBEAT_TIMEOUT and parent.expiring:
            expired = parent.expiring
        for task in parent.tasks:
            if task.state == "waiting":
                timed_out = task is expired or run.final == "TIMED_OUT"
                task.state = "timed_out" if timed_out else "closed"
        self._log.parent_ended(
            run.stop,
            execution.arn,
            run.final,
            error=run.error,
            cause=run.cause,
            expired=expired.token if expired is not None else None,
        )

    # -- the API ---------------------------------------------------------------------------

    def send_task_success(self, node: str, token: str, output: str) -> Answer:
        """SendTaskSuccess."""

        def step() -> None:
            size = len(output.encode())
            if size > MAX_OUTPUT_BYTES:
                raise too_long(SUCCESS, "output", MAX_OUTPUT_BYTES)
            task = self._waiting(SUCCESS, token)
            try:
                json.loads(output)
            except (ValueError, RecursionError):
                raise aws_error(
                    "InvalidOutput", "Invalid Output: 'the output is not valid JSON'", SUCCESS
                ) from None
            task.state, task.output = "answered", output
            self._log.token_call(
                self._clock(), node, operation=SUCCESS, token=token, result="ok", output=output
            )
            self._settle(task.parent)

        return self._serve(node, SUCCESS, token, step)

    def send_task_failure(
        self, node: str, token: str, error: str | None, cause: str | None
    ) -> Answer:
        """SendTaskFailure: the parent fails with this error and cause."""

        def step() -> None:
            check_length(FAILURE, "error", error, MAX_ERROR_CHARS)
            check_length(FAILURE, "cause", cause, MAX_CAUSE_CHARS)
            task = self._waiting(FAILURE, token)
            task.state = "answered"
            self._log.token_call(
                self._clock(),
                node,
                operation=FAILURE,
                token=token,
                result="ok",
                error=error,
                cause=cause,
            )
            self._end_now(task.parent, "FAILED", error=error, cause=cause)

        return self._serve(node, FAILURE, token, step)

    def send_task_heartbeat(self, node: str, token: str) -> Answer:
        """SendTaskHeartbeat: the task's heartbeat clock starts again."""

        def step() -> None:
            task = self._waiting(HEARTBEAT, token)
            task.beat = self._clock()
            self._log.token_call(self._clock(), node, operation=HEARTBEAT, token=token, result="ok")
            self._settle(task.parent)

        return self._serve(node, HEARTBEAT, token, step)

    def _serve(self, node: str, op: str, token: str, step: Callable[[], None]) -> Answer:
        """Run one operation; a refusal is recorded with its error code, then raised."""
        try:
            step()
        except ClientError as exc:
            self._log.token_call(
                self._clock(), node, operation=op, token=token, result=error_code(exc)
            )
            raise
        return {}

    def _waiting(self, op: str, token: str) -> _Task:
        """The waiting task of ``token``, or the error AWS answers."""
        if len(token) > MAX_TOKEN_CHARS:
            raise too_long(op, "taskToken", MAX_TOKEN_CHARS)
        task = self._tasks.get(token)
        if task is None:
            raise aws_error("InvalidToken", "Invalid Token: 'Invalid token'", op)
        if task.state == "waiting":
            return task
        code = "TaskTimedOut" if task.state == "timed_out" else self._closed_error
        text = "Task Timed Out" if code == "TaskTimedOut" else "Task Does Not Exist"
        raise aws_error(code, f"{text}: '{GONE_MESSAGE}'", op)
