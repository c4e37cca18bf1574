# The two commands of the README: `make demo` (the main job) and `make test` (every check CI runs).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Older openai majors the instrumentation is tested against, each in a light venv of its own.
OPENAI_COMPAT := 1.66.5 1.109.1 2.8.1

.PHONY: demo test lint test-compat system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

demo: $(STAMP)
	$(BIN)/genai-mlflow demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: system-deps lint test-compat
	$(BIN)/python -m pytest

# Debian's chromium, for the test that reads the MLflow UI in a real browser.
system-deps:
	scripts/install-system-deps

test-compat: $(STAMP)
	@for v in $(OPENAI_COMPAT); do \
	  venv=.venv-openai-$$v; \
	  if [ ! -x $$venv/bin/python ]; then \
	    $(PYTHON) -m venv $$venv && \
	    $$venv/bin/python -m pip install -q "openai==$$v" opentelemetry-sdk opentelemetry-instrumentation \
	      opentelemetry-semantic-conventions wrapt pydantic pytest pytest-asyncio && \
	    $$venv/bin/python -m pip install -q --no-deps -e . || exit 1; \
	  fi; \
	  echo "== openai $$v"; \
	  $$venv/bin/python -m pytest -q -p no:cacheprovider tests/instrumentation || exit 1; \
	done

clean:
	rm -rf $(VENV) .venv-openai-* mlflow.db mlruns
