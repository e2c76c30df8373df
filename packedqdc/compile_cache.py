"""JAX's persistent compilation cache for packedqdc's commands.

XLA compiles a training step once per shape class (four in a packed run), and every process
compiles again: a resumed run, ``evaluate`` and ``predict`` of a trained model all pay it before
their first batch (22 s for a 1-epoch tiny run on a 2-core CPU, of which ~15 s is compiling).
With the cache, a program compiled once is loaded from disk by later processes (the same run
started again: 7.8 s). ``packedqdc train``, ``evaluate`` and ``predict`` turn it on
(``enable_compilation_cache``) in ``~/.cache/packedqdc/jax`` (``$XDG_CACHE_HOME`` respected),
capped at ``MAX_BYTES`` (JAX evicts the least recently used entries), and only for programs whose
compilation took at least a second (JAX's default). ``PACKEDQDC_COMPILATION_CACHE`` moves it
(a directory) or turns it off (``off``); a cache set through JAX itself
(``JAX_COMPILATION_CACHE_DIR``) is left as it is. Library users call the function themselves.

JAX keys an entry by the program, the compile options, the devices and the versions of jax and
jaxlib, so a hit gives the very executable a compilation would: results are bit for bit the same.
"""

from __future__ import annotations

import os
from pathlib import Path

#: environment variable: a cache directory, or "off"
ENV = "PACKEDQDC_COMPILATION_CACHE"
#: bytes the cache may hold before JAX evicts the least recently used entries
MAX_BYTES = 2 * 2**30


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/packedqdc/jax``, else ``~/.cache/packedqdc/jax``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "packedqdc" / "jax"


def enable_compilation_cache(path: str | os.PathLike[str] | None = None) -> Path | None:
    """Turn on JAX's persistent compilation cache; returns its directory, or None when it stays off.

    Args:
        path: the directory; default ``$PACKEDQDC_COMPILATION_CACHE``, else ``default_cache_dir()``.

    Off when ``PACKEDQDC_COMPILATION_CACHE=off``, when JAX's own cache setting is already made
    (its directory is then returned), or when the directory cannot be created (a read-only home):
    the cache only saves time, so its absence is never an error.
    """
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)
    setting = os.environ.get(ENV, "")
    if path is None and setting.lower() == "off":
        return None
    directory = Path(path or setting or default_cache_dir()).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return directory


__all__ = ["ENV", "MAX_BYTES", "default_cache_dir", "enable_compilation_cache"]
