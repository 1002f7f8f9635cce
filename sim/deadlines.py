"""Start-by deadlines in the simulation: which requests carry one, and the rules judging them.

Producers (`sim.harness`) give a share of the seeds' requests a ``start-by`` attribute,
drawn from a generator of their own (a seed's other draws, and so its history without
deadlines, stay as they were): some well ahead, some about when the request could start,
a few already past when sent, a few invalid (bad requests). Half are RFC 3339 (with a
``Z`` or another offset), half epoch seconds.

10. ``start_after_deadline``: no ``StartExecution`` is sent (by the simulated network's
    record of the attempt leaving its node) at or after the start-by of the request it
    names.
    A copy sent back to a request queue without the start-by (``sfn-dispatcher
    redrive`` of an expired request) frees the request of its deadline from then on.
    ``expired_early``: a request dead-lettered as ``expired`` before its start-by.
    (A request dead-lettered as ``expired`` although its execution ran breaks rule 9,
    ``dead_letter_ran``; one neither started nor dead-lettered, rule 3.)

The checker reads the deadline from the attribute the producer sent, parsed here on its
own (not with the dispatcher's parser).
"""

from __future__ import annotations

import math
import random
import re
from collections import defaultdict
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import TYPE_CHECKING

from sim.history import ORIGINAL_ID_ATTRIBUTE, REASON_ATTRIBUTE, History, key_tag_of
from sim.loop import EPOCH
from sim.violation import Violation

if TYPE_CHECKING:
    from sim.checker import CheckSpec

START_BY = "start-by"
EXPIRED = "expired"
IDEMPOTENCY_ATTRIBUTE = "idempotency-key"
REQUEST_ID_ATTRIBUTE = "dispatcher-request-id"
SEEDS_WITH_DEADLINES = 0.3
"""Share of the seeds whose producers send deadlines."""
SHARE = 0.3
"""Share of a seed's requests (with deadlines) that carry one."""
INVALID = 0.05
"""Share of those whose start-by is garbage: a bad request."""


class Producer:
    """The deadlines a seed's producers put on requests."""

    def __init__(self, seed: int, max_seconds: int) -> None:
        self._rng = random.Random(f"start-by-{seed}")
        self.enabled = self._rng.random() < SEEDS_WITH_DEADLINES
        self._max_seconds = max_seconds

    def start_by(self, sent_at: float) -> tuple[str | None, bool]:
        """The ``start-by`` of a request sent at ``sent_at`` (virtual seconds), or None;
        and whether it is invalid (the request is bad)."""
        if not self.enabled or self._rng.random() >= SHARE:
            return None, False
        if self._rng.random() < INVALID:
            return self._rng.choice(("soon", "2026-01-01T00:00:00", "1e9")), True
        ahead = self._rng.choice((-5.0, 0.5, 2.0, 5.0, 15.0, 60.0, 3.0 * self._max_seconds))
        deadline = EPOCH + sent_at + ahead * self._rng.random()
        if self._rng.random() < 0.5:
            return f"{deadline:.3f}", False
        offset = timezone(timedelta(hours=self._rng.choice((0, 1, -5))))
        moment = datetime.fromtimestamp(deadline, offset)
        text = moment.isoformat(timespec="milliseconds")
        return text.replace("+00:00", "Z"), False


def deadline_of(text: str) -> float | None:
    """The virtual time a start-by names (None: not a valid one)."""
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text) - EPOCH
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    return moment.astimezone(UTC).timestamp() - EPOCH


def _identity(name: str) -> str:
    return name[len("k0123456789_") :] if key_tag_of(name) is not None else name


def check_deadlines(history: History, spec: CheckSpec) -> list[Violation]:
    """Rule 10 (see the module docstring)."""
    deadlines: dict[str, float] = {}  # identity (key or message id) -> latest start-by
    by_message: dict[str, float] = {}
    unbounded: set[str] = set()  # an identity also sent without a (valid) deadline
    for message in history.requests:
        identity = message.attributes.get(IDEMPOTENCY_ATTRIBUTE) or message.message_id
        text = message.attributes.get(START_BY)
        deadline = deadline_of(text) if text is not None else None
        if deadline is None:
            unbounded.add(identity)
            continue
        by_message[message.message_id] = deadline
        deadlines[identity] = max(deadline, deadlines.get(identity, -math.inf))
    # A copy sent back without its start-by (`sfn-dispatcher redrive` of an expired
    # request) asks for the request to run: from then on it has no deadline.
    released: dict[str, float] = {}
    for sent in history.sends:
        named = sent.attributes.get(REQUEST_ID_ATTRIBUTE)
        if sent.queue_url in spec.request_queues and named and START_BY not in sent.attributes:
            released.setdefault(named, sent.time)
    found: list[Violation] = []
    sends: dict[str, list[float]] = defaultdict(list)
    for record in history.records:
        if record.kind == "start_sent":
            sends[_identity(str(record.details.get("name", "")))].append(record.time)
    for identity, deadline in deadlines.items():
        if identity in unbounded:
            continue
        free_from = released.get(identity, math.inf)
        late = [t for t in sends.get(identity, []) if deadline <= t < free_from]
        if late:
            found.append(
                Violation(
                    "start_after_deadline",
                    late[0],
                    f"StartExecution for {identity} sent at {late[0]:.3f}, its start-by "
                    f"{deadline:.3f} had passed",
                )
            )
    for sent in history.dead_letter_copies(spec.dead_letter_queue):
        if sent.attributes.get(REASON_ATTRIBUTE) != EXPIRED:
            continue
        original = sent.attributes.get(ORIGINAL_ID_ATTRIBUTE, "")
        deadline = _deadline_of_copy(sent.attributes, by_message.get(original))
        if deadline is not None and sent.time < deadline:
            found.append(
                Violation(
                    "expired_early",
                    sent.time,
                    f"message {original} dead-lettered as expired at {sent.time:.3f}, before "
                    f"its start-by {deadline:.3f}",
                )
            )
    return found


def _deadline_of_copy(attributes: Mapping[str, str], known: float | None) -> float | None:
    """A dead letter's deadline: its original's, else the start-by the copy carries."""
    if known is not None:
        return known
    text = attributes.get(START_BY)
    return deadline_of(text) if text is not None else None
