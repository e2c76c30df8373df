"""Reference-energy fit and the training configuration's JSON round trip (no model involved)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from packedqdc.errors import ConfigError, SourceError
from packedqdc.format import MoleculeChunk, PackedWriter, open_packed
from packedqdc.train import ReferenceEnergies, TrainConfig, fit_reference_energies


def _synthetic(path: Path, table: dict[int, float], charge_coef: float, m: int = 300, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    elements = np.array(sorted(table))
    n = rng.integers(2, 12, size=m).astype(np.int32)
    Z = rng.choice(elements, size=int(n.sum())).astype(np.int32)
    Q = rng.integers(-1, 2, size=m).astype(np.float64)
    per_atom = np.array([table[z] for z in Z])
    mol = np.repeat(np.arange(m), n)
    E = np.bincount(mol, weights=per_atom, minlength=m) + charge_coef * Q  # exactly linear
    chunk = MoleculeChunk(n_atoms=n, Z=Z, R=rng.normal(size=(Z.size, 3)).astype(np.float32), E=E, Qtot=Q)
    with PackedWriter(path, has_forces=False, has_qtot=True) as writer:
        writer.append(chunk)
        writer.commit()
    return path


def test_fit_recovers_per_element_energies(tmp_path: Path) -> None:
    table = {1: -313.5, 6: -23893.2, 7: -34430.1, 8: -47196.8}
    ds = open_packed(_synthetic(tmp_path / "syn", table, charge_coef=-150.25))
    ref = fit_reference_energies(ds, np.arange(ds.n_molecules), block=37)  # several blocks
    for z, value in table.items():
        assert ref.table[z] == pytest.approx(value, abs=1e-6)
    assert ref.charge_coef == pytest.approx(-150.25, abs=1e-6)
    assert ref.table[0] == 0.0 and ref.table[9] == 0.0
    assert abs(ref.per_atom_mean) < 1e-6 and ref.per_atom_std < 1e-6
    seg = np.repeat(np.arange(3), np.asarray(ds.n_atoms[:3]))
    Z = np.asarray(ds.Z[: int(ds.offsets[3])])
    assert np.allclose(ref.molecule_energies(Z, seg, ds.Qtot[:3]), ds.E[:3], atol=1e-6, rtol=0)
    again = ReferenceEnergies.from_dict(ref.to_dict())
    assert np.array_equal(again.table, ref.table) and again.charge_coef == ref.charge_coef


def test_fit_uses_only_the_given_molecules_and_rejects_nan(tmp_path: Path) -> None:
    path = _synthetic(tmp_path / "syn", {1: -300.0, 6: -23000.0}, charge_coef=0.0, m=50)
    E = np.memmap(path / "E.f64", dtype=np.float64, mode="r+")
    E[7] = np.nan
    E.flush()
    ds = open_packed(path)
    ref = fit_reference_energies(ds, np.setdiff1d(np.arange(50), [7]))
    assert ref.table[6] == pytest.approx(-23000.0)
    with pytest.raises(SourceError, match="molecule 7 has a non-finite energy"):
        fit_reference_energies(ds, np.arange(50))


def test_config_json_round_trip_and_validation(tmp_path: Path) -> None:
    cfg = TrainConfig(name="x", features=16, electrostatics=False, max_time=12.5, layout="padded")
    cfg.save(tmp_path / "config.json")
    assert TrainConfig.load(tmp_path / "config.json") == cfg
    with pytest.raises(ConfigError, match="layout"):
        TrainConfig(layout="ragged")
    with pytest.raises(ConfigError, match="unknown option"):
        TrainConfig.from_dict({"nope": 1})
