"""Loading pickles from a dataset cache without running code from them.

``pickle.load`` calls whatever the file names (``os.system`` via ``__reduce__``), so a crafted
``props.pkl`` in a downloaded or shared cache would run code on the user's machine. Here only the
classes that openqdc itself writes may be named: NumPy arrays, dtypes and scalars (pickled by
NumPy >= 2 as ``numpy._core.*``, by NumPy 1.x as ``numpy.core.*``) and, for
``regressionenergy.pkl``, openqdc's ``AtomSpecies``/``AtomEnergy`` records. Plain containers,
strings and numbers need no class lookup. Anything else is refused before it is called.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from ..errors import SourceError

_NUMPY_CORES = ("numpy._core", "numpy.core")

#: (module, name) pairs an openqdc cache pickle may name
NUMPY_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {("numpy", "ndarray"), ("numpy", "dtype")}
    | {(f"{core}.multiarray", name) for core in _NUMPY_CORES for name in ("_reconstruct", "scalar")}
    | {(f"{core}.numeric", "_frombuffer") for core in _NUMPY_CORES}  # arrays in pickle protocol 5
    | {("_codecs", "encode")}  # bytes (array data) in pickle protocols 0-2: a pure str -> bytes call
)
OPENQDC_E0_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {("openqdc.datasets.energies", "AtomSpecies"), ("openqdc.datasets.energies", "AtomEnergy")}
)


class UnsafePickleError(SourceError):
    """A pickle names a class or function outside the allowed set (nothing from it was run)."""

    exit_code = 2


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, fh: Any, allowed: frozenset[tuple[str, str]]) -> None:
        super().__init__(fh)
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._allowed:
            raise UnsafePickleError(f"{module}.{name}")
        return super().find_class(module, name)


def load_restricted(path: Path, allowed: frozenset[tuple[str, str]] = NUMPY_GLOBALS) -> Any:
    """Unpickle ``path``, allowing only the globals in ``allowed``.

    Raises:
        UnsafePickleError: the file names any other global (one line naming the file and the
            global; nothing named in the file has been called).
        SourceError: the file cannot be read or is not a pickle.
    """
    try:
        with open(path, "rb") as fh:
            return _RestrictedUnpickler(fh, allowed).load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(
            f"{path}: refused to unpickle: it names {exc}, which an OpenQDC cache never holds "
            "(a crafted or foreign pickle; nothing from it was run)"
        ) from None
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, IndexError, KeyError) as exc:
        detail = " ".join(str(exc).split())
        raise SourceError(f"{path}: not a readable pickle ({type(exc).__name__}: {detail})") from None


__all__ = ["NUMPY_GLOBALS", "OPENQDC_E0_GLOBALS", "UnsafePickleError", "load_restricted"]
