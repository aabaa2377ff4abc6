"""Start both sandboxes together and describe how to point pfsync at them (`pfsync sandbox`).

The environment it hands out never carries a secret in clear: the sandboxes' made-up client
secrets are written to files (mode 0600) in the state directory, and the environment names the
files (pfsync accepts secrets as file paths), so printing the environment leaks nothing.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pfsync.sandbox.source.server import SourceSandbox
from pfsync.sandbox.target.server import TargetSandbox

SOURCE_CLIENT_ID = "pfsync-sandbox"
TARGET_CLIENT_ID = "pfsync-target"


@dataclass
class Sandboxes:
    source: SourceSandbox
    target: TargetSandbox
    state_dir: Path
    env: dict[str, str]
    temporary: bool = False  # state_dir was made for this run: removed by stop()

    def stop(self) -> None:
        self.source.stop()
        self.target.stop()
        if self.temporary:
            shutil.rmtree(self.state_dir, ignore_errors=True)


def _write_secret(path: Path, value: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value)
    return path


def _secret(path: Path) -> str:
    """Reuse the secret of an earlier run on the same state dir, so clients keep working."""
    if path.is_file():
        return path.read_text().strip()
    value = secrets.token_urlsafe(24)
    _write_secret(path, value)
    return value


def start_sandboxes(
    *,
    data: Path | None = None,
    source_port: int = 0,
    target_port: int = 0,
    state_dir: Path | None = None,
) -> Sandboxes:
    """Start the source (Practice Fusion-like) and target (Medplum-like) sandboxes on 127.0.0.1."""
    root = state_dir if state_dir is not None else Path(tempfile.mkdtemp(prefix="pfsync-sandbox-"))
    root.mkdir(parents=True, exist_ok=True)
    source_secret_file = root / "source-client-secret"
    target_secret_file = root / "target-client-secret"
    source_secret = _secret(source_secret_file)
    target_secret = _secret(target_secret_file)
    target = TargetSandbox(
        state_dir=root / "target", port=target_port, client_id=TARGET_CLIENT_ID, client_secret=target_secret
    ).start()
    try:
        source = SourceSandbox(
            data_dir=data,
            state_dir=root / "source",
            port=source_port,
            client_id=SOURCE_CLIENT_ID,
            client_secret=source_secret,
        ).start()
    except BaseException:
        target.stop()
        raise
    env = {
        "PF_FHIR_BASE_URL": source.base_url(),
        "PF_CLIENT_ID": SOURCE_CLIENT_ID,
        "PF_CLIENT_SECRET": str(source_secret_file),
        "MEDPLUM_BASE_URL": target.base_url,
        "MEDPLUM_CLIENT_ID": TARGET_CLIENT_ID,
        "MEDPLUM_CLIENT_SECRET": str(target_secret_file),
    }
    return Sandboxes(source=source, target=target, state_dir=root, env=env, temporary=state_dir is None)


def env_lines(env: dict[str, str]) -> list[str]:
    """`export NAME=value` lines a shell can source."""
    return [f"export {name}={shlex.quote(value)}" for name, value in env.items()]
