"""Identity ownership (issue 16): identifiers in pfsync's systems, the owner mark, the settings check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from pfsync.core.errors import ConfigError, ExitCode
from pfsync.core.marks import HASH_TAG_SYSTEM, OWNER_TAG_SYSTEM
from pfsync.core.settings import SourceSettings, load_settings
from pfsync.load.transform import (
    Ref,
    Target,
    TransformContext,
    TransformError,
    owned,
    prepare,
    render,
)

BASE = "https://ehr.example/fhir/r4/v1/abc"
TEMPLATE = "https://practicefusion.com/fhir/{source}/{type_lower}-id"
CTX = TransformContext(SourceSettings(name="a", base_url=BASE, identifier_system=TEMPLATE))
OWN = "https://practicefusion.com/fhir/a/patient-id"


def _none(ref: Ref) -> Target | None:
    return None


def _loaded(resource: dict[str, Any], ctx: TransformContext = CTX) -> tuple[dict[str, Any], str]:
    rendered = render(prepare(resource, ctx), _none, ctx)
    return orjson.loads(rendered.body), rendered.hash


def test_identifiers_in_any_pfsync_system_are_dropped() -> None:
    body, _ = _loaded({"resourceType": "Patient", "id": "p1", "identifier": [
        {"system": "https://practicefusion.com/fhir/b/patient-id", "value": "victim"},  # another source's
        {"system": "https://practicefusion.com/fhir/patient-id", "value": "victim"},  # the default template's
        {"system": "https://practicefusion.com/fhir/a/encounter-id", "value": "e1"},  # another type's
        {"system": "urn:oid:mrn", "value": "123"},  # not pfsync's: kept
    ]})  # fmt: skip
    assert body["identifier"] == [{"system": "urn:oid:mrn", "value": "123"}, {"system": OWN, "value": "p1"}]


def test_own_identifier_is_kept_in_place_once() -> None:
    body, _ = _loaded({"resourceType": "Patient", "id": "p1", "identifier": [
        {"system": OWN, "value": "p1"}, {"system": "urn:oid:mrn", "value": "1"}, {"system": OWN, "value": "p1"}]})  # fmt: skip
    assert body["identifier"] == [{"system": OWN, "value": "p1"}, {"system": "urn:oid:mrn", "value": "1"}]


def test_own_identifier_with_another_value_is_a_quarantine_reason() -> None:
    with pytest.raises(
        TransformError, match=r"identifier .*/a/patient-id\|p2 contradicts the resource's own id 'p1'"
    ):
        prepare({"resourceType": "Patient", "id": "p1", "identifier": [{"system": OWN, "value": "p2"}]}, CTX)


def test_owner_tag_is_set_forged_ones_are_dropped_and_the_hash_ignores_it() -> None:
    forged = {"system": OWNER_TAG_SYSTEM, "code": "b"}
    body, digest = _loaded({"resourceType": "Patient", "id": "p1", "meta": {"tag": [forged, {"code": "x"}]}})
    assert body["meta"]["tag"] == [{"code": "x"}, {"system": HASH_TAG_SYSTEM, "code": digest},
                                   {"system": OWNER_TAG_SYSTEM, "code": "a"}]  # fmt: skip
    # The mark is outside the hash: the same content written under another name hashes the same, so
    # resources written before the mark existed are not rewritten only to gain it.
    plain = [
        TransformContext(SourceSettings(name=n, base_url=BASE, identifier_system="urn:x:{type}"))
        for n in "az"
    ]
    digests = {_loaded({"resourceType": "Patient", "id": "p1"}, ctx)[1] for ctx in plain}
    assert len(digests) == 1


@pytest.mark.parametrize(("meta", "mine"), [
    ({"tag": [{"system": OWNER_TAG_SYSTEM, "code": "a"}], "source": "https://elsewhere/"}, True),
    ({"tag": [{"system": OWNER_TAG_SYSTEM, "code": "b"}], "source": BASE}, False),
    ({"tag": [{"system": OWNER_TAG_SYSTEM, "code": "a"}, {"system": OWNER_TAG_SYSTEM, "code": "b"}]}, False),
    ({"source": BASE}, True),  # written by pfsync before the owner tag: adopted
    ({"source": "https://other.example/fhir"}, False),
    ({}, False),
    (None, False),
])  # fmt: skip
def test_owned_by_tag_or_by_the_meta_source_of_older_versions(
    meta: dict[str, Any] | None, mine: bool
) -> None:
    resource: dict[str, Any] = {"resourceType": "Patient", "id": "m1"}
    if meta is not None:
        resource["meta"] = meta
    assert owned(resource, CTX) is mine


def _two_sources(tmp_path: Path, a_system: str | None, b_system: str | None) -> Path:
    cfg = tmp_path / "pfsync.toml"
    text = ""
    for name, system in (("a", a_system), ("b", b_system)):
        text += f'[[sources]]\nname = "{name}"\nbase_url = "https://ehr.example/{name}"\n'
        if system is not None:
            text += f'identifier_system = "{system}"\n'
    cfg.write_text(text)
    return cfg


def test_two_sources_sharing_an_identifier_system_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(config_path=_two_sources(tmp_path, None, None))
    assert info.value.exit_code == ExitCode.CONFIG
    assert "sources 'a' and 'b' both use identifier system https://practicefusion.com/fhir/" in str(
        info.value
    )
    with pytest.raises(ConfigError, match="'a' and 'b'"):
        load_settings(config_path=_two_sources(tmp_path, "urn:x:{type}", "urn:x:{type}"))
    with pytest.raises(ConfigError, match="is not a valid template"):
        load_settings(config_path=_two_sources(tmp_path, "urn:x:{nope}", None))


def test_per_source_template_and_one_default_are_accepted(tmp_path: Path) -> None:
    settings = load_settings(config_path=_two_sources(tmp_path, TEMPLATE, None))
    assert [s.name for s in settings.sources] == ["a", "b"]
    settings = load_settings(config_path=_two_sources(tmp_path, TEMPLATE, TEMPLATE))
    assert len(settings.sources) == 2


def test_identifiers_in_another_configured_sources_system_are_dropped(tmp_path: Path) -> None:
    cfg = tmp_path / "pfsync.toml"
    cfg.write_text('[[sources]]\nname = "a"\nbase_url = "https://ehr.example/a"\nidentifier_system = "urn:a:{type}"\n'
                   '[[sources]]\nname = "b"\nbase_url = "https://ehr.example/b"\nidentifier_system = "https://b.example/ids/{type_lower}"\n')  # fmt: skip
    a, b = load_settings(config_path=cfg).sources
    assert a.peer_systems == ("https://b.example/ids/{type_lower}",) and b.peer_systems == ("urn:a:{type}",)
    body, _ = _loaded({"resourceType": "Patient", "id": "p1", "identifier": [
        {"system": "https://b.example/ids/patient", "value": "victim"}]}, TransformContext(a))  # fmt: skip
    assert body["identifier"] == [{"system": "urn:a:Patient", "value": "p1"}]
