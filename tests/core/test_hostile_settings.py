"""Hostile settings: plain http off loopback, TLS verification, tokens to foreign origins, key files.

Each case is what a careless or malicious configuration would try; pfsync must refuse it loudly
(ConfigError, exit code 3) or, for verification, offer no way to do it at all.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from server_fixtures import starts_servers

from pfsync.core.errors import ConfigError, ExitCode
from pfsync.core.settings import SPECS, HttpSettings, check_transport_url, is_loopback, load_settings
from pfsync.net.http import make_client

LOOPBACK_SOURCE = "http://127.0.0.1:9/fhir"

# ------------------------------------------------------------------------------------------------
# Plain http to a non-loopback host


REFUSED_URLS = [
    "http://ehr.example.com/fhir/r4/v1/abc",
    "HTTP://ehr.example.com/fhir",  # scheme case does not matter
    "http://10.0.0.5/fhir",  # private is not loopback
    "http://0.0.0.0:8080/fhir",
    "http://127.0.0.1.evil.example/fhir",  # looks like loopback, is not
    "http://localhost.evil.example/fhir",
    "http://user@127.0.0.1@evil.example/fhir",  # userinfo trick: the host is evil.example
    "http://2130706433/fhir",  # 127.0.0.1 as an integer: not recognised, so refused (safe side)
    "http://[::ffff:7f00:1]/fhir",
]
ALLOWED_LOOPBACK = [
    "http://127.0.0.1:8080/fhir",
    "http://127.8.9.10/fhir",
    "http://localhost:1/fhir",
    "http://[::1]:8080/fhir",
    "https://ehr.example.com/fhir",
]


@pytest.mark.parametrize("url", REFUSED_URLS)
@pytest.mark.parametrize(
    ("env_name", "extra"),
    [
        ("PF_FHIR_BASE_URL", {}),
        ("MEDPLUM_BASE_URL", {"PF_FHIR_BASE_URL": LOOPBACK_SOURCE}),
        ("PFSYNC_TOKEN_URL", {"PF_FHIR_BASE_URL": LOOPBACK_SOURCE}),
    ],
)
def test_settings_plain_http_off_loopback_is_refused(url: str, env_name: str, extra: dict[str, str]) -> None:
    env = {"MEDPLUM_BASE_URL": "http://127.0.0.1:9/", **extra, env_name: url}
    with pytest.raises(ConfigError) as err:
        load_settings(env=env, cwd=Path("/nonexistent"))
    assert err.value.exit_code == ExitCode.CONFIG and ExitCode.CONFIG.value == 3
    assert "plain http" in err.value.message
    assert "PFSYNC_ALLOW_INSECURE_HTTP" in (err.value.hint or "")


@pytest.mark.parametrize("url", REFUSED_URLS[:3])
def test_settings_plain_http_allowed_only_with_explicit_flag(url: str) -> None:
    env = {"PF_FHIR_BASE_URL": url, "MEDPLUM_BASE_URL": url, "PFSYNC_ALLOW_INSECURE_HTTP": "true"}
    settings = load_settings(env=env, cwd=Path("/nonexistent"))
    assert settings.http.allow_insecure_http is True


@pytest.mark.parametrize("url", ALLOWED_LOOPBACK)
def test_settings_loopback_or_https_needs_no_flag(url: str) -> None:
    settings = load_settings(env={"PF_FHIR_BASE_URL": url, "MEDPLUM_BASE_URL": url}, cwd=Path("/nonexistent"))
    assert settings.http.allow_insecure_http is False
    check_transport_url(url, "x", False)


@pytest.mark.parametrize("url", REFUSED_URLS)
def test_is_loopback_refuses_lookalikes(url: str) -> None:
    assert not is_loopback(url)


@pytest.mark.parametrize("value", ["ftp://ehr.example.com/fhir", "file:///etc/passwd", "ehr.example.com/fhir",
                                   "javascript:alert(1)", "http://"])  # fmt: skip
def test_settings_non_http_urls_are_refused(value: str) -> None:
    with pytest.raises(ConfigError):
        load_settings(env={"PF_FHIR_BASE_URL": value}, cwd=Path("/nonexistent"))


def test_settings_plain_http_in_config_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "pfsync.toml"
    config.write_text(
        '[[sources]]\nname = "a"\nbase_url = "https://ok.example/fhir"\n'
        '[[sources]]\nname = "b"\nbase_url = "http://ehr.example.com/fhir"\n'
        '[medplum]\nbase_url = "https://api.medplum.com/"\n'
    )
    with pytest.raises(ConfigError) as err:
        load_settings(env={}, config_path=config)
    assert "'b'" in err.value.message


def test_settings_download_allowlist_with_plain_http_is_refused() -> None:
    # The allowlist names origins that RECEIVE THE BEARER TOKEN: plain http there would send it in
    # clear over the network, so it must meet the same rule as the base URL.
    env = {
        "PF_FHIR_BASE_URL": "https://ehr.example.com/fhir",
        "MEDPLUM_BASE_URL": "https://api.medplum.com/",
        "PFSYNC_DOWNLOAD_ALLOWLIST": "http://storage.example.com",
    }
    with pytest.raises(ConfigError):
        load_settings(env=env, cwd=Path("/nonexistent"))


def _run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PF_", "MEDPLUM_", "PFSYNC_"))}
    return subprocess.run(
        [sys.executable, "-m", "pfsync", *args],
        env={**clean, **env, "NO_COLOR": "1"},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (
            ["sync"],
            {"PF_FHIR_BASE_URL": "http://ehr.example.com/fhir", "MEDPLUM_BASE_URL": "http://127.0.0.1:9/"},
        ),
        (
            ["sync"],
            {"PF_FHIR_BASE_URL": "http://127.0.0.1:9/fhir", "MEDPLUM_BASE_URL": "http://medplum.example/"},
        ),
        (["export", "--out", "{tmp}/out"], {"PF_FHIR_BASE_URL": "http://ehr.example.com/fhir"}),
        (
            ["load", "{tmp}/in.ndjson"],
            {"PF_FHIR_BASE_URL": "http://127.0.0.1:9/fhir", "MEDPLUM_BASE_URL": "http://medplum.example/"},
        ),
    ],
)
def test_cli_plain_http_off_loopback_exits_3(args: list[str], env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "in.ndjson").write_text('{"resourceType":"Patient","id":"a"}\n')
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = _run_cli(args, {**env, "PFSYNC_STATE_DIR": str(tmp_path / "state")}, tmp_path)
    assert result.returncode == 3, result.stderr
    assert "plain http" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").rglob("*.ndjson"))


# ------------------------------------------------------------------------------------------------
# TLS verification cannot be turned off


def test_settings_have_no_switch_to_disable_tls_verification() -> None:
    words = ("verify", "insecure_tls", "ssl", "no_tls", "skip_tls", "tls_insecure")
    for spec in SPECS:
        names = [spec.key.lower(), *(e.lower() for e in spec.env), (spec.flag or "").lower()]
        assert not any(w in n for w in words for n in names), spec.key
    assert not any("verify" in f for f in HttpSettings.__dataclass_fields__)


def test_make_client_refuses_a_verify_override() -> None:
    with pytest.raises(TypeError):
        make_client(HttpSettings(), verify=False)


def test_make_client_ignores_environment_attempts_to_disable_verification(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("PYTHONHTTPSVERIFY", "PFSYNC_VERIFY_TLS", "PFSYNC_INSECURE", "CURL_CA_BUNDLE"):
        monkeypatch.setenv(name, "0" if name != "CURL_CA_BUNDLE" else "")
    settings = load_settings(
        env={**os.environ, "PF_FHIR_BASE_URL": "https://a.example/fhir"}, cwd=Path("/nonexistent")
    )
    with make_client(settings.http) as client:
        ctx = client._transport._pool._ssl_context  # type: ignore[attr-defined]
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.check_hostname is True


def test_settings_ca_bundle_must_exist(tmp_path: Path) -> None:
    env = {"PF_FHIR_BASE_URL": "https://a.example/fhir", "PFSYNC_CA_BUNDLE": str(tmp_path / "missing.pem")}
    with pytest.raises(ConfigError):
        load_settings(env=env, cwd=Path("/nonexistent"))


@pytest.fixture(scope="module")
@starts_servers
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """An HTTPS server on 127.0.0.1 with a self-signed certificate nobody trusts by default."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pfsync-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    root = tmp_path_factory.mktemp("tls")
    cert_path, key_path = root / "cert.pem", root / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_path, key_path)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/", cert_path
    finally:
        server.shutdown()
        server.server_close()


def test_make_client_rejects_an_untrusted_certificate(tls_server: tuple[str, Path]) -> None:
    url, _ = tls_server
    with make_client(HttpSettings(), timeout=10) as client, pytest.raises(httpx.ConnectError) as err:
        client.get(url)
    assert "CERTIFICATE_VERIFY_FAILED" in str(err.value)


def test_make_client_trusts_only_an_explicit_ca_bundle(tls_server: tuple[str, Path]) -> None:
    url, cert = tls_server
    settings = load_settings(
        env={"PF_FHIR_BASE_URL": url + "fhir", "PFSYNC_CA_BUNDLE": str(cert)}, cwd=Path("/nonexistent")
    )
    with make_client(settings.http, timeout=10) as client:
        assert client.get(url).text == "ok"


def test_make_client_shares_one_ssl_context_per_ca_source(tls_server: tuple[str, Path]) -> None:
    """Clients share the CA source's context (it costs memory per copy), never another source's."""
    url, cert = tls_server
    bundle = load_settings(
        env={"PF_FHIR_BASE_URL": url + "fhir", "PFSYNC_CA_BUNDLE": str(cert)}, cwd=Path("/nonexistent")
    ).http

    def context(client: httpx.Client) -> ssl.SSLContext:
        return client._transport._pool._ssl_context  # type: ignore[attr-defined,no-any-return]

    with make_client(HttpSettings(), timeout=10) as a, make_client(HttpSettings(), timeout=5) as b, \
            make_client(bundle, timeout=10) as c, make_client(bundle, timeout=5) as d:  # fmt: skip
        assert context(a) is context(b)
        assert context(c) is context(d)
        assert context(a) is not context(c)
        with pytest.raises(httpx.ConnectError):
            a.get(url)  # the shared default context still refuses the self-signed server
        assert c.get(url).text == "ok"
        assert context(a).verify_mode == ssl.CERT_REQUIRED and context(a).check_hostname


# ------------------------------------------------------------------------------------------------
# Private key files readable by others


def _key_file(tmp_path: Path, mode: int) -> Path:
    key = ec.generate_private_key(ec.SECP384R1())
    path = tmp_path / "pfsync-key.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(mode)
    return path


@pytest.mark.parametrize("args", [["auth", "test"], ["sync"]])
def test_cli_warns_about_a_private_key_file_readable_by_others(tmp_path: Path, args: list[str]) -> None:
    key = _key_file(tmp_path, 0o644)
    env = {
        "PF_FHIR_BASE_URL": "http://127.0.0.1:9/fhir",  # nothing listens: the run fails after settings
        "PF_CLIENT_ID": "pfsync",
        "PF_PRIVATE_KEY": str(key),
        "MEDPLUM_BASE_URL": "http://127.0.0.1:9/",
        "PFSYNC_STATE_DIR": str(tmp_path / "state"),
        "PFSYNC_HTTP_RETRIES": "0",
    }
    result = _run_cli(args, env, tmp_path)
    assert "chmod 600" in result.stderr, result.stderr[-2000:]
    assert key.read_text().splitlines()[1] not in result.stderr + result.stdout  # never the key itself


def test_cli_private_key_file_0600_gets_no_permission_warning(tmp_path: Path) -> None:
    key = _key_file(tmp_path, 0o600)
    env = {"PF_FHIR_BASE_URL": "http://127.0.0.1:9/fhir", "PF_CLIENT_ID": "pfsync", "PF_PRIVATE_KEY": str(key),
           "PFSYNC_HTTP_RETRIES": "0"}  # fmt: skip
    result = _run_cli(["auth", "test"], env, tmp_path)
    assert "chmod 600" not in result.stderr
    assert key.read_text().splitlines()[1] not in result.stderr + result.stdout
