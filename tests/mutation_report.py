"""Summarise a mutmut run over the slot ledger (`make mutmut`).

    python tests/mutation_report.py --json sim/results/mutmut.json

Reads mutmut's own record (mutants/dispatcher/ledger.py.meta), writes the counts, the
score and every mutant not killed with its diff, and fails when a mutant that was not
killed is not judged, by name, in docs/testing-mutation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tomllib
from collections import Counter
from importlib.metadata import version
from pathlib import Path

META = Path("mutants/dispatcher/ledger.py.meta")
DOC = Path("docs/testing-mutation.md")
MUTMUT = Path(sys.executable).parent / "mutmut"

# mutmut's exit codes (mutmut/stats.py); anything else is "suspicious".
STATUS = {
    0: "survived",
    1: "killed",
    3: "killed",
    5: "no tests",
    33: "no tests",
    34: "skipped",
    36: "timeout",
    -24: "timeout",
    24: "timeout",
    152: "timeout",
    255: "timeout",
    37: "caught by type check",
    -11: "segfault",
    -9: "segfault",
}


def short(name: str) -> str:
    """``dispatcher.core.ledger.xǁLedgerǁdoubt__mutmut_3`` -> ``doubt__mutmut_3``."""
    last = name.rsplit(".", 1)[-1]
    return last.rsplit("ǁ", 1)[-1] if "ǁ" in last else last.removeprefix("x_")


def diff_of(name: str) -> str:
    shown = subprocess.run(
        [str(MUTMUT), "show", name], capture_output=True, text=True, check=True
    ).stdout
    return "\n".join(line for line in shown.splitlines() if not line.startswith("# "))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="write the summary here")
    args = parser.parse_args()
    meta = json.loads(META.read_text())
    codes: dict[str, int | None] = meta["exit_code_by_key"]
    statuses = {
        name: STATUS.get(code, "suspicious") if code is not None else "not checked"
        for name, code in codes.items()
    }
    counts = Counter(statuses.values())
    total = len(statuses)
    caught = counts["killed"] + counts["timeout"]
    others = sorted(
        name for name, status in statuses.items() if status not in ("killed", "timeout")
    )
    summary = {
        "tool": f"mutmut {version('mutmut')}",
        "mutated": "dispatcher/core/ledger.py",
        "command": "make mutmut",
        "tests": tomllib.loads(Path("pyproject.toml").read_text())["tool"]["mutmut"][
            "pytest_add_cli_args_test_selection"
        ],
        "simulation_seeds": int(os.environ.get("MUTMUT_SIM_SEEDS", "20")),
        "counts": dict(sorted(counts.items())),
        "total": total,
        "score": round(caught / total, 4) if total else 0.0,
        "score_text": f"{caught}/{total} killed (timeouts count as killed)",
        "not_killed": [
            {"name": short(n), "status": statuses[n], "diff": diff_of(n)} for n in others
        ],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(f"{summary['score_text']}: {dict(counts)}; written to {args.json}")
    judged = DOC.read_text() if DOC.exists() else ""
    unjudged = [n for n in others if f"`{short(n)}`" not in judged]
    for name in unjudged:
        print(f"not judged in {DOC}: {short(name)} ({statuses[name]})\n{diff_of(name)}\n")
    return 1 if unjudged else 0


if __name__ == "__main__":
    sys.exit(main())
