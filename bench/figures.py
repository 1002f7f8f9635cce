"""Reading stored results and printing their numbers: shared by the report and the targets."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

MIB_PER_MB = 1e6 / 2**20  # the targets are in MB (10^6 bytes); /proc reports KiB


def load(out: Path, scenario: str) -> dict[str, Any] | None:
    """A scenario's JSON document, if it has been run."""
    path = out / f"{scenario}.json"
    if not path.exists():
        return None
    document: dict[str, Any] = json.loads(path.read_text())
    return document


def num(value: Any, digits: int = 2) -> str:
    """A figure as printed: thousands separated, ``n/a`` when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"
