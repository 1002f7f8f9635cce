"""The kill matrix: each mutation of `sim.mutations` hunted over the seeds until one catches it.

`python -m sim --mutate` (`make mutate`) runs it; `python -m sim.killmatrix` rewrites the
table of docs/testing.md from `sim/results/mutations.json`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from sim.bugs import patched
from sim.harness import simulate
from sim.mutations import MUTATIONS, Edit

# -- the kill matrix -------------------------------------------------------------------------


def _quiet() -> None:
    """Worker processes: the dispatcher's log lines off (thousands per seed)."""
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL),
        cache_logger_on_first_use=False,
    )


REACHED: set[str] = set()
"""The mutations whose edited line a run reached (`probes` record them here)."""


def probes(names: Iterable[str]) -> tuple[tuple[Any, str, Any], ...]:
    """Patches that leave the code as it is but record in `REACHED` each mutation of
    ``names`` whose line is reached (several in one function: one patch)."""
    groups: dict[tuple[int, str], list[tuple[str, Edit, str]]] = {}
    for name in names:
        mutation = MUTATIONS[name]
        for edit in mutation.edits:
            at = mutation.reach if edit is mutation.edit else ""
            groups.setdefault((id(edit.owner), edit.attribute), []).append((name, edit, at))
    patches = []
    for group in groups.values():

        def probed(source: str, group: list[tuple[str, Edit, str]] = group) -> str:
            for name, edit, at in group:
                source = edit.probe(source, name, at)
            return source

        first = group[0][1]
        patches.append((first.owner, first.attribute, first.compile(probed)))
    return tuple(patches)


def survey(names: Sequence[str], seeds: Sequence[int]) -> dict[int, tuple[bool, list[str]]]:
    """Run ``seeds`` unmutated: for each, whether it held and which mutations' lines it
    reached. A run is deterministic, so a mutation whose line a seed never reaches runs
    that seed exactly as unmutated: the hunt skips it."""

    _quiet()
    found: dict[int, tuple[bool, list[str]]] = {}
    with patched(probes(names)):
        for seed in seeds:
            REACHED.clear()
            outcome = simulate(seed)
            found[seed] = (outcome.ok, sorted(REACHED))
    REACHED.clear()
    return found


def hunt(
    name: str, seeds: Sequence[int], budget: float | None = None, *, reached: int | None = None
) -> dict[str, Any]:
    """Run ``name`` over ``seeds`` until one catches it (or the CPU ``budget`` runs out);
    ``reached``: in how many seeds of the survey its line was reached."""

    _quiet()
    mutation = MUTATIONS[name]
    began = time.process_time()
    result: dict[str, Any] = {
        "kind": mutation.kind,
        "rule": mutation.rule,
        "target": mutation.target,
        "caught_at_seed": None,
        "reached_in_seeds": len(seeds) if reached is None else reached,
        "seeds_run": 0,
        "violations": [],
        "first_violation": None,
        "errors": [],
    }
    for seed in seeds:
        outcome = simulate(seed, bugs=(name,))
        result["seeds_run"] += 1
        if not outcome.ok:
            result["caught_at_seed"] = seed
            result["violations"] = sorted({v.kind for v in outcome.violations})
            if outcome.violations:
                result["first_violation"] = str(outcome.violations[0])[:300]
            result["errors"] = [e.strip().splitlines()[-1][:300] for e in outcome.errors[:2]]
            break
        if budget is not None and time.process_time() - began > budget:
            result["budget_exhausted"] = True
            break
    result["cpu_seconds"] = round(time.process_time() - began, 1)
    return result


@dataclass
class Matrix:
    """The kill matrix: each mutation's hunt, and the unmutated survey it pruned by."""

    seeds: Sequence[int]
    results: dict[str, dict[str, Any]]
    failing_unmutated: list[int]
    survey_cpu: float


def matrix(
    names: Iterable[str],
    seeds: Sequence[int],
    *,
    workers: int = 2,
    budget: float | None = None,
    progress: Callable[[str, dict[str, Any], int, int], None] | None = None,
) -> Matrix:
    """Survey ``seeds`` unmutated, then hunt every mutation of ``names`` over the seeds that
    reach its line and hold unmutated (``workers`` processes). ``progress(name, result,
    done, total)`` is called as each hunt ends."""
    names = list(names)
    os.environ.setdefault("PYTHONHASHSEED", "0")
    began = time.process_time()
    surveyed: dict[int, tuple[bool, list[str]]] = {}
    results: dict[str, dict[str, Any]] = {}
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        chunks = [list(seeds[i :: max(1, workers) * 4]) for i in range(max(1, workers) * 4)]
        for part in as_completed([pool.submit(survey, names, c) for c in chunks if c]):
            surveyed.update(part.result())
        survey_cpu = time.process_time() - began  # this process only: see each hunt's own
        failing = sorted(s for s, (ok, _) in surveyed.items() if not ok)
        relevant = {n: [s for s in seeds if surveyed[s][0] and n in surveyed[s][1]] for n in names}
        futures = {
            pool.submit(hunt, n, relevant[n], budget, reached=len(relevant[n])): n for n in names
        }
        for future in as_completed(futures):
            name = futures[future]
            results[name] = future.result()
            if progress is not None:
                progress(name, results[name], len(results), len(names))
    return Matrix(seeds, {n: results[n] for n in names}, failing, round(survey_cpu, 1))


def line(name: str, result: dict[str, Any]) -> str:
    """One row of the kill matrix."""
    seed = result["caught_at_seed"]
    reached = f"reached in {result['reached_in_seeds']:>3} seeds"
    if seed is None:
        why = "budget exhausted" if result.get("budget_exhausted") else "NOT CAUGHT"
        caught = f"{why} ({reached}, {result['seeds_run']} run)"
    else:
        kinds = ", ".join(result["violations"]) or "error: " + "; ".join(result["errors"])
        caught = f"seed {seed:<4} {kinds} ({reached})"
    return f"{name:<38} {caught}  [{result['cpu_seconds']} s]"


def report(found: Matrix, out: Path | None) -> int:
    """Print the summary, write the JSON; 0 when every mutation was caught."""
    results, seeds = found.results, found.seeds
    caught = [n for n, r in results.items() if r["caught_at_seed"] is not None]
    missed = [n for n in results if n not in caught]
    print(
        f"{len(caught)} of {len(results)} mutations caught within {len(seeds)} seeds "
        f"(seeds {seeds[0]}..{seeds[-1]})"
    )
    if found.failing_unmutated:
        print(f"seeds that fail unmutated (skipped): {found.failing_unmutated}")
    for name in missed:
        print(f"  not caught: {name} - {results[name]['rule']}")
    if out is not None:
        summary = {
            "seeds": len(seeds),
            "first_seed": seeds[0],
            "mutations": len(results),
            "caught": len(caught),
            "not_caught": missed,
            "failing_unmutated": found.failing_unmutated,
            "cpu_seconds": round(sum(r["cpu_seconds"] for r in results.values()), 1),
            "python": sys.version.split()[0],
            "matrix": results,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0 if not missed else 1


def markdown(summary: dict[str, Any]) -> str:
    """The kill matrix of a ``--json`` summary as the table of docs/testing.md (between
    its ``kill-matrix`` markers): mutation, class, first seed that caught it, violation."""
    rows = [
        "| mutation | class | first seed | violation |",
        "|---|---|---|---|",
    ]
    for name, result in summary["matrix"].items():
        seed = result["caught_at_seed"]
        caught = "not caught" if seed is None else str(seed)
        kinds = ", ".join(f"`{v}`" for v in result["violations"]) or "-"
        rows.append(f"| `{name}` | {result['kind']} | {caught} | {kinds} |")
    return "\n".join(rows) + "\n"


README_MARKERS = ("<!-- kill-matrix:begin -->\n", "<!-- kill-matrix:end -->")
"""The markers around the table `markdown` makes in `PAGE` (``python -m sim.mutations``)."""

PAGE = Path("docs/testing.md")
"""The page that shows the kill matrix."""


def update_readme(readme: Path, results: Path) -> bool:
    """Write the table of ``results`` between the page's markers; whether it changed."""
    begin, end = README_MARKERS
    text = readme.read_text(encoding="utf-8")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    table = markdown(json.loads(results.read_text(encoding="utf-8")))
    new = head + begin + table + end + tail
    if new == text:
        return False
    readme.write_text(new, encoding="utf-8")
    return True


if __name__ == "__main__":  # python -m sim.killmatrix: the page's table from the results
    changed = update_readme(PAGE, Path("sim/results/mutations.json"))
    print(f"{PAGE} updated" if changed else f"{PAGE} already up to date")
