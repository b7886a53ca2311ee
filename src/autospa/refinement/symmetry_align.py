"""Symmetry alignment and point-group detection of a 3D map (L2, pure torch).

What it does (relion_align_symmetry, reference/relion-vdam.md section 5, plus a group search):
given a map ``v`` and a point group G (RELION's axis conventions,
:func:`autospa.numerics.symmetry.point_group_matrices`), find the rotation ``A`` and the centre
``c`` such that the aligned map

    u(x) = v(c + A x)        (x: position relative to the box centre ``box // 2``, (x, y, z) order)

is G-symmetric in RELION's standard orientation, then (optionally) symmetrise it:
``sym(u)(x) = 1/|G| sum_g u(g x)``. The columns of ``A`` are the standard x, y, z axes as seen in
the input map; the rotation applied to the map's content is ``R = A^T`` (a feature at ``c + y``
moves to ``R y``), reported as RELION Euler angles.

Score
    With ``v'`` the map low-passed, masked by a sphere and with its spherical average removed (the
    part every rotation leaves unchanged), each operator ``Q = A g A^T`` of the conjugated group
    gets the correlation ``f(Q) = corr(v'(x), v'(c + Q (x - c)))`` over the mask. The
    *agreement* of G is the mean of ``f`` over the ``|G| - 1`` non-identity operators (1 for a
    perfectly symmetric map; ``sum_g f = |G| |P_G v'|^2 / |v'|^2 - 1`` with ``P_G`` the
    symmetrisation, so it also measures the map's agreement with its symmetrised self). Groups are
    ranked by

        score(G) = sum_{g != e} (f_g - tau) = (|G| - 1) * (agreement - tau)

    with the order penalty ``tau`` (default 0.5): every operator the map obeys earns ``1 - tau``,
    every one it does not obey costs; C1 scores 0. A subgroup of the true group has fewer
    operators and loses ties; a supergroup must earn its extra operators.

Search (coarse to fine, as relion_align_symmetry, but using the groups' own axes)
    1. Centre the map on its centre of mass (positive density after a low-pass), Fourier-crop it to
       a small working box and low-pass it to ``lowpass_px`` working pixels per resolution element.
    2. Self-rotation table: ``f(axis, angle)`` for every rotation angle that occurs in the
       candidate groups (angles in (0, 180]; ``f(a, t) = f(-a, t)``) and ~600 axes on a
       hemisphere. One table serves every candidate group.
    3. Coarse search: for orientations ``A`` on an SO(3) grid (default 7.5 degrees) the group score
       is a sum of table look-ups ``f(A a_g, t_g)`` over the group's elements (axis ``a_g``,
       angle ``t_g``); no map is rotated.
    4. Local refinement of the best distinct orientations by pattern search over small rotations
       and centre shifts, scoring with exactly rotated maps (trilinear, working box), with steps
       of 4, 2, 1, 0.5 degrees (and 0.5, 0.25 working pixels).
    5. The full-size map is resampled once per operator (Fourier-padded by 2, trilinear: RELION
       rotates through a pad-2 projector).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from autospa.conventions import matrix_to_euler
from autospa.numerics.fourier import (
    fftfreq_3d,
    fourier_crop,
    fourier_pad,
    irfftn3,
    radial_average_3d,
    rfftn3,
    shell_index_3d,
)
from autospa.numerics import slices
from autospa.numerics.masks import radius_grid, soft_spherical_mask
from autospa.numerics.symmetry import point_group_matrices, point_group_order

log = logging.getLogger(__name__)

__all__ = [
    "SymmetrySearchOptions",
    "SymmetryAlignment",
    "GroupScore",
    "default_candidate_groups",
    "rotation_axis_angle",
    "resample_volume",
    "shift_volume",
    "symmetrise",
    "apply_alignment",
    "symmetry_agreement",
    "align_symmetry",
    "rank_point_groups",
]


# --------------------------------------------------------------------------------------------
# options and results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SymmetrySearchOptions:
    """Parameters of the symmetry search.

    Attributes
    ----------
    working_box
        Box (voxels) the map is Fourier-cropped to for the search (RELION: 64); never more than the
        map's box.
    lowpass_px
        Low-pass of the working map, in working pixels per resolution element (2-3).
    mask_radius
        Radius of the spherical search mask as a fraction of the box.
    n_table_axes
        Axes of the self-rotation table (a Fibonacci hemisphere; 600 gives ~5.8 degree spacing).
    coarse_step_deg
        Step of the coarse SO(3) grid.
    refine_steps_deg
        Rotation steps of the local pattern search, coarse to fine.
    shift_steps_px
        Centre-shift steps of the local search in working pixels (used with the finest
        rotation steps); empty: keep the centre of mass.
    n_starts
        Distinct coarse orientations refined per group.
    order_penalty
        ``tau`` of the group score (see the module docstring).
    n_refine_groups
        For group ranking: how many groups (best coarse scores) are refined with rotated maps; the
        others keep their table score.
    keep_centre
        Do not re-centre on the centre of mass (RELION's ``--keep_centre``) and do not search
        the centre.
    pad
        Fourier padding of the full-size map for the final resampling (1 or 2).
    whiten
        Flatten the map's rotationally averaged amplitude spectrum before the search, so that
        every shell up to the low-pass counts alike (otherwise the overall, ellipsoid-like shape
        at the lowest shells makes every map look a little D2-symmetric).
    """

    working_box: int = 24
    lowpass_px: float = 2.5
    mask_radius: float = 0.45
    n_table_axes: int = 600
    coarse_step_deg: float = 7.5
    refine_steps_deg: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5)
    shift_steps_px: tuple[float, ...] = (0.5, 0.25)
    n_starts: int = 2
    order_penalty: float = 0.5
    n_refine_groups: int = 5
    keep_centre: bool = False
    pad: int = 2
    whiten: bool = True


@dataclass(frozen=True)
class SymmetryAlignment:
    """Where a point group's axes lie in a map.

    Attributes
    ----------
    group
        Point-group name (RELION's, upper case).
    order
        Number of rotations of the group.
    matrix
        ``(3, 3)`` float64 ``A``: the aligned map is ``u(x) = v(center + A x)``.
    center_px
        ``(3,)`` float64 ``(x, y, z)`` centre of symmetry in the input map, pixels relative to the
        box centre ``box // 2``.
    euler_deg
        RELION angles ``(rot, tilt, psi)`` of the rotation ``R = A^T`` applied to the map.
    agreement
        Mean correlation of the map with its non-identity symmetry mates (1 for C1).
    score
        ``(order - 1) * (agreement - order_penalty)``.
    operator_correlations
        ``(order - 1,)`` correlation per non-identity operator (float64).
    """

    group: str
    order: int
    matrix: torch.Tensor
    center_px: torch.Tensor
    euler_deg: tuple[float, float, float]
    agreement: float
    score: float
    operator_correlations: torch.Tensor = field(repr=False)

    @property
    def shift_px(self) -> torch.Tensor:
        """``(3,)`` shift ``(x, y, z)`` in pixels that moves the centre of symmetry to the box centre."""
        return -self.center_px


@dataclass(frozen=True)
class GroupScore:
    """One line of a point-group ranking.

    Attributes
    ----------
    group, order, agreement, score
        As :class:`SymmetryAlignment`.
    refined
        Whether the score comes from rotated maps (True) or the coarse table (False; an
        underestimate for the refined orientation).
    alignment
        The alignment behind the score (refined ones only).
    """

    group: str
    order: int
    agreement: float
    score: float
    refined: bool
    alignment: SymmetryAlignment | None = field(default=None, repr=False)


def default_candidate_groups(max_n: int = 12, icosahedral: bool = True) -> list[str]:
    """Candidate point groups of ``--sym auto``: C1, C2 .. C<max_n>, D2 .. D<max_n>, T, O (, I).

    Returns
    -------
    list of str
        Group names in increasing order within each family.
    """
    groups = ["C1"] + [f"C{n}" for n in range(2, max_n + 1)] + [f"D{n}" for n in range(2, max_n + 1)]
    groups += ["T", "O"] + (["I"] if icosahedral else [])
    return groups


# --------------------------------------------------------------------------------------------
# rotations
# --------------------------------------------------------------------------------------------


def rotation_axis_angle(mats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Axis and angle of rotation matrices, angle in [0, 180] degrees.

    Parameters
    ----------
    mats
        ``(..., 3, 3)`` rotations acting on ``(x, y, z)``.

    Returns
    -------
    axes : torch.Tensor
        ``(..., 3)`` unit axes (``(0, 0, 1)`` for the identity), float64.
    angles_deg : torch.Tensor
        ``(...)`` float64; ``mats = rot(axis, angle)``.
    """
    m = mats.to(torch.float64)
    tr = m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2]
    ang = torch.arccos(((tr - 1.0) / 2.0).clamp(-1.0, 1.0))
    skew = torch.stack([m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1)
    axes = skew / (2.0 * torch.sin(ang)).clamp_min(1e-12)[..., None]
    # near 180 degrees the skew part vanishes: the axis is the dominant column of (R + I) / 2 = a a^T
    sym = (m + torch.eye(3, dtype=m.dtype, device=m.device)) / 2.0
    diag = torch.diagonal(sym, dim1=-2, dim2=-1)
    col = torch.gather(sym, -1, diag.argmax(-1)[..., None, None].expand(*sym.shape[:-1], 1))[..., 0]
    col = col / col.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    near_pi = ang > math.pi - 1e-3
    axes = torch.where(near_pi[..., None], col, axes)
    small = ang < 1e-6
    z = torch.zeros_like(axes)
    z[..., 2] = 1.0
    axes = torch.where(small[..., None], z, axes)
    axes = axes / axes.norm(dim=-1, keepdim=True)
    return axes, torch.rad2deg(ang)


def _axis_rotations(axes: torch.Tensor, angles_rad: torch.Tensor) -> torch.Tensor:
    """Rodrigues: ``(..., 3)`` unit axes and ``(...)`` angles -> ``(..., 3, 3)``."""
    a = axes
    zero = torch.zeros_like(a[..., 0])
    k = torch.stack(
        [
            torch.stack([zero, -a[..., 2], a[..., 1]], -1),
            torch.stack([a[..., 2], zero, -a[..., 0]], -1),
            torch.stack([-a[..., 1], a[..., 0], zero], -1),
        ],
        -2,
    )
    s = torch.sin(angles_rad)[..., None, None]
    c = torch.cos(angles_rad)[..., None, None]
    eye = torch.eye(3, dtype=a.dtype, device=a.device)
    return eye + s * k + (1.0 - c) * (k @ k)


def _zyz(phi: torch.Tensor, theta: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """``Rz(phi) Ry(theta) Rz(psi)`` (radians), ``(..., 3, 3)``; its third column is the direction (theta, phi)."""

    def rz(t):
        c, s = torch.cos(t), torch.sin(t)
        o, z = torch.ones_like(t), torch.zeros_like(t)
        return torch.stack([torch.stack([c, -s, z], -1), torch.stack([s, c, z], -1), torch.stack([z, z, o], -1)], -2)

    def ry(t):
        c, s = torch.cos(t), torch.sin(t)
        o, z = torch.ones_like(t), torch.zeros_like(t)
        return torch.stack([torch.stack([c, z, s], -1), torch.stack([z, o, z], -1), torch.stack([-s, z, c], -1)], -2)

    return rz(phi) @ ry(theta) @ rz(psi)


def _fibonacci_directions(n: int, hemisphere: bool) -> torch.Tensor:
    """``(n, 3)`` float64 nearly uniform unit vectors (z > 0 only if ``hemisphere``)."""
    i = torch.arange(n, dtype=torch.float64)
    z = (i + 0.5) / n
    if not hemisphere:
        z = 2.0 * z - 1.0
    phi = i * math.pi * (3.0 - math.sqrt(5.0))
    r = torch.sqrt((1.0 - z * z).clamp_min(0.0))
    return torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], -1)


_LUT_SIZE = 64


@functools.lru_cache(maxsize=4)
def _axis_lookup(n_axes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Table axes (upper hemisphere) and a cubic direction grid -> nearest axis (up to sign) map.

    The look-up is a ``(L, L, L)`` grid over ``[-1, 1]^3``: a unit vector ``d`` falls in the cell
    ``round((d + 1) / 2 * (L - 1))``, whose normalised centre's nearest axis is stored (~2 degrees).
    """
    axes = _fibonacci_directions(n_axes, hemisphere=True)
    ax = torch.linspace(-1.0, 1.0, _LUT_SIZE, dtype=torch.float64)
    gz, gy, gx = torch.meshgrid(ax, ax, ax, indexing="ij")
    dirs = torch.stack([gx, gy, gz], -1).reshape(-1, 3)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    idx = torch.cat([(d @ axes.T).abs().argmax(-1) for d in dirs.split(8192)])
    return axes, idx


def _nearest_axis(dirs: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Index of the nearest table axis (up to sign) of ``(..., 3)`` unit vectors."""
    cell = torch.round((dirs.to(torch.float32) + 1.0) * (0.5 * (_LUT_SIZE - 1))).long().clamp(0, _LUT_SIZE - 1)
    return lut[(cell[..., 2] * _LUT_SIZE + cell[..., 1]) * _LUT_SIZE + cell[..., 0]]


def _so3_grid(step_deg: float) -> torch.Tensor:
    """``(N, 3, 3)`` float64 rotations covering SO(3) at about ``step_deg``."""
    step = math.radians(step_deg)
    n_dir = max(8, int(round(4.0 * math.pi / step**2)))
    n_psi = max(4, int(round(2.0 * math.pi / step)))
    d = _fibonacci_directions(n_dir, hemisphere=False)
    theta = torch.arccos(d[:, 2].clamp(-1.0, 1.0))
    phi = torch.atan2(d[:, 1], d[:, 0])
    psi = torch.arange(n_psi, dtype=torch.float64) * (2.0 * math.pi / n_psi)
    return _zyz(phi[:, None].expand(-1, n_psi), theta[:, None].expand(-1, n_psi), psi[None, :].expand(n_dir, -1)).reshape(-1, 3, 3)


def _small_rotations(step_deg: float) -> torch.Tensor:
    """``(6, 3, 3)`` rotations by +-step about x, y and z."""
    eye = torch.eye(3, dtype=torch.float64)
    axes = torch.cat([eye, eye])
    ang = torch.full((6,), math.radians(step_deg), dtype=torch.float64)
    ang[3:] *= -1.0
    return _axis_rotations(axes, ang)


# --------------------------------------------------------------------------------------------
# resampling
# --------------------------------------------------------------------------------------------


def _sample(vol: torch.Tensor, coords_idx: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of ``vol (D, D, D)`` at voxel indices ``coords_idx (..., 3)`` (x, y, z); 0 outside."""
    size = vol.shape[-1]
    lead = coords_idx.shape[:-1]
    g = (2.0 * coords_idx / (size - 1) - 1.0).to(vol.dtype).reshape(1, -1, 1, 1, 3)
    out = slices.grid_sample_threaded(vol[None, None], g)  # grid_sample's values, over the CPU's threads
    return out.reshape(lead)


def resample_volume(
    vol: torch.Tensor,
    matrices: torch.Tensor,
    centers_px: torch.Tensor | None = None,
    pad: int = 2,
) -> torch.Tensor:
    """Resample a map on rotated and shifted grids: ``u_i(x) = v(c_i + M_i x)``.

    Parameters
    ----------
    vol
        ``(D, D, D)`` real map ``(z, y, x)``.
    matrices
        ``(3, 3)`` or ``(n, 3, 3)`` matrices acting on ``(x, y, z)``.
    centers_px
        ``(3,)`` or ``(n, 3)`` ``(x, y, z)`` positions in pixels relative to the box centre
        ``D // 2``; default 0.
    pad
        Fourier padding factor before trilinear interpolation (1: plain trilinear; 2: RELION's pad).

    Returns
    -------
    torch.Tensor
        ``(D, D, D)`` (or ``(n, D, D, D)`` for a batch of matrices), dtype and device of ``vol``;
        0 where ``c + M x`` falls outside the map.
    """
    single = matrices.dim() == 2
    mats = matrices.reshape(-1, 3, 3).to(device=vol.device, dtype=torch.float64)
    n = mats.shape[0]
    if centers_px is None:
        cen = torch.zeros(n, 3, dtype=torch.float64, device=vol.device)
    else:
        cen = torch.as_tensor(centers_px, dtype=torch.float64, device=vol.device).reshape(-1, 3).expand(n, 3)
    box = vol.shape[-1]
    work = vol.float() if vol.dtype in (torch.float16, torch.bfloat16) else vol
    big = fourier_pad(work, pad * box, ndim=3) if pad > 1 else work
    ax = torch.arange(box, dtype=torch.float64, device=vol.device) - box // 2
    gz, gy, gx = torch.meshgrid(ax, ax, ax, indexing="ij")
    x = torch.stack([gx, gy, gz], -1).reshape(-1, 3)  # (D^3, 3)
    outs = []
    for i in range(n):
        p = x @ mats[i].T + cen[i]  # positions in input pixels
        idx = pad * (p + box // 2)
        outs.append(_sample(big, idx).reshape(box, box, box))
    out = torch.stack(outs).to(vol.dtype)
    return out[0] if single else out


def shift_volume(vol: torch.Tensor, shift_px: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Move a map's content by ``shift_px`` (x, y, z) pixels (cyclic, Fourier phase ramp).

    Parameters
    ----------
    vol
        ``(D, D, D)`` real map.
    shift_px
        ``(3,)`` shift; content at ``p`` moves to ``p + shift``.

    Returns
    -------
    torch.Tensor
        ``(D, D, D)``, same dtype as ``vol`` (float16 computed in float32).
    """
    box = vol.shape[-1]
    s = torch.as_tensor(shift_px, dtype=torch.float64, device=vol.device).reshape(3)
    k = fftfreq_3d(box, rfft=True, device=vol.device, dtype=torch.float64)
    phase = -2.0 * math.pi * (k @ s)
    ramp = torch.polar(torch.ones_like(phase), phase)
    ft = rfftn3(vol.float() if vol.dtype in (torch.float16, torch.bfloat16) else vol)
    return irfftn3(ft * ramp.to(ft.dtype), box).to(vol.dtype)


def symmetrise(
    vol: torch.Tensor,
    group: str,
    matrix: torch.Tensor | None = None,
    center_px: torch.Tensor | None = None,
    pad: int = 2,
) -> torch.Tensor:
    """Align and symmetrise a map: ``1/|G| sum_g v(c + A g x)``.

    Parameters
    ----------
    vol
        ``(D, D, D)`` map.
    group
        Point group (RELION name).
    matrix
        ``(3, 3)`` ``A`` of :class:`SymmetryAlignment` (default identity: the map is already in
        the standard orientation).
    center_px
        ``(3,)`` centre of symmetry (default the box centre).
    pad
        Fourier padding for the interpolation.

    Returns
    -------
    torch.Tensor
        ``(D, D, D)`` symmetric map in the standard orientation, centred.
    """
    ops = point_group_matrices(group, device=vol.device)
    a = torch.eye(3, dtype=torch.float64, device=vol.device) if matrix is None else matrix.to(vol.device, torch.float64)
    mats = a @ ops
    cen = None if center_px is None else torch.as_tensor(center_px, dtype=torch.float64)
    return resample_volume(vol, mats, cen, pad=pad).mean(0)


def apply_alignment(vol: torch.Tensor, alignment: SymmetryAlignment, apply_symmetry: bool = True, pad: int = 2) -> torch.Tensor:
    """The aligned map ``u(x) = v(c + A x)``, symmetrised with the alignment's group if asked.

    Parameters
    ----------
    vol
        ``(D, D, D)`` input map.

    Returns
    -------
    torch.Tensor
        ``(D, D, D)``.
    """
    if apply_symmetry and alignment.order > 1:
        return symmetrise(vol, alignment.group, alignment.matrix, alignment.center_px, pad=pad)
    return resample_volume(vol, alignment.matrix, alignment.center_px, pad=pad)


# --------------------------------------------------------------------------------------------
# the working map and scoring
# --------------------------------------------------------------------------------------------


@dataclass
class _Working:
    """The search map: low-passed, centred on the centre of mass, in a small box."""

    vol: torch.Tensor  # (B, B, B) processed map (masked, spherical average removed), float32
    padded: torch.Tensor  # (2B, 2B, 2B) the same, Fourier-padded by 2 for the interpolation
    points: torch.Tensor  # (P, 3) positions (x, y, z) relative to the centre, working px, float32
    points_h: torch.Tensor  # (P, 4) the same with a column of ones (homogeneous coordinates)
    values: torch.Tensor  # (P,) processed values at the points, normalised to unit length
    box: int
    radius: float  # radius of the search mask, working px
    lowpass_px: float  # working pixels per resolution element
    scale: float  # full pixels per working pixel
    com_px: torch.Tensor  # (3,) centre of mass in full pixels relative to the full box centre


def _center_of_mass(vol: torch.Tensor, mask_radius: float) -> torch.Tensor:
    """Centre of mass (x, y, z; pixels from the box centre) of the positive density of a low-passed map."""
    box = vol.shape[-1]
    small = min(box, 32)
    low = fourier_crop(vol.float(), small, ndim=3) if small < box else vol.float()
    m = soft_spherical_mask(small, mask_radius * small, max(1.0, 0.05 * small), device=vol.device)
    w = low * m
    w = (w - 0.1 * w.max()).clamp_min(0.0) * m
    total = w.sum()
    if float(total) <= 0:
        return torch.zeros(3, dtype=torch.float64, device=vol.device)
    ax = torch.arange(small, dtype=torch.float64, device=vol.device) * (box / small)
    gz, gy, gx = torch.meshgrid(ax, ax, ax, indexing="ij")
    wd = w.double()
    com = torch.stack([(wd * gx).sum(), (wd * gy).sum(), (wd * gz).sum()]) / wd.sum()
    return com - box // 2


def _working_map(vol: torch.Tensor, opts: SymmetrySearchOptions, box_w: int | None = None) -> _Working:
    box = vol.shape[-1]
    bw = min(box, opts.working_box if box_w is None else box_w)
    scale = box / bw
    com = torch.zeros(3, dtype=torch.float64, device=vol.device) if opts.keep_centre else _center_of_mass(vol, opts.mask_radius)
    # move the centre of mass to the full-map position of working voxel bw // 2
    target = (bw // 2) * scale - box // 2
    work = shift_volume(vol.float(), target - com)
    if bw < box:
        work = fourier_crop(work, bw, ndim=3)
    # low-pass to lowpass_px working pixels per resolution element (raised cosine, 1.5 shells wide)
    ft = rfftn3(work)
    k = fftfreq_3d(bw, rfft=True, device=vol.device, dtype=torch.float64).norm(dim=-1)
    cut = 1.0 / opts.lowpass_px
    width = 1.5 / bw
    t = ((k - (cut - width)) / width).clamp(0.0, 1.0)
    filt = 0.5 + 0.5 * torch.cos(math.pi * t)
    if opts.whiten:
        # flatten the rotationally averaged amplitude, so that the overall shape (the lowest shells,
        # an ellipsoid with D2 symmetry at low resolution) does not dominate the correlations; and
        # weight each shell by its signal fraction, the noise power being measured in the corners
        # of the box (outside 0.45 box), which hold solvent only
        power = radial_average_3d(ft.abs().double() ** 2, bw)
        outside = (radius_grid(bw, 3, device=vol.device) >= 0.45 * bw).float()
        frac = float(outside.mean())
        if frac > 0.05:
            noise = radial_average_3d(rfftn3(work * outside).abs().double() ** 2, bw) / frac
            signal_fraction = (1.0 - noise / power.clamp_min(1e-30)).clamp(0.0, 1.0)
        else:
            signal_fraction = torch.ones_like(power)
        shells = shell_index_3d(bw, rfft=True, device=vol.device).clamp(max=bw // 2)
        amp = torch.sqrt(power)
        weight = torch.where(amp > 0, signal_fraction / amp.clamp_min(1e-30), torch.zeros_like(amp))
        weight[0] = 0.0
        filt = filt * (weight / weight.max().clamp_min(1e-30))[shells]
    work = irfftn3(ft * filt.to(ft.dtype), bw)
    # soft spherical mask around the particle (99% of its positive density, at most mask_radius)
    radius = _particle_radius(work, opts.mask_radius * bw)
    mask = soft_spherical_mask(bw, radius, _MASK_EDGE_PX, device=vol.device)
    # the spherical average is binned with linear weights and read back by linear interpolation, so
    # that it is a smooth (rotation-invariant after interpolation) function of the radius
    r = radius_grid(bw, 3, device=vol.device, dtype=torch.float64).reshape(-1)
    lo = torch.floor(r).long()
    frac = r - lo
    n_sh = int(lo.max()) + 2
    md, wd = mask.double().reshape(-1), work.double().reshape(-1)
    wsum = torch.zeros(n_sh, dtype=torch.float64, device=vol.device)
    vsum = torch.zeros(n_sh, dtype=torch.float64, device=vol.device)
    for idx, wt in ((lo, 1.0 - frac), (lo + 1, frac)):
        wsum.index_add_(0, idx, wt * md)
        vsum.index_add_(0, idx, wt * md * wd)
    profile = vsum / wsum.clamp_min(1e-12)
    smooth = (profile[lo] * (1.0 - frac) + profile[lo + 1] * frac).reshape(bw, bw, bw)
    proc = (mask * (work - smooth.float())).float()
    inside = mask > 1e-3
    ax = torch.arange(bw, dtype=torch.float32, device=vol.device) - bw // 2
    gz, gy, gx = torch.meshgrid(ax, ax, ax, indexing="ij")
    pts = torch.stack([gx[inside], gy[inside], gz[inside]], -1)
    padded = fourier_pad(proc, 2 * bw, ndim=3).contiguous()
    vals = proc[inside]
    return _Working(vol=proc, padded=padded, points=pts, points_h=torch.cat([pts, torch.ones_like(pts[:, :1])], 1), values=vals / vals.norm().clamp_min(1e-30), box=bw, radius=radius + _MASK_EDGE_PX, lowpass_px=opts.lowpass_px, scale=scale, com_px=com)


_MASK_EDGE_PX = 2.0


def _particle_radius(work: torch.Tensor, max_radius: float) -> float:
    """Radius (working px) holding 99% of the positive density of a centred map, plus a margin."""
    bw = work.shape[-1]
    r = radius_grid(bw, 3, device=work.device, dtype=torch.float64)
    w = (work.double() - 0.1 * float(work.max())).clamp_min(0.0) * (r <= max_radius)
    total = float(w.sum())
    if total <= 0:
        return float(max_radius)
    order = torch.argsort(r.reshape(-1))
    cum = torch.cumsum(w.reshape(-1)[order], 0)
    r99 = float(r.reshape(-1)[order][int(torch.searchsorted(cum, 0.99 * total).clamp(max=cum.numel() - 1))])
    return float(min(max_radius, max(3.0, r99 + 1.0)))


def _correlations(w: _Working, ops: torch.Tensor, centers: torch.Tensor | None = None, chunk_points: int = 2_000_000) -> torch.Tensor:
    """``f`` of each operator: ``corr(v'(x), v'(c + Q (x - c)))`` over the mask points.

    ops ``(M, 3, 3)``, centers ``(M, 3)`` working px (None: 0). Returns ``(M,)`` float64.
    """
    m = ops.shape[0]
    p = w.points.shape[0]
    dev = w.vol.device
    out = torch.empty(m, dtype=torch.float64, device=dev)
    step = max(1, chunk_points // max(p, 1))
    size = w.padded.shape[-1]
    # grid_sample coordinate of the position x (working px): 2 * (2 (x + box // 2)) / (size - 1) - 1,
    # computed for all operators by one GEMM in homogeneous coordinates: [x, 1] @ [[alpha Q^T], [shift]]
    alpha = 4.0 / (size - 1)
    beta = alpha * (w.box // 2) - 1.0
    vol = w.padded[None, None]
    for s in range(0, m, step):
        q = ops[s : s + step].to(device=dev, dtype=torch.float32)
        k = q.shape[0]
        shift = torch.full((k, 3), beta, dtype=torch.float32, device=dev)
        if centers is not None:
            c = centers[s : s + step].to(device=dev, dtype=torch.float32)
            shift = shift + alpha * (c - torch.einsum("mij,mj->mi", q, c))
        mat = torch.cat([alpha * q.permute(2, 0, 1).reshape(3, 3 * k), shift.reshape(1, 3 * k)])  # (4, 3k)
        grid = (w.points_h @ mat).reshape(1, p, k, 1, 3)
        b = slices.grid_sample_threaded(vol, grid).reshape(p, k)
        num = w.values @ b
        den = b.norm(dim=0)
        out[s : s + step] = torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num)).double()
    return out


def _group_elements(group: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Non-identity elements of a group: ``(S-1, 3, 3)`` matrices, ``(S-1, 3)`` axes, ``(S-1,)`` angles."""
    mats = point_group_matrices(group)[1:]
    axes, ang = rotation_axis_angle(mats)
    return mats, axes, ang


def _angle_key(angle_deg: float) -> float:
    return round(float(angle_deg), 3)


def _self_rotation_table(w: _Working, angles_deg: list[float], n_axes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n_angles, n_axes)`` correlations ``f(axis, angle)`` and the axis look-up map."""
    axes, lut = _axis_lookup(n_axes)
    axes_d = axes.to(w.vol.device)
    ang = torch.deg2rad(torch.tensor(angles_deg, dtype=torch.float64, device=w.vol.device))
    rots = _axis_rotations(axes_d[None, :, :].expand(len(angles_deg), -1, -1), ang[:, None].expand(-1, n_axes))
    table = _correlations(w, rots.reshape(-1, 3, 3)).reshape(len(angles_deg), n_axes)
    return table, lut.to(w.vol.device)


def _coarse_scores(
    table: torch.Tensor, lut: torch.Tensor, angle_index: dict[float, int], group: str, grid: torch.Tensor, chunk: int = 4096
) -> torch.Tensor:
    """Table estimate of ``sum_{g != e} f(A a_g, t_g)`` for every orientation ``A`` of ``grid (N, 3, 3)``."""
    _, axes, ang = _group_elements(group)
    rows = torch.tensor([angle_index[_angle_key(a)] for a in ang.tolist()], dtype=torch.long, device=table.device)
    axes = axes.to(grid.device)
    out = []
    for s in range(0, grid.shape[0], chunk):
        dirs = torch.einsum("nij,gj->ngi", grid[s : s + chunk], axes)
        idx = _nearest_axis(dirs, lut)
        out.append(table[rows[None, :].expand_as(idx), idx].sum(-1))
    return torch.cat(out)


def _group_distance(a1: torch.Tensor, a2: torch.Tensor, group_mats: torch.Tensor) -> float:
    """Largest angle (degrees) between an operator of ``A1 G A1^T`` and the nearest one of ``A2 G A2^T``."""
    s1 = a1 @ group_mats @ a1.T
    s2 = a2 @ group_mats @ a2.T
    rel = s1[:, None].transpose(-1, -2) @ s2[None, :]  # (S, S, 3, 3)
    tr = rel.diagonal(dim1=-2, dim2=-1).sum(-1)
    ang = torch.rad2deg(torch.arccos(((tr - 1.0) / 2.0).clamp(-1.0, 1.0)))
    return float(ang.min(dim=1).values.max())


def _distinct_starts(grid: torch.Tensor, scores: torch.Tensor, group: str, n: int, min_deg: float = 12.0) -> list[torch.Tensor]:
    order = torch.argsort(scores, descending=True)[: max(50, n)]
    mats = point_group_matrices(group).to(grid.device)
    picked: list[torch.Tensor] = []
    for i in order.tolist():
        a = grid[i]
        if all(_group_distance(a, b, mats) > min_deg for b in picked):
            picked.append(a)
        if len(picked) >= n:
            break
    return picked


def _refine(
    w: _Working,
    group: str,
    a0: torch.Tensor,
    c0: torch.Tensor,
    steps_deg: Sequence[float],
    shift_steps: Sequence[float],
    max_iter: int = 30,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pattern search over small rotations (and centre shifts with the finest steps).

    Returns ``A``, ``c`` (working px) and the ``(S-1,)`` operator correlations.
    """
    gm, _, _ = _group_elements(group)
    gm = gm.to(w.vol.device)
    ns = gm.shape[0]
    cyclic = group.upper().startswith("C")

    def evaluate(a_list: torch.Tensor, c_list: torch.Tensor) -> torch.Tensor:
        ops = a_list[:, None] @ gm[None] @ a_list[:, None].transpose(-1, -2)  # (K, S-1, 3, 3)
        cen = c_list[:, None, :].expand(-1, ns, -1).reshape(-1, 3)
        return _correlations(w, ops.reshape(-1, 3, 3), cen).reshape(-1, ns)

    a, c = a0.clone(), c0.clone()
    best = evaluate(a[None], c[None])[0]
    n_rot = len(steps_deg)
    n_shift = len(shift_steps)
    levels = [(s, shift_steps[i - (n_rot - n_shift)] if i >= n_rot - n_shift else None) for i, s in enumerate(steps_deg)]
    for rot_step, shift_step in levels:
        small = _small_rotations(rot_step).to(w.vol.device)
        for _ in range(max_iter):
            cand_a = [small @ a]
            cand_c = [c[None].expand(6, 3)]
            if shift_step is not None:
                if cyclic:  # a shift along the symmetry axis changes nothing: search the plane only
                    dirs = torch.stack([a[:, 0], a[:, 1], -a[:, 0], -a[:, 1]])
                else:
                    eye = torch.eye(3, dtype=torch.float64, device=w.vol.device)
                    dirs = torch.cat([eye, -eye])
                cand_a.append(a[None].expand(dirs.shape[0], 3, 3))
                cand_c.append(c[None] + shift_step * dirs)
            ca, cc = torch.cat(cand_a), torch.cat(cand_c)
            vals = evaluate(ca, cc)
            k = int(vals.mean(-1).argmax())
            if float(vals[k].mean()) > float(best.mean()) + 1e-7:
                a, c, best = ca[k], cc[k], vals[k]
            else:
                break
    # re-orthonormalise
    u, _, vh = torch.linalg.svd(a)
    return u @ vh, c, best


def _alignment(group: str, a: torch.Tensor, c_full: torch.Tensor, corr: torch.Tensor, tau: float) -> SymmetryAlignment:
    order = point_group_order(group)
    agreement = float(corr.mean()) if corr.numel() else 1.0
    rot, tilt, psi = matrix_to_euler(a.T.cpu())
    return SymmetryAlignment(
        group=group.upper(),
        order=order,
        matrix=a.cpu(),
        center_px=c_full.cpu(),
        euler_deg=(float(rot), float(tilt), float(psi)),
        agreement=agreement,
        score=(order - 1) * (agreement - tau),
        operator_correlations=corr.cpu(),
    )


def _n_cylinder_angles(w: _Working) -> int:
    """Rotations per turn that resolve every angular harmonic the working map holds (multiple of 12)."""
    m_max = 2.0 * math.pi * w.radius / w.lowpass_px
    return int(min(72, max(24, 12 * math.ceil(m_max / 12.0))))


def _cylinder_angles(n: int) -> list[float]:
    return [_angle_key(360.0 * k / n) for k in range(1, n // 2 + 1)]


def _cylinder_fraction_from(f: torch.Tensor, n: int) -> torch.Tensor:
    """Cylindrical power fraction from ``(..., n // 2)`` correlations at 360 k / n, k = 1 .. n / 2.

    ``c0 = 1/n sum_{k=0}^{n-1} f(a, 360 k / n)`` (every harmonic m != 0 (mod n) averages out).
    """
    return (1.0 + 2.0 * f[..., :-1].sum(-1) + f[..., -1]) / n


def _corrected(f: torch.Tensor, c0: torch.Tensor) -> torch.Tensor:
    """Correlation of the parts that are not cylindrically symmetric about the operator's axis."""
    return ((f - c0) / (1.0 - c0).clamp_min(0.05)).clamp(-1.0, 1.0)


def _cylinder_fraction(w: _Working, axes: torch.Tensor) -> torch.Tensor:
    """``(K,)`` fraction of the map's (anisotropic) power that is cylindrically symmetric about each axis."""
    n = _n_cylinder_angles(w)
    ang = torch.deg2rad(torch.tensor(_cylinder_angles(n), dtype=torch.float64))
    k = axes.shape[0]
    rots = _axis_rotations(axes.to(torch.float64).cpu()[:, None, :].expand(-1, ang.numel(), -1), ang[None].expand(k, -1))
    f = _correlations(w, rots.reshape(-1, 3, 3)).reshape(k, -1).cpu()
    return _cylinder_fraction_from(f, n)


def _table_for(w: _Working, groups: Sequence[str], n_axes: int) -> tuple[torch.Tensor, torch.Tensor, dict[float, int]]:
    """Self-rotation table of every angle of ``groups``, corrected for the cylindrical part (see :func:`_corrected`)."""
    keys: list[float] = []
    for g in groups:
        if point_group_order(g) == 1:
            continue
        for a in _group_elements(g)[2].tolist():
            k = _angle_key(a)
            if k not in keys:
                keys.append(k)
    n = _n_cylinder_angles(w)
    cyl = _cylinder_angles(n)
    all_keys = keys + [k for k in cyl if k not in keys]
    table, lut = _self_rotation_table(w, all_keys, n_axes)
    index = {k: i for i, k in enumerate(all_keys)}
    c0 = _cylinder_fraction_from(table[[index[k] for k in cyl]].T, n)  # (n_axes,)
    corrected = _corrected(table[: len(keys)], c0[None, :])
    return corrected, lut, {k: i for i, k in enumerate(keys)}


def _axis_groups(group: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct rotation axes (up to sign) of a group's non-identity elements and each element's axis index."""
    _, axes, _ = _group_elements(group)
    canon = torch.where((axes[:, 2:3] < -1e-9) | ((axes[:, 2:3].abs() <= 1e-9) & (axes[:, 1:2] < -1e-9))
                        | ((axes[:, 2:3].abs() <= 1e-9) & (axes[:, 1:2].abs() <= 1e-9) & (axes[:, 0:1] < 0)), -axes, axes)
    uniq: list[torch.Tensor] = []
    which = []
    for a in canon:
        for i, u in enumerate(uniq):
            if float((a - u).abs().max()) < 1e-5:
                which.append(i)
                break
        else:
            uniq.append(a)
            which.append(len(uniq) - 1)
    return torch.stack(uniq), torch.tensor(which, dtype=torch.long)


def _corrected_correlations(w: _Working, group: str, a: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """Per-operator correlations ``raw`` of the group at orientation ``a`` with the cylindrical part removed."""
    uniq, which = _axis_groups(group)
    c0 = _cylinder_fraction(w, uniq.to(a.dtype) @ a.T.cpu())
    return _corrected(raw.cpu(), c0[which])


def _search_group(
    w: _Working,
    group: str,
    table: torch.Tensor,
    lut: torch.Tensor,
    angle_index: dict[float, int],
    grid: torch.Tensor,
    opts: SymmetrySearchOptions,
    refine: bool,
    shifts: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Coarse search and (optionally) local refinement.

    Returns ``A``, ``c`` (working px), the corrected per-operator correlations and the coarse agreement.
    """
    ns = point_group_order(group) - 1
    coarse = _coarse_scores(table, lut, angle_index, group, grid)
    coarse_agreement = float(coarse.max()) / ns
    starts = _distinct_starts(grid, coarse, group, opts.n_starts if refine else 1)
    zero = torch.zeros(3, dtype=torch.float64, device=w.vol.device)
    if not refine:
        return starts[0], zero, torch.full((ns,), coarse_agreement, dtype=torch.float64), coarse_agreement
    best = None
    shift_steps = opts.shift_steps_px if (shifts and not opts.keep_centre) else ()
    for a0 in starts:
        a, c, raw = _refine(w, group, a0, zero, opts.refine_steps_deg, shift_steps)
        corr = _corrected_correlations(w, group, a, raw)
        if best is None or float(corr.mean()) > float(best[2].mean()):
            best = (a, c, corr)
    return best[0], best[1], best[2], coarse_agreement


# --------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------


def _check_volume(vol: torch.Tensor) -> None:
    if vol.dim() != 3 or len(set(vol.shape)) != 1:
        raise ValueError(f"expected a cubic (D, D, D) map, got shape {tuple(vol.shape)}")
    if vol.shape[-1] < 8:
        raise ValueError(f"map box {vol.shape[-1]} is too small for a symmetry search (at least 8)")


def symmetry_agreement(
    vol: torch.Tensor,
    group: str,
    matrix: torch.Tensor | None = None,
    center_px: torch.Tensor | None = None,
    options: SymmetrySearchOptions | None = None,
) -> float:
    """Agreement of a map with a point group placed at ``(matrix, center_px)``, at the search resolution.

    Parameters
    ----------
    vol
        ``(D, D, D)`` map.
    group
        Point group.
    matrix, center_px
        ``A`` and ``c`` (default: standard orientation at the box centre, no re-centring).

    Returns
    -------
    float
        Mean correlation over the non-identity operators (1 for C1).
    """
    _check_volume(vol)
    opts = options or SymmetrySearchOptions()
    opts = SymmetrySearchOptions(**{**opts.__dict__, "keep_centre": True})
    if point_group_order(group) == 1:
        return 1.0
    w = _working_map(vol, opts)
    a = torch.eye(3, dtype=torch.float64) if matrix is None else matrix.to(torch.float64)
    c = torch.zeros(3, dtype=torch.float64) if center_px is None else torch.as_tensor(center_px, dtype=torch.float64)
    gm = _group_elements(group)[0]
    ops = a @ gm @ a.T
    cw = (c / w.scale)[None].expand(ops.shape[0], 3)
    raw = _correlations(w, ops.to(vol.device), cw.to(vol.device))
    return float(_corrected_correlations(w, group, a, raw).mean())


def align_symmetry(vol: torch.Tensor, group: str, options: SymmetrySearchOptions | None = None) -> SymmetryAlignment:
    """Find the orientation and centre of a point group's axes in a map (relion_align_symmetry).

    Parameters
    ----------
    vol
        ``(D, D, D)`` map, any orientation.
    group
        Point group: ``C<n>``, ``D<n>``, ``T``, ``O``, ``I`` (RELION's conventions).
    options
        Search parameters.

    Returns
    -------
    SymmetryAlignment
        Apply it with :func:`apply_alignment`. For C1 the identity at the centre of mass (or the
        box centre with ``keep_centre``).
    """
    _check_volume(vol)
    opts = options or SymmetrySearchOptions()
    group = group.strip().upper()
    order = point_group_order(group)
    w = _working_map(vol, opts)
    if order == 1:
        return _alignment(group, torch.eye(3, dtype=torch.float64), w.com_px, torch.zeros(0, dtype=torch.float64), opts.order_penalty)
    table, lut, idx = _table_for(w, [group], opts.n_table_axes)
    grid = _so3_grid(opts.coarse_step_deg).to(vol.device)
    a, c, corr, _ = _search_group(w, group, table, lut, idx, grid, opts, refine=True, shifts=True)
    c_full = w.com_px + c * w.scale
    result = _alignment(group, a, c_full, corr, opts.order_penalty)
    log.info("align %s: agreement %.3f, euler %s, centre %s px", group, result.agreement, result.euler_deg, c_full.tolist())
    return result


def rank_point_groups(
    vol: torch.Tensor,
    candidates: Sequence[str] | None = None,
    options: SymmetrySearchOptions | None = None,
) -> list[GroupScore]:
    """Score candidate point groups on a (C1) map, best first (``--sym auto``).

    Every candidate gets a coarse (table) score; the ``n_refine_groups`` best are refined with
    rotated maps; the best group is then aligned with centre refinement.

    Parameters
    ----------
    vol
        ``(D, D, D)`` map.
    candidates
        Group names (default :func:`default_candidate_groups`); C1 is always included.
    options
        Search parameters (``order_penalty`` sets the trade-off between agreement and order).

    Returns
    -------
    list of GroupScore
        Sorted by score, best first; the first entry's ``alignment`` places the chosen group
        (for C1: the identity at the centre of mass).
    """
    _check_volume(vol)
    opts = options or SymmetrySearchOptions()
    groups = [g.strip().upper() for g in (candidates or default_candidate_groups())]
    if "C1" not in groups:
        groups = ["C1"] + groups
    groups = list(dict.fromkeys(groups))
    for g in groups:
        point_group_order(g)  # raises ValueError for a bad name
    w = _working_map(vol, opts)
    tau = opts.order_penalty
    table, lut, idx = _table_for(w, groups, opts.n_table_axes)
    grid = _so3_grid(opts.coarse_step_deg).to(vol.device)
    coarse: dict[str, float] = {}
    for g in groups:
        if point_group_order(g) > 1:
            sc = _coarse_scores(table, lut, idx, g, grid)
            coarse[g] = float(sc.max()) / (point_group_order(g) - 1)
    by_coarse = sorted(coarse, key=lambda g: (point_group_order(g) - 1) * (coarse[g] - tau), reverse=True)
    to_refine = set(by_coarse[: max(0, opts.n_refine_groups)])
    results: list[GroupScore] = []
    c1 = _alignment("C1", torch.eye(3, dtype=torch.float64), w.com_px, torch.zeros(0, dtype=torch.float64), tau)
    results.append(GroupScore("C1", 1, 1.0, 0.0, True, c1))
    for g in groups:
        order = point_group_order(g)
        if order == 1:
            continue
        if g in to_refine:
            a, c, corr, _ = _search_group(w, g, table, lut, idx, grid, opts, refine=True, shifts=False)
            al = _alignment(g, a, w.com_px + c * w.scale, corr, tau)
            results.append(GroupScore(g, order, al.agreement, al.score, True, al))
        else:
            results.append(GroupScore(g, order, coarse[g], (order - 1) * (coarse[g] - tau), False, None))
    results.sort(key=lambda r: (r.score, -r.order), reverse=True)
    best = results[0]
    if best.alignment is None:  # a table score on top: refine it now
        a, c, corr, _ = _search_group(w, best.group, table, lut, idx, grid, opts, refine=True, shifts=False)
        al = _alignment(best.group, a, w.com_px + c * w.scale, corr, tau)
        results[0] = best = GroupScore(best.group, best.order, al.agreement, al.score, True, al)
    if best.order > 1 and not opts.keep_centre and opts.shift_steps_px:
        # the chosen group: refine its centre too (finest rotation steps with the shift steps)
        n_fine = len(opts.shift_steps_px)
        a0 = best.alignment.matrix.to(device=vol.device, dtype=torch.float64)
        a, c, raw = _refine(w, best.group, a0, torch.zeros(3, dtype=torch.float64, device=vol.device),
                            opts.refine_steps_deg[-n_fine:], opts.shift_steps_px)
        al = _alignment(best.group, a, w.com_px + c * w.scale, _corrected_correlations(w, best.group, a, raw), tau)
        if al.score >= best.score:
            results[0] = GroupScore(best.group, best.order, al.agreement, al.score, True, al)
    log.info("point groups: %s", ", ".join(f"{r.group} {r.score:.2f}" for r in results[:6]))
    return results
