"""Comments and docstrings cite the repository's own docs/, never a path a clone does not have.

Only comments and docstrings are checked: code may read the shared fixtures beside the checkout at
test time (`parents[2] / "shared" / "fixtures"`), which is reading data, not citing a document.
"""

from __future__ import annotations

import io
import re
import tokenize
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("medplum", "practice-fusion", "bulk-data")

# Citations of something outside the repository, with what to cite instead.
OUTSIDE = [
    (re.compile(r"\.\./shared\b"), "a path beside the checkout"),
    (re.compile(r"\bshared/(docs|fixtures/transcripts)\b"), "the shared docs or transcripts"),
    (
        re.compile(r"\btranscripts?\s+\d{2}(?!\d)"),
        "a transcript by number (cite docs/X.md, recorded case NN)",
    ),
    (re.compile(r"\btranscripts/(medplum|bulk-data-server)\b"), "a transcript directory"),
    (re.compile(r"\bREADME findings?\s+\d"), "a transcripts README finding"),
    (re.compile(r"\bSTYLE\.md\b"), "the shared style guide"),
]
DOC_NAME = re.compile(r"\b(medplum|practice-fusion|bulk-data)\.md\b")
# `docs/X.md "Title"`, also `docs/X.md, "A", "B"`; a title may be wrapped across two docstring lines.
SECTION = re.compile(
    r'\bdocs/(medplum|practice-fusion|bulk-data)\.md(,|:)?\s*((?:"[^"]{1,80}"(?:\s*(?:,|/|and)\s*)?)+)'
)
NUM = r"\d{2}(?!\d)"
CASES = re.compile(rf"\b[Rr]ecorded cases?\s+({NUM}(?:(?:\s*[-/]\s*|,\s*|\s+and\s+){NUM}(?![\d,]\d))*)")


def source_files() -> Iterator[tuple[Path, str]]:
    """(path, "python" | "shell") for every source file under pfsync/, tests/ and scripts/."""
    for top in ("pfsync", "tests", "scripts"):
        for path in sorted((ROOT / top).rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            if path.suffix == ".py":
                yield path, "python"
            elif not path.suffix:
                first = path.read_text(errors="replace").split("\n", 1)[0]
                if first.startswith("#!") and "python" in first:
                    yield path, "python"
                elif first.startswith("#!") and first.rstrip().endswith(("sh", "bash")):
                    yield path, "shell"


def prose(path: Path, kind: str) -> Iterator[tuple[int, str]]:
    """(line, text) of each comment and docstring (a string literal that is a whole statement)."""
    text = path.read_text()
    if kind == "shell":
        for number, line in enumerate(text.splitlines(), 1):
            stripped = line.lstrip()
            if stripped.startswith("#") and not stripped.startswith("#!"):
                yield number, stripped
        return
    tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    quiet = {tokenize.NL, tokenize.COMMENT}
    starts = {tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING}
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.COMMENT:
            yield tok.start[0], tok.string
        elif tok.type == tokenize.STRING:
            before = next((t for t in reversed(tokens[:i]) if t.type not in quiet), None)
            after = next((t for t in tokens[i + 1 :] if t.type not in quiet), None)
            if (before is None or before.type in starts) and (
                after is None or after.type in (tokenize.NEWLINE, tokenize.ENDMARKER)
            ):
                yield tok.start[0], tok.string


def all_prose() -> Iterator[tuple[str, int, str]]:
    for path, kind in source_files():
        for line, text in prose(path, kind):
            yield path.relative_to(ROOT).as_posix(), line, text


def outside_citations(text: str) -> list[str]:
    """What in one comment or docstring cites something outside the repository, or a recorded case
    without saying which page's."""
    found = [f"{m.group(0)!r} ({why})" for pattern, why in OUTSIDE for m in pattern.finditer(text)]
    for m in CASES.finditer(text):
        if case_page(text, m) is None:
            found.append(f"{m.group(0)!r} (name the page: docs/X.md, recorded case NN)")
    for m in DOC_NAME.finditer(text):
        before = text[: m.start()]
        if not before.endswith("docs/") or before.endswith("shared/docs/"):
            found.append(f"{m.group(0)!r} (cite docs/{m.group(0)})")
    return found


def case_page(text: str, case: re.Match[str]) -> str | None:
    """The page whose recorded case `case` cites: the last one named before it in the comment."""
    pages = re.findall(r"\bdocs/(medplum|bulk-data)\.md\b", text[: case.start()])
    return pages[-1] if pages else None


def doc_sections() -> dict[str, set[str]]:
    return {
        doc: set(re.findall(r"^##+ (.+?)\s*$", (ROOT / "docs" / f"{doc}.md").read_text(), re.MULTILINE))
        for doc in DOCS
    }


def recorded_cases() -> dict[str, set[str]]:
    """The case numbers of each page's "Recorded cases" table."""
    out = {}
    for doc in DOCS:
        text = (ROOT / "docs" / f"{doc}.md").read_text()
        table = text.split("## Recorded cases", 1)[1] if "## Recorded cases" in text else ""
        out[doc] = set(re.findall(r"^\|\s*(\d{2})\s*\|", table, re.MULTILINE))
    return out


def test_comments_cite_only_the_repository_docs() -> None:
    problems = [f"{where}:{line}: {p}" for where, line, text in all_prose() for p in outside_citations(text)]
    assert not problems, "comments/docstrings cite paths outside the repository:\n" + "\n".join(problems)


def test_cited_doc_sections_and_recorded_cases_exist() -> None:
    sections, cases = doc_sections(), recorded_cases()
    problems = []
    for where, line, text in all_prose():
        for m in SECTION.finditer(text):
            if m.group(2) == ":":  # `docs/X.md: "..."` quotes the page rather than naming a section
                continue
            for title in re.findall(r'"([^"]+)"', m.group(3)):
                if " ".join(title.split()) not in sections[m.group(1)]:
                    problems.append(f"{where}:{line}: docs/{m.group(1)}.md has no section {title!r}")
        for m in CASES.finditer(text):
            page = case_page(text, m)
            for number in re.findall(r"\d{2}", m.group(1)) if page else []:
                if number not in cases[str(page)]:
                    problems.append(f"{where}:{line}: docs/{page}.md has no recorded case {number}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("text", "cites_outside"),
    [
        ('# medplum.md "Batch Bundles": responses in request order', True),
        ("# transcript 44: the body id must match", True),
        ("# transcripts 03-05", True),
        ("# Recorded cases 44/45: the body id", True),
        ("# transcripts/bulk-data-server 30", True),
        ("# spec: ../shared/docs/medplum.md", True),
        ("# README finding 12", True),
        ('# docs/medplum.md "Batch Bundles"; docs/medplum.md, recorded case 44', False),
        ("# docs/bulk-data.md, recorded cases 25-31", False),
        ('# docs/medplum.md "Batch Bundles", recorded cases 14-19', False),
        ("# a transcript of 2 lines, 50,040 points", False),
    ],
)
def test_outside_citation_rule(text: str, cites_outside: bool) -> None:
    assert bool(outside_citations(text)) is cites_outside


def test_recorded_case_tables_are_complete() -> None:
    cases = recorded_cases()
    assert cases["medplum"] == {f"{n:02d}" for n in range(1, 53)}
    assert {"01", "15", "20", "31", "40", "50", "58", "60", "65", "70", "80"} <= cases["bulk-data"]
