"""How fast the dispatcher applies status events, against bare consumers of the same queue.

Every start costs two status events (RUNNING, then terminal), and a slot is only handed
over once its terminal event is applied, so the events loop bounds sustained throughput.
The events queue is filled with synthetic terminal events (executions the dispatcher
never started: each is applied as a tombstone), the dispatcher runs with limit 0 so that
intake stays idle, and the time to apply them all is compared with a bare
receive(10)-then-DeleteMessageBatch loop with one task and with four.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

from bench import prom
from bench.aws import session
from bench.capacity import drain_rate
from bench.child import dispatcher_child
from devtools.polling import wait_until
from devtools.sandbox import SandboxResources
from dispatcher.producer import SubmitItem, submit_requests

DETAIL_TYPE = "Step Functions Execution Status Change"


def status_event(machine_arn: str, name: str) -> str:
    """An EventBridge envelope as Step Functions sends it for a SUCCEEDED execution."""
    now_ms = int(time.time() * 1000)
    execution_arn = machine_arn.replace(":stateMachine:", ":execution:") + ":" + name
    return json.dumps(
        {
            "version": "0",
            "id": str(uuid.uuid4()),
            "detail-type": DETAIL_TYPE,
            "source": "aws.states",
            "account": "000000000000",
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "region": "us-east-1",
            "resources": [execution_arn],
            "detail": {
                "executionArn": execution_arn,
                "stateMachineArn": machine_arn,
                "name": name,
                "status": "SUCCEEDED",
                "startDate": now_ms - 1000,
                "stopDate": now_ms,
                "input": "{}",
                "output": "{}",
                "redriveCount": 0,
            },
        }
    )


async def _fill(resources: SandboxResources, queue_url: str, count: int, tag: str) -> None:
    def items() -> Iterator[SubmitItem]:
        for i in range(count):
            yield SubmitItem(status_event(resources.state_machine_arn, f"{tag}-{i:06d}"))

    report = await submit_requests(queue_url, items(), endpoint_url=resources.endpoint)
    if not report.ok:
        raise RuntimeError(f"filling the events queue failed: {report.summary()}")


async def run(resources: SandboxResources, count: int) -> dict[str, Any]:
    """Events per second: the dispatcher's loop, and bare loops of one and four tasks."""
    await _fill(resources, resources.events_queue_url, count, "dispatcher")
    async with dispatcher_child(resources, {"limit": 0}) as child:
        began, cpu = time.perf_counter(), child.sample().cpu_seconds

        async def applied() -> bool:
            return prom.total(await child.metrics(), "dispatcher_events_total") >= count

        await wait_until(applied, within=300, interval=0.25)
        elapsed = time.perf_counter() - began
        cpu = child.sample().cpu_seconds - cpu
    bare = []
    for tasks in (1, 4):
        # A queue of its own: the dispatcher may have left a batch in flight when it stopped.
        async with session().client("sqs", endpoint_url=resources.endpoint) as sqs:
            url = (await sqs.create_queue(QueueName=f"{resources.prefix}-bare-{tasks}"))["QueueUrl"]
        await _fill(resources, url, count, f"bare{tasks}")
        bare.append(await drain_rate(resources.endpoint, url, count, tasks))
    return {
        "events": count,
        "dispatcher_events_per_second": round(count / elapsed, 1),
        "dispatcher_cpu_ms_per_event": round(cpu / count * 1000, 3),
        "bare_loop_1_task_per_second": bare[0]["per_second"],
        "bare_loop_4_tasks_per_second": bare[1]["per_second"],
        "note": "each execution needs 2 events; the dispatcher's single events loop receives "
        "10, applies them, deletes the batch, and only then receives again",
    }
