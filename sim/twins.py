"""Buggify's ``twin_keeps``: a request kept on its last receive while its twin starts.

SQS stores a message twice now and then (at-least-once): both copies visible at once,
each with its own receipt handle and receive count, one execution name. In these seeds a
pool of limit 1 takes one such request at a time (an *episode*): one copy gets the slot,
the other waits in the waiting room. ``StartExecution`` is throttled from the episode's
send until the first copy's start gives up (its start retry timeout: the first attempt of
its name at or past that long after its first), and then for a *tail* more. The first
copy, on its last receive (``maxReceiveCount`` 1), is kept until a describe settles it;
its slot goes to the twin, whose start gets through once the tail has passed. And
``DescribeExecution`` does not know an execution for its first ``grace - D`` seconds (less
1 ms): the longest lag under which the dispatcher's rule for "does not exist" after a
start in doubt holds (the start may take effect D after the attempt was sent, the doubt
is settled only the start grace after it ended).

Two tails, one per episode:

- short (0.3 to 1.5 s): the twin's execution starts within seconds after the first copy
  was kept - after a describe at once would have said "does not exist", within D of a
  dead letter written then (the wait `LastReceives.keep` sets is what prevents it);
- long (9 to 10 s): the twin's execution starts within the describe lag before the kept
  copy's first describe, D + grace after it was kept: the describe says "does not exist",
  while the ledger holds the execution the twin started (the evidence `_never_started`
  reads is what prevents the dead letter).

The storm is a plan of its own (``buggify-twin-keeps-plan-SEED``); its end is chosen
from what the simulated AWS sees (the attempts of one name), nothing of the dispatcher's.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from sim.buggify import GRACE_MARGIN
from sim.calls import CallFault

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from sim.harness import Run

SHORT_TAIL = (0.3, 1.5)
LONG_TAIL = (10.05, 11.0)
START_RETRY_TIMEOUT = 30.0
"""The dispatcher's start retry timeout in these seeds: the twin retries through the tail."""
FIRST_EPISODE = (20.0, 30.0)
EPISODE_GAP = 100.0
CAP = 60.0
"""Seconds past the give-up expected at most: a storm whose give-up was not seen ends."""
SLACK = 0.25
"""Seconds before the retry timeout an attempt already counts as the last: the retries'
clock starts just before the first attempt is sent."""


def describe_lag(start_grace: float, start_timeout: float) -> float:
    """How long DescribeExecution does not know a new execution in these seeds."""
    return max(0.0, start_grace - start_timeout - GRACE_MARGIN)


@dataclass
class Episode:
    """One twinned request and the throttle storm around its first copy's give-up."""

    at: float  # when the request is sent (and the storm begins)
    tail: float  # how long the storm lasts after the first copy's start gave up
    name: str | None = None  # the name of the first start attempted in the storm
    first: float = 0.0  # when that first attempt came
    ends: float | None = None  # when the storm ends (None: not known yet)


@dataclass
class TwinStorms:
    """The episodes of a seed, and the StartExecution throttles they decide."""

    episodes: list[Episode] = field(default_factory=list)
    give_up_after: float = START_RETRY_TIMEOUT
    on_give_up: Callable[[Episode], None] | None = None  # told of each last attempt

    def fault(self, now: float, params: Mapping[str, Any]) -> CallFault | None:
        """A StartExecution's fate inside an episode's storm (None: outside every one)."""
        for episode in self.episodes:
            if now < episode.at or (episode.ends is not None and now >= episode.ends):
                continue
            name = str(params.get("name", ""))
            if episode.name is None:
                episode.name, episode.first = name, now
            elif (
                episode.ends is None
                and name == episode.name
                and now >= episode.first + self.give_up_after - SLACK
            ):
                episode.ends = now + episode.tail  # its last attempt: the start gives up
                if self.on_give_up is not None:
                    self.on_give_up(episode)
            if episode.ends is None and now >= episode.at + self.give_up_after + CAP:
                episode.ends = now
                continue
            return CallFault(error="ThrottlingException")
        return None


def plan(rng: random.Random, quiet_at: float, give_up_after: float) -> TwinStorms:
    """The episodes before ``quiet_at`` (when faults stop), tails short and long by turns."""
    episodes = []
    at = rng.uniform(*FIRST_EPISODE)
    short = rng.random() < 0.5
    while at + give_up_after + CAP < quiet_at:
        tail = rng.uniform(*(SHORT_TAIL if short else LONG_TAIL))
        episodes.append(Episode(at, tail))
        short = not short
        at += EPISODE_GAP + rng.uniform(0.0, 10.0)
    return TwinStorms(episodes, give_up_after)


async def produce(run: Run, storms: TwinStorms) -> None:
    """Send each episode's request, stored twice, when its storm begins."""
    pool = run.plan.pools[0]
    url = run.queues[pool.name][-1]  # the urgent queue: read ahead, started first
    for index, episode in enumerate(storms.episodes):
        await anyio.sleep(max(0.0, episode.at - run.clock()))
        request_id = f"twin{index}"
        body = json.dumps({"req": request_id, "seconds": 1})
        run.world.send_request(url, body, {}, request_id=request_id, twice=True)
