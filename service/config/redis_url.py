"""Where Redis is: NOTIFY_REDIS_URL read into a Topology, or refused with one line saying why.

    redis://[[user]:password@]host:port[/db]                         one Redis
    redis+sentinel://[[user]:password@]h1:p1,h2:p2,.../master[/db]   the primary Sentinel names
    redis+cluster://[[user]:password@]h1:p1[,h2:p2,...]              Redis Cluster, from its seeds
    rediss://, rediss+sentinel://, rediss+cluster://                 the same over TLS
    unix://[[user]:password@]/path/to/redis.sock[?db=N]              one Redis on a local socket

The password is the data nodes' (the sentinels' own is NOTIFY_REDIS_SENTINEL_PASSWORD); user and
password are percent-decoded, as in any URL. Ports default to 6379 (26379 for sentinels). Nothing
here connects, and no message repeats the credentials: they end up in start-up errors and logs.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass, field
from urllib.parse import unquote

SINGLE, SENTINEL, CLUSTER = "single", "sentinel", "cluster"

_SCHEMES = {
    "redis": (SINGLE, False),
    "rediss": (SINGLE, True),
    "redis+sentinel": (SENTINEL, False),
    "rediss+sentinel": (SENTINEL, True),
    "redis+cluster": (CLUSTER, False),
    "rediss+cluster": (CLUSTER, True),
    "unix": (SINGLE, False),
}
_DEFAULT_PORT = {SINGLE: 6379, SENTINEL: 26379, CLUSTER: 6379}
_HOST = re.compile(r"[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]")
_NAME = re.compile(r"[A-Za-z0-9._-]+")
_FORMS = {
    SINGLE: "redis://[[user]:password@]host:port/db",
    SENTINEL: "redis+sentinel://[[user]:password@]host:port,host:port,.../master-name[/db]",
    CLUSTER: "redis+cluster://[[user]:password@]host:port[,host:port,...]",
}


class InvalidRedisUrl(ValueError):
    """NOTIFY_REDIS_URL cannot be used; the message is the one line start-up prints."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"NOTIFY_REDIS_URL: {problem}")


@dataclass(frozen=True, slots=True)
class Topology:
    """What NOTIFY_REDIS_URL names. `nodes` are the Redis (one), the sentinels, or the cluster seeds."""

    kind: str
    nodes: tuple[tuple[str, int], ...]
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    db: int = 0
    master_name: str | None = None
    path: str | None = None  # unix socket

    def describe(self) -> str:
        """For logs: where, without credentials."""
        where = self.path or ",".join(f"{host}:{port}" for host, port in self.nodes)
        tls = " over TLS" if self.tls else ""
        if self.kind == SENTINEL:
            return f"primary {self.master_name!r} (db {self.db}) through sentinels {where}{tls}"
        if self.kind == CLUSTER:
            return f"cluster seeded by {where}{tls}"
        return f"{where} db {self.db}{tls}"


def parse_redis_url(url: str) -> Topology:
    """The topology a NOTIFY_REDIS_URL names; InvalidRedisUrl, with one line saying why, otherwise."""
    url = url.strip()
    if not url:
        raise InvalidRedisUrl("empty; unset it for the embedded broker, or give " + _FORMS[SINGLE])
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise InvalidRedisUrl(f"not a URL; expected {_FORMS[SINGLE]} (or a sentinel or cluster form)")
    if scheme.lower() not in _SCHEMES:
        known = ", ".join(f"{s}://" for s in _SCHEMES)
        raise InvalidRedisUrl(f"unknown scheme {_visible(scheme)!r}; expected one of {known}")
    scheme = scheme.lower()
    kind, tls = _SCHEMES[scheme]
    if scheme == "unix":
        return _unix(rest)
    if "?" in rest or "#" in rest:
        raise InvalidRedisUrl("options after '?' or '#' are not read: TLS files and such are NOTIFY_REDIS_* settings")
    netloc, _, path = rest.partition("/")
    if "@" in path:
        # Not a master name or a db: a password with a '/' in it, which would otherwise be read (and shown) as a host.
        raise InvalidRedisUrl("'@' after a '/': write a '/' in the password as %2F")
    userinfo, at, hosts = netloc.rpartition("@")
    username, password = _credentials(userinfo) if at else (None, None)
    nodes = tuple(_node(part, _DEFAULT_PORT[kind]) for part in hosts.split(","))
    base = {"kind": kind, "nodes": nodes, "tls": tls, "username": username, "password": password}
    if kind == SINGLE:
        if len(nodes) > 1:
            raise InvalidRedisUrl(
                f"{scheme}:// takes one host; several hosts mean {scheme}+sentinel:// or {scheme}+cluster://"
            )
        return Topology(**base, db=_db(path, _FORMS[SINGLE]))
    if kind == SENTINEL:
        master, _, db = path.partition("/")
        if not master:
            raise InvalidRedisUrl(f"the sentinel form needs the master's name: {_FORMS[SENTINEL]}")
        if not _NAME.fullmatch(master):
            raise InvalidRedisUrl(f"master name {_visible(master)!r} has characters Sentinel does not use")
        return Topology(**base, master_name=master, db=_db(db, _FORMS[SENTINEL]))
    if path not in ("", "0"):
        raise InvalidRedisUrl(f"Redis Cluster has only database 0 and no master name: {_FORMS[CLUSTER]}")
    return Topology(**base)


def _credentials(userinfo: str) -> tuple[str | None, str | None]:
    user, colon, password = userinfo.partition(":")
    if not colon:
        # A lone word before '@' is ambiguous (user or password?); Redis URLs spell it out.
        raise InvalidRedisUrl("credentials must be written ':password@' or 'user:password@'")
    return unquote(user) or None, unquote(password) or None


def _node(text: str, default_port: int) -> tuple[str, int]:
    if not text:
        raise InvalidRedisUrl("a host is missing (empty host, or a stray ',')")
    host, port = text, str(default_port)
    if text.startswith("["):  # [IPv6]:port
        end = text.find("]")
        host, rest = text[: end + 1], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise InvalidRedisUrl(f"cannot read host {_visible(text)!r}")
            port = rest[1:]
    elif ":" in text:
        host, _, port = text.rpartition(":")
    if not _HOST.fullmatch(host):
        raise InvalidRedisUrl(f"host {_visible(host)!r} is not a host name or an IP address")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidRedisUrl(f"port {_visible(port)!r} of {_visible(host)} is not a port number (1-65535)")
    return host.strip("[]"), int(port)


def _db(text: str, form: str) -> int:
    if text in ("", "/"):
        return 0
    if not text.isdigit():
        raise InvalidRedisUrl(f"database {_visible(text)!r} is not a number: {form}")
    return int(text)


def _unix(rest: str) -> Topology:
    userinfo, at, location = rest.rpartition("@")
    username, password = _credentials(userinfo) if at else (None, None)
    path, _, query = location.partition("?")
    if not path.startswith("/"):
        raise InvalidRedisUrl("unix:// needs an absolute socket path: unix:///path/to/redis.sock[?db=N]")
    db = 0
    if query:
        name, _, value = query.partition("=")
        if name != "db":
            raise InvalidRedisUrl("unix:// reads only the option ?db=N")
        db = _db(value, "unix:///path/to/redis.sock?db=N")
    return Topology(SINGLE, (), username=username, password=password, db=db, path=path)


def _visible(text: str) -> str:
    """Part of the URL for an error line: bounded, and printable."""
    shown = "".join(c if c.isprintable() else "?" for c in text)
    return shown if len(shown) <= 64 else shown[:61] + "..."


def check_tls_files(ca_file: str | None, cert_file: str | None, key_file: str | None) -> None:
    """Refuse, at start, TLS files that every connection would fail on later, one by one."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("NOTIFY_REDIS_CERT_FILE and NOTIFY_REDIS_KEY_FILE go together: set both or neither")
    if ca_file is None and cert_file is None:
        return
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # bare: the system's CAs are not what is checked
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            problem = f"NOTIFY_REDIS_CA_FILE {ca_file!r} is not a readable PEM CA certificate: {_reason(exc)}"
            raise ValueError(problem) from None
    if cert_file is not None:
        try:
            context.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"NOTIFY_REDIS_CERT_FILE {cert_file!r} and NOTIFY_REDIS_KEY_FILE {key_file!r} are not a readable"
                f" PEM certificate and its key: {_reason(exc)}"
            ) from None


def _reason(exc: OSError | ssl.SSLError) -> str:
    return str(getattr(exc, "reason", None) or exc.strerror or exc)
