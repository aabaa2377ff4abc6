"""`pfsync sandbox`: start the local source and target sandboxes and print the environment."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from pfsync.cli.app import app
from pfsync.cli.common import err_console, error_format, errors_handled
from pfsync.cli.common import state as global_options
from pfsync.core.errors import UsageError
from pfsync.core.log import setup_logging

if TYPE_CHECKING:  # not at run time: the Docker image has no pfsync.sandbox
    from pfsync.sandbox.run import Sandboxes


def _sandbox_runner() -> tuple[Callable[[dict[str, str]], list[str]], Callable[..., Sandboxes]]:
    """pfsync.sandbox's entry points; a UsageError where it is not installed (the Docker image)."""
    try:
        from pfsync.sandbox.run import env_lines, start_sandboxes
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("pfsync.sandbox"):
            raise
        raise UsageError(
            "the sandboxes are not installed here (the Docker image carries the product only)",
            hint="run `pfsync sandbox` from a pip install or a checkout of pfsync (scripts/demo)",
        ) from None
    return env_lines, start_sandboxes


@app.command("sandbox")
def sandbox(
    ctx: typer.Context,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="NDJSON directory to serve [default: generated sample data]."),
    ] = None,
    source_port: Annotated[
        int, typer.Option("--source-port", help="Port of the source sandbox (0: any).")
    ] = 8710,
    target_port: Annotated[
        int, typer.Option("--target-port", help="Port of the target sandbox (0: any).")
    ] = 8711,
    state: Annotated[
        Path | None,
        typer.Option(
            "--state", help="Directory for the sandboxes' state (kept across restarts) [default: a temp dir]."
        ),
    ] = None,
    env_file: Annotated[
        Path | None, typer.Option("--env-file", help="Also write the environment to this file (for scripts).")
    ] = None,
) -> None:
    """Serve a Practice Fusion-like source and a Medplum-like target on 127.0.0.1 until stopped.

    Prints the environment (PF_FHIR_BASE_URL, PF_CLIENT_ID, MEDPLUM_BASE_URL, ...) that points
    pfsync at them; the sandboxes' client secrets are written to files in the state directory
    and the environment names those files, so nothing secret is printed. Stop with Ctrl-C or
    SIGTERM; a temporary state directory (no --state) is removed then.

    Examples:

    \b
      pfsync sandbox

    \b
      pfsync sandbox --data ./export --state /tmp/pfsync-sandbox

    In the background, then use it from the same shell (the env file appears once both serve):

    \b
      pfsync sandbox --env-file /tmp/sb.env >/dev/null 2>&1 &

    \b
      until [ -s /tmp/sb.env ]; do sleep 0.2; done; . /tmp/sb.env
    """
    with errors_handled(ctx):
        env_lines, start_sandboxes = _sandbox_runner()
        if data is not None and not data.is_dir():
            raise UsageError(f"--data {data}: not a directory of NDJSON files")
        boxes = start_sandboxes(data=data, source_port=source_port, target_port=target_port, state_dir=state)
    _write_env(env_lines(boxes.env), env_file)
    _serve(ctx, boxes)


def _write_env(lines: list[str], env_file: Path | None) -> None:
    """The environment as shell lines on stdout (the result), and atomically to `env_file` if asked."""
    if env_file is not None:
        tmp = env_file.with_name(env_file.name + ".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, env_file)
    typer.echo("# pfsync sandboxes on 127.0.0.1; paste these lines into your shell:")
    for line in lines:
        typer.echo(line)


def _serve(ctx: typer.Context, boxes: Sandboxes) -> None:
    """Say where the sandboxes serve (stderr, per the output policy), then serve until Ctrl-C or
    SIGTERM, and stop them."""
    # stdout is the result (shell lines to paste or source); stderr follows the output policy.
    opts = global_options(ctx)
    fmt = error_format(opts)
    log = setup_logging(fmt, opts.verbosity)
    console = err_console()
    if fmt == "json":
        log.info("sandbox_ready", extra={"event": "sandbox_ready", "eventDetail": {
            "source": boxes.source.base_url(), "target": boxes.target.base_url, "stateDir": str(boxes.state_dir)}})  # fmt: skip
    elif opts.verbosity >= 0:
        console.print(
            f"source (Practice Fusion-like): {boxes.source.base_url()}\n"
            f"target (Medplum-like):         {boxes.target.base_url}\n"
            f"state:                         {boxes.state_dir}\n"
            "serving until Ctrl-C / SIGTERM",
            markup=False,
            highlight=False,
        )
    stopped = threading.Event()
    # Set from a thread: the handler may run while stopped.wait() holds the Event's own lock.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=stopped.set, daemon=True).start())
    try:
        while not stopped.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        boxes.stop()
        if fmt == "json":
            log.info("sandboxes stopped", extra={"event": "sandbox_stopped"})
        elif opts.verbosity >= 0:
            console.print("sandboxes stopped", markup=False)
