"""packedqdc: molecular datasets -> packed memory-mapped files -> PhysNet potentials (JAX)."""

from __future__ import annotations

from .errors import ConfigError, FormatError, PackedQDCError, SourceError, TargetExistsError, TrainingError
from .format import MoleculeChunk, PackedDataset, PackedWriter, open_packed

__version__ = "0.1.0"

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
]
