"""One starter per state machine (invariant 8): an optional DynamoDB lease per governed
state machine.

One item per state machine ARN: ``{pool: ARN, owner, epoch, expires_at, start_timeout,
start_grace}``. A process leads only while it holds the item of *every* state machine it
governs (`Leases`); whatever pools, queues or settings two processes have, at most one of
them may start executions of a given state machine at any instant. Items are taken in
ARN order, all or none: a process that cannot take one gives back those it took in the
same attempt, so neither two processes wait on each other nor one holds a state machine
it does not govern yet.

Taking an item is a consistent read, then a write conditional on the epoch read (and on
the item being free, expired or ours); a take-over increments ``epoch`` (the fencing
token that names each reign in logs and metrics). Renewal is conditional on owner *and*
epoch, well inside the TTL, and has a deadline of its own (`LeaseConfig.renew_timeout`):
a renewal that hangs ends the reign when the lease lapses, not when DynamoDB answers.

Step Functions has no conditional start, so the guarantee is about time: the holder
counts its lease valid only until ``sent + ttl - margin`` on its own monotonic clock,
where ``sent`` is when the winning write was *sent*. Nobody else can take it before
``expires_at = written_at + ttl`` on DynamoDB's side, which is later. A holder that is
paused or cut off therefore stops starting before another can begin (given clock skew
between hosts below ``margin``). Its last starts land within its D (``start_timeout``)
and show in listings within its start grace: both are in the item, so a successor with
other settings waits the longer of its own and the recorded ones (`Lease.owed`). A new
holder records the larger of the two until it has waited (`Lease.settled`), so a holder
that dies before it lists passes the wait on.

The item also carries the task tokens whose parents wait on this holder (``tokens``: held
for running children, waiting in memory, deferred, handed back at the end of the reign),
written with a renewal when they changed and with the release. A successor heartbeats them
from its take-over and counts them as waiting on their children, before it receives their
messages: handed back to a queue whose backlog it receives only for free slots, a message
may wait there long (every slot taken), and a kill -9 hands nothing back at all.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from botocore.exceptions import ClientError

from dispatcher.aws.api import error_code

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient

log = structlog.get_logger("dispatcher.lease")

MAX_TOKENS = 100
"""Task tokens passed on in one item, at most (a token is up to 2,048 characters; an item up
to 400 KB). Beyond them a token is found again only when its message is received."""
Tokens = list[tuple[str, str]]
"""(task token, child execution ARN) pairs."""


@dataclass(frozen=True)
class LeaseConfig:
    """Where the lease lives, how long it lasts, and what a successor must wait for."""

    table: str
    pool: str  # the item's key: a governed state machine's ARN
    ttl: float = 15.0
    margin: float = 3.0  # stop using the lease this long before it can expire elsewhere
    start_timeout: float = 0.0  # this process's D: its starts land within D of being sent
    start_grace: float = 0.0  # ... and show in listings within this after that

    @property
    def renew_every(self) -> float:
        """Renewal interval: a third of the TTL, so two renewals may fail before expiry."""
        return self.ttl / 3

    @property
    def renew_timeout(self) -> float:
        """How long one renewal may take before it is given up (shorter than the lease)."""
        return self.ttl / 3

    @property
    def wait(self) -> float:
        """What this process's successor must wait after taking the lease: D + grace."""
        return self.start_timeout + self.start_grace


def new_owner_id() -> str:
    """A name for this process, unique across hosts and restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease:
    """Take, renew and release the lease of one state machine; ``valid()`` answers without
    I/O."""

    def __init__(
        self,
        dynamodb: DynamoDBClient,
        config: LeaseConfig,
        *,
        owner: str | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.dynamodb = dynamodb
        self.config = config
        self.owner = owner or new_owner_id()
        self.epoch = 0
        self.owed = 0.0
        """What the previous holder's settings oblige this one to wait (D + grace as
        recorded in the item when it was taken; 0 for a fresh item)."""
        self._record = (config.start_timeout, config.start_grace)  # written with each write
        self.handed: Tokens = []
        self.unsure_before = 0.0
        """Wall-clock time before which a token may have been known to a holder that did not
        pass it on (it lost the item, or was killed): taken over unreleased, now; taken
        released, what its releaser recorded (0 for a fresh item)."""
        """The tokens the item carried when this holder took it (its predecessors')."""
        self.tokens: Callable[[], Tokens] | None = None
        """The tokens whose parents wait on this holder now (written when they change)."""
        self._written = "[]"  # the tokens as last written
        self._valid_until = float("-inf")
        self._monotonic = monotonic
        self._wall = wall

    @property
    def key(self) -> dict[str, Any]:
        """The item's key."""
        return {"pool": {"S": self.config.pool}}

    def valid(self) -> bool:
        """Whether this process may start executions right now."""
        return self._monotonic() < self._valid_until

    def remaining(self) -> float:
        """Seconds of validity left (negative once expired)."""
        return self._valid_until - self._monotonic()

    def lapse(self) -> None:
        """Stop trusting the lease now (lost, or its renewal did not answer in time)."""
        self._valid_until = float("-inf")

    def settled(self) -> None:
        """This holder has waited out its predecessor: from now on the item records only
        this process's D and grace (written with the next renewal)."""
        self._record = (self.config.start_timeout, self.config.start_grace)

    async def try_acquire(self) -> bool:
        """Take the lease if it is free, expired or ours. Returns whether we hold it now."""
        got = await self.dynamodb.get_item(
            TableName=self.config.table, Key=self.key, ConsistentRead=True
        )
        item: Mapping[str, Any] = got.get("Item") or {}
        now = self._wall()
        if item and _text(item, "owner") != self.owner and _num(item, "expires_at") >= now:
            return False  # held by another and not expired
        seen = int(_num(item, "epoch"))
        previous = (_num(item, "start_timeout"), _num(item, "start_grace"))
        # Until this holder has waited, the item keeps what a successor owes the previous one.
        record = (
            max(self.config.start_timeout, previous[0]),
            max(self.config.start_grace, previous[1]),
        )
        released = not item or _num(item, "expires_at") == 0
        unsure = _num(item, "unsure_before") if released else now
        condition = (
            "attribute_not_exists(#pool)"
            if not item
            else "epoch = :seen AND (expires_at < :now OR #owner = :me)"
        )
        values: dict[str, Any] = {
            ":me": {"S": self.owner},
            ":expires": {"N": _number(now + self.config.ttl)},
            ":epoch": {"N": str(seen + 1)},
            ":timeout": {"N": _number(record[0])},
            ":grace": {"N": _number(record[1])},
            ":unsure": {"N": _number(unsure)},
        }
        if item:
            values[":seen"] = {"N": str(seen)}
            values[":now"] = {"N": _number(now)}
        sent = self._monotonic()
        try:
            await self.dynamodb.update_item(
                TableName=self.config.table,
                Key=self.key,
                UpdateExpression=(
                    "SET #owner = :me, expires_at = :expires, epoch = :epoch, "
                    "start_timeout = :timeout, start_grace = :grace, unsure_before = :unsure"
                ),
                ConditionExpression=condition,
                ExpressionAttributeNames={"#owner": "owner", "#pool": "pool"}
                if not item
                else {"#owner": "owner"},
                ExpressionAttributeValues=values,
            )
        except ClientError as exc:
            if error_code(exc) == "ConditionalCheckFailedException":
                return False  # someone wrote it between our read and our write
            raise
        self.epoch = seen + 1
        self.owed = sum(previous)
        self.handed = _tokens_of(item)
        self.unsure_before = unsure
        self._written = _text(item, "tokens") or "[]"  # none: nothing to write until some
        self._record = record
        self._valid_until = sent + self.config.ttl - self.config.margin
        log.info(
            "dispatcher.lease_acquired",
            owner=self.owner,
            epoch=self.epoch,
            state_machine_arn=self.config.pool,
            predecessor_wait=self.owed,
        )
        return True

    async def renew(self) -> bool:
        """Extend our reign; False once someone else holds it (or we never did)."""
        sent = self._monotonic()
        now = self._wall()
        values = {
            ":me": {"S": self.owner},
            ":epoch": {"N": str(self.epoch)},
            ":expires": {"N": _number(now + self.config.ttl)},
            ":timeout": {"N": _number(self._record[0])},
            ":grace": {"N": _number(self._record[1])},
        }
        update = "SET expires_at = :expires, start_timeout = :timeout, start_grace = :grace"
        tokens = self._tokens_to_write()
        try:
            await self._update_ours(update, values, tokens)
        except ClientError as exc:
            if error_code(exc) == "ConditionalCheckFailedException":
                self.lapse()
                log.warning(
                    "dispatcher.lease_lost",
                    owner=self.owner,
                    epoch=self.epoch,
                    state_machine_arn=self.config.pool,
                )
                return False
            raise
        if tokens is not None:
            self._written = tokens
        self._valid_until = sent + self.config.ttl - self.config.margin
        return True

    async def _update_ours(
        self, update: str, values: dict[str, dict[str, str]], tokens: str | None
    ) -> None:
        """``update`` the item while it is ours (this owner and epoch), with ``tokens`` too
        unless None (unchanged)."""
        if tokens is not None:
            update += ", tokens = :tokens"
            values = {**values, ":tokens": {"S": tokens}}
        await self.dynamodb.update_item(
            TableName=self.config.table,
            Key=self.key,
            UpdateExpression=update,
            ConditionExpression="#owner = :me AND epoch = :epoch",
            ExpressionAttributeNames={"#owner": "owner"},
            ExpressionAttributeValues=values,
        )

    def _tokens_to_write(self) -> str | None:
        """The tokens to pass on, as the item stores them; None: unchanged (or no source)."""
        if self.tokens is None:
            return None
        pairs = sorted(set(self.tokens()))[:MAX_TOKENS]
        text = json.dumps([list(pair) for pair in pairs], separators=(",", ":"))
        return None if text == self._written else text

    async def release(self) -> None:
        """Give the lease up so a successor need not wait for the TTL (refused quietly
        when it is not ours any more)."""
        self._valid_until = float("-inf")
        values = {":me": {"S": self.owner}, ":epoch": {"N": str(self.epoch)}, ":zero": {"N": "0"}}
        try:
            await self._update_ours("SET expires_at = :zero", values, self._tokens_to_write())
        except ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise
            return
        log.info(
            "dispatcher.lease_released",
            owner=self.owner,
            epoch=self.epoch,
            state_machine_arn=self.config.pool,
        )


class Leases:
    """The leases of every state machine a process governs: it leads only while it holds
    them all. Taken in a fixed (ARN) order, all or none."""

    def __init__(
        self,
        dynamodb: DynamoDBClient,
        table: str,
        keys: Iterable[str],
        *,
        ttl: float,
        margin: float,
        start_timeout: float,
        start_grace: float,
        owner: str | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.owner = owner or new_owner_id()
        self.items = [
            Lease(
                dynamodb,
                LeaseConfig(table, key, ttl, margin, start_timeout, start_grace),
                owner=self.owner,
                monotonic=monotonic,
                wall=wall,
            )
            for key in sorted(set(keys))
        ]
        if not self.items:
            raise ValueError("a lease needs at least one state machine")
        self.config = self.items[0].config  # ttl, margin, renewal: the same for every item

    @property
    def epoch(self) -> int:
        """The highest epoch held (with one state machine: its epoch)."""
        return max(lease.epoch for lease in self.items)

    @property
    def epochs(self) -> dict[str, int]:
        """State machine ARN -> the epoch of its lease."""
        return {lease.config.pool: lease.epoch for lease in self.items}

    @property
    def owed(self) -> float:
        """The longest wait a predecessor's recorded settings oblige."""
        return max(lease.owed for lease in self.items)

    def valid(self) -> bool:
        """Whether this process may start executions right now: every lease is valid."""
        return all(lease.valid() for lease in self.items)

    def remaining(self) -> float:
        """Seconds until the first lease lapses (negative once one has)."""
        return min(lease.remaining() for lease in self.items)

    def lapse(self) -> None:
        """Stop trusting every lease now."""
        for lease in self.items:
            lease.lapse()

    def settled(self) -> None:
        """The predecessors were waited out (see `Lease.settled`)."""
        for lease in self.items:
            lease.settled()

    async def try_acquire(self) -> bool:
        """Take every lease, in ARN order; if one is held elsewhere, give back those taken
        in this attempt and return False."""
        taken: list[Lease] = []
        try:
            for lease in self.items:
                if not await lease.try_acquire():
                    await self._give_back(taken, why=f"{lease.config.pool} is held by another")
                    return False
                taken.append(lease)
        except BaseException:
            await self._give_back(taken, why="the lease table did not answer")
            raise
        return True

    async def _give_back(self, taken: list[Lease], *, why: str) -> None:
        if not taken:
            return
        log.info(
            "dispatcher.lease_partial", why=why, given_back=[lease.config.pool for lease in taken]
        )
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.config.renew_timeout):
            for lease in reversed(taken):
                try:
                    await lease.release()
                except Exception as exc:  # noqa: BLE001 - it lapses on its own within the TTL
                    log.warning("dispatcher.lease_release_failed", error=str(exc))

    @property
    def unsure_before(self) -> float:
        """The latest `Lease.unsure_before` of the items."""
        return max(lease.unsure_before for lease in self.items)

    @property
    def handed(self) -> dict[str, Tokens]:
        """State machine ARN -> the tokens its item carried when it was taken."""
        return {lease.config.pool: lease.handed for lease in self.items}

    def pass_on(self, tokens: Callable[[str], Tokens] | None) -> None:
        """Write ``tokens(state machine ARN)`` into each item when they change (None: stop)."""
        for lease in self.items:
            pool = lease.config.pool
            lease.tokens = None if tokens is None else functools.partial(tokens, pool)

    async def renew(self) -> bool:
        """Renew every lease; False (and every lease lapsed) once one is lost."""
        for lease in self.items:
            if not await lease.renew():
                self.lapse()
                return False
        return True

    async def release(self) -> None:
        """Give every lease back (shutdown, or the reign is over)."""
        for lease in reversed(self.items):
            await lease.release()


def _num(item: Mapping[str, Any], name: str) -> float:
    try:
        return float(item[name]["N"])
    except (KeyError, TypeError, ValueError):
        return 0.0


def _text(item: Mapping[str, Any], name: str) -> str | None:
    value = item.get(name)
    return None if value is None else str(value.get("S"))


def _tokens_of(item: Mapping[str, Any]) -> Tokens:
    """The tokens an item carries (none when it carries none, or not as written here)."""
    try:
        pairs = json.loads(_text(item, "tokens") or "[]")
        return [(str(token), str(arn)) for token, arn in pairs][:MAX_TOKENS]
    except (TypeError, ValueError):
        return []


def _number(value: float) -> str:
    return f"{value:.3f}"
