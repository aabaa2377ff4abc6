"""Settings precedence (flags > env > TOML > defaults) and every config error path."""

from __future__ import annotations

from pathlib import Path

import pytest

from pfsync.core.errors import ConfigError, ExitCode
from pfsync.core.redact import Secret
from pfsync.core.settings import (
    DEFAULT_RESOURCE_TYPES,
    SPECS,
    identifier_system,
    load_settings,
    parse_duration,
    require,
)

BASE = "https://api.practicefusion.com/fhir/r4/v1/1111"


def write(tmp_path: Path, text: str, name: str = "pfsync.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_settings_defaults_without_anything(tmp_path: Path) -> None:
    s = load_settings(cwd=tmp_path)
    assert s.sources == ()
    assert s.medplum.base_url == "https://api.medplum.com/"
    assert s.medplum.fhir_url == "https://api.medplum.com/fhir/R4/"
    assert s.export.parallel_downloads == 3
    assert s.state_dir == Path(".pfsync")


def test_settings_default_types_are_the_seed_designs_sixteen() -> None:
    assert len(DEFAULT_RESOURCE_TYPES) == 16
    assert {"Patient", "Binary", "ServiceRequest", "MedicationStatement"} <= set(DEFAULT_RESOURCE_TYPES)


@pytest.mark.parametrize(
    ("flag", "env", "toml", "expected"),
    [
        (None, None, None, 3),
        (None, None, 4, 4),
        (None, "5", 4, 5),
        (6, "5", 4, 6),
    ],
)
def test_settings_precedence_flags_env_toml_default(
    tmp_path: Path, flag: int | None, env: str | None, toml: int | None, expected: int
) -> None:
    cfg = write(tmp_path, f"[export]\nparallel_downloads = {toml}\n" if toml is not None else "")
    s = load_settings(
        flags={"export.parallel_downloads": flag},
        env={"PFSYNC_PARALLEL_DOWNLOADS": env} if env else {},
        config_path=cfg,
    )
    assert s.export.parallel_downloads == expected


def test_settings_seed_env_names_build_a_source(tmp_path: Path) -> None:
    env = {
        "PF_FHIR_BASE_URL": BASE + "/",
        "PF_CLIENT_ID": "client-1",
        "PF_CLIENT_SECRET": "s3cret-value",
        "PF_RESOURCE_TYPES": "Patient, Condition",
        "PF_SYNC_INTERVAL_MS": "60000",
        "PF_SYNC_RUN_ON_STARTUP": "false",
        "PF_SYNC_ENABLED": "no",
        "MEDPLUM_BASE_URL": "https://medplum.example.org",
        "MEDPLUM_CLIENT_ID": "mp",
        "MEDPLUM_CLIENT_SECRET": "mp-secret",
    }
    s = load_settings(env=env, cwd=tmp_path)
    src = s.source()
    assert src.base_url == BASE  # trailing slash dropped
    assert src.client_id == "client-1"
    assert isinstance(src.client_secret, Secret) and src.client_secret.reveal() == "s3cret-value"
    assert src.resource_types == ("Patient", "Condition")
    assert s.sync.interval_ms == 60000 and s.sync.run_on_startup is False and s.sync.enabled is False
    assert s.medplum.base_url == "https://medplum.example.org/"  # slash added
    assert s.medplum.client_secret is not None and s.medplum.client_secret.reveal() == "mp-secret"


def test_settings_secret_given_as_a_file_path(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text("from-a-file\n")
    s = load_settings(env={"MEDPLUM_CLIENT_SECRET": str(secret_file)}, cwd=tmp_path)
    assert s.medplum.client_secret is not None and s.medplum.client_secret.reveal() == "from-a-file"


def test_settings_private_key_pem_text_or_path(tmp_path: Path) -> None:
    pem = "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----"
    key = tmp_path / "key.pem"
    key.write_text(pem)
    for value in (pem, str(key)):
        s = load_settings(env={"PF_FHIR_BASE_URL": BASE, "PF_PRIVATE_KEY": value}, cwd=tmp_path)
        key_setting = s.source().private_key
        assert key_setting is not None and key_setting.reveal() == pem


def test_settings_toml_secret_file_key(tmp_path: Path) -> None:
    (tmp_path / "mp.secret").write_text("tomlsecret")
    cfg = write(tmp_path, f'[medplum]\nclient_secret_file = "{tmp_path / "mp.secret"}"\n')
    s = load_settings(config_path=cfg)
    assert s.medplum.client_secret is not None and s.medplum.client_secret.reveal() == "tomlsecret"


def test_settings_default_config_file_is_read_from_cwd(tmp_path: Path) -> None:
    write(tmp_path, "[export]\nparallel_downloads = 2\n")
    s = load_settings(cwd=tmp_path)
    assert s.export.parallel_downloads == 2
    assert s.config_file == tmp_path / "pfsync.toml"


def test_settings_many_sources_from_toml(tmp_path: Path) -> None:
    cfg = write(
        tmp_path,
        """
[[sources]]
name = "practice-a"
base_url = "https://a.example/fhir"
client_id = "a"
groups = ["g1", "g2"]

[[sources]]
name = "practice-b"
base_url = "https://b.example/fhir"
identifier_system = "https://pfsync.example/{source}/{type_lower}"
""",
    )
    s = load_settings(config_path=cfg, env={"PF_RESOURCE_TYPES": "Patient"})
    assert [x.name for x in s.sources] == ["practice-a", "practice-b"]
    assert s.source("practice-a").groups == ("g1", "g2")
    assert all(x.resource_types == ("Patient",) for x in s.sources)  # shared settings from env
    assert identifier_system(s.source("practice-b"), "Patient") == "https://pfsync.example/practice-b/patient"
    assert (
        identifier_system(s.source("practice-a"), "Patient") == "https://practicefusion.com/fhir/patient-id"
    )


def test_settings_duration_forms() -> None:
    assert parse_duration("90", "x") == 90
    assert parse_duration("15m", "x") == 900
    assert parse_duration("24h", "x") == 86400
    assert parse_duration("2d", "x") == 172800
    assert parse_duration("500ms", "x") == 0.5


@pytest.mark.parametrize(
    ("env", "toml", "setting", "fragment"),
    [
        ({"PFSYNC_PARALLEL_DOWNLOADS": "many"}, "", "PFSYNC_PARALLEL_DOWNLOADS", "whole number"),
        ({"PFSYNC_PARALLEL_DOWNLOADS": "0"}, "", "PFSYNC_PARALLEL_DOWNLOADS", "at least 1"),
        ({"PF_SYNC_ENABLED": "maybe"}, "", "PF_SYNC_ENABLED", "true or false"),
        ({"PFSYNC_STATE_BACKEND": "redis"}, "", "PFSYNC_STATE_BACKEND", "one of local, medplum"),
        ({"PF_RESOURCE_TYPES": "patient"}, "", "PF_RESOURCE_TYPES", "not a FHIR resource type"),
        ({"PF_FHIR_BASE_URL": "ftp://x"}, "", "PF_FHIR_BASE_URL", "http(s) URL"),
        ({"PFSYNC_EXPORT_DEADLINE": "soon"}, "", "PFSYNC_EXPORT_DEADLINE", "duration"),
        ({"PF_FHIR_BASE_URL": "http://ehr.example.com/fhir"}, "", "source 'default' base_url", "plain http"),
        ({"MEDPLUM_BASE_URL": "http://medplum.example.com/"}, "", "medplum.base_url", "plain http"),
        (
            {
                "PF_FHIR_BASE_URL": BASE,
                "PF_CLIENT_SECRET": "abcd",
                "PF_PRIVATE_KEY": "-----BEGIN X-----\nabc",
            },
            "",
            "source.auth_method",
            "both a client secret and a private key",
        ),
        (
            {"PF_FHIR_BASE_URL": BASE, "PFSYNC_EXPORT_LEVEL": "group"},
            "",
            "source.groups",
            "needs at least one group",
        ),
        ({}, "[nonsense]\nx = 1\n", "--config", "unknown table"),
        ({}, "[export\n", "--config", "not valid TOML"),
        (
            {},
            "[source]\nbase_url = 'https://a'\n[[sources]]\nname='b'\nbase_url='https://b'\n",
            "--config",
            "both",
        ),
        ({}, "[[sources]]\nbase_url='https://b'\n", "sources[0].name", "needs a name"),
        ({}, "[[sources]]\nname='b'\n", "sources[0].base_url", "needs a base_url"),
        (
            {},
            "[[sources]]\nname='b'\nbase_url='https://b'\n[[sources]]\nname='b'\nbase_url='https://c'\n",
            None,
            "duplicate source name",
        ),
        (
            {"PF_FHIR_BASE_URL": BASE},
            "[[sources]]\nname='b'\nbase_url='https://b'\n",
            "source.base_url",
            "conflicts",
        ),
        ({"PFSYNC_CA_BUNDLE": "/nonexistent/ca.pem"}, "", "http.ca_bundle", "is not a file"),
        ({"MEDPLUM_CLIENT_SECRET": "   "}, "", None, None),  # blank env values are ignored, not an error
    ],
)
def test_settings_config_errors_name_the_setting(
    tmp_path: Path, env: dict[str, str], toml: str, setting: str | None, fragment: str | None
) -> None:
    cfg = write(tmp_path, toml)
    if fragment is None:
        load_settings(env=env, config_path=cfg)
        return
    with pytest.raises(ConfigError) as info:
        load_settings(env=env, config_path=cfg)
    assert fragment in info.value.message
    assert info.value.exit_code == ExitCode.CONFIG
    if setting is not None:
        assert info.value.setting == setting


def test_settings_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(config_path=tmp_path / "nope.toml")


def test_settings_empty_secret_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("")
    cfg = write(tmp_path, f'[medplum]\nclient_secret_file = "{tmp_path / "empty"}"\n')
    with pytest.raises(ConfigError, match="is empty"):
        load_settings(config_path=cfg)


def test_settings_loopback_http_is_allowed_and_opt_in_for_others(tmp_path: Path) -> None:
    load_settings(
        env={"PF_FHIR_BASE_URL": "http://127.0.0.1:8710/fhir", "MEDPLUM_BASE_URL": "http://localhost:1/"}
    )
    s = load_settings(
        env={"PF_FHIR_BASE_URL": "http://ehr.lan/fhir", "PFSYNC_ALLOW_INSECURE_HTTP": "true"}, cwd=tmp_path
    )
    assert s.source().base_url == "http://ehr.lan/fhir"


def test_settings_require_names_env_var_and_flag() -> None:
    with pytest.raises(ConfigError) as info:
        require(None, "source.base_url", "pfsync export")
    assert "PF_FHIR_BASE_URL" in info.value.message
    assert (
        info.value.hint is not None and "--source-url" in info.value.hint and "pfsync.toml" in info.value.hint
    )


def test_settings_source_selection_errors(tmp_path: Path) -> None:
    s = load_settings(cwd=tmp_path)
    with pytest.raises(ConfigError, match="no source is configured"):
        s.source()
    s = load_settings(env={"PF_FHIR_BASE_URL": BASE}, cwd=tmp_path)
    with pytest.raises(ConfigError, match="unknown source"):
        s.source("other")


def test_settings_every_spec_has_env_help_and_parses_its_default() -> None:
    for spec in SPECS:
        assert spec.env and spec.help.endswith("."), spec.key
        assert all(name.startswith(("PF_", "PFSYNC_", "MEDPLUM_")) for name in spec.env)


def test_settings_warn_about_loose_secret_file_permissions(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----")
    key.chmod(0o644)
    s = load_settings(env={"PF_FHIR_BASE_URL": BASE, "PF_PRIVATE_KEY": str(key)}, cwd=tmp_path)
    assert len(s.warnings) == 1 and "chmod 600" in s.warnings[0] and "MIIB" not in s.warnings[0]
    key.chmod(0o600)
    assert (
        load_settings(env={"PF_FHIR_BASE_URL": BASE, "PF_PRIVATE_KEY": str(key)}, cwd=tmp_path).warnings == ()
    )


def test_settings_download_allowlist_refuses_plain_http_to_other_hosts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="plain http"):
        load_settings(
            env={"PF_FHIR_BASE_URL": BASE, "PFSYNC_DOWNLOAD_ALLOWLIST": "http://storage.example.com"},
            cwd=tmp_path,
        )


def test_settings_each_default_is_declared_once_in_its_dataclass() -> None:
    from pfsync.core.settings_specs import FROM_DATACLASS, field_default

    for spec in SPECS:
        own = field_default(spec.key)
        if own is FROM_DATACLASS:  # a field every source must set: only its Spec says what "unset" is
            assert spec.required_default is not FROM_DATACLASS, spec.key
        else:
            assert spec.required_default is FROM_DATACLASS, f"{spec.key}: default declared twice"
            assert spec.default == own and type(spec.default) is type(own), spec.key


def test_settings_resolved_defaults_equal_the_dataclass_defaults(tmp_path: Path) -> None:
    from pfsync.core.settings import (
        ExportSettings,
        HttpSettings,
        LoadSettings,
        MedplumSettings,
        Settings,
        SourceSettings,
        SyncSettings,
    )

    s = load_settings(cwd=tmp_path, env={"PF_FHIR_BASE_URL": BASE})
    bare = Settings(sources=())
    assert (s.medplum, s.http, s.export, s.load, s.sync) == (
        MedplumSettings(), HttpSettings(), ExportSettings(), LoadSettings(), SyncSettings()
    )  # fmt: skip
    assert (s.state_backend, s.state_dir, s.log_format) == (
        bare.state_backend,
        bare.state_dir,
        bare.log_format,
    )
    assert s.sources == (SourceSettings(name="default", base_url=BASE),)
