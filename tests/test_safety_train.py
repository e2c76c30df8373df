"""Trust, training side: signals stop at a clean step with an exact resume, runs stay inside their
runs directory and can be resumed from anywhere (or on a copy of their data), one process per run,
nothing non-finite is saved or reported, and evaluation refuses what it cannot judge."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from typer.testing import CliRunner

from packedqdc.cli import app
from packedqdc.data import SAMPLE_NPZ
from packedqdc.errors import FormatError, SourceError, TrainingError
from packedqdc.format import META, R_FILE, Z_FILE, open_packed
from packedqdc.pack import pack_npz
from packedqdc.train import Callbacks, RunCheckpoints, TrainConfig, fit, resume_run, start_run

TINY = dict(features=16, num_iterations=2, num_basis=16, batch_size=16, layout="padded", num_atoms=15,
            learning_rate=3e-3, valid_fraction=0.2)
TINY_FLAGS = ["--features", "16", "--num-iterations", "2", "--num-basis", "16", "--batch-size", "16",
              "--layout", "padded", "--num-atoms", "15", "--learning-rate", "3e-3", "--valid-fraction", "0.2"]
runner = CliRunner()


def _equal_trees(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b)))


def _one_line_error(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error: ") and "Traceback" not in output, output
    return lines[-1]


@pytest.fixture(scope="module")
def reference_run(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """An uninterrupted 2-epoch run: what every stopped-and-resumed run must equal bit for bit."""
    runs = tmp_path_factory.mktemp("runs")
    trainer = start_run(TrainConfig(data_path=str(sample_dir), runs_dir=str(runs), name="ref", num_epochs=2, **TINY))
    fit(trainer)
    trainer.close()
    return trainer


def _start(sample_dir: Path, runs: Path, name: str, epochs: int = 2):
    return start_run(TrainConfig(data_path=str(sample_dir), runs_dir=str(runs), name=name, num_epochs=epochs, **TINY))


def _resume_to_end(run_dir: Path, epochs: int = 2):
    trainer = resume_run(run_dir, num_epochs=epochs)
    result = fit(trainer)
    trainer.close()
    return trainer, result


def test_stop_request_mid_epoch_resumes_exactly(reference_run, sample_dir: Path, tmp_path: Path) -> None:
    trainer = _start(sample_dir, tmp_path, "stopped")
    result = fit(trainer, Callbacks(stop_requested=lambda: "terminated" if int(trainer.state.step) >= 10 else None))
    trainer.close()
    assert result.reason == "terminated" and result.step == 10
    meta = RunCheckpoints(tmp_path / "stopped", read_only=True).read_meta("latest")
    assert meta["reason"] == "terminated" and not meta["epoch_complete"]
    assert meta["loader"]["epoch"] == 0 and meta["loader"]["position"] == 10
    resumed, result = _resume_to_end(tmp_path / "stopped")
    assert result.reason == "completed"
    assert _equal_trees(resumed.state.params, reference_run.state.params)


def test_interrupt_inside_a_step_saves_the_position_of_the_state(reference_run, sample_dir: Path,
                                                                tmp_path: Path) -> None:
    """A Ctrl-C raised while a step runs (its batch already taken from the loader) must not skip it."""
    trainer = _start(sample_dir, tmp_path, "ctrlc")
    step, calls = trainer.train_step, []

    def interrupted_step(state, batch):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return step(state, batch)

    trainer.train_step = interrupted_step
    with pytest.raises(KeyboardInterrupt):
        fit(trainer)
    trainer.close()
    meta = RunCheckpoints(tmp_path / "ctrlc", read_only=True).read_meta("latest")
    assert meta["step"] == 6 and meta["loader"]["position"] == 6
    resumed, _ = _resume_to_end(tmp_path / "ctrlc")
    assert _equal_trees(resumed.state.params, reference_run.state.params)


def test_stop_on_an_epochs_last_step_still_writes_the_epoch_end(sample_dir: Path, tmp_path: Path) -> None:
    trainer = _start(sample_dir, tmp_path, "edge", epochs=1)
    steps = trainer.train_data.num_steps()
    fit(trainer, Callbacks(stop_requested=lambda: "max_time" if int(trainer.state.step) == steps else None))
    trainer.close()
    checkpoints = RunCheckpoints(tmp_path / "edge", read_only=True)
    assert checkpoints.read_meta("latest")["step"] == steps
    assert not checkpoints.read_meta("latest")["epoch_complete"]
    _resume_to_end(tmp_path / "edge", epochs=1)
    meta = RunCheckpoints(tmp_path / "edge", read_only=True).read_meta("latest")
    assert meta["epoch_complete"] and meta["epoch"] == 1 and meta["step"] == steps
    assert len((tmp_path / "edge" / "metrics.csv").read_text().splitlines()) == 2


def test_non_finite_weights_are_never_saved(sample_dir: Path, tmp_path: Path) -> None:
    trainer = _start(sample_dir, tmp_path, "nanw", epochs=1)
    fit(trainer)
    before = trainer.checkpoints.latest_step("latest")
    trainer.state = trainer.state.replace(params=jax.tree.map(lambda p: p * np.nan, trainer.state.params))
    with pytest.raises(TrainingError, match="non-finite .* not written"):
        trainer.save("latest", "max_time", epoch_complete=False)
    assert trainer.checkpoints.latest_step("latest") == before
    trainer.close()


def test_one_process_per_run(sample_dir: Path, tmp_path: Path) -> None:
    first = _start(sample_dir, tmp_path, "busy", epochs=1)
    with pytest.raises(TrainingError, match="in use by another packedqdc process .pid"):
        resume_run(tmp_path / "busy")
    fit(first)
    first.close()
    resume_run(tmp_path / "busy").close()


def test_orbax_leftovers_of_a_killed_save_are_removed(sample_dir: Path, tmp_path: Path) -> None:
    trainer = _start(sample_dir, tmp_path, "tmpdirs", epochs=1)
    fit(trainer)
    trainer.close()
    leftover = tmp_path / "tmpdirs" / "checkpoints" / "latest" / "7.orbax-checkpoint-tmp-123"
    leftover.mkdir()
    resume_run(tmp_path / "tmpdirs").close()
    assert not leftover.exists()


@pytest.mark.parametrize("name", ["../../escape", "/tmp/absolute-run", "a/b", "..", ".hidden"])
def test_run_names_stay_inside_the_runs_directory(tmp_path: Path, name: str) -> None:
    result = runner.invoke(app, ["train", "--runs-dir", str(tmp_path / "runs"), "--name", name, *TINY_FLAGS])
    assert result.exit_code == 2 and "--name" in _one_line_error(result.output)
    assert not (tmp_path / "runs").exists() and not Path("/tmp/absolute-run").exists()


def test_resume_from_another_directory_and_on_a_copy_of_the_data(sample_dir: Path, tmp_path: Path,
                                                                 monkeypatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(sample_dir, work / "data")
    monkeypatch.chdir(work)
    args = ["train", "--data-path", "data", "--runs-dir", "runs", "--name", "moving", "--num-epochs", "1", *TINY_FLAGS]
    assert runner.invoke(app, args).exit_code == 0
    config = json.loads((work / "runs" / "moving" / "config.json").read_text())
    assert config["data_path"] == str(work / "data") and config["runs_dir"] == str(work / "runs")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    resume = ["train", "--runs-dir", str(work / "runs"), "--name", "moving", "--resume", "--num-epochs", "2"]
    result = runner.invoke(app, resume + ["--features", "8"])
    assert result.exit_code == 0, result.output
    assert "ignored: --features (the run has 16)" in " ".join(result.output.split())

    (work / "data").rename(work / "data-moved")
    result = runner.invoke(app, resume[:-1] + ["3"])
    assert result.exit_code == 2 and "pass --data-path" in _one_line_error(result.output)
    other = pack_npz(SAMPLE_NPZ, tmp_path / "other")  # the same counts, one energy changed, no meta sums
    e = np.memmap(other.path / "E.f64", dtype=np.float64, mode="r+")
    e[0] += 1.0
    e.flush()
    meta = json.loads((other.path / META).read_text())
    del meta["sha256"]
    (other.path / META).write_text(json.dumps(meta))
    result = runner.invoke(app, resume[:-1] + ["3", "--data-path", str(other.path)])
    assert result.exit_code == 2 and "not the dataset this run trained on (E.f64 differs)" in _one_line_error(result.output)
    result = runner.invoke(app, resume[:-1] + ["3", "--data-path", str(work / "data-moved")])
    assert result.exit_code == 0, result.output
    assert json.loads((work / "runs" / "moving" / "config.json").read_text())["data_path"] == str(work / "data-moved")


@pytest.mark.parametrize("flag", ["--learning-rate", "--forces-weight", "--clip-norm"])
def test_non_finite_options_are_refused(tmp_path: Path, flag: str) -> None:
    result = runner.invoke(app, ["train", "--runs-dir", str(tmp_path), "--name", "x", flag, "inf"])
    assert result.exit_code == 2 and "finite" in _one_line_error(result.output)
    assert not (tmp_path / "x").exists()


def test_evaluate_refuses_what_it_cannot_judge(reference_run, sample_dir: Path, tmp_path: Path) -> None:
    run = reference_run.run_dir
    # an element the model never saw (bromine) in otherwise valid data
    d = dict(np.load(SAMPLE_NPZ))
    d["Z"] = d["Z"].copy()
    d["Z"][3, 0] = 35
    np.savez(tmp_path / "br.npz", **d)
    pack_npz(tmp_path / "br.npz", tmp_path / "br")
    result = runner.invoke(app, ["evaluate", str(run), "--data-path", str(tmp_path / "br")])
    assert result.exit_code == 2 and "Br not in the model's training data" in _one_line_error(result.output)
    # a NaN position planted after packing
    bad = tmp_path / "nan"
    shutil.copytree(sample_dir, bad)
    r = np.memmap(bad / R_FILE, dtype=np.float32, mode="r+")
    first_atom_of_molecule_5 = int(open_packed(bad).offsets[5])
    r[3 * first_atom_of_molecule_5] = np.nan
    r.flush()
    result = runner.invoke(app, ["evaluate", str(run), "--data-path", str(bad)])
    assert result.exit_code == 2 and "molecule 5: non-finite R" in _one_line_error(result.output)
    # out-of-range atomic numbers
    z = np.memmap(bad / Z_FILE, dtype=np.int32, mode="r+")
    z[0] = 200
    z.flush()
    result = runner.invoke(app, ["evaluate", str(run), "--data-path", str(bad)])
    assert result.exit_code == 2 and "outside 1..118" in _one_line_error(result.output)
    with pytest.raises(SourceError, match="molecule 0: atomic number 200 outside 1..118"):
        start_run(TrainConfig(data_path=str(bad), runs_dir=str(tmp_path / "runs"), name="badz", **TINY))
    assert not (tmp_path / "runs" / "badz").exists()  # a run that never started leaves nothing


def test_evaluate_json_is_strict_without_forces(reference_run, tmp_path: Path) -> None:
    d = {k: v for k, v in np.load(SAMPLE_NPZ).items() if k != "F"}
    np.savez(tmp_path / "nof.npz", **d)
    pack_npz(tmp_path / "nof.npz", tmp_path / "nof")
    result = runner.invoke(app, ["evaluate", str(reference_run.run_dir), "--data-path", str(tmp_path / "nof"), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output.strip().splitlines()[-1])  # strict: NaN would not parse here
    assert metrics["forces_mae"] is None and metrics["energy_mae"] > 0


def test_evaluate_without_a_checkpoint_creates_nothing(tmp_path: Path, sample_dir: Path) -> None:
    run = tmp_path / "empty-run"
    run.mkdir()
    result = runner.invoke(app, ["evaluate", str(run), "--data-path", str(sample_dir)])
    assert result.exit_code != 0 and "no 'best' checkpoint" in _one_line_error(result.output)
    assert list(run.iterdir()) == []


def test_data_of_another_format_version_or_units_is_refused(sample_dir: Path, tmp_path: Path) -> None:
    for change in ({"format_version": 2}, {"units": {"energy": "eV", "length": "angstrom",
                                                      "forces": "eV/angstrom", "charge": "e"}}):
        data = tmp_path / f"d{len(list(tmp_path.iterdir()))}"
        shutil.copytree(sample_dir, data)
        meta = json.loads((data / META).read_text())
        meta.update(change)
        (data / META).write_text(json.dumps(meta))
        with pytest.raises(FormatError, match="format_version 2 is not supported|units .* differ"):
            start_run(TrainConfig(data_path=str(data), runs_dir=str(tmp_path / "runs"), name="v", **TINY))
        result = runner.invoke(app, ["validate", str(data)])
        assert result.exit_code == 1 and ("format_version" in result.output or "units are" in result.output)


def test_sigterm_stops_the_cli_with_a_checkpoint_that_resumes(sample_dir: Path, tmp_path: Path) -> None:
    """A real SIGTERM (as SLURM sends) to ``packedqdc train``: exit 143, a mid-run checkpoint, resume."""
    cmd = [sys.executable, "-m", "packedqdc", "train", "--data-path", str(sample_dir), "--runs-dir", str(tmp_path),
           "--name", "slurm", "--num-epochs", "1000", *TINY_FLAGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "slurm" / "metrics.csv").exists():  # after the first epoch: compiled, mid-run
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out
    assert "terminated" in out and "Traceback" not in out
    meta = RunCheckpoints(tmp_path / "slurm", read_only=True).read_meta("latest")
    assert meta["reason"] in ("terminated", "epoch") and meta["epoch"] >= 1
    result = runner.invoke(app, ["train", "--runs-dir", str(tmp_path), "--name", "slurm", "--resume",
                                 "--num-epochs", str(meta["epoch"] + 1)])
    assert result.exit_code == 0, result.output
    assert RunCheckpoints(tmp_path / "slurm", read_only=True).read_meta("latest")["epoch"] == meta["epoch"] + 1
