"""Buggify knobs for parent workflows and their task tokens (seeds with parents only).

Drawn from a stream of their own (``token-faults-SEED``), and planned from others
(``token-faults-shape-SEED``, ``token-faults-plan-SEED``): a seed where they are all off
(every seed without parents) runs exactly as before they were added. Each is on in a
third to a half of the seeds with parents. ``answer_storms`` and ``token_copies`` start
the parents early in the run, with short children and (unless a buggify knob set the
seed's load) a light load of other requests, so that children start at once and end
before the faults stop.

- ``answer_storms``: each token's ``SendTaskSuccess`` / ``SendTaskFailure`` throttled (or
  failing with a 5xx before the effect) for 40 to 90 s from its first answer - a storm
  that begins as its child ends, longer than an answer's retries - while the faults last
  (heartbeats go through). An answer that failed must be sent again: its token stays held,
  its message hidden (else the parent waits forever, its message deleted).
- ``token_copies``: SQS storing every token's request message twice (both copies visible
  at once), the request queues' ``maxReceiveCount`` at 2, and each parent (never aborted)
  waiting on a first child that runs 6 to 8 minutes: a token's message received twice is
  held under both receipt handles, each kept hidden until the parent is answered (a copy
  let go comes back, is received again, and the redrive policy moves it without a reason).
- ``awaited_orphans``: ``stop_orphaned_children`` on; the first parent, its children long
  (2 to 4 minutes), is retried by its caller within seconds (a second parent whose items
  carry the same keys: two tokens wait on each child) and aborted a minute later, while
  its children run: a child another token waits on is never stopped.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sim.calls import CallFault

if TYPE_CHECKING:
    from sim.harness import Scenario
    from sim.parents import ParentsPlan

SHARE = 0.35
"""The share of the seeds with parents in which each knob is on..."""
ANSWER_SHARE = 0.5
"""...but ``answer_storms``, left out where receives are few (see `shape`)."""
ANSWERS = ("SendTaskSuccess", "SendTaskFailure")
ANSWER_STORM = (40.0, 90.0)  # seconds: longer than an answer's retries (5 attempts)
LIGHT_LOAD = (10, 30)  # at most: other requests, and seconds each runs (`_light`)
LOADED = (
    "refused_retries",
    "unknown_starts",
    "last_receive_doubts",
    "slow_starts",
    "early_answers",
)
"""Buggify knobs that set a seed's load (`sim.harness._buggified`): answer_storms keeps it."""
COPIES_MAX_RECEIVE_COUNT = 2
COPIES_SHARE = 1.0  # of the token messages stored twice
COPIES_LONG_CHILD = (360, 480)  # seconds: several visibility timeouts (60 s)
AWAITED_LONG_CHILD = (120, 240)


@dataclass(frozen=True)
class TokenKnobs:
    """The token knobs of one seed (all off: the default)."""

    answer_storms: bool = False
    token_copies: bool = False
    awaited_orphans: bool = False

    @property
    def on(self) -> tuple[str, ...]:
        """The names of the knobs that are on."""
        names = ("answer_storms", "token_copies", "awaited_orphans")
        return tuple(name for name in names if getattr(self, name))


OFF = TokenKnobs()


def draw(seed: int) -> TokenKnobs:
    """The token knobs of ``seed`` (whether it has parents is the caller's business)."""
    rng = random.Random(f"token-faults-{seed}")
    return TokenKnobs(
        answer_storms=rng.random() < ANSWER_SHARE,
        token_copies=rng.random() < SHARE,
        awaited_orphans=rng.random() < SHARE,
    )


def shape(seed: int, made: Scenario) -> Scenario:
    """The scenario with the seed's token knobs (unchanged without parents, or with them
    all off)."""
    from sim.buggify import BUGGIFY  # noqa: PLC0415 - read at call time (--no-buggify)

    if not BUGGIFY or not made.parents.parents:
        return made
    knobs = draw(seed)
    if not knobs.on:
        return made
    extras = made.extras
    if knobs.token_copies and (extras.cli_redrives or extras.move_tasks or extras.reconfigures):
        # Dead letters copied back, or names changed across a restart: the requests
        # dead-lettered on their last receive would be judged by open defects of their own
        # (see docs/testing.md), not by what this knob is about.
        knobs = dataclasses.replace(knobs, token_copies=False)
    low = made.extras.max_receive_count or made.knobs.max_receive_count or knobs.token_copies
    if knobs.answer_storms and low:
        # A token held longer (its answer failing) across the end of a reign, on its last
        # receive, is let lapse and moved by the redrive policy: an open defect of its own
        # (docs/testing.md, "Receives used up outside the dispatcher's hold").
        knobs = dataclasses.replace(knobs, answer_storms=False)
    rng = random.Random(f"token-faults-shape-{seed}")
    parents = made.parents
    if knobs.answer_storms or knobs.token_copies:
        made, parents = _light(made, parents)
    if knobs.token_copies:
        made = dataclasses.replace(
            made,
            knobs=dataclasses.replace(made.knobs, max_receive_count=COPIES_MAX_RECEIVE_COUNT),
            extras=dataclasses.replace(
                made.extras,
                max_receive_count=made.extras.max_receive_count and COPIES_MAX_RECEIVE_COUNT,
            ),
            # Room to wait in: the intake keeps receiving while the copies are held.
            pools=tuple(dataclasses.replace(p, max_waiting=100) for p in made.pools),
        )
        long = {p.name: rng.randint(*COPIES_LONG_CHILD) for p in parents.parents}
        firsts = []
        for parent in parents.parents:  # a retry's items are its original's: the same body
            seconds = (long[parent.retry_of or parent.name], *parent.seconds[1:])
            firsts.append(
                dataclasses.replace(parent, seconds=seconds, abort_at=None, timeout_seconds=None)
            )
        parents = dataclasses.replace(parents, parents=tuple(firsts))
    if knobs.awaited_orphans:
        first = parents.parents[0]
        count = min(len(first.seconds), 3)
        first = dataclasses.replace(
            first,
            seconds=tuple(rng.randint(*AWAITED_LONG_CHILD) for _ in range(count)),
            heartbeat_seconds=None,
            timeout_seconds=None,
            abort_at=first.at + rng.uniform(45.0, 75.0),
            fail=frozenset(),
            bad=frozenset(),
            large=frozenset(),
            too_large=frozenset(),
            retry_of=None,
        )
        retry = dataclasses.replace(
            first,
            name=f"{first.name}r",
            at=first.at + rng.uniform(2.0, 15.0),
            abort_at=None,
            retry_of=first.name,
        )
        others = [
            p for p in parents.parents[1:] if p.retry_of != first.name and p.name != retry.name
        ]
        parents = dataclasses.replace(parents, parents=(first, *others, retry), stop_orphans=True)
    if not knobs.on:
        return made
    return dataclasses.replace(made, parents=parents, token_knobs=knobs)


def _light(made: Scenario, parents: ParentsPlan) -> tuple[Scenario, ParentsPlan]:
    """Children that start at once and end before the faults stop: the parents early in
    the run, their children short, and (unless another knob set the seed's load) a light
    load of other requests."""
    quiet_at = max(made.quiet_at, 300.0)
    early = []
    for parent in parents.parents:
        at = parent.at * 0.3 * quiet_at / max(made.quiet_at, 1.0)
        abort = None if parent.abort_at is None else parent.abort_at - parent.at + at
        seconds = tuple(min(s, LIGHT_LOAD[1]) for s in parent.seconds)
        early.append(dataclasses.replace(parent, at=at, abort_at=abort, seconds=seconds))
    made = dataclasses.replace(made, quiet_at=quiet_at)
    if not any(getattr(made.knobs, name) for name in LOADED):  # their load stays
        made = dataclasses.replace(
            made,
            requests=min(made.requests, LIGHT_LOAD[0]),
            max_seconds=min(made.max_seconds, LIGHT_LOAD[1]),
        )
    return made, dataclasses.replace(parents, parents=tuple(early))


def token_duplicates(made: Scenario) -> float:
    """The share of token messages SQS stores twice (0: as every other message)."""
    return COPIES_SHARE if made.token_knobs.token_copies else 0.0


@dataclass
class AnswerStorms:
    """``answer_storms``: each token's answers throttled (or failed with a 5xx before the
    effect) from its first answer for ``ANSWER_STORM`` seconds - a storm that begins as
    its child ends - while the faults last. Other calls go to ``faults``."""

    faults: Callable[[str, str, Any], CallFault]
    clock: Callable[[], float]
    quiet_at: float
    rng: random.Random
    until: dict[str, float] = field(default_factory=dict)  # token -> its storm's end

    def __call__(self, node: str, operation: str, params: Any) -> CallFault:
        now = self.clock()
        if operation not in ANSWERS or node == "producer" or now >= self.quiet_at:
            return self.faults(node, operation, params)
        token = str(params.get("taskToken", ""))
        if token not in self.until:
            self.until[token] = now + self.rng.uniform(*ANSWER_STORM)
        if now >= self.until[token]:
            return self.faults(node, operation, params)
        if self.rng.random() < 0.5:
            return CallFault(error="ThrottlingException")
        return CallFault(error="ServiceUnavailable")


def faults(
    decide: Callable[[str, str, Any], CallFault], made: Scenario, clock: Callable[[], float]
) -> Callable[[str, str, Any], CallFault]:
    """The run's call faults with the seed's token faults on top (``decide`` as it is
    when they are off)."""
    if not made.token_knobs.answer_storms:
        return decide
    rng = random.Random(f"token-faults-plan-{made.seed}")
    return AnswerStorms(decide, clock, made.quiet_at, rng)


__all__ = [
    "OFF",
    "SHARE",
    "AnswerStorms",
    "TokenKnobs",
    "draw",
    "faults",
    "shape",
    "token_duplicates",
]
