"""The last stretch of the write path: attachments copied, references rendered, the entry routed.

A resource arrives here once it waits for no reference target (pfsync.load.writes). If it has
attachments to copy it is copying (pfsync.load.pending) until the copies end (pfsync.load.attachments runs
them on worker threads); then its references are rewritten to Medplum ids (pfsync.load.transform.render)
and the entry goes to the router (pfsync.load.routing), which sends it or skips it.
"""

from __future__ import annotations

from pfsync.core.events import EventSink
from pfsync.load.attachments import Attachments
from pfsync.load.binaries import AttachmentError
from pfsync.load.pending import Pending, Waiting
from pfsync.load.references import References
from pfsync.load.routing import Router
from pfsync.load.tally import Tally
from pfsync.load.transform import Prepared, TransformContext, TransformError, render
from pfsync.medplum.batch import Entry
from pfsync.net.pacing import Pacer

_PROGRESS_EVERY = 500


class Emitter:
    """Copies, renders and routes; `attachments` is None when load.attachments is off."""

    def __init__(
        self, ctx: TransformContext, attachments: Attachments | None, *, pending: Pending, refs: References,
        router: Router, tally: Tally, pacer: Pacer, events: EventSink,
    ) -> None:  # fmt: skip
        self._ctx = ctx
        self._pending = pending
        self._attachments = attachments
        self._refs = refs
        self._router = router
        self._tally = tally
        self._pacer = pacer
        self._events = events
        self._done = 0

    @property
    def requests(self) -> int:
        return self._attachments.requests if self._attachments is not None else 0

    def close(self) -> None:
        if self._attachments is not None:
            self._attachments.close()

    @property
    def copying(self) -> bool:
        """Whether a copy runs or waits for a slot."""
        return self._attachments is not None and self._attachments.pending > 0

    def emit(self, item: Waiting) -> None:
        """Copied first if it has attachments to copy, then written."""
        p, file, line, raw = item.p, item.file, item.line, item.raw
        self._refs.released(p.type, p.sid)
        if self._attachments is not None and b'"contentType"' in raw:  # cheap: most resources have none
            while self._attachments.full:
                self.copied(block=True)
            jobs = self._attachments.plan(p)
            if jobs:
                self._pending.copy(item)
                self._attachments.start(item, jobs)
                return  # written once its attachments are copied (copied)
        if p.type == "Binary" and self._attachments is not None:
            try:
                self._tally.count("Binary", self._attachments.load_binary(p))
            except AttachmentError as exc:
                self._tally.quarantine(p.type, p.sid, file, line, raw, str(exc))
            return
        self._write(p, file, line, raw)

    def copied(self, *, block: bool) -> None:
        """Write the resources whose attachment copies ended (`block`: wait for one at least)."""
        if self._attachments is None or not self.copying:
            return
        for c in self._attachments.finished(block=block):
            item = c.item
            self._pending.copied(item)
            if c.error is None:
                if c.uploaded:
                    self._tally.count(item.p.type, "binary_uploaded")
                if c.left:  # still written, its attachment pointing at the source: said, not silent
                    self._tally.count(item.p.type, "attachments_left", c.left)
                    self._events.emit("load_attachment_left", type=item.p.type, id=item.p.sid, file=item.file,
                                      line=item.line, attachments=c.left)  # fmt: skip
                self._write(item.p, item.file, item.line, item.raw)
            elif c.error.retryable:
                self._tally.retry(item.p.type, item.p.sid, item.file, item.line, item.raw, str(c.error))
            else:
                self._tally.quarantine(item.p.type, item.p.sid, item.file, item.line, item.raw, str(c.error))

    def _write(self, p: Prepared, file: str | None, line: int | None, raw: bytes) -> None:
        try:
            rendered = render(p, self._refs.target, self._ctx)
        except TransformError as exc:
            self._tally.quarantine(p.type, p.sid, file, line, raw, str(exc))
            return
        if rendered.unknown:
            self._tally.count(p.type, "unresolved_references", len(rendered.unknown))
        entry = Entry(p.type, p.sid, "PUT", "", rendered.body, rendered.hash, file, line, raw)
        entry.logical = tuple((r.type, r.id) for r in rendered.logical if r.type is not None)
        self._router.route(entry)
        self._done += 1
        if self._done % _PROGRESS_EVERY == 0:
            self._events.emit("load_progress", type=p.type, done=self._done, quota_remaining=self._pacer.remaining,
                              pending=self._pending.in_flight)  # fmt: skip
