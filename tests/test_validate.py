"""validate: one test per kind of corruption, each through the library and the CLI."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from packedqdc.cli import app
from packedqdc.validate import validate_packed

runner = CliRunner()


def _offsets(d: Path) -> np.ndarray:
    return np.load(d / "offsets.npy")


def _poke(d: Path, name: str, dtype: type, index: tuple | int, value: float, width: int = 1) -> None:
    """Set one value of a raw file in place."""
    a = np.fromfile(d / name, dtype=dtype)
    a = a.reshape(-1, width) if width > 1 else a
    a[index] = value
    a.tofile(d / name)


def _atom(d: Path, molecule: int) -> int:
    return int(_offsets(d)[molecule])


def truncate_r(d: Path) -> None:
    with open(d / "R_pack.f32", "r+b") as fh:
        fh.truncate(12 * _atom(d, 20) + 5)


def oversize_z(d: Path) -> None:
    with open(d / "Z_pack.int32", "ab") as fh:
        fh.write(b"\0" * 8)


def missing_e(d: Path) -> None:
    (d / "E.f64").unlink()


def missing_n_atoms(d: Path) -> None:
    (d / "n_atoms.npy").unlink()


def offsets_not_monotone(d: Path) -> None:
    o = _offsets(d)
    o[6] = o[5] - 1
    np.save(d / "offsets.npy", o)


def offsets_not_from_zero(d: Path) -> None:
    o = _offsets(d)
    o[0] = 1
    np.save(d / "offsets.npy", o)


def offsets_wrong_dtype(d: Path) -> None:
    np.save(d / "offsets.npy", _offsets(d).astype(np.int32))


def n_atoms_disagree(d: Path) -> None:
    n = np.load(d / "n_atoms.npy")
    n[7] += 1
    np.save(d / "n_atoms.npy", n)


def nan_r(d: Path) -> None:
    _poke(d, "R_pack.f32", np.float32, (_atom(d, 17) + 0, 2), np.nan, width=3)


def inf_f(d: Path) -> None:
    _poke(d, "F_pack.f32", np.float32, (_atom(d, 11), 0), np.inf, width=3)


def inf_e(d: Path) -> None:
    _poke(d, "E.f64", np.float64, 4, -np.inf)


def nan_qtot(d: Path) -> None:
    _poke(d, "Qtot.f64", np.float64, 6, np.nan)


def z_zero(d: Path) -> None:
    _poke(d, "Z_pack.int32", np.int32, _atom(d, 13), 0)


def z_above_118(d: Path) -> None:
    _poke(d, "Z_pack.int32", np.int32, _atom(d, 14), 119)


def fractional_qtot(d: Path) -> None:
    _poke(d, "Qtot.f64", np.float64, 8, 0.5)


def duplicated_atom(d: Path) -> None:
    r = np.fromfile(d / "R_pack.f32", dtype=np.float32).reshape(-1, 3)
    first = _atom(d, 19)  # 9 atoms
    r[first + 4] = r[first + 2]
    r.tofile(d / "R_pack.f32")


def coordinate_far_away(d: Path) -> None:
    _poke(d, "R_pack.f32", np.float32, (_atom(d, 21) + 1, 2), -2.0e5, width=3)


def checksum_mismatch(d: Path) -> None:
    f = np.fromfile(d / "F_pack.f32", dtype=np.float32)
    f[0] += 1.0
    f.tofile(d / "F_pack.f32")


def meta_bad_count(d: Path) -> None:
    meta = json.loads((d / "meta.json").read_text())
    meta["n_molecules"] = 41
    (d / "meta.json").write_text(json.dumps(meta))


def meta_not_json(d: Path) -> None:
    (d / "meta.json").write_text("{not json")


def meta_has_forces_but_none(d: Path) -> None:
    (d / "F_pack.f32").unlink()


CASES: list[tuple[Callable[[Path], None], str, int | None, str]] = [
    (truncate_r, "R_pack.f32", 20, "truncated:"),
    (oversize_z, "Z_pack.int32", None, "oversized:"),
    (missing_e, "E.f64", None, "required file is missing"),
    (missing_n_atoms, "n_atoms.npy", None, "required file is missing"),
    (offsets_not_monotone, "offsets.npy", 5, "offsets decrease"),
    (offsets_not_from_zero, "offsets.npy", None, "offsets[0] is 1, must be 0"),
    (offsets_wrong_dtype, "offsets.npy", None, "dtype int32, expected int64"),
    (n_atoms_disagree, "n_atoms.npy", 7, "n_atoms is"),
    (nan_r, "R_pack.f32", 17, "non-finite value (1 atoms affected)"),
    (inf_f, "F_pack.f32", 11, "non-finite value"),
    (duplicated_atom, "R_pack.f32", 19, "two atoms at the same place (closer than 0.001 Å: duplicated atoms?) (1 molecules"),
    (coordinate_far_away, "R_pack.f32", 21, "coordinate beyond 100000 Å"),
    (inf_e, "E.f64", 4, "non-finite value"),
    (nan_qtot, "Qtot.f64", 6, "non-finite value"),
    (z_zero, "Z_pack.int32", 13, "atomic number 0 outside 1..118"),
    (z_above_118, "Z_pack.int32", 14, "atomic number 119 outside 1..118"),
    (fractional_qtot, "Qtot.f64", 8, "fractional total charge 0.5"),
    (checksum_mismatch, "F_pack.f32", None, "sha256 mismatch"),
    (meta_bad_count, "meta.json", None, "n_molecules is 41 but the files hold 40"),
    (meta_not_json, "meta.json", None, "not valid JSON"),
    (meta_has_forces_but_none, "meta.json", None, "has_forces is True but F_pack.f32 is absent"),
]


@pytest.mark.parametrize(("corrupt", "file", "molecule", "text"), CASES, ids=[c[0].__name__ for c in CASES])
def test_corruption_is_reported(packed_dir: Path, corrupt, file: str, molecule: int | None, text: str) -> None:
    corrupt(packed_dir)
    report = validate_packed(packed_dir, checksums=True)
    hits = [p for p in report.problems if p.file == file and p.molecule == molecule and text in p.message]
    assert hits, [str(p) for p in report.problems]
    line = str(hits[0])
    assert "\n" not in line and line.startswith(f"{file}: ")
    assert report.exit_code == 1 and not report.ok

    res = runner.invoke(app, ["validate", str(packed_dir), "--checksums"])
    assert res.exit_code == 1
    assert f"  {line}\n" in res.output
    assert "Traceback" not in res.output


def test_clean_directory(packed_dir: Path) -> None:
    report = validate_packed(packed_dir, checksums=True)
    assert report.ok and report.exit_code == 0 and report.notes == []
    assert report.counts == {"n_molecules": 40, "n_atoms_total": int(_offsets(packed_dir)[-1])}
    res = runner.invoke(app, ["validate", str(packed_dir), "--checksums"])
    assert res.exit_code == 0 and res.output.startswith("OK ")


def test_huge_finite_values_are_clean_and_a_nan_among_them_is_found(packed_dir: Path) -> None:
    """The block check's fast path (one sum) overflows on huge values; the exact check decides."""
    f = np.fromfile(packed_dir / "F_pack.f32", dtype=np.float32)
    f[:30] = np.finfo(np.float32).max
    f.tofile(packed_dir / "F_pack.f32")
    assert not [p for p in validate_packed(packed_dir).problems if p.file == "F_pack.f32"]
    _poke(packed_dir, "F_pack.f32", np.float32, (_atom(packed_dir, 7), 1), np.nan, width=3)
    problems = [p for p in validate_packed(packed_dir).problems if p.file == "F_pack.f32"]
    assert len(problems) == 1 and problems[0].molecule == 7 and "non-finite value" in problems[0].message


def test_several_problems_are_all_reported(packed_dir: Path) -> None:
    truncate_r(packed_dir)
    inf_e(packed_dir)
    z_zero(packed_dir)
    texts = [str(p) for p in validate_packed(packed_dir).problems]
    assert any(t.startswith("R_pack.f32: molecule 20: truncated") for t in texts)
    assert "E.f64: molecule 4: non-finite value (1 molecules affected)" in texts
    assert any(t.startswith("Z_pack.int32: molecule 13: atomic number 0") for t in texts)


def test_problem_cap(packed_dir: Path) -> None:
    for corrupt in (truncate_r, inf_e, z_zero, fractional_qtot):
        corrupt(packed_dir)
    report = validate_packed(packed_dir, max_problems=2)
    assert len(report.problems) == 2 and report.problems_not_shown == 3  # E, Qtot, meta element_counts
    res = runner.invoke(app, ["validate", str(packed_dir), "--max-problems", "2"])
    assert res.exit_code == 1 and "and 3 more" in res.output


@pytest.mark.parametrize("setup", ["not_a_dir", "no_offsets", "garbage_offsets"])
def test_unreadable_exits_2(tmp_path: Path, packed_dir: Path, setup: str) -> None:
    target = {"not_a_dir": tmp_path / "nothing", "no_offsets": packed_dir, "garbage_offsets": packed_dir}[setup]
    if setup == "no_offsets":
        (packed_dir / "offsets.npy").unlink()
    if setup == "garbage_offsets":
        (packed_dir / "offsets.npy").write_bytes(b"garbage")
    report = validate_packed(target)
    assert not report.readable and report.exit_code == 2 and len(report.problems) == 1
    res = runner.invoke(app, ["validate", str(target)])
    assert res.exit_code == 2 and "Traceback" not in res.output


def _seed_style(d: Path, n_atoms: list[int]) -> Path:
    """A directory exactly as the seed's snippet writes it: no meta.json, F_pack.f32 or Qtot.f64."""
    rng = np.random.default_rng(3)
    d.mkdir()
    total = sum(n_atoms)
    rng.integers(1, 9, size=total).astype(np.int32).tofile(d / "Z_pack.int32")
    rng.normal(size=(total, 3)).astype(np.float32).tofile(d / "R_pack.f32")
    rng.normal(size=len(n_atoms)).tofile(d / "E.f64")
    np.save(d / "offsets.npy", np.concatenate([[0], np.cumsum(n_atoms)]).astype(np.int64))
    np.save(d / "n_atoms.npy", np.array(n_atoms, dtype=np.int32))
    return d


def test_seed_style_directory_validates_with_notes(tmp_path: Path) -> None:
    d = _seed_style(tmp_path / "seed", [5, 3, 6])
    report = validate_packed(d, checksums=True)
    assert report.ok, report.problems
    notes = " | ".join(report.notes)
    assert "no meta.json" in notes and "no F_pack.f32" in notes and "no Qtot.f64" in notes
    res = runner.invoke(app, ["validate", str(d)])
    assert res.exit_code == 0 and "note: no meta.json" in res.output


def test_empty_molecule(tmp_path: Path) -> None:
    d = _seed_style(tmp_path / "seed", [5, 0, 6])
    problems = [str(p) for p in validate_packed(d).problems]
    assert problems == ["offsets.npy: molecule 1: empty molecule (offsets[i+1] == offsets[i])"]
    assert runner.invoke(app, ["validate", str(d)]).exit_code == 1


def test_json_output(packed_dir: Path) -> None:
    inf_e(packed_dir)
    res = runner.invoke(app, ["validate", str(packed_dir), "--json"])
    assert res.exit_code == 1
    data = json.loads(res.output)
    assert data["ok"] is False and data["exit_code"] == 1
    assert data["problems"][0] == {
        "file": "E.f64",
        "molecule": 4,
        "message": "non-finite value (1 molecules affected)",
        "text": "E.f64: molecule 4: non-finite value (1 molecules affected)",
    }


def test_bundled_sample_packs_and_validates_clean(tmp_path: Path) -> None:
    res = runner.invoke(app, ["pack", "npz", "--sample", str(tmp_path / "sample")])
    assert res.exit_code == 0, res.output
    report = validate_packed(tmp_path / "sample", checksums=True)
    assert report.ok and report.counts["n_molecules"] == 504, report.problems


@pytest.mark.parametrize("block_rows", [1, 7])
def test_molecules_split_by_small_blocks_are_checked_whole(packed_dir: Path, monkeypatch, block_rows: int) -> None:
    """R is read in blocks of whole molecules (one at least), whatever ``BLOCK_ROWS``."""
    duplicated_atom(packed_dir)
    expected = [str(p) for p in validate_packed(packed_dir).problems]
    monkeypatch.setattr("packedqdc.validate.BLOCK_ROWS", block_rows)
    assert [str(p) for p in validate_packed(packed_dir).problems] == expected
    assert any("molecule 19: two atoms at the same place" in line for line in expected)
