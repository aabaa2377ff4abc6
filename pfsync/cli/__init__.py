"""The command-line interface: a thin layer over the library (one module per command group)."""

from __future__ import annotations

from pfsync.cli import auth as _auth  # noqa: F401  (registers commands)
from pfsync.cli import export as _export  # noqa: F401
from pfsync.cli import load as _load  # noqa: F401
from pfsync.cli import sandbox as _sandbox  # noqa: F401
from pfsync.cli import sync as _sync  # noqa: F401
from pfsync.cli import verify as _verify  # noqa: F401
from pfsync.cli.app import app

__all__ = ["app", "main"]


def main() -> None:
    app()
