"""PackedMemmapLoader: contents, order, shapes, split, shard, resume, prefetch, errors."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from packedqdc.assembly import ITEMS_PER_CALL
from packedqdc.errors import ConfigError, FormatError
from packedqdc.format import MoleculeChunk, PackedWriter, open_packed
from packedqdc.loader import PackedMemmapLoader, split_loader


def write_dataset(path, n_mol=300, lo=1, hi=14, seed=0, forces=True, qtot=True):
    rng = np.random.default_rng(seed)
    n = rng.integers(lo, hi + 1, n_mol).astype(np.int32)
    A = int(n.sum())
    chunk = MoleculeChunk(
        n_atoms=n,
        Z=rng.integers(1, 10, A).astype(np.int32),
        R=rng.normal(0, 1.5, (A, 3)).astype(np.float32),
        E=rng.normal(-1000, 50, n_mol),
        F=rng.normal(size=(A, 3)).astype(np.float32) if forces else None,
        Qtot=rng.integers(-1, 2, n_mol).astype(np.float64) if qtot else None,
    )
    with PackedWriter(path, has_forces=forces, has_qtot=qtot) as w:
        w.append(chunk)
        w.commit()
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("d") / "ds")


def check_batch(ds, batch, cutoff=None):
    """Every field of every real molecule equals the files; pairs complete, confined, masked."""
    A, M, P = batch["Z"].shape[0], batch["N"].shape[0], batch["dst_idx"].shape[0]
    assert batch["R"].shape == batch["F"].shape == (A, 3)
    assert batch["E"].dtype == np.float64 and batch["Qtot"].dtype == np.float64
    assert batch["Z"].dtype == np.int32 and batch["dst_idx"].dtype == np.int32 and batch["mol_idx"].dtype == np.int64
    seg, dst, src, pm = batch["batch_segments"], batch["dst_idx"], batch["src_idx"], batch["pair_mask"]
    assert seg.min() >= 0 and seg.max() < M and dst.min() >= 0 and dst.max() < A and src.max() < A
    am = batch["atom_mask"]
    assert am[dst[pm]].all() and am[src[pm]].all()
    assert (seg[dst[pm]] == seg[src[pm]]).all()
    assert (batch["mol_idx"] >= 0).tolist() == batch["mol_mask"].tolist()
    assert (batch["N"][~batch["mol_mask"]] == 0).all() and (batch["Z"][~am] == 0).all()
    real_pairs = set(zip(dst[pm].tolist(), src[pm].tolist()))
    assert len(real_pairs) == int(pm.sum())
    for slot in np.flatnonzero(batch["mol_mask"]):
        i = int(batch["mol_idx"][slot])
        mol = ds.molecule(i)
        atoms = np.flatnonzero(am & (seg == slot))
        assert len(atoms) == batch["N"][slot] == ds.n_atoms[i]
        np.testing.assert_array_equal(batch["Z"][atoms], mol["Z"])
        np.testing.assert_array_equal(batch["R"][atoms], mol["R"])
        np.testing.assert_array_equal(batch["F"][atoms], mol["F"] if mol["F"] is not None else 0)
        assert batch["E"][slot] == mol["E"] and batch["Qtot"][slot] == mol["Qtot"]
        everything = {(int(a), int(b)) for a in atoms for b in atoms if a != b}
        mine = {(a, b) for a, b in real_pairs if a in set(atoms.tolist())}
        if cutoff is None:
            assert mine == everything
        else:
            dist = {(a, b): float(np.linalg.norm(batch["R"][a] - batch["R"][b])) for a, b in everything}
            assert mine <= everything
            assert all(dist[p] < cutoff + 1e-4 for p in mine)
            assert all(p in mine for p, d in dist.items() if d < cutoff - 1e-4)


LAYOUTS = [dict(num_atoms=16), dict(layout="packed"), dict(layout="packed", cutoff=2.0), dict(num_atoms=14, cutoff=2.0)]


@pytest.mark.parametrize("reuse", [False, True])
@pytest.mark.parametrize("kw", LAYOUTS)
def test_contents_masks_pairs_and_each_molecule_once(data, kw, reuse):
    ds = open_packed(data)
    loader = PackedMemmapLoader(data, batch_size=8, seed=3)
    seen = []
    shapes = {tuple(s) for s in loader.shapes(layout=kw.get("layout"), num_atoms=kw.get("num_atoms"), cutoff=kw.get("cutoff"))}
    count = 0
    for batch in loader.batches(**kw, reuse_buffers=reuse):
        check_batch(ds, batch, kw.get("cutoff"))
        assert (batch["Z"].shape[0], batch["N"].shape[0], batch["dst_idx"].shape[0]) in shapes
        seen.extend(batch["mol_idx"][batch["mol_mask"]].tolist())
        count += 1
    assert sorted(seen) == list(range(ds.n_molecules))
    assert count == loader.num_batches(**{k: v for k, v in kw.items()}, epoch=0)
    assert loader.epoch == 1 and loader.position == 0
    assert len(shapes) <= 4


def test_packed_budgets_efficient_and_average_batch_size(tmp_path):
    path = write_dataset(tmp_path / "big", n_mol=4000, lo=3, hi=29, seed=1)
    loader = PackedMemmapLoader(path, batch_size=32, prefetch=0)
    atoms = slots = pairs = pslots = mols = nb = 0
    for b in loader.batches(layout="packed"):
        atoms += b["atom_mask"].sum(); slots += b["Z"].shape[0]
        pairs += b["pair_mask"].sum(); pslots += b["pair_mask"].shape[0]
        mols += b["mol_mask"].sum(); nb += 1
    assert atoms / slots > 0.95 and pairs / pslots > 0.9
    assert 30 <= mols / nb <= 34


def _copy(batch):
    return {key: np.array(value) for key, value in batch.items()}


@pytest.mark.parametrize(("prefetch", "workers", "threads"), [(0, 1, 1), (3, 1, 1), (2, 3, 1), (0, 1, 2), (2, 2, 2)])
@pytest.mark.parametrize("kw", LAYOUTS + [dict(num_devices=2, layout="packed"), dict(num_devices=3, num_atoms=14)])
def test_reused_buffers_equal_fresh_batches(data, kw, prefetch, workers, threads):
    """Over several epochs (buffers reused across shapes and epochs), a batch copied on arrival equals the
    fresh one of a loader that assembles in the caller's thread, one thread per batch."""
    kw = dict(kw)
    devices = kw.pop("num_devices", None)
    runs = []
    for reuse, pf, w, t in ((False, 0, 1, 1), (True, prefetch, workers, threads)):
        loader = PackedMemmapLoader(data, batch_size=8, seed=4, prefetch=pf, workers=w, threads=t)
        if devices is None:
            epochs = [[_copy(b) for b in loader.batches(**kw, reuse_buffers=reuse)] for _ in range(3)]
        else:
            epochs = [[_copy(b) for b in loader.stacked_batches(devices, **kw, reuse_buffers=reuse)] for _ in range(3)]
        runs.append(epochs)
    fresh, reused = runs
    assert [len(e) for e in fresh] == [len(e) for e in reused]
    for a, b in zip((x for e in fresh for x in e), (x for e in reused for x in e)):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize(("prefetch", "workers"), [(0, 1), (2, 1), (2, 2), (1, 3)])
def test_reused_batch_valid_until_next_draw_and_read_only(data, prefetch, workers):
    """A batch is intact for the whole body of the loop that received it, however far the workers run
    ahead meanwhile; assembling in the caller's thread (prefetch 0), the previous one is too."""
    loader = PackedMemmapLoader(data, batch_size=8, seed=1, prefetch=prefetch, workers=workers)
    expected = [_copy(b) for b in PackedMemmapLoader(data, batch_size=8, seed=1).batches(layout="packed")]
    it = loader.batches(layout="packed", reuse_buffers=True)
    held = None
    for i, batch in enumerate(it):
        with pytest.raises(ValueError):
            batch["R"][0, 0] = 1.0
        if i % 4 == 0:
            time.sleep(0.005)  # the workers fill their queues and rings meanwhile
        for key in batch:
            np.testing.assert_array_equal(batch[key], expected[i][key], err_msg=key)
        if prefetch == 0 and held is not None:
            for key in held:
                np.testing.assert_array_equal(held[key], expected[i - 1][key], err_msg=key)
        held = batch
    assert i == len(expected) - 1


@pytest.mark.parametrize("prefetch", [0, 2])
def test_buffers_kept_across_epochs_and_never_shared_by_live_iterators(data, prefetch):
    """The next epoch refills the same buffer rings (no fresh, slow-to-touch memory); an iterator that
    is still alive keeps its own, so another iterator of the loader cannot overwrite its batch."""
    loader = PackedMemmapLoader(data, batch_size=8, seed=2, prefetch=prefetch)
    kept = [b["dst_idx"] for _ in range(4) for b in loader.batches(layout="packed", reuse_buffers=True)]
    ring = prefetch + 1 + ITEMS_PER_CALL  # sets, shared by the automatic classes: see reuse_buffers
    buffers = {batch.__array_interface__["data"][0] for batch in kept}  # `kept` holds them: no address reused
    assert len(loader.shapes(layout="packed")) > 1 and len(buffers) <= ring < len(kept) / 2
    it = loader.batches(layout="packed", reuse_buffers=True)
    held = next(it)
    snapshot = _copy(held)
    for _ in loader.batches(layout="packed", reuse_buffers=True):  # a second iterator while `it` lives
        pass
    for key in snapshot:
        np.testing.assert_array_equal(held[key], snapshot[key], err_msg=key)
    it.close()


def test_padded_layout_shapes_and_seed_format(data):
    loader = PackedMemmapLoader(data, batch_size=7, shuffle=False)
    batches = list(loader.batches(num_atoms=16, physnet_format=False))
    assert all(b["Z"].shape == (7, 16) and b["R"].shape == (7, 16, 3) and b["mask"].shape == (7, 16) for b in batches)
    last = batches[-1]
    assert last["mol_mask"].sum() == 300 - 7 * (len(batches) - 1)
    assert last["mask"].sum() == last["N"].sum()
    flat = next(iter(PackedMemmapLoader(data, batch_size=7).batches()))
    na = int(open_packed(data).n_atoms.max())
    assert flat["Z"].shape == (7 * na,) and flat["dst_idx"].shape == (7 * na * (na - 1),)


def test_determinism_and_reshuffle(data):
    def epoch_ids(loader):
        return [b["mol_idx"].tolist() for b in loader.batches(layout="packed")]

    a, b = PackedMemmapLoader(data, 8, seed=5), PackedMemmapLoader(data, 8, seed=5)
    first = epoch_ids(a)
    assert first == epoch_ids(b)
    assert epoch_ids(a) != first
    assert epoch_ids(PackedMemmapLoader(data, 8, seed=6)) != first


def test_split_disjoint_reproducible(data):
    loader = PackedMemmapLoader(data, 8)
    train, valid = split_loader(loader, 0.8, seed=1)
    assert len(train) == 240 and len(valid) == 60 and train.N == 240
    assert not set(train.indices.tolist()) & set(valid.indices.tolist())
    again, _ = split_loader(loader, 0.8, seed=1)
    np.testing.assert_array_equal(train.indices, again.indices)
    seen = [i for b in valid.batches(num_atoms=14) for i in b["mol_idx"][b["mol_mask"]].tolist()]
    assert sorted(seen) == sorted(valid.indices.tolist())


def test_manual_split_like_seed(data):
    loader = PackedMemmapLoader(data, 8)
    part = PackedMemmapLoader(data, 8, shuffle=False)
    part.indices = loader.indices[:100]
    part.N = 100
    assert len(part) == 100
    with pytest.raises(ConfigError):
        part.N = 7


SPLIT_LAYOUTS = [dict(num_atoms=14), dict(layout="packed"), dict(layout="packed", cutoff=2.5)]


def _real_ids(batch):
    return sorted(np.asarray(batch["mol_idx"])[np.asarray(batch["mol_mask"])].tolist())


@pytest.mark.parametrize("kw", SPLIT_LAYOUTS)
def test_shards_split_each_global_batch(data, kw):
    """Shard k of n holds part k of every batch of the unsharded loader: disjoint, same counts and shapes."""
    whole = [_real_ids(b) for b in PackedMemmapLoader(data, 8, seed=2).batches(**kw)]
    shards = [PackedMemmapLoader(data, 8, seed=2).shard(k, 3) for k in range(3)]
    runs = [list(s.batches(**kw)) for s in shards]
    assert {len(r) for r in runs} == {len(whole)} == {shards[0].num_batches(**kw, epoch=0)}
    for step, want in zip(zip(*runs), whole):
        assert len({b["Z"].shape + b["E"].shape + b["dst_idx"].shape for b in step}) == 1
        assert {b["Z"].shape[0] for b in step} <= {s.A for s in shards[0].shapes(**kw)}
        assert sorted(i for b in step for i in _real_ids(b)) == want


@pytest.mark.parametrize("kw", SPLIT_LAYOUTS)
@pytest.mark.parametrize("devices", [2, 3])
def test_stacked_batches_deal_out_the_one_device_batch(data, kw, devices):
    """Item t of stacked_batches(D) holds the molecules of batch t of batches(), in D parts of one shape."""
    whole = [_real_ids(b) for b in PackedMemmapLoader(data, 8, seed=2).batches(**kw)]
    loader = PackedMemmapLoader(data, 8, seed=2)
    items = list(loader.stacked_batches(num_devices=devices, **kw))
    assert len(items) == len(whole) == loader.num_batches(**kw, num_devices=devices, epoch=0)
    shapes = {(s.A, s.M, s.P) for s in loader.shapes(**kw, num_devices=devices)}
    for g, want in zip(items, whole):
        assert g["R"].shape[0] == devices and g["R"].shape[2] == 3 and g["dst_idx"].shape[0] == devices
        assert (g["Z"].shape[1], g["E"].shape[1], g["dst_idx"].shape[1]) in shapes
        assert _real_ids(g) == want
        for d in range(devices):  # every part is a valid batch on its own
            seg, mask = g["batch_segments"][d], g["atom_mask"][d]
            assert np.array_equal(np.bincount(seg[mask], minlength=g["N"].shape[1]), g["N"][d])
            pm = g["pair_mask"][d]
            assert np.array_equal(seg[g["dst_idx"][d][pm]], seg[g["src_idx"][d][pm]])


@pytest.mark.parametrize(("prefetch", "workers"), [(0, 1), (3, 1), (3, 2)])
def test_resume_gives_same_batches(data, prefetch, workers):
    ref = PackedMemmapLoader(data, 8, seed=9, prefetch=0)
    list(ref.batches(layout="packed"))
    expected = [b["mol_idx"].copy() for b in ref.batches(layout="packed")]
    run = PackedMemmapLoader(data, 8, seed=9, prefetch=prefetch, workers=workers)
    list(run.batches(layout="packed"))
    it = run.batches(layout="packed")
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(run.state()))
    it.close()
    assert state == {"seed": 9, "epoch": 1, "position": 5}
    fresh = PackedMemmapLoader(data, 8, seed=0, prefetch=prefetch, workers=workers)
    fresh.restore(state)
    rest = [b["mol_idx"] for b in fresh.batches(layout="packed")]
    assert len(rest) == len(expected) - 5
    for got, want in zip(rest, expected[5:]):
        np.testing.assert_array_equal(got, want)


def test_the_iterator_owns_its_position(data):
    """``batches()`` returns an iterator that advances its own position; the loader reads the latest
    iterator's; closing early keeps it, exhausting moves to the next epoch (once)."""
    loader = PackedMemmapLoader(data, 8, seed=2, prefetch=2)
    it = loader.batches(layout="packed")
    assert (it.epoch, it.position) == (0, 0)
    next(it), next(it)
    assert (it.epoch, it.position) == (0, 2) and loader.state() == {"seed": 2, "epoch": 0, "position": 2}
    it.close()
    with pytest.raises(StopIteration):
        next(it)
    assert loader.state() == {"seed": 2, "epoch": 0, "position": 2}
    rest = loader.batches(layout="packed")
    n = sum(1 for _ in rest)
    assert n == loader.num_batches(layout="packed", epoch=0) - 2
    assert (rest.epoch, rest.position) == (1, 0) and loader.state()["epoch"] == 1
    assert list(rest) == [] and loader.state() == {"seed": 2, "epoch": 1, "position": 0}


def test_prefetch_transfer_and_worker_error(data):
    loader = PackedMemmapLoader(data, 8, prefetch=2)
    out = list(loader.batches(layout="packed", transfer=lambda b: {**b, "tag": 1}))
    assert all(b["tag"] == 1 for b in out)

    def boom(batch):
        raise RuntimeError("transfer failed")

    with pytest.raises(RuntimeError, match="transfer failed"):
        list(loader.batches(layout="packed", transfer=boom))


@pytest.mark.parametrize("workers", [2, 3])
def test_worker_error_raised_in_order(data, workers):
    """With several assembly threads, batches before a failing one arrive, then its error, and the threads stop."""
    loader = PackedMemmapLoader(data, 8, prefetch=2, workers=workers)
    expected = [b["mol_idx"].copy() for b in PackedMemmapLoader(data, 8, prefetch=0).batches(layout="packed")]
    seen = []

    def fail_on_fifth(batch):
        if np.array_equal(batch["mol_idx"], expected[4]):
            raise RuntimeError("fifth batch failed")
        return batch

    with pytest.raises(RuntimeError, match="fifth batch failed"):
        for batch in loader.batches(layout="packed", transfer=fail_on_fifth):
            seen.append(batch["mol_idx"].copy())
    assert len(seen) == 4
    for got, want in zip(seen, expected):
        np.testing.assert_array_equal(got, want)
    assert not [t for t in threading.enumerate() if t.name.startswith("packedqdc-prefetch")]
    with pytest.raises(ConfigError, match="workers must be >= 1"):
        PackedMemmapLoader(data, 8, workers=0)
    with pytest.raises(ConfigError, match="threads must be >= 1"):
        PackedMemmapLoader(data, 8, threads=0)
    with pytest.raises(ConfigError, match="threads must be >= 1"):
        PackedMemmapLoader(data, 8).batches(layout="packed", threads=0)


def test_no_forces_no_qtot(tmp_path):
    path = write_dataset(tmp_path / "nf", n_mol=40, forces=False, qtot=False)
    loader = PackedMemmapLoader(path, 8)
    assert not loader.has_forces and not loader.has_qtot
    for b in loader.batches(layout="packed"):
        assert not b["F"].any() and not b["Qtot"].any()


def test_molecule_larger_than_num_atoms(data):
    loader = PackedMemmapLoader(data, 8)
    first = int(np.flatnonzero(loader.n_atoms > 13)[0])
    with pytest.raises(ConfigError, match=f"molecule {first} has 14 atoms, more than num_atoms=13"):
        loader.batches(num_atoms=13)


def test_fixed_budgets(data):
    loader = PackedMemmapLoader(data, 8, budgets=[(64, 12, 600), (64, 12, 900)])
    assert [tuple(s) for s in loader.shapes(layout="packed")] == [(64, 12, 600), (64, 12, 900)]
    assert sum(b["mol_mask"].sum() for b in loader.batches(layout="packed")) == 300
    with pytest.raises(ConfigError, match="molecule"):
        PackedMemmapLoader(data, 8, budgets=[(8, 4, 50)]).shapes(layout="packed")


def test_damaged_directory(data, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    with open(bad / "R_pack.f32", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(FormatError, match="R_pack.f32"):
        PackedMemmapLoader(bad, 8)
    with pytest.raises(FormatError):
        PackedMemmapLoader(tmp_path / "missing", 8)


@pytest.mark.parametrize("kw", [dict(layout="packed"), dict(num_atoms=14), dict(layout="packed", cutoff=2.0)])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_default_batches_are_recycled_only_when_dropped(data, kw, prefetch):
    """The default ``batches()`` hands out writable arrays that no later batch overwrites while
    anything references them (the batch, one array of it, or a view of one), and reuses their
    memory once nothing does: batches kept, batches dropped, and batches scribbled on before being
    dropped all equal fresh copies of a one-thread reuse run."""
    reference = PackedMemmapLoader(data, 8, seed=1, prefetch=0)
    want = [[_copy(b) for b in reference.batches(reuse_buffers=True, **kw)] for _ in range(2)]
    loader = PackedMemmapLoader(data, 8, seed=1, prefetch=prefetch)
    kept, views = [], []
    for epoch in range(2):
        for t, b in enumerate(loader.batches(**kw)):
            assert b["R"].flags.writeable
            for key, value in want[epoch][t].items():
                np.testing.assert_array_equal(b[key], value)
            if t % 5 == 0:
                kept.append((epoch, t, b))
            elif t % 5 == 1:
                views.append((epoch, t, b["R"][1:]))  # only a view of one array survives
            else:
                b["R"][:] = 1e9  # the caller may write into its own batch; later batches are refilled
                b["pair_mask"][:] = True
                b["N"][:] = 99
                if b["dst_idx"].flags.writeable:  # the padded layout's pair lists are shared constants
                    b["dst_idx"][:] = 0
    for epoch, t, b in kept:
        for key, value in want[epoch][t].items():
            np.testing.assert_array_equal(b[key], value)
    for epoch, t, view in views:
        np.testing.assert_array_equal(view, want[epoch][t]["R"][1:])
    # memory was recycled: far fewer buffer sets than batches
    assembler = next(a for pool in loader._assemblers.values() for a in pool)
    rings = {id(r) for r in assembler._recycled.tracked()}
    n_batches = sum(len(e) for e in want)
    assert len(kept) + len(views) + len(rings) < n_batches


BLOCK = dict(order="block", block_mib=0.002, window_blocks=4)  # ~75 atoms a block: ~30 blocks here


def _mol_ids(batches):
    return [b["mol_idx"][b["mol_mask"]].tolist() for b in batches]


@pytest.mark.parametrize("kw", LAYOUTS + [dict(layout="packed", cutoff=2.0)])
def test_block_order_each_molecule_once_same_shapes_and_contents(data, kw):
    ds = open_packed(data)
    block = PackedMemmapLoader(data, 8, seed=3, **BLOCK)
    molecule = PackedMemmapLoader(data, 8, seed=3, order="molecule")
    assert block.order == "block" and molecule.order == "molecule"
    assert block.shapes(**kw) == molecule.shapes(**kw)
    orders = []
    for epoch in range(3):
        assert block.num_batches(**kw) == len(batches := list(block.batches(**kw)))
        seen = [i for ids in _mol_ids(batches) for i in ids]
        assert sorted(seen) == list(range(ds.n_molecules))
        orders.append(seen)
        for b in batches:
            assert (b["Z"].shape[0], b["N"].shape[0], b["dst_idx"].shape[0]) in {tuple(s) for s in block.shapes(**kw)}
        for b in batches[:3]:
            check_batch(ds, b, kw.get("cutoff"))
    assert orders[0] != orders[1] != orders[2]  # a new order every epoch


def test_block_order_reads_a_window_of_blocks_at_a_time(data):
    """The first molecules of an epoch come from at most ``window_blocks`` blocks (contiguous runs
    of the file), and are shuffled within them (not in file order)."""
    from packedqdc.batching import block_bounds

    loader = PackedMemmapLoader(data, 8, seed=5, **BLOCK)
    bounds = block_bounds(loader.indices, loader.n_atoms, int(0.002 * 2**20 / 28))
    assert len(bounds) - 1 >= 20
    seen = [i for ids in _mol_ids(loader.batches(layout="packed")) for i in ids]
    first_window = int(np.sum(np.diff(bounds)[:4]))  # about one window's molecules
    blocks = np.searchsorted(bounds, seen[: first_window // 2], side="right") - 1
    assert len(set(blocks.tolist())) <= 4
    assert seen[: first_window // 2] != sorted(seen[: first_window // 2])


@pytest.mark.parametrize("version", [1, 2])
def test_block_order_windows_by_version(data, version):
    """Version 2 deals every window one block from each stratum of neighbouring blocks (a window
    spans the whole file); version 1's windows are runs of a random permutation of the blocks."""
    from packedqdc.batching import block_bounds, block_order

    loader = PackedMemmapLoader(data, 8, seed=5, order_version=version, **BLOCK)
    bounds = block_bounds(loader.indices, loader.n_atoms, int(0.002 * 2**20 / 28))
    n_blocks = len(bounds) - 1
    n_windows = -(-n_blocks // 4)
    order, starts, cuts, spans = block_order(loader.indices, loader.dataset.offsets, bounds, 4,
                                             np.random.default_rng([5, 0]), version)
    assert sorted(order.tolist()) == list(range(loader.N)) and len(starts) == n_windows
    strata_seen = []
    for w in range(n_windows):
        mols = order[starts[w] : starts[w + 1] if w + 1 < n_windows else len(order)]
        blocks = np.unique(np.searchsorted(bounds, mols, side="right") - 1)
        assert 1 <= len(blocks) <= 4
        np.testing.assert_array_equal(np.sort(spans[cuts[w] : cuts[w + 1], 2]), bounds[blocks])
        strata_seen.append(sorted((blocks // n_windows).tolist()))
    if version == 2:
        assert all(strata == sorted(set(strata)) for strata in strata_seen)  # one block per stratum
        assert {len(x) for x in strata_seen} <= {-(-n_blocks // n_windows), -(-n_blocks // n_windows) - 1}
    else:
        assert any(strata != sorted(set(strata)) for strata in strata_seen)


def test_block_order_is_deterministic_resumable_and_shards_evenly(data):
    a = PackedMemmapLoader(data, 8, seed=9, **BLOCK)
    b = PackedMemmapLoader(data, 8, seed=9, **BLOCK)
    for _ in range(2):
        assert _mol_ids(a.batches(layout="packed")) == _mol_ids(b.batches(layout="packed"))
    full = _mol_ids(a.batches(layout="packed"))  # epoch 2
    c = PackedMemmapLoader(data, 8, seed=9, **BLOCK)
    c.restore({"seed": 9, "epoch": 2, "position": 0})
    it = c.batches(layout="packed", prefetch=0)
    head = [next(it) for _ in range(5)]
    state = c.state()
    it.close()
    d = PackedMemmapLoader(data, 8, seed=9, **BLOCK)
    d.restore(state)
    assert _mol_ids(head) + _mol_ids(d.batches(layout="packed")) == full
    shards = [PackedMemmapLoader(data, 8, seed=9, **BLOCK).shard(k, 3) for k in range(3)]
    for s in shards:
        s.restore({"seed": 9, "epoch": 2, "position": 0})
    parts = [_mol_ids(s.batches(layout="packed")) for s in shards]
    assert len({len(p) for p in parts}) == 1 and len(parts[0]) == len(full)
    for t in range(len(full)):  # the parts of step t are exactly the molecules of batch t
        assert sorted(i for p in parts for i in p[t]) == sorted(full[t])


def _evict(path):
    import os

    for f in path.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@pytest.mark.parametrize("order", ["molecule", "block"])
def test_batches_from_evicted_files_equal_the_warm_ones(tmp_path, order):
    """With the files dropped from the page cache (the advice given to the maps only changes how
    they are read back), every batch equals the one read warm."""
    path = write_dataset(tmp_path / "cold", n_mol=400, seed=11)
    kw = dict(order=order, block_mib=0.002, window_blocks=4) if order == "block" else dict(order=order)
    warm = [[_copy(b) for b in PackedMemmapLoader(path, 8, seed=2, **kw).batches(layout="packed")]]
    _evict(path)
    cold = [_copy(b) for b in PackedMemmapLoader(path, 8, seed=2, **kw).batches(layout="packed")]
    assert len(cold) == len(warm[0])
    for x, y in zip(warm[0], cold):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_auto_order_picks_by_data_size_against_available_memory(data, monkeypatch):
    import packedqdc.loader as loader_module

    loader = PackedMemmapLoader(data, 8)
    assert loader.order == "molecule" and "order=auto chose molecule order" in loader.order_note
    monkeypatch.setattr(loader_module, "available_memory", lambda: 1000)
    loader = PackedMemmapLoader(data, 8)
    assert loader.order == "block" and "chose block order" in loader.order_note
    with pytest.raises(ConfigError, match="order must be one of"):
        PackedMemmapLoader(data, 8, order="random")


def test_the_index_is_compact_and_gives_the_int64_results(data):
    """At scale the loader keeps atom counts as uint8, molecule indices and plans as int32, the
    offsets memory-mapped and the pair counts within a cutoff compact, and every result is the one
    the plain int64 formulas give: the split, the epoch's molecules and its greedy batches (order
    version 1: numpy's permutations, which a run saved by packedqdc 0.6 resumes with)."""
    loader = PackedMemmapLoader(data, 8, seed=4, order_version=1)
    N = loader.N
    assert loader.n_atoms.dtype == np.uint8 and not loader._offsets.flags.owndata
    np.testing.assert_array_equal(loader.n_atoms, np.diff(np.asarray(open_packed(data).offsets)))
    train, valid = split_loader(loader, 0.8)
    assert train.indices.dtype == valid.indices.dtype == np.int32
    perm = np.random.default_rng(4).permutation(N)
    n_train = int(round(0.8 * N))
    np.testing.assert_array_equal(train.indices, np.sort(perm[:n_train]))
    np.testing.assert_array_equal(valid.indices, np.sort(perm[n_train:]))
    scrambled = PackedMemmapLoader(data, 8, seed=4, order_version=1)
    scrambled.indices = np.random.default_rng(0).permutation(N)[: N // 2]  # not sorted: the sorting path
    part, _ = split_loader(scrambled, 0.5, seed=1)
    want = np.sort(scrambled.indices[np.random.default_rng(1).permutation(N // 2)[: int(round(0.5 * (N // 2)))]])
    np.testing.assert_array_equal(part.indices, want)

    plan = train._plan(train._spec("packed", None, None), 3)
    assert plan.mols.dtype == np.int32
    mols = train.indices.astype(np.int64)[np.random.default_rng([4, 3]).permutation(train.N)]
    np.testing.assert_array_equal(plan.mols, mols)
    A, M, P = max(s.A for s in plan.shapes) - 1, max(s.M for s in plan.shapes) - 1, max(s.P for s in plan.shapes)
    bounds, a, p, m = [0], 0, 0, 0
    for j, i in enumerate(mols.tolist()):
        n = int(loader.n_atoms[i])
        if m and (a + n > A or p + n * (n - 1) > P or m + 1 > M):
            bounds.append(j)
            a = p = m = 0
        a, p, m = a + n, p + n * (n - 1), m + 1
    assert plan.bounds.tolist() == bounds + [train.N]

    train.shapes(layout="packed", cutoff=2.0)
    assert train._pair_counts[2.0].dtype == np.uint8  # at most 14 * 13 pairs


def test_order_version_2_split_and_epochs_are_the_shuffle_modules(data):
    """Version 2 (the default) splits by ``split_positions`` and orders each epoch by ``shuffled``,
    both drawn from the same generators as version 1, on any indices (sorted or not)."""
    from packedqdc.shuffle import shuffled, split_positions

    loader = PackedMemmapLoader(data, 8, seed=4)
    assert loader.order_version == 2 and loader.window_blocks == 64
    N = loader.N
    train, valid = split_loader(loader, 0.8)
    want_train, want_valid = split_positions(N, int(round(0.8 * N)), np.random.default_rng(4))
    np.testing.assert_array_equal(train.indices, want_train)
    np.testing.assert_array_equal(valid.indices, want_valid)
    plan = train._plan(train._spec("packed", None, None), 3)
    np.testing.assert_array_equal(plan.mols, shuffled(train.indices, np.random.default_rng([4, 3])))
    scrambled = PackedMemmapLoader(data, 8, seed=4)
    scrambled.indices = np.random.default_rng(0).permutation(N)[: N // 2]
    part, rest = split_loader(scrambled, 0.5, seed=1)
    first, _ = split_positions(N // 2, int(round(0.5 * (N // 2))), np.random.default_rng(1))
    np.testing.assert_array_equal(part.indices, np.sort(scrambled.indices[first]))
    assert sorted(part.indices.tolist() + rest.indices.tolist()) == sorted(scrambled.indices.tolist())


@pytest.mark.parametrize("order", ["molecule", "block"])
def test_data_larger_than_memory_hands_mapped_pages_back_and_batches_stay_the_same(data, monkeypatch, order):
    """With the data files over half the available memory the loader hands its mapped pages back
    (``readahead.release``) as it goes: every ``RELEASE_BATCHES`` batches in molecule order, at
    every window in block order; the batches are those of a loader that keeps them."""
    import packedqdc.loader as loader_module

    kw = dict(order=order, **({"block_mib": 0.002, "window_blocks": 4} if order == "block" else {}))
    want = [_copy(b) for b in PackedMemmapLoader(data, 8, seed=6, **kw).batches(layout="packed")]
    calls = []
    real_release = loader_module.release
    monkeypatch.setattr(loader_module, "available_memory", lambda: 1000)
    monkeypatch.setattr(loader_module, "release", lambda ds: (calls.append(1), real_release(ds)))
    loader = PackedMemmapLoader(data, 8, seed=6, **kw)
    assert loader._release_every == loader_module.RELEASE_BATCHES
    got = [_copy(b) for b in loader.batches(layout="packed")]
    assert len(got) == len(want)
    for x, y in zip(want, got):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)
    assert len(calls) >= (2 if order == "block" else len(want) // loader_module.RELEASE_BATCHES)
