"""JWT verification with algorithms pinned per key type; no FastAPI in here."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from ..config.settings import Settings
from ..core.errors import InvalidToken, MissingScope
from ..core.ids import USER_ID_RULE, is_valid_user_id

PUBLISH_SCOPE = "notify:publish"
READ_SCOPE = "notify:read"
ADMIN_SCOPE = "notify:admin"

_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a verified token speaks for."""

    user_id: str
    scopes: frozenset[str]
    expires_at: float
    # Topics the token lets its user join: exact names, or `ns:*` for a whole namespace.
    topics: tuple[str, ...] = ()
    # The one topic a topic token (given in a join frame) is for.
    topic: str | None = None
    # Every verified claim, as a join hook is told them.
    claims: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def require(self, scope: str) -> None:
        if scope not in self.scopes:
            raise MissingScope(f"token lacks the scope {scope!r}")


def _algorithm_for(key: object) -> str:
    """The one algorithm a public key may verify; anything else is refused."""
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        try:
            return _EC_ALGORITHMS[key.curve.name]
        except KeyError:
            raise ValueError(f"unsupported EC curve {key.curve.name}") from None
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "EdDSA"
    raise ValueError(f"unsupported public key type {type(key).__name__}")


class JwksCache:
    """Keys of a JWKS URL by `kid`, fetched off the event loop and at most once per interval."""

    def __init__(self, url: str, min_refresh_seconds: float, max_age_seconds: float = 300.0) -> None:
        self._client = jwt.PyJWKClient(url, cache_jwk_set=False, cache_keys=False, timeout=5)
        self._min_refresh = min_refresh_seconds
        self._max_age = max_age_seconds
        self._keys: dict[str, tuple[object, str]] = {}
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()

    async def key_for(self, kid: str | None) -> tuple[object, str]:
        now = time.monotonic()
        if kid in self._keys and now - self._fetched_at < self._max_age:
            return self._keys[kid]
        async with self._lock:
            # A storm of unknown kids costs one fetch per interval, not one per token.
            if time.monotonic() - self._fetched_at >= self._min_refresh:
                await self._refresh()
        if kid in self._keys:
            return self._keys[kid]
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        raise InvalidToken("token signed with an unknown key")

    async def _refresh(self) -> None:
        self._fetched_at = time.monotonic()
        try:
            jwk_set = await asyncio.to_thread(self._client.get_jwk_set, True)
        except jwt.PyJWKClientError as exc:
            if not self._keys:
                raise InvalidToken("signing keys are unavailable") from exc
            return
        keys: dict[str, tuple[object, str]] = {}
        for jwk in jwk_set.keys:
            if jwk.public_key_use not in (None, "sig"):
                continue
            try:
                keys[jwk.key_id or ""] = (jwk.key, _algorithm_for(jwk.key))
            except ValueError:
                continue
        self._keys = keys


class TokenVerifier:
    """Verifies client and publisher JWTs; caches verified tokens until they expire."""

    _CACHE_SIZE = 4096

    def __init__(self, settings: Settings) -> None:
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._static: list[tuple[object, str]] = []
        if settings.jwt_secret is not None:
            self._static.append((settings.jwt_secret.get_secret_value().encode(), "HS256"))
        if settings.jwt_public_key:
            key = load_pem_public_key(settings.jwt_public_key.encode())
            self._static.append((key, _algorithm_for(key)))
        self._jwks = JwksCache(settings.jwks_url, settings.jwks_min_refresh_seconds) if settings.jwks_url else None
        self._cache: OrderedDict[bytes, Principal] = OrderedDict()

    async def verify(self, token: str | None) -> Principal:
        """The principal of a valid token; InvalidToken otherwise."""
        digest, header, principal = self._lookup(token)
        if principal is not None:
            return principal
        assert token is not None and self._jwks is not None
        candidates = [*self._static, await self._jwks.key_for(header.get("kid"))]
        return self._remember(digest, self._principal(self._decode(token, header, candidates)))

    def verify_now(self, token: str | None) -> Principal | None:
        """`verify` without waiting: the principal, InvalidToken, or None when only a JWKS key
        (which may have to be fetched) can verify the token."""
        return self._lookup(token)[2]

    def _lookup(self, token: str | None) -> tuple[bytes, dict[str, Any], Principal | None]:
        """(digest, header, principal) of a token: from the cache, or verified with the static keys;
        the principal is None when only a JWKS key can verify it."""
        if not token:
            raise InvalidToken("missing token")
        digest = hashlib.sha256(token.encode()).digest()
        cached = self._cache.get(digest)
        if cached is not None and cached.expires_at > time.time():
            self._cache.move_to_end(digest)
            return digest, {}, cached
        header = _header(token)
        if self._jwks is not None and header.get("alg", "").upper() not in ("HS256", "NONE"):
            return digest, header, None
        return digest, header, self._remember(digest, self._principal(self._decode(token, header, self._static)))

    def _remember(self, digest: bytes, principal: Principal) -> Principal:
        self._cache[digest] = principal
        if len(self._cache) > self._CACHE_SIZE:
            self._cache.popitem(last=False)
        return principal

    def _decode(self, token: str, header: dict[str, Any], candidates: list[tuple[object, str]]) -> dict[str, object]:
        for key, algorithm in candidates:
            if header.get("alg") != algorithm:
                continue
            try:
                return jwt.decode(
                    token,
                    key,  # type: ignore[arg-type]
                    algorithms=[algorithm],
                    audience=self._audience,
                    issuer=self._issuer,
                    options={"require": ["exp"], "verify_aud": self._audience is not None},
                )
            except jwt.ExpiredSignatureError:
                raise InvalidToken("token expired") from None
            except jwt.MissingRequiredClaimError as exc:
                raise InvalidToken(f"token lacks the {exc.claim!r} claim") from None
            except (jwt.InvalidAudienceError, jwt.InvalidIssuerError) as exc:
                raise InvalidToken(str(exc).lower()) from None
            except jwt.PyJWTError:
                continue
        raise InvalidToken("token signature or algorithm not accepted")

    @staticmethod
    def _principal(claims: dict[str, object]) -> Principal:
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise InvalidToken("token lacks a 'sub' claim")
        if not is_valid_user_id(sub):
            raise InvalidToken(f"token 'sub' is not a valid user id ({USER_ID_RULE})")
        raw_scope = claims.get("scope", "")
        if isinstance(raw_scope, str):
            scopes = frozenset(raw_scope.split()) or _NO_SCOPES
        elif isinstance(raw_scope, list):
            scopes = frozenset(s for s in raw_scope if isinstance(s, str)) or _NO_SCOPES
        else:
            scopes = _NO_SCOPES
        exp = claims["exp"]
        raw_topics = claims.get("topics")
        topics = tuple(t for t in raw_topics if isinstance(t, str)) if isinstance(raw_topics, list) else ()
        topic = claims.get("topic")
        return Principal(
            sub,
            scopes,
            float(exp) if isinstance(exp, (int, float)) else 0.0,
            topics,
            topic if isinstance(topic, str) else None,
            claims,
        )


# A client's token names no scope: its cached principal shares this one empty set (an empty
# frozenset is 216 bytes, and a replica keeps a principal per token it has seen in use).
_NO_SCOPES: frozenset[str] = frozenset()


def _header(token: str) -> dict[str, Any]:
    try:
        return jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise InvalidToken("malformed token") from None
