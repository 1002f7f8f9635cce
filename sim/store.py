"""Simulated SSM parameters and DynamoDB tables (the lease's conditional writes)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from sim.calls import Answer, aws_error
from sim.expressions import Context, Item, apply_update, evaluate_condition
from sim.history import OUTSIDE, History


@dataclass(slots=True)
class Parameter:
    """One SSM String parameter."""

    name: str
    value: str
    version: int
    modified: float


class _Service:
    """What every simulated service holds: the clocks, the history, where it is."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        history: History,
        wall: Callable[[float], float],
        region: str,
        account: str,
    ) -> None:
        self._clock = clock
        self._history = history
        self._wall = wall
        self.region = region
        self.account = account


class SSM(_Service):
    """SSM Parameter Store: String parameters, versioned."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.parameters: dict[str, Parameter] = {}

    def put(self, name: str, value: str) -> int:
        """PutParameter (overwrite): returns the new version."""
        now = self._clock()
        previous = self.parameters.get(name)
        version = previous.version + 1 if previous else 1
        self.parameters[name] = Parameter(name, value, version, now)
        self._history.parameter_put(now, name, value, version)
        return version

    def get_parameter(self, name: str) -> Answer:
        """GetParameter."""
        parameter = self.parameters.get(name)
        if parameter is None:
            raise aws_error("ParameterNotFound", f"Parameter {name} not found.", "GetParameter")
        path = name if name.startswith("/") else "/" + name
        return {
            "Parameter": {
                "Name": name,
                "Type": "String",
                "Value": parameter.value,
                "Version": parameter.version,
                "LastModifiedDate": datetime.fromtimestamp(self._wall(parameter.modified), tz=UTC),
                "ARN": f"arn:aws:ssm:{self.region}:{self.account}:parameter{path}",
                "DataType": "text",
            }
        }


@dataclass(slots=True)
class Table:
    """A DynamoDB table keyed by one string hash key."""

    name: str
    key: str
    created: float
    items: dict[str, Item] = field(default_factory=dict)


_RETURN_VALUES = ("NONE", "ALL_OLD", "UPDATED_OLD", "ALL_NEW", "UPDATED_NEW")


class DynamoDB(_Service):
    """Tables and UpdateItem with conditions, atomic (one event loop)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tables: dict[str, Table] = {}

    def create_table(self, name: str, key: str = "pool") -> None:
        """Create a table with a string hash key."""
        self.tables[name] = Table(name, key, self._clock())

    def _table(self, name: str, op: str) -> Table:
        table = self.tables.get(name)
        if table is None:
            raise aws_error("ResourceNotFoundException", "Requested resource not found", op)
        return table

    def _key(self, table: Table, key: Mapping[str, Mapping[str, Any]], op: str) -> str:
        if set(key) != {table.key} or set(key[table.key]) != {"S"}:
            raise aws_error(
                "ValidationException", "The provided key element does not match the schema", op
            )
        return str(key[table.key]["S"])

    def update_item(
        self,
        node: str,
        *,
        table_name: str,
        key: Mapping[str, Mapping[str, Any]],
        update: str | None,
        condition: str | None,
        names: Mapping[str, str] | None,
        values: Mapping[str, Mapping[str, Any]] | None,
        return_values: str,
    ) -> Answer:
        """UpdateItem with a ConditionExpression and ``SET`` clauses."""
        op = "UpdateItem"
        table = self._table(table_name, op)
        hash_key = self._key(table, key, op)
        if return_values not in _RETURN_VALUES:
            raise aws_error("ValidationException", f"Invalid ReturnValues: {return_values}", op)
        ctx = Context(names or {}, values or {})
        old = table.items.get(hash_key)
        current: Item = old if old is not None else {}
        holds = evaluate_condition(condition, current, ctx) if condition else True
        base = {k: dict(v) for k, v in current.items()}
        base[table.key] = {"S": hash_key}
        new = apply_update(update, base, ctx, table.key) if update else base
        ctx.check_all_used()
        if not holds:
            raise aws_error("ConditionalCheckFailedException", "The conditional request failed", op)
        table.items[hash_key] = new
        self._record_lease(node, table, hash_key, old, new)
        if return_values == "ALL_NEW":
            return {"Attributes": {k: dict(v) for k, v in new.items()}}
        if return_values == "ALL_OLD":
            return {"Attributes": {k: dict(v) for k, v in (old or {}).items()}} if old else {}
        changed = {k for k in new if (old or {}).get(k) != new[k]}
        if return_values == "UPDATED_NEW":
            return {"Attributes": {k: dict(new[k]) for k in changed}}
        if return_values == "UPDATED_OLD":
            return {"Attributes": {k: dict(old[k]) for k in changed if old and k in old}}
        return {}

    def get_item(self, table_name: str, key: Mapping[str, Mapping[str, Any]]) -> Answer:
        """GetItem (always consistent here)."""
        table = self._table(table_name, "GetItem")
        item = table.items.get(self._key(table, key, "GetItem"))
        return {"Item": {k: dict(v) for k, v in item.items()}} if item is not None else {}

    def describe_table(self, name: str) -> Answer:
        """DescribeTable."""
        table = self._table(name, "DescribeTable")
        return {
            "Table": {
                "TableName": table.name,
                "TableArn": f"arn:aws:dynamodb:{self.region}:{self.account}:table/{table.name}",
                "TableStatus": "ACTIVE",
                "KeySchema": [{"AttributeName": table.key, "KeyType": "HASH"}],
                "AttributeDefinitions": [{"AttributeName": table.key, "AttributeType": "S"}],
                "BillingModeSummary": {"BillingMode": "PAY_PER_REQUEST"},
                "ItemCount": len(table.items),
                "CreationDateTime": datetime.fromtimestamp(self._wall(table.created), tz=UTC),
            }
        }

    def _record_lease(
        self, node: str, table: Table, hash_key: str, old: Item | None, new: Item
    ) -> None:
        """A write of a lease item (owner, epoch, expires_at): taken, renewed or released."""
        owner = new.get("owner", {}).get("S")
        epoch = _number(new.get("epoch"))
        expires = _number(new.get("expires_at"))
        if owner is None or epoch is None or expires is None:
            return
        old_epoch = _number((old or {}).get("epoch"))
        old_owner = (old or {}).get("owner", {}).get("S")
        if old_epoch != epoch or old_owner != owner:
            what = "taken"
        elif expires <= 0:
            what = "released"
        else:
            what = "renewed"
        self._history.lease_written(
            self._clock(),
            node if node else OUTSIDE,
            table=table.name,
            pool=hash_key,
            owner=str(owner),
            epoch=int(epoch),
            expires_at=float(expires),
            what=what,
        )


def _number(value: Mapping[str, Any] | None) -> Decimal | None:
    if value is None or "N" not in value:
        return None
    try:
        return Decimal(str(value["N"]))
    except InvalidOperation:
        return None
