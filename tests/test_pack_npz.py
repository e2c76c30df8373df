"""pack npz: layouts, units, byte identity with the seed's hand packing, value errors, CLI."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from packedqdc.cli import app
from packedqdc.errors import ConfigError, SourceError, TargetExistsError
from packedqdc.format import F_FILE, open_packed
from packedqdc.pack import pack_npz
from packedqdc.sources import UnreadableSourceError
from packedqdc.sources.npz import parse_keys
from packedqdc.units import BOHR_TO_ANGSTROM, EV_TO_KCAL_MOL, HARTREE_TO_KCAL_MOL, KJ_MOL_TO_KCAL_MOL

DATA_FILES = ("offsets.npy", "n_atoms.npy", "Z_pack.int32", "R_pack.f32", "F_pack.f32", "E.f64", "Qtot.f64")
runner = CliRunner()


def _flatten(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The seed's hand packing of padded arrays: real atoms concatenated in molecule order."""
    n = d["N"]
    real = np.arange(d["Z"].shape[1]) < n[:, None]
    return {"n": n, "Z": d["Z"][real], "R": d["R"][real], "F": d["F"][real], "E": d["E"], "Q": d["Q"]}


def _assert_packed(path: Path, flat: dict[str, np.ndarray], forces: bool = True) -> None:
    ds = open_packed(path)
    np.testing.assert_array_equal(ds.n_atoms, flat["n"])
    np.testing.assert_array_equal(ds.Z, flat["Z"])
    np.testing.assert_array_equal(ds.R, flat["R"])
    np.testing.assert_array_equal(ds.E, flat["E"])
    if forces:
        np.testing.assert_array_equal(ds.F, flat["F"])
    else:
        assert ds.F is None and not (path / F_FILE).exists()


def _save(path: Path, compressed: bool = False, **arrays: np.ndarray) -> Path:
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def test_physnet_layout_is_byte_identical_to_seed_hand_packing(tmp_path: Path, make_padded) -> None:
    d = make_padded(m=50, width=11)
    out = pack_npz(_save(tmp_path / "in.npz", **d), tmp_path / "packed", chunk_size=8).path
    flat = _flatten(d)
    seed = tmp_path / "seed"
    seed.mkdir()
    np.save(seed / "offsets.npy", np.concatenate([[0], np.cumsum(flat["n"])]).astype(np.int64))
    np.save(seed / "n_atoms.npy", flat["n"].astype(np.int32))
    flat["Z"].astype(np.int32).tofile(seed / "Z_pack.int32")
    flat["R"].astype(np.float32).tofile(seed / "R_pack.f32")
    flat["F"].astype(np.float32).tofile(seed / "F_pack.f32")
    flat["E"].astype(np.float64).tofile(seed / "E.f64")
    flat["Q"].astype(np.float64).tofile(seed / "Qtot.f64")
    for name in DATA_FILES:
        assert (out / name).read_bytes() == (seed / name).read_bytes(), name


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_padded_round_trip(tmp_path: Path, make_padded, compressed: bool, chunk_size: int) -> None:
    d = make_padded()
    out = pack_npz(_save(tmp_path / "in.npz", compressed, **d), tmp_path / "p", chunk_size=chunk_size).path
    _assert_packed(out, _flatten(d))
    np.testing.assert_array_equal(open_packed(out).Qtot, d["Q"])
    assert json.loads((out / "meta.json").read_text())["provenance"]["layout"] == "padded"


def test_padded_without_n_infers_it_from_z(tmp_path: Path, make_padded) -> None:
    d = make_padded()
    arrays = {k: v for k, v in d.items() if k != "N"}
    _assert_packed(pack_npz(_save(tmp_path / "in.npz", **arrays), tmp_path / "p").path, _flatten(d))


def test_extra_keys_and_e_of_shape_m1_are_accepted(tmp_path: Path, make_padded) -> None:
    d = make_padded()
    arrays = dict(d, E=d["E"][:, None], smiles=np.array(["C"] * 40), info=np.array("text"), D=np.zeros((40, 3)))
    _assert_packed(pack_npz(_save(tmp_path / "in.npz", **arrays), tmp_path / "p").path, _flatten(d))


def _trajectory(m: int = 30, a: int = 6, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "z": rng.integers(1, 9, size=a).astype(np.uint8),
        "R": rng.normal(size=(m, a, 3)),
        "E": rng.normal(size=(m, 1)),
        "F": rng.normal(size=(m, a, 3)),
    }


def _trajectory_flat(t: dict[str, np.ndarray], e_f: float = 1.0, r_f: float = 1.0) -> dict[str, np.ndarray]:
    m, a = t["R"].shape[:2]
    return {
        "n": np.full(m, a),
        "Z": np.tile(t["z"], m),
        "R": (t["R"].reshape(-1, 3) * r_f).astype(np.float32),
        "F": (t["F"].reshape(-1, 3) * e_f / r_f).astype(np.float32),
        "E": t["E"].reshape(-1) * e_f,
    }


@pytest.mark.parametrize("compressed", [False, True])
def test_sgdml_trajectory_round_trip(tmp_path: Path, compressed: bool) -> None:
    t = _trajectory()
    out = pack_npz(_save(tmp_path / "in.npz", compressed, **t, name=np.array("x")), tmp_path / "p", chunk_size=7).path
    _assert_packed(out, _trajectory_flat(t))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["provenance"]["layout"] == "trajectory"
    assert meta["provenance"]["had_charges"] is False
    assert "no total charges" in meta["qtot_note"]
    np.testing.assert_array_equal(open_packed(out).Qtot, np.zeros(30))


def test_rmd17_names_round_trip(tmp_path: Path) -> None:
    t = _trajectory()
    arrays = {"nuclear_charges": t["z"], "coords": t["R"], "energies": t["E"][:, 0], "forces": t["F"],
              "old_indices": np.arange(30)}
    out = pack_npz(_save(tmp_path / "in.npz", **arrays), tmp_path / "p").path
    _assert_packed(out, _trajectory_flat(t))
    assert json.loads((out / "meta.json").read_text())["provenance"]["keys"]["R"] == "coords"


def test_flat_layout_round_trip(tmp_path: Path, make_padded) -> None:
    flat = _flatten(make_padded())
    arrays = {"N": flat["n"], "Z": flat["Z"], "R": flat["R"], "E": flat["E"], "F": flat["F"], "U0": flat["E"]}
    out = pack_npz(_save(tmp_path / "in.npz", **arrays), tmp_path / "p", chunk_size=6).path
    _assert_packed(out, flat)
    assert json.loads((out / "meta.json").read_text())["provenance"]["layout"] == "flat"


def test_keys_option_maps_custom_names(tmp_path: Path, make_padded) -> None:
    d = make_padded()
    arrays = {"pos": d["R"], "numbers": d["Z"], "natoms": d["N"], "energy_total": d["E"]}
    keys = parse_keys("R=pos, Z=numbers,N=natoms,E=energy_total")
    _assert_packed(pack_npz(_save(tmp_path / "in.npz", **arrays), tmp_path / "p", keys=keys).path,
                   _flatten(d), forces=False)


@pytest.mark.parametrize("spec", ["R", "X=coords", "R="])
def test_bad_keys_option(spec: str) -> None:
    with pytest.raises(ConfigError, match="--keys"):
        parse_keys(spec)


@pytest.mark.parametrize(
    ("energy_unit", "length_unit", "e_f", "r_f"),
    [
        ("ev", "ang", EV_TO_KCAL_MOL, 1.0),
        ("hartree", "bohr", HARTREE_TO_KCAL_MOL, BOHR_TO_ANGSTROM),
        ("kj/mol", "ang", KJ_MOL_TO_KCAL_MOL, 1.0),
        ("kcal/mol", "bohr", 1.0, BOHR_TO_ANGSTROM),
    ],
)
def test_unit_conversions(tmp_path: Path, energy_unit: str, length_unit: str, e_f: float, r_f: float) -> None:
    t = _trajectory()
    out = pack_npz(_save(tmp_path / "in.npz", **t), tmp_path / "p", energy_unit=energy_unit, length_unit=length_unit).path
    ds, want = open_packed(out), _trajectory_flat(t, e_f, r_f)
    np.testing.assert_allclose(ds.E, want["E"], rtol=1e-12)
    np.testing.assert_allclose(ds.R, want["R"], rtol=1e-6)
    np.testing.assert_allclose(ds.F, want["F"], rtol=1e-6)
    prov = json.loads((out / "meta.json").read_text())["provenance"]
    assert prov["factors"]["force"] == pytest.approx(e_f / r_f)
    assert prov["units_from"] == {"energy": "option", "length": "option"}


def test_units_from_file_metadata_unless_given(tmp_path: Path) -> None:
    t = _trajectory()
    npz = _save(tmp_path / "in.npz", **t, e_unit=np.array("eV"), r_unit=np.array("Ang"))
    prov = json.loads((pack_npz(npz, tmp_path / "a").path / "meta.json").read_text())["provenance"]
    assert prov["source_units"] == {"energy": "eV", "length": "Ang"}
    assert prov["units_from"] == {"energy": "file", "length": "file"}
    np.testing.assert_allclose(open_packed(tmp_path / "a").E, t["E"][:, 0] * EV_TO_KCAL_MOL)
    np.testing.assert_allclose(open_packed(pack_npz(npz, tmp_path / "b", energy_unit="kcal/mol").path).E, t["E"][:, 0])


def test_unknown_unit(tmp_path: Path, make_padded) -> None:
    with pytest.raises(ConfigError, match="unknown energy unit"):
        pack_npz(_save(tmp_path / "in.npz", **make_padded()), tmp_path / "p", energy_unit="furlong")


def _corrupt(d: dict[str, np.ndarray], key: str, index: tuple, value: float) -> dict[str, np.ndarray]:
    d = {k: v.copy() for k, v in d.items()}
    d[key][index] = value
    return d


CORRUPTIONS = [
    ("R", (17, 0, 1), np.nan, "key 'R': molecule 17: non-finite value"),
    ("F", (12, 0, 0), np.inf, "key 'F': molecule 12: non-finite value"),
    ("E", (5,), -np.inf, "key 'E': molecule 5: non-finite value"),
    ("Q", (9,), 0.5, "key 'Q': molecule 9: fractional total charge"),
    ("Q", (9,), np.nan, "key 'Q': molecule 9: non-finite value"),
    ("Z", (3, 0), 0, "key 'Z': molecule 3: atomic number outside 1..118"),
    ("Z", (21, 0), 119, "key 'Z': molecule 21: atomic number outside 1..118"),
    ("N", (30,), 99, "key 'N': molecule 30: N larger than the padded width 9"),
    ("N", (8,), 0, "key 'N': molecule 8: no atoms (N < 1)"),
]


@pytest.mark.parametrize(("key", "index", "value", "message"), CORRUPTIONS)
def test_bad_values_raise_one_line_naming_key_and_molecule(tmp_path: Path, make_padded, key, index, value, message) -> None:
    npz = _save(tmp_path / "data.npz", **_corrupt(make_padded(), key, index, value))
    with pytest.raises(SourceError) as err:
        pack_npz(npz, tmp_path / "p", chunk_size=8)
    assert str(err.value) == f"{npz}: {message}"
    assert not (tmp_path / "p").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_huge_finite_values_pass_and_nan_among_them_is_found(tmp_path: Path, make_padded) -> None:
    """The finiteness check's fast path (a chunk's sum) overflows on huge values: the exact check decides."""
    d = make_padded()
    d["F"][:, 0, :] = np.float32(3e38)  # finite, but the chunk's float32 sum overflows to inf
    _assert_packed(pack_npz(_save(tmp_path / "in.npz", **d), tmp_path / "p", chunk_size=8).path, _flatten(d))
    d["F"][14, 1, 2] = np.nan
    with pytest.raises(SourceError, match="key 'F': molecule 14: non-finite value"):
        pack_npz(_save(tmp_path / "in2.npz", **d), tmp_path / "p2", chunk_size=8)


def test_padding_z_beyond_n_is_ignored(tmp_path: Path, make_padded) -> None:
    d = make_padded()
    i = int(np.argmin(d["N"]))
    d["Z"][i, d["N"][i]:] = 200
    _assert_packed(pack_npz(_save(tmp_path / "in.npz", **d), tmp_path / "p").path, _flatten(d))


def test_first_bad_molecule_is_reported_across_chunks(tmp_path: Path, make_padded) -> None:
    d = _corrupt(_corrupt(make_padded(), "E", (33,), np.nan), "R", (25, 0, 0), np.nan)
    with pytest.raises(SourceError, match="key 'R': molecule 25: "):
        pack_npz(_save(tmp_path / "in.npz", **d), tmp_path / "p", chunk_size=10)


def test_skip_invalid_drops_bad_molecules(tmp_path: Path, make_padded) -> None:
    d = make_padded()
    for key, index, value, _ in CORRUPTIONS[:4]:
        d = _corrupt(d, key, index, value)
    result = pack_npz(_save(tmp_path / "in.npz", **d), tmp_path / "p", skip_invalid=True, chunk_size=8)
    keep = np.ones(40, bool)
    keep[[17, 12, 5, 9]] = False
    want = _flatten({k: v[keep] for k, v in d.items()})
    _assert_packed(result.path, want)
    assert result.skipped == 4 and result.n_molecules == 36
    assert "molecule 5" in result.skipped_first[0]
    assert json.loads((result.path / "meta.json").read_text())["provenance"]["skipped_invalid"] == 4


def test_missing_required_key(tmp_path: Path, make_padded) -> None:
    d = {k: v for k, v in make_padded().items() if k != "E"}
    with pytest.raises(SourceError, match=r"in.npz: key 'E' or 'energies' or 'energy': required key is missing"):
        pack_npz(_save(tmp_path / "in.npz", **d), tmp_path / "p")


def test_shape_mismatch_names_the_key(tmp_path: Path, make_padded) -> None:
    d = make_padded()
    d["E"] = d["E"][:-1]
    with pytest.raises(SourceError, match=r"key 'E': shape \(39,\), expected \(40,\)"):
        pack_npz(_save(tmp_path / "in.npz", **d), tmp_path / "p")


def test_member_shorter_than_its_header_says(tmp_path: Path, make_padded) -> None:
    """A stored member whose data ends before its header's shape does is refused at open, naming the key."""
    d = make_padded()
    path = tmp_path / "in.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for key, value in d.items():
            buf = io.BytesIO()
            np.save(buf, value)
            data = buf.getvalue()
            zf.writestr(f"{key}.npy", data[: -value[0].nbytes] if key == "R" else data)  # R lacks its last molecule
    with pytest.raises(SourceError, match=r"in.npz: key 'R': the member holds \d+ bytes of data but its header's shape"):
        pack_npz(path, tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_not_an_npz_is_unreadable(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(UnreadableSourceError, match="bad.npz: not a readable NPZ file"):
        pack_npz(bad, tmp_path / "p")


def test_existing_target_refused_then_forced(tmp_path: Path, make_padded) -> None:
    npz = _save(tmp_path / "in.npz", **make_padded())
    pack_npz(npz, tmp_path / "p")
    with pytest.raises(TargetExistsError):
        pack_npz(npz, tmp_path / "p")
    assert pack_npz(npz, tmp_path / "p", force=True).n_molecules == 40


def test_progress_callback_reaches_total(tmp_path: Path, make_padded) -> None:
    calls: list[tuple[int, int]] = []
    pack_npz(_save(tmp_path / "in.npz", **make_padded()), tmp_path / "p", chunk_size=16,
             progress=lambda done, total: calls.append((done, total)))
    assert calls[0] == (16, 40) and calls[-1] == (40, 40)


def test_bundled_sample_packs(tmp_path: Path) -> None:
    from packedqdc.data import SAMPLE_NPZ

    result = pack_npz(SAMPLE_NPZ, tmp_path / "sample")
    assert result.n_molecules == 504
    assert open_packed(result.path).meta["n_charged_molecules"] == 168


# ---- CLI ----------------------------------------------------------------------------------


def test_cli_pack_npz_ok(tmp_path: Path, make_padded) -> None:
    npz = _save(tmp_path / "in.npz", **make_padded())
    res = runner.invoke(app, ["pack", "npz", str(npz), str(tmp_path / "p"), "--chunk-size", "9"])
    assert res.exit_code == 0, res.output
    assert "Packed 40 molecules" in res.output
    res = runner.invoke(app, ["pack", "npz", str(npz), str(tmp_path / "p")])
    assert res.exit_code == 1 and "already exists" in res.output
    assert runner.invoke(app, ["pack", "npz", str(npz), str(tmp_path / "p"), "--force"]).exit_code == 0


def test_cli_pack_npz_bad_value_one_line_no_output(tmp_path: Path, make_padded) -> None:
    npz = _save(tmp_path / "data.npz", **_corrupt(make_padded(), "R", (17, 0, 1), np.nan))
    res = runner.invoke(app, ["pack", "npz", str(npz), str(tmp_path / "p")])
    assert res.exit_code == 1
    assert res.output.strip() == f"Error: {npz}: key 'R': molecule 17: non-finite value"
    assert "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.npz"]


def test_cli_pack_npz_skip_invalid_reports(tmp_path: Path, make_padded) -> None:
    npz = _save(tmp_path / "data.npz", **_corrupt(make_padded(), "R", (17, 0, 1), np.nan))
    res = runner.invoke(app, ["pack", "npz", str(npz), str(tmp_path / "p"), "--skip-invalid"])
    assert res.exit_code == 0
    assert "Skipped 1 invalid molecules" in res.output and "molecule 17" in res.output


def test_cli_pack_npz_unreadable_input_exits_2(tmp_path: Path) -> None:
    res = runner.invoke(app, ["pack", "npz", str(tmp_path / "missing.npz"), str(tmp_path / "p")])
    assert res.exit_code == 2
    assert res.output.strip() == f"Error: {tmp_path / 'missing.npz'}: no such file"


def test_cli_pack_sample(tmp_path: Path) -> None:
    res = runner.invoke(app, ["pack", "npz", "--sample", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    assert open_packed(tmp_path / "s").n_molecules == 504
