"""Dipoles end to end: the format's optional D.f64 (pack npz, validate, loader), the model's dipole
output and the loss's dipole term against hand computations, and a short training run with D."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from packedqdc.data import SAMPLE_NPZ
from packedqdc.dipoles import about_centroid, centroids
from packedqdc.errors import SourceError
from packedqdc.format import D_FILE, open_packed
from packedqdc.loader import PackedMemmapLoader
from packedqdc.model.physnet import PhysNet, init_params
from packedqdc.pack import pack_npz
from packedqdc.train import TrainConfig, evaluate_run, fit, start_run
from packedqdc.train.loss import LossWeights, batch_sums, loss_from_sums
from packedqdc.train.metrics import summarize
from packedqdc.validate import validate_packed

#: per-element point charges (e) of the synthetic dipole labels: H, C, N, O, F, S
POINT_CHARGES = {1: 0.1, 6: -0.05, 7: -0.3, 8: -0.4, 9: -0.25, 16: -0.15}


def _point_charge_dipoles(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """(M, 3) dipoles about the coordinate origin of per-element point charges, shifted per molecule
    so that each sums to its Qtot: a real (if simple) charge model for labels, e·Å."""
    out = np.zeros((arrays["R"].shape[0], 3))
    for i, n in enumerate(arrays["N"]):
        z, r = arrays["Z"][i, :n], arrays["R"][i, :n].astype(np.float64)
        q = np.array([POINT_CHARGES[int(x)] for x in z])
        q += (arrays["Q"][i] - q.sum()) / n
        out[i] = (q[:, None] * r).sum(axis=0)
    return out


@pytest.fixture(scope="module")
def dipole_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled sample plus point-charge dipoles ``D`` (about the coordinate origin, like xTB's)."""
    with np.load(SAMPLE_NPZ) as f:
        arrays = {k: f[k] for k in ("R", "Z", "N", "E", "F", "Q")}
    arrays["D"] = _point_charge_dipoles(arrays)
    path = tmp_path_factory.mktemp("dip") / "sample_d.npz"
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def dipole_dir(dipole_npz: Path) -> Path:
    return pack_npz(dipole_npz, dipole_npz.parent / "packed").path


def test_about_centroid_moves_only_ions() -> None:
    R = np.array([[0.0, 0, 0], [2.0, 0, 0], [5.0, 5, 5]])
    n = np.array([2, 1])
    assert np.allclose(centroids(R, n), [[1.0, 0, 0], [5.0, 5, 5]])
    D0 = np.array([[1.0, 2.0, 3.0], [0.5, 0.0, 0.0]])
    got = about_centroid(D0, np.array([0.0, -1.0]), R, n)
    assert np.allclose(got, [[1.0, 2.0, 3.0], [5.5, 5.0, 5.0]])


def test_pack_validate_loader_round_trip(dipole_npz: Path, dipole_dir: Path) -> None:
    with np.load(dipole_npz) as f:
        Z, R, N, Q, D0 = f["Z"], f["R"], f["N"], f["Q"], f["D"]
    ds = open_packed(dipole_dir)
    assert ds.D is not None and ds.D.shape == (len(N), 3)
    assert ds.meta["has_dipoles"] and ds.meta["provenance"]["dipole_origin"] == "coordinates"
    flat_R = np.concatenate([R[i, :n] for i, n in enumerate(N)])
    expected = about_centroid(D0, Q, flat_R, N)
    assert np.allclose(np.asarray(ds.D), expected, atol=1e-12)
    # an ion's stored dipole no longer depends on where it sits: moving it changes D0 by Qtot * shift
    report = validate_packed(dipole_dir, checksums=True)
    assert report.ok, report.problems
    loader = PackedMemmapLoader(dipole_dir, batch_size=8, shuffle=True, seed=3)
    assert loader.has_dipoles
    seen = 0
    for batch in loader.batches(layout="packed"):
        idx, mask = batch["mol_idx"], batch["mol_mask"]
        assert batch["D"].shape == (mask.shape[0], 3)
        assert np.array_equal(batch["D"][mask], np.asarray(ds.D)[idx[mask]])
        assert not batch["D"][~mask].any()
        seen += int(mask.sum())
    assert seen == len(N)
    for batch in loader.batches(physnet_format=False):  # the seed's padded format carries it too
        assert np.array_equal(batch["D"][batch["mol_mask"]], np.asarray(ds.D)[batch["mol_idx"][batch["mol_mask"]]])
        break


def test_dipoles_already_about_centroid_and_bad_values(dipole_npz: Path, tmp_path: Path) -> None:
    with np.load(dipole_npz) as f:
        arrays = {k: f[k] for k in f.files}
    centred = pack_npz(dipole_npz, tmp_path / "c", dipole_origin="centroid").path
    assert np.array_equal(np.asarray(open_packed(centred).D), arrays["D"])
    arrays["D"][7, 1] = np.nan
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(SourceError, match=r"key 'D': molecule 7: non-finite value"):
        pack_npz(tmp_path / "bad.npz", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    arrays["D"] = arrays["D"][:, :2]
    np.savez(tmp_path / "shape.npz", **arrays)
    with pytest.raises(SourceError, match=r"key 'D': shape"):
        pack_npz(tmp_path / "shape.npz", tmp_path / "shape")


def test_validate_reports_bad_dipole_file(dipole_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dipole_dir, copy)
    D = np.fromfile(copy / D_FILE, dtype=np.float64).reshape(-1, 3)
    D[11, 2] = np.inf
    D.tofile(copy / D_FILE)
    messages = [str(p) for p in validate_packed(copy).problems]
    assert any(m.startswith("D.f64: molecule 11: non-finite value") for m in messages), messages
    with open(copy / D_FILE, "r+b") as fh:
        fh.truncate(D.nbytes - 8)
    messages = [str(p) for p in validate_packed(copy).problems]
    assert any("D.f64" in m and "truncated" in m for m in messages), messages
    (copy / D_FILE).unlink()
    messages = [str(p) for p in validate_packed(copy).problems]
    assert any("has_dipoles is True but D.f64 is absent" in m for m in messages), messages


def test_dipole_output_and_loss_term_match_hand_computation() -> None:
    """Two molecules (a neutral one and an anion) in one flat batch with a padding atom and slot."""
    Z = np.array([8, 1, 1, 6, 8, 0], np.int32)
    R = np.array([[0.1, 0.2, 0.0], [0.9, 0.1, 0.0], [-0.2, 0.9, 0.1],
                  [3.0, 3.0, 3.0], [4.2, 3.1, 2.9], [0.0, 0.0, 0.0]], np.float32)
    seg = np.array([0, 0, 0, 1, 1, 2], np.int32)
    atom_mask = np.array([1, 1, 1, 1, 1, 0], bool)
    pairs = [(i, j) for i in range(5) for j in range(5) if i != j and seg[i] == seg[j]]
    dst, src = (np.array(x, np.int32) for x in zip(*pairs))
    batch = {"Z": Z, "R": R, "dst_idx": dst, "src_idx": src, "batch_segments": seg, "atom_mask": atom_mask,
             "pair_mask": np.ones(len(pairs), bool), "Qtot": np.array([0.0, -1.0, 0.0], np.float32),
             "mol_mask": np.array([1, 1, 0], bool), "N": np.array([3, 2, 0], np.int32),
             "E": np.zeros(3, np.float32), "F": np.zeros((6, 3), np.float32),
             "D": np.array([[0.3, -0.2, 0.1], [1.0, 0.5, -0.5], [0.0, 0.0, 0.0]], np.float32)}
    model = PhysNet(features=8, num_basis=8, num_iterations=1, charge_shift_init=0.3)
    params = init_params(model, jax.random.PRNGKey(0), batch)
    out = model.apply(params, Z, R, dst, src, seg, atom_mask, batch["pair_mask"], batch["Qtot"], num_molecules=3)
    q = np.asarray(out["charges"], np.float64)
    want = np.zeros((3, 3))
    for m, atoms in ((0, [0, 1, 2]), (1, [3, 4])):
        c = R[atoms].astype(np.float64).mean(axis=0)
        want[m] = sum(q[i] * (R[i] - c) for i in atoms)
    assert np.allclose(np.asarray(out["dipole"]), want, atol=1e-5)
    assert abs(q[3] + q[4] + 1.0) < 1e-5  # corrected charges carry the anion's charge
    sums = batch_sums(model, params, batch)
    d_err = want[:2] - batch["D"][:2]
    assert float(sums["n_dip"]) == 2.0
    assert float(sums["d_abs"]) == pytest.approx(np.abs(d_err).sum(), rel=1e-5)
    assert float(sums["d_sq"]) == pytest.approx((d_err ** 2).sum(), rel=1e-5)
    base = LossWeights(energy=1.0, forces=1.0, charge=1.0, nh=0.01)
    with_d = LossWeights(energy=1.0, forces=1.0, charge=1.0, nh=0.01, dipole=27.0)
    extra = float(loss_from_sums(sums, with_d)) - float(loss_from_sums(sums, base))
    assert extra == pytest.approx(27.0 * np.abs(d_err).sum() / 6.0, rel=1e-4)
    mse = LossWeights(energy=1.0, forces=1.0, charge=1.0, nh=0.01, kind="mse", dipole=2.0)
    mse0 = LossWeights(energy=1.0, forces=1.0, charge=1.0, nh=0.01, kind="mse")
    assert float(loss_from_sums(sums, mse)) - float(loss_from_sums(sums, mse0)) == pytest.approx(
        2.0 * (d_err ** 2).sum() / 6.0, rel=1e-4)
    totals = {k: float(v) for k, v in sums.items()}
    assert summarize(totals, with_d)["dipole_mae"] == pytest.approx(np.abs(d_err).sum() / 6.0, rel=1e-5)
    without = dict(batch)
    del without["D"]
    sums0 = batch_sums(model, params, without)
    assert float(sums0["n_dip"]) == 0.0 and float(loss_from_sums(sums0, with_d)) == pytest.approx(
        float(loss_from_sums(sums, base)), rel=1e-6)
    assert math.isnan(summarize({k: float(v) for k, v in sums0.items()}, with_d)["dipole_mae"])


def test_dipole_is_translation_invariant_for_ions() -> None:
    Z = np.array([6, 8, 8], np.int32)
    R = np.array([[0.0, 0, 0], [1.2, 0.1, 0], [-1.1, 0.3, 0.2]], np.float32)
    seg = np.zeros(3, np.int32)
    pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
    dst, src = (np.array(x, np.int32) for x in zip(*pairs))
    args = (dst, src, seg, np.ones(3, bool), np.ones(6, bool), np.array([-1.0], np.float32))
    model = PhysNet(features=8, num_basis=8, num_iterations=1)
    params = model.init(jax.random.PRNGKey(1), Z, R, *args)
    a = model.apply(params, Z, R, *args)["dipole"]
    b = model.apply(params, Z, R + np.float32(7.5), *args)["dipole"]
    assert np.allclose(np.asarray(a), np.asarray(b), atol=1e-4)


@pytest.mark.heavy  # a training run with its own compilations: ~35 s
def test_short_training_run_with_dipoles(dipole_dir: Path, tmp_path: Path) -> None:
    """The default weight applies to data with D; a strong dipole term learns the dipoles far better
    than none in the same 2 epochs; metrics.csv and evaluate report the dipole MAE."""
    from typer.testing import CliRunner

    from packedqdc.cli import app
    from packedqdc.train import Callbacks

    cfg = dict(data_path=str(dipole_dir), runs_dir=str(tmp_path), features=16, num_iterations=2, num_basis=16,
               batch_size=16, layout="padded", num_atoms=15, learning_rate=3e-3, valid_fraction=0.2, num_epochs=2)
    default = start_run(TrainConfig(name="default", **cfg))
    assert default.weights.dipole == pytest.approx(27.211386024367243)
    default.close()
    last = {}
    for weight in (0.0, 1000.0):
        rows = []
        trainer = start_run(TrainConfig(name=f"w{weight:g}", dipole_weight=weight, **cfg))
        assert trainer.weights.dipole == weight
        fit(trainer, Callbacks(epoch_end=rows.append))
        trainer.close()
        assert all(math.isfinite(r["valid_dipole_mae"]) for r in rows)
        last[weight] = rows[-1]["valid_dipole_mae"]
    assert last[1000.0] < 0.5 * last[0.0], last
    run = tmp_path / "w1000"
    assert "valid_dipole_mae" in (run / "metrics.csv").read_text().splitlines()[0].split(",")
    result = evaluate_run(run, dipole_dir)
    assert math.isfinite(result.dipole_mae) and result.dipole_mae < 0.5 * result.baseline_dipole_mae
    assert set(result.summary()) >= {"dipole_mae", "dipole_rmse"}
    out = CliRunner().invoke(app, ["evaluate", str(run), "--data-path", str(dipole_dir), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["dipole_mae"] == pytest.approx(result.dipole_mae)
