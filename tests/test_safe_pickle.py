"""The restricted unpickler: NumPy payloads load, anything that names another global is refused."""

from __future__ import annotations

import builtins
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from packedqdc.errors import SourceError
from packedqdc.sources.safe_pickle import UnsafePickleError, load_restricted


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_payload_round_trips(tmp_path: Path, protocol: int) -> None:
    """What openqdc writes to props.pkl: a dict of (uniques, inverse) string tuples and arrays."""
    subsets = np.unique(np.array(["alpha", "beta", "alpha"]), return_inverse=True)
    payload = {"subset": subsets, "n_atoms": np.arange(3, dtype=np.int32), "scale": np.float64(2.5), "names": ["a"]}
    file = tmp_path / "props.pkl"
    file.write_bytes(pickle.dumps(payload, protocol=protocol))
    loaded = load_restricted(file)
    np.testing.assert_array_equal(loaded["subset"][0], subsets[0])
    np.testing.assert_array_equal(loaded["subset"][1], subsets[1])
    assert loaded["n_atoms"].dtype == np.int32 and loaded["scale"] == 2.5 and loaded["names"] == ["a"]


class _Calls:
    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return (self.func, self.args)


@pytest.mark.parametrize(
    "payload",
    [
        lambda marker: _Calls(os.system, f"touch {marker}"),
        lambda marker: _Calls(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        lambda marker: np.array([_Calls(os.system, f"touch {marker}")], dtype=object),
    ],
    ids=["os.system", "builtins.exec", "object-array"],
)
def test_crafted_pickle_is_refused_and_not_run(tmp_path: Path, payload) -> None:
    marker = tmp_path / "marker"
    file = tmp_path / "props.pkl"
    file.write_bytes(pickle.dumps({"subset": payload(marker)}))
    with pytest.raises(UnsafePickleError) as info:
        load_restricted(file)
    assert str(file) in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


def test_not_a_pickle(tmp_path: Path) -> None:
    file = tmp_path / "props.pkl"
    file.write_bytes(b"\x80\x04garbage")
    with pytest.raises(SourceError, match="not a readable pickle"):
        load_restricted(file)
