"""Data parallelism with JAX's own machinery: a device mesh, sharded global batches, jax.distributed.

One training step consumes one *global batch*: a dict of arrays whose leading axis ``D`` holds one
packed sub-batch per device, every sub-batch of the same static shape (the batch contract of
``docs/architecture.md`` with a leading device axis, e.g. ``R`` of shape ``(D, A, 3)`` float32,
``E`` of shape ``(D, M)``). The leading axis is sharded over the mesh axis ``"data"``; parameters,
optimizer state and EMA are replicated. XLA inserts the collectives that sum the per-device error
sums, so a step over ``D`` devices computes the same numbers as the same step on one device.

Within a process, :func:`make_placement` builds the mesh over the first ``N`` local devices. Across
processes, :func:`init_distributed` joins them with ``jax.distributed`` (explicit coordinator flags,
or SLURM's variables through JAX's own cluster detection); every process then holds ``D_local``
sub-batches of each global batch and :meth:`Placement.put_batch` assembles the global array with
``jax.make_array_from_process_local_data``.

``jax.distributed.initialize`` must run before anything touches a JAX backend (``jax.devices()``,
``jax.numpy`` arrays, ...); :func:`init_distributed` therefore comes first in a program.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .errors import ConfigError, TrainingError

T = TypeVar("T")

DATA_AXIS = "data"
"""Name of the one mesh axis: the leading axis of every global batch is sharded over it."""

SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
"""Variables JAX's SLURM cluster detection reads (all set inside an ``srun`` step)."""

_COORDINATOR_RE = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})$")


@dataclass(frozen=True)
class DistributedConfig:
    """How this process joins a multi-process job; all ``None`` means "read SLURM's variables".

    Attributes:
        coordinator: ``HOST:PORT`` of process 0's coordination service.
        num_processes: number of processes in the job.
        process_id: rank of this process, in ``[0, num_processes)``.
    """

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    @property
    def explicit(self) -> bool:
        """True when any of the three flags was given."""
        return any(v is not None for v in (self.coordinator, self.num_processes, self.process_id))


def slurm_present(environ: Mapping[str, str] | None = None) -> bool:
    """True when the variables of an ``srun`` step that JAX's SLURM detection needs are all set."""
    env = os.environ if environ is None else environ
    return all(name in env for name in SLURM_VARIABLES)


def validate_distributed(config: DistributedConfig, environ: Mapping[str, str] | None = None) -> None:
    """Raise :class:`ConfigError` (one line) when ``config`` cannot start a distributed job.

    Explicit flags must come as a complete, consistent triple; without flags, SLURM's variables
    must be present.
    """
    if not config.explicit:
        if not slurm_present(environ):
            env = os.environ if environ is None else environ
            missing = ", ".join(name for name in SLURM_VARIABLES if name not in env)
            raise ConfigError(
                "--distributed needs --coordinator HOST:PORT --num-processes N --process-id I, "
                f"or an srun step (missing SLURM variables: {missing})"
            )
        return
    if None in (config.coordinator, config.num_processes, config.process_id):
        raise ConfigError("--coordinator, --num-processes and --process-id must be given together")
    assert config.coordinator is not None and config.num_processes is not None
    assert config.process_id is not None
    match = _COORDINATOR_RE.match(config.coordinator)
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise ConfigError(f"--coordinator: expected HOST:PORT, got {config.coordinator!r}")
    if config.num_processes < 1:
        raise ConfigError(f"--num-processes: must be >= 1, got {config.num_processes}")
    if not 0 <= config.process_id < config.num_processes:
        raise ConfigError(
            f"--process-id: must be in [0, {config.num_processes}), got {config.process_id}"
        )


def init_distributed(config: DistributedConfig, timeout_s: int = 300) -> None:
    """Join this process to a multi-process JAX job; call before any other JAX use.

    With explicit flags, process ``process_id`` connects to ``coordinator`` (process 0 serves it).
    Without flags, ``jax.distributed.initialize()`` reads SLURM's variables: coordinator = first
    host of ``SLURM_STEP_NODELIST`` on a port derived from ``SLURM_JOB_ID`` (or
    ``JAX_COORDINATOR_PORT``), ``SLURM_NTASKS`` processes, rank ``SLURM_PROCID``, and one GPU per
    task (``SLURM_LOCALID``) unless ``JAX_LOCAL_DEVICE_IDS`` lists the devices to use. Collectives
    across CPU processes use gloo.

    Raises:
        ConfigError: incomplete or inconsistent flags, or neither flags nor SLURM variables.
        TrainingError: the coordination service could not be reached in ``timeout_s``.
    """
    validate_distributed(config)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=config.coordinator,
            num_processes=config.num_processes,
            process_id=config.process_id,
            initialization_timeout=timeout_s,
        )
    except (RuntimeError, ValueError) as exc:
        where = config.coordinator or "the SLURM coordinator"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrainingError(f"jax.distributed could not join {where}: {first_line}") from exc


def is_main_process() -> bool:
    """True on process 0 of the job (the only one that prints progress, logs and metrics)."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Barrier: every process of the job waits here until all reached ``name`` (no-op alone)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def main_first(fn: Callable[[], T]) -> T:
    """Run ``fn`` on process 0, then on the others: for idempotent set-up (pack a cache, make a dir).

    The other processes find what process 0 created instead of racing it.
    """
    if jax.process_count() == 1:
        return fn()
    result = fn() if is_main_process() else None
    sync(f"packedqdc-main-first-{getattr(fn, '__name__', 'fn')}")
    return result if is_main_process() else fn()  # type: ignore[return-value]


def select_devices(num_local: int | None = None) -> list[jax.Device]:
    """The mesh devices: the first ``num_local`` local devices of every process, by process.

    Every process of a job must pass the same ``num_local`` (default: all its local devices).
    Devices are ordered by process, then local id, so process ``p`` owns rows
    ``[p * num_local, (p + 1) * num_local)`` of the leading axis of a global batch.

    Raises:
        ConfigError: ``num_local`` is below 1 or above the local device count.
    """
    local = jax.local_devices()
    n = len(local) if num_local is None else num_local
    if not 1 <= n <= len(local):
        raise ConfigError(f"--devices: must be in [1, {len(local)}] on this machine, got {n}")
    by_process: dict[int, list[jax.Device]] = {}
    for device in sorted(jax.devices(), key=lambda d: (d.process_index, d.id)):
        by_process.setdefault(device.process_index, []).append(device)
    return [d for p in sorted(by_process) for d in by_process[p][:n]]


@dataclass(frozen=True)
class Placement:
    """Where arrays live: a 1-D mesh over axis ``"data"`` and the two shardings used in training.

    Attributes:
        mesh: the device mesh, shape ``(num_devices,)``, axis ``"data"``.
        batch: sharding of a global batch leaf, leading axis split over ``"data"``.
        replicated: sharding of parameters, optimizer state and EMA (a full copy on every device).
    """

    mesh: Mesh
    batch: NamedSharding
    replicated: NamedSharding

    @property
    def num_devices(self) -> int:
        """Devices in the job: the size ``D`` of the leading axis of a global batch."""
        return int(self.mesh.devices.size)

    @property
    def layout(self) -> dict[str, int]:
        """``{"num_devices": D, "num_processes": P}``, stored with checkpoints (JSON-ready)."""
        processes = {d.process_index for d in self.mesh.devices.flat}
        return {"num_devices": self.num_devices, "num_processes": len(processes)}

    @property
    def num_local_devices(self) -> int:
        """Devices of this process: the sub-batches ``D_local`` each host batch holds."""
        return sum(1 for d in self.mesh.devices.flat if d.process_index == jax.process_index())

    def put_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Turn this process's host batch into the global batch, sharded over ``"data"``.

        Args:
            batch: arrays of shape ``(D_local, ...)``, the same keys, dtypes and trailing shapes on
                every process (e.g. ``R`` ``(D_local, A, 3)`` float32). ``D_local`` is a multiple of
                :attr:`num_local_devices` (normally equal: one sub-batch per device).

        Returns:
            jax.Arrays of shape ``(D_local * process_count, ...)``, same dtypes (as JAX
            canonicalises them: float64 becomes float32 unless x64 is enabled).
        """
        sizes = {np.shape(value)[0] if np.ndim(value) else 0 for value in batch.values()}
        d_local = sizes.pop() if len(sizes) == 1 else 0
        if d_local == 0 or d_local % self.num_local_devices:
            raise ConfigError(
                f"global batch: leading axes {sorted(sizes | {d_local})} are not one multiple of "
                f"the {self.num_local_devices} local device(s)"
            )
        if jax.process_count() == 1:
            return jax.device_put(dict(batch), self.batch)
        d_global = d_local * jax.process_count()
        return {
            key: jax.make_array_from_process_local_data(
                self.batch, np.asarray(value), (d_global, *np.shape(value)[1:])
            )
            for key, value in batch.items()
        }

    def jit(self, fn: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        """Compile ``fn(state, global_batch) -> outputs`` for this mesh.

        ``state`` (params, optimizer state, EMA, or a whole train state) is replicated, the global
        batch sharded over ``"data"``, every output replicated: XLA all-reduces what the batch
        axis sums (gradients, error sums). ``fn`` may itself be jitted; it is compiled once per
        shape class of the global batch.
        """
        return jax.jit(fn, in_shardings=(self.replicated, self.batch), out_shardings=self.replicated)

    def replicate(self, tree: Any) -> Any:
        """Place a pytree (params, optimizer state, EMA) as a full copy on every mesh device.

        In a multi-process job every process must pass the same values (same seed, same
        checkpoint), and this is checked; leaves already replicated on this mesh are kept.

        Raises:
            TrainingError: processes passed different values.
        """
        if jax.process_count() == 1:
            return jax.device_put(tree, self.replicated)
        from jax.experimental import multihost_utils

        leaves, treedef = jax.tree.flatten(tree)
        placed = [isinstance(x, jax.Array) and x.sharding == self.replicated for x in leaves]
        host = {str(i): np.asarray(x) for i, (x, done) in enumerate(zip(leaves, placed)) if not done}
        try:
            multihost_utils.assert_equal(host, "processes hold different values")
        except AssertionError as exc:
            raise TrainingError(f"replicating the training state: {str(exc).splitlines()[0]}") from None
        return jax.tree.unflatten(treedef, [
            x if done else self._replicated_array(host[str(i)])
            for i, (x, done) in enumerate(zip(leaves, placed))
        ])

    def _replicated_array(self, host: np.ndarray) -> jax.Array:
        """A host array, the same on every process, as a replicated global array."""
        return jax.make_array_from_callback(host.shape, self.replicated, lambda index: host[index])


def make_placement(num_local: int | None = None) -> Placement:
    """Build the mesh over the first ``num_local`` local devices of every process (default: all)."""
    devices = select_devices(num_local)
    mesh = Mesh(np.asarray(devices), (DATA_AXIS,))
    return Placement(
        mesh=mesh,
        batch=NamedSharding(mesh, PartitionSpec(DATA_AXIS)),
        replicated=NamedSharding(mesh, PartitionSpec()),
    )


def check_device_count(saved: Mapping[str, Any], placement: Placement, run: str = "the checkpoint") -> None:
    """Refuse to resume on other devices: the global batches and each process's shard depend on them.

    Args:
        saved: the checkpoint's :attr:`Placement.layout` (missing keys count as 1: a run of one
            device written before data parallelism).
        placement: this run's placement.

    Raises:
        TrainingError: one line naming both layouts and how to resume.
    """
    was = (int(saved.get("num_devices", 1)), int(saved.get("num_processes", 1)))
    now = (placement.num_devices, int(placement.layout["num_processes"]))
    if was != now:
        raise TrainingError(
            f"{run} was trained on {was[0]} device(s) in {was[1]} process(es), this run has {now[0]} "
            f"in {now[1]}: resume with the same --devices and --num-processes"
        )
