"""Trust, pack side: --force deletes only packedqdc's own directories, values are judged as stored,
leftovers of killed packs are cleaned safely, and every failure is one line with nothing lost."""

from __future__ import annotations

import fcntl
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from packedqdc.cli import app
from packedqdc.errors import SourceError, TargetExistsError
from packedqdc.format import PACKED_NAMES, open_packed, remove_stale_leftovers
from packedqdc.pack import pack_npz

runner = CliRunner()


def _cli(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def _one_line_error(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), output
    assert "Traceback" not in output
    return lines[0]


@pytest.fixture
def npz(tmp_path: Path, make_padded) -> Path:
    file = tmp_path / "data.npz"
    np.savez(file, **make_padded())
    return file


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_force_never_replaces_the_directory_holding_the_input(tmp_path: Path, npz: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    (work / "mydata.npz").write_bytes(npz.read_bytes())
    (work / "notes.txt").write_text("mine")
    before = _tree(work)
    code, out = _cli("pack", "npz", work / "mydata.npz", work, "--force")
    assert code != 0
    assert "holds the input" in _one_line_error(out)
    assert _tree(work) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_force_refuses_a_directory_with_foreign_files(tmp_path: Path, npz: Path) -> None:
    target = pack_npz(npz, tmp_path / "out").path
    (target / "README").write_text("user notes")
    before = _tree(target)
    code, out = _cli("pack", "npz", npz, target, "--force")
    assert code != 0
    assert "'README'" in _one_line_error(out) and "did not write" in out
    assert _tree(target) == before


@pytest.mark.parametrize("kind", ["not_packed_meta", "empty", "file", "symlink"])
def test_force_refuses_what_is_not_a_packed_directory(tmp_path: Path, npz: Path, kind: str) -> None:
    target = tmp_path / "out"
    if kind == "not_packed_meta":
        target.mkdir()
        (target / "offsets.npy").write_bytes(b"x")
        (target / "meta.json").write_text('{"format": "something-else"}')
    elif kind == "empty":
        target.mkdir()
    elif kind == "file":
        target.write_text("a file")
    else:
        real = pack_npz(npz, tmp_path / "real").path
        target.symlink_to(real)
    with pytest.raises(TargetExistsError, match="only replaces a packed directory"):
        pack_npz(npz, target, force=True)
    assert target.exists() or target.is_symlink()


def test_force_refuses_the_working_directory(tmp_path: Path, npz: Path, monkeypatch) -> None:
    target = pack_npz(npz, tmp_path / "out").path
    monkeypatch.chdir(target)
    with pytest.raises(TargetExistsError, match="current working directory"):
        pack_npz(npz, target, force=True)
    assert open_packed(target).n_molecules == 40


def test_force_replaces_a_packed_directory_atomically(tmp_path: Path, npz: Path, make_padded) -> None:
    target = pack_npz(npz, tmp_path / "out").path
    other = tmp_path / "other.npz"
    np.savez(other, **make_padded(m=7, seed=3))
    pack_npz(other, target, force=True)
    assert open_packed(target).n_molecules == 7
    assert set(os.listdir(target)) <= PACKED_NAMES
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_values_are_checked_after_conversion(tmp_path: Path, make_padded) -> None:
    """Finite inputs that overflow float32 or kcal/mol are refused, not packed as inf."""
    d = make_padded()
    r = d["R"].astype(np.float64)
    r[4, 0, 2] = 1e39  # finite in float64, inf in float32
    np.savez(tmp_path / "r.npz", **{**d, "R": r})
    with pytest.raises(SourceError, match=r"r\.npz: key 'R': molecule 4: non-finite value"):
        pack_npz(tmp_path / "r.npz", tmp_path / "p1")
    e = make_padded()
    e["E"][:] = 1e307  # finite hartree, inf kcal/mol
    np.savez(tmp_path / "e.npz", **e)
    code, out = _cli("pack", "npz", tmp_path / "e.npz", tmp_path / "p2", "--energy-unit", "hartree")
    assert code == 1 and "key 'E': molecule 0: non-finite value" in _one_line_error(out)
    result = pack_npz(tmp_path / "r.npz", tmp_path / "p3", skip_invalid=True)
    assert result.n_molecules == 39 and result.skipped == 1
    assert np.isfinite(open_packed(result.path).R).all()
    assert not (tmp_path / "p1").exists() and not (tmp_path / "p2").exists()


def test_far_coordinates_are_refused_and_duplicated_atoms_left_to_validate(tmp_path: Path, make_padded) -> None:
    """A coordinate where float32 keeps less than 0.01 Å is bad input: one line naming key and
    molecule, --skip-invalid drops it. Two atoms at one place (a 1/r term of the model makes it
    inf) cost O(n^2) per molecule to find: ``validate`` finds them, by molecule."""
    d = make_padded()
    d["R"][19, 3, 0] = 3.0e5
    np.savez(tmp_path / "far.npz", **d)
    code, out = _cli("pack", "npz", tmp_path / "far.npz", tmp_path / "p1")
    assert code == 1
    assert "far.npz: key 'R': molecule 19: coordinate beyond 100000 Å" in _one_line_error(out)
    result = pack_npz(tmp_path / "far.npz", tmp_path / "p2", skip_invalid=True)
    assert result.n_molecules == 39 and result.skipped == 1
    assert not (tmp_path / "p1").exists()
    d = make_padded()
    d["R"][11, 5] = d["R"][11, 2]  # molecule 11 has 9 atoms
    np.savez(tmp_path / "dup.npz", **d)
    code, out = _cli("validate", pack_npz(tmp_path / "dup.npz", tmp_path / "p3").path)
    assert code == 1 and "R_pack.f32: molecule 11: two atoms at the same place" in out


def test_huge_atomic_number_is_not_wrapped_by_the_int32_cast(tmp_path: Path, make_padded) -> None:
    d = make_padded()
    z = d["Z"].astype(np.int64)
    z[2, 0] = 2**32 + 6  # int32 would wrap it to 6 (carbon)
    np.savez(tmp_path / "z.npz", **{**d, "Z": z})
    with pytest.raises(SourceError, match="molecule 2: atomic number outside 1..118"):
        pack_npz(tmp_path / "z.npz", tmp_path / "p")


def test_zero_molecule_file_is_a_one_line_error(tmp_path: Path) -> None:
    np.savez(tmp_path / "empty.npz", R=np.zeros((0, 3, 3)), Z=np.zeros((0, 3), np.int32), E=np.zeros(0))
    code, out = _cli("pack", "npz", tmp_path / "empty.npz", tmp_path / "p")
    assert code == 1 and "no valid molecules" in _one_line_error(out)
    assert not (tmp_path / "p").exists()


def test_damaged_zip_and_os_errors_are_one_line(tmp_path: Path, npz: Path) -> None:
    raw = npz.read_bytes()
    for name, data in (("cut.npz", raw[: len(raw) // 2]), ("headless.npz", b"\0" * 64 + raw[64:])):
        code, out = _cli("pack", "npz", tmp_path / name if (tmp_path / name).write_bytes(data) else "", tmp_path / "p1")
        assert code == 2, out
        assert name in _one_line_error(out)
        assert not (tmp_path / "p1").exists()
    (tmp_path / "afile").write_text("x")
    code, out = _cli("pack", "npz", npz, tmp_path / "afile" / "out")
    assert code != 0 and "afile" in _one_line_error(out)
    assert zipfile.is_zipfile(npz)


def test_stale_leftovers_are_removed_but_live_ones_kept(tmp_path: Path, npz: Path) -> None:
    target = tmp_path / "out"
    stale = tmp_path / ".out.tmp-dead"
    stale.mkdir()
    (stale / "Z_pack.int32").write_bytes(b"\0" * 8)
    (stale / "n_atoms.scratch").write_bytes(b"\0" * 4)
    live = tmp_path / ".out.tmp-live"
    live.mkdir()
    foreign = tmp_path / ".out.tmp-foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("not ours")
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a pack still running holds this lock
    try:
        result = pack_npz(npz, target)
    finally:
        os.close(fd)
    assert result.removed_leftovers == [stale]
    assert not stale.exists() and live.exists() and (foreign / "precious.txt").exists()
    assert remove_stale_leftovers(target) == [live]  # its owner is gone now


def test_a_killed_pack_leaves_nothing_at_the_target(tmp_path: Path, npz: Path) -> None:
    """SIGTERM mid-pack (raised as the CLI raises it) aborts cleanly: no target, no temp dir."""
    from packedqdc.cli.app import Terminated

    def stop(done: int, total: int) -> None:
        raise Terminated()

    with pytest.raises(Terminated):
        pack_npz(npz, tmp_path / "p", chunk_size=8, progress=stop)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.npz"]
