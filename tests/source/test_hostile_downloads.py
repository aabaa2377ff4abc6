"""Hostile export files over real HTTP on 127.0.0.1: bounded work whatever a source sends (issue 15).

A gzip bomb (as a .gz body and as Content-Encoding), a file or an export larger than its limit, a
trickle that would outlast the export deadline, an endless line, a body that is not the encoding
its header claims. pfsync runs in a child process that reports its own peak RSS (VmHWM).
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from hostile_server import Answer, Hostile, bulk_source, run_pfsync, source_env

pytestmark = pytest.mark.integration

NDJSON = {"Content-Type": "application/fhir+ndjson"}
BOMB_BYTES = 160 * 1024 * 1024  # each bomb inflates to this; the compressed body is ~160 KB
RSS_BOUND_MIB = 150  # a child that inflated even one bomb whole would pass it


def _bomb() -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    zeros = bytes(1024 * 1024)
    return b"".join(packer.compress(zeros) for _ in range(BOMB_BYTES // len(zeros))) + packer.flush()


def _lines(n: int, pad: int = 0) -> bytes:
    return b"".join(b'{"resourceType":"Patient","id":"p%d","x":"%s"}\n' % (i, b"y" * pad) for i in range(n))


@pytest.fixture
def source(hostile: Callable[[], Hostile]) -> Hostile:
    server = hostile()
    return server


def test_hostile_gzip_bombs_are_inflated_in_bounded_pieces(source: Hostile, tmp_path: Path) -> None:
    bomb = _bomb()
    bulk_source(source, {
        "bomb1": Answer(200, NDJSON, bomb),  # a .gz file (sniffed by its magic bytes)
        "bomb2": Answer(200, NDJSON, bomb),
        "bomb3": Answer(200, {**NDJSON, "Content-Encoding": "gzip"}, bomb),  # undone by the transport layer
    })  # fmt: skip
    env = source_env(source, tmp_path, PFSYNC_MAX_LINE_BYTES=str(1024 * 1024), PFSYNC_PARALLEL_DOWNLOADS="3")
    run = run_pfsync(env, "export", "--out", str(tmp_path / "out"), timeout=120)
    assert run.code == 0, run.output  # one over-long line per file: dropped and reported
    assert "longer than 1048576 bytes" in run.output
    assert run.max_rss_mib < RSS_BOUND_MIB, f"peak RSS {run.max_rss_mib:.0f} MiB"
    for name in ("bomb1", "bomb2", "bomb3"):  # an over-long line is not fetched again
        assert len(source.requests(f"/files/{name}")) == 1, name


def test_hostile_file_over_its_byte_limit_fails_the_export(source: Hostile, tmp_path: Path) -> None:
    bulk_source(source, {"big": Answer(200, NDJSON, gzip.compress(_lines(20_000, pad=100)))})
    env = source_env(source, tmp_path, PFSYNC_MAX_FILE_BYTES="1000000")
    run = run_pfsync(env, "export", "--out", str(tmp_path / "out"))
    assert run.code == 5, run.output
    assert "larger than 1000000 bytes (export.max_file_bytes)" in run.output
    assert "Traceback" not in run.output


def test_hostile_export_over_its_byte_limit_fails(source: Hostile, tmp_path: Path) -> None:
    files = {f"f{i}": Answer(200, NDJSON, _lines(4000, pad=100)) for i in range(3)}  # ~600 kB each
    bulk_source(source, files)
    env = source_env(source, tmp_path, PFSYNC_MAX_EXPORT_BYTES="1000000")
    run = run_pfsync(env, "export", "--out", str(tmp_path / "out"))
    assert run.code == 5, run.output
    assert "more than 1000000 bytes (export.max_export_bytes)" in run.output


def test_hostile_trickle_is_stopped_by_the_export_deadline(source: Hostile, tmp_path: Path) -> None:
    # One line a piece, 20 pieces a second for far longer than the deadline: every read arrives
    # well within the HTTP timeout, so only the export deadline can end it.
    trickle = Answer(200, NDJSON, (_lines(1) for _ in range(100_000)), pause=0.05)
    bulk_source(source, {"slow": trickle})
    env = source_env(source, tmp_path, PFSYNC_EXPORT_DEADLINE="2", PFSYNC_HTTP_TIMEOUT="5")
    run = run_pfsync(env, "export", "--out", str(tmp_path / "out"), timeout=60)
    assert run.code == 5, run.output
    assert "deadline" in run.output


def test_hostile_content_encoding_that_lies_is_a_clear_failure(source: Hostile, tmp_path: Path) -> None:
    bulk_source(source, {"plain": Answer(200, {**NDJSON, "Content-Encoding": "gzip"}, _lines(3))})
    run = run_pfsync(source_env(source, tmp_path), "export", "--out", str(tmp_path / "out"))
    assert run.code == 5, run.output
    assert "is not valid gzip although its Content-Encoding says so" in run.output
    assert "Traceback" not in run.output
