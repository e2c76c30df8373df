"""Dataset sources: readers that turn an input dataset into a stream of ``MoleculeChunk``.

A source is anything that satisfies :class:`MoleculeSource`; ``packedqdc.pack.pack_source`` drives
one into a ``PackedWriter``. Sources check values as they read and raise ``SourceError`` (one line:
file, key, first bad molecule), or drop bad molecules when asked to skip them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from ..errors import SourceError
from ..format import MoleculeChunk


class UnreadableSourceError(SourceError):
    """The input cannot be read at all (missing file, not an NPZ/zip, corrupt header)."""

    exit_code = 2


class MoleculeSource(Protocol):
    """What ``pack_source`` needs from a source.

    Attributes:
        n_molecules: molecules in the input, before any are skipped (drives the progress bar);
            None while a streamed input's size is unknown (it must be set once ``chunks()`` ends).
        has_forces: whether chunks carry ``F``.
        has_qtot: whether chunks carry ``Qtot``.
    """

    n_molecules: int | None
    has_forces: bool
    has_qtot: bool

    def chunks(self) -> Iterator[MoleculeChunk]:
        """Yield the valid molecules in input order, in chunks of bounded size."""
        ...

    def provenance(self) -> dict[str, Any]:
        """Where the data came from; called after ``chunks()`` is exhausted (may include skip counts)."""
        ...


__all__ = ["MoleculeSource", "UnreadableSourceError"]
