"""Buggify's ``twin_waits``: ``twin_keeps`` with the twin waiting in the room, not starting.

In ``twin_keeps`` seeds (`sim.twins`) the first copy of a twinned request gives up its
start on its last receive and is kept until a describe settles it; its slot goes to the
twin, which is being started when the kept copy is described. Here an operator lowers the
pool's limit to 0 the moment the first copy's last attempt comes (SIGHUP: the limit lives
in the config file in these seeds, applied at once), and puts it back 30 to 50 s later:
the first copy gives up with its slot taken back, and the twin waits in the pool's
waiting room - neither started nor being started - when the kept copy is described
(D + grace after it was kept) and told "does not exist". The kept copy must not be
dead-lettered then (`LastReceives._may_run`: a copy that waits to be started here): the
twin starts it once the limit is back (the checker's ``dead_letter_held_copy``).

On in a share of the seeds where ``twin_keeps`` is off (its own stream,
``buggify-twin-waits-SEED``): it turns ``twin_keeps`` on with it, and is dropped with it
where ``twin_keeps`` cannot run. A seed where it is off runs exactly as before.
"""

from __future__ import annotations

import dataclasses
import random
from typing import TYPE_CHECKING

import anyio

from sim import buggify

if TYPE_CHECKING:
    from sim.buggify import Knobs
    from sim.harness import Run, Scenario
    from sim.twins import Episode

SHARE = 0.15
"""The share of seeds (where ``twin_keeps`` is off) in which the knob is on."""
HOLD = (30.0, 50.0)
"""Seconds the limit stays at 0 from the first copy's last attempt: past the kept copy's
first describe (D + grace after it was kept)."""


def drawn(seed: int) -> bool:
    """Whether ``seed`` has the knob on (its own stream)."""
    return buggify.own("twin-waits", seed, SHARE)


def shaped(made: Scenario, knobs: Knobs) -> Scenario:
    """The twinned pool's limit in the config file: a SIGHUP applies a change at once."""
    if not knobs.twin_waits:
        return made
    pools = tuple(dataclasses.replace(p, parameter=False) for p in made.pools)
    return dataclasses.replace(made, pools=pools)


class LimitHolds:
    """Lowers the pool's limit to 0 at each first copy's give-up, and puts it back."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.rng = random.Random(f"twin-waits-{run.seed}")
        self.restores: list[float] = []
        self._wake = anyio.Event()

    def gave_up(self, episode: Episode) -> None:
        """The first copy's last attempt came (`sim.twins.TwinStorms.fault`): limit 0 now."""
        from sim.nemesis import Action  # noqa: PLC0415 - sim.nemesis imports sim.twins

        run = self.run
        now = run.clock()
        pool = run.plan.pools[0]
        run.world.history.note(now, "operator", f"twin_waits: limit of {pool.name} to 0")
        run._set_limit(Action(now, "sighup", "", 0, pool.name))
        self.restores.append(now + self.rng.uniform(*HOLD))
        self._wake.set()

    async def __call__(self) -> None:
        """Put the limit back when each hold ends."""
        from sim.nemesis import Action  # noqa: PLC0415 - sim.nemesis imports sim.twins

        run = self.run
        pool = run.plan.pools[0]
        while True:
            if not self.restores:
                await self._wake.wait()
                self._wake = anyio.Event()
                continue
            at = self.restores.pop(0)
            await anyio.sleep(max(0.0, at - run.clock()))
            back = f"twin_waits: limit of {pool.name} back"
            run.world.history.note(run.clock(), "operator", back)
            run._set_limit(Action(run.clock(), "sighup", "", pool.limit, pool.name))
