"""Prometheus text-format metrics for node_exporter's textfile collector, written atomically.

node_exporter reads every `*.prom` file in its directory on each scrape; a half-written file
would be a scrape error, so the file is replaced atomically (pfsync.sync.state.write_atomic) and made
world-readable (the exporter usually runs as another user). Values come from each source's saved
state, so `pfsync status --metrics` and `pfsync sync --metrics` agree. `pfsync_resources_total` is a
true counter (Prometheus: `_total` means one): the per-type counts summed over every completed run,
persisted in the state so it survives restarts and pods; `pfsync_last_run_resources` is the last
run's counts (a gauge).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from pfsync.core.counts import COUNT_KEYS
from pfsync.core.errors import StateError
from pfsync.sync.state import write_atomic
from pfsync.sync.status import SourceStatus

_METRICS = (
    ("pfsync_last_success_timestamp_seconds", "gauge", "Unix time of the last successful sync of the source."),
    ("pfsync_resources_total", "counter", "Resources handled by all completed runs, by type and outcome."),
    ("pfsync_last_run_resources", "gauge", "Resources handled by the last run, by type and outcome."),
    ("pfsync_run_duration_seconds", "gauge", "Duration of the last run of the source."),
    ("pfsync_quota_used", "gauge", "Medplum quota points used by the last run (from RateLimit headers)."),
    ("pfsync_healthy", "gauge", "1 when the source is healthy (see pfsync status), else 0."),
    ("pfsync_quarantine_size", "gauge", "Resources waiting in the quarantine file."),
    ("pfsync_retry_queue_size", "gauge", "Resources waiting in the retry queue."),
)  # fmt: skip


def _label(value: str) -> str:
    # Prometheus text format: backslash, double quote and newline are escaped in label values.
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value: float) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def render(statuses: Sequence[SourceStatus]) -> str:
    """The metrics text for these sources (one HELP/TYPE block per metric family)."""
    samples: dict[str, list[str]] = {name: [] for name, _, _ in _METRICS}
    for st in statuses:
        src = f'source="{_label(st.source)}"'
        if (success := st.last_success_epoch) is not None:
            samples["pfsync_last_success_timestamp_seconds"].append(f"{{{src}}} {_num(success)}")
        for metric, by_type in (
            ("pfsync_resources_total", st.totals),
            ("pfsync_last_run_resources", st.counts),
        ):
            for rtype, counts in sorted(by_type.items()):
                for outcome in COUNT_KEYS:
                    if outcome in counts:
                        labels = f'{src},type="{_label(rtype)}",outcome="{outcome}"'
                        samples[metric].append(f"{{{labels}}} {counts[outcome]}")
        if st.duration_seconds is not None:
            samples["pfsync_run_duration_seconds"].append(f"{{{src}}} {_num(st.duration_seconds)}")
        if st.quota_used is not None:
            samples["pfsync_quota_used"].append(f"{{{src}}} {st.quota_used}")
        samples["pfsync_healthy"].append(f"{{{src}}} {1 if st.healthy else 0}")
        samples["pfsync_quarantine_size"].append(f"{{{src}}} {st.quarantine_size}")
        samples["pfsync_retry_queue_size"].append(f"{{{src}}} {st.retry_queue_size}")
    lines: list[str] = []
    for name, kind, help_text in _METRICS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        lines += [name + sample for sample in samples[name]]
    return "\n".join(lines) + "\n"


def write_metrics(path: Path, statuses: Iterable[SourceStatus]) -> None:
    """Replace `path` atomically with the metrics text (mode 0644 for the exporter)."""
    try:
        write_atomic(path, render(list(statuses)).encode(), mode=0o644)
    except OSError as exc:
        raise StateError(f"cannot write metrics file {path}: {exc.strerror}") from None
