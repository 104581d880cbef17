# Set-up and checks. Every target creates .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-pure lint unit install clean bench bench-quick

# setup.py compiles these with mypyc; an editable install keeps the builds beside
# them, so an edit means a new build (see src/replicaproxy/compiled.py).
COMPILED := src/replicaproxy/core/events.py src/replicaproxy/core/session.py \
	src/replicaproxy/core/framing.py \
	src/replicaproxy/core/resp.py src/replicaproxy/core/http.py \
	src/replicaproxy/core/postgres.py src/replicaproxy/core/memcached.py \
	src/replicaproxy/io/driver.py

$(STAMP): pyproject.toml setup.py $(COMPILED)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/replicaproxy demo

lint: $(STAMP)
	$(BIN)/ruff check src tests bench setup.py
	$(BIN)/ruff format --check src tests bench setup.py
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

test: lint
	$(BIN)/pytest -q -rs

# The unit and integration tiers on the pure-Python data path, which is what an install
# without a C compiler runs: a copy of the package without its compiled modules goes
# first on PYTHONPATH (the proxies the tests start inherit it).
PURE := build/pure
test-pure: $(STAMP)
	rm -rf $(PURE)
	mkdir -p $(PURE)
	cp -R src/replicaproxy $(PURE)/
	find $(PURE) -name '*.so' -delete
	REPLICAPROXY_PURE=1 PYTHONPATH=$(PURE) $(BIN)/pytest -q -rs tests/unit tests/integration

# Benchmarks: never part of the tests. Need haproxy, redis-server, redis-benchmark; the
# protocol workloads (http, pg, mc) run where their programs are (bench/README.md, Protocols).
bench: $(STAMP)
	$(BIN)/python bench/run.py

bench-quick: $(STAMP)
	$(BIN)/python bench/run.py --quick

clean:
	rm -rf $(VENV) build dist src/*.egg-info .mypy_cache .ruff_cache .pytest_cache
	find src -name '*.so' -delete
