"""Pattern 2, check-then-act: the original proposal, as its template deploys it.

A Lambda function fed by the request queue (event source mapping, batch size 1). Each
invocation pays a per-invocation overhead, reads the threshold from SSM
(``GetParameter``), sleeps a random 0.1-1.0 s of jitter, counts
``ListExecutions(statusFilter=RUNNING)`` - first page only, AWS's default page size of 100
- and starts the execution if the count is below the threshold. Otherwise the invocation
fails and the message comes back after the queue's visibility timeout; after
``MAX_RECEIVE_COUNT`` receives SQS moves it to the dead-letter queue, and that request
never runs. Nothing serialises the checks: that is the race.

The event source mapping scales as AWS documents it (Lambda, "Configuring scaling
behavior for SQS event source mappings"): five concurrent invocations, then up to 300
more per minute while messages wait, here capped at ``MAX_CONCURRENCY`` (the mapping's
``MaximumConcurrency`` setting, 2-1,000). ``ListExecutions`` goes through the fault proxy,
which serves answers ``list_lag`` seconds old: AWS documents the call as eventually
consistent ("The results are best effort and may not reflect very recent updates and
changes", API reference, ListExecutions) and gives no bound, so the lag is swept.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

import anyio
from botocore.exceptions import ClientError

from bench.aws import CallCounter, config, session
from bench.patterns import PatternRun, collect, wait_finished
from bench.workload import Request, submit
from devtools.faults import FaultProxy
from devtools.sandbox import provision

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_sqs.type_defs import MessageTypeDef
    from types_aiobotocore_ssm import SSMClient
    from types_aiobotocore_stepfunctions import SFNClient

NAME = "check-then-act"
FUNCTION_TIMEOUT = 3  # s: Lambda's default; enough for the jitter, SSM, the listing and the start
VISIBILITY_TIMEOUT = 6 * FUNCTION_TIMEOUT  # AWS: at least six times the function timeout
MAX_RECEIVE_COUNT = 10  # the original template's redrive policy
INITIAL_CONCURRENCY = 5  # AWS: the mapping starts with five concurrent invocations
SCALE_UP_PER_MINUTE = 300  # AWS: up to 300 more per minute while messages are available
MAX_CONCURRENCY = 20  # the mapping's MaximumConcurrency: our choice (AWS allows 2-1,000)
INVOCATION_OVERHEAD = 0.025  # s per warm invocation (cold starts, 0.1-1 s, not modelled)
JITTER = (0.1, 1.0)
PAGE_SIZE = 100  # ListExecutions' default maxResults on AWS; only this page is counted


class _Function:
    """The Lambda function and its event source mapping: shared state of the invocations."""

    def __init__(
        self, endpoint: str, sfn_endpoint: str, queue_url: str, machine_arn: str, parameter: str
    ) -> None:
        self.endpoint = endpoint
        self.machine_arn = machine_arn
        self.parameter = parameter
        self.sfn_endpoint = sfn_endpoint
        self.queue_url = queue_url
        self.counter = CallCounter()
        self.started: set[str] = set()
        self.invocations = 0
        self.deferred = 0
        self.duplicates = 0
        self.pollers = 0
        self.peak_pollers = 0
        self.done = anyio.Event()

    async def poll(self, seed: int, sqs: SQSClient) -> None:
        """One concurrent invocation slot of the event source mapping."""
        rng = random.Random(seed)
        async with (
            session().client("ssm", endpoint_url=self.endpoint, config=config(2)) as ssm,
            session().client(
                "stepfunctions", endpoint_url=self.sfn_endpoint, config=config(2)
            ) as sfn,
        ):
            self.counter.attach(ssm)
            self.counter.attach(sfn)
            while not self.done.is_set():
                got = await sqs.receive_message(
                    QueueUrl=self.queue_url,
                    MaxNumberOfMessages=1,
                    WaitTimeSeconds=20,  # the event source mapping long-polls
                    MessageAttributeNames=["All"],
                )
                messages = got.get("Messages", [])
                if messages:
                    await self._invoke(rng, messages[0], sqs, ssm, sfn)

    async def _invoke(
        self,
        rng: random.Random,
        message: MessageTypeDef,
        sqs: SQSClient,
        ssm: SSMClient,
        sfn: SFNClient,
    ) -> None:
        self.invocations += 1
        await anyio.sleep(INVOCATION_OVERHEAD)
        threshold = int((await ssm.get_parameter(Name=self.parameter))["Parameter"]["Value"])
        key = message["MessageAttributes"]["idempotency-key"]["StringValue"]
        await anyio.sleep(rng.uniform(*JITTER))
        page = await sfn.list_executions(
            stateMachineArn=self.machine_arn, statusFilter="RUNNING", maxResults=PAGE_SIZE
        )
        if len(page["executions"]) >= threshold:
            # The function raises: the message returns after the visibility timeout.
            self.deferred += 1
            return
        try:
            await sfn.start_execution(
                stateMachineArn=self.machine_arn, name=key, input=message["Body"]
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ExecutionAlreadyExists":
                raise
            self.duplicates += 1  # a redelivered copy of a request already started
        await sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"])
        self.started.add(key)


async def _depth(sqs: SQSClient, queue_url: str) -> tuple[int, int]:
    """(visible, in flight) messages of a queue, as SQS approximates them."""
    got = await sqs.get_queue_attributes(
        QueueUrl=queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )
    attributes = got["Attributes"]
    return (
        int(attributes["ApproximateNumberOfMessages"]),
        int(attributes["ApproximateNumberOfMessagesNotVisible"]),
    )


async def run(
    endpoint: str,
    requests: Sequence[Request],
    limit: int,
    *,
    within: float,
    list_lag: float = 0.0,
) -> PatternRun:
    """Run the function until every request started or was dead-lettered (or time ran out)."""
    resources = await provision(
        endpoint,
        prefix="cmp-check-then-act",
        limit=limit,
        max_receive_count=MAX_RECEIVE_COUNT,
        visibility_timeout=VISIBILITY_TIMEOUT,
    )
    async with (
        FaultProxy(endpoint, list_lag=list_lag) as proxy,
        session().client("sqs", endpoint_url=endpoint, config=config(64)) as sqs,
        session().client("sqs", endpoint_url=endpoint) as watcher,  # the driver's, not counted
    ):
        function = _Function(
            endpoint,
            proxy.url,
            resources.request_queue_url,
            resources.state_machine_arn,
            resources.limit_parameter,
        )
        function.counter.attach(sqs)
        dead = 0
        async with anyio.create_task_group() as tg:

            def add_poller() -> None:
                tg.start_soon(function.poll, 1000 + function.pollers, sqs)
                function.pollers += 1

            for _ in range(INITIAL_CONCURRENCY):
                add_poller()
            submitted = await submit(resources.request_queue_url, requests, endpoint)
            step = 60.0 / SCALE_UP_PER_MINUTE
            with anyio.move_on_after(within):
                # The mapping's scaler: one more poller every `step` s while messages wait;
                # and the end: every request started or dead-lettered.
                while True:
                    dead = sum(await _depth(watcher, resources.dead_letter_queue_url))
                    if len(function.started) + dead >= len(requests):
                        break
                    waiting, _ = await _depth(watcher, resources.request_queue_url)
                    if waiting and function.pollers < MAX_CONCURRENCY:
                        add_poller()
                    await anyio.sleep(step)
            function.done.set()
            tg.cancel_scope.cancel()  # pollers in a 20 s long poll
        function.peak_pollers = function.pollers
        listings = (
            proxy.stats[("ListExecutions", "stale")] + proxy.stats[("ListExecutions", "forwarded")]
        )
    async with session().client("stepfunctions", endpoint_url=endpoint) as sfn:
        await wait_finished(sfn, resources.state_machine_arn, within=30)
        _, traces, work, lives = await collect(sfn, resources.state_machine_arn)
    complete = len(work) == len(requests)
    notes = [
        f"a Lambda function per message (batch size 1): {INVOCATION_OVERHEAD * 1000:.0f} ms "
        f"invocation overhead, SSM GetParameter for the threshold, jitter "
        f"{JITTER[0]}-{JITTER[1]} s, ListExecutions(RUNNING) first page of {PAGE_SIZE}",
        f"event source mapping: {INITIAL_CONCURRENCY} concurrent invocations, then "
        f"{SCALE_UP_PER_MINUTE} more per minute up to {MAX_CONCURRENCY}; visibility timeout "
        f"{VISIBILITY_TIMEOUT} s (6 x a {FUNCTION_TIMEOUT} s function timeout), dead-letter "
        f"queue after {MAX_RECEIVE_COUNT} receives",
        f"ListExecutions answers served {list_lag:g} s old (fault proxy; MiniStack's own "
        "listing is immediately consistent, AWS's is eventually consistent)",
    ]
    if dead:
        notes.append(f"{dead} requests went to the dead-letter queue and never ran")
    if not complete and not dead:
        notes.append(f"stopped after {within:.0f} s with {len(work)} of {len(requests)} done")
    return PatternRun(
        name=NAME,
        title="check-then-act (ListExecutions)",
        limit=limit,
        requests=len(requests),
        submitted=submitted,
        work=work,
        executions=lives,
        calls=function.counter.calls,
        traces=traces,
        complete=complete,
        notes=notes,
        extra={
            "list_lag_seconds": list_lag,
            "invocations": function.invocations,
            "deferred": function.deferred,
            "duplicate_starts": function.duplicates,
            "dead_lettered": dead,
            "peak_concurrent_invocations": function.peak_pollers,
            "list_executions_calls": listings,
            "stale_listings_served": proxy.stats[("ListExecutions", "stale")],
        },
    )
