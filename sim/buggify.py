"""Buggify (FoundationDB's idea): in a share of the seeds, make the rare cases common.

Each knob is drawn from the seed alone (its own random stream, so a seed's other draws do
not move), and is on in about a third of the seeds. A knob makes AWS behave at the edge
of what it is documented (or, for bounds AWS does not state, what the dispatcher is
documented to assume: docs/testing.md, "What the simulation assumes about AWS") - never
beyond it. `BUGGIFY` turns them all off (``python -m sim --no-buggify``).

- ``event_storms``: stretches of time in which every status event is lost, or late by
  seconds to hours (EventBridge delivers best effort).
- ``late_starts``: StartExecution requests held on the wire and applied at the client's
  deadline D (the bound the dispatcher relies on: a start takes effect within D of being
  sent, or never), the client timing out then or failing earlier with a 5xx or a reset
  connection; sometimes every start of a window, longer than the start retry timeout.
- ``lag_at_grace``: ListExecutions lagging at the start grace (just under it, as the
  docs assume) for half of the runs, the rest below.
- ``sqs_duplicates``: SQS storing a share of the messages twice (at-least-once), both
  copies visible at once: delivered twice concurrently.
- ``max_receive_count``: the request queues' redrive policy at 2, 3 or 5 receives.
- ``long_outside``: executions started and redriven outside the dispatcher run minutes,
  long enough to be judged against the limit.
- ``refused_retries``: a StartExecution stretch longer than the start retry timeout in
  which each start's first attempt is applied but answered with a 5xx, a lost answer or a
  timeout, and every retry is refused (throttled); its status events lost or late, the
  executions long: a start given up must stay in doubt.
- ``callback_storms``: SendTaskSuccess/Failure/Heartbeat throttled or failing with 5xx
  for 40 s to a few minutes (longer than a call's retries), while children run.
- ``limit_drops``: StartExecution requests lost for 15 to 40 s (every attempt on the wire
  unknown) while the limit is lowered: a retry must fit under the new limit.

The knobs below are drawn from a stream of their own (``buggify-hunt-SEED``), and their
plans too (`sim.nemesis.plan`'s ``hunt_rng``): a seed where they are all off runs exactly
as before they were added.

- ``unknown_starts``: a burst of requests meets a StartExecution stretch longer than the
  start retry timeout in which each start's first attempt is applied and answered with a
  5xx, and every retry is throttled; the status events are lost, the executions long. A
  5xx says nothing about whether the start took effect: the slot must stay held.
- ``last_receive_doubts``: the same stretch (first answers 5xx or lost), long enough for
  two receives, with the request queues' ``maxReceiveCount`` at 2, status events lost,
  short runs (a listing may miss them) and DescribeExecution failing (5xx, throttles) for
  minutes, and no renewal (as ``renewals_denied``): a request kept on its last receive in
  doubt must not be dead-lettered on a describe that failed.
- ``slow_starts``: one pool of limit 2, a low start rate (one StartExecution every 14.5 s,
  a burst of one), a burst of requests, every StartExecution answer lost and every status
  event lost for 20 to 40 s, and the limit lowered to 1 at the burst: a start waiting for
  its rate token must then fit under the new limit with the starts already sent (which
  may run).
- ``early_answers``: half of the starts are dark: their attempts lost but for the last
  one to three seconds before the start gives up, held on the wire, answered with a 5xx at
  once and applied at D (after the give-up); their events lost; reconcile every 2 s. A
  "does not exist" within the start grace after a start in doubt settles nothing.

Each knob below is drawn from a stream of its own too:

- ``renewals_denied`` (``buggify-renewals-denied-SEED``): the dispatchers may not send to
  the request queues (an IAM policy without ``sqs:SendMessage`` on them: AccessDenied, as
  after an upgrade whose policy was not updated), so no request on its last receive can
  be renewed: it is kept and settled by describes (`dispatcher.daemon.lastreceive`), the
  path a renewal otherwise spares.
- ``late_redrives`` (a stream of its own, `sim.redrives`): a governed execution fails
  while its pool is full and is redriven seconds later for minutes, the failure's status
  event late past the redriven run's (or on time).
- ``key_limit_drops`` (a stream of its own, `sim.key_limits`): a keyed pool's per-key
  limit lowered (2 to 1) while every StartExecution request is lost on the wire for
  19 to 25 s: a retry must fit under the new per-key limit.
- ``exists_unknown`` (a stream of its own, `sim.exists`): StartExecution answers
  ExecutionAlreadyExists for a producer's retry, DescribeExecution fails, and the
  execution (failed unseen before a restart) is redriven meanwhile.

``twin_keeps`` is drawn from a stream of its own (``buggify-twin-keeps-SEED``), and planned
from one too (`sim.twins`): one pool of limit 1, ``maxReceiveCount`` 1, requests stored
twice by SQS one at a time, StartExecution throttled until the first copy's start gives
up and a tail more, and DescribeExecution not knowing an execution for its first
``grace - D`` seconds (less 1 ms): the twin starts just after its first copy was kept on
its last receive, or just before that copy's first describe.

``twin_waits`` (``buggify-twin-waits-SEED``, only where ``twin_keeps`` is drawn off) turns
``twin_keeps`` and ``renewals_denied`` on and every other knob off, the pool's limit
dropped to 0 at each first copy's give-up for 30 to 50 s (`sim.twin_waits`): the twin
waits in the room when the kept copy is described. ``exists_full``
(``buggify-exists-full-SEED``, where ``exists_unknown`` is off) turns ``exists_unknown`` on
alone, built so that a slot freed on failed describes is used at once (`sim.exists`).
``late_running`` (``buggify-late-running-SEED``) is a scenario of its own: every RUNNING
event delivered again after its run ended, a backlog waiting for each slot
(`sim.late_running`); so is ``deep_backlog`` (``buggify-deep-backlog-SEED``): a backlog far
deeper than the waiting room, deferred in turn (`sim.backlog`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

BUGGIFY = True
"""Whether seeds draw buggify knobs at all."""

SHARE = 0.3
"""The share of seeds in which each knob is on."""

LATE_STARTS_SHARE = 0.4
"""Late starts test the most rules (doubt, its grace, the take-over wait): a larger share."""

GRACE_MARGIN = 0.001
"""How far under the start grace a listing lag at the grace stays (the docs assume a
lag *less than* the grace)."""


@dataclass(frozen=True)
class Knobs:
    """The buggify knobs of one seed (all off: the default)."""

    event_storms: bool = False
    late_starts: bool = False
    lag_at_grace: bool = False
    sqs_duplicates: float = 0.0  # share of messages stored twice
    max_receive_count: int | None = None  # None: the template's default
    long_outside: bool = False
    refused_retries: bool = False
    callback_storms: bool = False
    limit_drops: bool = False
    unknown_starts: bool = False
    last_receive_doubts: bool = False
    slow_starts: bool = False
    early_answers: bool = False
    renewals_denied: bool = False
    late_redrives: bool = False
    key_limit_drops: bool = False
    exists_unknown: bool = False
    twin_keeps: bool = False
    twin_waits: bool = False  # with twin_keeps (`sim.twin_waits`)
    exists_full: bool = False  # with exists_unknown (`sim.exists`)
    late_running: bool = False  # alone (`sim.late_running`)
    deep_backlog: bool = False  # alone (`sim.backlog`)

    @property
    def on(self) -> tuple[str, ...]:
        """The names of the knobs that are on."""
        names = (
            "event_storms",
            "late_starts",
            "lag_at_grace",
            "sqs_duplicates",
            "max_receive_count",
            "long_outside",
            "refused_retries",
            "callback_storms",
            "limit_drops",
            *HUNT,
            *OWN,
        )
        return tuple(name for name in names if getattr(self, name))

    @property
    def classic(self) -> tuple[str, ...]:
        """The knobs on that are not `HUNT` knobs (those plan from their own stream)."""
        return tuple(name for name in self.on if name not in HUNT and name not in OWN)


HUNT = (
    "unknown_starts",
    "last_receive_doubts",
    "slow_starts",
    "early_answers",
    "renewals_denied",
    "late_redrives",
    "key_limit_drops",
    "exists_unknown",
)
"""Knobs drawn, and planned, from their own stream (added later: no other draw moved)."""

OWN = ("twin_keeps", "twin_waits", "exists_full", "late_running", "deep_backlog")
"""Knobs drawn, and planned, each from a stream of its own (named after it)."""

OFF = Knobs()

TWIN_WAITS_SHARE = 0.15
"""``twin_waits`` is on in this share of the seeds where ``twin_keeps`` is off."""
EXISTS_FULL_SHARE = 0.1
"""``exists_full`` is on in this share of the seeds where ``exists_unknown`` is off."""
LATE_RUNNING_SHARE = 0.06
"""``late_running`` is on in this share of the seeds (where no knob above is)."""
DEEP_BACKLOG_SHARE = 0.05
"""``deep_backlog`` is on in this share of the seeds (where no knob above is)."""

KEY_LIMIT_DROPS_SHARE = 0.4
"""``key_limit_drops`` needs a keyed pool and a retry on the wire: a larger share."""


def own(knob: str, seed: int, share: float = SHARE) -> bool:
    """Whether ``seed`` has ``knob`` on, drawn from a stream of its own
    (``buggify-KNOB-SEED``): no other draw moves."""
    return random.Random(f"buggify-{knob}-{seed}").random() < share


def draw(seed: int) -> Knobs:
    """The knobs of ``seed`` (all off when `BUGGIFY` is off)."""
    if not BUGGIFY:
        return OFF
    special = scenario_knobs(seed)
    return special if special is not None else classic(seed)


SCENARIO_MARKS = ("twin_waits", "exists_full", "late_running", "deep_backlog")
"""A knob of these on marks a seed that is a scenario of its own (`scenario_knobs`)."""


def own_scenario(knobs: Knobs) -> bool:
    """Whether ``knobs`` are a scenario of its own's (every knob not of it off)."""
    return any(getattr(knobs, name) for name in SCENARIO_MARKS)


def scenario_knobs(seed: int) -> Knobs | None:
    """The knobs of a seed that is a scenario of its own (`SCENARIOS`, every other knob
    off), each drawn from a stream of its own where the knob it refines is off (None: the
    seed is not one; its knobs are `classic`)."""
    twins = random.Random(f"buggify-twin-keeps-{seed}").random() < SHARE
    if not twins and own("twin-waits", seed, TWIN_WAITS_SHARE):
        # No other knob's storm throttles the describes it needs; no renewal (a renewed
        # request is not kept, nor its twin held in the room).
        return Knobs(twin_keeps=True, twin_waits=True, renewals_denied=True)
    if not own("exists-unknown", seed) and own("exists-full", seed, EXISTS_FULL_SHARE):
        return Knobs(exists_unknown=True, exists_full=True)
    if own("late-running", seed, LATE_RUNNING_SHARE):
        return Knobs(late_running=True)
    if own("deep-backlog", seed, DEEP_BACKLOG_SHARE):
        return Knobs(deep_backlog=True)
    return None


def classic(seed: int) -> Knobs:
    """The knobs ``seed`` draws unless it is a scenario of its own (`scenario_knobs`);
    also what it runs when that scenario is dropped (as if it had not been drawn)."""
    rng = random.Random(f"buggify-{seed}")
    hunt = random.Random(f"buggify-hunt-{seed}")
    return Knobs(
        event_storms=rng.random() < SHARE,
        late_starts=rng.random() < LATE_STARTS_SHARE,
        lag_at_grace=rng.random() < SHARE,
        sqs_duplicates=rng.choice((0.1, 0.3, 0.5)) if rng.random() < SHARE else 0.0,
        max_receive_count=rng.choice((2, 3, 5)) if rng.random() < SHARE else None,
        long_outside=rng.random() < SHARE,
        # Drawn after the others: adding them moved no earlier knob of any seed.
        refused_retries=rng.random() < SHARE,
        callback_storms=rng.random() < SHARE,
        limit_drops=rng.random() < SHARE,
        unknown_starts=hunt.random() < SHARE,
        last_receive_doubts=hunt.random() < SHARE,
        slow_starts=hunt.random() < SHARE,
        early_answers=hunt.random() < SHARE,
        renewals_denied=random.Random(f"buggify-renewals-denied-{seed}").random() < SHARE,
        late_redrives=own("late-redrives", seed),
        key_limit_drops=own("key-limit-drops", seed, KEY_LIMIT_DROPS_SHARE),
        exists_unknown=own("exists-unknown", seed),
        twin_keeps=random.Random(f"buggify-twin-keeps-{seed}").random() < SHARE,
    )


__all__ = [
    "BUGGIFY",
    "GRACE_MARGIN",
    "HUNT",
    "LATE_STARTS_SHARE",
    "OFF",
    "OWN",
    "SHARE",
    "Knobs",
    "draw",
]
