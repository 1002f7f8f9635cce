"""A task that spins (wakes itself at once, forever) would freeze virtual time and the
run with it: the loop ends such a run, and the run is judged failed, not hung."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import anyio.lowlevel
import pytest
import structlog

from dispatcher.daemon.lease import Leases
from sim import __main__ as sim_cli
from sim import loop
from sim.bugs import patched
from sim.harness import simulate
from sim.mutations import Edit, Mutation


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    sim_cli._quiet_logs(verbose=False)
    yield
    structlog.reset_defaults()


def test_a_spinning_task_ends_the_loop() -> None:
    async def main() -> None:
        async def spin() -> None:
            while True:
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(spin)
            await anyio.sleep(5.0)

    with pytest.raises(loop.SimulationBusyError, match="without the clock moving"):
        loop.run(main)


def test_waiting_tasks_do_not_count_as_spinning() -> None:
    async def main() -> float:
        for _ in range(loop.BUSY_ROUNDS + 10):
            await anyio.sleep(0.001)
        return loop.now()

    assert loop.run(main) == pytest.approx(0.001 * (loop.BUSY_ROUNDS + 10), rel=1e-6)


@pytest.mark.timeout(120)
def test_a_run_whose_dispatcher_spins_fails_with_an_error() -> None:
    """Leases taken where free and trusted while any is valid, but timed by the first
    to lapse: `_keep_lease` renews with a deadline of 0, in a loop (seed 3 has a lease
    held by another process)."""
    spins = Mutation(
        "spins",
        "take-over wait",
        "-",
        Edit(
            Leases,
            "try_acquire",
            "if not await lease.try_acquire():\n"
            '    await self._give_back(taken, why=f"{lease.config.pool} is held by another")\n'
            "    return False",
            "if not await lease.try_acquire():\n    continue",
        ),
        also=(
            Edit(
                Leases,
                "valid",
                "return all(lease.valid() for lease in self.items)",
                "return any(lease.valid() for lease in self.items)",
            ),
        ),
    )
    with patched(spins.patches()):
        outcome = simulate(3)
    assert not outcome.ok
    assert not outcome.violations
    assert "a task spins" in outcome.errors[0]
