"""The data of simulated Step Functions: state machines, executions and their runs, status
changes, and what a run returns (its result is a function of its input, see `child_result`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError

from sim.calls import aws_error

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,80}\Z")
MAX_INPUT_BYTES = 256 * 1024
MAX_EVENT_PAYLOAD = 248 * 1024  # EventBridge leaves input/output out of an event above this
MAX_ERROR_CHARS = 256
MAX_CAUSE_CHARS = 32_768
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "TIMED_OUT", "ABORTED"})
REDRIVABLE = frozenset({"FAILED", "TIMED_OUT", "ABORTED"})
STATE_MACHINE_ARN_RE = re.compile(r"^arn:aws:states:[a-z0-9-]+:\d{12}:stateMachine:[^:]+\Z")
EXECUTION_ARN_RE = re.compile(r"^arn:aws:states:[a-z0-9-]+:\d{12}:execution:[^:]+:[^:]+\Z")


@dataclass(slots=True)
class SimRun:
    """One run of an execution (its first, or a redrive) and how it ends."""

    start: float
    stop: float | None  # None: open-ended (kept open for task tokens)
    final: str  # the status it ends with
    started_by: str
    visible_from: float  # listings show it from here
    visible_end: float = math.inf  # listings show its end from here (set when it ends)
    ended: bool = False
    output: str | None = None  # SUCCEEDED: what it returns
    error: str | None = None  # FAILED / TIMED_OUT (and ABORTED when stopped with one)
    cause: str | None = None


@dataclass(slots=True)
class SimExecution:
    """One standard execution."""

    arn: str
    name: str
    state_machine_arn: str
    input: str
    describable_from: float
    key: tuple[float, int]  # (start, serial): listing order
    runs: list[SimRun] = field(default_factory=list)
    open_ended: bool = False  # a parent workflow: ends when its tokens say so

    def status(self, t: float) -> str:
        """The true status at ``t``."""
        run = self.runs[-1]
        if run.stop is None or t < run.stop:
            return "RUNNING"
        return run.final

    def listed(self, t: float) -> tuple[str, int] | None:
        """(status, redrive count) a listing at ``t`` shows, None while it shows nothing."""
        for index in range(len(self.runs) - 1, -1, -1):
            run = self.runs[index]
            if run.visible_from <= t:
                return ("RUNNING" if t < run.visible_end else run.final), index
        return None


@dataclass(frozen=True, slots=True)
class StateMachine:
    """A state machine: its ARN, name and type."""

    arn: str
    name: str
    type: str
    created: float


@dataclass(frozen=True, slots=True)
class Change:
    """A status change to announce: which execution, which run, the new status."""

    execution: SimExecution
    run_index: int
    status: str
    time: float


def too_long(op: str, name: str, most: int) -> ClientError:
    """The ValidationException AWS answers for a parameter over its length constraint."""
    return aws_error(
        "ValidationException",
        f"1 validation error detected: Value at '{name}' failed to satisfy constraint: "
        f"Member must have length less than or equal to {most}",
        op,
    )


def check_length(op: str, name: str, value: str | None, most: int) -> None:
    """AWS's length constraint on a string parameter."""
    if value is not None and len(value) > most:
        raise too_long(op, name, most)


def failure(status: str) -> tuple[str | None, str | None]:
    """The error and cause a run ending ``status`` has unless told otherwise."""
    if status == "TIMED_OUT":
        return "States.Timeout", "the simulated execution failed"
    if status == "FAILED":
        return "Simulated.Failure", "the simulated execution failed"
    return None, None


def child_output(input: str) -> str:
    """What a simulated execution returns: ``{"req": <its input's req>, "done": true}``
    (padded to about ``output_bytes`` when the input asks), or its input when that is not
    a JSON object."""
    parsed = work(input)
    if not isinstance(parsed, dict):
        return input
    result: dict[str, Any] = {"req": parsed.get("req"), "done": True}
    size = parsed.get("output_bytes")
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        result["pad"] = ""
        result["pad"] = "x" * max(0, size - len(json.dumps(result)))
    return json.dumps(result)


def child_result(input: str, status: str) -> tuple[str, str | None, str | None, str | None]:
    """(final status, output, error, cause) of a run of ``input`` meant to end ``status``:
    an output over the payload limit fails it (States.DataLimitExceeded), as on AWS."""
    if status != "SUCCEEDED":
        error, cause = failure(status)
        parsed = work(input)
        if status == "FAILED" and isinstance(parsed, dict):
            error = parsed["error"] if isinstance(parsed.get("error"), str) else error
            cause = parsed["cause"] if isinstance(parsed.get("cause"), str) else cause
        return status, None, error, cause
    output = child_output(input)
    size = len(output.encode())
    if size > MAX_INPUT_BYTES:
        return (
            "FAILED",
            None,
            "States.DataLimitExceeded",
            f"The state/task 'Work' returned a result with a size of {size} bytes exceeding "
            f"the maximum number of bytes service limit ({MAX_INPUT_BYTES}).",
        )
    return "SUCCEEDED", output, None, None


def work(text: str) -> Any:
    """What a child's input asks for: the parsed input, or in the dispatcher's envelope
    format (``{"body": ..., "messageId": ...}``) the parsed body, as a state machine reading
    ``$.body`` would."""
    parsed = parse(text)
    if isinstance(parsed, dict) and isinstance(parsed.get("body"), str) and "messageId" in parsed:
        return parse(parsed["body"])
    return parsed


def parse(text: str) -> Any:
    """JSON text parsed (None when it is not JSON)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None
