"""One training process per run directory: an exclusive ``flock`` on ``RUN_DIR/.lock``.

The lock is advisory and held through an open file descriptor, so it is released however the
process ends (even ``kill -9``), and a stale ``.lock`` file never blocks a later run. In a
multi-process job only process 0 takes it (the others write through process 0's run).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import TrainingError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the run directory is then unguarded
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"


class RunLock:
    """Holds the lock of ``run_dir`` from construction until :meth:`release` (or process exit).

    Raises:
        TrainingError: another process holds it (its pid is named when it wrote one).
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.file = Path(run_dir) / LOCK_FILE
        self._fd: int | None = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip()
            os.close(self._fd)
            self._fd = None
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise TrainingError(f"{Path(run_dir)}: the run is in use by another packedqdc process{who}; "
                                "wait for it to end or stop it first") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    __del__ = release


__all__ = ["LOCK_FILE", "RunLock"]
