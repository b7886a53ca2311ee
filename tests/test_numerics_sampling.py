"""numerics.sampling (HEALPix, psi, translations) and numerics.symmetry (point groups)."""

from __future__ import annotations

import math

import pytest
import torch

from autospa.numerics import sampling as S
from autospa.numerics.symmetry import point_group_matrices, point_group_order


@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
def test_healpix_counts_and_equal_area(order: int) -> None:
    dirs = S.healpix_directions(order)
    assert dirs.shape == (12 * 4**order, 2) == (S.healpix_npix(order), 2)
    v = S.direction_vectors(dirs[:, 0], dirs[:, 1])
    assert torch.allclose(v.norm(dim=-1), torch.ones(v.shape[0], dtype=torch.float64))
    # equal-area pixels: the centres' mean direction is zero and z is uniform on [-1, 1]
    assert float(v.mean(0).norm()) < 1e-10
    assert math.isclose(float((v[:, 2] ** 2).mean()), 1.0 / 3.0, rel_tol=0.05 if order else 0.3)


@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
def test_healpix_matches_astropy_healpix(order: int) -> None:
    ah = pytest.importorskip("astropy_healpix")
    nside = 2**order
    lon, lat = ah.healpix_to_lonlat(list(range(12 * nside * nside)), nside, order="nested")
    z, phi = S.healpix_pix2ang(order, torch.arange(12 * nside * nside))
    assert torch.allclose(z, torch.sin(torch.as_tensor(lat.to_value("rad"), dtype=torch.float64)), atol=1e-12)
    dphi = torch.remainder(phi - torch.as_tensor(lon.to_value("rad"), dtype=torch.float64) + math.pi, 2 * math.pi) - math.pi
    assert float(dphi.abs().max()) < 1e-12
    # the children of a pixel are the NEST indices 4p .. 4p + 3
    kids = S.healpix_children(order, torch.arange(12 * nside * nside), 1)
    assert torch.equal(kids.sort(-1).values, 4 * torch.arange(12 * nside * nside)[:, None] + torch.arange(4))


def test_psi_grid_translations_and_orientations() -> None:
    psi = S.psi_grid(10.0)
    assert psi.shape == (36,) and float(psi[1] - psi[0]) == 10.0
    assert S.psi_grid(7.0).shape == (52,) and math.isclose(S.psi_step(7.0), 360.0 / 52)
    assert S.psi_grid(6.0, multiple_of=32).shape == (64,)
    fine = S.oversampled_psi(psi, 10.0, 1)
    assert fine.shape == (36, 2) and torch.allclose(fine[0], torch.tensor([-2.5, 2.5], dtype=torch.float64))
    t = S.translation_grid(5.0, 1.0)
    assert bool(((t**2).sum(-1) < 25.001).all()) and t.shape[0] == 81  # lattice points in a disc of r 5
    assert bool((t == 0).all(-1).any())
    sub = S.oversampled_translations(t, 1.0, 1)
    assert sub.shape == (81, 4, 2) and torch.allclose(sub.mean(1), t)
    o = S.orientations_3d(1)
    assert o.shape == (48 * 12, 3)  # 48 directions x 360 / 30 psi (order 1: 30 degrees)
    fine3 = S.oversampled_orientations_3d(1, torch.tensor([0, 5]), torch.tensor([0.0, 15.0]), 15.0, 1)
    assert fine3.shape == (2, 8, 3)


def test_symmetry_reduces_directions() -> None:
    full = S.healpix_npix(3)
    for group, order in (("C2", 2), ("C4", 4), ("D2", 4), ("O", 24)):
        dirs, pix = S.sampling_directions(3, point_group_matrices(group), group)
        assert abs(dirs.shape[0] * order - full) / full < 0.15, (group, dirs.shape[0])


@pytest.mark.parametrize(
    "group,order",
    [("C1", 1), ("C2", 2), ("C7", 7), ("D1", 2), ("D2", 4), ("D5", 10), ("T", 12), ("O", 24), ("I", 60),
     ("I1", 60), ("I2", 60), ("I3", 60), ("I4", 60)],
)
def test_point_group_orders_and_closure(group: str, order: int) -> None:
    m = point_group_matrices(group)
    assert m.shape == (order, 3, 3) and point_group_order(group) == order
    assert torch.allclose(m[0], torch.eye(3, dtype=torch.float64))
    eye = torch.eye(3, dtype=torch.float64).expand(order, 3, 3)
    assert torch.allclose(m @ m.transpose(-1, -2), eye, atol=1e-9)
    assert torch.allclose(torch.linalg.det(m), torch.ones(order, dtype=torch.float64), atol=1e-9)
    prod = (m[:, None] @ m[None]).reshape(-1, 9)
    dist = torch.cdist(prod, m.reshape(-1, 9))
    assert float(dist.min(dim=1).values.max()) < 1e-6  # closed under multiplication
    if order > 1:
        assert float(torch.cdist(m.reshape(-1, 9), m.reshape(-1, 9)).add(torch.eye(order) * 10).min()) > 0.1


def test_unknown_group_is_rejected() -> None:
    with pytest.raises(ValueError):
        point_group_matrices("C0")
    with pytest.raises(ValueError):
        point_group_matrices("Dnh")
