"""Reference-energy fit and the training configuration's JSON round trip (no model involved)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from packedqdc.errors import ConfigError, SourceError
from packedqdc.format import MoleculeChunk, PackedWriter, open_packed
from packedqdc.train import ReferenceEnergies, TrainConfig, fit_reference_energies


def _synthetic(path: Path, table: dict[int, float], offsets: dict[int, float], m: int = 300, seed: int = 0) -> Path:
    """Molecules whose energies are exactly Σ e_Z + c_Q (charges drawn from ``offsets``' keys)."""
    rng = np.random.default_rng(seed)
    elements = np.array(sorted(table))
    n = rng.integers(2, 12, size=m).astype(np.int32)
    Z = rng.choice(elements, size=int(n.sum())).astype(np.int32)
    Q = rng.choice(np.array(sorted(offsets)), size=m).astype(np.float64)
    per_atom = np.array([table[z] for z in Z])
    mol = np.repeat(np.arange(m), n)
    E = np.bincount(mol, weights=per_atom, minlength=m) + np.array([offsets[int(q)] for q in Q])
    chunk = MoleculeChunk(n_atoms=n, Z=Z, R=rng.normal(size=(Z.size, 3)).astype(np.float32), E=E, Qtot=Q)
    with PackedWriter(path, has_forces=False, has_qtot=True) as writer:
        writer.append(chunk)
        writer.commit()
    return path


def test_fit_recovers_per_element_energies_and_per_charge_offsets(tmp_path: Path) -> None:
    table = {1: -313.5, 6: -23893.2, 7: -34430.1, 8: -47196.8}
    # cation and anion offsets that no line c·Q fits (ionisation energy != electron affinity)
    offsets = {-1: -57.25, 0: 0.0, 1: 231.5, 2: 650.0}
    ds = open_packed(_synthetic(tmp_path / "syn", table, offsets))
    ref = fit_reference_energies(ds, np.arange(ds.n_molecules), block=37)  # several blocks
    for z, value in table.items():
        assert ref.table[z] == pytest.approx(value, abs=1e-6)
    assert ref.charges == (-1, 0, 1, 2)
    for q, c in ref.charge_offsets:
        assert c == pytest.approx(offsets[q], abs=1e-6)
    assert ref.charge_coef == 0.0
    assert ref.table[0] == 0.0 and ref.table[9] == 0.0
    assert abs(ref.per_atom_mean) < 1e-6 and ref.per_atom_std < 1e-6
    seg = np.repeat(np.arange(3), np.asarray(ds.n_atoms[:3]))
    Z = np.asarray(ds.Z[: int(ds.offsets[3])])
    assert np.allclose(ref.molecule_energies(Z, seg, ds.Qtot[:3]), ds.E[:3], atol=1e-6, rtol=0)
    again = ReferenceEnergies.from_dict(ref.to_dict())
    assert ReferenceEnergies.from_dict(json.loads(json.dumps(ref.to_dict()))).to_dict() == ref.to_dict()
    assert np.array_equal(again.table, ref.table) and again.charge_offsets == ref.charge_offsets
    with pytest.raises(ConfigError, match=r"total charge \+3 not in the model's training data"):
        ref.molecule_energies(Z, seg, np.array([0.0, 3.0, 0.0]))


def test_charged_molecules_only_fit_an_offset_per_charge(tmp_path: Path) -> None:
    ds = open_packed(_synthetic(tmp_path / "ions", {1: -300.0, 6: -23000.0}, {-1: 10.0, 1: 200.0}, m=80))
    ref = fit_reference_energies(ds, np.arange(ds.n_molecules))
    seg = np.repeat(np.arange(ds.n_molecules), np.asarray(ds.n_atoms))
    assert np.allclose(ref.molecule_energies(np.asarray(ds.Z), seg, ds.Qtot), ds.E, atol=1e-6, rtol=0)


def test_a_reference_saved_with_a_linear_charge_coefficient_still_predicts() -> None:
    table = [0.0] * 119
    table[1], table[8] = -300.0, -47000.0
    old = {"table": table, "charge_coef": -150.5, "per_atom_mean": 0.1, "per_atom_std": 2.0, "elements": [1, 8]}
    ref = ReferenceEnergies.from_dict(old)
    energies = ref.molecule_energies(np.array([8, 1, 1, 8, 1]), np.array([0, 0, 0, 1, 1]), np.array([0.0, -1.0]))
    assert energies.tolist() == [-47600.0, -47300.0 + 150.5]


def test_fit_uses_only_the_given_molecules_and_rejects_nan(tmp_path: Path) -> None:
    path = _synthetic(tmp_path / "syn", {1: -300.0, 6: -23000.0}, {0: 0.0}, m=50)
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


def test_initial_coulomb_energy_of_ions_moves_into_their_offsets(tmp_path: Path) -> None:
    from packedqdc.model import COULOMB_CONSTANT
    from packedqdc.train.reference import uniform_charge_coulomb, with_initial_coulomb

    # two atoms 4 Å apart (beyond cutoff/2, where χ = 1/r), charge -1 spread as -1/2 each
    R = np.array([[0.0, 0.0, 0.0], [4.0, 0.0, 0.0]])
    assert uniform_charge_coulomb(R, -1.0, cutoff=5.0) == pytest.approx(COULOMB_CONSTANT * 0.25 / 4.0, rel=1e-6)
    assert uniform_charge_coulomb(R, 0.0, cutoff=5.0) == 0.0
    ds = open_packed(_synthetic(tmp_path / "ions", {1: -300.0, 6: -23000.0}, {-1: 10.0, 0: 0.0, 1: 200.0}, m=60))
    ref = fit_reference_energies(ds, np.arange(ds.n_molecules))
    shifted = dict(with_initial_coulomb(ref, ds, np.arange(ds.n_molecules), cutoff=5.0).charge_offsets)
    for q, c in ref.charge_offsets:
        members = np.flatnonzero(np.asarray(ds.Qtot) == q)
        mean = np.mean([uniform_charge_coulomb(ds.molecule(int(i))["R"].astype(np.float64), float(q), 5.0)
                        for i in members])
        assert shifted[q] == pytest.approx(c - mean, abs=1e-6)
    assert shifted[0] == 0.0 and shifted[1] < 200.0 and shifted[-1] < 10.0


def test_cosine_schedule_fits_the_run_and_warm_up() -> None:
    from packedqdc.train.optim import learning_rate, schedule_progress

    cfg = TrainConfig(lr_schedule="cosine", learning_rate=1e-3, final_lr_scale=0.01, warmup_steps=10, num_epochs=4)
    # by steps: 4 epochs of 25 steps
    assert schedule_progress(cfg, 50, 25, elapsed=1.0, start_progress=0.0) == pytest.approx(0.5)
    assert float(learning_rate(cfg, 0, 1.0, 0.0)) == pytest.approx(1e-4)          # warm-up: 1/10
    assert float(learning_rate(cfg, 50, 1.0, 0.5)) == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5), rel=1e-5)
    assert float(learning_rate(cfg, 100, 1.0, 1.0)) == pytest.approx(1e-5, rel=1e-4)
    # by time, when --max-time ends the run first; a resumed run spreads the rest over its new budget
    timed = cfg.replace(max_time=100.0)
    assert schedule_progress(timed, 10, 25, elapsed=60.0, start_progress=0.0) == pytest.approx(0.6)
    assert schedule_progress(timed, 10, 25, elapsed=50.0, start_progress=0.6) == pytest.approx(0.8)
    assert schedule_progress(timed, 10, 25, elapsed=500.0, start_progress=0.0) == 1.0
    # the other schedules ignore progress; warm-up applies to them too
    exp = TrainConfig(lr_schedule="exponential", learning_rate=1e-3, warmup_steps=4)
    assert float(learning_rate(exp, 1, 1.0, 0.9)) == pytest.approx(0.5e-3 * 0.1 ** (1 / 1e7), rel=1e-6)


def test_a_config_saved_before_new_options_keeps_its_behaviour(tmp_path: Path) -> None:
    old = TrainConfig(charge_weight=14.399645351950548, nh_weight=0.01).to_dict()
    for key in ("loss_unit", "warmup_steps", "charge_embedding", "order_version"):
        del old[key]
    cfg = TrainConfig.from_dict(old)
    assert cfg.loss_unit == "kcal/mol" and cfg.warmup_steps == 0 and cfg.charge_embedding is False
    assert cfg.order_version == 1 and TrainConfig().order_version == 2  # its split and orders, too
    assert cfg.loss_term_weights() == (14.399645351950548, 0.01)
    # unit-aware defaults: one physical weight (kcal/mol per e, kcal/mol) in either loss unit
    assert TrainConfig().loss_term_weights() == pytest.approx((14.399645, 0.01), rel=1e-6)
    assert TrainConfig(loss_unit="ev").loss_term_weights() == pytest.approx((14.399645 / 23.0605478, 0.01 / 23.0605478),
                                                                            rel=1e-6)


def test_a_charge_only_in_the_validation_split_is_refused_before_training(tmp_path: Path) -> None:
    from packedqdc.train.session import _check_valid_charges

    ds = open_packed(_synthetic(tmp_path / "ions", {1: -300.0, 6: -23000.0}, {0: 0.0, 1: 200.0, 2: 650.0}, m=60))
    q = np.asarray(ds.Qtot)
    dication = np.flatnonzero(q == 2)
    train = np.setdiff1d(np.arange(ds.n_molecules), dication)
    ref = fit_reference_energies(ds, train)
    _check_valid_charges(ds, np.flatnonzero(q == 1), ref)  # seen in training: fine
    with pytest.raises(ConfigError, match=r"total charge\(s\) \+2 occur only in the validation split"):
        _check_valid_charges(ds, dication, ref)


def test_training_loaders_take_the_runs_order_version(sample_dir: Path) -> None:
    """``packedqdc train``'s split follows ``--order-version``: version 1 is the permutation split
    runs saved before version 2 were trained on, version 2 ``shuffle.split_positions``."""
    from packedqdc.shuffle import split_positions
    from packedqdc.train.data import split

    for version in (1, 2):
        train, valid = split(sample_dir, 16, 8192, 3, 0.2, order_version=version)
        assert train.order_version == valid.order_version == version
        N = train.N + valid.N
        if version == 1:
            perm = np.random.default_rng(3).permutation(N)
            want = np.sort(perm[int(round(0.8 * N)):])
        else:
            want = split_positions(N, int(round(0.8 * N)), np.random.default_rng(3), 2)[1]
        np.testing.assert_array_equal(valid.indices, want)
