"""``redrive``: dead letters go back by reason, without ``dispatcher-*`` attributes, and a
dead letter is deleted only after its copy was sent."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest

from dispatcher.cli import main
from dispatcher.deadletter import DETAIL_ATTRIBUTE, ORIGINAL_ID_ATTRIBUTE, REASON_ATTRIBUTE
from dispatcher.redrive import redrive
from dispatcher.sandbox import SandboxResources
from tests.helpers import queue_depth, receive_all, sqs_client

pytestmark = pytest.mark.timeout(60)


async def _cli(*argv: str) -> int:
    """Run the command in a worker thread (it starts its own event loop)."""
    return await anyio.to_thread.run_sync(main, list(argv))


def _string(value: str) -> dict[str, str]:
    return {"DataType": "String", "StringValue": value}


def _dead_letter(n: int, reason: str | None) -> dict[str, Any]:
    """A dead letter as the dispatcher writes it (or, without reason, as a policy moves it)."""
    attributes = {"tenant": _string(f"t{n}")}
    if reason is not None:
        attributes |= {
            REASON_ATTRIBUTE: _string(reason),
            DETAIL_ATTRIBUTE: _string("why"),
            ORIGINAL_ID_ATTRIBUTE: _string(f"m{n}"),
        }
    return {"MessageBody": json.dumps({"n": n}), "MessageAttributes": attributes}


# --- against the emulator -------------------------------------------------------------------


async def test_dry_run_counts_then_redrive_moves_only_the_reason_asked(
    sandbox: SandboxResources,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    reasons = ["invalid_json"] * 3 + ["start_failed"] * 2 + [None]
    async with sqs_client(sandbox.endpoint) as sqs:
        for n, reason in enumerate(reasons):
            await sqs.send_message(
                QueueUrl=sandbox.dead_letter_queue_url, **_dead_letter(n, reason)
            )
    monkeypatch.setenv("DISPATCHER_DEAD_LETTER_QUEUE_URL", sandbox.dead_letter_queue_url)
    monkeypatch.setenv("DISPATCHER_REQUEST_QUEUE_URL", sandbox.request_queue_url)

    assert await _cli("redrive", "--dry-run") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "6 dead letters seen; would move 6"
    assert [line.split() for line in out[1:]] == [
        ["(none)", "1", "seen", "1", "would", "move"],
        ["invalid_json", "3", "seen", "3", "would", "move"],
        ["start_failed", "2", "seen", "2", "would", "move"],
    ]
    assert await queue_depth(sandbox.endpoint, sandbox.request_queue_url) == 0

    # The dry run made every dead letter visible again: all six are counted once more.
    assert await _cli("redrive", "--reason", "invalid_json", "--reason", "(none)") == 0
    assert capsys.readouterr().out.splitlines()[0] == "6 dead letters seen; moved 4"
    moved = await receive_all(sandbox.endpoint, sandbox.request_queue_url, count=4)
    got = sorted(
        (json.loads(m["Body"])["n"], sorted(m.get("MessageAttributes", {}))) for m in moved
    )
    assert got == [(n, ["tenant"]) for n in (0, 1, 2, 5)]
    left = await receive_all(sandbox.endpoint, sandbox.dead_letter_queue_url, count=2)
    assert sorted(m["MessageAttributes"][REASON_ATTRIBUTE]["StringValue"] for m in left) == [
        "start_failed",
        "start_failed",
    ]


def test_nothing_to_redrive_from_names_the_variable(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["redrive"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sfn-dispatcher redrive: error: no dead-letter queue: pass --from URL")
    assert "DISPATCHER_DEAD_LETTER_QUEUE_URL" in err


# --- with a fake SQS: never lose a message --------------------------------------------------


class FakeQueues:
    """Two queues in memory; the target refuses bodies listed in ``refuse``; every call is
    recorded in order."""

    def __init__(self, letters: list[dict[str, Any]], refuse: set[str]) -> None:
        self.letters = {
            f"id{n}": {"MessageId": f"id{n}", "Body": m["MessageBody"], **m}
            for n, m in enumerate(letters)
        }
        self.hidden: set[str] = set()
        self.sent: list[dict[str, Any]] = []
        self.refuse = refuse
        self.calls: list[tuple[str, list[str]]] = []

    async def receive_message(self, **kwargs: Any) -> dict[str, Any]:
        """Up to ten visible dead letters, hidden from now on."""
        visible = [m for i, m in self.letters.items() if i not in self.hidden][:10]
        self.hidden |= {m["MessageId"] for m in visible}
        messages = [
            {
                "MessageId": m["MessageId"],
                "ReceiptHandle": f"h-{m['MessageId']}",
                "Body": m["Body"],
                "MessageAttributes": m["MessageAttributes"],
            }
            for m in visible
        ]
        self.calls.append(("receive", [m["MessageId"] for m in messages]))
        return {"Messages": messages}

    async def send_message_batch(self, **kwargs: Any) -> dict[str, Any]:
        """Accept every entry but the refused bodies (a sender fault)."""
        entries = kwargs["Entries"]
        self.calls.append(("send", [e["MessageBody"] for e in entries]))
        ok = [e for e in entries if e["MessageBody"] not in self.refuse]
        self.sent += ok
        failed = [
            {"Id": e["Id"], "Code": "InvalidMessageContents", "Message": "no", "SenderFault": True}
            for e in entries
            if e["MessageBody"] in self.refuse
        ]
        return {"Successful": [{"Id": e["Id"]} for e in ok], "Failed": failed}

    async def delete_message_batch(self, **kwargs: Any) -> dict[str, Any]:
        """Delete by receipt handle."""
        ids = [e["ReceiptHandle"].removeprefix("h-") for e in kwargs["Entries"]]
        self.calls.append(("delete", ids))
        for message_id in ids:
            del self.letters[message_id]
            self.hidden.discard(message_id)
        return {"Successful": [{"Id": e["Id"]} for e in kwargs["Entries"]], "Failed": []}

    async def change_message_visibility_batch(self, **kwargs: Any) -> dict[str, Any]:
        """Visible again."""
        ids = [e["ReceiptHandle"].removeprefix("h-") for e in kwargs["Entries"]]
        self.calls.append(("release", ids))
        self.hidden -= set(ids)
        return {"Successful": [], "Failed": []}


async def test_a_refused_copy_keeps_its_dead_letter_and_is_reported() -> None:
    letters = [_dead_letter(n, "invalid_json") for n in range(12)]
    fake = FakeQueues(letters, refuse={json.dumps({"n": 4})})
    report = await redrive(fake, "dlq", "q")  # type: ignore[arg-type]
    assert report.moved == {"invalid_json": 11}
    assert report.failed == [("id4", "InvalidMessageContents", "no")]
    assert not report.ok
    assert list(fake.letters) == ["id4"], "only the refused one is left, and visible again"
    assert fake.hidden == set()
    assert all(set(e.get("MessageAttributes", {})) == {"tenant"} for e in fake.sent)
    # Each delete comes after the send of the same messages, and never names the refused one.
    sends = [i for i, (call, _) in enumerate(fake.calls) if call == "send"]
    deletes = [i for i, (call, _) in enumerate(fake.calls) if call == "delete"]
    assert all(s < d for s, d in zip(sends, deletes, strict=True))
    assert all("id4" not in ids for call, ids in fake.calls if call == "delete")


async def test_max_moves_at_most_n_and_releases_the_rest() -> None:
    fake = FakeQueues([_dead_letter(n, "start_failed") for n in range(5)], refuse=set())
    report = await redrive(fake, "dlq", "q", limit=2)  # type: ignore[arg-type]
    assert (report.moved, report.seen) == ({"start_failed": 2}, {"start_failed": 5})
    assert len(fake.letters) == 3
    assert fake.hidden == set()
