"""The settings as the library receives them: frozen dataclasses, one per concern, resolved once.

Each field's default here is the setting's one default (pfsync.core.settings_specs reads it for the
README table and `--help`). Resolving flags, environment and TOML into these is
pfsync.core.settings_load; parsing one value is pfsync.core.settings_values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pfsync.core.errors import ConfigError
from pfsync.core.redact import Secret

# docs/practice-fusion.md, "Defaults, identifiers and politeness": the types the Medplum Practice Fusion bot integration syncs by default.
DEFAULT_RESOURCE_TYPES: tuple[str, ...] = (
    "Patient", "Practitioner", "Encounter", "Condition", "Observation", "MedicationRequest",
    "Medication", "MedicationStatement", "AllergyIntolerance", "Immunization", "Procedure",
    "DiagnosticReport", "DocumentReference", "CarePlan", "ServiceRequest", "Binary",
)  # fmt: skip
# docs/practice-fusion.md, "Defaults, identifiers and politeness": the identifier systems of the Medplum Practice Fusion bot integration, e.g. .../patient-id.
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
    allow_networks: tuple[str, ...] = ()  # pfsync.core.netpolicy: special-purpose ranges let through
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
    # pfsync.load.spool: one attachment copy's bytes in memory; past it, in a private scratch file.
    attachment_memory_bytes: int = 1024 * 1024
    # pfsync.load.idmap: the id map's memory cache (past it, lookups read SQLite).
    idmap_cache_bytes: int = 16 * 1024 * 1024
    # pfsync.load.idmap: SQLite's page cache for the id map file (the map, the holds, their TEMP tables).
    idmap_sqlite_cache_bytes: int = 4 * 1024 * 1024
    # pfsync.load.writes: resources waiting in memory for targets whose writes are in flight.
    park_max_bytes: int = 64 * 1024 * 1024


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


def identifier_system(source: SourceSettings, resource_type: str) -> str:
    """The identifier system that carries a source id for `resource_type` (docs/medplum.md "Ids and identity")."""
    return source.identifier_system.format(
        type=resource_type, type_lower=resource_type.lower(), source=source.name
    )
