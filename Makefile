# Two entry points (see README): `make run` and `make test`. Both set up .venv if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-scaling lint format foundation minihub viz benchmarks clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/kedro run

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks experiments
	$(BIN)/ruff format --check src tests benchmarks experiments
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q

# The peak-memory scaling test on the miniature hub (about 8 minutes; not in `make test`).
test-scaling: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q -m scaling

foundation: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/kedro run --pipelines foundation

# The miniature hub and Pick-a-Pic shards `kedro run --env minihub` reads (README: Running on GPUs).
minihub: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m prefgen_kedro.minihub data/minihub/06_models/hub \
		--pickapic data/minihub/01_raw/pickapic

benchmarks: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.run_all

viz: $(STAMP)
	$(BIN)/kedro viz build

lint format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks experiments
	$(BIN)/ruff check --fix src tests benchmarks experiments

clean-venv:
	rm -rf $(VENV)
