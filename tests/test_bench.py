"""scripts/bench cannot rot: it runs at its smallest size and writes its table (no timing asserted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

# scripts/bench starts both sandboxes in its own process, where the listening guard cannot see.
pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("cpu", "source", "export", "ingest", "load", "resync", "quota", "rss", "e2e")


def test_bench_tiny_size_writes_every_section(tmp_path: Path) -> None:
    out, raw = tmp_path / "BENCH.md", tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PF_", "MEDPLUM_", "PFSYNC_"))}
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench"), "--size", "tiny", "--out", str(out), "--json", str(raw)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = out.read_text()
    assert "| section | measure | figure |" in text
    assert "Command: `scripts/bench --size tiny" in text
    assert "cores" in text and "Python" in text
    data = orjson.loads(raw.read_bytes())
    assert not data["failures"]
    found = {row["section"] for row in data["rows"]}
    assert found == set(SECTIONS), found
    for row in data["rows"]:
        assert row["value"] is not None and row["value"] >= 0, row
