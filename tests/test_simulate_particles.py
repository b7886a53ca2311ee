"""simulate.particles: SNR, truth conventions (psi, origin, CTF), junk, determinism, RELION files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from autospa.conventions import psi_to_matrix_2d
from autospa.io.mrc import read_stack_images
from autospa.io.particles_star import parse_image_names, read_particles_star, resolve_stack_path
from autospa.numerics.ctf import ctf_2d
from autospa.numerics.fourier import irfft2, phase_ramp_2d, rfft2
from autospa.numerics.projection import prepare_image_ft, rotate_fourier_2d
from autospa.simulate.particles import JUNK_KINDS, simulate_2d_classes, simulate_particles, write_particle_set
from autospa.simulate.phantoms import phantom_set


@pytest.fixture(scope="module")
def sim2d():
    return simulate_2d_classes(n=500, n_classes=3, box=48, pixel_size_a=3.0, snr=0.05, seed=3, return_clean=True)


def _measured_snr(images: torch.Tensor, clean: torch.Tensor, good: np.ndarray) -> float:
    g = torch.as_tensor(good)
    return float(clean[g].flatten(1).var(1).mean() / (images[g] - clean[g]).flatten(1).var(1).mean())


def test_snr_within_10_percent(sim2d) -> None:
    good = sim2d.truth["rlnAutospaIsJunk"].to_numpy() == 0
    snr = _measured_snr(sim2d.images, sim2d.clean, good)
    assert abs(snr - 0.05) / 0.05 < 0.10
    # 3D orientations with junk, another SNR
    vols = phantom_set(2, 1, box=32, pixel_size_a=4.0, seed=5)
    images, truth, clean = simulate_particles(vols, 400, 4.0, snr=0.5, seed=9, junk_fraction=0.2, return_clean=True)
    snr = _measured_snr(images, clean, truth["rlnAutospaIsJunk"].to_numpy() == 0)
    assert abs(snr - 0.5) / 0.5 < 0.10
    # images are normalised like RELION's extraction: background mean 0, std 1
    c = torch.arange(32) - 16
    bg = (c[:, None] ** 2 + c[None, :] ** 2) > (0.375 * 32) ** 2
    vals = images[:, bg]
    assert float(vals.mean(1).abs().max()) < 1e-4 and float((vals.std(1) - 1).abs().max()) < 1e-4


def test_truth_psi_origin_and_ctf_convention(sim2d) -> None:
    """A clean particle = its class template rotated by psi, moved by -origin, times its CTF."""
    t = sim2d.truth
    box, apix = 48, 3.0
    rows = np.flatnonzero(t["rlnAutospaIsJunk"].to_numpy() == 0)[:24]
    for i in rows:
        r = t.iloc[i]
        tmpl = sim2d.templates[int(r.rlnClassNumber) - 1].double()
        rot = rotate_fourier_2d(prepare_image_ft(tmpl, 2), psi_to_matrix_2d(torch.tensor([r.rlnAnglePsi], dtype=torch.float64)))
        img = irfft2(rot, 48)[0]
        big = torch.zeros(96, 96, dtype=torch.float64)
        big[24:72, 24:72] = img
        shift = torch.tensor([-r.rlnOriginXAngst / apix, -r.rlnOriginYAngst / apix], dtype=torch.float64)
        ctf = ctf_2d(r.rlnDefocusU, r.rlnDefocusV, r.rlnDefocusAngle, 300.0, 2.7, 0.1, apix, 96, dtype=torch.float64)[0]
        expected = irfft2(rfft2(big) * ctf * phase_ramp_2d(shift, 96, torch.complex128), 96)[24:72, 24:72]
        got = sim2d.clean[i].double()
        corr = torch.corrcoef(torch.stack([expected.flatten(), got.flatten()]))[0, 1]
        assert float(corr) > 0.99, (i, float(corr))
    # classes are distinguishable: templates differ clearly
    tm = sim2d.templates.flatten(1)
    cc = torch.corrcoef(tm)
    assert float(cc[~torch.eye(3, dtype=torch.bool)].max()) < 0.9
    assert set(t["rlnClassNumber"].unique()) == {1, 2, 3}
    assert float(t["rlnOriginXAngst"].abs().max()) <= 5 * apix + 1e-9


def test_junk_and_determinism() -> None:
    vols = phantom_set(2, 1, box=24, pixel_size_a=5.0, seed=1)
    a, ta = simulate_particles(vols, 160, 5.0, snr=0.1, seed=4, junk_fraction=0.3)
    b, tb = simulate_particles(vols, 160, 5.0, snr=0.1, seed=4, junk_fraction=0.3)
    c, _ = simulate_particles(vols, 160, 5.0, snr=0.1, seed=5, junk_fraction=0.3)
    assert torch.equal(a, b) and ta.equals(tb)
    assert not torch.equal(a, c)
    junk = ta["rlnAutospaIsJunk"].to_numpy() == 1
    assert abs(junk.mean() - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 160)
    assert (ta.loc[junk, "rlnClassNumber"] == 0).all() and (ta.loc[~junk, "rlnClassNumber"] > 0).all()
    assert set(ta.loc[junk, "rlnAutospaJunkKind"]) == {1, 2, 3, 4}
    assert set(JUNK_KINDS[k] for k in ta.loc[junk, "rlnAutospaJunkKind"]) == {"empty_ice", "aggregate", "partial", "carbon_edge"}
    assert bool(torch.isfinite(a).all())


def test_particle_files_round_trip(tmp_path, sim2d) -> None:
    out = write_particle_set(tmp_path, sim2d.images[:50], sim2d.truth.iloc[:50], sim2d.optics, stack_dtype="float32")
    table = read_particles_star(out["particles"])
    opt = table.optics.iloc[0]
    assert int(opt["rlnImageSize"]) == 48 and float(opt["rlnImagePixelSize"]) == 3.0
    assert int(opt["rlnCtfDataAreCtfPremultiplied"]) == 0 and float(opt["rlnVoltage"]) == 300.0
    p = table.particles
    assert p["rlnImageName"].iloc[0] == "000001@Particles/stack.mrcs"
    for lab in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnOriginXAngst", "rlnOriginYAngst",
                "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOpticsGroup"):
        assert lab in p.columns
    np.testing.assert_allclose(p["rlnAnglePsi"].to_numpy(), sim2d.truth["rlnAnglePsi"].to_numpy()[:50])
    assert "rlnClassNumber" not in p.columns  # the truth stays in truth.star
    idx, names = parse_image_names(p["rlnImageName"], out["particles"])
    stack = resolve_stack_path(out["particles"], names[0])
    imgs = read_stack_images(stack, idx)
    np.testing.assert_array_equal(imgs, sim2d.images[:50].numpy())
    truth = read_particles_star(out["truth"]).particles
    np.testing.assert_array_equal(truth["rlnClassNumber"].to_numpy(), sim2d.truth["rlnClassNumber"].to_numpy()[:50])
