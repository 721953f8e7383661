# The two commands a newcomer runs: `make demo` and `make test`. Everything installs into .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip --disable-pip-version-check
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
SOURCES := app clients/python/optserve tests bench

.PHONY: install install-test system-deps demo test lint typecheck bench bench-cartpole clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml clients/python/pyproject.toml
	$(PIP) install --quiet -e . -e 'clients/python[demo]'
	touch $@

# torch is pinned to the CPU build (2.13.0); an unpinned torch would pull several GB of CUDA packages
$(TEST_STAMP): $(STAMP) pyproject.toml clients/python/pyproject.toml
	$(PIP) install --quiet -e '.[test]' -e 'clients/python[demo,torch]'
	touch $@

install: $(STAMP)

# npm packages (pinned by each package-lock.json) of the TypeScript client and of the tests that
# generate TypeScript clients
NODE_PROJECTS := clients/typescript tests/clients/generated
NODE_STAMPS := $(addsuffix /node_modules/.installed,$(NODE_PROJECTS))
%/node_modules/.installed: %/package-lock.json | system-deps
	npm ci --prefix $* --no-audit --no-fund --loglevel=error
	touch $@

install-test: $(TEST_STAMP) system-deps $(NODE_STAMPS)

# redis-server (and redis-cli, for the Redis Cluster) backs the Redis store's tests, Node.js and npm the
# TypeScript ones, Chromium the dashboard's browser tests (driven by Playwright, never `playwright
# install`); Debian's packages, installed when missing (root in CI)
system-deps:
	@{ command -v redis-server && command -v redis-cli; } >/dev/null || { \
	  echo "installing redis-server (Debian package)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
	@test -x /usr/bin/chromium || { \
	  echo "installing chromium (Debian package)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	@{ command -v node && command -v npm; } >/dev/null || { \
	  echo "installing nodejs and npm (Debian packages)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; }

demo: install
	$(BIN)/optserve demo

lint: install-test
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/ruff format --check $(SOURCES)

typecheck: install-test
	$(BIN)/mypy

# the whole suite at the CPU dispatch level torch picks here, then the numerics tests (tests/optim) again
# under every other level this CPU offers: torch's float results differ by ulps between them
test: install-test lint typecheck
	$(BIN)/python -m pytest -q
	$(BIN)/python -m tests.optim.levels

bench: install-test
	$(BIN)/python -m bench

# the DQN agent on CartPole-v1 solved through the service, per optimizer, 1 actor and 2 (15-30 min; not in
# `make bench`): rewrites bench/CARTPOLE.md and docs/optserve-cartpole.png
bench-cartpole: install-test
	$(BIN)/python -m bench.cartpole

clean:
	rm -rf $(VENV) optserve-data demo-output .pytest_cache .mypy_cache .ruff_cache $(addsuffix /node_modules,$(NODE_PROJECTS)) clients/typescript/dist clients/typescript/dist-examples
