"""The prefetch machinery: order, errors, closing, and the hand-over to the consumer's thread."""

from __future__ import annotations

import threading
import time

import pytest

from packedqdc import prefetch
from packedqdc.prefetch import prefetched


def _source(start: int, stop: int, step: int, log: list, fail_at: int | None = None):
    try:
        for i in range(start, stop, step):
            if i == fail_at:
                raise ValueError(f"bad item {i}")
            log.append((i, threading.current_thread().name))
            yield i
    finally:
        log.append(("closed", start))


@pytest.mark.parametrize("workers", [1, 3])
def test_a_consumer_that_only_waits_takes_the_sources_over_in_order(workers):
    log: list = []
    sources = [_source(w, 600, workers, log) for w in range(workers)]
    got = list(prefetched(sources, 2))
    assert got == list(range(600))
    threads = [name for i, name in log if i != "closed" and i >= 500]
    assert threads and all(name == threading.current_thread().name for name in threads)  # handed over
    assert sorted(start for i, start in log if i == "closed") == list(range(workers))


def test_a_busy_consumer_keeps_the_background_threads():
    log: list = []
    out = []
    for item in prefetched(_source(0, 80, 1, log), 2):
        time.sleep(0.002)  # the consumer's work: far longer than an item takes to make
        out.append(item)
    assert out == list(range(80))
    assert all(name != threading.current_thread().name for i, name in log if i != "closed")


def test_errors_and_closing_after_the_hand_over(monkeypatch):
    monkeypatch.setattr(prefetch, "INLINE_AFTER", 0)
    monkeypatch.setattr(prefetch, "INLINE_WINDOW", 4)
    log: list = []
    with pytest.raises(ValueError, match="bad item 301"):
        for _ in prefetched([_source(0, 600, 2, log), _source(1, 600, 2, log, fail_at=301)], 2):
            pass
    assert sorted(start for i, start in log if i == "closed") == [0, 1]
    log.clear()
    stream = prefetched(_source(0, 600, 1, log), 2)
    head = [next(stream) for _ in range(100)]
    stream.close()
    assert head == list(range(100)) and ("closed", 0) in log


def test_a_hand_over_not_yet_read_still_closes_the_source(monkeypatch):
    monkeypatch.setattr(prefetch, "INLINE_AFTER", 0)
    monkeypatch.setattr(prefetch, "INLINE_WINDOW", 1)
    for _ in range(20):  # the worker may or may not have queued its hand-over when we stop
        log: list = []
        stream = prefetched(_source(0, 10_000, 1, log), 4)
        next(stream)
        next(stream)
        stream.close()
        assert log[-1] == ("closed", 0)
