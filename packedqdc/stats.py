"""Size and padding statistics of a packed directory (``packedqdc stats``).

Works from the atom counts (one byte per molecule below 256 atoms, read from the index in chunks,
``packedqdc.index.atom_counts``) and streams ``Z``, ``E`` and ``F`` in chunks, so memory stays
bounded on large datasets. The padding figures use the loader's own planning code
(``packedqdc.batching``), so they are what training will see in epoch 0; above
``EFFICIENCY_SAMPLE`` molecules they come from a seeded uniform sample of that many.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .batching import all_pair_counts, design_budgets, packed_plan, padded_plan
from .index import CHUNK, atom_counts
from .readahead import chunks
from .elements import MAX_Z, element_histogram, symbol
from .errors import FormatError
from .finite import all_finite
from .format import Z_FILE, open_packed

DEFAULT_SWEEP = (256, 1024, 4096, 8192, 32768, 131072)
#: above this many molecules, slot efficiencies are computed on a uniform sample of about this many
EFFICIENCY_SAMPLE = 1 << 22
_SAMPLE_STREAM = 0x5A3B1E  # rng stream of that sample


def _stream_range(array: np.ndarray, chunk: int) -> dict[str, float] | None:
    """min, max, mean, std and max |x| of the finite values of ``array``, read ``chunk`` rows at a
    time (float64 sums), and ``non_finite``: how many values are NaN or inf (0 in a valid directory).
    None when ``array`` is absent, empty or holds no finite value."""
    if array is None or array.shape[0] == 0:
        return None
    lo, hi, total, total2, count, absmax, bad = np.inf, -np.inf, 0.0, 0.0, 0, 0.0, 0
    for part in chunks(array, chunk):
        part = np.asarray(part, dtype=np.float64)
        if not all_finite(part):
            finite = np.isfinite(part)
            bad += int(part.size - finite.sum())
            part = part[finite]
            if part.size == 0:
                continue
        lo, hi = min(lo, float(part.min())), max(hi, float(part.max()))
        total += float(part.sum())
        total2 += float(np.square(part).sum())
        count += part.size
        absmax = max(absmax, float(np.abs(part).max()))
    if count == 0:
        return None
    mean = total / count
    return {"min": lo, "max": hi, "mean": mean, "std": float(np.sqrt(max(total2 / count - mean * mean, 0.0))),
            "max_abs": absmax, "non_finite": bad}


def _element_counts(ds: Any, chunk: int) -> dict[str, int]:
    """Atoms per element symbol, counted from ``Z`` (never taken from meta.json unchecked)."""
    counts = np.zeros(MAX_Z + 2, dtype=np.int64)
    for part in chunks(ds.Z, chunk):
        counts += element_histogram(part)
    invalid = int(counts[0] + counts[MAX_Z + 1])
    if invalid:
        raise FormatError(f"{ds.path / Z_FILE}: {invalid} atomic number(s) outside 1..{MAX_Z}; "
                          f"run 'packedqdc validate {ds.path}' for the molecules")
    return {symbol(z): int(c) for z, c in enumerate(counts[: MAX_Z + 1]) if c and z > 0}


def efficiency_sample(sizes: np.ndarray, seed: int, target: int = EFFICIENCY_SAMPLE) -> np.ndarray:
    """``sizes`` itself when it has at most ``target`` molecules, else a seeded uniform sample of about
    ``target`` of them (each kept with probability ``target / N``, drawn chunk by chunk).

    The slot efficiencies of a layout are averages over batches of random molecules: a few million
    molecules give them to three digits, and the plans of a sample need memory for the sample only.
    """
    n = sizes.shape[0]
    if n <= target:
        return sizes
    rng = np.random.default_rng([seed, _SAMPLE_STREAM])
    keep = target / n
    return np.concatenate([sizes[lo : lo + CHUNK][rng.random(min(CHUNK, n - lo)) < keep] for lo in range(0, n, CHUNK)])


def padded_efficiency(n_atoms: np.ndarray, batch_size: int, num_atoms: int | None, bucket_size: int, seed: int) -> dict[str, Any]:
    """Slot efficiency of the seed's padded layout in epoch 0.

    ``num_atoms`` fixed: one shape, every batch ``batch_size x num_atoms``. ``num_atoms`` None: the
    seed's behaviour, each batch padded to its own largest molecule (and the last batch smaller),
    so the number of distinct shapes is what XLA would compile.
    """
    idx = np.arange(n_atoms.shape[0], dtype=np.int32)
    na_max = int(n_atoms.max())
    plan = padded_plan(idx, n_atoms, batch_size, num_atoms or na_max, bucket_size, np.random.default_rng([seed, 0]))
    sizes = n_atoms[plan.mols].astype(np.int64)
    atoms, pairs = int(sizes.sum()), int(all_pair_counts(sizes).sum())
    if num_atoms is not None:
        if na_max > num_atoms:
            first = int(np.flatnonzero(n_atoms > num_atoms)[0])
            return {"fits": False, "first_too_large": first, "its_atoms": int(n_atoms[first])}
        nb = plan.n_batches
        return {
            "fits": True,
            "atom_efficiency": atoms / (nb * batch_size * num_atoms),
            "pair_efficiency": pairs / max(nb * batch_size * num_atoms * (num_atoms - 1), 1),
            "shapes": 1,
            "batches": nb,
        }
    per_batch_max = np.maximum.reduceat(sizes, plan.bounds[:-1]) if sizes.size else np.zeros(0, np.int64)
    counts = np.diff(plan.bounds)
    return {
        "fits": True,
        "atom_efficiency": atoms / float((per_batch_max * counts).sum()),
        "pair_efficiency": pairs / max(float((per_batch_max * (per_batch_max - 1) * counts).sum()), 1.0),
        "shapes": len(set(zip(per_batch_max.tolist(), counts.tolist()))),
        "batches": plan.n_batches,
    }


def packed_efficiency(n_atoms: np.ndarray, batch_size: int, seed: int) -> dict[str, Any]:
    """Slot efficiency, shapes and budgets of the packed layout (all pairs) in epoch 0."""
    sizes = n_atoms.astype(np.int64)
    pairs = all_pair_counts(sizes)
    idx = np.arange(sizes.shape[0], dtype=np.int32)
    budgets = design_budgets(idx, n_atoms, None, batch_size, seed)
    plan = packed_plan(idx, n_atoms, None, budgets, np.random.default_rng([seed, 0]))
    used = np.asarray([plan.shapes[s] for s in plan.shape_ids], dtype=np.int64).reshape(-1, 3)
    return {
        "atom_efficiency": float(sizes.sum() / used[:, 0].sum()),
        "pair_efficiency": float(pairs.sum() / max(used[:, 2].sum(), 1)),
        "shapes": int(np.unique(plan.shape_ids).size),
        "batches": plan.n_batches,
        "mean_molecules_per_batch": float(sizes.shape[0] / max(plan.n_batches, 1)),
        "budgets": [list(b) for b in plan.shapes],
    }


def dataset_stats(
    path: str | os.PathLike[str],
    batch_size: int = 32,
    num_atoms: int = 60,
    bucket_size: int = 8192,
    sweep: tuple[int, ...] = DEFAULT_SWEEP,
    seed: int = 0,
    chunk: int = 1 << 20,
) -> dict[str, Any]:
    """All statistics of ``packedqdc stats`` as a JSON-able dict.

    Raises:
        FormatError: the directory cannot be opened.
    """
    ds = open_packed(path)
    all_sizes = atom_counts(ds)  # compact (uint8 below 256 atoms), checked against the offsets
    histogram = np.bincount(all_sizes)
    sizes = np.flatnonzero(histogram)
    counts = histogram[sizes]
    out: dict[str, Any] = {
        "path": str(ds.path),
        "n_molecules": ds.n_molecules,
        "n_atoms_total": ds.n_atoms_total,
        "atoms_per_molecule": {
            "min": int(sizes[0]) if sizes.size else 0,
            "max": int(sizes[-1]) if sizes.size else 0,
            "mean": float(ds.n_atoms_total / ds.n_molecules) if ds.n_molecules else 0.0,
        },
        "size_histogram": {int(s): int(c) for s, c in zip(sizes, counts)},
        "elements": _element_counts(ds, chunk),
        "energy_kcal_mol": _stream_range(ds.E, chunk),
        "forces_kcal_mol_A": _stream_range(ds.F, chunk // 3) if ds.F is not None else None,
        "settings": {"batch_size": batch_size, "num_atoms": num_atoms, "bucket_size": bucket_size, "seed": seed},
    }
    if ds.n_molecules == 0:
        return out
    n_atoms = efficiency_sample(all_sizes, seed)
    if n_atoms.shape[0] < ds.n_molecules:
        out["efficiency_sample"] = int(n_atoms.shape[0])  # molecules the efficiencies below come from
    out["padded"] = padded_efficiency(n_atoms, batch_size, num_atoms, bucket_size, seed)
    if not out["padded"]["fits"]:  # name the dataset's first molecule, not the sample's
        first = int(np.argmax(all_sizes > num_atoms))
        out["padded"].update(first_too_large=first, its_atoms=int(all_sizes[first]))
    out["packed"] = packed_efficiency(n_atoms, batch_size, seed)
    out["bucket_sweep"] = [
        {"bucket_size": b, **padded_efficiency(n_atoms, batch_size, None, b, seed)}
        for b in sorted(set(sweep) | {bucket_size})
    ]
    out["recommendation"] = _recommend(out)
    return out


def _recommend(s: dict[str, Any]) -> str:
    packed, padded, max_n = s["packed"], s["padded"], s["atoms_per_molecule"]["max"]
    text = (
        f"use layout='packed': {packed['atom_efficiency']:.0%} of atom slots and "
        f"{packed['pair_efficiency']:.0%} of pair slots real, {packed['shapes']} shapes"
    )
    if not padded["fits"]:
        return text + f"; padded needs num_atoms >= {max_n} (molecule {padded['first_too_large']} has {padded['its_atoms']} atoms)"
    if s["settings"]["num_atoms"] > max_n:
        text += (
            f"; if you keep the padded layout, num_atoms={max_n} (the largest molecule) "
            f"wastes fewer slots than num_atoms={s['settings']['num_atoms']}"
        )
    return text


def plot_stats(stats: dict[str, Any], file: str | os.PathLike[str]) -> None:
    """Size histogram and efficiency curves to ``file`` (PNG). Needs matplotlib (extra ``plot``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    hist = stats["size_histogram"]
    ax1.bar(list(hist), list(hist.values()), width=1.0)
    ax1.set(xlabel="atoms per molecule", ylabel="molecules", title="size histogram")
    sweep = stats.get("bucket_sweep", [])
    xs = [row["bucket_size"] for row in sweep]
    ax2.plot(xs, [row["atom_efficiency"] for row in sweep], "o-", label="padded per batch: atoms")
    ax2.plot(xs, [row["pair_efficiency"] for row in sweep], "s-", label="padded per batch: pairs")
    for key, style in (("packed", "-"), ("padded", ":")):
        if stats.get(key, {}).get("atom_efficiency") is not None:
            ax2.axhline(stats[key]["atom_efficiency"], ls=style, color="C2", label=f"{key}: atoms")
            ax2.axhline(stats[key]["pair_efficiency"], ls=style, color="C3", label=f"{key}: pairs")
    ax2.set(xscale="log", xlabel="bucket size", ylabel="real / all slots", ylim=(0, 1.05), title="slot efficiency")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)
