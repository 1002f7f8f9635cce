"""The local sandbox: MiniStack as a child process, provisioned with what the dispatcher needs.

`Emulator` runs the emulator (sync and async context manager); `provision` creates the
queues, rule, demo state machine, its parent workflow (task tokens) and limit parameter in it
(or in any endpoint) and returns `SandboxResources`, whose ``env()`` is what
``sfn-dispatcher run`` reads.
"""

from devtools.sandbox.emulator import Emulator, find_executable, free_port, wait_healthy
from devtools.sandbox.provision import (
    SandboxResources,
    child_key,
    demo_definition,
    parent_definition,
    provision,
)

__all__ = [
    "Emulator",
    "SandboxResources",
    "child_key",
    "demo_definition",
    "find_executable",
    "free_port",
    "parent_definition",
    "provision",
    "wait_healthy",
]
