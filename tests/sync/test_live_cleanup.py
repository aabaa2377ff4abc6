"""LiveEngines and open_store close every client they opened when a later step of building them
fails (a refused or missing secret): a client left for the collector leaks its connections and,
under filterwarnings, fails whichever test the collector happens to run in."""

from __future__ import annotations

import threading
from typing import Any, NoReturn

import httpx
import pytest

from pfsync.core.errors import AuthError, ConfigError
from pfsync.core.settings import Settings, load_settings
from pfsync.medplum import client as medplum_client_module
from pfsync.net.http import make_client
from pfsync.sync import live

ENV = {
    "PF_FHIR_BASE_URL": "https://ehr.example/fhir/r4",
    "PF_CLIENT_ID": "pf-client",
    "PF_CLIENT_SECRET": "pf-secret",
    "MEDPLUM_BASE_URL": "https://medplum.example/",
    "MEDPLUM_CLIENT_ID": "mp-client",
    "MEDPLUM_CLIENT_SECRET": "mp-secret",
}


def _settings(**env: str) -> Settings:
    return load_settings(env={**ENV, **env}, config_path=None)


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[httpx.Client]:
    """Every httpx.Client pfsync.sync.live builds."""
    clients: list[httpx.Client] = []
    real = make_client

    def recording(*args: Any, **kwargs: Any) -> httpx.Client:
        client = real(*args, **kwargs)
        clients.append(client)
        return client

    monkeypatch.setattr(live, "make_client", recording)
    return clients


def _refuse(*args: object, **kwargs: object) -> NoReturn:
    raise ConfigError("medplum.client_secret is not set", setting="medplum.client_secret")


def test_live_engines_close_their_clients_when_the_medplum_client_cannot_be_built(
    opened: list[httpx.Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(medplum_client_module, "medplum_auth", _refuse)
    settings = _settings()
    with pytest.raises(ConfigError):
        live.LiveEngines(settings, settings.sources[0], threading.Event())
    assert len(opened) == 3  # the source's two clients and Medplum's
    assert all(client.is_closed for client in opened)


def test_live_engines_close_their_clients_when_the_source_auth_fails(
    opened: list[httpx.Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> NoReturn:
        raise AuthError("the source refused the client")

    monkeypatch.setattr(live, "source_auth", refuse)
    settings = _settings()
    with pytest.raises(AuthError):
        live.LiveEngines(settings, settings.sources[0], threading.Event())
    assert len(opened) == 1
    assert all(client.is_closed for client in opened)


def test_live_engines_close_closes_every_client(opened: list[httpx.Client]) -> None:
    settings = _settings()
    engines = live.LiveEngines(settings, settings.sources[0], threading.Event())
    assert not any(client.is_closed for client in opened)
    engines.close()
    assert len(opened) == 3 and all(client.is_closed for client in opened)


def test_open_store_closes_its_client_when_the_medplum_client_cannot_be_built(
    opened: list[httpx.Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(medplum_client_module, "medplum_auth", _refuse)
    with pytest.raises(ConfigError):
        live.open_store(_settings(PFSYNC_STATE_BACKEND="medplum"))
    assert len(opened) == 1 and opened[0].is_closed
