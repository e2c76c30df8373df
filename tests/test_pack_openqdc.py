"""``pack openqdc`` against genuine OpenQDC caches written by openqdc's own writer.

Every packed value is compared with what openqdc's Dataset returns for the same molecule in
kcal/mol and Å. Needs openqdc (the test environment installs ``packedqdc[openqdc]``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

openqdc_datasets = pytest.importorskip("openqdc.datasets")
# openqdc's own loader (the reference here) trips a NumPy deprecation in its E0 table code
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

from typer.testing import CliRunner  # noqa: E402

from packedqdc.cli import app  # noqa: E402
from packedqdc.format import open_packed  # noqa: E402
from packedqdc.pack import pack_openqdc  # noqa: E402
from packedqdc.sources.openqdc import resolve_dataset  # noqa: E402

# formal charges (per element) that openqdc tabulates for Spice's method, so formation works
CHARGES = {1: (0, 1), 6: (0, -1, 1), 7: (0, 1, -1), 8: (0, -1, 1)}
E0_HARTREE = {1: -0.5, 6: -37.8, 7: -54.6, 8: -75.1, 9: -99.7}
RTOL = 1e-5


def _molecule(rng: np.random.Generator, cls: Any, i: int, elements: tuple[int, ...], bohr: bool) -> dict:
    """One openqdc entry: a few atoms, every `i % 3 == 1` molecule with one charged atom."""
    inst = cls.no_init()
    n = int(rng.integers(2, 7))
    z = rng.choice(elements, size=n)
    q = np.zeros(n)
    if i % 3 == 1 and int(z[0]) in CHARGES:
        q[0] = CHARGES[int(z[0])][1]
    pos = rng.normal(0.0, 1.5 / (0.529 if bohr else 1.0), size=(n, 3))
    base = sum(E0_HARTREE[int(k)] for k in z)
    n_e = len(inst.energy_methods)
    entry = {
        "name": np.array([f"mol{i}"]),
        "subset": np.array(["alpha" if i % 2 == 0 else "beta"]),
        "energies": (base + rng.normal(0.0, 0.05, size=(1, n_e))).astype(np.float64),
        "atomic_inputs": np.column_stack([z, q, pos]).astype(np.float32),
        "n_atoms": np.array([n], dtype=np.int32),
    }
    if inst.force_methods:
        entry["forces"] = rng.normal(0.0, 0.02, size=(n, 3, len(inst.force_methods))).astype(np.float32)
    return entry


def write_cache(root: Path, class_name: str, n: int = 7, nan_energy: tuple[int, ...] = (), seed: int = 0) -> Path:
    """Write a genuine cache of ``n`` molecules with openqdc's writer under ``root``; return root."""
    from openqdc.utils.io import set_cache_dir

    cls = openqdc_datasets.AVAILABLE_POTENTIAL_DATASETS[class_name]
    rng = np.random.default_rng(seed)
    bohr = cls.__distance_unit__ == "bohr"
    elements = (1, 6, 7, 8, 9) if class_name == "QM9" else (1, 6, 7, 8)
    entries = [_molecule(rng, cls, i, elements, bohr) for i in range(n)]
    for i in nan_energy:
        entries[i]["energies"][0, 0] = np.nan
    set_cache_dir(str(root))
    writer = cls.no_init()
    writer.save_preprocess(writer.collate_list(entries))
    return root


def load_openqdc(root: Path, class_name: str, energy_type: str = "null") -> Any:
    """openqdc's own loader on the cache, in kcal/mol and Å."""
    cls = openqdc_datasets.AVAILABLE_POTENTIAL_DATASETS[class_name]
    return cls(
        cache_dir=str(root), skip_statistics=True, energy_unit="kcal/mol", distance_unit="ang", energy_type=energy_type
    )


def assert_valid(path: Path) -> None:
    """``packedqdc validate`` is clean on ``path``."""
    from packedqdc.validate import validate_packed

    report = validate_packed(path, checksums=True)
    assert report.ok, [str(p) for p in report.problems]


def assert_matches(path: Path, ds: Any, method: int = 0, source_index: list[int] | None = None) -> None:
    """Every packed molecule equals openqdc's ``ds[i]`` (Z, R, E of ``method``, F, Qtot)."""
    packed = open_packed(path)
    index = list(range(len(ds))) if source_index is None else source_index
    assert packed.n_molecules == len(index)
    force_col = [m.force_column for m in resolve_dataset(type(ds).__name__).methods][method]
    for k, i in enumerate(index):
        mol, ref = packed.molecule(k), ds[i]
        np.testing.assert_array_equal(mol["Z"], ref.atomic_numbers)
        np.testing.assert_allclose(mol["R"], ref.positions, rtol=RTOL, atol=1e-6)
        np.testing.assert_allclose(mol["E"], ref.energies[method], rtol=RTOL)
        assert mol["Qtot"] == pytest.approx(float(ref.charges.sum()))
        if force_col is None:
            assert mol["F"] is None
        else:
            np.testing.assert_allclose(mol["F"], ref.forces[:, :, force_col], rtol=RTOL, atol=1e-5)


def test_spice_matches_openqdc_and_validates(tmp_path: Path) -> None:
    root = write_cache(tmp_path / "cache", "Spice")
    out = tmp_path / "spice"
    result = pack_openqdc("spice", out, cache_dir=root)
    assert result.n_molecules == 7
    ds = load_openqdc(root, "Spice")
    assert_matches(out, ds)
    assert_valid(out)
    assert np.count_nonzero(open_packed(out).Qtot) == 2  # molecules 1 and 4 are charged
    prov = json.loads((out / "meta.json").read_text())["provenance"]
    assert prov["source"] == "openqdc" and prov["dataset_class"] == "Spice"
    assert prov["class_fixes"]["forces"] == -1.0
    assert prov["source_units"] == {"energy": "hartree", "distance": "bohr", "forces": "hartree/bohr"}
    assert prov["level_of_theory"] == "wb97m-d3(bj)/def2-tzvppd" and prov["energy_type"] == "total"


def test_qm9_no_forces_several_methods(tmp_path: Path) -> None:
    root = write_cache(tmp_path / "cache", "QM9", seed=1)
    ds = load_openqdc(root, "QM9")
    assert_matches(pack_openqdc("QM9", tmp_path / "first", cache_dir=root).path, ds)
    out = pack_openqdc("qm9", tmp_path / "by_name", cache_dir=root, energy_method="hf:sto-3g").path
    assert_matches(out, ds, method=3)
    assert_matches(pack_openqdc("QM9", tmp_path / "by_index", cache_dir=root, energy_method=5).path, ds, method=5)
    assert_valid(out)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["has_forces"] is False and "no force methods" in meta["provenance"]["forces_note"]
    assert meta["provenance"]["energy_method"] == {"index": 3, "name": "", "target_name": "HF:sto-3g"}


def test_ani1x_forces_scaled(tmp_path: Path) -> None:
    root = write_cache(tmp_path / "cache", "ANI1X", seed=2)
    ds = load_openqdc(root, "ANI1X")
    out = pack_openqdc("ani1x", tmp_path / "wb97x", cache_dir=root, energy_method=7).path
    assert_matches(out, ds, method=7)
    assert_valid(out)
    assert json.loads((out / "meta.json").read_text())["provenance"]["class_fixes"]["forces"] == 0.529177249
    no_forces = pack_openqdc("ani1x", tmp_path / "hf", cache_dir=root).path  # method 0 has no forces
    assert_matches(no_forces, ds, method=0)


def test_nan_energies_skipped_and_counted(tmp_path: Path) -> None:
    root = write_cache(tmp_path / "cache", "Spice", n=6, nan_energy=(1, 4))
    result = pack_openqdc("Spice", tmp_path / "out", cache_dir=root)
    assert (result.n_molecules, result.skipped) == (4, 2)
    assert_matches(result.path, load_openqdc(root, "Spice"), source_index=[0, 2, 3, 5])
    prov = json.loads((result.path / "meta.json").read_text())["provenance"]
    assert prov["skipped_nan_energy"] == 2 and prov["n_source_molecules"] == 6


def test_subset(tmp_path: Path) -> None:
    root = write_cache(tmp_path / "cache", "Spice")
    result = pack_openqdc("Spice", tmp_path / "out", cache_dir=root, subset="beta")
    assert_matches(result.path, load_openqdc(root, "Spice"), source_index=[1, 3, 5])
    prov = json.loads((result.path / "meta.json").read_text())["provenance"]
    assert prov["subsets"] == ["beta"] and prov["skipped_other_subsets"] == 4


def test_formation_matches_openqdc(tmp_path: Path) -> None:
    root = write_cache(tmp_path / "cache", "Spice")
    result = pack_openqdc("Spice", tmp_path / "out", cache_dir=root, energy_type="formation")
    ds = load_openqdc(root, "Spice", energy_type="formation")
    packed = open_packed(result.path)
    np.testing.assert_allclose(packed.E, [ds[i].formation_energies[0] for i in range(len(ds))], rtol=RTOL)


def test_regression_fit_matches_openqdc(tmp_path: Path) -> None:
    root = write_cache(tmp_path / "cache", "Spice", n=12, seed=3)
    fitted = open_packed(pack_openqdc("Spice", tmp_path / "fit", cache_dir=root, energy_type="regression").path)
    ds = load_openqdc(root, "Spice", energy_type="regression")  # writes openqdc's regressionenergy.pkl
    expected = [ds[i].formation_energies[0] for i in range(len(ds))]
    np.testing.assert_allclose(fitted.E, expected, rtol=1e-4, atol=1e-3)
    out = pack_openqdc("Spice", tmp_path / "pkl", cache_dir=root, energy_type="regression").path
    np.testing.assert_allclose(open_packed(out).E, expected, rtol=RTOL)
    assert "regressionenergy.pkl" in json.loads((out / "meta.json").read_text())["provenance"]["reference_energies"]


def test_cli_pack_and_list_methods(tmp_path: Path) -> None:
    root = write_cache(tmp_path / "cache", "ANI1X")
    runner = CliRunner()
    listed = runner.invoke(app, ["pack", "openqdc", "ANI1X", "--list-methods"])
    assert listed.exit_code == 0, listed.output
    assert "wb97x/6-31g*\twB97x:6-31G(d) Total Energy\tforces" in listed.output
    assert "hf/cc-pvdz\tHF:cc-pVDZ Total Energy\tno forces" in listed.output
    args = ["pack", "openqdc", "ani1x", str(tmp_path / "out"), "--cache-dir", str(root), "-m", "wB97x:6-31G(d) Total Energy"]
    packed = runner.invoke(app, args)
    assert packed.exit_code == 0, packed.output
    assert "Packed 7 molecules" in packed.output
    assert open_packed(tmp_path / "out").F is not None


def test_missing_cache_message_exit_code_no_output(tmp_path: Path) -> None:
    cache = tmp_path / "empty-cache"
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["pack", "openqdc", "Spice", str(out), "--cache-dir", str(cache)])
    assert result.exit_code == 2
    message = result.output.strip()
    assert "Traceback" not in message and len(message.splitlines()) == 1
    assert str(cache / "spice" / "preprocessed") in message
    assert f"OPENQDC_CACHE_DIR={cache} openqdc download Spice" in message
    assert not out.exists() and not cache.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("file", "cut", "text"), [
    ("atomic_inputs.mmap", 20 * 5 * 4, "atomic_inputs.mmap: holds 20 atoms, but position_idx_range.mmap ends at atom"),
    ("position_idx_range.mmap", 4 * 2 * 4, "atomic_inputs.mmap: holds"),  # 4 of 9 molecules: their end disagrees
    ("energies.mmap", 8 * 8, "energies.mmap: holds 8 molecules x 1 methods of float64, but position_idx_range.mmap holds 9"),
    ("forces.mmap", 20 * 3 * 4, "forces.mmap: holds 20 atoms x 3 x 1 float32, but atomic_inputs.mmap holds"),
])
def test_a_truncated_cache_file_is_named_beside_the_one_it_disagrees_with(tmp_path: Path, file: str, cut: int,
                                                                          text: str) -> None:
    root = write_cache(tmp_path / "cache", "Spice", n=9)
    with open(root / "spice" / "preprocessed" / file, "r+b") as fh:
        fh.truncate(cut)
    result = CliRunner().invoke(app, ["pack", "openqdc", "Spice", str(tmp_path / "out"), "--cache-dir", str(root)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert text in result.output and "one of them is truncated or oversized" in result.output
    assert not (tmp_path / "out").exists()


def test_bad_method_and_formation_without_table(tmp_path: Path) -> None:
    root = write_cache(tmp_path / "cache", "QM9")
    runner = CliRunner()
    for extra in (["-m", "9"], ["-m", "nonsense"], ["--energy-type", "formation"], ["--subset", "gamma"]):
        result = runner.invoke(app, ["pack", "openqdc", "QM9", str(tmp_path / "out"), "--cache-dir", str(root), *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert result.output.startswith("Error:")
    assert not (tmp_path / "out").exists()


def test_missing_openqdc_one_line_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openqdc.datasets", None)
    result = CliRunner().invoke(app, ["pack", "openqdc", "Spice", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "Error: pack openqdc needs the openqdc package (openqdc.datasets missing): pip install 'packedqdc[openqdc]'"
    ]


class _RunsShell:
    """Pickles as a call of ``os.system(command)``: what a crafted cache file would hold."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        import os

        return (os.system, (self.command,))


@pytest.mark.parametrize("which", ["props", "regression"])
def test_crafted_pickle_refused_without_running(tmp_path: Path, which: str) -> None:
    import pickle

    root = write_cache(tmp_path / "cache", "Spice")
    marker = tmp_path / "pwned"
    preprocessed = root / "spice" / "preprocessed"
    if which == "props":
        target = preprocessed / "props.pkl"
        payload = {"subset": _RunsShell(f"touch {marker}"), "n_atoms": np.ones(7, dtype=np.int32)}
    else:
        target = preprocessed / "regressionenergy.pkl"
        payload = {"H": _RunsShell(f"touch {marker}")}
    target.write_bytes(pickle.dumps(payload))
    out = tmp_path / "out"
    args = ["pack", "openqdc", "Spice", str(out), "--cache-dir", str(root), "--energy-type", "regression"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert lines[0].startswith(f"Error: {target}: refused to unpickle: it names posix.system")
    assert not marker.exists() and not out.exists()
