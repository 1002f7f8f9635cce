"""Loaded by the *emulator's* interpreter (PYTHONPATH): make DynamoDB writes atomic.

MiniStack 1.5.33's UpdateItem/PutItem/DeleteItem read the item, evaluate the condition
and write without a lock, and Step Functions executions call them from one thread each:
two acquires can both pass ``holders < limit`` and one increment is lost. DynamoDB itself
applies a conditional write atomically, so without this the semaphore pattern would be
blamed for an emulator race. One lock around each write restores DynamoDB's semantics.
Nothing else changes; if MiniStack's internals differ, nothing is patched and the marker
file (``BENCH_DDB_ATOMIC_MARKER``) is not written, so the benchmark can say so.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

_WRITES = ("_update_item", "_put_item", "_delete_item")


def _serialised(write: Callable[..., Any], lock: threading.Lock) -> Callable[..., Any]:
    @functools.wraps(write)
    def locked(*args: Any, **kwargs: Any) -> Any:
        with lock:
            return write(*args, **kwargs)

    return locked


def _patch() -> None:
    try:
        dynamodb = importlib.import_module("ministack.services.dynamodb")
    except ImportError:
        return
    if not all(callable(getattr(dynamodb, name, None)) for name in _WRITES):
        print(
            "bench: MiniStack DynamoDB internals changed; writes left as they are", file=sys.stderr
        )
        return
    lock = threading.Lock()
    for name in _WRITES:
        setattr(dynamodb, name, _serialised(getattr(dynamodb, name), lock))
    marker = os.environ.get("BENCH_DDB_ATOMIC_MARKER")
    if marker:
        Path(marker).write_text("patched\n")


_patch()
