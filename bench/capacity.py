"""What the emulator and the client library can do on their own: the yardsticks.

`raw_capacity` is the emulator's ``StartExecution`` rate from a bare aioboto3 loop (no
queue, no bookkeeping); `delete_costs` compares the CPU (client and emulator) of deleting
messages one by one with deleting them in batches of ten; `drain_rate` is how fast a
bare receive-10-then-delete-batch loop empties a queue with one task or several.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiohttp
import anyio

from bench.aws import config, session
from bench.proc import sample
from dispatcher.aws.api import client_config
from dispatcher.aws.startclient import Signer

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient


async def _timed(
    caller: Callable[[], Coroutine[Any, Any, None]], count: int, tasks: int
) -> dict[str, Any]:
    """Run ``tasks`` copies of ``caller`` (which share ``count`` starts); rate and CPU."""
    cpu, began = time.process_time(), time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(tasks):
            tg.start_soon(caller)
    elapsed = time.perf_counter() - began
    cpu = time.process_time() - cpu
    return {
        "starts": count,
        "tasks": tasks,
        "seconds": round(elapsed, 3),
        "starts_per_second": round(count / elapsed, 1),
        "client_cpu_ms_per_start": round(cpu / count * 1000, 3),
    }


async def raw_capacity(
    endpoint: str, machine_arn: str, count: int, tag: str, tasks: int, *, tuned: bool = False
) -> dict[str, Any]:
    """StartExecution as fast as ``tasks`` concurrent callers can: with botocore's defaults,
    or (``tuned``) with the dispatcher's client options (fixed User-Agent, no client-side
    parameter validation; `dispatcher.aws.api.client_config`)."""
    body = json.dumps({"req": tag})
    numbers = iter(range(count))
    options = config(tasks)
    if tuned:
        options = options.merge(client_config())
    async with session().client("stepfunctions", endpoint_url=endpoint, config=options) as sfn:

        async def caller() -> None:
            for i in numbers:  # shared: each number is taken by exactly one caller
                await sfn.start_execution(
                    stateMachineArn=machine_arn, name=f"{tag}-{i:05d}", input=body
                )

        return await _timed(caller, count, tasks)


async def _fill(sqs: SQSClient, queue_url: str, count: int) -> list[str]:
    """Send ``count`` messages and receive them all; return their receipt handles."""
    for start in range(0, count, 10):
        await sqs.send_message_batch(
            QueueUrl=queue_url,
            Entries=[{"Id": str(i), "MessageBody": "{}"} for i in range(start, start + 10)],
        )
    handles: list[str] = []
    while len(handles) < count:
        got = await sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, VisibilityTimeout=600
        )
        handles += [m["ReceiptHandle"] for m in got.get("Messages", [])]
    return handles


async def _delete(sqs: SQSClient, queue_url: str, chunk: list[str]) -> None:
    if len(chunk) == 1:
        await sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=chunk[0])
    else:
        await sqs.delete_message_batch(
            QueueUrl=queue_url,
            Entries=[{"Id": str(i), "ReceiptHandle": h} for i, h in enumerate(chunk)],
        )


async def delete_costs(
    endpoint: str, queue_url: str, count: int, emulator_pid: int
) -> dict[str, Any]:
    """Client and emulator CPU per message: DeleteMessage vs DeleteMessageBatch of ten."""
    out: dict[str, Any] = {}
    async with session().client("sqs", endpoint_url=endpoint, config=config(8)) as sqs:
        for mode, size in (("DeleteMessage", 1), ("DeleteMessageBatch", 10)):
            handles = await _fill(sqs, queue_url, count)
            chunks = [handles[i : i + size] for i in range(0, len(handles), size)]
            cpu, began = time.process_time(), time.perf_counter()
            emulator_cpu = sample(emulator_pid).cpu_seconds
            limiter = anyio.CapacityLimiter(8)

            async def delete(chunk: list[str], limiter: anyio.CapacityLimiter = limiter) -> None:
                async with limiter:
                    await _delete(sqs, queue_url, chunk)

            async with anyio.create_task_group() as tg:
                for chunk in chunks:
                    tg.start_soon(delete, chunk)
            cpu = time.process_time() - cpu
            elapsed = time.perf_counter() - began
            emulator_cpu = sample(emulator_pid).cpu_seconds - emulator_cpu
            out[mode] = {
                "emulator_cpu_ms_per_message": round(emulator_cpu / len(handles) * 1000, 4),
                "messages": len(handles),
                "calls": len(chunks),
                "client_cpu_ms_per_message": round(cpu / len(handles) * 1000, 4),
                "wall_ms_per_message_8_concurrent": round(elapsed / len(handles) * 1000, 4),
            }
    return out


async def drain_rate(endpoint: str, queue_url: str, count: int, tasks: int) -> dict[str, Any]:
    """Messages per second that ``tasks`` receive(10)-then-DeleteMessageBatch loops consume."""
    done = 0
    finished = anyio.Event()
    async with session().client("sqs", endpoint_url=endpoint, config=config(tasks)) as sqs:

        async def consumer() -> None:
            nonlocal done
            while not finished.is_set():
                got = await sqs.receive_message(
                    QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1
                )
                messages = got.get("Messages", [])
                if messages:  # as the dispatcher's events loop does: always a batch
                    await sqs.delete_message_batch(
                        QueueUrl=queue_url,
                        Entries=[
                            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                            for i, m in enumerate(messages)
                        ],
                    )
                done += len(messages)
                if done >= count:
                    finished.set()

        began = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(tasks):
                tg.start_soon(consumer)
            await finished.wait()
            elapsed = time.perf_counter() - began
    return {"tasks": tasks, "messages": done, "per_second": round(done / elapsed, 1)}


async def sqs_cost_by_depth(
    endpoint: str, emulator_pid: int, depths: tuple[int, ...] = (300, 3000), calls: int = 100
) -> dict[str, Any]:
    """The emulator's CPU per ``ReceiveMessage`` of ten with ``depth`` messages waiting (the
    queue's depth held constant: received with visibility 0), and per
    ``DeleteMessageBatch`` of ten (30 calls, from that depth down): what a dispatcher
    start costs the emulator beyond the start itself depends on how deep the request queue
    is. Real SQS does not scan a queue per call; this emulator does."""
    out: dict[str, Any] = {}
    async with session().client("sqs", endpoint_url=endpoint, config=config(4)) as sqs:
        for depth in depths:
            url = (await sqs.create_queue(QueueName=f"bench-depth-{depth}"))["QueueUrl"]
            for _ in range(0, depth, 10):
                await sqs.send_message_batch(
                    QueueUrl=url,
                    Entries=[{"Id": str(i), "MessageBody": "{}"} for i in range(10)],
                )
            began = sample(emulator_pid).cpu_seconds
            for _ in range(calls):
                await sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=0)
            receive_cpu = sample(emulator_pid).cpu_seconds - began
            handles = await _fill_handles(sqs, url, 300)
            began = sample(emulator_pid).cpu_seconds
            for start in range(0, len(handles), 10):
                await _delete(sqs, url, handles[start : start + 10])
            delete_cpu = sample(emulator_pid).cpu_seconds - began
            await sqs.delete_queue(QueueUrl=url)
            out[f"depth_{depth}"] = {
                "emulator_cpu_ms_per_receive_of_10": round(receive_cpu / calls * 1000, 3),
                "emulator_cpu_ms_per_delete_batch_of_10": round(
                    delete_cpu / max(1, len(handles) // 10) * 1000, 3
                ),
            }
    return out


async def _fill_handles(sqs: SQSClient, queue_url: str, count: int) -> list[str]:
    """Receive (hide) ``count`` messages already in the queue; their receipt handles."""
    handles: list[str] = []
    while len(handles) < count:
        got = await sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, VisibilityTimeout=600
        )
        handles += [m["ReceiptHandle"] for m in got.get("Messages", [])]
    return handles[:count]


async def thin_capacity(
    endpoint: str, machine_arn: str, count: int, tag: str, tasks: int
) -> dict[str, Any]:
    """`raw_capacity` through a hand-written client (aiohttp, the dispatcher's `Signer`,
    json): what the call costs the client without botocore's per-request machinery."""
    region = machine_arn.split(":")[3]
    url = endpoint.rstrip("/") + "/"
    signer = Signer(url, region)  # the dispatcher's own signer
    numbers = iter(range(count))
    connector = aiohttp.TCPConnector(limit=tasks)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def caller() -> None:
            for i in numbers:
                body = json.dumps(
                    {
                        "stateMachineArn": machine_arn,
                        "name": f"{tag}-{i:05d}",
                        "input": json.dumps({"req": tag}),
                    }
                ).encode()
                # The emulator's fixed test credentials.
                headers = signer.headers(body, "test", "test", None, datetime.now(UTC))
                async with http.post(url, data=body, headers=headers) as response:
                    answer = json.loads(await response.read())
                    if response.status != 200 or "executionArn" not in answer:
                        raise RuntimeError(f"StartExecution refused: {answer}")

        return await _timed(caller, count, tasks)
