"""Only an answer that is an AWS error about the request blames the request.

An HTML page from a proxy or a wrong endpoint (400/404, no AWS error type; botocore makes
the code up from the status) or a code the dispatcher does not know says nothing about
the request, nor whether the start went through: the start is in doubt (its slot held
until settled), the request kept and retried, the failure counted as the deployment's.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from botocore.exceptions import ClientError

from devtools.faults import FaultKind, FaultProxy, FaultRule
from devtools.sandbox.provision import SandboxResources
from dispatcher.aws.api import ErrorKind, classify, error_code, is_retryable, outcome_unknown
from dispatcher.core.requests import execution_arn
from tests.audit import drain, send_requests, session, verdict, workload
from tests.fake_intake import dispatch_all, intake_of
from tests.fakes import DEAD_LETTER_QUEUE, STATE_MACHINE_ARN, build_world, client_error, sqs_message
from tests.runner import running
from tests.test_startclient import KWARGS, server, thin

PAGE = "<html><head><title>404 Not Found</title></head><body><h1>Not Found</h1></body></html>"


RETRY_ATTEMPTS = 2  # stamina's test mode (the fast_retries fixture)
pytestmark = pytest.mark.usefixtures("fast_retries")


@pytest.mark.parametrize(
    ("error", "kind", "unknown"),
    [
        (client_error("404", 404, PAGE), ErrorKind.UNKNOWN, True),
        (client_error("400", 400, PAGE), ErrorKind.UNKNOWN, True),
        (client_error("", 400), ErrorKind.UNKNOWN, True),
        (client_error("SomethingNew", 400), ErrorKind.UNKNOWN, True),
        (client_error("403", 403, PAGE), ErrorKind.SETUP, True),
        (client_error("AccessDeniedException", 400), ErrorKind.SETUP, False),
        (client_error("MissingAuthenticationToken", 403), ErrorKind.SETUP, False),
        (client_error("ThrottlingException", 400), ErrorKind.TRANSIENT, False),
        (client_error("InvalidExecutionInput", 400), ErrorKind.PERMANENT, False),
        (client_error("ValidationException", 400), ErrorKind.PERMANENT, False),
    ],
    ids=lambda value: value if isinstance(value, str | bool) else None,
)
def test_only_a_known_aws_error_about_the_request_is_permanent(
    error: ClientError, kind: ErrorKind, unknown: bool
) -> None:
    assert classify(error) is kind
    assert outcome_unknown(error) is unknown
    assert is_retryable(error) is (kind is not ErrorKind.PERMANENT)


async def test_html_pages_from_a_proxy_dead_letter_no_valid_request() -> None:
    """Three valid requests, each answered with a wrong endpoint's 404 page: none is
    dead-lettered (they were, one after another, as "404"); each start is in doubt."""
    world = build_world(limit=3)
    world.sfn.fail_always("start_execution", client_error("404", 404, PAGE, "StartExecution"))
    intake = intake_of(world)
    for index in range(3):
        await intake.admit(intake.queues[0], sqs_message(message_id=f"m-{index}"))
    assert await dispatch_all(intake, world.pool) == 3
    sent = [c for c in world.sqs.calls_to("send_message") if c["QueueUrl"] == DEAD_LETTER_QUEUE]
    assert sent == [], [c["MessageAttributes"]["dispatcher-reason"] for c in sent]
    assert world.pool.ledger.in_doubt == {
        execution_arn(STATE_MACHINE_ARN, f"m-{index}") for index in range(3)
    }, "the outcome is unknown: the slots stay held until settled"
    assert world.sample("dispatcher_starts_total", pool="default", outcome="in_doubt") == 3
    assert world.sample("dispatcher_dead_letters_total") == 0
    assert world.health.aws_failures >= 3, "counted as an AWS/deployment failure"
    assert "StartExecution" in (world.health.last_aws_error or "")
    handed = world.sqs.calls_to("change_message_visibility")
    assert [c["VisibilityTimeout"] for c in handed] == [30, 30, 30], "kept, retried later"


async def test_an_unknown_code_is_retried_not_dead_lettered() -> None:
    world = build_world(limit=1)
    world.sfn.fail("start_execution", client_error("BrandNewException", 400, op="StartExecution"))
    intake = intake_of(world)
    await intake.admit(intake.queues[0], sqs_message(message_id="m-1"))
    await dispatch_all(intake, world.pool)
    assert world.sample("dispatcher_dead_letters_total") == 0
    assert world.pool.ledger.running == {execution_arn(STATE_MACHINE_ARN, "m-1")}


async def test_the_thin_client_reads_an_html_page_as_no_aws_error() -> None:
    async def page(_: web.Request) -> web.StreamResponse:
        return web.Response(status=404, text=PAGE, content_type="text/html")

    async with server(page) as (url, _), thin(url) as (client, _metrics):
        with pytest.raises(ClientError) as caught:
            await client.start_execution(**KWARGS)
    assert error_code(caught.value) == "404"
    assert classify(caught.value) is ErrorKind.UNKNOWN
    assert outcome_unknown(caught.value)


# -- through the fault proxy, against the emulator ------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(60)
@pytest.mark.parametrize("status", [400, 404])
async def test_both_clients_read_a_proxys_page_as_unknown_and_it_may_have_started(
    sandbox_factory: Callable[..., Awaitable[SandboxResources]], status: int
) -> None:
    """botocore and the thin client see the same: a made-up code, UNKNOWN, in doubt - and
    a page answered after the request went on did start the execution."""
    resources = await sandbox_factory(limit=1)
    arn = resources.state_machine_arn
    async with (
        FaultProxy(resources.endpoint) as proxy,
        session().client("stepfunctions", endpoint_url=proxy.url) as sdk,
        session().client("stepfunctions", endpoint_url=resources.endpoint) as direct,
        thin(proxy.url) as (thin_client, _),
    ):
        proxy.add(FaultRule("StartExecution", FaultKind.HTML_PAGE, status=status))
        errors = []
        for name, client in (("sdk", sdk), ("thin", thin_client)):
            with pytest.raises(ClientError) as caught:
                await client.start_execution(stateMachineArn=arn, name=name, input="{}")
            errors.append(caught.value)
        proxy.clear()
        proxy.add(FaultRule("StartExecution", FaultKind.HTML_PAGE_AFTER, status=status))
        with pytest.raises(ClientError) as after:
            await sdk.start_execution(stateMachineArn=arn, name="after", input="{}")
        errors.append(after.value)
        listed = await direct.list_executions(stateMachineArn=arn)
    for error in errors:
        assert error_code(error) == str(status), error.response
        assert classify(error) is ErrorKind.UNKNOWN
        assert outcome_unknown(error)
    assert [e["name"] for e in listed["executions"]] == ["after"], "it went through"


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize("choice", ["thin", "botocore"])
async def test_a_proxy_answering_html_pages_dead_letters_nothing_and_starts_each_once(
    sandbox_factory: Callable[..., Awaitable[SandboxResources]], choice: str
) -> None:
    resources = await sandbox_factory(limit=3)
    async with (
        session().client("sqs", endpoint_url=resources.endpoint) as sqs,
        FaultProxy(resources.endpoint) as proxy,
    ):
        proxy.add(FaultRule("StartExecution", FaultKind.HTML_PAGE_AFTER, max_count=3))
        proxy.add(FaultRule("StartExecution", FaultKind.HTML_PAGE, status=400, max_count=3))
        names = await send_requests(sqs, resources.request_queue_url, workload(8, 0.2, 0.5))
        async with running(
            resources,
            proxy.url,
            limit=3,
            start_client=choice,
            reconcile_interval=0.5,
            start_grace=1.0,
        ):
            await verdict(resources, names, 3, within=90)
        dead = await drain(sqs, resources.dead_letter_queue_url)
    assert proxy.stats[("StartExecution", "html_page_after")] == 3
    assert proxy.stats[("StartExecution", "html_page")] == 3
    assert [json.loads(m["Body"]) for m in dead] == [], "a valid request was dead-lettered"
