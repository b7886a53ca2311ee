"""numerics.ctf against RELION's CTF::getCTF written out in the test (relion-conventions.md)."""

from __future__ import annotations

import math

import torch

from autospa.numerics import ctf as C
from autospa.numerics.fourier import fftfreq_2d


def relion_ctf(kx, ky, du, dv, ang_deg, kv, cs_mm, q0, phase_deg=0.0, bfac=0.0):
    """RELION's formula, literally: ellipse angle, deltaf, chi, -sin(chi) * envelope."""
    v = kv * 1e3
    lam = 12.2643247 / math.sqrt(v * (1 + 0.978466e-6 * v))
    k1 = math.pi * lam
    k2 = math.pi / 2 * cs_mm * 1e7 * lam**3
    k3 = math.atan(q0 / math.sqrt(1 - q0 * q0))
    k5 = math.radians(phase_deg)
    u2 = kx**2 + ky**2
    e = torch.atan2(ky, kx) - math.radians(ang_deg)
    deltaf = -(du + dv) / 2 - (du - dv) / 2 * torch.cos(2 * e)
    chi = k1 * deltaf * u2 + k2 * u2**2 - k5 - k3
    return -torch.sin(chi) * torch.exp(-bfac / 4 * u2)


def test_matches_relion_formula() -> None:
    box, apix = 64, 1.3
    k = fftfreq_2d(box, rfft=True, dtype=torch.float64) / apix
    for du, dv, ang, kv, cs, q0, ps, b in [
        (15000.0, 13000.0, 30.0, 300.0, 2.7, 0.1, 0.0, 0.0),
        (9000.0, 9500.0, 125.0, 200.0, 1.4, 0.07, 0.0, 50.0),
        (5000.0, 4000.0, -40.0, 300.0, 0.01, 0.1, 90.0, 0.0),  # phase plate
    ]:
        ours = C.ctf_2d(du, dv, ang, kv, cs, q0, apix, box, phase_shift_deg=ps, bfactor_a2=b, dtype=torch.float64)[0]
        ref = relion_ctf(k[..., 0], k[..., 1], du, dv, ang, kv, cs, q0, ps, b)
        assert torch.allclose(ours, ref, atol=1e-12)


def test_zero_frequency_and_friedel_symmetry() -> None:
    full = C.ctf_2d(12000.0, 10000.0, 33.0, 300.0, 2.7, 0.1, 1.0, 48, rfft=False, dtype=torch.float64)[0]
    assert math.isclose(float(full[0, 0]), 0.1, rel_tol=1e-12)  # sin(K3) = Q0 > 0
    mate = torch.roll(torch.flip(full, dims=(0, 1)), shifts=(1, 1), dims=(0, 1))
    keep = torch.ones(48, dtype=torch.bool)
    keep[24] = False  # the Nyquist row/column is its own mate on the grid (+0.5 = -0.5)
    sel = keep[:, None] & keep[None, :]
    assert torch.allclose(mate[sel], full[sel], atol=1e-12)  # C(-k) = C(k)


def test_zeros_at_analytical_positions() -> None:
    df, kv, cs, q0 = 20000.0, 300.0, 2.7, 0.1
    zeros = C.ctf_zeros_1d(df, kv, cs, q0, 8)
    # closed form of the first zero when Cs is negligible: K1 df u2 = -K3 (chi = -pi with ... ) ->
    # check the definition instead: |CTF| ~ 0 at each zero and the sign flips across it
    vals = C.ctf_1d(df, kv, cs, q0, frequencies_a=zeros, dtype=torch.float64)[0]
    assert float(vals.abs().max()) < 1e-9
    eps = 1e-6
    before = C.ctf_1d(df, kv, cs, q0, frequencies_a=zeros - eps, dtype=torch.float64)[0]
    after = C.ctf_1d(df, kv, cs, q0, frequencies_a=zeros + eps, dtype=torch.float64)[0]
    assert bool((torch.sign(before) != torch.sign(after)).all())
    # no zero is missed: a fine scan finds exactly these sign changes below the last one
    f = torch.linspace(1e-5, float(zeros[-1]) - 1e-5, 200001, dtype=torch.float64)
    c = C.ctf_1d(df, kv, cs, q0, frequencies_a=f, dtype=torch.float64)[0]
    crossings = f[1:][torch.sign(c[1:]) != torch.sign(c[:-1])]
    assert crossings.numel() == 7
    assert torch.allclose(crossings, zeros[:7], atol=2e-7)
    # without Cs the zeros are sqrt((n pi - K3) / (K1 df)) (chi = -K1 df u2 - K3 = -n pi)
    z0 = C.ctf_zeros_1d(df, kv, 0.0, q0, 3)
    k1, _, k3, _ = (float(t) for t in C.ctf_constants(kv, 0.0, q0))
    expect = torch.tensor([math.sqrt((n * math.pi - k3) / (k1 * df)) for n in (1, 2, 3)], dtype=torch.float64)
    assert torch.allclose(z0, expect, rtol=1e-12)


def test_astigmatism_convention_and_2d_zeros() -> None:
    """Along the azimuth the CTF is the 1D CTF of DefocusU, perpendicular to it that of DefocusV."""
    du, dv, ang, apix, box = 18000.0, 12000.0, 30.0, 1.0, 256
    z_u = C.ctf_zeros_1d(du, 300.0, 2.7, 0.1, 1)[0]
    z_v = C.ctf_zeros_1d(dv, 300.0, 2.7, 0.1, 1)[0]
    a = math.radians(ang)
    for z, direction in ((z_u, a), (z_v, a + math.pi / 2)):
        kx = torch.tensor([float(z) * math.cos(direction)], dtype=torch.float64)
        ky = torch.tensor([float(z) * math.sin(direction)], dtype=torch.float64)
        k1, k2, k3, k5 = C.ctf_constants(300.0, 2.7, 0.1)
        chi = C.ctf_chi(kx, ky, torch.tensor(du, dtype=torch.float64), torch.tensor(dv, dtype=torch.float64),
                        torch.tensor(ang, dtype=torch.float64), k1, k2, k3, k5)
        assert abs(float(torch.sin(chi))) < 1e-9
    # on the pixel grid: the row ky = 0 (angle 0) sees defocus between U and V; a grid CTF with
    # angle 0 has its first zero along kx exactly where ctf_zeros_1d(DefocusU) says
    grid = C.ctf_2d(du, dv, 0.0, 300.0, 2.7, 0.1, apix, box, dtype=torch.float64)[0]
    row = grid[0]  # ky = 0, kx = j / (box apix)
    j = int(torch.nonzero(torch.sign(row[1:]) != torch.sign(row[:-1]))[0])
    assert j / (box * apix) <= float(z_u) <= (j + 1) / (box * apix)
    col = grid[: box // 2, 0]  # kx = 0: DefocusV
    i = int(torch.nonzero(torch.sign(col[1:]) != torch.sign(col[:-1]))[0])
    assert i / (box * apix) <= float(z_v) <= (i + 1) / (box * apix)


def test_batched_rectangular_and_flags() -> None:
    du = torch.tensor([10000.0, 20000.0])
    out = C.ctf_2d(du, du - 500, torch.tensor([0.0, 45.0]), 300.0, 2.7, 0.1, 1.5, 32)
    assert out.shape == (2, 32, 17)
    single = C.ctf_2d(20000.0, 19500.0, 45.0, 300.0, 2.7, 0.1, 1.5, 32)[0]
    assert torch.allclose(out[1], single, atol=1e-6)
    rect = C.ctf_2d(20000.0, 19500.0, 45.0, 300.0, 2.7, 0.1, 1.5, (32, 32))[0]
    assert torch.allclose(rect, single)
    r2 = C.ctf_2d(20000.0, 19500.0, 45.0, 300.0, 2.7, 0.1, 1.5, (40, 64), dtype=torch.float64)[0]
    k = torch.stack(torch.meshgrid(torch.fft.fftfreq(40, dtype=torch.float64), torch.fft.rfftfreq(64, dtype=torch.float64), indexing="ij"), -1) / 1.5
    ref = relion_ctf(k[..., 1], k[..., 0].abs() * torch.sign(k[..., 0]), 20000.0, 19500.0, 45.0, 300.0, 2.7, 0.1)
    assert torch.allclose(r2[:20], ref[:20], atol=1e-12) and torch.allclose(r2[21:], ref[21:], atol=1e-12)
    flipped = C.ctf_2d(20000.0, 19500.0, 45.0, 300.0, 2.7, 0.1, 1.5, 32, phase_flipped=True)[0]
    assert torch.allclose(flipped, single.abs())
    intact = C.ctf_2d(20000.0, 19500.0, 45.0, 300.0, 2.7, 0.1, 1.5, 32, intact_first_peak=True)[0]
    assert float(intact[0, 0]) == 1.0


def test_ctf_at_listed_frequencies_equals_the_grid() -> None:
    """``frequencies=`` evaluates the same formula at chosen pixels: the grid's values there."""
    box, pix = 48, 1.7
    du = torch.tensor([12000.0, 25000.0, 8000.0], dtype=torch.float64)
    dv, ang = du - 900.0, torch.tensor([10.0, 75.0, 140.0], dtype=torch.float64)
    kw = dict(phase_shift_deg=torch.tensor([0.0, 30.0, 90.0]), bfactor_a2=torch.tensor([0.0, 50.0, 120.0]),
              scale=torch.tensor([1.0, 0.8, 1.2]))
    grid = C.ctf_2d(du, dv, ang, 300.0, 2.7, 0.07, pix, box, **kw)  # (3, 48, 25)
    f = fftfreq_2d(box, rfft=True) * box  # (48, 25, 2) in cycles per box
    pick = torch.tensor([0, 1, 30, 77, 600, 1199])
    at = C.ctf_2d(du, dv, ang, 300.0, 2.7, 0.07, pix, box, **kw, frequencies=f.reshape(-1, 2)[pick])
    assert at.shape == (3, len(pick))
    assert torch.allclose(at, grid.reshape(3, -1)[:, pick], rtol=0, atol=1e-6)
