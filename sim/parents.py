"""The parent workflows of a scenario: workflows that ask the dispatcher for children
through task tokens (``sqs:sendMessage.waitForTaskToken``), drawn per seed, then started
and sometimes aborted while the run goes on.

Drawn from their own generator (``parents-<seed>``), for a share of the seeds and only
while `sim.harness.PARENTS` is on, so that every other seed runs exactly as before.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from sim.harness import Run

SHARE = 0.3  # of the seeds that get parents once they are enabled
LONG_CHILD = (150, 400)  # seconds: children that outlive a heartbeat window
LARGE_OUTPUT = 255_000  # bytes: over EventBridge's 248 KiB, under the 256 KiB limit
TOO_LARGE_OUTPUT = 300_000  # bytes: the child fails with States.DataLimitExceeded
TENANTS = ("a", "a", "b", "c")
POOL_ATTRIBUTE, KEY_ATTRIBUTE = "pool", "tenant"  # as sim.harness's


@dataclass(frozen=True)
class ParentPlan:
    """One parent workflow: when, on which pool, its items and its limits."""

    name: str
    pool: str
    at: float
    seconds: tuple[int, ...]  # each item's child runs this long
    heartbeat_seconds: float | None = None
    timeout_seconds: float | None = None
    abort_at: float | None = None
    fail: frozenset[int] = frozenset()  # items whose child fails
    bad: frozenset[int] = frozenset()  # items sent with an invalid idempotency key
    large: frozenset[int] = frozenset()  # items whose child's output is LARGE_OUTPUT
    too_large: frozenset[int] = frozenset()  # ... TOO_LARGE_OUTPUT
    retry_of: str | None = None  # a retry of that parent: its items carry the same keys

    def items(self) -> list[dict[str, Any]]:
        """The child inputs, in item order."""
        out: list[dict[str, Any]] = []
        for index, seconds in enumerate(self.seconds):
            item: dict[str, Any] = {"seconds": seconds}
            if index in self.fail:
                item["fail"] = True
            if index in self.large:
                item["output_bytes"] = LARGE_OUTPUT
            elif index in self.too_large:
                item["output_bytes"] = TOO_LARGE_OUTPUT
            out.append(item)
        return out


@dataclass(frozen=True)
class ParentsPlan:
    """A scenario's parents and how Step Functions and the dispatcher treat them."""

    parents: tuple[ParentPlan, ...] = ()
    closed_task_error: str = "TaskTimedOut"  # what a closed task's token answers
    stop_orphans: bool = False  # the dispatcher's stop_orphaned_children

    @property
    def items(self) -> int:
        """How many children the parents ask for."""
        return sum(len(p.seconds) for p in self.parents)


def draw(seed: int, *, pools: Mapping[str, int], quiet_at: float, max_seconds: int) -> ParentsPlan:
    """The parents of seed ``seed`` (none for most seeds). ``pools``: name -> limit."""
    rng = random.Random(f"parents-{seed}")
    if rng.random() >= SHARE or not pools:
        return ParentsPlan()
    parents = []
    for index in range(rng.randint(1, 3)):
        count = rng.randint(3, 10)
        beats = rng.uniform(120.0, 300.0) if rng.random() < 0.5 else None
        at = rng.uniform(0, quiet_at * 0.8)

        def some(share: float, count: int = count) -> frozenset[int]:
            return frozenset(i for i in range(count) if rng.random() < share)

        seconds = tuple(
            rng.randint(*LONG_CHILD)
            if beats is not None and rng.random() < 0.3
            else rng.randint(0, max_seconds)
            for _ in range(count)
        )
        parents.append(
            ParentPlan(
                name=f"parent{index}",
                pool=rng.choice(sorted(pools)),
                at=at,
                seconds=seconds,
                heartbeat_seconds=beats,
                timeout_seconds=rng.uniform(600.0, 1800.0) if rng.random() < 0.2 else None,
                abort_at=at + rng.uniform(5.0, 200.0) if rng.random() < 0.25 else None,
                fail=some(0.07),
                bad=some(0.03),
                large=some(0.05),
                too_large=some(0.02),
            )
        )
    return ParentsPlan(
        parents=tuple(parents),
        closed_task_error=rng.choice(("TaskTimedOut", "TaskDoesNotExist")),
        stop_orphans=rng.random() < 0.5,
    )


def with_retries(seed: int, plan: ParentsPlan) -> ParentsPlan:
    """The plan with some parents retried by their caller (`sim.extras` "retries"): a
    second parent, a little later, whose items carry the same idempotency keys and bodies
    (the same business items), so that two tokens wait on one child; the first one is
    sometimes aborted (its caller gave up on it) while the retry waits."""
    rng = random.Random(f"parent-retries-{seed}")
    parents = list(plan.parents)
    for parent in plan.parents:
        if rng.random() < 0.6:
            abort = parent.abort_at
            if abort is None and rng.random() < 0.5:
                abort = parent.at + rng.uniform(5.0, 200.0)
                parents[parents.index(parent)] = dataclasses.replace(parent, abort_at=abort)
            parents.append(
                dataclasses.replace(
                    parent,
                    name=f"{parent.name}r",
                    at=parent.at + rng.uniform(1.0, 150.0),
                    abort_at=None,
                    timeout_seconds=None,
                    retry_of=parent.name,
                )
            )
    return dataclasses.replace(plan, parents=tuple(parents))


async def run_parents(run: Run, plan: ParentsPlan) -> None:
    """Start each parent at its time, and abort those planned to be (the nemesis's part)."""
    world = run.world
    machine = run.arns["parents"]
    rng = random.Random(f"parent-attributes-{run.seed}")
    steps: list[tuple[float, int, ParentPlan]] = []
    for parent in plan.parents:
        steps.append((parent.at, 0, parent))
        if parent.abort_at is not None:
            steps.append((parent.abort_at, 1, parent))
    arns: dict[str, str] = {}
    tenants: dict[str, str] = {}
    for at, kind, parent in sorted(steps, key=lambda s: (s[0], s[1], s[2].name)):
        await anyio.sleep(max(0.0, at - run.clock()))
        if kind == 1:
            if parent.name in arns and world.stop_outside(arns[parent.name]):
                world.history.note(run.clock(), "nemesis", f"parent {parent.name} ABORTED")
            continue
        pool = next(p for p in run.plan.pools if p.name == parent.pool)
        attributes = {}
        if run.plan.shared_queue:
            attributes[POOL_ATTRIBUTE] = pool.name
        if pool.name in run.key_limits:  # keyed, now or after a configuration change
            attributes[KEY_ATTRIBUTE] = rng.choice(TENANTS)
        retried = next((p for p in plan.parents if p.name == parent.retry_of), None)
        if retried is not None and KEY_ATTRIBUTE in attributes:
            attributes[KEY_ATTRIBUTE] = tenants[retried.name]  # the same items, same tenant
        tenants[parent.name] = attributes.get(KEY_ATTRIBUTE, "")
        run.expected_bad.update(f"{parent.retry_of or parent.name}-{i}" for i in parent.bad)
        arns[parent.name] = world.start_parent(
            machine,
            parent.name,
            run.queues[pool.name][0],
            parent.items(),
            heartbeat_seconds=parent.heartbeat_seconds,
            timeout_seconds=parent.timeout_seconds,
            attributes=attributes,
            bad_items=parent.bad,
            **({"key_prefix": parent.retry_of} if parent.retry_of else {}),
        )
