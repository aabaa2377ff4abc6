"""SMART Backend Services token endpoint of the source sandbox: client assertions, Basic auth, scopes, tokens.

Practice Fusion's rules are the default (docs/practice-fusion.md: "Auth (system apps)"): `typ: JWT` and `kid`
required, `aud` = `{Base}/token`, `exp` at most 300 s ahead, unique `jti`, `token_type: "Bearer"`. Error
shapes follow the reference server (docs/bulk-data.md, recorded cases 05-15).
"""

from __future__ import annotations

import base64
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote_plus

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pfsync.sandbox.httpbase import Request, Response, json_response

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
SIGNING_ALGS = ["RS384", "ES384", "RS256", "ES256", "ES512", "RS512"]
# docs/practice-fusion.md "Scopes": the 22 types a system app can be granted.
PF_SCOPE_TYPES = [
    "AllergyIntolerance",
    "CarePlan",
    "CareTeam",
    "Condition",
    "Coverage",
    "Device",
    "DiagnosticReport",
    "DocumentReference",
    "Encounter",
    "Goal",
    "Immunization",
    "MedicationDispense",
    "MedicationRequest",
    "Observation",
    "Organization",
    "Patient",
    "Practitioner",
    "Procedure",
    "Provenance",
    "RelatedPerson",
    "ServiceRequest",
    "Specimen",
]


class TokenError(Exception):
    """An OAuth error answer: status, `error` code and description (RFC 6749 section 5.2)."""

    def __init__(self, code: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.code, self.description, self.status = code, description, status

    def response(self) -> Response:
        body = {"error": self.code, "error_description": self.description}
        return json_response(self.status, body, headers={"Cache-Control": "no-store"})


@dataclass
class Client:
    client_id: str
    secret: str | None
    jwks: dict[str, Any] | None
    allowed_scopes: list[str] | None  # None: every system read scope


@dataclass
class Token:
    client_id: str
    practice: str
    types: frozenset[str]  # readable types; "*" = all
    expires_at: float


@dataclass
class AuthConfig:
    """Knobs, all mutable at runtime (the fixture resets them)."""

    token_lifetime: int = 300
    max_assertion_lifetime: int = (
        # PF: exp at most 300 s ahead (the reference server takes 600, docs/bulk-data.md, recorded case 07)
        300
    )
    # PF: jti unique (the reference server does not track it, docs/bulk-data.md, recorded case 08)
    track_jti: bool = True
    smart_v2: bool = True
    leeway: int = 5


@dataclass
class Auth:
    """Clients (per practice), issued tokens and seen jtis."""

    config: AuthConfig
    known_types: set[str]
    clients: dict[tuple[str, str], Client] = field(default_factory=dict)
    tokens: dict[str, Token] = field(default_factory=dict)
    jtis: dict[tuple[str, str], float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def register(self, practice: str, client: Client) -> None:
        with self.lock:
            self.clients[(practice, client.client_id)] = client

    def revoke_all(self) -> None:
        with self.lock:
            self.tokens.clear()

    # ---- token endpoint ------------------------------------------------------------------------
    def token_endpoint(self, req: Request, practice: str, token_url: str) -> Response:
        try:
            return self._issue(req, practice, token_url)
        except TokenError as err:
            return err.response()

    def _issue(self, req: Request, practice: str, token_url: str) -> Response:
        if not req.header("content-type").startswith("application/x-www-form-urlencoded"):
            # docs/bulk-data.md, recorded case 15: a JSON body is refused
            raise TokenError(
                "invalid_request",
                "Invalid request content-type header (must be 'application/x-www-form-urlencoded')",
            )
        form = {k: v[0] for k, v in parse_qs(req.body.decode(), keep_blank_values=True).items()}
        if form.get("grant_type") != "client_credentials":
            raise TokenError(
                "unsupported_grant_type", "The grant_type parameter should equal 'client_credentials'"
            )
        if req.header("authorization").lower().startswith("basic "):
            client = self._basic_client(req, practice)
        else:
            client = self._assertion_client(form, practice, token_url)
        types, granted = self._grant(client, form.get("scope", ""))
        access = secrets.token_urlsafe(32)
        lifetime = self.config.token_lifetime
        with self.lock:
            self.tokens[access] = Token(client.client_id, practice, types, time.time() + lifetime)
        body = {"access_token": access, "token_type": "Bearer", "expires_in": lifetime, "scope": granted}
        return json_response(200, body, headers={"Cache-Control": "no-store"})

    def _basic_client(self, req: Request, practice: str) -> Client:
        try:
            raw = base64.b64decode(req.header("authorization")[6:].strip()).decode()
            cid, _, secret = raw.partition(":")
        except ValueError:
            raise TokenError("invalid_client", "Malformed Basic authorization header", 401) from None
        client = self.clients.get((practice, unquote_plus(cid)))
        if (
            client is None
            or client.secret is None
            or not secrets.compare_digest(client.secret, unquote_plus(secret))
        ):
            raise TokenError("invalid_client", "Client authentication failed", 401)
        return client

    def _assertion_client(self, form: dict[str, str], practice: str, token_url: str) -> Client:
        """The client a `private_key_jwt` assertion authenticates, checked as the reference server
        checks it, in its order: the form and header, the client, the signature, then the claims."""
        assertion, header, claims = _parsed_assertion(form)
        client = self.clients.get((practice, str(claims.get("iss", ""))))
        if client is None or not client.jwks:
            raise TokenError("invalid_client", "Unknown client (iss) or no JWKS registered", 401)
        if claims.get("sub") != client.client_id:
            raise TokenError("invalid_grant", "Invalid token 'sub' value. Must equal 'iss'.")
        _verify_signature(assertion, header, client)
        self._check_claims(client, claims, token_url)
        return client

    def _check_claims(self, client: Client, claims: dict[str, Any], token_url: str) -> None:
        """aud (scheme ignored), exp (not too far ahead) and jti (present; unique when tracked)."""
        auds = claims.get("aud")
        aud_list = auds if isinstance(auds, list) else [auds]
        # docs/bulk-data.md, recorded case 06: the scheme is stripped before comparing
        if not any(
            isinstance(a, str) and a.split("://", 1)[-1] == token_url.split("://", 1)[-1] for a in aud_list
        ):
            raise TokenError(
                "invalid_grant", f"Invalid token 'aud' value. Must be '{token_url}'."
            )  # docs/bulk-data.md, recorded case 05
        exp = float(claims["exp"])
        if exp > time.time() + self.config.max_assertion_lifetime + self.config.leeway:
            # docs/practice-fusion.md: exp at most 300 s ahead (stricter than docs/bulk-data.md, recorded case 07)
            raise TokenError(
                "invalid_grant",
                f"Invalid token 'exp' value: at most {self.config.max_assertion_lifetime} s ahead.",
            )
        jti = claims.get("jti")
        if not jti:
            raise TokenError("invalid_grant", "Invalid 'jti' value")
        if (
            self.config.track_jti
            # docs/practice-fusion.md: jti unique (docs/bulk-data.md, recorded case 08 shows the reference does not)
        ):
            now = time.time()
            with self.lock:
                self.jtis = {k: v for k, v in self.jtis.items() if v > now - 60}
                if (client.client_id, str(jti)) in self.jtis:
                    raise TokenError("invalid_grant", "Invalid 'jti' value: already used")
                self.jtis[(client.client_id, str(jti))] = exp

    def _grant(self, client: Client, scope: str) -> tuple[frozenset[str], str]:
        """Check requested scopes (docs/bulk-data.md, recorded case 14) and narrow them to what the client may have."""
        requested = scope.split()
        if not requested:
            raise TokenError("invalid_scope", "Empty scope")
        allowed = client.allowed_scopes
        allowed_types = (
            None if allowed is None else {parse_scope(s, self.known_types, True)[0] for s in allowed}
        )
        types: set[str] = set()
        granted: list[str] = []
        for item in requested:
            rtype, version = parse_scope(item, self.known_types, self.config.smart_v2)
            suffix = ".rs" if version == 2 else ".read"
            if allowed_types is None or "*" in allowed_types or rtype in allowed_types:
                types.add(rtype)
                granted.append(item)
            elif rtype == "*":  # the admin authorised only some types: grant those (docs/practice-fusion.md)
                types |= allowed_types
                granted += [f"system/{t}{suffix}" for t in sorted(allowed_types)]
        if not granted:
            raise TokenError("invalid_scope", f"None of the requested scopes is authorised: {scope}")
        return frozenset(types), " ".join(dict.fromkeys(granted))

    # ---- bearer check --------------------------------------------------------------------------
    def check(self, req: Request, practice: str) -> Token | str:
        """The live token of a request, or the 401 diagnostics (docs/bulk-data.md, recorded cases 20, 80)."""
        value = req.header("authorization")
        if not value.lower().startswith("bearer "):
            return "Authentication is required"
        token = self.tokens.get(value[7:].strip())
        if token is None or token.practice != practice:
            return "Invalid token"
        if token.expires_at <= time.time():
            return "Invalid token: expired"
        return token


def parse_scope(scope: str, known_types: set[str], v2: bool) -> tuple[str, int]:
    """(type or "*", SMART version) of a system read scope; raises TokenError for anything else."""
    context, _, rest = scope.partition("/")
    rtype, _, perm = rest.partition(".")
    if context != "system":
        raise TokenError(
            "invalid_scope",
            f'Only system-level scopes are allowed for bulk data export (bad scope: "{scope}")',
        )
    if rtype != "*" and rtype not in known_types:
        raise TokenError(
            "invalid_scope",
            f'Resources of type "{rtype}" do not exist on this server (requested by scope "{scope}")',
        )
    if perm in ("read", "*"):
        return rtype, 1
    if v2 and perm and set(perm) <= set("cruds") and "r" in perm:
        return rtype, 2
    raise TokenError("invalid_scope", f'Unsupported scope "{scope}"')


def generate_test_keys(alg: str = "RS384", kid: str | None = None) -> tuple[Any, dict[str, Any]]:
    """A fresh private key and its public JWKS (for tests and the demo). alg: RS384/RS256/ES256/ES384/ES512."""
    kid = kid or secrets.token_hex(8)
    private: Any
    if alg.startswith("ES"):
        curve = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1(), "ES512": ec.SECP521R1()}[alg]
        private = ec.generate_private_key(curve)
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    else:
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    jwk.update({"kid": kid, "alg": alg, "use": "sig"})
    return private, {"keys": [jwk]}


def _parsed_assertion(form: dict[str, str]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The assertion of a token form, its header and its (not yet verified) claims; TokenError for a
    missing or wrong assertion type, an undecodable JWT, or a header without typ JWT, kid or a known alg."""
    if "client_assertion_type" not in form:
        # docs/bulk-data.md, recorded case 11
        raise TokenError("invalid_request", "Missing client_assertion_type parameter")
    if form["client_assertion_type"] != JWT_BEARER:
        raise TokenError(
            "invalid_request", f"Invalid client_assertion_type parameter. Must be '{JWT_BEARER}'."
        )
    assertion = form.get("client_assertion", "")
    try:
        header = jwt.get_unverified_header(assertion)
        claims = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise TokenError("invalid_request", f"Invalid registration token: {exc}") from None
    if "typ" not in header:  # docs/bulk-data.md, recorded case 13
        raise TokenError(
            "invalid_request",
            "Invalid registration token: Invalid JWT token header. Missing 'typ' property.",
        )
    if header["typ"] != "JWT":
        raise TokenError("invalid_request", "Invalid registration token: the 'typ' header must be 'JWT'.")
    if not header.get("kid"):  # docs/practice-fusion.md: kid required
        raise TokenError("invalid_request", "Invalid registration token: Missing 'kid' header.")
    alg = header.get("alg")
    if alg not in SIGNING_ALGS:
        raise TokenError("invalid_grant", f"Unsupported signing algorithm {alg!r}")
    return assertion, header, claims


def _verify_signature(assertion: str, header: dict[str, Any], client: Client) -> None:
    """The assertion's signature against the client's registered key of the header's kid."""
    alg = str(header["alg"])  # one of SIGNING_ALGS (_parsed_assertion)
    keys = [k for k in (client.jwks or {}).get("keys", []) if k.get("kid") == header["kid"]]
    if not keys:  # docs/bulk-data.md, recorded case 09
        raise TokenError(
            "invalid_grant", f'No public keys found in the JWKS with "kid" equal to "{header["kid"]}"'
        )
    try:
        key = jwt.PyJWK(keys[0]).key
        jwt.decode(assertion, key=key, algorithms=[alg], options={"verify_aud": False, "require": ["exp"]})
    except jwt.ExpiredSignatureError:  # docs/bulk-data.md, recorded case 12
        raise TokenError(
            "invalid_grant",
            "Unable to verify the token with any of the public keys found in the JWKS: jwt expired",
        ) from None
    # docs/bulk-data.md, recorded case 10; an RS384 JWT vs an EC key
    except (jwt.PyJWTError, TypeError, ValueError) as exc:
        raise TokenError(
            "invalid_grant",
            f"Unable to verify the token with any of the public keys found in the JWKS: invalid signature ({exc})",
        ) from None
