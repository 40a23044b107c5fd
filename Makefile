# Two commands matter (see README): `make run` (demo workflow) and `make test` (the test suite).
# Both build the project venv from the pinned lock first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
CORES ?= all
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup run test test-fast lint format lock report clean

# The pinned lock first, then the project itself (editable, no dependencies: the lock has them all; no build
# isolation: the venv's own setuptools builds it, so nothing beyond the lock is downloaded).
$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --requirement requirements.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation --editable .
	touch $@

setup: $(VENV)/.installed

# The split first: one invocation would retrain the teacher after any label edit (README, "Rerunning stages").
run: setup
	$(BIN)/snakemake --cores $(CORES) --until split
	$(BIN)/snakemake --cores $(CORES)
	$(BIN)/snakemake --cores 1 --report results/report.zip

test: setup
	$(BIN)/python -m pytest -q -n 2 --durations=15 tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not slurm" tests

lint: setup
	$(BIN)/snakemake --lint --cores 1
	$(BIN)/snakefmt --check Snakefile rules

format: setup
	$(BIN)/snakefmt Snakefile rules

lock: setup
	$(BIN)/pip freeze --exclude-editable > requirements.lock

clean:
	rm -rf results .snakemake
