"""packedqdc: molecular datasets -> packed memory-mapped files -> PhysNet potentials (JAX).

The names below are the public Python API. The loader, the model and the training API are
imported on first use, so ``import packedqdc`` (and the CLI) stays fast and does not load JAX.
"""

from __future__ import annotations

from ._lazy import lazy_attributes
from .errors import ConfigError, FormatError, PackedQDCError, SourceError, TargetExistsError, TrainingError
from .format import MoleculeChunk, PackedDataset, PackedWriter, open_packed

__version__ = "0.1.0"

_LAZY = {
    "PackedMemmapLoader": "packedqdc.loader",
    "split_loader": "packedqdc.loader",
    "EF": "packedqdc.model",
    "PhysNet": "packedqdc.model",
    "energy_and_forces": "packedqdc.model",
    "Potential": "packedqdc.train",
    "TrainConfig": "packedqdc.train",
    "fit": "packedqdc.train",
    "evaluate_run": "packedqdc.train",
    "pack_npz": "packedqdc.pack",
    "pack_openqdc": "packedqdc.pack",
    "pack_xyz": "packedqdc.pack",
    "pack_hdf5": "packedqdc.pack",
    "validate_packed": "packedqdc.validate",
    "dataset_stats": "packedqdc.stats",
}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)

__all__ = [
    "ConfigError",
    "FormatError",
    "MoleculeChunk",
    "PackedDataset",
    "PackedQDCError",
    "PackedWriter",
    "SourceError",
    "TargetExistsError",
    "TrainingError",
    "open_packed",
    *_LAZY,
]
