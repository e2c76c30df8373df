"""``packedqdc train``: flags -> ``TrainConfig`` -> ``start_run``/``resume_run`` -> ``fit``, with a
rich progress bar per epoch and a metrics line after it. The flags are generated from the fields of
``TrainConfig`` (``config_flags``), each also in the seed's underscore spelling (``--data_path`` as well
as ``--data-path``), plus the run-control and device flags of ``RUN_PARAMETERS``."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..errors import ConfigError
from ..train.config import TrainConfig, check_run_name
from .app import SIGNAL_EXIT, GracefulStop, app, console, err_console, handles_errors
from .config_flags import config_parameters, option_parameter, with_parameters

if TYPE_CHECKING:  # JAX loads only when a run starts, so the other commands start fast
    from ..parallel import DistributedConfig, Placement


#: options a resumed run takes from the command line; every other one comes from the run itself
RESUME_CONFIG_OPTIONS = frozenset(f.name for f in fields(TrainConfig) if f.metadata["on_resume"])
#: flags of ``packedqdc train`` that are not ``TrainConfig`` fields (run control and devices)
RUN_PARAMETERS = [
    option_parameter("resume", bool, False, "Continue RUNS_DIR/NAME from its latest checkpoint (its saved "
                     "options apply; --num-epochs, --max-time and --data-path, to a copy of the same dataset, "
                     "may change).", "Run"),
    option_parameter("devices", Optional[int], None, "Train on the first N local devices, one sub-batch each "
                     "[default: all].", "Devices"),
    option_parameter("distributed", bool, False, "Join a multi-process job (jax.distributed): the three flags "
                     "below, or SLURM's variables.", "Devices"),
    option_parameter("coordinator", Optional[str], None, "HOST:PORT of process 0 (with --distributed).", "Devices"),
    option_parameter("num_processes", Optional[int], None, "Processes in the job (with --distributed).", "Devices"),
    option_parameter("process_id", Optional[int], None, "Rank of this process, 0 to N-1 (with --distributed).",
                     "Devices"),
]
RESUME_OPTIONS = RESUME_CONFIG_OPTIONS | {p.name for p in RUN_PARAMETERS}
#: config options whose flag defaults to None, so that --resume keeps the run's value unless given
_UNSET_UNLESS_GIVEN = frozenset({"num_epochs", "max_time", "data_path"})


@app.command("train")
@handles_errors
@with_parameters(config_parameters(TrainConfig, none_default=_UNSET_UNLESS_GIVEN,
                                   panels=("Data", "Model", "Loss", "Optimiser", "Run")) + RUN_PARAMETERS)
def train(ctx: typer.Context, **options: Any) -> None:
    """Train PhysNet on a packed directory; outputs in RUNS_DIR/NAME (config.json, metrics.csv, checkpoints)."""
    from ..compile_cache import enable_compilation_cache
    from ..parallel import DistributedConfig

    enable_compilation_cache()

    run = {p.name: options.pop(p.name) for p in RUN_PARAMETERS}
    name: Optional[str] = options["name"]
    runs_dir = Path(options["runs_dir"])
    data_path: Optional[Path] = options["data_path"]
    placement = _placement(run["devices"], run["distributed"],
                           DistributedConfig(run["coordinator"], run["num_processes"], run["process_id"]), name)
    from ..train import Callbacks, fit, resume_run, start_run

    if run["resume"]:
        if name is None:
            raise ConfigError("--resume needs --name of the run to continue")
        run_dir = runs_dir / name
        if not run_dir.is_dir():
            raise ConfigError(f"{run_dir}: no such run to resume")
        trainer = resume_run(run_dir, num_epochs=options["num_epochs"], max_time=options["max_time"],
                             data_path=data_path, placement=placement)
        console.print(f"resuming [bold]{trainer.run_dir}[/] at epoch {int(trainer.state.epoch)}, "
                      f"step {int(trainer.state.step)}", soft_wrap=True)
        _note_saved_options(ctx, trainer.cfg)
    else:
        if data_path is not None and not data_path.exists():
            raise ConfigError(f"{data_path}: --data-path does not exist")
        if name is not None:
            check_run_name(name)
        unset = {key: TrainConfig.__dataclass_fields__[key].default
                 for key in _UNSET_UNLESS_GIVEN if options[key] is None}
        paths = {key: str(options[key]) for key in ("data_path", "runs_dir") if options[key] is not None}
        cfg = TrainConfig(**{**options, **unset, **paths})
        trainer = start_run(cfg, placement)
        ref = trainer.reference
        console.print(f"run [bold]{trainer.run_dir}[/]: {trainer.train_data.loader.N} train / "
                      f"{trainer.valid_data.loader.N} valid molecules from {trainer.cfg.data_path}; "
                      f"electrostatics {'on' if trainer.cfg.electrostatics else 'off'}; reference residual "
                      f"{ref.per_atom_mean:.3f} ± {ref.per_atom_std:.3f} kcal/mol/atom")
        console.print(f"loader: {trainer.train_data.loader.order_note}")
    try:
        with _progress() as progress, GracefulStop() as stop:
            task = progress.add_task("epoch", total=None, visible=False)

            def epoch_start(epoch: int, steps: int) -> None:
                progress.reset(task, total=steps, description=f"epoch {epoch + 1}/{trainer.cfg.num_epochs}",
                               visible=True)

            result = fit(trainer, Callbacks(
                epoch_start=epoch_start,
                step=lambda n: progress.advance(task),
                epoch_end=lambda row: console.print(_epoch_line(row), soft_wrap=True),
                message=lambda text: console.print(text),
                stop_requested=stop.reason,
            ))
    finally:
        trainer.close()
    console.print(f"{result.reason}: epoch {result.epoch}, step {result.step}, best valid loss "
                  f"{result.best_valid_loss:.4g}; outputs in {trainer.run_dir}")
    if result.reason in SIGNAL_EXIT:
        raise typer.Exit(SIGNAL_EXIT[result.reason])


def _note_saved_options(ctx: typer.Context, cfg: TrainConfig) -> None:
    """Say which options given with --resume were ignored because the run's saved values apply."""
    saved = cfg.to_dict()
    ignored = [
        f"--{name.replace('_', '-')} (the run has {saved[name]!r})"
        for name, value in ctx.params.items()
        if name not in RESUME_OPTIONS and getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"
        and name in saved and saved[name] != value
    ]
    if ignored:
        console.print(f"[bold yellow]note:[/] the run's saved options apply on --resume; ignored: "
                      f"{', '.join(ignored)}", soft_wrap=True, highlight=False)


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
