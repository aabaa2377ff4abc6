"""Async batch jobs of the target sandbox (`Prefer: respond-async`, docs/medplum.md, recorded case 39).

The POST answers 202 with `Content-Location: {fhir}job/<id>/status`; the job is an AsyncJob resource
(status `accepted`, then `completed` with `output.parameter[results].valueReference = Binary/<id>`); the
Binary's raw content is the batch-response Bundle, its resources carrying internal meta. Quota is charged
as for a synchronous batch (docs/medplum.md: async work is not exempt on 5.0.x).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import orjson

from pfsync.sandbox.target.batch import BatchProcessor, add_internal_meta
from pfsync.sandbox.target.common import FhirError, Json, new_id, now_instant
from pfsync.sandbox.target.ops import Ctx, Engine

log = logging.getLogger(__name__)


class AsyncJobs:
    def __init__(self, engine: Engine, batches: BatchProcessor) -> None:
        self.engine = engine
        self.batches = batches
        self._threads: list[threading.Thread] = []

    def submit(self, ctx: Ctx, bundle: Any) -> str:
        """Store an accepted AsyncJob, start the batch in the background; -> the job id."""
        job_id = new_id()
        job: Json = {
            "resourceType": "AsyncJob",
            "status": "accepted",
            "request": ctx.fhir_base.rstrip("/"),
            "requestTime": now_instant(),
        }
        self.engine.write_version(job, job_id, None)
        t = threading.Thread(
            target=self._run, args=(ctx, bundle, job_id), name=f"asyncjob-{job_id}", daemon=True
        )
        self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()
        return job_id

    def _run(self, ctx: Ctx, bundle: Any, job_id: str) -> None:
        try:
            result = add_internal_meta(self.batches.run(ctx, bundle), ctx)
            status, output = "completed", self._store_result(result)
        except FhirError as err:
            status, output = (
                "error",
                {"resourceType": "Parameters", "parameter": [{"name": "outcome", "resource": err.outcome}]},
            )
        except Exception:  # a sandbox bug must show as a failed job, not a job stuck in "accepted"
            log.exception("async batch job %s failed", job_id)
            status, output = "error", None
        row = self.engine.store.read("AsyncJob", job_id)
        if row is None or row.resource is None:
            return  # wiped by reset() meanwhile
        job = {k: v for k, v in row.resource.items() if k not in ("meta",)}
        job.update({"status": status, "transactionTime": now_instant()})
        if output is not None:
            job["output"] = output
        self.engine.write_version(job, job_id, row)

    def _store_result(self, bundle: Json) -> Json:
        binary_id = new_id()
        data = orjson.dumps(bundle)
        self.engine.store.put_binary(binary_id, "application/fhir+json", data)
        self.engine.write_version(
            {"resourceType": "Binary", "contentType": "application/fhir+json"}, binary_id, None
        )
        return {
            "resourceType": "Parameters",
            "parameter": [{"name": "results", "valueReference": {"reference": f"Binary/{binary_id}"}}],
        }

    def wait_idle(self, timeout: float = 30.0) -> None:
        for t in list(self._threads):
            t.join(timeout)
