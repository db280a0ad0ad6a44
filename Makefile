# The two commands of the README: `make demo` and `make test`. Both create .venv on a
# fresh machine, so nothing needs to be installed by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/station demo --boards 16

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy station

# Tests marked `parallel` mostly wait on the clock: they run beside the rest, not after.
test: lint
	@$(BIN)/pytest -m parallel -p no:cacheprovider > .pytest-parallel.log 2>&1 & p=$$!; \
	$(BIN)/pytest -m "not parallel"; s=$$?; wait $$p; t=$$?; \
	echo "--- tests marked parallel:"; tail -n 5 .pytest-parallel.log; \
	[ $$t -eq 0 ] || cat .pytest-parallel.log; [ $$s -eq 0 ] && [ $$t -eq 0 ]

bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'  # esp-batch-flash, a peer the baud matrix runs
	$(BIN)/python benchmarks/run_all.py

soak: $(STAMP)
	$(BIN)/python benchmarks/soak.py --boards 500

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
