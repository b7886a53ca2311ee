"""simulate.phantoms, simulate.micrographs and simulate.movies against their truth."""

from __future__ import annotations

import math

import numpy as np
import torch

from autospa.conventions import euler_to_matrix
from autospa.numerics.fourier import shift_images
from autospa.simulate.micrographs import simulate_micrograph
from autospa.simulate.movies import render_frames, simulate_drift, simulate_gain_reference, simulate_movie
from autospa.simulate.phantoms import phantom_atoms, pseudo_atomic_phantom


def test_phantom_symmetry_seed_and_conformations() -> None:
    # C4 about z on an odd box: a 90-degree turn of the (y, x) plane maps the grid onto itself
    v = pseudo_atomic_phantom(box=33, pixel_size_a=3.0, symmetry="C4", seed=2)
    turned = torch.rot90(v, 1, dims=(1, 2))
    assert float((turned - v).abs().max()) < 1e-4 * float(v.max())
    assert torch.equal(v, pseudo_atomic_phantom(box=33, pixel_size_a=3.0, symmetry="C4", seed=2))
    # the atom set of an icosahedral phantom is closed under the group: 60 copies of each atom
    pos, w = phantom_atoms(n_atoms=600, radius_a=50.0, symmetry="I", seed=0)
    assert pos.shape == (600, 3) and w.shape == (600,)
    from autospa.numerics.symmetry import point_group_matrices

    ops = point_group_matrices("I").numpy()
    moved = np.einsum("gij,nj->gni", ops, pos[:10])  # images of 10 atoms
    d = np.linalg.norm(moved[:, :, None, :] - pos[None, None], axis=-1).min(-1)
    assert d.max() < 1e-6
    # conformations share most of the structure but differ
    c0 = pseudo_atomic_phantom(box=32, pixel_size_a=4.0, seed=7)
    c1 = pseudo_atomic_phantom(box=32, pixel_size_a=4.0, seed=7, conformation=1)
    r = float(torch.corrcoef(torch.stack([c0.flatten(), c1.flatten()]))[0, 1])
    assert 0.4 < r < 0.995
    other = pseudo_atomic_phantom(box=32, pixel_size_a=4.0, seed=8)
    assert float(torch.corrcoef(torch.stack([c0.flatten(), other.flatten()]))[0, 1]) < r


def test_micrograph_particles_at_their_coordinates() -> None:
    """With a flat CTF (Q0 ~ 1, no defocus, no Cs) and no ice the signal is the sum of projections:
    each particle's density centroid sits at its coordinate plus its rotated centre of mass."""
    vol = pseudo_atomic_phantom(box=32, pixel_size_a=4.0, seed=3)
    mic = simulate_micrograph(
        [vol], (192, 256), 4.0, n_particles=12, seed=1, min_distance_px=36, defocus_range_a=(0.0, 0.0),
        max_astigmatism_a=0.0, cs_mm=0.0, amplitude_contrast=0.99999999, ice_thickness_nm=(0.0, 0.0), contrast=0.1,
    )
    assert mic.intensity.shape == (192, 256)
    s = 1.0 - mic.intensity.double()  # proportional to the projections
    c = torch.arange(32, dtype=torch.float64) - 16
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    com = torch.stack([(vol * x).sum(), (vol * y).sum(), (vol * z).sum()]) / vol.sum()
    yy, xx = torch.meshgrid(torch.arange(192, dtype=torch.float64), torch.arange(256, dtype=torch.float64), indexing="ij")
    co = mic.coordinates
    assert len(co) == 12
    for _, r in co.iterrows():
        a = euler_to_matrix(torch.tensor(r.rlnAngleRot), torch.tensor(r.rlnAngleTilt), torch.tensor(r.rlnAnglePsi)).double()
        expect = torch.tensor([r.rlnCoordinateX, r.rlnCoordinateY], dtype=torch.float64) + (a @ com)[:2]
        win = ((xx - r.rlnCoordinateX) ** 2 + (yy - r.rlnCoordinateY) ** 2) < 15**2
        m = s * win
        cen = torch.stack([(m * xx).sum(), (m * yy).sum()]) / m.sum()
        assert float((cen - expect).norm()) < 0.15, (cen, expect)


def test_ice_gradient() -> None:
    vol = pseudo_atomic_phantom(box=24, pixel_size_a=4.0, seed=3)
    mic = simulate_micrograph([vol], (128, 128), 4.0, n_particles=0, seed=2, contrast=0.0, ice_thickness_nm=(20.0, 80.0))
    t = mic.ice_thickness_nm
    assert abs(float(t.min()) - 20.0) < 4.0 and abs(float(t.max()) - 80.0) < 4.0
    assert torch.allclose(mic.intensity, torch.exp(-t / 320.0), atol=1e-6)
    # a linear gradient: a plane fits the thickness to within the 2 % fluctuation
    yy, xx = torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij")
    a = torch.stack([xx.flatten(), yy.flatten(), torch.ones(128 * 128)], 1).double()
    coef = torch.linalg.lstsq(a, t.flatten().double()[:, None]).solution
    resid = t.flatten().double() - (a @ coef)[:, 0]
    assert float(resid.std()) < 0.03 * 50


def test_drift_frames_follow_the_global_trajectory() -> None:
    h = w = 96
    m = 12
    gen = torch.Generator().manual_seed(0)
    n = h + 2 * m  # a smooth random canvas (Gaussian-filtered noise, sigma 3 px)
    k2 = torch.fft.fftfreq(n)[:, None] ** 2 + torch.fft.rfftfreq(n)[None, :] ** 2
    noise = torch.fft.rfft2(torch.randn(n, n, generator=gen))
    canvas = 1.0 + 0.2 * torch.fft.irfft2(noise * torch.exp(-2 * math.pi**2 * 9 * k2), s=(n, n))
    drift = simulate_drift(6, (h, w), seed=3, global_px=4.0, local_px=0.0)
    assert math.isclose(drift.accumulated_motion_px(), 4.0, rel_tol=1e-9)
    table = drift.global_shift_table()
    np.testing.assert_allclose(table[["rlnMicrographShiftX", "rlnMicrographShiftY"]].to_numpy(), -drift.global_px.numpy())
    frames = render_frames(canvas, m, drift).double()
    inner = (slice(10, -10), slice(10, -10))
    for f in range(1, 6):
        g = drift.global_px[f]
        # the specimen moved by g: frame f is frame 0 moved by +g (RELION's shift -g aligns it back)
        moved = shift_images(frames[0], g[None].double())[0]
        err = (frames[f][inner] - moved[inner]).abs().max() / frames[0].std()
        wrong = (frames[f][inner] - shift_images(frames[0], -g[None].double())[0][inner]).abs().max() / frames[0].std()
        assert float(err) < 0.15 and float(wrong) > 10 * float(err)  # bicubic vs exact sub-pixel shift


def test_movie_dose_shot_noise_and_gain() -> None:
    h = w = 64
    m = 8
    canvas = torch.full((h + 2 * m, w + 2 * m), 0.9)
    gain = simulate_gain_reference((h, w), seed=1)
    assert math.isclose(float(gain.mean()), 1.0, rel_tol=1e-5) and float(gain.min()) >= 0.4
    mov = simulate_movie(canvas, m, n_frames=40, dose_per_frame_e_a2=2.0, pixel_size_a=1.5, seed=4, gain=gain,
                         global_px=2.0, local_px=0.5)
    counts = mov.frames
    assert torch.equal(counts, counts.round())  # electron counts
    expected = 0.9 * 2.0 * 1.5**2  # electrons per pixel per frame
    corrected = counts * gain  # what motion correction does
    assert abs(float(corrected.mean()) / expected - 1) < 0.01
    # shot noise: the variance of the raw counts is their mean (Poisson), per pixel over frames
    raw_mean = counts.mean(0)
    raw_var = counts.var(0)
    assert abs(float((raw_var / raw_mean).mean()) - 1.0) < 0.05
    # per-pixel mean follows 1 / gain
    r = torch.corrcoef(torch.stack([raw_mean.flatten(), (1 / gain).flatten()]))[0, 1]
    assert float(r) > 0.5
    assert math.isclose(mov.total_dose_e_a2, 80.0)
