"""numerics.projection: adjoint test, accuracy against analytic projections, 2D/3D consistency."""

from __future__ import annotations

import math

import pytest
import torch

from autospa.conventions import euler_to_matrix, psi_to_matrix_2d
from autospa.numerics import projection as P


def _random_rotations(n: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.rand(n, 3, generator=gen, dtype=torch.float64) * torch.tensor([360.0, 180.0, 360.0])
    return euler_to_matrix(a[:, 0] - 180, a[:, 1], a[:, 2] - 180)


def _crandn(shape, gen, dtype=torch.float64):
    return torch.complex(torch.randn(shape, generator=gen, dtype=dtype), torch.randn(shape, generator=gen, dtype=dtype))


def _blobs(box: int, pos: torch.Tensor, w: torch.Tensor, sigma: float) -> torch.Tensor:
    c = torch.arange(box, dtype=torch.float64) - box // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    vol = torch.zeros(box, box, box, dtype=torch.float64)
    for p, wi in zip(pos, w):
        vol += wi * torch.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / (2 * sigma**2))
    return vol


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_adjoint_3d(dtype) -> None:
    """<P v, x> = <v, P^T x> for the real inner product Re sum conj(a) b."""
    gen = torch.Generator().manual_seed(0)
    box, pad = 24, 2
    h = P.grid_half(box, pad)
    x = _crandn((2, 2 * h + 1, 2 * h + 1, h + 1), gen, dtype)  # batch of 2 volumes
    rots = _random_rotations(30, gen).to(dtype)
    px = P.project_fourier(P.VolumeFT(x, box, pad), rots)
    v = _crandn(px.shape, gen, dtype)
    ptv, _ = P.backproject_fourier(v, None, rots, box, pad)
    lhs = (v.conj() * px).real.sum()
    rhs = (ptv.conj() * x).real.sum()
    assert abs(float(lhs - rhs)) / abs(float(lhs)) < 1e-4
    if dtype == torch.float64:
        assert abs(float(lhs - rhs)) / abs(float(lhs)) < 1e-12


def test_adjoint_2d_and_weights() -> None:
    gen = torch.Generator().manual_seed(1)
    box, pad = 32, 2
    h = P.grid_half(box, pad)
    x = _crandn((3, 2 * h + 1, h + 1), gen)
    rots = psi_to_matrix_2d(torch.rand(3, 12, generator=gen, dtype=torch.float64) * 360)  # per-class psi sets
    px = P.rotate_fourier_2d(P.ImageFT(x, box, pad), rots)
    v = _crandn(px.shape, gen)
    ptv, wgrid = P.backrotate_fourier_2d(v, None, rots, box, pad)
    lhs = (v.conj() * px).real.sum()
    rhs = (ptv.conj() * x).real.sum()
    assert abs(float(lhs - rhs)) / abs(float(lhs)) < 1e-12
    # each inserted pixel spreads a total weight of 1 over its interpolation corners
    n_inside = int((P._output_points(box, box // 2, "cpu", torch.float64)[0]).numel())
    assert math.isclose(float(wgrid.sum()), 3 * 12 * n_inside, rel_tol=1e-12)


def test_identity_projection_is_the_sum_along_z() -> None:
    gen = torch.Generator().manual_seed(2)
    vol = _blobs(32, (torch.rand(6, 3, generator=gen, dtype=torch.float64) - 0.5) * 14, torch.ones(6), 2.0)
    p = P.project_real(vol, torch.eye(3, dtype=torch.float64)[None], pad=2, gridding_correct=False)[0]
    ref = vol.sum(0)
    assert float((p - ref).abs().max()) < 1e-6 * float(ref.abs().max())  # only the corners beyond Nyquist differ
    # and the prepared transform inverts back to the volume
    vft = P.prepare_volume_ft(vol, 2, gridding_correct=True)
    assert torch.allclose(P.volume_from_ft(vft, undo_gridding_correction=True), vol, atol=1e-10)


def test_projection_matches_analytic_gaussians() -> None:
    """Blobs at r project to 2D Gaussians at (A r)_xy: RELION's rotation convention, within 3 %."""
    gen = torch.Generator().manual_seed(3)
    box, sigma = 48, 2.0
    pos = (torch.rand(8, 3, generator=gen, dtype=torch.float64) - 0.5) * 20
    w = 0.5 + torch.rand(8, generator=gen, dtype=torch.float64)
    vol = _blobs(box, pos, w, sigma)
    rots = _random_rotations(16, gen)
    p = P.project_real(vol, rots, pad=2)
    c = torch.arange(box, dtype=torch.float64) - box // 2
    y, x = torch.meshgrid(c, c, indexing="ij")
    moved = torch.einsum("pij,nj->pni", rots, pos)
    truth = torch.zeros_like(p)
    for k in range(8):
        truth += w[k] * math.sqrt(2 * math.pi) * sigma * torch.exp(
            -((x - moved[:, k, 0, None, None]) ** 2 + (y - moved[:, k, 1, None, None]) ** 2) / (2 * sigma**2)
        )
    err = torch.linalg.norm((p - truth).flatten()) / torch.linalg.norm(truth.flatten())
    assert float(err) < 0.03
    # the transposed convention would be far off
    p_t = P.project_real(vol, rots.transpose(-1, -2), pad=2)
    assert float(torch.linalg.norm((p_t - truth).flatten()) / torch.linalg.norm(truth.flatten())) > 0.3


def test_psi_is_an_in_plane_rotation_of_the_projection() -> None:
    """project(rot, tilt, psi) == rotate_2d(project(rot, tilt, 0), psi) (RELION's ZYZ)."""
    gen = torch.Generator().manual_seed(4)
    vol = _blobs(32, (torch.rand(6, 3, generator=gen, dtype=torch.float64) - 0.5) * 14, torch.ones(6), 1.8)
    rot, tilt = torch.tensor(40.0, dtype=torch.float64), torch.tensor(70.0, dtype=torch.float64)
    psis = torch.tensor([0.0, 25.0, -100.0, 160.0], dtype=torch.float64)
    a = euler_to_matrix(rot.expand(4), tilt.expand(4), psis)
    direct = P.project_real(vol, a, pad=2)
    base = direct[0]
    rotated = P.rotate_fourier_2d(P.prepare_image_ft(base, pad=2), psi_to_matrix_2d(psis))
    rotated = torch.fft.irfft2(rotated, s=(32, 32), norm="forward")
    for i in range(4):
        r = torch.corrcoef(torch.stack([rotated[i].flatten(), direct[i].flatten()]))[0, 1]
        assert float(r) > 0.995


def test_backprojection_reconstructs_the_volume() -> None:
    gen = torch.Generator().manual_seed(5)
    box = 24
    vol = _blobs(box, (torch.rand(5, 3, generator=gen, dtype=torch.float64) - 0.5) * 10, torch.ones(5), 1.6)
    rots = _random_rotations(600, gen)
    slices = P.project_fourier(P.prepare_volume_ft(vol, 2, gridding_correct=False), rots)
    data, weights = P.backproject_fourier(slices, None, rots, box, 2)
    rec = P.reconstruct(data, weights, box, 2)
    r = torch.corrcoef(torch.stack([rec.flatten(), vol.flatten()]))[0, 1]
    assert float(r) > 0.99
    assert float(torch.linalg.norm(rec - vol) / torch.linalg.norm(vol)) < 0.08


def test_device_and_dtype_follow_input() -> None:
    vol = torch.rand(16, 16, 16)
    out = P.project_real(vol, euler_to_matrix(torch.zeros(2), torch.zeros(2), torch.zeros(2)).float())
    assert out.dtype == torch.float32 and out.device == vol.device and out.shape == (2, 16, 16)
