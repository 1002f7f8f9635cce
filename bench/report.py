"""Write the results: one JSON per scenario, then summary.md and the plots from those files.

The summary is built from the JSON files on disk, so re-running one scenario refreshes
its rows and leaves the others as they were measured.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

MIB_PER_MB = 1e6 / 2**20  # the targets are in MB (10^6 bytes); /proc reports KiB
PATTERN_ORDER = ("sfn-dispatcher", "check-then-act", "dynamodb-semaphore")


def write_json(out: Path, scenario: str, document: dict[str, Any]) -> Path:
    """Write ``<out>/<scenario>.json``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{scenario}.json"
    path.write_text(json.dumps(document, indent=1, default=str) + "\n")
    return path


def load(out: Path, scenario: str) -> dict[str, Any] | None:
    """A scenario's JSON document, if it has been run."""
    path = out / f"{scenario}.json"
    if not path.exists():
        return None
    document: dict[str, Any] = json.loads(path.read_text())
    return document


def num(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


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
    return [*lines, ""]


def handover_section(doc: dict[str, Any]) -> list[str]:
    """The dispatcher's own share of a hand-over, and every pattern's refill gap."""
    results = doc["results"]
    lines = ["## Hand-over latency", ""]
    share = results.get("dispatcher_share_seconds")
    if share:
        lines += [
            f"sfn-dispatcher's own share ({share['definition']}): {share['count']:,} "
            f"hand-overs, p50 {num(share['p50'] * 1000, 1)} ms, p90 "
            f"{num(share['p90'] * 1000, 1)} ms, p99 {num(share['p99'] * 1000, 1)} ms, max "
            f"{num(share['max'] * 1000, 1)} ms (exact samples; its own "
            f"`dispatcher_slot_refill_seconds` histogram says p50 "
            f"{num(share['from_histogram_p50'] * 1000, 1)} ms, p99 "
            f"{num(share['from_histogram_p99'] * 1000, 1)} ms by bucket interpolation).",
            "",
        ]
    lines += [
        "End to end, how long a freed slot stays idle (k-th work end to (k + limit)-th "
        "work start; it includes the emulator's event delivery for the dispatcher):",
        "",
        "| pattern | p50 (s) | p90 (s) | p99 (s) |",
        "|---|---|---|---|",
    ]
    for name, gaps in results["refill_gap_seconds"].items():
        lines.append(
            f"| {name} | {num(gaps['p50'], 3)} | {num(gaps['p90'], 3)} | {num(gaps['p99'], 3)} |"
        )
    return [*lines, "", "![hand-over latency](handover.png)", ""]


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
