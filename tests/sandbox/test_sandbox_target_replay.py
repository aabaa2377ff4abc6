"""Target sandbox against the recorded Medplum transcripts: the shared replay tool must report every
compared case as a match, quota cases included (docs/medplum.md: the transcripts are the truth)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from target_fixtures import QUOTA_CLIENT, QUOTA_SECRET, TARGET_CLIENT, TARGET_SECRET

from pfsync.sandbox.target.server import TargetSandbox

SHARED = Path(__file__).resolve().parents[3] / "shared"
TOOL = SHARED / "tools" / "replay_transcripts.py"
TRANSCRIPTS = SHARED / "fixtures" / "transcripts" / "medplum"
CASES = sorted(TRANSCRIPTS.glob("[0-9][0-9]-*.json"))
# Reported but never counted: case 30's serialization conflicts are random (the tool's own rule).
INFORMATIONAL = 1
QUOTA_CASES = sum("quota" in p.name for p in CASES)


def _replay(target: TargetSandbox, *extra: str) -> dict:  # type: ignore[type-arg]
    cmd = [
        sys.executable,
        str(TOOL),
        str(TRANSCRIPTS),
        target.base_url,
        TARGET_CLIENT,
        TARGET_SECRET,
        "--json",
        "--timeout",
        "60",
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    report = json.loads(proc.stdout)
    mismatches = [(c["case"], c["name"], c["detail"]) for c in report["cases"] if c["result"] == "mismatch"]
    assert mismatches == [], proc.stderr
    assert proc.returncode == 0
    return dict(report)


def test_target_replays_every_transcript_including_quota(target: TargetSandbox) -> None:
    # `target` resets the quota windows, so the tool finds the stock-quota client's window fresh.
    report = _replay(target, "--quota-client", QUOTA_CLIENT, QUOTA_SECRET)
    assert report["skipped"] == 0
    assert report["matched"] == report["compared"] == len(CASES) - INFORMATIONAL


def test_target_replays_non_quota_transcripts(target: TargetSandbox) -> None:
    report = _replay(target)
    assert report["matched"] == report["compared"] == len(CASES) - INFORMATIONAL - QUOTA_CASES
