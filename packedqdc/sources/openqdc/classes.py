"""openqdc's class metadata: cache paths, dtypes, levels of theory, stored units, per-class fixes.

``openqdc`` (pinned by the ``openqdc`` extra) supplies only this; the arrays are read by
``cache.py``. openqdc's Dataset constructor is never called: it copies ``atomic_inputs`` into RAM,
may go to the network for a missing file, and its zero-E0 path (``to_e_matrix``) breaks with
NumPy >= 2.4.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from ...errors import ConfigError, SourceError
from ...units import energy_factor, force_factor, length_factor

INSTALL_HINT = "pip install 'packedqdc[openqdc]'"


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
