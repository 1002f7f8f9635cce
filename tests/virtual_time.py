"""Unit tests on virtual time: the simulation's event loop, whose clock jumps to the next
timer whenever every task waits (`sim.loop`).

A fake long poll (`tests.fakes.FakeSQS.receive_message` with ``WaitTimeSeconds``) on an
empty queue waits as SQS does; on virtual time its whole wait passes at once as soon as
nothing else can happen, so a test that runs intake's loops neither sleeps nor waits for
the wall clock. Everything waits and no timer is set: `sim.loop.SimulationStuckError`;
a task that spins: `sim.loop.SimulationBusyError` (instead of a hung test).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

from sim.loop import run


def on_virtual_time(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run the async test ``test`` on a fresh virtual-time loop (a plain test for pytest:
    its fixtures and parameters are passed on)."""

    @functools.wraps(test)
    def virtual(*args: Any, **kwargs: Any) -> None:
        run(lambda: test(*args, **kwargs))

    return virtual
