"""The fault matrix: `pfsync sync` (a real subprocess) against both sandboxes, one injected fault per row.

For every fault the source sandbox can inject and every target failure, the row states the outcome
(retried and succeeded: exit 0; quarantined with a reason: exit 6; clean failure: its exit code),
and every row proves that nothing was lost: each live source resource is in Medplum (exactly once),
in the quarantine with a reason, or in the retry queue. Rows that end in a clean failure also prove
the next run (fault gone) completes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from chaos_helpers import Rig, compare, queue_lines, run_sync, source_resources
from server_fixtures import starts_servers

from pfsync.sandbox.run import TARGET_CLIENT_ID
from pfsync.sandbox.source.datagen import generate
from pfsync.sandbox.target.quota import AUTH_REQUESTS_PER_MINUTE

Arm = Callable[[Rig], None]


@dataclass(frozen=True)
class Row:
    arm: Arm
    exit_code: int  # of the first run
    then_ok: bool = True  # a second run (fault disarmed) must exit 0 with everything in the target
    check: Callable[[Rig], None] | None = None
    during: Callable[[Rig], None] | None = None  # armed from a thread once the run has written something
    preexisting_duplicates: bool = False  # the row itself planted duplicates in the target


def _src(name: str, **params: Any) -> Arm:
    return lambda rig: getattr(rig.sandboxes.source.faults, name)(**params)


def _tgt(name: str, *args: Any, **params: Any) -> Arm:
    return lambda rig: getattr(rig.sandboxes.target.faults, name)(*args, **params)


def _no_token_to_foreign(rig: Rig) -> None:
    source = rig.sandboxes.source
    foreign = [s for s in source.stats.requests("foreign")]
    assert foreign, "the foreign-origin fault did not fire"
    assert not source.stats.authorization_sent(source.foreign_url), "the token was sent to a foreign origin"


def _quota(points: int | None, window: float) -> Arm:
    def arm(rig: Rig) -> None:
        target = rig.sandboxes.target
        target.add_client(TARGET_CLIENT_ID, target.client_secret, quota=points, quota_window=window)

    return arm


def _outer_429(rig: Rig) -> None:
    # The throttle fault answers like an exhausted quota: msBeforeNext is the client's window, which
    # pfsync honours in full (docs/medplum.md "Quotas and 429"); a 1 s window keeps the row fast.
    _quota(None, 1.0)(rig)
    rig.sandboxes.target.faults.throttle_next(2)


def _small_max_json(rig: Rig) -> None:
    # Real Medplum refuses a body over its JSON limit with 400 "File too large" (docs/medplum.md, recorded case 27);
    # a small limit makes pfsync's 900 kB Bundles hit it, so it must split them and go on.
    rig.sandboxes.target.max_json_size = 60_000


def _invalid_resource(rig: Rig) -> None:
    # docs/medplum.md "Validation": an Observation without its required status and code is refused (400).
    rig.sandboxes.source.upsert({"resourceType": "Observation", "id": "fault-invalid", "status": "final",
                                 "code": {"text": "x"}, "notAnObservationField": 1,
                                 "subject": {"reference": f"Patient/{_a_patient(rig)}"}})  # fmt: skip


def _duplicate_in_target(rig: Rig) -> None:
    # Two Medplum resources already carry the identity of one source Patient: the conditional PUT
    # answers 412 "multiple matches" (docs/medplum.md "Conditional update"). Both carry the source's own
    # mark (meta.source, as pfsync wrote it before owner tags): a stranger would be left alone.
    pid = _a_patient(rig)
    mark = {"source": rig.sandboxes.source.base_url()}
    system = "https://practicefusion.com/fhir/patient-id"
    target = rig.sandboxes.target
    with httpx.Client(timeout=30) as client:
        token = client.post(target.base_url + "oauth2/token", data={"grant_type": "client_credentials"},
                            auth=(target.client_id, target.client_secret)).json()["access_token"]  # fmt: skip
        for _ in range(2):
            resp = client.post(target.fhir_url + "Patient", headers={"Authorization": f"Bearer {token}"},
                               json={"resourceType": "Patient", "identifier": [{"system": system, "value": pid}], "meta": mark})  # fmt: skip
            assert resp.status_code == 201, resp.text


def _a_patient(rig: Rig) -> str:
    return sorted(i for t, i, _, _ in source_resources(rig) if t == "Patient")[0]


def _quarantined_with_reason(*words: str) -> Callable[[Rig], None]:
    def check(rig: Rig) -> None:
        lines = [orjson.loads(x) for x in queue_lines(rig, "quarantine.ndjson")]
        assert lines, "nothing was quarantined"
        for line in lines:
            assert line.get("reason"), line
        text = " ".join(str(x.get("reason")) for x in lines).lower()
        assert any(w in text for w in words), text

    return check


def _expire_target_tokens(rig: Rig) -> None:
    rig.sandboxes.target.faults.expire_tokens()


def _short_source_tokens(rig: Rig) -> None:
    rig.sandboxes.source.configure(token_lifetime=1)
    rig.sandboxes.source.faults.slow_export(polls=3, retry_after=1)


def _env(**values: str) -> Arm:
    return lambda rig: rig.extra_env.update(values)


# The environment must not steer pfsync (issue 15): a proxy there would receive every request,
# a CA file there would replace the trusted CAs. Both point nowhere; the run must not notice.
_HOSTILE_ENVIRONMENT = _env(HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
                            ALL_PROXY="http://127.0.0.1:9", SSL_CERT_FILE="/nonexistent/ca.pem")  # fmt: skip


def _spent_auth_window(rig: Rig) -> None:
    # docs/medplum.md "Quotas and 429": other processes behind the same address spent the 160 token
    # requests of this minute (a 2 s window here); pfsync's token request is refused until it resets.
    target = rig.sandboxes.target
    target.set_auth_limit(1, seconds=2.0)
    form = {
        "grant_type": "client_credentials",
        "client_id": TARGET_CLIENT_ID,
        "client_secret": target.client_secret,
    }
    while httpx.post(target.base_url + "oauth2/token", data=form).status_code != 429:
        pass


ROWS: dict[str, Row] = {
    # --- source: retried and succeeded
    "source 429 on token": Row(_src("rate_limit", where="token"), 0),
    "source 429 on kick-off (seconds)": Row(_src("rate_limit", where="kickoff", times=2), 0),
    "source 429 on status (HTTP-date)": Row(_src("rate_limit", where="status", http_date=True), 0),
    "source 429 on download": Row(_src("rate_limit", where="download", times=2), 0),
    "source 500 on kick-off": Row(_src("server_error", where="kickoff"), 0),
    "source 503 on status": Row(_src("server_error", where="status", status=503, times=2), 0),
    "source 500 on download": Row(_src("server_error", where="download"), 0),
    "source slow export (X-Progress)": Row(_src("slow_export", polls=3, retry_after=1), 0),
    "source connection reset mid-file": Row(_src("reset_download", times=2), 0),
    "source truncated file": Row(_src("truncate_download"), 0),
    "source pretty-printed JSON file": Row(_src("pretty_json"), 0),
    "source pretty-printed Bundle file": Row(_src("pretty_json", bundle=True), 0),
    "source unrequested type in manifest": Row(_src("unrequested_type"), 0),
    "source foreign-origin file URLs": Row(_src("foreign_storage", times=None), 0, check=_no_token_to_foreign),
    "source tokens revoked after kick-off": Row(_src("revoke_tokens_after_kickoff"), 0),
    "source token expiry mid-export": Row(_short_source_tokens, 0),
    # --- source: quarantined with a reason, or a clean failure
    "source malformed line": Row(_src("malformed_line"), 0),  # validated, downloaded again
    "source export fails (OperationOutcome)": Row(_src("export_fails"), 5),
    "source expired status URL": Row(_src("expired_status"), 0),
    "source file over export.max_file_bytes": Row(_env(PFSYNC_MAX_FILE_BYTES="2000"), 5, then_ok=False),
    "environment proxy and CA file": Row(_HOSTILE_ENVIRONMENT, 0),
    # --- target: retried and succeeded
    "target outer 429": Row(_outer_429, 0),
    "target in-batch 429 (quota)": Row(_quota(5_000, 1.0), 0),
    "target 400 File too large": Row(_small_max_json, 0),
    "target 500": Row(_tgt("error_next", 2, 500), 0),
    "target 503": Row(_tgt("error_next", 2, 503), 0),
    "target connection reset": Row(_tgt("reset_next", 2), 0),
    "target in-batch 409 conflicts": Row(_tgt("set_conflicts", 0.2, seed=1), 0),
    "target token expiry mid-load": Row(lambda rig: None, 0, during=_expire_target_tokens),
    "target token endpoint 429 (auth rate limit)": Row(_spent_auth_window, 0),
    # --- target: quarantined with a reason
    "target validation failure": Row(_invalid_resource, 6, check=_quarantined_with_reason("notanobservationfield")),
    "target multiple matches": Row(_duplicate_in_target, 6, then_ok=False, preexisting_duplicates=True,
                                   check=_quarantined_with_reason("multiple", "match", "carry identifier")),
}  # fmt: skip


@pytest.fixture(scope="module")
@starts_servers
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    root = tmp_path_factory.mktemp("faults")
    generate(root / "data", 1, seed=3)
    rig = Rig.start(root, root / "data")
    try:
        yield rig
    finally:
        rig.stop()


@pytest.fixture
def fresh(rig: Rig, tmp_path: Path) -> Iterator[Rig]:
    """The module's sandboxes, reset, with a state dir of this test's own."""
    rig.root = tmp_path
    rig.sandboxes.source.reset()
    rig.sandboxes.target.reset()
    target = rig.sandboxes.target
    target.add_client(TARGET_CLIENT_ID, target.client_secret)  # quota off again
    target.set_auth_limit(AUTH_REQUESTS_PER_MINUTE)  # Medplum's stock auth limit again
    target.max_json_size = 1_048_576
    (tmp_path / "last-stderr.txt").touch()
    yield rig
    rig.sandboxes.source.faults.clear()
    rig.sandboxes.target.faults.clear()


def _accounted(rig: Rig, duplicates_ok: bool = False) -> list[str]:
    """Source resources that are neither in Medplum, nor quarantined, nor in the retry queue."""
    result = compare(rig)
    parked = " ".join(queue_lines(rig, "quarantine.ndjson") + queue_lines(rig, "retry.ndjson"))
    lost = [m for m in result.missing if m.split("/", 1)[1] not in parked]
    if not duplicates_ok:
        assert not result.duplicates, result.duplicates
    return lost


def _checkpoint(rig: Rig) -> dict[str, Any]:
    path = rig.state_dir / "default" / "checkpoint.json"
    return orjson.loads(path.read_bytes()) if path.is_file() else {}


def _fast_env(rig: Rig) -> None:
    # Short waits: Retry-After and polls are honoured but capped, so the matrix stays fast.
    rig.extra_env = {"PFSYNC_RETRY_MAX_WAIT": "1", "PFSYNC_POLL_MAX_WAIT": "1"}


@pytest.mark.parametrize("name", list(ROWS))
def test_fault_matrix_sync_outcome_and_nothing_lost(fresh: Rig, name: str) -> None:
    row = ROWS[name]
    rig = fresh
    _fast_env(rig)
    row.arm(rig)
    stop = threading.Event()
    if row.during is not None:
        during = row.during

        def later() -> None:
            while not stop.is_set() and rig.sandboxes.target.stats.writes == 0:
                time.sleep(0.005)
            if not stop.is_set():
                during(rig)

        threading.Thread(target=later, daemon=True).start()
    first = run_sync(rig, timeout=120)
    stop.set()
    assert first.returncode == row.exit_code, f"{name}: exit {first.returncode}\n{first.stderr_tail}"
    assert "Traceback" not in first.stderr_tail
    if row.exit_code in (0, 6):
        # Done (or partially done): every source resource is in Medplum, quarantined or queued.
        lost = _accounted(rig, row.preexisting_duplicates)
        assert not lost, f"{name}: lost {lost[:5]}"
    else:
        # A clean failure never advances the checkpoint past data it did not load.
        assert not _checkpoint(rig).get("transactionTime"), _checkpoint(rig)
    if row.check is not None:
        row.check(rig)
    if row.exit_code == 0:
        problems = compare(rig).loss_problems()
        assert problems == {}, f"{name}: {problems}"
    rig.sandboxes.source.faults.clear()
    rig.sandboxes.target.faults.clear()
    if row.exit_code != 0 and row.then_ok:
        second = run_sync(rig, timeout=120)
        assert second.returncode == (6 if row.exit_code == 6 else 0), second.stderr_tail
        assert not _accounted(rig), f"{name} (second run): lost"
