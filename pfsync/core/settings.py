"""Settings: resolved once at the edge into frozen dataclasses; the library never reads os.environ.

Precedence, highest first: command-line flags, environment, the TOML config file (`--config`,
default `pfsync.toml` in the working directory if present), defaults. The environment names of
the Medplum Practice Fusion bot integration (PF_*, MEDPLUM_*) are accepted so its deployments
carry over.

This module is the one import for the rest of pfsync; the work is split by job:

- pfsync.core.settings_model: the dataclasses, whose field defaults are the settings' defaults;
- pfsync.core.settings_specs: the table of settings (`SPECS`: TOML key, env names, flag, parser, help),
  which the README's configuration table and `--help` are generated from and checked against;
- pfsync.core.settings_values: parsing one value, and secrets given as a value or a file;
- pfsync.core.settings_load: `load_settings` (flags > environment > TOML > defaults) and the checks
  only the whole configuration allows.
"""

from __future__ import annotations

from pfsync.core.settings_load import check_transport_url, is_loopback, load_settings, read_config_file
from pfsync.core.settings_model import (
    DEFAULT_CONFIG_FILE,
    DEFAULT_IDENTIFIER_SYSTEM,
    DEFAULT_RESOURCE_TYPES,
    AuthMethod,
    DeleteMode,
    ExportLevel,
    ExportSettings,
    ExportValidate,
    HttpSettings,
    LoadSettings,
    LogFormat,
    MedplumAuth,
    MedplumSettings,
    ScopeVersion,
    Settings,
    SourceSettings,
    StateBackend,
    SyncSettings,
    UpsertMode,
    identifier_system,
)
from pfsync.core.settings_specs import SPEC_BY_KEY, SPECS, Spec, require
from pfsync.core.settings_values import parse_duration

__all__ = [
    "DEFAULT_CONFIG_FILE",
    "DEFAULT_IDENTIFIER_SYSTEM",
    "DEFAULT_RESOURCE_TYPES",
    "SPECS",
    "SPEC_BY_KEY",
    "AuthMethod",
    "DeleteMode",
    "ExportLevel",
    "ExportSettings",
    "ExportValidate",
    "HttpSettings",
    "LoadSettings",
    "LogFormat",
    "MedplumAuth",
    "MedplumSettings",
    "ScopeVersion",
    "Settings",
    "SourceSettings",
    "Spec",
    "StateBackend",
    "SyncSettings",
    "UpsertMode",
    "check_transport_url",
    "identifier_system",
    "is_loopback",
    "load_settings",
    "parse_duration",
    "read_config_file",
    "require",
]
