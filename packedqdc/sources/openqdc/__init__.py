"""OpenQDC caches as a packedqdc source (``packedqdc pack openqdc``; needs the ``openqdc`` extra).

- ``classes``: openqdc's class metadata (levels of theory, stored units, per-class fixes);
- ``cache``: the memmap cache on disk, read in bounded blocks;
- ``references``: isolated-atom energies for ``formation`` and ``regression`` energy types;
- ``source``: :class:`OpenQDCSource`, which yields ``MoleculeChunk``s.

The pack entry point is :func:`packedqdc.pack.pack_openqdc`.
"""

from __future__ import annotations

from .cache import CacheMissingError, CacheReader, find_cache, resolve_cache_dir
from .classes import INSTALL_HINT, DatasetInfo, EnergyMethod, import_openqdc, resolve_dataset, select_method
from .references import IsolatedAtomEnergies, fit_element_energies, formation_references, regression_references
from .source import ENERGY_TYPES, OpenQDCSource


def __getattr__(name: str):  # ``from packedqdc.sources.openqdc import pack_openqdc`` keeps working
    if name == "pack_openqdc":
        from ...pack import pack_openqdc

        return pack_openqdc
    raise AttributeError(name)


__all__ = [
    "ENERGY_TYPES",
    "INSTALL_HINT",
    "CacheMissingError",
    "CacheReader",
    "DatasetInfo",
    "EnergyMethod",
    "OpenQDCSource",
    "IsolatedAtomEnergies",
    "find_cache",
    "fit_element_energies",
    "formation_references",
    "import_openqdc",
    "regression_references",
    "resolve_cache_dir",
    "resolve_dataset",
    "select_method",
]
