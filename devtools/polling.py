"""Poll until a condition holds: the one way tests, benchmarks and the demo wait on state that
lives in another process (the emulator, a child dispatcher), which nothing can push."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio


async def wait_until(
    check: Callable[[], Awaitable[bool]],
    *,
    within: float,
    interval: float = 0.25,
    message: str = "condition",
) -> None:
    """Call ``check`` every ``interval`` seconds until it is true; TimeoutError naming
    ``message`` after ``within`` seconds."""
    with anyio.move_on_after(within):
        # Polling: another process's state cannot be waited on any other way.
        while not await check():  # noqa: ASYNC110
            await anyio.sleep(interval)
        return
    raise TimeoutError(f"{message} not reached within {within:g} s")
