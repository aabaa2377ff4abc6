"""Signing keys for SMART Backend Services: load PEM/JWK/JWKS private keys, pick the alg, make key pairs.

docs/bulk-data.md "Auth": keys come as PEM (PKCS#8, PKCS#1 or SEC1) or JWK/JWKS files; the algorithm follows
the key (RSA -> RS384, P-256/P-384/P-521 -> ES256/ES384/ES512); every assertion carries a `kid`.
docs/practice-fusion.md "Auth (system apps)": the public JWKS is published at the URL registered with the EHR.
Key text never appears in an error message: messages name the problem, not the content.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pfsync.core.errors import ConfigError, UsageError
from pfsync.core.redact import register

log = logging.getLogger("pfsync.keys")

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

# docs/bulk-data.md: RS384 or ES384; ES256/ES512 keys are accepted too, with the curve's own hash.
_CURVE_ALGS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
KEYGEN_ALGS = ("ES384", "RS384")
MIN_RSA_BITS = 2048  # what RFC 7518 3.3 requires for RS*; keygen makes 3072
KEYGEN_RSA_BITS = 3072
PRIVATE_KEY_FILE = "pfsync-private-key.pem"
JWKS_FILE = "pfsync-jwks.json"


@dataclass(frozen=True)
class SigningKey:
    """A private key ready to sign client assertions: the key object, its JWS alg and its kid."""

    key: PrivateKey
    alg: str
    kid: str

    def __repr__(self) -> str:  # never show key material, even by accident
        return f"SigningKey(alg={self.alg!r}, kid={self.kid!r})"


def algorithm_for(key: PrivateKey | PublicKey) -> str:
    """The JWS algorithm for a key: RS384 for RSA, ES256/ES384/ES512 by curve."""
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ConfigError(
                f"the RSA private key has {key.key_size} bits; at least {MIN_RSA_BITS} are required",
                setting="source.private_key",
                hint="make a new key pair with `pfsync auth keygen --alg RS384` (RSA 3072)",
            )
        return "RS384"
    alg = _CURVE_ALGS.get(key.curve.name)
    if alg is None:
        raise ConfigError(
            f"elliptic curve {key.curve.name} is not usable for SMART Backend Services",
            setting="source.private_key",
            hint="use P-384 (ES384), P-256 (ES256), P-521 (ES512) or RSA (RS384)",
        )
    return alg


def load_signing_key(text: str, *, key_id: str | None = None) -> SigningKey:
    """Parse private key text (PEM, a JWK or a JWKS) into a SigningKey.

    The kid is `key_id` when given (it must match the JWK's own kid, if any), else the JWK's kid;
    a PEM without `key_id` is a config error, because the server picks the public key by kid.
    """
    register(text)
    stripped = text.strip()
    if stripped.startswith("{"):
        key, jwk_kid = _load_jwk_text(stripped, key_id)
    elif "-----BEGIN" in stripped:
        key, jwk_kid = _load_pem(stripped), None
    else:
        raise ConfigError(
            "source.private_key is neither PEM text nor a JWK/JWKS (nor a path to a readable file)",
            setting="source.private_key",
            hint="set PF_PRIVATE_KEY to the path of the PEM or JWKS file, or to the PEM text itself",
        )
    kid = key_id or jwk_kid
    if not kid:
        raise ConfigError(
            "no key id (kid) for the private key: the EHR finds the public key by kid",
            setting="source.key_id",
            hint="set PF_KEY_ID to the kid of the registered public key (`pfsync auth keygen` prints it)",
        )
    return SigningKey(key=key, alg=algorithm_for(key), kid=kid)


def _load_pem(text: str) -> PrivateKey:
    if "ENCRYPTED" in text:
        raise ConfigError(
            "the private key PEM is encrypted; pfsync needs an unencrypted key (protect the file instead)",
            setting="source.private_key",
            hint="decrypt it: openssl pkey -in key.pem -out plain.pem, and chmod 600 plain.pem",
        )
    try:
        # load_pem_private_key reads PKCS#8 ("PRIVATE KEY"), PKCS#1 ("RSA PRIVATE KEY") and SEC1 ("EC ...").
        key = serialization.load_pem_private_key(text.encode(), password=None)
    except (ValueError, TypeError, UnicodeError):
        raise ConfigError(
            "source.private_key is not a readable PEM private key",
            setting="source.private_key",
            hint="expected -----BEGIN PRIVATE KEY----- (PKCS#8) or -----BEGIN RSA PRIVATE KEY----- (PKCS#1)",
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ConfigError(
            f"unsupported private key type {type(key).__name__}: use RSA or EC (P-384)",
            setting="source.private_key",
        )
    return key


def _load_jwk_text(text: str, key_id: str | None) -> tuple[PrivateKey, str | None]:
    try:
        doc = json.loads(text)
    except ValueError:
        raise ConfigError(
            "source.private_key looks like JSON but does not parse", setting="source.private_key"
        ) from None
    if not isinstance(doc, dict):
        raise ConfigError(
            "source.private_key JSON must be a JWK or a JWKS object", setting="source.private_key"
        )
    candidates: list[Any] = doc["keys"] if isinstance(doc.get("keys"), list) else [doc]
    private = [k for k in candidates if isinstance(k, dict) and "d" in k]
    if key_id is not None and any(k.get("kid") for k in private):
        private = [k for k in private if k.get("kid") == key_id]
    if not private:
        raise ConfigError(
            "the JWK/JWKS holds no private key" + (f" with kid {key_id!r}" if key_id else ""),
            setting="source.private_key",
            hint="PF_PRIVATE_KEY must be the private key; the public JWKS is what you register with the EHR",
        )
    if len(private) > 1:
        raise ConfigError(
            "the JWKS holds several private keys: choose one with PF_KEY_ID",
            setting="source.key_id",
        )
    jwk = private[0]
    try:
        key = jwt.PyJWK(jwk).key
    except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, KeyError, TypeError):
        raise ConfigError(
            "the private JWK is invalid or of an unsupported type", setting="source.private_key"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ConfigError("the JWK is not an RSA or EC private key", setting="source.private_key")
    kid = jwk.get("kid")
    return key, str(kid) if kid else None


def public_jwk(
    key: PrivateKey | PublicKey, *, kid: str | None = None, alg: str | None = None
) -> dict[str, Any]:
    """The public JWK of a key with `kid`, `alg`, `use: sig` and `key_ops: ["verify"]`."""
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) else key
    if isinstance(public, rsa.RSAPublicKey):
        jwk: dict[str, Any] = jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
    jwk.update(
        {
            "kid": kid or jwk_thumbprint(public),
            "alg": alg or algorithm_for(public),
            "use": "sig",
            "key_ops": ["verify"],
        }
    )
    return jwk


def jwk_thumbprint(key: PrivateKey | PublicKey) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url): the default kid."""
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) else key
    if isinstance(public, rsa.RSAPublicKey):
        full = jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
        members = {"e": full["e"], "kty": "RSA", "n": full["n"]}
    else:
        full = jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
        members = {"crv": full["crv"], "kty": "EC", "x": full["x"], "y": full["y"]}
    # RFC 7638 3.1: required members only, lexicographic order, no whitespace.
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode()


@dataclass(frozen=True)
class KeyPair:
    """A generated key pair: private PEM (PKCS#8) text and the public JWKS to publish."""

    private_pem: str
    jwks: dict[str, Any]
    kid: str
    alg: str

    def __repr__(self) -> str:
        return f"KeyPair(alg={self.alg!r}, kid={self.kid!r})"


def generate_key_pair(
    alg: str = "ES384", *, kid: str | None = None, rsa_bits: int = KEYGEN_RSA_BITS
) -> KeyPair:
    """A fresh key pair for registration with the EHR: P-384 (ES384) or RSA >= 3072 (RS384)."""
    alg = alg.upper()
    key: PrivateKey
    if alg == "ES384":
        key = ec.generate_private_key(ec.SECP384R1())
    elif alg == "RS384":
        if rsa_bits < KEYGEN_RSA_BITS:
            raise UsageError(f"RSA keys must have at least {KEYGEN_RSA_BITS} bits, got {rsa_bits}")
        key = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    else:
        raise UsageError(f"unsupported algorithm {alg!r}: choose one of {', '.join(KEYGEN_ALGS)}")
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    register(pem)
    jwk = public_jwk(key, kid=kid, alg=alg)
    return KeyPair(private_pem=pem, jwks={"keys": [jwk]}, kid=str(jwk["kid"]), alg=alg)


def write_key_pair(pair: KeyPair, out_dir: Path) -> tuple[Path, Path]:
    """Write the private PEM (mode 0600, created exclusively) and the public JWKS into `out_dir`.

    Refuses to overwrite either file (UsageError): replacing a registered key by accident would lock
    the client out of every practice that trusts the old one.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    private_path, jwks_path = out_dir / PRIVATE_KEY_FILE, out_dir / JWKS_FILE
    for path in (private_path, jwks_path):
        if path.exists():
            raise UsageError(
                f"{path} already exists; refusing to overwrite a key file",
                hint="choose another --out directory, or move the old files away first",
            )
    try:
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError(f"{private_path} already exists; refusing to overwrite a key file") from None
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(pair.private_pem)
    os.chmod(private_path, 0o600)  # the umask cannot loosen it, but be explicit
    try:
        fd = os.open(jwks_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise UsageError(f"{jwks_path} already exists; refusing to overwrite a key file") from None
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(pair.jwks, indent=2) + "\n")
    return private_path, jwks_path


def loose_permissions_warning(path: Path) -> str | None:
    """A warning text when a private key file is readable by group or others, else None.

    For the settings layer to call when PF_PRIVATE_KEY names a file (it reads the file itself).
    """
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return (
            f"private key file {path} is accessible by group or others (mode {stat.S_IMODE(mode):o}); "
            f"run: chmod 600 {path}"
        )
    return None


def warn_if_loose(path: Path) -> bool:
    """Log a warning when a private key file is group/other accessible; True when it warned."""
    warning = loose_permissions_warning(path)
    if warning:
        log.warning(warning)
    return warning is not None
