"""Particle STAR files: validation, optics lookup, image names and stack paths, RELION 3.0 files."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from autospa.errors import InputError
from autospa.io.mrc import write_mrc
from autospa.io.particles_star import parse_image_name, parse_image_names, read_particles_star, resolve_stack_path
from autospa.io.star import read_star, write_star
from test_io_data import make_project, optics_table


def test_optics_lookup_per_particle(tmp_path: Path) -> None:
    star, _, parts = make_project(tmp_path, n_mics=4, groups=2, apix=1.5)
    t = read_particles_star(star)
    assert t.n_particles == len(parts) and t.relion_version == 30001
    groups = parts["rlnOpticsGroup"].to_numpy()
    assert np.array_equal(t.optics_group, groups)
    assert np.array_equal(t.pixel_size_a, np.where(groups == 1, 1.5, 3.0))
    assert np.all(t.image_size == 16)
    m = t.merged()
    assert len(m) == len(parts)
    assert np.array_equal(m["rlnImagePixelSize"].to_numpy(), t.pixel_size_a)
    assert m["rlnVoltage"].eq(300.0).all()
    assert list(m.columns[: len(parts.columns)]) == list(parts.columns)


def test_image_names() -> None:
    assert parse_image_name("000012@Particles/a.mrcs") == (11, "Particles/a.mrcs")
    assert parse_image_name("1@/abs/path/x@y.mrcs") == (0, "/abs/path/x@y.mrcs")
    assert parse_image_name("single.mrc") == (0, "single.mrc")
    for bad in ("0@a.mrcs", "x@a.mrcs", "-1@a.mrcs", "3@"):
        with pytest.raises(ValueError):
            parse_image_name(bad)
    idx, paths = parse_image_names(["000001@a.mrcs", "12@b/c.mrcs", "d.mrc"])
    assert idx.tolist() == [0, 11, 0] and paths.tolist() == ["a.mrcs", "b/c.mrcs", "d.mrc"]
    with pytest.raises(InputError, match="particle 2"):
        parse_image_names(["1@a.mrcs", "0@a.mrcs"], "x.star")


def test_stack_paths_star_folder_first_then_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    star = tmp_path / "Job" / "p.star"
    star.parent.mkdir()
    star.write_text("data_\n")
    write_mrc(tmp_path / "Job" / "Particles" / "a.mrcs", np.zeros((1, 4, 4), np.float32), 1.0)
    write_mrc(tmp_path / "Particles" / "a.mrcs", np.ones((1, 4, 4), np.float32), 1.0)
    write_mrc(tmp_path / "Other" / "b.mrcs", np.ones((1, 4, 4), np.float32), 1.0)
    monkeypatch.chdir(tmp_path)
    # relative to the STAR file's folder wins...
    assert resolve_stack_path(star, "Particles/a.mrcs") == star.parent / "Particles/a.mrcs"
    # ...then the project directory (cwd)
    assert resolve_stack_path(star, "Other/b.mrcs").resolve() == (tmp_path / "Other/b.mrcs").resolve()
    # absolute paths as they are
    assert resolve_stack_path(star, str(tmp_path / "Other/b.mrcs")) == tmp_path / "Other/b.mrcs"
    with pytest.raises(InputError) as ei:
        resolve_stack_path(star, "Nowhere/c.mrcs")
    assert str(star) in str(ei.value) and "Nowhere/c.mrcs" in str(ei.value)


def _write(tmp_path: Path, optics: pd.DataFrame | None, parts: pd.DataFrame) -> Path:
    blocks = {"particles": parts} if optics is None else {"optics": optics, "particles": parts}
    return write_star(tmp_path / "p.star", blocks)


@pytest.mark.parametrize(
    ("drop_from", "label"),
    [
        ("particles", "rlnImageName"),
        ("particles", "rlnOpticsGroup"),
        ("optics", "rlnImagePixelSize"),
        ("optics", "rlnImageSize"),
        ("optics", "rlnOpticsGroup"),
    ],
)
def test_missing_required_label(tmp_path: Path, drop_from: str, label: str) -> None:
    star, _, parts = make_project(tmp_path, n_mics=1)
    optics = optics_table()
    if drop_from == "particles":
        parts = parts.drop(columns=label)
    else:
        optics = optics.drop(columns=label)
    p = _write(tmp_path, optics, parts)
    with pytest.raises(InputError) as ei:
        read_particles_star(p)
    msg = str(ei.value)
    assert str(p) in msg and label in msg and "\n" not in msg


def test_undefined_optics_group(tmp_path: Path) -> None:
    _, _, parts = make_project(tmp_path, n_mics=1)
    parts.loc[3, "rlnOpticsGroup"] = 7
    p = _write(tmp_path, optics_table(), parts)
    with pytest.raises(InputError, match=r"particle 4 references optics group 7, which data_optics does not define"):
        read_particles_star(p)


def test_bad_values(tmp_path: Path) -> None:
    _, _, parts = make_project(tmp_path, n_mics=1)
    o = optics_table()
    o["rlnImagePixelSize"] = -1.0
    with pytest.raises(InputError, match="rlnImagePixelSize must be positive"):
        read_particles_star(_write(tmp_path, o, parts))
    bad = parts.copy()
    bad.loc[0, "rlnImageName"] = "0@x.mrcs"
    with pytest.raises(InputError, match="rlnImageName of particle 1"):
        read_particles_star(_write(tmp_path, optics_table(), bad))
    with pytest.raises(InputError, match="holds no particles"):
        read_particles_star(_write(tmp_path, optics_table(), parts.iloc[:0]))
    q = tmp_path / "mics.star"
    write_star(q, {"optics": optics_table(), "micrographs": pd.DataFrame({"rlnMicrographName": ["a.mrc"], "rlnOpticsGroup": [1]})})
    with pytest.raises(InputError, match="no particle block"):
        read_particles_star(q)


def test_relion30_file_is_converted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_mrc(tmp_path / "Particles" / "a.mrcs", np.zeros((3, 20, 20), np.float32), 2.0)
    parts = pd.DataFrame(
        {
            "rlnImageName": ["1@Particles/a.mrcs", "2@Particles/a.mrcs", "3@Particles/a.mrcs"],
            "rlnOriginX": [1.5, -2.0, 0.0],
            "rlnOriginY": [0.25, 3.0, -1.0],
            "rlnDetectorPixelSize": [14.0, 14.0, 14.0],
            "rlnMagnification": [70000.0, 70000.0, 50000.0],
            "rlnVoltage": [300.0, 300.0, 300.0],
            "rlnSphericalAberration": [2.7, 2.7, 2.7],
            "rlnAmplitudeContrast": [0.1, 0.1, 0.1],
            "rlnDefocusU": [10000.0, 12000.0, 14000.0],
            "rlnGroupName": ["g1", "g1", "g2"],
        }
    )
    p = write_star(tmp_path / "old.star", {"": parts})
    with caplog.at_level(logging.WARNING):
        t = read_particles_star(p)
    assert "RELION 3.0" in caplog.text
    assert t.relion_version == 30000
    assert np.allclose(t.pixel_size_a, [2.0, 2.0, 2.8])
    assert len(t.optics) == 2 and t.optics["rlnImageSize"].tolist() == [20, 20]
    assert np.allclose(t.particles["rlnOriginXAngst"], np.array([1.5, -2.0, 0.0]) * [2.0, 2.0, 2.8])
    assert np.allclose(t.particles["rlnOriginYAngst"], np.array([0.25, 3.0, -1.0]) * [2.0, 2.0, 2.8])
    for gone in ("rlnOriginX", "rlnDetectorPixelSize", "rlnMagnification", "rlnVoltage"):
        assert gone not in t.particles
    assert t.particles["rlnDefocusU"].tolist() == [10000.0, 12000.0, 14000.0]
    assert set(t.optics["rlnVoltage"]) == {300.0}
    # RELION 3.0 without any pixel size information
    q = write_star(tmp_path / "nopix.star", {"": parts.drop(columns=["rlnMagnification"])})
    with pytest.raises(InputError, match="rlnDetectorPixelSize and rlnMagnification"):
        read_particles_star(q)


def test_star_blocks_round_trip_through_table(tmp_path: Path) -> None:
    star, _, parts = make_project(tmp_path, n_mics=2)
    t = read_particles_star(star)
    back = read_star(star)["particles"]
    assert list(t.particles.columns) == list(back.columns) == list(parts.columns)
    assert t.particles["rlnGroupName"].eq("00012").all()
