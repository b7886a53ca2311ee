"""STAR files: exact round trips, unknown labels, RELION's version line, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile

from autospa.errors import InputError
from autospa.io.star import RELION_VERSION_LINE, read_star, star_to_string, write_star


def _table(n: int = 50, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@Particles/mic_{i % 4}.mrcs" for i in range(n)],
            "rlnDefocusU": rng.uniform(5000, 30000, n),  # full float64 precision
            "rlnAnglePsi": rng.uniform(-180, 180, n),
            "rlnTiny": rng.uniform(-1, 1, n) * 1e-25,
            "rlnHuge": rng.uniform(-1, 1, n) * 1e25,
            "rlnClassNumber": rng.integers(1, 100, n),
            "rlnMicrographName": ["00012"] * n,  # numeric-looking string must stay a string
            "rlnGroupName": [f"group {i}" if i % 3 else "" for i in range(n)],  # spaces, empty
            "_unknownLabel": rng.normal(size=n),
            "someOtherSoftwareLabel": [f"x{i}" for i in range(n)],
        }
    ).rename(columns={"_unknownLabel": "unknownLabel"})


def _assert_frames_identical(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns)
    assert len(a) == len(b)
    for col in a.columns:
        va, vb = a[col].to_numpy(), b[col].to_numpy()
        if va.dtype.kind == "f":
            assert vb.dtype.kind == "f", col
            assert np.array_equal(va, vb), col  # bit-exact
        elif va.dtype.kind in "iu":
            assert vb.dtype.kind in "iu", col
            assert np.array_equal(va, vb), col
        else:
            assert [str(x) for x in va] == [str(x) for x in vb], col


def test_round_trip_is_exact_with_unknown_labels(tmp_path: Path) -> None:
    parts = _table()
    optics = {"rlnOpticsGroup": 1, "rlnImagePixelSize": 1.0 / 3.0, "rlnOpticsGroupName": "opticsGroup1"}
    p = write_star(tmp_path / "a.star", {"optics": optics, "particles": parts})
    blocks = read_star(p)
    assert list(blocks) == ["optics", "particles"]
    assert blocks["optics"] == optics  # single-row block -> dict, exact
    _assert_frames_identical(parts, blocks["particles"])
    assert blocks["particles"]["rlnMicrographName"].iloc[0] == "00012"
    # and a second round trip gives the same text
    p2 = write_star(tmp_path / "b.star", blocks)
    assert p2.read_text() == p.read_text()


def test_version_line_before_each_block_and_starfile_reads_it(tmp_path: Path) -> None:
    blocks = {"general": {"rlnSchemeName": "Schemes/prep/"}, "optics": pd.DataFrame({"rlnOpticsGroup": [1, 2]}), "particles": _table(5)}
    p = write_star(tmp_path / "v.star", blocks)
    lines = p.read_text().splitlines()
    data_lines = [i for i, s in enumerate(lines) if s.startswith("data_")]
    assert len(data_lines) == 3
    for i in data_lines:
        prev = [s for s in lines[:i] if s.strip()]
        assert prev[-1] == RELION_VERSION_LINE
    direct = starfile.read(p, always_dict=True)
    assert list(direct) == ["general", "optics", "particles"]
    assert direct["optics"]["rlnOpticsGroup"].tolist() == [1, 2]
    no_version = star_to_string(blocks, version_line=False)
    assert "# version" not in no_version


def test_empty_loop_followed_by_a_block(tmp_path: Path) -> None:
    blocks = {"empty": pd.DataFrame({"rlnImageName": pd.Series([], dtype=str), "rlnX": pd.Series([], dtype=float)}), "next": pd.DataFrame({"rlnY": [1.25, 2.5]})}
    p = write_star(tmp_path / "e.star", blocks)
    out = read_star(p)
    assert list(out["empty"].columns) == ["rlnImageName", "rlnX"] and len(out["empty"]) == 0
    assert out["next"]["rlnY"].tolist() == [1.25, 2.5]


def test_write_is_atomic_and_keeps_old_file_on_error(tmp_path: Path) -> None:
    p = write_star(tmp_path / "k.star", {"a": {"rlnX": 1}})
    before = p.read_bytes()
    with pytest.raises(TypeError):
        write_star(p, {"a": [1, 2, 3]})  # not a block
    assert p.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["k.star"]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "empty file"),
        (b"   \n\n", "empty file"),
        (b"hello world\nthis is not star\n", "no data_ block"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00data_", "binary"),
        (b"data_particles\n\nloop_\n_rlnA #1\n_rlnB #2\n_rlnC #3\n1 2 3\n4 5 6\n7 8\n", "truncated or malformed"),
    ],
)
def test_bad_star_files_raise_input_error(tmp_path: Path, content: bytes, problem: str) -> None:
    p = tmp_path / "bad.star"
    p.write_bytes(content)
    with pytest.raises(InputError) as ei:
        read_star(p)
    msg = str(ei.value)
    assert str(p) in msg and problem in msg
    assert "\n" not in msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="file not found"):
        read_star(tmp_path / "nope.star")
