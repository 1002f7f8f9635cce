"""The real dispatcher against moto, a second backend that answers as AWS does.

Where MiniStack answers a repeated start of a running execution with
``ExecutionAlreadyExists``, moto answers with success and the same ARN, as AWS does; and
it reads a Wait state's ``SecondsPath`` as an integer. It sends no status events, so the
dispatcher frees slots by reconcile alone here (a short interval). Verdicts come from
moto's own records: ListExecutions start/stop dates and statuses.
"""

from __future__ import annotations

import json
from contextlib import AbstractAsyncContextManager
from typing import Any

import aiohttp
import pytest

from devtools.sandbox import SandboxResources
from dispatcher.daemon.service import Dispatcher
from tests.audit import drain, list_executions, send_requests, session, verdict, workload
from tests.moto_backend import MotoSandboxFactory, moto_sandbox_factory, moto_server
from tests.runner import running

__all__ = ["moto_sandbox_factory", "moto_server"]  # the fixtures this module uses

pytestmark = pytest.mark.integration


def on_moto(resources: SandboxResources, limit: int) -> AbstractAsyncContextManager[Dispatcher]:
    """The dispatcher in this process, freeing slots by reconcile alone: it lists often
    (moto's listing is consistent at once, so a short grace)."""
    return running(resources, limit=limit, reconcile_interval=0.2, start_grace=0.2)


@pytest.mark.timeout(60)
async def test_limit_held_by_reconcile_alone(moto_sandbox_factory: MotoSandboxFactory) -> None:
    """15 requests under limit 3, slots freed by reconcile alone: the limit held and each
    request started once by moto's records, each execution waited its whole seconds.
    (About 9 s; the module about 20 s.)"""
    resources = await moto_sandbox_factory(limit=3)
    async with session().client("sqs", endpoint_url=resources.endpoint) as sqs:
        bodies = workload(15, 0.3, 1.0)
        names = await send_requests(sqs, resources.request_queue_url, bodies)
    async with on_moto(resources, 3) as dispatcher:
        await verdict(resources, names, 3, within=45)
        assert dispatcher.events is not None
        assert dispatcher.events.applied == 0, "moto sends no status events"
        assert dispatcher.pool.started_total == 15
    async with session().client("stepfunctions", endpoint_url=resources.endpoint) as sfn:
        executions = await list_executions(sfn, resources.state_machine_arn)
    # Whole seconds: moto fails a Wait on a fractional SecondsPath at once, as AWS would.
    assert {e.status for e in executions} == {"SUCCEEDED"}
    waits = {n: b["seconds"] for n, b in zip(names, bodies, strict=True) if isinstance(b, dict)}
    for e in executions:
        assert e.stop is not None
        assert e.stop - e.start >= waits[e.name], f"{e.name} waited its {waits[e.name]} s"


@pytest.mark.timeout(60)
async def test_two_copies_in_flight_start_once_and_count_once(
    moto_sandbox_factory: MotoSandboxFactory,
) -> None:
    """Two copies of one request (same idempotency key), received in one batch and started
    at once: moto answers both with success and the same ARN, as AWS does. One execution,
    counted once as started and once as a duplicate."""
    resources = await moto_sandbox_factory(limit=3)
    body = {"seconds": 1}
    async with session().client("sqs", endpoint_url=resources.endpoint) as sqs:
        names = await send_requests(
            sqs, resources.request_queue_url, [body, body, body], ["order-42", "order-42", None]
        )
    async with on_moto(resources, 3) as dispatcher:
        await verdict(resources, names, 3, within=30)
        assert dispatcher.intake is not None
        assert (
            dispatcher.intake.stats.started,
            dispatcher.intake.stats.duplicates,
        ) == (2, 1)
        assert dispatcher.http_port is not None
        base = f"http://127.0.0.1:{dispatcher.http_port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/status") as response:
                status = await response.json()
            async with http.get(f"{base}/metrics") as response:
                metrics = await response.text()
    assert status["started"] == 2, "/status counts executions, not answers"
    pool = dispatcher.pool.name
    assert f'dispatcher_starts_total{{outcome="started",pool="{pool}"}} 2.0' in metrics
    assert f'dispatcher_starts_total{{outcome="duplicate",pool="{pool}"}} 1.0' in metrics


@pytest.mark.timeout(60)
async def test_bad_requests_are_dead_lettered_with_reasons(
    moto_sandbox_factory: MotoSandboxFactory,
) -> None:
    """Invalid JSON and an invalid key are refused by the dispatcher; a second request
    under a running execution's name with another input is refused by moto
    (``ExecutionAlreadyExists``, as AWS does) and dead-lettered as a conflict."""
    resources = await moto_sandbox_factory(limit=3)
    good: list[dict[str, Any] | str] = [{"seconds": 0}] * 4
    bodies = [
        *good,
        "this is not json",
        json.dumps({"seconds": 0}),
        json.dumps({"seconds": 1}),
        json.dumps({"seconds": 0}),
    ]
    keys: list[str | None] = [
        None,
        None,
        None,
        None,
        None,
        "not a valid key!",
        "order-7",
        "order-7",
    ]
    async with session().client("sqs", endpoint_url=resources.endpoint) as sqs:
        names = await send_requests(sqs, resources.request_queue_url, bodies, keys)
        async with on_moto(resources, 3) as dispatcher:
            await verdict(resources, [*names[:4], "order-7"], 3, within=30)
            assert dispatcher.health.live
        dead = await drain(sqs, resources.dead_letter_queue_url)
    reasons = sorted(m["MessageAttributes"]["dispatcher-reason"]["StringValue"] for m in dead)
    assert reasons == ["idempotency_conflict", "invalid_idempotency_key", "invalid_json"]
    for message in dead:
        detail = message["MessageAttributes"]["dispatcher-detail"]["StringValue"]
        assert len(detail) > 10, "a readable reason travels with the request"
