"""``packedqdc train``'s flags are generated from ``TrainConfig``: every field is a flag in both
spellings, given values reach the run's config.json, and the non-config flags stay."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
from typer.testing import CliRunner

from packedqdc.cli import app
from packedqdc.cli.config_flags import config_parameters
from packedqdc.data import SAMPLE_NPZ
from packedqdc.pack import pack_npz
from packedqdc.train import TrainConfig

runner = CliRunner()


def _help() -> str:
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}, terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


def test_every_config_field_is_a_flag_in_both_spellings() -> None:
    text = _help()
    for f in fields(TrainConfig):
        dashed = f.name.replace("_", "-")
        if f.type in ("bool", "bool | None"):
            assert f"--{dashed}" in text and f"--no-{dashed}" in text, f.name
        else:
            assert f"--{dashed}" in text, f.name
            if "_" in f.name:
                assert f"--{f.name}" in text, f.name
        assert f.metadata["help"].split()[0] in text
    for flag in ("--resume", "--devices", "--distributed", "--coordinator", "--num-processes", "--process-id"):
        assert flag in text


def test_a_field_without_help_is_refused() -> None:
    @dataclass(frozen=True)
    class Bare:
        x: int = 1

    with pytest.raises(TypeError, match="no help text"):
        config_parameters(Bare)


def test_given_flags_reach_the_saved_config(tmp_path: Path) -> None:
    data = pack_npz(SAMPLE_NPZ, tmp_path / "sample").path
    args = ["train", "--data_path", str(data), "--runs-dir", str(tmp_path / "runs"), "--name", "flags",
            "--num-epochs", "0", "--features", "8", "--num_basis", "8", "--b1", "0.8", "--plateau-min-scale", "0.05",
            "--no-electrostatics", "--loss", "mse", "--lr_schedule", "plateau"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "runs" / "flags" / "config.json").read_text())
    expected = dataclasses.replace(TrainConfig(), data_path=str(data), runs_dir=str(tmp_path / "runs"), name="flags",
                                   num_epochs=0, features=8, num_basis=8, b1=0.8, plateau_min_scale=0.05,
                                   electrostatics=False, loss="mse", lr_schedule="plateau",
                                   order="molecule",  # what --order auto chose for the small sample is saved
                                   pair_list="all")  # and what --pair-list auto chose (15 atoms at most)
    assert saved == expected.to_dict()


def test_a_choice_outside_the_list_is_a_usage_error() -> None:
    result = runner.invoke(app, ["train", "--loss", "huber"])
    assert result.exit_code == 2 and "huber" in result.output and "mae" in result.output
