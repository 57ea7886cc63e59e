# Keyaos. `make run` sets everything up and serves; `make test` runs the suite.
# Variables: PYTHON (interpreter for the virtualenv), HOST, PORT, WEB_CONCURRENCY (read by
# `manage.py serve`), PYTEST_ARGS (extra pytest arguments), e.g. `make test PYTEST_ARGS="-k admin"`.
# `make bench` takes CONCURRENCY, DURATION, WARMUP, SOAK, SOAK_CONCURRENCY, TTFT_MS, GAP_MS,
# CHUNKS, PROFILE=1 and BENCH_ARGS (see bench/README.md), e.g.
# `make bench CONCURRENCY="1 10 50" DURATION=10` or `make bench SOAK=300`.

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MANAGE := $(BIN)/python manage.py
PYENV_SHIMS := $(or $(PYENV_ROOT),$(HOME)/.pyenv)/shims
PYTEST_ARGS ?=

NO_PYTHON := Keyaos needs Python 3.12 or newer; install it (e.g. pyenv install 3.12) \
	or set PYTHON=/path/to/python3.12

# Prints the first interpreter that is Python >= 3.12: $(PYTHON) alone when given, otherwise
# python3.13, python3.12, python3 from PATH, then from pyenv's shims (which honour .python-version).
define find_python
for candidate in $(if $(PYTHON),$(PYTHON),python3.13 python3.12 python3 \
		$(PYENV_SHIMS)/python3.13 $(PYENV_SHIMS)/python3.12 $(PYENV_SHIMS)/python3); do \
	path=$$(command -v "$$candidate" 2>/dev/null) || continue; \
	"$$path" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null \
		&& { echo "$$path"; break; }; \
done
endef

.PHONY: help run test lint migrate clean install bench

help:
	@echo "make run      set up (.venv, migrations, admin user, static files) and serve on"
	@echo "              HOST:PORT (default 127.0.0.1:8000) with the task cluster; Ctrl-C stops"
	@echo "make test     run the test suite (PYTEST_ARGS=... for extra pytest arguments)"
	@echo "make lint     ruff check and ruff format --check"
	@echo "make migrate  apply database migrations"
	@echo "make bench    benchmark the gateway against a fake upstream (SOAK=300 for a soak;"
	@echo "              PostgreSQL when DATABASE_URL is set); results in bench/results/"
	@echo "make install  create or update .venv from requirements.txt"
	@echo "make clean    remove .venv (never the data in var/)"

run: install
	$(MANAGE) migrate --noinput
	$(MANAGE) ensure_admin
	$(MANAGE) collectstatic --noinput --verbosity 0
	exec $(MANAGE) serve

test: install
	$(BIN)/pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

migrate: install
	$(MANAGE) migrate --noinput

# A profiler for `make bench PROFILE=1` only, not needed to run Keyaos (so not in requirements.txt).
PY_SPY := py-spy==0.4.3

BENCH_OPTIONS = $(if $(CONCURRENCY),--concurrency $(CONCURRENCY)) \
	$(if $(DURATION),--duration $(DURATION)) $(if $(WARMUP),--warmup $(WARMUP)) \
	$(if $(filter-out 0,$(SOAK)),--soak $(SOAK)) \
	$(if $(SOAK_CONCURRENCY),--soak-concurrency $(SOAK_CONCURRENCY)) \
	$(if $(TTFT_MS),--ttft-ms $(TTFT_MS)) $(if $(GAP_MS),--gap-ms $(GAP_MS)) \
	$(if $(CHUNKS),--chunks $(CHUNKS)) $(if $(filter-out 0,$(PROFILE)),--profile) \
	$(BENCH_ARGS)

bench: install
	$(if $(filter-out 0,$(PROFILE)),$(BIN)/python -m pip install \
		--disable-pip-version-check --quiet $(PY_SPY))
	$(BIN)/python -m bench.run $(strip $(BENCH_OPTIONS))

clean:
	rm -rf $(VENV)

install: $(STAMP)

# Reinstalls only when requirements.txt is newer than the stamp.
$(STAMP): requirements.txt | $(BIN)/python
	@$(BIN)/python -c 'import sys; sys.exit(sys.version_info < (3, 12))' \
		|| { echo "$(VENV) uses a Python older than 3.12; run 'make clean', then retry." >&2; exit 1; }
	$(BIN)/python -m pip install --disable-pip-version-check --no-input --quiet -r requirements.txt
	touch $(STAMP)

$(BIN)/python:
	@python="$$($(find_python))"; \
	if [ -z "$$python" ]; then \
		echo "$(if $(PYTHON),PYTHON=$(PYTHON) is not a usable Python 3.12 or newer. )$(NO_PYTHON)" >&2; \
		exit 1; \
	fi; \
	echo "Creating $(VENV) with $$python ($$("$$python" --version))"; \
	"$$python" -m venv $(VENV) || { rm -rf $(VENV); exit 1; }
