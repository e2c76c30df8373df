"""Trust, inspection side: validate and stats never trust meta.json unchecked, never print NaN as
JSON, and turn unreadable files and bad output paths into one-line errors with the right exit code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from packedqdc.cli import app
from packedqdc.format import E_FILE, META, OFFSETS, Z_FILE

runner = CliRunner()


def _one_line_error(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in output, output
    return lines[0]


def _edit_meta(directory: Path, **changes) -> None:
    meta = json.loads((directory / META).read_text())
    meta.update(changes)
    (directory / META).write_text(json.dumps(meta))


@pytest.mark.parametrize("name", [Z_FILE, OFFSETS])
def test_validate_exits_2_when_a_file_cannot_be_read(packed_dir: Path, name: str) -> None:
    (packed_dir / name).unlink()
    (packed_dir / name).mkdir()  # a directory where the file should be: exists, cannot be read
    result = runner.invoke(app, ["validate", str(packed_dir)])
    assert result.exit_code == 2, result.output
    assert "not a regular file" in result.output and "Traceback" not in result.output


def test_validate_reports_other_units_and_malformed_checksums(packed_dir: Path) -> None:
    _edit_meta(packed_dir, units={"energy": "eV", "length": "angstrom", "forces": "eV/angstrom", "charge": "e"})
    result = runner.invoke(app, ["validate", str(packed_dir), "--json"])
    report = json.loads(result.output)
    assert result.exit_code == 1 and any("units are" in p["message"] for p in report["problems"])
    for sums, expected in (("not-a-dict", "must be an object"), ({E_FILE: "abc"}, "not 64 hex digits"),
                           ({"../../etc/passwd": "0" * 64}, "not a file of the format")):
        _edit_meta(packed_dir, units=json.loads((packed_dir / META).read_text())["units"] | {"energy": "kcal/mol",
                   "forces": "kcal/mol/angstrom"}, sha256=sums)
        result = runner.invoke(app, ["validate", str(packed_dir), "--checksums"])
        assert result.exit_code == 1 and expected in result.output, result.output


def test_stats_counts_elements_from_the_data_and_writes_strict_json(packed_dir: Path) -> None:
    _edit_meta(packed_dir, element_counts={"U": 10**9})  # a lie: stats must not repeat it
    e = np.memmap(packed_dir / E_FILE, dtype=np.float64, mode="r+")
    e[3] = np.nan
    e.flush()
    result = runner.invoke(app, ["stats", str(packed_dir), "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output)  # json.loads accepts NaN; the text must not contain it
    assert "NaN" not in result.output and "Infinity" not in result.output
    assert "U" not in stats["elements"] and sum(stats["elements"].values()) == stats["n_atoms_total"]
    assert stats["energy_kcal_mol"]["non_finite"] == 1 and np.isfinite(stats["energy_kcal_mol"]["mean"])
    text = runner.invoke(app, ["stats", str(packed_dir)])
    assert "1 non-finite value(s) in E" in " ".join(text.output.split())


def test_stats_refuses_out_of_range_atomic_numbers(packed_dir: Path) -> None:
    z = np.memmap(packed_dir / Z_FILE, dtype=np.int32, mode="r+")
    z[5] = 0
    z.flush()
    result = runner.invoke(app, ["stats", str(packed_dir)])
    assert result.exit_code == 2 and "outside 1..118" in _one_line_error(result.output)


@pytest.mark.parametrize("where", ["missing-dir/plot.png", "."])
def test_stats_plot_to_a_bad_path_is_one_line(packed_dir: Path, tmp_path: Path, where: str) -> None:
    pytest.importorskip("matplotlib")
    result = runner.invoke(app, ["stats", str(packed_dir), "--plot", str(tmp_path / where)])
    assert result.exit_code == 2 and "--plot" in _one_line_error(result.output)


def test_the_cli_boundary_turns_any_os_error_into_one_line(packed_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(packed_dir, copy)
    (copy / E_FILE).unlink()
    (copy / E_FILE).symlink_to(tmp_path / "nowhere")  # dangling: the size check's stat fails
    for args in (["stats", str(copy)], ["validate", str(copy)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
