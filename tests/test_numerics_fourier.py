"""numerics.fourier: crop/pad, phase shifts, Friedel symmetry, shells and radial averages."""

from __future__ import annotations

import math

import torch

from autospa.numerics import fourier as F


def _bandlimited(n: int, box: int, max_freq: int, gen: torch.Generator) -> torch.Tensor:
    """Random real images whose spectrum is zero beyond ``max_freq`` (cycles per box)."""
    ft = torch.complex(torch.randn(n, box, box // 2 + 1, generator=gen, dtype=torch.float64),
                       torch.randn(n, box, box // 2 + 1, generator=gen, dtype=torch.float64))
    shells = F.shell_index_2d(box)
    ft = ft * (shells <= max_freq)
    return torch.fft.irfft2(ft, s=(box, box))


def test_rfft_scale_and_round_trip() -> None:
    x = torch.randn(3, 32, 32, dtype=torch.float64)
    ft = F.rfft2(x)
    assert torch.allclose(ft[..., 0, 0].real, x.mean(dim=(-2, -1)))  # RELION's 1/N forward scale
    assert torch.allclose(F.irfft2(ft), x, atol=1e-12)
    v = torch.randn(2, 16, 16, 16, dtype=torch.float64)
    assert torch.allclose(F.irfftn3(F.rfftn3(v)), v, atol=1e-12)


def test_friedel_symmetry_of_real_images() -> None:
    """The full transform of a real image obeys X(-k) = conj(X(k)); rfft's x = 0 column too."""
    x = torch.randn(32, 32, dtype=torch.float64)
    full = torch.fft.fft2(x, norm="forward")
    mate = torch.roll(torch.flip(full, dims=(0, 1)), shifts=(1, 1), dims=(0, 1))
    assert torch.allclose(mate, full.conj(), atol=1e-14)
    half = F.rfft2(x)
    col = half[:, 0]
    assert torch.allclose(torch.roll(torch.flip(col, (0,)), 1, 0), col.conj(), atol=1e-14)
    assert torch.allclose(half, full[:, :17], atol=1e-14)


def test_crop_pad_round_trip_and_decimation() -> None:
    gen = torch.Generator().manual_seed(1)
    x = _bandlimited(4, 64, 15, gen)
    # pad then crop is the identity
    assert torch.allclose(F.fourier_crop(F.fourier_pad(x, 96), 64), x, atol=1e-12)
    # a band-limited image cropped by 2 equals decimation, and pad of the crop brings it back
    small = F.fourier_crop(x, 32)
    assert torch.allclose(small, x[..., ::2, ::2], atol=1e-10)
    assert torch.allclose(F.fourier_pad(small, 64), x, atol=1e-10)
    # padding by an integer factor keeps the samples
    assert torch.allclose(F.fourier_pad(x, 128)[..., ::2, ::2], x, atol=1e-12)
    # mean kept (real-space magnitude), odd sizes too
    y = torch.randn(2, 33, 33, dtype=torch.float64) + 3.0
    assert torch.allclose(F.fourier_crop(y, 21).mean(dim=(-2, -1)), y.mean(dim=(-2, -1)), atol=1e-12)
    assert torch.allclose(F.fourier_crop(F.fourier_pad(y, 40), 33), y, atol=1e-12)


def test_fourier_crop_3d() -> None:
    gen = torch.Generator().manual_seed(2)
    ft = torch.complex(torch.randn(24, 24, 13, generator=gen, dtype=torch.float64),
                       torch.randn(24, 24, 13, generator=gen, dtype=torch.float64))
    ft = ft * (F.shell_index_3d(24) <= 5)
    v = torch.fft.irfftn(ft, s=(24, 24, 24))
    assert torch.allclose(F.fourier_crop(v, 12, ndim=3), v[::2, ::2, ::2], atol=1e-10)


def test_phase_shift_equals_roll_and_is_subpixel_exact() -> None:
    x = torch.randn(2, 32, 32, dtype=torch.float64)
    shifts = torch.tensor([[3.0, -5.0], [-7.0, 2.0]], dtype=torch.float64)  # (dx, dy)
    out = F.shift_images(x, shifts)
    for i in range(2):
        dx, dy = int(shifts[i, 0]), int(shifts[i, 1])
        assert torch.allclose(out[i], torch.roll(x[i], shifts=(dy, dx), dims=(0, 1)), atol=1e-12)
    # two half-pixel shifts make one pixel; a shift and its inverse cancel
    gen = torch.Generator().manual_seed(3)
    y = _bandlimited(1, 32, 12, gen)[0]
    half = torch.tensor([0.5, 0.25], dtype=torch.float64)
    twice = F.shift_images(F.shift_images(y, half), half)
    assert torch.allclose(twice, F.shift_images(y, 2 * half), atol=1e-12)
    assert torch.allclose(F.shift_images(F.shift_images(y, half), -half), y, atol=1e-12)
    # a band-limited sub-pixel shift equals sampling the continuous image: a Gaussian moves exactly
    c = torch.arange(32, dtype=torch.float64) - 16
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    g = torch.exp(-(xx**2 + yy**2) / (2 * 2.5**2))
    moved = torch.exp(-((xx - 1.3) ** 2 + (yy + 0.6) ** 2) / (2 * 2.5**2))
    assert torch.allclose(F.shift_images(g, torch.tensor([1.3, -0.6], dtype=torch.float64)), moved, atol=1e-6)


def test_shells_and_radial_average() -> None:
    box = 32
    counts = F.shell_counts_2d(box, rfft=False)
    assert int(counts[0]) == 1 and int(counts[1]) == 8  # (+-1, 0), (0, +-1), (+-1, +-1)
    # radial average of |k| equals the shell index (within rounding)
    k = F.fftfreq_2d(box, rfft=True, dtype=torch.float64)
    radius = torch.linalg.norm(k, dim=-1) * box
    avg = F.radial_average_2d(radius)
    assert torch.allclose(avg[1:], torch.arange(1, box // 2 + 1, dtype=torch.float64), atol=0.3)
    # white noise of variance s2: every shell's mean power is s2 / N (RELION's scale)
    gen = torch.Generator().manual_seed(4)
    noise = 2.0 * torch.randn(400, box, box, generator=gen, dtype=torch.float64)
    power = F.radial_average_2d(F.rfft2(noise).abs() ** 2).mean(0)
    assert torch.allclose(power[2:], torch.full_like(power[2:], 4.0 / box**2), rtol=0.05)
    v = F.radial_sum_3d(torch.ones(16, 16, 9))
    assert torch.equal(v, F.shell_counts_3d(16))
    assert math.isclose(float(F.shell_counts_3d(16, rfft=False)[0]), 1.0)
