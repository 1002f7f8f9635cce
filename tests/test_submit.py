"""``submit``: exactly the requested messages arrive, failures are reported, bad flags exit 2."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest

from devtools.sandbox import SandboxResources
from dispatcher.cli.main import build_parser, main
from dispatcher.cli.submit import (
    EXAMPLES,
    IDEMPOTENCY_ATTRIBUTE,
    FailedEntry,
    SubmitItem,
    generate,
    parse_seconds,
    read_jsonl,
    submit_requests,
)
from dispatcher.cli.submit import _requests as submit_requests_of
from dispatcher.core.requests import StartRequest, parse, string_attributes
from dispatcher.producer import endpoint_for
from dispatcher.settings.config import InputFormat
from dispatcher.settings.layout import PoolConfig
from tests.helpers import queue_depth, receive_all

if TYPE_CHECKING:
    from types_aiobotocore_sqs.type_defs import (
        BatchResultErrorEntryTypeDef,
        ResponseMetadataTypeDef,
        SendMessageBatchRequestEntryTypeDef,
        SendMessageBatchResultEntryTypeDef,
        SendMessageBatchResultTypeDef,
    )


async def _cli(*argv: str) -> int:
    """Run the command in a worker thread (it starts its own event loop)."""
    return await anyio.to_thread.run_sync(main, list(argv))


# --- against the emulator -------------------------------------------------------------------


async def test_library_sends_bodies_keys_and_attributes(sandbox: SandboxResources) -> None:
    items = [
        SubmitItem(json.dumps({"n": n}), idempotency_key=f"k-{n}", attributes={"pool": "a"})
        for n in range(25)
    ]
    report = await submit_requests(sandbox.request_queue_url, items, endpoint_url=sandbox.endpoint)
    assert report.ok
    assert (report.sent, report.failed, report.unsent) == (25, [], 0)

    messages = await receive_all(sandbox.endpoint, sandbox.request_queue_url, count=25)
    got = {
        json.loads(m["Body"])["n"]: {
            name: value["StringValue"] for name, value in m["MessageAttributes"].items()
        }
        for m in messages
    }
    assert got == {n: {IDEMPOTENCY_ATTRIBUTE: f"k-{n}", "pool": "a"} for n in range(25)}
    assert await queue_depth(sandbox.endpoint, sandbox.request_queue_url) == 0


async def test_cli_sends_exactly_the_requested_messages(
    sandbox: SandboxResources, capsys: pytest.CaptureFixture[str]
) -> None:
    # No AWS_ENDPOINT_URL: an emulator's queue URL names its endpoint.
    code = await _cli(
        "submit",
        "--queue-url",
        sandbox.request_queue_url,
        "--count",
        "50",
        "--seconds",
        "1:3",
        "--fail-ratio",
        "0.2",
        "--idempotency-keys",
        "job",
        "--seed",
        "7",
    )
    assert code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("sent 50, failed 0 in ")
    assert out.endswith(" msg/s)")

    messages = await receive_all(sandbox.endpoint, sandbox.request_queue_url, count=50)
    bodies = [json.loads(m["Body"]) for m in messages]
    keys = sorted(m["MessageAttributes"][IDEMPOTENCY_ATTRIBUTE]["StringValue"] for m in messages)
    assert keys == sorted(f"job-{n}" for n in range(1, 51))
    assert all(type(b["seconds"]) is int and 1 <= b["seconds"] <= 3 for b in bodies)
    assert sum(1 for b in bodies if b.get("fail") is True) == 10
    assert all(set(b) <= {"seconds", "fail"} for b in bodies)
    assert await queue_depth(sandbox.endpoint, sandbox.request_queue_url) == 0


async def test_cli_reads_json_lines_from_a_file(
    sandbox: SandboxResources,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source = tmp_path / "requests.jsonl"
    source.write_text('{"seconds": 0}\n\n  {"fail": true, "note": "x"}  \n', encoding="utf-8")
    # The queue comes from the variable the sandbox prints.
    monkeypatch.setenv("DISPATCHER_REQUEST_QUEUE_URL", sandbox.request_queue_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", sandbox.endpoint)
    assert await _cli("submit", "--from-file", str(source), "--idempotency-keys", "f") == 0
    assert capsys.readouterr().out.startswith("sent 2, failed 0")
    messages = await receive_all(sandbox.endpoint, sandbox.request_queue_url, count=2)
    got = sorted(
        (m["Body"], m["MessageAttributes"][IDEMPOTENCY_ATTRIBUTE]["StringValue"]) for m in messages
    )
    assert got == [('{"fail": true, "note": "x"}', "f-2"), ('{"seconds": 0}', "f-1")]


async def test_cli_attributes_reach_the_queue(
    sandbox: SandboxResources, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--attribute`` on every request; a file line's own attributes win over it."""
    source = tmp_path / "requests.jsonl"
    source.write_text(
        '{"input": {"n": 1}, "attributes": {"tenant": "b", "idempotency-key": "o-1"}}\n{"n": 2}\n',
        encoding="utf-8",
    )
    argv = ["submit", "--queue-url", sandbox.request_queue_url, "--attribute", "tenant=a"]
    assert await _cli(*argv, "--attribute", "pool=p", "--from-file", str(source)) == 0
    assert await _cli(*argv, "--count", "1", "--seconds", "2:2") == 0
    assert capsys.readouterr().out.count("sent ") == 2
    messages = await receive_all(sandbox.endpoint, sandbox.request_queue_url, count=3)
    got = sorted(
        (
            m["Body"],
            sorted((k, v["StringValue"]) for k, v in m.get("MessageAttributes", {}).items()),
        )
        for m in messages
    )
    assert got == [
        ('{"n": 1}', [("idempotency-key", "o-1"), ("pool", "p"), ("tenant", "b")]),
        ('{"n": 2}', [("pool", "p"), ("tenant", "a")]),
        ('{"seconds": 2}', [("tenant", "a")]),
    ]


async def test_rejected_entries_are_reported_not_dropped(
    sandbox: SandboxResources,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # U+FFFF is valid JSON but outside the characters SQS accepts in a message.
    source = tmp_path / "requests.jsonl"
    source.write_text('{"a": 1}\n{"bad": "\uffff"}\n{"a": 3}\n', encoding="utf-8")
    monkeypatch.setenv("AWS_ENDPOINT_URL", sandbox.endpoint)
    code = await _cli(
        "submit", "--queue-url", sandbox.request_queue_url, "--from-file", str(source)
    )
    assert code == 1
    captured = capsys.readouterr()
    assert captured.out.startswith("sent 2, failed 1")
    assert captured.err.strip() == (
        "failed: line 2: InvalidMessageContents: "
        "The message contains characters outside the allowed set."
    )
    assert await queue_depth(sandbox.endpoint, sandbox.request_queue_url) == 2


async def test_missing_queue_is_one_line_exit_2(
    sandbox: SandboxResources,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", sandbox.endpoint)
    missing = sandbox.request_queue_url + "-missing"
    assert await _cli("submit", "--queue-url", missing, "--count", "30") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith(f"sfn-dispatcher submit: error: nothing sent to {missing}: ")
    assert "NonExistentQueue" in err or "QueueDoesNotExist" in err


async def test_thousand_messages_go_in_quickly(sandbox: SandboxResources) -> None:
    items = generate(1000, (0, 1), 0.1, "bulk", seed=1)
    report = await submit_requests(
        sandbox.request_queue_url, items, endpoint_url=sandbox.endpoint, total=1000
    )
    assert (report.sent, report.failed) == (1000, [])
    assert report.elapsed < 10, report.summary()  # ~1 s measured; generous for shared CI
    assert await queue_depth(sandbox.endpoint, sandbox.request_queue_url) == 1000


async def test_rate_limits_messages_per_second(sandbox: SandboxResources) -> None:
    items = [SubmitItem("{}") for _ in range(25)]
    report = await submit_requests(
        sandbox.request_queue_url, items, rate=50, endpoint_url=sandbox.endpoint
    )
    assert report.sent == 25
    # Batches of 10 at 50 msg/s: the third may start only 20 / 50 = 0.4 s in.
    assert report.elapsed >= 0.4


# --- with a fake SQS: retry only what SQS says is not the sender's fault ---------------------


class FakeSqs:
    """Records every batch; fails chosen ids once (server fault) or always (sender fault)."""

    def __init__(self, flaky: set[str], bad: set[str]) -> None:
        self.flaky = set(flaky)
        self.bad = bad
        self.calls: list[list[str]] = []

    async def send_message_batch(
        self,
        *,
        QueueUrl: str,  # noqa: N803 - botocore's parameter names
        Entries: Sequence[SendMessageBatchRequestEntryTypeDef],  # noqa: N803
    ) -> SendMessageBatchResultTypeDef:
        """Succeed, except for the flaky ids (once) and the bad ids (always)."""
        ids = [entry["Id"] for entry in Entries]
        self.calls.append(ids)
        ok: list[SendMessageBatchResultEntryTypeDef] = []
        failed: list[BatchResultErrorEntryTypeDef] = []
        for entry_id in ids:
            if entry_id in self.bad:
                failed.append({"Id": entry_id, "SenderFault": True, "Code": "Bad", "Message": "no"})
            elif entry_id in self.flaky:
                self.flaky.discard(entry_id)
                failed.append(
                    {"Id": entry_id, "SenderFault": False, "Code": "InternalError", "Message": ""}
                )
            else:
                ok.append({"Id": entry_id, "MessageId": f"m{entry_id}", "MD5OfMessageBody": ""})
        metadata: ResponseMetadataTypeDef = {
            "RequestId": "fake",
            "HTTPStatusCode": 200,
            "HTTPHeaders": {},
            "RetryAttempts": 0,
        }
        return {"Successful": ok, "Failed": failed, "ResponseMetadata": metadata}


async def test_only_server_faults_are_retried() -> None:
    fake = FakeSqs(flaky={"3", "12"}, bad={"5"})
    items = [SubmitItem("{}") for _ in range(15)]
    report = await submit_requests("https://q", items, client=fake, concurrency=1)
    assert report.sent == 14
    assert report.failed == [FailedEntry(5, "Bad", "no", sender_fault=True)]
    assert fake.calls == [
        [str(n) for n in range(10)],
        ["3"],
        [str(n) for n in range(10, 15)],
        ["12"],
    ]


async def test_batches_never_exceed_ten_entries_or_256_kib() -> None:
    fake = FakeSqs(flaky=set(), bad=set())
    big = "x" * 100_000
    items = [SubmitItem(big) for _ in range(5)] + [SubmitItem("{}") for _ in range(23)]
    report = await submit_requests("https://q", items, client=fake, concurrency=1)
    assert report.sent == 28
    assert [len(call) for call in fake.calls] == [2, 2, 10, 10, 4]


# --- flags that cannot work: one line, exit 2, nothing sent ---------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--count", "5", "--seconds", "3:1"], "--seconds '3:1' is invalid: MIN must not exceed"),
        (["--count", "5", "--seconds=-1:2"], "--seconds '-1:2' is invalid: MIN and MAX"),
        (["--count", "5", "--seconds", "a:b"], "--seconds 'a:b' is invalid: give whole seconds"),
        (["--count", "5", "--seconds", "1.5:2"], "--seconds '1.5:2' is invalid: give whole"),
        (
            ["--count", "5", "--seconds", "1:100000000"],
            "--seconds '1:100000000' is invalid: a Wait state waits at most 99999999",
        ),
        (["--count", "5", "--attribute", "tenant"], "--attribute 'tenant' is invalid: give NAME="),
        (["--count", "5", "--attribute", "AWS.x=1"], "--attribute 'AWS.x=1' is invalid: names"),
        (["--count", "5", "--attribute", "a b=1"], "--attribute 'a b=1' is invalid: a name is"),
        (["--count", "5", "--attribute", "tenant="], "--attribute 'tenant=' is invalid: the value"),
        (
            ["--count", "5", "--attribute", "dispatcher-reason=x"],
            "--attribute 'dispatcher-reason=x' is invalid: dispatcher-* names are reserved",
        ),
        (
            ["--count", "5", "--attribute", "idempotency-key=a b"],
            "--attribute 'idempotency-key=a b' is invalid: idempotency-key is 1-80",
        ),
        (
            ["--count", "5", "--attribute", "idempotency-key=a", "--idempotency-keys", "p"],
            "--attribute idempotency-key=... and --idempotency-keys both name the execution",
        ),
        (
            ["--count", "3", "--seconds", "1:5", "--attribute", "idempotency-key=order-7"],
            "--count 3 with --attribute idempotency-key=order-7 names one execution for all 3 "
            "requests, but --seconds 1:5 gives them different bodies: all but the first would "
            "be dead-lettered as idempotency_conflict; give --idempotency-keys order-7 instead "
            "(order-7-1 .. order-7-3)",
        ),
        (
            ["--count", "4", "--fail-ratio", "0.5", "--attribute", "idempotency-key=k"],
            "--count 4 with --attribute idempotency-key=k names one execution for all 4 "
            "requests, but --fail-ratio 0.5 gives them different bodies",
        ),
        (["--count", "5", "--fail-ratio", "2"], "--fail-ratio 2 is invalid: give 0 to 1"),
        (["--count", "0"], "--count 0 is invalid"),
        (["--count", "5", "--rate", "0"], "--rate 0 is invalid"),
        (["--count", "5", "--idempotency-keys", "a b"], "--idempotency-keys 'a b' is invalid"),
    ],
)
def test_bad_flags_are_one_line_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["submit", "--queue-url", "http://127.0.0.1:1/0/q", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"sfn-dispatcher submit: error: {message}")


def test_missing_queue_url_names_the_variable(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", "--count", "5"]) == 2
    err = capsys.readouterr().err
    assert "DISPATCHER_REQUEST_QUEUE_URL" in err
    assert "python -m devtools sandbox" in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"a": 1}\n{"a": \n', "requests.jsonl:2: not JSON"),
        ('{"a": 1}\n\n[1, 2]\n', "requests.jsonl:3: expected a JSON object"),
        ("\n\n", "has no requests"),
        ('{"a": 1}\n{"input": {}, "attributes": {"t": 1}}\n', "requests.jsonl:2: attribute 't'=1"),
        ('{"input": {}, "attributes": ["t"]}\n', 'requests.jsonl:1: "attributes" must be'),
        ('{"a": 1}\n{"a": 2}\n{"input": 3}\n', 'requests.jsonl:3: "input" must be a JSON'),
        (
            "".join(f'{{"input": {{}}, "attributes": {{"a{n}": "x"}}}}\n' for n in range(3))
            + '{"input": {}, "attributes": {'
            + ", ".join(f'"b{n}": "x"' for n in range(11))
            + "}}\n",
            "requests.jsonl:4: 11 message attributes; SQS accepts at most 10",
        ),
        (
            '{"input": {"n": 1}, "attributes": {"idempotency-key": "k"}}\n'
            '{"input": {"n": 1}, "attributes": {"idempotency-key": "k", "tenant": "b"}}\n'
            '{"input": {"n": 2}, "attributes": {"idempotency-key": "k"}}\n',
            "requests.jsonl:3: idempotency-key k with another input than line 1: it would be "
            "dead-lettered as idempotency_conflict",
        ),
    ],
)
def test_bad_file_names_the_line_and_sends_nothing(
    tmp_path: Path, content: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "requests.jsonl"
    source.write_text(content, encoding="utf-8")
    # The queue URL points nowhere: had anything been sent, the error would differ.
    argv = ["submit", "--queue-url", "http://127.0.0.1:1/0/q", "--from-file", str(source)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert message in err
    if "no requests" not in message:
        assert err.strip().endswith("nothing was sent")


def test_every_help_example_is_accepted_and_cannot_conflict_with_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each ``submit --help`` example, as written: requests under one idempotency key (and
    the same attributes) have one body, or all but the first would be dead-lettered."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "requests.jsonl").write_text('{"n": 1}\n{"n": 2}\n', encoding="utf-8")
    examples = [
        line.split()[1:] for line in EXAMPLES.splitlines() if line.strip().startswith("sfn-")
    ]
    assert len(examples) >= 3
    assert any("--count" in argv and "--idempotency-keys" in argv for argv in examples)
    for argv in examples:
        args = build_parser().parse_args([*argv, "--queue-url", "http://127.0.0.1:1/0/q"])
        _, _, items = submit_requests_of(args)
        bodies: dict[tuple[str, str], set[str]] = {}
        for item in items:
            if item.idempotency_key is not None:
                same = (item.idempotency_key, json.dumps(sorted(item.attributes.items())))
                bodies.setdefault(same, set()).add(item.body)
        assert all(len(b) == 1 for b in bodies.values()), (argv, bodies)


def test_one_key_on_identical_copies_says_they_are_duplicates(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["submit", "--count", "3", "--attribute", "idempotency-key=order-7", "--seed", "1"]
    args = build_parser().parse_args([*argv, "--queue-url", "http://127.0.0.1:1/0/q"])
    count, _, items = submit_requests_of(args)
    assert (count, {i.body for i in items}) == (3, {"{}"})
    assert capsys.readouterr().err == (
        "note: all 3 requests carry idempotency-key=order-7: the dispatcher starts one "
        "execution and counts the other 2 as duplicates\n"
    )


def test_seconds_are_whole_numbers_in_the_body() -> None:
    """``--seconds 2:2`` gives ``{"seconds": 2}``: SecondsPath takes an integer."""
    assert parse_seconds("2:2") == (2, 2)
    assert parse_seconds("4") == (4, 4)
    assert [item.body for item in generate(3, (2, 2), 0.0, None, seed=1)] == ['{"seconds": 2}'] * 3


def test_file_lines_carry_attributes_and_plain_lines_still_work(tmp_path: Path) -> None:
    source = tmp_path / "requests.jsonl"
    source.write_text(
        '{"input": {"n": 1}, "attributes": {"tenant": "a", "idempotency-key": "o-1"}}\n'
        '{"n": 2}\n'
        '{"input": {"n": 3}}\n'
        '{"input": {"n": 4}, "note": "not the request shape: sent as it is"}\n',
        encoding="utf-8",
    )
    items = read_jsonl(source, None, attributes={"tenant": "z", "pool": "p"})
    assert [(line, item) for line, item in items] == [
        (1, SubmitItem('{"n": 1}', "o-1", {"tenant": "a", "pool": "p"})),
        (2, SubmitItem('{"n": 2}', None, {"tenant": "z", "pool": "p"})),
        (3, SubmitItem('{"n": 3}', None, {"tenant": "z", "pool": "p"})),
        (
            4,
            SubmitItem(
                '{"input": {"n": 4}, "note": "not the request shape: sent as it is"}',
                None,
                {"tenant": "z", "pool": "p"},
            ),
        ),
    ]
    verbatim = read_jsonl(source, "v", verbatim=True)
    assert verbatim[0][1] == SubmitItem(
        '{"input": {"n": 1}, "attributes": {"tenant": "a", "idempotency-key": "o-1"}}', "v-1"
    )


def test_generate_is_seeded_and_exact() -> None:
    first = list(generate(40, (5, 7), 0.25, None, seed=3))
    assert first == list(generate(40, (5, 7), 0.25, None, seed=3))
    bodies = [json.loads(item.body) for item in first]
    assert sum(1 for b in bodies if b.get("fail")) == 10
    assert {b["seconds"] for b in bodies} == {5, 6, 7}
    assert all(item.idempotency_key is None for item in first)
    assert [json.loads(i.body) for i in generate(2, None, 0.0, "p", None)] == [{}, {}]


def test_endpoint_comes_from_a_non_aws_queue_url(monkeypatch: pytest.MonkeyPatch) -> None:
    local = "http://127.0.0.1:4566/000000000000/q"
    assert endpoint_for(local) == "http://127.0.0.1:4566"
    assert endpoint_for("https://sqs.eu-west-1.amazonaws.com/123456789012/q") is None
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://elsewhere:1")
    assert endpoint_for(local) is None, "a configured endpoint wins"


# --- the producer guide's snippets, run as they are -----------------------------------------

GUIDE = Path(__file__).parent.parent / "docs" / "producers.md"
AWS_CLI_V1 = Path(__file__).parent.parent / ".venv-emulator" / "bin" / "aws"


def snippet(name: str) -> str:
    """The code block after ``<!-- snippet: NAME ...-->`` in docs/producers.md."""
    text = GUIDE.read_text(encoding="utf-8")
    after = text.split(f"<!-- snippet: {name} ", 1)[1]
    block = after.split("```", 2)[1]
    return block.split("\n", 1)[1]  # drop the language tag


async def test_the_producer_guide_snippets_send_what_the_dispatcher_reads(
    sandbox: SandboxResources, monkeypatch: pytest.MonkeyPatch
) -> None:
    """boto3, AWS CLI and helper snippets of docs/producers.md, run against the emulator: each
    request's key becomes its execution name, and its tenant is the pool's concurrency key."""
    monkeypatch.setenv("DISPATCHER_REQUEST_QUEUE_URL", sandbox.request_queue_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", sandbox.endpoint)
    await anyio.to_thread.run_sync(exec, snippet("boto3"), {})
    await anyio.to_thread.run_sync(exec, snippet("helper"), {})
    expected = {"order-42"} | {f"order-{n}" for n in range(100, 120)}
    # The AWS CLI v1 (what `make test` installs) ignores AWS_ENDPOINT_URL for `aws sqs` in
    # us-east-1: the guide's emulator snippet, as written, is the one that works.
    cli = AWS_CLI_V1 if AWS_CLI_V1.is_file() else shutil.which("aws")
    if cli is not None:  # the AWS CLI is optional on a development machine
        assert "--endpoint-url" not in snippet("aws-cli"), "the one for AWS"
        path = f"{Path(cli).parent}:{os.environ['PATH']}"
        env = {**os.environ, "PATH": path, "AWS_DEFAULT_REGION": "us-east-1"}
        env |= {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
        done = await anyio.run_process(
            ["bash", "-c", snippet("aws-cli-emulator")], check=False, env=env
        )
        assert done.returncode == 0, done.stderr.decode()
        expected.add("order-44")

    messages = await receive_all(sandbox.endpoint, sandbox.request_queue_url, count=len(expected))
    pool = PoolConfig(
        name="default", state_machine_arn=sandbox.state_machine_arn, key_attribute="tenant"
    )
    names = set()
    for message in messages:
        request = parse(dict(message), InputFormat.JSON)
        assert isinstance(request, StartRequest), request
        names.add(request.name)
        assert request.input == message["Body"]
        assert pool.key_attribute is not None
        assert string_attributes(dict(message))[pool.key_attribute] in {"acme", "globex"}
    assert names == expected
