"""OpenQDC caches -> chunks of molecules -> a packed directory.

``openqdc`` (pinned by the ``openqdc`` extra) supplies only class metadata: the cache path, dtypes,
levels of theory, stored units, per-class conversion fixes and isolated-atom energies. The arrays
are read here, straight from the cache's headerless ``.mmap`` files and ``props.pkl``, one bounded
block at a time. openqdc's Dataset constructor is never called: it copies ``atomic_inputs`` into
RAM, may go to the network for a missing file, and its zero-E0 path (``to_e_matrix``) breaks with
NumPy >= 2.4.

Cache layout read here (``M`` atoms, ``N`` molecules, see ``docs/openqdc.md``):

=============================  =========  ===============  ======================================
file                           dtype      shape            content
=============================  =========  ===============  ======================================
``atomic_inputs.mmap``         float32    (M, 5)           Z, formal charge, x, y, z
``position_idx_range.mmap``    int32      (N, 2)           [start, end) atom rows of molecule i
``energies.mmap``              class      (N, n_methods)   total energies, NaN = missing label
``forces.mmap``                float32    (M, 3, n_force)  only for classes with force methods
``props.pkl``                  pickle                      ``subset`` as (uniques, inverse), ...
=============================  =========  ===============  ======================================
"""

from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

import numpy as np

from ..elements import MAX_Z, symbol
from ..errors import ConfigError, SourceError
from ..format import MoleculeChunk
from ..pack import PackResult, pack_source
from ..units import energy_factor, force_factor, length_factor

INSTALL_HINT = "pip install 'packedqdc[openqdc]'"
ENERGY_TYPES = ("total", "formation", "regression")
DEFAULT_CACHE = "~/.cache/openqdc"
MAX_CHARGE = 10  # openqdc's E0 tables cover formal atomic charges -10..10
MOLECULE_BLOCK = 1 << 16  # molecules whose index ranges are read at once
ATOM_BLOCK = 1 << 19  # atoms per chunk (10 MB of atomic_inputs, plus forces)

ProgressFn = Callable[[int, int], None]


class CacheMissingError(SourceError):
    """The OpenQDC cache of a dataset is not on disk (nothing is downloaded)."""

    exit_code = 2


# --------------------------------------------------------------------------------------------
# Class metadata
# --------------------------------------------------------------------------------------------


def import_openqdc() -> ModuleType:
    """Import ``openqdc.datasets`` lazily (a few seconds: rdkit) with openqdc's logging silenced.

    Raises:
        ConfigError: openqdc is not installed; the message says how to install it.
    """
    try:
        import openqdc.datasets as datasets
        from loguru import logger
    except ImportError as exc:
        raise ConfigError(f"pack openqdc needs the openqdc package ({exc.name} missing): {INSTALL_HINT}") from None
    logger.disable("openqdc")
    return datasets


@dataclass(frozen=True)
class EnergyMethod:
    """One level of theory (one column of ``energies.mmap``).

    Attributes:
        index: column in ``energies.mmap``.
        name: openqdc's method string (``functional/basis``; may be empty or repeated).
        target: openqdc's ``energy_target_names`` entry for the column.
        force_column: column in the last axis of ``forces.mmap``, or None if no forces.
    """

    index: int
    name: str
    target: str
    force_column: int | None

    @property
    def has_forces(self) -> bool:
        return self.force_column is not None

    @property
    def label(self) -> str:
        """Human-readable ``index (name, target)``."""
        return f"{self.index} ({self.name or '<unnamed>'}, {self.target})"


@dataclass(frozen=True)
class DatasetInfo:
    """What packing needs to know about one openqdc dataset class.

    Attributes:
        class_name: registry name, e.g. ``"Spice"``.
        openqdc_name: the class's ``__name__``, e.g. ``"spice"``.
        relative_dir: preprocessed directory relative to the cache root, e.g. ``spice/preprocessed``.
        root_dir: the class's ``root`` relative to the cache root (holds ``regressionenergy.pkl``).
        energy_unit, distance_unit, forces_unit: stored units, openqdc spelling.
        energies_dtype: dtype of ``energies.mmap``.
        methods: the levels of theory, in column order.
        n_force_columns: last axis of ``forces.mmap`` (0: no file).
        force_fix: factor the class applies to forces beyond the unit change (Spice -1, ANI1X 0.529177249).
        energy_fix, distance_fix: the same for energies and positions (1.0 for every 0.1.2 class).
        openqdc_version: installed openqdc version.
        instance: ``Cls.no_init()``, for the isolated-atom tables.
    """

    class_name: str
    openqdc_name: str
    relative_dir: str
    root_dir: str
    energy_unit: str
    distance_unit: str
    forces_unit: str
    energies_dtype: np.dtype
    methods: tuple[EnergyMethod, ...]
    n_force_columns: int
    force_fix: float
    energy_fix: float
    distance_fix: float
    openqdc_version: str
    instance: Any = field(repr=False, compare=False)

    @property
    def energy_to_kcal(self) -> float:
        """Stored energy unit -> kcal/mol, including the class's own energy fix."""
        return energy_factor(self.energy_unit) * self.energy_fix

    @property
    def length_to_ang(self) -> float:
        """Stored distance unit -> Å, including the class's own distance fix."""
        return length_factor(self.distance_unit) * self.distance_fix

    @property
    def force_to_kcal_ang(self) -> float:
        """Stored force unit -> kcal/mol/Å, including the class's own force fix (e.g. the sign)."""
        energy, _, length = self.forces_unit.rpartition("/")
        return force_factor(energy, length) * self.force_fix


def resolve_dataset(name: str) -> DatasetInfo:
    """Find the openqdc potential-dataset class called ``name`` (case and ``_`` insensitive).

    Accepts registry keys (``Spice``, ``QM7X_V2``), CLI spellings (``qm7xv2``) and class
    ``__name__`` values (``spice_vl2``).

    Raises:
        ConfigError: unknown name, an interaction dataset, or openqdc missing.
    """
    datasets = import_openqdc()
    registry = datasets.AVAILABLE_POTENTIAL_DATASETS
    key = _norm(name)
    for class_name, cls in registry.items():
        if key in (_norm(class_name), _norm(cls.no_init().__name__)):
            return _describe(class_name, cls)
    if any(key == _norm(k) for k in datasets.AVAILABLE_INTERACTION_DATASETS):
        raise ConfigError(
            f"{name}: an OpenQDC interaction dataset (interaction energies, not total energies); "
            "pack openqdc supports potential datasets only"
        )
    raise ConfigError(f"unknown OpenQDC dataset {name!r}; known: {', '.join(sorted(registry))}")


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "").replace("-", "")


def _describe(class_name: str, cls: type) -> DatasetInfo:
    import openqdc

    inst = cls.no_init()
    names, targets = list(inst.energy_methods), list(inst.energy_target_names)
    mask = list(inst.force_mask)[: len(names)]
    mask += [False] * (len(names) - len(mask))
    columns = np.cumsum(mask) - 1
    methods = tuple(
        EnergyMethod(i, names[i], targets[i] if i < len(targets) else "", int(columns[i]) if mask[i] else None)
        for i in range(len(names))
    )
    relative_dir, root_dir = _relative_paths(inst)
    return DatasetInfo(
        class_name=class_name,
        openqdc_name=inst.__name__,
        relative_dir=relative_dir,
        root_dir=root_dir,
        energy_unit=str(inst.__energy_unit__),
        distance_unit=str(inst.__distance_unit__),
        forces_unit=str(inst.__forces_unit__),
        energies_dtype=np.dtype(inst.data_types["energies"]),
        methods=methods,
        n_force_columns=len(inst.force_methods),
        force_fix=_class_fix(inst, "convert_forces", "_fn_forces"),
        energy_fix=_class_fix(inst, "convert_energy", "_fn_energy"),
        distance_fix=_class_fix(inst, "convert_distance", "_fn_distance"),
        openqdc_version=str(openqdc.__version__),
        instance=inst,
    )


def _relative_paths(inst: Any) -> tuple[str, str]:
    """``(preprocess_path, root)`` of ``inst`` relative to the cache root, without side effects.

    openqdc's ``preprocess_path`` runs ``makedirs``; it is evaluated against a throwaway cache root
    so that nothing is created in the user's cache.
    """
    from openqdc.utils import io as oq_io

    saved = oq_io._OPENQDC_CACHE_DIR
    with tempfile.TemporaryDirectory(prefix="packedqdc-openqdc-") as scratch:
        oq_io.set_cache_dir(scratch)
        try:
            base = oq_io.get_local_cache()
            return os.path.relpath(inst.preprocess_path, base), os.path.relpath(inst.root, base)
        finally:
            oq_io._OPENQDC_CACHE_DIR = saved


def _class_fix(inst: Any, method: str, unit_fn: str) -> float:
    """Factor a class's ``convert_*`` override applies on top of the unit conversion.

    The unit conversion is set to the identity and the class's own method is probed, so any
    override (Spice's sign flip, ANI1X's 0.529177249) is picked up without a hard-coded list.

    Raises:
        SourceError: the override is not a constant factor.
    """
    probe = np.array([1.0, 2.0])
    inst.__dict__[unit_fn] = lambda x: x
    try:
        out = np.asarray(getattr(inst, method)(probe), dtype=np.float64)
    finally:
        del inst.__dict__[unit_fn]
    if out.shape != (2,) or not np.isclose(out[1], 2.0 * out[0], rtol=1e-12, atol=0.0):
        raise SourceError(f"{type(inst).__name__}.{method}: not a constant factor; cannot reproduce it")
    return float(out[0])


def select_method(info: DatasetInfo, spec: int | str) -> EnergyMethod:
    """The level of theory named by ``spec``: an index, a method string or a target name.

    Names match case-insensitively, first against method strings, then against target names.

    Raises:
        ConfigError: out of range, unknown, or ambiguous (the message lists the candidates).
    """
    text = str(spec).strip()
    if text.lstrip("-").isdigit():
        index = int(text)
        if not 0 <= index < len(info.methods):
            raise ConfigError(f"{info.class_name}: energy method {index} out of range 0..{len(info.methods) - 1}")
        return info.methods[index]
    key = text.lower()
    for attr in ("name", "target"):
        hits = [m for m in info.methods if getattr(m, attr).lower() == key]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise ConfigError(
                f"{info.class_name}: energy method {text!r} is ambiguous: "
                f"{'; '.join(m.label for m in hits)}; pass the index"
            )
    raise ConfigError(
        f"{info.class_name}: no energy method {text!r}; see --list-methods: "
        f"{'; '.join(m.label for m in info.methods)}"
    )


# --------------------------------------------------------------------------------------------
# The cache on disk
# --------------------------------------------------------------------------------------------


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    """Cache root: ``cache_dir``, else ``$OPENQDC_CACHE_DIR``, else ``~/.cache/openqdc``."""
    raw = os.fspath(cache_dir) if cache_dir is not None else os.environ.get("OPENQDC_CACHE_DIR", DEFAULT_CACHE)
    return Path(os.path.normpath(os.path.expanduser(os.path.expandvars(raw))))


def required_files(info: DatasetInfo) -> list[str]:
    """Files the memmap cache of ``info`` must hold."""
    names = ["atomic_inputs.mmap", "position_idx_range.mmap", "energies.mmap", "props.pkl"]
    if info.n_force_columns:
        names.insert(3, "forces.mmap")
    return names


def find_cache(info: DatasetInfo, cache_root: Path) -> Path:
    """The preprocessed directory of ``info`` under ``cache_root``; creates nothing.

    Raises:
        CacheMissingError: a required file is missing; the message says where it looked and how
            to download the dataset.
    """
    path = cache_root / info.relative_dir
    missing = [name for name in required_files(info) if not (path / name).is_file()]
    if missing:
        what = "no OpenQDC cache" if len(missing) == len(required_files(info)) else f"missing {', '.join(missing)}"
        raise CacheMissingError(
            f"{path}: {what} for {info.class_name}; download it first with "
            f"`OPENQDC_CACHE_DIR={cache_root} openqdc download {info.class_name}` "
            f"(or `openqdc download {info.class_name} --cache-dir {cache_root}`), "
            "or point --cache-dir / OPENQDC_CACHE_DIR at an existing cache"
        )
    return path


def _read_rows(file: Path, dtype: np.dtype, row_shape: tuple[int, ...], lo: int, hi: int) -> np.ndarray:
    """Rows ``lo:hi`` of a headerless array file, copied out of a short-lived memmap.

    Mapping only the block (and unmapping it at once) keeps resident memory to one chunk.
    """
    if hi <= lo:
        return np.zeros((0, *row_shape), dtype=dtype)
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
    block = np.memmap(file, dtype=dtype, mode="r", offset=lo * row_bytes, shape=(hi - lo, *row_shape))
    out = np.array(block)
    del block
    return out


def _load_subsets(file: Path, n_molecules: int) -> tuple[list[str], np.ndarray]:
    """Subset names and the (N,) int64 subset index of every molecule, from ``props.pkl``.

    openqdc stores ``np.unique(subsets, return_inverse=True)``; PCQM caches store a plain list.
    """
    try:
        with open(file, "rb") as fh:
            props = pickle.load(fh)
        raw = props["subset"]
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, AttributeError) as exc:
        raise SourceError(f"{file}: unreadable or without 'subset' ({exc})") from None
    if isinstance(raw, tuple) and len(raw) == 2:
        uniques, inverse = np.asarray(raw[0]), np.asarray(raw[1]).reshape(-1)
    else:
        uniques, inverse = np.unique(np.asarray(raw), return_inverse=True)
    if inverse.shape[0] != n_molecules:
        raise SourceError(f"{file}: key 'subset': {inverse.shape[0]} entries for {n_molecules} molecules")
    names = [u.decode() if isinstance(u, bytes) else str(u) for u in uniques.tolist()]
    return names, inverse.astype(np.int64)


@dataclass
class RawBlock:
    """Molecules ``lo:hi`` of the cache as stored (no units applied).

    Attributes:
        lo, hi: molecule range in the cache.
        n_atoms: (m,) int64 atoms per molecule.
        atomic: (A, 5) float32 atomic_inputs rows: Z, formal charge, x, y, z.
        energies: (m, n_methods) the cache's energies dtype.
        forces: (A, 3) float32 forces of the chosen force column, or None.
    """

    lo: int
    hi: int
    n_atoms: np.ndarray
    atomic: np.ndarray
    energies: np.ndarray
    forces: np.ndarray | None


class CacheReader:
    """Reads one OpenQDC memmap cache in bounded blocks.

    Attributes:
        path: the preprocessed directory.
        n_molecules: N.
        n_atoms_total: M.
        subset_names: names of the subsets.
        subset_index: (N,) int64 subset of every molecule.
    """

    def __init__(self, info: DatasetInfo, path: Path) -> None:
        self.info = info
        self.path = path
        self.n_atoms_total = self._rows("atomic_inputs.mmap", np.dtype(np.float32), 5)
        self.n_molecules = self._rows("position_idx_range.mmap", np.dtype(np.int32), 2)
        n_methods = len(info.methods)
        if self._rows("energies.mmap", info.energies_dtype, n_methods) != self.n_molecules:
            raise SourceError(
                f"{path / 'energies.mmap'}: size does not match {self.n_molecules} molecules x {n_methods} "
                f"methods of {info.energies_dtype}"
            )
        if info.n_force_columns:
            if self._rows("forces.mmap", np.dtype(np.float32), 3 * info.n_force_columns) != self.n_atoms_total:
                raise SourceError(
                    f"{path / 'forces.mmap'}: size does not match {self.n_atoms_total} atoms x 3 x "
                    f"{info.n_force_columns} float32"
                )
        self.subset_names, self.subset_index = _load_subsets(path / "props.pkl", self.n_molecules)

    def _rows(self, name: str, dtype: np.dtype, width: int) -> int:
        file = self.path / name
        size, row = file.stat().st_size, dtype.itemsize * width
        if width == 0 or size % row:
            raise SourceError(f"{file}: {size} bytes is not a whole number of {width} x {dtype} rows")
        return size // row

    def blocks(self, force_column: int | None) -> Iterator[RawBlock]:
        """All molecules in order, as blocks of at most ``ATOM_BLOCK`` atoms (or one molecule).

        Raises:
            SourceError: the index ranges are not contiguous, ascending and within the atom count.
        """
        expected_start = 0
        for lo in range(0, self.n_molecules, MOLECULE_BLOCK):
            hi = min(lo + MOLECULE_BLOCK, self.n_molecules)
            ranges = _read_rows(self.path / "position_idx_range.mmap", np.dtype(np.int32), (2,), lo, hi)
            ranges = ranges.astype(np.int64)
            self._check_ranges(ranges, lo, expected_start)
            expected_start = int(ranges[-1, 1])
            ends = ranges[:, 1]
            i = 0
            while i < hi - lo:
                j = max(i + 1, int(np.searchsorted(ends, ranges[i, 0] + ATOM_BLOCK, side="right")))
                yield self._block(lo + i, lo + j, ranges[i:j], force_column)
                i = j

    def _check_ranges(self, ranges: np.ndarray, lo: int, expected_start: int) -> None:
        starts, ends = ranges[:, 0], ranges[:, 1]
        bad = np.flatnonzero(
            (starts != np.concatenate(([expected_start], ends[:-1]))) | (ends < starts) | (ends > self.n_atoms_total)
        )
        if bad.size:
            i = lo + int(bad[0])
            raise SourceError(
                f"{self.path / 'position_idx_range.mmap'}: molecule {i}: range {ranges[bad[0]].tolist()} "
                f"is not contiguous with the previous one or exceeds {self.n_atoms_total} atoms"
            )

    def _block(self, lo: int, hi: int, ranges: np.ndarray, force_column: int | None) -> RawBlock:
        a0, a1 = int(ranges[0, 0]), int(ranges[-1, 1])
        n_methods = len(self.info.methods)
        energies = _read_rows(self.path / "energies.mmap", self.info.energies_dtype, (n_methods,), lo, hi)
        atomic = _read_rows(self.path / "atomic_inputs.mmap", np.dtype(np.float32), (5,), a0, a1)
        forces = None
        if force_column is not None:
            shape = (3, self.info.n_force_columns)
            forces = _read_rows(self.path / "forces.mmap", np.dtype(np.float32), shape, a0, a1)[:, :, force_column]
        return RawBlock(lo, hi, ranges[:, 1] - ranges[:, 0], atomic, energies, forces)


# --------------------------------------------------------------------------------------------
# Reference (isolated-atom) energies
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceEnergies:
    """Per-atom energies subtracted from total energies, in kcal/mol.

    Attributes:
        table: (MAX_Z + 1, 2 * MAX_CHARGE + 1) float64, E0 by [Z, formal charge + MAX_CHARGE].
        known: same shape, bool, whether the table has a value (missing pairs are an error).
        source: where the values come from, for meta.json.
    """

    table: np.ndarray
    known: np.ndarray
    source: str

    def per_molecule(self, z: np.ndarray, charge: np.ndarray, mol: np.ndarray, m: int, first: int) -> np.ndarray:
        """(m,) float64 sum of E0 over the atoms of each molecule.

        Args:
            z, charge: (A,) int64 atomic numbers and formal charges.
            mol: (A,) int64 molecule of each atom within the block, 0..m-1.
            first: cache index of the block's first molecule, for error messages.

        Raises:
            SourceError: an (element, charge) pair without a reference energy.
        """
        col = charge + MAX_CHARGE
        ok = (col >= 0) & (col < self.table.shape[1])
        ok[ok] = self.known[z[ok], col[ok]]
        if not ok.all():
            k = int(np.flatnonzero(~ok)[0])
            raise SourceError(
                f"molecule {first + int(mol[k])}: no reference energy for {symbol(int(z[k]))} with formal "
                f"charge {int(charge[k])} ({self.source}); use --energy-type total"
            )
        return np.bincount(mol, weights=self.table[z, col], minlength=m)


def formation_references(info: DatasetInfo, method: EnergyMethod) -> ReferenceEnergies:
    """openqdc's tabulated isolated-atom energies of ``method``, charge-aware, in kcal/mol.

    Built from the method's ``atom_energies_dict`` (hartree), not openqdc's ``to_e_matrix``.

    Raises:
        ConfigError: openqdc has no table for the method (it would silently use zeros).
    """
    from openqdc.methods.atom_energies import atom_energy_collection
    from openqdc.utils.constants import ATOMIC_NUMBERS

    enum = info.instance.__energy_methods__[method.index]
    entries = atom_energy_collection.get(str(enum).lower(), {})
    if not entries:
        raise ConfigError(
            f"{info.class_name}: openqdc has no isolated-atom energies for method {method.label}; "
            "use --energy-type total or regression"
        )
    shape = (MAX_Z + 1, 2 * MAX_CHARGE + 1)
    table, known = np.zeros(shape), np.zeros(shape, dtype=bool)
    for (element, charge), value in entries.items():
        z, col = ATOMIC_NUMBERS[element], int(charge) + MAX_CHARGE
        table[z, col] = float(np.asarray(value, dtype=np.float64).reshape(-1)[0]) * energy_factor("hartree")
        known[z, col] = True
    return ReferenceEnergies(table, known, f"openqdc isolated-atom energies of {method.name}")


def regression_references(
    info: DatasetInfo, method: EnergyMethod, reader: CacheReader, pkl: Path, progress: ProgressFn
) -> ReferenceEnergies:
    """Per-element E0 (same for every charge) in kcal/mol for ``--energy-type regression``.

    Uses openqdc's fitted E0s from ``pkl`` (its ``regressionenergy.pkl``) when present, otherwise
    a least-squares fit over every molecule of the cache with a finite energy for ``method``.
    """
    if pkl.is_file():
        per_z, source = _load_regression_pkl(pkl, info, method), f"openqdc fit ({pkl})"
    else:
        per_z = fit_element_energies(reader, method, progress)
        source = f"least-squares fit by packedqdc over the {info.class_name} cache"
    known = np.zeros((MAX_Z + 1, 2 * MAX_CHARGE + 1), dtype=bool)
    known[np.isfinite(per_z)] = True
    table = np.repeat(np.nan_to_num(per_z)[:, None], known.shape[1], axis=1)
    return ReferenceEnergies(table, known, source)


def _load_regression_pkl(pkl: Path, info: DatasetInfo, method: EnergyMethod) -> np.ndarray:
    """(MAX_Z + 1,) float64 E0 per element in kcal/mol from openqdc's regression pickle (NaN: absent)."""
    try:
        with open(pkl, "rb") as fh:
            entries = pickle.load(fh)
        per_z = np.full(MAX_Z + 1, np.nan)
        for species, energy in entries.items():
            means = np.asarray(energy.mean, dtype=np.float64).reshape(-1)
            if means.shape[0] != len(info.methods):
                raise ValueError(f"{means.shape[0]} methods, {info.class_name} has {len(info.methods)}")
            per_z[int(species.number)] = means[method.index] * info.energy_to_kcal
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as exc:
        raise SourceError(f"{pkl}: not a regression E0 file for {info.class_name} ({exc}); delete it to refit") from None
    return per_z


def fit_element_energies(reader: CacheReader, method: EnergyMethod, progress: ProgressFn) -> np.ndarray:
    """Least-squares per-element energies, streaming: accumulate XᵀX and Xᵀy block by block.

    X is (molecules, elements) atom counts and y the method's total energies in kcal/mol; the
    minimum-norm solution of the normal equations equals openqdc's ``lstsq`` fit.

    Returns:
        (MAX_Z + 1,) float64 E0 in kcal/mol, NaN for elements absent from the fit.
    """
    width = MAX_Z + 1
    xtx, xty = np.zeros((width, width)), np.zeros(width)
    for block in reader.blocks(force_column=None):
        y = block.energies[:, method.index].astype(np.float64) * reader.info.energy_to_kcal
        counts = _element_counts(block, width)
        good = np.isfinite(y)
        xtx += counts[good].T @ counts[good]
        xty += counts[good].T @ y[good]
        progress(block.hi, reader.n_molecules)
    present = np.flatnonzero(np.diag(xtx) > 0)
    if present.size == 0:
        raise SourceError(f"{reader.path}: no molecule with a finite energy for method {method.label}")
    solution = np.linalg.lstsq(xtx[np.ix_(present, present)], xty[present], rcond=None)[0]
    per_z = np.full(width, np.nan)
    per_z[present] = solution
    return per_z


def _element_counts(block: RawBlock, width: int) -> np.ndarray:
    """(m, width) float64 number of atoms of each element in each molecule of ``block``."""
    m = block.hi - block.lo
    z = _as_int(block.atomic[:, 0])
    mol = np.repeat(np.arange(m), block.n_atoms)
    return np.bincount(mol * width + np.clip(z, 0, width - 1), minlength=m * width).reshape(m, width).astype(float)


# --------------------------------------------------------------------------------------------
# Conversion and packing
# --------------------------------------------------------------------------------------------


@dataclass
class PackCounts:
    """Molecules seen, kept and skipped while packing."""

    n_source: int = 0
    n_kept: int = 0
    skipped_nan_energy: int = 0
    skipped_nan_forces: int = 0
    skipped_other_subsets: int = 0


@dataclass(frozen=True)
class Conversion:
    """How one block of raw cache rows becomes a MoleculeChunk.

    Attributes:
        info: the dataset class.
        method: the level of theory packed.
        subset: index of the only subset kept, or None for all.
        subset_index: (N,) int64 subset of every molecule.
        references: E0s to subtract (formation/regression) or None (total).
    """

    info: DatasetInfo
    method: EnergyMethod
    subset: int | None
    subset_index: np.ndarray
    references: ReferenceEnergies | None

    def __call__(self, block: RawBlock, counts: PackCounts, reasons: list[str]) -> MoleculeChunk:
        """Apply units and fixes, drop NaN-labelled or other-subset molecules, count them.

        The first few skip reasons are appended to ``reasons``.
        """
        m = block.hi - block.lo
        counts.n_source += m
        keep = np.ones(m, dtype=bool)
        if self.subset is not None:
            keep = self.subset_index[block.lo : block.hi] == self.subset
            counts.skipped_other_subsets += int(m - keep.sum())
        mol = np.repeat(np.arange(m), block.n_atoms)
        energy = block.energies[:, self.method.index].astype(np.float64) * self.info.energy_to_kcal
        counts.skipped_nan_energy += _drop(keep, np.isfinite(energy), block.lo, "energy is NaN (missing label)", reasons)
        forces = None
        if self.method.has_forces:
            forces = block.forces.astype(np.float64) * self.info.force_to_kcal_ang
            finite_f = np.bincount(mol[~np.isfinite(forces).all(axis=1)], minlength=m) == 0
            counts.skipped_nan_forces += _drop(keep, finite_f, block.lo, "forces are not finite", reasons)
        atom_keep = keep[mol]
        z, charge, mol = _as_int(block.atomic[atom_keep, 0]), _as_int(block.atomic[atom_keep, 1]), mol[atom_keep]
        _check_atoms(z, block.atomic[atom_keep, 2:5], mol, block.lo)
        if self.references is not None:
            energy = energy - self.references.per_molecule(z, charge, mol, m, block.lo)
        counts.n_kept += int(keep.sum())
        return MoleculeChunk(
            n_atoms=block.n_atoms[keep].astype(np.int32),
            Z=z.astype(np.int32),
            R=(block.atomic[atom_keep, 2:5].astype(np.float64) * self.info.length_to_ang).astype(np.float32),
            E=energy[keep],
            F=None if forces is None else forces[atom_keep].astype(np.float32),
            Qtot=np.bincount(mol, weights=charge, minlength=m)[keep].astype(np.float64),
        )


MAX_REASONS = 5


def _drop(keep: np.ndarray, good: np.ndarray, first: int, why: str, reasons: list[str]) -> int:
    """Clear ``keep`` (in place) where ``good`` is false; return how many kept molecules that dropped.

    The first dropped molecule's reason is added to ``reasons`` while it holds fewer than
    ``MAX_REASONS`` entries.
    """
    dropped = np.flatnonzero(keep & ~good)
    if dropped.size and len(reasons) < MAX_REASONS:
        reasons.append(f"molecule {first + int(dropped[0])}: {why}")
    keep[dropped] = False
    return int(dropped.size)


def _as_int(column: np.ndarray) -> np.ndarray:
    """(A,) int64 from a float32 atomic_inputs column holding integers."""
    return np.rint(column).astype(np.int64)


def _check_atoms(z: np.ndarray, positions: np.ndarray, mol: np.ndarray, first: int) -> None:
    """Raise SourceError naming the first kept molecule with a bad Z or a non-finite position."""
    bad = (z < 1) | (z > MAX_Z) | ~np.isfinite(positions).all(axis=1)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise SourceError(
            f"atomic_inputs.mmap: molecule {first + int(mol[k])}: atom with Z={int(z[k])} "
            f"at {positions[k].tolist()} (Z must be 1..{MAX_Z}, positions finite)"
        )


def _no_progress(done: int, total: int) -> None:
    """Default progress callback: report nothing."""


class OpenQDCSource:
    """An OpenQDC cache as a :class:`packedqdc.sources.MoleculeSource`.

    Construction resolves the class, the method and the cache; :meth:`prepare` then loads (or,
    for regression without openqdc's pickle, fits) the reference energies. Nothing is written.

    Attributes:
        n_molecules: molecules in the cache (before skipping).
        has_forces: whether the chosen method has forces.
        has_qtot: always True (openqdc stores formal charges).
        counts: molecules seen, kept and skipped so far.
        skipped_first: one-line reasons for the first few skipped molecules.
    """

    has_qtot = True

    def __init__(
        self,
        name: str,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        energy_method: int | str = 0,
        energy_type: str = "total",
        subset: str | None = None,
    ) -> None:
        if energy_type not in ENERGY_TYPES:
            raise ConfigError(f"unknown energy type {energy_type!r}; use one of {', '.join(ENERGY_TYPES)}")
        self.info = resolve_dataset(name)
        self.method = select_method(self.info, energy_method)
        self.energy_type = energy_type
        self.cache_root = resolve_cache_dir(cache_dir)
        self.reader = CacheReader(self.info, find_cache(self.info, self.cache_root))
        self.name = str(self.reader.path)  # how messages name the input
        self.input_paths = (self.reader.path,)
        self.n_molecules = self.reader.n_molecules
        self.has_forces = self.method.has_forces
        self.subset = _select_subset(self.reader, subset)
        self.references: ReferenceEnergies | None = None
        self._prepared = False
        self.counts = PackCounts()
        self.skipped_first: list[str] = []

    @property
    def needs_fit(self) -> bool:
        """Whether regression E0s must be fitted here (openqdc's pickle is absent)."""
        return self.energy_type == "regression" and not self.regression_pkl.is_file()

    @property
    def regression_pkl(self) -> Path:
        """Where openqdc keeps fitted E0s: ``<cache>/<root>/preprocessed/regressionenergy.pkl``."""
        return self.cache_root / self.info.root_dir / "preprocessed" / "regressionenergy.pkl"

    def prepare(self, progress: ProgressFn | None = None) -> None:
        """Load or fit the reference energies of ``energy_type`` (a fit reports through ``progress``)."""
        if self.energy_type == "formation":
            self.references = formation_references(self.info, self.method)
        elif self.energy_type == "regression":
            pkl, report = self.regression_pkl, progress or _no_progress
            self.references = regression_references(self.info, self.method, self.reader, pkl, report)
        self._prepared = True

    def chunks(self) -> Iterator[MoleculeChunk]:
        """Kept molecules in cache order, at most ``ATOM_BLOCK`` atoms (or one molecule) per chunk."""
        if not self._prepared:
            self.prepare()
        convert = Conversion(self.info, self.method, self.subset, self.reader.subset_index, self.references)
        for block in self.reader.blocks(self.method.force_column):
            yield convert(block, self.counts, self.skipped_first)

    def provenance(self) -> dict[str, Any]:
        """Provenance for meta.json: class, version, cache, method, units, fixes, subsets, counts."""
        info, method, c = self.info, self.method, self.counts
        names = self.reader.subset_names
        return {
            "source": "openqdc",
            "dataset_class": info.class_name,
            "openqdc_name": info.openqdc_name,
            "openqdc_version": info.openqdc_version,
            "input": str(self.reader.path),
            "cache_path": str(self.reader.path),
            "energy_method": {"index": method.index, "name": method.name, "target_name": method.target},
            "level_of_theory": method.name,
            "energy_type": self.energy_type,
            "reference_energies": None if self.references is None else self.references.source,
            "forces_method": {"name": method.name, "column": method.force_column} if method.has_forces else None,
            "source_units": {"energy": info.energy_unit, "distance": info.distance_unit, "forces": info.forces_unit},
            "conversion_factors": {
                "energy_to_kcal_mol": info.energy_to_kcal,
                "distance_to_angstrom": info.length_to_ang,
                "forces_to_kcal_mol_angstrom": info.force_to_kcal_ang if method.has_forces else None,
            },
            "class_fixes": {"energy": info.energy_fix, "distance": info.distance_fix, "forces": info.force_fix},
            "subsets": names if self.subset is None else [names[self.subset]],
            "qtot": "sum of per-atom formal charges (atomic_inputs column 1)",
            "n_source_molecules": self.n_molecules,
            "skipped_invalid": c.skipped_nan_energy + c.skipped_nan_forces,
            "skipped_nan_energy": c.skipped_nan_energy,
            "skipped_nan_forces": c.skipped_nan_forces,
            "skipped_other_subsets": c.skipped_other_subsets,
            "forces_note": self._forces_note(),
        }

    def _forces_note(self) -> str:
        method = self.method
        if method.has_forces:
            return f"forces of {method.label}, column {method.force_column} of forces.mmap"
        why = "has no force methods" if self.info.n_force_columns == 0 else "has no forces for this method"
        return f"no F_pack.f32: OpenQDC {self.info.class_name} {why} ({method.label})"


def _select_subset(reader: CacheReader, subset: str | None) -> int | None:
    """Index of ``subset`` among the cache's subset names (case-insensitive), None for all."""
    if subset is None:
        return None
    lowered = [s.lower() for s in reader.subset_names]
    if subset.lower() not in lowered:
        raise ConfigError(f"{reader.path}: no subset {subset!r}; subsets: {', '.join(reader.subset_names)}")
    return lowered.index(subset.lower())


def pack_openqdc(
    name: str,
    output: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    energy_method: int | str = 0,
    energy_type: str = "total",
    subset: str | None = None,
    force: bool = False,
    progress: ProgressFn | None = None,
) -> PackResult:
    """Pack the OpenQDC dataset ``name`` from its local cache into the directory ``output``.

    Output: E float64 kcal/mol (total, or minus reference energies), R float32 Å, F float32
    kcal/mol/Å when the method has forces (else absent), Qtot float64 = sum of formal charges,
    int64 offsets. Molecules whose energy (or packed forces) is NaN are skipped and counted.

    Args:
        name: dataset class, e.g. ``"Spice"``, ``"QM9"``, ``"ANI1X"`` (case-insensitive).
        output: packed directory to create (atomically).
        cache_dir: cache root; default ``$OPENQDC_CACHE_DIR`` or ``~/.cache/openqdc``.
        energy_method: index, method string or target name of the level of theory.
        energy_type: ``total``, ``formation`` (tabulated isolated-atom E0, charge-aware) or
            ``regression`` (fitted per-element E0).
        subset: keep only this subset (name as stored in the cache).
        force: replace ``output`` if it exists.
        progress: called as ``progress(done, total)``; a regression fit counts as a first pass.

    Raises:
        ConfigError: openqdc missing, unknown dataset/method/subset/energy type.
        CacheMissingError: the cache is not on disk (nothing is created).
        SourceError: malformed cache, or no molecule left.
        TargetExistsError: ``output`` exists and ``force`` is false.
    """
    report = progress or _no_progress
    source = OpenQDCSource(
        name, cache_dir=cache_dir, energy_method=energy_method, energy_type=energy_type, subset=subset
    )
    n = source.n_molecules
    passes = 2 if source.needs_fit else 1
    source.prepare(lambda done, _total: report(done, passes * n))
    return pack_source(source, output, force=force, progress=lambda done, _total: report((passes - 1) * n + done, passes * n))
