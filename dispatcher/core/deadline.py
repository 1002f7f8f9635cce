"""Start-by deadlines: when a request must have started, or not start at all.

A request may carry a ``start-by`` message attribute: an RFC 3339 timestamp with an
offset (``2026-12-05T10:00:00Z``, ``2026-12-05T11:00:00+01:00``) or Unix epoch seconds
(``1796464800``). A request not started by then is dead-lettered with reason `EXPIRED`
and its parent, if one waits on a task token, gets `EXPIRED_ERROR`.

"Started by then" means: the dispatcher made the ``StartExecution`` call before the
deadline, by its own (wall) clock read just before the call. A start sent before the
deadline whose answer comes after it counts as started in time; no attempt is sent after
it. Pure functions, no I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

START_BY_ATTRIBUTE = "start-by"
EXPIRED = "expired"
"""The dead-letter reason of a request whose start-by passed before it could start."""
INVALID_START_BY = "invalid_start_by"
"""The dead-letter reason of a request whose start-by is not a timestamp."""
EXPIRED_ERROR = "Dispatcher.Expired"
"""The error a parent waiting on a task token gets for an expired request."""

_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})\Z"
)
_EPOCH = re.compile(r"^\d{1,12}(\.\d{1,9})?\Z")
_LATEST = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()
_SHOWN = 100  # characters of an invalid value quoted back


def parse_start_by(value: str) -> float:
    """The deadline ``value`` names, in Unix seconds; ``ValueError`` saying why if it
    names none. An RFC 3339 timestamp must carry its offset (``Z`` or ``+hh:mm``): a
    timestamp without one would be read in whichever zone the reader is in."""
    text = value.strip()
    if _EPOCH.match(text):
        seconds = float(text)
        if seconds > _LATEST:
            raise ValueError("epoch seconds past the year 9999 (milliseconds?)")
        return seconds
    if not _RFC3339.match(text):
        raise ValueError(
            "not an RFC 3339 timestamp with an offset (2026-12-05T10:00:00Z) "
            "nor epoch seconds (1796464800)"
        )
    # fromisoformat wants the fraction in 3 or 6 digits and an upper-case Z.
    normal = re.sub(r"(\.\d+)", lambda m: (m.group(1) + "000000")[:7], text)
    normal = normal[:10] + "T" + normal[11:]
    normal = normal[:-1] + "+00:00" if normal[-1] in "Zz" else normal
    try:
        moment = datetime.fromisoformat(normal)
    except ValueError as exc:  # month 13, hour 25, February 30
        raise ValueError(f"not a valid date and time ({exc})") from None
    return moment.timestamp()


def start_by_of(attributes: Mapping[str, Any]) -> tuple[float | None, str | None]:
    """(deadline, None) from a message's attributes (``MessageAttributes`` as received:
    name -> ``{"DataType", "StringValue"}``); (None, None) without one; (None, why) for
    an invalid one, naming the attribute and its value."""
    attribute = attributes.get(START_BY_ATTRIBUTE)
    if attribute is None:
        return None, None
    value = attribute.get("StringValue")
    if value is None:
        return None, f"{START_BY_ATTRIBUTE} has no string value"
    try:
        deadline = parse_start_by(str(value))
    except ValueError as exc:
        shown = value if len(value) <= _SHOWN else value[:_SHOWN] + "..."
        return None, f"{START_BY_ATTRIBUTE} {shown!r} is invalid: {exc}"
    return deadline, None


def format_deadline(deadline: float) -> str:
    """A deadline as RFC 3339 UTC text (what docs, logs and dead letters show)."""
    if not math.isfinite(deadline):
        return str(deadline)
    moment = datetime.fromtimestamp(deadline, UTC)
    # Shown to the millisecond: a deadline under 1 ms past the second reads as the second,
    # so the text parses back to what it shows (never "…55.000Z" for one and "…55Z" for
    # the other).
    moment = moment.replace(microsecond=moment.microsecond // 1000 * 1000)
    text = moment.isoformat(timespec="milliseconds" if moment.microsecond else "seconds")
    return text.replace("+00:00", "Z")


def expired_detail(deadline: float, now: float) -> str:
    """The dead letter's detail (and the parent's cause) for a request that expired."""
    return (
        f"{START_BY_ATTRIBUTE} {format_deadline(deadline)} passed "
        f"{max(0.0, now - deadline):.1f} s ago before the request could start; it was never "
        f"started (`sfn-dispatcher redrive --reason {EXPIRED}` sends it back without its "
        f"{START_BY_ATTRIBUTE}, to run it)"
    )
