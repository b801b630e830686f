# Two commands for a newcomer: `make run` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test lint bench conformance clean system-deps demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[test]'
	touch $(VENV)/.installed $@

run: $(VENV)/.installed
	$(BIN)/mta serve --config config.example.toml

# Debian packages the tests run for real (installed when missing and run as root; else named).
system-deps:
	bash tools/system-deps.sh test

test: $(VENV)/.installed-test system-deps
	$(BIN)/ruff check mta tests bench tools
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed-test
	$(BIN)/ruff check mta tests bench tools

# Regenerate the tests column of docs/conformance.md from the suite (CI checks it is current).
conformance: $(VENV)/.installed-test
	$(BIN)/python tools/conformance.py

# `mta sandbox`: a simulated Internet with demo domains and a relay on loopback (issue 16); Ctrl-C stops.
demo: $(VENV)/.installed-test
	$(BIN)/mta sandbox

bench: $(VENV)/.installed-test
	$(BIN)/python bench/relay_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

# The container image (issue 19): tests/container/build.sh builds the Dockerfile with podman (and
# installs podman, runc, debootstrap when missing: run as root), then the tests run it on loopback.
# Apart from `make test`; CI runs it after. container-clean drops the image and the cached base.
CONTAINER_IMAGE ?= localhost/mta:test
.PHONY: container-test container-clean
container-test: $(VENV)/.installed-test
	bash tools/system-deps.sh container
	MTA_CONTAINER_IMAGE=$(CONTAINER_IMAGE) bash tests/container/build.sh
	MTA_CONTAINER_IMAGE=$(CONTAINER_IMAGE) $(BIN)/python -m pytest -q tests/container

container-clean:
	CONTAINERS_CONF=$(CURDIR)/tests/container/containers.conf podman rmi --ignore $(CONTAINER_IMAGE) \
	    docker.io/library/debian:bookworm-slim
	CONTAINERS_CONF=$(CURDIR)/tests/container/containers.conf podman image prune --force \
	    --filter label=mta.stage=build >/dev/null
