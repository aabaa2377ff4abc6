"""Parsing one setting's value (from a flag, the environment or TOML), and reading secrets.

Every parser takes the raw value and the name to blame (`key`: a TOML key, an env name or a
flag) and returns the typed value or raises ConfigError naming it. Secrets may be given as their
value or as the path of a file holding it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pfsync.core.errors import ConfigError
from pfsync.core.fhir_types import R4_RESOURCE_TYPES, did_you_mean
from pfsync.core.netpolicy import parse_networks
from pfsync.core.redact import Secret

Parser = Callable[[Any, str], Any]


def parse_str(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key} must be a non-empty string", setting=key)
    return value.strip()


def parse_int(value: Any, key: str) -> int:
    try:
        result = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a whole number, got {value!r}", setting=key) from None
    if result < 0:
        raise ConfigError(f"{key} must not be negative, got {result}", setting=key)
    return result


def parse_positive_int(value: Any, key: str) -> int:
    result = parse_int(value, key)
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


def parse_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{key} must be true or false, got {value!r}", setting=key)


def parse_list(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, list | tuple):
        items = [str(v).strip() for v in value]
    elif isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    else:
        raise ConfigError(f"{key} must be a list or a comma-separated string", setting=key)
    return tuple(v for v in items if v)


def parse_networks_setting(value: Any, key: str) -> tuple[str, ...]:
    items = parse_list(value, key)
    for item in items:
        try:
            parse_networks([item])
        except ValueError:
            raise ConfigError(f"{key}: {item!r} is not an address range (CIDR, e.g. 169.254.0.0/16)",
                              setting=key) from None  # fmt: skip
    return items


def parse_types(value: Any, key: str) -> tuple[str, ...]:
    types = parse_list(value, key)
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


def choice(*choices: str) -> Parser:
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


def parse_path(value: Any, key: str) -> Path:
    return Path(os.path.expanduser(parse_str(value, key)))


def parse_url(value: Any, key: str) -> str:
    text = parse_str(value, key)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{key} must be an http(s) URL, got {text!r}", setting=key)
    return text


# Warnings found while resolving (loose secret-file permissions); load_settings hands them to the
# caller in Settings.warnings, since logging is only set up once settings are known.
_pending_warnings: list[str] = []


def take_warnings() -> tuple[str, ...]:
    """The warnings found since the last call (each once), and forget them."""
    found = tuple(dict.fromkeys(_pending_warnings))
    _pending_warnings.clear()
    return found


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


def parse_secret(value: Any, key: str) -> Secret:
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
                return Secret(read_secret_file(candidate, key))
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


def read_secret_file(path: Path, key: str) -> str:
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
