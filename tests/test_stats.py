"""stats: library figures and the ``packedqdc stats`` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from packedqdc.cli import app
from packedqdc.stats import dataset_stats

from test_loader import write_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("s") / "ds", n_mol=500, lo=3, hi=20, seed=4)


def test_stats_library(data):
    s = dataset_stats(data, batch_size=16, num_atoms=30, bucket_size=64, sweep=(32, 128))
    n = np.load(data / "n_atoms.npy")
    assert s["n_molecules"] == 500 and sum(s["size_histogram"].values()) == 500
    assert s["atoms_per_molecule"]["max"] == n.max()
    E = np.fromfile(data / "E.f64")
    assert s["energy_kcal_mol"]["min"] == E.min() and s["energy_kcal_mol"]["max"] == E.max()
    assert s["padded"]["atom_efficiency"] == pytest.approx(n.sum() / (s["padded"]["batches"] * 16 * 30))
    assert s["packed"]["atom_efficiency"] > 0.9 and s["packed"]["shapes"] <= 4
    assert [r["bucket_size"] for r in s["bucket_sweep"]] == [32, 64, 128]


def test_stats_cli_json(data):
    result = CliRunner().invoke(app, ["stats", str(data), "--json", "--batch-size", "16", "--num-atoms", "30"])
    assert result.exit_code == 0, result.output
    s = json.loads(result.output)
    assert s["settings"]["batch_size"] == 16 and "recommendation" in s


def test_stats_cli_table_and_plot(data, tmp_path):
    png = tmp_path / "s.png"
    result = CliRunner().invoke(app, ["stats", str(data), "--num-atoms", "10", "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert "recommendation" in result.output and png.stat().st_size > 0
    assert "3..20 atoms" in result.output.replace("\n", " ")


def test_stats_num_atoms_too_small(data):
    s = dataset_stats(data, num_atoms=10)
    first = int(np.flatnonzero(np.load(data / "n_atoms.npy") > 10)[0])
    assert s["padded"] == {"fits": False, "first_too_large": first, "its_atoms": int(np.load(data / "n_atoms.npy")[first])}


def test_stats_cli_damaged(tmp_path):
    result = CliRunner().invoke(app, ["stats", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "Error" in result.output
