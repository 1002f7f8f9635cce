"""What the operator scenarios (`sim.extras`) found in the dispatcher as it was when they
were written, and which fix each needs: seeds replayed with every scenario on
(``--extras all``). ``python -m sim --findings`` replays each and says whether it still
fails; once every one holds, the scenarios can be on by default (`sim.extras.DEFAULT`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Finding:
    """One seed that failed, the violation it showed, and the fix it waits for."""

    seed: int
    kind: str
    fix: str  # the branch that fixes it
    what: str
    extras: str = "all"  # the --extras of its replay ("" for none)


FINDINGS = (
    Finding(
        10,
        "false_conflict",
        "identity",
        "envelope: a producer's retry (same key, same "
        "body) dead-lettered as idempotency_conflict (the input embeds the message id)",
    ),
    Finding(
        148,
        "false_conflict",
        "identity",
        "envelope: move-task copies (new ids) "
        "dead-lettered as idempotency_conflict, again and again",
    ),
    Finding(
        4,
        "duplicate_execution",
        "identity",
        "key_attribute turned on across a restart: "
        "a request in flight starts again under its tagged name",
    ),
    Finding(101, "duplicate_execution", "identity", "key_attribute turned on then off"),
    Finding(
        157,
        "false_conflict",
        "identity",
        "input_format switched across a restart: "
        "requests in flight meet their execution with another input",
    ),
    Finding(
        70,
        "wrong_answer",
        "identity",
        "envelope: a parent's retry (same keys) answered "
        "Dispatcher.BadRequest idempotency_conflict while its child runs and succeeds",
    ),
    Finding(
        112,
        "redrive_unbounded",
        "identity",
        "sfn-dispatcher redrive (everything) while "
        "the dispatcher runs: each copy comes back under a new id, the run never ends",
    ),
    Finding(
        41,
        "redrive_unbounded",
        "identity",
        "a redrive killed between send and delete, run again: never ends",
    ),
    Finding(
        71,
        "dead_letter_ran",
        "doubt",
        'a request dead-lettered receive_limit ("redrive '
        'it to run it") while its execution runs (maxReceiveCount knob)',
        "",
    ),
    Finding(121, "dead_letter_ran", "doubt", "as seed 71, with envelope and retries"),
    Finding(
        104,
        "heartbeat_gap",
        "callbacks",
        "a held token goes >100 s without a heartbeat across a deploy (SIGTERM, new process)",
    ),
    Finding(
        158,
        "stopped_waited_child",
        "callbacks",
        "stop_orphaned_children: the first "
        "parent aborted, its child stopped while the retried parent's token waits on it",
    ),
)
