"""``packedqdc train``: flags -> ``TrainConfig`` -> ``start_run``/``resume_run`` -> ``fit``, with a
rich progress bar per epoch and a metrics line after it. Each option also accepts the seed's
underscore spelling (``--data_path`` as well as ``--data-path``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..errors import ConfigError
from ..train.config import TrainConfig
from .app import app, console, err_console, handles_errors

if TYPE_CHECKING:  # JAX loads only when a run starts, so the other commands start fast
    from ..parallel import DistributedConfig, Placement


def _default(field: str) -> Any:
    """``TrainConfig``'s default for ``field``: the one place training defaults are defined."""
    return TrainConfig.__dataclass_fields__[field].default


def _opt(default: Any, name: str, help: str) -> Any:
    """A Typer option spelled ``--a-b`` and ``--a_b``."""
    names = [f"--{name}"] + ([f"--{name.replace('-', '_')}"] if "-" in name else [])
    return typer.Option(default, *names, help=help)


@app.command("train")
@handles_errors
def train(
    data_path: Optional[Path] = _opt(None, "data-path", "Packed directory \\[default: the bundled sample, packed into RUNS_DIR/.cache]."),
    name: Optional[str] = _opt(None, "name", "Run name: outputs go to RUNS_DIR/NAME \\[default: physnet-DATE-TIME]."),
    runs_dir: Path = _opt(Path("runs"), "runs-dir", "Directory of runs."),
    resume: bool = _opt(False, "resume", "Continue RUNS_DIR/NAME from its latest checkpoint (its saved options apply; --num-epochs and --max-time may change)."),
    batch_size: int = _opt(_default("batch_size"), "batch-size", "Molecules per step over all devices, the global batch (packed layout: on average)."),
    num_epochs: Optional[int] = _opt(None, "num-epochs", f"Epochs to train in all \\[default: {_default('num_epochs')}]."),
    learning_rate: float = _opt(_default("learning_rate"), "learning-rate", "Initial learning rate (AMSGrad)."),
    num_atoms: int = _opt(_default("num_atoms"), "num-atoms", "Padded layout: atom slots per molecule (largest molecule allowed)."),
    bucket_size: int = _opt(_default("bucket_size"), "bucket-size", "Padded layout: molecules sorted by size within buckets of this many."),
    layout: str = _opt(_default("layout"), "layout", "Batch layout: packed or padded."),
    order: str = _opt(_default("order"), "order", "Epoch order: molecule (a full shuffle each epoch: data in memory), block (shuffled contiguous blocks mixed in a shuffle buffer: sequential reads, for data larger than memory) or auto (block when the data files exceed half the available memory)."),
    loader_threads: int = _opt(_default("loader_threads"), "loader-threads", "Threads that assemble each batch (packedqdc's own; used only while faster than one)."),
    valid_fraction: float = _opt(_default("valid_fraction"), "valid-fraction", "Fraction of molecules held out for validation."),
    seed: int = _opt(_default("seed"), "seed", "Seed of the split, the epoch order and the initial weights."),
    features: int = _opt(_default("features"), "features", "PhysNet feature width."),
    num_iterations: int = _opt(_default("num_iterations"), "num-iterations", "PhysNet modules (interaction + output blocks)."),
    num_basis: int = _opt(_default("num_basis"), "num-basis", "Radial basis functions."),
    cutoff: float = _opt(_default("cutoff"), "cutoff", "Short-range cutoff, Å."),
    electrostatics: Optional[bool] = typer.Option(
        None, "--electrostatics/--no-electrostatics",
        help="Shielded Coulomb energy of the atomic charges \\[default: on iff the training data has charged molecules]."),
    loss: str = _opt(_default("loss"), "loss", "Error form: mae (PhysNet) or mse."),
    energy_weight: float = _opt(_default("energy_weight"), "energy-weight", "Weight of the energy term."),
    forces_weight: float = _opt(_default("forces_weight"), "forces-weight", "Weight of the forces term (PhysNet's)."),
    charge_weight: float = _opt(_default("charge_weight"), "charge-weight", "Weight of the total-charge term (PhysNet's)."),
    nh_weight: float = _opt(_default("nh_weight"), "nh-weight", "Weight of the non-hierarchicality penalty."),
    lr_schedule: str = _opt(_default("lr_schedule"), "lr-schedule", "exponential (PhysNet) or plateau."),
    decay_rate: float = _opt(_default("decay_rate"), "decay-rate", "Exponential schedule: factor per --decay-steps."),
    decay_steps: int = _opt(_default("decay_steps"), "decay-steps", "Exponential schedule: steps per --decay-rate factor."),
    plateau_patience: int = _opt(_default("plateau_patience"), "plateau-patience", "Plateau schedule: epochs without improvement before a cut."),
    plateau_factor: float = _opt(_default("plateau_factor"), "plateau-factor", "Plateau schedule: factor of each cut."),
    clip_norm: float = _opt(_default("clip_norm"), "clip-norm", "Global-norm gradient clipping."),
    ema_decay: float = _opt(_default("ema_decay"), "ema-decay", "Decay of the weight average (with warm-up)."),
    max_time: Optional[float] = _opt(None, "max-time", "Stop cleanly with a checkpoint after this many seconds."),
    devices: Optional[int] = _opt(None, "devices", "Train on the first N local devices, one sub-batch each \\[default: all]."),
    distributed: bool = _opt(False, "distributed", "Join a multi-process job (jax.distributed): the three flags below, or SLURM's variables."),
    coordinator: Optional[str] = _opt(None, "coordinator", "HOST:PORT of process 0 (with --distributed)."),
    num_processes: Optional[int] = _opt(None, "num-processes", "Processes in the job (with --distributed)."),
    process_id: Optional[int] = _opt(None, "process-id", "Rank of this process, 0 to N-1 (with --distributed)."),
) -> None:
    """Train PhysNet on a packed directory; outputs in RUNS_DIR/NAME (config.json, metrics.csv, checkpoints)."""
    from ..parallel import DistributedConfig

    placement = _placement(devices, distributed, DistributedConfig(coordinator, num_processes, process_id), name)
    from ..train import Callbacks, fit, resume_run, start_run

    if resume:
        if name is None:
            raise ConfigError("--resume needs --name of the run to continue")
        run_dir = runs_dir / name
        if not run_dir.is_dir():
            raise ConfigError(f"{run_dir}: no such run to resume")
        trainer = resume_run(run_dir, num_epochs=num_epochs, max_time=max_time, placement=placement)
        console.print(f"resuming [bold]{run_dir}[/] at epoch {int(trainer.state.epoch)}, step {int(trainer.state.step)}")
    else:
        if data_path is not None and not data_path.exists():
            raise ConfigError(f"{data_path}: --data-path does not exist")
        cfg = TrainConfig(
            data_path=None if data_path is None else str(data_path), name=name, runs_dir=str(runs_dir),
            batch_size=batch_size, num_epochs=_default("num_epochs") if num_epochs is None else num_epochs,
            learning_rate=learning_rate, num_atoms=num_atoms, bucket_size=bucket_size, layout=layout,
            valid_fraction=valid_fraction, seed=seed, features=features, num_iterations=num_iterations,
            num_basis=num_basis, cutoff=cutoff, electrostatics=electrostatics, loss=loss,
            energy_weight=energy_weight, forces_weight=forces_weight, charge_weight=charge_weight,
            nh_weight=nh_weight, lr_schedule=lr_schedule, decay_rate=decay_rate, decay_steps=decay_steps,
            plateau_patience=plateau_patience, plateau_factor=plateau_factor, clip_norm=clip_norm,
            ema_decay=ema_decay, max_time=max_time, loader_threads=loader_threads, order=order,
        )
        trainer = start_run(cfg, placement)
        ref = trainer.reference
        console.print(f"run [bold]{trainer.run_dir}[/]: {trainer.train_data.loader.N} train / "
                      f"{trainer.valid_data.loader.N} valid molecules from {trainer.cfg.data_path}; "
                      f"electrostatics {'on' if trainer.cfg.electrostatics else 'off'}; reference residual "
                      f"{ref.per_atom_mean:.3f} ± {ref.per_atom_std:.3f} kcal/mol/atom")
        console.print(f"loader: {trainer.train_data.loader.order_note}")
    with _progress() as progress:
        task = progress.add_task("epoch", total=None, visible=False)

        def epoch_start(epoch: int, steps: int) -> None:
            progress.reset(task, total=steps, description=f"epoch {epoch + 1}/{trainer.cfg.num_epochs}", visible=True)

        result = fit(trainer, Callbacks(
            epoch_start=epoch_start,
            step=lambda n: progress.advance(task),
            epoch_end=lambda row: console.print(_epoch_line(row), soft_wrap=True),
            message=lambda text: console.print(text),
        ))
    trainer.checkpoints.close()
    console.print(f"{result.reason}: epoch {result.epoch}, step {result.step}, best valid loss "
                  f"{result.best_valid_loss:.4g}; outputs in {trainer.run_dir}")


def _placement(devices: Optional[int], distributed: bool, job: DistributedConfig, name: Optional[str]) -> Placement:
    """Join the job if asked (before any other JAX use), build the device mesh, and let only
    process 0 print."""
    from ..parallel import init_distributed, is_main_process, make_placement

    if distributed or job.explicit:
        if name is None:
            raise ConfigError("--distributed needs --name: every process must write the same run")
        init_distributed(job)
    placement = make_placement(devices)
    console.quiet = not is_main_process()
    return placement


def _progress() -> Progress:
    from ..parallel import is_main_process

    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("steps"), TimeElapsedColumn(), console=err_console, transient=True,
                    disable=not err_console.is_terminal or not is_main_process())


def _epoch_line(row: dict[str, Any]) -> str:
    return (f"epoch {row['epoch']:>4}  loss {row['train_loss']:.4g}/{row['valid_loss']:.4g}  "
            f"E MAE {row['train_energy_mae']:.3f}/{row['valid_energy_mae']:.3f} "
            f"RMSE {row['train_energy_rmse']:.3f}/{row['valid_energy_rmse']:.3f} kcal/mol "
            f"(per atom MAE {row['valid_energy_mae_per_atom']:.3f})  "
            f"F MAE {row['train_forces_mae']:.3f}/{row['valid_forces_mae']:.3f} "
            f"RMSE {row['train_forces_rmse']:.3f}/{row['valid_forces_rmse']:.3f} kcal/mol/Å  "
            f"lr {row['lr']:.3g}  {row['train_mol_per_s']:.0f} mol/s" + ("  *best" if row["best"] else ""))
