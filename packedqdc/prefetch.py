"""Background assembly: run iterators in threads, a bounded number of items ahead, in order.

``prefetched`` is the loader's prefetch machinery (``batches(prefetch=...)``, ``workers``): the
kernels release the GIL, so batches can be assembled (and ``transfer`` run on them, e.g.
``jax.device_put``) while the consumer works on the previous ones.
"""

from __future__ import annotations

import queue
import threading
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
    caller's thread (one iterator only).
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


def _threaded(sources: list[Iterator[Any]], depth: int, transfer: Callable[[Any], Any] | None) -> Iterator[Any]:
    queues: list[queue.Queue[Any]] = [queue.Queue(maxsize=depth) for _ in sources]
    stop = threading.Event()

    def work(items: Iterator[Any], q: queue.Queue[Any]) -> None:
        def put(obj: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(obj, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            for item in items:
                if not put(item if transfer is None else transfer(item)):
                    return
            put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put(_Failure(exc))
        finally:
            _close(items)

    threads = [
        threading.Thread(target=work, args=(items, q), name=f"packedqdc-prefetch-{w}", daemon=True)
        for w, (items, q) in enumerate(zip(sources, queues))
    ]
    for thread in threads:
        thread.start()
    try:
        turn = 0
        while True:
            obj = queues[turn].get()
            if obj is _DONE:
                return
            if isinstance(obj, _Failure):
                raise obj.exc
            yield obj
            turn = (turn + 1) % len(queues)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
