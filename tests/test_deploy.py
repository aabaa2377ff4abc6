"""Deployment files: Kubernetes manifests, Dockerfile and crontab.example are structurally right.

The manifests are parsed with PyYAML (a test dependency), so a syntax error fails here rather
than at `kubectl apply`; the structural checks then say what the deployment relies on.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
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
    return dict(container)


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


def _copied_into_image() -> list[tuple[str, str]]:
    """The Dockerfile's COPY lines as (source, destination) pairs."""
    text = (ROOT / "Dockerfile").read_text()
    pairs = []
    for line in text.splitlines():
        if line.startswith("COPY "):
            *sources, dest = line.split()[1:]
            pairs += [(src, dest) for src in sources]
    return pairs


def _dockerignored(path: str) -> bool:
    """Whether .dockerignore leaves `path` out of the build context (last matching rule wins)."""
    ignored = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        rule = raw.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/").removeprefix("**/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(
            fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p.rsplit("/", 1)[-1], pattern) for p in prefixes
        ):
            ignored = not negate
    return ignored


def test_deploy_docker_image_holds_the_product_only() -> None:
    copied = [src for src, _ in _copied_into_image()]
    assert sorted(copied) == ["README.md", "pfsync", "pyproject.toml"]
    assert not any(_dockerignored(p) for p in ("pyproject.toml", "README.md", "pfsync/cli/app.py"))
    # The fault-injection routes exist where we look for them (a rename must not make this vacuous).
    faults = ("pfsync/sandbox/source/faults.py", "pfsync/sandbox/target/faults.py")
    assert all((ROOT / f).is_file() for f in faults), faults
    for left_out in (
        *faults,
        "tests/conftest.py",
        ".venv/bin/python",
        ".git/HEAD",
        ".pfsync/default/checkpoint.json",
    ):
        assert _dockerignored(left_out), left_out
    # Whatever the context holds, the sandbox is removed before the install.
    run = next(ln for ln in (ROOT / "Dockerfile").read_text().splitlines() if "pip install ." in ln)
    assert run.index("rm -rf pfsync/sandbox") < run.index("pip install .")


def _image_tree(tmp_path: Path) -> Path:
    """What the Dockerfile installs: the copied files minus what it removes before `pip install .`."""
    root = tmp_path / "image"
    for src, _dest in _copied_into_image():
        if (ROOT / src).is_dir():
            shutil.copytree(ROOT / src, root / src, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (root / src).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / src, root / src)
    shutil.rmtree(root / "pfsync" / "sandbox")
    return root


def _pfsync_in(tree: Path, *args: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from pfsync.cli import main; sys.argv[0] = 'pfsync'; main()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=tree, capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tree), "NO_COLOR": "1"})  # fmt: skip


def test_deploy_image_without_sandbox_runs_and_says_sandbox_is_not_installed(tmp_path: Path) -> None:
    tree = _image_tree(tmp_path)
    help_run = _pfsync_in(tree, "--help")
    assert help_run.returncode == 0, help_run.stderr
    assert "Traceback" not in help_run.stderr
    for command in ("sync", "status", "load", "export", "verify"):
        shown = _pfsync_in(tree, command, "--help")
        assert shown.returncode == 0 and "Traceback" not in shown.stderr, (command, shown.stderr)
    result = _pfsync_in(tree, "sandbox")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error = json.loads(result.stderr.splitlines()[-1])  # not a terminal: the error is one JSON object
    assert error["exitCode"] == 2 and "sandboxes are not installed here" in error["message"]
    assert "pip install" in error["hint"]


# A real `docker build` needs a Docker daemon and the python:3.11-slim base image: opt in with
# PFSYNC_DOCKER=1 (and PFSYNC_SLOW=1). The checks above hold without Docker; this one proves them.
_DOCKER_OPT_IN = os.environ.get("PFSYNC_DOCKER") == "1"


@pytest.mark.slow
@pytest.mark.skipif(
    not _DOCKER_OPT_IN or shutil.which("docker") is None, reason="set PFSYNC_DOCKER=1 with Docker"
)
def test_deploy_built_image_holds_the_product_only() -> None:
    tag = "pfsync-test-image:product-only"
    # --network host: the build installs pfsync's dependencies from the package index.
    built = subprocess.run(["docker", "build", "--network", "host", "-t", tag, str(ROOT)],
                           capture_output=True, text=True, timeout=900)  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    try:
        uid = subprocess.run(["docker", "run", "--rm", "--entrypoint", "id", tag, "-u"],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert uid.stdout.strip() == "10001", uid
        probe = (
            "import importlib.util as u; import pfsync.cli.app, pfsync.load.loader; "
            "assert u.find_spec('pfsync.sandbox') is None, 'the sandbox is in the image'"
        )
        checked = subprocess.run(["docker", "run", "--rm", "--entrypoint", "python", tag, "-c", probe],
                                 capture_output=True, text=True, timeout=120)  # fmt: skip
        assert checked.returncode == 0, checked.stderr
        sandbox = subprocess.run(["docker", "run", "--rm", tag, "sandbox"], capture_output=True, text=True,
                                 timeout=120)  # fmt: skip
        assert sandbox.returncode == 2, sandbox.stderr
        assert "sandboxes are not installed here" in sandbox.stderr and "Traceback" not in sandbox.stderr
    finally:
        subprocess.run(["docker", "image", "rm", "-f", tag], capture_output=True, timeout=120)


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
