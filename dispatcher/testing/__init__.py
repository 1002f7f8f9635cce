"""Test support shipped with the package: faults that no local AWS emulator produces.

`FaultProxy` sits between an AWS client and the emulator and throttles, fails, delays,
drops or lags chosen operations; `EventChaos` relays status-change events between two
SQS queues and drops, duplicates, delays or reorders them. Tests and benchmarks share
both, so nothing here imports pytest.
"""

from dispatcher.testing.chaos import EventChaos
from dispatcher.testing.faults import FaultKind, FaultProxy, FaultRule

__all__ = ["EventChaos", "FaultKind", "FaultProxy", "FaultRule"]
