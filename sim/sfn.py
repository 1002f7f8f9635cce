"""Simulated Step Functions: state machines and executions with AWS's documented semantics.

Status is computed from time: a run is RUNNING from its start until its stop. Ends are
noticed lazily (`StepFunctions.advance`, called before every call is served and by
`World.run`), which records them and emits their status-change events. Listings are
eventually consistent (each run becomes visible, and its end visible, after its own lag);
DescribeExecution may not know an execution for a moment after it started.

A run's result is fixed when its end is planned: a child's output is a function of its
input (`child_result`), so the checker can tell whether a parent got the right answer.
A parent workflow (`sim.tokens`) is a run without a planned stop until its tokens are
answered, time out or it is aborted.
"""

from __future__ import annotations

import base64
import bisect
import heapq
import itertools
import json
import math
import random
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import ClientError

from sim.calls import Answer, aws_error
from sim.history import OUTSIDE, History
from sim.sfn_model import (
    EXECUTION_ARN_RE,
    MAX_CAUSE_CHARS,
    MAX_ERROR_CHARS,
    MAX_INPUT_BYTES,
    NAME_RE,
    REDRIVABLE,
    STATE_MACHINE_ARN_RE,
    TERMINAL,
    Change,
    SimExecution,
    SimRun,
    StateMachine,
    check_length,
    child_result,
    failure,
    work,
)

__all__ = ["REDRIVABLE", "TERMINAL", "Change", "SimExecution", "StepFunctions"]


class StepFunctions:
    """The state of Step Functions and its operations (synchronous: one atomic step each)."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        rng: random.Random,
        history: History,
        wall: Callable[[float], float],
        listing_lag: float,
        describe_lag: float,
        describe_lag_rate: float,
        listing_lag_at_max: float = 0.0,
        default_duration: Callable[[random.Random], float],
        emit: Callable[[Change], None],
        region: str,
        account: str,
    ) -> None:
        self._clock = clock
        self._rng = rng
        self._history = history
        self._wall = wall
        self._listing_lag = listing_lag
        self._describe_lag = describe_lag
        self._describe_lag_rate = describe_lag_rate
        self._lag_at_max = listing_lag_at_max
        # An execution whose changes show in listings this late (None: the usual draw).
        self.listing_lag_of: Callable[[str], float | None] = lambda name: None
        # How long DescribeExecution does not know a new execution (None: the usual draw).
        self.describe_lag_of: Callable[[str], float | None] = lambda name: None
        self._default_duration = default_duration
        self._emit = emit
        self.region = region
        self.account = account
        self.machines: dict[str, StateMachine] = {}
        self.executions: dict[str, SimExecution] = {}
        self._listing: dict[str, list[SimExecution]] = {}  # by machine, ascending key
        self._ends: list[tuple[float, int, str, int]] = []  # (stop, serial, arn, run index)
        self._serial = itertools.count()
        self.on_end: Callable[[SimExecution], None] | None = None  # told of every end

    # -- time ----------------------------------------------------------------------------

    def advance(self) -> None:
        """Notice every run that has ended by now: record it and announce it."""
        now = self._clock()
        while self._ends and self._ends[0][0] <= now:
            stop, _, arn, index = heapq.heappop(self._ends)
            execution = self.executions[arn]
            run = execution.runs[index]
            if run.ended or run.stop != stop:
                continue  # aborted earlier: already ended
            self._end(execution, index)

    def _lag(self, name: str = "") -> float:
        """How long a change takes to show in listings: up to the listing lag, exactly
        it for a share ``listing_lag_at_max`` of the changes (or as `listing_lag_of`
        says for execution ``name``)."""
        chosen = self.listing_lag_of(name) if name else None
        if chosen is not None:
            return chosen
        if self._lag_at_max and self._rng.random() < self._lag_at_max:
            return self._listing_lag
        return self._rng.uniform(0.0, self._listing_lag)

    def next_change(self) -> float:
        """When the next run ends (inf: none planned)."""
        return self._ends[0][0] if self._ends else math.inf

    def _end(self, execution: SimExecution, index: int) -> None:
        run = execution.runs[index]
        assert run.stop is not None  # noqa: S101 - only runs with a stop end
        run.ended = True
        run.visible_end = run.stop + self._lag(execution.name)
        self._history.execution_ended(
            run.stop,
            execution.arn,
            run.final,
            output=run.output,
            error=run.error,
            cause=run.cause,
        )
        if self.on_end is not None:
            self.on_end(execution)
        self._emit(Change(execution, index, run.final, run.stop))

    def _plan_end(self, execution: SimExecution, index: int) -> None:
        stop = execution.runs[index].stop
        if stop is not None:
            heapq.heappush(self._ends, (stop, next(self._serial), execution.arn, index))

    # -- set-up and outside actions ------------------------------------------------------

    def create_state_machine(self, name: str, type: str) -> str:
        """Create a state machine; returns its ARN."""
        if type not in ("STANDARD", "EXPRESS"):
            raise ValueError(f"state machine type {type!r}: STANDARD or EXPRESS")
        arn = f"arn:aws:states:{self.region}:{self.account}:stateMachine:{name}"
        self.machines[arn] = StateMachine(arn, name, type, self._clock())
        self._listing[arn] = []
        return arn

    def start(
        self,
        node: str,
        machine_arn: str,
        name: str,
        input: str,
        duration: float | None = None,
        *,
        open_ended: bool = False,
    ) -> SimExecution:
        """Create an execution and its first run (validation done by the caller);
        ``open_ended``: no planned stop (a parent workflow waiting for its tokens)."""
        now = self._clock()
        arn = machine_arn.replace(":stateMachine:", ":execution:", 1) + ":" + name
        parsed = work(input)
        if duration is None and not open_ended:
            seconds = parsed.get("seconds") if isinstance(parsed, dict) else None
            if isinstance(seconds, int) and not isinstance(seconds, bool) and seconds >= 0:
                duration = float(seconds)
            else:
                duration = self._default_duration(self._rng)
        failing = isinstance(parsed, dict) and parsed.get("fail") is True
        final, output, error, cause = child_result(input, "FAILED" if failing else "SUCCEEDED")
        stop = None if open_ended or duration is None else now + duration
        lagged = self._rng.random() < self._describe_lag_rate
        lag = self._rng.uniform(0.0, self._describe_lag) if lagged else 0.0
        chosen = self.describe_lag_of(name)
        execution = SimExecution(
            arn,
            name,
            machine_arn,
            input,
            now + (lag if chosen is None else chosen),
            (now, next(self._serial)),
            open_ended=open_ended,
        )
        execution.runs.append(
            SimRun(
                now,
                stop,
                final,
                node,
                now + self._lag(name),
                output=output,
                error=error,
                cause=cause,
            )
        )
        self.executions[arn] = execution
        bisect.insort(self._listing[machine_arn], execution, key=lambda e: e.key)
        self._history.execution_started(
            now,
            node,
            arn=arn,
            state_machine_arn=machine_arn,
            name=name,
            input=input,
            planned_stop=stop,
        )
        self._emit(Change(execution, 0, "RUNNING", now))
        self._plan_end(execution, 0)
        return execution

    def redrive(self, arn: str, duration: float, status: str = "SUCCEEDED") -> bool:
        """Run a closed FAILED/TIMED_OUT/ABORTED execution again (an outside redrive)."""
        self.advance()
        now = self._clock()
        execution = self.executions.get(arn)
        if execution is None or execution.status(now) not in REDRIVABLE:
            return False
        if status not in TERMINAL:
            raise ValueError(f"a run ends {sorted(TERMINAL)}, not {status!r}")
        if execution.open_ended:
            return False  # a parent workflow: not modelled (new tokens for failed items)
        final, output, error, cause = child_result(execution.input, status)
        run = SimRun(
            now,
            now + duration,
            final,
            OUTSIDE,
            now + self._lag(),
            output=output,
            error=error,
            cause=cause,
        )
        execution.runs.append(run)
        index = len(execution.runs) - 1
        self._history.execution_redriven(now, OUTSIDE, arn, now + duration)
        self._emit(Change(execution, index, "RUNNING", now))
        self._plan_end(execution, index)
        return True

    def stop(
        self,
        arn: str,
        status: str = "ABORTED",
        *,
        error: str | None = None,
        cause: str | None = None,
    ) -> bool:
        """End a running execution now with ``status`` (a StopExecution); False if not
        running. FAILED and TIMED_OUT get the simulated error and cause unless given."""
        self.advance()
        now = self._clock()
        execution = self.executions.get(arn)
        if execution is None or execution.status(now) != "RUNNING":
            return False
        run = execution.runs[-1]
        run.stop, run.final = now, status
        default_error, default_cause = failure(status)
        run.output = None
        run.error = error if error is not None else default_error
        run.cause = cause if cause is not None else default_cause
        self._end(execution, len(execution.runs) - 1)
        return True

    def plan_stop(
        self,
        execution: SimExecution,
        at: float | None,
        status: str,
        error: str | None = None,
        cause: str | None = None,
        *,
        output: str | None = None,
    ) -> None:
        """(Re)plan when a running open-ended run ends by itself (None: not by itself), and
        with what result (a parent's answers, heartbeat or execution timeout)."""
        run = execution.runs[-1]
        run.stop, run.final, run.output, run.error, run.cause = at, status, output, error, cause
        self._plan_end(execution, len(execution.runs) - 1)

    # -- API -----------------------------------------------------------------------------

    def start_execution(
        self,
        node: str,
        machine_arn: str,
        name: str | None,
        input: str,
        trace_header: str | None,
    ) -> Answer:
        """StartExecution."""
        del trace_header  # accepted, not modelled
        op = "StartExecution"
        machine = self._machine(machine_arn, op)
        if name is None:
            name = str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
        if not NAME_RE.match(name):
            raise aws_error("InvalidName", f"Invalid Name: '{name}'", op)
        size = len(input.encode())
        if size > MAX_INPUT_BYTES:
            raise aws_error(
                "InvalidExecutionInput",
                f"Invalid State Machine Execution Input: 'input size {size} bytes exceeds "
                f"the maximum of {MAX_INPUT_BYTES} bytes'",
                op,
            )
        try:
            json.loads(input)
        except (ValueError, RecursionError):
            raise aws_error(
                "InvalidExecutionInput",
                "Invalid State Machine Execution Input: 'Unexpected character'",
                op,
            ) from None
        if machine.type == "EXPRESS":  # no idempotency, no listing, no events
            serial = self._rng.getrandbits(64)
            arn = f"{machine_arn.replace(':stateMachine:', ':express:', 1)}:{name}:{serial:x}"
            return {"executionArn": arn, "startDate": self.date(self._clock())}
        arn = machine_arn.replace(":stateMachine:", ":execution:", 1) + ":" + name
        now = self._clock()
        existing = self.executions.get(arn)
        if existing is not None:
            if existing.status(now) == "RUNNING" and existing.input == input:
                self._history.execution_repeated(now, node, arn)
                return {"executionArn": arn, "startDate": self.date(existing.key[0])}
            raise aws_error("ExecutionAlreadyExists", f"Execution Already Exists: '{arn}'", op)
        execution = self.start(node, machine_arn, name, input)
        return {"executionArn": execution.arn, "startDate": self.date(now)}

    def describe_execution(self, arn: str) -> Answer:
        """DescribeExecution (strongly consistent, but may not know a new execution yet)."""
        op = "DescribeExecution"
        if not EXECUTION_ARN_RE.match(arn):
            raise aws_error("InvalidArn", f"Invalid Arn: '{arn}'", op)
        now = self._clock()
        execution = self.executions.get(arn)
        if execution is None or now < execution.describable_from:
            raise aws_error("ExecutionDoesNotExist", f"Execution Does Not Exist: '{arn}'", op)
        status = execution.status(now)
        run = execution.runs[-1]
        out: Answer = {
            "executionArn": arn,
            "stateMachineArn": execution.state_machine_arn,
            "name": execution.name,
            "status": status,
            "startDate": self.date(execution.key[0]),
            "input": execution.input,
            "inputDetails": {"included": True},
            "redriveCount": len(execution.runs) - 1,
        }
        if len(execution.runs) > 1:
            out["redriveDate"] = self.date(run.start)
        if status != "RUNNING":
            assert run.stop is not None  # noqa: S101 - a closed run has a stop
            out["stopDate"] = self.date(run.stop)
        if status == "SUCCEEDED":
            out["output"] = run.output
            out["outputDetails"] = {"included": True}
        elif status != "RUNNING":
            if run.error is not None:
                out["error"] = run.error
            if run.cause is not None:
                out["cause"] = run.cause
        out["redriveStatus"] = "REDRIVABLE" if status in REDRIVABLE else "NOT_REDRIVABLE"
        if status not in REDRIVABLE:
            out["redriveStatusReason"] = f"Execution is {status} and cannot be redriven"
        return out

    def list_executions(
        self, machine_arn: str, status_filter: str | None, max_results: int, token: str | None
    ) -> Answer:
        """ListExecutions: newest first, eventually consistent, opaque next tokens."""
        op = "ListExecutions"
        machine = self._machine(machine_arn, op)
        if machine.type == "EXPRESS":
            raise aws_error(
                "StateMachineTypeNotSupported",
                "This operation is not supported by this type of state machine",
                op,
            )
        if status_filter is not None and status_filter not in (TERMINAL | {"RUNNING"}) | {
            "PENDING_REDRIVE"
        }:
            raise aws_error(
                "ValidationException",
                f"1 validation error detected: Value '{status_filter}' at 'statusFilter' "
                "failed to satisfy constraint",
                op,
            )
        if not 0 <= max_results <= 1000:
            raise aws_error(
                "ValidationException",
                f"1 validation error detected: Value '{max_results}' at 'maxResults' failed "
                "to satisfy constraint: Member must have value less than or equal to 1000",
                op,
            )
        size = max_results or 100
        listing = self._listing[machine_arn]
        end = len(listing)
        if token is not None:
            end = bisect.bisect_left(
                listing, self._cursor(token, machine_arn, status_filter), key=lambda e: e.key
            )
        now = self._clock()
        items: list[Answer] = []
        position = end
        while position > 0 and len(items) < size:
            position -= 1
            execution = listing[position]
            shown = execution.listed(now)
            if shown is None:
                continue
            status, redrives = shown
            if status_filter is not None and status != status_filter:
                continue
            items.append(self._item(execution, status, redrives))
        out: Answer = {"executions": items}
        if len(items) == size and position > 0:
            out["nextToken"] = _token(machine_arn, status_filter, listing[position].key)
        return out

    def _item(self, execution: SimExecution, status: str, redrives: int) -> Answer:
        item: Answer = {
            "executionArn": execution.arn,
            "stateMachineArn": execution.state_machine_arn,
            "name": execution.name,
            "status": status,
            "startDate": self.date(execution.key[0]),
            "redriveCount": redrives,
        }
        run = execution.runs[redrives]
        if redrives:
            item["redriveDate"] = self.date(run.start)
        if status != "RUNNING" and run.stop is not None:
            item["stopDate"] = self.date(run.stop)
        return item

    def _cursor(self, token: str, machine_arn: str, status_filter: str | None) -> tuple[float, int]:
        data: Any = None
        try:
            data = json.loads(base64.urlsafe_b64decode(token.encode()))
            key = float(data["k"][0]), int(data["k"][1])
        except (ValueError, KeyError, TypeError, IndexError):
            key = None
        if key is None or data["m"] != machine_arn or data["f"] != status_filter:
            raise aws_error("InvalidToken", f"Invalid Token: '{token[:40]}'", "ListExecutions")
        return key

    def describe_state_machine(self, arn: str) -> Answer:
        """DescribeStateMachine."""
        machine = self._machine(arn, "DescribeStateMachine")
        return {
            "stateMachineArn": machine.arn,
            "name": machine.name,
            "status": "ACTIVE",
            "definition": json.dumps(
                {"StartAt": "Work", "States": {"Work": {"Type": "Pass", "End": True}}}
            ),
            "roleArn": f"arn:aws:iam::{self.account}:role/sim-{machine.name}",
            "type": machine.type,
            "creationDate": self.date(machine.created),
        }

    def list_state_machines(self) -> Answer:
        """ListStateMachines (one page)."""
        return {
            "stateMachines": [
                {
                    "stateMachineArn": m.arn,
                    "name": m.name,
                    "type": m.type,
                    "creationDate": self.date(m.created),
                }
                for m in self.machines.values()
            ]
        }

    def stop_execution(self, node: str, arn: str, error: str | None, cause: str | None) -> Answer:
        """StopExecution: a running execution ends ABORTED now (a closed one stays as it
        is: the call succeeds and changes nothing)."""
        op = "StopExecution"
        if not EXECUTION_ARN_RE.match(arn):
            raise aws_error("InvalidArn", f"Invalid Arn: '{arn}'", op)
        check_length(op, "error", error, MAX_ERROR_CHARS)
        check_length(op, "cause", cause, MAX_CAUSE_CHARS)
        execution = self.executions.get(arn)
        if execution is None:
            raise aws_error("ExecutionDoesNotExist", f"Execution Does Not Exist: '{arn}'", op)
        now = self._clock()
        if execution.status(now) == "RUNNING":
            self._history.tokens.child_stopped(now, node, arn, error, cause)
            self.stop(arn, "ABORTED", error=error, cause=cause)
        stop = execution.runs[-1].stop
        assert stop is not None  # noqa: S101 - closed now
        return {"stopDate": self.date(stop)}

    # -- helpers -------------------------------------------------------------------------

    def _machine(self, arn: str, op: str) -> StateMachine:
        if not STATE_MACHINE_ARN_RE.match(arn):
            raise aws_error("InvalidArn", f"Invalid Arn: '{arn}'", op)
        machine = self.machines.get(arn)
        if machine is None:
            raise aws_error(
                "StateMachineDoesNotExist", f"State Machine Does Not Exist: '{arn}'", op
            )
        return machine

    def date(self, t: float) -> datetime:
        """A virtual time as the datetime botocore returns."""
        return datetime.fromtimestamp(self._wall(t), tz=UTC)

    def check_start(self, machine_arn: str, name: str) -> ClientError | None:
        """Why an outside start of ``name`` would fail (None: it would not)."""
        try:
            self._machine(machine_arn, "StartExecution")
        except ClientError as exc:
            return exc
        if not NAME_RE.match(name):
            return aws_error("InvalidName", f"Invalid Name: '{name}'", "StartExecution")
        arn = machine_arn.replace(":stateMachine:", ":execution:", 1) + ":" + name
        if arn in self.executions:
            return aws_error(
                "ExecutionAlreadyExists", f"Execution Already Exists: '{arn}'", "StartExecution"
            )
        return None


def _token(machine_arn: str, status_filter: str | None, key: tuple[float, int]) -> str:
    data = json.dumps({"m": machine_arn, "f": status_filter, "k": list(key)})
    return base64.urlsafe_b64encode(data.encode()).decode()
