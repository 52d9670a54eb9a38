# The two commands: `make up` (run the local cluster) and `make test` (run the suite).
# Both create .venv on first use; only Python 3.11+ is needed on the machine.

PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && echo $$p && break; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The suite's processes (pytest-xdist, one test file each at a time): most of the suite's
# time is spent waiting on failovers, restarts and deadlines, so two overlap well on 2 cores.
TEST_PROCESSES ?= 2

.PHONY: up test lint typecheck test-fast lock status bench docs clean compose-check compose-check-ha

# Installs exactly what requirements-dev.lock pins (what the suite was run with), then the
# project itself without resolving anything again.
$(STAMP): pyproject.toml requirements-dev.lock
	@test -n "$(PYTHON)" || { echo "Python 3.11 or newer is required" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

up: $(STAMP)
	$(BIN)/dialogs up

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_PROCESSES) --dist loadfile

# What CI runs before the suite: seconds, not minutes.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests/unit

# After changing a dependency in pyproject.toml: pin every package again (both lock files).
lock: $(STAMP)
	$(BIN)/python -m pip install --quiet pip-tools
	$(BIN)/pip-compile -q --strip-extras --no-emit-index-url --no-emit-find-links --no-emit-trusted-host \
		--extra local --extra test -o requirements-dev.lock pyproject.toml
	$(BIN)/pip-compile -q --strip-extras --no-emit-index-url --no-emit-find-links --no-emit-trusted-host \
		-o requirements.lock pyproject.toml

status: $(STAMP)
	$(BIN)/dialogs status

# The brief's figures, measured against baselines of the same run (bench/README.md).
bench: $(STAMP)
	$(BIN)/python -m bench

# The README's configuration tables, from the settings classes (a test checks them).
docs: $(STAMP)
	$(BIN)/python -m dialogsctl.settings_doc

clean:
	rm -rf $(VENV) .pytest_cache

# The production stack for real, on a machine with a Docker engine (tests/compose_check.py).
compose-check: $(STAMP)
	$(BIN)/python -m tests.compose_check

# The same with replicated databases (docker-compose.ha.yaml): a failover and a switchover.
compose-check-ha: $(STAMP)
	$(BIN)/python -m tests.compose_check --ha
