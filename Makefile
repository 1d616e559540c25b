# `make run`: set up .venv, fetch the model, run the main chunk-size experiment.
# `make test`: the whole test suite (slow tests included), as CI runs it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
EXTRAS := test,experiments,peers

.PHONY: venv fetch run test test-fast lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

venv: $(VENV)/.installed

fetch: venv
	$(PY) -m jaxchunk.cli fetch smollm2-135m

run: fetch
	$(PY) -m experiments.chunk_sweep --quick --out results/chunk_sweep

# Every test file in its own pytest process, two at once, longest first (tests/run_files.py says
# why); each file's output and time printed as it ends, the failed files listed and failing the target.
TEST_FILES ?=
TEST_JOBS  ?= 2
test: fetch
	$(PY) tests/run_files.py --jobs $(TEST_JOBS) $(TEST_FILES)

lint: venv
	$(PY) -m ruff check .

test-fast: venv
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) results .pytest_cache
