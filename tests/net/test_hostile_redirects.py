"""Hostile servers over real HTTP on 127.0.0.1: redirects and server-supplied URLs (issue 15).

Each test plays a source or Medplum that tries to move a request somewhere else: a token request
answered with 307/308 to another origin (the form carries the client secret or the signed
assertion), a manifest, status or `next` URL pointing at the cloud metadata address, a proxy from
the environment. A second server stands in for the foreign origin and must receive nothing; pfsync
must end with a documented exit code and a message saying what it refused.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from hostile_server import TOKEN, Answer, Hostile, bulk_source, manifest, run_pfsync, source_env
from target_fixtures import TARGET_CLIENT, TARGET_SECRET

from pfsync.sandbox.source.auth import generate_test_keys
from pfsync.sandbox.target.server import TargetSandbox

pytestmark = pytest.mark.integration

PATIENT = b'{"resourceType":"Patient","id":"p1"}\n'
METADATA = "http://169.254.169.254/latest/meta-data/"  # the address the issue saw requested


@pytest.fixture
def source(hostile: Callable[[], Hostile]) -> Hostile:
    server = hostile()
    bulk_source(server, {"p1": Answer(200, {"Content-Type": "application/fhir+ndjson"}, PATIENT)})
    return server


@pytest.fixture
def foreign(hostile: Callable[[], Hostile]) -> Hostile:
    server = hostile()  # every path answers 404: a test only looks at what it received
    return server


def _export(env: dict[str, str], tmp_path: Path) -> tuple[int, str]:
    run = run_pfsync(env, "export", "--out", str(tmp_path / "out"))
    assert "Traceback" not in run.output, run.output
    return run.code, run.output


def _pem() -> str:
    key, _ = generate_test_keys("RS384", "hostile-kid")
    pem: bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption())  # fmt: skip
    return pem.decode()


@pytest.mark.parametrize("status", [307, 308])
@pytest.mark.parametrize("method", ["private_key_jwt", "client_secret_basic"])
def test_hostile_smart_token_redirect_is_not_followed(
    source: Hostile, foreign: Hostile, tmp_path: Path, status: int, method: str
) -> None:
    source.routes["/token"] = lambda _: Answer.redirect(f"{foreign.url}/token", status)
    env = source_env(source, tmp_path)
    if method == "private_key_jwt":
        del env["PF_CLIENT_SECRET"]
        env |= {"PF_PRIVATE_KEY": _pem(), "PF_KEY_ID": "hostile-kid"}
    code, output = _export(env, tmp_path)
    assert foreign.seen == [], "the token request (with its credentials) reached the foreign origin"
    assert code == 4, output
    assert f"answered {status}, a redirect to {foreign.url}/token" in output
    assert "client_assertion=" not in output and "hostile-client-secret-value" not in output


def test_hostile_medplum_token_redirect_is_not_followed(
    foreign: Hostile, hostile: Callable[[], Hostile], tmp_path: Path
) -> None:
    medplum = hostile()
    medplum.routes["/oauth2/token"] = lambda _: Answer.redirect(f"{foreign.url}/oauth2/token", 307)
    try:
        data = tmp_path / "in.ndjson"
        data.write_bytes(PATIENT)
        env = source_env(medplum, tmp_path)
        for key in ("PF_FHIR_BASE_URL", "PF_CLIENT_ID", "PF_CLIENT_SECRET"):
            del env[key]
        env |= {"MEDPLUM_BASE_URL": f"{medplum.url}/", "MEDPLUM_CLIENT_ID": "mp-client",
                "MEDPLUM_CLIENT_SECRET": "medplum-secret-value"}  # fmt: skip
        run = run_pfsync(env, "load", str(data))
        assert medplum.requests("/oauth2/token"), "the token endpoint was never asked"
    finally:
        medplum.close()
    assert foreign.seen == [], "client_id/client_secret reached the foreign origin"
    assert run.code == 4, run.output
    assert "a redirect to" in run.output and "medplum-secret-value" not in run.output
    assert "Traceback" not in run.output


def _status_elsewhere(source: Hostile, url: str) -> None:
    source.routes["/fhir/Patient/$export"] = lambda _: Answer(202, {"Content-Location": url})


def _file_at(source: Hostile, url: str) -> None:
    source.routes["/status/1"] = lambda seen: Answer.json(manifest(source.url, [("Patient", url)]))


def _file_redirects(source: Hostile, url: str) -> None:
    source.routes["/files/p1"] = lambda _: Answer.redirect(url, 302)


def _next_link(source: Hostile, url: str) -> None:
    page = manifest(
        source.url, [("Patient", f"{source.url}/files/p1")], link=[{"relation": "next", "url": url}]
    )
    source.routes["/status/1"] = lambda seen: Answer(202) if seen.method == "DELETE" else Answer.json(page)


@pytest.mark.parametrize(
    ("plant", "url", "reason"),
    [(_status_elsewhere, METADATA, "plain http"), (_file_at, METADATA, "plain http"),
     (_file_redirects, METADATA, "plain http"),
     # A next link must also stay on the manifest's origin, which it fails first.
     (_next_link, METADATA, "is not on"),
     (_file_at, "https://169.254.169.254/latest/", "special-purpose"),
     (_file_redirects, "https://[::ffff:169.254.169.254]/x", "special-purpose"),
     (_status_elsewhere, "https://[fe80::1]/x", "special-purpose"),
     (_file_at, "file:///etc/passwd", "scheme")],
    ids=["status Content-Location", "manifest output url", "file redirect", "manifest next link",
         "https metadata", "mapped IPv6 metadata", "IPv6 link-local", "file scheme"],
)  # fmt: skip
def test_hostile_server_supplied_url_is_checked_like_a_configured_one(
    source: Hostile, tmp_path: Path, plant: object, url: str, reason: str
) -> None:
    plant(source, url)  # type: ignore[operator]
    code, output = _export(source_env(source, tmp_path), tmp_path)
    assert code == 5, output
    assert "refused" in output and reason in output, output


def test_hostile_manifest_next_link_to_another_origin_is_not_followed(
    source: Hostile, foreign: Hostile, tmp_path: Path
) -> None:
    """A manifest page's `next` link on another origin (here another port of 127.0.0.1, which the
    URL rules allow) would take the source's bearer token there: it is refused, not requested."""
    _next_link(source, f"{foreign.url}/status/2")
    code, output = _export(source_env(source, tmp_path), tmp_path)
    assert foreign.seen == [], "the next manifest page (with the source's token) was requested elsewhere"
    assert code == 5, output
    assert f"the next page {foreign.url}/status/2 refused: it is not on {source.url}" in output, output
    assert TOKEN not in output


def test_hostile_metadata_address_allowed_only_when_configured(source: Hostile, tmp_path: Path) -> None:
    # With the range allowed, the URL passes the rules (the request is sent; what answers, if
    # anything, depends on the machine's network, so only the absence of the refusal is asserted).
    _file_at(source, "http://169.254.0.1:9/x")
    env = source_env(source, tmp_path, PFSYNC_ALLOW_NETWORKS="169.254.0.0/16", PFSYNC_ALLOW_INSECURE_HTTP="true",
                     PFSYNC_HTTP_TIMEOUT="0.5")  # fmt: skip
    code, output = _export(env, tmp_path)
    assert code != 0 and "special-purpose" not in output, output


def test_hostile_redirect_loop_is_a_clear_failure(source: Hostile, tmp_path: Path) -> None:
    source.routes["/files/p1"] = lambda _: Answer.redirect(f"{source.url}/files/p1", 302)
    code, output = _export(source_env(source, tmp_path), tmp_path)
    assert code == 5, output
    assert "redirect" in output


def test_hostile_environment_proxy_and_ca_are_ignored(
    source: Hostile, foreign: Hostile, tmp_path: Path
) -> None:
    env = source_env(source, tmp_path, HTTP_PROXY=foreign.url, HTTPS_PROXY=foreign.url, ALL_PROXY=foreign.url,
                     http_proxy=foreign.url, SSL_CERT_FILE="/nonexistent/ca.pem")  # fmt: skip
    code, output = _export(env, tmp_path)
    assert code == 0, output
    assert foreign.seen == [], "a proxy from the environment received pfsync's requests"


def test_hostile_environment_trusted_only_on_request(source: Hostile, tmp_path: Path) -> None:
    env = source_env(source, tmp_path, PFSYNC_TRUST_ENV="true", SSL_CERT_FILE="/nonexistent/ca.pem")
    code, output = _export(env, tmp_path)
    assert code == 3, output
    assert "SSL_CERT_FILE" in output


def test_hostile_attachment_redirect_off_the_source_origin_is_not_followed(
    source: Hostile, foreign: Hostile, target: TargetSandbox, tmp_path: Path
) -> None:
    # The attachment lives on the source's origin, which answers 302 to another origin: following
    # it would upload the foreign bytes into Medplum as a Binary.
    source.routes["/fhir/Binary/att-1"] = lambda _: Answer.redirect(f"{foreign.url}/evil.pdf", 302)
    doc = {"resourceType": "DocumentReference", "id": "doc-1", "status": "current",
           "content": [{"attachment": {"contentType": "application/pdf", "url": f"{source.url}/fhir/Binary/att-1"}}]}  # fmt: skip
    data = tmp_path / "DocumentReference.ndjson"
    data.write_bytes(orjson.dumps(doc) + b"\n")
    env = source_env(source, tmp_path, PF_RESOURCE_TYPES="DocumentReference,Binary", MEDPLUM_BASE_URL=target.base_url,
                     MEDPLUM_CLIENT_ID=TARGET_CLIENT, MEDPLUM_CLIENT_SECRET=TARGET_SECRET)  # fmt: skip
    run = run_pfsync(env, "load", str(data))
    assert source.requests("/fhir/Binary/att-1"), "the attachment was never asked for"
    assert foreign.seen == [], "the attachment redirect was followed to another origin"
    assert target.resources("Binary") == []
    assert run.code == 6, run.output  # quarantined, with the reason
    quarantine = (tmp_path / "state" / "default" / "quarantine.ndjson").read_text()
    assert "leaves" in quarantine and "doc-1" in quarantine


def test_hostile_medplum_bundle_redirect_is_not_followed(
    foreign: Hostile, hostile: Callable[[], Hostile], tmp_path: Path
) -> None:
    # The Bundle (patient data) and its bearer token must not be re-sent to the Location.
    medplum = hostile()
    medplum.routes["/oauth2/token"] = lambda _: Answer.json(
        {"access_token": "medplum-token-0123456789", "token_type": "Bearer", "expires_in": 3600}
    )
    medplum.routes["/fhir/R4/Patient"] = lambda _: Answer.json(
        {"resourceType": "Bundle", "type": "searchset"}
    )
    medplum.routes["/fhir/R4/"] = lambda _: Answer.redirect(f"{foreign.url}/fhir/R4/", 307)
    try:
        data = tmp_path / "in.ndjson"
        data.write_bytes(PATIENT)
        env = source_env(medplum, tmp_path, MEDPLUM_BASE_URL=f"{medplum.url}/", MEDPLUM_CLIENT_ID="mp-client",
                         MEDPLUM_CLIENT_SECRET="medplum-secret-value")  # fmt: skip
        for key in ("PF_FHIR_BASE_URL", "PF_CLIENT_ID", "PF_CLIENT_SECRET"):
            del env[key]
        run = run_pfsync(env, "load", str(data))
        assert [s.method for s in medplum.requests("/fhir/R4/")] == ["POST"], "no Bundle was sent"
    finally:
        medplum.close()
    assert foreign.seen == [], "the Bundle was re-sent to the redirect's target"
    assert run.code == 5, run.output
    assert "answered 307, a redirect to" in run.output and "not followed" in run.output
    assert "Traceback" not in run.output


def test_proxy_comes_from_pfsync_settings(source: Hostile, tmp_path: Path) -> None:
    # The "source" listens nowhere (port 9); only the configured proxy (answering by path, like the
    # source would) can make the export succeed. Its credentials never show.
    env = source_env(source, tmp_path, PF_FHIR_BASE_URL="http://127.0.0.1:9/fhir",
                     PFSYNC_PROXY=source.url.replace("http://", "http://user:proxy-password-value@"))  # fmt: skip
    code, output = _export(env, tmp_path)
    assert code == 0, output
    assert source.requests("/fhir/.well-known/smart-configuration"), "the proxy was not used"
    assert "proxy-password-value" not in output
