"""``pack hdf5`` against files written with h5py in SPICE's and ANI-1x's published layouts.

SPICE (openmm/spice-dataset): one group per molecule with ``smiles`` (mapped, explicit H),
``atomic_numbers``, ``conformations`` (bohr), ``dft_total_energy`` (hartree) and
``dft_total_gradient`` (hartree/bohr). ANI-1x (aiqm/ANI1x_datasets): one group per formula with
``atomic_numbers``, ``coordinates`` (Å) and ``<level>.energy``/``<level>.forces`` (hartree,
hartree/Å), NaN where a level was not computed.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")
from typer.testing import CliRunner  # noqa: E402

from packedqdc.cli import app  # noqa: E402
from packedqdc.format import open_packed  # noqa: E402
from packedqdc.pack import pack_hdf5  # noqa: E402
from packedqdc.sources.hdf5 import smiles_charge  # noqa: E402
from packedqdc.units import BOHR_TO_ANGSTROM, HARTREE_TO_KCAL_MOL  # noqa: E402
from packedqdc.validate import validate_packed  # noqa: E402

# (group name, mapped SMILES with explicit hydrogens, atomic numbers in map order, total charge)
SPICE_MOLECULES = [
    ("water", "[O:1]([H:2])[H:3]", [8, 1, 1], 0),
    ("ammonium", "[N+:1]([H:2])([H:3])([H:4])[H:5]", [7, 1, 1, 1, 1], 1),
    ("acetate", "[C:1]([C:2](=[O:3])[O-:4])([H:5])([H:6])[H:7]", [6, 6, 8, 8, 1, 1, 1], -1),
    ("methane", "[C:1]([H:2])([H:3])([H:4])[H:5]", [6, 1, 1, 1, 1], 0),
]


def write_spice(path: Path, conformers: int = 3, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """A SPICE-layout file; returns what was written, by group."""
    rng = np.random.default_rng(seed)
    written = {}
    with h5py.File(path, "w") as f:
        for name, smiles, numbers, _ in SPICE_MOLECULES:
            n = len(numbers)
            g = f.create_group(name)
            g.create_dataset("smiles", data=[smiles], dtype=h5py.string_dtype())
            g.create_dataset("subset", data=[b"SPICE PubChem Set 1 Single Points Dataset v1.2"])
            g.create_dataset("atomic_numbers", data=np.array(numbers, dtype=np.int16))
            data = {
                "conformations": rng.normal(0.0, 2.0, size=(conformers, n, 3)).astype(np.float32),
                "dft_total_energy": rng.normal(-40.0 * n, 0.1, size=conformers),
                "dft_total_gradient": rng.normal(0.0, 0.02, size=(conformers, n, 3)).astype(np.float32),
                "formation_energy": rng.normal(-0.5, 0.1, size=conformers),
            }
            for key, value in data.items():
                g.create_dataset(key, data=value)
            g.create_dataset("mbis_charges", data=np.zeros((conformers, n, 1), dtype=np.float32))
            written[name] = data
    return written


def write_ani1x(path: Path, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """An ANI-1x-layout file (two formula groups); ``ccsd(t)_cbs.energy`` only for a few conformers."""
    rng = np.random.default_rng(seed)
    written = {}
    with h5py.File(path, "w") as f:
        for formula, numbers, c in (("C1H4", [6, 1, 1, 1, 1], 6), ("H2O1", [8, 1, 1], 4)):
            n = len(numbers)
            ccsd = np.full(c, np.nan)
            ccsd[::3] = rng.normal(-40.0, 0.1, size=ccsd[::3].shape)
            data = {
                "atomic_numbers": np.array(numbers, dtype=np.uint8),
                "coordinates": rng.normal(0.0, 1.0, size=(c, n, 3)).astype(np.float32),
                "wb97x_dz.energy": rng.normal(-40.0, 0.1, size=c),
                "wb97x_dz.forces": rng.normal(0.0, 0.05, size=(c, n, 3)).astype(np.float32),
                "wb97x_tz.energy": rng.normal(-40.0, 0.1, size=c),
                "ccsd(t)_cbs.energy": ccsd,
                "wb97x_dz.dipole": rng.normal(size=(c, 3)).astype(np.float32),
            }
            g = f.create_group(formula)
            for key, value in data.items():
                g.create_dataset(key, data=value)
            written[formula] = data
    return written


def test_spice_round_trip_force_sign_and_charges(tmp_path: Path) -> None:
    src = tmp_path / "SPICE-small.hdf5"
    written = write_spice(src)
    result = pack_hdf5(src, tmp_path / "out", layout="spice")
    assert result.n_molecules == 12 and result.skipped == 0
    ds = open_packed(result.path)
    i = 0
    for name, _, numbers, charge in sorted(SPICE_MOLECULES):  # h5py lists groups by name
        data = written[name]
        for k in range(3):
            mol = ds.molecule(i)
            np.testing.assert_array_equal(mol["Z"], numbers)
            np.testing.assert_array_equal(
                mol["R"], (data["conformations"][k].astype(np.float64) * BOHR_TO_ANGSTROM).astype(np.float32)
            )
            assert mol["E"] == data["dft_total_energy"][k] * HARTREE_TO_KCAL_MOL
            expected_f = -data["dft_total_gradient"][k].astype(np.float64) * (HARTREE_TO_KCAL_MOL / BOHR_TO_ANGSTROM)
            np.testing.assert_array_equal(mol["F"], expected_f.astype(np.float32))
            assert mol["Qtot"] == charge
            i += 1
    assert validate_packed(result.path).ok
    prov = json.loads((result.path / "meta.json").read_text())["provenance"]
    assert prov["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert prov["layout"] == "spice" and prov["keys"]["forces"] == "-dft_total_gradient"
    assert prov["source_units"] == {"energy": "hartree", "length": "bohr"} and prov["n_groups"] == 4


def test_spice_formation_energy_key_and_no_forces(tmp_path: Path) -> None:
    src = tmp_path / "spice.hdf5"
    written = write_spice(src, conformers=2, seed=1)
    out = pack_hdf5(src, tmp_path / "out", layout="spice", energy_key="formation_energy", forces_key="none").path
    ds = open_packed(out)
    assert ds.F is None
    expected = [written[name]["formation_energy"][k] * HARTREE_TO_KCAL_MOL for name, *_ in sorted(SPICE_MOLECULES) for k in range(2)]
    np.testing.assert_array_equal(ds.E, expected)


def test_nan_targets_skipped_and_counted(tmp_path: Path) -> None:
    src = tmp_path / "spice.hdf5"
    write_spice(src)
    with h5py.File(src, "r+") as f:
        f["water/dft_total_energy"][1] = np.nan
        gradient = f["methane/dft_total_gradient"][()]
        gradient[2, 3, 0] = np.nan
        f["methane/dft_total_gradient"][...] = gradient
    result = pack_hdf5(src, tmp_path / "out", layout="spice")  # no --skip-invalid needed
    assert (result.n_molecules, result.skipped) == (10, 2)
    prov = json.loads((result.path / "meta.json").read_text())["provenance"]
    assert prov["skipped_by_reason"] == {"dft_total_energy: non-finite value": 1, "dft_total_gradient: non-finite value": 1}
    assert f"{src}: group /water: conformer 1: dft_total_energy: non-finite value" in result.skipped_first


def test_ani1x_levels_and_nan_labels(tmp_path: Path) -> None:
    src = tmp_path / "ani1x-release.h5"
    written = write_ani1x(src)
    out = pack_hdf5(src, tmp_path / "dz", layout="ani").path
    ds = open_packed(out)
    assert ds.n_molecules == 10 and not np.any(ds.Qtot)
    first = written["C1H4"]
    np.testing.assert_array_equal(ds.R[:5], first["coordinates"][0])
    assert ds.E[0] == first["wb97x_dz.energy"][0] * HARTREE_TO_KCAL_MOL
    np.testing.assert_array_equal(
        ds.F[:5], (first["wb97x_dz.forces"][0].astype(np.float64) * HARTREE_TO_KCAL_MOL).astype(np.float32)
    )
    prov = json.loads((out / "meta.json").read_text())["provenance"]
    assert prov["keys"]["energy"] == "wb97x_dz.energy" and prov["keys"]["forces"] == "wb97x_dz.forces"
    assert prov["had_charges"] is False

    ccsd = pack_hdf5(src, tmp_path / "ccsd", layout="ani", energy_key="ccsd(t)_cbs.energy")
    assert (ccsd.n_molecules, ccsd.skipped) == (4, 6)  # conformers 0 and 3 of C1H4, 0 and 3 of H2O1
    assert open_packed(ccsd.path).F is None
    expected = [written[g]["ccsd(t)_cbs.energy"][k] * HARTREE_TO_KCAL_MOL for g in ("C1H4", "H2O1") for k in (0, 3)]
    np.testing.assert_array_equal(open_packed(ccsd.path).E, expected)


def test_truncated_file_one_line_error(tmp_path: Path) -> None:
    src = tmp_path / "spice.hdf5"
    write_spice(src, conformers=40)
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["pack", "hdf5", str(src), str(out), "--layout", "spice"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {src}: not a readable HDF5 file (")
    assert not out.exists()


def test_bad_position_names_group_conformer_dataset(tmp_path: Path) -> None:
    src = tmp_path / "spice.hdf5"
    write_spice(src)
    with h5py.File(src, "r+") as f:
        pos = f["ammonium/conformations"][()]
        pos[2, 1, 1] = np.inf
        f["ammonium/conformations"][...] = pos
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["pack", "hdf5", str(src), str(out), "--layout", "spice"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: {src}: group /ammonium: conformer 2: conformations: non-finite value"
    ]
    assert not out.exists()
    skipped = pack_hdf5(src, out, layout="spice", skip_invalid=True)
    assert (skipped.n_molecules, skipped.skipped) == (11, 1)


def test_missing_dataset_and_wrong_layout(tmp_path: Path) -> None:
    src = tmp_path / "spice.hdf5"
    write_spice(src)
    with h5py.File(src, "r+") as f:
        del f["methane/dft_total_energy"]
    runner = CliRunner()
    result = runner.invoke(app, ["pack", "hdf5", str(src), str(tmp_path / "out"), "--layout", "spice"])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {src}: group /methane: dataset 'dft_total_energy': missing"
    wrong = runner.invoke(app, ["pack", "hdf5", str(src), str(tmp_path / "out"), "--layout", "ani"])
    assert wrong.exit_code == 1 and "no group holds 'coordinates'" in wrong.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("dataset", "value", "text"), [
    ("atomic_numbers", lambda z: z.astype("S3"), "dtype |S3, expected integers"),  # text: int() would fail
    ("atomic_numbers", lambda z: z + 0.5, "dtype float64, expected integers"),  # a cast would truncate it
    ("dft_total_energy", lambda e: e.astype("S8"), "dtype |S8, expected numbers"),
])
def test_datasets_of_the_wrong_kind_are_one_line_errors(tmp_path: Path, dataset: str, value, text: str) -> None:
    src = tmp_path / "spice.hdf5"
    write_spice(src)
    with h5py.File(src, "r+") as f:
        old = f[f"methane/{dataset}"][()]
        del f[f"methane/{dataset}"]
        f[f"methane/{dataset}"] = value(old)
    result = CliRunner().invoke(app, ["pack", "hdf5", str(src), str(tmp_path / "out"), "--layout", "spice"])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {src}: group /methane: dataset {dataset!r}: {text}"
    assert not (tmp_path / "out").exists()


def test_smiles_charges_match_rdkit() -> None:
    Chem = pytest.importorskip("rdkit.Chem")
    smiles = [s for _, s, _, _ in SPICE_MOLECULES] + [
        "[NH4+]", "[Fe+2]", "[O-][N+](=O)[O-]", "[N++]", "C[N+](C)(C)C.[Cl-]", "[Co-3]", "c1cc[nH]c1", "[C@@H:1](F)(Cl)Br",
        "[O-:4][S:2](=[O:3])(=[O:5])[O-:1]",
    ]
    for s in smiles:
        mol = Chem.MolFromSmiles(s, sanitize=False)
        assert smiles_charge(s) == Chem.GetFormalCharge(mol), s


def test_missing_h5py_says_which_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "spice.hdf5"
    write_spice(src, conformers=1)
    monkeypatch.setitem(sys.modules, "h5py", None)
    result = CliRunner().invoke(app, ["pack", "hdf5", str(src), str(tmp_path / "out"), "--layout", "spice"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "Error: pack hdf5 needs the h5py package (h5py missing): pip install 'packedqdc[hdf5]'"
    ]


def test_ani_per_conformer_species_groups_by_size(tmp_path: Path) -> None:
    """ANI-2x/TorchANI files group conformers by atom count, with species per conformer (C, n)."""
    rng = np.random.default_rng(5)
    src = tmp_path / "ani2x.h5"
    with h5py.File(src, "w") as f:
        g = f.create_group("003")
        species = np.array([[8, 1, 1], [7, 1, 1], [8, 1, 1], [6, 8, 1]], dtype=np.int64)
        coords = rng.normal(size=(4, 3, 3)).astype(np.float32)
        energies = rng.normal(-70.0, 1.0, size=4)
        forces = rng.normal(0.0, 0.1, size=(4, 3, 3)).astype(np.float32)
        for key, value in (("species", species), ("coordinates", coords), ("energies", energies), ("forces", forces)):
            g.create_dataset(key, data=value)
    out = pack_hdf5(src, tmp_path / "out", layout="ani", energy_key="energies", forces_key="forces").path
    ds = open_packed(out)
    np.testing.assert_array_equal(ds.Z, species.reshape(-1))
    np.testing.assert_array_equal(ds.E, energies * HARTREE_TO_KCAL_MOL)
    np.testing.assert_array_equal(ds.F, (forces.reshape(-1, 3).astype(np.float64) * HARTREE_TO_KCAL_MOL).astype(np.float32))


def test_file_reopened_between_groups_reads_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import packedqdc.sources.hdf5 as hdf5_source

    src = tmp_path / "spice.hdf5"
    write_spice(src, conformers=4, seed=9)
    once = pack_hdf5(src, tmp_path / "once", layout="spice").path
    monkeypatch.setattr(hdf5_source, "REOPEN_GROUPS", 1)  # a fresh handle for every group
    every = pack_hdf5(src, tmp_path / "every", layout="spice").path
    for name in ("Z_pack.int32", "R_pack.f32", "F_pack.f32", "E.f64", "Qtot.f64", "offsets.npy"):
        assert (once / name).read_bytes() == (every / name).read_bytes(), name
