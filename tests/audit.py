"""Judge a run from the executions' own records, not from the dispatcher's opinion of itself."""

from __future__ import annotations

import json
import random
from typing import TYPE_CHECKING, Any

from devtools.polling import wait_until
from devtools.records import Execution, list_executions, max_overlap
from devtools.sandbox.provision import SandboxResources
from dispatcher.daemon.service import Dispatcher
from tests.helpers import depth, session

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_stepfunctions import SFNClient


async def drain(sqs: SQSClient, url: str) -> list[dict[str, Any]]:
    """Receive (and delete) every visible message of a queue."""
    out: list[dict[str, Any]] = []
    while True:
        got = await sqs.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=0,
            MessageAttributeNames=["All"],
            MessageSystemAttributeNames=["All"],
        )
        messages = got.get("Messages", [])
        if not messages:
            return out
        out.extend(dict(m) for m in messages)
        await sqs.delete_message_batch(
            QueueUrl=url,
            Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)
            ],
        )


async def send_requests(
    sqs: SQSClient,
    url: str,
    bodies: list[dict[str, Any] | str],
    keys: list[str | None] | None = None,
) -> list[str]:
    """Send requests in batches of ten; return the execution name each maps to."""
    names: list[str] = []
    keys = keys if keys is not None else [None] * len(bodies)
    for start in range(0, len(bodies), 10):
        entries: list[Any] = []
        for i in range(start, min(start + 10, len(bodies))):
            body = bodies[i]
            entry: dict[str, Any] = {
                "Id": str(i),
                "MessageBody": body if isinstance(body, str) else json.dumps(body),
            }
            if keys[i] is not None:
                entry["MessageAttributes"] = {
                    "idempotency-key": {"DataType": "String", "StringValue": keys[i]}
                }
            entries.append(entry)
        result = await sqs.send_message_batch(QueueUrl=url, Entries=entries)
        assert not result.get("Failed"), result.get("Failed")
        by_id = {s["Id"]: s["MessageId"] for s in result["Successful"]}
        names.extend(keys[int(e["Id"])] or by_id[e["Id"]] for e in entries)
    return names


async def all_done(
    sfn: SFNClient, sqs: SQSClient, sm_arn: str, queue: str, names: set[str]
) -> bool:
    """Every expected execution exists and has ended, and the request queue is empty."""
    executions = await list_executions(sfn, sm_arn)
    ended = {e.name for e in executions if e.status != "RUNNING"}
    return names <= ended and await depth(sqs, queue) == 0


def workload(n: int, low: float, high: float, seed: int = 7) -> list[dict[str, Any] | str]:
    """``n`` demo-machine inputs waiting ``low``-``high`` seconds on average, in whole seconds.

    AWS reads a Wait state's ``SecondsPath`` as an integer (moto fails ``2.0`` at once), so
    each draw is rounded down or up at random, in proportion: the mean wait stays the same.
    """
    rng = random.Random(seed)
    out: list[dict[str, Any] | str] = []
    for _ in range(n):
        wait = rng.uniform(low, high)
        whole = int(wait)
        out.append({"seconds": whole + (rng.random() < wait - whole)})
    return out


async def verdict(
    resources: SandboxResources, names: list[str], limit: int, *, within: float
) -> None:
    """Wait until every request ran, then check the records: limit, exactly once, queue empty."""
    async with (
        session().client("stepfunctions", endpoint_url=resources.endpoint) as sfn,
        session().client("sqs", endpoint_url=resources.endpoint) as sqs,
    ):
        expected = set(names)

        async def done() -> bool:
            return await all_done(
                sfn, sqs, resources.state_machine_arn, resources.request_queue_url, expected
            )

        await wait_until(done, within=within)
        executions = await list_executions(sfn, resources.state_machine_arn)
        started = [e.name for e in executions]
        assert sorted(started) == sorted(expected), "every request started exactly once"
        peak = max_overlap(executions)
        assert peak <= limit, "over the limit: " + "; ".join(
            f"{e.name} {e.start:.3f}-{e.stop or 0:.3f}"
            for e in sorted(executions, key=lambda e: e.start)
        )
        assert await depth(sqs, resources.request_queue_url) == 0


async def no_slot_leaked(dispatcher: Dispatcher) -> None:
    """Once everything has ended, the ledger frees every slot (through events or reconcile)."""
    ledger = dispatcher.pool.ledger

    async def empty() -> bool:
        return ledger.running_count == 0

    await wait_until(empty, within=30, interval=0.05)


__all__ = ["Execution", "list_executions", "max_overlap", "session"]
