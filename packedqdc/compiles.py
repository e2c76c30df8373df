"""Count XLA compilations, to check that a loop (MD, optimisation, prediction) compiles per size
class and not per call."""

from __future__ import annotations

import threading
from typing import Any

import jax

#: jax.monitoring event recorded once per backend (XLA) compilation.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

_lock = threading.Lock()
_count = 0
_registered = False


def _listener(event: str, duration: float, **_: Any) -> None:
    global _count
    if event == BACKEND_COMPILE_EVENT:
        with _lock:
            _count += 1


def compilations() -> int:
    """XLA compilations of this process since the first call of this function (0 on that call)."""
    global _registered
    with _lock:
        if not _registered:
            jax.monitoring.register_event_duration_secs_listener(_listener)
            _registered = True
        return _count


class CountCompilations:
    """``with CountCompilations() as c: ...`` then ``c.count``: XLA compilations inside the block."""

    def __enter__(self) -> CountCompilations:
        self._start = compilations()
        self.count = 0
        return self

    def __exit__(self, *exc: Any) -> None:
        self.count = compilations() - self._start
