"""The checker's rules for parent workflows and their task tokens (only when the history
has parents; see `sim.checker` for the rest).

5. ``parent_waiting``: by ``max(quiet_at, its start) + settle_bound`` every parent has
   ended: its tokens answered, or it ended for its own reasons (aborted, timed out, a
   sibling's failure). A parent never waits forever.
   ``token_message_kept``: by then, each token's request message was deleted or
   dead-lettered (the dispatcher let go of it).
   ``heartbeat_lapse`` (when ``CheckSpec.heartbeat_every`` is set): a parent failed with
   ``States.HeartbeatTimeout`` although the child of the expired token had run for
   ``heartbeat_every`` seconds (a heartbeat interval and some slack) counted from
   ``heartbeat_grace`` after the faults stopped: a token whose child runs is heartbeated.
   (A token still in the queue cannot be: HeartbeatSeconds must cover the queueing. So
   both heartbeat rules judge a token only from its request message's first receive: a
   parent's retry whose child was started for another token is unknown until then.)
   ``heartbeat_gap`` (when ``CheckSpec.heartbeat_restart_gap`` is set): from
   ``heartbeat_grace`` after the faults stopped, while a token's child runs and its parent
   waits, its accepted heartbeats are never further apart than ``heartbeat_every``, or
   across a process restart (the token held by a process that stopped, taken up by the
   next) ``heartbeat_deploy_gap`` (SIGTERM) / ``heartbeat_restart_gap`` (kill -9) - whether
   or not the parent's ``HeartbeatSeconds`` was short enough to fail it.
6. ``wrong_answer``: a ``SendTaskSuccess`` carries exactly its child's output; a
   ``SendTaskFailure`` carries its child's error and cause (or the documented
   ``Dispatcher.Child*`` / ``Dispatcher.OutputTooLarge`` names); a token without a child
   is failed with a ``Dispatcher.*`` error, ``Dispatcher.BadRequest`` for a bad request.
7. ``early_answer``: no token answered before its child ended (a token without a child,
   a bad request, is the exception).
   ``superseded_answer``: an answer is its child's final result: the result of the run
   current when it was sent - not of a run a redrive had replaced more than
   ``answer_slack`` seconds before, nor a status the child never ended with (RUNNING).
8. ``early_token_delete``: a token's request message is deleted only after the token was
   answered or its parent ended, never before.
   ``stopped_waited_child``: a dispatcher stops a child only when no parent whose token a
   dispatcher could know of waits for it: a token whose request message no dispatcher had
   received by the stop (a parent's retry still in the backlog) is not judged; it finds
   the child aborted, as docs/task-tokens.md says.

At most one execution per item is rule 2 (each item is a request of its own).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from sim import copy_rules
from sim.history import ORIGINAL_ID_ATTRIBUTE, OUTSIDE, Execution, History, Run
from sim.token_log import FAILURE, HEARTBEAT, SUCCESS, IssuedToken, Parent, TokenCall
from sim.violation import Violation

if TYPE_CHECKING:
    from sim.checker import CheckSpec

SETTLE_KINDS = frozenset({"lost_request", "parent_waiting", "token_message_kept"})
"""Violations that only say "not settled yet" while a run goes on."""
MAX_OUTPUT_BYTES = 262_144
MAX_ERROR_CHARS = 256
MAX_CAUSE_CHARS = 32_768
BAD_REQUEST = "Dispatcher.BadRequest"
CHILD_ERRORS = {"TIMED_OUT": "Dispatcher.ChildTimedOut", "ABORTED": "Dispatcher.ChildAborted"}
CHILD_FAILED = "Dispatcher.ChildFailed"
OUTPUT_TOO_LARGE = "Dispatcher.OutputTooLarge"
TOKEN_ATTRIBUTE = "task-token"  # noqa: S105 - as `sim.tokens`: an attribute name


def released(history: History) -> dict[str, float]:
    """Request id whose every token was never answered -> when the last of their parents
    ended (its request needs no child since). A token answered is judged as any request:
    its parent's end may be that very answer; so is a request some parent still waits for
    (a parent's retry with the same keys)."""
    tokens = history.tokens
    ends: dict[str, list[float | None]] = {}
    for parent in tokens.parents.values():
        for issued in parent.tokens:
            unanswered = tokens.answer_of(issued.token) is None
            end = parent.ended if unanswered else None
            ends.setdefault(issued.request_id, []).append(end)
    return {
        request_id: max(t for t in times if t is not None)
        for request_id, times in ends.items()
        if all(t is not None for t in times)
    }


def all_parents_ended(history: History) -> dict[str, float]:
    """Request id -> when the last parent of its tokens ended (answered or not), for a
    request every such parent has ended: a copy received after that (a redrive of its dead
    letter) finds no parent waiting and is dropped unstarted, as documented."""
    ends: dict[str, list[float | None]] = {}
    for parent in history.tokens.parents.values():
        for issued in parent.tokens:
            ends.setdefault(issued.request_id, []).append(parent.ended)
    return {
        request_id: max(t for t in times if t is not None)
        for request_id, times in ends.items()
        if all(t is not None for t in times)
    }


def released_messages(history: History) -> dict[str, float]:
    """Message id of a token never answered -> when its parent ended (its message may be
    deleted since, whatever other tokens of the same request wait for): the message the
    parent sent, and every copy of it (`token_messages`)."""
    tokens = history.tokens
    ended = {
        issued.token: parent.ended
        for parent in tokens.parents.values()
        if parent.ended is not None
        for issued in parent.tokens
        if tokens.answer_of(issued.token) is None
    }
    return {
        message_id: ended[token]
        for message_id, token in token_messages(history).items()
        if token in ended
    }


def token_messages(history: History) -> dict[str, str]:
    """Message id -> the token it carries: each message a parent sent, and each copy of one
    (a dispatcher's renewal, a dead letter, a redrive: its ``task-token`` attribute, kept
    from the original; else the ``dispatcher-original-message-id`` it names). A copy of one
    parent's token is never another's, whatever request the two share (a retry's keys)."""
    issued = history.tokens.issued.values()
    carried = {i.message_id: i.token for i in issued}
    known = {i.token for i in issued}
    for sent in sorted(history.sends, key=lambda s: s.time):
        if sent.message_id in carried:
            continue
        token = sent.attributes.get(TOKEN_ATTRIBUTE)
        if token not in known:
            token = carried.get(sent.attributes.get(ORIGINAL_ID_ATTRIBUTE, ""))
        if token is not None:
            carried[sent.message_id] = token
    return carried


def check_tokens(
    history: History,
    spec: CheckSpec,
    children: Mapping[str, list[Execution]],
    dead_lettered: Mapping[str, float],
    out_of_reach: Mapping[str, float] | None = None,
) -> list[Violation]:
    """Every broken token rule. ``children``: request id -> its executions;
    ``dead_lettered``: message id -> when its dead-letter copy (or move) was made;
    ``out_of_reach``: message id -> when the redrive policy moved it after a receive no
    dispatcher could act on (its answer lost, its receiver killed: as ``lost_request``
    excuses it, a parent waiting only on such tokens is excused from ``parent_waiting``)."""
    moved_away = _through_copies(history, spec, out_of_reach or {})
    log = history.tokens
    if not log.parents:
        return []
    found: list[Violation] = []
    received = first_receives(history)
    sent = first_starts_sent(history)
    deleted: dict[str, list[float]] = {}
    for delete in history.effective_deletes():
        if delete.queue_url in spec.request_queues:
            deleted.setdefault(delete.message_id, []).append(delete.time)
    # A message renewed (its copy, with the token, sent to a request queue) may go.
    renewed = copy_rules.renewals(history, spec.request_queues)
    for parent in log.parents.values():
        deadline = max(spec.quiet_at, parent.started) + spec.settle_bound
        waiting = [t for t in parent.tokens if _waits(log.answer_of(t.token), deadline)]
        unreachable = bool(waiting) and all(
            moved_away.get(t.message_id, math.inf) <= deadline for t in waiting
        )
        if not parent.closed_by(deadline) and not unreachable:
            found.append(
                Violation(
                    "parent_waiting",
                    deadline,
                    f"parent {parent.name} still waits at {deadline:.3f}: "
                    + (", ".join(f"item {t.index}" for t in waiting) or "no item")
                    + " unanswered",
                )
            )
        found += _check_heartbeats(parent, log.issued, children, spec, received)
        found += _check_heartbeat_gaps(history, parent, children, spec, received)
        for issued in parent.tokens:
            answer = log.answer_of(issued.token)
            if answer is not None:
                executions = [
                    e
                    for e in children.get(issued.request_id, [])
                    if min(e.first_start, sent.get(e.name, math.inf)) <= answer.time
                ]
                found += _check_answer(answer, issued, executions, spec)
            deletes = deleted.get(issued.message_id, [])
            until = renewed.get(issued.message_id, math.inf)
            found += _check_message(parent, issued, answer, [t for t in deletes if t < until])
            copied = dead_lettered.get(issued.message_id, math.inf)
            deadline = max(spec.quiet_at, issued.time) + spec.settle_bound
            if min([copied, *deletes]) > deadline:
                found.append(
                    Violation(
                        "token_message_kept",
                        deadline,
                        f"message {issued.message_id} of {parent.name} item {issued.index} "
                        f"is neither deleted nor dead-lettered by {deadline:.3f}",
                    )
                )
    found += _check_stops(history, children)
    return found


def _through_copies(
    history: History, spec: CheckSpec, moved: Mapping[str, float]
) -> dict[str, float]:
    """``moved`` with each move also counted for the messages the moved one is a renewal
    copy of (``dispatcher-original-message-id``, followed back): a token travels in its
    request's copies, so a copy moved out of reach leaves its parent unreachable."""
    parent_of = {
        sent.message_id: sent.attributes[ORIGINAL_ID_ATTRIBUTE]
        for sent in history.sends
        if ORIGINAL_ID_ATTRIBUTE in sent.attributes and sent.queue_url in spec.request_queues
    }
    found = dict(moved)
    for message_id, when in moved.items():
        seen: set[str] = set()
        current = message_id
        while current in parent_of and current not in seen:
            seen.add(current)
            current = parent_of[current]
            found[current] = min(found.get(current, math.inf), when)
    return found


def first_starts_sent(history: History) -> dict[str, float]:
    """Execution name -> when a dispatcher first sent a start of it. An execution neither
    started nor sent by the time a token was answered is not the child that answer is
    about: a request dead-lettered (its parent told so) and then redriven by an operator
    starts it later, as the dead letter's detail says; the parent is gone by then. One
    whose start was sent before the answer is (the start may land after it)."""
    sent: dict[str, float] = {}
    for record in history.records:
        if record.kind == "start_sent":
            sent.setdefault(str(record.details.get("name")), record.time)
    return sent


def _waits(answer: TokenCall | None, t: float) -> bool:
    return answer is None or answer.time > t


# -- rule 5: no parent waits forever --------------------------------------------------------


def first_receives(history: History) -> dict[str, float]:
    """Message id -> when a dispatcher first received it: before that, no dispatcher could
    know of the token it carries (a parent's retry in the backlog, its child started for
    another token): it is not heartbeated, and its child may be stopped."""
    received: dict[str, float] = {}
    for receive in history.receives:
        for message_id, _ in receive.messages:
            received.setdefault(message_id, receive.time)
    return received


def _check_heartbeats(
    parent: Parent,
    issued: Mapping[str, IssuedToken],
    children: Mapping[str, list[Execution]],
    spec: CheckSpec,
    received: Mapping[str, float],
) -> list[Violation]:
    every, expired, ended = spec.heartbeat_every, parent.expired, parent.ended
    if every is None or expired is None or ended is None:
        return []
    token = issued[expired]
    settled = spec.quiet_at + spec.heartbeat_grace  # faults, and the recovery from them
    for execution in children.get(token.request_id, []):
        for run in execution.runs:
            since = max(
                run.start,
                settled,
                ended - (parent.heartbeat_seconds or 0.0),
                received.get(token.message_id, math.inf),
            )
            if ended - since >= every and (run.stop is None or run.stop >= ended):
                return [
                    Violation(
                        "heartbeat_lapse",
                        ended,
                        f"parent {parent.name} timed out waiting for item {token.index}: no "
                        f"heartbeat although its child {execution.name} ran from "
                        f"{run.start:.3f} (faults stopped at {spec.quiet_at:.3f})",
                    )
                ]
    return []


def _restarts(history: History) -> list[tuple[float, float, bool]]:
    """(from, to, killed) of every dispatcher process that stopped: kill -9 (True, at one
    instant) or SIGTERM (from the signal until the process exited: it drains meanwhile, and
    its last heartbeats may come after the signal)."""
    out = [(c.time, c.time, True) for c in history.crashes if c.node != OUTSIDE]
    ends: dict[str, list[float]] = {}
    for record in history.records:
        if record.kind == "crash" or (
            record.kind == "note" and record.text.startswith(("process exited", "process died"))
        ):
            ends.setdefault(record.node, []).append(record.time)
    for record in history.records:
        if record.kind == "note" and record.text == "SIGTERM":
            after = [t for t in ends.get(record.node, []) if t >= record.time]
            out.append((record.time, min(after, default=history.end), False))
    return sorted(out)


def _check_heartbeat_gaps(
    history: History,
    parent: Parent,
    children: Mapping[str, list[Execution]],
    spec: CheckSpec,
    received: Mapping[str, float],
) -> list[Violation]:
    every, restart, deploy = (
        spec.heartbeat_every,
        spec.heartbeat_restart_gap,
        spec.heartbeat_deploy_gap,
    )
    if every is None or restart is None or parent.heartbeat_seconds is None:
        return []
    log = history.tokens
    restarts = _restarts(history)
    settled = spec.quiet_at + spec.heartbeat_grace
    found: list[Violation] = []
    for issued in parent.tokens:
        answer = log.answer_of(issued.token)
        beats = sorted(
            c.time
            for c in log.calls
            if c.token == issued.token and c.operation == HEARTBEAT and c.accepted
        )
        for execution in children.get(issued.request_id, [])[:1]:
            run = execution.runs[0]
            ends = [t for t in (run.stop, parent.ended, answer.time if answer else None) if t]
            known = received.get(issued.message_id, math.inf)
            begin, end = max(run.start, settled, known), min(ends, default=math.inf)
            if end == math.inf:
                end = history.end
            if end <= begin:
                continue
            points = [max([b for b in beats if b <= begin], default=begin)]
            points += [b for b in beats if begin < b < end] + [end]
            for a, b in itertools.pairwise(points):
                kinds = [killed for start, stop, killed in restarts if start < b and stop >= a]
                allowed = every if not kinds else (restart if any(kinds) else deploy or restart)
                if b - a > allowed:
                    across = (
                        ""
                        if not kinds
                        else " across a restart"
                        if any(kinds)
                        else " across a deploy"
                    )
                    found.append(
                        Violation(
                            "heartbeat_gap",
                            b,
                            f"{parent.name} item {issued.index}: no heartbeat from {a:.3f} to "
                            f"{b:.3f}{across} ({b - a:.0f} s > {allowed:.0f} s) while its child "
                            f"{execution.name} ran",
                        )
                    )
                    break
    return found


def _check_message(
    parent: Parent, issued: IssuedToken, answer: TokenCall | None, deletes: list[float]
) -> list[Violation]:
    return [
        Violation(
            "early_token_delete",
            at,
            f"message {issued.message_id} of {parent.name} item {issued.index} was "
            "deleted while its parent still waited for the answer",
        )
        for at in deletes
        if _waits(answer, at) and not parent.closed_by(at)
    ]


# -- rules 6 and 7: the right answer, after the child ended --------------------------------


def _check_answer(
    answer: TokenCall, issued: IssuedToken, executions: list[Execution], spec: CheckSpec
) -> list[Violation]:
    item = f"{short_parent(issued)} item {issued.index}"
    what = answer.operation + (f" error={answer.error}" if answer.operation == FAILURE else "")
    if not executions:
        bad = issued.request_id in spec.expected_bad
        if answer.operation == SUCCESS:
            why = "it has no child"
        elif bad and answer.error != BAD_REQUEST:
            why = f"its request is bad: {BAD_REQUEST} expected"
        elif not (answer.error or "").startswith("Dispatcher."):
            why = "it has no child: a Dispatcher.* error expected"
        else:
            return []
        return [Violation("wrong_answer", answer.time, f"{item} got {what}, but {why}")]
    closed = [
        (execution, run)
        for execution in executions
        for run in execution.runs
        if run.stop is not None and run.stop <= answer.time
    ]
    if not closed:
        return [
            Violation(
                "early_answer",
                answer.time,
                f"{item} got {what} before its child {executions[0].name} ended",
            )
        ]
    if any(_fits(answer, run) for _, run in closed):
        return _check_superseded(answer, item, what, executions, spec)
    execution, run = closed[-1]
    got = answer.output if answer.operation == SUCCESS else f"{answer.error!r} {answer.cause!r}"
    child = run.output if run.status == "SUCCEEDED" else f"{run.error!r} {run.cause!r}"
    return [
        Violation(
            "wrong_answer",
            answer.time,
            f"{item} got {answer.operation} {_cut(got)}, but its child {execution.name} "
            f"ended {run.status} with {_cut(child)}",
        )
    ]


def _check_superseded(
    answer: TokenCall, item: str, what: str, executions: list[Execution], spec: CheckSpec
) -> list[Violation]:
    """The answer fits some run that had ended: it must be the run current then (a redrive
    may have started another less than ``answer_slack`` before), and never say RUNNING."""
    if answer.operation == FAILURE and "RUNNING" in (answer.cause or ""):
        return [
            Violation(
                "superseded_answer",
                answer.time,
                f"{item} got {what} cause={_cut(answer.cause)!r}: a child never ends RUNNING",
            )
        ]
    for execution in executions:
        if not any(_fits(answer, r) for r in execution.runs):
            # Not the child this answer came from: another execution of the same identity
            # (a retry sent after `key_attribute` changed starts one under its new name, as
            # the README says) - its runs neither replace nor are replaced by this one's.
            continue
        current = [r for r in execution.runs if r.start <= answer.time - spec.answer_slack]
        later = [r for r in execution.runs if r.start <= answer.time]
        if not current or _fits(answer, current[-1]) or _fits(answer, later[-1]):
            continue
        run = current[-1]
        if run.stop is None or run.stop > answer.time:
            why = f"was running again since {run.start:.3f} (redriven)"
        else:
            why = f"had run again from {run.start:.3f} and ended {run.status}"
        return [
            Violation(
                "superseded_answer",
                answer.time,
                f"{item} got {what} from an earlier run, but its child {execution.name} {why}",
            )
        ]
    return []


def _fits(answer: TokenCall, run: Run) -> bool:
    """Whether ``answer`` is the answer for a child whose run ended so."""
    if answer.operation == SUCCESS:
        return run.status == "SUCCEEDED" and answer.output == run.output
    if run.status == "SUCCEEDED":
        large = run.output is not None and len(run.output.encode()) > MAX_OUTPUT_BYTES
        return large and answer.error == OUTPUT_TOO_LARGE
    if run.status == "FAILED":
        if answer.error != (run.error or CHILD_FAILED)[:MAX_ERROR_CHARS]:
            return False
        return not run.cause or answer.cause == run.cause[:MAX_CAUSE_CHARS]
    return answer.error == CHILD_ERRORS.get(run.status or "")


def _cut(text: str | None, most: int = 120) -> str:
    text = str(text)
    return text if len(text) <= most else text[:most] + "..."


def short_parent(issued: IssuedToken) -> str:
    """The parent's name, from its ARN."""
    return issued.parent_arn.rsplit(":", 1)[-1]


# -- rule 8: stops -----------------------------------------------------------------------------


def _check_stops(history: History, children: Mapping[str, list[Execution]]) -> list[Violation]:
    log = history.tokens
    tokens_of: dict[str, list[IssuedToken]] = {}
    for issued in log.issued.values():
        for execution in children.get(issued.request_id, []):
            tokens_of.setdefault(execution.arn, []).append(issued)
    received = first_receives(history)
    found: list[Violation] = []
    for stop in log.stops:
        if stop.node == OUTSIDE:
            continue
        waited = [
            issued
            for issued in tokens_of.get(stop.arn, [])
            if _waits(log.answer_of(issued.token), stop.time)
            and not log.parents[issued.parent_arn].closed_by(stop.time)
            and received.get(issued.message_id, math.inf) <= stop.time
        ]
        if waited or stop.arn not in tokens_of:
            whom = ", ".join(f"{short_parent(i)} item {i.index}" for i in waited)
            found.append(
                Violation(
                    "stopped_waited_child",
                    stop.time,
                    f"{stop.node} stopped {stop.arn.rsplit(':', 1)[-1]}, "
                    + (f"still awaited by {whom}" if whom else "a child of no parent"),
                )
            )
    return found
