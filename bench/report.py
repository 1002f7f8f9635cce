"""Write the results: one JSON per scenario, then summary.md and the plots from those files.

The summary is built from the JSON files on disk, so re-running one scenario refreshes
its rows and leaves the others as they were measured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench import reads, shared_limit
from bench.figures import load, num
from bench.targets import targets

PATTERN_ORDER = (
    "sfn-dispatcher",
    "check-then-act",
    "dynamodb-semaphore",
    "dynamodb-semaphore-simplified",
)
SWEEP = "check_then_act_lag_sweep"
DELAYED = "dispatcher_events_delayed"
HANDOVER_FALLBACK = "k-th work end to (k + limit)-th work start"
AWS_LIST_EXECUTIONS_REFILL = 5.0  # per second, the largest regions' ListExecutions refill


def write_json(out: Path, scenario: str, document: dict[str, Any]) -> Path:
    """Write ``<out>/<scenario>.json``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{scenario}.json"
    path.write_text(json.dumps(document, indent=1, default=str) + "\n")
    return path


def comparison_table(doc: dict[str, Any]) -> list[str]:
    """The side-by-side table, one row per pattern."""
    limit = doc["results"]["config"]["limit"]
    rows = [
        f"| pattern | max concurrency (limit {limit}) | seconds above limit | utilisation "
        "while backlog | queue wait p50 / p99 (s) | makespan (s) | API calls / request | "
        "state transitions / request | max executions running |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    patterns = doc["results"]["patterns"]
    for name in [n for n in PATTERN_ORDER if n in patterns]:
        p = patterns[name]
        done = "" if p["complete"] else f" ({p['completed']}/{p['requests']} done)"
        rows.append(
            f"| {name}{done} | {p['max_concurrency']} | {num(p['seconds_above_limit'], 1)} | "
            f"{num(p['utilisation_while_backlog'])} | {num(p['queue_wait_p50'], 1)} / "
            f"{num(p['queue_wait_p99'], 1)} | {num(p['makespan_seconds'], 1)} | "
            f"{num(p['api_calls_per_request'])} | {num(p['state_transitions_per_request'], 1)} "
            f"| {p['max_executions_running']} |"
        )
    return rows


def _load_line(doc: dict[str, Any]) -> str:
    load = doc["results"].get("load") or {}
    return f"uptime before: `{doc['uptime_before']}`; after: `{doc['uptime_after']}`" + (
        f"; other processes used {num(load.get('others_busy_cores'))} of "
        f"{doc['machine']['nproc']} cores on average"
        if load
        else ""
    )


def comparison_section(doc: dict[str, Any]) -> list[str]:
    """Table, plot, per-pattern load and notes."""
    config = doc["results"]["config"]
    lines = [
        f"## Side by side: {config['requests']:,} requests of {config['low']:g}-"
        f"{config['high']:g} s, limit {config['limit']}",
        "",
        *comparison_table(doc),
        "",
        "![concurrency over time](concurrency.png)",
        "",
        "Every figure comes from the executions' own records (start/stop dates, and for the "
        "semaphore the history's Work state entered/exited), not from any pattern's opinion of "
        "itself. *Concurrency* counts requests doing their work: whole executions for the "
        "dispatcher and check-then-act, executions holding the semaphore for the semaphore. "
        "*Utilisation* is busy slot-seconds / (limit x time) from the first request sent to "
        "the last one started. *Queue wait* is from the producer handing a request to SQS to "
        "its work starting. *API calls* are the pattern's own calls (HTTP attempts, as the "
        "dispatcher's `dispatcher_aws_calls_total` counts them), including the workflow's "
        "DynamoDB calls for the semaphore; status events delivered by EventBridge are not "
        "calls (the dispatcher receives 2 per execution).",
        "",
    ]
    for name in [n for n in PATTERN_ORDER if n in doc["results"]["patterns"]]:
        p = doc["results"]["patterns"][name]
        load = p["load"]
        lines.append(
            f"- **{name}** ({num(load['seconds'], 0)} s; other processes "
            f"{num(max(0.0, load['machine_busy_cores'] - load['ours_busy_cores']))} cores, "
            f"emulator + driver {num(load['ours_busy_cores'])} cores): "
            + "; ".join(p["notes"])
            + f". Calls: {', '.join(f'{k} {v:,}' for k, v in p['api_calls'].items())}."
        )
    return [*lines, "", *lag_sweep_section(doc)]


def lag_sweep_section(doc: dict[str, Any]) -> list[str]:
    """Check-then-act against a lagging ListExecutions: table, plot, what AWS documents."""
    table = lag_sweep_table(doc)
    if not table:
        return []
    sweep = doc["results"][SWEEP]
    loads = ", ".join(
        f"{lag} s: {num(p['load']['machine_busy_cores'])}" for lag, p in sweep.items()
    )
    return [
        "## Check-then-act against a lagging ListExecutions",
        "",
        'AWS documents `ListExecutions` as eventually consistent ("This operation is '
        "eventually consistent. The results are best effort and may not reflect very recent "
        'updates and changes.", Step Functions API reference, ListExecutions) and gives no '
        "bound on the lag; MiniStack's listing is immediately consistent. The fault proxy "
        "(`devtools/faults.py`) serves each listing as it was that many seconds "
        f"earlier. One run per lag on the first {doc['results']['config']['sweep_requests']} "
        "requests of the stream, the runs side by side, each against its own emulator.",
        "",
        *table,
        "",
        overshoot_line(doc),
        "",
        "*Starts while all slots were taken*: hand-overs with a negative gap (a start before "
        "any slot was free), from the records. *ListExecutions calls / s*: AWS refills "
        f"{AWS_LIST_EXECUTIONS_REFILL:g}/s (bucket 200) in the largest regions, so beyond that "
        "rate the pattern would also be throttled on AWS; MiniStack does not throttle. "
        f"Machine cores busy during each run: {loads}.",
        "",
        "![check-then-act concurrency per lag](lag_sweep.png)",
        "",
    ]


def lag_sweep_table(doc: dict[str, Any]) -> list[str]:
    """Check-then-act at each ListExecutions lag: how often and by how much it overshot."""
    sweep = doc["results"].get(SWEEP)
    if not sweep:
        return []
    limit = doc["results"]["config"]["limit"]
    rows = [
        f"| ListExecutions lag (s) | requests | max concurrency (limit {limit}) | seconds above "
        "limit | starts while all slots were taken | requests dead-lettered | utilisation "
        "while backlog | makespan (s) | ListExecutions calls / s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for lag, p in sweep.items():
        extra = p["extra"]
        rows.append(
            f"| {lag} | {p['requests']} | {p.get('max_concurrency', 'n/a')} | "
            f"{num(p.get('seconds_above_limit'), 1)} | "
            f"{p.get('starts_before_a_slot_was_free', 'n/a')} | {extra['dead_lettered']} | "
            f"{num(p.get('utilisation_while_backlog'))} | {num(p.get('makespan_seconds'), 1)} | "
            f"{num(list_rate(p), 1)} |"
        )
    return rows


def overshoot_line(doc: dict[str, Any]) -> str:
    """How often check-then-act went over the limit across its stored runs, and how far."""
    results = doc["results"]
    limit = results["config"]["limit"]
    runs = [results["patterns"][n] for n in ("check-then-act",) if n in results["patterns"]]
    runs += list(results.get(SWEEP, {}).values())
    runs = [r for r in runs if "max_concurrency" in r]
    if not runs:
        return ""
    over = [r for r in runs if r["max_concurrency"] > limit]
    worst = max(r["max_concurrency"] for r in runs)
    return (
        f"Check-then-act went over the limit in {len(over)} of its {len(runs)} stored runs "
        f"(the side-by-side run and the lag runs), at most {worst} at limit {limit}."
    )


def list_rate(p: dict[str, Any]) -> float | None:
    """ListExecutions calls per second over a check-then-act run's backlog."""
    seconds = p.get("backlog_seconds")
    calls = p["api_calls"].get("ListExecutions", 0)
    return calls / seconds if seconds else None


def handover_table(doc: dict[str, Any]) -> list[str]:
    """p50/p99 of every run's hand-over, from the records."""
    rows = [
        "| run | hand-overs | p50 (s) | p90 (s) | p99 (s) | negative (a start with no slot free) |",
        "|---|---|---|---|---|---|",
    ]
    for name, gaps in doc["results"]["refill_gap_seconds"].items():
        label = name
        if name == DELAYED:
            label = "sfn-dispatcher, status events delayed (chaos relay)"
        rows.append(
            f"| {label} | {gaps['count']:,} | {num(gaps['p50'], 3)} | {num(gaps['p90'], 3)} | "
            f"{num(gaps['p99'], 3)} | {gaps.get('negative', 'n/a')} |"
        )
    return rows


def share_line(doc: dict[str, Any]) -> str:
    """The dispatcher's own share of a hand-over (its histogram, recorded exactly)."""
    share = doc["results"].get("dispatcher_share_seconds")
    if not share:
        return ""
    return (
        f"The dispatcher's own share ({share['definition']}): {share['count']:,} hand-overs, "
        f"p50 {num(share['p50'] * 1000, 1)} ms, p99 {num(share['p99'] * 1000, 1)} ms, max "
        f"{num(share['max'] * 1000, 1)} ms."
    )


def handover_section(doc: dict[str, Any]) -> list[str]:
    """Every run's hand-over from the records, then the dispatcher's own share."""
    results = doc["results"]
    lines = [
        "## Hand-over latency",
        "",
        f"Judged on the records ({results.get('definition', HANDOVER_FALLBACK)}).",
        "",
        *handover_table(doc),
        "",
    ]
    line = share_line(doc)
    if line:
        share = results["dispatcher_share_seconds"]
        lines += [
            line + f" Its `dispatcher_slot_refill_seconds` histogram says p50 "
            f"{num(share['from_histogram_p50'] * 1000, 1)} ms, p99 "
            f"{num(share['from_histogram_p99'] * 1000, 1)} ms by bucket interpolation.",
            "",
        ]
    return [*lines, "![hand-over latency](handover.png)", ""]


def throughput_section(doc: dict[str, Any]) -> list[str]:
    """Starts per second against raw capacity, CPU per start, RSS, call costs."""
    r = doc["results"]
    d, raw, costs = r["dispatcher"], r["raw_start_execution"], r["delete_costs"]
    calls = ", ".join(f"{k} {v}" for k, v in d["api_calls_per_start"].items())
    return [
        "## Throughput",
        "",
        f"{r['config']['requests']:,} zero-length executions, limit {r['config']['limit']:,}. "
        f"Raw StartExecution capacity (bare aioboto3 loop, {r['config']['concurrency']} tasks, "
        f"same emulator, same run): {num(raw['before']['starts_per_second'], 0)} starts/s "
        f"before and {num(raw['after']['starts_per_second'], 0)} after the dispatcher (mean "
        f"{num(raw['mean_starts_per_second'], 0)}).",
        "",
        "| | starts/s (middle 80%) | ratio to raw | own CPU ms / start (= s / 1,000 starts) | "
        "emulator CPU ms / start | peak RSS (MiB) |",
        "|---|---|---|---|---|---|",
        *(
            f"| sfn-dispatcher, limit {x['limit']:,} (child process) | "
            f"{num(x['starts_per_second']['middle_80_percent'], 0)} | {num(x['ratio_to_raw'])} "
            f"| {num(x['cpu_ms_per_start'])} "
            f"(x{num(x['cpu_per_start_over_bare_start_execution'])} bare) | "
            f"{num(x['emulator_cpu_ms_per_start'])} | {num(x['peak_rss_mib'], 1)} |"
            for x in (d, r.get("dispatcher_bounded"))
            if x
        ),
        *(
            f"| bare aioboto3 loop ({when}) | {num(raw[when]['starts_per_second'], 0)} | "
            f"{num(raw[when]['starts_per_second'] / raw['mean_starts_per_second'])} | "
            f"{num(raw[when]['client_cpu_ms_per_start'])} | "
            f"{num(raw[when].get('emulator_cpu_ms_per_start'))} | |"
            for when in ("before", "after")
        ),
        "",
        f"While starting, the dispatcher used {num(d['cores_used_while_starting'])} cores and "
        f"the emulator {num(d['emulator_cores_used_while_starting'])} (each is one Python "
        "interpreter under one GIL: about 1 core is all either can use). "
        f"Dispatcher API calls per start: {calls}. Zero-length executions end within ~0.2 s, "
        f"yet the dispatcher held up to {d['held_at_most']} at once while at most "
        f"{d['max_concurrency_from_records']} ran (from the records): the rest had ended and "
        "their terminal events were still queued; the last end was seen "
        f"{num(d['seconds_all_started_to_all_ends_seen'], 1)} s after the last start.",
        *_bounded_lines(r.get("dispatcher_bounded")),
        "",
        "| per message deleted | client CPU (ms) | emulator CPU (ms) |",
        "|---|---|---|",
        *(
            f"| {mode} | {num(c['client_cpu_ms_per_message'], 3)} | "
            f"{num(c['emulator_cpu_ms_per_message'], 3)} |"
            for mode, c in costs.items()
        ),
        "",
        *_events_lines(r.get("events_loop")),
        f"{_load_line(doc)}.",
        "",
    ]


def _bounded_lines(bounded: dict[str, Any] | None) -> list[str]:
    if not bounded:
        return []
    return [
        f"At limit {bounded['limit']} the dispatcher held {bounded['held_at_most']} slots "
        f"while at most {bounded['max_concurrency_from_records']} executions ran, and started "
        f"{num(bounded['starts_per_second']['middle_80_percent'], 0)}/s: slots wait for "
        "terminal events."
    ]


def _events_lines(events: dict[str, Any] | None) -> list[str]:
    if not events:
        return []
    return [
        f"Events loop ({events['events']:,} synthetic terminal events, intake idle): the "
        f"dispatcher applies {num(events['dispatcher_events_per_second'], 0)} events/s "
        f"({num(events['dispatcher_cpu_ms_per_event'], 3)} ms CPU each); a bare "
        "receive(10) + DeleteMessageBatch loop drains "
        f"{num(events['bare_loop_1_task_per_second'], 0)}/s with one task, "
        f"{num(events['bare_loop_4_tasks_per_second'], 0)}/s with four.",
        "",
    ]


def scale_section(doc: dict[str, Any]) -> list[str]:
    """RSS and reconcile at 10,000 running; RSS with a small and a large backlog."""
    running, backlog = doc["results"]["running_set"], doc["results"]["backlog"]
    rec = running["reconcile"]
    reached = "" if running["reached_target"] else " (**target size not reached in time**)"
    return [
        "## Scale",
        "",
        f"- {running['running_held']:,} of {running['target_running']:,} executions held"
        f"{reached} after {num(running['seconds_to_hold_all'], 0)} s: RSS "
        f"{num(running['rss_mib_holding'], 1)} MiB (peak {num(running['peak_rss_mib'], 1)} "
        f"MiB; {num(running['rss_mib_at_ready'], 1)} MiB at start). Reconcile pass "
        f"(ListExecutions, every page, + ledger): mean {num(rec['mean_seconds'] * 1000, 0)} ms "
        f"over {rec['passes']} passes; listing alone from the driver "
        f"{num(running['listing_from_driver']['seconds'] * 1000, 0)} ms.",
        f"- Backlog, limit {doc['results']['config']['queued_limit']}: "
        f"{backlog['small']['queued']:,} queued -> RSS {num(backlog['small']['rss_mib'], 1)} MiB; "
        f"{backlog['large']['queued']:,} queued -> RSS {num(backlog['large']['rss_mib'], 1)} MiB "
        f"(x{num(backlog['large_over_small'], 3)}); the dispatcher received "
        f"{backlog['large']['received_by_dispatcher']} of them, "
        f"{backlog['large']['still_queued']:,} stayed in SQS.",
        f"- {_load_line(doc)}.",
        "",
    ]


def _minutes(documents: dict[str, dict[str, Any] | None]) -> str:
    parts = [
        f"{name} {d['duration_seconds'] / 60:.1f}"
        for name, d in documents.items()
        if d and name != "handover"
    ]
    total = sum(d["duration_seconds"] for d in documents.values() if d) / 60
    return f"{total:.1f} min of scenarios: " + ", ".join(parts)


def raw_ratio_lines(doc: dict[str, Any] | None) -> list[str]:
    """What the ratio to raw StartExecution charges the dispatcher for: emulator CPU."""
    if not doc:
        return []
    r = doc["results"]
    d, raw = r.get("dispatcher", {}), r.get("raw_start_execution", {})
    bare = [raw[w].get("emulator_cpu_ms_per_start") for w in ("before", "after") if w in raw]
    bare = [b for b in bare if b is not None]
    if d.get("ratio_to_raw") is None or d.get("emulator_cpu_ms_per_start") is None or not bare:
        return []
    return [
        f"The ratio to raw StartExecution ({num(d['ratio_to_raw'])}, bench/results/"
        f"throughput.json) is measured on a shared emulator: each dispatcher start cost the "
        f"emulator {num(d['emulator_cpu_ms_per_start'])} ms of CPU (a receive, a share of a "
        f"batched delete and two status events come with it) against "
        f"{' and '.join(num(b) for b in bare)} ms per bare start, on the same two cores. The "
        "emulator is one Python process, so the dispatcher's rate is bounded by that extra "
        "emulator work as much as by its own.",
        "",
    ]


def readme_block(out: Path) -> list[str]:
    """The performance page's generated figures (docs/performance.md), from the JSON files in
    ``out``."""
    names = ("comparison", "handover", "throughput", "scale", "fairness")
    found = {name: load(out, name) for name in names}
    lines = [BEGIN]
    cmp = found["comparison"]
    if cmp:
        m, config = cmp["machine"], cmp["results"]["config"]
        lines += [
            f"Measured with `make bench` ({_minutes(found)}; `python -m bench --only "
            f"comparison` runs one part) on {m['nproc']} cores of {m['cpu_model']}, "
            f"{m['emulator']}, {m['python_implementation']} {m['python']}; the dispatcher, "
            "the emulator and the driver share the cores. Full numbers, load averages and "
            "methods: [bench/results/summary.md](bench/results/summary.md).",
            "",
            f"The same stream to each pattern: {config['requests']:,} requests of "
            f"{config['low']:g}-{config['high']:g} s, limit {config['limit']}.",
            "",
            *comparison_table(cmp),
            "",
        ]
        for name in [n for n in PATTERN_ORDER if n in cmp["results"]["patterns"]]:
            notes = cmp["results"]["patterns"][name]["notes"]
            lines.append(f"- **{name}**: " + "; ".join(notes) + ".")
        lines.append("")
        over = overshoot_line(cmp)
        if over:
            lines += [over, ""]
        sweep = lag_sweep_table(cmp)
        if sweep:
            lines += [
                f"Check-then-act with `ListExecutions` answers served stale by the fault proxy "
                f"(first {config['sweep_requests']} requests of the stream, one run per lag, "
                "the runs side by side):",
                "",
                *sweep,
                "",
            ]
    hand = found["handover"]
    if hand:
        lines += ["Hand-over, from the records (k-th work end to (k + limit)-th work start):", ""]
        lines += [*handover_table(hand), ""]
        share = share_line(hand)
        if share:
            lines += [share, ""]
    lines += raw_ratio_lines(found["throughput"])
    rows = targets(out)
    if rows:
        lines += ["| target | measured | |", "|---|---|---|"]
        lines += [
            f"| {t} | {v} | {'n/a' if ok is None else ('met' if ok else '**missed**')} |"
            for t, v, ok in rows
        ]
        lines.append("")
    reads_doc = load(out, "reads")
    if reads_doc:
        lines += [*reads.section(reads_doc), ""]
    shared = load(out, "shared_limit")
    if shared:
        lines += [*shared_limit.section(shared), ""]
    return [*lines, END]


PAGE = Path(__file__).resolve().parent.parent / "docs" / "performance.md"
"""Where the generated figures live (between `BEGIN` and `END`)."""

BEGIN = "<!-- bench:begin - generated: python -m bench.report --readme -->"
END = "<!-- bench:end -->"


def readme_section(text: str) -> list[str]:
    """The generated block as it stands in a page's text (markers included)."""
    lines = text.splitlines()
    return lines[lines.index(BEGIN) : lines.index(END) + 1]


def write_readme(readme: Path, out: Path) -> None:
    """Replace the generated block in ``readme`` with one rendered from ``out``."""
    lines = readme.read_text().splitlines()
    begin, end = lines.index(BEGIN), lines.index(END)
    readme.write_text("\n".join([*lines[:begin], *readme_block(out), *lines[end + 1 :]]) + "\n")


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.report --readme``: print (or ``--write``) docs/performance.md's figures."""
    import argparse  # noqa: PLC0415 - only for the command line

    root = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__)
    parser.add_argument("--readme", action="store_true", help="print the generated block")
    parser.add_argument("--write", action="store_true", help=f"rewrite the block in {PAGE.name}")
    parser.add_argument("--out", type=Path, default=root / "results", help="results folder")
    args = parser.parse_args(argv)
    if args.write:
        write_readme(PAGE, args.out)
    elif args.readme:
        print("\n".join(readme_block(args.out)))
    else:
        parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
