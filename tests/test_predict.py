"""``packedqdc predict`` (packed directory over devices, ASE files, NPZ and extxyz), ``evaluate --plot``
and ``packedqdc plot`` on a tiny model trained on the sample (session fixture ``trained_run``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from packedqdc.cli import app
from packedqdc.format import open_packed
from packedqdc.train import Potential, evaluate_run
from packedqdc.units import energy_factor

ase = pytest.importorskip("ase")
import ase.io  # noqa: E402

runner = CliRunner()


def _one_line_error(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code != 0 and len(lines) == 1 and lines[0].startswith("Error:"), result.output
    return lines[0]


@pytest.fixture(scope="module")
def packed_npz(trained_run: Path, sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("predict") / "sample.npz"
    result = runner.invoke(app, ["predict", str(trained_run), str(sample_dir), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "504 molecules" in result.output and "molecules/s" in result.output
    return out


def test_predict_packed_equals_evaluate_and_potential(packed_npz: Path, trained_run: Path, sample_dir: Path) -> None:
    out = np.load(packed_npz)
    ds = open_packed(sample_dir)
    np.testing.assert_array_equal(out["N"], ds.n_atoms)
    np.testing.assert_array_equal(out["Z"], ds.Z)
    np.testing.assert_array_equal(out["Q"], ds.Qtot)
    assert str(out["energy_unit"]) == "kcal/mol" and np.isfinite(out["F"]).all()
    # the errors of evaluate (its own eval step over the same loader) from these predictions
    result = evaluate_run(trained_run, sample_dir)
    e_err = out["E"] - np.asarray(ds.E)
    f_err = out["F"].astype(np.float64) - np.asarray(ds.F)
    assert np.abs(e_err).mean() == pytest.approx(result.energy_mae, rel=1e-4)
    assert np.sqrt(np.mean(e_err ** 2)) == pytest.approx(result.energy_rmse, rel=1e-4)
    assert np.abs(f_err).mean() == pytest.approx(result.forces_mae, rel=1e-4)
    assert np.sqrt(np.mean(f_err ** 2)) == pytest.approx(result.forces_rmse, rel=1e-4)
    # molecule by molecule, the same numbers as Potential.predict_properties
    offsets = np.concatenate([[0], np.cumsum(out["N"])])
    pot = Potential.load(trained_run)
    pick = [0, 1, 77, 503]
    ref = pot.predict_properties([ds.molecule(i)["Z"] for i in pick], [ds.molecule(i)["R"] for i in pick],
                                 [float(ds.Qtot[i]) for i in pick])
    for k, i in enumerate(pick):
        lo, hi = offsets[i], offsets[i + 1]
        assert out["E"][i] == pytest.approx(ref.energies[k], abs=2e-3)
        np.testing.assert_allclose(out["F"][lo:hi], ref.forces[k], atol=2e-3)
        np.testing.assert_allclose(out["charges"][lo:hi], ref.charges[k], atol=1e-5)
        assert out["charges"][lo:hi].sum() == pytest.approx(ds.Qtot[i], abs=1e-4)


def test_predict_extxyz_round_trip_and_ase_input(packed_npz: Path, trained_run: Path, sample_dir: Path,
                                                 tmp_path: Path) -> None:
    xyz = tmp_path / "pred.extxyz"
    result = runner.invoke(app, ["predict", str(trained_run), str(sample_dir), "--output", str(xyz)])
    assert result.exit_code == 0, result.output
    frames = ase.io.read(xyz, index=":")
    out = np.load(packed_npz)
    kcal_mol_per_ev = energy_factor("ev")
    assert len(frames) == 504
    offsets = np.concatenate([[0], np.cumsum(out["N"])])
    for i in (0, 250, 503):
        atoms, lo, hi = frames[i], offsets[i], offsets[i + 1]
        assert atoms.get_potential_energy() == pytest.approx(out["E"][i] / kcal_mol_per_ev, rel=1e-12)
        np.testing.assert_allclose(atoms.get_forces(), out["F"][lo:hi] / kcal_mol_per_ev, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(atoms.get_charges(), out["charges"][lo:hi], atol=1e-7)
        assert atoms.info["charge"] == out["Q"][i]
    # the extxyz file as INPUT (any ASE format): the charges come from info, results as from the packed dir
    again = tmp_path / "again.npz"
    result = runner.invoke(app, ["predict", str(trained_run), str(xyz), "--output", str(again), "--batch-size", "32"])
    assert result.exit_code == 0, result.output
    back = np.load(again)
    np.testing.assert_array_equal(back["Z"], out["Z"])
    np.testing.assert_array_equal(back["Q"], out["Q"])
    np.testing.assert_allclose(back["E"], out["E"], atol=2e-3)
    np.testing.assert_allclose(back["F"], out["F"], atol=2e-3)


def test_predict_refusals(trained_run: Path, sample_dir: Path, packed_npz: Path, tmp_path: Path) -> None:
    chloride = tmp_path / "cl.xyz"
    ase.io.write(chloride, [ase.Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]),
                            ase.Atoms("CCl", positions=[[0, 0, 0], [1.8, 0, 0]])])
    line = _one_line_error(runner.invoke(app, ["predict", str(trained_run), str(chloride), "-o", str(tmp_path / "o.npz")]))
    assert "structure 1" in line and "Cl" in line and "training data" in line
    periodic = tmp_path / "pbc.extxyz"
    ase.io.write(periodic, ase.Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], cell=[9, 9, 9], pbc=True))
    line = _one_line_error(runner.invoke(app, ["predict", str(trained_run), str(periodic), "-o", str(tmp_path / "o.npz")]))
    assert "structure 0 is periodic" in line
    before = packed_npz.read_bytes()
    line = _one_line_error(runner.invoke(app, ["predict", str(trained_run), str(sample_dir), "-o", str(packed_npz)]))
    assert "--force" in line and packed_npz.read_bytes() == before
    line = _one_line_error(runner.invoke(app, ["predict", str(trained_run), str(sample_dir), "-o", str(tmp_path / "o.csv")]))
    assert ".npz, .xyz or .extxyz" in line
    assert not list(tmp_path.glob("o.*")) and not list(tmp_path.glob(".*tmp*"))


def test_predict_packed_unseen_element_names_the_molecule(trained_run: Path, packed_dir: Path, tmp_path: Path) -> None:
    ds = open_packed(packed_dir)  # random elements 1..9: He, Li, Be, B were never in the sample
    first = next(i for i in range(ds.n_molecules) if np.isin(ds.molecule(i)["Z"], [2, 3, 4, 5]).any())
    out = tmp_path / "out"
    out.mkdir()
    line = _one_line_error(runner.invoke(app, ["predict", str(trained_run), str(packed_dir), "-o", str(out / "o.npz")]))
    assert f"molecule {first}:" in line and "not in the model's training data" in line
    assert not list(out.iterdir())


def test_predict_over_two_devices_equals_one(trained_run: Path, sample_dir: Path, packed_npz: Path, tmp_path: Path) -> None:
    """Two (host) devices: the loader's batches dealt over a mesh give the same predictions."""
    out = tmp_path / "two.npz"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "packedqdc", "predict", str(trained_run), str(sample_dir),
                           "--output", str(out), "--devices", "2"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    two, one = np.load(out), np.load(packed_npz)
    np.testing.assert_allclose(two["E"], one["E"], atol=2e-3)
    np.testing.assert_allclose(two["F"], one["F"], atol=2e-3)
    np.testing.assert_allclose(two["charges"], one["charges"], atol=1e-5)


def _nonblank_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 300 and pixels.std() > 0.05


def test_plots_are_written(trained_run: Path, sample_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    parity = tmp_path / "parity.png"
    result = runner.invoke(app, ["evaluate", str(trained_run), "--data-path", str(sample_dir), "--plot", str(parity)])
    assert result.exit_code == 0, result.output
    _nonblank_png(parity)
    curves = tmp_path / "curves.png"
    result = runner.invoke(app, ["plot", str(trained_run), "--output", str(curves)])
    assert result.exit_code == 0 and "30 epochs" in result.output, result.output
    _nonblank_png(curves)
    line = _one_line_error(runner.invoke(app, ["plot", str(trained_run), "--output", str(curves)]))
    assert "--force" in line
    assert runner.invoke(app, ["plot", str(trained_run), "--output", str(curves), "--force"]).exit_code == 0
    line = _one_line_error(runner.invoke(app, ["plot", str(tmp_path), "--output", str(tmp_path / "c.png")]))
    assert "metrics.csv" in line


def test_plot_without_matplotlib_says_how_to_install(trained_run: Path, sample_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    for args in (["evaluate", str(trained_run), "--data-path", str(sample_dir), "--plot", str(tmp_path / "p.png")],
                 ["plot", str(trained_run), "--output", str(tmp_path / "c.png")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2
        assert "pip install 'packedqdc[plot]'" in _one_line_error(result)
    assert not list(tmp_path.iterdir())
