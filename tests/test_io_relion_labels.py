"""RELION labels <-> internal units: exact STAR -> internal -> STAR, origin sign and units."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from autospa.conventions import euler_to_matrix, matrix_to_euler, origin_angst_to_px, origin_px_to_angst
from autospa.io.particles_star import read_particles_star
from autospa.io.relion_labels import (
    convert_relion30_particles,
    label_to_name,
    name_to_label,
    params_from_star,
    params_to_star,
    snap_significant,
)
from autospa.io.star import read_star, write_star
from test_io_data import make_project


def test_star_internal_star_is_exact(tmp_path: Path) -> None:
    star, _, parts = make_project(tmp_path, n_mics=4, groups=2, apix=1.37)
    t = read_particles_star(star)
    params = params_from_star(t.particles, t.optics)
    out = params_to_star(params, t.particles)
    assert list(out.columns) == list(t.particles.columns)  # nothing added, order kept
    p2 = write_star(tmp_path / "again.star", {"optics": t.optics, "particles": out})
    back = read_star(p2)["particles"]
    for col in parts.columns:
        a, b = t.particles[col].to_numpy(), back[col].to_numpy()
        if a.dtype.kind == "f":
            assert np.array_equal(a, b), col  # bit-exact, including origins (/ apix * apix)
        else:
            assert [str(x) for x in a] == [str(x) for x in b], col
    assert star.read_text().split("data_particles")[1] == p2.read_text().split("data_particles")[1]


def test_euler_round_trip_through_conventions(tmp_path: Path) -> None:
    """STAR angles -> RELION's matrix A -> angles -> STAR -> A again: same rotations, same angles."""
    star, _, _ = make_project(tmp_path, n_mics=4, groups=2, apix=1.37)
    t = read_particles_star(star)
    p = params_from_star(t.particles, t.optics)
    # add gimbal-lock rows (tilt 0 and 180): the matrix survives even where the angles change
    p.tilt_deg[:2] = [0.0, 180.0]
    a = euler_to_matrix(torch.tensor(p.rot_deg), torch.tensor(p.tilt_deg), torch.tensor(p.psi_deg))
    rot, tilt, psi = (x.numpy() for x in matrix_to_euler(a))
    p.rot_deg, p.tilt_deg, p.psi_deg = rot, tilt, psi
    out = params_to_star(p, t.particles)
    back = read_star(write_star(tmp_path / "euler.star", {"optics": t.optics, "particles": out}))["particles"]
    b = euler_to_matrix(*(torch.tensor(back[c].to_numpy()) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")))
    assert torch.allclose(a, b, atol=1e-12, rtol=0)
    # away from gimbal lock the angles themselves come back (tilt in [0, 180], rot/psi in (-180, 180])
    orig = t.particles.iloc[2:]
    for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"):
        d = (back[c].to_numpy()[2:] - orig[c].to_numpy() + 180.0) % 360.0 - 180.0
        assert np.abs(d).max() < 1e-9, c
    # the rows at gimbal lock: RELION puts the whole in-plane angle into psi, rot = 0
    assert back["rlnAngleRot"].iloc[:2].tolist() == [0.0, 0.0] and back["rlnAngleTilt"].iloc[:2].tolist() == [0.0, 180.0]


def test_origins_follow_conventions() -> None:
    """rlnOriginXAngst -> pixels (conventions.origin_angst_to_px) -> the particle centre in the box."""
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [2.0], "rlnImageSize": [64]})
    parts = pd.DataFrame({"rlnOpticsGroup": [1, 1], "rlnOriginXAngst": [4.0, -3.0], "rlnOriginYAngst": [-6.0, 1.0]})
    p = params_from_star(parts, optics)
    assert np.array_equal(p.origin_x_px, origin_angst_to_px(parts["rlnOriginXAngst"].to_numpy(), 2.0))
    # the particle sits at box_centre - origin (RELION): a 64 px box has its centre at pixel 32
    centre_x = 64 // 2 - p.origin_x_px
    centre_y = 64 // 2 - p.origin_y_px
    assert centre_x.tolist() == [30.0, 33.5] and centre_y.tolist() == [35.0, 31.5]
    assert np.array_equal(params_to_star(p)["rlnOriginYAngst"].to_numpy(), origin_px_to_angst(p.origin_y_px, 2.0))


def test_many_significant_digits_survive_the_origin_conversion() -> None:
    rng = np.random.default_rng(5)
    n = 2000
    origin_a = np.array([float(f"{v:.10g}") for v in rng.uniform(-50, 50, n)])
    apix = np.array([float(f"{v:.6g}") for v in rng.uniform(0.5, 5.0, n)])
    optics = pd.DataFrame({"rlnOpticsGroup": np.arange(1, n + 1), "rlnImagePixelSize": apix})
    parts = pd.DataFrame({"rlnOriginXAngst": origin_a, "rlnOriginYAngst": -origin_a, "rlnOpticsGroup": np.arange(1, n + 1)})
    params = params_from_star(parts, optics)
    back = params_to_star(params, parts)
    assert np.array_equal(back["rlnOriginXAngst"].to_numpy(), origin_a)
    assert np.array_equal(back["rlnOriginYAngst"].to_numpy(), -origin_a)
    naive = params.origin_x_px * apix
    assert not np.array_equal(naive, origin_a)  # without snapping the last bit would differ


def test_units_and_signs() -> None:
    optics = pd.DataFrame({"rlnOpticsGroup": [1, 2], "rlnImagePixelSize": [1.5, 3.0], "rlnVoltage": [300.0, 200.0], "rlnSphericalAberration": [2.7, 0.01], "rlnAmplitudeContrast": [0.1, 0.07]})
    parts = pd.DataFrame(
        {
            "rlnOpticsGroup": [1, 2],
            "rlnOriginXAngst": [3.0, 3.0],
            "rlnOriginYAngst": [-1.5, 6.0],
            "rlnAngleRot": [10.0, 20.0],
            "rlnAngleTilt": [30.0, 40.0],
            "rlnAnglePsi": [50.0, 60.0],
            "rlnDefocusU": [15000.0, 9000.0],
            "rlnClassNumber": [3, 1],
        }
    )
    p = params_from_star(parts, optics)
    assert p.origin_x_px.tolist() == [2.0, 1.0] and p.origin_y_px.tolist() == [-1.0, 2.0]  # same sign, pixels
    assert p.pixel_size_a.tolist() == [1.5, 3.0] and p.voltage_kv.tolist() == [300.0, 200.0]
    assert p.cs_mm.tolist() == [2.7, 0.01] and p.amplitude_contrast.tolist() == [0.1, 0.07]
    assert p.defocus_u_a.tolist() == [15000.0, 9000.0] and np.isnan(p.defocus_v_a).all()  # missing -> NaN
    assert p.class_number.tolist() == [3, 1] and p.random_subset.tolist() == [0, 0]
    assert p.ctf_scale.tolist() == [1.0, 1.0]
    # the angles are the ones conventions.euler_to_matrix takes (degrees, RELION's ZYZ)
    m = euler_to_matrix(torch.tensor(p.rot_deg), torch.tensor(p.tilt_deg), torch.tensor(p.psi_deg))
    assert torch.allclose(m @ m.transpose(-1, -2), torch.eye(3, dtype=m.dtype).expand(2, 3, 3), atol=1e-12)
    sub = p.subset(np.array([1]))
    assert len(sub) == 1 and sub.origin_x_px.tolist() == [1.0]
    out = params_to_star(p)
    assert "rlnDefocusU" in out and "rlnDefocusV" not in out and "rlnRandomSubset" not in out
    assert out["rlnOriginXAngst"].tolist() == [3.0, 3.0]


def test_store_names() -> None:
    assert label_to_name("rlnDefocusU") == "DefocusU" and name_to_label("DefocusU") == "rlnDefocusU"
    assert label_to_name("myScore") == "myScore" and name_to_label("rlnX") == "rlnX"


def test_relion30_grouping_by_optics() -> None:
    parts = pd.DataFrame(
        {
            "rlnImageName": ["1@a.mrcs", "2@a.mrcs", "1@b.mrcs"],
            "rlnDetectorPixelSize": [5.0, 5.0, 5.0],
            "rlnMagnification": [50000.0, 50000.0, 50000.0],
            "rlnVoltage": [300.0, 200.0, 300.0],
            "rlnOriginX": [1.0, 2.0, 3.0],
        }
    )
    optics, out = convert_relion30_particles(parts, image_size=64)
    assert out["rlnOpticsGroup"].tolist() == [1, 2, 1]
    assert optics["rlnVoltage"].tolist() == [300.0, 200.0]
    assert optics["rlnImagePixelSize"].tolist() == [1.0, 1.0]
    assert out["rlnOriginXAngst"].tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("value", [0.1, -3.141593, 12345.678901, 1e-7, 0.0])
def test_snap(value: float) -> None:
    assert snap_significant(np.array([value * (1 + 2e-16)]))[0] == value
