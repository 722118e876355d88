"""The one place the environment is read: every setting is `NOTIFY_<NAME>`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .push_options import (
    DEFAULT_FCM_ENDPOINT,
    DEFAULT_PUSH_ORIGINS,
    Origin,
    check_fcm_credentials,
    check_fcm_endpoint,
    check_vapid_subject,
    load_vapid_key,
    parse_origin,
)
from .signing import check_secret
from .topic_options import TopicOptions
from .webhook_options import WebhookEndpoint

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

    from .redis_url import Topology


class Settings(BaseSettings):
    """Service configuration; defaults are the production defaults."""

    model_config = SettingsConfigDict(env_prefix="NOTIFY_", extra="ignore")

    # Broker: unset means one replica on the in-process broker.
    redis_url: str | None = None
    # Namespace of every Redis key and channel, so several deployments can share one Redis.
    redis_prefix: str = "notify"
    # TLS (rediss URLs): the CA that signed the Redis certificates (default: the system's CAs), and
    # a client certificate for a Redis that asks for one.
    redis_ca_file: str | None = None
    redis_cert_file: str | None = None
    redis_key_file: str | None = None
    # The sentinels' own password; the URL's password is the data nodes'.
    redis_sentinel_password: SecretStr | None = None
    # A publish is answered 202 only once this many replicas confirm they have it (WAIT), within
    # the publish deadline; 503 otherwise. 0: as soon as the primary has it.
    redis_replicas_ack: int = Field(0, ge=0)
    # Pooled connections per replica for everything but publishes and subscriptions (history,
    # inbox, presence). A call finding all of them busy waits for one, within its deadline.
    redis_pool_size: int = Field(64, gt=0)

    # Authentication. At least one key source is required.
    jwt_secret: SecretStr | None = None
    jwt_public_key: str | None = None
    jwks_url: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwks_min_refresh_seconds: float = 5.0

    allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Publish API.
    max_payload_bytes: int = Field(65536, gt=0)
    publish_timeout_seconds: float = Field(1.5, gt=0)
    publish_rate: float | None = Field(None, gt=0)
    batch_max_items: int = Field(500, gt=0)
    max_batch_bytes: int = Field(1024 * 1024, gt=0)
    idempotency_ttl_seconds: int = Field(300, gt=0)

    # History.
    history_size: int = Field(100, gt=0)
    history_ttl_seconds: int = Field(86400, gt=0)

    # Topics: namespace -> options, as JSON (see core/topics.py); a topic outside them does not exist.
    topics: dict[str, TopicOptions] = Field(default_factory=dict)
    max_topics_per_connection: int = Field(64, gt=0)
    # A namespace's join_hook and publish_hook: how long a call may take (then `unavailable`), and
    # the Standard Webhooks secret each call is signed with (required once a namespace names a hook).
    hook_timeout_seconds: float = Field(2.0, gt=0)
    hook_secret: SecretStr | None = None
    # Messages a user may publish as a member, per second across all topics and all of the user's
    # sockets on a replica (`rate_limited` beyond); "off": no limit. It bounds what one user can
    # write into Redis (docs/capacity.md).
    member_publish_rate: float | None = Field(5.0, gt=0)
    # Member lists: each replica reads a topic's list at most once per this many seconds, shared by
    # everyone who asks meanwhile; and each socket may ask this many times a second (a burst of
    # five times that), `rate_limited` beyond.
    presence_cache_seconds: float = Field(1.0, ge=0)
    presence_rate: float = Field(1.0, gt=0)
    # A user's last socket leaving a topic is told to its members after this, unless they are back.
    presence_leave_grace_seconds: float = Field(3.0, ge=0)
    # A replica whose heartbeat stops for this long is taken out of presence by the others.
    presence_dead_after_seconds: float = Field(6.0, gt=0)
    # A topic's joins and leaves (namespaces with join_leave) are told in one `presence` frame per
    # this interval, not one frame each: a room of N members joining costs N frames, not N².
    presence_event_interval_seconds: float = Field(1.0, gt=0)
    # Above this many members a topic's `presence` frames carry the count alone, not who joined and left.
    join_leave_max_members: int = Field(500, ge=0)

    # Sockets.
    ping_interval: float = Field(20.0, gt=0)
    ping_timeout: float = Field(20.0, gt=0)
    max_connections_per_user: int = Field(20, gt=0)
    max_inbound_bytes: int = Field(4096, gt=0)
    max_inbound_rate: float = Field(20.0, gt=0)
    send_queue_frames: int = Field(1000, gt=0)
    send_queue_bytes: int = Field(4 * 1024 * 1024, gt=0)
    sse_heartbeat_seconds: float = Field(15.0, gt=0)

    # Broker liveness: a probe goes round through Redis every interval; no answer within the
    # timeout means the subscription is dead and is rebuilt.
    probe_interval_seconds: float = Field(1.0, gt=0)
    probe_timeout_seconds: float = Field(3.0, gt=0)
    reconnect_max_seconds: float = Field(10.0, gt=0)

    # Direct exposure. A connection gets this long, from opening or from a request's first byte after
    # a response, to send a complete request head (408 when it sent part of one); slow-loris holds
    # nothing longer.
    header_timeout_seconds: float = Field(10.0, gt=0)
    # A connection idle this long after a response is closed (longer or shorter than the header
    # timeout). A proxy's pool must let its idle connections go sooner, or a request it sends on one
    # as the replica closes it is lost (deploy/nginx.conf); behind a balancer that keeps them longer
    # and cannot be told otherwise (AWS ALB: 60 s), raise this above its.
    keep_alive_seconds: float = Field(5.0, gt=0)
    # Open connections beyond which new requests and handshakes get 503; unset: sized from the
    # file-descriptor limit at start-up (`server/admission.py`).
    max_connections: int | None = Field(None, gt=0)
    # Per client address (the peer, or X-Forwarded-For from a FORWARDED_ALLOW_IPS peer); 429 beyond.
    max_connections_per_ip: int | None = Field(None, gt=0)
    # WebSocket and SSE handshakes per second this replica takes on, before any token is verified: a
    # tenth of a second's worth at once, the next held back for their turn (up to a second ahead),
    # beyond that 429 with a jittered Retry-After (`server/admission.py`). Unset or "off": no cap,
    # the default, because in a reconnect storm the limit on handshakes in flight (always on) is what
    # protects open sockets, and a cap only delayed reconnection (docs/reliability.md).
    max_handshake_rate: float | None = Field(None, gt=0)

    # Push (Web Push and FCM): unset keys leave the push API answering 404.
    vapid_private_key: SecretStr | None = None
    vapid_private_key_file: str | None = None
    vapid_subject: str | None = None
    fcm_credentials_file: str | None = None
    fcm_endpoint: str = DEFAULT_FCM_ENDPOINT
    # Where a Web Push endpoint may point: the service calls it, so a user must not name an internal URL.
    push_allowed_origins: Annotated[list[Origin], NoDecode] = Field(
        default_factory=lambda: [parse_origin(o, "default") for o in DEFAULT_PUSH_ORIGINS]
    )
    max_devices_per_user: int = Field(10, gt=0)
    # One request to a push service (or FCM's token endpoint), connecting included: one that does
    # not answer within it is retried later, not waited for. A push job's lease follows from it.
    push_timeout_seconds: float = Field(5.0, gt=0, le=60)
    # Webhooks (`service/webhooks/`): endpoints as JSON, [{"url", "secret", "events"}]; none: no
    # webhooks, and nothing on any path costs more for them.
    webhooks: tuple[WebhookEndpoint, ...] = ()
    # One attempt's deadline; the delays before each retry (after the last failure the event is dead),
    # each jittered by up to 20 %; events pending per endpoint beyond which new ones are dropped.
    webhook_timeout_seconds: float = Field(5.0, gt=0, le=60)
    webhook_retry_seconds: Annotated[tuple[float, ...], NoDecode] = (5, 30, 120, 600, 1800, 3600, 10800, 21600)
    webhook_max_pending: int = Field(100_000, gt=0)
    # Attempts in flight per replica to any one endpoint (of the 64 every endpoint shares): an
    # endpoint that never answers holds at most these, and the others keep the rest.
    webhook_endpoint_concurrency: int = Field(16, gt=0, le=64)

    # Shutdown: sockets are closed with 1012 spread over this many seconds.
    drain_seconds: float = Field(10.0, ge=0)

    # Development only: serves /demo and mints demo tokens from the HS256 secret.
    demo: bool = False

    log_level: str = "info"
    log_json: bool = True
    # summary: a line per failed, slow or non-publish request, and for successful publishes one
    # summary line per period; all: a line per request; off: none (`telemetry/logs.py`). Every mode keeps
    # X-Request-ID on every response. true and false are read as all and off. (Every mode is a
    # non-empty string, hence true: the publish fast path sets X-Request-ID whenever it is.)
    access_log: Literal["summary", "all", "off"] = "summary"
    # In the summary mode, a successful publish slower than this still gets a line of its own.
    access_log_slow_seconds: float = Field(0.1, gt=0)
    access_log_summary_seconds: float = Field(10.0, gt=0)

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip().rstrip("/") for part in value.split(",") if part.strip()]
        return value

    @field_validator("push_allowed_origins", mode="before")
    @classmethod
    def _push_origins(cls, value: object) -> object:
        if isinstance(value, str):
            origins = [parse_origin(part, "NOTIFY_PUSH_ALLOWED_ORIGINS") for part in value.split(",") if part.strip()]
            if not origins:
                raise ValueError("NOTIFY_PUSH_ALLOWED_ORIGINS is empty: no Web Push endpoint could be reached")
            return origins
        return value

    @field_validator("fcm_endpoint")
    @classmethod
    def _fcm_endpoint(cls, value: str) -> str:
        return check_fcm_endpoint(value)

    @field_validator("hook_secret")
    @classmethod
    def _hook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            check_secret(value.get_secret_value(), "NOTIFY_HOOK_SECRET")
        return value

    @model_validator(mode="after")
    def _hooks_need_a_secret(self) -> Settings:
        hooked = next((name for name, options in self.topics.items() if options.hooked), None)
        if hooked is not None and self.hook_secret is None:
            raise ValueError(f"NOTIFY_HOOK_SECRET is required: the namespace {hooked!r} names a hook")
        return self

    @model_validator(mode="after")
    def _check_push(self) -> Settings:
        pem = self.vapid_private_key.get_secret_value() if self.vapid_private_key is not None else None
        key = load_vapid_key(pem, self.vapid_private_key_file)
        check_vapid_subject(self.vapid_subject, key is not None)
        check_fcm_credentials(self.fcm_credentials_file)
        return self

    def vapid_key(self) -> ec.EllipticCurvePrivateKey | None:
        """The VAPID signing key, if one is configured (checked when settings load)."""
        pem = self.vapid_private_key.get_secret_value() if self.vapid_private_key is not None else None
        return load_vapid_key(pem, self.vapid_private_key_file)

    @field_validator("webhook_retry_seconds", mode="before")
    @classmethod
    def _split_delays(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                delays = tuple(float(part) for part in value.split(",") if part.strip())
            except ValueError:
                raise ValueError("must be seconds separated by commas, e.g. 5,30,120") from None
            if any(not 0 <= delay <= 7 * 86400 for delay in delays):
                raise ValueError("each delay must be from 0 to 604800 seconds")
            return delays
        return value

    @field_validator("access_log", mode="before")
    @classmethod
    def _access_log_mode(cls, value: object) -> object:
        if isinstance(value, bool):
            return "all" if value else "off"
        if isinstance(value, str):
            word = value.strip().lower()
            return {"true": "all", "1": "all", "yes": "all", "on": "all", "false": "off", "0": "off", "no": "off"}.get(
                word, word
            )
        return value

    @field_validator("max_handshake_rate", "member_publish_rate", mode="before")
    @classmethod
    def _rate_off(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() in ("off", "none", "0", ""):
            return None
        return value

    @field_validator("redis_prefix")
    @classmethod
    def _no_braces(cls, value: str) -> str:
        # Streams' names are the hash tags of their keys: a brace in the prefix would move them.
        if "{" in value or "}" in value:
            raise ValueError("NOTIFY_REDIS_PREFIX may not contain '{' or '}'")
        return value

    @field_validator("redis_url")
    @classmethod
    def _read_redis_url(cls, value: str | None) -> str | None:
        if value is not None:
            from .redis_url import parse_redis_url

            parse_redis_url(value)  # a malformed URL stops start-up with the line it raises
        return value

    @model_validator(mode="after")
    def _check_redis_options(self) -> Settings:
        from .redis_url import SENTINEL, check_tls_files, parse_redis_url

        topology = parse_redis_url(self.redis_url) if self.redis_url is not None else None
        tls_files = {"CA": self.redis_ca_file, "CERT": self.redis_cert_file, "KEY": self.redis_key_file}
        for name, path in tls_files.items():
            if path is not None and (topology is None or not topology.tls):
                # Refused rather than ignored: whoever set it expects TLS, and would get plain text.
                raise ValueError(f"NOTIFY_REDIS_{name}_FILE is set but NOTIFY_REDIS_URL is not a rediss URL")
        if self.redis_sentinel_password is not None and (topology is None or topology.kind != SENTINEL):
            raise ValueError("NOTIFY_REDIS_SENTINEL_PASSWORD is set but NOTIFY_REDIS_URL is not a sentinel URL")
        if self.redis_replicas_ack and topology is None:
            raise ValueError("NOTIFY_REDIS_REPLICAS_ACK needs NOTIFY_REDIS_URL: the embedded broker has no replicas")
        check_tls_files(self.redis_ca_file, self.redis_cert_file, self.redis_key_file)
        return self

    def redis_topology(self) -> Topology | None:
        """What NOTIFY_REDIS_URL names (None: the embedded broker); checked when settings load."""
        from .redis_url import parse_redis_url

        return None if self.redis_url is None else parse_redis_url(self.redis_url)

    @model_validator(mode="after")
    def _require_a_key(self) -> Settings:
        if not (self.jwt_secret or self.jwt_public_key or self.jwks_url):
            raise ValueError("no JWT key configured: set NOTIFY_JWT_SECRET, NOTIFY_JWT_PUBLIC_KEY or NOTIFY_JWKS_URL")
        if self.jwt_secret is not None and len(self.jwt_secret.get_secret_value()) < 32:
            raise ValueError("NOTIFY_JWT_SECRET is too short: HS256 needs at least 32 characters")
        return self
