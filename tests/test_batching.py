"""batching: pair templates, greedy fill, level choice, plans, splitting over devices."""

from __future__ import annotations

import numpy as np
import pytest

from packedqdc.index import greedy_plan
from packedqdc.batching import (
    BatchShape,
    choose_levels,
    cutoff_pair_counts,
    design_budgets,
    packed_plan,
    padded_plan,
    pair_templates,
    part_shapes,
    ranges,
    split_plan,
)


def test_pair_templates_all_ordered_pairs():
    start, dst, src = pair_templates(6)
    for n in range(7):
        d, s = dst[start[n] : start[n + 1]], src[start[n] : start[n + 1]]
        assert set(zip(d.tolist(), s.tolist())) == {(i, j) for i in range(n) for j in range(n) if i != j}
        assert (np.diff(d) >= 0).all()


def test_ranges():
    np.testing.assert_array_equal(ranges(np.array([5, 0, 10]), np.array([2, 0, 3])), [5, 6, 10, 11, 12])


def test_greedy_fill_respects_caps():
    rng = np.random.default_rng(0)
    atoms = rng.integers(1, 20, 500)
    pairs = atoms * (atoms - 1)
    bounds, a_b, p_b = greedy_plan(atoms, pairs, 100, 1500, 9)
    assert bounds[0] == 0 and bounds[-1] == 500
    np.testing.assert_array_equal(a_b, [atoms[lo:hi].sum() for lo, hi in zip(bounds[:-1], bounds[1:])])
    np.testing.assert_array_equal(p_b, [pairs[lo:hi].sum() for lo, hi in zip(bounds[:-1], bounds[1:])])
    np.testing.assert_array_equal(greedy_plan(atoms.astype(np.uint8), np.zeros(0, np.int64), 100, 1500, 9)[0],
                                  bounds)  # all pairs computed from the sizes
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        assert hi > lo and atoms[lo:hi].sum() <= 100 and pairs[lo:hi].sum() <= 1500 and hi - lo <= 9
        if hi < 500:  # closed because the next molecule did not fit
            assert atoms[lo : hi + 1].sum() > 100 or pairs[lo : hi + 1].sum() > 1500 or hi - lo == 9


def test_choose_levels_covers_and_is_few():
    totals = np.random.default_rng(1).normal(1000, 100, 2000).astype(int)
    levels = choose_levels(totals, 4)
    assert len(levels) <= 4 and levels[-1] == totals.max()
    served = np.asarray(levels)[np.searchsorted(levels, totals)]
    assert totals.sum() / served.sum() > 0.93


def test_design_budgets_and_plan_cover_every_molecule_once():
    rng = np.random.default_rng(2)
    n_atoms = rng.integers(3, 30, 3000).astype(np.int32)
    idx = np.arange(3000)
    pairs = n_atoms.astype(np.int64) * (n_atoms - 1)
    budgets = design_budgets(idx, n_atoms, pairs, 32, seed=0)
    assert design_budgets(idx.astype(np.int32), n_atoms.astype(np.uint8), None, 32, seed=0) == budgets
    assert 1 <= len(budgets) <= 4 and all(b.A == budgets[0].A for b in budgets)
    plan = packed_plan(idx, n_atoms, pairs, budgets, np.random.default_rng(3))
    assert sorted(plan.mols.tolist()) == idx.tolist()
    for b in range(plan.n_batches):
        mols = plan.mols[plan.bounds[b] : plan.bounds[b + 1]]
        shape = plan.shapes[plan.shape_ids[b]]
        assert n_atoms[mols].sum() + 1 <= shape.A and len(mols) + 1 <= shape.M and pairs[mols].sum() <= shape.P


def test_padded_plan_only_last_batch_partial():
    n_atoms = np.random.default_rng(4).integers(1, 10, 103)
    plan = padded_plan(np.arange(103), n_atoms, 10, 12, 16, np.random.default_rng(0))
    sizes = np.diff(plan.bounds)
    assert sorted(plan.mols.tolist()) == list(range(103))
    assert (sizes == 10).sum() == 10 and sorted(sizes.tolist())[0] == 3
    assert plan.shapes == (BatchShape(120, 10, 10 * 12 * 11),)


@pytest.mark.parametrize("parts", [2, 3, 4, 7])
@pytest.mark.parametrize("batch_size", [3, 16, 40])
def test_split_plan_parts_hold_the_batch_and_fit_their_shapes(parts, batch_size):
    """Every part of every batch fits the bound of part_shapes; the parts of a batch are the batch."""
    rng = np.random.default_rng(parts * 100 + batch_size)
    n_atoms = np.clip(np.round(3 + rng.gamma(2.0, 12.0, 3000)), 1, 110).astype(np.int32)
    pairs = n_atoms.astype(np.int64) * (n_atoms - 1)
    idx = np.arange(3000)
    plan = packed_plan(idx, n_atoms, pairs, design_budgets(idx, n_atoms, pairs, batch_size, 0), rng)
    classes = part_shapes(plan.shapes, parts, "packed", int(n_atoms.max()), int(pairs.max()), True)
    split = split_plan(plan, parts, n_atoms, classes)
    assert split.n_batches == plan.n_batches * parts and split.shapes == classes
    for b in range(plan.n_batches):
        whole = plan.mols[plan.bounds[b] : plan.bounds[b + 1]]
        got = []
        for j in range(parts):
            mols = split.mols[split.bounds[b * parts + j] : split.bounds[b * parts + j + 1]]
            shape = classes[split.shape_ids[b * parts + j]]
            assert split.shape_ids[b * parts + j] == plan.shape_ids[b]
            assert n_atoms[mols].sum() + 1 <= shape.A and mols.size + 1 <= shape.M and pairs[mols].sum() <= shape.P
            got.extend(mols.tolist())
        assert sorted(got) == sorted(whole.tolist())


def test_part_shapes_bound_is_tight_for_one_big_molecule():
    """The worst case the bound covers: one part gets the largest molecule and an equal share of the rest."""
    (shape,) = part_shapes((BatchShape(101, 11, 4000),), 2, "packed", 40, 1560, True)
    assert shape == BatchShape(1 + (100 + 40) // 2, 6, (4000 + 1560) // 2)
    (capped,) = part_shapes((BatchShape(101, 11, 1000),), 2, "packed", 90, 8010, False)
    assert capped == BatchShape(101, 6, 1000)  # never more than the whole batch
    assert part_shapes((BatchShape(120, 10, 1320),), 3, "padded", 12, 132, True) == (BatchShape(48, 4, 528),)


def test_cutoff_pair_counts_match_brute_force(tmp_path):
    from packedqdc.format import MoleculeChunk, PackedWriter, open_packed

    rng = np.random.default_rng(6)
    n = rng.integers(1, 12, 50).astype(np.int32)
    R = rng.normal(0, 1.5, (int(n.sum()), 3)).astype(np.float32)
    with PackedWriter(tmp_path / "d", has_forces=False, has_qtot=False) as w:
        w.append(MoleculeChunk(n_atoms=n, Z=np.ones(R.shape[0], np.int32), R=R, E=np.zeros(50)))
        w.commit()
    ds = open_packed(tmp_path / "d")
    offsets = np.asarray(ds.offsets, dtype=np.int64)
    got = cutoff_pair_counts(ds, offsets, 2.0, np.asarray(ds.n_atoms))
    assert got.dtype == np.uint8  # at most 11 * 10 pairs
    for i in range(50):
        r = R[offsets[i] : offsets[i + 1]]
        d = np.linalg.norm(r[:, None] - r[None], axis=-1)
        want = int(((d < 2.0) & ~np.eye(len(r), dtype=bool)).sum())
        assert abs(int(got[i]) - want) <= 1  # float32 vs float64 rounding at the boundary
