"""Resolving settings: command-line flags, then the environment, then the TOML file, then defaults.

`load_settings` reads every row of pfsync.core.settings_specs.SPECS from those places, builds the
dataclasses of pfsync.core.settings_model once, and checks what only the whole can tell (URLs against
pfsync.core.netpolicy, credentials that conflict, sources sharing an identifier system).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pfsync.core.errors import ConfigError, UsageError
from pfsync.core.fhir_types import did_you_mean
from pfsync.core.netpolicy import is_loopback_host, parse_networks, shown_url, url_problem
from pfsync.core.settings_model import (
    DEFAULT_CONFIG_FILE,
    ExportSettings,
    HttpSettings,
    LoadSettings,
    MedplumSettings,
    Settings,
    SourceSettings,
    SyncSettings,
    identifier_system,
)
from pfsync.core.settings_specs import SPECS, Spec
from pfsync.core.settings_values import read_secret_file, take_warnings

_SECRET_FILE_SUFFIX = "_file"


def _toml_value(table: Mapping[str, Any], spec: Spec, where: str) -> Any:
    """A value from a TOML table; a secret may also be given as `<name>_file` (a path to read)."""
    if spec.name in table:
        return table[spec.name]
    if spec.secret and spec.name + _SECRET_FILE_SUFFIX in table:
        path = Path(os.path.expanduser(str(table[spec.name + _SECRET_FILE_SUFFIX])))
        return read_secret_file(path, f"{where}.{spec.name}_file")
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


class _Resolver:
    """One setting's value from the first place that sets it: flag, environment, TOML table, default."""

    def __init__(self, flags: Mapping[str, Any], env: Mapping[str, str]) -> None:
        self.flags, self.env = flags, env

    def __call__(self, spec: Spec, toml_table: Mapping[str, Any], where: str, use_env: bool = True) -> Any:
        if spec.key in self.flags:
            # A flag comes from the command line: a bad value there is a usage error (exit 2).
            try:
                return spec.parse(self.flags[spec.key], spec.flag or spec.key)
            except ConfigError as exc:
                raise UsageError(exc.message, hint=exc.hint) from None
        if use_env:
            for name in spec.env:
                if self.env.get(name, "").strip():
                    return spec.parse(self.env[name], name)
        value = _toml_value(toml_table, spec, where)
        if value is not None:
            return spec.parse(value, f"{where}.{spec.name}")
        return spec.default


def load_settings(
    *,
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_path: Path | None = None,
    cwd: Path | None = None,
) -> Settings:
    """Resolve every setting from flags (keys are Spec.key), env, the TOML file and defaults."""
    take_warnings()  # none left over from an earlier call
    flags = {k: v for k, v in (flags or {}).items() if v is not None and v != () and v != []}
    env = env or {}
    doc, used_path = read_config_file(config_path, cwd=cwd)
    _check_tables(doc, used_path)
    resolve = _Resolver(flags, env)
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
    settings = _build(sections, _resolve_sources(doc, resolve, used_path), used_path)
    _validate(settings)
    return settings


def _check_tables(doc: Mapping[str, Any], used_path: Path | None) -> None:
    """Every table and key of the TOML file is one we know (a typo would silently keep a default)."""
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


def _build(
    sections: Mapping[str, Mapping[str, Any]], sources: tuple[SourceSettings, ...], used_path: Path | None
) -> Settings:
    medplum = MedplumSettings(**sections["medplum"])
    if not medplum.base_url.endswith("/"):
        medplum = replace(medplum, base_url=medplum.base_url + "/")
    return Settings(
        sources=sources,
        medplum=medplum,
        http=HttpSettings(**sections["http"]),
        export=ExportSettings(**sections["export"]),
        load=LoadSettings(**sections["load"]),
        sync=SyncSettings(**sections["sync"]),
        state_backend=sections["state"]["backend"],
        state_dir=sections["state"]["dir"],
        log_format=sections["log"]["format"],
        config_file=used_path,
        warnings=take_warnings(),
    )


_SOURCE_SPECS = [s for s in SPECS if s.section == "source"]
# Per-source identity (name, base URL, credentials) comes from each [[sources]] table only; shared
# settings (types, scope version, ...) may come from the environment for all sources.
_PER_SOURCE = ("name", "base_url", "client_id", "client_secret", "private_key", "key_id", "groups", "token_url",
               "jku")  # fmt: skip


def _resolve_sources(
    doc: Mapping[str, Any], resolve: _Resolver, used_path: Path | None
) -> tuple[SourceSettings, ...]:
    tables = doc.get("sources")
    if tables is None:
        single = doc.get("source", {})
        if not isinstance(single, dict):
            raise ConfigError(f"config file {used_path}: [source] must be a table", setting="--config")
        values = {s.name: resolve(s, single, "source") for s in _SOURCE_SPECS}
        return () if values["base_url"] is None else (_make_source(values),)
    if "source" in doc:
        raise ConfigError(
            f"config file {used_path} has both [source] and [[sources]]",
            setting="--config",
            hint="keep one: [[sources]] for several practices, [source] for one",
        )
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"config file {used_path}: sources must be an array of tables [[sources]]")
    if resolve.env.get("PF_FHIR_BASE_URL", "").strip() or "source.base_url" in resolve.flags:
        raise ConfigError(
            "PF_FHIR_BASE_URL / --source-url conflicts with the [[sources]] list in the config file",
            setting="source.base_url",
            hint="with several sources, set each base_url in its [[sources]] table and unset PF_FHIR_BASE_URL",
        )
    result = [_listed_source(table, f"sources[{i}]", resolve, used_path) for i, table in enumerate(tables)]
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


def _listed_source(
    table: Mapping[str, Any], where: str, resolve: _Resolver, used_path: Path | None
) -> SourceSettings:
    """One [[sources]] table."""
    if "name" not in table:
        raise ConfigError(f"config file {used_path}: {where} needs a name", setting=f"{where}.name")
    values = {spec.name: resolve(spec, table, where, spec.name not in _PER_SOURCE) for spec in _SOURCE_SPECS}
    if values["base_url"] is None:
        raise ConfigError(f"config file {used_path}: {where} needs a base_url", setting=f"{where}.base_url")
    return _make_source(values)


def _make_source(values: dict[str, Any]) -> SourceSettings:
    base = values["base_url"].rstrip("/")
    return SourceSettings(**{**values, "base_url": base})


def is_loopback(url: str) -> bool:
    return is_loopback_host(urlsplit(url).hostname or "")


def check_transport_url(
    url: str, setting: str, allow_insecure_http: bool, allow_networks: tuple[str, ...] = ()
) -> None:
    """The rules of pfsync.core.netpolicy for a configured URL: TLS everywhere but loopback (plain http
    to another host needs an explicit opt-in), no special-purpose address unless allowed."""
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
