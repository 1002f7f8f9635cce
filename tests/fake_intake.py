"""Intake wired to a fake world, and one request taken through it as the loops would."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import anyio

from dispatcher.daemon.intake import Intake
from dispatcher.daemon.pool import Pool
from dispatcher.daemon.ratelimit import RateLimiters
from dispatcher.daemon.starter import Waiting
from dispatcher.settings.layout import Layout, PoolConfig, QueueConfig
from tests.fakes import World, build_world


def intake_of(
    world: World,
    *,
    rate: float = 1e6,
    burst: int = 1_000_000,
    floor: float = 1.0,
    clock: Callable[[], float] | None = None,
    pools: Mapping[str, Pool] | None = None,
) -> Intake:
    """The intake under test over the world's fakes (by default a start rate that never
    waits); ``pools`` defaults to the world's one pool, ``clock`` is the rate limiters'."""
    assert world.layout is not None
    limiters = RateLimiters(
        world.metrics, rate=rate, burst=burst, floor=floor, clock=clock or time.monotonic
    )
    return Intake(
        world.settings,
        world.clients,
        pools if pools is not None else {world.pool.name: world.pool},
        world.layout,
        metrics=world.metrics,
        health=world.health,
        limiters=limiters,
    )


async def handle(world: World, message: dict[str, Any], intake: Intake | None = None) -> Intake:
    """Receive ``message`` (`Intake.admit`), then start it if it may start now
    (`Intake.dispatch_once`), waiting for the handler to finish."""
    intake = intake or intake_of(world)
    await intake.admit(intake.queues[0], message)
    async with anyio.create_task_group() as handlers:
        intake.dispatch_once(world.pool, handlers)
    return intake


def waiting(world: World) -> list[Waiting]:
    """The requests in the pool's waiting room, oldest first."""
    return list(world.pool.room.items())


async def dispatch_all(intake: Intake, pool: Pool) -> int:
    """Dispatch until nothing more may start, then wait for the handlers; how many began."""
    began = 0
    async with anyio.create_task_group() as handlers:
        while intake.dispatch_once(pool, handlers):
            began += 1
    return began


def finish(pool: Pool, arn: str) -> None:
    """What a terminal status event does: free the execution's slot and wake intake."""
    pool.ledger.observe_terminal(arn)
    pool.update()


def build_layout_world(
    pools: Sequence[PoolConfig], queues: Sequence[QueueConfig], **overrides: Any
) -> tuple[World, dict[str, Pool]]:
    """A world governing ``pools`` fed by ``queues`` (every queue and state machine made in
    the fakes); ``world.pool`` is the first pool, ``world.layout`` the whole layout."""
    world = build_world(**overrides)
    layout = Layout(tuple(pools), tuple(queues), "test")
    made = {
        p.name: Pool(p, world.metrics, world.clock, queues=len(layout.queues_of(p.name)))
        for p in pools
    }
    for queue in queues:
        world.sqs.create_queue(queue.url)
    for config in pools:
        world.sfn.state_machines[config.state_machine_arn] = "STANDARD"
    world.layout = layout
    world.pool = made[pools[0].name]
    return world, made
