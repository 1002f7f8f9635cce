"""Buggify's ``exists_unknown``: StartExecution says an execution exists, DescribeExecution
fails, and meanwhile the execution is redriven.

A running execution the dispatcher started for a request with an idempotency key fails
(the workflow's own failure, its status events lost), and every
dispatcher process is killed at once: the processes that come back cannot know it ran
(their start-up listings show running executions only). About a minute later the
producer sends the request again (a retry with the same key: the same execution name).
When its StartExecution comes, AWS answers ``ExecutionAlreadyExists`` (the execution is
closed), every DescribeExecution fails for 30 to 60 s (5xx), and an operator redrives the
execution a moment after the answer, for ten minutes or more (its events lost too); more
requests than the pool has slots come just after the retry. The
process cannot tell whether the execution runs: its slot must stay held, in doubt, until
a listing shows the redriven run - the checker counts that run from its start
(`sim.checker.told_exists`).

Not with parent workflows (a failed child answers its parent), a rolling deploy nor a
key_attribute reconfiguration (the retry would have another name). The
knob draws and plans from streams of its own (``buggify-exists-unknown-SEED``,
``exists-unknown-SEED``): a seed where it is off runs exactly as before.

``exists_full`` (``buggify-exists-full-SEED``, in a share of the seeds where
``exists_unknown`` is off) is the same scenario built so that a slot freed on the failed
describes is used at once: every other knob off, no named limit, no per-key limit, few
other requests, and of the nemesis's actions only kills; the victim is a request of the
knob's own (an idempotency key, a long run); the burst comes once the retry's
StartExecution was answered, and the redrive with the `FULL_REDRIVE_AT`-th failed describe
of the execution - late enough that a listing shows it only after the process gave up
describing (when the mutant ``describe-failure-frees-slot`` frees the slot to a request
of the burst), early enough to run when that request starts.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import anyio

from sim import buggify
from sim.aws import EventFault, EventFaults, EventInfo
from sim.calls import NO_FAULT, CallFault
from sim.history import OUTSIDE, key_tag_of

if TYPE_CHECKING:
    from sim.harness import Run, Scenario

SHARE = 0.3
"""The share of seeds in which the knob is on."""
IDEMPOTENCY_ATTRIBUTE = "idempotency-key"
START_BY = "start-by"
SETTLED_SENDS = 25.0
"""The victim's request was last sent this long ago (a producer's own retries come within
20 s: after the failure one would be answered "already exists" and described)."""
LAST_FAILURE = 0.6
"""No failure later than this share of the time before the faults stop."""
RETRY_AFTER = (50.0, 70.0)
"""Seconds from the failure (and the kills) to the producer's retry."""
DESCRIBES_FAIL = (30.0, 60.0)
"""How long every DescribeExecution fails from the retry's StartExecution."""
REDRIVE_AFTER = 0.3
"""Seconds from the retry's StartExecution to the redrive (after AWS's answer)."""
REDRIVE_RUNS = (600.0, 900.0)
FAILING = CallFault(error="ServiceUnavailable")
BURST_EXTRA = 2
"""Requests sent just after the retry: the pool's limit and this many more."""
BURST_SECONDS = (30, 90)
FULL_REQUESTS = 12
"""``exists_full``: the producers' requests (a victim among them, no backlog)."""
FULL_VICTIM_AT = (5.0, 30.0)
"""``exists_full``: when its own victim request is sent."""
FULL_VICTIM_RUNS = 900
"""``exists_full``: how long the victim's execution would run (it fails first)."""
FULL_REDRIVE_AT = 10
"""``exists_full``: the redrive comes with this failed describe of the execution (the
process gives up after 5 attempts of up to 3 calls each, some 10 s): a listing that
shows the redriven run comes after the give-up, unless its lag is short."""


def shaped(made: Scenario) -> Scenario:
    """``exists_full``: no named limit (its changes would hold the burst back)."""
    if not made.knobs.exists_full:
        return made
    return dataclasses.replace(made, named=None)


def drawn(seed: int) -> bool:
    """Whether ``seed`` has the knob on (its own stream)."""
    return buggify.own("exists-unknown", seed, SHARE)


def buggified(made: Scenario) -> Scenario:
    """Time and a backlog: the pool full when the retry's slot is settled."""
    if not made.knobs.exists_unknown:
        return made
    made = dataclasses.replace(
        made,
        quiet_at=max(made.quiet_at, 600.0),
        requests=max(made.requests, 40),
        max_seconds=max(made.max_seconds, 30),
    )
    if made.knobs.exists_full:
        # Little traffic (the retry gets a slot at once, no backlog before it), and no
        # per-key limit holds the burst back, no deferral: the burst fills the pool.
        pools = tuple(
            dataclasses.replace(p, per_key_limit=None, max_waiting=100) for p in made.pools
        )
        made = dataclasses.replace(made, pools=pools, requests=FULL_REQUESTS)
    return made


class ExistsUnknown:
    """Carries out the knob in a run."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.rng = random.Random(f"exists-unknown-{run.seed}")
        self.fail_at = self.rng.uniform(0.1, 0.3) * run.plan.quiet_at
        self.arn: str | None = None  # the execution failed
        self.name = ""
        self.machine = ""
        self.armed = False  # the retry sent: its StartExecution triggers the rest
        self.describes_fail_until = -1.0
        self.called = anyio.Event()
        # exists_full: the redrive comes late in the retry's describes, the burst after its
        # StartExecution (see `FULL_REDRIVE_AT`).
        self.full = run.plan.knobs.exists_full
        self.described = 0  # failed describes of the execution since the retry's start
        self.redrive_due = anyio.Event()
        self._events: EventFaults = run.world.event_faults
        run.world.event_faults = self.event_fault
        self._faults = run.world.faults
        run.world.faults = self.call_fault

    def event_fault(self, info: EventInfo) -> EventFault:
        """Every status event of the execution is lost."""
        if info.execution_arn == self.arn:
            return EventFault(lost=True)
        return self._events(info)

    def call_fault(self, node: str, operation: str, params: Mapping[str, Any]) -> CallFault:
        """The retry's StartExecution (answered, whatever else was planned) starts the
        describe failures and the redrive."""
        now = self.run.clock()
        if now >= self.run.plan.quiet_at:  # every fault stops then
            return self._faults(node, operation, params)
        if operation == "StartExecution" and self.armed and params.get("name") == self.name:
            self.armed = False
            self.describes_fail_until = now + self.rng.uniform(*DESCRIBES_FAIL)
            self.called.set()
            return NO_FAULT  # "already exists" reaches the process
        if operation == "DescribeExecution" and now < self.describes_fail_until:
            if self.full and params.get("executionArn") == self.arn:
                self.described += 1
                if self.described >= FULL_REDRIVE_AT:
                    self.redrive_due.set()
            return FAILING
        return self._faults(node, operation, params)

    async def __call__(self) -> None:
        """Fail, kill, retry, redrive."""
        from sim.nemesis import Action  # noqa: PLC0415 - sim.nemesis imports sim.buggify, this

        run, history = self.run, self.run.world.history
        if self.full:
            found = await self._own_victim()
        else:
            await anyio.sleep(max(0.0, self.fail_at - run.clock()))
            found = self._victim()
            while found is None and run.clock() < LAST_FAILURE * run.plan.quiet_at:
                await anyio.sleep(5.0)
                found = self._victim()
        if found is None:
            return
        self.arn, self.name, request = found
        self.machine = run.world.history.executions[self.arn].state_machine_arn
        history.note(run.clock(), "operator", f"exists_unknown: {self.name} fails")
        run.world.stop_outside(self.arn, status="FAILED")
        for node in run.nodes:
            run.kill(Action(run.clock(), "crash", node))
        await anyio.sleep(self.rng.uniform(*RETRY_AFTER))
        self.armed = True
        history.note(run.clock(), "producer", f"exists_unknown: request {request[0]} again")
        run.world.send_request(request[1], request[2], request[3], request_id=request[0])
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._burst)
            await self._redrive_when_called()

    async def _redrive_when_called(self) -> None:
        """Redrive a moment after the retry's StartExecution (answered "already exists")."""
        run = self.run
        with anyio.move_on_after(max(0.0, run.plan.quiet_at - run.clock())):
            await self.called.wait()
        if not self.called.is_set() or self.arn is None:
            return
        if self.full:
            with anyio.move_on_after(max(0.0, run.plan.quiet_at - run.clock())):
                await self.redrive_due.wait()
        else:
            await anyio.sleep(REDRIVE_AFTER)
        if run.world.redrive(self.arn, self.rng.uniform(*REDRIVE_RUNS)):
            run.world.history.note(run.clock(), "operator", f"exists_unknown: {self.name} redriven")

    async def _burst(self) -> None:
        """Requests behind the retry, more than the pool's slots: one waits for the slot the
        retry's start settles."""
        run = self.run
        pool = next(p for p in run.plan.pools if run.arns[p.name] == self.machine)
        if self.full:  # while the retry's describes fail: it holds its slot meanwhile
            with anyio.move_on_after(max(0.0, run.plan.quiet_at - run.clock())):
                await self.called.wait()
        for index in range(pool.limit + BURST_EXTRA):
            await anyio.sleep(self.rng.uniform(0.1, 0.5))
            request_id = f"exists-{index}"
            seconds = self.rng.randint(*BURST_SECONDS)
            body = json.dumps({"req": request_id, "seconds": seconds})
            attributes = run.attributes(self.rng, pool, request_id)
            attributes.pop(START_BY, None)
            url = run.queues[pool.name][0]
            run.world.send_request(url, body, attributes, request_id=request_id)

    async def _own_victim(self) -> tuple[str, str, tuple[str, str, str, dict[str, str]]] | None:
        """``exists_full``: the victim is a request of the knob's own, with an idempotency
        key and a long run, sent early; returned once it has run `SETTLED_SENDS` (None: it
        did not start in time)."""
        run, history = self.run, self.run.world.history
        pool = run.plan.pools[self.rng.randrange(len(run.plan.pools))]
        await anyio.sleep(self.rng.uniform(*FULL_VICTIM_AT))
        request_id = "exists-victim"
        body = json.dumps({"req": request_id, "seconds": FULL_VICTIM_RUNS})
        attributes = run.attributes(self.rng, pool, request_id)
        attributes.pop(START_BY, None)
        attributes[IDEMPOTENCY_ATTRIBUTE] = f"key-{request_id}"
        url = run.queues[pool.name][0]
        run.world.send_request(url, body, attributes, request_id=request_id)
        request = (request_id, url, body, dict(attributes))
        machine = run.arns[pool.name]
        while run.clock() < LAST_FAILURE * run.plan.quiet_at:
            await anyio.sleep(5.0)
            for execution in history.executions.values():
                if execution.state_machine_arn != machine or execution.started_by == OUTSIDE:
                    continue
                if not execution.name.endswith(attributes[IDEMPOTENCY_ATTRIBUTE]):
                    continue
                if execution.runs[0].stop is None and execution.first_start <= (
                    run.clock() - SETTLED_SENDS
                ):
                    return execution.arn, execution.name, request
        return None

    def _victim(self) -> tuple[str, str, tuple[str, str, str, dict[str, str]]] | None:
        """A running execution a dispatcher started (a name no other machine's execution
        has) and its request's message, which has an idempotency key and no start-by and
        was last sent `SETTLED_SENDS` ago (None: none now)."""
        history = self.run.world.history
        governed = set(self.run.arns.values())
        names: dict[str, int] = {}
        for execution in history.executions.values():
            names[execution.name] = names.get(execution.name, 0) + 1
        now = self.run.clock()
        last_sent: dict[str, float] = {}
        for m in history.requests:
            last_sent[m.request_id] = max(last_sent.get(m.request_id, 0.0), m.sent_at)
        keyed = {
            m.attributes[IDEMPOTENCY_ATTRIBUTE]: m
            for m in history.requests
            if IDEMPOTENCY_ATTRIBUTE in m.attributes
            and START_BY not in m.attributes
            and last_sent[m.request_id] <= now - SETTLED_SENDS
        }
        candidates = []
        for execution in history.executions.values():
            if execution.state_machine_arn not in governed or execution.started_by == OUTSIDE:
                continue
            if len(execution.runs) != 1 or execution.runs[0].stop is not None:
                continue
            base = execution.name
            if key_tag_of(base) is not None:
                base = base.split("_", 1)[1]
            message = keyed.get(base)
            if message is None or names[execution.name] != 1:
                continue
            request = (
                message.request_id,
                message.queue_url,
                message.body,
                dict(message.attributes),
            )
            candidates.append((execution.arn, execution.name, request))
        if not candidates:
            return None
        candidates.sort()
        return candidates[self.rng.randrange(len(candidates))]
