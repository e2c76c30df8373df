"""Cutoff pair lists for the network with a full-range Coulomb term (issue 14, item 5): the same model
as on all pairs, an energy continuous as an atom crosses the cutoff, and training, evaluation and
prediction on the same pairs."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from packedqdc.loader import PackedMemmapLoader
from packedqdc.model.physnet import PhysNet, cutoff_pairs, energy_and_forces, init_params, predict, with_coulomb_window
from packedqdc.pack import pack_npz
from packedqdc.train import Potential, TrainConfig, evaluate_run, fit, start_run
from packedqdc.train.predict import molecule_batch

CUTOFF = 4.0


def _chain(rng: np.random.Generator, n: int, step: float) -> np.ndarray:
    """(n, 3) Å positions of a random walk: a floppy molecule whose far atoms lie beyond the cutoff."""
    while True:
        R = np.cumsum(rng.normal(0.0, step, size=(n, 3)), axis=0)
        d = np.linalg.norm(R[:, None] - R[None], axis=-1)[np.triu_indices(n, 1)]
        if d.min() > 0.9:
            return R


@pytest.fixture(scope="module")
def model_and_params():
    shifts = np.zeros(119)
    shifts[[1, 6, 7, 8]] = [0.3, -0.1, -0.4, -0.5]  # charges of e/3 or so: a Coulomb term that matters
    model = PhysNet(features=16, num_basis=16, num_iterations=2, cutoff=CUTOFF, charge_shift_init=tuple(shifts))
    rng = np.random.default_rng(0)
    batch = molecule_batch([np.array([6, 8, 1])], [_chain(rng, 3, 1.0)], [0.0])
    params = init_params(model, jax.random.PRNGKey(3), batch)
    return model, params


def test_cutoff_pairs_equal_all_pairs(model_and_params) -> None:
    """Cutoff lists + the banded Coulomb term give the all-pairs model's energies and forces, for
    molecules inside the cutoff and for molecules reaching far beyond it."""
    model, params = model_and_params
    rng = np.random.default_rng(1)
    Zs = [rng.choice([1, 6, 7, 8], size=n) for n in (3, 14, 9, 22)]
    Rs = [_chain(rng, len(z), 0.3 if len(z) == 3 else 1.4) for z in Zs]
    Q = [0.0, 1.0, -1.0, 0.0]
    every = molecule_batch(Zs, Rs, Q)
    near = molecule_batch(Zs, Rs, Q, cutoff=CUTOFF)
    assert near["pair_mask"].sum() < every["pair_mask"].sum()  # pairs beyond the cutoff exist
    windowed = with_coulomb_window(model.clone(coulomb_window=1), 22)
    assert windowed.coulomb_window == 21 and cutoff_pairs(windowed) == CUTOFF and cutoff_pairs(model) is None
    e0, f0, aux0 = energy_and_forces(model, params, every)
    e1, f1, aux1 = energy_and_forces(windowed, params, near)
    assert np.abs(np.asarray(aux0["electrostatic_energy"][:4])).min() > 0.1
    np.testing.assert_allclose(np.asarray(e1), np.asarray(e0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(f1), np.asarray(f0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(aux1["dipole"]), np.asarray(aux0["dipole"]), atol=1e-5)
    # the Coulomb term on the cutoff list alone is truncated, and differs
    truncated = predict(model, params, near)["electrostatic_energy"]
    assert np.abs(np.asarray(truncated - aux0["electrostatic_energy"])[1:4]).max() > 1e-2


def test_energy_continuous_as_an_atom_crosses_the_cutoff(model_and_params, tmp_path: Path) -> None:
    """An ion's H atom moves along x through the cutoff distance from the far end atom; batches come
    from the loader's cutoff pair lists (the training path). Energy steps between neighbouring
    geometries stay within what the forces predict (finite differences); with the Coulomb term on the
    cutoff list alone the energy jumps when the pair drops out."""
    model, params = model_and_params
    Z = np.array([8, 6, 6, 1], np.int32)
    base = np.array([[0.0, 0, 0], [1.3, 0.2, 0], [2.6, 0.1, 0.2], [0.0, 0.0, 0.0]])
    h = 1e-3
    xs = -(CUTOFF - 2.6) + np.arange(-20, 21) * h  # atom 3 at x: distance to atom 2 crosses CUTOFF
    R = np.repeat(base[None], xs.size, axis=0)
    R[:, 3, 0] = xs
    R[:, 3, 1] = 0.1
    R[:, 3, 2] = 0.2
    n = xs.size
    np.savez(tmp_path / "scan.npz", R=R.astype(np.float32), Z=np.tile(Z, (n, 1)), E=np.zeros(n), Q=np.full(n, -1.0))
    data = pack_npz(tmp_path / "scan.npz", tmp_path / "scan").path
    loader = PackedMemmapLoader(data, batch_size=64, shuffle=False, prefetch=0)
    windowed = with_coulomb_window(model.clone(coulomb_window=1), 4)
    energies = {}
    for name, m in (("full", windowed), ("truncated", model)):
        E = np.full(n, np.nan)
        Fx = np.full(n, np.nan)
        n_pairs = np.zeros(n, int)
        for b in loader.batches(layout="packed", cutoff=CUTOFF):
            e, f, _ = energy_and_forces(m, params, b)
            idx, mask = b["mol_idx"], b["mol_mask"]
            E[idx[mask]] = np.asarray(e)[mask]
            for slot in np.flatnonzero(mask):
                atoms = np.flatnonzero(b["atom_mask"] & (b["batch_segments"] == slot))
                Fx[idx[slot]] = np.asarray(f)[atoms[3], 0]
                n_pairs[idx[slot]] = int((b["pair_mask"] & np.isin(b["dst_idx"], atoms)).sum())
        energies[name] = (E, Fx, n_pairs)
    E, Fx, n_pairs = energies["full"]
    assert n_pairs[0] != n_pairs[-1]  # the pair 2-3 leaves the list inside the scan
    steps = np.abs(np.diff(E))
    predicted = np.abs(0.5 * (Fx[1:] + Fx[:-1])) * h  # |dE| = |F_x| dx
    assert (steps <= predicted + 2e-4).all(), (steps.max(), predicted.max())
    jump = np.abs(np.diff(energies["truncated"][0]))
    assert jump.max() > 20 * (predicted.max() + 2e-4)


@pytest.mark.heavy  # train, evaluate and predict, each compiling its own programs: ~55 s
def test_training_evaluate_predict_use_the_run_pairs(sample_dir: Path, tmp_path: Path) -> None:
    """``--pair-list cutoff``: the model gets a Coulomb window for the data's largest molecule, the
    streams cutoff lists; evaluate (loader, cutoff lists) and Potential (all-pairs lists) agree."""
    cfg = TrainConfig(data_path=str(sample_dir), runs_dir=str(tmp_path), name="cut", num_epochs=1, features=16,
                      num_iterations=2, num_basis=16, batch_size=16, learning_rate=3e-3, valid_fraction=0.2,
                      pair_list="cutoff", cutoff=3.0)
    trainer = start_run(cfg)
    assert trainer.model.coulomb_window == 14  # the sample's largest molecule has 15 atoms
    assert trainer.train_data.cutoff == 3.0 and trainer.valid_data.cutoff == 3.0
    fit(trainer)
    trainer.close()
    assert TrainConfig.load(tmp_path / "cut" / "config.json").pair_list == "cutoff"
    auto = start_run(cfg.replace(name="auto", pair_list="auto"))
    assert auto.cfg.pair_list == "all" and auto.model.coulomb_window == 0 and auto.train_data.cutoff is None
    auto.close()
    result = evaluate_run(tmp_path / "cut", sample_dir, which="latest")
    pot = Potential.load(tmp_path / "cut", "latest")
    from packedqdc.format import open_packed

    ds = open_packed(sample_dir)
    mols = [ds.molecule(i) for i in range(ds.n_molecules)]
    E, F = pot.predict_batch([m["Z"] for m in mols], [m["R"] for m in mols], [m["Qtot"] for m in mols])
    mae = np.mean(np.abs(E - np.array([m["E"] for m in mols])))
    assert mae == pytest.approx(result.energy_mae, rel=1e-4)
    every = molecule_batch([mols[0]["Z"]], [mols[0]["R"]], [mols[0]["Qtot"]])
    e_all = pot.predict_on_batch(every)[0][0]
    assert e_all == pytest.approx(E[0], abs=1e-3)
