"""The named changes a run can put back: a fixed bug of `sim.bugs` or a mutation of
`sim.mutations` (a safety rule taken out), looked up by name and applied for a run."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sim.bugs import BUGS, Bug, patched
from sim.mutations import MUTATIONS


def lookup(name: str) -> Bug:
    """A fixed bug, or a mutation of `sim.mutations` (a safety rule taken out) as one."""
    if name in BUGS:
        return BUGS[name]
    return MUTATIONS[name].as_bug()


@contextlib.contextmanager
def put_back(names: tuple[str, ...]) -> Iterator[list[Bug]]:
    """Apply the patches of ``names`` (bugs or mutations) until the block ends."""
    bugs = [lookup(n) for n in names]
    with patched(tuple(p for bug in bugs for p in bug.patches)):
        yield bugs
