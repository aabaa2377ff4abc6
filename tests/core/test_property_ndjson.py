"""Property tests: the NDJSON reader never crashes, and every bad line is named by file and line.

Whatever bytes an export hands us (garbage, invalid UTF-8, truncated lines, huge lines, deep
nesting, wrong types, gzip cut short), `iter_file` yields a Record or a BadLine per non-blank line
and never raises; valid lines come back exactly, in order, with their line numbers.
"""

from __future__ import annotations

import gzip
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pfsync.core.ndjson import BadLine, Record, iter_file

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------------------------------------
# Strategies

_type_names = st.sampled_from(["Patient", "Observation", "Encounter", "Condition", "Practitioner", "Binary"])
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**53), max_value=2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def resources(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = draw(st.dictionaries(st.text(max_size=10), _json, max_size=5))
    body["resourceType"] = draw(_type_names)
    body["id"] = draw(st.from_regex(r"[A-Za-z0-9\-.]{1,20}", fullmatch=True))
    return body


def _one_line(data: bytes) -> bytes:
    return data.replace(b"\n", b" ")


# A bad line: bytes that are not one JSON object with a FHIR resourceType.
_bad_lines = st.one_of(
    st.binary(min_size=1, max_size=60).map(_one_line),  # arbitrary bytes
    st.just(b'{"resourceType": "Patient", "name": "\xff\xfe"}'),  # invalid UTF-8 inside a string
    st.just(b"\xc3\x28\xa0\xa1"),  # invalid UTF-8 sequences
    _json.filter(lambda v: not isinstance(v, dict)).map(orjson.dumps),  # JSON, but not an object
    st.dictionaries(st.text(max_size=6).filter(lambda k: k != "resourceType"), _json, max_size=3).map(
        orjson.dumps
    ),  # an object without resourceType
    st.one_of(
        st.integers(-(2**63), 2**63 - 1),
        st.none(),
        st.lists(st.integers(-(2**63), 2**63 - 1), max_size=2),
        st.just(""),
        st.just("lower"),
        st.just("Bad Type"),
        st.just("Ünïcode"),
    ).map(
        lambda t: orjson.dumps({"resourceType": t, "id": "x"})
    ),  # fmt: skip - resourceType of the wrong type or not a type name
    resources().map(lambda r: orjson.dumps(r)[:-1]),  # truncated: the closing brace is missing
)


def _expected_record(raw: bytes) -> dict[str, Any] | None:
    """Independent oracle: the resource a line holds, or None if it must be reported as bad."""
    try:
        value = orjson.loads(raw.strip())
    except orjson.JSONDecodeError:
        return None
    if not isinstance(value, dict):
        return None
    rtype = value.get("resourceType")
    if not (isinstance(rtype, str) and rtype.isascii() and rtype.isalpha() and rtype[:1].isupper()):
        return None
    return value


@contextmanager
def _file(data: bytes, name: str = "Patient.ndjson") -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        yield path


def _read(path: Path, **kw: Any) -> list[Record | BadLine]:
    items = list(iter_file(path, **kw))
    for item in items:
        assert isinstance(item, Record | BadLine)
        assert item.path == path  # every problem names its file
        if isinstance(item, Record):
            assert isinstance(item.resource, dict)
            assert isinstance(item.resource["resourceType"], str)
            assert item.line >= 1
        else:
            assert item.reason and len(item.raw) <= 1024
            assert str(path) in str(item)
    return items


# ------------------------------------------------------------------------------------------------
# Properties


@FAST
@given(st.binary(max_size=2048))
def test_ndjson_arbitrary_bytes_never_raise(data: bytes) -> None:
    with _file(data) as path:
        items = _read(path)
    lines = data.count(b"\n") + 1
    for item in items:
        assert 0 <= item.line <= lines


@FAST
@given(st.lists(resources(), min_size=1, max_size=12))
def test_ndjson_valid_lines_come_back_exactly_in_order(batch: list[dict[str, Any]]) -> None:
    lines = [orjson.dumps(r) for r in batch]
    with _file(b"\n".join(lines) + b"\n") as path:
        items = _read(path)
    assert [i.resource for i in items if isinstance(i, Record)] == batch
    assert [i.line for i in items] == list(range(1, len(batch) + 1))
    assert [i.raw for i in items if isinstance(i, Record)] == lines


@FAST
@given(st.lists(st.one_of(resources().map(orjson.dumps), _bad_lines, st.just(b""), st.just(b"  \r")),
                min_size=1, max_size=15))  # fmt: skip
def test_ndjson_mixed_lines_each_reported_once_with_its_line_number(lines: list[bytes]) -> None:
    with _file(b"\n".join(lines)) as path:
        items = _read(path)
    by_line = {i.line: i for i in items}
    assert len(by_line) == len(items), "a line was reported twice"
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            assert number not in by_line  # blank lines are skipped, not errors
            continue
        assert number in by_line, f"line {number} vanished: {raw!r}"
        expected = _expected_record(raw)
        item = by_line[number]
        if expected is None:
            assert isinstance(item, BadLine), f"line {number} {raw!r} accepted as {item}"
        else:
            assert isinstance(item, Record) and item.resource == expected


@FAST
@given(st.lists(resources(), min_size=1, max_size=8), st.data())
def test_ndjson_truncated_file_keeps_every_complete_line(
    batch: list[dict[str, Any]], data: st.DataObject
) -> None:
    full = b"\n".join(orjson.dumps(r) for r in batch)
    cut = data.draw(st.integers(min_value=1, max_value=len(full)))
    with _file(full[:cut]) as path:
        items = _read(path)
    complete = full[:cut].count(b"\n")
    records = [i for i in items if isinstance(i, Record)]
    assert [r.resource for r in records[:complete]] == batch[:complete]
    if len(items) > complete:
        last = items[complete]
        assert last.line == complete + 1
        if isinstance(last, BadLine):
            assert "JSON" in last.reason or "UTF-8" in last.reason


@FAST
@given(st.lists(resources(), min_size=2, max_size=8), st.data())
def test_ndjson_truncated_gzip_keeps_a_prefix_and_says_so(
    batch: list[dict[str, Any]], data: st.DataObject
) -> None:
    full = gzip.compress(b"\n".join(orjson.dumps(r) for r in batch) + b"\n")
    cut = data.draw(st.integers(min_value=2, max_value=len(full) - 1))
    with _file(full[:cut], "Observation.ndjson.gz") as path:
        items = _read(path)
    records = [i.resource for i in items if isinstance(i, Record)]
    assert records == batch[: len(records)]
    assert len(records) < len(batch) or any(isinstance(i, BadLine) for i in items)
    bad = [i for i in items if isinstance(i, BadLine)]
    assert bad, "a truncated gzip file must not read as complete"


@FAST
@given(st.lists(resources(), min_size=1, max_size=6), st.integers(min_value=0, max_value=5), st.data())
def test_ndjson_huge_line_is_skipped_and_named(
    batch: list[dict[str, Any]], where: int, data: st.DataObject
) -> None:
    limit = max(len(orjson.dumps(r)) for r in batch) + 16
    huge = orjson.dumps(
        {"resourceType": "Patient", "id": "big", "text": "x" * (limit * data.draw(st.integers(1, 40)))}
    )
    lines = [orjson.dumps(r) for r in batch]
    where = min(where, len(lines))
    lines.insert(where, huge)
    with _file(b"\n".join(lines) + b"\n") as path:
        items = _read(path, max_line_bytes=limit)
    assert len(items) == len(lines)
    bad = items[where]
    assert isinstance(bad, BadLine) and bad.line == where + 1 and "longer than" in bad.reason
    assert [i.resource for i in items if isinstance(i, Record)] == batch


@FAST
@given(st.integers(min_value=1, max_value=5000), st.sampled_from(["[", '{"a":']))
def test_ndjson_deep_nesting_is_a_bad_line_or_a_record(depth: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    line = ('{"resourceType":"Basic","id":"deep","x":' + opener * depth + "1" + closer * depth + "}").encode()
    with _file(line + b"\n" + orjson.dumps({"resourceType": "Patient", "id": "after"})) as path:
        items = _read(path)
    assert len(items) == 2
    assert items[0].line == 1
    assert isinstance(items[1], Record) and items[1].resource["id"] == "after"


def test_ndjson_bad_first_line_then_long_file_keeps_every_line(tmp_path: Path) -> None:
    lines = [b'{"resourceType": "Patient", broken'] + [
        orjson.dumps({"resourceType": "Patient", "id": f"p{i}"}) for i in range(50)
    ]
    path = tmp_path / "Patient.ndjson"
    path.write_bytes(b"\n".join(lines) + b"\n")
    items = _read(path, max_line_bytes=100)
    assert [i.resource["id"] for i in items if isinstance(i, Record)] == [f"p{i}" for i in range(50)]


@FAST
@given(st.lists(resources(), min_size=3, max_size=30))
def test_ndjson_bad_first_line_loses_nothing_after_it(batch: list[dict[str, Any]]) -> None:
    # A first line that starts like an object but is not JSON makes the reader consider a pretty
    # document; the lines after it must still all be read, however long the file is.
    lines = [b'{"resourceType": "Patient", broken', *(orjson.dumps(r) for r in batch)]
    limit = max(len(x) for x in lines) + 1  # every line fits; the file as a whole does not
    with _file(b"\n".join(lines) + b"\n") as path:
        items = _read(path, max_line_bytes=limit)
    assert isinstance(items[0], BadLine) and items[0].line == 1
    assert [i.resource for i in items if isinstance(i, Record)] == batch


@FAST
@given(st.lists(resources(), min_size=1, max_size=6), st.booleans())
def test_ndjson_pretty_document_or_bundle_reads_every_resource(
    batch: list[dict[str, Any]], bundle: bool
) -> None:
    if bundle:
        doc: Any = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in batch]}
        expected = batch
    else:
        doc, expected = batch[0], batch[:1]
    with _file(orjson.dumps(doc, option=orjson.OPT_INDENT_2), "Patient.json") as path:
        items = _read(path)
    assert [i.resource for i in items if isinstance(i, Record)] == expected


@FAST
@given(st.lists(st.one_of(_json, st.just({"resource": "not an object"}), st.just({"resource": None})),
                max_size=5))  # fmt: skip
def test_ndjson_bundle_with_odd_entries_never_raises(entries: list[Any]) -> None:
    doc = {"resourceType": "Bundle", "type": "collection", "entry": entries}
    with _file(orjson.dumps(doc, option=orjson.OPT_INDENT_2), "Bundle.json") as path:
        _read(path)


def test_ndjson_utf8_bom_line_is_reported_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "bom.ndjson"
    path.write_bytes(
        b'\xef\xbb\xbf{"resourceType":"Patient","id":"a"}\n{"resourceType":"Patient","id":"b"}\n'
    )
    items = _read(path)
    assert len(items) == 2
    assert isinstance(items[1], Record) and items[1].resource["id"] == "b"
