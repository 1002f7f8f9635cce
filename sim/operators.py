"""The operator scenarios of `sim.extras`, carried out during a run: redrives by the CLI
(the real `dispatcher.cli.redrive.redrive` against the simulated SQS) and by SQS's move task,
configuration changes across restarts, rolling deploys, and console redrives of children
that just failed.

What the CLI must promise is judged here (the history alone does not say which run sent
what): ``redrive_unbounded``, a run that moved more messages than the dead-letter queue
held when it started (or when its count's first answer arrived, if that is more: the answers
of its count may be lost), or that had not ended `sim.extras.REDRIVE_BOUND` seconds later.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio

from dispatcher.cli.redrive import redrive
from sim.extras import REDRIVE_BOUND, REDRIVE_VISIBILITY, CliRedrive, ExtrasPlan, Reconfigure
from sim.history import key_tag_of
from sim.move_task import move_task
from sim.nemesis import Action
from sim.rolling import run_rolling
from sim.violation import Violation

if TYPE_CHECKING:
    from sim.harness import Run
    from sim.sfn_model import SimExecution


class KilledError(Exception):
    """The redrive process was killed (kill -9): it makes no call any more."""


class _Killable:
    """An SQS client of a redrive process that is killed at its first delete (after the
    send it follows succeeded): that delete and every later call never happen."""

    def __init__(
        self,
        client: Any,
        *,
        kill: bool,
        on_kill: Callable[[], None],
        most: int,
        on_most: Callable[[], None],
        on_count: Callable[[], None] = lambda: None,
    ) -> None:
        self._client = client
        self._kill = kill
        self._on_kill = on_kill
        self._most, self._on_most = most, on_most
        self._on_count = on_count
        self.killed = False
        self.sent = 0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)

        async def call(**kwargs: Any) -> Any:
            if self.killed:
                raise KilledError
            if self._kill and name == "delete_message_batch":
                self.killed = True
                self._on_kill()
                raise KilledError
            if name == "send_message_batch":
                self.sent += len(kwargs.get("Entries", []))
                if self.sent > self._most:
                    self._on_most()  # moving more than was there: it will not end
            answer = await method(**kwargs)
            if name == "get_queue_attributes":
                self._on_count()  # the count it bounds its run by: read now, not at its start
            return answer

        return call


async def run_extras(run: Run, plan: ExtrasPlan) -> None:
    """Carry out the plan; sets ``run.extras_done`` when every action has ended."""
    try:
        async with anyio.create_task_group() as tg:
            for index, cli in enumerate(plan.cli_redrives):
                tg.start_soon(_at, run, cli.at, _cli_redrive, run, cli, index + 1)
            for at in plan.move_tasks:
                tg.start_soon(_at, run, at, _move_task, run)
            for change in plan.reconfigures:
                tg.start_soon(_at, run, change.at, _reconfigure, run, change)
            for at in plan.deploys:
                tg.start_soon(_at, run, at, _deploy, run)
            if plan.rolling is not None:
                tg.start_soon(run_rolling, run, plan.rolling)
            if plan.child_redrives:
                _watch_failed_children(run, tg)
            await anyio.sleep(max(0.0, plan.last_action - run.clock()) + 1.0)
            run.extras_done.set()
            if plan.child_redrives:
                await anyio.sleep_forever()  # children fail until the run ends
    finally:
        run.extras_done.set()


async def _at(run: Run, at: float, action: Callable[..., Any], *args: Any) -> None:
    await anyio.sleep(max(0.0, at - run.clock()))
    run.extras_pending += 1
    try:
        await action(*args)
    finally:
        run.extras_pending -= 1


# -- redrives ----------------------------------------------------------------------------------


def _target(run: Run) -> str:
    """The request queue a redrive sends to (every queue feeds the same pools)."""
    return run.queues[run.plan.pools[0].name][0]


async def _cli_redrive(run: Run, cli: CliRedrive, index: int) -> None:
    world, node = run.world, f"redrive.{index}"
    dlq = world.sqs.queues[run.dlq]

    def held() -> int:
        return sum(1 for m in dlq.messages.values() if not m.deleted and m.sent_at <= run.clock())

    depth = held()
    counted: list[int] = []  # the dead letters there when its first count was answered

    def count_answered() -> None:
        if not counted:
            counted.append(held())

    reasons = set(cli.reasons) if cli.reasons is not None else None
    began = run.clock()
    world.history.note(
        began,
        node,
        f"sfn-dispatcher redrive --reason {','.join(sorted(reasons)) if reasons else '(all)'}"
        f" started ({depth} dead letters)"
        + (" - to be killed after its send" if cli.killed else ""),
    )
    with anyio.move_on_after(REDRIVE_BOUND) as bound:
        sqs = _Killable(
            world.client("sqs", node, max_attempts=3),
            kill=cli.killed,
            on_kill=lambda: world.history.note(run.clock(), node, "KILLED between send and delete"),
            most=2 * depth + 10,  # well past what was there: stopped, judged below
            on_most=bound.cancel,
            on_count=count_answered,
        )
        report = None
        try:
            report = await redrive(
                sqs,  # type: ignore[arg-type]
                run.dlq,
                _target(run),
                reasons=reasons,
                visibility=REDRIVE_VISIBILITY,
                wait_seconds=1,
            )
        except KilledError:
            return
    moved = sum(report.moved.values()) if report is not None else sqs.sent
    world.history.note(run.clock(), node, f"redrive ended: {moved} moved")
    # A run moves what was there when it started - or, if its count's answers were lost,
    # when one arrived (it cannot know the count earlier): one bound, whichever is larger.
    depth = max([depth, *counted])
    if bound.cancelled_caught or moved > depth:
        why = (
            f"stopped after {run.clock() - began:.0f} s, not done"
            if bound.cancelled_caught
            else "it ended"
        )
        run.extra_violations.append(
            Violation(
                "redrive_unbounded",
                run.clock(),
                f"{node} started at {began:.3f} with {depth} dead letters; {why} having "
                f"moved {moved}: a redrive moves what was there when it started, then ends",
            )
        )


async def _move_task(run: Run) -> None:
    await move_task(run.world, run.dlq, _target(run))


# -- restarts ----------------------------------------------------------------------------------


async def _restart_all(run: Run, crash: bool, why: str) -> None:
    """Restart every process, one after another (a rolling deploy)."""
    for node in run.nodes:
        run.world.history.note(run.clock(), "operator", f"{why}: restarting {node}")
        run.kill(Action(run.clock(), "crash" if crash else "sigterm", node))
        await anyio.sleep(30.0)


async def _reconfigure(run: Run, change: Reconfigure) -> None:
    what = run.reconfigure(change.what, change.pool)
    await _restart_all(run, change.crash, f"config changed ({what})")


async def _deploy(run: Run) -> None:
    await _restart_all(run, False, "deploy")


# -- children redriven as they fail ------------------------------------------------------------


def _watch_failed_children(run: Run, tg: anyio.abc.TaskGroup) -> None:
    """Redrive a failed child of a parent from the console, 0 to 1.5 s after it failed."""
    sfn = run.world.sfn
    told = sfn.on_end
    rng = random.Random(f"child-redrives-{run.seed}")
    governed = {run.arns[p.name] for p in run.plan.pools}
    parents = {p.name for p in run.plan.parents.parents}

    def ended(execution: SimExecution) -> None:
        if told is not None:
            told(execution)
        name = execution.name
        if key_tag_of(name) is not None:
            name = name.split("_", 1)[1]
        if (
            execution.state_machine_arn in governed
            and execution.runs[-1].final == "FAILED"
            and len(execution.runs) == 1
            and name.rsplit("-", 1)[0] in parents
            and rng.random() < 0.5
        ):
            tg.start_soon(
                _redrive_child, run, execution.arn, rng.uniform(0.0, 1.5), rng.randint(1, 30)
            )

    sfn.on_end = ended


async def _redrive_child(run: Run, arn: str, after: float, seconds: int) -> None:
    await anyio.sleep(after)
    if run.world.redrive(arn, float(seconds)):
        run.world.history.note(run.clock(), "operator", f"child {arn.rsplit(':', 1)[-1]} redriven")
