"""Hostile answers over real HTTP on 127.0.0.1: malformed or protocol-violating answers end in a
documented exit code with a clear message, and nothing a server sends reaches a message, the
state's lastError or a log line unredacted (issue 15)."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from hostile_server import TOKEN, Answer, Hostile, bulk_source, run_pfsync, source_env
from target_fixtures import TARGET_CLIENT, TARGET_SECRET

from pfsync.sandbox.target.server import TargetSandbox

pytestmark = pytest.mark.integration

PATIENT = b'{"resourceType":"Patient","id":"p1","identifier":[{"system":"urn:x","value":"1"}]}\n'


@pytest.fixture
def server(hostile: Callable[[], Hostile]) -> Hostile:
    return hostile()


def _medplum(server: Hostile) -> None:
    server.routes["/oauth2/token"] = lambda _: Answer.json(
        {"access_token": TOKEN, "token_type": "Bearer", "expires_in": 3600}
    )


@pytest.mark.parametrize(
    ("body", "kind"),
    [(b"<html>proxy error</html>", "not JSON"), (b'[{"resourceType":"Bundle"}]', "a JSON array")],
)
def test_hostile_medplum_search_answer_that_is_not_a_bundle(
    server: Hostile, tmp_path: Path, body: bytes, kind: str
) -> None:
    # Taken as "no match", such an answer would make pfsync create a duplicate of every resource.
    _medplum(server)
    server.routes["/fhir/R4/Patient"] = lambda _: Answer(200, {"Content-Type": "application/fhir+json"}, body)
    data = tmp_path / "Patient.ndjson"
    data.write_bytes(PATIENT)
    env = source_env(server, tmp_path, MEDPLUM_BASE_URL=f"{server.url}/", MEDPLUM_CLIENT_ID="mp",
                     MEDPLUM_CLIENT_SECRET="mp-secret-value")  # fmt: skip
    for key in ("PF_FHIR_BASE_URL", "PF_CLIENT_ID", "PF_CLIENT_SECRET"):
        del env[key]
    run = run_pfsync(env, "load", str(data))
    assert server.requests("/fhir/R4/Patient"), "the identifier search was never sent"
    assert [s for s in server.seen if s.method in ("POST", "PUT") and s.path.startswith("/fhir")] == []
    assert run.code == 5, run.output
    assert f"with a body that is {kind}, not a JSON object" in run.output
    assert "Traceback" not in run.output


def test_hostile_error_text_and_urls_are_redacted_everywhere(
    server: Hostile, target: TargetSandbox, tmp_path: Path
) -> None:
    # The status URL carries a signature in its query; the failure's OperationOutcome carries a
    # bearer token and a terminal escape sequence. None of it may reach output or state.
    bulk_source(server, {})
    status = f"{server.url}/status/1?signature=SIGNED-QUERY-VALUE"
    server.routes["/fhir/Patient/$export"] = lambda _: Answer(202, {"Content-Location": status})
    outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "exception",
               "diagnostics": "failed for Bearer abcdefghijklmnop0123 \x1b[31mred\x1b[0m" + "x" * 5000}]}  # fmt: skip
    server.routes["/status/1"] = lambda _: Answer.json(outcome, 400)
    env = source_env(server, tmp_path, MEDPLUM_BASE_URL=target.base_url, MEDPLUM_CLIENT_ID=TARGET_CLIENT,
                     MEDPLUM_CLIENT_SECRET=TARGET_SECRET)  # fmt: skip
    run = run_pfsync(env, "sync")
    assert run.code == 5, run.output
    state = orjson.loads((tmp_path / "state" / "default" / "checkpoint.json").read_bytes())
    last_error = state["lastError"]
    assert last_error and "failed for" in last_error
    for text in (run.output, last_error):
        assert "SIGNED-QUERY-VALUE" not in text
        assert "abcdefghijklmnop0123" not in text
        assert "\x1b[" not in text
        assert "x" * 1000 not in text  # server text is capped
    assert "Traceback" not in run.output


@pytest.mark.parametrize("body", [b"<html>maintenance</html>", b'["not", "a", "bundle"]'])
def test_hostile_source_id_search_answer_that_is_not_a_bundle(
    server: Hostile, target: TargetSandbox, tmp_path: Path, body: bytes
) -> None:
    # The export leaves out the Practitioner a Patient refers to; pfsync fetches it with a `_id`
    # search (README "How pfsync sync works" step 3), which answers 200 with something else.
    patient = (
        b'{"resourceType":"Patient","id":"p1","generalPractitioner":[{"reference":"Practitioner/dr1"}]}\n'
    )
    bulk_source(server, {"p1": Answer(200, {"Content-Type": "application/fhir+ndjson"}, patient)})
    server.routes["/token"] = lambda _: Answer.json({"access_token": TOKEN, "token_type": "bearer", "expires_in": 300,
                                                     "scope": "system/Patient.read system/Practitioner.read"})  # fmt: skip
    server.routes["/fhir/Practitioner"] = lambda _: Answer(
        200, {"Content-Type": "application/fhir+json"}, body
    )
    env = source_env(server, tmp_path, PF_RESOURCE_TYPES="Patient,Practitioner", MEDPLUM_BASE_URL=target.base_url,
                     MEDPLUM_CLIENT_ID=TARGET_CLIENT, MEDPLUM_CLIENT_SECRET=TARGET_SECRET)  # fmt: skip
    run = run_pfsync(env, "sync")
    assert server.requests("/fhir/Practitioner"), "the missing reference target was never fetched"
    assert run.code == 5, run.output
    assert "the source's Practitioner search by _id" in run.output and "not a JSON object" in run.output
    assert "Traceback" not in run.output
    state = orjson.loads((tmp_path / "state" / "default" / "checkpoint.json").read_bytes())
    assert not state["transactionTime"]  # the checkpoint did not move past what did not land


def test_hostile_answer_read_whole_is_bounded(server: Hostile, tmp_path: Path) -> None:
    # A search answer that inflates to 160 MiB (Content-Encoding: gzip): decoded in bounded pieces
    # and refused past http.max_response_bytes, never held whole.
    packer = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    bomb = b"".join(packer.compress(bytes(1 << 20)) for _ in range(160)) + packer.flush()
    _medplum(server)
    server.routes["/fhir/R4/Patient"] = lambda _: Answer(
        200, {"Content-Type": "application/fhir+json", "Content-Encoding": "gzip"}, bomb
    )
    data = tmp_path / "Patient.ndjson"
    data.write_bytes(PATIENT)
    env = source_env(server, tmp_path, MEDPLUM_BASE_URL=f"{server.url}/", MEDPLUM_CLIENT_ID="mp",
                     MEDPLUM_CLIENT_SECRET="mp-secret-value", PFSYNC_MAX_RESPONSE_BYTES=str(16 << 20))  # fmt: skip
    for key in ("PF_FHIR_BASE_URL", "PF_CLIENT_ID", "PF_CLIENT_SECRET"):
        del env[key]
    run = run_pfsync(env, "load", str(data))
    assert run.code == 5, run.output
    assert f"the answer is larger than {16 << 20} bytes (http.max_response_bytes)" in run.output
    assert run.max_rss_mib < 150, f"peak RSS {run.max_rss_mib:.0f} MiB"
