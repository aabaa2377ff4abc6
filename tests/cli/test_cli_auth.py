"""`pfsync auth keygen` and `pfsync auth test` through CliRunner and as real processes, against the sandboxes.

The source sandbox verifies the assertions with the JWKS that `auth keygen` wrote; no secret (private
key lines, client secrets, obtained tokens, assertions) may appear in any byte of stdout or stderr.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from target_fixtures import TARGET_CLIENT, TARGET_SECRET
from typer.testing import CliRunner

from pfsync.cli import app
from pfsync.sandbox.source.server import SourceSandbox
from pfsync.sandbox.target.server import TargetSandbox

pytestmark = pytest.mark.integration
runner = CliRunner()
APP = "pfsync-cli-app"


def _keygen(out: Path, *args: str) -> dict[str, Any]:
    result = runner.invoke(app, ["auth", "keygen", "--out", str(out), "--json", *args])
    assert result.exit_code == 0, result.output
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def _env(source: SourceSandbox, target: TargetSandbox, keys: dict[str, Any], **extra: str) -> dict[str, str]:
    env = {"PF_FHIR_BASE_URL": source.base_url(), "PF_CLIENT_ID": APP, "PF_PRIVATE_KEY": keys["privateKeyFile"],
           "PF_KEY_ID": keys["kid"], "PF_RESOURCE_TYPES": "Patient,Observation,Condition",
           "MEDPLUM_BASE_URL": target.base_url, "MEDPLUM_CLIENT_ID": TARGET_CLIENT,
           "MEDPLUM_CLIENT_SECRET": TARGET_SECRET, "PFSYNC_HTTP_RETRIES": "1", "PFSYNC_RETRY_MAX_WAIT": "0.1"}  # fmt: skip
    env.update(extra)
    return env


@pytest.fixture
def keys(tmp_path: Path, source: SourceSandbox) -> dict[str, Any]:
    """A keygen'd ES384 pair whose public JWKS is registered with the source sandbox."""
    doc = _keygen(tmp_path / "keys")
    source.register_client(APP, jwks=json.loads(Path(doc["jwksFile"]).read_text()))
    return doc


# ---- keygen ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("alg", "kty"), [("ES384", "EC"), ("RS384", "RSA"), ("es384", "EC")])
def test_cli_auth_keygen_writes_0600_pem_and_public_jwks(tmp_path: Path, alg: str, kty: str) -> None:
    result = runner.invoke(app, ["auth", "keygen", "--out", str(tmp_path), "--alg", alg])
    assert result.exit_code == 0, result.output
    pem_path, jwks_path = tmp_path / "pfsync-private-key.pem", tmp_path / "pfsync-jwks.json"
    assert stat.S_IMODE(pem_path.stat().st_mode) == 0o600
    (jwk,) = json.loads(jwks_path.read_text())["keys"]
    assert (
        jwk["kty"] == kty
        and jwk["alg"] == alg.upper()
        and jwk["use"] == "sig"
        and jwk["key_ops"] == ["verify"]
    )
    assert "d" not in jwk
    # Not a terminal: the result is one JSON object (README "Output").
    assert json.loads(result.stdout)["kid"] == jwk["kid"]
    for line in pem_path.read_text().splitlines():
        assert line not in result.output  # not even the BEGIN line


def test_cli_auth_keygen_kid_option(tmp_path: Path) -> None:
    doc = _keygen(tmp_path, "--kid", "pfsync-2025")
    assert doc["kid"] == "pfsync-2025" and doc["jwks"]["keys"][0]["kid"] == "pfsync-2025"


def test_cli_auth_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    _keygen(tmp_path)
    before = (tmp_path / "pfsync-private-key.pem").read_bytes()
    result = runner.invoke(app, ["auth", "keygen", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "refusing to overwrite" in result.output
    assert (tmp_path / "pfsync-private-key.pem").read_bytes() == before


def test_cli_auth_keygen_bad_alg_is_usage_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["auth", "keygen", "--out", str(tmp_path), "--alg", "HS256"])
    assert result.exit_code == 2 and "unsupported algorithm" in result.output


# ---- auth test ---------------------------------------------------------------------------------


def _checks(doc: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    (target,) = [t for t in doc["targets"] if t["kind"] == kind]
    return {c["name"]: c for c in target["checks"]}


def test_cli_auth_test_all_green_json(
    source: SourceSandbox, target: TargetSandbox, keys: dict[str, Any]
) -> None:
    result = runner.invoke(app, ["auth", "test", "--json"], env=_env(source, target, keys))
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] is True and doc["exitCode"] == 0
    src = _checks(doc, "source")
    for name in ("reachable", "discovery", "token", "scopes", "export_group", "export_patient", "param_type",
                 "param_since"):  # fmt: skip
        assert src[name]["status"] == "ok", (name, src[name])
    assert src["export_system"]["status"] == "skip"  # PF documents no system-level export
    facts = doc["targets"][0]["facts"]
    assert facts["tokenEndpoint"] == source.token_url()
    assert (
        facts["authMethod"] == "private_key_jwt"
        and facts["tokenObtained"] is True
        and facts["expiresIn"] == 300
    )
    assert facts["scopesRequested"] == ["system/Patient.rs", "system/Observation.rs", "system/Condition.rs"]
    assert facts["missingTypes"] == [] and facts["exportLevels"] == {
        "group": True,
        "patient": True,
        "system": False,
    }
    assert facts["acceptsType"] is True and facts["acceptsSince"] is True
    # every probe job was cancelled: one DELETE per accepted kick-off, and nothing left running
    accepted = [s for s in source.stats.requests("kickoff") if s.status == 202]
    assert len(accepted) == 4 and source.stats.count("delete") == 4
    assert all(j["cancelled"] for j in facts["probeJobs"])
    medplum = _checks(doc, "medplum")
    assert medplum["token"]["status"] == medplum["fhir_read"]["status"] == "ok"
    assert medplum["rate_limit"]["detail"].startswith('"requests";r=')
    assert target.stats.token_requests == 1


def test_cli_auth_test_table_names_every_check(
    source: SourceSandbox, target: TargetSandbox, keys: dict[str, Any]
) -> None:
    result = runner.invoke(app, ["auth", "test"], env=_env(source, target, keys))
    assert result.exit_code == 0, result.output
    for word in ("reachable", "token_endpoint", "private_key_jwt", "scopes_granted", "export_patient", "param_since",
                 "fhir_read", "rate_limit", "expires in 300 s"):  # fmt: skip
        assert word in result.stdout


def test_cli_auth_test_missing_scopes_warn_then_fail_when_strict(
    source: SourceSandbox, target: TargetSandbox, keys: dict[str, Any]
) -> None:
    source.register_client(APP, jwks=json.loads(Path(keys["jwksFile"]).read_text()),
                           allowed_scopes=["system/Patient.read"])  # fmt: skip
    result = runner.invoke(app, ["auth", "test", "--json", "--no-medplum"], env=_env(source, target, keys))
    assert result.exit_code == 0, result.output
    scopes = _checks(json.loads(result.stdout), "source")["scopes"]
    assert scopes["status"] == "warn" and "Observation, Condition" in scopes["detail"]
    assert "practice admin" in scopes["hint"]
    strict = runner.invoke(app, ["auth", "test", "--no-medplum"],
                           env=_env(source, target, keys, PFSYNC_STRICT_SCOPES="true"))  # fmt: skip
    assert strict.exit_code == 4
    assert "practice admin" in strict.stdout and "auth test: 1 check(s) failed" in strict.stderr


@pytest.mark.parametrize(
    ("extra", "code", "words"),
    [
        ({"PF_KEY_ID": "not-registered"}, 4, ["PF_KEY_ID (kid)"]),
        ({"PF_CLIENT_ID": "nobody"}, 4, ["wrong client id"]),
        ({"MEDPLUM_CLIENT_SECRET": "wrong-secret"}, 4, ["MEDPLUM_CLIENT_SECRET"]),
        ({"PFSYNC_AUTH_METHOD": "client_secret_basic"}, 3, ["PF_CLIENT_SECRET"]),
        ({"MEDPLUM_CLIENT_ID": ""}, 3, ["MEDPLUM_CLIENT_ID"]),
        ({"PFSYNC_EXPORT_LEVEL": "system"}, 3, ["export_system", "--level"]),
    ],
)
def test_cli_auth_test_failures_exit_nonzero_with_hints(
    source: SourceSandbox, target: TargetSandbox, keys: dict[str, Any], extra: dict[str, str], code: int,
    words: list[str],
) -> None:  # fmt: skip
    result = runner.invoke(app, ["auth", "test"], env=_env(source, target, keys, **extra))
    assert result.exit_code == code, result.output
    for word in words:
        assert word in result.stdout, result.stdout
    assert "Traceback" not in result.output


def test_cli_auth_test_unknown_source_is_config_error(source: SourceSandbox, target: TargetSandbox,
                                                      keys: dict[str, Any]) -> None:  # fmt: skip
    result = runner.invoke(app, ["auth", "test", "--source", "nope"], env=_env(source, target, keys))
    assert result.exit_code == 3 and "unknown source 'nope'" in result.stderr


def test_cli_auth_test_unreachable_source_exits_temporary(target: TargetSandbox, tmp_path: Path) -> None:
    env = {"PF_FHIR_BASE_URL": "http://127.0.0.1:9/fhir", "PF_CLIENT_ID": "x", "PF_CLIENT_SECRET": "unused-secret",
           "PFSYNC_HTTP_RETRIES": "0", "MEDPLUM_BASE_URL": target.base_url, "MEDPLUM_CLIENT_ID": TARGET_CLIENT,
           "MEDPLUM_CLIENT_SECRET": TARGET_SECRET}  # fmt: skip
    result = runner.invoke(app, ["auth", "test", "--json"], env=env)
    assert result.exit_code == 75, result.output
    reachable = _checks(json.loads(result.stdout), "source")["reachable"]
    assert reachable["status"] == "fail" and "firewall" in reachable["hint"]


def test_cli_auth_test_several_sources_from_toml(tmp_path: Path, source: SourceSandbox, target: TargetSandbox,
                                                 keys: dict[str, Any]) -> None:  # fmt: skip
    config = tmp_path / "pfsync.toml"
    config.write_text(
        f'[[sources]]\nname = "jwt"\nbase_url = "{source.base_url()}"\nclient_id = "{APP}"\n'
        f'private_key = "{keys["privateKeyFile"]}"\nkey_id = "{keys["kid"]}"\n'
        f'[[sources]]\nname = "basic"\nbase_url = "{source.base_url()}"\nclient_id = "pfsync-sandbox"\n'
        f'client_secret = "sandbox-secret"\nidentifier_system = "urn:basic:{{type}}"\n'
    )
    env = {"PF_RESOURCE_TYPES": "Patient"}
    result = runner.invoke(app, ["--config", str(config), "auth", "test", "--json", "--no-medplum"], env=env)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    methods = {t["name"]: t["facts"]["authMethod"] for t in doc["targets"]}
    assert methods == {"jwt": "private_key_jwt", "basic": "client_secret_basic"}
    only = runner.invoke(app, ["--config", str(config), "auth", "test", "--json", "--no-medplum", "--source", "basic"],
                         env=env)  # fmt: skip
    assert [t["name"] for t in json.loads(only.stdout)["targets"]] == ["basic"]


# ---- real processes: exit codes, and not one secret byte in the output --------------------------


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PF_", "PFSYNC_", "MEDPLUM_"))}
    return subprocess.run([sys.executable, "-m", "pfsync", *args], env={**clean, **env}, capture_output=True,
                          timeout=120)  # fmt: skip


def _secrets_absent(output: bytes, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret.encode() not in output, f"secret leaked: {secret[:6]}..."
    assert b"eyJ" not in output  # no JWT at all: assertions, Medplum tokens


@pytest.mark.parametrize("verbosity", [[], ["-vv"]])
def test_cli_auth_test_subprocess_never_prints_secrets(
    source: SourceSandbox, target: TargetSandbox, keys: dict[str, Any], verbosity: list[str]
) -> None:
    result = _run(_env(source, target, keys), *verbosity, "auth", "test")
    assert result.returncode == 0, result.stderr.decode()
    assert b"export_patient" in result.stdout
    pem_lines = [ln for ln in Path(keys["privateKeyFile"]).read_text().splitlines() if ln.strip()]
    issued = list(source.state.auth.tokens)  # every token the sandbox issued during the run
    assert issued
    _secrets_absent(result.stdout + result.stderr, [*pem_lines, TARGET_SECRET, *issued])


def test_cli_auth_test_subprocess_failures_never_print_secrets(
    source: SourceSandbox, target: TargetSandbox, keys: dict[str, Any]
) -> None:
    env = _env(source, target, keys, PF_PRIVATE_KEY=Path(keys["privateKeyFile"]).read_text(),
               PF_KEY_ID="wrong-kid", MEDPLUM_CLIENT_SECRET="wrong-medplum-secret")  # fmt: skip
    result = _run(env, "-vv", "auth", "test", "--json")
    assert result.returncode == 4, result.stderr.decode()
    doc = json.loads(result.stdout)
    assert _checks(doc, "source")["token"]["status"] == "fail"
    assert _checks(doc, "medplum")["token"]["status"] == "fail"
    pem_lines = [ln for ln in Path(keys["privateKeyFile"]).read_text().splitlines() if ln.strip()]
    _secrets_absent(result.stdout + result.stderr, [*pem_lines, "wrong-medplum-secret"])


def test_cli_auth_test_subprocess_basic_secret_not_printed(
    source: SourceSandbox, target: TargetSandbox
) -> None:
    env = {"PF_FHIR_BASE_URL": source.base_url(), "PF_CLIENT_ID": "pfsync-sandbox", "PF_CLIENT_SECRET": "sandbox-secret",
           "PF_RESOURCE_TYPES": "Patient", "MEDPLUM_BASE_URL": target.base_url, "MEDPLUM_CLIENT_ID": TARGET_CLIENT,
           "MEDPLUM_CLIENT_SECRET": TARGET_SECRET, "PFSYNC_MEDPLUM_AUTH": "basic"}  # fmt: skip
    result = _run(env, "-vv", "auth", "test")
    assert result.returncode == 0, result.stderr.decode()
    assert target.stats.token_requests == 0
    _secrets_absent(
        result.stdout + result.stderr, ["sandbox-secret", TARGET_SECRET, *source.state.auth.tokens]
    )
