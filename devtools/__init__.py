"""Developer tools of a source checkout, never shipped in the wheel or the image.

`python -m devtools sandbox|demo` (`sandbox/`, `demo`), the executions' records as ground
truth for tests and benchmarks (`records`), and faults that no local AWS emulator produces:

`FaultProxy` sits between an AWS client and the emulator and throttles, fails, delays,
drops or lags chosen operations; `EventChaos` relays status-change events between two
SQS queues and drops, duplicates, delays or reorders them. Tests and benchmarks share
both, so nothing here imports pytest.
"""

from devtools.chaos import EventChaos
from devtools.faults import FaultKind, FaultProxy, FaultRule

__all__ = ["EventChaos", "FaultKind", "FaultProxy", "FaultRule"]
