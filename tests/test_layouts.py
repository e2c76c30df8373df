"""Loader -> model equality: the same molecules through the padded and the packed layout of the
loader give equal energies, forces and loss sums under one set of (perturbed) PhysNet weights."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from packedqdc.data import SAMPLE_NPZ
from packedqdc.loader import PackedMemmapLoader
from packedqdc.model.physnet import PhysNet, energy_and_forces, init_params
from packedqdc.pack import pack_npz
from packedqdc.train.data import LoaderStream
from packedqdc.train.loop import evaluate_stream
from packedqdc.train.reference import fit_reference_energies
from packedqdc.train.loss import loss_from_sums
from packedqdc.train.step import LossWeights, make_eval_step


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pack_npz(SAMPLE_NPZ, tmp_path_factory.mktemp("layouts") / "sample").path


def test_padded_and_packed_layouts_give_equal_energies_forces_and_loss_sums(sample: Path) -> None:
    loader = {layout: PackedMemmapLoader(sample, batch_size=24, shuffle=False) for layout in ("packed", "padded")}
    reference = fit_reference_energies(loader["packed"].dataset, np.arange(loader["packed"].N))
    streams = {layout: LoaderStream(loader[layout], reference, layout=layout, num_atoms=15)
               for layout in loader}
    model = PhysNet(features=16, num_basis=16, num_iterations=2, cutoff=5.0, electrostatics=True,
                    energy_scale_init=max(reference.per_atom_std, 1e-3), energy_shift_init=reference.per_atom_mean)
    batches = streams["packed"].epoch()
    first, _ = next(batches)
    batches.close()
    streams["packed"].restore({"seed": 0, "epoch": 0, "position": 0, "devices": 1})
    params = init_params(model, jax.random.PRNGKey(0), {k: v[0] for k, v in first.items()})
    # the output heads start at zero: perturb every weight so energies, charges and forces all vary
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                          for x, k in zip(leaves, keys)])

    results = {}
    for layout, stream in streams.items():
        per_mol = {}
        for global_batch, mol_idx in stream.epoch():
            batch = {key: value[0] for key, value in global_batch.items()}
            energy, forces, _ = jax.device_get(jax.jit(energy_and_forces, static_argnums=0)(model, params, batch))
            slots = np.flatnonzero(batch["mol_mask"])
            assert slots.size == mol_idx.size
            for slot, index in zip(slots, mol_idx):
                atoms = np.flatnonzero((batch["batch_segments"] == slot) & batch["atom_mask"])
                per_mol[int(index)] = (float(energy[slot]), forces[atoms])
        results[layout] = per_mol
    assert sorted(results["packed"]) == sorted(results["padded"]) == list(range(loader["packed"].N))
    e_packed = np.array([results["packed"][i][0] for i in range(loader["packed"].N)])
    e_padded = np.array([results["padded"][i][0] for i in range(loader["packed"].N)])
    assert np.abs(e_packed).max() > 1.0  # the weights do something
    np.testing.assert_allclose(e_packed, e_padded, rtol=0, atol=1e-3)
    f_packed = np.concatenate([results["packed"][i][1] for i in range(loader["packed"].N)])
    f_padded = np.concatenate([results["padded"][i][1] for i in range(loader["packed"].N)])
    assert np.abs(f_packed).max() > 1.0
    np.testing.assert_allclose(f_packed, f_padded, rtol=0, atol=2e-3)

    weights = LossWeights(energy=1.0, forces=52.9, charge=14.4, nh=0.01, kind="mae")
    sums = {layout: evaluate_stream(make_eval_step(model, weights), params, stream, jax.device_put)
            for layout, stream in streams.items()}
    for key in ("n_mol", "n_atoms", "e_abs", "e_sq", "f_abs", "f_sq", "q_abs", "q_sq", "nh"):
        assert sums["packed"][key] == pytest.approx(sums["padded"][key], rel=1e-4), key
    assert sums["packed"]["n_mol"] == loader["packed"].N
    losses = {layout: float(loss_from_sums(totals, weights)) for layout, totals in sums.items()}
    assert losses["packed"] == pytest.approx(losses["padded"], rel=1e-4)
