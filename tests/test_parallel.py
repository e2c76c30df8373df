"""Data parallelism: a sharded mesh run equals a one-device run; two jax.distributed processes agree.

The runs themselves happen in subprocesses (this file run as a script): XLA_FLAGS must be set before
JAX is imported, and jax.distributed can be initialised once per process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from packedqdc.errors import ConfigError, TrainingError
from packedqdc.parallel import DistributedConfig, check_device_count, slurm_present, validate_distributed

TIMEOUT_S = 120
N_MOLECULES = 32
STEPS = 4


# ---------------------------------------------------------------------------------------------
# stand-in model and data on the batch contract (run inside the subprocesses)


def _sub_batch(rng: np.random.Generator, mol_ids: np.ndarray, atoms: int = 16, slots: int = 4) -> dict:
    """One packed sub-batch of the contract: molecules of 3 atoms each, padded to static shapes."""
    n = 3
    Z = np.zeros(atoms, np.int32)
    R = np.zeros((atoms, 3), np.float32)
    seg = np.full(atoms, slots - 1, np.int32)
    mask = np.zeros(atoms, bool)
    E = np.zeros(slots, np.float32)
    mol_mask = np.zeros(slots, bool)
    mol_idx = np.full(slots, -1, np.int64)
    dst, src = [], []
    for slot, mol in enumerate(mol_ids):
        mrng = np.random.default_rng(int(mol))
        lo = slot * n
        Z[lo : lo + n] = mrng.integers(1, 4, n)
        R[lo : lo + n] = mrng.normal(size=(n, 3))
        seg[lo : lo + n] = slot
        mask[lo : lo + n] = True
        E[slot] = mrng.normal()
        mol_mask[slot] = True
        mol_idx[slot] = mol
        dst += [lo + i for i in range(n) for j in range(n) if i != j]
        src += [lo + j for i in range(n) for j in range(n) if i != j]
    pairs = atoms * 2
    pair_mask = np.zeros(pairs, bool)
    pair_mask[: len(dst)] = True
    pad = pairs - len(dst)
    return dict(
        Z=Z, R=R, atom_mask=mask, batch_segments=seg, E=E, mol_mask=mol_mask, mol_idx=mol_idx,
        dst_idx=np.array(dst + [0] * pad, np.int32), src_idx=np.array(src + [0] * pad, np.int32),
        pair_mask=pair_mask,
    )


def _global_batches(mol_order: np.ndarray, devices: int, per_sub: int = 4) -> list[dict]:
    """Global batches (leading axis ``devices``) over ``mol_order``, ``per_sub`` molecules each."""
    rng = np.random.default_rng(0)
    per_step = devices * per_sub
    out = []
    for start in range(0, len(mol_order), per_step):
        subs = [_sub_batch(rng, mol_order[s : s + per_sub]) for s in range(start, start + per_step, per_sub)]
        out.append({k: np.stack([s[k] for s in subs]) for k in subs[0]})
    return out


def _stand_in_step():
    """A jitted SGD step of a tiny pair-potential model: vmap error sums over D, global mean."""
    import jax
    import jax.numpy as jnp

    def energy_err(params, b):
        atomic = params["emb"][b["Z"]] * b["atom_mask"]
        d = b["R"][b["dst_idx"]] - b["R"][b["src_idx"]]
        r = jnp.sqrt(jnp.sum(d * d, -1) + 1e-9)
        pair = params["a"] * jnp.exp(-params["b"] * r) * b["pair_mask"]
        atomic = atomic + jax.ops.segment_sum(pair, b["dst_idx"], b["Z"].shape[0])
        pred = jax.ops.segment_sum(atomic, b["batch_segments"], b["E"].shape[0])
        err = jnp.where(b["mol_mask"], pred - b["E"], 0.0)
        return jnp.sum(err * err), jnp.sum(b["mol_mask"])

    def loss(params, batch):
        sq, n = jax.vmap(energy_err, in_axes=(None, 0))(params, batch)
        return jnp.sum(sq) / jnp.sum(n)

    def step(params, batch):
        value, grads = jax.value_and_grad(loss)(params, batch)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), value

    return step


def _init_params():
    import jax.numpy as jnp

    return {"emb": jnp.linspace(-0.5, 0.5, 4), "a": jnp.float32(0.3), "b": jnp.float32(1.0)}


def _run_mesh(out: str) -> None:
    """Same global batches through a 4-device and a 1-device placement; losses and params to out."""
    from packedqdc.parallel import make_placement

    batches = _global_batches(np.arange(N_MOLECULES), devices=4)
    result = {}
    for n in (4, 1):
        placement = make_placement(n)
        step = placement.jit(_stand_in_step())
        params = placement.replicate(_init_params())
        losses = []
        for b in batches:
            params, value = step(params, placement.put_batch(b))
            losses.append(float(value))
        assert params["emb"].sharding.mesh.devices.size == n
        result[n] = {"losses": losses, "emb": np.asarray(params["emb"]).tolist()}
    Path(out).write_text(json.dumps(result))


def _run_distributed(out: str, port: int, process_id: int) -> None:
    """One of two processes: join, read this process's half of each epoch, train, dump state."""
    from packedqdc.parallel import DistributedConfig, init_distributed, is_main_process, make_placement

    init_distributed(DistributedConfig(f"127.0.0.1:{port}", 2, process_id), timeout_s=60)
    import jax

    placement = make_placement()
    assert placement.num_devices == 2 and placement.num_local_devices == 1
    order = np.random.default_rng(7).permutation(N_MOLECULES)
    mine = order[process_id::2]
    step = placement.jit(_stand_in_step())
    params = placement.replicate(_init_params())
    seen: list[int] = []
    losses = []
    for b in _global_batches(mine, devices=1):
        seen += [int(i) for i in b["mol_idx"].ravel() if i >= 0]
        params, value = step(params, placement.put_batch(b))
        losses.append(float(value))
    emb = np.asarray(params["emb"].addressable_data(0))
    Path(out).write_text(json.dumps({"seen": seen, "losses": losses, "emb": emb.tolist(),
                                     "main": is_main_process()}))
    jax.distributed.shutdown()


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


def test_four_devices_match_one_device(tmp_path: Path) -> None:
    out = tmp_path / "mesh.json"
    proc = subprocess.run([sys.executable, __file__, "mesh", str(out)], env=_env(4),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    np.testing.assert_allclose(result["4"]["losses"], result["1"]["losses"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result["4"]["emb"], result["1"]["emb"], rtol=1e-5, atol=1e-6)
    assert result["4"]["losses"][-1] < result["4"]["losses"][0]


def test_two_processes_train_together(tmp_path: Path) -> None:
    port = _free_port()
    outs = [tmp_path / f"p{i}.json" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, __file__, "dist", str(outs[i]), str(port), str(i)],
                              env=_env(None), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        errs = [p.communicate(timeout=TIMEOUT_S)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-2000:] for e in errs)
    r0, r1 = (json.loads(o.read_text()) for o in outs)
    assert set(r0["seen"]).isdisjoint(r1["seen"])
    assert sorted(r0["seen"] + r1["seen"]) == list(range(N_MOLECULES))
    assert r0["losses"] == r1["losses"]
    assert r0["emb"] == r1["emb"] and len(r0["emb"]) == 4
    assert (r0["main"], r1["main"]) == (True, False)


def test_device_count_check() -> None:
    check_device_count(4, 4)
    with pytest.raises(TrainingError, match="2 device.*this run has 4"):
        check_device_count(2, 4, run="runs/x")


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


if __name__ == "__main__":
    if sys.argv[1] == "mesh":
        _run_mesh(sys.argv[2])
    else:
        _run_distributed(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
