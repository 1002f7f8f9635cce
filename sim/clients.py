"""Client objects with botocore's method and keyword names, one per service and node.

Every method goes through `Transport.call` (faults, latency, timeouts). Arguments are
keyword-only and spelt as botocore spells them: a misspelt or missing one is a
``TypeError``, a value of the wrong type or a batch entry with an unknown key a
``ParamValidationError``, as botocore raises before sending.
"""

# ruff: noqa: N803 - the clients take botocore's keyword names (QueueUrl, stateMachineArn)
from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from botocore.exceptions import OperationNotPageableError, ParamValidationError

from sim.calls import Answer, Apply
from sim.history import short

if TYPE_CHECKING:
    from sim.aws import World


def now_apply(step: Callable[[], Answer]) -> Apply:
    """An effect applied in one step when the request arrives."""

    async def apply(deadline: float) -> Answer:
        del deadline
        return step()

    return apply


def check_types(params: Mapping[str, Any], types: Mapping[str, type | tuple[type, ...]]) -> None:
    """Refuse a parameter of the wrong type, as botocore does before sending."""
    for name, expected in types.items():
        value = params.get(name)
        if value is None:
            continue
        if (isinstance(value, bool) and expected is int) or not isinstance(value, expected):
            raise ParamValidationError(
                report=f"Invalid type for parameter {name}, value: {value!r}, "
                f"type: {type(value)}, valid types: {expected}"
            )


def check_entries(
    name: str, entries: Any, required: Iterable[str], optional: Iterable[str] = ()
) -> list[Mapping[str, Any]]:
    """Refuse batch entries with a missing or unknown key, as botocore does."""
    if not isinstance(entries, list | tuple):
        raise ParamValidationError(report=f"Invalid type for parameter {name}: {entries!r}")
    allowed = set(required) | set(optional)
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise ParamValidationError(report=f"Invalid type for parameter {name}[{i}]")
        for key in required:
            if key not in entry:
                raise ParamValidationError(
                    report=f'Missing required parameter in {name}[{i}]: "{key}"'
                )
        for key in entry:
            if key not in allowed:
                raise ParamValidationError(
                    report=f'Unknown parameter in {name}[{i}]: "{key}", must be one of: '
                    + ", ".join(sorted(allowed))
                )
    return list(entries)


def check_attributes(name: str, attributes: Any) -> None:
    """Refuse message attributes without a DataType or with an unknown key."""
    if attributes is None:
        return
    if not isinstance(attributes, Mapping):
        raise ParamValidationError(report=f"Invalid type for parameter {name}")
    allowed = {"StringValue", "BinaryValue", "StringListValues", "BinaryListValues", "DataType"}
    for key, value in attributes.items():
        if not isinstance(value, Mapping) or "DataType" not in value:
            raise ParamValidationError(
                report=f'Missing required parameter in {name}.{key}: "DataType"'
            )
        for field in value:
            if field not in allowed:
                raise ParamValidationError(
                    report=f'Unknown parameter in {name}.{key}: "{field}", must be one of: '
                    + ", ".join(sorted(allowed))
                )


def given(**params: Any) -> dict[str, Any]:
    """The parameters a caller gave (botocore does not send None)."""
    return {k: v for k, v in params.items() if v is not None}


class Client:
    """What every simulated client shares: its node, timeouts and the call path."""

    service = ""
    host = ""

    def __init__(self, world: World, node: str, *, read_timeout: float, max_attempts: int) -> None:
        self._world = world
        self.node = node
        self.read_timeout = read_timeout
        self.max_attempts = max_attempts
        self.endpoint = f"https://{self.host}.{world.config.region}.amazonaws.com/"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    async def close(self) -> None:
        """Nothing to close: no connections."""

    async def _call(
        self, operation: str, params: Mapping[str, Any], apply: Apply, summary: str = ""
    ) -> Answer:
        return await self._world.transport.call(
            self.node,
            operation,
            params,
            apply,
            summary=summary,
            read_timeout=self.read_timeout,
            endpoint=self.endpoint,
            max_attempts=self.max_attempts,
        )


class SFNClient(Client):
    """Step Functions, as ``session.client("stepfunctions")``."""

    service = "stepfunctions"
    host = "states"

    async def start_execution(
        self,
        *,
        stateMachineArn: str,
        name: str | None = None,
        input: str | None = None,
        traceHeader: str | None = None,
    ) -> Answer:
        """StartExecution."""
        params = given(
            stateMachineArn=stateMachineArn, name=name, input=input, traceHeader=traceHeader
        )
        check_types(params, {"stateMachineArn": str, "name": str, "input": str, "traceHeader": str})
        sfn = self._world.sfn
        return await self._call(
            "StartExecution",
            params,
            now_apply(
                lambda: sfn.start_execution(
                    self.node, stateMachineArn, name, "{}" if input is None else input, traceHeader
                )
            ),
            f"name={name}",
        )

    async def describe_execution(
        self, *, executionArn: str, includedData: str | None = None
    ) -> Answer:
        """DescribeExecution."""
        params = given(executionArn=executionArn, includedData=includedData)
        check_types(params, {"executionArn": str})
        sfn = self._world.sfn
        return await self._call(
            "DescribeExecution",
            params,
            now_apply(lambda: sfn.describe_execution(executionArn)),
            f"name={short(executionArn)}",
        )

    async def list_executions(
        self,
        *,
        stateMachineArn: str,
        statusFilter: str | None = None,
        maxResults: int | None = None,
        nextToken: str | None = None,
    ) -> Answer:
        """ListExecutions: one page."""
        params = given(
            stateMachineArn=stateMachineArn,
            statusFilter=statusFilter,
            maxResults=maxResults,
            nextToken=nextToken,
        )
        check_types(
            params,
            {"stateMachineArn": str, "statusFilter": str, "maxResults": int, "nextToken": str},
        )
        sfn = self._world.sfn
        summary = f"{short(stateMachineArn)} {statusFilter or 'ALL'}"
        return await self._call(
            "ListExecutions",
            params,
            now_apply(
                lambda: sfn.list_executions(
                    stateMachineArn, statusFilter, maxResults or 0, nextToken
                )
            ),
            summary + (" (next page)" if nextToken else ""),
        )

    def get_paginator(self, operation_name: str) -> ListExecutionsPaginator:
        """Only ``list_executions`` is paginated here."""
        if operation_name != "list_executions":
            raise OperationNotPageableError(operation_name=operation_name)
        return ListExecutionsPaginator(self)

    async def describe_state_machine(
        self, *, stateMachineArn: str, includedData: str | None = None
    ) -> Answer:
        """DescribeStateMachine."""
        params = given(stateMachineArn=stateMachineArn, includedData=includedData)
        check_types(params, {"stateMachineArn": str})
        sfn = self._world.sfn
        return await self._call(
            "DescribeStateMachine",
            params,
            now_apply(lambda: sfn.describe_state_machine(stateMachineArn)),
            short(stateMachineArn),
        )

    async def list_state_machines(
        self, *, maxResults: int | None = None, nextToken: str | None = None
    ) -> Answer:
        """ListStateMachines (every machine on one page)."""
        params = given(maxResults=maxResults, nextToken=nextToken)
        check_types(params, {"maxResults": int, "nextToken": str})
        sfn = self._world.sfn
        return await self._call("ListStateMachines", params, now_apply(sfn.list_state_machines))

    async def stop_execution(
        self, *, executionArn: str, error: str | None = None, cause: str | None = None
    ) -> Answer:
        """StopExecution."""
        params = given(executionArn=executionArn, error=error, cause=cause)
        check_types(params, {"executionArn": str, "error": str, "cause": str})
        sfn = self._world.sfn
        return await self._call(
            "StopExecution",
            params,
            now_apply(lambda: sfn.stop_execution(self.node, executionArn, error, cause)),
            f"name={short(executionArn)}",
        )

    async def send_task_success(self, *, taskToken: str, output: str) -> Answer:
        """SendTaskSuccess."""
        params = given(taskToken=taskToken, output=output)
        check_types(params, {"taskToken": str, "output": str})
        check_token(taskToken)
        tokens = self._world.tokens
        return await self._call(
            "SendTaskSuccess",
            params,
            now_apply(lambda: tokens.send_task_success(self.node, taskToken, output)),
            self._world.history.tokens.label(taskToken),
        )

    async def send_task_failure(
        self, *, taskToken: str, error: str | None = None, cause: str | None = None
    ) -> Answer:
        """SendTaskFailure."""
        params = given(taskToken=taskToken, error=error, cause=cause)
        check_types(params, {"taskToken": str, "error": str, "cause": str})
        check_token(taskToken)
        tokens = self._world.tokens
        return await self._call(
            "SendTaskFailure",
            params,
            now_apply(lambda: tokens.send_task_failure(self.node, taskToken, error, cause)),
            f"{self._world.history.tokens.label(taskToken)} error={error}",
        )

    async def send_task_heartbeat(self, *, taskToken: str) -> Answer:
        """SendTaskHeartbeat."""
        params = given(taskToken=taskToken)
        check_types(params, {"taskToken": str})
        check_token(taskToken)
        tokens = self._world.tokens
        return await self._call(
            "SendTaskHeartbeat",
            params,
            now_apply(lambda: tokens.send_task_heartbeat(self.node, taskToken)),
            self._world.history.tokens.label(taskToken),
        )


def check_token(token: str) -> None:
    """botocore checks a task token's minimum length (1) before sending."""
    if not token:
        raise ParamValidationError(
            report="Invalid length for parameter taskToken, value: 0, valid min length: 1"
        )


class ListExecutionsPaginator:
    """``paginate(...)`` yields pages; each page is its own ListExecutions call."""

    def __init__(self, client: SFNClient) -> None:
        self._client = client

    def paginate(
        self,
        *,
        stateMachineArn: str,
        statusFilter: str | None = None,
        PaginationConfig: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[Answer]:
        """Follow ``nextToken`` to the last page."""
        config = dict(PaginationConfig or {})
        for key in config:
            if key not in ("PageSize", "StartingToken", "MaxItems"):
                raise ParamValidationError(report=f"Unknown PaginationConfig key {key!r}")
        return self._pages(stateMachineArn, statusFilter, config)

    async def _pages(
        self, arn: str, status_filter: str | None, config: Mapping[str, Any]
    ) -> AsyncIterator[Answer]:
        token: str | None = config.get("StartingToken")
        left: int | None = config.get("MaxItems")
        while True:
            page = await self._client.list_executions(
                stateMachineArn=arn,
                statusFilter=status_filter,
                maxResults=config.get("PageSize"),
                nextToken=token,
            )
            token = page.get("nextToken")
            if left is not None:
                page["executions"] = page["executions"][:left]
                left -= len(page["executions"])
                if left <= 0:
                    page.pop("nextToken", None)
                    token = None
            yield page
            if not token:
                return


class SSMClient(Client):
    """SSM, as ``session.client("ssm")``."""

    service = "ssm"
    host = "ssm"

    async def get_parameter(self, *, Name: str, WithDecryption: bool | None = None) -> Answer:
        """GetParameter."""
        params = given(Name=Name, WithDecryption=WithDecryption)
        check_types(params, {"Name": str, "WithDecryption": bool})
        ssm = self._world.ssm
        return await self._call(
            "GetParameter", params, now_apply(lambda: ssm.get_parameter(Name)), Name
        )


class DynamoDBClient(Client):
    """DynamoDB, as ``session.client("dynamodb")``: what the lease needs."""

    service = "dynamodb"
    host = "dynamodb"

    async def update_item(
        self,
        *,
        TableName: str,
        Key: Mapping[str, Mapping[str, Any]],
        UpdateExpression: str | None = None,
        ConditionExpression: str | None = None,
        ExpressionAttributeNames: Mapping[str, str] | None = None,
        ExpressionAttributeValues: Mapping[str, Mapping[str, Any]] | None = None,
        ReturnValues: str | None = None,
    ) -> Answer:
        """UpdateItem with a condition."""
        params = given(
            TableName=TableName,
            Key=Key,
            UpdateExpression=UpdateExpression,
            ConditionExpression=ConditionExpression,
            ExpressionAttributeNames=ExpressionAttributeNames,
            ExpressionAttributeValues=ExpressionAttributeValues,
            ReturnValues=ReturnValues,
        )
        check_types(
            params,
            {
                "TableName": str,
                "Key": Mapping,
                "UpdateExpression": str,
                "ConditionExpression": str,
                "ExpressionAttributeNames": Mapping,
                "ExpressionAttributeValues": Mapping,
                "ReturnValues": str,
            },
        )
        db = self._world.dynamodb
        keys = ",".join(str(v.get("S", v)) for v in Key.values())
        return await self._call(
            "UpdateItem",
            params,
            now_apply(
                lambda: db.update_item(
                    self.node,
                    table_name=TableName,
                    key=Key,
                    update=UpdateExpression,
                    condition=ConditionExpression,
                    names=ExpressionAttributeNames,
                    values=ExpressionAttributeValues,
                    return_values=ReturnValues or "NONE",
                )
            ),
            f"{TableName} {keys}",
        )

    async def get_item(
        self,
        *,
        TableName: str,
        Key: Mapping[str, Mapping[str, Any]],
        ConsistentRead: bool | None = None,
    ) -> Answer:
        """GetItem."""
        params = given(TableName=TableName, Key=Key, ConsistentRead=ConsistentRead)
        check_types(params, {"TableName": str, "Key": Mapping, "ConsistentRead": bool})
        db = self._world.dynamodb
        return await self._call(
            "GetItem", params, now_apply(lambda: db.get_item(TableName, Key)), TableName
        )

    async def describe_table(self, *, TableName: str) -> Answer:
        """DescribeTable."""
        params = given(TableName=TableName)
        check_types(params, {"TableName": str})
        db = self._world.dynamodb
        return await self._call(
            "DescribeTable", params, now_apply(lambda: db.describe_table(TableName)), TableName
        )
