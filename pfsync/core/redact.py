"""Keep secrets out of every byte pfsync writes: the `Secret` type and the redaction filter.

Two lines of defence. First, secrets travel as `Secret` objects whose repr/str never show the
value, so an f-string or a traceback's locals cannot leak them. Second, every secret value (and
every token we obtain at run time) is registered here, and `redact()` scrubs registered values
plus anything shaped like a bearer token, a JWT, an Authorization header or a PEM private key
from any text before it reaches a log line, an error message or a file, and drops the query of
every absolute URL in it.
"""

from __future__ import annotations

import re
import threading
from typing import Final

MASK: Final = "***"
_MIN_SECRET_LEN: Final = 4  # shorter values would mask ordinary words

_lock = threading.Lock()
_values: set[str] = set()
_pattern: re.Pattern[str] | None = None

# Shapes that are secret whatever their value: JWTs (assertions, tokens), Authorization header
# values, PEM private keys, and `access_token`/`client_secret`/`client_assertion` fields.
_SHAPES: Final = re.compile(
    r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"
    r"|(?i:(?<=bearer )|(?<=basic ))[A-Za-z0-9._~+/=-]{8,}"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)"
    r'|(?i:(?<="access_token":")|(?<="client_secret":")|(?<="client_assertion":")|(?<="id_token":"))[^"]+'
    r"|(?i:(?<=access_token=)|(?<=client_secret=)|(?<=client_assertion=))[^&\s\"']+",
    re.DOTALL,
)


def register(value: str | None) -> None:
    """Remember a secret value so that `redact` masks it anywhere it appears."""
    global _pattern
    if not value or len(value) < _MIN_SECRET_LEN:
        return
    with _lock:
        if value in _values:
            return
        _values.add(value)
        # Also mask each line of multi-line secrets (a PEM printed line by line).
        for line in value.splitlines():
            # PEM armour lines are not secret; masking them would stop the PEM shape below from
            # recognising (and masking) the body of any other private key.
            if len(line.strip()) >= 16 and not line.strip().startswith("-----"):
                _values.add(line.strip())
        ordered = sorted(_values, key=len, reverse=True)
        _pattern = re.compile("|".join(re.escape(v) for v in ordered))


# The query of an absolute URL: signed storage URLs and status URLs carry signatures and tokens
# there, so no URL is ever shown with its query (a JSON string's escapes are left intact).
_URL_QUERY: Final = re.compile(r"""(https?://[^\s"'<>?#\\]+)(\?[^\s"'<>\\]*)""", re.IGNORECASE)


def _drop_query(match: re.Match[str]) -> str:
    query = match.group(2)
    return match.group(1) + query[len(query.rstrip(":.,;)")) :]  # punctuation after the URL stays


def redact(text: str) -> str:
    """Return `text` with every registered secret and every secret-shaped string masked, and every
    absolute URL without its query."""
    pattern = _pattern
    if pattern is not None:
        text = pattern.sub(MASK, text)
    if "://" in text:
        text = _URL_QUERY.sub(_drop_query, text)
    return _SHAPES.sub(MASK, text)


class Secret:
    """A secret string that never shows itself. Call `reveal()` only where the value is sent."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value
        register(value)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({MASK!r})"

    def __str__(self) -> str:
        return MASK

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)
