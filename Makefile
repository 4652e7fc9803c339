# `make repro` and `make test` work on a fresh clone: both run `setup` first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup browser repro test lint ui clean-venv

setup: $(STAMP)

# Re-install only when the pinned dependencies change.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# DVC runs each stage's `python -m stages ...` through a shell: put the venv first on PATH.
repro: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# The browser test drives Debian's Chromium (headless); install it when missing (root, or sudo).
browser:
	@command -v chromium >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

# One test process per core (pytest-xdist), each taking a whole file at a time, so that a file's shared
# fixtures (a trained tiny project, a tracking server) are built once; files start in the order
# tests/conftest.py gives them (longest first), not xdist's (most tests first).
test: setup browser
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest -n auto --dist loadfile --no-loadscope-reorder

# The MLflow UI on this machine only, against the project's tracking database (mlflow.tracking_uri).
UI_PORT ?= 5000
ui: setup
	$(BIN)/mlflow ui --host 127.0.0.1 --port $(UI_PORT) \
		--backend-store-uri "$$($(BIN)/python -m stages tracking-uri)"

lint: setup
	$(BIN)/ruff check llm stages tests benchmarks

clean-venv:
	rm -rf $(VENV)
