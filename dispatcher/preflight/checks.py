"""The checks of the endpoint, the state machine, the callbacks to parents and the queues."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Awaitable, Callable
from functools import partial

from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

from dispatcher.aws.api import AWS_ERRORS, error_code
from dispatcher.daemon.deadletter import DEFAULT_MAX_SIZE
from dispatcher.preflight.context import DEAD_LETTERS, REQUESTS, Context, QueueRole
from dispatcher.preflight.report import Finding, Skip, Status, is_denied, text

AUTH_CODES = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "ExpiredToken",
        "ExpiredTokenException",
        "AuthFailure",
    }
)
NO_QUEUE_CODES = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"})
# Below this, a request handed back a few times (throttling) dead-letters without a reason.
MIN_RECEIVE_COUNT = 10
# A queue whose pools defer requests (each hand-back is a receive): as the fairness benchmark.
DEFERRING_MIN_RECEIVE_COUNT = 100
# A task token no workflow ever had: answering it can change nothing.
MADE_UP_TOKEN = "sfn-dispatcher-check-made-up-task-token"  # noqa: S105 - no secret
# What AWS answers for a made-up token once the caller may make the call at all.
TOKEN_CODES = frozenset({"InvalidToken", "TaskDoesNotExist", "TaskTimedOut"})
TOKEN_ACTIONS = ("SendTaskSuccess", "SendTaskFailure", "SendTaskHeartbeat")


def queue_arn(url: str, region: str) -> str:
    """A queue's ARN from its URL (``.../ACCOUNT/NAME``), for fixes and IAM hints."""
    parts = url.rstrip("/").split("/")
    account = parts[-2] if len(parts) >= 2 and re.fullmatch(r"\d{12}", parts[-2]) else "ACCOUNT"
    return f"arn:aws:sqs:{region}:{account}:{parts[-1]}"


async def check_endpoint(ctx: Context) -> Finding:
    """Any answer from AWS, even "not found" or "access denied", proves endpoint and keys."""
    where = ctx.endpoint or f"AWS {ctx.target.region}"
    try:
        if ctx.target.get("state_machine_arn"):
            await ctx.state_machine()
        else:
            await ctx.clients.sfn.list_state_machines(maxResults=1)
    except ClientError as exc:
        if error_code(exc) in AUTH_CODES:
            return Finding(
                Status.FAIL, f"{where} rejected the credentials: {text(exc)}", CREDENTIALS_FIX
            )
    except (NoCredentialsError, PartialCredentialsError) as exc:
        return Finding(Status.FAIL, f"no usable AWS credentials: {exc}", CREDENTIALS_FIX)
    except AWS_ERRORS as exc:
        return Finding(
            Status.FAIL,
            f"cannot reach {where}: {text(exc)}",
            "check AWS_ENDPOINT_URL (unset for real AWS), AWS_REGION, the network, "
            "proxies and VPC endpoints",
        )
    return Finding(
        Status.OK, f"{where} answers; credentials from {ctx.clients.credentials or 'unknown'}"
    )


# Also the fix when the clients cannot even be opened (see `runner.run_checks`).
CREDENTIALS_FIX = (
    "give the process credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
    "or an IAM role (ECS task role, instance profile); renew expired session tokens"
)


async def check_state_machine(ctx: Context) -> Finding:
    """The governed state machine exists and is not being deleted."""
    arn = ctx.target.need("state_machine_arn")
    try:
        machine = await ctx.state_machine()
    except ClientError as exc:
        if is_denied(exc):
            fix = f"grant states:DescribeStateMachine on {arn} to the dispatcher's role"
        else:
            fix = f"check {ctx.target.name('state_machine_arn')}: account, region and name"
            arn_region = arn.split(":")[3]
            if arn_region != ctx.target.region:
                fix += (
                    f"; the clients use region {ctx.target.region} (AWS_REGION / "
                    f"AWS_DEFAULT_REGION) but the machine is in {arn_region}"
                )
        return Finding(Status.FAIL, text(exc), fix)
    status = machine.get("status", "ACTIVE")
    if status != "ACTIVE":
        return Finding(Status.FAIL, f"{machine['name']} is {status}", "govern an ACTIVE machine")
    return Finding(Status.OK, f"{machine['name']} ({status})")


async def check_standard(ctx: Context) -> Finding:
    """Only STANDARD machines can be governed: say why when it is EXPRESS."""
    try:
        machine = await ctx.state_machine()
    except AWS_ERRORS:
        raise Skip("the state machine cannot be described (see above)") from None
    kind = machine.get("type", "STANDARD")
    if kind == "STANDARD":
        return Finding(Status.OK, "STANDARD")
    return Finding(
        Status.FAIL,
        f"{machine['name']} is {kind}: Express executions have no idempotent names (a "
        "redelivered request would run twice), send no status-change events and are not "
        "listed by ListExecutions, so the limit cannot be held",
        "govern a STANDARD machine (the type cannot be changed: create one with --type "
        "STANDARD); to keep the Express workflow, call it from a STANDARD parent with the "
        "arn:aws:states:::states:startExecution.sync:2 integration",
    )


async def check_list_executions(ctx: Context) -> Finding:
    """Reconcile and start-up listing need ListExecutions on the machine."""
    arn = ctx.target.need("state_machine_arn")
    try:
        await ctx.state_machine()
    except ClientError as exc:
        if not is_denied(exc):  # denied to describe says nothing about listing
            raise Skip("the state machine cannot be described (see above)") from None
    try:
        listed = await ctx.clients.sfn.list_executions(
            stateMachineArn=arn, statusFilter="RUNNING", maxResults=1
        )
    except ClientError as exc:
        if is_denied(exc):
            return Finding(
                Status.FAIL, text(exc), f"grant states:ListExecutions on {arn} to the role"
            )
        raise Skip(f"{text(exc)} (see the state machine lines)") from None
    running = "executions are running" if listed.get("executions") else "none running"
    return Finding(Status.OK, f"permitted ({running})")


async def check_task_tokens(ctx: Context) -> Finding:
    """A parent waiting for its child (task token) is answered with SendTask*: permitted?

    Each action is called with a made-up token, which no workflow ever had: an answer about
    the token (``InvalidToken``, ``TaskDoesNotExist``) means the call itself was let through,
    ``AccessDenied`` that the role lacks the action. These actions take no resource ARN.
    """
    attribute = ctx.target.need("task_token_attribute")
    sfn = ctx.clients.sfn
    calls = {
        "SendTaskSuccess": partial(sfn.send_task_success, taskToken=MADE_UP_TOKEN, output="{}"),
        "SendTaskFailure": partial(
            sfn.send_task_failure,
            taskToken=MADE_UP_TOKEN,
            error="SfnDispatcher.Check",
            cause="sfn-dispatcher check: a made-up token, answered by no one",
        ),
        "SendTaskHeartbeat": partial(sfn.send_task_heartbeat, taskToken=MADE_UP_TOKEN),
    }
    denied: list[str] = []
    answers: set[str] = set()
    for action, call in calls.items():
        try:
            await call()
        except ClientError as exc:
            if is_denied(exc):
                denied.append(action)
                continue
            if error_code(exc) not in TOKEN_CODES:
                raise
            answers.add(error_code(exc))
        else:
            answers.add("accepted")  # an emulator may take any token; AWS never does
    if denied:
        return Finding(
            Status.WARN,
            f"{', '.join(denied)} denied: a parent workflow waiting for a child (a request "
            f"with message attribute {attribute}) would never be answered by the dispatcher "
            "and waits until its own timeout; requests without a token are not affected",
            'grant the role {"Effect": "Allow", "Action": ['
            + ", ".join(f'"states:{a}"' for a in TOKEN_ACTIONS)
            + '], "Resource": "*"} (these actions take no resource ARN; the CloudFormation '
            "template grants them)",
        )
    return Finding(
        Status.OK,
        f"{', '.join(TOKEN_ACTIONS)} permitted (a made-up token: {', '.join(sorted(answers))})",
    )


async def check_stop_executions(ctx: Context) -> Finding:
    """With DISPATCHER_STOP_ORPHANED_CHILDREN, children of parents gone are stopped."""
    switch = ctx.target.name("stop_orphaned_children")
    if ctx.target.get("stop_orphaned_children") is False:
        raise Skip(f"{switch} is false: a child whose parent no longer waits runs to its end")
    ctx.target.need("stop_orphaned_children")
    arn = ctx.target.need("state_machine_arn")
    executions = arn.replace(":stateMachine:", ":execution:", 1)
    # An execution that cannot exist (a fresh UUID in its name): stopping it changes nothing.
    made_up = f"{executions}:sfn-dispatcher-check-{uuid.uuid4()}"
    try:
        await ctx.clients.sfn.stop_execution(
            executionArn=made_up, error="SfnDispatcher.Check", cause="sfn-dispatcher check"
        )
    except ClientError as exc:
        if is_denied(exc):
            return Finding(
                Status.FAIL,
                f"{text(exc)}: children whose parent no longer waits keep running and "
                "holding their slots",
                f"grant states:StopExecution on {executions}:* to the role (the "
                f"CloudFormation template does with StopOrphanedChildren=true), or set {switch} "
                "to false",
            )
        if error_code(exc) != "ExecutionDoesNotExist":
            raise
    return Finding(Status.OK, f"permitted on the executions of {arn.rsplit(':', 1)[-1]}")


def queue_exists(role: QueueRole) -> Callable[[Context], Awaitable[Finding]]:
    """The check that one of the queues exists and can be read."""

    async def check(ctx: Context) -> Finding:
        unset = role.field not in ctx.target.invalid and ctx.target.get(role.field) is None
        named = ctx.target.name(role.field)
        if role is DEAD_LETTERS and unset:
            raise Skip(f"{named} unset: bad requests are left to the redrive policy")
        url = ctx.target.need(role.field)
        try:
            attributes = await ctx.queue(role)
        except ClientError as exc:
            arn = queue_arn(url, ctx.target.region)
            if is_denied(exc):
                return Finding(
                    Status.FAIL, text(exc), f"grant sqs:GetQueueAttributes on {arn} to the role"
                )
            fix = f"check {named}={url} (account, region, name)"
            if error_code(exc) in NO_QUEUE_CODES:
                fix += "; or create it: " + ctx.aws(
                    "sqs", "create-queue", "--queue-name", arn.rsplit(":", 1)[-1]
                )
            return Finding(Status.FAIL, f"{named}: {text(exc)}", fix)
        waiting = attributes.get("ApproximateNumberOfMessages", "?")
        return Finding(Status.OK, f"{attributes.get('QueueArn', url)} ({waiting} waiting)")

    return check


async def check_redrive(ctx: Context) -> Finding:
    """Bad requests need somewhere to go (`run` refuses to start without it), and the
    redrive policy must leave room for the receives a request may need before it starts."""
    attributes = await ctx.queue_or_skip(REQUESTS)
    dead_letter_url = ctx.target.get(DEAD_LETTERS.field)
    dead_letter = ctx.target.name(DEAD_LETTERS.field)
    raw = attributes.get("RedrivePolicy")
    if not raw:
        if dead_letter_url:
            return Finding(Status.OK, f"no redrive policy; bad requests go to {dead_letter}")
        url = ctx.target.need(REQUESTS.field)
        dlq_arn = queue_arn(url, ctx.target.region) + "-dlq"
        policy = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "20"})
        return Finding(
            Status.FAIL,
            f"no redrive policy and no {dead_letter}: bad requests would have nowhere to go "
            "(sfn-dispatcher run refuses to start)",
            f"set {dead_letter}, or give the queue a redrive policy: "
            + ctx.aws(
                "sqs",
                "set-queue-attributes",
                "--queue-url",
                url,
                "--attributes",
                json.dumps({"RedrivePolicy": policy}),
            ),
        )
    policy = json.loads(raw)
    target = str(policy.get("deadLetterTargetArn", "?"))
    receives = int(policy.get("maxReceiveCount", 0))
    detail = f"to {target.rsplit(':', 1)[-1]} after {receives} receives"
    deferring = _deferring_pools(ctx)
    if deferring and receives < DEFERRING_MIN_RECEIVE_COUNT:
        return Finding(
            Status.WARN,
            f"{detail}: pool(s) {', '.join(deferring)} hand requests back to wait their turn "
            "(per-key limits, priorities, a shared queue), one receive each; a request "
            f"received {receives} times is no longer deferred but held in memory beyond "
            "max_waiting, or dead-lettered with reason receive_limit",
            f"raise the queue's maxReceiveCount to {DEFERRING_MIN_RECEIVE_COUNT} or more: "
            + _redrive_command(ctx, target, DEFERRING_MIN_RECEIVE_COUNT),
        )
    if receives < MIN_RECEIVE_COUNT:
        return Finding(
            Status.WARN,
            detail + ": a request handed back after retrying a throttled start is dead-lettered "
            "without a reason after so few receives",
            f"raise maxReceiveCount to {MIN_RECEIVE_COUNT} or more (the CloudFormation "
            "template's default is 20): " + _redrive_command(ctx, target, 20),
        )
    return Finding(Status.OK, detail)


def _deferring_pools(ctx: Context) -> list[str]:
    """The pools fed by this queue that defer requests (hand them back for later): those
    that choose among waiting requests (keys, several queues) or share the queue."""
    fed = ctx.target.fed
    shared = len(fed) > 1
    return [
        pool.name
        for pool in fed
        if shared or pool.key_attribute is not None or len(ctx.target.queues_of(pool.name)) > 1
    ]


def _redrive_command(ctx: Context, dead_letter_arn: str, receives: int) -> str:
    policy = json.dumps({"deadLetterTargetArn": dead_letter_arn, "maxReceiveCount": str(receives)})
    return ctx.aws(
        "sqs",
        "set-queue-attributes",
        "--queue-url",
        ctx.target.need(REQUESTS.field),
        "--attributes",
        json.dumps({"RedrivePolicy": policy}),
    )


async def check_dead_letter_size(ctx: Context) -> Finding:
    """Every dead-letter queue (DISPATCHER_DEAD_LETTER_QUEUE_URL, the redrive policy's target)
    takes messages as large as the request queue does: a bad request near the request
    queue's limit must still fit there, with its reason."""
    requests = await ctx.queue_or_skip(REQUESTS)
    request_url = ctx.target.need(REQUESTS.field)
    request_size = max_message_size(requests)
    targets: dict[str, dict[str, str]] = {}
    if ctx.target.get(DEAD_LETTERS.field):
        targets[ctx.target.need(DEAD_LETTERS.field)] = await ctx.queue_or_skip(DEAD_LETTERS)
    raw = requests.get("RedrivePolicy")
    if raw:
        target_arn = str(json.loads(raw).get("deadLetterTargetArn", ""))
        url = _sibling_url(target_arn, request_url)
        if url not in targets:
            targets[url] = await ctx.queue_at(url)
    if not targets:
        raise Skip("no dead-letter queue (see the requests dead-lettering line)")
    requests_name = _name(request_url)
    small = {url: max_message_size(a) for url, a in targets.items()}
    small = {url: size for url, size in small.items() if size < request_size}
    if not small:
        sizes = ", ".join(f"{_name(u)} {max_message_size(a)} bytes" for u, a in targets.items())
        return Finding(Status.OK, f"{sizes} >= {requests_name} {request_size} bytes")
    said = "; ".join(
        f"{_name(url)} takes at most {size} bytes, {requests_name} {request_size} bytes"
        for url, size in small.items()
    )
    return Finding(
        Status.FAIL,
        f"{said}: a bad request that large cannot be dead-lettered with its reason (it is "
        "received again until the redrive policy moves it)",
        "\n".join(
            ctx.aws(
                "sqs",
                "set-queue-attributes",
                "--queue-url",
                url,
                "--attributes",
                f"MaximumMessageSize={request_size}",
            )
            for url in small
        ),
    )


def max_message_size(attributes: dict[str, str]) -> int:
    """A queue's MaximumMessageSize (the old default when it does not say)."""
    try:
        return int(attributes["MaximumMessageSize"])
    except (KeyError, ValueError):
        return DEFAULT_MAX_SIZE


def _sibling_url(arn: str, url: str) -> str:
    """The URL of queue ``arn`` in the account and region of the queue at ``url`` (SQS
    keeps a redrive target there): ``url`` with its last part, the name, replaced."""
    return f"{url.rstrip('/').rpartition('/')[0]}/{arn.rsplit(':', 1)[-1]}"


def _name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


async def check_visibility(ctx: Context) -> Finding:
    """The queue's default visibility only matters to consumers other than the dispatcher."""
    attributes = await ctx.queue_or_skip(REQUESTS)
    want = ctx.target.need("visibility_timeout")
    named = ctx.target.name("visibility_timeout")
    have = int(attributes.get("VisibilityTimeout", "30"))
    if have == want:
        return Finding(Status.OK, f"{have} s, as {named}")
    return Finding(
        Status.INFO,
        f"queue default {have} s, {named} {want} s: the dispatcher sets "
        f"{want} s on every receive, the queue default applies only to other consumers",
        "to align them: "
        + ctx.aws(
            "sqs",
            "set-queue-attributes",
            "--queue-url",
            ctx.target.need(REQUESTS.field),
            "--attributes",
            f"VisibilityTimeout={want}",
        ),
    )
