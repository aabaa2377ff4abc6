"""Target sandbox: search (docs/medplum.md "Ids and identity", docs/medplum.md "Surprises in the recordings", item 12, recorded cases 31-34)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from target_fixtures import MRN, batch, conditional_put_entry, fhir_client, patient

from pfsync.sandbox.target.server import TargetSandbox


def _values(bundle: dict) -> set[str]:  # type: ignore[type-arg]
    return {e["resource"]["identifier"][0]["value"] for e in bundle.get("entry", [])}


def test_target_search_identifier_or_list_and_normalised_links(target: TargetSandbox) -> None:
    with fhir_client(target) as c:
        c.post("", json=batch(*(conditional_put_entry(patient(v)) for v in ("a", "b", "c", "d"))))
        q = f"{MRN}|a,{MRN}|b,{MRN}|c"
        r = c.get("Patient", params={"identifier": q}).json()
    assert _values(r) == {"a", "b", "c"}
    assert "total" not in r
    self_url = f"{target.fhir_url}Patient?_count=20&identifier={quote(q, safe='')}"
    assert r["link"] == [{"relation": "self", "url": self_url}, {"relation": "first", "url": self_url}]
    assert r["entry"][0]["search"] == {"mode": "match"}
    assert r["entry"][0]["fullUrl"] == f"{target.fhir_url}Patient/{r['entry'][0]['resource']['id']}"


def test_target_search_identifier_is_case_sensitive_and_escaped_comma_is_literal(
    target: TargetSandbox,
) -> None:
    with fhir_client(target) as c:
        c.post("Patient", json=patient("x,y"))
        c.post("Patient", json=patient("CASE"))
        assert _values(c.get("Patient", params={"identifier": f"{MRN}|x\\,y"}).json()) == {"x,y"}
        assert c.get("Patient", params={"identifier": f"{MRN}|x,{MRN}|y"}).json().get("entry") is None
        assert c.get("Patient", params={"identifier": f"{MRN}|case"}).json().get("entry") is None
        assert _values(c.get("Patient", params={"identifier": "CASE"}).json()) == {"CASE"}


def test_target_search_elements_subsets_and_tags(target: TargetSandbox) -> None:
    with fhir_client(target) as c:
        c.post("Patient", json=patient("el"))
        r = c.get("Patient", params={"identifier": f"{MRN}|el", "_elements": "identifier"}).json()
    res = r["entry"][0]["resource"]
    assert set(res) == {"resourceType", "identifier", "id", "meta"}
    assert res["meta"]["tag"] == [{"system": "http://hl7.org/fhir/v3/ObservationValue", "code": "SUBSETTED"}]
    assert "_fields=identifier" in r["link"][0]["url"]


def test_target_search_paging_with_offset_links(target: TargetSandbox) -> None:
    group = "urn:example:group"
    entries = []
    for i in range(5):
        p = patient(f"page-{i}")
        p["identifier"].append({"system": group, "value": "g1"})
        entries.append(conditional_put_entry(p))
    with fhir_client(target) as c:
        c.post("", json=batch(*entries))
        pages: list[Any] = []
        url: str | None = f"{target.fhir_url}Patient?identifier={group}|g1&_count=2"
        while url:
            page = c.get(url).json()
            pages.append(page)
            url = next((link["url"] for link in page["link"] if link["relation"] == "next"), None)
    assert [len(p["entry"]) for p in pages] == [2, 2, 1]
    assert "_offset=2" in pages[1]["link"][0]["url"]
    assert [link["relation"] for link in pages[1]["link"]] == ["self", "first", "next", "previous"]
    assert [link["relation"] for link in pages[2]["link"]] == ["self", "first", "previous"]
    assert len(set().union(*(_values(p) for p in pages))) == 5


def test_target_search_summary_count_and_empty_result(target: TargetSandbox) -> None:
    with fhir_client(target) as c:
        c.post("Patient", json=patient("cnt"))
        counted = c.get("Patient", params={"identifier": f"{MRN}|cnt", "_summary": "count"}).json()
        empty = c.get("Patient", params={"identifier": f"{MRN}|none"}).json()
    assert counted["total"] == 1 and "entry" not in counted
    assert "_count=0&_total=accurate" in counted["link"][0]["url"]
    assert "entry" not in empty and [link["relation"] for link in empty["link"]] == ["self"]


def test_target_search_by_id(target: TargetSandbox) -> None:
    with fhir_client(target) as c:
        ids = [c.post("Patient", json=patient(f"id{i}")).json()["id"] for i in range(3)]
        r = c.get("Patient", params={"_id": f"{ids[0]},{ids[2]}"}).json()
    assert {e["resource"]["id"] for e in r["entry"]} == {ids[0], ids[2]}


def test_target_search_unknown_parameter_is_400(target: TargetSandbox) -> None:
    with fhir_client(target) as c:
        assert c.get("Patient", params={"nonsense": "1"}).status_code == 400


def test_target_search_escaped_pipe_dollar_and_backslash_are_literal(target: TargetSandbox) -> None:
    values = ("p|q", "p$q", "p\\q", "p,q")
    with fhir_client(target) as c:
        for v in values:
            c.post("Patient", json=patient(v))
        escaped = {v: v.replace("\\", "\\\\").replace(",", "\\,").replace("|", "\\|").replace("$", "\\$")
                   for v in values}  # fmt: skip
        singles = {v: _values(c.get("Patient", params={"identifier": f"{MRN}|{e}"}).json())
                   for v, e in escaped.items()}  # fmt: skip
        together = c.get("Patient", params={"identifier": ",".join(f"{MRN}|{e}" for e in escaped.values())})
    # docs/medplum.md, recorded case 48: each escaped value finds its own resource, singly and OR-ed
    assert singles == {v: {v} for v in values}
    assert _values(together.json()) == set(values)


def test_target_search_tag_and_sort_by_last_updated_page_in_order(target: TargetSandbox) -> None:
    tag = {"system": "urn:example:group", "code": "sorted"}
    with fhir_client(target) as c:
        for i in range(5):
            c.post("Patient", json=patient(f"s{i}", meta={"tag": [tag]}))
        c.post("Patient", json=patient("untagged"))
        params = {"_tag": "urn:example:group|sorted", "_sort": "_lastUpdated", "_count": "2"}
        pages, url = [], None
        page = c.get("Patient", params=params).json()
        while True:
            pages.append([e["resource"]["identifier"][0]["value"] for e in page["entry"]])
            url = next((link["url"] for link in page["link"] if link["relation"] == "next"), None)
            if url is None:
                break
            page = c.get(url).json()
        newest_first = c.get("Patient", params={**params, "_sort": "-_lastUpdated", "_count": "5"}).json()
    # docs/medplum.md, recorded case 51: pages in creation order through _offset links
    assert pages == [["s0", "s1"], ["s2", "s3"], ["s4"]]
    assert [e["resource"]["identifier"][0]["value"] for e in newest_first["entry"]] == [
        f"s{i}" for i in range(4, -1, -1)
    ]


def test_target_search_fields_link_keeps_commas(target: TargetSandbox) -> None:
    with fhir_client(target) as c:
        c.post("Patient", json=patient("fl"))
        r = c.get("Patient", params={"identifier": f"{MRN}|fl", "_elements": "identifier,meta"}).json()
    assert "_fields=identifier,meta&" in r["link"][0]["url"]  # docs/medplum.md, recorded case 47
