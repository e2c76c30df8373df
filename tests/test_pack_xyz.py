"""``pack xyz`` against files written by ASE's own extxyz writer (``ase.io.write(format="extxyz")``).

Each packed value is compared with what ASE reads back, converted to kcal/mol and Å; the fast
reader and ASE's reader must give identical packed files.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ase = pytest.importorskip("ase")
import ase.io  # noqa: E402
from ase.calculators.singlepoint import SinglePointCalculator  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from packedqdc.cli import app  # noqa: E402
from packedqdc.format import open_packed  # noqa: E402
from packedqdc.pack import pack_xyz  # noqa: E402
from packedqdc.units import BOHR_TO_ANGSTROM, EV_TO_KCAL_MOL, HARTREE_TO_KCAL_MOL  # noqa: E402
from packedqdc.validate import validate_packed  # noqa: E402

ELEMENTS = (1, 6, 7, 8, 16)


def make_frames(n: int, seed: int = 0, *, forces: bool = True, charges: bool = False, mace: bool = False) -> list:
    """``n`` random molecules (2..9 atoms) with energies in eV and forces in eV/Å.

    Plain frames carry them in a SinglePointCalculator (ASE writes ``energy=`` and a ``forces``
    column); ``mace`` frames carry ``REF_energy`` in info and a ``REF_forces`` array as MACE does.
    """
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        k = int(rng.integers(2, 10))
        atoms = ase.Atoms(numbers=rng.choice(ELEMENTS, size=k), positions=rng.normal(0.0, 1.5, size=(k, 3)))
        energy = float(rng.normal(-100.0 * k, 5.0))
        f = rng.normal(0.0, 0.5, size=(k, 3))
        if mace:
            atoms.info["REF_energy"] = energy
            if forces:
                atoms.arrays["REF_forces"] = f
        else:
            atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=f if forces else None)
        if charges:
            atoms.info["total_charge" if mace else "charge"] = int(rng.integers(-1, 2))
        frames.append(atoms)
    return frames


def write(path: Path, frames: list) -> Path:
    ase.io.write(path, frames, format="extxyz")
    return path


def assert_matches_ase(out: Path, files: list[Path], energy_key: str = "energy", forces_key: str | None = "forces",
                       charge_key: str | None = None, e_factor: float = EV_TO_KCAL_MOL, r_factor: float = 1.0) -> None:
    """Every packed molecule equals ASE's reading of the frame, in kcal/mol and Å (float32 for R, F)."""
    ds = open_packed(out)
    frames = [a for f in files for a in ase.io.iread(f, index=":", format="extxyz")]
    assert ds.n_molecules == len(frames)
    for i, atoms in enumerate(frames):
        mol = ds.molecule(i)
        results = atoms.calc.results if atoms.calc is not None else {}
        energy = results[energy_key] if energy_key in results else atoms.info[energy_key]
        np.testing.assert_array_equal(mol["Z"], atoms.numbers)
        np.testing.assert_array_equal(mol["R"], (atoms.positions * r_factor).astype(np.float32))
        assert mol["E"] == energy * e_factor
        if forces_key is None:
            assert mol["F"] is None
        else:
            f = results[forces_key] if forces_key in results else atoms.arrays[forces_key]
            np.testing.assert_array_equal(mol["F"], (f * (e_factor / r_factor)).astype(np.float32))
        assert mol["Qtot"] == (0.0 if charge_key is None else float(atoms.info[charge_key]))


def assert_same_pack(a: Path, b: Path) -> None:
    """Two packed directories hold identical arrays."""
    x, y = open_packed(a), open_packed(b)
    for name in ("offsets", "Z", "R", "E", "F", "Qtot"):
        u, v = getattr(x, name), getattr(y, name)
        assert (u is None) == (v is None), name
        if u is not None:
            np.testing.assert_array_equal(u, v, err_msg=name)


@pytest.mark.parametrize("parser", ["auto", "ase"])
def test_round_trip_ase_writer_kcal_and_angstrom(tmp_path: Path, parser: str) -> None:
    src = write(tmp_path / "mols.extxyz", make_frames(40, charges=True))
    result = pack_xyz([src], tmp_path / "out", parser=parser)
    assert result.n_molecules == 40
    assert_matches_ase(tmp_path / "out", [src], charge_key="charge")
    assert validate_packed(tmp_path / "out").ok
    prov = json.loads((tmp_path / "out" / "meta.json").read_text())["provenance"]
    assert prov["source"] == "xyz"
    assert prov["files"][0]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert prov["files"][0]["frames"] == 40 and prov["files"][0]["parser"] == ("fast" if parser == "auto" else "ase")
    assert prov["keys"] == {"energy": "energy", "forces": "forces", "charge": "charge"}
    assert prov["source_units"] == {"energy": "eV", "length": "Ang"}


def test_mace_keys_units_and_charges(tmp_path: Path) -> None:
    src = write(tmp_path / "mace.xyz", make_frames(25, seed=1, charges=True, mace=True))
    out = pack_xyz([src], tmp_path / "out", energy_unit="hartree", length_unit="bohr").path
    assert_matches_ase(out, [src], "REF_energy", "REF_forces", "total_charge",
                       e_factor=HARTREE_TO_KCAL_MOL, r_factor=BOHR_TO_ANGSTROM)
    assert np.count_nonzero(open_packed(out).Qtot) > 0
    prov = json.loads((out / "meta.json").read_text())["provenance"]
    assert prov["keys"] == {"energy": "REF_energy", "forces": "REF_forces", "charge": "total_charge"}


def test_both_energy_keys_is_ambiguous_until_chosen(tmp_path: Path) -> None:
    frames = make_frames(5, seed=2)
    for atoms in frames:
        atoms.info["REF_energy"] = atoms.calc.results["energy"] + 1.0
    src = write(tmp_path / "both.xyz", frames)
    result = CliRunner().invoke(app, ["pack", "xyz", str(src), str(tmp_path / "out")])
    assert result.exit_code == 1 and "both 'energy' and 'REF_energy'" in result.output
    out = pack_xyz([src], tmp_path / "ref", energy_key="REF_energy").path
    assert_matches_ase(out, [src], energy_key="REF_energy")


def test_fast_reader_equals_ase_on_varied_files(tmp_path: Path) -> None:
    """Extra columns of every type, a cell that is not periodic, lower-case symbols, CRLF lines,
    and frames the fast reader hands to ASE (a key without a value, single quotes)."""
    frames = make_frames(30, seed=3, charges=True)
    for i, atoms in enumerate(frames):
        atoms.arrays["tags_i"] = np.arange(len(atoms)) * (i + 1)
        atoms.arrays["flag"] = np.arange(len(atoms)) % 2 == 0
        atoms.arrays["label"] = np.array([f"a{j}" for j in range(len(atoms))])
        if i % 7 == 3:
            atoms.cell = np.eye(3) * 20.0  # a cell, but pbc stays False
        if i % 5 == 1:
            atoms.info["note"] = 3.5
    plain = write(tmp_path / "varied.xyz", frames)
    odd = tmp_path / "odd.xyz"
    lines = [("h" + line[1:]) if line.startswith("H ") else line for line in plain.read_text().splitlines()]
    assert sum(line.startswith("h ") for line in lines) > 10  # lower-case symbols: ASE capitalises them
    headers, i = [], 0  # the comment line of each frame
    while i < len(lines):
        headers.append(i + 1)
        i += 2 + int(lines[i])
    lines[headers[12]] += " converged"  # a key without a value: ASE reads it as True
    lines[headers[20]] = lines[headers[20]].replace('pbc="F F F"', "pbc='F F F'")
    odd.write_text("\r\n".join(lines) + "\r\n")
    for src in (plain, odd):
        fast = pack_xyz([src], tmp_path / f"{src.stem}-auto").path
        ref = pack_xyz([src], tmp_path / f"{src.stem}-ase", parser="ase").path
        assert_same_pack(fast, ref)
        assert_matches_ase(ref, [src], charge_key="charge")
    prov = json.loads((tmp_path / "odd-auto" / "meta.json").read_text())["provenance"]
    assert prov["files"][0]["parser"].startswith("fast, then ase from frame 12")
    plain_prov = json.loads((tmp_path / "varied-auto" / "meta.json").read_text())["provenance"]
    assert plain_prov["files"][0]["parser"] == "fast"


def test_many_files_and_glob(tmp_path: Path) -> None:
    files = [write(tmp_path / f"part{i}.xyz", make_frames(7, seed=10 + i)) for i in range(3)]
    out = pack_xyz([str(tmp_path / "part*.xyz")], tmp_path / "out").path
    assert_matches_ase(out, files)
    assert [f["frames"] for f in json.loads((out / "meta.json").read_text())["provenance"]["files"]] == [7, 7, 7]


def test_periodic_frame_refused_or_skipped(tmp_path: Path) -> None:
    frames = make_frames(6, seed=4)
    frames[3].cell = np.eye(3) * 10.0
    frames[3].pbc = True
    src = write(tmp_path / "pbc.xyz", frames)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["pack", "xyz", str(src), str(out)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: {src}: frame 3: pbc: periodic frame (the packed format has no cell; molecules only)"
    ]
    assert not out.exists()
    skipped = pack_xyz([src], out, skip_invalid=True)
    assert (skipped.n_molecules, skipped.skipped) == (5, 1)
    assert skipped.skipped_first == [f"{src}: frame 3: pbc: periodic frame (the packed format has no cell; molecules only)"]
    assert json.loads((out / "meta.json").read_text())["provenance"]["skipped_by_reason"] == {
        "pbc: periodic frame (the packed format has no cell; molecules only)": 1
    }


@pytest.mark.parametrize("parser", ["auto", "ase"])
def test_frame_without_forces_one_line_error(tmp_path: Path, parser: str) -> None:
    frames = make_frames(6, seed=5)
    frames[4].calc = SinglePointCalculator(frames[4], energy=-5.0)  # energy only
    src = write(tmp_path / "noforces.xyz", frames)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["pack", "xyz", str(src), str(out), "--parser", parser])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [f"Error: {src}: frame 4: forces: missing (no forces entry)"]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["noforces.xyz"]


def test_frame_without_energy_skipped_and_counted(tmp_path: Path) -> None:
    frames = make_frames(8, seed=6)
    frames[2].calc = SinglePointCalculator(frames[2], forces=np.zeros((len(frames[2]), 3)))
    frames[5].calc.results["energy"] = float("nan")
    src = write(tmp_path / "noenergy.xyz", frames)
    with pytest.raises(Exception, match="frame 2: energy: missing"):
        pack_xyz([src], tmp_path / "strict")
    result = pack_xyz([src], tmp_path / "out", skip_invalid=True)
    assert (result.n_molecules, result.skipped) == (6, 2)
    assert result.skipped_first[1] == f"{src}: frame 5: energy: non-finite value"
    ds = open_packed(result.path)
    kept = [a for i, a in enumerate(frames) if i not in (2, 5)]
    np.testing.assert_array_equal(ds.E, [a.calc.results["energy"] * EV_TO_KCAL_MOL for a in kept])


def test_no_forces_anywhere_packs_without_forces(tmp_path: Path) -> None:
    src = write(tmp_path / "e.xyz", make_frames(5, seed=7, forces=False))
    out = pack_xyz([src], tmp_path / "out").path
    assert open_packed(out).F is None
    assert_matches_ase(out, [src], forces_key=None)


@pytest.mark.parametrize("parser", ["auto", "ase"])
def test_truncated_file_one_line_error(tmp_path: Path, parser: str) -> None:
    src = write(tmp_path / "cut.xyz", make_frames(10, seed=8))
    data = src.read_bytes()
    src.write_bytes(data[: int(len(data) * 0.55)])
    result = CliRunner().invoke(app, ["pack", "xyz", str(src), str(tmp_path / "out"), "--parser", parser])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {src}: frame ")
    assert not (tmp_path / "out").exists()


def test_missing_ase_says_which_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = write(tmp_path / "a.xyz", make_frames(2))
    monkeypatch.setitem(sys.modules, "ase.io", None)
    result = CliRunner().invoke(app, ["pack", "xyz", str(src), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "Error: pack xyz needs the ase package (ase.io missing): pip install 'packedqdc[ase]'"
    ]


def test_errors_name_the_file_and_its_own_frame_number(tmp_path: Path) -> None:
    first = write(tmp_path / "a.xyz", make_frames(4, seed=20))
    frames = make_frames(5, seed=21)
    frames[2].cell = np.eye(3) * 9.0
    frames[2].pbc = (True, False, False)
    second = write(tmp_path / "b.xyz", frames)
    with pytest.raises(Exception, match=rf"^{second}: frame 2: pbc: periodic frame"):
        pack_xyz([first, second], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fast_only_parser_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    src = write(tmp_path / "a.xyz", make_frames(4, seed=22))
    lines = src.read_text().splitlines()
    lines[1] += " flag"  # a key without a value: the fast reader hands such frames to ASE
    src.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(app, ["pack", "xyz", str(src), str(tmp_path / "out"), "--parser", "fast"])
    assert result.exit_code == 1
    assert result.output.strip().startswith(f"Error: {src}: frame 0: the fast extended XYZ reader cannot read it")
    assert pack_xyz([src], tmp_path / "auto").n_molecules == 4


def test_unknown_symbol_is_an_error_naming_the_frame(tmp_path: Path) -> None:
    src = write(tmp_path / "a.xyz", make_frames(4, seed=23))
    text = src.read_text().splitlines()
    start = 2 + int(text[0]) + 2  # first atom line of frame 1
    text[start] = "Qq" + text[start][2:]
    src.write_text("\n".join(text) + "\n")
    with pytest.raises(Exception, match=rf"^{src}: frame 1: not readable as extended XYZ \(unknown element symbol 'Qq'\)"):
        pack_xyz([src], tmp_path / "out")


def test_value_that_overflows_float32_is_one_line_error(tmp_path: Path) -> None:
    frames = make_frames(3, seed=24)
    frames[1].positions[0, 0] = 1e39  # finite as read, inf once stored as float32
    src = write(tmp_path / "big.xyz", frames)
    result = CliRunner().invoke(app, ["pack", "xyz", str(src), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"Error: {src}: frame 1: pos: non-finite value"]
