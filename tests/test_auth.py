"""Token verification: pinned algorithms per key type, required claims, JWKS caching."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import threading
import time
from collections.abc import Iterator

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from service.auth.tokens import TokenVerifier
from service.config.settings import Settings
from service.core.errors import InvalidToken, MissingScope

from .utils import SECRET, token


def settings(**overrides: object) -> Settings:
    values: dict[str, object] = {"jwt_secret": SECRET, **overrides}
    return Settings(**values)  # type: ignore[arg-type]


def pem(public_key: object) -> str:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


async def test_hs256_token_gives_principal():
    """A valid HS256 token yields its sub and scopes (space-separated string)."""
    principal = await TokenVerifier(settings()).verify(token("alice", "notify:publish notify:read"))
    assert principal.user_id == "alice"
    assert principal.scopes == {"notify:publish", "notify:read"}


async def test_scope_as_list():
    """`scope` may also be a JSON list."""
    principal = await TokenVerifier(settings()).verify(token("svc", ["notify:publish"]))
    principal.require("notify:publish")
    with pytest.raises(MissingScope):
        principal.require("notify:read")


@pytest.mark.parametrize(
    "bad, message",
    [
        (None, "missing token"),
        ("", "missing token"),
        ("not-a-jwt", "malformed"),
        (token("alice", ttl=-10), "expired"),
        (token("alice", key="another-secret-that-is-long-enough-0123"), "not accepted"),
        (token(None), "sub"),
        (token(" spaced"), "valid user id"),
        (token("x" * 257), "valid user id"),
    ],
)
async def test_bad_tokens_are_refused_with_a_reason(bad, message):
    """Missing, malformed, expired, wrongly signed tokens and bad subs are refused, saying why."""
    with pytest.raises(InvalidToken, match=message):
        await TokenVerifier(settings()).verify(bad)


async def test_exp_is_required():
    """A token without `exp` never passes."""
    no_exp = jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256")
    with pytest.raises(InvalidToken, match="exp"):
        await TokenVerifier(settings()).verify(no_exp)


async def test_alg_none_never_passes():
    """An unsigned token (alg none) is refused."""
    header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    body = base64.urlsafe_b64encode(json.dumps({"sub": "a", "exp": time.time() + 60}).encode()).rstrip(b"=").decode()
    with pytest.raises(InvalidToken):
        await TokenVerifier(settings()).verify(f"{header}.{body}.")


async def test_hs512_is_not_accepted_for_the_secret():
    """The secret verifies HS256 only: the algorithm is pinned."""
    long_secret = SECRET * 2  # long enough for HS512, so only the algorithm differs
    other = jwt.encode({"sub": "a", "exp": time.time() + 60}, long_secret, algorithm="HS512")
    with pytest.raises(InvalidToken):
        await TokenVerifier(settings(jwt_secret=long_secret)).verify(other)


async def test_rs256_public_key(rsa_key):
    """With a PEM RSA key, RS256 tokens pass."""
    verifier = TokenVerifier(settings(jwt_secret=None, jwt_public_key=pem(rsa_key.public_key())))
    principal = await verifier.verify(token("bob", key=rsa_key, algorithm="RS256"))
    assert principal.user_id == "bob"


async def test_public_key_cannot_be_used_as_hmac_secret(rsa_key):
    """Algorithm confusion: an HS256 token signed with the public PEM is refused."""
    public_pem = pem(rsa_key.public_key())
    verifier = TokenVerifier(settings(jwt_secret=None, jwt_public_key=public_pem))
    header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")
    body = base64.urlsafe_b64encode(json.dumps({"sub": "m", "exp": time.time() + 60}).encode()).rstrip(b"=")
    signature = hmac.new(public_pem.encode(), header + b"." + body, hashlib.sha256).digest()
    forged_token = b".".join([header, body, base64.urlsafe_b64encode(signature).rstrip(b"=")]).decode()
    with pytest.raises(InvalidToken):
        await verifier.verify(forged_token)


async def test_es256_public_key(ec_key):
    """With a PEM P-256 key, ES256 tokens pass and RS256 ones do not."""
    verifier = TokenVerifier(settings(jwt_secret=None, jwt_public_key=pem(ec_key.public_key())))
    assert (await verifier.verify(token("carol", key=ec_key, algorithm="ES256"))).user_id == "carol"


async def test_audience_and_issuer_are_checked():
    """When configured, `aud` and `iss` must match."""
    verifier = TokenVerifier(settings(jwt_audience="notify", jwt_issuer="https://issuer.example"))
    good = token("a", aud="notify", iss="https://issuer.example")
    assert (await verifier.verify(good)).user_id == "a"
    with pytest.raises(InvalidToken, match="audience"):
        await verifier.verify(token("a", aud="other", iss="https://issuer.example"))
    with pytest.raises(InvalidToken, match="issuer"):
        await verifier.verify(token("a", aud="notify", iss="https://evil.example"))


class _Jwks:
    """A local JWKS endpoint that counts its fetches."""

    def __init__(self, keys: list[dict[str, object]]) -> None:
        self.keys = keys
        self.fetches = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                outer.fetches += 1
                body = json.dumps({"keys": outer.keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def jwks(rsa_key) -> Iterator[_Jwks]:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    server = _Jwks([{**jwk, "kid": "k1", "use": "sig"}])
    yield server
    server.server.shutdown()
    server.server.server_close()


async def test_jwks_honours_kid_and_caches(jwks, rsa_key):
    """JWKS keys are picked by `kid` and fetched once for many tokens."""
    verifier = TokenVerifier(settings(jwt_secret=None, jwks_url=jwks.url))
    for n in range(5):
        t = jwt.encode({"sub": f"u{n}", "exp": time.time() + 60}, rsa_key, algorithm="RS256", headers={"kid": "k1"})
        assert (await verifier.verify(t)).user_id == f"u{n}"
    assert jwks.fetches == 1


async def test_unknown_kids_do_not_cause_a_fetch_storm(jwks, rsa_key):
    """Tokens naming unknown kids are refused, and refetching is limited to once per interval."""
    verifier = TokenVerifier(settings(jwt_secret=None, jwks_url=jwks.url, jwks_min_refresh_seconds=60))
    for n in range(20):
        forged = jwt.encode(
            {"sub": "x", "exp": time.time() + 60}, rsa_key, algorithm="RS256", headers={"kid": f"k{n + 2}"}
        )
        with pytest.raises(InvalidToken, match="unknown key"):
            await verifier.verify(forged)
    assert jwks.fetches == 1


async def test_jku_header_is_ignored(jwks, rsa_key):
    """A `jku` header pointing at another key set changes nothing: only the configured URL is used."""
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(
        {"sub": "x", "exp": time.time() + 60},
        attacker,
        algorithm="RS256",
        headers={"kid": "k1", "jku": "http://127.0.0.1:1/evil.json"},
    )
    with pytest.raises(InvalidToken):
        await TokenVerifier(settings(jwt_secret=None, jwks_url=jwks.url)).verify(forged)


async def test_verify_now_answers_without_waiting_unless_a_jwks_key_is_needed(jwks, rsa_key):
    """Secret-signed and already verified tokens are answered at once; a JWKS-signed one only once
    `verify` has fetched its key; a bad one is refused either way."""
    verifier = TokenVerifier(settings(jwks_url=jwks.url))
    assert verifier.verify_now(token("svc", "notify:publish")).scopes == {"notify:publish"}  # type: ignore[union-attr]
    signed = jwt.encode({"sub": "k", "exp": time.time() + 60}, rsa_key, algorithm="RS256", headers={"kid": "k1"})
    assert verifier.verify_now(signed) is None and jwks.fetches == 0
    assert (await verifier.verify(signed)).user_id == "k"
    assert verifier.verify_now(signed).user_id == "k"  # type: ignore[union-attr]
    with pytest.raises(InvalidToken, match="expired"):
        verifier.verify_now(token("svc", "notify:publish", ttl=-5))
    with pytest.raises(InvalidToken, match="malformed"):
        verifier.verify_now("nonsense")
