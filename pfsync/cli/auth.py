"""`pfsync auth test` and `pfsync auth keygen`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich import box
from rich.table import Table

from pfsync.cli.app import app
from pfsync.cli.common import (
    JsonOpt,
    MedplumUrlOpt,
    SourceOpt,
    SourceUrlOpt,
    build_settings,
    out_console,
    run,
    wants_json,
)
from pfsync.core.redact import redact

auth_app = typer.Typer(
    help="Check credentials and capabilities, and make keys for SMART Backend Services.",
    no_args_is_help=True,
)
app.add_typer(auth_app, name="auth")

_MARK = {"ok": "ok", "warn": "WARN", "fail": "FAIL", "skip": "-"}


@auth_app.command("test")
def auth_test(
    ctx: typer.Context,
    source: SourceOpt = None,
    json_out: JsonOpt = False,
    no_medplum: Annotated[
        bool, typer.Option("--no-medplum", help="Check only the source(s), not Medplum.")
    ] = False,
    source_url: SourceUrlOpt = None,
    medplum_url: MedplumUrlOpt = None,
) -> None:
    """Check every configured source and Medplum: reachability, TLS, discovery, token, scopes, export levels.

    For each source: base URL reachable, TLS, clock skew, token endpoint discovery, auth method,
    token and expiry, scopes requested vs granted, which export levels answer (Group, Patient,
    system) and whether _type and _since are accepted; every probe job is cancelled at once.
    For Medplum: token, a cheap FHIR read and the RateLimit quota. Exits non-zero (3 config,
    4 auth, 75 unreachable) when something needed fails, with a hint per failure.

    Examples:

    \b
      pfsync auth test

    \b
      pfsync auth test --source practice-a --json
    """

    def work() -> None:
        from pfsync.net.http import make_client
        from pfsync.sync.authcheck import run_auth_test

        settings = build_settings(ctx)
        with make_client(settings.http) as client:
            report = run_auth_test(settings, client, source_name=source, include_medplum=not no_medplum)
        console = out_console()
        if wants_json(json_out):
            typer.echo(redact(orjson.dumps(report.to_json()).decode()))
        else:
            for target in report.targets:
                title = f"{target.kind} {target.name}" + (f"  {target.url}" if target.url else "")
                table = Table(title=redact(title), box=box.SIMPLE, title_justify="left")
                table.add_column("check")
                table.add_column("result")
                table.add_column("detail", overflow="fold")
                hints: list[str] = []
                for check in target.checks:
                    table.add_row(check.name, _MARK[check.status], redact(check.detail))
                    if check.hint and check.status in ("fail", "warn"):
                        hints.append(f"hint ({check.name}): {redact(check.hint)}")
                console.print(table)
                for line in hints:
                    console.print(line, markup=False, highlight=False)
        error = report.error()
        if error is not None:
            raise error

    run(ctx, work)


@auth_app.command("keygen")
def auth_keygen(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", help="Directory for the key pair files.")] = Path("."),
    alg: Annotated[str, typer.Option("--alg", help="ES384 (P-384, default) or RS384 (RSA 3072).")] = "ES384",
    kid: Annotated[
        str | None, typer.Option("--kid", help="Key id [default: the RFC 7638 thumbprint of the key].")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Generate a key pair to register with the EHR: private PEM (mode 0600) and public JWKS.

    Writes pfsync-private-key.pem (never overwritten) and pfsync-jwks.json into --out, and
    prints the PF_KEY_ID to configure. Publish the JWKS at the JWKS URL you register with the
    EHR; the private key never leaves this machine.

    Examples:

    \b
      pfsync auth keygen --out keys/ --alg ES384

    \b
      pfsync auth keygen --out keys/ --alg RS384 --kid pfsync-2025
    """

    def work() -> None:
        from pfsync.source.keys import generate_key_pair, write_key_pair

        pair = generate_key_pair(alg, kid=kid)
        private_path, jwks_path = write_key_pair(pair, out)
        if wants_json(json_out):
            doc = {"kid": pair.kid, "alg": pair.alg, "privateKeyFile": str(private_path.resolve()),
                   "jwksFile": str(jwks_path.resolve()), "jwks": pair.jwks}  # fmt: skip
            typer.echo(orjson.dumps(doc).decode())
            return
        private_abs = private_path.resolve()
        lines = [
            f"Generated an {pair.alg} key pair.",
            f"  private key: {private_path}  (mode 0600: keep it secret, never commit it)",
            f"  public JWKS: {jwks_path}",
            "",
            f"PF_KEY_ID={pair.kid}",
            "",
            "Next steps:",
            f"  1. Publish {jwks_path.name} at an https URL (your JWKS URL).",
            '  2. Register the app with the EHR as a "System or Bulk export" app with that JWKS URL;',
            "     each practice admin must then enable FHIR and authorise the app.",
            "  3. Configure pfsync:",
            "       PF_CLIENT_ID=<the client id the EHR assigned>",
            f"       PF_PRIVATE_KEY={private_abs}",
            f"       PF_KEY_ID={pair.kid}",
            "       PFSYNC_JKU=<your JWKS URL>   (optional)",
            "  4. Check everything: pfsync auth test",
        ]
        for line in lines:
            typer.echo(line)

    run(ctx, work)
