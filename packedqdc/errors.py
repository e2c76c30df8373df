"""Typed exceptions of the library.

Every message is a single line that names the file, the field and, where there is one, the first
offending molecule. The CLI prints ``Error: <message>`` and exits non-zero without a traceback.
"""

from __future__ import annotations


class PackedQDCError(Exception):
    """Base class of every error packedqdc raises on purpose."""

    exit_code: int = 1


class SourceError(PackedQDCError):
    """An input dataset (NPZ file, OpenQDC cache) is missing, malformed or holds bad values."""


class FormatError(PackedQDCError):
    """A packed directory cannot be opened: files missing, unreadable or of inconsistent sizes."""

    exit_code = 2


class TargetExistsError(PackedQDCError):
    """The output directory exists and overwriting was not asked for."""


class ConfigError(PackedQDCError):
    """Options that contradict each other or the data (e.g. a molecule larger than ``num_atoms``)."""

    exit_code = 2


class TrainingError(PackedQDCError):
    """Training cannot go on (non-finite loss, incompatible checkpoint, ...)."""
