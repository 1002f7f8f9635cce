"""Intake wired to a fake world, and one request taken through it as the loops would."""

from __future__ import annotations

from typing import Any

import anyio

from dispatcher.intake import Intake
from dispatcher.rate import RateLimiters
from dispatcher.starter import Waiting
from tests.fakes import World


def intake_of(world: World, *, rate: float = 1e6) -> Intake:
    """The intake under test over the world's fakes (a start rate that never waits)."""
    assert world.layout is not None
    return Intake(
        world.settings,
        world.clients,
        {world.pool.name: world.pool},
        world.layout,
        metrics=world.metrics,
        health=world.health,
        limiters=RateLimiters(world.metrics, rate=rate, burst=1_000_000, floor=1.0),
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
