"""Virtual time: an asyncio event loop whose clock moves only when every task waits.

The simulation does no I/O, so whenever the loop would block in ``select`` it instead
jumps its clock to the next timer. A ten-minute scenario then costs only the CPU its
callbacks use. ``time.monotonic``, ``time.time`` and ``time.perf_counter`` are pointed at
the same clock while a simulation runs, so library code that reads them (tenacity's
retry timeout under stamina, SQS timestamps, metrics) sees virtual time too: nothing in
a run depends on the machine's real clock, and a seed replays exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import selectors
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, TypeVar

import anyio

T = TypeVar("T")

EPOCH = 1_767_225_600.0
"""Wall-clock seconds at virtual time 0 (2026-01-01, as `sim.aws.WorldConfig.epoch`)."""


class SimulationStuckError(RuntimeError):
    """Every task waits and no timer is set: nothing can ever happen again."""


class _NoIOSelector(selectors.BaseSelector):
    """A selector that never reports I/O; waiting on it advances the virtual clock."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        self._loop = loop
        self._keys: dict[int, selectors.SelectorKey] = {}

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._keys[fd] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        return self._keys.pop(fd)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        self.unregister(fileobj)
        return self.register(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise SimulationStuckError("every task waits and no timer is set")
        if timeout > 0:
            self._loop.advance(timeout)
        return []

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._keys

    def close(self) -> None:
        self._keys.clear()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An asyncio loop on virtual time (seconds from 0)."""

    def __init__(self) -> None:
        self._now = 0.0
        super().__init__(_NoIOSelector(self))

    def time(self) -> float:
        """The virtual clock."""
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock forward (the loop calls this instead of blocking)."""
        self._now += seconds


@contextlib.contextmanager
def _time_follows(loop: VirtualTimeLoop) -> Iterator[None]:
    """Point the ``time`` module's clocks at the loop while the simulation runs."""
    saved = (time.monotonic, time.time, time.perf_counter)
    time.monotonic = loop.time
    time.perf_counter = loop.time
    time.time = lambda: EPOCH + loop.time()
    try:
        yield
    finally:
        time.monotonic, time.time, time.perf_counter = saved


def run(main: Callable[[], Awaitable[T]]) -> T:
    """Run ``main`` to completion on a fresh virtual-time loop (anyio's asyncio backend)."""
    loop_box: list[VirtualTimeLoop] = []

    def factory() -> VirtualTimeLoop:
        loop = VirtualTimeLoop()
        loop_box.append(loop)
        return loop

    async def timed() -> T:
        with _time_follows(loop_box[0]):
            return await main()

    return anyio.run(timed, backend="asyncio", backend_options={"loop_factory": factory})


def now() -> float:
    """The running loop's (virtual) time."""
    return asyncio.get_running_loop().time()
