# The two commands of the README: `make demo` and `make test`. Both do their own set-up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The demo's data: `shop` (generated, synthetic, ships with the project); `homedepot` or a path: real data.
DATA   ?= shop

# `make test` runs its own stack on other ports, so a running demo stack is left alone.
TEST_ENV := WORKER_CACHE_DIR=.cache/test WORKER_KAFKA_BOOTSTRAP=127.0.0.1:29092 \
            WORKER_REDIS_URL=redis://127.0.0.1:26379/0

.PHONY: demo test lint typecheck pytest stack-up stack-down system-deps install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[tools,dev]'
	touch $(STAMP)

install: $(STAMP)

# Debian packages the stack needs: installed when running as root, else the exact command is printed.
system-deps:
	@bash deploy/system-deps.sh

demo: install system-deps
	$(BIN)/python -m worker stack up
	$(BIN)/python -m worker demo --data "$(DATA)"

test: install system-deps
	$(TEST_ENV) $(BIN)/python -m worker stack up
	@status=0; \
	$(BIN)/ruff check worker tests || status=1; \
	$(BIN)/mypy --strict worker || status=1; \
	$(TEST_ENV) $(BIN)/python -m pytest -q || status=1; \
	$(TEST_ENV) $(BIN)/python -m worker stack down; \
	exit $$status

lint: install
	$(BIN)/ruff check worker tests

typecheck: install
	$(BIN)/mypy --strict worker

stack-up: install system-deps
	$(BIN)/python -m worker stack up

stack-down: install
	$(BIN)/python -m worker stack down

clean:
	rm -rf .cache .mypy_cache .ruff_cache .pytest_cache

# A worker under a steady load for SOAK_MINUTES (lag, memory, no event lost); not part of `make test`.
SOAK_MINUTES ?= 10
SOAK_RATE    ?= 50
.PHONY: soak
soak: install system-deps
	$(BIN)/python -m worker stack up
	$(BIN)/python -m worker soak --minutes $(SOAK_MINUTES) --rate $(SOAK_RATE)
