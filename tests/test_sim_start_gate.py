"""The simulated processes check the start gate (the lease) just before each StartExecution
leaves, as the production clients do (`dispatcher.aws.api.open_clients`)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from botocore.exceptions import EndpointConnectionError

from dispatcher.aws.api import StartGate, outcome_unknown
from sim.harness import _Gated


class _Starts:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def start_execution(self, **kwargs: Any) -> dict[str, Any]:
        self.sent.append(kwargs)
        return {"executionArn": "arn"}

    async def describe_execution(self, **_: Any) -> dict[str, Any]:
        return {"status": "RUNNING"}


def test_a_closed_gate_sends_nothing_and_says_so() -> None:
    starts, gate = _Starts(), StartGate()
    gated = _Gated(starts, gate)
    valid = [True]
    gate.may_send = lambda: valid[0]

    async def main() -> None:
        assert await gated.start_execution(name="a") == {"executionArn": "arn"}
        valid[0] = False
        with pytest.raises(EndpointConnectionError) as caught:
            await gated.start_execution(name="b")
        assert not outcome_unknown(caught.value)  # never sent: not in doubt
        assert await gated.describe_execution(executionArn="arn") == {"status": "RUNNING"}

    anyio.run(main)
    assert [s["name"] for s in starts.sent] == ["a"]
