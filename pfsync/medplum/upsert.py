"""Sending writes to Medplum in batch Bundles: sizing, pacing, concurrency and per-entry retries.

docs/medplum.md "Batch Bundles" / "Size limits" / "Quotas and 429" / "Measured on a real server":
- Bundles are cut by bytes and by count; a Bundle refused as too large (413 or 400 "File too
  large") is split and re-sent, and the byte cap shrinks for the rest of the run. A single
  resource too large for a synchronous Bundle goes alone as an async batch job.
- One identity is never in two Bundles in flight (a second conditional create of the same
  identity in a concurrent Bundle would make a duplicate), and a Bundle holds each identity once
  (last version wins: docs/medplum.md, recorded case 16).
- Every entry added ends in one report (pfsync.medplum.bundlesend), which the caller takes after
  each call (`take_reports`); the sender never calls back. A create that waited behind another
  write of its identity is released instead, for the caller to decide again. The caller keeps the
  account of what is in flight (pfsync.load.pending); the sender's sets say only what is queued,
  waiting or on the wire.
- Failed entries are re-sent alone (409 conflict, 429, 5xx, lost responses); validation failures
  are settled as FAILED (for the quarantine); retries that run out are exhausted (the retry queue).
- `Prefer: return=minimal` is never sent (the batch-response would be empty).

All bookkeeping happens on the caller's thread; worker threads only do HTTP.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from pfsync.core.errors import HTTPError, InterruptedRunError
from pfsync.core.events import EventSink, NullSink
from pfsync.core.redact import redact
from pfsync.medplum.asyncbatch import TOO_LARGE_EVEN_ASYNC, AsyncBatchRunner
from pfsync.medplum.batch import (
    Entry,
    EntryResult,
    Kind,
    bundle_bytes,
    bundle_size,
    classify,
    is_too_large,
    parse_batch,
)
from pfsync.medplum.bundlesend import (
    MEDPLUM_BODY_LIMIT,
    Exhausted,
    OversizeRoute,
    Recheck,
    Released,
    Report,
    Retries,
    SenderStats,
    Sent,
    Settled,
    Superseded,
    send_bundle,
    wait_from_outcome_bytes,
)
from pfsync.medplum.client import MedplumClient
from pfsync.medplum.donequeue import DoneQueue
from pfsync.net.http import TEMPORARY_RULES, Clock, RetryPolicy, decide
from pfsync.net.pacing import Concurrency

_MIN_BUNDLE_BYTES = 16 * 1024
_READY = 2  # Bundles prepared ahead while every slot is in flight (one per answer arriving at once)


class BatchSender:
    """Accepts entries with `add`, sends them in Bundles, and reports the end of every entry (or its
    release) in `take_reports`: the caller takes them after every call, an exception's included."""

    def __init__(
        self,
        client: MedplumClient,
        *,
        max_bytes: int,
        max_entries: int,
        max_concurrency: int,
        clock: Clock,
        retry: RetryPolicy,
        events: EventSink | None = None,
        stop: threading.Event | None = None,
        async_runner: AsyncBatchRunner | None = None,
    ) -> None:
        self._client = client
        self._oversize = OversizeRoute(self._client, clock, async_runner)  # which Bundles go as async jobs
        limit = async_runner.max_bytes if async_runner else MEDPLUM_BODY_LIMIT - 1024
        self.max_bytes = max(_MIN_BUNDLE_BYTES, min(max_bytes, limit))
        self.max_entries = max_entries
        self._clock = clock
        self.pacer = self._client.pacer  # the client's: searches and Bundles spend one budget
        self._retry = retry
        self._events = events or NullSink()
        self._stop = stop
        self.concurrency = Concurrency(max_concurrency)
        self.stats = SenderStats()
        self._reports: list[Report] = []  # in the order they happened, until the caller takes them
        self._buf: OrderedDict[tuple[str, str], Entry] = OrderedDict()
        self._buf_bytes = 0
        self._blocked: dict[tuple[str, str], Entry] = {}
        self._inflight: set[tuple[str, str]] = set()
        self._futures: dict[Future[Sent], list[Entry]] = {}
        self._done = DoneQueue()
        self._peak: dict[Future[Sent], int] = {}  # most Bundles in flight during each one's life
        self._groups: list[list[Entry]] = []  # Bundles already cut (halves of a refused one)
        self._probe: Future[Sent] | None = None  # the Bundle that tells whether the quota is enforced
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="pfsync-bundle")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def take_reports(self) -> list[Report]:
        """The reports since the last take, in order (see the module docstring)."""
        reports, self._reports = self._reports, []
        return reports

    def add(self, entry: Entry) -> None:
        """Queue a write; sends Bundles once a full one can be made (blocks while slots are full
        and the next Bundles are ready)."""
        if self._queue(entry) and self._full():
            self._pump()

    def requeue(self, entry: Entry) -> None:
        """Queue a write without sending: a released create decided again (it waits again if a write
        of its identity went on the wire since its release)."""
        self._queue(entry)

    def _queue(self, entry: Entry) -> bool:
        """-> whether it joined the queue (else it waits for the write of its identity on the wire)."""
        key = entry.key
        if key in self._inflight:
            blocked = self._blocked.get(key)
            self._blocked[key] = entry  # sent after the in-flight write of this identity settles
            if blocked is not None:
                self._reports.append(Superseded(blocked))
            return False
        old = self._buf.pop(key, None)
        if old is not None:
            self._buf_bytes -= len(old.encoded()) + 1
            self._reports.append(Superseded(old))
        self._buf[key] = entry
        self._buf_bytes += len(entry.encoded()) + 1
        return True

    def _full(self, bundles: int = 1) -> bool:
        return len(self._buf) >= bundles * self.max_entries or self._buf_bytes >= bundles * self.max_bytes

    def flush(self) -> None:
        """Send everything queued and wait until every entry has an outcome (or is released)."""
        while self.step():
            pass

    def step(self) -> bool:
        """One round of `flush`: send what is queued (a partial Bundle too) while slots allow, then
        wait for at least one outcome (or for the pacer); False once nothing is queued or in flight.
        The caller may queue more between rounds (what waited for these outcomes)."""
        self._reap(block=False)
        self._check_stop()
        wait_s = self._launch(final=True)
        if not self._buf and not self._futures and not self._blocked and not self._groups:
            return False
        self._wait(wait_s)
        return True

    def poll(self) -> None:
        """Take in answered Bundles, if any came back (a queue check when none did): the caller
        reads on while its resources wait for these ids, and the freed slots take ready Bundles."""
        if self._done:
            self._reap(block=False)

    def nudge(self) -> None:
        """Without waiting: take in finished Bundles and send what is queued, even a partial
        Bundle, while slots allow (other resources wait for these ids)."""
        self._reap(block=False)
        if self._stopping():
            return
        self._launch(final=True)

    # -- the loop
    def _pump(self) -> None:
        """Send full Bundles while slots allow; wait for outcomes only while two Bundles are ready."""
        while True:
            self._reap(block=False)
            self._check_stop()
            wait_s = self._launch(final=False)
            if not self._full(_READY):
                # The caller goes on preparing entries while Bundles are in flight: waiting here
                # with less than a Bundle queued left a slot empty at every answer while the next
                # Bundle was being prepared (a quarter of a quota-off load ran one Bundle short).
                return
            self._wait(wait_s)

    def _wait(self, wait_s: float) -> None:
        """Wait for an outcome, or for the pacer, or release what waited for a write in flight."""
        if self._futures:
            self._reap(block=True)
        elif wait_s > 0:
            self._clock.sleep(wait_s)
        elif not self._buf and self._blocked:
            self._release_blocked(set(self._blocked))

    def _check_stop(self) -> None:
        if self._stopping():
            self._drain_inflight()
            raise InterruptedRunError("load stopped: the writes in flight have settled; a rerun resumes")

    def _launch(self, final: bool) -> float:
        """Start Bundles while slots, budget and entries allow; -> seconds to wait, if pacing."""
        while (self._buf or self._groups) and len(self._futures) < self.concurrency.slots:
            if not final and not self._groups and not self._full():
                return 0.0
            inflight_entries = sum(len(b) for b in self._futures.values())
            want = len(self._groups[0]) if self._groups else min(len(self._buf), self.max_entries)
            cap, wait_s = self.pacer.allowance(self._clock.now(), inflight_entries, want)
            if cap == 0:
                return wait_s
            probe = self.pacer.probe_out and self._probe is None  # allowance just made this the probe
            if self._groups:
                group = self._groups.pop(0)
                if cap is not None and cap < len(group):
                    self._groups.insert(0, group[cap:])
                    group = group[:cap]
                future = self._start(group)
            else:
                future = self._start(self._take(cap))
            if probe:
                self._probe = future
        return 0.0

    def _take(self, cap: int | None) -> list[Entry]:
        limit = self.max_entries if cap is None else max(1, min(cap, self.max_entries))
        bundle: list[Entry] = []
        sizes = 0
        while self._buf and len(bundle) < limit:
            key, entry = next(iter(self._buf.items()))
            size = len(entry.encoded())
            if bundle and bundle_size(sizes + size, len(bundle) + 1) > self.max_bytes:
                break
            del self._buf[key]
            self._buf_bytes -= size + 1
            bundle.append(entry)
            sizes += size
        return bundle

    def _start(self, bundle: list[Entry]) -> Future[Sent]:
        for e in bundle:
            self._inflight.add(e.key)
        body = bundle_bytes(bundle)
        self.stats.bundles += 1
        self.stats.max_slots = max(self.stats.max_slots, len(self._futures) + 1)
        alone_async = self._oversize.alone(bundle, len(body))
        if alone_async:
            self._events.emit("load_async_batch", type=bundle[0].type, id=bundle[0].sid, bytes=len(body))
        future = self._pool.submit(self._send, body, alone_async)
        self._futures[future] = bundle
        self._done.watch(future)
        self._peak[future] = len(self._futures)
        for other in self._futures:  # every Bundle in flight now shares the server with this many
            self._peak[other] = max(self._peak.get(other, 0), len(self._futures))
        return future

    def _send(self, body: bytes, alone_async: bool = False) -> Sent:
        """On a worker thread: one Bundle, synchronously or as an async batch job."""
        return send_bundle(self._client, body, self._oversize.runner_for(alone_async))

    def _reap(self, *, block: bool) -> None:
        if not self._futures:
            return
        if not block and not self._done:
            return  # the common case, after every entry added: nothing came back
        finished = []
        for future in self._done.take(block=block):
            if future is self._probe:
                self._probe = None
                self.pacer.probe_out = False
            bundle = self._futures.pop(future)
            peak = self._peak.pop(future, 0)
            finished.append((bundle, future.result(), max(peak, len(self._futures) + 1)))
        if finished and self.pacer.budget(self._clock.now()) is None and not self._stopping():
            # A ready Bundle takes the freed slot before the answers are read (reading 100 outcomes
            # takes milliseconds the server would sit idle for). Only without a quota budget to
            # respect: under an enforced quota the answers' RateLimit must be read first.
            self._launch(final=False)
        for bundle, sent, inflight in finished:
            self._complete(bundle, sent, inflight=inflight)

    def _stopping(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    def _drain_inflight(self) -> None:
        while self._futures:
            self._reap(block=True)

    def _release_blocked(self, keys: set[tuple[str, str]]) -> None:
        for key in keys:
            entry = self._blocked.pop(key, None)
            if entry is not None and entry.method == "POST":
                # A create decided while another write of this identity was in flight: that write
                # has ended now, so the caller decides again (a second POST would be a second copy).
                self._reports.append(Released(entry))
            elif entry is not None:
                self._queue(entry)

    # -- outcomes
    def _complete(self, bundle: list[Entry], sent: Sent, inflight: int) -> None:
        self.stats.requests += 1
        keys = {e.key for e in bundle}
        self._inflight -= keys
        now = self._clock.now()
        status = sent.status
        if status is not None:
            self.stats.statuses[status] = self.stats.statuses.get(status, 0) + 1
        if status is not None and is_too_large(status, sent.text):
            self._too_large(bundle)
        elif status is None or decide(status, TEMPORARY_RULES, lambda: (None, sent.text)) == "retry":
            wait_s = wait_from_outcome_bytes(sent.content) if status == 429 else None
            throttled = status == 429
            self._client.observe_bundle(sent.ratelimit, len(bundle), throttled)
            self.concurrency.congested()
            if throttled:
                self.stats.throttled += 1
            attempt = max(e.attempts for e in bundle) + 1
            self.pacer.throttle(wait_s if wait_s is not None else self._retry.backoff(attempt), now)
            result = EntryResult(status or 0, text=sent.text or f"HTTP {status}")
            for e in bundle:
                self._again(e, result, ambiguous=status != 429)
        elif status in (401, 403):
            raise HTTPError(
                f"Medplum refused the batch: HTTP {status}" + (f": {sent.text}" if sent.text else ""),
                method="POST", url=redact(self._client.fhir_url), status=status, outcome=sent.text,
            )  # fmt: skip
        elif status >= 300:
            self._client.observe_bundle(sent.ratelimit, len(bundle), False)
            self._bundle_refused(bundle, EntryResult(status, text=sent.text))
        else:
            self._batch_response(bundle, sent, inflight)
        self._release_blocked(keys - self._inflight)

    def _batch_response(self, bundle: list[Entry], sent: Sent, inflight: int) -> None:
        results = parse_batch(sent.content, len(bundle))
        again = Retries()
        for entry, result in zip(bundle, results, strict=True):
            kind = classify(entry, result)
            if kind is Kind.RETRY:
                again.count(result)
                self._again(entry, result, ambiguous=result.status == 0)
            elif kind is Kind.STALE:
                self._reports.append(Recheck(entry))
            else:
                self._reports.append(Settled(entry, kind, result))
        self._client.observe_bundle(sent.ratelimit, len(bundle) - again.throttled, again.throttled > 0)
        self.stats.conflicts += again.conflicts
        if again.throttled:
            self.stats.throttled += 1
            self.pacer.throttle(again.wait if again.wait is not None else 1.0, self._clock.now())
        if again.conflicts or again.throttled or again.errors:
            self.concurrency.congested()
        else:
            self.concurrency.clean(len(bundle), sent.elapsed, inflight)

    def _again(self, entry: Entry, result: EntryResult, *, ambiguous: bool) -> None:
        entry.attempts += 1
        self.stats.retried_entries += 1
        # docs/medplum.md "Measured on a real server": serialization conflicts are expected under concurrency and safe to
        # retry, so they get a larger budget than server errors before the retry queue.
        budget = self._retry.retries * (3 if result.status == 409 else 1)
        if entry.attempts > budget:
            self._reports.append(Exhausted(entry, result))
        elif entry.method == "POST" and ambiguous:
            # docs/medplum.md "Measured on a real server": a lost response to a POST that did commit must not become a
            # second copy: the identity is looked up again before a create is re-sent.
            self._reports.append(Recheck(entry))
        else:
            self._queue(entry)

    def _too_large(self, bundle: list[Entry]) -> None:
        self.stats.splits += 1
        if len(bundle) == 1:
            key = bundle[0].key
            if self._oversize.route(key):  # refused under the 1 MiB we assume: async alone
                self._inflight.add(key)
                self._groups.append(bundle)
                return
            self._reports.append(Settled(bundle[0], Kind.FAILED, EntryResult(413, text=TOO_LARGE_EVEN_ASYNC)))
            return
        size = len(bundle_bytes(bundle))
        self.max_bytes = max(_MIN_BUNDLE_BYTES, min(self.max_bytes, size // 2))
        self._events.emit("load_bundle_split", entries=len(bundle), bytes=size, max_bytes=self.max_bytes)
        self._regroup(bundle)

    def _bundle_refused(self, bundle: list[Entry], result: EntryResult) -> None:
        """A 4xx for the whole Bundle: isolate the culprit by re-sending entries in smaller Bundles."""
        if len(bundle) == 1:
            self._reports.append(Settled(bundle[0], Kind.FAILED, result))
            return
        self._regroup(bundle)

    def _regroup(self, bundle: list[Entry]) -> None:
        # The halves keep their identities reserved so no newer version overtakes them.
        self._inflight |= {e.key for e in bundle}
        half = len(bundle) // 2
        self._groups.extend([bundle[:half], bundle[half:]])
