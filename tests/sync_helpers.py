"""Helpers of the sync integration tests: the env, real `pfsync sync` subprocesses, target snapshots.

snapshot(target) describes what Medplum holds independently of server ids: per (type, source
identifier) the resource without id/meta, every reference rewritten to the referenced resource's
source identity. Two targets with equal snapshots hold the same data, whatever order runs wrote it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from refcheck import DEFAULT_TYPES, check_references

from pfsync.sandbox.source.server import SourceSandbox
from pfsync.sandbox.target.server import TargetSandbox

# Patient-compartment types plus two the loader fetches as missing reference targets: small
# enough for a few seconds per run, with references across files and types.
TYPES = "Patient,Condition,Encounter,Practitioner,Organization"
PF_SYSTEM = "https://practicefusion.com/fhir/"
REPO = Path(__file__).resolve().parents[1]


def sync_env(source: SourceSandbox, target: TargetSandbox, state_dir: Path, **extra: str) -> dict[str, str]:
    """A full process environment (PATH etc. kept) with only the settings of this test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PF_", "PFSYNC_", "MEDPLUM_"))}
    env.update({
        "PF_FHIR_BASE_URL": source.base_url(), "PF_CLIENT_ID": "pfsync-sandbox", "PF_CLIENT_SECRET": "sandbox-secret",
        "PFSYNC_AUTH_METHOD": "client_secret_basic", "PF_RESOURCE_TYPES": TYPES, "PFSYNC_SOURCE_NAME": "pf",
        "MEDPLUM_BASE_URL": target.base_url, "MEDPLUM_CLIENT_ID": "pfsync-target",
        "MEDPLUM_CLIENT_SECRET": "target-secret", "PFSYNC_STATE_DIR": str(state_dir),
        "PFSYNC_LOG_FORMAT": "json", "PFSYNC_ATTACHMENTS": "false", "NO_COLOR": "1", **extra,
    })  # fmt: skip
    return env


def spawn(env: dict[str, str], *args: str, script: str | None = None) -> subprocess.Popen[bytes]:
    """`python -m pfsync sync --json ARGS`, or `python -c SCRIPT` (a fault-injecting wrapper)."""
    cmd = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "pfsync", *args]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run(env: dict[str, str], *args: str, timeout: float = 60) -> tuple[int, str, str]:
    done = subprocess.run([sys.executable, "-m", "pfsync", *args], env=env, cwd=REPO, capture_output=True,
                          timeout=timeout)  # fmt: skip
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def summary(stdout: str) -> dict[str, Any]:
    lines = [ln for ln in stdout.splitlines() if ln.startswith('{"event":"sync_summary"')]
    assert lines, stdout
    return dict(orjson.loads(lines[-1]))


def wait_until(
    cond: Callable[[], bool], proc: subprocess.Popen[bytes] | None = None, timeout: float = 30
) -> bool:
    """Poll `cond` until true (True), the process ends or the timeout passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        if proc is not None and proc.poll() is not None:
            return cond()
        time.sleep(0.003)
    return False


def checkpoint(state_dir: Path, source: str = "pf") -> dict[str, Any]:
    try:
        return dict(orjson.loads((state_dir / source / "checkpoint.json").read_bytes()))
    except (FileNotFoundError, orjson.JSONDecodeError):
        return {}


def kill(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)


def _identity(rtype: str, res: dict[str, Any]) -> str:
    for ident in res.get("identifier") or []:
        if str(ident.get("system", "")).startswith(PF_SYSTEM):
            return f"{ident['system']}|{ident['value']}"
    return "no-source-identifier:" + orjson.dumps(_strip(res), option=orjson.OPT_SORT_KEYS).decode()


def _strip(res: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in res.items() if k not in ("id", "meta")}


def _rewrite(node: Any, names: dict[str, str]) -> Any:
    if isinstance(node, dict):
        out = {k: _rewrite(v, names) for k, v in node.items()}
        ref = node.get("reference")
        if isinstance(ref, str):
            out["reference"] = names.get(ref, f"UNRESOLVED {ref}")
        return out
    if isinstance(node, list):
        return [_rewrite(v, names) for v in node]
    return node


def snapshot(target: TargetSandbox, types: tuple[str, ...] = DEFAULT_TYPES) -> dict[tuple[str, str], Any]:
    """{(type, source identity): content without id/meta, references as source identities}.

    Asserts no source identity is stored twice (duplicates) and every reference resolves."""
    rows = [(t, r) for t in types for r in target.resources(t)]
    names = {f"{t}/{r['id']}": f"{t}:{_identity(t, r)}" for t, r in rows}
    seen = Counter((t, _identity(t, r)) for t, r in rows)
    dupes = [k for k, n in seen.items() if n > 1]
    assert not dupes, f"duplicates in the target: {dupes[:5]}"
    problems = check_references(target, types)
    assert not problems, problems[:5]
    return {(t, _identity(t, r)): _rewrite(_strip(r), names) for t, r in rows}


def per_type(snap: dict[tuple[str, str], Any]) -> Counter[str]:
    return Counter(t for t, _ in snap)


def diff(got: dict[tuple[str, str], Any], expected: dict[tuple[str, str], Any], limit: int = 3) -> list[str]:
    """The first few differences between two snapshots, field by field (for assertion messages)."""
    out: list[str] = []
    for key in sorted(set(got) | set(expected)):
        a, b = got.get(key), expected.get(key)
        if a == b:
            continue
        if not isinstance(a, dict) or not isinstance(b, dict):
            out.append(f"{key}: {'missing' if a is None else 'extra'}")
        else:
            fields = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            out.append(
                f"{key}: " + "; ".join(f"{f}: got {a.get(f)!r:.600} want {b.get(f)!r:.600}" for f in fields)
            )
        if len(out) >= limit:
            break
    return out
