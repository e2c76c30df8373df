"""Data parallelism: a sharded mesh run equals a one-device run; two jax.distributed processes agree.

The runs themselves happen in subprocesses (this file run as a script): XLA_FLAGS must be set before
JAX is imported, and jax.distributed can be initialised once per process.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from packedqdc.errors import ConfigError, TrainingError
from packedqdc.parallel import (
    DistributedConfig,
    check_device_count,
    make_placement,
    slurm_present,
    validate_distributed,
)

TIMEOUT_S = 120


# ---------------------------------------------------------------------------------------------
# the real model, train step and loader on the bundled sample (run inside the subprocesses)

BUDGET = (96, 12, 1200)  # one fixed packed class (A, M, P): one compilation per placement
SUBSET = 128  # molecules of the distributed epoch


def _training(data: str, process_index: int = 0, process_count: int = 1):
    """(loader, reference, model, train step) of a tiny PhysNet; the loader is this process's shard."""
    from packedqdc.loader import PackedMemmapLoader
    from packedqdc.model.physnet import PhysNet
    from packedqdc.train.config import TrainConfig
    from packedqdc.train.reference import fit_reference_energies
    from packedqdc.train.step import loss_weights, make_train_step

    loader = PackedMemmapLoader(data, batch_size=8, seed=3, budgets=[BUDGET], prefetch=0)
    reference = fit_reference_energies(loader.dataset, loader.indices)
    loader = loader.shard(process_index, process_count)
    cfg = TrainConfig(features=16, num_iterations=1, num_basis=8, batch_size=8, learning_rate=1e-2)
    model = PhysNet(features=16, num_basis=8, num_iterations=1, cutoff=5.0, electrostatics=True, natoms=15)
    return loader, reference, model, cfg, make_train_step(model, cfg, loss_weights(cfg))


def _global_batches(loader, reference, devices: int, steps: int | None = None):
    """Prepared host global batches (leading axis ``devices``) and the molecule indices of each."""
    from packedqdc.train.step import prepare_global

    out = []
    for item in loader.stacked_batches(devices, layout="packed"):
        if np.ndim(item["Z"]) == 1:
            item = {k: np.asarray(v)[None] for k, v in item.items()}
        seen = [int(i) for i in np.asarray(item["mol_idx"]).ravel() if i >= 0]
        out.append((prepare_global(item, reference), seen))
        if steps is not None and len(out) == steps:
            break
    return out


def _initial_state(model, cfg, batch):
    import jax

    from packedqdc.model.physnet import init_params
    from packedqdc.train.optim import make_optimizer
    from packedqdc.train.state import create_state

    first = {k: v[0] for k, v in batch.items()}
    return create_state(init_params(model, jax.random.PRNGKey(0), first), make_optimizer(cfg), jax.random.PRNGKey(1))


def _flat_params(state) -> list[float]:
    leaves = [np.asarray(x.addressable_data(0)).ravel() for x in __import__("jax").tree.leaves(state.params)]
    return np.concatenate(leaves).astype(np.float64).tolist()


def _run_mesh(out: str, data: str) -> None:
    """A 4-device run over stacked_batches(4) and a 1-device run over batches(): same loader settings."""
    from packedqdc.parallel import make_placement

    result = {}
    for n in (4, 1):
        loader, reference, model, cfg, train_step = _training(data)
        batches = _global_batches(loader, reference, devices=n, steps=3)
        placement = make_placement(n)
        step = placement.jit(train_step)
        state = placement.replicate(_initial_state(model, cfg, batches[0][0]))
        losses = []
        for batch, _ in batches:
            state, sums = step(state, placement.put_batch(batch))
            losses.append(float(sums["loss"]))
        assert state.params is not None and placement.num_devices == n
        result[n] = {"losses": losses, "params": _flat_params(state), "seen": [sorted(m) for _, m in batches]}
    Path(out).write_text(json.dumps(result))


def _checkpoint_round_trip(placement, state, run_dir: Path):
    """A host-side state update (as the epoch end makes), saved by all processes and restored."""
    import jax.numpy as jnp

    from packedqdc.train.checkpoint import RunCheckpoints

    state = placement.replicate(state.replace(plateau_best=jnp.float32(1.5)))
    checkpoints = RunCheckpoints(run_dir)
    checkpoints.save("latest", state, placement.layout)
    restored, meta = checkpoints.restore("latest", state)
    checkpoints.close()
    assert meta == placement.layout and float(restored.plateau_best) == 1.5
    return restored


def _run_distributed(out: str, data: str, port: int, process_id: int) -> None:
    """One of two processes: join, train one epoch on this process's shard, dump what it saw."""
    from packedqdc.parallel import DistributedConfig, init_distributed, is_main_process, make_placement

    init_distributed(DistributedConfig(f"127.0.0.1:{port}", 2, process_id), timeout_s=60)
    placement = make_placement()
    assert placement.num_devices == 2 and placement.num_local_devices == 1
    loader, reference, model, cfg, train_step = _training(data, process_id, 2)
    loader.indices = np.arange(SUBSET)
    batches = _global_batches(loader, reference, devices=1)
    step = placement.jit(train_step)
    state = placement.replicate(_initial_state(model, cfg, batches[0][0]))
    seen: list[list[int]] = []
    losses = []
    for batch, mols in batches:
        seen.append(mols)
        state, sums = step(state, placement.put_batch(batch))
        losses.append(float(sums["loss"]))
    restored = _checkpoint_round_trip(placement, state, Path(out).parent / "run")
    Path(out).write_text(json.dumps({"seen": seen, "losses": losses, "params": _flat_params(state),
                                     "restored": _flat_params(restored), "main": is_main_process()}))
    __import__("jax").distributed.shutdown()


# ---------------------------------------------------------------------------------------------
# tests


def _env(devices: int | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}" if devices else ""
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The bundled sample, packed."""
    from packedqdc.data import SAMPLE_NPZ
    from packedqdc.pack import pack_npz

    target = tmp_path_factory.mktemp("parallel") / "sample"
    pack_npz(SAMPLE_NPZ, target)
    return str(target)


def test_four_devices_match_one_device(tmp_path: Path, sample: str) -> None:
    out = tmp_path / "mesh.json"
    proc = subprocess.run([sys.executable, __file__, "mesh", str(out), sample], env=_env(4),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["4"]["seen"] == result["1"]["seen"]  # each step: the same molecules, dealt over 4 devices
    np.testing.assert_allclose(result["4"]["losses"], result["1"]["losses"], rtol=1e-5)
    np.testing.assert_allclose(result["4"]["params"], result["1"]["params"], rtol=1e-4, atol=1e-5)


@pytest.mark.heavy
def test_two_processes_train_together(tmp_path: Path, sample: str) -> None:
    port = _free_port()
    outs = [tmp_path / f"p{i}.json" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, __file__, "dist", str(outs[i]), sample, str(port), str(i)],
                              env=_env(None), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        errs = [p.communicate(timeout=TIMEOUT_S)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-2000:] for e in errs)
    r0, r1 = (json.loads(o.read_text()) for o in outs)
    from packedqdc.loader import PackedMemmapLoader

    single = PackedMemmapLoader(sample, batch_size=8, seed=3, budgets=[BUDGET], prefetch=0)
    single.indices = np.arange(SUBSET)
    whole = [sorted(np.asarray(b["mol_idx"])[b["mol_mask"]].tolist()) for b in single.batches(layout="packed")]
    assert len(r0["seen"]) == len(r1["seen"]) == len(whole)
    for a, b, want in zip(r0["seen"], r1["seen"], whole):  # each step: halves of the one-process batch
        assert set(a).isdisjoint(b) and sorted(a + b) == want
    assert len(r0["losses"]) == len(r1["losses"]) >= 4
    assert r0["losses"] == r1["losses"]
    assert r0["params"] == r1["params"]
    assert r0["restored"] == r0["params"] and r1["restored"] == r1["params"]
    assert (r0["main"], r1["main"]) == (True, False)


def test_device_count_check() -> None:
    placement = make_placement(1)
    check_device_count({"num_devices": 1, "num_processes": 1}, placement)
    check_device_count({}, placement)
    with pytest.raises(TrainingError, match=r"runs/x was trained on 2 device\(s\) in 1 process\(es\), this run has 1 in 1"):
        check_device_count({"num_devices": 2, "num_processes": 1}, placement, run="runs/x")


@pytest.mark.parametrize(
    "config, match",
    [
        (DistributedConfig("127.0.0.1:1234", 2, None), "together"),
        (DistributedConfig("localhost", 2, 0), "HOST:PORT"),
        (DistributedConfig("host:99999", 2, 0), "HOST:PORT"),
        (DistributedConfig("host:1234", 2, 2), r"\[0, 2\)"),
        (DistributedConfig(), "SLURM"),
    ],
)
def test_distributed_config_errors(config: DistributedConfig, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        validate_distributed(config, environ={})


def test_slurm_variables_enable_auto_detection() -> None:
    env = {"SLURM_JOB_ID": "17", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_NTASKS": "8",
           "SLURM_PROCID": "3", "SLURM_LOCALID": "3"}
    assert slurm_present(env)
    validate_distributed(DistributedConfig(), environ=env)
    assert not slurm_present({k: v for k, v in env.items() if k != "SLURM_STEP_NODELIST"})


@pytest.mark.parametrize(
    "args, match",
    [
        (["--distributed"], "--distributed needs --name"),
        (["--distributed", "--name", "x"], "missing SLURM variables"),
        (["--name", "x", "--coordinator", "127.0.0.1:1", "--num-processes", "2"], "given together"),
        (["--name", "x", "--devices", "99"], r"--devices: must be in \[1, "),
    ],
)
def test_cli_parallel_flag_errors(args: list[str], match: str, tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from packedqdc.cli.app import app

    for name in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    result = CliRunner().invoke(app, ["train", "--runs-dir", str(tmp_path), *args])
    assert result.exit_code == 2
    assert re.search(match, " ".join(result.output.split()))


@pytest.mark.heavy
def test_cli_two_devices_follow_the_one_device_run(tmp_path: Path, sample: str) -> None:
    """`packedqdc train --devices 2` reproduces the 1-device run's metrics (a global batch of 15: odd on purpose)."""
    common = [sys.executable, "-m", "packedqdc", "train", "--data-path", sample, "--runs-dir", str(tmp_path),
              "--features", "16", "--num-iterations", "1", "--num-basis", "8", "--batch-size", "15",
              "--learning-rate", "3e-3", "--num-epochs", "2", "--seed", "1"]
    procs = {d: subprocess.Popen([*common, "--name", f"d{d}", "--devices", str(d)], env=_env(2),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for d in (1, 2)}
    try:
        errs = {d: p.communicate(timeout=TIMEOUT_S * 2)[1] for d, p in procs.items()}
    finally:
        for p in procs.values():
            p.kill()
    assert all(p.returncode == 0 for p in procs.values()), "\n".join(e[-2000:] for e in errs.values())
    rows = {}
    for d in (1, 2):
        header, *lines = (tmp_path / f"d{d}" / "metrics.csv").read_text().splitlines()
        rows[d] = [dict(zip(header.split(","), line.split(","))) for line in lines]
    assert len(rows[1]) == len(rows[2]) == 2
    for one, two in zip(rows[1], rows[2]):
        assert one["step"] == two["step"]
        for key in ("train_loss", "valid_loss", "valid_energy_mae", "valid_forces_mae", "valid_forces_rmse"):
            np.testing.assert_allclose(float(two[key]), float(one[key]), rtol=2e-4, err_msg=key)


if __name__ == "__main__":
    if sys.argv[1] == "mesh":
        _run_mesh(sys.argv[2], sys.argv[3])
    else:
        _run_distributed(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
