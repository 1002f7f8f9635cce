"""``submit``: exactly the requested messages arrive, failures are reported, bad flags exit 2."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest

from dispatcher.cli import main
from dispatcher.producer import endpoint_for
from dispatcher.sandbox import SandboxResources
from dispatcher.submit import (
    IDEMPOTENCY_ATTRIBUTE,
    FailedEntry,
    SubmitItem,
    generate,
    submit_requests,
)
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
    assert all(
        1.0 <= b["seconds"] <= 3.0 and round(b["seconds"], 1) == b["seconds"] for b in bodies
    )
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
    items = generate(1000, (0.0, 1.0), 0.1, "bulk", seed=1)
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
        (["--count", "5", "--seconds", "a:b"], "--seconds 'a:b' is invalid: give MIN:MAX"),
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
    assert "sfn-dispatcher sandbox" in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"a": 1}\n{"a": \n', "requests.jsonl:2: not JSON"),
        ('{"a": 1}\n\n[1, 2]\n', "requests.jsonl:3: expected a JSON object"),
        ("\n\n", "has no requests"),
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


def test_generate_is_seeded_and_exact() -> None:
    first = list(generate(40, (0.5, 0.7), 0.25, None, seed=3))
    assert first == list(generate(40, (0.5, 0.7), 0.25, None, seed=3))
    bodies = [json.loads(item.body) for item in first]
    assert sum(1 for b in bodies if b.get("fail")) == 10
    assert {b["seconds"] for b in bodies} <= {0.5, 0.6, 0.7}
    assert all(item.idempotency_key is None for item in first)
    assert [json.loads(i.body) for i in generate(2, None, 0.0, "p", None)] == [{}, {}]


def test_endpoint_comes_from_a_non_aws_queue_url(monkeypatch: pytest.MonkeyPatch) -> None:
    local = "http://127.0.0.1:4566/000000000000/q"
    assert endpoint_for(local) == "http://127.0.0.1:4566"
    assert endpoint_for("https://sqs.eu-west-1.amazonaws.com/123456789012/q") is None
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://elsewhere:1")
    assert endpoint_for(local) is None, "a configured endpoint wins"
