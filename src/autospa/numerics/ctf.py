"""RELION's contrast transfer function (CTF::getCTF, src/ctf.h), pure torch (L1).

For a spatial frequency ``(kx, ky)`` in 1/Angstrom (kx along image columns, ky along rows with
increasing row index), ``u2 = kx^2 + ky^2`` and the ellipse angle ``e = atan2(ky, kx) - azimuth``
(azimuth = rlnDefocusAngle)::

    deltaf = -(dU + dV) / 2 - (dU - dV) / 2 * cos(2 e)          (dU, dV > 0: underfocus)
    chi    = K1 * deltaf * u2 + K2 * u2^2 - K5 - K3
    CTF    = -sin(chi) * exp(-B / 4 * u2) * scale

with ``K1 = pi * lambda``, ``K2 = pi / 2 * Cs * lambda^3`` (Cs in Angstrom), ``K3 = atan(Q0 /
sqrt(1 - Q0^2))`` and ``K5`` the phase shift in radians. At zero frequency the CTF is
``sin(K3) = Q0 > 0`` (particles after contrast inversion: protein white, image = CTF * projection).
The defocus along the azimuth direction is dU, perpendicular to it dV.

The 2D grids use the layout of :mod:`autospa.numerics.fourier` (RELION's index mapping: the
Nyquist row of an even box is ``ky = +0.5 / pixel_size``, as in CTF::getFftwImage).
"""

from __future__ import annotations

import math

import torch

from autospa.numerics.fourier import fftfreq_2d, freq_index

__all__ = ["ctf_constants", "ctf_2d", "ctf_1d", "ctf_zeros_1d", "ctf_chi"]

Scalar = float | torch.Tensor


def _wavelength_a(voltage_kv: Scalar, dtype: torch.dtype, device) -> torch.Tensor:
    v = torch.as_tensor(voltage_kv, dtype=torch.float64, device=device) * 1e3
    return (12.2643247 / torch.sqrt(v * (1.0 + 0.978466e-6 * v))).to(dtype)


def ctf_constants(
    voltage_kv: Scalar,
    cs_mm: Scalar,
    amplitude_contrast: Scalar,
    phase_shift_deg: Scalar = 0.0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RELION's constants K1, K2, K3, K5 (CTF::initialise).

    Parameters
    ----------
    voltage_kv, cs_mm, amplitude_contrast, phase_shift_deg
        Floats or ``(B,)`` tensors.

    Returns
    -------
    tuple of torch.Tensor
        ``K1 = pi * lambda`` (Angstrom), ``K2 = pi / 2 * Cs * lambda^3`` (Angstrom^4... per u2^2),
        ``K3 = atan(Q0 / sqrt(1 - Q0^2))`` and ``K5 = phase shift`` (radians), each broadcast shape.
    """
    lam = _wavelength_a(voltage_kv, torch.float64, device)
    cs_a = torch.as_tensor(cs_mm, dtype=torch.float64, device=device) * 1e7
    q0 = torch.as_tensor(amplitude_contrast, dtype=torch.float64, device=device)
    k1 = math.pi * lam
    k2 = 0.5 * math.pi * cs_a * lam**3
    k3 = torch.atan(q0 / torch.sqrt(1.0 - q0 * q0))
    k5 = torch.deg2rad(torch.as_tensor(phase_shift_deg, dtype=torch.float64, device=device))
    return k1.to(dtype), k2.to(dtype), k3.to(dtype), k5.to(dtype)


def _freq_grid(box: int | tuple[int, int], rfft: bool, device, dtype: torch.dtype) -> torch.Tensor:
    """``(h, w // 2 + 1, 2)`` (or ``(h, w, 2)``) frequencies (kx, ky) in cycles/pixel."""
    if isinstance(box, int):
        return fftfreq_2d(box, rfft=rfft, device=device, dtype=dtype)
    h, w = (int(v) for v in box)
    ky = freq_index(h, device).to(dtype) / h
    kx = (torch.arange(w // 2 + 1, device=device) if rfft else freq_index(w, device)).to(dtype) / w
    gy, gx = torch.meshgrid(ky, kx, indexing="ij")
    return torch.stack([gx, gy], dim=-1)


def _col(x: Scalar, dtype: torch.dtype, device) -> torch.Tensor:
    """Parameter as a ``(B, 1, 1)`` tensor (B = 1 for floats)."""
    t = torch.as_tensor(x, dtype=dtype, device=device)
    return t.reshape(-1, 1, 1)


def ctf_chi(
    kx_a: torch.Tensor,
    ky_a: torch.Tensor,
    defocus_u_a: torch.Tensor,
    defocus_v_a: torch.Tensor,
    defocus_angle_deg: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    k3: torch.Tensor,
    k5: torch.Tensor,
) -> torch.Tensor:
    """RELION's phase ``chi`` (called gamma in ctf.h) at frequencies in 1/Angstrom.

    All arguments broadcast; returns their broadcast shape. Evaluated, as RELION does, through the
    bilinear form ``k^T Q^T diag(-dU, -dV) Q k``, ``Q = [[cos a, sin a], [-sin a, cos a]]``.
    """
    az = torch.deg2rad(defocus_angle_deg)
    c, s = torch.cos(az), torch.sin(az)
    # Q^T diag(-dU, -dV) Q
    axx = -defocus_u_a * c * c - defocus_v_a * s * s
    axy = (-defocus_u_a + defocus_v_a) * c * s
    ayy = -defocus_u_a * s * s - defocus_v_a * c * c
    u2 = kx_a * kx_a + ky_a * ky_a
    return k1 * (axx * kx_a * kx_a + 2.0 * axy * kx_a * ky_a + ayy * ky_a * ky_a) + k2 * u2 * u2 - k5 - k3


def _finish(
    chi: torch.Tensor,
    u2: torch.Tensor,
    bfactor_a2: torch.Tensor,
    scale: torch.Tensor,
    intact_first_peak: bool,
    phase_flipped: bool,
) -> torch.Tensor:
    ctf = -torch.sin(chi)
    if intact_first_peak:
        ctf = torch.where(chi.abs() < 0.5 * math.pi, torch.ones_like(ctf), ctf)
    if phase_flipped:
        ctf = ctf.abs()
    return ctf * torch.exp(-0.25 * bfactor_a2 * u2) * scale


def ctf_2d(
    defocus_u_a: Scalar,
    defocus_v_a: Scalar,
    defocus_angle_deg: Scalar,
    voltage_kv: Scalar,
    cs_mm: Scalar,
    amplitude_contrast: Scalar,
    pixel_size_a: float,
    box: int | tuple[int, int],
    phase_shift_deg: Scalar = 0.0,
    bfactor_a2: Scalar = 0.0,
    scale: Scalar = 1.0,
    rfft: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    intact_first_peak: bool = False,
    phase_flipped: bool = False,
    frequencies: torch.Tensor | None = None,
) -> torch.Tensor:
    """RELION's 2D CTF on the unshifted Fourier grid of a ``box`` x ``box`` image.

    Parameters
    ----------
    defocus_u_a, defocus_v_a
        rlnDefocusU/V in Angstrom (positive = underfocus); floats or ``(B,)`` tensors.
    defocus_angle_deg
        rlnDefocusAngle: direction of dU, measured from kx (columns) towards ky (rows).
    voltage_kv, cs_mm, amplitude_contrast
        rlnVoltage (kV), rlnSphericalAberration (mm), rlnAmplitudeContrast.
    pixel_size_a
        Pixel size in Angstrom.
    box
        Image size, or ``(h, w)`` for a rectangular image (a micrograph); rows hold ``ky`` and
        columns ``kx`` as for square boxes.
    phase_shift_deg, bfactor_a2, scale
        rlnPhaseShift (degrees), rlnCtfBfactor (A^2), rlnCtfScalefactor.
    rfft
        ``(B, box, box // 2 + 1)`` half plane if True, else the full unshifted ``(B, box, box)``.
    device, dtype
        Where and in which precision to return it (computed in float64 internally). Defaults to
        the device of the first tensor argument, else CPU.
    intact_first_peak
        RELION's ``--ctf_intact_first_peak``: CTF = 1 where ``|chi| < pi / 2``.
    phase_flipped
        RELION's ``--ctf_phase_flipped``: return ``|CTF|``.
    frequencies
        ``(F, 2)`` frequencies ``(kx, ky)`` in cycles per ``box`` pixels (an int ``box``): the CTF
        at these only (the same values as at those pixels of the grid), ``rfft`` ignored.

    Returns
    -------
    torch.Tensor
        ``(B, box, box // 2 + 1)`` (or ``(B, box, box)``; ``(B, h, w // 2 + 1)`` for a tuple box;
        ``(B, F)`` with ``frequencies``), B = broadcast size of the per-particle parameters (1 if
        all are floats).
    """
    if device is None:
        for p in (defocus_u_a, defocus_v_a, defocus_angle_deg, voltage_kv, phase_shift_deg, bfactor_a2, scale):
            if isinstance(p, torch.Tensor):
                device = p.device
                break
    f64 = torch.float64
    if frequencies is None:
        k = _freq_grid(box, rfft, device, f64) / pixel_size_a
    else:  # (1, F, 2): broadcast against the (B, 1, 1) parameters as a (1, F) "grid"
        k = (frequencies.to(device=device, dtype=f64) / (int(box) * pixel_size_a))[None]
    kx, ky = k[..., 0], k[..., 1]
    k1, k2, k3, k5 = ctf_constants(voltage_kv, cs_mm, amplitude_contrast, phase_shift_deg, f64, device)
    chi = ctf_chi(
        kx,
        ky,
        _col(defocus_u_a, f64, device),
        _col(defocus_v_a, f64, device),
        _col(defocus_angle_deg, f64, device),
        _col(k1, f64, device),
        _col(k2, f64, device),
        _col(k3, f64, device),
        _col(k5, f64, device),
    )
    u2 = kx * kx + ky * ky
    out = _finish(
        chi, u2, _col(bfactor_a2, f64, device), _col(scale, f64, device), intact_first_peak, phase_flipped
    )
    if frequencies is not None:
        out = out.reshape(out.shape[0], -1)  # (B, 1, F) -> (B, F)
    return out.to(dtype)


def ctf_1d(
    defocus_a: Scalar,
    voltage_kv: Scalar,
    cs_mm: Scalar,
    amplitude_contrast: Scalar,
    pixel_size_a: float | None = None,
    box: int | None = None,
    *,
    frequencies_a: torch.Tensor | None = None,
    phase_shift_deg: Scalar = 0.0,
    bfactor_a2: Scalar = 0.0,
    scale: Scalar = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    intact_first_peak: bool = False,
    phase_flipped: bool = False,
) -> torch.Tensor:
    """Rotationally averaged (non-astigmatic) RELION CTF along a line of frequencies.

    Either give ``pixel_size_a`` and ``box`` (frequencies = shells ``i / (box * pixel_size_a)``,
    ``i = 0 .. box // 2``) or ``frequencies_a`` (1/Angstrom).

    Parameters
    ----------
    defocus_a
        Defocus in Angstrom (positive = underfocus), float or ``(B,)``.
    frequencies_a
        ``(F,)`` spatial frequencies in 1/Angstrom.

    Returns
    -------
    torch.Tensor
        ``(B, F)`` with ``F = box // 2 + 1`` or ``len(frequencies_a)``.
    """
    f64 = torch.float64
    if frequencies_a is None:
        if pixel_size_a is None or box is None:
            raise ValueError("ctf_1d needs pixel_size_a and box, or frequencies_a")
        freq = torch.arange(box // 2 + 1, dtype=f64, device=device) / (box * pixel_size_a)
    else:
        freq = torch.as_tensor(frequencies_a, dtype=f64, device=device).reshape(-1)
        device = freq.device
    k1, k2, k3, k5 = ctf_constants(voltage_kv, cs_mm, amplitude_contrast, phase_shift_deg, f64, device)

    def col(x: Scalar) -> torch.Tensor:
        return torch.as_tensor(x, dtype=f64, device=device).reshape(-1, 1)

    d = col(defocus_a)
    u2 = freq * freq
    chi = col(k1) * (-d) * u2 + col(k2) * u2 * u2 - col(k5) - col(k3)
    return _finish(chi, u2, col(bfactor_a2), col(scale), intact_first_peak, phase_flipped).to(dtype)


def ctf_zeros_1d(
    defocus_a: float,
    voltage_kv: float,
    cs_mm: float,
    amplitude_contrast: float,
    n_zeros: int,
    phase_shift_deg: float = 0.0,
) -> torch.Tensor:
    """Analytical positions of the first ``n_zeros`` CTF zeros (``chi = n * pi``), 1/Angstrom.

    ``chi(u2) = K2 u2^2 - K1 defocus u2 - (K3 + K5)`` is quadratic in ``u2``; every root of
    ``chi = n pi`` with ``u2 > 0`` is a zero. They are returned in increasing frequency.

    Returns
    -------
    torch.Tensor
        ``(n_zeros,)`` float64 frequencies in 1/Angstrom.
    """
    k1, k2, k3, k5 = (float(v) for v in ctf_constants(voltage_kv, cs_mm, amplitude_contrast, phase_shift_deg))
    a, b, c0 = k2, -k1 * defocus_a, -(k3 + k5)
    roots: list[float] = []
    if a == 0.0:
        if b == 0.0:
            raise ValueError("CTF without defocus and Cs has no zeros")
        # linear: chi = b u2 + c0 ; u2 = (n pi - c0) / b > 0
        sign = 1 if b > 0 else -1
        n = math.floor(c0 / math.pi) + 1 if sign > 0 else math.ceil(c0 / math.pi) - 1
        while len(roots) < n_zeros:
            u2 = (n * math.pi - c0) / b
            if u2 > 0:
                roots.append(u2)
            n += sign
    else:
        chi_min = c0 - b * b / (4 * a) if b < 0 else c0
        # roots on the falling branch (n <= c0 / pi) all lie below those on the rising branch
        n_lo = math.ceil(chi_min / math.pi)
        n_hi = max(math.floor(c0 / math.pi), n_lo) + n_zeros + 1
        for n in range(n_lo, n_hi + 1):
            disc = b * b - 4 * a * (c0 - n * math.pi)
            if disc < 0:
                continue
            sq = math.sqrt(disc)
            for u2 in ((-b - sq) / (2 * a), (-b + sq) / (2 * a)):
                if u2 > 0:
                    roots.append(u2)
        roots = sorted(set(roots))
    if len(roots) < n_zeros:
        raise ValueError(f"found only {len(roots)} zeros")
    return torch.sqrt(torch.tensor(roots[:n_zeros], dtype=torch.float64))
