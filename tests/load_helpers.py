"""Shared helpers of the loader tests: a Loader against a TargetSandbox, fixture data, duplicate checks."""

from __future__ import annotations

import os
import stat
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import orjson
from target_fixtures import fhir_client, medplum_of

from pfsync.core.settings import LoadSettings, SourceSettings
from pfsync.load.loader import Loader, LoadResult
from pfsync.sandbox.target.server import TargetSandbox

SYNTHEA_SMALL = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "synthea-small"
SOURCE = SourceSettings(name="default", base_url="https://ehr.example/fhir/r4/v1/practice-1")


class FakeClock:
    """now() advances only by sleep(): retries and pacing run instantly."""

    def __init__(self) -> None:
        self.t = 1_000_000.0
        self.slept: list[float] = []

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self.slept.append(seconds)
            self.t += seconds


def make_loader(
    target: TargetSandbox, state_dir: Path, *, settings: LoadSettings | None = None, client: httpx.Client | None = None,
    **kwargs: Any,
) -> Loader:  # fmt: skip
    medplum = medplum_of(client or fhir_client(target), clock=kwargs.get("clock"), http=kwargs.get("http"),
                         stop=kwargs.get("stop"))  # fmt: skip
    return Loader(SOURCE, settings or LoadSettings(), medplum, state_dir=state_dir, **kwargs)


def load_all(target: TargetSandbox, state_dir: Path, paths: list[Path], **kwargs: Any) -> LoadResult:
    with make_loader(target, state_dir, **kwargs) as loader:
        loader.load_paths(paths)
        return loader.finish()


def write_ndjson(path: Path, resources: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in resources))
    return path


def binary_uploads(target: TargetSandbox) -> int:
    """`POST Binary` requests the target has answered (its stats key the route both ways)."""
    return target.stats.requests.get(("POST", "binary"), 0) + target.stats.requests.get(("POST", "Binary"), 0)


def identity_counts(target: TargetSandbox, types: list[str]) -> Counter[tuple[str, str]]:
    """(type, source id) -> how many Medplum resources carry it: every value must be 1."""
    seen: Counter[tuple[str, str]] = Counter()
    for rtype in types:
        system = f"https://practicefusion.com/fhir/{rtype.lower()}-id"
        for resource in target.resources(rtype):
            for ident in resource.get("identifier") or []:
                if ident.get("system") == system:
                    seen[(rtype, ident["value"])] += 1
    return seen


def fixture_types() -> list[str]:
    return sorted(p.name.split(".")[0] for p in SYNTHEA_SMALL.glob("*.ndjson"))


def spool_files(directory: Path) -> list[tuple[str, int]]:
    """(link, mode) of every file this process holds open in `directory` that no name leads to
    (an attachment spool's scratch file: pfsync.core.private.anonymous_file), read from /proc."""
    prefix = str(directory.resolve()) + "/"
    found: list[tuple[str, int]] = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith(prefix) and link.endswith(" (deleted)"):
                found.append((link, stat.S_IMODE(os.stat(f"/proc/self/fd/{fd}").st_mode)))
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor, another thread's file)
    return found
