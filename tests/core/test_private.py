"""Private files (issue 16, criterion 6): 0700/0600 whatever the umask, no links followed, no
state directory of another user."""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sync_helpers import sync_env
from typer.testing import CliRunner

from pfsync.cli import app
from pfsync.core.errors import ExitCode, StateError
from pfsync.core.private import anonymous_file, create_exclusive, open_private, private_dir, private_sqlite
from pfsync.load.quarantine import QUARANTINE, WrappedLog
from pfsync.sandbox.source.server import SourceSandbox
from pfsync.sandbox.target.server import TargetSandbox

runner = CliRunner()


@pytest.fixture
def loose_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _loose(root: Path) -> list[str]:
    """Everything under `root` (itself included) that is not 0700 (directories) or 0600 (files)."""
    bad = []
    for path in [root, *root.rglob("*")]:
        want = 0o700 if path.is_dir() else 0o600
        if path.is_symlink() or _mode(path) != want:
            bad.append(f"{path.relative_to(root.parent)} {oct(_mode(path))}")
    return bad


def test_private_dir_and_files_ignore_the_umask(tmp_path: Path, loose_umask: None) -> None:
    deep = private_dir(tmp_path / "a" / "b")
    assert _mode(tmp_path / "a") == _mode(deep) == 0o700
    os.close(open_private(deep / "f", os.O_WRONLY | os.O_CREAT))
    assert _mode(deep / "f") == 0o600
    old = tmp_path / "old"
    old.mkdir(mode=0o755)
    (old / "data").write_text("x")
    os.chmod(old / "data", 0o644)
    private_dir(old, tighten=True)
    os.close(open_private(old / "data", os.O_RDONLY))
    assert _mode(old) == 0o700 and _mode(old / "data") == 0o600  # an older pfsync's files narrowed


def test_sqlite_wal_and_shm_are_private(tmp_path: Path, loose_umask: None) -> None:
    path = tmp_path / "x.sqlite"
    private_sqlite(path)
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE t (x)")
    db.execute("INSERT INTO t VALUES (1)")
    db.commit()
    sides = [Path(f"{path}-wal"), Path(f"{path}-shm")]
    assert all(p.exists() for p in sides)
    assert [_mode(p) for p in [path, *sides]] == [0o600] * 3
    db.close()


def test_links_are_refused_and_their_targets_untouched(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    link = tmp_path / "state" / "lock"
    link.parent.mkdir()
    link.symlink_to(victim)
    with pytest.raises(StateError, match="symbolic link"):
        open_private(link, os.O_RDWR | os.O_CREAT)
    log = WrappedLog(link.parent / "quarantine.ndjson", QUARANTINE)
    (link.parent / "quarantine.ndjson").symlink_to(victim)
    with pytest.raises(StateError, match="symbolic link"):
        log.add(file="f", line=1, reason="r", raw=b"{}")
    # A temp/part file is created anew (O_EXCL): a link planted at its name is removed, not followed.
    part = link.parent / ".Patient.1.ndjson.part"
    part.symlink_to(victim)
    with os.fdopen(create_exclusive(part), "wb") as fh:
        fh.write(b"new")
    assert victim.read_text() == "precious" and part.read_bytes() == b"new" and not part.is_symlink()
    hard = link.parent / "hard"
    os.link(victim, hard)
    with pytest.raises(StateError, match="hard links"):
        open_private(hard, os.O_RDWR)


def test_a_directory_of_another_user_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    private_dir(tmp_path / "mine")
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(tmp_path).st_uid + 1)
    with pytest.raises(StateError, match="belongs to another user") as info:
        private_dir(tmp_path / "mine")
    assert info.value.exit_code == ExitCode.STATE


def test_sync_and_export_write_only_private_files(
    source: SourceSandbox, target: TargetSandbox, tmp_path: Path, loose_umask: None
) -> None:
    """Over real HTTP, umask 022: every directory 0700, every file 0600, the id map's WAL included,
    a quarantine file too (one resource Medplum refuses), and `export --out`."""
    source.upsert({"resourceType": "Patient", "id": "bad-1", "foo": "bar"})  # strict Medplum: 400
    state = tmp_path / "state"
    env = sync_env(source, target, state, PF_RESOURCE_TYPES="Patient")
    result = runner.invoke(app, ["sync", "--json"], env=env)
    assert result.exit_code == ExitCode.PARTIAL, result.output
    assert (state / "pf" / "quarantine.ndjson").is_file() and (state / "pf" / "idmap.sqlite").is_file()
    assert _loose(state) == []
    out = tmp_path / "out"
    result = runner.invoke(app, ["export", "--out", str(out), "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert {"job.json", "manifest.json", "Patient.1.ndjson"} <= {p.name for p in out.iterdir()}
    assert _loose(out) == []


def test_sync_refuses_a_planted_lock_link_and_a_foreign_state_dir(
    source: SourceSandbox, target: TargetSandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    state = tmp_path / "state"
    (state / "pf").mkdir(parents=True)
    (state / "pf" / "lock").symlink_to(victim)
    env = sync_env(source, target, state, PF_RESOURCE_TYPES="Patient")
    result = runner.invoke(app, ["sync", "--json"], env=env)
    assert result.exit_code == ExitCode.STATE, result.output
    assert "symbolic link" in result.output and victim.read_text() == "precious"
    assert target.count("Patient") == 0

    (state / "pf" / "lock").unlink()
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(state).st_uid + 1)
    result = runner.invoke(app, ["sync", "--json"], env=env)
    assert result.exit_code == ExitCode.STATE, result.output
    assert "belongs to another user" in result.output
    assert target.count("Patient") == 0


def _scratch_round_trip(directory: Path) -> None:
    """An anonymous file in `directory` holds data, is 0600, and no name leads to it."""
    fd = anonymous_file(directory)
    try:
        os.write(fd, b"patient data")
        assert os.pread(fd, 100, 0) == b"patient data"
        info = os.fstat(fd)
        assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_nlink == 0
        assert list(directory.iterdir()) == []
    finally:
        os.close(fd)


def test_anonymous_file_is_private_and_nameless_whatever_the_umask(tmp_path: Path, loose_umask: None) -> None:
    _scratch_round_trip(tmp_path)


def test_anonymous_file_without_o_tmpfile_is_created_exclusive_0600_and_unlinked_at_once(
    tmp_path: Path, loose_umask: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A filesystem without O_TMPFILE: a named file, created O_EXCL (never through a link), 0600
    # from its first moment, and gone from the directory before the caller gets it.
    real_open = os.open
    created: list[tuple[str, int, int]] = []

    def no_tmpfile(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        if flags & getattr(os, "O_TMPFILE", 0) == getattr(os, "O_TMPFILE", -1):
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        fd = real_open(path, flags, mode, **kw)
        created.append((os.path.basename(path), flags, stat.S_IMODE(os.fstat(fd).st_mode)))
        return fd

    monkeypatch.setattr(os, "open", no_tmpfile)
    _scratch_round_trip(tmp_path)
    [(name, flags, mode)] = created
    assert name.startswith(".pfsync-") and mode == 0o600
    assert flags & os.O_EXCL and flags & os.O_NOFOLLOW
