"""Assemble ``summary.md`` and the PNGs from the JSON results on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import fairness, plots, reads, shared_limit
from bench.figures import load
from bench.report import (
    comparison_section,
    handover_section,
    scale_section,
    throughput_section,
)
from bench.targets import targets

COMMAND = "make bench  # = .venv/bin/python -m bench"


def _machine(documents: list[dict[str, Any]]) -> list[str]:
    first = documents[0]
    m = first["machine"]
    dates = sorted(d["started_at"] for d in documents)
    minutes = sum(d["duration_seconds"] for d in documents) / 60
    return [
        f"Measured {dates[0][:16].replace('T', ' ')} to {dates[-1][:16].replace('T', ' ')} UTC "
        f"({minutes:.1f} min of scenarios) on {m['nproc']} cores of {m['cpu_model']}, "
        f"{m['memory_mib']:,} MiB, Linux {m['kernel']}, {m['python_implementation']} "
        f"{m['python']}, {m['emulator']} (AWS emulator, one child process per scenario), "
        f"sfn-dispatcher {m['dispatcher']}.",
        "",
        "The emulator, the dispatcher and the benchmark driver share these cores, and other "
        "work ran on the machine at the same time: each section gives the load average and "
        "how many cores other processes used, so the numbers can be judged.",
        "",
        f"Reproduce: `{COMMAND}` (one scenario: `python -m bench --only comparison`).",
        "",
    ]


def write(out: Path) -> Path:
    """Write ``summary.md`` and the plots for whatever scenarios have results."""
    names = ("comparison", "handover", "throughput", "scale", "fairness")
    found = {name: load(out, name) for name in names}
    documents = [d for d in found.values() if d is not None]
    lines = ["# sfn-dispatcher benchmarks", ""]
    if not documents:
        lines.append("No results yet: run `python -m bench`.")
    else:
        lines += _machine(documents)
        lines += ["## Targets", "", "| target | measured | |", "|---|---|---|"]
        lines += [
            f"| {t} | {m} | {'n/a' if ok is None else ('met' if ok else '**missed**')} |"
            for t, m, ok in targets(out)
        ]
        lines.append("")
    if found["comparison"]:
        plots.concurrency(found["comparison"]["results"], out / "concurrency.png")
        if found["comparison"]["results"].get("check_then_act_lag_sweep"):
            plots.lag_sweep(found["comparison"]["results"], out / "lag_sweep.png")
        lines += comparison_section(found["comparison"])
    if found["handover"]:
        plots.handover(found["handover"]["results"], out / "handover.png")
        lines += handover_section(found["handover"])
    if found["throughput"]:
        lines += throughput_section(found["throughput"])
    if found["scale"]:
        lines += scale_section(found["scale"])
    if found["fairness"]:
        plots.fairness(found["fairness"]["results"], out / "fairness.png")
        lines += fairness.section(found["fairness"])
    reads_doc = load(out, "reads")  # virtual time: not one of the measured minutes above
    if reads_doc:
        lines += [""] * (lines[-1] != "")
        lines += ["## Reconcile reads against the quotas", "", *reads.section(reads_doc), ""]
    shared = load(out, "shared_limit")
    if shared:
        lines += [""] * (lines[-1] != "")
        lines += ["## Two state machines sharing one limit", "", *shared_limit.section(shared), ""]
    path = out / "summary.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path
