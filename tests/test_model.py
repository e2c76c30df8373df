"""Tests of packedqdc.model (PhysNet): masking, invariances, forces, charges, electrostatics."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from packedqdc.model import (
    COULOMB_CONSTANT,
    EF,
    PhysNet,
    correct_charges,
    coulomb_kernel,
    energy_and_forces,
    glorot_orthogonal,
    init_params,
    predict,
    switch_function,
)

CUTOFF = 5.0


# --------------------------------------------------------------------------------------------------
# helpers


def build_batch(mols, num_atoms=None, num_mols=None, num_pairs=None, seed=0):
    """Flat batch of the contract from a list of (Z, R, Qtot); all ordered pairs i != j.

    Padding is deliberately hostile: padding atoms sit at random positions near the real ones and
    belong to the real slot 0; padding pairs are either dst == src == 0 (r = 0) or link real atom 0
    to a padding atom.
    """
    rng = np.random.RandomState(seed)
    n_real = sum(len(z) for z, _, _ in mols)
    pairs_real = sum(len(z) * (len(z) - 1) for z, _, _ in mols)
    A = n_real if num_atoms is None else num_atoms
    M = len(mols) if num_mols is None else num_mols
    P = pairs_real if num_pairs is None else num_pairs
    assert A >= n_real and M >= len(mols) and P >= pairs_real

    Z = np.zeros(A, np.int32)
    R = rng.uniform(-2.0, 2.0, size=(A, 3)).astype(np.float32)
    seg = np.zeros(A, np.int32)
    amask = np.zeros(A, bool)
    Qtot = np.zeros(M, np.float64)
    N = np.zeros(M, np.int32)
    dst, src = [], []
    off = 0
    for m, (z, r, q) in enumerate(mols):
        n = len(z)
        Z[off:off + n] = z
        R[off:off + n] = r
        seg[off:off + n] = m
        amask[off:off + n] = True
        Qtot[m] = q
        N[m] = n
        i, j = np.nonzero(~np.eye(n, dtype=bool))
        dst.append(i + off)
        src.append(j + off)
        off += n
    dst = np.concatenate(dst) if dst else np.zeros(0, np.int64)
    src = np.concatenate(src) if src else np.zeros(0, np.int64)
    n_pad_pairs = P - len(dst)
    pad_dst = np.zeros(n_pad_pairs, np.int64)
    pad_src = np.zeros(n_pad_pairs, np.int64)
    if A > n_real:
        pad_src[1::2] = rng.randint(n_real, A, size=pad_src[1::2].shape)
    pmask = np.concatenate([np.ones(len(dst), bool), np.zeros(n_pad_pairs, bool)])
    mol_mask = np.zeros(M, bool)
    mol_mask[:len(mols)] = True
    return {
        "Z": Z, "R": R, "batch_segments": seg, "atom_mask": amask, "Qtot": Qtot, "N": N,
        "mol_mask": mol_mask,
        "dst_idx": np.concatenate([dst, pad_dst]).astype(np.int32),
        "src_idx": np.concatenate([src, pad_src]).astype(np.int32),
        "pair_mask": pmask,
    }


def random_molecule(rng, n, charge=0.0):
    """n atoms of H/C/N/O with no two atoms closer than 0.9 Å."""
    z = rng.choice([1, 6, 7, 8], size=n).astype(np.int32)
    pts = []
    while len(pts) < n:
        p = rng.uniform(-1.8, 1.8, size=3)
        if all(np.linalg.norm(p - q) > 0.9 for q in pts):
            pts.append(p)
    return z, np.asarray(pts, np.float32), charge


def perturb(params, seed=1, scale=0.1):
    """Random perturbation of every parameter, so zero-initialised heads and G are non-trivial."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    new = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(treedef, new)


def random_rotation(rng):
    q, r = np.linalg.qr(rng.randn(3, 3))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q.astype(np.float32)


MODEL = PhysNet(features=24, num_basis=16, cutoff=CUTOFF, num_iterations=2, num_res_atomic=1,
                num_res_interaction=1, num_res_output=1)
EF_JIT = jax.jit(energy_and_forces, static_argnums=0)
PREDICT_JIT = jax.jit(predict, static_argnums=0)
INIT_JIT = jax.jit(init_params, static_argnums=0)


@pytest.fixture(scope="module")
def mols():
    rng = np.random.RandomState(42)
    return [random_molecule(rng, 5, 0.0), random_molecule(rng, 4, 1.0),
            random_molecule(rng, 6, -1.0)]


@pytest.fixture(scope="module")
def params(mols):
    p = INIT_JIT(MODEL, jax.random.PRNGKey(0), build_batch(mols))
    return perturb(p)


def single(mol, params, **kw):
    e, f, aux = EF_JIT(MODEL, params, build_batch([mol], **kw))
    return np.asarray(e), np.asarray(f), aux


# --------------------------------------------------------------------------------------------------
# API


def test_seed_alias_and_defaults():
    m = EF(features=128, num_iterations=3, cutoff=5.0, natoms=60)
    assert isinstance(m, PhysNet)
    assert (m.features, m.num_basis, m.cutoff, m.num_iterations) == (128, 64, 5.0, 3)
    assert (m.num_res_atomic, m.num_res_interaction, m.num_res_output) == (2, 3, 1)
    assert m.electrostatics is True and m.natoms == 60
    attrs = m.return_attributes()
    assert attrs["features"] == 128 and attrs["dtype"] == "float32"


def test_output_shapes_and_dtypes(mols, params):
    b = build_batch(mols, num_atoms=20, num_mols=5, num_pairs=90)
    e, f, aux = EF_JIT(MODEL, params, b)
    assert e.shape == (5,) and e.dtype == jnp.float32
    assert f.shape == (20, 3) and f.dtype == jnp.float32
    for key, shape in [("atomic_energy", (20,)), ("charges", (20,)), ("charges_uncorrected", (20,)),
                       ("sum_charges", (5,)), ("electrostatic_energy", (5,)), ("nh_loss", ())]:
        assert aux[key].shape == shape, key
        assert aux[key].dtype == jnp.float32, key
        assert np.all(np.isfinite(np.asarray(aux[key]))), key


# --------------------------------------------------------------------------------------------------
# masking and invariances


def test_energy_independent_of_batch_and_padding(mols, params):
    alone = [single(m, params) for m in mols]
    b = build_batch(mols, num_atoms=23, num_mols=6, num_pairs=100, seed=3)
    e, f, aux = EF_JIT(MODEL, params, b)
    e, f = np.asarray(e), np.asarray(f)
    off = 0
    for k, (mol, (e1, f1, _)) in enumerate(zip(mols, alone)):
        n = len(mol[0])
        np.testing.assert_allclose(e[k], e1[0], rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(f[off:off + n], f1, rtol=1e-4, atol=1e-4)
        off += n
    # padding slots have zero energy, padding atoms zero force / energy / charge
    np.testing.assert_array_equal(e[len(mols):], 0.0)
    np.testing.assert_array_equal(f[off:], 0.0)
    for key in ("atomic_energy", "charges", "charges_uncorrected"):
        np.testing.assert_array_equal(np.asarray(aux[key])[off:], 0.0)
    # the molecule energies actually depend on geometry (the test is not vacuous)
    assert np.max(np.abs(f[:off])) > 1e-2


def test_padding_amount_does_not_matter(mols, params):
    e1, f1, _ = single(mols[2], params)
    e2, f2, _ = single(mols[2], params, num_atoms=11, num_mols=3, num_pairs=45, seed=7)
    np.testing.assert_allclose(e2[0], e1[0], rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(e2[1:], 0.0)
    np.testing.assert_allclose(f2[:6], f1, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(f2[6:], 0.0)


def test_translation_rotation_permutation_invariance(mols, params):
    rng = np.random.RandomState(5)
    z, r, q = mols[2]
    e0, f0, _ = single((z, r, q), params)

    e_t, f_t, _ = single((z, r + np.float32([3.0, -7.5, 11.0]), q), params)
    np.testing.assert_allclose(e_t, e0, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(f_t, f0, rtol=1e-4, atol=2e-4)

    rot = random_rotation(rng)
    e_r, f_r, _ = single((z, r @ rot.T, q), params)
    np.testing.assert_allclose(e_r, e0, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(f_r, f0 @ rot.T, rtol=1e-4, atol=2e-4)   # forces rotate with R

    perm = rng.permutation(len(z))
    e_p, f_p, _ = single((z[perm], r[perm], q), params)
    np.testing.assert_allclose(e_p, e0, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(f_p, f0[perm], rtol=1e-4, atol=2e-4)

    # no external field: forces on an isolated molecule sum to zero
    np.testing.assert_allclose(f0.sum(axis=0), 0.0, atol=1e-3)


# --------------------------------------------------------------------------------------------------
# forces


def test_forces_match_finite_differences(mols):
    z, r, q = mols[1]
    model64 = MODEL.clone(dtype=jnp.float64)
    with jax.enable_x64(True):
        b = build_batch([(z, r, q)], num_atoms=6, num_mols=2, num_pairs=16)
        p32 = perturb(INIT_JIT(MODEL, jax.random.PRNGKey(0), b))
        p64 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), p32)
        b["R"] = b["R"].astype(np.float64)
        e, f, _ = EF_JIT(model64, p64, b)
        assert e.dtype == jnp.float64 and f.dtype == jnp.float64
        energy_fn = jax.jit(lambda pos: predict(model64, p64, {**b, "R": pos})["energy"].sum())

        def energy_at(pos):
            return float(energy_fn(pos))

        eps = 1e-5
        fd = np.zeros((len(z), 3))
        for a in range(len(z)):
            for d in range(3):
                plus = b["R"].copy()
                minus = b["R"].copy()
                plus[a, d] += eps
                minus[a, d] -= eps
                fd[a, d] = -(energy_at(plus) - energy_at(minus)) / (2 * eps)
        f = np.asarray(f)
    np.testing.assert_allclose(f[:len(z)], fd, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(f[len(z):], 0.0)
    assert np.max(np.abs(fd)) > 1e-2


def test_gradients_finite_with_degenerate_padding_pairs(mols, params):
    """Padding pairs with dst == src (r = 0) must not produce NaN in first or second derivatives."""
    b = build_batch(mols, num_atoms=18, num_mols=4, num_pairs=80)
    assert np.any((b["dst_idx"] == b["src_idx"]) & ~b["pair_mask"])

    def loss(p):
        e, f, aux = energy_and_forces(MODEL, p, b)
        return jnp.sum(e ** 2) + jnp.sum(f ** 2) + aux["nh_loss"]

    g = jax.jit(jax.grad(loss))(params)
    for leaf in jax.tree_util.tree_leaves(g):
        assert np.all(np.isfinite(np.asarray(leaf)))


# --------------------------------------------------------------------------------------------------
# charges and electrostatics


def test_corrected_charges_sum_to_qtot(mols, params):
    b = build_batch(mols, num_atoms=20, num_mols=4, num_pairs=90)
    aux = PREDICT_JIT(MODEL, params, b)
    q = np.asarray(aux["charges"])
    q_raw = np.asarray(aux["charges_uncorrected"])
    sums = np.bincount(b["batch_segments"], weights=q * b["atom_mask"], minlength=4)
    np.testing.assert_allclose(sums, b["Qtot"], atol=1e-5)
    raw_sums = np.bincount(b["batch_segments"], weights=q_raw * b["atom_mask"], minlength=4)
    np.testing.assert_allclose(np.asarray(aux["sum_charges"]), raw_sums, rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(raw_sums[:3] - b["Qtot"][:3])) > 1e-3   # correction was needed


def test_correct_charges_function():
    q = jnp.array([0.3, -0.1, 0.5, 0.2, 9.0], jnp.float32)
    seg = jnp.array([0, 0, 1, 1, 0], jnp.int32)
    mask = jnp.array([True, True, True, True, False])
    out = np.asarray(correct_charges(q, seg, mask, jnp.array([0.0, 1.0, 0.0]), 3))
    np.testing.assert_allclose(out, [0.2, -0.2, 0.65, 0.35, 0.0], atol=1e-6)


def test_coulomb_kernel_values_and_continuity():
    rs = 0.5 * CUTOFF
    # shielded at short range: finite at r = 0, equals 1/sqrt(r^2 + 1) there
    assert float(coulomb_kernel(jnp.float32(0.0), CUTOFF)) == pytest.approx(1.0)
    r_small = jnp.float32(1e-3)
    assert float(coulomb_kernel(r_small, CUTOFF)) == pytest.approx(1.0, abs=1e-5)
    # plain 1/r beyond cutoff/2
    r = jnp.linspace(rs, 4 * CUTOFF, 50, dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(coulomb_kernel(r, CUTOFF)), 1.0 / np.asarray(r),
                               rtol=1e-6)
    # switch: 0 at 0, 1 at and beyond cutoff/2, monotone
    s = np.asarray(switch_function(jnp.linspace(0.0, rs * 1.5, 301), rs))
    assert s[0] == 0.0 and np.all(s[200:] == 1.0) and np.all(np.diff(s) >= -1e-7)
    # continuity of value and slope across cutoff/2 (float64 for a clean check)
    with jax.enable_x64(True):
        h = 1e-6
        x = jnp.array([rs - h, rs, rs + h], jnp.float64)
        v = np.asarray(coulomb_kernel(x, CUTOFF))
        assert abs(v[0] - v[1]) < 1e-5 and abs(v[2] - v[1]) < 1e-5
        dk = jax.vmap(jax.grad(lambda t: coulomb_kernel(t, CUTOFF)))
        d = np.asarray(dk(x))
        np.testing.assert_allclose(d, -1.0 / rs ** 2, rtol=1e-4)
        assert np.all(np.isfinite(np.asarray(dk(jnp.array([0.0, 0.3])))))
    # smooth, bounded between the two kernels everywhere
    rr = np.linspace(0.05, 2 * CUTOFF, 400)
    k = np.asarray(coulomb_kernel(jnp.asarray(rr, jnp.float32), CUTOFF))
    assert np.all(k <= 1.0 / rr + 1e-5) and np.all(k >= 1.0 / np.sqrt(rr ** 2 + 1) - 1e-5)


def test_electrostatic_energy_of_two_point_charges():
    """Fixed charges via the per-element shift: E_ele = k_e q1 q2 / r for r >= cutoff/2."""
    model = PhysNet(features=8, num_basis=4, cutoff=CUTOFF, num_iterations=1,
                    charge_shift_init=0.0)
    r = 3.0
    mol = (np.array([1, 8], np.int32), np.array([[0, 0, 0], [r, 0, 0]], np.float32), 0.0)
    b = build_batch([mol])
    p = INIT_JIT(model, jax.random.PRNGKey(0), b)
    shift = np.zeros(119, np.float32)
    shift[1], shift[8] = 0.4, -0.4
    p["params"]["charge_shift"] = jnp.asarray(shift)
    out = PREDICT_JIT(model, p, b)
    np.testing.assert_allclose(np.asarray(out["charges"]), [0.4, -0.4], atol=1e-6)
    expected = COULOMB_CONSTANT * 0.4 * -0.4 / r
    np.testing.assert_allclose(float(out["electrostatic_energy"][0]), expected, rtol=1e-5)
    no_ele = PREDICT_JIT(model.clone(electrostatics=False), p, b)
    np.testing.assert_allclose(float(out["energy"][0] - no_ele["energy"][0]), expected, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(no_ele["electrostatic_energy"]), 0.0)


# --------------------------------------------------------------------------------------------------
# initialisation and nh-loss


def test_initial_atomic_energies_equal_per_element_shift(mols):
    model = MODEL.clone(energy_scale_init=2.5, energy_shift_init=-3.25)
    b = build_batch(mols, num_atoms=18, num_mols=4, num_pairs=80)
    p = INIT_JIT(model, jax.random.PRNGKey(3), b)
    out = PREDICT_JIT(model, p, b)
    mask = b["atom_mask"]
    ae = np.asarray(out["atomic_energy"])
    np.testing.assert_array_equal(ae[mask], -3.25)
    np.testing.assert_array_equal(ae[~mask], 0.0)
    np.testing.assert_array_equal(np.asarray(p["params"]["energy_scale"]), 2.5)
    np.testing.assert_array_equal(np.asarray(out["charges_uncorrected"]), 0.0)
    np.testing.assert_allclose(np.asarray(out["charges"])[mask],
                               (b["Qtot"] / np.maximum(b["N"], 1))[b["batch_segments"]][mask],
                               rtol=1e-6)
    assert float(out["nh_loss"]) == 0.0
    # per-element initial tables
    table = np.linspace(-1.0, 1.0, 119).astype(np.float32)
    model2 = MODEL.clone(energy_shift_init=tuple(table.tolist()))
    out2 = PREDICT_JIT(model2, INIT_JIT(model2, jax.random.PRNGKey(3), b), b)
    np.testing.assert_allclose(np.asarray(out2["atomic_energy"])[mask], table[b["Z"][mask]])


def test_nh_loss_finite_nonnegative(mols, params):
    b = build_batch(mols, num_atoms=18, num_mols=4, num_pairs=80)
    out = PREDICT_JIT(MODEL, params, b)
    nh = float(out["nh_loss"])
    assert math.isfinite(nh) and nh > 0.0
    # mean over 2 channels of ratios in [0, 1), times (num_iterations - 1) modules
    assert nh <= MODEL.num_iterations - 1


def test_glorot_orthogonal_init():
    w = np.asarray(glorot_orthogonal()(jax.random.PRNGKey(0), (64, 32)))
    np.testing.assert_allclose(w.var(), 2.0 / (64 + 32), rtol=1e-4)
    g = w.T @ w   # orthogonal columns (up to a common scale)
    np.testing.assert_allclose(g / g[0, 0], np.eye(32), atol=1e-4)


def test_rbf_initial_centres_and_widths(mols):
    model = PhysNet(features=8, num_basis=64, cutoff=10.0, num_iterations=1)
    p = INIT_JIT(model, jax.random.PRNGKey(0), build_batch(mols[:1]))["params"]["rbf"]
    mu = np.asarray(jax.nn.softplus(p["centers_raw"]))
    beta = np.asarray(jax.nn.softplus(p["widths_raw"]))
    np.testing.assert_allclose(mu, np.linspace(1.0, math.exp(-10.0), 64), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(beta, (64 / (2 * (1 - math.exp(-10.0)))) ** 2, rtol=1e-5)


def test_charge_embedding_lets_atoms_see_the_total_charge(mols):
    model = PhysNet(features=16, num_basis=8, cutoff=CUTOFF, num_iterations=2, charge_embedding=True)
    z, r, _ = mols[0]
    neutral, cation = build_batch([(z, r, 0.0)]), build_batch([(z, r, 1.0)])
    params = init_params(model, jax.random.PRNGKey(0), neutral)
    assert not np.any(np.asarray(params["params"]["charge_embedding_positive"]))  # zero at init
    params = jax.tree.map(lambda x: x, params)
    params["params"]["charge_embedding_positive"] = jnp.ones(16)
    params["params"]["output_block_0"] = jax.tree.map(lambda x: x + 0.1, params["params"]["output_block_0"])
    e_neutral = np.asarray(predict(model, params, neutral)["atomic_energy"])
    e_cation = np.asarray(predict(model, params, cation)["atomic_energy"])
    assert np.abs(e_neutral - e_cation).max() > 1e-3
    # padding still contributes nothing, and the charge share is per molecule
    padded = build_batch([(z, r, 1.0)], num_atoms=len(z) + 3, num_mols=2, num_pairs=len(z) * (len(z) - 1) + 5)
    e_padded = np.asarray(predict(model, params, padded)["energy"])[0]
    assert e_padded == pytest.approx(float(np.asarray(predict(model, params, cation)["energy"])[0]), rel=1e-5)


def test_charge_embedding_is_a_stored_attribute():
    from packedqdc.train.session import build_model

    model = PhysNet(features=16, num_basis=8, charge_embedding=True)
    attrs = model.return_attributes()
    assert attrs["charge_embedding"] is True and build_model(attrs) == model
    old = {k: v for k, v in attrs.items() if k != "charge_embedding"}  # checkpoints from before the field
    assert build_model(old).charge_embedding is False
