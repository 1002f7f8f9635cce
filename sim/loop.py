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
import importlib.metadata
import selectors
import time
from collections.abc import Awaitable, Callable, Hashable, Iterator, Mapping, MutableSet
from typing import Any, TypeVar

import anyio
from anyio._backends import _asyncio as anyio_asyncio

anyio_version = importlib.metadata.version("anyio")

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


class _OrderedSet(MutableSet[Any]):
    """A set that iterates in insertion order (a dict underneath)."""

    def __init__(self) -> None:
        self._items: dict[Hashable, None] = {}

    def __contains__(self, item: object) -> bool:
        return item in self._items

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def add(self, value: Any) -> None:
        self._items[value] = None

    def discard(self, value: Any) -> None:
        self._items.pop(value, None)


def _replace_set(owner: Any, name: str) -> None:
    """Swap ``owner.name``, an empty set in the anyio versions pyproject.toml allows, for an
    ordered one; fail loudly when an anyio release changed it (a seed would no longer replay
    exactly, and nothing else would say so)."""
    current = getattr(owner, name, None)
    if not isinstance(current, set) or current:
        raise RuntimeError(
            f"anyio {anyio_version} changed {type(owner).__name__}.{name}: the simulation orders "
            "anyio's task sets to replay a seed exactly (sim/loop.py); pin anyio to a release "
            "it supports"
        )
    setattr(owner, name, _OrderedSet())


@contextlib.contextmanager
def _ordered_task_sets() -> Iterator[None]:
    """anyio keeps the tasks of a cancel scope or task group in plain sets, which iterate
    in the order of the tasks' memory addresses: the order in which a cancellation reaches
    them would change from one process to the next. Insertion order instead, so a seed
    replays exactly. (The dispatcher's own code is untouched.)"""
    scope_init = anyio_asyncio.CancelScope.__init__
    group_init = anyio_asyncio.TaskGroup.__init__

    def ordered_scope(self: Any, *args: Any, **kwargs: Any) -> None:
        scope_init(self, *args, **kwargs)
        _replace_set(self, "_tasks")
        _replace_set(self, "_child_scopes")

    def ordered_group(self: Any) -> None:
        group_init(self)
        _replace_set(self, "_tasks")

    anyio_asyncio.CancelScope.__init__ = ordered_scope  # type: ignore[method-assign]
    anyio_asyncio.TaskGroup.__init__ = ordered_group  # type: ignore[method-assign]
    try:
        yield
    finally:
        anyio_asyncio.CancelScope.__init__ = scope_init  # type: ignore[method-assign]
        anyio_asyncio.TaskGroup.__init__ = group_init  # type: ignore[method-assign]


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

    with _ordered_task_sets():
        return anyio.run(timed, backend="asyncio", backend_options={"loop_factory": factory})


def now() -> float:
    """The running loop's (virtual) time."""
    return asyncio.get_running_loop().time()
