"""Structural contracts of the package: what the product ships and where its shared facts live."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pfsync"
TESTS = Path(__file__).resolve().parent


def _product_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "sandbox" not in p.relative_to(PACKAGE).parts)


def _names_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
    }


def test_contracts_test_doubles_live_in_tests_only() -> None:
    doubles = ast.parse((TESTS / "doubles.py").read_text(encoding="utf-8"))
    classes = {n.name for n in doubles.body if isinstance(n, ast.ClassDef)}
    assert {"MemoryStateStore", "ListSink"} <= classes
    for module in _product_modules():
        tree = ast.parse(module.read_text(encoding="utf-8"))
        defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
        used = _names_in(module)
        assert not (classes & (defined | used)), f"{module.relative_to(PACKAGE.parent)} holds a test double"
