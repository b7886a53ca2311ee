"""Beam-induced motion correction, as RELION's own implementation does it (L3, pure torch).

The pipeline for one movie is:

1. gain correction (:func:`orient_gain`, :func:`apply_gain`), with RELION's ``--gain_rot`` /
   ``--gain_flip`` conventions and a size check;
2. global alignment (:func:`estimate_global_shifts`): every frame (or group of frames) is
   cross-correlated with the sum of all other frames after a B-factor filter, shifts are refined
   iteratively with sub-pixel peak interpolation;
3. patch-based local motion (:func:`estimate_patch_shifts`) on the globally aligned frames, and a
   smooth deformation model fitted to the patch trajectories: RELION's
   ``ThirdOrderPolynomialModel`` (:func:`fit_polynomial_motion`, :func:`polynomial_shift`);
4. correction (:func:`correct_frames`): global shifts as Fourier phase ramps, the local
   polynomial field by real-space interpolation;
5. dose weighting with the exposure filter of Grant & Grigorieff (2015)
   (:func:`dose_weights`) and summation (:func:`weighted_sum`);
6. optional Fourier binning of the sum.

:func:`motion_correct` runs all of it and returns a :class:`MotionResult`.

Sign convention (RELION's): ``shifts[f]`` (pixels, x then y) is the displacement **applied** to the
content of frame ``f`` to align it to the first frame, i.e. minus the drift of the frame. It is what
rlnMicrographShiftX/Y in the ``data_global_shift`` table hold; the first frame's shift is 0.
The local field is ``L(z, u, v)`` with ``z = f - first_frame`` (0-based frame index),
``u = x / width - 0.5``, ``v = y / height - 0.5``; the corrected frame is the globally aligned one
sampled at ``(x - Lx, y - Ly)``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from autospa.errors import InputError

log = logging.getLogger(__name__)

#: Coefficients of the critical exposure Ne(k) = a * k**b + c (e/A^2, k in 1/A), Grant & Grigorieff 2015, 300 kV.
CRITICAL_EXPOSURE_ABC = (0.245, -1.665, 2.81)

#: Number of coefficients per axis in RELION's third-order polynomial motion model.
N_POLY_COEFFS = 18

#: Frames counted as 'early' in rlnAccumMotionEarly (RELION: the first four frames).
EARLY_FRAMES = 4


# ----------------------------------------------------------------------------------- gain ---


def orient_gain(gain: torch.Tensor, gain_rot: int = 0, gain_flip: int = 0) -> torch.Tensor:
    """Rotate, then flip a gain reference the way RELION's ``--gain_rot`` / ``--gain_flip`` do.

    Parameters
    ----------
    gain
        ``(h, w)`` gain reference (multiplicative).
    gain_rot
        0: none, 1: 90 degrees, 2: 180 degrees, 3: 270 degrees (clockwise, as displayed with the
        first row at the top).
    gain_flip
        0: none, 1: upside down (rows reversed), 2: left to right (columns reversed).

    Returns
    -------
    torch.Tensor
        ``(h', w')`` oriented gain reference.
    """
    if gain_rot not in (0, 1, 2, 3):
        raise ValueError(f"gain_rot must be 0, 1, 2 or 3, not {gain_rot}")
    if gain_flip not in (0, 1, 2):
        raise ValueError(f"gain_flip must be 0, 1 or 2, not {gain_flip}")
    out = torch.rot90(gain, k=-gain_rot, dims=(-2, -1)) if gain_rot else gain
    if gain_flip == 1:
        out = torch.flip(out, dims=(-2,))
    elif gain_flip == 2:
        out = torch.flip(out, dims=(-1,))
    return out


def apply_gain(frames: torch.Tensor, gain: torch.Tensor, gain_path: str | None = None) -> torch.Tensor:
    """Multiply every frame by the (already oriented) gain reference.

    Parameters
    ----------
    frames
        ``(n, h, w)`` raw frames.
    gain
        ``(h, w)`` gain reference.
    gain_path
        File the gain came from, named in the error message.

    Returns
    -------
    torch.Tensor
        ``(n, h, w)`` float32 gain-corrected frames.

    Raises
    ------
    InputError
        If the gain's shape differs from the frames' (after rotation).
    """
    if tuple(gain.shape) != tuple(frames.shape[-2:]):
        raise InputError(
            gain_path,
            f"gain reference is {gain.shape[-1]} x {gain.shape[-2]} (x by y, after rotation) but the movie frames are "
            f"{frames.shape[-1]} x {frames.shape[-2]}; check --gain_rot",
        )
    return frames.to(torch.float32) * gain.to(device=frames.device, dtype=torch.float32)


# ---------------------------------------------------------------------------- fourier bits ---


def _freq_grid(h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Frequencies (cycles per pixel) of the rfft2 layout: ``ky (h, 1)`` and ``kx (1, w//2+1)``."""
    ky = torch.fft.fftfreq(h, device=device).view(h, 1)
    kx = torch.fft.rfftfreq(w, device=device).view(1, w // 2 + 1)
    return ky, kx


def _phase_ramp(shifts: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Phase factors that displace image content by ``shifts`` (x, y) pixels.

    ``shifts`` is ``(..., 2)``; returns ``(..., h, w // 2 + 1)`` complex64.
    """
    ky, kx = _freq_grid(h, w, shifts.device)
    sx = shifts[..., 0, None, None].to(torch.float32)
    sy = shifts[..., 1, None, None].to(torch.float32)
    phase = -2.0 * math.pi * (kx * sx + ky * sy)
    return torch.polar(torch.ones_like(phase), phase)


def _bfactor_filter(h: int, w: int, pixel_size_a: float, bfactor_a2: float, device: torch.device) -> torch.Tensor:
    """exp(-B k^2 / 4) on the rfft2 grid, k in 1/A; ``(h, w // 2 + 1)``."""
    ky, kx = _freq_grid(h, w, device)
    k2 = (kx**2 + ky**2) / (pixel_size_a**2)
    return torch.exp(-bfactor_a2 * k2 / 4.0)


def _fourier_crop_rfft(spec: torch.Tensor, h: int, w: int, h_new: int, w_new: int) -> torch.Tensor:
    """Crop an rfft2 spectrum ``(..., h, w//2+1)`` to ``(..., h_new, w_new//2+1)`` (low frequencies kept)."""
    if h_new == h and w_new == w:
        return spec
    top = (h_new + 1) // 2
    bottom = h_new - top
    rows = torch.cat([spec[..., :top, :], spec[..., h - bottom :, :]], dim=-2) if bottom else spec[..., :top, :]
    return rows[..., : w_new // 2 + 1]


def fourier_bin(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Downsample ``(..., h, w)`` images by ``factor`` through Fourier cropping (mean preserved).

    The output size is ``round(h / factor)`` x ``round(w / factor)``, made even.
    """
    if factor == 1:
        return image
    h, w = image.shape[-2:]
    h_new = 2 * max(1, round(h / factor / 2))
    w_new = 2 * max(1, round(w / factor / 2))
    spec = torch.fft.rfft2(image.to(torch.float32), norm="forward")
    return torch.fft.irfft2(_fourier_crop_rfft(spec, h, w, h_new, w_new), s=(h_new, w_new), norm="forward")


# -------------------------------------------------------------------------- peak finding ---


def _subpixel_peak(cc: torch.Tensor, max_shift_px: float) -> torch.Tensor:
    """Position of the maximum of cross-correlation maps, with parabolic sub-pixel interpolation.

    Parameters
    ----------
    cc
        ``(n, h, w)`` cross-correlation maps with the zero shift at index ``[0, 0]`` (FFT layout).
    max_shift_px
        Only shifts with ``|dx|, |dy| <= max_shift_px`` are searched.

    Returns
    -------
    torch.Tensor
        ``(n, 2)`` peak positions ``(x, y)`` in pixels, signed.
    """
    n, h, w = cc.shape
    r = int(max(1, min(math.floor(max_shift_px), h // 2 - 1, w // 2 - 1)))
    offs = torch.arange(-r, r + 1, device=cc.device)
    win = cc[:, (offs % h)[:, None], (offs % w)[None, :]]  # (n, 2r+1, 2r+1), zero shift at [r, r]
    size = 2 * r + 1
    idx = win.reshape(n, -1).argmax(dim=1)
    iy, ix = idx // size, idx % size
    iy = iy.clamp(1, size - 2)
    ix = ix.clamp(1, size - 2)
    ar = torch.arange(n, device=cc.device)
    c0 = win[ar, iy, ix]
    xm, xp = win[ar, iy, ix - 1], win[ar, iy, ix + 1]
    ym, yp = win[ar, iy - 1, ix], win[ar, iy + 1, ix]

    def _vertex(m: torch.Tensor, c: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        den = m - 2 * c + p
        off = torch.where(den < 0, 0.5 * (m - p) / torch.where(den < 0, den, torch.ones_like(den)), torch.zeros_like(den))
        return off.clamp(-0.5, 0.5)

    dx = ix.to(torch.float32) - r + _vertex(xm, c0, xp)
    dy = iy.to(torch.float32) - r + _vertex(ym, c0, yp)
    return torch.stack([dx, dy], dim=-1)


def _peak_significance(cc: torch.Tensor, max_shift_px: float) -> torch.Tensor:
    """Height of the highest cross-correlation value in the search window, in standard deviations
    of the window above its mean; ``cc (n, h, w)`` (FFT layout), returns ``(n,)``.

    The largest of ~10^4 values of pure noise is about 4 standard deviations.
    """
    n, h, w = cc.shape
    r = int(max(1, min(math.floor(max_shift_px), h // 2 - 1, w // 2 - 1)))
    offs = torch.arange(-r, r + 1, device=cc.device)
    win = cc[:, (offs % h)[:, None], (offs % w)[None, :]].reshape(n, -1)
    return (win.amax(1) - win.mean(1)) / win.std(1).clamp_min(1e-30)


# ----------------------------------------------------------------------- global alignment ---


#: RELION's MotioncorrRunner::alignPatch searches the cross-correlation peak within 50 pixels
#: (of the unbinned frames) of the current position.
MAX_SHIFT_PX = 50.0
#: A cross-correlation peak counts only when it is this many standard deviations above the mean
#: of the search window (see :func:`_peak_significance`).
MIN_PEAK_Z = 6.0


def _align_stack(
    spectra: torch.Tensor,
    h: int,
    w: int,
    filt: torch.Tensor,
    max_shift_px: float,
    max_iter: int,
    tol_px: float,
    init: torch.Tensor | None = None,
) -> torch.Tensor:
    """Iterative leave-one-out alignment of a stack of spectra; returns ``(n, 2)`` correction shifts."""
    n = spectra.shape[0]
    shifts = torch.zeros(n, 2, device=spectra.device) if init is None else init.clone().to(torch.float32)
    weighted = spectra * filt
    for it in range(max_iter):
        aligned = weighted * _phase_ramp(shifts, h, w)
        total = aligned.sum(0, keepdim=True)
        ref = total - aligned
        cc = torch.fft.irfft2(aligned * ref.conj(), s=(h, w))
        drift = _subpixel_peak(cc, max_shift_px)  # remaining drift of each frame w.r.t. the others
        z = _peak_significance(cc, max_shift_px)
        # a frame whose peak does not stand out of the noise keeps its shift (noise peaks are
        # anywhere in the search window: following them gave shifts of 50-170 px at low dose)
        drift = torch.where((z >= MIN_PEAK_Z)[:, None], drift, torch.zeros_like(drift))
        log.debug("alignment iteration %d: peak significance %s", it, [round(v, 1) for v in z.tolist()])
        shifts = shifts - drift
        shifts = shifts - shifts.mean(0, keepdim=True)
        # the search range bounds the total shift (RELION: 50 px), not only one iteration's update
        shifts = shifts.clamp(-max_shift_px, max_shift_px)
        change = drift.abs().max().item()
        log.debug("alignment iteration %d: largest update %.4f px", it, change)
        if change < tol_px:
            break
    return shifts


def _interpolate_group_shifts(group_shifts: torch.Tensor, n_frames: int, group: int) -> torch.Tensor:
    """Linear inter/extrapolation of shifts measured at group centres onto every frame; ``(n_frames, 2)``."""
    n_groups = group_shifts.shape[0]
    # centre of group g = mean index of its frames
    centres = torch.tensor(
        [(g * group + min((g + 1) * group, n_frames) - 1) / 2.0 for g in range(n_groups)], dtype=torch.float32
    )
    if n_groups == 1:
        return group_shifts.expand(n_frames, 2).clone()
    t = torch.arange(n_frames, dtype=torch.float32)
    seg = torch.searchsorted(centres, t, right=True).clamp(1, n_groups - 1) - 1
    t0, t1 = centres[seg], centres[seg + 1]
    a = ((t - t0) / (t1 - t0)).unsqueeze(-1).to(group_shifts.device)
    seg = seg.to(group_shifts.device)
    return group_shifts[seg] * (1 - a) + group_shifts[seg + 1] * a


def estimate_global_shifts(
    frames: torch.Tensor,
    pixel_size_a: float,
    bfactor_a2: float = 150.0,
    group_frames: int = 1,
    max_shift_a: float | None = None,
    max_iter: int = 10,
    tol_px: float = 0.01,
    align_max_size: int = 1024,
) -> torch.Tensor:
    """Whole-frame alignment by iterative cross-correlation with the sum of the other frames.

    Parameters
    ----------
    frames
        ``(n, h, w)`` gain-corrected frames.
    pixel_size_a
        Pixel size of the frames (Angstrom).
    bfactor_a2
        B-factor (A^2) of the filter exp(-B k^2 / 4) applied before correlation (RELION: 150).
    group_frames
        Align sums of this many consecutive frames; shifts are interpolated to every frame.
    max_shift_a
        Largest drift searched (Angstrom, relative to the average frame); default
        :data:`MAX_SHIFT_PX` unbinned pixels, as RELION.
    max_iter, tol_px
        Stop after ``max_iter`` iterations or when no shift changes by more than ``tol_px``.
    align_max_size
        Frames larger than this are Fourier-binned by an integer factor for the correlation
        (shifts are reported in unbinned pixels).

    Returns
    -------
    torch.Tensor
        ``(n, 2)`` shifts ``(x, y)`` in pixels applied to each frame to align it (RELION's
        rlnMicrographShiftX/Y), with ``shifts[0] == 0``.
    """
    n, h, w = frames.shape
    if n < 2:
        return torch.zeros(n, 2, device=frames.device)
    group = max(1, int(group_frames))
    if group > 1:
        n_groups = math.ceil(n / group)
        grouped = torch.stack([frames[g * group : (g + 1) * group].sum(0) for g in range(n_groups)])
        if n_groups < 2:
            raise ValueError(f"group_frames={group} leaves fewer than two groups in a movie of {n} frames")
    else:
        grouped = frames
    factor = max(1, math.ceil(max(h, w) / align_max_size))
    ha, wa = (2 * (h // (2 * factor)), 2 * (w // (2 * factor))) if factor > 1 else (h, w)
    spectra = torch.fft.rfft2(grouped.to(torch.float32))
    spectra = _fourier_crop_rfft(spectra, h, w, ha, wa)
    scale = w / wa
    filt = _bfactor_filter(ha, wa, pixel_size_a * scale, bfactor_a2, frames.device)
    filt[0, 0] = 0.0
    max_shift_px = MAX_SHIFT_PX if max_shift_a is None else max_shift_a / pixel_size_a
    gshifts = _align_stack(spectra, ha, wa, filt, max_shift_px / scale, max_iter, tol_px)
    gshifts = gshifts * scale
    shifts = _interpolate_group_shifts(gshifts, n, group) if group > 1 else gshifts
    return shifts - shifts[:1]


# ------------------------------------------------------------------------ local alignment ---


#: A patch whose local correction exceeds max(MIN_LOCAL_CAP_PX, LOCAL_CAP_FRACTION x the largest
#: global shift) has failed (it aligned noise); the polynomial model is fitted to the others, and
#: needs at least half of the patches (and two).
MIN_LOCAL_CAP_PX = 2.0
LOCAL_CAP_FRACTION = 0.5


def patch_centres(h: int, w: int, patch_x: int, patch_y: int) -> torch.Tensor:
    """Centres (x, y) in pixels of a ``patch_y`` x ``patch_x`` grid of equal patches; ``(patch_y, patch_x, 2)``."""
    px = w / patch_x
    py = h / patch_y
    xs = (torch.arange(patch_x, dtype=torch.float32) + 0.5) * px
    ys = (torch.arange(patch_y, dtype=torch.float32) + 0.5) * py
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1)


def estimate_patch_shifts(
    frames: torch.Tensor,
    pixel_size_a: float,
    patch_x: int = 5,
    patch_y: int = 5,
    bfactor_a2: float = 500.0,
    group_frames: int = 1,
    max_shift_a: float = 40.0,
    max_iter: int = 10,
    tol_px: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual motion of each patch of globally aligned frames.

    Parameters
    ----------
    frames
        ``(n, h, w)`` frames after global alignment.
    pixel_size_a
        Pixel size (Angstrom).
    patch_x, patch_y
        Number of patches along x and y (RELION default 5 x 5).
    bfactor_a2
        B-factor of the correlation filter (RELION's own default for patches: 500).
    group_frames
        Align sums of this many frames in each patch (raises the signal per patch).
    max_shift_a
        Largest residual shift searched (Angstrom).
    max_iter, tol_px
        Iteration limits as in :func:`estimate_global_shifts`.

    Returns
    -------
    centres : torch.Tensor
        ``(patch_y, patch_x, 2)`` patch centres (x, y) in pixels.
    shifts : torch.Tensor
        ``(patch_y, patch_x, n, 2)`` correction shifts of each patch and frame, zero at frame 0.
    """
    n, h, w = frames.shape
    ph, pw = 2 * (h // (2 * patch_y)), 2 * (w // (2 * patch_x))
    if ph < 16 or pw < 16:
        raise ValueError(f"patches of {pw} x {ph} pixels are too small; use fewer patches")
    centres = patch_centres(h, w, patch_x, patch_y)
    group = max(1, int(group_frames))
    n_groups = math.ceil(n / group)
    if n_groups < 2:
        raise ValueError(f"group_frames={group} leaves fewer than two groups in a movie of {n} frames")
    filt = _bfactor_filter(ph, pw, pixel_size_a, bfactor_a2, frames.device)
    filt[0, 0] = 0.0
    # taper the patch edges to avoid the box edges dominating the correlation
    wy = torch.hann_window(ph, periodic=False, device=frames.device) ** 0.25
    wx = torch.hann_window(pw, periodic=False, device=frames.device) ** 0.25
    taper = wy[:, None] * wx[None, :]
    out = torch.zeros(patch_y, patch_x, n, 2, device=frames.device)
    for iy in range(patch_y):
        for ix in range(patch_x):
            x0 = int(round(float(centres[iy, ix, 0]) - pw / 2))
            y0 = int(round(float(centres[iy, ix, 1]) - ph / 2))
            x0 = min(max(x0, 0), w - pw)
            y0 = min(max(y0, 0), h - ph)
            patch = frames[:, y0 : y0 + ph, x0 : x0 + pw]
            if group > 1:
                patch = torch.stack([patch[g * group : (g + 1) * group].sum(0) for g in range(n_groups)])
            patch = (patch - patch.mean(dim=(-2, -1), keepdim=True)) * taper
            spectra = torch.fft.rfft2(patch)
            s = _align_stack(spectra, ph, pw, filt, max_shift_a / pixel_size_a, max_iter, tol_px)
            if group > 1:
                s = _interpolate_group_shifts(s, n, group)
            out[iy, ix] = s - s[:1]
    return centres, out


def _poly_basis(z: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """RELION's ThirdOrderPolynomialModel basis, ``(..., 18)``: {1, u, u^2, v, v^2, uv} x {z, z^2, z^3}."""
    spatial = torch.stack([torch.ones_like(u), u, u * u, v, v * v, u * v], dim=-1)  # (..., 6)
    temporal = torch.stack([z, z * z, z * z * z], dim=-1)  # (..., 3)
    return (spatial.unsqueeze(-1) * temporal.unsqueeze(-2)).flatten(-2)


def polynomial_shift(coeffs: torch.Tensor, z: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Evaluate RELION's third-order polynomial motion model (micrograph_model.cpp, getShiftAt).

    Parameters
    ----------
    coeffs
        ``(36,)`` coefficients: 18 for x then 18 for y, in RELION's order
        (coefficient ``3 * term + power`` multiplies ``term * z**(power + 1)``, terms
        ``1, u, u^2, v, v^2, uv``).
    z
        ``(...)`` frame index counted from the first frame (0-based).
    u, v
        ``(...)`` normalised positions ``x / width - 0.5`` and ``y / height - 0.5``.

    Returns
    -------
    torch.Tensor
        ``(..., 2)`` local shifts (x, y) in pixels.
    """
    z, u, v = torch.broadcast_tensors(z, u, v)
    basis = _poly_basis(z.to(coeffs.dtype), u.to(coeffs.dtype), v.to(coeffs.dtype))
    return torch.stack([basis @ coeffs[:N_POLY_COEFFS], basis @ coeffs[N_POLY_COEFFS:]], dim=-1)


def fit_polynomial_motion(
    centres: torch.Tensor, shifts: torch.Tensor, width: int, height: int, ridge: float = 1e-6
) -> torch.Tensor:
    """Least-squares fit of the third-order polynomial model to patch trajectories.

    Parameters
    ----------
    centres
        ``(..., 2)`` patch centres (x, y) in pixels.
    shifts
        ``(..., n, 2)`` local correction shifts of those patches per frame (zero at frame 0).
    width, height
        Micrograph size in pixels (normalises the positions).
    ridge
        Tikhonov regularisation relative to the trace of the normal matrix.

    Returns
    -------
    torch.Tensor
        ``(36,)`` float64 coefficients in RELION's order (see :func:`polynomial_shift`), on the
        device of ``shifts``.
    """
    n = shifts.shape[-2]
    dev = shifts.device
    c = centres.reshape(-1, 2).to(device=dev, dtype=torch.float64)
    s = shifts.reshape(-1, n, 2).to(torch.float64)
    u = (c[:, 0] / width - 0.5)[:, None].expand(-1, n)
    v = (c[:, 1] / height - 0.5)[:, None].expand(-1, n)
    z = torch.arange(n, dtype=torch.float64, device=dev)[None, :].expand(c.shape[0], -1)
    a = _poly_basis(z, u, v).reshape(-1, N_POLY_COEFFS)
    ata = a.T @ a
    ata = ata + ridge * torch.trace(ata) / N_POLY_COEFFS * torch.eye(N_POLY_COEFFS, dtype=torch.float64, device=dev)
    bx = a.T @ s[..., 0].reshape(-1)
    by = a.T @ s[..., 1].reshape(-1)
    cx = torch.linalg.solve(ata, bx)
    cy = torch.linalg.solve(ata, by)
    return torch.cat([cx, cy])


# ----------------------------------------------------------------- correction and summing ---


def critical_exposure(k_inv_a: torch.Tensor, voltage_kv: float) -> torch.Tensor:
    """Critical exposure (e/A^2) at spatial frequency ``k_inv_a`` (1/A), Grant & Grigorieff 2015.

    The 300 kV curve is scaled by 0.8 at 200 kV and 0.64 at 100 kV (linearly between), as RELION does.
    """
    a, b, c = CRITICAL_EXPOSURE_ABC
    kv = float(voltage_kv)
    if kv >= 300:
        scale = 1.0
    elif kv >= 200:
        scale = 0.8 + 0.2 * (kv - 200) / 100
    else:
        scale = max(0.64 + 0.16 * (kv - 100) / 100, 0.1)
    k = k_inv_a.clamp_min(1e-6)
    return scale * (a * k**b + c)


def dose_weights(
    n_frames: int,
    h: int,
    w: int,
    pixel_size_a: float,
    dose_per_frame: float,
    voltage_kv: float,
    pre_exposure: float = 0.0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Exposure-filter weights for every frame on the rfft2 grid.

    Frame ``i`` (0-based) has received ``pre_exposure + dose_per_frame * (i + 1)`` e/A^2 at its end;
    its weight is ``exp(-dose / (2 Ne(k)))``. Weights are normalised per frequency so that
    ``sum_i w_i^2 = n_frames``: the noise power of the weighted sum equals that of the plain sum
    and the zero frequency is unchanged.

    Returns
    -------
    torch.Tensor
        ``(n_frames, h, w // 2 + 1)`` float32 weights.
    """
    ky, kx = _freq_grid(h, w, torch.device(device))
    k = torch.sqrt(kx**2 + ky**2) / pixel_size_a
    ne = critical_exposure(k, voltage_kv)
    dose = pre_exposure + dose_per_frame * torch.arange(1, n_frames + 1, dtype=torch.float32, device=k.device)
    wts = torch.exp(-dose[:, None, None] / (2.0 * ne[None]))
    norm = torch.sqrt(n_frames / (wts**2).sum(0).clamp_min(1e-30))
    return wts * norm


def correct_frames(
    frames: torch.Tensor,
    shifts: torch.Tensor,
    local_coeffs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply global shifts (Fourier phase ramps) and the local polynomial field (interpolation).

    Parameters
    ----------
    frames
        ``(n, h, w)`` gain-corrected frames.
    shifts
        ``(n, 2)`` global correction shifts (x, y) in pixels.
    local_coeffs
        ``(36,)`` polynomial coefficients, or ``None`` for global correction only.

    Returns
    -------
    torch.Tensor
        ``(n, h, w)`` aligned frames (float32).
    """
    n, h, w = frames.shape
    spec = torch.fft.rfft2(frames.to(torch.float32)) * _phase_ramp(shifts.to(frames.device), h, w)
    aligned = torch.fft.irfft2(spec, s=(h, w))
    if local_coeffs is None:
        return aligned
    ys = torch.arange(h, dtype=torch.float64, device=frames.device)
    xs = torch.arange(w, dtype=torch.float64, device=frames.device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    u, v = gx / w - 0.5, gy / h - 0.5
    spatial = torch.stack([torch.ones_like(u), u, u * u, v, v * v, u * v]).to(torch.float32)  # (6, h, w)
    coeffs = local_coeffs.to(device=frames.device, dtype=torch.float64)
    cx = coeffs[:N_POLY_COEFFS].view(6, 3)
    cy = coeffs[N_POLY_COEFFS:].view(6, 3)
    out = torch.empty_like(aligned)
    out[0] = aligned[0]
    gxf, gyf = gx.to(torch.float32), gy.to(torch.float32)
    for f in range(1, n):
        zp = torch.tensor([f, f**2, f**3], dtype=torch.float64, device=frames.device)
        lx = torch.einsum("t,thw->hw", (cx @ zp).to(torch.float32), spatial)
        ly = torch.einsum("t,thw->hw", (cy @ zp).to(torch.float32), spatial)
        grid = torch.stack([(2 * (gxf - lx) + 1) / w - 1, (2 * (gyf - ly) + 1) / h - 1], dim=-1)
        out[f] = F.grid_sample(
            aligned[f][None, None], grid[None], mode="bicubic", padding_mode="border", align_corners=False
        )[0, 0]
    return out


def weighted_sum(frames: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum aligned frames, optionally with per-frame Fourier weights.

    Parameters
    ----------
    frames
        ``(n, h, w)`` aligned frames.
    weights
        ``(n, h, w // 2 + 1)`` weights from :func:`dose_weights`, or ``None`` for a plain sum.

    Returns
    -------
    torch.Tensor
        ``(h, w)`` float32 sum.
    """
    if weights is None:
        return frames.to(torch.float32).sum(0)
    h, w = frames.shape[-2:]
    spec = (torch.fft.rfft2(frames.to(torch.float32)) * weights.to(frames.device)).sum(0)
    return torch.fft.irfft2(spec, s=(h, w))


def accumulated_motion(shifts: torch.Tensor, pixel_size_a: float) -> tuple[float, float, float]:
    """RELION's rlnAccumMotionTotal / Early / Late (Angstrom) from global shifts.

    The motion is the sum of frame-to-frame displacement lengths; 'early' counts the steps into
    the first :data:`EARLY_FRAMES` frames, 'late' the rest.

    Parameters
    ----------
    shifts
        ``(n, 2)`` global shifts in pixels.
    pixel_size_a
        Pixel size of those pixels (Angstrom).
    """
    steps = torch.linalg.norm(shifts[1:] - shifts[:-1], dim=-1).to(torch.float64) * pixel_size_a
    early = float(steps[: EARLY_FRAMES - 1].sum())
    late = float(steps[EARLY_FRAMES - 1 :].sum())
    return early + late, early, late


@dataclass(frozen=True)
class MotionResult:
    """Outcome of :func:`motion_correct` for one movie.

    Attributes
    ----------
    micrograph
        ``(h', w')`` dose-weighted (when a dose was given) sum, binned by ``bin_factor``.
    micrograph_no_dw
        ``(h', w')`` plain sum, or ``None`` when not requested.
    shifts_px
        ``(n, 2)`` global correction shifts (x, y), unbinned pixels, zero at frame 0.
    local_coeffs
        ``(36,)`` polynomial model, or ``None`` without patches.
    patch_centres_px
        ``(py, px, 2)`` patch centres, or ``None``.
    patch_shifts_px
        ``(py, px, n, 2)`` measured local (residual) shifts, or ``None``.
    accum_motion_a
        (total, early, late) accumulated global motion in Angstrom.
    """

    micrograph: torch.Tensor
    micrograph_no_dw: torch.Tensor | None
    shifts_px: torch.Tensor
    local_coeffs: torch.Tensor | None
    patch_centres_px: torch.Tensor | None
    patch_shifts_px: torch.Tensor | None
    accum_motion_a: tuple[float, float, float]


def motion_correct(
    frames: torch.Tensor,
    pixel_size_a: float,
    *,
    gain: torch.Tensor | None = None,
    voltage_kv: float = 300.0,
    dose_per_frame: float = 0.0,
    pre_exposure: float = 0.0,
    patch_x: int = 5,
    patch_y: int = 5,
    bfactor_a2: float = 150.0,
    group_frames: int = 1,
    bin_factor: float = 1.0,
    first_frame: int = 1,
    last_frame: int = -1,
    save_no_dw: bool = False,
) -> MotionResult:
    """Motion-correct one movie: gain, global and local alignment, dose weighting, binning.

    Parameters
    ----------
    frames
        ``(n, h, w)`` raw frames (any real dtype; computed in float32 on their device).
    pixel_size_a
        Unbinned movie pixel size (Angstrom).
    gain
        ``(h, w)`` oriented gain reference, or ``None``.
    voltage_kv
        Acceleration voltage (exposure filter).
    dose_per_frame
        Electrons per A^2 per frame; 0 disables dose weighting.
    pre_exposure
        Dose before the first frame (e/A^2).
    patch_x, patch_y
        Patches for local motion; ``1 x 1`` disables it.
    bfactor_a2
        B-factor for global alignment.
    group_frames
        Frame grouping for alignment.
    bin_factor
        Fourier binning of the output sums.
    first_frame, last_frame
        1-based range of frames summed (RELION's --first_frame_sum / --last_frame_sum; -1 = last).
    save_no_dw
        Also return the sum without dose weighting.

    Returns
    -------
    MotionResult
    """
    n_all = frames.shape[0]
    last = n_all if last_frame is None or last_frame < 1 else min(last_frame, n_all)
    first = max(1, first_frame)
    if first > last:
        raise ValueError(f"first frame {first} is after last frame {last}")
    frames = frames[first - 1 : last].to(torch.float32)
    if gain is not None:
        frames = apply_gain(frames, gain)
    n, h, w = frames.shape
    shifts = estimate_global_shifts(frames, pixel_size_a, bfactor_a2=bfactor_a2, group_frames=group_frames)
    coeffs = centres = pshifts = None
    if patch_x * patch_y > 1 and n > 2:
        aligned = correct_frames(frames, shifts)
        centres, pshifts = estimate_patch_shifts(
            aligned, pixel_size_a, patch_x=patch_x, patch_y=patch_y, group_frames=group_frames
        )
        # patches with too little signal follow the noise (shifts of tens of pixels): a local
        # correction larger than the cap is a failed patch, left out of the fit
        cap = max(MIN_LOCAL_CAP_PX, LOCAL_CAP_FRACTION * float(shifts.norm(dim=-1).max()))
        ok = pshifts.norm(dim=-1).amax(-1) <= cap  # (py, px)
        if int(ok.sum()) >= max(2, ok.numel() // 2):
            coeffs = fit_polynomial_motion(centres[ok], pshifts[ok], w, h)
        else:
            log.info("local motion: %d of %d patches within %.1f px of the global path: global alignment only",
                     int(ok.sum()), ok.numel(), cap)
        if not bool(ok.all()):
            log.info("local motion: %d of %d patches left out (local shifts above %.1f px)", int((~ok).sum()), ok.numel(), cap)
    aligned = correct_frames(frames, shifts, coeffs)
    no_dw = None
    if dose_per_frame > 0:
        wts = dose_weights(n, h, w, pixel_size_a, dose_per_frame, voltage_kv, pre_exposure, device=frames.device)
        mic = weighted_sum(aligned, wts)
        if save_no_dw:
            no_dw = fourier_bin(weighted_sum(aligned), bin_factor)
    else:
        mic = weighted_sum(aligned)
        if save_no_dw:
            no_dw = fourier_bin(mic, bin_factor)
    mic = fourier_bin(mic, bin_factor)
    return MotionResult(
        micrograph=mic,
        micrograph_no_dw=no_dw,
        shifts_px=shifts,
        local_coeffs=coeffs,
        patch_centres_px=centres,
        patch_shifts_px=pshifts,
        accum_motion_a=accumulated_motion(shifts, pixel_size_a),
    )
