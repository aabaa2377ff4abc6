"""The test tiers hold by construction (tests/server_fixtures.py): a test that uses a server fixture is
marked integration, and a test without the marker that listens on a TCP socket fails."""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

INNER = """
import socket

import pytest
from server_fixtures import starts_servers


@pytest.fixture
@starts_servers
def server():
    sock = socket.create_server(("127.0.0.1", 0))
    yield sock
    sock.close()


@pytest.fixture
def wraps_server(server):
    return server


def test_plain():
    assert socket.socketpair()  # a local pair, not a server: allowed in the fast tier


def test_unmarked_listens():
    socket.create_server(("127.0.0.1", 0)).close()


def test_through_fixture(server):
    assert server.getsockname()[1]


def test_through_a_fixture_of_a_fixture(wraps_server):
    assert wraps_server.getsockname()[1]


@pytest.mark.integration
def test_marked_listens():
    socket.create_server(("127.0.0.1", 0)).close()
"""


@pytest.mark.parametrize(
    ("tier", "outcomes"),
    [
        ("not integration", {"passed": 1, "failed": 1, "deselected": 3}),
        ("integration", {"passed": 3, "deselected": 2}),
    ],
)
def test_server_fixtures_make_the_tiers(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tier: str, outcomes: dict[str, int]
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    pytester.makeconftest('pytest_plugins = ["server_fixtures"]\n')
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("-m", tier, "-p", "no:cacheprovider")
    result.assert_outcomes(**outcomes)
    if "failed" in outcomes:
        result.stdout.fnmatch_lines(
            ["*test_unmarked_listens is not marked integration but opened a listening socket*"]
        )
