"""Conventions, in one place (L0).

Axes
    Images are ``(y, x)`` and volumes ``(z, y, x)``; x is the fast axis. The origin of a box of
    size ``n`` is the pixel ``n // 2`` in real space and in the centred Fourier transform.
Units
    Angstrom and degrees at the file boundary (STAR, MRC, CLI); radians, pixels and Angstrom
    (named ``*_a``) inside. Defocus is in Angstrom, positive = underfocus (RELION).
Fourier transforms
    ``torch.fft.rfft2`` layout ``(..., h, w // 2 + 1)`` with the zero frequency at index 0 (not
    centred) unless a function says otherwise. Internally we use ``norm="forward"`` (forward FFT
    divided by the number of pixels), which is RELION's scale, so sigma2/tau2 need no conversion.
Rotations
    RELION's ZYZ Euler angles (rot, tilt, psi). ``euler_to_matrix`` gives RELION's matrix A that
    maps the reference frame to the particle frame: the projection for angles A is the central
    slice of the volume's transform at 3D frequencies ``A^T (kx, ky, 0)``. Matrices act on column
    vectors ordered ``(x, y, z)``.
Origins
    rlnOriginXAngst/YAngst is the shift that centres the particle: the particle sits at
    ``box_centre - origin`` in the raw image. Internally we keep origins in pixels, same sign.
"""

from __future__ import annotations

import math

import torch

#: Keys of the optics-group attributes kept in the particle store (RELION labels without ``rln``).
OPTICS_KEYS = (
    "OpticsGroup",
    "OpticsGroupName",
    "ImagePixelSize",
    "ImageSize",
    "ImageDimensionality",
    "Voltage",
    "SphericalAberration",
    "AmplitudeContrast",
)


def euler_to_matrix(rot_deg: torch.Tensor, tilt_deg: torch.Tensor, psi_deg: torch.Tensor) -> torch.Tensor:
    """RELION's ZYZ Euler angles (degrees) to rotation matrices.

    Parameters
    ----------
    rot_deg, tilt_deg, psi_deg
        ``(...)`` tensors of angles in degrees (broadcastable).

    Returns
    -------
    torch.Tensor
        ``(..., 3, 3)`` matrices A (rows as in RELION's Euler_angles2matrix), acting on ``(x, y, z)``.
    """
    rot_deg, tilt_deg, psi_deg = torch.broadcast_tensors(
        torch.as_tensor(rot_deg), torch.as_tensor(tilt_deg), torch.as_tensor(psi_deg)
    )
    dtype = rot_deg.dtype if rot_deg.is_floating_point() else torch.float64
    a = torch.deg2rad(rot_deg.to(dtype))
    b = torch.deg2rad(tilt_deg.to(dtype))
    g = torch.deg2rad(psi_deg.to(dtype))
    ca, sa, cb, sb, cg, sg = a.cos(), a.sin(), b.cos(), b.sin(), g.cos(), g.sin()
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    m = torch.stack(
        [
            torch.stack([cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb], -1),
            torch.stack([-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb], -1),
            torch.stack([sc, ss, cb], -1),
        ],
        -2,
    )
    return m


def matrix_to_euler(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`euler_to_matrix` (RELION's Euler_matrix2angles).

    Parameters
    ----------
    m
        ``(..., 3, 3)`` rotation matrices.

    Returns
    -------
    tuple of torch.Tensor
        ``(rot, tilt, psi)`` in degrees, each ``(...)``; tilt in [0, 180]. At tilt 0 or 180
        (gimbal lock) rot is 0 and the in-plane angle goes to psi, as RELION does.
    """
    m = torch.as_tensor(m)
    eps = 16 * torch.finfo(torch.float32).eps
    abs_sb = torch.sqrt(m[..., 0, 2] ** 2 + m[..., 1, 2] ** 2)
    regular = abs_sb > eps
    g = torch.atan2(m[..., 1, 2], -m[..., 0, 2])
    a = torch.atan2(m[..., 2, 1], m[..., 2, 0])
    sg, cg = torch.sin(g), torch.cos(g)
    safe_cg = torch.where(cg.abs() > 1e-30, cg, torch.ones_like(cg))
    sign_sb = torch.where(
        sg.abs() < torch.finfo(torch.float32).eps,
        torch.sign(-m[..., 0, 2] / safe_cg),
        torch.where(sg > 0, torch.sign(m[..., 1, 2]), -torch.sign(m[..., 1, 2])),
    )
    b = torch.atan2(sign_sb * abs_sb, m[..., 2, 2])
    up = m[..., 2, 2] > 0
    g_lock = torch.where(up, torch.atan2(-m[..., 1, 0], m[..., 0, 0]), torch.atan2(m[..., 1, 0], -m[..., 0, 0]))
    b_lock = torch.where(up, torch.zeros_like(b), torch.full_like(b, math.pi))
    a = torch.where(regular, a, torch.zeros_like(a))
    b = torch.where(regular, b, b_lock)
    g = torch.where(regular, g, g_lock)
    return torch.rad2deg(a), torch.rad2deg(b), torch.rad2deg(g)


def psi_to_matrix_2d(psi_deg: torch.Tensor) -> torch.Tensor:
    """In-plane rotation matrices for RELION's psi (the upper-left 2x2 block of A).

    Parameters
    ----------
    psi_deg
        ``(...)`` angles in degrees.

    Returns
    -------
    torch.Tensor
        ``(..., 2, 2)`` matrices acting on ``(x, y)``.
    """
    psi = torch.as_tensor(psi_deg)
    g = torch.deg2rad(psi if psi.is_floating_point() else psi.to(torch.float64))
    c, s = g.cos(), g.sin()
    return torch.stack([torch.stack([c, s], -1), torch.stack([-s, c], -1)], -2)


def origin_angst_to_px(origin_a: torch.Tensor | float, pixel_size_a: torch.Tensor | float):
    """rlnOriginX/YAngst to internal pixel origins (same sign)."""
    return origin_a / pixel_size_a


def origin_px_to_angst(origin_px: torch.Tensor | float, pixel_size_a: torch.Tensor | float):
    """Internal pixel origins to rlnOriginX/YAngst (same sign)."""
    return origin_px * pixel_size_a


def electron_wavelength_a(voltage_kv: float) -> float:
    """Relativistic electron wavelength in Angstrom (RELION's formula), voltage in kV."""
    v = voltage_kv * 1e3
    return 12.2643247 / math.sqrt(v * (1.0 + 0.978466e-6 * v))
