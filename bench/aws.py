"""AWS clients for the benchmark driver, with a count of every API call they make."""

from __future__ import annotations

import functools
import os
from collections import Counter
from typing import Any

import aioboto3
from aiobotocore.config import AioConfig

REGION = "us-east-1"

# The emulator's fixed test credentials; no developer AWS settings may leak into a run.
EMULATOR_ENV = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_DEFAULT_REGION": REGION,
}
UNSET = ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION")


def use_emulator_env() -> None:
    """This process's environment: the emulator's credentials, none of the developer's."""
    for name in UNSET:
        os.environ.pop(name, None)
    os.environ.update(EMULATOR_ENV)


@functools.cache
def session() -> Any:
    """One aioboto3 session with the emulator's test credentials (a new one re-reads models)."""
    return aioboto3.Session(
        aws_access_key_id="test",
        aws_secret_access_key="test",  # noqa: S106 - the emulator's fixed test credentials
        region_name=REGION,
    )


def config(connections: int = 16) -> AioConfig:
    """Client configuration: enough pooled connections for ``connections`` tasks."""
    return AioConfig(
        max_pool_connections=connections,
        retries={"mode": "standard", "max_attempts": 3},
        connect_timeout=5,
        read_timeout=60,
    )


class CallCounter:
    """Counts HTTP attempts per operation (retries included) on the clients it is attached to.

    The same ``needs-retry`` hook the dispatcher uses for ``dispatcher_aws_calls_total``,
    so the patterns' call counts are comparable with the dispatcher's.
    """

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def attach(self, client: Any) -> Any:
        """Count ``client``'s calls from now on; returns the client."""
        client.meta.events.register("needs-retry.*.*", self._hook)
        return client

    def _hook(self, operation: Any = None, **_: Any) -> None:
        self.calls[str(getattr(operation, "name", "unknown"))] += 1

    @property
    def total(self) -> int:
        """Every call counted."""
        return sum(self.calls.values())
