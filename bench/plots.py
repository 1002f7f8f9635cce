"""The pictures: concurrency over time per pattern (limit drawn), hand-over latency, fairness."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib as mpl

mpl.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # after use("Agg"): the backend is chosen first

COLOURS = {
    "sfn-dispatcher": "#1b7837",
    "check-then-act": "#b2182b",
    "dynamodb-semaphore": "#2166ac",
    "dynamodb-semaphore-simplified": "#67a9cf",
    "dispatcher_events_delayed": "#7fbc41",
}


def _steps(series: list[list[float]]) -> tuple[list[float], list[float]]:
    return [p[0] for p in series], [p[1] for p in series]


def concurrency(comparison: dict[str, Any], path: Path) -> None:
    """One panel per pattern: work in progress over time, the limit as a dashed line."""
    patterns: dict[str, Any] = comparison["patterns"]
    limit = comparison["config"]["limit"]
    fig, axes = plt.subplots(len(patterns), 1, figsize=(11, 3.1 * len(patterns)), sharex=True)
    axes_list = list(axes) if len(patterns) > 1 else [axes]
    peak = max(max((p[1] for p in d["series"]["work"]), default=0) for d in patterns.values())
    for ax, (name, doc) in zip(axes_list, patterns.items(), strict=True):
        colour = COLOURS.get(name, "black")
        xs, ys = _steps(doc["series"]["work"])
        ax.step(xs, ys, where="post", color=colour, linewidth=1.1, label="doing the work")
        ax.axhline(limit, color="black", linestyle="--", linewidth=1, label=f"limit {limit}")
        ax.set_ylim(0, max(peak, limit) * 1.25)
        ax.set_ylabel("concurrent")
        utilisation = doc.get("utilisation_while_backlog")
        ax.set_title(
            f"{name}: max {doc['max_concurrency']} (limit {limit}), "
            f"{doc['seconds_above_limit']:.1f} s above the limit, utilisation "
            f"{utilisation:.2f}, makespan {doc['makespan_seconds']:.0f} s",
            fontsize=10,
            loc="left",
        )
        if "executions" in doc["series"]:
            twin = ax.twinx()
            ex, ey = _steps(doc["series"]["executions"])
            twin.step(ex, ey, where="post", color="grey", linewidth=0.8, alpha=0.6)
            twin.set_ylabel("executions running (grey)", color="grey")
            twin.tick_params(axis="y", colors="grey")
            twin.set_ylim(0, max(ey, default=1) * 1.1)
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
    axes_list[-1].set_xlabel("seconds since the first request was sent")
    fig.suptitle(
        f"{comparison['config']['requests']} requests of "
        f"{comparison['config']['low']:g}-{comparison['config']['high']:g} s, limit {limit}: "
        "work in progress over time (from the executions' own records)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def lag_sweep(comparison: dict[str, Any], path: Path) -> None:
    """Check-then-act's work in progress over time, one panel per ListExecutions lag."""
    sweep: dict[str, Any] = comparison["check_then_act_lag_sweep"]
    limit = comparison["config"]["limit"]
    fig, axes = plt.subplots(len(sweep), 1, figsize=(11, 2.4 * len(sweep)), sharex=True)
    axes_list = list(axes) if len(sweep) > 1 else [axes]
    peak = max(max((p[1] for p in d["series"]["work"]), default=0) for d in sweep.values())
    for ax, (lag, doc) in zip(axes_list, sweep.items(), strict=True):
        xs, ys = _steps(doc["series"]["work"])
        ax.step(xs, ys, where="post", color=COLOURS["check-then-act"], linewidth=1.1)
        ax.axhline(limit, color="black", linestyle="--", linewidth=1, label=f"limit {limit}")
        ax.set_ylim(0, max(peak, limit) * 1.2)
        ax.set_ylabel("running")
        ax.set_title(
            f"ListExecutions {lag} s old: max {doc.get('max_concurrency')}, "
            f"{doc.get('seconds_above_limit', 0):.1f} s above the limit, "
            f"{doc['extra']['dead_lettered']} dead-lettered",
            fontsize=10,
            loc="left",
        )
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
    axes_list[-1].set_xlabel("seconds since the first request was sent")
    fig.suptitle(
        "check-then-act against a lagging ListExecutions (from the executions' own records)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def handover(document: dict[str, Any], path: Path) -> None:
    """Left: the dispatcher's own share of a hand-over. Right: slot refill gap per pattern."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    share = document.get("dispatcher_share_seconds")
    if share and share["samples"]:
        ms = [s * 1000 for s in share["samples"]]
        left.hist(ms, bins=60, color=COLOURS["sfn-dispatcher"], alpha=0.8)
        for q, style in (("p50", ":"), ("p99", "--")):
            left.axvline(
                share[q] * 1000,
                color="black",
                linestyle=style,
                label=f"{q} {share[q] * 1000:.1f} ms",
            )
        left.axvline(20, color="red", linestyle="-", linewidth=1, label="target p99 20 ms")
        left.set_xlabel("terminal event applied -> next StartExecution sent (ms)")
        left.set_ylabel("hand-overs")
        left.set_title(f"sfn-dispatcher's own share ({share['count']} hand-overs)", fontsize=10)
        left.legend(fontsize=8)
        left.grid(alpha=0.3)
    for name, gaps in document["refill_gap_seconds"].items():
        values = sorted(max(g, 1e-3) for g in gaps["samples"])
        if not values:
            continue
        negative = sum(1 for g in gaps["samples"] if g < 0)
        cdf = [(i + 1) / len(values) for i in range(len(values))]
        shown = "sfn-dispatcher, events delayed" if name == "dispatcher_events_delayed" else name
        label = f"{shown}: p50 {gaps['p50']:.2f} s, p99 {gaps['p99']:.2f} s"
        if negative:
            label += f" ({negative} negative: over the limit)"
        right.step(values, cdf, where="post", color=COLOURS.get(name, "black"), label=label)
    right.set_xscale("log")
    right.set_xlabel("slot refill gap: k-th work end -> (k + limit)-th work start (s, log)")
    right.set_ylabel("fraction of hand-overs")
    right.set_title("How long a freed slot stays idle, end to end", fontsize=10)
    right.legend(fontsize=8, loc="lower right")
    right.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fairness(document: dict[str, Any], path: Path) -> None:
    """One panel per fairness run: the big tenant's and the small tenants' running executions."""
    runs: dict[str, Any] = document["runs"]
    config = document["config"]
    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 2.8 * len(runs)), sharex=True)
    axes_list = list(axes) if len(runs) > 1 else [axes]
    for ax, run in zip(axes_list, runs.values(), strict=True):
        for group, colour, label in (
            ("big", "#b2182b", "big tenant"),
            ("small", "#2166ac", f"{config['small_tenants']} small tenants together"),
        ):
            xs, ys = _steps(run["series"][group])
            ax.step(xs, ys, where="post", color=colour, linewidth=1.1, label=label)
        ax.axhline(config["limit"], color="black", linestyle="--", linewidth=1, label="limit")
        small = run["small_finished"]["max"]
        ax.axvline(small, color="#2166ac", linestyle=":", linewidth=1, label="last small done")
        ax.set_ylim(0, config["limit"] * 1.25)
        ax.set_ylabel("running")
        ended = run["tenants"].get("big", {}).get("ended", 0)
        big = (
            f"by {run['big_finished']:.0f} s"
            if ended == config["big"]
            else f"{ended} of {config['big']} ended when stopped"
        )
        ax.set_title(
            f"{run['label']}: small tenants done by {small:.0f} s, big tenant {big}",
            fontsize=10,
            loc="left",
        )
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
    # Linear to 10 s, log beyond: the small tenants' first seconds and a long tail both show.
    last = axes_list[-1]
    last.set_xscale("symlog", linthresh=10, linscale=1.5)
    end = max(run["wall_seconds"] for run in runs.values())
    ticks = [t for t in (0, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000) if t <= end * 1.2]
    last.set_xticks(ticks, [str(t) for t in ticks])
    last.set_xlim(0, end * 1.05)
    last.set_xlabel("seconds since the first execution started (linear to 10 s, log beyond)")
    fig.suptitle(
        f"{config['big']} requests of one tenant enqueued before {config['small_tenants']} x "
        f"{config['small']} of small ones, {config['seconds']:g} s each, limit "
        f"{config['limit']} (from the executions' own records)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
