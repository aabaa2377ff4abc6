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


def test_contracts_state_file_names_are_defined_once() -> None:
    from pfsync import statedir

    names = {statedir.CHECKPOINT_FILE, statedir.LOCK_FILE, statedir.IDMAP_FILE, statedir.QUARANTINE_FILE,
             statedir.RETRY_FILE}  # fmt: skip
    for module in _product_modules():
        if module.name == "statedir.py":
            continue
        tree = ast.parse(module.read_text(encoding="utf-8"))
        literals = {
            n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
        }
        # "lock" is also an ordinary word (a status column): only path joins with it count.
        joined = {
            n.right.value
            for n in ast.walk(tree)
            if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div) and isinstance(n.right, ast.Constant)
        }
        found = (literals & (names - {statedir.LOCK_FILE})) | (joined & {statedir.LOCK_FILE})
        assert not found, f"{module.relative_to(PACKAGE.parent)} spells {sorted(found)}: use pfsync.statedir"


def test_contracts_count_keys_are_listed_once() -> None:
    from pfsync.counts import COUNT_KEYS

    keys = {str(k) for k in COUNT_KEYS}
    for module in _product_modules():
        if module.name == "counts.py":
            continue
        tree = ast.parse(module.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Tuple | ast.List | ast.Set):
                listed = {e.value for e in node.elts if isinstance(e, ast.Constant)} & keys
                assert len(listed) < 3, (
                    f"{module.relative_to(PACKAGE.parent)}:{node.lineno} lists count keys: use pfsync.counts"
                )


def test_contracts_sync_drives_engines_through_typed_protocols() -> None:
    """No duck typing in the orchestrator: hasattr/getattr probes hide which contract holds."""
    tree = ast.parse((PACKAGE / "sync.py").read_text(encoding="utf-8"))
    probes = [
        n.lineno
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("hasattr", "getattr")
    ]
    assert probes == []
