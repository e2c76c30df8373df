"""Training end to end on the bundled sample with a tiny PhysNet: learning, checkpoints, exact resume,
the NaN guard, the CLI, evaluation and prediction. Runs share compiled steps (same configuration)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from typer.testing import CliRunner

from packedqdc.cli import app
from packedqdc.errors import TargetExistsError, TrainingError
from packedqdc.format import open_packed
from packedqdc.train import Potential, RunCheckpoints, TrainConfig, evaluate_run, fit, resume_run, start_run

# exponential: a schedule that does not depend on the run's length, so that a finished run extended
# with more epochs (test_resume_equals_uninterrupted_run) equals one run of that length; the default
# cosine decays over --num-epochs, and its mid-run resumes are tested in test_safety_train.py
TINY = dict(features=16, num_iterations=2, num_basis=16, batch_size=16, layout="padded", num_atoms=15,
            learning_rate=3e-3, valid_fraction=0.2, lr_schedule="exponential")


def _equal_trees(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b)))


@pytest.fixture(scope="module")
def trained(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A 3-epoch run (rows of metrics.csv) and its trainer."""
    runs = tmp_path_factory.mktemp("runs")
    trainer = start_run(TrainConfig(data_path=str(sample_dir), runs_dir=str(runs), name="full", num_epochs=3, **TINY))
    rows = []
    from packedqdc.train import Callbacks

    fit(trainer, Callbacks(epoch_end=rows.append))
    return trainer, rows


def test_short_run_learns_and_writes_outputs(trained) -> None:
    trainer, rows = trained
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["valid_forces_mae"] < rows[0]["valid_forces_mae"]
    assert rows[-1]["valid_loss"] < rows[0]["valid_loss"]
    run = trainer.run_dir
    assert TrainConfig.load(run / "config.json").electrostatics is True  # the sample has ions
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    for column in ("train_loss", "valid_loss", "valid_energy_mae", "valid_energy_rmse", "valid_energy_mae_per_atom",
                   "valid_forces_mae", "valid_forces_rmse", "lr", "train_mol_per_s"):
        assert column in header
    assert len((run / "metrics.csv").read_text().splitlines()) == 4


def test_checkpoint_round_trip(trained) -> None:
    trainer, _ = trained
    state, meta = trainer.checkpoints.restore("latest", trainer.state)
    assert _equal_trees(state, trainer.state)
    assert meta["epoch"] == 3 and meta["loader"]["epoch"] == 3 and meta["epoch_complete"]
    assert len(meta["reference"]["table"]) == 119 and meta["model"]["features"] == 16
    best = RunCheckpoints(trainer.run_dir).read_meta("best")
    assert best["best_valid_loss"] == pytest.approx(trainer.best_valid_loss)


def test_resume_equals_uninterrupted_run(trained, sample_dir: Path) -> None:
    trainer, _ = trained
    runs = trainer.run_dir.parent
    part = start_run(TrainConfig(data_path=str(sample_dir), runs_dir=str(runs), name="part", num_epochs=2, **TINY))
    fit(part)
    part.close()
    resumed = resume_run(runs / "part", num_epochs=3)
    assert int(resumed.state.epoch) == 2
    fit(resumed)
    assert _equal_trees(resumed.state.params, trainer.state.params)
    assert _equal_trees(resumed.state.ema_params, trainer.state.ema_params)
    assert _equal_trees(resumed.state.opt_state, trainer.state.opt_state)
    assert len((runs / "part" / "metrics.csv").read_text().splitlines()) == 4
    with pytest.raises(TargetExistsError):
        start_run(TrainConfig(data_path=str(sample_dir), runs_dir=str(runs), name="part", **TINY))


def test_nan_guard_keeps_last_good_checkpoint(trained, sample_dir: Path, tmp_path: Path) -> None:
    trainer, _ = trained
    data = tmp_path / "data"
    shutil.copytree(sample_dir, data)
    runs = tmp_path / "runs"
    first = start_run(TrainConfig(data_path=str(data), runs_dir=str(runs), name="nan", num_epochs=1, **TINY))
    fit(first)
    bad = int(first.train_data.loader.indices[5])
    first.close()
    E = np.memmap(data / "E.f64", dtype=np.float64, mode="r+")
    E[bad] = np.nan
    E.flush()
    again = resume_run(runs / "nan", num_epochs=2)
    with pytest.raises(TrainingError, match="non-finite training loss .* last good checkpoint kept") as info:
        fit(again)
    assert "\n" not in str(info.value)
    assert RunCheckpoints(runs / "nan").read_meta("latest")["epoch"] == 1


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--data-path", str(tmp_path / "missing"), "--runs-dir", str(tmp_path)])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and "missing" in lines[0]
    result = runner.invoke(app, ["train", "--no-such-flag"])
    assert result.exit_code == 2 and "No such option" in result.output
    result = runner.invoke(app, ["train", "--layout", "ragged", "--data_path", str(tmp_path)])
    assert result.exit_code != 0 and "Error:" in result.output and "layout" in result.output


def test_cli_train_resume_and_evaluate_json(sample_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["train", "--data_path", str(sample_dir), "--runs-dir", str(tmp_path), "--name", "cli",
            "--features", "16", "--num_iterations", "2", "--num-basis", "16", "--batch-size", "16",
            "--layout", "padded", "--num-atoms", "15", "--learning-rate", "3e-3", "--valid-fraction", "0.2",
            "--num-epochs", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "already exists" in again.output
    resumed = runner.invoke(app, ["train", "--runs-dir", str(tmp_path), "--name", "cli", "--resume", "--num-epochs", "2"])
    assert resumed.exit_code == 0, resumed.output
    result = runner.invoke(app, ["evaluate", str(tmp_path / "cli"), "--data-path", str(sample_dir), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output.strip().splitlines()[-1])
    assert set(metrics) == {"energy_mae", "energy_rmse", "forces_mae", "forces_rmse", "n_molecules"}
    assert metrics["n_molecules"] == 504


def test_predict_matches_evaluate(trained, sample_dir: Path) -> None:
    trainer, _ = trained
    result = evaluate_run(trainer.run_dir, sample_dir)
    pot = Potential.load(trainer.run_dir)
    ds = open_packed(sample_dir)
    Zs = [ds.molecule(i)["Z"] for i in range(ds.n_molecules)]
    Rs = [ds.molecule(i)["R"] for i in range(ds.n_molecules)]
    energies, forces = pot.predict_batch(Zs, Rs, list(np.asarray(ds.Qtot)))
    e_mae = float(np.mean(np.abs(energies - np.asarray(ds.E))))
    f_mae = float(np.mean(np.abs(np.concatenate(forces) - np.asarray(ds.F))))
    assert e_mae == pytest.approx(result.energy_mae, rel=1e-3)
    assert f_mae == pytest.approx(result.forces_mae, rel=1e-3)
    assert result.baseline_forces_mae > result.forces_mae
    e0, f0 = pot.predict(Zs[0], Rs[0], float(ds.Qtot[0]))
    assert e0 == pytest.approx(energies[0], abs=1e-3) and f0.shape == (len(Zs[0]), 3)


@pytest.mark.heavy  # two CLI training runs: ~35-45 s
def test_cli_train_order_and_loader_threads(sample_dir: Path, tmp_path: Path) -> None:
    """--order and --loader-threads reach the loader; the order auto chose is saved for resumes."""
    runner = CliRunner()
    base = ["train", "--data_path", str(sample_dir), "--runs-dir", str(tmp_path), "--features", "8",
            "--num_iterations", "1", "--num-basis", "8", "--batch-size", "16", "--num-epochs", "1"]
    result = runner.invoke(app, base + ["--name", "blk", "--order", "block", "--loader-threads", "2"])
    assert result.exit_code == 0, result.output
    assert "loader: order=block (as asked)" in result.output
    saved = json.loads((tmp_path / "blk" / "config.json").read_text())
    assert saved["order"] == "block" and saved["loader_threads"] == 2
    result = runner.invoke(app, base + ["--name", "auto"])
    assert result.exit_code == 0, result.output
    assert "order=auto chose molecule order" in result.output  # the sample is tiny
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["order"] == "molecule"
    bad = runner.invoke(app, base + ["--name", "bad", "--order", "random"])
    assert bad.exit_code != 0 and "--order" in bad.output and "Traceback" not in bad.output
