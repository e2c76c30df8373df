"""Shared fixtures: small seeded molecule sets in the PhysNet padded layout, and packed dirs of them."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from packedqdc.data import SAMPLE_NPZ
from packedqdc.pack import pack_npz

PaddedFactory = Callable[..., dict[str, np.ndarray]]


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """One JAX compilation cache for the session, in this process and in the commands and processes
    the tests start (``PACKEDQDC_COMPILATION_CACHE``): the many tiny runs of the suite compile the
    same programs, and a hit gives the same executable as a compilation."""
    from packedqdc.compile_cache import ENV, enable_compilation_cache

    directory = tmp_path_factory.mktemp("jax-cache")
    os.environ[ENV] = str(directory)
    return enable_compilation_cache()


@pytest.fixture
def make_padded() -> PaddedFactory:
    """Factory of PhysNet-layout arrays: R (m, A, 3) f32, Z (m, A) i32, N (m,) i32, E (m,) f64,
    F (m, A, 3) f32, Q (m,) f64 integral; padding atoms are zero. Seeded, so calls are repeatable."""

    def make(m: int = 40, width: int = 9, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        n = rng.integers(1, width + 1, size=m).astype(np.int32)
        real = np.arange(width) < n[:, None]
        z = np.where(real, rng.integers(1, 10, size=(m, width)), 0).astype(np.int32)
        r = np.where(real[..., None], rng.normal(0, 2, size=(m, width, 3)), 0).astype(np.float32)
        f = np.where(real[..., None], rng.normal(0, 30, size=(m, width, 3)), 0).astype(np.float32)
        e = rng.normal(-5000, 100, size=m)
        q = rng.integers(-1, 2, size=m).astype(np.float64)
        return {"R": r, "Z": z, "N": n, "E": e, "F": f, "Q": q}

    return make


@pytest.fixture
def packed_dir(tmp_path: Path, make_padded: PaddedFactory) -> Path:
    """A valid packed directory of 40 molecules with forces and charges."""
    npz = tmp_path / "src.npz"
    np.savez(npz, **make_padded())
    return pack_npz(npz, tmp_path / "packed").path


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled sample (504 xTB conformers with forces and charges), packed once per session."""
    return pack_npz(SAMPLE_NPZ, tmp_path_factory.mktemp("data") / "sample").path


@pytest.fixture(scope="session")
def trained_run(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny PhysNet (features 16, 2 modules) trained 30 epochs on the sample (padded layout: one
    compiled train shape): the run directory. Shared by the calculator, predict and plot tests."""
    from packedqdc.train import TrainConfig, fit, start_run

    runs = tmp_path_factory.mktemp("runs")
    trainer = start_run(TrainConfig(data_path=str(sample_dir), runs_dir=str(runs), name="tiny", num_epochs=30,
                                    features=16, num_iterations=2, num_basis=16, batch_size=16, layout="padded", num_atoms=15,
                                    learning_rate=3e-3, valid_fraction=0.2))
    fit(trainer)
    trainer.close()
    return trainer.run_dir
