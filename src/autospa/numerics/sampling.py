"""Orientation and translation grids as RELION samples them (src/healpix_sampling.cpp), L1.

2D
    ``psi_grid``: ``n = ceil(360 / step)`` angles ``j * 360 / n`` (the step is recomputed so that
    the grid closes; on GPUs RELION rounds ``n`` up to a multiple of 32). ``oversampled_psi``
    replaces each coarse psi by ``2^ovs`` cell-centred values (2D: values above 180 wrap to -180..).
3D
    HEALPix directions of order h (``12 * 4^h`` pixels, NEST numbering, pixel centres): rot = phi,
    tilt = acos(z), rot wrapped into (-180, 180] (HealpixSampling::checkDirection). The psi step is
    ``360 / (6 * 2^h)``. Oversampling replaces a direction by its ``4^ovs`` children at order
    ``h + ovs`` (RELION's loop order) times ``2^ovs`` psi values. Directions equivalent under the
    point group are removed as RELION does: the geometric asymmetric-unit rule of the group, then a
    seam pass that drops directions within half the maximum pixel radius of a symmetry mate of an
    earlier kept one.
Translations
    ``ix * step, iy * step`` with ``|ix|, |iy| <= ceil(range / step)`` and ``x^2 + y^2 < range^2 +
    0.001``, x-major order; oversampled children are cell-centred ``(2^ovs)^2`` sub-points.

HEALPix is implemented here (pix2ang in NEST numbering, after the HEALPix C++ library's
``nest2xyf`` / ``pix2loc``); it is tested against astropy-healpix.
"""

from __future__ import annotations

import math

import torch

from autospa.conventions import euler_to_matrix, matrix_to_euler

__all__ = [
    "psi_step",
    "psi_grid",
    "oversampled_psi",
    "translation_grid",
    "oversampled_translations",
    "healpix_npix",
    "healpix_pix2ang",
    "healpix_directions",
    "healpix_children",
    "healpix_max_pixrad",
    "direction_vectors",
    "remove_symmetry_equivalent_directions",
    "sampling_directions",
    "angular_sampling_deg",
    "orientations_3d",
    "oversampled_orientations_3d",
    "next_perturbation",
    "perturb_orientations_3d",
]

_JRLL = (2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4)
_JPLL = (1, 3, 5, 7, 0, 2, 4, 6, 1, 3, 5, 7)


# --------------------------------------------------------------------------------------------
# 2D in-plane angles
# --------------------------------------------------------------------------------------------


def _n_psi(step_deg: float, multiple_of: int = 1) -> int:
    if step_deg <= 0:
        raise ValueError(f"psi step must be > 0, got {step_deg}")
    n = math.ceil(360.0 / step_deg)
    if multiple_of > 1 and n % multiple_of:
        n = math.ceil(n / multiple_of) * multiple_of
    return n


def psi_step(step_deg: float, multiple_of: int = 1) -> float:
    """The psi step RELION actually uses for a requested one: ``360 / n``, ``n = ceil(360 / step)``.

    ``multiple_of=32`` reproduces RELION's GPU rounding of ``n``.
    """
    return 360.0 / _n_psi(step_deg, multiple_of)


def psi_grid(
    step_deg: float,
    offset_deg: float = 0.0,
    multiple_of: int = 1,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """RELION's coarse in-plane grid ``j * 360 / n + offset``, ``j = 0 .. n - 1``.

    Parameters
    ----------
    step_deg
        Requested (coarse) step in degrees; ``n = ceil(360 / step_deg)``.
    offset_deg
        Added to every angle (RELION's random perturbation ``r * step``).
    multiple_of
        Round ``n`` up to a multiple of this (32 reproduces RELION with ``--gpu``).

    Returns
    -------
    torch.Tensor
        ``(n,)`` angles in degrees.
    """
    n = _n_psi(step_deg, multiple_of)
    return torch.arange(n, dtype=dtype, device=device) * (360.0 / n) + offset_deg


def oversampled_psi(
    psi_coarse: torch.Tensor, step_deg: float, oversampling: int = 1, wrap_2d: bool = True
) -> torch.Tensor:
    """Fine-pass psi values of each coarse psi (HealpixSampling::pushbackOversampledPsiAngles).

    Parameters
    ----------
    psi_coarse
        ``(n,)`` coarse angles (degrees) without perturbation.
    step_deg
        The coarse step actually used (:func:`psi_step`).
    oversampling
        Order ``ovs``; ``2^ovs`` children ``psi - step/2 + (j + 1/2) step / 2^ovs``.
    wrap_2d
        2D sampling: children above 180 become ``psi - 360`` (RELION does not wrap for
        ``ovs = 0`` nor in 3D).

    Returns
    -------
    torch.Tensor
        ``(n, 2^ovs)`` degrees.
    """
    psi_coarse = torch.as_tensor(psi_coarse, dtype=torch.float64)
    if oversampling == 0:
        return psi_coarse[:, None].clone()
    k = 2**oversampling
    j = torch.arange(k, dtype=psi_coarse.dtype, device=psi_coarse.device)
    out = psi_coarse[:, None] - 0.5 * step_deg + (0.5 + j) * (step_deg / k)
    if wrap_2d:
        out = torch.where(out > 180.0, out - 360.0, out)
    return out


# --------------------------------------------------------------------------------------------
# translations
# --------------------------------------------------------------------------------------------


def translation_grid(
    range_px: float,
    step_px: float,
    perturbation: float = 0.0,
    tol: float = 0.001,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """RELION's 2D coarse translation grid (HealpixSampling::setTranslations).

    Parameters
    ----------
    range_px, step_px
        Search range and step in pixels (``--offset_range``, ``--offset_step``).
    perturbation
        RELION's random perturbation r in [-0.5, 0.5]: ``r * step`` is added to x and y.
    tol
        RELION keeps ``x^2 + y^2 < range^2 + tol``.

    Returns
    -------
    torch.Tensor
        ``(T, 2)`` translations ``(x, y)`` in pixels, x outer, y inner loop; contains (0, 0).
    """
    if step_px <= 0:
        raise ValueError(f"translation step must be > 0, got {step_px}")
    if range_px < 0:
        raise ValueError(f"translation range must be >= 0, got {range_px}")
    maxp = math.ceil(range_px / step_px)
    i = torch.arange(-maxp, maxp + 1, dtype=dtype, device=device)
    gx, gy = torch.meshgrid(i * step_px, i * step_px, indexing="ij")
    keep = gx * gx + gy * gy < range_px * range_px + tol
    out = torch.stack([gx[keep], gy[keep]], dim=-1)
    return out + perturbation * step_px


def oversampled_translations(
    translations: torch.Tensor, step_px: float, oversampling: int = 1, perturbation: float = 0.0
) -> torch.Tensor:
    """Fine-pass sub-points of each coarse translation (HealpixSampling::getTranslationsInPixel).

    Parameters
    ----------
    translations
        ``(T, 2)`` coarse translations in pixels *without* perturbation.
    step_px
        The coarse step.
    oversampling
        Order ``ovs``: ``(2^ovs)^2`` cell-centred children ``t - step/2 + (j + 1/2) step / 2^ovs``
        per axis (x outer, y inner).
    perturbation
        RELION's r: ``r * step`` added to x and y.

    Returns
    -------
    torch.Tensor
        ``(T, 4^ovs, 2)`` in pixels.
    """
    translations = torch.as_tensor(translations)
    k = 2**oversampling
    j = torch.arange(k, dtype=translations.dtype, device=translations.device)
    off = -0.5 * step_px + (0.5 + j) * (step_px / k)
    ox, oy = torch.meshgrid(off, off, indexing="ij")
    sub = torch.stack([ox.reshape(-1), oy.reshape(-1)], dim=-1)  # (k*k, 2), x outer
    return translations[:, None, :] + sub[None] + perturbation * step_px


# --------------------------------------------------------------------------------------------
# HEALPix (NEST)
# --------------------------------------------------------------------------------------------


def healpix_npix(order: int) -> int:
    """``12 * 4^order``."""
    return 12 * 4**order


def _nest2xyf(order: int, pix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    npface = 4**order
    face = torch.div(pix, npface, rounding_mode="floor")
    ipf = pix - face * npface
    ix = torch.zeros_like(pix)
    iy = torch.zeros_like(pix)
    for b in range(order):
        ix |= ((ipf >> (2 * b)) & 1) << b
        iy |= ((ipf >> (2 * b + 1)) & 1) << b
    return ix, iy, face


def _xyf2nest(order: int, ix: torch.Tensor, iy: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
    ipf = torch.zeros_like(ix)
    for b in range(order):
        ipf |= ((ix >> b) & 1) << (2 * b)
        ipf |= ((iy >> b) & 1) << (2 * b + 1)
    return face * 4**order + ipf


def healpix_pix2ang(order: int, pix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel centres in NEST numbering (Healpix_Base::pix2loc).

    Parameters
    ----------
    order
        HEALPix order (nside = 2^order).
    pix
        ``(...)`` int64 pixel indices.

    Returns
    -------
    tuple of torch.Tensor
        ``z = cos(theta)`` and ``phi`` in radians [0, 2 pi), float64, each ``(...)``.
    """
    pix = torch.as_tensor(pix, dtype=torch.int64)
    nside = 2**order
    npix = 12 * nside * nside
    fact2 = 4.0 / npix
    fact1 = (2 * nside) * fact2
    ix, iy, face = _nest2xyf(order, pix)
    jrll = torch.tensor(_JRLL, dtype=torch.int64, device=pix.device)[face]
    jpll = torch.tensor(_JPLL, dtype=torch.int64, device=pix.device)[face]
    jr = jrll * nside - ix - iy - 1
    north = jr < nside
    south = jr > 3 * nside
    nr = torch.where(north, jr, torch.where(south, 4 * nside - jr, torch.full_like(jr, nside)))
    nr_f = nr.double()
    tmp = nr_f * nr_f * fact2
    z = torch.where(north, 1.0 - tmp, torch.where(south, tmp - 1.0, (2 * nside - jr).double() * fact1))
    t = jpll * nr + ix - iy
    t = torch.where(t < 0, t + 8 * nr, t)
    t_f = t.double()
    phi = torch.where(nr == nside, 0.75 * (0.5 * math.pi) * t_f * fact1, (0.5 * (0.5 * math.pi) * t_f) / nr_f)
    return z, phi


def _rot_tilt(z: torch.Tensor, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rot = torch.rad2deg(phi)
    tilt = torch.rad2deg(torch.acos(z.clamp(-1.0, 1.0)))
    rot = torch.where(rot > 180.0, rot - 360.0, rot)  # HealpixSampling::checkDirection
    return rot, tilt


def healpix_directions(order: int, device: torch.device | str | None = None) -> torch.Tensor:
    """All HEALPix pixel centres of an order as RELION's (rot, tilt).

    Returns
    -------
    torch.Tensor
        ``(12 * 4^order, 2)`` float64 degrees, row = NEST pixel index; rot in (-180, 180], tilt in
        [0, 180].
    """
    pix = torch.arange(healpix_npix(order), dtype=torch.int64, device=device)
    rot, tilt = _rot_tilt(*healpix_pix2ang(order, pix))
    return torch.stack([rot, tilt], dim=-1)


def healpix_children(order: int, pixel_index: torch.Tensor, levels: int = 1) -> torch.Tensor:
    """NEST indices at order ``order + levels`` inside the given pixels, in RELION's loop order.

    RELION (HealpixSampling::getOrientations) loops over the fine (x, y) block of the coarse pixel
    with y outer and x inner; for ``levels = 1`` this is ``4 p .. 4 p + 3``.

    Parameters
    ----------
    pixel_index
        ``(...)`` int64 NEST indices at ``order``.

    Returns
    -------
    torch.Tensor
        ``(..., 4^levels)`` int64.
    """
    pix = torch.as_tensor(pixel_index, dtype=torch.int64)
    if levels == 0:
        return pix[..., None].clone()
    ix, iy, face = _nest2xyf(order, pix)
    f = 2**levels
    j = torch.arange(f, dtype=torch.int64, device=pix.device)
    jy, jx = torch.meshgrid(j, j, indexing="ij")  # y outer, x inner
    cx = ix[..., None] * f + jx.reshape(-1)
    cy = iy[..., None] * f + jy.reshape(-1)
    return _xyf2nest(order + levels, cx, cy, face[..., None].expand_as(cx))


def healpix_max_pixrad(order: int) -> float:
    """Largest angle (radians) between a pixel centre and its corners (Healpix_Base::max_pixrad)."""
    nside = 2**order

    def vec(z: float, phi: float) -> torch.Tensor:
        st = math.sqrt(max(0.0, (1.0 - z) * (1.0 + z)))
        return torch.tensor([st * math.cos(phi), st * math.sin(phi), z], dtype=torch.float64)

    va = vec(2.0 / 3.0, math.pi / (4 * nside))
    t1 = (1.0 - 1.0 / nside) ** 2
    vb = vec(1.0 - t1 / 3.0, 0.0)
    return float(torch.atan2(torch.linalg.norm(torch.linalg.cross(va, vb)), torch.dot(va, vb)))


# --------------------------------------------------------------------------------------------
# symmetry-equivalent directions
# --------------------------------------------------------------------------------------------


def direction_vectors(rot_deg: torch.Tensor, tilt_deg: torch.Tensor) -> torch.Tensor:
    """Projection directions (Euler_angles2direction): ``(cos rot sin tilt, sin rot sin tilt, cos tilt)``.

    Returns
    -------
    torch.Tensor
        ``(..., 3)`` unit vectors (the third row of RELION's matrix A).
    """
    a = torch.deg2rad(torch.as_tensor(rot_deg, dtype=torch.float64))
    b = torch.deg2rad(torch.as_tensor(tilt_deg, dtype=torch.float64))
    return torch.stack([a.cos() * b.sin(), a.sin() * b.sin(), b.cos()], dim=-1)


_I_VECS = (
    (0.0, 1.0, 0.0),
    (-0.4999999839058737, -0.8090170074556163, 0.3090169861701543),
    (0.4999999839058737, -0.8090170074556163, 0.3090169861701543),
)
_I4_VECS = (
    (0.0, 0.0, 1.0),
    (0.187592467856686, -0.303530987314591, -0.491123477863004),
    (0.187592467856686, 0.303530987314591, -0.491123477863004),
)


def _planes_ok(v: torch.Tensor, normals, sign: float = 1.0, transform: torch.Tensor | None = None) -> torch.Tensor:
    ok = torch.ones(v.shape[0], dtype=torch.bool, device=v.device)
    for n in normals:
        nv = torch.tensor(n, dtype=torch.float64, device=v.device)
        if transform is not None:
            nv = transform.to(v) @ nv
        nv = nv / torch.linalg.norm(nv)
        ok &= sign * (v @ nv) >= 0
    return ok


def _geometric_asymmetric_unit(group: str, rot: torch.Tensor, tilt: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HealpixSampling::removeSymmetryEquivalentPointsGeometric for the rotation groups."""
    g = group.strip().upper()
    if g[0] == "C" and g[1:].isdigit():
        n = int(g[1:])
        return (rot >= -180.0 / n) & (rot <= 180.0 / n)
    if g[0] == "D" and g[1:].isdigit():
        n = int(g[1:])
        if n == 1:
            return tilt <= 90.0
        return (rot >= -180.0 / n + 90.0) & (rot <= 180.0 / n + 90.0) & (tilt <= 90.0)
    if g == "T":
        normals = ((-0.942809, 0.0, 0.0), (0.471405, 0.272165, 0.7698), (0.471404, 0.816497, 0.0))
        return (((rot >= 90.0) & (rot <= 150.0)) | (rot == 0.0)) & _planes_ok(v, normals)
    if g == "O":
        normals = ((0.0, -1.0, 1.0), (1.0, 1.0, 0.0), (-1.0, 1.0, 0.0))
        return (((rot >= 45.0) & (rot <= 135.0) & (tilt <= 90.0)) | (rot == 0.0)) & _planes_ok(v, normals)
    if g in ("I", "I2"):
        return _planes_ok(v, _I_VECS)
    if g == "I1":
        return _planes_ok(v, _I_VECS, transform=euler_to_matrix(0.0, 90.0, 0.0))
    if g == "I3":
        return _planes_ok(v, _I_VECS, transform=euler_to_matrix(0.0, 31.7174745559, 0.0))
    if g == "I4":
        return _planes_ok(v, _I4_VECS, sign=-1.0, transform=euler_to_matrix(0.0, -31.7174745559, 0.0))
    raise ValueError(f"no asymmetric-unit rule for point group {group!r}")


def remove_symmetry_equivalent_directions(
    rot_deg: torch.Tensor,
    tilt_deg: torch.Tensor,
    symmetry_ops: torch.Tensor,
    max_angle_deg: float,
    group: str | None = None,
    seam_limit: int = 4000,
) -> torch.Tensor:
    """Indices of the directions kept after removing symmetry mates (removeSymmetryEquivalentPoints).

    Parameters
    ----------
    rot_deg, tilt_deg
        ``(N,)`` directions in RELION's convention (rot in [-180, 180], tilt in [0, 180]).
    symmetry_ops
        ``(S, 3, 3)`` rotations of the point group (identity included), e.g.
        :func:`autospa.numerics.symmetry.point_group_matrices`.
    max_angle_deg
        Two directions closer than this after a symmetry operation are the same; RELION uses half
        the maximum pixel radius of the HEALPix grid.
    group
        Point-group name: first keep RELION's geometric asymmetric unit of that group (C<n>,
        D<n>, T, O, I, I1-I4). Without it only the seam pass runs, which keeps the first direction
        of every orbit in index order (a valid but different asymmetric unit).
    seam_limit
        The seam pass runs only when fewer directions than this are left (RELION: 4000).

    Returns
    -------
    torch.Tensor
        ``(K,)`` int64 indices into the input, increasing.
    """
    rot = torch.as_tensor(rot_deg, dtype=torch.float64)
    tilt = torch.as_tensor(tilt_deg, dtype=torch.float64)
    v = direction_vectors(rot, tilt)
    idx = torch.arange(rot.shape[0], device=rot.device)
    if group is not None:
        keep = _geometric_asymmetric_unit(group, rot, tilt, v)
        idx, v = idx[keep], v[keep]
    n = idx.shape[0]
    if n == 0 or n >= seam_limit:
        return idx
    ops = torch.as_tensor(symmetry_ops, dtype=torch.float64, device=v.device)
    cos_max = math.cos(math.radians(max_angle_deg))
    # mates[i] = earlier directions k < i with dot(R^T v_k, v_i) > cos_max for some R
    mate = torch.zeros(n, n, dtype=torch.bool, device=v.device)
    for r in ops:
        images = v @ r  # rows: (R^T v_k)^T
        mate |= (v @ images.T) > cos_max
    mate = torch.tril(mate, diagonal=-1).cpu()
    kept = torch.zeros(n, dtype=torch.bool)
    for i in range(n):
        earlier = mate[i, :i]
        kept[i] = not bool((earlier & kept[:i]).any())
    return idx[kept.to(idx.device)]


# --------------------------------------------------------------------------------------------
# 3D orientations
# --------------------------------------------------------------------------------------------


def angular_sampling_deg(order: int) -> float:
    """RELION's nominal 3D angular step ``360 / (6 * 2^order)`` (also the default psi step)."""
    return 360.0 / (6 * 2**order)


def sampling_directions(
    order: int,
    symmetry_ops: torch.Tensor | None = None,
    group: str | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The coarse 3D directions of HealpixSampling::setOrientations.

    Parameters
    ----------
    order
        HEALPix order.
    symmetry_ops
        ``(S, 3, 3)`` point-group rotations; None = C1 (nothing removed).
    group
        The group's name, for RELION's geometric asymmetric unit (see
        :func:`remove_symmetry_equivalent_directions`).

    Returns
    -------
    tuple of torch.Tensor
        ``(D, 2)`` (rot, tilt) degrees and ``(D,)`` int64 HEALPix NEST pixel indices.
    """
    dirs = healpix_directions(order, device=device)
    pix = torch.arange(dirs.shape[0], dtype=torch.int64, device=dirs.device)
    if symmetry_ops is None and group is None:
        return dirs, pix
    if symmetry_ops is None:
        raise ValueError("group given without symmetry_ops")
    max_ang = 0.5 * math.degrees(healpix_max_pixrad(order))
    keep = remove_symmetry_equivalent_directions(dirs[:, 0], dirs[:, 1], symmetry_ops, max_ang, group)
    return dirs[keep], pix[keep]


def orientations_3d(
    order: int,
    psi_step_deg: float | None = None,
    symmetry_ops: torch.Tensor | None = None,
    group: str | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Coarse 3D orientation grid (rot, tilt, psi): directions outer, psi inner (RELION's order).

    Parameters
    ----------
    order
        HEALPix order h.
    psi_step_deg
        In-plane step; default ``360 / (6 * 2^h)``, rounded so that ``360 / step`` is an integer.
    symmetry_ops, group
        See :func:`sampling_directions`.

    Returns
    -------
    torch.Tensor
        ``(D * n_psi, 3)`` float64 degrees.
    """
    dirs, _ = sampling_directions(order, symmetry_ops, group, device)
    step = angular_sampling_deg(order) if psi_step_deg is None else psi_step_deg
    psi = psi_grid(step, device=dirs.device)
    d = dirs[:, None, :].expand(-1, psi.shape[0], -1)
    p = psi[None, :, None].expand(dirs.shape[0], -1, -1)
    return torch.cat([d, p], dim=-1).reshape(-1, 3)


def oversampled_orientations_3d(
    order: int, pixel_index: torch.Tensor, psi_coarse: torch.Tensor, psi_step_deg: float, oversampling: int = 1
) -> torch.Tensor:
    """Fine-pass orientations of coarse (direction, psi) pairs (HealpixSampling::getOrientations).

    Parameters
    ----------
    order
        Coarse HEALPix order.
    pixel_index
        ``(n,)`` NEST index of each coarse direction.
    psi_coarse
        ``(n,)`` coarse psi (degrees) of each pair.
    psi_step_deg
        Coarse psi step.
    oversampling
        ``ovs``; each pair gives ``4^ovs`` child directions x ``2^ovs`` psi (children outer).

    Returns
    -------
    torch.Tensor
        ``(n, 8^ovs, 3)`` (rot, tilt, psi) degrees; for ``ovs = 0`` the coarse orientation itself.
    """
    pix = torch.as_tensor(pixel_index, dtype=torch.int64)
    psi_coarse = torch.as_tensor(psi_coarse, dtype=torch.float64, device=pix.device)
    children = healpix_children(order, pix, oversampling)  # (n, 4^ovs)
    rot, tilt = _rot_tilt(*healpix_pix2ang(order + oversampling, children))
    psis = oversampled_psi(psi_coarse, psi_step_deg, oversampling, wrap_2d=False)  # (n, 2^ovs)
    nc, npsi = children.shape[-1], psis.shape[-1]
    r = rot[:, :, None].expand(-1, nc, npsi)
    t = tilt[:, :, None].expand(-1, nc, npsi)
    p = psis[:, None, :].expand(-1, nc, npsi)
    return torch.stack([r, t, p], dim=-1).reshape(pix.shape[0], nc * npsi, 3)


def next_perturbation(
    previous: float, factor: float = 0.5, generator: torch.Generator | None = None
) -> float:
    """RELION's per-iteration random perturbation (resetRandomlyPerturbedSampling).

    ``r += U(factor / 2, factor)``, then wrapped periodically into ``[-factor, factor]``.
    """
    if factor <= 0:
        return 0.0
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    r = previous + 0.5 * factor + u * 0.5 * factor
    lo, hi = -factor, factor
    width = hi - lo
    if r > hi:  # RELION's realWRAP keeps [lo, hi] as it is
        r -= width * math.ceil((r - hi) / width)
    elif r < lo:
        r += width * math.ceil((lo - r) / width)
    return r


def perturb_orientations_3d(angles_deg: torch.Tensor, perturbation: float, step_deg: float) -> torch.Tensor:
    """Rotate 3D orientations by RELION's perturbation: ``A <- A * Euler(p, p, p)``, ``p = r * step``.

    Parameters
    ----------
    angles_deg
        ``(..., 3)`` (rot, tilt, psi) degrees.

    Returns
    -------
    torch.Tensor
        ``(..., 3)`` perturbed angles (RELION's matrix_to_euler convention).
    """
    angles_deg = torch.as_tensor(angles_deg, dtype=torch.float64)
    if perturbation == 0.0:
        return angles_deg.clone()
    p = perturbation * step_deg
    a = euler_to_matrix(angles_deg[..., 0], angles_deg[..., 1], angles_deg[..., 2])
    r = euler_to_matrix(torch.tensor(p, dtype=torch.float64), torch.tensor(p, dtype=torch.float64), torch.tensor(p, dtype=torch.float64))
    rot, tilt, psi = matrix_to_euler(a @ r.to(a.device))
    return torch.stack([rot, tilt, psi], dim=-1)
