"""Single active dispatcher per pool (invariant 8): an optional DynamoDB lease.

One item per pool: ``{pool, owner, epoch, expires_at}``. Taking the lease is a
conditional write that succeeds only when the item is free, expired, or already ours; a
take-over increments ``epoch`` (the fencing token that names each reign in logs and
metrics). Renewal is conditional on owner *and* epoch, well inside the TTL.

Step Functions has no conditional start, so the guarantee is about time: the holder
counts its lease valid only until ``sent + ttl - margin`` on its own monotonic clock,
where ``sent`` is when the winning write was *sent*. Nobody else can take it before
``expires_at = written_at + ttl`` on DynamoDB's side, which is later. A holder that is
paused or cut off therefore stops starting before another can begin (given clock skew
between hosts below ``margin``).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
from botocore.exceptions import ClientError

from dispatcher.aws import error_code

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient

log = structlog.get_logger("dispatcher.lease")


@dataclass(frozen=True)
class LeaseConfig:
    """Where the lease lives and how long it lasts."""

    table: str
    pool: str
    ttl: float = 15.0
    margin: float = 3.0  # stop using the lease this long before it can expire elsewhere

    @property
    def renew_every(self) -> float:
        """Renewal interval: a third of the TTL, so two renewals may fail before expiry."""
        return self.ttl / 3


def new_owner_id() -> str:
    """A name for this process, unique across hosts and restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease:
    """Take, renew and release the lease of one pool; ``valid()`` answers without I/O."""

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
        self._valid_until = float("-inf")
        self._monotonic = monotonic
        self._wall = wall

    def valid(self) -> bool:
        """Whether this process may start executions right now."""
        return self._monotonic() < self._valid_until

    def remaining(self) -> float:
        """Seconds of validity left (negative once expired)."""
        return self._valid_until - self._monotonic()

    async def try_acquire(self) -> bool:
        """Take the lease if it is free, expired or ours. Returns whether we hold it now."""
        sent = self._monotonic()
        now = self._wall()
        try:
            result = await self.dynamodb.update_item(
                TableName=self.config.table,
                Key={"pool": {"S": self.config.pool}},
                UpdateExpression=(
                    "SET #owner = :me, expires_at = :expires, "
                    "epoch = if_not_exists(epoch, :zero) + :one"
                ),
                ConditionExpression=(
                    "attribute_not_exists(#pool) OR expires_at < :now OR #owner = :me"
                ),
                ExpressionAttributeNames={"#owner": "owner", "#pool": "pool"},
                ExpressionAttributeValues={
                    ":me": {"S": self.owner},
                    ":expires": {"N": _number(now + self.config.ttl)},
                    ":now": {"N": _number(now)},
                    ":zero": {"N": "0"},
                    ":one": {"N": "1"},
                },
                ReturnValues="ALL_NEW",
            )
        except ClientError as exc:
            if error_code(exc) == "ConditionalCheckFailedException":
                return False
            raise
        self.epoch = int(result["Attributes"]["epoch"]["N"])
        self._valid_until = sent + self.config.ttl - self.config.margin
        log.info("dispatcher.lease_acquired", owner=self.owner, epoch=self.epoch)
        return True

    async def renew(self) -> bool:
        """Extend our reign; False once someone else holds it (or we never did)."""
        sent = self._monotonic()
        now = self._wall()
        try:
            await self.dynamodb.update_item(
                TableName=self.config.table,
                Key={"pool": {"S": self.config.pool}},
                UpdateExpression="SET expires_at = :expires",
                ConditionExpression="#owner = :me AND epoch = :epoch",
                ExpressionAttributeNames={"#owner": "owner"},
                ExpressionAttributeValues={
                    ":me": {"S": self.owner},
                    ":epoch": {"N": str(self.epoch)},
                    ":expires": {"N": _number(now + self.config.ttl)},
                },
            )
        except ClientError as exc:
            if error_code(exc) == "ConditionalCheckFailedException":
                self._valid_until = float("-inf")
                log.warning("dispatcher.lease_lost", owner=self.owner, epoch=self.epoch)
                return False
            raise
        self._valid_until = sent + self.config.ttl - self.config.margin
        return True

    async def release(self) -> None:
        """Give the lease up at shutdown so a successor need not wait for the TTL."""
        self._valid_until = float("-inf")
        try:
            await self.dynamodb.update_item(
                TableName=self.config.table,
                Key={"pool": {"S": self.config.pool}},
                UpdateExpression="SET expires_at = :zero",
                ConditionExpression="#owner = :me AND epoch = :epoch",
                ExpressionAttributeNames={"#owner": "owner"},
                ExpressionAttributeValues={
                    ":me": {"S": self.owner},
                    ":epoch": {"N": str(self.epoch)},
                    ":zero": {"N": "0"},
                },
            )
        except ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise
        log.info("dispatcher.lease_released", owner=self.owner, epoch=self.epoch)


def _number(value: float) -> str:
    return f"{value:.3f}"
