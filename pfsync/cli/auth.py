"""`pfsync auth test` and `pfsync auth keygen`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pfsync.cli.app import app
from pfsync.cli.common import JsonOpt, SourceOpt, not_implemented

auth_app = typer.Typer(
    help="Check credentials and capabilities, and make keys for SMART Backend Services.",
    no_args_is_help=True,
)
app.add_typer(auth_app, name="auth")


@auth_app.command("test")
def auth_test(ctx: typer.Context, source: SourceOpt = None, json_out: JsonOpt = False) -> None:
    """Check every configured source and Medplum: reachability, TLS, discovery, token, scopes, export levels.

    Examples:

      pfsync auth test

      pfsync auth test --source practice-a --json
    """
    not_implemented(ctx, "auth test")


@auth_app.command("keygen")
def auth_keygen(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", help="Directory for the key pair files.")] = Path("."),
    alg: Annotated[str, typer.Option("--alg", help="RS384 (RSA 3072) or ES384 (P-384).")] = "ES384",
    kid: Annotated[
        str | None, typer.Option("--kid", help="Key id [default: a thumbprint of the key].")
    ] = None,
) -> None:
    """Generate a key pair to register with the EHR: private PEM (mode 0600) and public JWKS.

    Examples:

      pfsync auth keygen --out keys/ --alg ES384
    """
    not_implemented(ctx, "auth keygen")
