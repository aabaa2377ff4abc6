"""Deployment files: Kubernetes manifests, Dockerfile and crontab.example are structurally right.

PyYAML is not a dependency, so the manifests are read with a small parser for the block-style
subset they use (mappings, lists, flow lists, quoted scalars); PyYAML is used too when installed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"


def _scalar(text: str) -> Any:
    text = text.strip()
    if text.startswith(("[", '"')):
        return json.loads(text)
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    return {"true": True, "false": False, "null": None}.get(text, text)


def _lines(text: str) -> list[tuple[int, str]]:
    out = []
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        out.append((len(raw) - len(raw.lstrip(" ")), stripped))
    return out


def _parse(lines: list[tuple[int, str]], i: int, indent: int) -> tuple[Any, int]:
    if lines[i][1].startswith("- "):
        items: list[Any] = []
        while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("- "):
            body = lines[i][1][2:]
            if re.match(r"^[\w.-]+:( |$)", body):  # a mapping starting on the dash line
                sub = [(indent + 2, body), *lines[i + 1 :]]
                value, j = _parse(sub, 0, indent + 2)
                items.append(value)
                i = i + j
            else:
                items.append(_scalar(body))
                i += 1
        return items, i
    mapping: dict[str, Any] = {}
    while i < len(lines) and lines[i][0] == indent and not lines[i][1].startswith("- "):
        key, _, rest = lines[i][1].partition(":")
        assert key not in mapping, f"duplicate key {key}"
        if rest.strip():
            mapping[key] = _scalar(rest)
            i += 1
        else:
            child_indent = lines[i + 1][0]
            assert child_indent >= indent, f"bad indentation after {key}"
            mapping[key], i = _parse(lines, i + 1, child_indent)
    return mapping, i


def load_yaml(path: Path) -> Any:
    lines = _lines(path.read_text())
    doc, end = _parse(lines, 0, 0)
    assert end == len(lines), f"{path}: could not parse line {lines[end]}"
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        return doc
    assert yaml.safe_load(path.read_text()) == doc
    return doc


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
    from pfsync.settings import SPECS

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


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('a: 1\nb:\n  c: "x"\n', {"a": 1, "b": {"c": "x"}}),
        ('a:\n  - x\n  - y: 1\n    z: ["q"]\n', {"a": ["x", {"y": 1, "z": ["q"]}]}),
    ],
)
def test_deploy_yaml_subset_parser(tmp_path: Path, text: str, expected: Any) -> None:
    (tmp_path / "f.yaml").write_text(text)
    assert load_yaml(tmp_path / "f.yaml") == expected
