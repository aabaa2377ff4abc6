"""Settings: resolved once at the edge into frozen dataclasses; the library never reads os.environ.

Precedence, highest first: command-line flags, environment, the TOML config file (`--config`,
default `pfsync.toml` in the working directory if present), defaults. Every setting is one row
of `SPECS`; the README's configuration table and `--help` are checked against it by the tests.
The environment names of the Medplum Practice Fusion bot integration (PF_*, MEDPLUM_*) are accepted
so its deployments carry over.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pfsync.core.errors import ConfigError, UsageError
from pfsync.core.fhir_types import R4_RESOURCE_TYPES, did_you_mean
from pfsync.core.redact import Secret

# docs/practice-fusion.md, "Defaults, identifiers and politeness": the types the seed design syncs by default.
DEFAULT_RESOURCE_TYPES: tuple[str, ...] = (
    "Patient", "Practitioner", "Encounter", "Condition", "Observation", "MedicationRequest",
    "Medication", "MedicationStatement", "AllergyIntolerance", "Immunization", "Procedure",
    "DiagnosticReport", "DocumentReference", "CarePlan", "ServiceRequest", "Binary",
)  # fmt: skip
# docs/practice-fusion.md, "Defaults, identifiers and politeness": the seed design's identifier systems, e.g. .../patient-id.
DEFAULT_IDENTIFIER_SYSTEM = "https://practicefusion.com/fhir/{type_lower}-id"
DEFAULT_CONFIG_FILE = "pfsync.toml"

AuthMethod = Literal["auto", "private_key_jwt", "client_secret_basic"]
ScopeVersion = Literal["auto", "v1", "v2"]
ExportLevel = Literal["auto", "group", "patient", "system"]
DeleteMode = Literal["apply", "ignore", "tag"]
UpsertMode = Literal["direct", "conditional"]
ExportValidate = Literal["structure", "full"]
StateBackend = Literal["local", "medplum"]
LogFormat = Literal["auto", "human", "json"]
MedplumAuth = Literal["token", "basic"]


@dataclass(frozen=True)
class SourceSettings:
    """One EHR source (for Practice Fusion: one practice)."""

    name: str
    base_url: str
    client_id: str | None = None
    client_secret: Secret | None = None
    private_key: Secret | None = None  # PEM or JWK/JWKS JSON text
    key_id: str | None = None
    auth_method: AuthMethod = "auto"
    token_url: str | None = None
    jku: str | None = None
    scope_version: ScopeVersion = "auto"
    resource_types: tuple[str, ...] = DEFAULT_RESOURCE_TYPES
    export_level: ExportLevel = "auto"
    groups: tuple[str, ...] = ()
    type_filter: tuple[str, ...] = ()
    identifier_system: str = DEFAULT_IDENTIFIER_SYSTEM
    download_allowlist: tuple[str, ...] = ()
    enabled: bool = True
    # The other configured sources' identifier_system templates (not a setting: filled in when
    # the [[sources]] list is read): identifiers in their systems are never this source's.
    peer_systems: tuple[str, ...] = ()


@dataclass(frozen=True)
class MedplumSettings:
    base_url: str = "https://api.medplum.com/"
    client_id: str | None = None
    client_secret: Secret | None = None
    auth: MedplumAuth = "token"

    @property
    def fhir_url(self) -> str:
        # docs/medplum.md, "Base URLs and auth": FHIR base is {MEDPLUM_BASE_URL}fhir/R4/.
        return self.base_url + "fhir/R4/"

    @property
    def token_url(self) -> str:
        return self.base_url + "oauth2/token"


@dataclass(frozen=True)
class HttpSettings:
    timeout: float = 60.0
    load_timeout: float = 180.0  # docs/medplum.md: a 1 MiB batch of creates took about 50 s
    retries: int = 6
    retry_max_wait: float = 120.0
    allow_insecure_http: bool = False
    ca_bundle: Path | None = None
    allow_networks: tuple[str, ...] = ()  # pfsync.net.policy: special-purpose ranges let through
    proxy: str | None = None
    trust_env: bool = False  # HTTP(S)_PROXY, NO_PROXY, SSL_CERT_FILE/DIR are ignored unless set
    max_response_bytes: int = 128 * 1024 * 1024  # answers read whole: searches, Bundles, manifests


@dataclass(frozen=True)
class ExportSettings:
    poll_max_wait: float = 300.0
    deadline: float = 6 * 3600.0
    parallel_downloads: int = 3  # docs/bulk-data.md: about 5 at most; docs/practice-fusion.md: be polite
    delete_after_download: bool = True
    max_line_bytes: int = 64 * 1024 * 1024
    # Decoded bytes: a 1,000,000-resource practice exports about 2 GB in all (docs/BENCHMARKS.md).
    max_file_bytes: int = 16 * 1024**3
    max_export_bytes: int = 128 * 1024**3
    strict_scopes: bool = False
    kickoff_method: Literal["get", "post"] = "get"
    since_overlap: float = 300.0
    validate: ExportValidate = "structure"  # download.py: what each line is checked for while streaming


@dataclass(frozen=True)
class LoadSettings:
    bundle_max_bytes: int = 900_000  # docs/medplum.md: 1,048,577 bytes is refused; keep headroom
    bundle_max_entries: int = 100
    max_concurrency: int = 4
    async_batch: bool = False
    async_max_bytes: int = 8 * 1024 * 1024
    normalize: bool = True
    deletes: DeleteMode = "apply"
    fetch_missing_references: bool = True
    # pfsync.load.references "Refresh": every known target the export cannot deliver is re-read this often.
    refresh_referenced_after: float = 7 * 86400.0
    # docs/medplum.md "Quota costs": search + POST/PUT-by-id ~100 points, conditional PUT ~140.
    upsert_mode: UpsertMode = "direct"
    attachments: bool = True
    attachment_max_bytes: int = 50 * 1024 * 1024
    attachment_content_types: tuple[str, ...] = ()  # empty: any
    # pfsync.load.idmap: the id map's memory cache (past it, lookups read SQLite).
    idmap_cache_bytes: int = 32 * 1024 * 1024
    # pfsync.load.writes: resources waiting in memory for targets whose writes are in flight.
    park_max_bytes: int = 16 * 1024 * 1024


@dataclass(frozen=True)
class SyncSettings:
    interval_ms: int = 24 * 3600 * 1000
    run_on_startup: bool = True
    enabled: bool = True
    parallel_sources: int = 1
    stale_after: float = 48 * 3600.0
    adopt_seed_checkpoint: bool = False


@dataclass(frozen=True)
class Settings:
    sources: tuple[SourceSettings, ...]
    medplum: MedplumSettings = field(default_factory=MedplumSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    load: LoadSettings = field(default_factory=LoadSettings)
    sync: SyncSettings = field(default_factory=SyncSettings)
    state_backend: StateBackend = "local"
    state_dir: Path = Path(".pfsync")
    log_format: LogFormat = "auto"
    config_file: Path | None = None
    warnings: tuple[str, ...] = ()

    def source(self, name: str | None = None) -> SourceSettings:
        """The named source, or the only one. ConfigError when it is ambiguous or unknown."""
        if name is None:
            if len(self.sources) == 1:
                return self.sources[0]
            if not self.sources:
                raise ConfigError(
                    "no source is configured",
                    setting="source.base_url",
                    hint="set PF_FHIR_BASE_URL or add a [[sources]] table to pfsync.toml",
                )
            names = ", ".join(s.name for s in self.sources)
            raise ConfigError(f"several sources are configured ({names}): pick one with --source NAME")
        for src in self.sources:
            if src.name == name:
                return src
        names = ", ".join(s.name for s in self.sources) or "none"
        raise ConfigError(f"unknown source {name!r} (configured: {names})", setting="--source")


# ---------------------------------------------------------------------------------------------
# The table of settings


Parser = Callable[[Any, str], Any]


@dataclass(frozen=True)
class Spec:
    """One setting: where it lives in TOML (`key`), its env names, its flag, default and parser."""

    key: str
    env: tuple[str, ...]
    parse: Parser
    default: Any
    help: str
    flag: str | None = None
    secret: bool = False

    @property
    def section(self) -> str:
        return self.key.split(".", 1)[0]

    @property
    def name(self) -> str:
        return self.key.split(".", 1)[1]


def _str(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key} must be a non-empty string", setting=key)
    return value.strip()


def _int(value: Any, key: str) -> int:
    try:
        result = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a whole number, got {value!r}", setting=key) from None
    if result < 0:
        raise ConfigError(f"{key} must not be negative, got {result}", setting=key)
    return result


def _positive_int(value: Any, key: str) -> int:
    result = _int(value, key)
    if result < 1:
        raise ConfigError(f"{key} must be at least 1, got {result}", setting=key)
    return result


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any, key: str) -> float:
    """Seconds, from a number or a string like '90', '90s', '15m', '24h', '2d'."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ConfigError(f"{key} must be a duration like 90s, 15m, 24h or 2d, got {value!r}", setting=key)
    return float(match.group(1)) * _UNITS[match.group(2)]


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{key} must be true or false, got {value!r}", setting=key)


def _list(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, list | tuple):
        items = [str(v).strip() for v in value]
    elif isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    else:
        raise ConfigError(f"{key} must be a list or a comma-separated string", setting=key)
    return tuple(v for v in items if v)


def _networks(value: Any, key: str) -> tuple[str, ...]:
    from pfsync.net.policy import parse_networks

    items = _list(value, key)
    for item in items:
        try:
            parse_networks([item])
        except ValueError:
            raise ConfigError(f"{key}: {item!r} is not an address range (CIDR, e.g. 169.254.0.0/16)",
                              setting=key) from None  # fmt: skip
    return items


def _types(value: Any, key: str) -> tuple[str, ...]:
    types = _list(value, key)
    for t in types:
        if t not in R4_RESOURCE_TYPES:
            guess = did_you_mean(t, R4_RESOURCE_TYPES)
            raise ConfigError(
                f"{key}: {t!r} is not a FHIR resource type (R4)"
                + (f" (did you mean {guess}?)" if guess else ""),
                setting=key,
                hint="resource type names are case-sensitive, e.g. Patient,Condition,Observation",
            )
    if not types:
        raise ConfigError(f"{key} must name at least one resource type", setting=key)
    return types


def _choice(*choices: str) -> Parser:
    def parse(value: Any, key: str) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            guess = did_you_mean(text, list(choices))
            raise ConfigError(
                f"{key} must be one of {', '.join(choices)}; got {value!r}"
                + (f" (did you mean {guess}?)" if guess else ""),
                setting=key,
            )
        return text

    return parse


def _path(value: Any, key: str) -> Path:
    return Path(os.path.expanduser(_str(value, key)))


def _url(value: Any, key: str) -> str:
    text = _str(value, key)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{key} must be an http(s) URL, got {text!r}", setting=key)
    return text


# Warnings found while resolving (loose secret-file permissions); load_settings hands them to the
# caller in Settings.warnings, since logging is only set up once settings are known.
_pending_warnings: list[str] = []


def _warn_if_loose(path: Path, key: str) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & 0o077:
        _pending_warnings.append(
            f"{key}: secret file {path} is readable by group or others (mode {mode & 0o777:o}); "
            f"restrict it with: chmod 600 {path}"
        )


# A secret value that starts like a path is a path: sending a mistyped file name to the server as
# the secret would come back as "wrong client id or secret" and hide the typo.
_PATH_PREFIXES = ("/", "./", "../", "~/")


def _secret(value: Any, key: str) -> Secret:
    """A secret given as its value or as a path to a file holding it ("Secrets can be given as
    file paths"). A value that names an existing file is read from that file; a value that starts
    like a path (/, ./, ../, ~/) must name a readable file."""
    text = value if isinstance(value, str) else str(value)
    stripped = text.strip()
    if not stripped:
        raise ConfigError(f"{key} is empty", setting=key)
    if "\n" not in stripped and len(stripped) < 4096:
        candidate = Path(os.path.expanduser(stripped))
        try:
            if candidate.is_file():
                return Secret(_read_secret_file(candidate, key))
        except OSError:
            pass
        if stripped.startswith(_PATH_PREFIXES) and " " not in stripped:
            problem = "is a directory" if candidate.is_dir() else "does not exist"
            raise ConfigError(
                f"{key}: secret file {candidate} {problem}",
                setting=key,
                hint="a value that starts with /, ./, ../ or ~/ is read as the path of a file holding "
                "the secret; check the path (a secret that itself starts with / belongs in a file)",
            )
    return Secret(stripped)


def _read_secret_file(path: Path, key: str) -> str:
    _warn_if_loose(path, key)
    try:
        data = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ConfigError(f"{key}: secret file {path} does not exist", setting=key) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.__class__.__name__}", setting=key) from None
    if not data:
        raise ConfigError(f"{key}: file {path} is empty", setting=key)
    return data


SOURCE_TYPES_ENV = ("PF_RESOURCE_TYPES", "PFSYNC_RESOURCE_TYPES")

SPECS: tuple[Spec, ...] = (
    # --- source (one practice; several with [[sources]] in the TOML file)
    Spec("source.name", ("PFSYNC_SOURCE_NAME",), _str, "default", "Name of the source (used in state, logs, identifier templates)."),
    Spec("source.base_url", ("PF_FHIR_BASE_URL",), _url, None, "FHIR base URL of the EHR (one per practice for Practice Fusion).", flag="--source-url"),
    Spec("source.client_id", ("PF_CLIENT_ID",), _str, None, "Client id registered with the EHR."),
    Spec("source.client_secret", ("PF_CLIENT_SECRET",), _secret, None, "Client secret for client_secret_basic (value or path to a file).", secret=True),
    Spec("source.private_key", ("PF_PRIVATE_KEY",), _secret, None, "Private key for private_key_jwt: PEM text, or path to a PEM/JWK/JWKS file.", secret=True),
    Spec("source.key_id", ("PF_KEY_ID",), _str, None, "kid of the registered public key (taken from a JWK if absent)."),
    Spec("source.auth_method", ("PFSYNC_AUTH_METHOD",), _choice("auto", "private_key_jwt", "client_secret_basic"), "auto", "How to authenticate to the EHR; auto picks from what is configured."),
    Spec("source.token_url", ("PFSYNC_TOKEN_URL",), _url, None, "Token endpoint override (default: discovered from .well-known/smart-configuration)."),
    Spec("source.jku", ("PFSYNC_JKU",), _url, None, "Optional jku header: the registered JWKS URL."),
    Spec("source.scope_version", ("PFSYNC_SCOPE_VERSION",), _choice("auto", "v1", "v2"), "auto", "SMART scope syntax: v1 system/X.read, v2 system/X.rs; auto reads the server's capabilities."),
    Spec("source.resource_types", SOURCE_TYPES_ENV, _types, DEFAULT_RESOURCE_TYPES, "Resource types to export and load (comma-separated).", flag="--types"),
    Spec("source.export_level", ("PFSYNC_EXPORT_LEVEL",), _choice("auto", "group", "patient", "system"), "auto", "Export level; auto = group when groups are set, else patient.", flag="--level"),
    Spec("source.groups", ("PFSYNC_GROUPS",), _list, (), "Group ids to export (comma-separated).", flag="--group"),
    Spec("source.type_filter", ("PFSYNC_TYPE_FILTER",), _list, (), "_typeFilter values, e.g. Observation?category=laboratory."),
    Spec("source.identifier_system", ("PFSYNC_IDENTIFIER_SYSTEM",), _str, DEFAULT_IDENTIFIER_SYSTEM, "Identifier system template; {type}, {type_lower} and {source} are filled in."),
    Spec("source.download_allowlist", ("PFSYNC_DOWNLOAD_ALLOWLIST",), _list, (), "Extra origins that may receive the bearer token for file downloads."),
    Spec("source.enabled", ("PFSYNC_SOURCE_ENABLED",), _bool, True, "Whether this source is synced."),
    # --- Medplum
    Spec("medplum.base_url", ("MEDPLUM_BASE_URL",), _url, "https://api.medplum.com/", "Medplum server root (FHIR lives under fhir/R4/).", flag="--medplum-url"),
    Spec("medplum.client_id", ("MEDPLUM_CLIENT_ID",), _str, None, "Medplum ClientApplication id."),
    Spec("medplum.client_secret", ("MEDPLUM_CLIENT_SECRET",), _secret, None, "Medplum ClientApplication secret (value or path to a file).", secret=True),
    Spec("medplum.auth", ("PFSYNC_MEDPLUM_AUTH",), _choice("token", "basic"), "token", "token: client_credentials token, cached; basic: HTTP Basic on every FHIR call."),
    # --- HTTP
    Spec("http.timeout", ("PFSYNC_HTTP_TIMEOUT",), parse_duration, 60.0, "Timeout of one HTTP request to the EHR."),
    Spec("http.load_timeout", ("PFSYNC_LOAD_TIMEOUT",), parse_duration, 180.0, "Timeout of one Bundle request to Medplum (large batches take ~50 s)."),
    Spec("http.retries", ("PFSYNC_HTTP_RETRIES",), _int, 6, "Retries of a request on network errors, 408, 429 and 5xx."),
    Spec("http.retry_max_wait", ("PFSYNC_RETRY_MAX_WAIT",), parse_duration, 120.0, "Cap on one wait between retries (Retry-After is clamped to it)."),
    Spec("http.allow_insecure_http", ("PFSYNC_ALLOW_INSECURE_HTTP",), _bool, False, "Allow plain http:// to non-loopback hosts (never needed in production)."),
    Spec("http.ca_bundle", ("PFSYNC_CA_BUNDLE",), _path, None, "CA bundle for TLS verification (verification itself cannot be turned off)."),
    Spec("http.allow_networks", ("PFSYNC_ALLOW_NETWORKS",), _networks, (), "Special-purpose address ranges (CIDR, comma-separated) requests may go to; link-local, metadata and other such addresses are refused otherwise."),
    Spec("http.proxy", ("PFSYNC_PROXY",), _str, None, "Proxy for every request (http:// or https:// URL); HTTP_PROXY and friends are ignored unless http.trust_env."),
    Spec("http.max_response_bytes", ("PFSYNC_MAX_RESPONSE_BYTES",), _positive_int, 128 * 1024 * 1024, "Largest answer read whole (decompressed: searches, Bundle responses, manifests); export files and attachments have their own limits."),
    Spec("http.trust_env", ("PFSYNC_TRUST_ENV",), _bool, False, "Take the proxy (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY) and CA (SSL_CERT_FILE, SSL_CERT_DIR) from the environment."),
    # --- export
    Spec("export.poll_max_wait", ("PFSYNC_POLL_MAX_WAIT",), parse_duration, 300.0, "Cap on one wait between status polls."),
    Spec("export.deadline", ("PFSYNC_EXPORT_DEADLINE",), parse_duration, 21600.0, "Give up on an export that is not complete after this long."),
    Spec("export.parallel_downloads", ("PFSYNC_PARALLEL_DOWNLOADS",), _positive_int, 3, "Files downloaded at once."),
    Spec("export.delete_after_download", ("PFSYNC_DELETE_AFTER_DOWNLOAD",), _bool, True, "DELETE the export job once every file is safely on disk."),
    Spec("export.max_line_bytes", ("PFSYNC_MAX_LINE_BYTES",), _positive_int, 64 * 1024 * 1024, "Longest NDJSON line accepted."),
    Spec("export.max_file_bytes", ("PFSYNC_MAX_FILE_BYTES",), _positive_int, 16 * 1024**3, "Largest export file (decompressed); a larger one fails the export (a hostile or broken server)."),
    Spec("export.max_export_bytes", ("PFSYNC_MAX_EXPORT_BYTES",), _positive_int, 128 * 1024**3, "Most bytes (decompressed) one export may download in all."),
    Spec("export.strict_scopes", ("PFSYNC_STRICT_SCOPES",), _bool, False, "Fail instead of warning when a requested type was not granted or the server does not have it."),
    Spec("export.kickoff_method", ("PFSYNC_KICKOFF_METHOD",), _choice("get", "post"), "get", "Kick-off with GET query parameters or POST Parameters."),
    Spec("export.since_overlap", ("PFSYNC_SINCE_OVERLAP",), parse_duration, 300.0, "Re-export this much history before the checkpoint (safe: loading is idempotent)."),
    Spec("export.validate", ("PFSYNC_EXPORT_VALIDATE",), _choice("structure", "full"), "structure", "structure: cheap per-line check while downloading (JSON validity left to the loader); full: parse every line."),
    # --- load
    Spec("load.bundle_max_bytes", ("PFSYNC_BUNDLE_MAX_BYTES",), _positive_int, 900_000, "Largest synchronous Bundle body (Medplum refuses over 1 MiB)."),
    Spec("load.bundle_max_entries", ("PFSYNC_BUNDLE_MAX_ENTRIES",), _positive_int, 100, "Most entries per Bundle."),
    Spec("load.max_concurrency", ("PFSYNC_MAX_CONCURRENCY",), _positive_int, 4, "Upper bound of concurrent Bundles (adapts below it)."),
    Spec("load.async_batch", ("PFSYNC_ASYNC_BATCH",), _bool, False, "Send large Bundles with Prefer: respond-async (backfills).", flag="--async-batch"),
    Spec("load.async_max_bytes", ("PFSYNC_ASYNC_MAX_BYTES",), _positive_int, 8 * 1024 * 1024, "Largest async Bundle body."),
    Spec("load.normalize", ("PFSYNC_NORMALIZE",), _bool, True, "Drop empty strings, nulls and empty arrays/objects that strict Medplum rejects."),
    Spec("load.deletes", ("PFSYNC_DELETES",), _choice("apply", "ignore", "tag"), "apply", "What to do with the export's deleted entries."),
    Spec("load.upsert_mode", ("PFSYNC_UPSERT_MODE",), _choice("direct", "conditional"), "direct", "direct: search identities, then POST new / PUT-by-id known (~100 quota points per write); conditional: PUT Type?identifier=... (~140, no search)."),
    Spec("load.fetch_missing_references", ("PFSYNC_FETCH_MISSING_REFERENCES",), _bool, True, "Fetch referenced resources the export left out (Practitioner, Organization...)."),
    Spec("load.refresh_referenced_after", ("PFSYNC_REFRESH_REFERENCED_AFTER",), parse_duration, 604_800.0, "sync: referenced resources the export leaves out are re-read when a synced resource names them, and all of them once this long has passed since they last were (0: every run)."),
    Spec("load.attachments", ("PFSYNC_ATTACHMENTS",), _bool, True, "Copy attachments that point at the source into Medplum Binary."),
    Spec("load.attachment_max_bytes", ("PFSYNC_ATTACHMENT_MAX_BYTES",), _positive_int, 50 * 1024 * 1024, "Largest attachment copied (up to eight are in memory at once while copies run)."),
    Spec("load.idmap_cache_bytes", ("PFSYNC_IDMAP_CACHE_BYTES",), _positive_int, 32 * 1024 * 1024, "Memory for the id map's cache (source id -> Medplum id; about 650 bytes per identity); past it, lookups read the id map on disk."),
    Spec("load.park_max_bytes", ("PFSYNC_PARK_MAX_BYTES",), _positive_int, 16 * 1024 * 1024, "Memory for resources waiting for targets whose writes are in flight (about 8x their NDJSON size); past it they wait on disk."),
    Spec("load.attachment_content_types", ("PFSYNC_ATTACHMENT_CONTENT_TYPES",), _list, (), "Allowed attachment content types (empty: any)."),
    # --- sync & scheduling
    Spec("sync.interval_ms", ("PF_SYNC_INTERVAL_MS",), _positive_int, 86_400_000, "Interval of `pfsync sync --every` when no --every is given, in ms."),
    Spec("sync.run_on_startup", ("PF_SYNC_RUN_ON_STARTUP",), _bool, True, "With --every: run once at start instead of waiting an interval."),
    Spec("sync.enabled", ("PF_SYNC_ENABLED",), _bool, True, "Master switch: false makes `pfsync sync` do nothing (and status report it)."),
    Spec("sync.parallel_sources", ("PFSYNC_PARALLEL_SOURCES",), _positive_int, 1, "Sources synced at once."),
    Spec("sync.stale_after", ("PFSYNC_STALE_AFTER",), parse_duration, 172_800.0, "status: unhealthy when the last success is older than this."),
    Spec("sync.adopt_seed_checkpoint", ("PFSYNC_ADOPT_SEED_CHECKPOINT",), _bool, False, "Start from the lastSyncTime of the Medplum Practice Fusion bot integration (its Parameters resource in Medplum)."),
    # --- state & output
    Spec("state.backend", ("PFSYNC_STATE_BACKEND",), _choice("local", "medplum"), "local", "Where checkpoints live: local JSON files or a Basic resource in Medplum."),
    Spec("state.dir", ("PFSYNC_STATE_DIR",), _path, Path(".pfsync"), "Directory of checkpoints, id maps, exports, quarantine and retry queue.", flag="--state-dir"),
    Spec("log.format", ("PFSYNC_LOG_FORMAT",), _choice("auto", "human", "json"), "auto", "auto: human on a TTY, JSON lines otherwise.", flag="--log-format"),
)  # fmt: skip

SPEC_BY_KEY: dict[str, Spec] = {s.key: s for s in SPECS}
_SECRET_FILE_SUFFIX = "_file"


def _hint_for(spec: Spec) -> str:
    ways = []
    if spec.flag:
        ways.append(spec.flag)
    ways.append(f"the {spec.env[0]} environment variable")
    ways.append(f"{spec.name} in the [{spec.section}] table of pfsync.toml")
    return "set it with " + ", ".join(ways)


def _toml_value(table: Mapping[str, Any], spec: Spec, where: str) -> Any:
    """A value from a TOML table, also accepting `<name>_file` for secrets and `<name>_env`."""
    if spec.name in table:
        return table[spec.name]
    if spec.secret and spec.name + _SECRET_FILE_SUFFIX in table:
        path = Path(os.path.expanduser(str(table[spec.name + _SECRET_FILE_SUFFIX])))
        return _read_secret_file(path, f"{where}.{spec.name}_file")
    return None


def read_config_file(path: Path | None, *, cwd: Path | None = None) -> tuple[dict[str, Any], Path | None]:
    """The parsed TOML file: `path` if given (must exist), else ./pfsync.toml if present."""
    explicit = path is not None
    if path is None:
        path = (cwd or Path.cwd()) / DEFAULT_CONFIG_FILE
        if not path.is_file():
            return {}, None
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh), path
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {path} does not exist", setting="--config") from None
        return {}, None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}", setting="--config") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}", setting="--config") from None


_KNOWN_SECTIONS = {s.section for s in SPECS} | {"sources"}


def _known_keys(section: str) -> set[str]:
    """The keys a TOML table may hold: each setting's name, and `<name>_file` for secrets."""
    specs = [s for s in SPECS if s.section == section]
    return {s.name for s in specs} | {s.name + _SECRET_FILE_SUFFIX for s in specs if s.secret}


def _check_keys(table: Mapping[str, Any], section: str, where: str, used_path: Path | None) -> None:
    """A misspelt key would silently leave its setting at the default: refuse it, with a guess."""
    known = _known_keys(section)
    for key in table:
        if key in known:
            continue
        guess = did_you_mean(key, known)
        raise ConfigError(
            f"config file {used_path}: unknown key {key!r} in [{where}]"
            + (f" (did you mean {guess!r}?)" if guess else ""),
            setting=f"{where}.{key}",
            hint=f"the keys of [{section}] are listed in the README's configuration table",
        )


def load_settings(
    *,
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_path: Path | None = None,
    cwd: Path | None = None,
) -> Settings:
    """Resolve every setting from flags (keys are Spec.key), env, the TOML file and defaults."""
    _pending_warnings.clear()
    flags = {k: v for k, v in (flags or {}).items() if v is not None and v != () and v != []}
    env = env or {}
    doc, used_path = read_config_file(config_path, cwd=cwd)
    unknown = set(doc) - _KNOWN_SECTIONS
    if unknown:
        guesses = [g for g in (did_you_mean(u, _KNOWN_SECTIONS) for u in sorted(unknown)) if g]
        raise ConfigError(
            f"config file {used_path}: unknown table(s) {', '.join(sorted(unknown))}"
            + (f" (did you mean {', '.join(guesses)}?)" if guesses else ""),
            setting="--config",
            hint=f"known tables: {', '.join(sorted(_KNOWN_SECTIONS))}",
        )
    for section, table in doc.items():
        if section == "sources" and isinstance(table, list):
            for i, item in enumerate(table):
                if isinstance(item, dict):
                    _check_keys(item, "source", f"sources[{i}]", used_path)
        elif isinstance(table, dict):
            _check_keys(table, section, section, used_path)

    def from_flag(spec: Spec, value: Any) -> Any:
        # A flag comes from the command line: a bad value there is a usage error (exit 2).
        try:
            return spec.parse(value, spec.flag or spec.key)
        except ConfigError as exc:
            raise UsageError(exc.message, hint=exc.hint) from None

    def resolve(spec: Spec, toml_table: Mapping[str, Any], where: str, use_env: bool = True) -> Any:
        if spec.key in flags:
            return from_flag(spec, flags[spec.key])
        if use_env:
            for name in spec.env:
                if env.get(name, "").strip():
                    return spec.parse(env[name], name)
        value = _toml_value(toml_table, spec, where)
        if value is not None:
            return spec.parse(value, f"{where}.{spec.name}")
        return spec.default

    sections: dict[str, dict[str, Any]] = {}
    for spec in SPECS:
        if spec.section == "source":
            continue
        table = doc.get(spec.section, {})
        if not isinstance(table, dict):
            raise ConfigError(
                f"config file {used_path}: [{spec.section}] must be a table", setting="--config"
            )
        sections.setdefault(spec.section, {})[spec.name] = resolve(spec, table, spec.section)

    sources = _resolve_sources(doc, flags, env, resolve, used_path)
    medplum = MedplumSettings(**sections["medplum"])
    if not medplum.base_url.endswith("/"):
        medplum = replace(medplum, base_url=medplum.base_url + "/")
    http = HttpSettings(**sections["http"])
    settings = Settings(
        sources=sources,
        medplum=medplum,
        http=http,
        export=ExportSettings(**sections["export"]),
        load=LoadSettings(**sections["load"]),
        sync=SyncSettings(**sections["sync"]),
        state_backend=sections["state"]["backend"],
        state_dir=sections["state"]["dir"],
        log_format=sections["log"]["format"],
        config_file=used_path,
        warnings=tuple(dict.fromkeys(_pending_warnings)),
    )
    _validate(settings)
    return settings


def _resolve_sources(
    doc: Mapping[str, Any],
    flags: Mapping[str, Any],
    env: Mapping[str, str],
    resolve: Callable[[Spec, Mapping[str, Any], str, bool], Any],
    used_path: Path | None,
) -> tuple[SourceSettings, ...]:
    source_specs = [s for s in SPECS if s.section == "source"]
    tables = doc.get("sources")
    if tables is None:
        single = doc.get("source", {})
        if not isinstance(single, dict):
            raise ConfigError(f"config file {used_path}: [source] must be a table", setting="--config")
        values = {s.name: resolve(s, single, "source", True) for s in source_specs}
        if values["base_url"] is None:
            return ()
        return (_make_source(values),)
    if "source" in doc:
        raise ConfigError(
            f"config file {used_path} has both [source] and [[sources]]",
            setting="--config",
            hint="keep one: [[sources]] for several practices, [source] for one",
        )
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"config file {used_path}: sources must be an array of tables [[sources]]")
    if env.get("PF_FHIR_BASE_URL", "").strip() or "source.base_url" in flags:
        raise ConfigError(
            "PF_FHIR_BASE_URL / --source-url conflicts with the [[sources]] list in the config file",
            setting="source.base_url",
            hint="with several sources, set each base_url in its [[sources]] table and unset PF_FHIR_BASE_URL",
        )
    result: list[SourceSettings] = []
    for i, table in enumerate(tables):
        where = f"sources[{i}]"
        values = {}
        for spec in source_specs:
            # Per-source identity (name, base URL, credentials) comes from the table only; shared
            # settings (types, scope version, ...) may come from the environment for all sources.
            per_source = spec.name in ("name", "base_url", "client_id", "client_secret", "private_key", "key_id",
                                       "groups", "token_url", "jku")  # fmt: skip
            if spec.name == "name" and "name" not in table:
                raise ConfigError(f"config file {used_path}: {where} needs a name", setting=f"{where}.name")
            values[spec.name] = resolve(spec, table, where, not per_source)
            if per_source and spec.key in flags and spec.name != "groups":
                values[spec.name] = resolve(spec, table, where, False)
        if values["base_url"] is None:
            raise ConfigError(
                f"config file {used_path}: {where} needs a base_url", setting=f"{where}.base_url"
            )
        result.append(_make_source(values))
    names = [s.name for s in result]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"config file {used_path}: duplicate source name(s): {', '.join(dupes)}")
    peers = [o.identifier_system.replace("{source}", o.name) for o in result]
    return tuple(
        replace(
            s, peer_systems=tuple(dict.fromkeys(p for p, o in zip(peers, result, strict=True) if o is not s))
        )
        for s in result
    )


def _make_source(values: dict[str, Any]) -> SourceSettings:
    base = values["base_url"].rstrip("/")
    return SourceSettings(**{**values, "base_url": base})


def is_loopback(url: str) -> bool:
    from pfsync.net.policy import is_loopback_host

    return is_loopback_host(urlsplit(url).hostname or "")


def check_transport_url(
    url: str, setting: str, allow_insecure_http: bool, allow_networks: tuple[str, ...] = ()
) -> None:
    """The rules of pfsync.net.policy for a configured URL: TLS everywhere but loopback (plain http
    to another host needs an explicit opt-in), no special-purpose address unless allowed."""
    from pfsync.net.policy import parse_networks, shown_url, url_problem

    problem = url_problem(
        url, allow_insecure_http=allow_insecure_http, allow_networks=parse_networks(allow_networks)
    )
    if problem is None:
        return
    if "plain http" in problem:
        hint = ("use https (http is only allowed for 127.0.0.1/localhost), or set "
                "PFSYNC_ALLOW_INSECURE_HTTP=true if you really mean it")  # fmt: skip
    elif "special-purpose" in problem:
        hint = "if this address is really meant, add its range to PFSYNC_ALLOW_NETWORKS"
    else:
        hint = "use an https:// URL"
    raise ConfigError(f"{setting} {problem}: {shown_url(url)}" if "plain http" in problem
                      else f"{setting}: {shown_url(url)} is refused: {problem}", setting=setting, hint=hint)  # fmt: skip


def _validate(settings: Settings) -> None:
    allow, nets = settings.http.allow_insecure_http, settings.http.allow_networks
    check_transport_url(settings.medplum.base_url, "medplum.base_url", allow, nets)
    if settings.http.proxy:
        check_transport_url(settings.http.proxy, "http.proxy", allow, nets)
    for src in settings.sources:
        check_transport_url(src.base_url, f"source {src.name!r} base_url", allow, nets)
        if src.token_url:
            check_transport_url(src.token_url, f"source {src.name!r} token_url", allow, nets)
        for origin in src.download_allowlist:
            # The bearer token goes to these origins: never over plain http to another host.
            check_transport_url(origin, f"source {src.name!r} download_allowlist", allow, nets)
        if src.auth_method == "auto" and src.client_secret and src.private_key:
            raise ConfigError(
                f"source {src.name!r}: both a client secret and a private key are configured",
                setting="source.auth_method",
                hint="choose one with PFSYNC_AUTH_METHOD=private_key_jwt or client_secret_basic",
            )
        if src.export_level == "group" and not src.groups:
            raise ConfigError(
                f"source {src.name!r}: export level 'group' needs at least one group id",
                setting="source.groups",
                hint="set PFSYNC_GROUPS or --group, or use --level patient",
            )
    _check_namespaces(settings.sources)
    if settings.http.ca_bundle is not None and not settings.http.ca_bundle.is_file():
        raise ConfigError(
            f"http.ca_bundle: {settings.http.ca_bundle} is not a file", setting="http.ca_bundle"
        )


def _check_namespaces(sources: tuple[SourceSettings, ...]) -> None:
    """Two sources must never share an identifier system: ids that collide would merge their
    resources (one practice's data overwriting, or deleting, the other's)."""
    types = [
        "Patient",
        *sorted({"Organization", "Location"}.union(*(s.resource_types for s in sources)) - {"Patient"}),
    ]
    seen: dict[str, str] = {}
    for src in sources:
        for rtype in types:
            try:
                system = identifier_system(src, rtype)
            except (KeyError, IndexError, ValueError) as exc:
                raise ConfigError(
                    f"source {src.name!r}: identifier_system {src.identifier_system!r} is not a valid template ({exc!r})",
                    setting="source.identifier_system",
                    hint="use only the placeholders {type}, {type_lower} and {source}",
                ) from None
            other = seen.setdefault(system, src.name)
            if other != src.name:
                raise ConfigError(
                    f"sources {other!r} and {src.name!r} both use identifier system {system} ({rtype})",
                    setting="source.identifier_system",
                    hint="give each source its own: identifier_system = "
                    '"https://practicefusion.com/fhir/{source}/{type_lower}-id" in its [[sources]] '
                    "table (at most one source, the one already in Medplum, may keep the default)",
                )


def require(value: Any, key: str, context: str) -> Any:
    """Raise the one clear ConfigError for a setting a command needs but nobody set."""
    if value is None or value == ():
        spec = SPEC_BY_KEY[key]
        raise ConfigError(f"{context} needs {spec.env[0]} ({key})", setting=key, hint=_hint_for(spec))
    return value


def identifier_system(source: SourceSettings, resource_type: str) -> str:
    """The identifier system that carries a source id for `resource_type` (docs/medplum.md "Ids and identity")."""
    return source.identifier_system.format(
        type=resource_type, type_lower=resource_type.lower(), source=source.name
    )
