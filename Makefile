# Entry points for a fresh machine (Python 3.10+ with venv):
#   make demo   set up .venv and run the main job on the bundled Last.fm data
#   make test   set up .venv and run the fast tests (unit and small multi-rank ones, not `slow`)
#   make test-all  every test, `slow` ones included (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-all docs-outputs clean

setup: $(VENV)/.installed

# torch first, pinned to the CPU wheel (requirements/cpu.txt); then the project with its
# test extras under the same file as a constraint: without it pip's resolver, backtracking
# over the S3 test stack, replaced torch 2.13.0+cpu by a 6 GB CUDA torch 2.14.1.
$(VENV)/.installed: pyproject.toml requirements/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements/cpu.txt
	$(BIN)/pip install --quiet -e ".[test]" -c requirements/cpu.txt
	touch $@

demo: setup
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/gnaq run

test: setup
	RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q

test-all: setup
	RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q -m "slow or not slow"

# rerun the documented commands and rewrite the example outputs marked in README.md and docs/
docs-outputs: setup
	RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled $(BIN)/python scripts/regen_doc_outputs.py

clean:
	rm -rf $(VENV) .pytest_cache runs
