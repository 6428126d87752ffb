# pubsock: `make run` starts everything locally, `make test` runs every test. Both install what
# they need: a .venv (pip) and Debian packages (HAProxy, Chromium) through scripts/system-deps.sh.

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run test test-unit test-integration lint format deploy bench soak system-deps clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) is required"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

system-deps:
	@bash scripts/system-deps.sh

run: $(STAMP) system-deps
	$(PY) -m devtools.run

test: $(STAMP) system-deps lint
	node --test tests/js/
	$(PY) -m pytest -q

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

test-integration: $(STAMP) system-deps
	$(PY) -m pytest -q tests/integration

# Style and types: ruff (format and lint) and mypy --strict with pydantic's plugin (pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

deploy:
	bash scripts/deploy.sh

bench: $(STAMP) system-deps
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m bench
	$(PY) -m bench.socketio_bench --clients 500 --messages 1800 --rate 60 --rounds 2

# Random faults together under load for SOAK_S seconds, then a checker (docs/soak.md). The seed
# is printed first; SOAK_SEED=<it> replays a run.
SOAK_S ?= 600
SOAK_SEED ?=
soak: $(STAMP) system-deps
	$(PY) -m devtools.soak --seconds $(SOAK_S) $(if $(SOAK_SEED),--seed $(SOAK_SEED))

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
