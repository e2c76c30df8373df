"""Optional dependencies (extras in pyproject.toml): import them or say how to install them."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import ConfigError


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module`` or raise ConfigError: "``what`` needs <module>: pip install 'packedqdc[extra]'".

    Args:
        module: the import name (``"ase"``, ``"matplotlib"``).
        extra: the packedqdc extra that installs it (``"ase"``, ``"plot"``).
        what: the feature asking, for the message (``"--plot"``, ``"packedqdc.ase"``).
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{what} needs {module}: pip install 'packedqdc[{extra}]'") from None
