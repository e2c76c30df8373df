"""PackedWriter and open_packed: round trip, atomic publish, refusing and replacing targets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import packedqdc.format as fmt
from packedqdc.errors import FormatError, TargetExistsError
from packedqdc.format import E_FILE, META, MoleculeChunk, PackedWriter, open_packed, sha256_file


def _chunks(seed: int = 0, sizes: tuple[int, ...] = (5, 3, 7)) -> list[MoleculeChunk]:
    rng = np.random.default_rng(seed)
    out = []
    for m in sizes:
        n = rng.integers(1, 6, size=m).astype(np.int32)
        a = int(n.sum())
        out.append(
            MoleculeChunk(
                n_atoms=n,
                Z=rng.integers(1, 10, size=a).astype(np.int32),
                R=rng.normal(size=(a, 3)).astype(np.float32),
                E=rng.normal(size=m),
                F=rng.normal(size=(a, 3)).astype(np.float32),
                Qtot=rng.integers(-1, 2, size=m).astype(np.float64),
            )
        )
    return out


def _write(target: Path, chunks: list[MoleculeChunk], force: bool = False) -> Path:
    with PackedWriter(target, has_forces=True, has_qtot=True, provenance={"source": "test"}, force=force) as w:
        for chunk in chunks:
            w.append(chunk)
        return w.commit()


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_round_trip(tmp_path: Path) -> None:
    chunks = _chunks()
    ds = open_packed(_write(tmp_path / "out", chunks))
    n = np.concatenate([c.n_atoms for c in chunks])
    np.testing.assert_array_equal(ds.n_atoms, n)
    np.testing.assert_array_equal(ds.offsets, np.concatenate([[0], np.cumsum(n)]))
    assert ds.offsets.dtype == np.int64 and ds.n_atoms.dtype == np.int32
    for name in ("Z", "R", "F"):
        np.testing.assert_array_equal(getattr(ds, name), np.concatenate([getattr(c, name) for c in chunks]))
    np.testing.assert_array_equal(ds.E, np.concatenate([c.E for c in chunks]))
    np.testing.assert_array_equal(ds.Qtot, np.concatenate([c.Qtot for c in chunks]))
    meta = ds.meta
    assert meta["n_molecules"] == 15 and meta["n_atoms_total"] == int(n.sum())
    assert meta["provenance"] == {"source": "test"}
    assert meta["sha256"][E_FILE] == sha256_file(ds.path / E_FILE)
    assert _leftovers(tmp_path) == []


def test_files_flushed_early_while_writing_keep_contents_and_checksums(tmp_path: Path, monkeypatch) -> None:
    """With a tiny early-sync threshold every file is fdatasync'ed while chunks still arrive."""
    synced: list[int] = []
    real = fmt._fdatasync
    monkeypatch.setattr(fmt, "EARLY_SYNC_BYTES", 64)
    monkeypatch.setattr(fmt, "_fdatasync", lambda fd: (synced.append(fd), real(fd)))
    chunks = _chunks(sizes=(40, 30, 50))
    ds = open_packed(_write(tmp_path / "out", chunks))
    assert len(synced) >= 3 * 5  # R, F, Z, E, Qtot: at least once per chunk each
    np.testing.assert_array_equal(ds.R, np.concatenate([c.R for c in chunks]))
    for name, digest in ds.meta["sha256"].items():
        assert digest == sha256_file(ds.path / name), name


def test_failing_early_flush_does_not_stall_the_writer(tmp_path: Path, monkeypatch) -> None:
    """A file system that refuses fdatasync: the pack still completes (close() does the real fsync)."""
    calls: list[int] = []

    def refuse(fd: int) -> None:
        calls.append(fd)
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(fmt, "EARLY_SYNC_BYTES", 64)
    monkeypatch.setattr(fmt, "_fdatasync", refuse)
    chunks = _chunks(sizes=(40, 30, 50, 20, 60, 10))
    ds = open_packed(_write(tmp_path / "out", chunks))
    np.testing.assert_array_equal(ds.F, np.concatenate([c.F for c in chunks]))
    assert len(calls) == 5  # one try per file, then no more


def test_failure_midway_leaves_no_target_and_no_temp_dir(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with PackedWriter(target, has_forces=True, has_qtot=True) as w:
            w.append(_chunks()[0])
            raise RuntimeError("source failed")
    assert not target.exists()
    assert _leftovers(tmp_path) == []


def test_kill_midway_leaves_no_target(tmp_path: Path) -> None:
    target = tmp_path / "out"
    script = (
        "import os, signal, numpy as np\n"
        "from packedqdc.format import PackedWriter, MoleculeChunk\n"
        f"w = PackedWriter({str(target)!r}, has_forces=False, has_qtot=False)\n"
        "w.append(MoleculeChunk(np.ones(2, np.int32), np.ones(2, np.int32), np.zeros((2, 3), np.float32), np.zeros(2)))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], check=False)
    assert proc.returncode == -9
    assert not target.exists()


def test_existing_target_untouched_without_force(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(TargetExistsError, match="already exists"):
        _write(target, _chunks())
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert _leftovers(tmp_path) == []


def test_existing_target_replaced_with_force(tmp_path: Path) -> None:
    target = _write(tmp_path / "out", _chunks(seed=1))
    _write(target, _chunks(seed=2, sizes=(4,)), force=True)
    assert open_packed(target).n_molecules == 4
    assert json.loads((target / META).read_text())["n_molecules"] == 4
    assert _leftovers(tmp_path) == []


def test_published_directory_is_not_private(tmp_path: Path) -> None:
    target = _write(tmp_path / "out", _chunks())
    assert os.stat(target).st_mode & 0o055 == 0o055 & ~_umask()


def test_open_packed_refuses_truncated_file(tmp_path: Path) -> None:
    target = _write(tmp_path / "out", _chunks())
    with open(target / E_FILE, "r+b") as fh:
        fh.truncate(8)
    with pytest.raises(FormatError, match="E.f64: size mismatch"):
        open_packed(target)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
