"""Shared pytest setup: a clean environment for every test, the fixture modules, the slow-test switch.

The fixtures that start servers (and the rule that makes their tests integration tests) live in
tests/server_fixtures.py, tests/source_fixtures.py and tests/target_fixtures.py, loaded as plugins below;
their helpers are imported by name where they are used.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, TypeVar

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURES = SHARED / "fixtures"

# Fixture modules (tests/ is on sys.path under pytest's default import mode); pytester runs the
# check of the tiers themselves (tests/test_server_fixtures.py).
pytest_plugins = ["server_fixtures", "source_fixtures", "target_fixtures", "pytester"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests (full-size chaos, large fixtures) run only with PFSYNC_SLOW=1; CI runs reduced sizes."""
    if os.environ.get("PFSYNC_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set PFSYNC_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


class _Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=_Closable)
_CLOSE_AT_END: list[_Closable] = []


def closed_at_end(thing: C) -> C:
    """`thing` (an httpx.Client, a MedplumClient, a store) closed when the test ends, whatever
    happened: a connection left for the collector is a ResourceWarning, an error under
    filterwarnings, and it would surface in whichever later test the collector runs in."""
    _CLOSE_AT_END.append(thing)
    return thing


@pytest.fixture(autouse=True)
def _close_at_end() -> Iterator[None]:
    yield
    while _CLOSE_AT_END:
        _CLOSE_AT_END.pop().close()  # closing twice is harmless for all of them


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No test sees the developer's own PF_*/MEDPLUM_*/PFSYNC_* settings or pfsync.toml."""
    for name in list(os.environ):
        if name.startswith(("PF_", "MEDPLUM_", "PFSYNC_")):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_COLOR", "1")
    yield


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"../shared is missing beside the checkout (expected at {SHARED})")
    return SHARED


@pytest.fixture
def repo_root() -> str:
    return str(Path(__file__).resolve().parents[1])
