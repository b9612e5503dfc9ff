# Two commands on a fresh machine: `make run` and `make test` (python3 and make are all they need).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DATA_DIR ?= data
SCALE ?= demo
RUN_ARGS ?=

.PHONY: setup run test lint bench clean-data

# Re-install only when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	@if [ -z "$$(ls -A $(DATA_DIR)/raw 2>/dev/null)" ]; then \
		echo "== $(DATA_DIR)/raw is empty: writing $(SCALE) demo data"; \
		$(BIN)/nestcast demo-data $(DATA_DIR) --scale $(SCALE); \
	fi
	$(BIN)/nestcast run --data-dir $(DATA_DIR) $(RUN_ARGS)

# Two workers by default (the suite is mostly Prefect, pandas and small Keras models, one core each); one file per
# worker keeps each module's Prefect backend and fixtures in one process. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=25

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/ingest.py --scale full
	$(BIN)/python benchmarks/prepare.py --scale full
	$(BIN)/python benchmarks/train.py

clean-data:
	rm -rf $(DATA_DIR)
