"""The lease fence (docs/design.md, "One leader per state machine"): a StartExecution leaves
a dispatcher process only while that process holds the state machine's lease.

Judged from the records alone: the start attempts the simulated Step Functions saw leave
(``start_sent``, with their sender and state machine) against the lease writes the
simulated DynamoDB applied. At an attempt's send, the last write of the state machine's
lease item before it must name the sender as owner, not be a release, and not have
expired by then. A process trusts its lease until a margin before the expiry it wrote (on
its own clock, from when it sent the write), so an attempt sent under a valid lease always
passes; one sent after the lease lapsed, or after another process took it, fails.

The rule judges only state machines whose lease item the history shows written, and only
dispatcher processes (a producer's or the console's starts are outside the lease).
"""

from __future__ import annotations

import bisect
from collections import defaultdict

from sim.history import History, LeaseWrite
from sim.violation import Violation


def check_fence(history: History, wall_epoch: float) -> list[Violation]:
    """``start_outside_lease``: every start attempt a dispatcher process sent for a state
    machine under a lease was sent while the lease item named it and had not expired.
    ``wall_epoch``: the wall clock (Unix seconds) at virtual time 0, the frame of a lease
    item's ``expires_at``."""
    writes: dict[str, list[LeaseWrite]] = defaultdict(list)
    for write in history.lease_writes:
        writes[write.pool].append(write)
    if not writes:
        return []
    processes = {
        record.node
        for record in history.records
        if record.kind == "note" and record.text == "process started"
    }
    found: list[Violation] = []
    for record in history.records:
        if record.kind != "start_sent" or record.node not in processes:
            continue
        machine = str(record.details.get("state_machine"))
        item = writes.get(machine)
        if not item:
            continue
        times = [w.time for w in item]
        last = bisect.bisect_right(times, record.time) - 1
        why = _outside(item[last] if last >= 0 else None, record.node, record.time, wall_epoch)
        if why:
            found.append(
                Violation(
                    "start_outside_lease",
                    record.time,
                    f"{record.node} sent StartExecution {record.details.get('name')} for "
                    f"{machine} {why}",
                )
            )
    return found


def _outside(write: LeaseWrite | None, node: str, at: float, wall_epoch: float) -> str:
    """Why a start sent by ``node`` at ``at`` was outside its lease ("" if it was not)."""
    if write is None:
        return "before any process had taken the lease"
    if write.owner != node:
        return f"while the lease was {write.owner}'s (epoch {write.epoch})"
    if write.what == "released":
        return f"after it released the lease (at {write.time:.3f})"
    expired = write.expires_at - wall_epoch
    if at >= expired:
        return f"{at - expired:.3f} s after its lease expired (at {expired:.3f})"
    return ""
