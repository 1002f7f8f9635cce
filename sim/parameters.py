"""Where the simulation keeps each pool's limit in its simulated SSM."""

from __future__ import annotations


def limit_parameter(pool: str) -> str:
    """The parameter a pool's limit is read from (its ``limit_parameter``)."""
    return f"/sfn-dispatcher/{pool}/limit"


def config_record(pool: str) -> str:
    """Not read by the dispatcher: the harness records the config file's limit here, so the
    checker finds the whole limit timeline in the history."""
    return f"/sim/config/{pool}/limit"
