"""Deterministic simulation of the dispatcher's AWS: a simulated world that follows AWS's
documented semantics in virtual time (`sim.aws.World`), the history it records
(`sim.history.History`) and a checker that judges a history (`sim.checker.check`)."""

from sim.aws import EventFault, EventFaults, EventInfo, World, WorldConfig
from sim.calls import NO_FAULT, CallFault, CallFaults
from sim.checker import CheckSpec, PoolSpec, Violation, check, max_concurrency
from sim.history import OUTSIDE, History

__all__ = [
    "NO_FAULT",
    "OUTSIDE",
    "CallFault",
    "CallFaults",
    "CheckSpec",
    "EventFault",
    "EventFaults",
    "EventInfo",
    "History",
    "PoolSpec",
    "Violation",
    "World",
    "WorldConfig",
    "check",
    "max_concurrency",
]
