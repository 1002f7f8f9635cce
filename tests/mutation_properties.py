"""Hand-made mutants of the ledger's properties, which mutmut does not mutate.

mutmut leaves decorated functions alone, so the ledger's ``@property`` bodies (``free``,
``held``, the counts) get no mutants. `make mutmut` runs this too: each mutant below,
written in mutmut's style, is applied to a copy of the tree and the same tests are run
(`[tool.mutmut]` in pyproject.toml); it must be killed.

    python tests/mutation_properties.py --json sim/results/mutmut-properties.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

HELD = "return len(self._running) + len(self._reserved) + len(self._doubt)"
FREE = "return max(0, self._limit - self.held)"
MUTANTS: list[tuple[str, str, str]] = [
    ("limit + 1", "return self._limit\n", "return self._limit + 1\n"),
    ("per_key_limit: None", "return self._per_key_limit\n", "return None\n"),
    ("keys_at_limit: >= to >", "held >= self._per_key_limit)", "held > self._per_key_limit)"),
    (
        "keys_at_limit: 0 to 1",
        "if self._per_key_limit is None:\n            return 0\n        return sum",
        "if self._per_key_limit is None:\n            return 1\n        return sum",
    ),
    ("running: empty", "return frozenset(self._running)", "return frozenset()"),
    ("running_count + 1", "return len(self._running)\n", "return len(self._running) + 1\n"),
    ("reserved_count: 0", "return len(self._reserved)\n", "return 0\n"),
    ("doubt_count: 0", "return len(self._doubt)\n\n", "return 0\n\n"),
    ("in_doubt: empty", "return frozenset(self._doubt)", "return frozenset()"),
    ("held: no doubts", HELD, "return len(self._running) + len(self._reserved)"),
    ("held: no reservations", HELD, "return len(self._running) + len(self._doubt)"),
    ("held: - doubts", HELD, HELD.replace("+ len(self._doubt)", "- len(self._doubt)")),
    ("free: no max", FREE, "return self._limit - self.held"),
    ("free: max(1, ...)", FREE, "return max(1, self._limit - self.held)"),
    ("free: + 1", FREE, "return max(0, self._limit - self.held + 1)"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="write the results here")
    args = parser.parse_args()
    root = Path.cwd()
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["mutmut"]
    pytest_args = [*config["pytest_add_cli_args"], *config["pytest_add_cli_args_test_selection"]]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        for name, old, new in MUTANTS:
            shutil.rmtree(tree, ignore_errors=True)
            shutil.copytree(root / "dispatcher", tree / "dispatcher")
            shutil.copytree(root / "tests", tree / "tests")
            shutil.copytree(root / "sim", tree / "sim", ignore=shutil.ignore_patterns("results"))
            shutil.copy(root / "pyproject.toml", tree)
            ledger = tree / "dispatcher" / "ledger.py"
            text = ledger.read_text()
            if text.count(old) != 1:
                raise SystemExit(f"{name}: the text to mutate is not found exactly once")
            ledger.write_text(text.replace(old, new))
            started = time.monotonic()
            run = subprocess.run(
                [sys.executable, "-m", "pytest", "-x", "-q", *pytest_args],
                cwd=tree,
                capture_output=True,
                text=True,
                check=False,
                timeout=900,
                env={**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"},
            )
            failed = [line for line in run.stdout.splitlines() if line.startswith("FAILED")]
            results.append(
                {
                    "mutant": name,
                    "killed": run.returncode != 0,
                    "killed_by": failed[0].split()[1] if failed else None,
                    "seconds": round(time.monotonic() - started, 1),
                }
            )
            print(results[-1], flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    survived = [r["mutant"] for r in results if not r["killed"]]
    print(f"{len(results) - len(survived)}/{len(results)} property mutants killed")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
