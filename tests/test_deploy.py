"""Deployment files: Kubernetes manifests, Dockerfile and crontab.example are structurally right.

The manifests are parsed with PyYAML (a test dependency), so a syntax error fails here rather
than at `kubectl apply`; the structural checks then say what the deployment relies on.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"


def load_yaml(path: Path) -> Any:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert len(docs) == 1, f"{path}: expected one document, got {len(docs)}"
    return docs[0]


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_deploy_manifest_parses_as_a_kubernetes_object(path: Path) -> None:
    doc = load_yaml(path)
    assert isinstance(doc, dict)
    assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"].startswith("pfsync")


def _container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod_spec["containers"]
    return container


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def test_deploy_cronjob_is_forbid_medplum_state_secret_env() -> None:
    doc = load_yaml(K8S / "cronjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("batch/v1", "CronJob")
    spec = doc["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert len(spec["schedule"].split()) == 5
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    assert pod["terminationGracePeriodSeconds"] >= 60
    c = _container(pod)
    assert c["args"][0] == "sync"
    assert c["envFrom"][0]["secretRef"]["name"] == "pfsync"
    assert _env(c)["PFSYNC_STATE_BACKEND"] == "medplum"
    assert set(c["resources"]["requests"]) >= {"cpu", "memory"}
    assert "memory" in c["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_deploy_indexed_job_shards_by_completion_index() -> None:
    doc = load_yaml(K8S / "indexed-job.yaml")
    assert (doc["kind"], doc["spec"]["completionMode"]) == ("Job", "Indexed")
    n = doc["spec"]["completions"]
    c = _container(doc["spec"]["template"]["spec"])
    command = " ".join(c["args"])
    assert f'--shard "$JOB_COMPLETION_INDEX/{n}"' in command


def test_deploy_secret_example_names_pfsync_settings() -> None:
    from pfsync.core.settings import SPECS

    doc = load_yaml(K8S / "secret.example.yaml")
    assert doc["kind"] == "Secret" and doc["metadata"]["name"] == "pfsync"
    known = {name for spec in SPECS for name in spec.env}
    assert set(doc["stringData"]) <= known
    assert all("replace-me" in v or v.startswith("https://") for v in doc["stringData"].values())


def test_deploy_dockerfile_shape() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM python:3.11-slim" in text
    assert "pip install ." in text
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.M)
    assert 'ENTRYPOINT ["pfsync"]' in text


def test_deploy_crontab_example_line() -> None:
    entries = [
        ln for ln in (ROOT / "crontab.example").read_text().splitlines() if ln and not ln.startswith("#")
    ]
    assert len(entries) == 1
    fields = entries[0].split(None, 5)
    assert all(re.fullmatch(r"[\d*/,-]+", f) for f in fields[:5])
    command = fields[5]
    assert (
        "flock -n" in command
        and "pfsync sync" in command
        and ">>" in command
        and ". /etc/pfsync/pfsync.env" in command
    )
    assert "%" not in command  # cron turns % into newlines
