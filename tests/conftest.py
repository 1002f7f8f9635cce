"""Fixtures every test file shares: one emulator per session, a fresh sandbox per test.

Tests that use ``emulator``, ``sandbox`` or ``sandbox_factory`` are marked ``integration``
automatically, so ``pytest -m "not integration"`` runs without the emulator.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, Protocol

import pytest
import stamina

from devtools.sandbox import Emulator, SandboxResources, provision
from tests.helpers import delete_sandbox

INTEGRATION_FIXTURES = frozenset({"emulator", "sandbox", "sandbox_factory"})

# The test session's AWS settings: fake credentials, a fixed region, and none of a
# developer's sandbox exports (AWS_ENDPOINT_URL, DISPATCHER_*) leaking into tests. No
# AWS_ENDPOINT_URL: each client names the emulator explicitly.
_SESSION_ENV = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_SESSION_UNSET = ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs the emulator as ``integration``."""
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def fast_retries(request: pytest.FixtureRequest) -> Iterator[None]:
    """stamina's test mode: no back-off sleeps, and as many attempts as the module's
    ``RETRY_ATTEMPTS`` (5 when it says nothing); restored afterwards."""
    attempts = getattr(request.module, "RETRY_ATTEMPTS", 5)
    with stamina.set_testing(True, attempts=attempts):
        yield


@pytest.fixture(scope="session", autouse=True)
def _aws_test_environment() -> Iterator[None]:
    """Fake credentials and region for the whole session; the previous values come back."""
    saved = dict(os.environ)
    for name in _SESSION_UNSET:
        os.environ.pop(name, None)
    for name in [n for n in os.environ if n.startswith("DISPATCHER_")]:
        if name != "DISPATCHER_SANDBOX_EMULATOR":
            del os.environ[name]
    os.environ.update(_SESSION_ENV)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def emulator() -> Iterator[str]:
    """One MiniStack for the whole session, on a free loopback port; yields its endpoint."""
    with Emulator() as running:
        yield running.endpoint


class SandboxFactory(Protocol):
    """Provision another sandbox in the session emulator (kwargs as for `provision`)."""

    async def __call__(self, **kwargs: Any) -> SandboxResources:
        """Provision and return the resources; they are deleted after the test."""
        ...


def unique_prefix() -> str:
    """A resource-name prefix no other test uses."""
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def sandbox_factory(emulator: str) -> AsyncIterator[SandboxFactory]:
    """Provision any number of sandboxes (unique prefixes unless given) for one test."""
    made: list[SandboxResources] = []

    async def make(**kwargs: Any) -> SandboxResources:
        kwargs.setdefault("prefix", unique_prefix())
        resources = await provision(emulator, **kwargs)
        made.append(resources)
        return resources

    yield make
    # Provisioning the same prefix twice gives one set of resources: delete each once.
    for resources in {r.prefix: r for r in made}.values():
        await delete_sandbox(resources)


@pytest.fixture
async def sandbox(sandbox_factory: SandboxFactory) -> SandboxResources:
    """A freshly provisioned sandbox (default settings, unique prefix) in the session emulator."""
    return await sandbox_factory()
