"""JAX's persistent compilation cache as packedqdc's commands set it up (``packedqdc.compile_cache``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys
from pathlib import Path
import jax, jax.numpy as jnp
from packedqdc.compile_cache import enable_compilation_cache, default_cache_dir

assert enable_compilation_cache() is None and not jax.config.jax_compilation_cache_dir  # ...=off
assert default_cache_dir() == Path(sys.argv[2]) / "packedqdc" / "jax"  # XDG_CACHE_HOME
directory = enable_compilation_cache(sys.argv[1])
assert directory == Path(sys.argv[1]) and jax.config.jax_compilation_cache_dir == sys.argv[1]
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
print(float(jax.jit(lambda x: jnp.sin(x) * 2)(jnp.arange(3.0)).sum()))
"""


def test_the_cache_is_off_on_request_and_fills_the_directory_given(tmp_path: Path) -> None:
    env = {**os.environ, "PACKEDQDC_COMPILATION_CACHE": "off", "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    cache = tmp_path / "cache"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(cache), str(tmp_path / "xdg")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert any(cache.iterdir())  # the jitted program was written there
    assert not (tmp_path / "xdg").exists()
