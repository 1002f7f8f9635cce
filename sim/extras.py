"""Operator scenarios of a seed: what people and AWS do around the dispatcher besides the
nemesis's faults, drawn per seed, each scenario from its own generator
(``extras-<name>-<seed>``), and only for the scenarios `ENABLED` names, so that a seed
without them runs exactly as before.

- ``envelope``: the pools run the envelope input format (``input_format = "envelope"``).
- ``retries``: producers that retry (the same idempotency key and body, again, soon) and
  parents that retry with the same keys (a second parent whose items carry the first
  one's keys: two tokens wait on one child).
- ``cli_redrive``: ``sfn-dispatcher redrive`` (the real `dispatcher.cli.redrive.redrive`) run
  against the simulated SQS, by reason or for everything; some runs are killed between
  the send and the delete, and run again after the dead letters' visibility ran out.
- ``move_task``: SQS's own ``StartMessageMoveTask`` from the dead-letter queue back to the
  request queue (`sim.move_task`): every attribute kept, a new message id each.
- ``reconfigure``: configuration changed across a restart (SIGTERM or kill -9): a pool's
  ``key_attribute`` turned on or off, the input format switched, a pool's limit moved
  between the config file and its SSM parameter; requests in flight cross it.
- ``deploys``: rolling restarts (SIGTERM) once the faults have stopped, while children of
  parents with ``HeartbeatSeconds`` run (their heartbeats must go on across it).
- ``child_redrive``: a failed child of a parent redriven from the console moments after it
  failed (its parent must get its final result, not a superseded one).
- ``receive_limit``: request queues with a low ``maxReceiveCount`` (3 to 6): requests in
  doubt, deferred or handed back reach their last receive and are dead-lettered (then
  redriven by the scenarios above).
- ``rolling``: two or three processes sharing the lease with config files that differ
  (pools added and removed, limits in the file or in SSM, D and start grace), replaced by
  rolling deploys (a new process started, then the old one stopped), the leader frozen
  past its lease or its lease renewal hung (`sim.rolling`).

`ENABLED` comes from ``SIM_EXTRAS`` (``all`` or a comma-separated list) or ``python -m sim
--extras``. To turn them on by default, change `DEFAULT` below to ``"all"``.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

from sim import rolling
from sim.rolling import RollingPlan

DEFAULT = "all"
"""The scenarios on when ``SIM_EXTRAS`` is not set ("all" turns every one on)."""
SCENARIOS = (
    "envelope",
    "retries",
    "cli_redrive",
    "move_task",
    "reconfigure",
    "deploys",
    "child_redrive",
    "receive_limit",
    "rolling",
)
SHARE = {
    "envelope": 0.2,
    "retries": 0.3,
    "cli_redrive": 0.25,
    "move_task": 0.2,
    "reconfigure": 0.25,
    "deploys": 0.5,  # of the seeds with parents that heartbeat
    "child_redrive": 0.5,  # of the seeds with parents
    "receive_limit": 0.3,
    "rolling": 0.25,
}
REDRIVE_VISIBILITY = 300  # the CLI's default --visibility-timeout
REDRIVE_BOUND = 600.0  # seconds a CLI redrive may run before it is judged endless


def parse(text: str) -> frozenset[str]:
    """The scenarios a ``SIM_EXTRAS`` / ``--extras`` value names."""
    names = {n.strip() for n in text.split(",") if n.strip()}
    if "all" in names:
        return frozenset(SCENARIOS)
    unknown = names - set(SCENARIOS)
    if unknown:
        raise ValueError(f"unknown scenarios {sorted(unknown)}: choose from {SCENARIOS} or all")
    return frozenset(names)


ENABLED: frozenset[str] = parse(os.environ.get("SIM_EXTRAS", DEFAULT))
"""The scenarios a seed may draw (empty: every seed runs as before)."""


@dataclass(frozen=True)
class CliRedrive:
    """One ``sfn-dispatcher redrive`` run."""

    at: float
    reasons: tuple[str, ...] | None  # None: every dead letter
    killed: bool = False  # kill -9 between the send and the delete (then run again)


@dataclass(frozen=True)
class Reconfigure:
    """A configuration change, applied by restarting every process."""

    at: float
    what: str  # key_attribute | input_format | limit_source
    pool: str
    crash: bool  # kill -9 (else SIGTERM)


@dataclass(frozen=True)
class ExtrasPlan:
    """A seed's operator scenarios (all empty: none)."""

    envelope: bool = False
    producer_retries: float = 0.0  # share of keyed requests sent again soon
    parent_retries: bool = False
    cli_redrives: tuple[CliRedrive, ...] = ()
    move_tasks: tuple[float, ...] = ()
    reconfigures: tuple[Reconfigure, ...] = ()
    deploys: tuple[float, ...] = ()  # SIGTERM of every node, after the faults
    child_redrives: bool = False
    max_receive_count: int | None = None  # the request queues' (None: the default)
    rolling: RollingPlan | None = None  # processes with differing configs (sim.rolling)

    @property
    def names(self) -> list[str]:
        """The scenarios this plan has (for the scenario line of a failing seed)."""
        out = []
        if self.envelope:
            out.append("envelope")
        if self.producer_retries or self.parent_retries:
            out.append("retries")
        if self.cli_redrives:
            out.append(
                "cli_redrive" + ("(killed)" if any(r.killed for r in self.cli_redrives) else "")
            )
        if self.move_tasks:
            out.append("move_task")
        out += [f"reconfigure:{r.what}" for r in self.reconfigures]
        if self.deploys:
            out.append("deploys")
        if self.child_redrives:
            out.append("child_redrive")
        if self.max_receive_count is not None:
            out.append(f"receive_limit:{self.max_receive_count}")
        if self.rolling is not None:
            out += self.rolling.names
        return out

    @property
    def last_action(self) -> float:
        """When the last planned action starts (the run lasts until it is done)."""
        times = [r.at for r in self.cli_redrives] + list(self.move_tasks)
        times += [r.at for r in self.reconfigures] + list(self.deploys)
        if self.rolling is not None:
            times.append(self.rolling.last_action)
        return max(times, default=0.0)


def draw(
    seed: int,
    *,
    pools: dict[str, bool],
    one_target: bool,
    quiet_at: float,
    parents: bool,
    heartbeats: bool,
    heartbeat_grace: float,
    enabled: frozenset[str] | None = None,
) -> ExtrasPlan:
    """The plan of seed ``seed``. ``pools``: name -> whether it has per-key limits;
    ``one_target``: every request queue feeds the same pools (a redrive has one target);
    ``heartbeat_grace``: how long after ``quiet_at`` heartbeats are judged."""
    on = ENABLED if enabled is None else enabled
    # One generator per scenario: adding or turning on one changes no other's draws.
    gens = {name: random.Random(f"extras-{name}-{seed}") for name in SCENARIOS}
    rng = gens["envelope"]

    def has(name: str) -> bool:
        nonlocal rng
        rng = gens[name]
        return rng.random() < SHARE[name] and name in on

    plan: dict[str, object] = {}
    if has("envelope"):
        plan["envelope"] = True
    if has("retries"):
        plan["producer_retries"] = rng.choice((0.2, 0.5))
        plan["parent_retries"] = parents
    if has("cli_redrive") and one_target:
        runs = []
        for _ in range(rng.randint(1, 2)):
            at = rng.uniform(quiet_at * 0.3, quiet_at + 200.0)
            reasons = rng.choice((None, ("invalid_json",), ("receive_limit",), None))
            killed = rng.random() < 0.5
            runs.append(CliRedrive(at, reasons, killed))
            if killed:  # run again once the dead letters are visible again
                runs.append(CliRedrive(at + REDRIVE_VISIBILITY + rng.uniform(5, 60), reasons))
        plan["cli_redrives"] = tuple(sorted(runs, key=lambda r: r.at))
    if has("move_task") and one_target:
        plan["move_tasks"] = tuple(
            sorted(rng.uniform(quiet_at * 0.3, quiet_at + 200.0) for _ in range(rng.randint(1, 2)))
        )
    if has("reconfigure"):
        kinds = ("key_attribute", "key_attribute", "input_format", "limit_source")
        changes = [
            Reconfigure(
                at=rng.uniform(quiet_at * 0.2, quiet_at * 1.5),
                what=rng.choice(kinds),
                pool=rng.choice(sorted(pools)),
                crash=rng.random() < 0.4,
            )
            for _ in range(rng.randint(1, 2))
        ]
        plan["reconfigures"] = tuple(sorted(changes, key=lambda r: r.at))
    if has("deploys") and heartbeats:
        first = quiet_at + heartbeat_grace + rng.uniform(0, 60)
        plan["deploys"] = tuple(first + i * rng.uniform(40, 150) for i in range(rng.randint(1, 3)))
    if has("child_redrive") and parents:
        plan["child_redrives"] = True
    if has("receive_limit"):
        plan["max_receive_count"] = rng.choice((3, 4, 6))
    if has("rolling"):
        plan["rolling"] = rolling.draw(rng, quiet_at)
        plan.pop("reconfigures", None)  # each process's file is the rolling deploy's
        # Two pools fed by queues of their own: a redrive has no one target any more.
        plan.pop("cli_redrives", None)
        plan.pop("move_tasks", None)
    return ExtrasPlan(**plan)  # type: ignore[arg-type]
