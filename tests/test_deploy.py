"""Deployment files: what can be checked without a container engine.

Static checks: every YAML file parses, the Kubernetes objects fit together (kinds, probes, labels,
drain timing), compose and the Dockerfile say what the docs promise, the lock files pin every
package with hashes within pyproject's bounds and are what the Dockerfile and the Makefile install
from, and `nginx -t` accepts deploy/nginx.conf rendered for loopback. Live checks (slow): Debian's
nginx, run with that config in front of two real replicas sharing a real redis-server, carries
sockets, SSE and REST.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import websockets
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from service.config.settings import Settings
from service.server.runner import GRACEFUL_SHUTDOWN_SECONDS

from .utils import (
    ROOT,
    SECRET,
    TIMEOUT,
    RedisServer,
    Replica,
    cluster_env,
    free_port,
    publisher_headers,
    token,
)

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
LOCK = DEPLOY / "requirements.lock"
TEST_LOCK = DEPLOY / "requirements-test.lock"
# The libraries whose internals service/ relies on (subclassed protocols, private attributes): each
# must have an upper bound in pyproject.toml, so that a fresh install never meets an untried release.
INTERNALS = ("uvicorn", "websockets", "httptools", "starlette", "redis")


def _load_cluster_module() -> Any:
    spec = importlib.util.spec_from_file_location("notify_deploy_cluster", DEPLOY / "cluster.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


cluster = _load_cluster_module()


def _nginx() -> str:
    """Debian's nginx; missing means the test set-up is broken, which must fail, not skip."""
    found = cluster.nginx_binary()
    if found is None:
        pytest.fail("nginx is not installed: run `apt-get install -y nginx` (Debian's package; `make install` does it)")
    return str(found)


def _yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _k8s_objects() -> dict[str, dict[str, Any]]:
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in _yaml_docs(path):
            assert doc["kind"] not in objects, f"two {doc['kind']} objects"
            objects[doc["kind"]] = doc
    return objects


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def _duration(value: str | int | float) -> float:
    """'15s', '1m30s' or a number of seconds."""
    if isinstance(value, int | float):
        return float(value)
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", value)
    assert parts and value, f"not a duration: {value!r}"
    return int(parts.group(1) or 0) * 60 + float(parts.group(2) or 0)


# ----------------------------------------------------------------------------------------------------
# Static checks


def test_every_yaml_file_parses():
    files = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert {p.relative_to(DEPLOY).as_posix() for p in files} >= {
        "docker-compose.yml",
        "k8s/deployment.yaml",
        "k8s/service.yaml",
        "k8s/ingress.yaml",
        "k8s/pdb.yaml",
        "k8s/hpa.yaml",
        "k8s/kustomization.yaml",
    }
    for path in files:
        docs = _yaml_docs(path)
        assert docs and all(isinstance(doc, dict) for doc in docs), path


def test_k8s_objects_have_the_expected_kinds_and_fit_together():
    objects = _k8s_objects()
    assert set(objects) == {
        "Deployment",
        "Service",
        "Ingress",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "Kustomization",
    }
    kustomization = objects.pop("Kustomization")
    manifests = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == manifests
    assert {obj["apiVersion"] for obj in objects.values()} == {
        "apps/v1",
        "v1",
        "networking.k8s.io/v1",
        "policy/v1",
        "autoscaling/v2",
    }

    deployment = objects["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    port_names = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert port_names == {"http": 8000}

    service = objects["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"].get("sessionAffinity", "None") == "None", "no sticky sessions"
    [service_port] = service["spec"]["ports"]
    assert service_port["targetPort"] in port_names

    ingress = objects["Ingress"]
    rules = ingress["spec"]["rules"]
    backends = [path["backend"]["service"] for rule in rules for path in rule["http"]["paths"]]
    assert backends and all(
        b["name"] == service["metadata"]["name"]
        and b["port"].get("name", b["port"].get("number")) in (service_port["name"], service_port["port"])
        for b in backends
    )
    annotations = ingress["metadata"]["annotations"]
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 3600
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert not any("affinity" in key for key in annotations), "no sticky sessions"

    pdb = objects["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = objects["HorizontalPodAutoscaler"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"], "a disruption must leave pods serving"


def test_k8s_probes_secret_and_drain_timing():
    deployment = _k8s_objects()["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    # Not /readyz: Redis being down is no reason to restart the pod.
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert pod["securityContext"]["runAsNonRoot"] is True

    env = _env(container)
    secret = env["NOTIFY_JWT_SECRET"]
    assert "value" not in secret and set(secret["valueFrom"]) == {"secretKeyRef"}, "only a Secret reference"
    assert not list(K8S.glob("*secret*")), "no Secret with a value in the repository"

    drain = float(env["NOTIFY_DRAIN_SECONDS"]["value"])
    assert drain > 0
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    pre_stop = float(command[1])
    grace = pod["terminationGracePeriodSeconds"]
    # The kubelet counts the preStop hook inside the grace period; SIGTERM then starts the drain, and
    # uvicorn takes up to GRACEFUL_SHUTDOWN_SECONDS more. One second of margin at least.
    assert grace >= pre_stop + drain + GRACEFUL_SHUTDOWN_SECONDS + 1, (grace, pre_stop, drain)
    assert grace <= pre_stop + drain + GRACEFUL_SHUTDOWN_SECONDS + 10, "not so long that a stuck pod lingers"
    # While preStop sleeps, the pod still answers /readyz 200; it leaves the endpoints because it is
    # terminating. Once the drain starts, /readyz 503 takes it out within period x threshold anyway.
    readiness = container["readinessProbe"]
    assert readiness["periodSeconds"] * readiness["failureThreshold"] <= pre_stop


def test_compose_services_and_drain_timing():
    [compose] = _yaml_docs(DEPLOY / "docker-compose.yml")
    services = compose["services"]
    replicas = sorted(name for name in services if name.startswith("replica"))
    assert replicas == ["replica1", "replica2", "replica3"] and {"redis", "nginx"} <= set(services)
    k8s_env = _env(_k8s_objects()["Deployment"]["spec"]["template"]["spec"]["containers"][0])
    for name in replicas:
        replica = services[name]
        assert replica["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
        env = replica["environment"]
        assert env["NOTIFY_REDIS_URL"] == "redis://redis:6379/0"
        assert env["NOTIFY_JWT_SECRET"].startswith("${NOTIFY_JWT_SECRET:?"), "the caller supplies the secret"
        drain = float(env["NOTIFY_DRAIN_SECONDS"])
        assert drain == float(k8s_env["NOTIFY_DRAIN_SECONDS"]["value"])
        assert _duration(replica["stop_grace_period"]) >= drain + GRACEFUL_SHUTDOWN_SECONDS + 1
        assert replica["depends_on"]["redis"]["condition"] == "service_healthy"
    nginx = services["nginx"]
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    assert set(nginx["depends_on"]) == set(replicas)
    servers = re.findall(r"^\s*server\s+(\S+?)[\s;]", _upstream((DEPLOY / "nginx.conf").read_text()), re.M)
    assert servers == [f"{name}:8000" for name in replicas]


def test_dockerfile():
    text = (DEPLOY / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    instructions = [line for line in joined.splitlines() if line and not line.startswith("#")]
    froms = [line.split()[1] for line in instructions if line.startswith("FROM ")]
    assert froms and all(image == "python:3.11-slim" for image in froms)
    [user] = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert user.split(":")[0] not in ("root", "0")
    [healthcheck] = [line for line in instructions if line.startswith("HEALTHCHECK ")]
    assert "/healthz" in healthcheck and ":8000" in healthcheck
    [cmd] = [line for line in instructions if line.startswith("CMD ")]
    serve = ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]
    assert json.loads(cmd.removeprefix("CMD ")) == serve
    # The build stage copies what building the package needs: pyproject, its readme, the packages.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    copied = {
        src.rstrip("/")
        for line in instructions
        if line.startswith("COPY ") and "--from" not in line
        for src in line.split()[1:-1]
    }
    assert {"pyproject.toml", pyproject["project"]["readme"], "service"} <= copied
    # Files bound from the build context (not from a stage) must be in it as well.
    copied |= {mount["source"] for mount in _context_mounts(instructions)}
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    for src in copied:
        assert f"!{src}" in ignore or f"!{src}/" in ignore, f"{src} is kept out of the build context"


def _context_mounts(instructions: list[str]) -> list[dict[str, str]]:
    """The `RUN --mount=type=bind,...` options that bind a file of the build context."""
    mounts = [
        dict(item.split("=", 1) for item in option.split(","))
        for line in instructions
        if line.startswith("RUN ")
        for option in re.findall(r"--mount=(\S+)", line)
    ]
    return [m for m in mounts if m.get("type") == "bind" and "from" not in m]


def _lock(path: Path) -> dict[str, Version]:
    """A lock file's pins; every entry must be `name==version` with at least one sha256 hash, nothing else."""
    pins: dict[str, Version] = {}
    for line in re.sub(r"\\\n", " ", path.read_text()).splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement, *options = line.split()
        pin = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", requirement)
        assert pin, f"{path.name}: not an exact pin: {line}"
        assert options and all(re.fullmatch(r"--hash=sha256:[0-9a-f]{64}", o) for o in options), (
            f"{path.name}: {requirement} needs its hashes and nothing else: {options}"
        )
        name = canonicalize_name(pin.group(1))
        assert name not in pins, f"{path.name}: {name} twice"
        pins[name] = Version(pin.group(2))
    assert pins, f"{path.name} pins nothing"
    return pins


def test_lock_files_pin_every_package_with_hashes():
    runtime, test = _lock(LOCK), _lock(TEST_LOCK)
    # The test environment runs the service with what the image ships, exactly.
    assert {name: test.get(name) for name in runtime} == runtime
    for path in (LOCK, TEST_LOCK):
        assert path.read_text().startswith("# This file was autogenerated by uv"), f"{path.name}: run `make lock`"


def test_locks_satisfy_pyproject_and_bound_the_internals():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime, test = _lock(LOCK), _lock(TEST_LOCK)
    requirements = {Requirement(spec) for spec in project["dependencies"]}
    test_requirements = {Requirement(spec) for spec in project["optional-dependencies"]["test"]}
    for pins, required in ((runtime, requirements), (test, requirements | test_requirements)):
        for req in required:
            name = canonicalize_name(req.name)
            assert name in pins, f"{name} is required but not locked: run `make lock`"
            assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is not {req}"
    bounded = {canonicalize_name(req.name): req.specifier for req in requirements}
    for name in INTERNALS:
        assert name in bounded, f"{name} must be a direct dependency: service/ relies on its internals"
        upper = [s for s in bounded[name] if s.operator in ("<", "<=", "==", "~=")]
        assert upper, f"{name} needs an upper bound in pyproject.toml: service/ relies on its internals"


def test_dockerfile_installs_from_the_lock():
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    [mount] = [m for m in _context_mounts(instructions) if m["source"] == LOCK.relative_to(ROOT).as_posix()]
    commands = [cmd for line in instructions if line.startswith("RUN ") for cmd in re.split(r"&&|;", line)]
    installs = [cmd[cmd.index("pip install") :].strip() for cmd in commands if "pip install" in cmd]
    assert f"pip install --require-hashes -r {mount['target']}" in installs
    # Anything else pip installs comes without its dependencies: nothing is resolved afresh.
    assert all("--require-hashes" in cmd or "--no-deps" in cmd for cmd in installs), installs
    assert "!deploy/requirements.lock" in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()


def _make_dry_run(*targets: str) -> list[str]:
    """What make would run for the targets, whatever is already installed (-B), without running it."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    command = ["make", "-n", "-B", *targets]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_makefile_installs_from_the_lock():
    lock = TEST_LOCK.relative_to(ROOT).as_posix()
    for target in ("run", "test"):
        commands = _make_dry_run(target)
        installs = [cmd for cmd in commands if "-m pip install" in cmd]
        assert any(cmd.endswith(f"pip install -q --require-hashes -r {lock}") for cmd in installs), installs
        assert any(cmd.endswith("pip install -q --no-deps -e .") for cmd in installs), installs
        assert not [cmd for cmd in commands if "-latest" in cmd], "make test-latest is not part of make " + target
    # The newest releases, past the bounds, get the fast tests in a venv of their own.
    latest = _make_dry_run("test-latest")
    assert any("--upgrade" in cmd and "'uvicorn[standard]'" in cmd and "<" not in cmd for cmd in latest), latest
    assert any(cmd.endswith('-m pytest -q -m "not slow" --durations=10') for cmd in latest), latest
    # A changed lock reinstalls.
    stamp = re.search(r"^\$\(STAMP\):(.*)$", (ROOT / "Makefile").read_text(), re.M)
    assert stamp and "$(TEST_LOCK)" in stamp.group(1).split()


def test_dockerfile_healthcheck_command_runs(single):
    """The HEALTHCHECK's own command, pointed at a live replica, exits 0; pointed at nothing, not 0."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    [line] = [line for line in text.splitlines() if line.startswith("HEALTHCHECK ")]
    argv = json.loads(line[line.index("CMD ") + 4 :])
    assert argv[0] == "python"
    live = [sys.executable, *(arg.replace("127.0.0.1:8000", f"127.0.0.1:{single.port}") for arg in argv[1:])]
    assert subprocess.run(live, capture_output=True, timeout=30).returncode == 0
    dead = [sys.executable, *(arg.replace("127.0.0.1:8000", f"127.0.0.1:{free_port()}") for arg in argv[1:])]
    assert subprocess.run(dead, capture_output=True, timeout=30).returncode != 0


def _upstream(conf: str) -> str:
    match = re.search(r"upstream\s+notify_replicas\s*\{(.*?)\}", conf, re.S)
    assert match is not None, "no upstream notify_replicas"
    return match.group(1)


def _location(conf: str, name: str) -> str:
    match = re.search(r"location\s+=?\s*" + re.escape(name) + r"\s*\{(.*?)\}", conf, re.S)
    assert match is not None, f"no location {name}"
    return match.group(1)


def test_nginx_conf_directives():
    conf = re.sub(r"#.*", "", (DEPLOY / "nginx.conf").read_text())
    assert re.search(r"map\s+\$http_upgrade\s+\$connection_upgrade", conf)
    assert re.search(r"proxy_http_version\s+1\.1;", conf)
    assert re.search(r"proxy_set_header\s+Upgrade\s+\$http_upgrade;", conf)
    assert re.search(r"proxy_set_header\s+Connection\s+\$connection_upgrade;", conf)
    assert re.search(r"proxy_set_header\s+X-Request-ID\s+\$\w+;", conf)
    for sticky in ("ip_hash", "hash ", "sticky"):
        assert sticky not in conf, f"no sticky sessions ({sticky})"
    for variable in ("$request ", "$request_uri", "$args", "$query_string"):
        assert variable not in conf, "the query string carries tokens: keep it out of the access log"
    ws, events = _location(conf, "/ws"), _location(conf, "/events")
    for block in (ws, events):
        assert "proxy_set_header" not in block, "a location's own proxy_set_header would drop the server's"
        timeout = re.search(r"proxy_read_timeout\s+(\d+)s;", block)
        assert timeout and int(timeout.group(1)) >= 3600
    assert re.search(r"proxy_buffering\s+off;", events)


def test_nginx_lets_idle_upstream_connections_go_before_the_replica_does():
    """nginx never retries a POST, so a publish it sends on a pooled connection just as the replica
    closes it for idling is a 502: its pool must close them first."""
    conf = re.sub(r"#.*", "", (DEPLOY / "nginx.conf").read_text())
    idle = re.search(r"keepalive_timeout\s+(\d+)s;", _upstream(conf))
    assert idle is not None, "without it nginx keeps idle upstream connections for 60 s"
    assert int(idle.group(1)) < Settings.model_fields["keep_alive_seconds"].default


def test_render_nginx_conf_for_loopback():
    conf = cluster.render_nginx_conf(["127.0.0.1:1001", "127.0.0.1:1002"], "127.0.0.1:1003")
    assert re.findall(r"^\s*server\s+(\S+)", _upstream(conf), re.M) == ["127.0.0.1:1001", "127.0.0.1:1002"]
    assert re.findall(r"listen\s+([^;]+);", conf) == ["127.0.0.1:1003"]
    assert "server replica" not in conf


def test_nginx_t_accepts_the_config():
    binary = _nginx()
    for count in (2, 3):
        upstreams = [f"127.0.0.1:{free_port()}" for _ in range(count)]
        nginx = cluster.Nginx(upstreams, f"127.0.0.1:{free_port()}", binary)
        try:
            result = nginx.check()
            assert result.returncode == 0, result.stderr
            assert "test is successful" in result.stderr
        finally:
            nginx.stop()


def test_cluster_script_help():
    command = [sys.executable, str(DEPLOY / "cluster.py"), "--help"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "--port" in result.stdout


# ----------------------------------------------------------------------------------------------------
# Live: Debian's nginx in front of two real replicas


class LoadBalanced:
    """Two replicas sharing one Redis, behind nginx run with deploy/nginx.conf."""

    def __init__(self, redis: RedisServer, **env: str) -> None:
        shared = cluster_env(redis, NOTIFY_SSE_HEARTBEAT_SECONDS="0.5", **env)  # one key namespace for both
        self.replicas = [Replica(shared) for _ in range(2)]
        self.port = free_port()
        upstreams = [f"127.0.0.1:{r.port}" for r in self.replicas]
        self.nginx = cluster.Nginx(upstreams, f"127.0.0.1:{self.port}", _nginx())

    def start(self) -> LoadBalanced:
        for replica in self.replicas:
            replica.start()
        self.nginx.start()
        return self

    def stop(self) -> None:
        self.nginx.stop()
        for replica in self.replicas:
            replica.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, tok: str, query: str = "") -> str:
        return f"ws://127.0.0.1:{self.port}/ws?token={tok}" + (f"&{query}" if query else "")

    async def connections(self, http: httpx.AsyncClient) -> list[int]:
        """Open sockets per replica, asked of each replica directly."""
        counts = []
        for replica in self.replicas:
            response = await http.get(replica.url + "/readyz")
            counts.append(response.json().get("connections", 0) if response.status_code == 200 else -1)
        return counts


@pytest.fixture(scope="module")
def lb(redis_server: RedisServer) -> Iterator[LoadBalanced]:
    started = LoadBalanced(redis_server)
    try:
        yield started.start()
    finally:
        started.stop()


async def _recv(ws: Any, within: float = TIMEOUT) -> dict[str, Any]:
    async with asyncio.timeout(within):
        frame: dict[str, Any] = orjson.loads(await ws.recv())
        return frame


async def _next_notification(ws: Any, within: float = TIMEOUT) -> dict[str, Any]:
    async with asyncio.timeout(within):
        while True:
            frame = await _recv(ws, within)
            if frame["type"] == "notification":
                return frame


@pytest.fixture
async def sockets(lb: LoadBalanced) -> AsyncIterator[dict[str, Any]]:
    """Six sockets of six users, opened through nginx."""
    opened: dict[str, Any] = {}
    try:
        for i in range(6):
            user = f"lb-{uuid.uuid4().hex[:8]}-{i}"
            ws = await websockets.connect(lb.ws_url(token(user)), open_timeout=TIMEOUT)
            opened[user] = ws
            welcome = await _recv(ws)
            assert welcome["type"] == "welcome" and welcome["user"] == user
        yield opened
    finally:
        for ws in opened.values():
            await ws.close()


@pytest.mark.slow
async def test_websockets_through_nginx_reach_both_replicas_and_get_notifications(lb, sockets, http):
    counts = await lb.connections(http)
    assert sum(counts) == len(sockets) and all(count > 0 for count in counts), f"per replica: {counts}"

    users = list(sockets)
    # One by one to POST /notify/{user}, the rest in one batch to POST /notify: all through nginx.
    for user in users[:3]:
        response = await http.post(
            f"{lb.url}/notify/{user}", json={"event": "single", "data": {"to": user}}, headers=publisher_headers()
        )
        assert response.status_code == 202, response.text
        frame = await _next_notification(sockets[user])
        assert (frame["event"], frame["data"], frame["id"]) == ("single", {"to": user}, response.json()["id"])
    batch = [{"user": user, "event": "batch", "data": {"to": user}} for user in users[3:]]
    response = await http.post(f"{lb.url}/notify", json=batch, headers=publisher_headers())
    assert response.status_code == 200, response.text
    ids = [item["id"] for item in response.json()["results"]]
    for user, id_ in zip(users[3:], ids, strict=True):
        frame = await _next_notification(sockets[user])
        assert (frame["event"], frame["data"], frame["id"]) == ("batch", {"to": user}, id_)

    body = {"event": "all", "data": 1}
    response = await http.post(f"{lb.url}/broadcast", json=body, headers=publisher_headers())
    assert response.status_code == 202, response.text
    for ws in sockets.values():
        frame = await _next_notification(ws)
        assert (frame["event"], frame.get("broadcast")) == ("all", True)

    # Control frames go both ways through the proxy.
    ws = sockets[users[0]]
    await ws.send(orjson.dumps({"type": "ping"}).decode())
    assert await _recv(ws) == {"type": "pong"}


@pytest.mark.slow
async def test_rest_through_nginx(lb, http):
    # The caller's X-Request-ID reaches the replica, which echoes it; without one, nginx makes one.
    response = await http.get(f"{lb.url}/healthz", headers={"X-Request-ID": "deploy-test-1"})
    assert response.status_code == 200 and response.headers["x-request-id"] == "deploy-test-1"
    response = await http.get(f"{lb.url}/healthz")
    # 32 hex digits: nginx's $request_id (a replica makes 16).
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])

    # Requests go round both replicas (no stickiness).
    seen: set[str] = set()
    for _ in range(40):
        seen.add((await http.get(f"{lb.url}/healthz")).json()["replica"])
        if len(seen) == 2:
            break
    assert len(seen) == 2, seen

    # A body too big for nginx's memory buffer (written to its temp path) and a large answer.
    user = f"lb-big-{uuid.uuid4().hex[:8]}"
    batch = [{"user": user, "event": "big", "data": "x" * 8000} for _ in range(40)]
    response = await http.post(f"{lb.url}/notify", json=batch, headers=publisher_headers())
    assert response.status_code == 200, response.text
    assert [item["status"] for item in response.json()["results"]] == [202] * 40
    inbox = await http.get(f"{lb.url}/users/{user}/notifications", params={"limit": 100}, headers=publisher_headers())
    assert inbox.status_code == 200, inbox.text
    assert len(inbox.json()["notifications"]) == 40 and len(inbox.content) > 300_000
    direct = await http.get(lb.replicas[0].url + "/openapi.json")
    proxied = await http.get(f"{lb.url}/openapi.json")
    assert proxied.status_code == 200 and proxied.content == direct.content

    # The service's own errors pass through untouched.
    response = await http.post(f"{lb.url}/notify/{user}", json={"event": "x"})
    assert response.status_code == 401 and response.json()["error"] == "invalid_token"


@pytest.mark.slow
async def test_sse_through_nginx_is_unbuffered(lb, http):
    user = f"lb-sse-{uuid.uuid4().hex[:8]}"
    async with http.stream("GET", f"{lb.url}/events", params={"token": token(user)}) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert "content-length" not in stream.headers
        lines = stream.aiter_lines()

        async def next_data(want: str | None = None) -> dict[str, Any]:
            while True:
                line = await anext(lines)
                if line.startswith("data: "):
                    frame: dict[str, Any] = orjson.loads(line[6:])
                    if want is None or frame["type"] == want:
                        return frame

        async with asyncio.timeout(TIMEOUT):
            welcome = await next_data()
        assert welcome["type"] == "welcome" and welcome["user"] == user
        # Heartbeats (every 0.5 s here) are a few bytes each: buffering would hold them back.
        started = time.monotonic()
        async with asyncio.timeout(TIMEOUT):
            while (await anext(lines)) != ": heartbeat":
                pass
        assert time.monotonic() - started < 2.0
        response = await http.post(
            f"{lb.url}/notify/{user}", json={"event": "sse", "data": {"n": 1}}, headers=publisher_headers()
        )
        assert response.status_code == 202, response.text
        started = time.monotonic()
        async with asyncio.timeout(TIMEOUT):
            frame = await next_data("notification")
        assert frame["id"] == response.json()["id"] and frame["data"] == {"n": 1}
        assert time.monotonic() - started < 2.0


@pytest.mark.slow
async def test_4401_passes_through_nginx(lb):
    for bad in ("not-a-jwt", token("alice", ttl=-60), token("alice", key="another-secret-" + "y" * 20)):
        ws = await websockets.connect(lb.ws_url(bad), open_timeout=TIMEOUT)
        try:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await _recv(ws)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401, closed.value
        finally:
            await ws.close()


@pytest.mark.slow
async def test_drain_through_nginx_moves_sockets_to_the_other_replica(redis_server, http):
    """SIGTERM one replica: its sockets close with 1012 through nginx, and reconnecting through nginx
    lands on the other replica while the first still runs (nginx retries the draining one's 503)."""
    drain = 1.5
    pair = LoadBalanced(redis_server, NOTIFY_DRAIN_SECONDS=str(drain))
    opened: list[Any] = []
    try:
        pair.start()
        users = [f"lb-drain-{uuid.uuid4().hex[:8]}-{i}" for i in range(4)]
        for user in users:
            ws = await websockets.connect(pair.ws_url(token(user)), open_timeout=TIMEOUT)
            opened.append(ws)
            assert (await _recv(ws))["type"] == "welcome"
        counts = await pair.connections(http)
        assert counts == [2, 2], counts
        doomed, survivor = pair.replicas
        doomed.signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        for _ in range(200):
            if (await http.get(doomed.url + "/readyz")).status_code == 503:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the replica did not start draining")
        # While the doomed replica drains, every new socket through nginx lands on the survivor.
        fresh = []
        for user in users:
            ws = await websockets.connect(pair.ws_url(token(user)), open_timeout=TIMEOUT)
            fresh.append(ws)
            opened.append(ws)
            assert (await _recv(ws))["type"] == "welcome"
        assert doomed.proc is not None and doomed.proc.poll() is None, "still draining"
        assert (await http.get(survivor.url + "/readyz")).json()["connections"] == 2 + len(users)
        # The doomed replica's two sockets are closed with 1012, passed on by nginx; the others stay.
        first = opened[: len(users)]
        waits = [asyncio.ensure_future(ws.wait_closed()) for ws in first]
        deadline = time.monotonic() + drain + TIMEOUT
        while sum(w.done() for w in waits) < 2 and time.monotonic() < deadline:
            left = deadline - time.monotonic()
            await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.sleep(0.2)
        for w in waits:
            w.cancel()
        codes = sorted(ws.close_code for ws in first if ws.close_code is not None)
        assert codes == [1012, 1012], codes
        response = await http.post(
            f"{pair.url}/notify/{users[0]}", json={"event": "after"}, headers=publisher_headers()
        )
        assert response.status_code == 202, response.text
        assert (await _next_notification(fresh[0]))["event"] == "after"
        # uvicorn stops gracefully, then re-raises the SIGTERM it caught: exit status -15 (143 in a shell).
        assert doomed.proc.wait(drain + GRACEFUL_SHUTDOWN_SECONDS + TIMEOUT) in (0, -signal.SIGTERM)
        assert time.monotonic() - stopped_at < drain + GRACEFUL_SHUTDOWN_SECONDS + 1
    finally:
        for ws in opened:
            await ws.close()
        pair.stop()


@pytest.mark.slow
async def test_cluster_script_starts_and_stops_everything(http):
    """`make cluster`: the script serves through nginx, and Ctrl-C (SIGINT) stops all it started."""
    _nginx()
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(DEPLOY / "cluster.py"),
        "--port",
        str(port),
        "--replicas",
        "2",
        "--drain-seconds",
        "0.5",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    output: list[str] = []
    try:
        async with asyncio.timeout(6 * TIMEOUT):
            while "Ctrl-C stops everything." not in output[-1:]:
                line = await proc.stdout.readline()
                assert line, "".join(output)
                output.append(line.decode().strip())
        pids = [int(pid) for pid in re.findall(r"replica\d pid (\d+)", "\n".join(output))]
        assert len(pids) == 2
        publisher = next(line for line in output if "backend (notify:publish" in line).split()[-1]
        alice = next(line for line in output if line.startswith("tokens")).split()[-1]
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws?token={alice}", open_timeout=TIMEOUT) as ws:
            assert (await _recv(ws))["type"] == "welcome"
            response = await http.post(
                f"http://127.0.0.1:{port}/notify/alice",
                json={"event": "hi"},
                headers={"Authorization": f"Bearer {publisher}"},
            )
            assert response.status_code == 202, response.text
            assert (await _next_notification(ws))["event"] == "hi"
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(6 * TIMEOUT):
            rest = await proc.stdout.read()
            assert await proc.wait() == 0, rest.decode()
        for pid in pids:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            raise AssertionError(f"replica {pid} still runs")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_settings_default_drain_matches_the_deployment():
    """The manifests restate the default drain; if the default moves, they must be looked at again."""
    deployment = _k8s_objects()["Deployment"]
    env = _env(deployment["spec"]["template"]["spec"]["containers"][0])
    default = Settings.model_fields["drain_seconds"].default
    assert float(env["NOTIFY_DRAIN_SECONDS"]["value"]) == default


def test_no_secret_values_in_deploy_files():
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert SECRET not in text
            assert not re.search(r"NOTIFY_JWT_SECRET[=:]\s*['\"]?[A-Za-z0-9_\-]{16,}", text), path
