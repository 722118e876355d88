"""NOTIFY_REDIS_URL: every form it takes, and one clear line for every one it refuses."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.config.redis_url import CLUSTER, SENTINEL, SINGLE, InvalidRedisUrl, Topology, parse_redis_url
from service.config.settings import Settings

from .utils import SECRET, refused_start

GOOD = [
    ("redis://127.0.0.1:6379/0", Topology(SINGLE, (("127.0.0.1", 6379),))),
    ("redis://redis:6380/3", Topology(SINGLE, (("redis", 6380),), db=3)),
    ("redis://cache.internal", Topology(SINGLE, (("cache.internal", 6379),))),
    ("redis://:s3cret@h:1/2", Topology(SINGLE, (("h", 1),), password="s3cret", db=2)),
    ("redis://app:s3cret@h:1/0", Topology(SINGLE, (("h", 1),), username="app", password="s3cret")),
    ("redis://app:p%40ss%2Fw%3Ard@h:1", Topology(SINGLE, (("h", 1),), username="app", password="p@ss/w:rd")),
    ("REDISS://h:6380/1", Topology(SINGLE, (("h", 6380),), tls=True, db=1)),
    ("redis://[::1]:6379/0", Topology(SINGLE, (("::1", 6379),))),
    (
        "redis+sentinel://s1:26379,s2:26380,s3/mymaster",
        Topology(SENTINEL, (("s1", 26379), ("s2", 26380), ("s3", 26379)), master_name="mymaster"),
    ),
    (
        "rediss+sentinel://app:pw@s1:1,s2:2/notify.primary-1/4",
        Topology(
            SENTINEL,
            (("s1", 1), ("s2", 2)),
            tls=True,
            username="app",
            password="pw",
            master_name="notify.primary-1",
            db=4,
        ),
    ),
    ("redis+cluster://n1:7000", Topology(CLUSTER, (("n1", 7000),))),
    (
        "rediss+cluster://:pw@n1:7000,n2:7001,n3/",
        Topology(CLUSTER, (("n1", 7000), ("n2", 7001), ("n3", 6379)), True, None, "pw"),
    ),
    ("unix:///run/redis.sock?db=2", Topology(SINGLE, (), path="/run/redis.sock", db=2)),
]


@pytest.mark.parametrize(("url", "expected"), GOOD, ids=[url for url, _ in GOOD])
def test_good_forms(url, expected):
    assert parse_redis_url(url) == expected


def test_password_is_kept_out_of_repr_and_description():
    topology = parse_redis_url("rediss+sentinel://app:hunter2-secret@s1:1,s2:2/m/1")
    assert "hunter2" not in repr(topology) and "hunter2" not in topology.describe()
    assert topology.describe() == "primary 'm' (db 1) through sentinels s1:1,s2:2 over TLS"


BAD = [
    ("", "empty"),
    ("127.0.0.1:6379", "not a URL"),
    ("http://h:1/0", "unknown scheme 'http'"),
    ("redis-sentinel://h:1/m", "unknown scheme 'redis-sentinel'"),
    ("redis://", "a host is missing"),
    ("redis://h:1,,h2:2/m", "a host is missing"),
    ("redis://a:1,b:2/0", "redis:// takes one host"),
    ("redis://h:0/0", "port '0' of h is not a port number"),
    ("redis://h:65536/0", "port '65536' of h is not a port number"),
    ("redis://h:port/0", "port 'port' of h is not a port number"),
    ("redis://h h:1/0", "host 'h h' is not a host name"),
    ("redis://[::1/0", "cannot read host"),
    ("redis://h:1/zero", "database 'zero' is not a number"),
    ("redis://h:1/0/extra", "database '0/extra' is not a number"),
    ("redis://h:1/0?ssl_cert_reqs=none", "options after '?'"),
    ("redis://user@h:1/0", "credentials must be written"),
    ("redis+sentinel://s1:1,s2:2", "needs the master's name"),
    ("redis+sentinel://s1:1,s2:2/", "needs the master's name"),
    ("redis+sentinel://s1:1/my master", "master name 'my master'"),
    ("redis+sentinel://s1:1/m/one", "database 'one' is not a number"),
    ("redis+cluster://n1:7000/2", "Redis Cluster has only database 0"),
    ("unix://run/redis.sock", "absolute socket path"),
    ("unix:///run/redis.sock?timeout=1", "reads only the option ?db=N"),
]


@pytest.mark.parametrize(("url", "problem"), BAD, ids=[url or "empty" for url, _ in BAD])
def test_bad_forms_are_refused_in_one_line(url, problem):
    with pytest.raises(InvalidRedisUrl) as refused:
        parse_redis_url(url)
    message = str(refused.value)
    assert message.startswith("NOTIFY_REDIS_URL: ") and problem in message, message
    assert "\n" not in message


@pytest.mark.parametrize(
    "url", ["redis://app:hunter2/x@h:1/0", "redis://:hunter2/x@h:1/0", "redis://app:hunter2@h:99999/0"]
)
def test_refusals_never_show_the_password(url):
    with pytest.raises(InvalidRedisUrl) as refused:
        parse_redis_url(url)
    assert "hunter2" not in str(refused.value)


SETTINGS_REFUSED = [
    ({"redis_url": "ftp://h/0"}, "NOTIFY_REDIS_URL: unknown scheme 'ftp'"),
    ({"redis_url": "redis://h:1/0", "redis_ca_file": __file__}, "NOTIFY_REDIS_CA_FILE is set but"),
    ({"redis_url": "rediss://h:1/0", "redis_ca_file": "/nonexistent/ca.pem"}, "is not a readable PEM CA certificate"),
    ({"redis_url": "rediss://h:1/0", "redis_ca_file": __file__}, "is not a readable PEM CA certificate"),
    ({"redis_url": "rediss://h:1/0", "redis_cert_file": __file__}, "go together"),
    ({"redis_url": "redis://h:1/0", "redis_sentinel_password": "x"}, "not a sentinel URL"),
    ({"redis_replicas_ack": 1}, "NOTIFY_REDIS_REPLICAS_ACK needs NOTIFY_REDIS_URL"),
    ({"redis_url": "redis://h:1/0", "redis_replicas_ack": -1}, "greater than or equal to 0"),
]


@pytest.mark.parametrize(("values", "problem"), SETTINGS_REFUSED, ids=[p for _, p in SETTINGS_REFUSED])
def test_settings_refuse_what_cannot_work(values, problem):
    with pytest.raises(ValidationError) as refused:
        Settings(jwt_secret=SECRET, **values)
    assert problem in refused.value.errors()[0]["msg"]


def test_settings_read_the_topology():
    settings = Settings(jwt_secret=SECRET, redis_url="redis+sentinel://:pw@s1:1,s2:2/m/1")
    assert settings.redis_topology() == Topology(SENTINEL, (("s1", 1), ("s2", 2)), password="pw", master_name="m", db=1)
    assert Settings(jwt_secret=SECRET).redis_topology() is None


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"NOTIFY_REDIS_URL": "redis://app:hunter2@h:1,h2:2/0"},
            "notify-service: NOTIFY_REDIS_URL: redis:// takes one host; several hosts mean redis+sentinel:// or "
            "redis+cluster://",
        ),
        (
            {"NOTIFY_REDIS_URL": "redis+cluster://n1:7000/3"},
            "notify-service: NOTIFY_REDIS_URL: Redis Cluster has only database 0 and no master name: "
            "redis+cluster://[[user]:password@]host:port[,host:port,...]",
        ),
        (
            {"NOTIFY_REDIS_URL": "memcached://h:1"},
            "notify-service: NOTIFY_REDIS_URL: unknown scheme 'memcached'; expected one of redis://, rediss://, "
            "redis+sentinel://, rediss+sentinel://, redis+cluster://, rediss+cluster://, unix://",
        ),
        (
            {"NOTIFY_REDIS_URL": "rediss://h:1/0", "NOTIFY_REDIS_CA_FILE": "/nonexistent/ca.pem"},
            "notify-service: NOTIFY_REDIS_CA_FILE '/nonexistent/ca.pem' is not a readable PEM CA certificate: "
            "No such file or directory",
        ),
    ],
    ids=["two-hosts", "cluster", "scheme", "ca-file"],
)
def test_the_service_refuses_to_start(env, line):
    """A real `python -m service` exits non-zero at once with exactly one line saying why."""
    done = refused_start(env)
    assert done.returncode != 0
    assert done.stderr.strip() == line, done.stderr
    assert "hunter2" not in done.stderr + done.stdout
