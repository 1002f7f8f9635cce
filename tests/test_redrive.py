"""``redrive``: dead letters go back by reason, without ``dispatcher-*`` attributes, and a
dead letter is deleted only after its copy was sent."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest

from devtools.polling import wait_until
from devtools.sandbox import SandboxResources
from dispatcher.cli.main import main
from dispatcher.cli.redrive import redrive
from dispatcher.core.requests import REQUEST_ID_ATTRIBUTE
from dispatcher.daemon.deadletter import DETAIL_ATTRIBUTE, ORIGINAL_ID_ATTRIBUTE, REASON_ATTRIBUTE
from tests.helpers import queue_depth, receive_all, sqs_client
from tests.runner import running

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
    assert got == [(n, [REQUEST_ID_ATTRIBUTE, "tenant"]) for n in (0, 1, 2, 5)]
    # Each copy carries the request's identity: the original message id the dead letter names.
    ids = {
        json.loads(m["Body"])["n"]: m["MessageAttributes"][REQUEST_ID_ATTRIBUTE]["StringValue"]
        for m in moved
    }
    assert [ids[n] for n in (0, 1, 2)] == ["m0", "m1", "m2"]
    left = await receive_all(sandbox.endpoint, sandbox.dead_letter_queue_url, count=2)
    assert sorted(m["MessageAttributes"][REASON_ATTRIBUTE]["StringValue"] for m in left) == [
        "start_failed",
        "start_failed",
    ]


async def test_redrive_ends_while_the_dispatcher_dead_letters_every_copy_again(
    sandbox: SandboxResources,
) -> None:
    """The docs' example, `redrive --reason invalid_json` while the dispatcher runs: each
    copy is dead-lettered again at once. The run moves the five that were there, leaves the
    copies that come back, and ends; every copy keeps its request's identity."""
    url, dlq = sandbox.request_queue_url, sandbox.dead_letter_queue_url
    async with sqs_client(sandbox.endpoint) as sqs:
        ids = [
            (await sqs.send_message(QueueUrl=url, MessageBody=f"not json {n}"))["MessageId"]
            for n in range(5)
        ]
        async with running(sandbox):

            async def dead_lettered() -> bool:
                return await queue_depth(sandbox.endpoint, dlq) == 5

            await wait_until(dead_lettered, within=20, message="five dead letters")
            with anyio.fail_after(30):  # the old redrive went on for ever
                report = await redrive(
                    sqs, dlq, url, reasons={"invalid_json"}, visibility=60, wait_seconds=1
                )
            assert report.moved == {"invalid_json": 5}
            assert report.ok

            async def settled() -> bool:  # every copy dead-lettered again, no more
                return await queue_depth(sandbox.endpoint, url) == 0 and (
                    await queue_depth(sandbox.endpoint, dlq) == 5
                )

            await wait_until(settled, within=20, message="the copies back in the DLQ")
    letters = await receive_all(sandbox.endpoint, dlq, count=5)
    assert sorted(m["MessageAttributes"][REQUEST_ID_ATTRIBUTE]["StringValue"] for m in letters) == (
        sorted(ids)
    ), "each copy of a copy still names the request it came from"


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
                "Attributes": m.get("Attributes", {}),
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

    async def get_queue_attributes(self, **kwargs: Any) -> dict[str, Any]:
        """How many dead letters there are (visible, and in flight)."""
        visible = len([i for i in self.letters if i not in self.hidden])
        return {
            "Attributes": {
                "ApproximateNumberOfMessages": str(visible),
                "ApproximateNumberOfMessagesNotVisible": str(len(self.letters) - visible),
            }
        }

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
    assert all(
        set(e.get("MessageAttributes", {})) == {"tenant", REQUEST_ID_ATTRIBUTE} for e in fake.sent
    )
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


class EchoingQueues(FakeQueues):
    """A dispatcher that dead-letters every copy again at once: each sent entry comes back
    to the dead-letter queue as a new message (new id, sent now), as the dispatcher writes
    it (its reason, the request id the copy carried)."""

    def __init__(self, letters: list[dict[str, Any]], started_ms: int) -> None:
        super().__init__(letters, refuse=set())
        self.started_ms = started_ms
        self.ids = iter(range(1000, 10**9))

    async def send_message_batch(self, **kwargs: Any) -> dict[str, Any]:
        result = await super().send_message_batch(**kwargs)
        for entry in kwargs["Entries"]:
            message_id = f"id{next(self.ids)}"
            attributes = dict(entry.get("MessageAttributes", {}))
            attributes[REASON_ATTRIBUTE] = _string("invalid_json")
            self.letters[message_id] = {
                "MessageId": message_id,
                "Body": entry["MessageBody"],
                "MessageAttributes": attributes,
                "Attributes": {"SentTimestamp": str(self.started_ms + 5)},
            }
        return result


async def test_redrive_ends_when_every_copy_comes_back_at_once() -> None:
    """Three dead letters, each dead-lettered again the moment it is sent: three moved, the
    copies left (sent after the run started), and the run ends."""
    started = 1_700_000_000_000
    fake = EchoingQueues([_dead_letter(n, "invalid_json") for n in range(3)], started)
    with anyio.fail_after(5):
        report = await redrive(fake, "dlq", "q", started_ms=started)  # type: ignore[arg-type]
    assert report.moved == {"invalid_json": 3}
    assert (report.arrived, report.came_back) == (0, 3)
    assert len(fake.sent) == 3
    assert len(fake.letters) == 3, "the copies that came back are left, visible again"
    assert fake.hidden == set()


async def test_a_copy_of_a_request_already_moved_is_left_whatever_its_timestamp() -> None:
    """Even a host clock ahead of SQS's cannot make it go round: a dead letter of a request
    this run moved is left."""
    started = 1_700_000_000_000
    fake = EchoingQueues([_dead_letter(n, "invalid_json") for n in range(2)], started + 10_000)
    with anyio.fail_after(5):
        report = await redrive(fake, "dlq", "q", started_ms=started + 60_000)  # type: ignore[arg-type]
    assert (report.moved, report.came_back) == ({"invalid_json": 2}, 2)


async def test_dead_letters_sent_after_the_run_started_are_left() -> None:
    started = 1_700_000_000_000
    letters = [_dead_letter(n, "start_failed") for n in range(3)]
    for n, letter in enumerate(letters):
        letter["Attributes"] = {"SentTimestamp": str(started + (n - 1) * 1000)}  # -1 s, 0, +1 s
    fake = FakeQueues(letters, refuse=set())
    report = await redrive(fake, "dlq", "q", started_ms=started)  # type: ignore[arg-type]
    assert (report.moved, report.arrived) == ({"start_failed": 2}, 1)
    assert list(fake.letters) == ["id2"]


class UndeletableQueues(FakeQueues):
    """A dead-letter queue whose deletes fail: each run sends a copy and leaves the letter."""

    async def delete_message_batch(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(("delete", []))
        return {
            "Successful": [],
            "Failed": [
                {"Id": e["Id"], "Code": "InternalError", "SenderFault": False}
                for e in kwargs["Entries"]
            ],
        }


async def test_a_redrive_run_again_after_a_failed_delete_sends_the_same_identity() -> None:
    """The delete failed (or the run was killed between send and delete): the next run
    sends the request again, under the same request id, so it maps to the same execution."""
    letters = [_dead_letter(0, "start_failed"), _dead_letter(1, None)]
    fake = UndeletableQueues(letters, refuse=set())
    first = await redrive(fake, "dlq", "q")  # type: ignore[arg-type]
    second = await redrive(fake, "dlq", "q")  # type: ignore[arg-type]
    assert len(first.not_deleted) == len(second.not_deleted) == 2
    ids = [e["MessageAttributes"][REQUEST_ID_ATTRIBUTE]["StringValue"] for e in fake.sent]
    # The dispatcher's dead letter names its original (m0); the one a redrive policy moved
    # keeps its message id, which is the original's (id1).
    assert ids == ["m0", "id1", "m0", "id1"]


class PolicyMovingQueues(FakeQueues):
    """Requests a queue's redrive policy moves while the run goes on: after each send, one
    more dead letter without a reason arrives, keeping the ``SentTimestamp`` of its first
    send (before the run started), as SQS keeps it on a move."""

    def __init__(self, letters: list[dict[str, Any]], started_ms: int) -> None:
        super().__init__(letters, refuse=set())
        self.started_ms = started_ms
        self.ids = iter(range(1000, 10**9))

    async def send_message_batch(self, **kwargs: Any) -> dict[str, Any]:
        result = await super().send_message_batch(**kwargs)
        n = next(self.ids)
        moved = _dead_letter(n, None)
        moved["Attributes"] = {"SentTimestamp": str(self.started_ms - 60_000)}
        self.letters[f"id{n}"] = {"MessageId": f"id{n}", "Body": moved["MessageBody"], **moved}
        return result


async def test_redrive_moves_no_more_than_the_queue_held_when_it_started() -> None:
    """Two dead letters at the start; the redrive policy moves one more after each send
    (an old SentTimestamp): the run moves two, leaves the rest, and ends."""
    started = 1_700_000_000_000
    fake = PolicyMovingQueues([_dead_letter(n, "start_failed") for n in range(2)], started)
    with anyio.fail_after(5):
        report = await redrive(fake, "dlq", "q", started_ms=started)  # type: ignore[arg-type]
    assert sum(report.moved.values()) == 2
    assert report.beyond >= 1
    assert len(fake.sent) == 2
