"""The export directory's manifest journal (issue 16, criterion 7): O(1) per landed file."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

import pfsync.source.exportjob as exportjob
from pfsync.core import private
from pfsync.core.errors import StateError
from pfsync.source.exportjob import JOURNAL_FILE, MANIFEST_FILE, ExportDir, LandedFile


def _landed(directory: Path, n: int) -> LandedFile:
    return LandedFile(type="Observation", path=directory / f"Observation.{n}.ndjson", sha256="ab" * 32, lines=1000,
                      bytes=123_456, count=1000, url=f"https://ehr.example/files/{n}")  # fmt: skip


def test_100000_landed_files_cost_o1_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes written for the bookkeeping stay proportional to the files landed (the whole manifest
    rewritten per file wrote ~n²/2 lines: 5 * 10^9 for 100,000 outputs), and nothing is lost."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # the disk's speed is not what is measured here
    written = {"manifest": 0, "rewrites": 0}
    real_write = private.replace_atomically

    def counting_write(path: Path, data: bytes) -> None:
        if path.name == MANIFEST_FILE:
            written["manifest"] += len(data)
            written["rewrites"] += 1
            assert written["rewrites"] <= 20, "manifest.json rewritten far too often"
        real_write(path, data)

    monkeypatch.setattr(exportjob, "replace_atomically", counting_write)
    n = 100_000
    directory = ExportDir(tmp_path)
    for i in range(1, n + 1):
        directory.record(_landed(tmp_path, i))
    journal = tmp_path / JOURNAL_FILE
    final = (tmp_path / MANIFEST_FILE).stat().st_size + (journal.stat().st_size if journal.exists() else 0)
    assert written["manifest"] <= 3 * final
    assert written["rewrites"] <= 20
    again = ExportDir(tmp_path)
    assert len(again.manifest.files) == n
    assert again.manifest.files["Observation.77777.ndjson"] == _landed(tmp_path, 77777)


def test_journal_survives_a_kill_and_a_torn_line(tmp_path: Path) -> None:
    directory = ExportDir(tmp_path)
    for i in range(1, 6):
        directory.record(_landed(tmp_path, i))
    # manifest.json has the first file; the journal holds the others (no rewrite per file).
    assert len(orjson.loads((tmp_path / MANIFEST_FILE).read_bytes())["files"]) == 1
    with open(tmp_path / JOURNAL_FILE, "ab") as fh:
        fh.write(b'{"name": "Observation.6.nd')  # killed mid-append
    names = set(ExportDir(tmp_path).manifest.files)
    assert names == {f"Observation.{i}.ndjson" for i in range(1, 6)}
    ExportDir(tmp_path).save_manifest()
    assert not (tmp_path / JOURNAL_FILE).exists()
    assert len(ExportDir(tmp_path).manifest.files) == 5


def test_a_corrupt_journal_line_is_a_state_error(tmp_path: Path) -> None:
    ExportDir(tmp_path).record(_landed(tmp_path, 1))
    (tmp_path / JOURNAL_FILE).write_bytes(b"not json\n")
    with pytest.raises(StateError, match=r"manifest.journal line 1 is corrupt"):
        ExportDir(tmp_path)


def test_changed_files_names_each_file_that_no_longer_matches_manifest_json(tmp_path: Path) -> None:
    """What `verify` refuses and `load` warns about: a file missing, cut short, or changed in place
    (same size, another sha256), and an entry that names no file; an intact file is not named."""
    assert exportjob.changed_files(tmp_path) == []  # no manifest.json: nothing to compare with
    contents = {
        f"Observation.{n}.ndjson": b'{"resourceType":"Observation","id":"%d"}\n' % n for n in range(4)
    }
    export = ExportDir(tmp_path)
    for name, data in contents.items():
        (tmp_path / name).write_bytes(data)
        export.record(LandedFile(type="Observation", path=tmp_path / name, sha256=exportjob.sha256_of(tmp_path / name),
                                 lines=1, bytes=len(data)))  # fmt: skip
    export.save_manifest()
    assert exportjob.changed_files(tmp_path) == []
    (tmp_path / "Observation.0.ndjson").unlink()
    (tmp_path / "Observation.1.ndjson").write_bytes(contents["Observation.1.ndjson"][:10])
    (tmp_path / "Observation.2.ndjson").write_bytes(contents["Observation.2.ndjson"].replace(b"2", b"9"))
    assert exportjob.changed_files(tmp_path) == [
        "Observation.0.ndjson is missing",
        f"Observation.1.ndjson has 10 bytes, manifest.json records {len(contents['Observation.1.ndjson'])}",
        "Observation.2.ndjson has another sha256 than manifest.json records",
    ]
    assert exportjob.changed_files(tmp_path, sha256=False)[:2] == exportjob.changed_files(tmp_path)[:2]
    assert len(exportjob.changed_files(tmp_path, sha256=False)) == 2  # sizes only: the in-place change passes
    doc = orjson.loads((tmp_path / MANIFEST_FILE).read_bytes())
    doc["files"].append({"name": "../elsewhere.ndjson"})
    (tmp_path / MANIFEST_FILE).write_bytes(orjson.dumps(doc))
    assert exportjob.changed_files(tmp_path)[-1].startswith("an entry of manifest.json names no file")
    (tmp_path / MANIFEST_FILE).write_bytes(b"{not json")
    with pytest.raises(StateError, match=r"manifest\.json is unreadable"):
        exportjob.changed_files(tmp_path)
