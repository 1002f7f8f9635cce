"""Judge a simulation from its history alone: the dispatcher's invariants as rules.

1. ``limit`` / ``key_limit``: when a dispatcher's StartExecution took effect, the runs
   running then (the dispatcher's, and outside ones past their grace - or from their
   start, a redrive a process was told exists: `told_exists`) fit the limit in force
   (the highest from ``read_lag`` before the first attempt that may have started it, or
   during the last ``staleness`` seconds without a record of it), per pool and per key
   (the key of the request a run serves, in a pool keyed the whole run; else its name's
   tag), the per-key limit too as recorded when it changes.
2. ``duplicate_execution``: at most one execution per logical request.
3. ``lost_request``: by ``quiet_at + settle_bound`` (or that long after a later send)
   every request has an execution or a dead-letter copy with its reason;
   ``redrive_move``: a valid request's message moved by the redrive policy (unless a
   receive of it never reached a dispatcher: its answer was lost, or its receiver was
   killed before it could act; such a move settles the request, as SQS's own doing);
   ``bad_request_started``: an execution for a request the harness marked bad.
4. ``early_delete``: a request message deleted before its execution existed, or before
   its dead-letter copy was sent (a dead letter of a request whose execution ran:
   ``dead_letter_ran`` in `sim.copy_rules`).
``unwarranted_dead_letter``: a dead letter's reason is a verdict the dispatcher gives
   requests, or an AWS error about requests the simulated AWS gave (`_check_reasons`).
5-8. Parent workflows and their task tokens: `sim.token_rules`. A token's request whose
   parent has ended needs no execution (rules 3 and 4 let it go).
9. Dead letters of requests that ran (``dead_letter_ran``, ``dead_letter_held_copy``):
   `sim.copy_rules`.
Judged only in the seeds of the scenarios built for them: ``idle_slot``, a pool below its
limit while a request waits (`sim.late_running`); ``receives``, a request received too
often before it starts (`sim.backlog`).

An execution belongs to a request when its name (without a key tag) is the request's
idempotency key or message id, or when its input is JSON-equal to the request's body and
no other request has that body.
"""

from __future__ import annotations

import bisect
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from dispatcher.aws.api import REQUEST_CODES
from dispatcher.daemon.metrics import DEAD_LETTER_REASONS
from sim import backlog, copy_rules, deadlines, fence, late_running, token_rules
from sim.history import (
    ORIGINAL_ID_ATTRIBUTE,
    OUTSIDE,
    REASON_ATTRIBUTE,
    Execution,
    History,
    RequestMessage,
    Run,
    key_tag_of,
)
from sim.violation import Violation

__all__ = ["CheckSpec", "PoolSpec", "Violation", "check", "limit_at", "max_concurrency"]

IDEMPOTENCY_ATTRIBUTE = "idempotency-key"


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """One governed state machine's limits: ``limit`` (the initial value when
    ``parameter`` names the SSM parameter whose puts change it) and the per-key limit."""

    limit: int
    parameter: str | None = None
    per_key_limit: int | None = None
    key_attribute: str | None = None
    """The message attribute of the request's key, when the pool is keyed the whole run: a
    run then counts against its request's key even if its name lacks the key tag."""
    key_limit_parameter: str | None = None
    """The parameter whose puts record the per-key limit's changes (None: it never changes);
    a lowered one is judged after ``CheckSpec.staleness``, as the limit is."""


@dataclass(frozen=True)
class CheckSpec:
    """What the checker needs to know besides the history."""

    pools: Mapping[str, PoolSpec]  # state machine ARN -> its limits
    request_queues: frozenset[str]
    dead_letter_queue: str | None
    quiet_at: float  # when faults stopped
    settle_bound: float  # how long after that every request must be settled
    staleness: float = 0.0  # how long a lowered limit may take to be read, and a start
    # sent before to take effect (its D)
    # How long a lowered limit may take to be read: given, a start is judged from the first
    # attempt that may have started it (sent at most ``staleness - read_lag`` before it
    # took effect), not from its effect (None: from its effect, ``staleness``).
    read_lag: float | None = None
    outside_grace: float = 0.0  # how long before an outside start can be known
    expected_bad: frozenset[str] = frozenset()  # request ids of poison messages
    idle_bound: float | None = None  # late_running seeds: `sim.late_running.check_idle`
    receive_bound: int | None = None  # deep_backlog seeds: `sim.backlog.check_receives`
    # A token whose child runs is heartbeated at least this often, from heartbeat_grace
    # after quiet_at on (None: heartbeat timeouts are not judged).
    heartbeat_every: float | None = None
    heartbeat_grace: float = 0.0
    # Across a process restart a held token's heartbeats may pause this long (kill -9:
    # heartbeat_restart_gap; SIGTERM only: heartbeat_deploy_gap); None: gaps not judged.
    heartbeat_restart_gap: float | None = None
    heartbeat_deploy_gap: float | None = None
    late_start: float = 0.0  # a StartExecution may take effect this long after it was given up
    answer_slack: float = 30.0  # an answer may trail a redrive of its child this long
    wall_epoch: float = 0.0  # wall clock at virtual time 0: lease items' expiries (`sim.fence`)


def check(history: History, spec: CheckSpec) -> list[Violation]:
    """Every violation in the history, in time order."""
    found: list[Violation] = []
    owners = _Owners(history)
    for arn, pool in spec.pools.items():
        found += _check_limits(history, arn, pool, spec, _keys_of(owners, pool.key_attribute))
    released = token_rules.released(history)
    found += _check_one_execution(owners, history)
    found += _check_settled(history, owners, spec, released)
    found += _check_deletes(history, owners, spec, released)
    dead_lettered = _dead_letter_copies(history, spec)
    for move in history.moves:
        dead_lettered.setdefault(move.message_id, move.time)
    excused = _moves_out_of_reach(history)
    out_of_reach = {m.message_id: m.time for m in history.moves if m.message_id in excused}
    found += token_rules.check_tokens(history, spec, owners.executions, dead_lettered, out_of_reach)
    found += copy_rules.check_dead_letters(
        history, spec, owners.executions, owners.request_of, owners.fresh
    )
    found += copy_rules.check_held_copies(history, spec, owners.executions, owners.request_of)
    found += copy_rules.check_renewed_first(history, spec)
    found += late_running.check_idle(history, spec, owners.executions)
    found += backlog.check_receives(history, spec, owners.executions, owners.request_of)
    found += deadlines.check_deadlines(history, spec)
    found += fence.check_fence(history, spec.wall_epoch)
    found += _check_reasons(history, spec)
    found.sort(key=lambda v: (v.time, v.kind))
    return found


def max_concurrency(history: History, arn: str) -> int:
    """The most runs of ``arn`` running at once (every run counted from its start)."""
    points: list[tuple[float, int]] = []
    for _, run in history.runs_of(arn):
        points.append((run.start, 1))
        if run.stop is not None:
            points.append((run.stop, -1))
    points.sort()  # at equal times an end (-1) comes before a start
    running = peak = 0
    for _, delta in points:
        running += delta
        peak = max(peak, running)
    return peak


def start_sends(history: History) -> dict[str, list[float]]:
    """Execution name -> when each StartExecution attempt for it was sent, in order."""
    sends: dict[str, list[float]] = defaultdict(list)
    for record in history.records:
        if record.kind == "start_sent":
            sends[str(record.details.get("name"))].append(record.time)
    return sends


def window(sends: Mapping[str, list[float]], name: str, at: float, spec: CheckSpec) -> float:
    """How far back from ``at`` (a start of ``name`` took effect) a higher limit may still
    have been in force for its sender: the read lag before the first attempt that may have
    started it, else ``spec.staleness``. (From the effect alone, a start sent 0.1 s before
    a lowered limit was read and held on the wire for its D was judged against the new
    limit; widening the window by D for every start hid a retry sent long after.)"""
    if spec.read_lag is None:
        return spec.staleness
    times = sends.get(name, [])
    first = bisect.bisect_left(times, at - (spec.staleness - spec.read_lag))
    if first >= len(times) or times[first] > at:
        return spec.staleness
    return min(spec.staleness, at - times[first] + spec.read_lag)


def limit_at(timeline: list[tuple[float, int]], t: float, staleness: float) -> int:
    """The highest limit in force at any moment of ``[t - staleness, t]``."""
    since = t - staleness
    allowed = timeline[0][1]
    for at, value in timeline:
        if at <= since:
            allowed = value  # in force at the start of the window
    return max(
        [allowed] + [value for at, value in timeline if since < at <= t],
    )


# -- rule 1 ----------------------------------------------------------------------------------


def _keys_of(owners: _Owners, attribute: str | None) -> dict[str, str]:
    """Execution ARN -> the key (``attribute``) of the request it serves, where known."""
    if attribute is None:
        return {}
    keys: dict[str, str] = {}
    for request_id, executions in owners.executions.items():
        values = {m.attributes.get(attribute) for m in owners.messages[request_id]} - {None}
        if len(values) == 1:
            for execution in executions:
                keys[execution.arn] = f"key {next(iter(values))}"
    return keys


def _check_limits(
    history: History,
    arn: str,
    pool: PoolSpec,
    spec: CheckSpec,
    keys: Mapping[str, str] | None = None,
) -> list[Violation]:
    timeline, key_timeline = _timelines(history, pool)
    # Sweep: at equal times ends first, then outside runs coming into view, then starts
    # (a run that ends as it starts ends after its start).
    points: list[tuple[float, int, int, Execution, Run]] = []
    told = told_exists(history)
    for execution, run in history.runs_of(arn):
        outside = run.started_by == OUTSIDE
        counted_from = run.start
        if outside and (execution.arn, run.seq) not in told:
            counted_from += spec.outside_grace
        if run.stop is not None and counted_from > run.stop:
            continue  # ended before anyone could know of it
        points.append((counted_from, 1 if outside else 2, run.seq, execution, run))
        if run.stop is not None:
            points.append((run.stop, 0 if run.stop > counted_from else 3, run.seq, execution, run))
    points.sort(key=lambda p: (p[0], p[1], p[2]))
    sends = start_sends(history)
    running = 0
    per_key: dict[str, int] = defaultdict(int)
    found: list[Violation] = []
    for at, kind, _, execution, _ in points:
        tag = (keys or {}).get(execution.arn) or execution.key_tag
        delta = -1 if kind in (0, 3) else 1
        running += delta
        if tag is not None:
            per_key[tag] += delta
        if kind != 2:
            continue
        stale = window(sends, execution.name, at, spec)
        allowed = limit_at(timeline, at, stale)
        if running > allowed:
            found.append(
                Violation(
                    "limit",
                    at,
                    f"{arn}: {running} running when {execution.name} started (limit {allowed})",
                )
            )
        key_limit = pool.per_key_limit
        if key_limit is not None:
            key_limit = limit_at(key_timeline, at, stale)
        if tag is not None and key_limit is not None and per_key[tag] > key_limit:
            found.append(
                Violation(
                    "key_limit",
                    at,
                    f"{arn}: {per_key[tag]} running with key tag {tag} when "
                    f"{execution.name} started (per-key limit {key_limit})",
                )
            )
    return found


def _timelines(
    history: History, pool: PoolSpec
) -> tuple[list[tuple[float, int]], list[tuple[float, int]]]:
    """The pool's limit and per-key limit as they changed: (time, value) from the first."""
    timeline = [(-math.inf, pool.limit)]
    if pool.parameter is not None:
        timeline = history.limit_timeline(pool.parameter, pool.limit)
    key_timeline = [(-math.inf, pool.per_key_limit or 0)]
    if pool.key_limit_parameter is not None and pool.per_key_limit is not None:
        key_timeline = history.limit_timeline(pool.key_limit_parameter, pool.per_key_limit)
    return timeline, key_timeline


def told_exists(history: History) -> set[tuple[str, int]]:
    """(execution ARN, run seq) of the redriven runs a dispatcher counts from their start.

    ``ExecutionAlreadyExists`` answered to a process's StartExecution says the execution
    exists; until a describe tells it its status, it stays counted (DESIGN: "never freed
    on a guess"). So a redrive that starts after that answer is counted from its start -
    when the process cannot have known the execution had ended: it started after the run
    before the redrive ended (its start-up listing did not show it), no terminal event of
    that run was ever delivered, and no describe of it worked for the process between
    that run's end and the redrive. A name not unique among the machines is left out."""
    started, exists, described = _exists_answers(history)
    by_name: dict[str, list[Execution]] = defaultdict(list)
    for execution in history.executions.values():
        by_name[execution.name].append(execution)
    heard = {
        (e.execution_arn, e.redrive_count)
        for e in history.events
        if e.status != "RUNNING" and e.deliveries
    }
    told: set[tuple[str, int]] = set()
    for at, node, name in exists:
        if len(by_name[name]) != 1:
            continue
        execution = by_name[name][0]
        for index, run in enumerate(execution.runs[1:], start=1):
            before = execution.runs[index - 1]
            if run.start < at or before.stop is None or before.stop > at:
                continue
            if started.get(node, -math.inf) < before.stop:
                continue  # it may have seen the run before its end (a listing, its event)
            if (execution.arn, index - 1) in heard:
                continue
            if any(before.stop <= t <= run.start for t in described[node, name]):
                continue  # a describe told it the run had ended
            told.add((execution.arn, run.seq))
    return told


def _exists_answers(
    history: History,
) -> tuple[dict[str, float], list[tuple[float, str, str]], dict[tuple[str, str], list[float]]]:
    """When each process started; the ``ExecutionAlreadyExists`` answers (time, process,
    name); the describes that worked, by (process, name)."""
    started: dict[str, float] = {}
    exists: list[tuple[float, str, str]] = []
    described: dict[tuple[str, str], list[float]] = defaultdict(list)
    for record in history.records:
        if record.kind == "note" and record.text == "process started":
            started.setdefault(record.node, record.time)
        if record.kind != "call":
            continue
        outcome = str(record.details.get("outcome", ""))
        operation, _, rest = record.text.partition(" name=")
        name = rest.split(" ", 1)[0]
        if operation == "StartExecution" and outcome == "ERROR ExecutionAlreadyExists":
            exists.append((record.time, record.node, name))
        elif operation == "DescribeExecution" and outcome == "APPLIED":
            described[record.node, name].append(record.time)
    return started, exists, described


# -- which execution serves which request ---------------------------------------------------


def _canonical(text: str) -> str | None:
    try:
        return json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    except (ValueError, RecursionError):
        return None


def _base_name(name: str) -> str:
    return name[len("k0123456789_") :] if key_tag_of(name) is not None else name


class _Owners:
    """The requests, grouped by request id, and the executions that belong to each."""

    def __init__(self, history: History) -> None:
        self.messages: dict[str, list[RequestMessage]] = defaultdict(list)
        self.request_of: dict[str, str] = {}  # message id -> request id
        for message in history.requests:
            self.messages[message.request_id].append(message)
            self.request_of[message.message_id] = message.request_id
        # Copies (dead-letter, redrive, move task) name the same request (sim.copy_rules).
        copied: dict[str, list[RequestMessage]] = defaultdict(list)
        found_copies = copy_rules.copies(history)
        self.fresh = copy_rules.fresh_identities(found_copies)  # new requests, by design
        for copy in found_copies:
            copied[copy.request_id].append(copy)
            self.request_of.setdefault(copy.message_id, copy.request_id)
        self.copies: dict[str, list[RequestMessage]] = copied
        by_name: dict[str, list[Execution]] = defaultdict(list)
        by_input: dict[str, list[Execution]] = defaultdict(list)
        for execution in history.executions.values():
            by_name[_base_name(execution.name)].append(execution)
            for work in copy_rules.work_inputs(execution.input):
                by_input[work].append(execution)
        bodies: dict[str, set[str]] = defaultdict(set)
        for message in history.requests:
            canonical = _canonical(message.body)
            if canonical is not None:
                bodies[canonical].add(message.request_id)
        self.executions: dict[str, list[Execution]] = {}
        for request_id, messages in self.messages.items():
            found: dict[str, Execution] = {}
            for message in messages + copied.get(request_id, []):
                name = message.attributes.get(IDEMPOTENCY_ATTRIBUTE) or message.message_id
                for execution in by_name.get(name, []):
                    found[execution.arn] = execution
                canonical = _canonical(message.body)
                if canonical is not None and bodies[canonical] == {request_id}:
                    for execution in by_input.get(canonical, []):
                        found[execution.arn] = execution
            self.executions[request_id] = sorted(found.values(), key=lambda e: e.first_start)


# -- rule 2 ----------------------------------------------------------------------------------


REIGN_SKEW = 5.0
"""dispatcher.daemon.starter.FIRST_RECEIVE_SKEW: a message sent before a reign began + this is
looked for under its former names (when it carries an idempotency key)."""


def _reigns(history: History) -> dict[str, list[float]]:
    """When each dispatcher process began to govern (may have begun): its start, and each
    time it took a lease (its reign begins just after)."""
    out: dict[str, list[float]] = defaultdict(list)
    for record in history.records:
        if record.kind == "note" and record.text == "process started":
            out[record.node].append(record.time)
    for write in history.lease_writes:
        if write.what == "taken":
            out[write.node].append(write.time)
    return {node: sorted(times) for node, times in out.items()}


def _renamed_retry(
    reigns: Mapping[str, list[float]],
    messages: list[RequestMessage],
    earlier: Execution,
    later: Execution,
) -> bool:
    """The documented residual of looking for a request under its former names (docs/requests.md,
    "Request identity"): ``later`` is the request started again under the name a changed
    ``key_attribute`` gives it, from a producer's retry sent after the process that started
    it began to govern (+ the skew), while ``earlier`` (the other naming) had ended before
    that reign began: no listing shows it, no message of the reign is older than it, and
    the dispatcher describes former names only for those. Anything else stays a duplicate."""
    if later.started_by == OUTSIDE or key_tag_of(earlier.name) == key_tag_of(later.name):
        return False
    if _base_name(earlier.name) != _base_name(later.name):
        return False
    began = [t for t in reigns.get(later.started_by, []) if t <= later.first_start]
    if not began or not earlier.runs:
        return False
    reign = began[-1]
    if any(r.stop is None or r.stop > reign for r in earlier.runs):
        return False
    # ``messages``: the producer's (or a parent's) sends of the request, never copies.
    return any(reign + REIGN_SKEW < m.sent_at <= later.first_start for m in messages)


def _check_one_execution(owners: _Owners, history: History) -> list[Violation]:
    found: list[Violation] = []
    reigns = _reigns(history)
    for request_id, all_executions in owners.executions.items():
        # A fresh copy (sim.copy_rules) is a request of its own: judged under its identity.
        lineages: dict[str, list[Execution]] = defaultdict(list)
        for execution in all_executions:
            identity = copy_rules.identity_of(execution.name)
            lineages[identity if identity in owners.fresh else ""].append(execution)
        for lineage in lineages.values():
            executions: list[Execution] = []
            for execution in lineage:
                messages = owners.messages.get(request_id, [])
                if executions and all(
                    _renamed_retry(reigns, messages, e, execution) for e in executions
                ):
                    continue
                executions.append(execution)
            if len(executions) > 1:
                found.append(
                    Violation(
                        "duplicate_execution",
                        executions[1].first_start,
                        f"request {request_id} has {len(executions)} executions: "
                        + ", ".join(e.name for e in executions),
                    )
                )
    return found


# -- rule 3 ----------------------------------------------------------------------------------


def _check_settled(
    history: History, owners: _Owners, spec: CheckSpec, released: Mapping[str, float]
) -> list[Violation]:
    copies = _dead_letter_copies(history, spec)
    moved: dict[str, float] = {}
    excused = _moves_out_of_reach(history)
    for move in history.moves:
        if move.source_url in spec.request_queues:
            moved.setdefault(move.message_id, move.time)
    found: list[Violation] = []
    for request_id, messages in owners.messages.items():
        executions = owners.executions[request_id]
        deadline = max(spec.quiet_at, *(m.sent_at for m in messages)) + spec.settle_bound
        ids = [m.message_id for m in messages]
        # Its copies on request queues that name it (a renewal, a redrive): as much the
        # request as the producer's message (a fresh copy is a request of its own).
        ids += [
            c.message_id
            for c in owners.copies.get(request_id, [])
            if c.queue_url in spec.request_queues and c.message_id not in owners.fresh
        ]
        dead_lettered = [copies[i] for i in ids if i in copies]
        moves = [(moved[i], i) for i in ids if i in moved]
        bad = request_id in spec.expected_bad
        if bad:
            if executions:
                found.append(
                    Violation(
                        "bad_request_started",
                        executions[0].first_start,
                        f"request {request_id} is bad but execution {executions[0].name} "
                        "was started for it",
                    )
                )
            settled = any(t <= deadline for t in dead_lettered) or any(
                t <= deadline for t, _ in moves
            )
        else:
            for t, message_id in moves:
                if message_id in excused:
                    continue
                found.append(
                    Violation(
                        "redrive_move",
                        t,
                        f"message {message_id} of request {request_id} was moved to the "
                        "dead-letter queue by the redrive policy, without a reason",
                    )
                )
            settled = (
                any(e.first_start <= deadline for e in executions)
                or any(t <= deadline for t in dead_lettered)
                or any(t <= deadline and i in excused for t, i in moves)
            )
        if released.get(request_id, math.inf) <= deadline:
            settled = True  # its parent ended: nobody waits for it (see the token rules)
        if not settled:
            found.append(
                Violation(
                    "lost_request",
                    deadline,
                    f"request {request_id} (messages {', '.join(ids)}) has "
                    + ("no dead-letter copy" if bad else "no execution and no dead-letter copy")
                    + f" by {deadline:.3f}",
                )
            )
    return found


def _moves_out_of_reach(history: History) -> set[str]:
    """Ids of messages the redrive policy moved after a receive that no dispatcher could
    act on: its answer was lost (SQS counted a receive nobody saw), or the node that
    received it was killed (afterwards, or before its long poll was answered), or told to
    stop - afterwards, or before, a long poll in flight when it was (it held the message
    until it was too late, or its last act, a dead-letter copy, was cut short; a request
    kept on its last receive that shutdown could not settle is let go, hidden)."""
    lost = {a.call_id for a in history.lost_answers if a.operation == "ReceiveMessage"}
    crashed: dict[str, float] = {}
    for crash in history.crashes:
        crashed.setdefault(crash.node, crash.time)
    stopped = {r.node for r in history.records if r.kind == "note" and r.text == "SIGTERM"}
    moved = {(m.source_url, m.message_id) for m in history.moves}
    out: set[str] = set()
    for receive in history.receives:
        unseen = (
            receive.call_id in lost
            # killed after it arrived, or before (a long poll on the wire when its caller
            # died is still answered, counting a receive nobody sees)
            or receive.node in crashed
            or receive.node in stopped
        )
        if not unseen:
            continue
        out.update(mid for mid, _ in receive.messages if (receive.queue_url, mid) in moved)
    return out


def _dead_letter_copies(history: History, spec: CheckSpec) -> dict[str, float]:
    """Original message id -> when its first dead-letter copy with a reason was sent."""
    copies: dict[str, float] = {}
    for sent in history.dead_letter_copies(spec.dead_letter_queue):
        original = sent.attributes.get(ORIGINAL_ID_ATTRIBUTE)
        if original is not None and sent.attributes.get(REASON_ATTRIBUTE):
            copies.setdefault(original, sent.time)
    return copies


def _check_reasons(history: History, spec: CheckSpec) -> list[Violation]:
    """``unwarranted_dead_letter``: a dead letter's reason is one of the dispatcher's own
    verdicts on a request, or an AWS error code about requests that the simulated AWS
    answered to a StartExecution before the copy was sent. Anything else (an exception's
    name: a defect of the dispatcher, or an error AWS never gave) blames a request for
    what is not its fault."""
    refused: dict[str, float] = {}
    for record in history.records:
        if record.kind != "call" or not record.text.startswith("StartExecution "):
            continue
        outcome = str(record.details.get("outcome", ""))
        for code in REQUEST_CODES:
            if code in outcome.split():
                refused.setdefault(code, record.time)
    found: list[Violation] = []
    for sent in history.dead_letter_copies(spec.dead_letter_queue):
        reason = sent.attributes.get(REASON_ATTRIBUTE, "")
        if reason in DEAD_LETTER_REASONS and reason not in REQUEST_CODES:
            continue
        if refused.get(reason, math.inf) <= sent.time:
            continue
        found.append(
            Violation(
                "unwarranted_dead_letter",
                sent.time,
                f"message {sent.message_id} dead-lettered with reason {reason!r}, which is "
                "neither a verdict on the request nor an error AWS gave to a start",
            )
        )
    return found


# -- rule 4 ----------------------------------------------------------------------------------


def _check_deletes(
    history: History, owners: _Owners, spec: CheckSpec, released: Mapping[str, float]
) -> list[Violation]:
    copies = _dead_letter_copies(history, spec)
    renewed = copy_rules.renewals(history, spec.request_queues)
    let_go = token_rules.released_messages(history)
    gone = token_rules.all_parents_ended(history)
    received = token_rules.first_receives(history)
    found: list[Violation] = []
    for delete in history.effective_deletes():
        if delete.queue_url not in spec.request_queues:
            continue
        request_id = owners.request_of.get(delete.message_id)
        if request_id is None or released.get(request_id, math.inf) <= delete.time:
            continue
        if let_go.get(delete.message_id, math.inf) <= delete.time:
            continue  # its token's parent ended (another parent may wait on the request)
        if gone.get(request_id, math.inf) <= received.get(delete.message_id, -math.inf):
            continue  # received after every parent ended (a redriven copy): dropped
        started = [e for e in owners.executions[request_id] if e.first_start <= delete.time]
        copied = min(
            copies.get(delete.message_id, math.inf), renewed.get(delete.message_id, math.inf)
        )
        if started or copied <= delete.time:
            continue
        found.append(
            Violation(
                "early_delete",
                delete.time,
                f"{delete.node} deleted message {delete.message_id} of request {request_id} "
                "before its execution existed or its dead-letter copy was sent",
            )
        )
    return found


def summary(violations: Iterable[Violation]) -> str:
    """One line per violation (empty string: none)."""
    return "\n".join(str(v) for v in violations)
