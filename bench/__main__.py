"""``python -m bench``: run the scenarios, write bench/results/ (JSON, summary.md, PNGs)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from bench import (
    comparison,
    cycle,
    fairness,
    figures,
    reads,
    report,
    scale,
    shared_limit,
    start_cost,
    summary,
    throughput,
)
from bench.aws import use_emulator_env
from bench.machine import machine_info, uptime
from bench.patterns import PatternRun, sfn_dispatcher
from dispatcher import logs
from dispatcher.settings.config import LogFormat

RESULTS = Path(__file__).resolve().parent / "results"
SCENARIOS = (
    "comparison",
    "throughput",
    "start_cost",
    "cycle",
    "scale",
    "fairness",
    "reads",
    "shared_limit",
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--only",
        action="append",
        choices=SCENARIOS,
        help="run only this scenario (repeatable); the summary keeps the others' results",
    )
    parser.add_argument(
        "--pattern",
        action="append",
        choices=tuple(comparison.PATTERNS),
        help="comparison: run only this pattern (repeatable; default: "
        + ", ".join(comparison.DEFAULT_PATTERNS)
        + ")",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes (a few minutes) to check the harness; not the published numbers",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results folder ({RESULTS})")
    parser.add_argument(
        "--summary-only", action="store_true", help="rebuild summary.md and plots from the JSON"
    )
    return parser


def _configs(
    quick: bool,
) -> tuple[comparison.Config, throughput.Config, scale.Config, fairness.Config]:
    if not quick:
        return comparison.Config(), throughput.Config(), scale.Config(), fairness.Config()
    return (
        comparison.Config(
            requests=100,
            limit=10,
            budget_scale=0.5,
            lags=(0.0, 2.0),
            sweep_requests=60,
            delayed_requests=60,
        ),
        throughput.Config(requests=600, raw_starts=400, delete_messages=200, events=1000),
        scale.Config(running=1000, queued_small=100, queued_large=2000, reconcile_interval=5),
        fairness.Config(big=100, small=5, within=600),
    )


async def _scenario(
    out: Path, name: str, body: Callable[[], Awaitable[dict[str, Any]]]
) -> dict[str, Any]:
    """Run one scenario and write its JSON with the machine and load around it."""
    began_at = datetime.now(UTC).isoformat(timespec="seconds")
    before = uptime()
    began = time.monotonic()
    results = await body()
    document = {
        "scenario": name,
        "started_at": began_at,
        "duration_seconds": round(time.monotonic() - began, 1),
        "uptime_before": before,
        "uptime_after": uptime(),
        "machine": machine_info(),
        "results": results,
    }
    print(f"[bench] wrote {report.write_json(out, name, document)}")
    return document


async def _main(args: argparse.Namespace) -> None:
    cmp_config, tp_config, scale_config, fair_config = _configs(args.quick)
    chosen = args.only or SCENARIOS
    if "comparison" in chosen:
        runs: list[PatternRun] = []

        async def compare() -> dict[str, Any]:
            document, done = await comparison.run(cmp_config, args.pattern)
            runs.extend(done)
            return _merged(args.out, document)

        cmp_doc = await _scenario(args.out, "comparison", compare)
        if runs:
            # Hand-over comes from the comparison's runs: same stream, same limit.
            patterns = cmp_doc["results"]["patterns"]
            load = patterns.get(sfn_dispatcher.NAME, {}).get("load")
            hand = _merged_handover(args.out, comparison.handover(runs), cmp_doc["results"])
            await _scenario(args.out, "handover", _constant(hand | {"load": load}))
    if "throughput" in chosen:
        await _scenario(args.out, "throughput", lambda: throughput.run(tp_config))
    if "start_cost" in chosen:
        sc_config = start_cost.QUICK if args.quick else start_cost.Config()
        await _scenario(args.out, "start_cost", lambda: start_cost.run(sc_config))
    if "cycle" in chosen and not args.quick:  # the slot cycle at limit 200, both rules
        await _scenario(args.out, "cycle", lambda: cycle.run(cycle.Config()))
    if "scale" in chosen:
        await _scenario(args.out, "scale", lambda: scale.run(scale_config))
    if "fairness" in chosen:
        await _scenario(args.out, "fairness", lambda: fairness.run(fair_config))
    if "shared_limit" in chosen:
        shared = shared_limit.QUICK if args.quick else shared_limit.Config()
        await _scenario(args.out, "shared_limit", lambda: shared_limit.run(shared))


def _merged(out: Path, document: dict[str, Any]) -> dict[str, Any]:
    """Keep the runs not re-run (``--pattern``) from the last run of the same size."""
    previous = figures.load(out, "comparison")
    if previous is None or previous["results"]["config"] != document["config"]:
        return document
    kept: dict[str, Any] = previous["results"]
    return kept | document | {"patterns": kept["patterns"] | document["patterns"]}


def _merged_handover(
    out: Path, hand: dict[str, Any], comparison_results: dict[str, Any]
) -> dict[str, Any]:
    """Keep the hand-overs of runs not re-run (``--pattern``) from a run of the same size."""
    config = comparison_results["config"]
    hand = hand | {"config": config}
    previous = figures.load(out, "handover")
    if previous is None or previous["results"].get("config") != config:
        return hand
    old = previous["results"]
    merged = hand | {"refill_gap_seconds": old["refill_gap_seconds"] | hand["refill_gap_seconds"]}
    if "dispatcher_share_seconds" not in hand and "dispatcher_share_seconds" in old:
        merged["dispatcher_share_seconds"] = old["dispatcher_share_seconds"]
    return merged


def _constant(value: dict[str, Any]) -> Callable[[], Awaitable[dict[str, Any]]]:
    async def body() -> dict[str, Any]:
        return value

    return body


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = _parser().parse_args(argv)
    use_emulator_env()
    # Warnings only: the in-process dispatcher would print a line per start.
    logs.configure("WARNING", LogFormat.JSON)
    began = time.monotonic()
    if not args.summary_only:
        chosen = args.only or SCENARIOS
        if "reads" in chosen:  # virtual time on its own loop (sim.loop), no emulator
            config = reads.QUICK if args.quick else reads.Config()
            print(f"[bench] wrote {report.write_json(args.out, 'reads', reads.document(config))}")
        if set(chosen) - {"reads"}:
            anyio.run(_main, args)
    path = summary.write(args.out)
    print(f"[bench] wrote {path} ({(time.monotonic() - began) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
