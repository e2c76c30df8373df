"""Load a trained run and predict energies and forces of new molecules.

    from packedqdc.train import Potential
    pot = Potential.load("runs/NAME")            # best checkpoint, EMA weights
    E, F = pot.predict(Z, R, Qtot=0.0)            # kcal/mol, (n, 3) kcal/mol/Å
    Es, Fs = pot.predict_batch([Z1, Z2], [R1, R2], [0.0, 1.0])
    out = pot.predict_properties([Z1, Z2], [R1, R2], [0.0, 1.0])  # + partial charges (e)
    calc = pot.calculator()                       # ASE calculator (eV, eV/Å), needs the ase extra

Energies are the model's residual plus the stored per-element reference energies, in float64.
Molecules are packed into batches whose atom/pair budgets are rounded up to powers of two, so a
handful of compiled shapes serve molecules of any size: one molecule of n atoms always gets the
shape (2^ceil(log2(n+1)), 2, 2^ceil(log2(n(n-1)))), so molecular dynamics or a geometry optimisation
compiles once. Elements the model was not trained on are refused (``ConfigError``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import jax
import numpy as np

from ..batching import pair_templates
from ..errors import ConfigError, TrainingError
from ..model.physnet import PhysNet, cutoff_pairs, energy_and_forces, init_params, with_coulomb_window
from .checkpoint import RunCheckpoints
from .config import TrainConfig
from .optim import make_optimizer
from .reference import ReferenceEnergies
from .session import build_model
from .state import TrainState, create_state

if TYPE_CHECKING:
    from ..ase import Calculator


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 1).bit_length()


def molecule_batch(Zs: Sequence[np.ndarray], Rs: Sequence[np.ndarray], Qtots: Sequence[float],
                   cutoff: float | None = None) -> dict[str, np.ndarray]:
    """Pack molecules into one batch of the contract, budgets rounded to 2^k.

    Args:
        Zs: per molecule (n_i,) int atomic numbers; Rs: (n_i, 3) float positions, Å; Qtots: e.
        cutoff: None: all ordered pairs; else only the pairs closer than ``cutoff`` Å (as the
            loader's cutoff pair lists; for a model on cutoff pairs, ``cutoff_pairs(model)``).
    Returns a batch with ``A``, ``M``, ``P`` powers of two (at least one padding atom and slot).
    """
    n = np.asarray([len(z) for z in Zs], dtype=np.int64)
    if n.size == 0 or (n < 1).any():
        raise ConfigError("predict: every molecule needs at least one atom")
    start, t_dst, t_src = pair_templates(int(n.max()))
    kept = None
    if cutoff is not None:  # per molecule, which of its template pairs are within the cutoff
        kept = []
        for k, r in zip(n, Rs):
            pos = np.asarray(r, np.float32).reshape(int(k), 3)
            d, s = t_dst[start[k]:start[k + 1]], t_src[start[k]:start[k + 1]]
            diff = pos[s] - pos[d]
            kept.append(np.flatnonzero(np.einsum("ij,ij->i", diff, diff) < np.float32(cutoff) ** 2))
        n_pairs = sum(x.size for x in kept)
    else:
        n_pairs = int((n * (n - 1)).sum())
    A, M, P = _pow2(n.sum() + 1), _pow2(n.size + 1), _pow2(max(n_pairs, 1))
    Z = np.zeros(A, np.int32)
    R = np.zeros((A, 3), np.float32)
    seg = np.full(A, M - 1, np.int32)
    dst = np.full(P, A - 1, np.int32)
    src = np.full(P, A - 1, np.int32)
    pair_mask = np.zeros(P, bool)
    a = p = 0
    for i, (z, r) in enumerate(zip(Zs, Rs)):
        k = int(n[i])
        pick = slice(None) if kept is None else kept[i]
        pair_dst, pair_src = t_dst[start[k]:start[k + 1]][pick], t_src[start[k]:start[k + 1]][pick]
        pc = pair_dst.size
        Z[a:a + k] = np.asarray(z, np.int32)
        R[a:a + k] = np.asarray(r, np.float32).reshape(k, 3)
        seg[a:a + k] = i
        dst[p:p + pc] = pair_dst + a
        src[p:p + pc] = pair_src + a
        pair_mask[p:p + pc] = True
        a, p = a + k, p + pc
    mol_mask = np.arange(M) < n.size
    qtot = np.zeros(M)
    qtot[:n.size] = np.asarray(Qtots, dtype=np.float64)
    return {"Z": Z, "R": R, "atom_mask": np.arange(A) < a, "batch_segments": seg,
            "Qtot": qtot, "N": np.where(mol_mask, np.pad(n, (0, M - n.size)), 0).astype(np.int32),
            "mol_mask": mol_mask, "dst_idx": dst, "src_idx": src, "pair_mask": pair_mask}


def load_run_state(run_dir: str | Path, which: str = "best"
                   ) -> tuple[PhysNet, TrainState, ReferenceEnergies, dict[str, Any]]:
    """(model, state, reference energies, checkpoint meta) of ``which`` ("best" or "latest")."""
    if which not in ("best", "latest"):
        raise ConfigError(f"checkpoint must be 'best' or 'latest', got {which!r}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: run directory does not exist")
    checkpoints = RunCheckpoints(run_dir, read_only=True)
    try:
        if checkpoints.latest_step(which) is None:
            raise TrainingError(f"{run_dir}: no '{which}' checkpoint (has an epoch completed?)")
        meta = checkpoints.read_meta(which)
        cfg = TrainConfig.from_dict(meta["config"])
        model = build_model(meta["model"])
        dummy = molecule_batch([np.array([1, 1])], [np.array([[0.0, 0, 0], [0.74, 0, 0]])], [0.0])
        params = init_params(model, jax.random.PRNGKey(0), dummy)
        template = create_state(params, make_optimizer(cfg), jax.random.PRNGKey(0))
        state, meta = checkpoints.restore(which, template)
    finally:
        checkpoints.close()
    return model, state, ReferenceEnergies.from_dict(meta["reference"]), meta


@dataclass(frozen=True)
class Predictions:
    """Model outputs of ``m`` molecules, in packedqdc's units.

    Attributes:
        energies: (m,) float64 total energies, kcal/mol (model + per-element reference energies).
        forces: per molecule (n_i, 3) float32, kcal/mol/Å.
        charges: per molecule (n_i,) float32 partial charges, e (PhysNet's corrected charges: they
            sum to the molecule's total charge).
    """

    energies: np.ndarray
    forces: list[np.ndarray]
    charges: list[np.ndarray]


@dataclass
class Potential:
    """A trained PhysNet with its reference energies: energies (kcal/mol) and forces (kcal/mol/Å)."""

    model: PhysNet
    params: Any
    reference: ReferenceEnergies
    meta: dict[str, Any]

    @classmethod
    def load(cls, run_dir: str | Path, which: str = "best") -> Potential:
        """The EMA weights of the run's ``best`` (default) or ``latest`` checkpoint."""
        model, state, reference, meta = load_run_state(run_dir, which)
        return cls(model=model, params=state.ema_params, reference=reference, meta=meta)

    def predict(self, Z: np.ndarray, R: np.ndarray, Qtot: float = 0.0) -> tuple[float, np.ndarray]:
        """One molecule: Z (n,) int, R (n, 3) Å, Qtot e -> (E kcal/mol, F (n, 3) kcal/mol/Å)."""
        energies, forces = self.predict_batch([Z], [R], [Qtot])
        return float(energies[0]), forces[0]

    def predict_batch(self, Zs: Sequence[np.ndarray], Rs: Sequence[np.ndarray],
                      Qtots: Sequence[float] | None = None, batch_size: int = 64
                      ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Many molecules -> (E (m,) float64 kcal/mol, list of F (n_i, 3) float32 kcal/mol/Å)."""
        out = self.predict_properties(Zs, Rs, Qtots, batch_size)
        return out.energies, out.forces

    def predict_properties(self, Zs: Sequence[np.ndarray], Rs: Sequence[np.ndarray],
                           Qtots: Sequence[float] | None = None, batch_size: int = 64) -> Predictions:
        """Energies, forces and partial charges of many molecules (Z (n_i,) int, R (n_i, 3) Å,
        Qtot e; default neutral), ``batch_size`` molecules per compiled call."""
        if len(Zs) != len(Rs):
            raise ConfigError(f"predict: {len(Zs)} Z arrays but {len(Rs)} R arrays")
        if batch_size < 1:
            raise ConfigError(f"predict: batch_size must be >= 1, got {batch_size}")
        qtots = [0.0] * len(Zs) if Qtots is None else list(Qtots)
        if len(qtots) != len(Zs):
            raise ConfigError(f"predict: {len(Zs)} molecules but {len(qtots)} total charges")
        for i, z in enumerate(Zs):
            self.reference.check_elements(z, where=f"predict: molecule {i}")
        energies: list[np.ndarray] = []
        forces: list[np.ndarray] = []
        charges: list[np.ndarray] = []
        for lo in range(0, len(Zs), batch_size):
            batch = molecule_batch(Zs[lo:lo + batch_size], Rs[lo:lo + batch_size], qtots[lo:lo + batch_size],
                                   cutoff=cutoff_pairs(self.model))
            e, f, q = self.predict_on_batch(batch)
            m = min(batch_size, len(Zs) - lo)
            energies.append(e[:m])
            seg = batch["batch_segments"]
            for i in range(m):
                atoms = batch["atom_mask"] & (seg == i)
                forces.append(f[atoms])
                charges.append(q[atoms])
        return Predictions(np.concatenate(energies) if energies else np.zeros(0), forces, charges)

    def predict_on_batch(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One batch of ``molecule_batch`` (elements not checked) -> (E (M,) float64 kcal/mol,
        F (A, 3) float32 kcal/mol/Å, q (A,) float32 e); padding slots hold zeros / reference only.

        Either pair list gives the same result for a model on cutoff pairs (its network sees nothing
        beyond the cutoff and its Coulomb term runs over every pair by itself); the Coulomb window
        grows to the batch's largest molecule when needed."""
        device_batch = dict(batch, Qtot=batch["Qtot"].astype(np.float32))
        model = with_coulomb_window(self.model, int(np.max(batch["N"], initial=1)))
        energy, forces, charges = _jitted_properties(model, self.params, device_batch)
        e_ref = self.reference.molecule_energies(batch["Z"], batch["batch_segments"], batch["Qtot"])
        return np.asarray(energy, np.float64) + e_ref, np.asarray(forces), np.asarray(charges)

    def calculator(self, charge: float | None = None) -> Calculator:
        """An ASE calculator of this potential (eV, eV/Å, e); needs the ``ase`` extra.

        ``charge``: total charge (e) of molecules whose ``atoms.info`` has no ``"charge"``.
        """
        from ..ase import Calculator

        return Calculator(self, charge=charge)


def energy_forces_charges(model: PhysNet, params: Any, batch: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(energy (M,) kcal/mol, forces (A, 3) kcal/mol/Å, corrected charges (A,) e) of a batch, without
    reference energies; pure, jit with the model static."""
    energy, forces, aux = energy_and_forces(model, params, batch)
    return energy, forces, aux["charges"]


_jitted_properties = jax.jit(energy_forces_charges, static_argnums=0)
