"""Interpreter settings during a load (pfsync.core.tuning): applied while any Loader is open, restored after."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pfsync.core import tuning
from pfsync.core.settings import LoadSettings, SourceSettings
from pfsync.load.loader import Loader
from pfsync.medplum.client import MedplumClient


@pytest.fixture(autouse=True)
def _settings() -> Iterator[None]:
    before = gc.get_threshold(), sys.getswitchinterval()
    yield
    gc.set_threshold(*before[0])
    sys.setswitchinterval(before[1])


def test_tuning_applies_until_the_last_holder_restores() -> None:
    gc.set_threshold(700, 10, 10)
    sys.setswitchinterval(0.005)
    tuning.relax()
    tuning.relax()
    assert gc.get_threshold() == (50_000, 10, 10)
    assert sys.getswitchinterval() == pytest.approx(0.001)
    tuning.restore()
    assert gc.get_threshold() == (50_000, 10, 10)  # the other holder is still loading
    tuning.restore()
    assert gc.get_threshold() == (700, 10, 10)
    assert sys.getswitchinterval() == pytest.approx(0.005)
    tuning.restore()  # one too many: harmless
    assert gc.get_threshold() == (700, 10, 10)


def test_tuning_keeps_automatic_collection_off_when_the_application_turned_it_off() -> None:
    gc.set_threshold(0, 10, 10)
    tuning.relax()
    assert gc.get_threshold() == (0, 10, 10)
    tuning.restore()
    assert gc.get_threshold() == (0, 10, 10)


def test_loaders_apply_the_settings_while_open_even_when_they_close_out_of_order(tmp_path: Path) -> None:
    gc.set_threshold(700, 10, 10)
    sys.setswitchinterval(0.005)
    source = SourceSettings(name="s", base_url="https://ehr.example/fhir")
    with MedplumClient(httpx.Client(base_url="https://medplum.example/fhir/R4/")) as client:
        first = Loader(source, LoadSettings(), client, state_dir=tmp_path / "a")
        second = Loader(source, LoadSettings(), client, state_dir=tmp_path / "b")
        assert gc.get_threshold()[0] == 50_000
        first.close()
        assert gc.get_threshold()[0] == 50_000
        first.close()  # idempotent: does not release the other loader's hold
        assert gc.get_threshold()[0] == 50_000
        assert sys.getswitchinterval() == pytest.approx(0.001)
        second.close()
    assert gc.get_threshold() == (700, 10, 10)
    assert sys.getswitchinterval() == pytest.approx(0.005)
