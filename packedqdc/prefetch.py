"""Background assembly: run iterators in threads, a bounded number of items ahead, in order.

``prefetched`` is the loader's prefetch machinery (``batches(prefetch=...)``, ``workers``): the
kernels release the GIL, so batches can be assembled (and ``transfer`` run on them, e.g.
``jax.device_put``) while the consumer works on the previous ones.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_DONE = object()


def prefetched(
    items: Iterator[Any] | list[Iterator[Any]], depth: int, transfer: Callable[[Any], Any] | None = None
) -> Iterator[Any]:
    """Run ``items`` (and ``transfer`` on each) in background threads, ``depth`` items ahead each.

    ``items`` is one iterator, or a list of ``W`` iterators that each run in a thread of their own
    and are interleaved round robin: item ``t`` comes from iterator ``t % W`` (the first one that
    ends ends the stream). Memory stays bounded by ``depth`` items per thread plus the ones being
    built. An exception in a thread is re-raised in the consumer at its place in the order. Closing
    the returned generator (or dropping it) stops the threads. ``depth`` 0 runs everything in the
    caller's thread (one iterator only). A consumer that does almost nothing between items (it
    mostly waits for them) gets the iterators handed to its own thread after a few dozen items
    (``INLINE_BUSY_FRACTION``): the same items in the same order, without a thread hand-off each.
    """
    sources = items if isinstance(items, list) else [items]
    if depth <= 0:
        if len(sources) != 1:
            raise ValueError("prefetch depth 0 runs in the caller's thread: pass one iterator")
        return _inline(sources[0], transfer)
    return _threaded(sources, depth, transfer)


def _inline(items: Iterator[Any], transfer: Callable[[Any], Any] | None) -> Iterator[Any]:
    try:
        for item in items:
            yield item if transfer is None else transfer(item)
    finally:
        _close(items)


def _close(items: Iterator[Any]) -> None:
    """Close a generator now (its ``finally`` runs here), rather than whenever it is collected."""
    close = getattr(items, "close", None)
    if close is not None:
        close()


#: a threaded stream hands its sources to the consumer's thread once the consumer, over an
#: evaluation window of items, spent less than INLINE_BUSY_FRACTION of the time it waited for them
#: doing its own work: every item then costs a wake-up and a hand-over of the GIL between threads
#: (15-40 µs a batch here, more than assembling a QM9-sized batch) and saves nothing
INLINE_AFTER, INLINE_WINDOW, INLINE_BUSY_FRACTION = 8, 32, 0.25


class _HandOver:
    """A worker's last item before it returns its source to the consumer's thread."""


def _threaded(sources: list[Iterator[Any]], depth: int, transfer: Callable[[Any], Any] | None) -> Iterator[Any]:
    queues: list[queue.Queue[Any]] = [queue.Queue(maxsize=depth) for _ in sources]
    stop = threading.Event()
    hand_over = threading.Event()

    def work(items: Iterator[Any], q: queue.Queue[Any]) -> None:
        def put(obj: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(obj, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        handed = False
        try:
            for item in items:
                if not put(item if transfer is None else transfer(item)):
                    return
                if hand_over.is_set():  # the generator is suspended between items: the consumer takes it
                    handed = put(_HandOver())
                    return
            put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put(_Failure(exc))
        finally:
            if not handed:
                _close(items)

    threads = [
        threading.Thread(target=work, args=(items, q), name=f"packedqdc-prefetch-{w}", daemon=True)
        for w, (items, q) in enumerate(zip(sources, queues))
    ]
    for thread in threads:
        thread.start()
    inline = [False] * len(sources)  # sources handed over to this thread
    busy = waited = 0.0
    count = 0
    try:
        turn = 0
        while True:
            t0 = time.perf_counter()
            if inline[turn]:
                try:
                    item = next(sources[turn])
                except StopIteration:
                    return
                obj = item if transfer is None else transfer(item)
            else:
                obj = queues[turn].get()
                if isinstance(obj, _HandOver):
                    inline[turn] = True
                    continue
                if obj is _DONE:
                    return
                if isinstance(obj, _Failure):
                    raise obj.exc
            t1 = time.perf_counter()
            yield obj
            count += 1
            if count > INLINE_AFTER and not hand_over.is_set():
                busy += time.perf_counter() - t1
                waited += t1 - t0
                if count % INLINE_WINDOW == 0:
                    if busy < INLINE_BUSY_FRACTION * waited:
                        hand_over.set()
                    busy = waited = 0.0
            turn = (turn + 1) % len(queues)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        for w, q in enumerate(queues):  # a hand-over the consumer stopped before reading
            while not q.empty():
                if isinstance(q.get_nowait(), _HandOver):
                    inline[w] = True
        for source, taken in zip(sources, inline):
            if taken:
                _close(source)
