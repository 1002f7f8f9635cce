# Two commands matter: `make demo` and `make test`. Everything else is for contributors.
PYTHON ?= python3
VENV ?= .venv
EMULATOR_VENV ?= .venv-emulator
PY := $(VENV)/bin/python
PIP_FLAGS ?= --quiet --disable-pip-version-check

.PHONY: demo test test-fast test-containers image lint format docs bench simulate mutate mutmut lock clean help

help:
	@echo "make demo   - sandbox + dispatcher + 200 requests, limit held, summary (DEMO_ARGS=... for more flags)"
	@echo "make test   - the full test suite (unit + integration against the emulator)"
	@echo "make image  - the container image sfn-dispatcher:local (docker, else podman; IMAGE=... to rename)"
	@echo "make test-containers - the image run hardened and the compose stack, in a real engine"
	@echo "make lint   - ruff + mypy strict + the reference pages current + mkdocs build --strict"
	@echo "make docs   - regenerate docs/reference/ from the code, build the docs site into site/"
	@echo "make bench  - benchmarks, results in bench/results/"
	@echo "make simulate - the deterministic simulation: 2,000 seeds, then each fixed bug put back"
	@echo "make mutate - the kill matrix: each safety rule taken out, the first seed that notices"
	@echo "make mutmut - mutation testing of the slot ledger (mutmut), results in sim/results/mutmut.json"
	@echo "make lock   - refresh requirements.lock (pinned runtime deps for the image)"

# Two stamps: `make demo` needs only the package and its runtime dependencies
# (.runtime); test, lint and the rest add the dev extra (mypy, cfn-lint, hypothesis,
# matplotlib, ...), which takes minutes to install and the demo never imports.
$(VENV)/.runtime: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required (found %s); set PYTHON=python3.11" % sys.version.split()[0])'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) -e '.[demo]'
	@touch $@

$(VENV)/.installed: $(VENV)/.runtime
	$(PY) -m pip install $(PIP_FLAGS) --upgrade pip
	$(PY) -m pip install $(PIP_FLAGS) -e '.[dev]'
	@touch $@

# The emulator lives in its own virtualenv: it pins a botocore that aiobotocore cannot use.
# It also holds the AWS CLI v1 (`.venv-emulator/bin/aws`) that tests the sandbox's printed commands.
$(EMULATOR_VENV)/.installed: requirements-emulator.txt
	@test -x $(EMULATOR_VENV)/bin/python || $(PYTHON) -m venv $(EMULATOR_VENV)
	$(EMULATOR_VENV)/bin/python -m pip install $(PIP_FLAGS) -r requirements-emulator.txt
	@touch $@

# Runtime dependencies only: the first run on a fresh clone installs no dev tools.
demo: $(VENV)/.runtime $(EMULATOR_VENV)/.installed
	$(PY) -m devtools demo $(DEMO_ARGS)

# Three workers on two cores: most integration tests wait on the emulator, not the CPU.
# Each worker has its own emulator. TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 3
test: $(VENV)/.installed $(EMULATOR_VENV)/.installed
	$(PY) -m pytest -n $(TEST_WORKERS) --durations=10

test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not integration"

# The image from the Dockerfile, with docker where its daemon answers, else podman; where no
# registry answers, on a local Debian base (scripts/image explains).
image:
	scripts/image build

# The image run hardened against the sandbox emulator, then the compose stack for real.
# Installs podman and docker-compose when there is no docker (root or sudo), builds the
# image and the compose stack's stand-ins, then runs tests/containers/ in one process.
test-containers: $(VENV)/.installed $(EMULATOR_VENV)/.installed
	@if ! command -v docker >/dev/null || ! docker info >/dev/null 2>&1; then scripts/image install; fi
	scripts/image build
	scripts/image standins
	SFN_CONTAINER_TESTS=1 $(PY) -m pytest tests/containers --durations=5

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) -m scripts.reference --check
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# The docs site (mkdocs.yml, docs/): the reference pages generated from the code
# (scripts/reference.py), then the site in site/. `mkdocs serve` to read it locally.
docs: $(VENV)/.installed
	$(PY) -m scripts.reference
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(VENV)/.installed $(EMULATOR_VENV)/.installed
	$(PY) -m bench

# The deterministic simulation (sim/): every seed, then its teeth; results in sim/results/.
SEEDS ?= 2000
simulate: $(VENV)/.installed
	@mkdir -p sim/results
	PYTHONHASHSEED=0 $(PY) -m sim --seeds $(SEEDS) --json sim/results/simulate.json
	PYTHONHASHSEED=0 $(PY) -m sim --teeth --seeds $(SEEDS) --json sim/results/teeth.json

# The simulation's power: each mutation of sim/mutations.py takes one safety rule out of the
# dispatcher; every one must be caught within the 200 seeds (exit 1 otherwise). Results in
# sim/results/mutations.json. MUTATE_WORKERS processes; MUTATE_BUDGET: CPU s per mutation.
MUTATE_WORKERS ?= 2
MUTATE_BUDGET ?= 300
mutate: $(VENV)/.installed
	@mkdir -p sim/results
	PYTHONHASHSEED=0 $(PY) -m sim --mutate --seeds 200 --workers $(MUTATE_WORKERS) --budget $(MUTATE_BUDGET) --json sim/results/mutations.json

# Mutation testing of the slot ledger (dispatcher/core/ledger.py) with mutmut: every mutant
# against the ledger's unit and property tests and 20 simulation seeds ([tool.mutmut] in
# pyproject.toml), then the hand-made mutants of its properties (mutmut skips decorated
# functions). About 8 min on two shared cores. Fails when a mutant that was not killed is
# not judged in docs/testing-mutation.md, or a property mutant survives.
MUTMUT_CHILDREN ?= 2
mutmut: $(VENV)/.installed
	rm -rf mutants
	PYTHONHASHSEED=0 $(VENV)/bin/mutmut run --max-children $(MUTMUT_CHILDREN)
	$(PY) tests/mutation_report.py --json sim/results/mutmut.json
	$(PY) tests/mutation_properties.py --json sim/results/mutmut-properties.json

# Pinned runtime dependencies (with hashes) for the container image.
lock: $(VENV)/.installed
	$(PY) -m pip install $(PIP_FLAGS) 'uv==0.13.8'
	$(VENV)/bin/uv pip compile pyproject.toml --python-version 3.11 --python-platform linux --generate-hashes --custom-compile-command 'make lock' --output-file requirements.lock

clean:
	rm -rf $(VENV) $(EMULATOR_VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis mutants
