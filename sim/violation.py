"""A broken rule found in a history (what the checker returns)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Violation:
    """A broken rule: which, when, and what happened."""

    kind: str
    time: float
    message: str

    def __str__(self) -> str:
        return f"[{self.kind} at {self.time:.3f}] {self.message}"
