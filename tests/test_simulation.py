"""The deterministic simulation (layer 2): the production dispatcher against a simulated
AWS under a seeded nemesis, judged from the simulated AWS's records (see sim/).

`make test` runs a fast subset of seeds and checks that the simulation still finds each
fixed bug when it is put back; `make simulate` runs the full 2,000 seeds.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import structlog

from sim import __main__ as sim_cli
from sim.bugs import BUGS
from sim.calls import CallFault
from sim.checker import max_concurrency
from sim.harness import Outcome, PoolPlan, Run, Scenario, simulate
from sim.nemesis import Nemesis

DEFAULT_SEEDS = 2000  # `make simulate`'s count: each bug put back must be found within it
FAST_SEEDS = 200


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    """The dispatcher's log lines, thousands per seed, are not what is tested here."""
    sim_cli._quiet_logs(verbose=False)
    yield
    structlog.reset_defaults()


def digest(outcome: Outcome) -> str:
    """A fingerprint of the whole history of a run."""
    text = "\n".join(record.line() for record in outcome.world.history.records)
    return hashlib.sha256(text.encode()).hexdigest()


KNOWN_OPEN: dict[int, set[str]] = {}
"""Seeds of the fast subset that still find an open defect, with what they find (docs/testing.md
lists them). Strict: the test fails when such a seed holds (remove it here) or finds
anything else."""


@pytest.mark.timeout(600)
def test_a_fast_subset_of_seeds_holds_every_invariant() -> None:
    outcomes = list(map(simulate, range(FAST_SEEDS)))
    failed = [o for o in outcomes if not o.ok and o.seed not in KNOWN_OPEN]
    assert not failed, "\n\n".join(sim_cli.describe(o) for o in failed[:3])
    for outcome in outcomes:
        if outcome.seed in KNOWN_OPEN:
            found = {v.kind for v in outcome.violations}
            assert found == KNOWN_OPEN[outcome.seed], (outcome.seed, found, outcome.errors)


def test_a_seed_replays_exactly_in_this_process() -> None:
    first, again = simulate(57), simulate(57)
    assert first.world.history.records, "the run recorded nothing"
    assert digest(first) == digest(again)


@pytest.mark.timeout(120)
def test_a_seed_replays_exactly_in_another_process() -> None:
    """What the replay command relies on: another process (another hash seed, another
    memory layout) runs the very same history."""
    script = (
        "import hashlib, sys\n"
        "from sim import __main__ as cli\n"
        "from sim.harness import simulate\n"
        "cli._quiet_logs(False)\n"
        "o = simulate(int(sys.argv[1]))\n"
        "text = '\\n'.join(r.line() for r in o.world.history.records)\n"
        "print(hashlib.sha256(text.encode()).hexdigest())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": os.getcwd()}
    for seed in (7, 57):
        result = subprocess.run(
            [sys.executable, "-c", script, str(seed)],
            capture_output=True,
            text=True,
            check=True,
            env=env,
            timeout=100,
        )
        assert result.stdout.strip() == digest(simulate(seed)), f"seed {seed} diverged"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("bug", sorted(BUGS))
def test_the_simulation_finds_each_fixed_bug_put_back(bug: str) -> None:
    """The simulator's teeth: issue 11's bugs, put back one at a time, are each found within
    the default seed count (the seed it took is printed; with buggify's knobs each takes
    under 15 seeds). `make simulate` puts every bug back too (`python -m sim --teeth`)."""
    for seed in range(DEFAULT_SEEDS):
        outcome = simulate(seed, bugs=(bug,))
        if not outcome.ok:
            kinds = sorted({v.kind for v in outcome.violations})
            print(f"{bug}: found at seed {seed} ({seed + 1} seeds): {kinds}")
            assert outcome.violations
            return
    pytest.fail(f"{BUGS[bug].issue}: not found in {DEFAULT_SEEDS} seeds")


# Seeds that failed on 2,000 seeds before the shutdown and last-receive fixes: requests
# handed back while this process's own long polls were out (377, 928, 1090, 1450, 1641,
# 1685), kept requests let go when a reign ended by a lost lease (1611), a bad token
# request deleted before its parent was answered (436, 741, 1755), a child stopped while
# a deferred retry's token was on its way back (681), a checker false positive (1867).
# Found later on the way: 141, 481, 948, 1379.
FIXED_SEEDS: tuple[int, ...] = (141, 481, 681, 741, 928, 948, 1090, 1379, 1450)
FIXED_SEEDS += (1611, 1641, 1685, 1755, 1867)
# 377 and 436 held with their fixes, and fail again on the merged code with other open
# defects (`redrive_move`, `stopped_waited_child`): the testing page lists them with the
# other seeds `make simulate` still fails.


@pytest.mark.timeout(300)
def test_the_seeds_of_the_shutdown_fixes_hold() -> None:
    failed = [o for o in map(simulate, FIXED_SEEDS) if not o.ok]
    assert not failed, "\n\n".join(sim_cli.describe(o) for o in failed[:3])


def test_the_replay_command_names_the_seed_and_the_bugs() -> None:
    assert sim_cli.replay_command(42, ("lost-answer-frees-slot",)) == (
        "PYTHONHASHSEED=0 .venv/bin/python -m sim --replay 42 --bug lost-answer-frees-slot"
    )


class LeaderCutOff(Nemesis):
    """Cuts whichever node holds the lease at ``at`` off from AWS until ``until``: its
    requests are held on the wire (a paused leader, a broken network)."""

    def __init__(self, run: Run, at: float, until: float) -> None:
        super().__init__(
            rng=random.Random(0), clock=run.clock, quiet_at=run.plan.quiet_at, drizzle=0
        )
        self.run, self.at, self.until = run, at, until
        self.leader: str | None = None

    def call_fault(self, node: str, operation: str, params: Mapping[str, Any]) -> CallFault:
        now = self.clock()
        if not self.at <= now < self.until:
            return CallFault()
        if self.leader is None:
            self.leader = self.run.world.history.lease_writes[-1].owner
        if node != self.leader:
            return CallFault()
        return CallFault(request_delay=self.until - now)


def lease_lapse(run: Run) -> Nemesis:
    """Issue 11's repro of bug 2: the leader is cut off from AWS from just before it sends
    its first start until t=45 s: the start is held on the wire, its lease renewals too,
    so the standby takes the lease over meanwhile."""
    return LeaderCutOff(run, at=19.9, until=45.0)


LEASE_LAPSE = Scenario(
    seed=0,
    pools=(PoolPlan("p0", limit=1, parameter=False, per_key_limit=None, priorities=False),),
    lease=True,
    shared_queue=False,
    requests=2,
    quiet_at=150.0,
    max_seconds=60,
    request_times=(20.0, 25.0),
)


@pytest.mark.parametrize(("bugs", "holds"), [((), True), (("lease-fence-unbounded",), False)])
def test_a_lease_lapse_while_a_start_is_held_on_the_wire(
    bugs: tuple[str, ...], holds: bool
) -> None:
    """Fixed: the held start is dropped when its client gives up at D, and d2 lists only
    D + start grace after taking over. Put back (35 s read timeout, 3 SDK attempts, a 3 s
    wait), the held start lands after d2 started the other request: 2 under limit 1."""
    # seed 12: the lowest where, put back, the held start lands after d2 started the other
    outcome = simulate(12, bugs=bugs, plan=LEASE_LAPSE, nemesis=lease_lapse)
    history = outcome.world.history
    owners = [w.owner for w in history.lease_writes if w.what == "taken"]
    assert len(set(owners)) == 2, f"no take-over: {owners}"
    arn = outcome.state_machines["p0"]
    if holds:
        assert outcome.ok, sim_cli.describe(outcome)
        assert max_concurrency(history, arn) == 1
        assert len(history.executions) == 2  # both requests started, one after the other
    else:
        assert [v.kind for v in outcome.violations] == ["limit"], sim_cli.describe(outcome)
        assert max_concurrency(history, arn) == 2
