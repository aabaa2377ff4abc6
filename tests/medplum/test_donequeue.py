"""DoneQueue (pfsync.medplum.donequeue): finished futures, each reported once, in the order they finished."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

from pfsync.medplum.donequeue import DoneQueue


def test_donequeue_reports_each_finished_future_once() -> None:
    done = DoneQueue()
    first: Future[int] = Future()
    second: Future[int] = Future()
    done.watch(first)
    done.watch(second)
    assert not done and done.take(block=False) == []
    second.set_result(2)
    first.set_result(1)
    assert done
    assert done.take(block=False) == [second, first]
    assert done.take(block=False) == []


def test_donequeue_block_waits_for_a_worker_and_takes_an_already_finished_future_at_once() -> None:
    done = DoneQueue()
    gate = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(lambda: gate.wait(timeout=10))
        done.watch(future)
        gate.set()
        assert done.take(block=True) == [future]
        assert future.result() is True  # released by the test, not by the timeout
    finished: Future[int] = Future()
    finished.set_result(0)
    done.watch(finished)  # already done: reported straight away
    assert done.take(block=True) == [finished]
