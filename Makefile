# The two commands a person needs: `make demo` (the main job: a local cluster serving a real
# model, SmolLM2-135M-Instruct from a GGUF fetched once) and `make test` (the suite).
# Each creates .venv and installs pinned dependencies on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOME_DIR ?= .stoke-home

.PHONY: demo test lint typecheck imports install clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and alone, so nothing can resolve a different (CUDA) build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	BIN=$(BIN) STOKE_HOME=$(HOME_DIR) deploy/local-demo.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# The import contracts in pyproject.toml ([tool.importlinter]): which package may import which.
imports: $(STAMP)
	$(BIN)/lint-imports

test: $(STAMP) lint typecheck imports
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) $(HOME_DIR)
