"""The table of settings (`SPECS`): every setting's TOML key, environment names, flag, parser and help.

A setting's default is not written here: it is the default of its dataclass field
(pfsync.core.settings_model), read by `Spec.default`, so the README table and `--help` cannot
disagree with what the library gets. Only a field without a dataclass default (a source's name
and base URL, which every source must have) declares its default in its Spec.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Final

from pfsync.core.errors import ConfigError
from pfsync.core.settings_model import (
    ExportSettings,
    HttpSettings,
    LoadSettings,
    MedplumSettings,
    Settings,
    SourceSettings,
    SyncSettings,
)
from pfsync.core.settings_values import (
    Parser,
    choice,
    parse_bool,
    parse_duration,
    parse_int,
    parse_list,
    parse_networks_setting,
    parse_path,
    parse_positive_int,
    parse_secret,
    parse_str,
    parse_types,
    parse_url,
)

# Where each TOML section's settings land: one dataclass per section, or a field of Settings.
SECTION_CLASSES: Final[dict[str, type]] = {
    "source": SourceSettings, "medplum": MedplumSettings, "http": HttpSettings, "export": ExportSettings,
    "load": LoadSettings, "sync": SyncSettings,
}  # fmt: skip
SETTINGS_FIELDS: Final[dict[str, str]] = {
    "state.backend": "state_backend", "state.dir": "state_dir", "log.format": "log_format",
}  # fmt: skip


class _NoDefault:
    """The marker of a Spec whose default comes from its dataclass field."""

    def __repr__(self) -> str:
        return "FROM_DATACLASS"


FROM_DATACLASS: Final = _NoDefault()


def target_field(key: str) -> dataclasses.Field[Any]:
    """The dataclass field a setting fills (KeyError for a key no dataclass has)."""
    if key in SETTINGS_FIELDS:
        owner: type = Settings
        name = SETTINGS_FIELDS[key]
    else:
        section, name = key.split(".", 1)
        owner = SECTION_CLASSES[section]
    return {f.name: f for f in dataclasses.fields(owner)}[name]


def field_default(key: str) -> Any:
    """The dataclass default of a setting, or FROM_DATACLASS when its field has none."""
    f = target_field(key)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return FROM_DATACLASS


@dataclass(frozen=True)
class Spec:
    """One setting: where it lives in TOML (`key`), its env names, parser, help and flag.

    `required_default` only for a field without a dataclass default (see the module docstring)."""

    key: str
    env: tuple[str, ...]
    parse: Parser
    help: str
    flag: str | None = None
    secret: bool = False
    required_default: Any = FROM_DATACLASS

    @property
    def default(self) -> Any:
        """The value when nothing sets it: the dataclass field's default, declared there once."""
        own = field_default(self.key)
        return self.required_default if own is FROM_DATACLASS else own

    @property
    def section(self) -> str:
        return self.key.split(".", 1)[0]

    @property
    def name(self) -> str:
        return self.key.split(".", 1)[1]


SOURCE_TYPES_ENV = ("PF_RESOURCE_TYPES", "PFSYNC_RESOURCE_TYPES")

SPECS: tuple[Spec, ...] = (
    # --- source (one practice; several with [[sources]] in the TOML file)
    Spec("source.name", ("PFSYNC_SOURCE_NAME",), parse_str, "Name of the source (used in state, logs, identifier templates).", required_default="default"),
    Spec("source.base_url", ("PF_FHIR_BASE_URL",), parse_url, "FHIR base URL of the EHR (one per practice for Practice Fusion).", flag="--source-url", required_default=None),
    Spec("source.client_id", ("PF_CLIENT_ID",), parse_str, "Client id registered with the EHR."),
    Spec("source.client_secret", ("PF_CLIENT_SECRET",), parse_secret, "Client secret for client_secret_basic (value or path to a file).", secret=True),
    Spec("source.private_key", ("PF_PRIVATE_KEY",), parse_secret, "Private key for private_key_jwt: PEM text, or path to a PEM/JWK/JWKS file.", secret=True),
    Spec("source.key_id", ("PF_KEY_ID",), parse_str, "kid of the registered public key (taken from a JWK if absent)."),
    Spec("source.auth_method", ("PFSYNC_AUTH_METHOD",), choice("auto", "private_key_jwt", "client_secret_basic"), "How to authenticate to the EHR; auto picks from what is configured."),
    Spec("source.token_url", ("PFSYNC_TOKEN_URL",), parse_url, "Token endpoint override (default: discovered from .well-known/smart-configuration)."),
    Spec("source.jku", ("PFSYNC_JKU",), parse_url, "Optional jku header: the registered JWKS URL."),
    Spec("source.scope_version", ("PFSYNC_SCOPE_VERSION",), choice("auto", "v1", "v2"), "SMART scope syntax: v1 system/X.read, v2 system/X.rs; auto reads the server's capabilities."),
    Spec("source.resource_types", SOURCE_TYPES_ENV, parse_types, "Resource types to export and load (comma-separated).", flag="--types"),
    Spec("source.export_level", ("PFSYNC_EXPORT_LEVEL",), choice("auto", "group", "patient", "system"), "Export level; auto = group when groups are set, else patient.", flag="--level"),
    Spec("source.groups", ("PFSYNC_GROUPS",), parse_list, "Group ids to export (comma-separated).", flag="--group"),
    Spec("source.type_filter", ("PFSYNC_TYPE_FILTER",), parse_list, "_typeFilter values, e.g. Observation?category=laboratory."),
    Spec("source.identifier_system", ("PFSYNC_IDENTIFIER_SYSTEM",), parse_str, "Identifier system template; {type}, {type_lower} and {source} are filled in."),
    Spec("source.download_allowlist", ("PFSYNC_DOWNLOAD_ALLOWLIST",), parse_list, "Extra origins that may receive the bearer token for file downloads."),
    Spec("source.enabled", ("PFSYNC_SOURCE_ENABLED",), parse_bool, "Whether this source is synced."),
    # --- Medplum
    Spec("medplum.base_url", ("MEDPLUM_BASE_URL",), parse_url, "Medplum server root (FHIR lives under fhir/R4/).", flag="--medplum-url"),
    Spec("medplum.client_id", ("MEDPLUM_CLIENT_ID",), parse_str, "Medplum ClientApplication id."),
    Spec("medplum.client_secret", ("MEDPLUM_CLIENT_SECRET",), parse_secret, "Medplum ClientApplication secret (value or path to a file).", secret=True),
    Spec("medplum.auth", ("PFSYNC_MEDPLUM_AUTH",), choice("token", "basic"), "token: client_credentials token, cached; basic: HTTP Basic on every FHIR call."),
    # --- HTTP
    Spec("http.timeout", ("PFSYNC_HTTP_TIMEOUT",), parse_duration, "Timeout of one HTTP request to the EHR."),
    Spec("http.load_timeout", ("PFSYNC_LOAD_TIMEOUT",), parse_duration, "Timeout of one Bundle request to Medplum (large batches take ~50 s)."),
    Spec("http.retries", ("PFSYNC_HTTP_RETRIES",), parse_int, "Retries of a request on network errors, 408, 429 and 5xx."),
    Spec("http.retry_max_wait", ("PFSYNC_RETRY_MAX_WAIT",), parse_duration, "Cap on one wait between retries (Retry-After is clamped to it)."),
    Spec("http.allow_insecure_http", ("PFSYNC_ALLOW_INSECURE_HTTP",), parse_bool, "Allow plain http:// to non-loopback hosts (never needed in production)."),
    Spec("http.ca_bundle", ("PFSYNC_CA_BUNDLE",), parse_path, "CA bundle for TLS verification (verification itself cannot be turned off)."),
    Spec("http.allow_networks", ("PFSYNC_ALLOW_NETWORKS",), parse_networks_setting, "Special-purpose address ranges (CIDR, comma-separated) requests may go to; link-local, metadata and other such addresses are refused otherwise."),
    Spec("http.proxy", ("PFSYNC_PROXY",), parse_str, "Proxy for every request (http:// or https:// URL); HTTP_PROXY and friends are ignored unless http.trust_env."),
    Spec("http.max_response_bytes", ("PFSYNC_MAX_RESPONSE_BYTES",), parse_positive_int, "Largest answer read whole (decompressed: searches, Bundle responses, manifests); export files and attachments have their own limits."),
    Spec("http.trust_env", ("PFSYNC_TRUST_ENV",), parse_bool, "Take the proxy (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY) and CA (SSL_CERT_FILE, SSL_CERT_DIR) from the environment."),
    # --- export
    Spec("export.poll_max_wait", ("PFSYNC_POLL_MAX_WAIT",), parse_duration, "Cap on one wait between status polls."),
    Spec("export.deadline", ("PFSYNC_EXPORT_DEADLINE",), parse_duration, "Give up on an export that is not complete after this long."),
    Spec("export.parallel_downloads", ("PFSYNC_PARALLEL_DOWNLOADS",), parse_positive_int, "Files downloaded at once."),
    Spec("export.delete_after_download", ("PFSYNC_DELETE_AFTER_DOWNLOAD",), parse_bool, "DELETE the export job once every file is safely on disk."),
    Spec("export.max_line_bytes", ("PFSYNC_MAX_LINE_BYTES",), parse_positive_int, "Longest NDJSON line accepted."),
    Spec("export.max_file_bytes", ("PFSYNC_MAX_FILE_BYTES",), parse_positive_int, "Largest export file (decompressed); a larger one fails the export (a hostile or broken server)."),
    Spec("export.max_export_bytes", ("PFSYNC_MAX_EXPORT_BYTES",), parse_positive_int, "Most bytes (decompressed) one export may download in all."),
    Spec("export.strict_scopes", ("PFSYNC_STRICT_SCOPES",), parse_bool, "Fail instead of warning when a requested type was not granted or the server does not have it."),
    Spec("export.kickoff_method", ("PFSYNC_KICKOFF_METHOD",), choice("get", "post"), "Kick-off with GET query parameters or POST Parameters."),
    Spec("export.since_overlap", ("PFSYNC_SINCE_OVERLAP",), parse_duration, "Re-export this much history before the checkpoint (safe: loading is idempotent)."),
    Spec("export.validate", ("PFSYNC_EXPORT_VALIDATE",), choice("structure", "full"), "structure: cheap per-line check while downloading (JSON validity left to the loader); full: parse every line."),
    # --- load
    Spec("load.bundle_max_bytes", ("PFSYNC_BUNDLE_MAX_BYTES",), parse_positive_int, "Largest synchronous Bundle body (Medplum refuses over 1 MiB)."),
    Spec("load.bundle_max_entries", ("PFSYNC_BUNDLE_MAX_ENTRIES",), parse_positive_int, "Most entries per Bundle."),
    Spec("load.max_concurrency", ("PFSYNC_MAX_CONCURRENCY",), parse_positive_int, "Upper bound of concurrent Bundles (adapts below it)."),
    Spec("load.async_batch", ("PFSYNC_ASYNC_BATCH",), parse_bool, "Send large Bundles with Prefer: respond-async (backfills).", flag="--async-batch"),
    Spec("load.async_max_bytes", ("PFSYNC_ASYNC_MAX_BYTES",), parse_positive_int, "Largest async Bundle body."),
    Spec("load.normalize", ("PFSYNC_NORMALIZE",), parse_bool, "Drop empty strings, nulls and empty arrays/objects that strict Medplum rejects."),
    Spec("load.deletes", ("PFSYNC_DELETES",), choice("apply", "ignore", "tag"), "What to do with the export's deleted entries."),
    Spec("load.upsert_mode", ("PFSYNC_UPSERT_MODE",), choice("direct", "conditional"), "direct: search identities, then POST new / PUT-by-id known (~100 quota points per write); conditional: PUT Type?identifier=... (~140, no search)."),
    Spec("load.fetch_missing_references", ("PFSYNC_FETCH_MISSING_REFERENCES",), parse_bool, "Fetch referenced resources the export left out (Practitioner, Organization...)."),
    Spec("load.refresh_referenced_after", ("PFSYNC_REFRESH_REFERENCED_AFTER",), parse_duration, "sync: referenced resources the export leaves out are re-read when a synced resource names them, and all of them once this long has passed since they last were (0: every run)."),
    Spec("load.attachments", ("PFSYNC_ATTACHMENTS",), parse_bool, "Copy attachments that point at the source into Medplum Binary."),
    Spec("load.attachment_max_bytes", ("PFSYNC_ATTACHMENT_MAX_BYTES",), parse_positive_int, "Largest attachment copied; a larger one keeps its source URL, counted as attachments_left with a load_attachment_left warning."),
    Spec("load.attachment_memory_bytes", ("PFSYNC_ATTACHMENT_MEMORY_BYTES",), parse_positive_int, "Memory for one attachment copy (up to eight run at once); past it the copy's bytes wait in a private scratch file in the state directory, gone when the copy ends."),
    Spec("load.idmap_cache_bytes", ("PFSYNC_IDMAP_CACHE_BYTES",), parse_positive_int, "Memory for the id map's cache (source id -> Medplum id; about 650 bytes per identity); past it, lookups read the id map on disk."),
    Spec("load.idmap_sqlite_cache_bytes", ("PFSYNC_IDMAP_SQLITE_CACHE_BYTES",), parse_positive_int, "Memory for SQLite's page cache of the id map file (the map and the resources held on disk); more makes the id map's writes of a large first sync cheaper."),
    Spec("load.park_max_bytes", ("PFSYNC_PARK_MAX_BYTES",), parse_positive_int, "Memory for resources waiting for targets whose writes are in flight (about 8x their NDJSON size); past it they wait on disk. An eighth more holds resources waiting for an attachment copy."),
    Spec("load.attachment_content_types", ("PFSYNC_ATTACHMENT_CONTENT_TYPES",), parse_list, "Allowed attachment content types (empty: any); another type keeps its source URL, counted as attachments_left."),
    # --- sync & scheduling
    Spec("sync.interval_ms", ("PF_SYNC_INTERVAL_MS",), parse_positive_int, "Interval of `pfsync sync --every` when no --every is given, in ms."),
    Spec("sync.run_on_startup", ("PF_SYNC_RUN_ON_STARTUP",), parse_bool, "With --every: run once at start instead of waiting an interval."),
    Spec("sync.enabled", ("PF_SYNC_ENABLED",), parse_bool, "Master switch: false makes `pfsync sync` do nothing (and status report it)."),
    Spec("sync.parallel_sources", ("PFSYNC_PARALLEL_SOURCES",), parse_positive_int, "Sources synced at once."),
    Spec("sync.stale_after", ("PFSYNC_STALE_AFTER",), parse_duration, "status: unhealthy when the last success is older than this."),
    Spec("sync.adopt_seed_checkpoint", ("PFSYNC_ADOPT_SEED_CHECKPOINT",), parse_bool, "Start from the lastSyncTime of the Medplum Practice Fusion bot integration (its Parameters resource in Medplum)."),
    # --- state & output
    Spec("state.backend", ("PFSYNC_STATE_BACKEND",), choice("local", "medplum"), "Where checkpoints live: local JSON files or a Basic resource in Medplum."),
    Spec("state.dir", ("PFSYNC_STATE_DIR",), parse_path, "Directory of checkpoints, id maps, exports, quarantine and retry queue.", flag="--state-dir"),
    Spec("log.format", ("PFSYNC_LOG_FORMAT",), choice("auto", "human", "json"), "auto: human on a TTY, JSON lines otherwise.", flag="--log-format"),
)  # fmt: skip

SPEC_BY_KEY: dict[str, Spec] = {s.key: s for s in SPECS}


def _hint_for(spec: Spec) -> str:
    ways = []
    if spec.flag:
        ways.append(spec.flag)
    ways.append(f"the {spec.env[0]} environment variable")
    ways.append(f"{spec.name} in the [{spec.section}] table of pfsync.toml")
    return "set it with " + ", ".join(ways)


def require(value: Any, key: str, context: str) -> Any:
    """Raise the one clear ConfigError for a setting a command needs but nobody set."""
    if value is None or value == ():
        spec = SPEC_BY_KEY[key]
        raise ConfigError(f"{context} needs {spec.env[0]} ({key})", setting=key, hint=_hint_for(spec))
    return value
