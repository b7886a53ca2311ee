"""numerics.masks (soft circular/spherical masks) and numerics.fsc (FSC, resolution, spectra)."""

from __future__ import annotations

import math

import torch

from autospa.numerics import fsc as FSC
from autospa.numerics import masks as M
from autospa.numerics.fourier import fftfreq_2d, radial_average_2d, shell_counts_2d, shell_counts_3d


def test_soft_circular_mask_values() -> None:
    m = M.soft_circular_mask(64, radius_px=20, edge_px=6, dtype=torch.float64)
    c = 32
    assert m.shape == (64, 64)
    assert float(m[c, c]) == 1.0 and float(m[c, c + 20]) == 1.0  # inside, and on the radius
    assert math.isclose(float(m[c, c + 23]), 0.5, abs_tol=1e-12)  # half-way through the edge
    assert math.isclose(float(m[c + 21, c]), 0.5 + 0.5 * math.cos(math.pi / 6), abs_tol=1e-12)
    assert float(m[c, c + 26]) == 0.0 and float(m[0, 0]) == 0.0
    assert bool(((m >= 0) & (m <= 1)).all())
    assert torch.equal(m, m.flip(-1).roll(1, -1))  # symmetric about the centre pixel 32
    hard = M.soft_circular_mask(64, 20, 0, dtype=torch.float64)
    assert set(hard.unique().tolist()) == {0.0, 1.0}
    assert float(hard.sum()) == float((M.radius_grid(64) <= 20).sum())
    # area of the hard mask approaches pi r^2
    assert abs(float(hard.sum()) - math.pi * 400) / (math.pi * 400) < 0.02
    off = M.soft_circular_mask(32, 5, 2, center=(10.0, 20.0))
    assert float(off[20, 10]) == 1.0 and float(off[10, 20]) == 0.0


def test_soft_spherical_mask_and_masking() -> None:
    m3 = M.soft_spherical_mask(32, 10, 4, dtype=torch.float64)
    assert m3.shape == (32, 32, 32) and float(m3[16, 16, 16]) == 1.0
    assert math.isclose(float(m3[16, 16, 28]), 0.5, abs_tol=1e-12)
    # masking a constant image returns it unchanged (the background is that constant)
    const = torch.full((3, 48, 48), 2.5, dtype=torch.float64)
    assert torch.allclose(M.soft_mask_outside(const, 15, 5), const)
    x = torch.randn(4, 48, 48, dtype=torch.float64) + torch.arange(4, dtype=torch.float64)[:, None, None]
    out = M.soft_mask_outside(x, 15, 5)
    r = M.radius_grid(48, dtype=torch.float64)
    assert torch.allclose(out[:, r <= 15], x[:, r <= 15])
    w = 1 - M.soft_circular_mask(48, 15, 5, dtype=torch.float64)
    bg = (x * w).sum((-2, -1)) / w.sum()
    assert torch.allclose(out[:, r >= 20], bg[:, None].expand(-1, int((r >= 20).sum())))
    zero = M.soft_mask_outside(x.float(), 15, 5, background=0.0)
    assert float(zero[:, r >= 20].abs().max()) == 0.0 and zero.dtype == torch.float32


def test_fsc_identical_independent_and_known_snr() -> None:
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(32, 32, 32, generator=gen, dtype=torch.float64)
    assert torch.allclose(FSC.fsc(v, v)[1:], torch.ones(16, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(FSC.fsc(v, 3.0 * v)[1:], torch.ones(16, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(FSC.fsc(v, -v)[1:], -torch.ones(16, dtype=torch.float64), atol=1e-12)
    # independent noise: |FSC| within 4 / sqrt(voxels in shell)
    u = torch.randn(32, 32, 32, generator=gen, dtype=torch.float64)
    counts = shell_counts_3d(32, rfft=False).double()
    assert bool((FSC.fsc(v, u)[2:].abs() < 4 / counts[2:].sqrt()).all())
    # half maps S + N1 and S + N2 with signal variance = noise variance: FSC = SNR / (1 + SNR) = 0.5
    n1 = torch.randn(32, 32, 32, generator=gen, dtype=torch.float64)
    n2 = torch.randn(32, 32, 32, generator=gen, dtype=torch.float64)
    curve = FSC.fsc(v + n1, v + n2)
    assert bool(((curve[3:] - 0.5).abs() < 6 / counts[3:].sqrt()).all())
    assert abs(float((curve[3:] * counts[3:]).sum() / counts[3:].sum()) - 0.5) < 0.02
    # 2D (FRC) on a batch
    imgs = torch.randn(5, 32, 32, generator=gen, dtype=torch.float64)
    frc = FSC.fsc(imgs, imgs, ndim=2)
    assert frc.shape == (5, 17) and torch.allclose(frc[:, 1:], torch.ones(5, 16, dtype=torch.float64))
    assert float(shell_counts_2d(32, rfft=False).sum()) <= 32 * 32


def test_fsc_resolution() -> None:
    box, apix = 64, 1.5
    curve = torch.ones(33, dtype=torch.float64)
    curve[10:] = 0.0
    curve[9] = 0.5
    # between shells 9 (0.5) and 10 (0.0): crossing at t = (0.5 - 0.143) / 0.5 of the way
    f9, f10 = 9 / (box * apix), 10 / (box * apix)
    expect = 1.0 / (f9 + (0.5 - 0.143) / 0.5 * (f10 - f9))
    assert math.isclose(FSC.fsc_resolution(curve, box, apix), expect, rel_tol=1e-12)
    assert math.isclose(FSC.fsc_resolution(torch.ones(33), box, apix), 2 * apix)  # Nyquist
    assert math.isclose(FSC.fsc_resolution(curve, box, apix, threshold=0.5), 1 / f9)
    assert torch.allclose(FSC.shell_frequencies(box, apix)[1], torch.tensor(1 / 96, dtype=torch.float64))


def test_power_spectrum_of_white_noise_and_a_gaussian() -> None:
    gen = torch.Generator().manual_seed(1)
    noise = 3.0 * torch.randn(300, 32, 32, generator=gen, dtype=torch.float64)
    ps = FSC.power_spectrum_1d(noise).mean(0)
    assert torch.allclose(ps[1:], torch.full((16,), 9.0 / 1024, dtype=torch.float64), rtol=0.06)
    # a Gaussian blob of sigma s has power exp(-4 pi^2 s^2 |k|^2) (relative to k = 0), averaged
    # over the pixels of each shell
    c = torch.arange(64, dtype=torch.float64) - 32
    y, x = torch.meshgrid(c, c, indexing="ij")
    g = torch.exp(-(x**2 + y**2) / (2 * 2.0**2))
    ps = FSC.power_spectrum_1d(g)
    k2 = (fftfreq_2d(64, rfft=False, dtype=torch.float64) ** 2).sum(-1)
    expect = radial_average_2d(torch.exp(-4 * math.pi**2 * 4.0 * k2))
    assert torch.allclose(ps[:14] / ps[0], expect[:14], rtol=1e-6, atol=1e-9)
