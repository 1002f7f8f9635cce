"""``python -m sim``: run many seeds of the simulation, or replay one with its trace.

    python -m sim                      # seeds 0..1999, progress bar, summary
    python -m sim --seeds 200 --first 5000
    python -m sim --replay 1234        # one seed: its history around each violation
    python -m sim --bug lost-answer-frees-slot   # put a fixed bug back: the sim must find it
    python -m sim --teeth              # each fixed bug put back in turn: seeds to find it
    python -m sim --mutate             # the kill matrix: each mutation of sim.mutations
    python -m sim --mutate --only no-tombstone --seeds 500 --workers 1
    python -m sim --no-parents         # without the task-token parents a share of seeds has
    python -m sim --extras all         # with the operator scenarios of sim/extras.py
    python -m sim --no-buggify         # without the knobs that make rare cases common

Exit status: 0 when every seed held every invariant, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import structlog
from tqdm import tqdm

from sim import buggify, extras, harness, killmatrix, mutations
from sim.bugs import BUGS
from sim.findings import FINDINGS
from sim.harness import Outcome, simulate

TRACE_WINDOW = 30.0


def _quiet_logs(verbose: bool) -> None:
    """The dispatcher's own log lines: off for many seeds, on (virtual time) for one."""
    level = logging.INFO if verbose else logging.CRITICAL
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.dev.ConsoleRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def replay_command(seed: int, bugs: tuple[str, ...] = ()) -> str:
    """The one command that replays ``seed`` exactly."""
    extra = "".join(f" --bug {b}" for b in bugs)
    if not harness.PARENTS:
        extra += " --no-parents"
    if extras.parse(extras.DEFAULT) != extras.ENABLED:
        extra += " --extras " + (",".join(sorted(extras.ENABLED)) or '""')
    if not buggify.BUGGIFY:
        extra += " --no-buggify"
    return f"PYTHONHASHSEED=0 .venv/bin/python -m sim --replay {seed}{extra}"


def describe(outcome: Outcome, bugs: tuple[str, ...] = ()) -> str:
    """A failing seed: what broke, the replay command, and the history around it."""
    lines = [f"seed {outcome.seed} FAILED: {len(outcome.violations)} violation(s)"]
    lines.append(f"  scenario: {outcome.scenario}")
    lines += [f"  {v}" for v in outcome.violations[:10]]
    lines += [f"  error: {e.strip().splitlines()[-1]}" for e in outcome.errors[:3]]
    lines.append(f"  replay: {replay_command(outcome.seed, bugs)}")
    if outcome.violations:
        first = outcome.violations[0]
        lines.append(f"  history within {TRACE_WINDOW:.0f} s of {first.time:.3f}:")
        trace = outcome.world.history.trace(first.time, TRACE_WINDOW)
        lines += ["    " + line for line in trace.splitlines()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the seeds; print the summary (and each failure's replay command)."""
    parser = argparse.ArgumentParser(prog="python -m sim", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seeds", type=int, help="how many seeds (2000; --mutate: 200 per mutation)"
    )
    parser.add_argument("--first", type=int, default=0, help="the first seed (0)")
    parser.add_argument("--replay", type=int, help="run this one seed and print its trace")
    parser.add_argument(
        "--bug",
        action="append",
        default=[],
        choices=sorted(BUGS) + sorted(mutations.MUTATIONS),
        help="put a fixed bug back, or apply a mutation (a safety rule taken out)",
    )
    parser.add_argument("--verbose", action="store_true", help="the dispatcher's logs (replay)")
    parser.add_argument("--json", type=Path, help="write the summary here as JSON")
    parser.add_argument(
        "--stop-at-first", action="store_true", help="stop at the first failing seed"
    )
    parser.add_argument(
        "--teeth",
        action="store_true",
        help="put each fixed bug back in turn; report the seeds it took to find it",
    )
    parser.add_argument(
        "--no-parents",
        action="store_true",
        help="no parent workflows waiting on task tokens (a share of the seeds has them)",
    )
    parser.add_argument(
        "--findings",
        action="store_true",
        help="replay what the operator scenarios found (sim/findings.py): still failing?",
    )
    parser.add_argument(
        "--mutate",
        action="store_true",
        help="the kill matrix: each mutation until a seed catches it (exit 1: one is not)",
    )
    parser.add_argument(
        "--only", action="append", choices=sorted(mutations.MUTATIONS), help="--mutate: these"
    )
    parser.add_argument("--workers", type=int, default=2, help="--mutate: processes (2)")
    parser.add_argument(
        "--budget", type=float, help="--mutate: CPU seconds per mutation at most (no bound)"
    )
    parser.add_argument(
        "--extras",
        metavar="NAMES",
        help="operator scenarios a share of the seeds runs: all, or some of "
        + ", ".join(extras.SCENARIOS)
        + " (default $SIM_EXTRAS)",
    )
    parser.add_argument(
        "--no-buggify",
        action="store_true",
        help="no buggify knobs (a share of the seeds makes rare cases common: sim/buggify.py)",
    )
    args = parser.parse_args(argv)
    if args.no_buggify:
        buggify.BUGGIFY = False
    if args.no_parents:
        harness.PARENTS = False
    if args.extras is not None:
        extras.ENABLED = extras.parse(args.extras)
    if args.findings:
        _quiet_logs(False)
        return _findings()
    if args.mutate:
        _quiet_logs(False)
        seeds = range(args.first, args.first + (args.seeds or mutations.SEEDS))
        return _mutate(seeds, args)
    args.seeds = args.seeds or 2000
    bugs = tuple(args.bug)
    if args.teeth:
        _quiet_logs(False)
        return _teeth(range(args.first, args.first + args.seeds), args.json)
    if args.replay is not None:
        _quiet_logs(args.verbose)
        outcome = simulate(args.replay, bugs=bugs)
        if outcome.ok:
            print(
                f"seed {args.replay}: ok ({outcome.requests} requests, ended at "
                f"{outcome.ended_at:.0f} s)"
            )
            return 0
        print(describe(outcome, bugs))
        print("\nfull history:")
        print("\n".join(r.line() for r in outcome.world.history.records))
        return 1
    _quiet_logs(False)
    return _run_seeds(range(args.first, args.first + args.seeds), bugs, args)


def _run_seeds(seeds: range, bugs: tuple[str, ...], args: argparse.Namespace) -> int:
    """Run every seed with a progress bar; print each failure and the summary."""
    failed: list[Outcome] = []
    kinds: Counter[str] = Counter()
    faults = requests = executions = 0
    virtual = 0.0
    began = time.process_time()
    with tqdm(seeds, unit="seed", file=sys.stderr, disable=None) as bar:
        for seed in bar:
            outcome = simulate(seed, bugs=bugs)
            faults += outcome.nemesis.faults_fired + len(outcome.nemesis.actions)
            requests += outcome.requests
            executions += outcome.executions
            virtual += outcome.ended_at
            if not outcome.ok:
                failed.append(outcome)
                kinds.update(v.kind for v in outcome.violations)
                kinds.update("error" for _ in outcome.errors)
                bar.set_postfix(failed=len(failed))
                tqdm.write(describe(outcome, bugs), file=sys.stderr)
                if args.stop_at_first:
                    break
    cpu = time.process_time() - began
    ran = seed - args.first + 1
    summary = {
        "seeds": ran,
        "first_seed": args.first,
        "failed_seeds": [o.seed for o in failed],
        "violations": dict(kinds),
        "faults_injected": faults,
        "faults_per_seed": round(faults / max(1, ran), 1),
        "requests": requests,
        "executions": executions,
        "virtual_hours": round(virtual / 3600, 1),
        "cpu_seconds": round(cpu, 1),
        "bugs_put_back": list(bugs),
    }
    print(
        f"{ran} seeds, {len(failed)} failed; {faults} faults injected "
        f"({summary['faults_per_seed']} per seed), {requests} requests, {executions} "
        f"executions, {summary['virtual_hours']} h of virtual time in {cpu:.1f} s of CPU"
    )
    if kinds:
        print("violations: " + ", ".join(f"{k} {n}" for k, n in kinds.most_common()))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 1 if failed else 0


def _findings() -> int:
    """Replay each finding of `sim.findings`; 0 when none fails any more."""
    failing = 0
    for finding in FINDINGS:
        extras.ENABLED = extras.parse(finding.extras)
        outcome = simulate(finding.seed)
        kinds = sorted({v.kind for v in outcome.violations})
        still = finding.kind in kinds
        failing += still
        state = f"STILL FAILS ({finding.kind}; needs {finding.fix})" if still else "holds"
        flag = finding.extras or '""'
        print(f"seed {finding.seed} --extras {flag}: {state} - {finding.what}")
    print(f"{failing} of {len(FINDINGS)} findings still fail")
    return 1 if failing else 0


def _teeth(seeds: range, out: Path | None) -> int:
    """Each bug of `sim.bugs` put back alone: the first seed that finds it (a seed the
    dispatcher fails without the bug does not count)."""
    found: dict[str, Any] = {}
    clean: dict[int, bool] = {}  # seed -> whether the dispatcher as it is passes it
    for name, bug in BUGS.items():
        began = time.process_time()
        hit = None
        for seed in tqdm(seeds, desc=name, unit="seed", file=sys.stderr, disable=None):
            outcome = simulate(seed, bugs=(name,))
            if outcome.ok:
                continue
            if seed not in clean:  # a seed the dispatcher fails anyway finds nothing
                clean[seed] = simulate(seed).ok
            if clean[seed]:
                hit = outcome
                break
        found[name] = {
            "issue": bug.issue,
            "found_at_seed": None if hit is None else hit.seed,
            "seeds_needed": None if hit is None else hit.seed - seeds.start + 1,
            "violations": [] if hit is None else sorted({v.kind for v in hit.violations}),
            "cpu_seconds": round(time.process_time() - began, 1),
        }
        where = "NOT FOUND" if hit is None else f"found by seed {hit.seed}"
        print(f"{name}: {where} ({bug.issue})")
    if out is not None:
        out.write_text(json.dumps(found, indent=2) + "\n", encoding="utf-8")
    return 0 if all(f["found_at_seed"] is not None for f in found.values()) else 1


def _mutate(seeds: range, args: argparse.Namespace) -> int:
    """The kill matrix: a row per mutation as its hunt ends, then the summary."""
    names = args.only or list(mutations.MUTATIONS)
    print(
        f"{len(names)} mutations, up to {len(seeds)} seeds each, {args.workers} processes: "
        "the seeds unmutated first (which reach each mutation's line), then each mutation "
        "over the seeds that reach it, until one catches it"
    )

    def progress(name: str, result: dict[str, Any], done: int, total: int) -> None:
        print(f"[{done:>2}/{total}] {killmatrix.line(name, result)}", flush=True)

    began = time.monotonic()
    found = killmatrix.matrix(
        names, seeds, workers=args.workers, budget=args.budget, progress=progress
    )
    print(f"{time.monotonic() - began:.0f} s")
    return killmatrix.report(found, args.json)


if __name__ == "__main__":
    sys.exit(main())
