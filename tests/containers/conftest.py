"""Fixtures of the container tests: the engine `scripts/image` chose, and the built image."""

from __future__ import annotations

import pytest

from tests.containers.engine import IMAGE, REPORT, Engine


@pytest.fixture(scope="session")
def engine() -> Engine:
    """docker, or podman with the project's containers.conf."""
    return Engine.detect()


@pytest.fixture(scope="session")
def image(engine: Engine) -> str:
    """The project's image, built by `make image` (`make test-containers` builds it first)."""
    if engine("image", "inspect", IMAGE, check=False).returncode != 0:
        pytest.fail(f"no image {IMAGE}: build it with `make image` first")
    return IMAGE


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """What the container tests measured (image size, stop time, ...)."""
    if REPORT:
        terminalreporter.section("containers: measured")
        for line in REPORT:
            terminalreporter.write_line(line)
