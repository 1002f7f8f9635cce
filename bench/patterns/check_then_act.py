"""Pattern 2, check-then-act: the original proposal, faithfully.

Four concurrent consumers (Lambda invocations with batch size 1), each with its own
clients: receive one request, sleep a random 0.1-1.0 s of jitter, count
``ListExecutions(statusFilter=RUNNING)`` - first page only, AWS's default page size of 100
- and start the execution if the count is below the threshold; otherwise leave the
message, which SQS redelivers once its visibility timeout (2 s here, so the run is not
absurdly slow) has passed. Nothing serialises the four checks: that is the race.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import anyio
from botocore.exceptions import ClientError

from bench.aws import CallCounter, config, session
from bench.patterns import PatternRun, collect, wait_finished
from bench.workload import Request, submit
from dispatcher.sandbox import provision

NAME = "check-then-act"
CONSUMERS = 4
VISIBILITY_TIMEOUT = 2
JITTER = (0.1, 1.0)
PAGE_SIZE = 100  # ListExecutions' default maxResults on AWS; only this page is counted


class _Consumers:
    """Shared state of the four consumers."""

    def __init__(self, endpoint: str, queue_url: str, machine_arn: str, limit: int) -> None:
        self.endpoint = endpoint
        self.queue_url = queue_url
        self.machine_arn = machine_arn
        self.limit = limit
        self.counter = CallCounter()
        self.started: set[str] = set()
        self.deferred = 0
        self.duplicates = 0
        self.expected = 0
        self.done = anyio.Event()

    async def consume(self, seed: int) -> None:
        rng = random.Random(seed)
        async with (
            session().client("sqs", endpoint_url=self.endpoint, config=config(2)) as sqs,
            session().client("stepfunctions", endpoint_url=self.endpoint, config=config(2)) as sfn,
        ):
            self.counter.attach(sqs)
            self.counter.attach(sfn)
            while not self.done.is_set():
                got = await sqs.receive_message(
                    QueueUrl=self.queue_url,
                    MaxNumberOfMessages=1,
                    WaitTimeSeconds=1,
                    VisibilityTimeout=VISIBILITY_TIMEOUT,
                    MessageAttributeNames=["All"],
                )
                messages = got.get("Messages", [])
                if not messages:
                    continue
                message = messages[0]
                key = message["MessageAttributes"]["idempotency-key"]["StringValue"]
                await anyio.sleep(rng.uniform(*JITTER))
                page = await sfn.list_executions(
                    stateMachineArn=self.machine_arn, statusFilter="RUNNING", maxResults=PAGE_SIZE
                )
                if len(page["executions"]) >= self.limit:
                    self.deferred += 1  # left for redelivery after the visibility timeout
                    continue
                try:
                    await sfn.start_execution(
                        stateMachineArn=self.machine_arn, name=key, input=message["Body"]
                    )
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") != "ExecutionAlreadyExists":
                        raise
                    self.duplicates += 1  # a redelivered copy of a request already started
                await sqs.delete_message(
                    QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"]
                )
                self.started.add(key)
                if len(self.started) >= self.expected:
                    self.done.set()


async def run(
    endpoint: str, requests: Sequence[Request], limit: int, *, within: float
) -> PatternRun:
    """Run the four consumers until every request started (or ``within`` seconds passed)."""
    # Requests are left and redelivered many times: never let them reach the DLQ.
    resources = await provision(
        endpoint, prefix="cmp-check-then-act", limit=limit, max_receive_count=1000
    )
    consumers = _Consumers(
        endpoint, resources.request_queue_url, resources.state_machine_arn, limit
    )
    consumers.expected = len(requests)
    async with anyio.create_task_group() as tg:
        for i in range(CONSUMERS):
            tg.start_soon(consumers.consume, 1000 + i)
        submitted = await submit(resources.request_queue_url, requests, endpoint)
        with anyio.move_on_after(within):
            await consumers.done.wait()
        consumers.done.set()
    async with session().client("stepfunctions", endpoint_url=endpoint) as sfn:
        await wait_finished(sfn, resources.state_machine_arn, within=30)
        _, traces, work, lives = await collect(
            sfn, resources.state_machine_arn, with_work_state=False
        )
    complete = len(work) == len(requests)
    notes = [
        f"{CONSUMERS} consumers, batch size 1, jitter {JITTER[0]}-{JITTER[1]} s, "
        f"ListExecutions(RUNNING) first page of {PAGE_SIZE}, visibility timeout "
        f"{VISIBILITY_TIMEOUT} s",
        "MiniStack's ListExecutions is immediately consistent (AWS: eventually), which "
        "flatters this pattern: on AWS the count can also be stale",
    ]
    if not complete:
        notes.append(f"stopped after {within:.0f} s with {len(work)} of {len(requests)} done")
    return PatternRun(
        name=NAME,
        title="check-then-act (ListExecutions)",
        limit=limit,
        requests=len(requests),
        submitted=submitted,
        work=work,
        executions=lives,
        calls=consumers.counter.calls,
        traces=traces,
        complete=complete,
        notes=notes,
        extra={"deferred": consumers.deferred, "duplicate_starts": consumers.duplicates},
    )
