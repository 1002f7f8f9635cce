"""Mutations: each takes one safety rule out of the dispatcher; the simulation must notice.

`sim.bugs` puts back bugs that were fixed; a mutation is the same mechanism turned on the
rules themselves. Each is one small edit of one production function or method - a piece
of its source replaced - compiled for the length of a run (`sim.bugs.put_back` applies
it, by name, like a bug). The kill matrix (`python -m sim --mutate`, `make mutate`) runs
each mutation over the seeds until one catches it: a mutation no seed catches is a rule
the simulation cannot see broken.

An edit names the text it replaces; `Edit.compile` refuses an edit whose text is not found
exactly once in the function's source, so a catalogue that no longer matches the code
fails loudly instead of testing nothing.
"""

from __future__ import annotations
import __future__

import ast
import inspect
import re
import textwrap
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dispatcher.aws.api
import dispatcher.cli.redrive
import dispatcher.core.requests
import dispatcher.daemon.starter
from dispatcher.core.ledger import Ledger
from dispatcher.core.shared_limits import SharedLimits
from dispatcher.daemon.callbacks import Callbacks
from dispatcher.daemon.events import Events
from dispatcher.daemon.expiry import Expiries
from dispatcher.daemon.intake import Intake
from dispatcher.daemon.lastreceive import LastReceives
from dispatcher.daemon.lease import Leases
from dispatcher.daemon.pool import Pool
from dispatcher.daemon.reconcile import Reconciler
from dispatcher.daemon.service import Dispatcher
from dispatcher.daemon.starter import Starter
from sim.bugs import Bug

SEEDS = 200
"""Seeds each mutation is tried on (the subset `make test` runs): caught within, or a gap."""


class MutationError(Exception):
    """An edit that does not apply: its text is not found exactly once."""


@dataclass(frozen=True)
class Edit:
    """Replace ``old`` by ``new`` in the source of ``owner.attribute`` (a function, a
    method or a property's getter). ``source`` is where the function is defined when
    ``owner`` only imported it (the edited copy is installed on ``owner``)."""

    owner: Any
    attribute: str
    old: str
    new: str
    source: Any = None

    @property
    def target(self) -> str:
        """``module.Class.attribute`` of the function edited."""
        origin = self.source if self.source is not None else self.owner
        return f"{getattr(origin, '__module__', None) or origin.__name__}.{_qualname(self)}"

    def original(self) -> Any:
        """The attribute as it is in production (a function, or a property)."""
        origin = self.source if self.source is not None else self.owner
        return inspect.getattr_static(origin, self.attribute)

    def _match(self, source: str, old: str = "") -> tuple[re.Pattern[str], re.Match[str]]:
        old = old or self.old
        lines = old.split("\n")
        pattern = re.compile(
            r"(?:^(?P<indent>[ \t]*))?"
            + re.escape(lines[0])
            + "".join(r"\n(?P=indent)" + re.escape(line) for line in lines[1:]),
            re.MULTILINE,
        )
        found = list(pattern.finditer(source))
        if len(found) != 1:
            raise MutationError(
                f"{self.target}: the text to replace is found {len(found)} times, not once: {old!r}"
            )
        return pattern, found[0]

    def apply(self, source: str) -> str:
        """``source`` with ``old`` replaced by ``new``. Lines after the first of either are
        written relative to the first's indentation (which `old` must start a line with)."""
        pattern, _ = self._match(source)

        def edited(match: re.Match[str]) -> str:
            indent = match.groupdict().get("indent") or ""
            return indent + self.new.replace("\n", "\n" + indent)

        return pattern.sub(edited, source)

    def probe(self, source: str, name: str, at: str = "") -> str:
        """``source`` unchanged but for a statement that records ``name`` in `REACHED` when
        it runs: before the last line of ``at``, or else before the line ``old`` begins on
        (either must start a statement) - where the mutated code first differs."""
        _, match = self._match(source, at)
        begins = source.rfind("\n", 0, match.end() if at else match.start()) + 1
        indent = source[begins : len(source) - len(source[begins:].lstrip(" \t"))]
        record = f"__import__('sys').modules['sim.killmatrix'].REACHED.add({name!r})\n"
        return source[:begins] + indent + record + source[begins:]

    def compile(self, edit: Callable[[str], str] | None = None) -> Any:
        """The edited function (a property again if the original is one); ``edit``: what
        to do to its source instead of `apply`."""
        original = self.original()
        function = function_of(original)
        source = textwrap.dedent(inspect.getsource(function))
        tree = ast.parse((edit or self.apply)(source))
        ast.increment_lineno(tree, function.__code__.co_firstlineno - 1)
        code = compile(
            tree,
            inspect.getsourcefile(function) or "<mutation>",
            "exec",
            flags=__future__.annotations.compiler_flag,
            dont_inherit=True,
        )
        scope: dict[str, Any] = {}
        exec(code, function.__globals__, scope)  # noqa: S102 - our own source, edited
        edited = scope[function.__name__]
        edited.__qualname__ = function.__qualname__
        if function.__closure__:
            raise MutationError(f"{self.target}: a closure cannot be recompiled")
        if isinstance(original, property):
            return property(edited, original.fset, original.fdel, original.__doc__)
        return edited


def function_of(attribute: Any) -> types.FunctionType:
    """The function behind a class attribute or module function (a property's getter)."""
    function = attribute.fget if isinstance(attribute, property) else attribute
    if not isinstance(function, types.FunctionType):
        raise MutationError(f"{attribute!r} is not a function")
    return function


def _qualname(edit: Edit) -> str:
    origin = edit.source if edit.source is not None else edit.owner
    if inspect.ismodule(origin):
        return edit.attribute
    return f"{origin.__qualname__}.{edit.attribute}"


@dataclass(frozen=True)
class Mutation:
    """One safety rule taken out: ``rule`` says which, ``kind`` its class."""

    name: str
    kind: str
    rule: str
    edit: Edit
    settings: tuple[tuple[str, Any], ...] = ()
    also: tuple[Edit, ...] = ()
    """A rule kept in two places (each guards the other): taken out of both."""
    reach: str = ""
    """Where the mutated code first behaves differently (default: the edited text): a
    seed whose unmutated run never gets there runs the same mutated, and is skipped."""

    @property
    def edits(self) -> tuple[Edit, ...]:
        """Every edit the mutation makes."""
        return (self.edit, *self.also)

    @property
    def target(self) -> str:
        """The functions edited."""
        return ", ".join(e.target for e in self.edits)

    def patches(self) -> tuple[tuple[Any, str, Any], ...]:
        """``(owner, attribute, edited)`` for each function edited (its edits together)."""
        groups: dict[tuple[int, str], list[Edit]] = {}
        for edit in self.edits:
            groups.setdefault((id(edit.owner), edit.attribute), []).append(edit)
        patches = []
        for group in groups.values():

            def edited(source: str, group: list[Edit] = group) -> str:
                for edit in group:
                    source = edit.apply(source)
                return source

            patches.append((group[0].owner, group[0].attribute, group[0].compile(edited)))
        return tuple(patches)

    def as_bug(self) -> Bug:
        """The mutation in `sim.bugs`' form: what `put_back` applies for a run."""
        return Bug(
            issue=f"mutation ({self.kind}): {self.rule}",
            patches=self.patches(),
            settings=self.settings,
        )


def _m(  # noqa: PLR0917 - a catalogue row: its fields in order
    name: str, kind: str, rule: str, owner: Any, attribute: str, old: str, new: str, **extra: Any
) -> Mutation:
    source = extra.pop("source", None)
    return Mutation(name, kind, rule, Edit(owner, attribute, old, new, source), **extra)


CATALOGUE: tuple[Mutation, ...] = (
    # -- outcome classification ------------------------------------------------------------
    _m(
        "timeout-means-not-started",
        "outcome classification",
        "a timeout or reset after the request left may have started the execution",
        dispatcher.daemon.starter,
        "outcome_unknown",
        "return not isinstance(exc, EndpointConnectionError | ConnectTimeoutError)",
        "return False",
        source=dispatcher.aws.api,
    ),
    _m(
        "5xx-means-not-started",
        "outcome classification",
        "a 5xx answer may come after the start took effect",
        dispatcher.daemon.starter,
        "outcome_unknown",
        "if status >= 500 or status == 0:",
        "if status >= 500:\n    return False\nif status == 0:",
        source=dispatcher.aws.api,
    ),
    _m(
        "refusal-erases-earlier-doubt",
        "outcome classification",
        "a refused retry does not undo an earlier attempt whose outcome is unknown",
        Starter,
        "_call_start",
        "handling.doubt = unknown_before  # refused",
        "handling.doubt = False  # refused",
    ),
    # -- retry admission ---------------------------------------------------------------------
    _m(
        "retry-admitted-over-limit",
        "retry admission",
        "a retry of a start sent goes only while every start sent fits under the limit",
        Ledger,
        "admitted",
        "if held + len(self._sent) > self._limit:",
        "if False:",
        reach="if held + len(self._sent) > self._limit:\n    return False",
    ),
    _m(
        "new-start-ignores-starts-sent",
        "retry admission",
        "a new start counts the starts already on the wire",
        Ledger,
        "admitted",
        "self._limit - held - len(self._sent)",
        "self._limit - held",
    ),
    # Mostly reached when a keyed start's own RUNNING event comes before its answer (the
    # run is counted under its key and as a start sent): the retry it admits repeats the
    # same name, which starts nothing. Broken when lost requests of a key's starts are
    # retried after its per-key limit was lowered: buggify's key_limit_drops.
    _m(
        "key-retry-admitted-over-key-limit",
        "retry admission",
        "a retry goes only while the key's starts sent fit under its per-key limit",
        Ledger,
        "_key_admits",
        "return held + len(keyed_sent) <= self._per_key_limit",
        "return True",
    ),
    # The rule has three layers, and the mutation takes all three out: each alone is an
    # equivalent mutant, since the other two stop the send. (1) `_admission` admits a
    # start only while the lease is valid (its loop body abandons one that waits); (2)
    # `StartGate.before_send` (``lease.valid``, just before the request leaves, after a
    # credentials refresh that may be long; the simulated processes check it too,
    # `sim.harness._Gated`) fails an attempt as a connection never made; (3) the reign's
    # end stops intake, which cancels every handler not yet calling
    # (`Starter.cut_short_waiting`), and a retry raises at its next attempt once stopping.
    # Measured: with (1) and (2) out, no start left a process after its lease lapsed in
    # seeds 0..99; with all three out, 12 did (5 seeds). The checker judges the fence
    # from the records (`sim.fence`: each attempt against the lease writes DynamoDB
    # applied), since a start just after the lapse lands long before a successor lists.
    _m(
        "start-without-lease",
        "take-over wait",
        "a start is sent only while this process holds the lease",
        Starter,
        "_admission",
        "while not (pool.ledger.admitted(reservation) and self.may_start()):",
        "while not pool.ledger.admitted(reservation):",
        reach="if not self.may_start():\n    raise AbandonedError",
        also=(
            Edit(
                dispatcher.aws.api.StartGate,
                "before_send",
                "if not self.may_send():",
                "if False:",
            ),
            Edit(
                Starter,
                "cut_short_waiting",
                'if handling.phase in ("received", "backoff") or self.force:',
                "if self.force:",
            ),
        ),
    ),
    # -- doubt settlement and its grace -----------------------------------------------------
    _m(
        "give-up-frees-doubt",
        "doubt settlement",
        "a start given up with its outcome unknown keeps its slot, in doubt",
        Starter,
        "_settle_slot",
        "if not handling.doubt:",
        "if True:",
        reach="arn = execution_arn(pool.state_machine_arn, entry.request.name)",
    ),
    # After ExecutionAlreadyExists the execution is closed (same input: freeing is right)
    # or has another input (an idempotency conflict); a running one already held, in doubt
    # or tombstoned makes `Ledger.doubt` drop the reservation either way. It differs only
    # for an execution the ledger does not know that runs again: one that ended unseen
    # before a restart, redriven while the describes fail - buggify's exists_unknown, the
    # checker counting that redrive from its start (`sim.checker.told_exists`). Caught by
    # design in exists_full seeds (`sim.exists`): a victim of the knob's own, little other
    # traffic, the redrive late in the describes (a listing shows it only after the
    # give-up), and a burst waiting for the slot the mutant frees.
    _m(
        "describe-failure-frees-slot",
        "doubt settlement",
        "an execution that exists but could not be described keeps its slot, in doubt",
        Starter,
        "_already_exists",
        "handling.doubt = True",
        "handling.doubt = False",
    ),
    _m(
        "missing-frees-doubt-without-grace",
        "doubt settlement",
        "'does not exist' settles a start in doubt only after the grace since its last attempt",
        Ledger,
        "observe_missing",
        "if now - doubt.since < grace:",
        "if False:",
        reach="if now - doubt.since < grace:\n    return Change.UNCHANGED",
        also=(
            Edit(
                Ledger,
                "apply_listing",
                "suspects += [\n"
                "    arn for arn, doubt in self._doubt.items() if arn not in counts"
                " and doubt.since <= cutoff",
                "suspects += [\n    arn for arn, doubt in self._doubt.items() if arn not in counts",
            ),
        ),
    ),
    # -- listing cutoff ----------------------------------------------------------------------
    _m(
        "listing-frees-without-describe",
        "listing cutoff",
        "a held execution missing from a listing is freed only once a describe confirms it",
        Reconciler,
        "_confirm",
        "described = await self.sfn.describe_execution(executionArn=arn)",
        "described = {'status': 'SUCCEEDED'}",
    ),
    _m(
        "listing-without-grace",
        "listing cutoff",
        "a held execution missing from a listing is freed only past the grace since it was "
        "last confirmed (listings and describes lag)",
        Ledger,
        "apply_listing",
        "cutoff = listed_at - grace",
        "cutoff = listed_at",
        also=(
            Edit(
                Ledger,
                "observe_missing",
                "if held is None or now - held.since < grace:",
                "if held is None:",
            ),
        ),
    ),
    # -- take-over wait ----------------------------------------------------------------------
    _m(
        "takeover-waits-only-d",
        "take-over wait",
        "a new governor lists only D plus the start grace after its predecessor's last start",
        Dispatcher,
        "settle_seconds",
        "own = self.settings.start_timeout + self.settings.start_grace\n"
        "return own if self.lease is None else max(own, self.lease.owed)",
        "return self.settings.start_timeout",
    ),
    _m(
        "takeover-waits-only-grace",
        "take-over wait",
        "a new governor waits D (a start sent lands within D) before it lists",
        Dispatcher,
        "settle_seconds",
        "own = self.settings.start_timeout + self.settings.start_grace\n"
        "return own if self.lease is None else max(own, self.lease.owed)",
        "return self.settings.start_grace",
    ),
    # Caught only with buggify's long_d_takeover (`sim.takeover_wait`): a long-D leader's
    # starts held on the wire to its D as its renewal hangs, a short-D successor.
    _m(
        "takeover-ignores-recorded-wait",
        "take-over wait",
        "a new lease holder waits the longer of its own D + grace and its predecessor's, "
        "as the lease records them",
        Dispatcher,
        "settle_seconds",
        "return own if self.lease is None else max(own, self.lease.owed)",
        "return own",
    ),
    _m(
        "lease-leads-with-some",
        "take-over wait",
        "a process leads only while it holds the lease of every state machine it governs",
        Leases,
        "try_acquire",
        "if not await lease.try_acquire():\n"
        '    await self._give_back(taken, why=f"{lease.config.pool} is held by another")\n'
        "    return False",
        "if not await lease.try_acquire():\n    continue",
        reach="if not await lease.try_acquire():\n"
        '    await self._give_back(taken, why=f"{lease.config.pool} is held by another")',
        # Leading with the leases taken means trusting, renewing and timing out just those
        # (an edit of `valid` alone to "any" spins: `remaining`, the least of all, is < 0).
        also=(
            Edit(
                Leases,
                "try_acquire",
                "return True",
                "if not taken:\n    return False\nself.items = taken\nreturn True",
            ),
        ),
    ),
    # -- tombstones and redrive counts ------------------------------------------------------
    # Caught once (seed 114 on an earlier commit, `redrive_move`: a request kept waiting
    # behind the over-count below, its copies renewed, one moved without a reason), so
    # not equivalent after all - though the limit is safe: without the check a late
    # RUNNING event (or a stale listing) brings a finished run back into the running set,
    # so the ledger over-counts - safe for the limit - until a listing misses it past the
    # grace and a describe frees it again; evidence for a kept request is `holds` instead
    # of `is_tombstoned`. The rule is about throughput (no slot wasted on a finished run),
    # which no checker rule measures. Checked input by input: the revived entry only adds
    # to `held` and its key's count (admission is stricter); `started`, `doubt` and
    # `_former_name_held` test `holds or is_tombstoned` alike; what tests `is_tombstoned`
    # alone (`Callbacks.started`, `heartbeat_once`) answers a parent whose child ended -
    # with the run revived that answer waits for the describe that frees it (reconcile
    # calls `Pool.ended` then), later but the same answer; `Expiries` and `LastReceives`
    # take `holds` as the same evidence. No slot is ever freed early, no request lost.
    # Caught by design in late_running seeds (`sim.late_running`): every RUNNING event
    # comes again after its run ended while a backlog waits, and the checker's
    # ``idle_slot`` holds a pool to its limit while a request waits (a revived run idles
    # its slot past the start grace).
    _m(
        "no-tombstone",
        "tombstones",
        "a terminal event leaves a tombstone, so a late RUNNING cannot revive the run",
        Ledger,
        "observe_running",
        "if redrive_count <= ended_at_redrive:",
        "if False:",
        reach="if redrive_count <= ended_at_redrive:\n    return Change.STALE",
    ),
    _m(
        "late-terminal-frees-redriven-run",
        "redrive counts",
        "a terminal event of a run before a redrive frees nothing of the redriven run",
        Ledger,
        "observe_terminal",
        "if held is not None and redrive_count < held.redrives:",
        "if False:",
        reach="if held is not None and redrive_count < held.redrives:\n    return Change.STALE",
    ),
    # Not caught, and equivalent for what the checker judges: the count passed (0) is never
    # more than the event's, and in `observe_terminal` a smaller count only makes the event
    # STALE more often (`count < held.redrives`: a slot kept, never one freed) and writes a
    # lower tombstone (`max(count, previous)`: a later RUNNING of that run revives it, an
    # over-count, as in no-tombstone). So every terminal event of a redriven run the ledger
    # saw running is ignored: its slot is freed, and its parent (a task token) answered,
    # by the next listing that misses it past the grace and the describe that follows
    # (which carries the right count) - later, never wrongly. Throughput only; the
    # late-terminal rule itself (a run before a redrive freeing nothing) is unchanged, and
    # caught as late-terminal-frees-redriven-run. Caught by design in late_running seeds
    # (`sim.late_running`): runs failed and redriven for seconds while a backlog waits,
    # every event delivered at once, and the checker's ``idle_slot`` holds a pool to its
    # limit while a request waits (the redriven run's ignored end idles its slot past the
    # start grace).
    _m(
        "redrive-count-dropped-from-events",
        "redrive counts",
        "a status event's redrive count is applied with it",
        Events,
        "apply",
        "ledger.observe_terminal(change.execution_arn, change.redrive_count)",
        "ledger.observe_terminal(change.execution_arn, 0)",
    ),
    # -- adoption of outside and redriven runs ----------------------------------------------
    _m(
        "outside-runs-ignored",
        "adoption",
        "a running execution started elsewhere takes a slot",
        Ledger,
        "observe_running",
        "doubted = arn in self._doubt",
        "doubted = arn in self._doubt\nif not doubted:\n    return Change.STALE",
    ),
    _m(
        "redriven-run-not-adopted",
        "adoption",
        "a finished execution redriven since it ended takes a slot again",
        Ledger,
        "observe_running",
        "if redrive_count <= ended_at_redrive:",
        "if True:",
        reach="del self._tombstones[arn]",
    ),
    _m(
        "adopted-runs-not-counted-per-key",
        "adoption",
        "a listed execution counts against its key (the tag in its name)",
        Ledger,
        "observe_running",
        "key = self._settle(arn) if doubted else self._key_of(arn)",
        "key = self._settle(arn) if doubted else None",
    ),
    # -- deferral memory ---------------------------------------------------------------------
    _m(
        "deferral-keys-kept",
        "deferral memory",
        "a key whose deferrals are all back is forgotten",
        Pool,
        "left_line",
        "del self._lines[key]",
        "pass",
    ),
    # Not caught, and equivalent for what the checker judges: `defer_seconds` decides only
    # how long a request the waiting room has no space for stays hidden in its queue.
    # Without the deferrals not back yet, a key's deferrals made together come back
    # together (not in turn), so they are received and deferred again more often: more
    # receives, nothing else - no slot, no name, no start depends on it. A request that
    # reaches the queue's maxReceiveCount is never deferred (it waits in the room past its
    # capacity, `Intake`), and one that must go back then is kept until its execution is
    # known not to exist and dead-lettered with its reason (receive_limit, never run):
    # none of the checker's promises (limit, once, nothing lost, no dead letter that ran)
    # breaks. Only a request whose hold on its last receive lapses (the open defect the
    # testing page lists as "receives used up outside the dispatcher's hold") would be
    # moved without a reason - more often with more last receives, but that is the open
    # defect's catch, not this rule's. Catching it needs a rule on availability or receive
    # counts (a backlog deferred about once per message), which the dispatcher documents
    # as a cost (docs/pools.md), not as a promise. Caught in deep_backlog seeds
    # (`sim.backlog`: a keyed backlog far deeper than the room, no fault), by the
    # checker's ``receives``, a bound on a request's receives before it starts calibrated
    # between the spaced deferrals (at most 8) and the unspaced ones (12 and more).
    _m(
        "deferrals-not-spaced",
        "deferral memory",
        "a deferral is spaced after the key's deferrals not back yet",
        Pool,
        "defer_seconds",
        "ahead = self.room.count(key=key) + before",
        "ahead = self.room.count(key=key)",
    ),
    # -- token answer order and deletion -----------------------------------------------------
    _m(
        "token-message-deleted-at-start",
        "token answer and deletion",
        "a token's request message is kept until its parent was answered",
        Starter,
        "_settled",
        "self.callbacks.hold(",
        "await entry.queue.delete(request.receipt_handle, entry.bound)\nself.callbacks.hold(",
    ),
    _m(
        "token-released-when-answer-failed",
        "token answer and deletion",
        "a token whose answer failed stays held (its message too) and is answered again",
        Callbacks,
        "_send",
        'held.bound.warning("dispatcher.callback_failed", error=str(exc))\nreturn False',
        'held.bound.warning("dispatcher.callback_failed", error=str(exc))\n'
        "await self._release(held)\nreturn False",
    ),
    _m(
        "held-token-forgets-earlier-handles",
        "token answer and deletion",
        "a held token's message received twice keeps every receipt handle: each is extended, "
        "and deleted once the parent was answered",
        Callbacks,
        "hold",
        "held.earlier.append((held.queue, held.receipt_handle))",
        "pass",
    ),
    _m(
        "answer-from-reopened-child",
        "token answer and deletion",
        "a parent is answered only with its child's final result (not a run a redrive reopened)",
        Callbacks,
        "_answer_of",
        'if str(described["status"]) not in CLOSED:',
        "if False:",
    ),
    # The rule has two checks, and the mutation takes both out. (1) A heartbeat marks due
    # only the held children known to have ended (tombstoned: a status event, a listing);
    # (2) `_answer_of` answers only a describe that shows the child closed. (2) alone is
    # `answer-from-reopened-child`. (1) alone is an equivalent mutant under what the
    # simulation assumes of DescribeExecution (it shows the execution's current run):
    # every held child is then described at each heartbeat, and answered only once a
    # describe shows it closed - ended, its answer that run's result, only sooner than the
    # unmutated code sends it (no seed of 0..199 caught it). It would show only with a
    # describe that shows an older, closed run while a redrive has reopened the child.
    _m(
        "answer-before-child-ended",
        "token answer and deletion",
        "a parent is answered only once its child has ended",
        Callbacks,
        "heartbeat_once",
        "if any(h.pool.ledger.is_tombstoned(arn) for h in self._held[arn]):",
        "if True:",
        also=(
            Edit(
                Callbacks,
                "_answer_of",
                'if str(described["status"]) not in CLOSED:',
                "if False:",
            ),
        ),
    ),
    _m(
        "message-deleted-before-start",
        "token answer and deletion",
        "a request's message is deleted only once its execution exists",
        Starter,
        "_start_counted",
        "try:\n    arn, attempts = await self._call_start(entry, reservation, handling)",
        "await entry.queue.delete(request.receipt_handle, bound)\n"
        "try:\n    arn, attempts = await self._call_start(entry, reservation, handling)",
    ),
    # -- orphan checks -----------------------------------------------------------------------
    _m(
        "any-heartbeat-error-orphans",
        "orphan checks",
        "only an answer that says the parent is gone lets its request go",
        Callbacks,
        "_heartbeat",
        'bound.warning("dispatcher.heartbeat_failed", error=str(exc))\nreturn "error"',
        'bound.warning("dispatcher.heartbeat_failed", error=str(exc))\nreturn "parent_gone"',
    ),
    _m(
        "orphan-stopped-while-awaited",
        "orphan checks",
        "a child is orphaned (stopped) only when no other token waits on it",
        Callbacks,
        "_orphaned",
        "if self._waiters(arn, gone):",
        "if False:",
    ),
    # -- dead-lettering while in doubt -------------------------------------------------------
    _m(
        "last-receive-dead-lettered-at-once",
        "dead-lettering while in doubt",
        "a request on its last receive whose execution may exist is kept until a describe "
        "settles it, not dead-lettered",
        Starter,
        "_hand_back",
        "self.last_receives.keep(entry, why, exists=exists, delay=delay, arn=arn)\nreturn",
        "await self.dead_letter(\n"
        '    entry.queue, entry.pool.name, entry.message, "receive_limit", "maxReceiveCount"\n'
        ")\nreturn",
    ),
    _m(
        "last-receive-describe-failure-means-missing",
        "dead-lettering while in doubt",
        "only 'does not exist' (not a failed describe) lets a kept request be dead-lettered",
        LastReceives,
        "_settle",
        'if error_code(exc) == "ExecutionDoesNotExist" and not kept.exists:',
        "if not kept.exists:",
    ),
    # The rule: a kept request is not dead-lettered on "does not exist" while a start of it
    # this process sent may yet take effect (D) or not yet show in a describe (its lag,
    # under the grace). Three checks keep it, covering for one another: the wait `keep`
    # sets (the first describe comes D + grace after the keep, when every start sent
    # before shows), the doubts in `_may_run` (a start of it in doubt here: of another copy
    # too, sent after the keep), and after a lost lease, whose reset took those doubts with
    # it, the wait `reign_over` sets (D + grace after the last start this process sent).
    # Measured over seeds 0..199 (51 reach the line): each alone out, none caught it; all
    # three out, seed 22: a start answered with a 5xx, applied 3 s after the dead letter
    # that said it does not exist (``dead_letter_ran``). The first alone is an equivalent
    # mutant (the doubts cover it in the reign, the second wait after). The other two
    # guard alone only a start of another copy sent after the keep and given up in doubt
    # before a describe (in the reign, after it): no seed makes one. Before `reign_over`
    # the first wait was all that guarded after the reign (seed 784, a hunt's, caught it
    # alone in a settling after a lost lease: ``redrive_move``), and a start of another
    # copy sent after the keep was not guarded there at all. The first wait also gives a copy of
    # the request still in its queue (SQS stored it twice, a producer's retry) time to be
    # received and seen; no rule judges that: a copy received after the wait is not seen
    # either way, and the redrive the dead letter invites finds its execution.
    # (The wait is not the guard ``now >= kept.not_before`` in `_settle`: `settle_once`
    # describes a kept request only from its ``next_try``, never before ``not_before``.)
    _m(
        "last-receive-missing-without-grace",
        "dead-lettering while in doubt",
        "'does not exist' proves a kept request never started only once every start of it this "
        "process sent could show (D + grace after the keep, and after a lost lease; its doubts)",
        LastReceives,
        "keep",
        "wait = self.settings.start_timeout + self.settings.start_grace",
        "wait = 0.0",
        also=(
            Edit(
                LastReceives,
                "_may_run",
                "or ledger.is_tombstoned(kept.arn) or kept.arn in ledger.in_doubt:",
                "or ledger.is_tombstoned(kept.arn):",
            ),
            Edit(
                LastReceives,
                "reign_over",
                "wait = self.settings.start_timeout + self.settings.start_grace",
                "wait = 0.0",
            ),
        ),
    ),
    # Observable only when a describe says "does not exist" while the ledger shows the
    # execution: within its describe lag, i.e. a copy of the request started just before
    # the kept one is described (buggify's twin_keeps, `sim.twins`).
    _m(
        "last-receive-ignores-evidence",
        "dead-lettering while in doubt",
        "a kept request is not dead-lettered while a status event or listing says it runs",
        LastReceives,
        "_may_run",
        "if ledger.holds(kept.arn) or ledger.is_tombstoned(kept.arn) or kept.arn in "
        "ledger.in_doubt:",
        "if False:",
    ),
    # A copy of the request (SQS stored it twice) whose start is under way here when the
    # kept one is described: its attempt may have started the execution, which a lagging
    # describe does not show yet (buggify's twin_keeps, `sim.twins`).
    _m(
        "last-receive-ignores-copies-starting",
        "dead-lettering while in doubt",
        "a kept request is not dead-lettered while another copy of it is being started",
        LastReceives,
        "_may_run",
        "return waits or self.starter.starting(kept.arn)",
        "return waits",
    ),
    # A copy that waits in the room (not being started) when the kept one is described:
    # buggify's twin_waits (`sim.twin_waits`, the limit at 0 from the first copy's give-up);
    # the dead letter, then the start of the waiting copy, breaks the checker's
    # ``dead_letter_held_copy``.
    _m(
        "last-receive-ignores-copies-waiting",
        "dead-lettering while in doubt",
        "a kept request is not dead-lettered while another copy of it waits to be started",
        LastReceives,
        "_may_run",
        "return waits or self.starter.starting(kept.arn)",
        "return self.starter.starting(kept.arn)",
    ),
    # -- name derivation ---------------------------------------------------------------------
    _m(
        "name-from-message-id",
        "name derivation",
        "a request with an idempotency key is named by its key, not by its message id",
        dispatcher.core.requests,
        "request_identity",
        "for attribute in (REQUEST_ID_ATTRIBUTE, IDEMPOTENCY_ATTRIBUTE, ORIGINAL_ID_ATTRIBUTE):",
        "for attribute in (REQUEST_ID_ATTRIBUTE, ORIGINAL_ID_ATTRIBUTE):",
    ),
    _m(
        "copies-named-by-message-id",
        "redrive identity",
        "every copy of a request (dead letter, redrive, move task) keeps its identity",
        dispatcher.core.requests,
        "request_identity",
        "for attribute in (REQUEST_ID_ATTRIBUTE, IDEMPOTENCY_ATTRIBUTE, ORIGINAL_ID_ATTRIBUTE):",
        "for attribute in (IDEMPOTENCY_ATTRIBUTE,):",
    ),
    _m(
        "redrive-drops-identity",
        "redrive identity",
        "a redrive's copy carries the request's identity",
        dispatcher.cli.redrive,
        "request_attributes",
        "if not name.startswith(OUR_PREFIX) or name == REQUEST_ID_ATTRIBUTE",
        "if not name.startswith(OUR_PREFIX)",
        reach="attributes = {",
        also=(
            Edit(
                dispatcher.cli.redrive,
                "request_attributes",
                "attributes[REQUEST_ID_ATTRIBUTE] = {",
                "attributes['dispatcher-dropped'] = {",
            ),
        ),
    ),
    _m(
        "former-names-not-looked-up",
        "name derivation",
        "a request received before a restart is looked for under the names a former "
        "configuration gave it",
        Starter,
        "_may_have_former_name",
        'attributes = message.get("MessageAttributes") or {}',
        "return False",
        also=(
            Edit(
                Starter,
                "_former_name_held",
                "for name in names:",
                "for name in ():",
            ),
        ),
    ),
    _m(
        "name-without-key-tag",
        "name derivation",
        "a keyed request's execution name carries its key tag",
        Intake,
        "admit",
        "request = keyed(request, key)",
        "pass",
    ),
    # -- start-by deadlines ------------------------------------------------------------------
    _m(
        "deadline-not-checked-before-sending",
        "start-by deadlines",
        "no StartExecution attempt is sent after its request's start-by",
        Starter,
        "_call_start",
        'if self.expiries.due(entry):\n    raise ExpiredError\nhandling.phase = "calling"',
        'handling.phase = "calling"',
        also=(
            Edit(
                Starter,
                "_admission",
                "if self.expiries.due(entry):\n    raise ExpiredError",
                "pass",
            ),
        ),
    ),
    _m(
        "expired-while-in-doubt",
        "start-by deadlines",
        "a request whose start may have taken effect is never dead-lettered as expired",
        Expiries,
        "expire",
        "if doubt or may_start():",
        "if False:",
    ),
    # -- named limits shared by pools (sim.named) ----------------------------------------------
    _m(
        "named-limit-ignores-weight",
        "named limits",
        "each execution of a pool counts its weight against a named limit it uses",
        SharedLimits,
        "__init__",
        "self._users[name][pool] = weight",
        "self._users[name][pool] = 1",
    ),
    _m(
        "named-limit-ignores-starts-in-flight",
        "named limits",
        "starts reserved and sent count against a named limit until they are answered",
        SharedLimits,
        "in_use",
        "return sum(w * self._ledger_of(p).held for p, w in self._users[name].items())",
        "return sum(w * self._ledger_of(p).running_count for p, w in self._users[name].items())",
        also=(
            Edit(
                SharedLimits,
                "admits",
                "committed += users[user] * (\n"
                "    ledger.running_count + ledger.doubt_count + ledger.sent_count\n"
                ")",
                "committed += users[user] * (ledger.running_count + ledger.doubt_count)",
            ),
        ),
    ),
)

MUTATIONS: dict[str, Mutation] = {m.name: m for m in CATALOGUE}

NOT_YET_CAUGHT: frozenset[str] = frozenset()
"""Mutations no seed of the 200 catches yet: the simulation's gaps (sim/results/mutations.json
says in how many seeds each one's line is reached at all). `make mutate` fails on them; the
test of `make test` replays the others at their catching seeds, so that a rule the
simulation once caught stays caught. Remove a name once it is caught."""


# A rule that guards against AWS behaving beyond what the dispatcher assumes of it (and the
# simulation models: docs/testing.md, "What the simulation assumes about AWS") cannot be
# caught by the simulation: no seed may break the assumption, so its mutation is an
# equivalent mutant there. Each is kept out of the kill matrix and killed instead by the
# unit test named with it, which steps outside the assumption on fakes (`make test` checks
# that it fails mutated and passes as the code is).
#
# ``last-receive-existing-then-missing``: a describe may not know an execution only while it
# is younger than the start grace. ``kept.exists`` is set only once AWS said the execution
# exists (ExecutionAlreadyExists, then failed describes; a describe that found it closed;
# a former name found), and the first describe comes D + grace after the keep: by then no
# describe says "does not exist" of it, unless the lag outlasts the grace.
OUTSIDE_MODEL: dict[str, tuple[Mutation, str]] = {
    "last-receive-existing-then-missing": (
        _m(
            "last-receive-existing-then-missing",
            "dead-lettering while in doubt",
            "a request AWS said exists is never dead-lettered on a lagging 'does not exist'",
            LastReceives,
            "_settle",
            'if error_code(exc) == "ExecutionDoesNotExist" and not kept.exists:',
            'if error_code(exc) == "ExecutionDoesNotExist":',
        ),
        "tests/test_last_receive.py::"
        "test_a_describe_failed_after_already_exists_is_kept_until_it_answers",
    ),
}
"""Mutation name -> (the mutation, the unit test that kills it): rules the simulation's model
of AWS cannot reach (see the comment above)."""
