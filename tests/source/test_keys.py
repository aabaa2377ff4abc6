"""Key loading (PEM PKCS#8/PKCS#1/SEC1, JWK, JWKS), alg choice, thumbprints and key pair files."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from test_auth_support import ec_key, pem, rsa_key

from pfsync.core.errors import ConfigError, UsageError
from pfsync.core.redact import redact
from pfsync.source.keys import (
    JWKS_FILE,
    PRIVATE_KEY_FILE,
    algorithm_for,
    generate_key_pair,
    jwk_thumbprint,
    load_signing_key,
    loose_permissions_warning,
    public_jwk,
    warn_if_loose,
    write_key_pair,
)


def _private_jwk(key: Any, kid: str | None) -> dict[str, Any]:
    algo = jwt.algorithms.RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else jwt.algorithms.ECAlgorithm
    jwk: dict[str, Any] = algo.to_jwk(key, as_dict=True)
    if kid:
        jwk["kid"] = kid
    return jwk


@pytest.mark.parametrize(
    ("key", "alg"),
    [
        (rsa_key(), "RS384"),
        (ec_key("P-256"), "ES256"),
        (ec_key("P-384"), "ES384"),
        (ec_key("P-521"), "ES512"),
    ],
)
def test_algorithm_for_follows_the_key_type(key: Any, alg: str) -> None:
    assert algorithm_for(key) == alg
    assert algorithm_for(key.public_key()) == alg


def test_algorithm_for_rejects_short_rsa_and_odd_curves() -> None:
    with pytest.raises(ConfigError, match="1024 bits"):
        algorithm_for(rsa.generate_private_key(public_exponent=65537, key_size=1024))
    with pytest.raises(ConfigError, match="secp256k1"):
        algorithm_for(ec.generate_private_key(ec.SECP256K1()))


@pytest.mark.parametrize(
    ("text_of", "alg"),
    [
        (lambda: pem(rsa_key(), "pkcs8"), "RS384"),
        (lambda: pem(rsa_key(), "pkcs1"), "RS384"),  # -----BEGIN RSA PRIVATE KEY-----
        (lambda: pem(ec_key("P-384"), "pkcs8"), "ES384"),
        (lambda: pem(ec_key("P-384"), "pkcs1"), "ES384"),  # SEC1: -----BEGIN EC PRIVATE KEY-----
    ],
)
def test_load_signing_key_reads_pem_forms(text_of: Any, alg: str) -> None:
    key = load_signing_key(text_of(), key_id="kid-1")
    assert (key.alg, key.kid) == (alg, "kid-1")
    token = jwt.encode({"a": 1}, key.key, algorithm=key.alg)
    assert jwt.decode(token, key.key.public_key(), algorithms=[alg]) == {"a": 1}


def test_load_signing_key_pem_without_kid_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        load_signing_key(pem(ec_key()))
    assert info.value.setting == "source.key_id" and "PF_KEY_ID" in (info.value.hint or "")


@pytest.mark.parametrize(
    ("doc_of", "key_id", "kid"),
    [
        (lambda: _private_jwk(ec_key(), "jwk-kid"), None, "jwk-kid"),
        (lambda: _private_jwk(ec_key(), "jwk-kid"), "setting-kid", None),  # mismatch: no such private key
        (lambda: _private_jwk(ec_key(), None), "setting-kid", "setting-kid"),
        (lambda: {"keys": [public_jwk(rsa_key(), kid="pub"), _private_jwk(rsa_key(), "priv")]}, None, "priv"),
        (lambda: {"keys": [_private_jwk(rsa_key(), "r"), _private_jwk(ec_key(), "e")]}, "e", "e"),
    ],
)
def test_load_signing_key_reads_jwk_and_jwks(doc_of: Any, key_id: str | None, kid: str | None) -> None:
    text = json.dumps(doc_of())
    if kid is None:
        with pytest.raises(ConfigError, match="no private key with kid"):
            load_signing_key(text, key_id=key_id)
        return
    assert load_signing_key(text, key_id=key_id).kid == kid


def test_load_signing_key_jwks_with_two_private_keys_needs_a_kid() -> None:
    text = json.dumps({"keys": [_private_jwk(rsa_key(), "r"), _private_jwk(ec_key(), "e")]})
    with pytest.raises(ConfigError, match="several private keys"):
        load_signing_key(text)


def test_load_signing_key_public_only_jwks_is_refused() -> None:
    with pytest.raises(ConfigError, match="no private key"):
        load_signing_key(json.dumps({"keys": [public_jwk(ec_key(), kid="k")]}), key_id="k")


@pytest.mark.parametrize(
    "text",
    [
        "not a key at all",
        "-----BEGIN PRIVATE KEY-----\nAAAAsecretish-garbage-AAAA\n-----END PRIVATE KEY-----",
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAAsecretish-garbage-AAAA\n-----END ENCRYPTED PRIVATE KEY-----",
        "{not json",
        "[1, 2]",
    ],
)
def test_load_signing_key_bad_text_never_echoes_the_key(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_signing_key(text, key_id="k")
    shown = f"{info.value} {info.value.hint}"
    assert "secretish" not in shown and "not a key at all" not in shown


def test_jwk_thumbprint_matches_rfc7638_example() -> None:
    # RFC 7638 section 3.1: the example RSA key and its thumbprint.
    n = ("0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMs"
         "tn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5"
         "hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw")  # fmt: skip
    public = jwt.algorithms.RSAAlgorithm.from_jwk({"kty": "RSA", "n": n, "e": "AQAB"})
    assert isinstance(public, rsa.RSAPublicKey)
    assert jwk_thumbprint(public) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


@pytest.mark.parametrize(("alg", "kty", "bits"), [("ES384", "EC", 384), ("RS384", "RSA", 3072)])
def test_generate_key_pair_makes_a_registrable_jwks(alg: str, kty: str, bits: int) -> None:
    pair = generate_key_pair(alg)
    (jwk,) = pair.jwks["keys"]
    assert jwk["kty"] == kty and jwk["alg"] == alg and jwk["use"] == "sig" and jwk["key_ops"] == ["verify"]
    assert "d" not in jwk and "p" not in jwk
    assert jwk["kid"] == pair.kid
    signing = load_signing_key(pair.private_pem, key_id=pair.kid)
    assert signing.key.key_size == bits
    assert pair.kid == jwk_thumbprint(signing.key)  # default kid: the RFC 7638 thumbprint
    token = jwt.encode({"x": 1}, signing.key, algorithm=alg, headers={"kid": pair.kid})
    assert jwt.decode(token, jwt.PyJWK(jwk).key, algorithms=[alg]) == {"x": 1}
    assert "PRIVATE" not in repr(pair) and pair.private_pem.splitlines()[1] not in repr(pair)


def test_generate_key_pair_rejects_other_algorithms_and_small_rsa() -> None:
    with pytest.raises(UsageError, match="unsupported algorithm"):
        generate_key_pair("HS256")
    with pytest.raises(UsageError, match="3072"):
        generate_key_pair("RS384", rsa_bits=2048)


def test_generate_key_pair_uses_a_given_kid() -> None:
    assert generate_key_pair("ES384", kid="my-kid").jwks["keys"][0]["kid"] == "my-kid"


def test_write_key_pair_private_file_is_0600_and_never_overwritten(tmp_path: Path) -> None:
    pair = generate_key_pair("ES384")
    private_path, jwks_path = write_key_pair(pair, tmp_path / "keys")
    assert private_path.name == PRIVATE_KEY_FILE and jwks_path.name == JWKS_FILE
    assert stat.S_IMODE(os.stat(private_path).st_mode) == 0o600
    assert private_path.read_text() == pair.private_pem
    assert json.loads(jwks_path.read_text()) == pair.jwks
    before = private_path.read_bytes()
    with pytest.raises(UsageError, match="refusing to overwrite"):
        write_key_pair(generate_key_pair("ES384"), tmp_path / "keys")
    assert private_path.read_bytes() == before


def test_write_key_pair_refuses_when_only_the_jwks_exists(tmp_path: Path) -> None:
    (tmp_path / JWKS_FILE).write_text("{}")
    with pytest.raises(UsageError):
        write_key_pair(generate_key_pair("ES384"), tmp_path)
    assert not (tmp_path / PRIVATE_KEY_FILE).exists()


@pytest.mark.parametrize(
    ("mode", "loose"), [(0o600, False), (0o400, False), (0o640, True), (0o644, True), (0o604, True)]
)
def test_loose_permissions_warning_flags_group_or_other_access(
    tmp_path: Path, mode: int, loose: bool
) -> None:
    path = tmp_path / "key.pem"
    path.write_text("x")
    path.chmod(mode)
    warning = loose_permissions_warning(path)
    assert (warning is not None) == loose
    if warning:
        assert "chmod 600" in warning


def test_loose_permissions_warning_missing_file_is_none(tmp_path: Path) -> None:
    assert loose_permissions_warning(tmp_path / "nope.pem") is None


def test_public_jwk_of_private_and_public_key_agree() -> None:
    key = ec_key()
    assert public_jwk(key, kid="k") == public_jwk(key.public_key(), kid="k")


def test_loading_a_key_keeps_other_pem_bodies_redactable() -> None:
    # Registering a PEM once must not stop redact() from masking the body of a different PEM.
    load_signing_key(pem(ec_key("P-256")), key_id="k")
    other = pem(rsa_key())
    body_line = other.splitlines()[1]
    assert body_line not in redact(f"oops: {other}")
    assert body_line not in redact(
        "-----BEGIN PRIVATE KEY-----\n" + body_line + "\n-----END PRIVATE KEY-----"
    )


def test_warn_if_loose_logs_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_text("x")
    path.chmod(0o644)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign,assignment]
    logger = logging.getLogger("pfsync.keys")
    logger.addHandler(handler)  # directly: the CLI tests may have set propagate=False on "pfsync"
    try:
        assert warn_if_loose(path) is True
        path.chmod(0o600)
        assert warn_if_loose(path) is False
    finally:
        logger.removeHandler(handler)
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert "chmod 600" in records[0].getMessage()
