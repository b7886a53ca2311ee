"""Laplacian-of-Gaussian particle picking, as RELION's ``relion_autopick --LoG`` does it (L3, pure torch).

Following RELION's ``AutoPicker::autoPickLoGOneMicrograph``:

1. The micrograph is normalised (mean 0, std 1; negated unless ``invert`` so that particles are
   positive) and low-pass filtered (``lowpass_a``, RELION's 20 A ``log_maxres``) by Fourier
   cropping to a working pixel size.
2. It is filtered with RELION's scale-normalised LoG, ``(r / s)^2 exp(-r^2 / (2 s^2))`` in
   Fourier space with ``s = box * pixel / (2 d)`` (a real-space Gaussian of ``sigma = d / pi``), for
   RELION's list of diameters ``d``: ``diam_min / k`` (``k = max_search .. 2``, "too low"),
   ``diam_min``, ``(diam_min + diam_max) / 2``, ``diam_max`` ("ok") and ``k * diam_max``
   (``k = 2 .. max_search``, "too high").
3. Every pixel keeps its strongest response (the figure of merit) and the diameter that gave it;
   pixels whose best diameter is too low (noise specks) or too high (ice, aggregates, carbon)
   cannot be picked, nor can pixels within half the smallest diameter of the edge (RELION's
   automatic skip_side).
4. The threshold is ``mean + adjust_threshold * std`` of the figure of merit over the "ok" pixels
   (``upper_threshold`` likewise rejects the strongest blobs, e.g. contamination); picks are taken
   from the strongest down, each excluding others within
   ``neighbour_fudge * (d_detected + diam_min) / 2``. Unlike RELION, which zeroes a disc and takes
   the next maximum pixel, only local maxima of the figure of merit are candidates, and positions
   are refined to sub-pixel precision (RELION reports working-grid pixels).

Particles are dark on a raw micrograph; ``invert=True`` (RELION's ``--Log_invert``) picks white ones.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoGPicks:
    """Picks of one micrograph.

    Attributes
    ----------
    coords_px
        ``(k, 2)`` float64 positions (x, y) in pixels of the input micrograph.
    fom
        ``(k,)`` LoG figure of merit (rlnAutopickFigureOfMerit), in standard deviations above the
        mean of the figure-of-merit map over the pixels whose best diameter is in range.
    diameter_a
        ``(k,)`` best-matching blob diameter (Angstrom).
    """

    coords_px: torch.Tensor
    fom: torch.Tensor
    diameter_a: torch.Tensor


def log_diameters(diam_min_a: float, diam_max_a: float, max_search: float = 5.0) -> torch.Tensor:
    """RELION's LoG diameters (Angstrom): ``min / k`` for ``k = max_search .. 2``, ``min``,
    ``(min + max) / 2``, ``max`` and ``k * max`` for ``k = 2 .. max_search`` (sorted, unique).
    """
    ks = range(2, int(max_search) + 1)
    low = [round(diam_min_a / k) for k in ks]
    high = [round(diam_max_a * k) for k in ks]
    d = low + [diam_min_a, (diam_min_a + diam_max_a) / 2.0, diam_max_a] + high
    return torch.unique(torch.tensor(d, dtype=torch.float64))


def log_responses(image: torch.Tensor, diameters_px: torch.Tensor) -> torch.Tensor:
    """RELION's scale-normalised LoG responses (``LoGFilterMap``) of one image.

    In Fourier space the filter is ``(r / s)^2 exp(-r^2 / (2 s^2))`` with ``r`` the frequency in
    cycles per image width and ``s = n / (2 d)`` for a blob diameter of ``d`` pixels, i.e. minus the
    Laplacian of a Gaussian of ``sigma = d / pi`` pixels, normalised so that responses at different
    diameters compare (a bright blob of diameter ~``d`` gives a positive peak).

    Parameters
    ----------
    image
        ``(h, w)`` image (bright blobs give positive responses).
    diameters_px
        ``(s,)`` blob diameters in pixels.

    Returns
    -------
    torch.Tensor
        ``(s, h, w)`` float32 responses (periodic boundary: pad the image beforehand).
    """
    h, w = image.shape
    spec = torch.fft.rfft2(image.to(torch.float32))
    ky = torch.fft.fftfreq(h, device=image.device, dtype=torch.float64).view(1, h, 1)
    kx = torch.fft.rfftfreq(w, device=image.device, dtype=torch.float64).view(1, 1, w // 2 + 1)
    k2 = kx**2 + ky**2  # cycles per pixel
    # r / s with r = k * n and s = n / (2 d): (r / s)^2 = (2 d k)^2, independent of the image size
    q2 = 4.0 * (diameters_px.to(device=image.device, dtype=torch.float64).view(-1, 1, 1)) ** 2 * k2
    filt = q2 * torch.exp(-0.5 * q2)
    return torch.fft.irfft2(spec.unsqueeze(0) * filt.to(torch.float32), s=(h, w))


def _fourier_resample(image: torch.Tensor, h_new: int, w_new: int) -> torch.Tensor:
    """Fourier crop ``(h, w)`` to ``(h_new, w_new)`` (both even, smaller or equal), mean kept."""
    h, w = image.shape
    spec = torch.fft.rfft2(image.to(torch.float32), norm="forward")
    top = h_new // 2
    rows = torch.cat([spec[:top], spec[h - top :]], dim=0)
    rows = rows[:, : w_new // 2 + 1].clone()
    rows[top, :] = 0  # Nyquist row of the smaller grid
    return torch.fft.irfft2(rows, s=(h_new, w_new), norm="forward")


def pick_log(
    micrograph: torch.Tensor,
    pixel_size_a: float,
    diam_min_a: float,
    diam_max_a: float,
    *,
    lowpass_a: float = 20.0,
    adjust_threshold: float = 0.0,
    upper_threshold: float = 999.0,
    invert: bool = False,
    neighbour_fudge: float = 1.0,
    max_search: float = 5.0,
    edge_px: int = 0,
) -> LoGPicks:
    """Pick blobs of diameter ``diam_min_a`` .. ``diam_max_a`` on a micrograph.

    Parameters
    ----------
    micrograph
        ``(h, w)`` micrograph (particles dark unless ``invert``).
    pixel_size_a
        Micrograph pixel size (Angstrom).
    diam_min_a, diam_max_a
        Smallest and largest particle diameter (Angstrom): RELION's --LoG_diam_min/--LoG_diam_max.
    lowpass_a
        Resolution (Angstrom) of the low-pass filter applied first (RELION's --lowpass, 20).
    adjust_threshold
        Threshold in standard deviations above the mean of the figure-of-merit map (RELION's
        --LoG_adjust_threshold; positive picks fewer).
    upper_threshold
        Peaks stronger than this many standard deviations are rejected (--LoG_upper_threshold).
    invert
        Particles are white (--Log_invert).
    neighbour_fudge
        Neighbour exclusion as a fraction of ``(d_detected + diam_min) / 2`` (--LoG_neighbour / 100).
    max_search
        Largest diameter searched, in multiples of ``diam_max`` (--Log_max_search).
    edge_px
        Picks closer than this to the micrograph edge (input pixels) are dropped.

    Returns
    -------
    LoGPicks
        Picks sorted by decreasing figure of merit.
    """
    if not 0 < diam_min_a <= diam_max_a:
        raise ValueError(f"need 0 < diam_min ({diam_min_a}) <= diam_max ({diam_max_a})")
    h, w = micrograph.shape
    dev = micrograph.device
    # working pixel size: the low-pass Nyquist, but at least ~12 pixels across the smallest particle
    work_px = max(pixel_size_a, min(lowpass_a / 2.0, diam_min_a / 12.0))
    factor = work_px / pixel_size_a
    hw = max(8, 2 * int(round(h / factor / 2)))
    ww = max(8, 2 * int(round(w / factor / 2)))
    hw, ww = min(hw, h - h % 2), min(ww, w - w % 2)
    img = micrograph.to(torch.float32)
    img = img[: h - h % 2, : w - w % 2]
    small = _fourier_resample(img, hw, ww)
    fy, fx = (h - h % 2) / hw, (w - w % 2) / ww  # input pixels per working pixel
    small = (small - small.mean()) / small.std().clamp_min(1e-12)
    if not invert:
        small = -small
    # pad by reflection against wrap-around, up to the largest searched blob radius
    diam_a = log_diameters(diam_min_a, diam_max_a, max_search)
    diam_work = diam_a / (work_px)
    pad = int(min(math.ceil(float(diam_work.max())), hw - 1, ww - 1))
    padded = F.pad(small[None, None], (pad, pad, pad, pad), mode="reflect")[0, 0]
    resp = log_responses(padded, diam_work)[:, pad : pad + hw, pad : pad + ww]
    best, best_idx = resp.max(dim=0)
    best_d = diam_a.to(dev)[best_idx]
    in_range = (best_d >= diam_min_a - 1e-6) & (best_d <= diam_max_a + 1e-6)
    # RELION always skips half the smallest diameter at the edges (LoG picks there otherwise)
    skip_y = max(1, int(math.ceil(0.5 * diam_min_a / (pixel_size_a * fy))))
    skip_x = max(1, int(math.ceil(0.5 * diam_min_a / (pixel_size_a * fx))))
    inside = torch.zeros_like(in_range)
    inside[skip_y : hw - skip_y, skip_x : ww - skip_x] = True
    ok = in_range & inside
    # threshold statistics over the pixels whose best diameter is in range (RELION's fom_ok)
    ref = best[ok] if bool(ok.any()) else best.reshape(-1)
    mean, std = ref.mean(), ref.std().clamp_min(1e-12)
    fom = (best - mean) / std
    lo, hi = adjust_threshold, upper_threshold
    # as RELION zeroes the pixels that cannot be picked before searching maxima, local maxima are
    # taken on the map of pickable pixels (a specky 'too low' pixel inside a particle does not
    # hide the particle's peak)
    pickable = torch.where(ok, fom, torch.full_like(fom, -torch.inf))
    local_max = pickable >= F.max_pool2d(pickable[None, None], 3, stride=1, padding=1)[0, 0]
    cand = ok & local_max & (fom > lo) & (fom < hi)
    ys, xs = torch.nonzero(cand, as_tuple=True)
    vals = fom[ys, xs]
    order = torch.argsort(vals, descending=True)
    ys, xs, vals = ys[order], xs[order], vals[order]
    dsel = best_d[ys, xs]
    # sub-pixel refinement (parabola through the neighbours), in working pixels
    fx_off = _parabola_offset(fom, ys, xs, axis=1)
    fy_off = _parabola_offset(fom, ys, xs, axis=0)
    px = (xs.to(torch.float64) + fx_off) * fx
    py = (ys.to(torch.float64) + fy_off) * fy
    keep: list[int] = []
    kx = torch.empty(0, dtype=torch.float64, device=dev)
    ky = torch.empty(0, dtype=torch.float64, device=dev)
    kd = torch.empty(0, dtype=torch.float64, device=dev)
    for i in range(len(vals)):
        if kx.numel():
            dist_a = torch.sqrt((kx - px[i]) ** 2 + (ky - py[i]) ** 2) * pixel_size_a
            limit = neighbour_fudge * (kd + diam_min_a) / 2.0
            limit_i = neighbour_fudge * (dsel[i] + diam_min_a) / 2.0
            if bool((dist_a < torch.maximum(limit, limit_i)).any()):
                continue
        keep.append(i)
        kx = torch.cat([kx, px[i : i + 1]])
        ky = torch.cat([ky, py[i : i + 1]])
        kd = torch.cat([kd, dsel[i : i + 1]])
    idx = torch.tensor(keep, dtype=torch.long, device=dev)
    coords = torch.stack([px[idx], py[idx]], dim=-1) if keep else torch.empty(0, 2, dtype=torch.float64, device=dev)
    if edge_px > 0 and keep:
        ok = (
            (coords[:, 0] >= edge_px)
            & (coords[:, 1] >= edge_px)
            & (coords[:, 0] <= w - 1 - edge_px)
            & (coords[:, 1] <= h - 1 - edge_px)
        )
        idx, coords = idx[ok], coords[ok]
    log.debug("LoG picking: %d candidates above threshold, %d picks", len(vals), len(idx))
    return LoGPicks(coords_px=coords, fom=vals[idx].to(torch.float64), diameter_a=dsel[idx].to(torch.float64))


def _parabola_offset(m: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, axis: int) -> torch.Tensor:
    """Sub-pixel offset of a local maximum along one axis from a parabola through 3 samples."""
    n = m.shape[axis]
    if axis == 1:
        lo = m[ys, (xs - 1).clamp(0, n - 1)]
        hi = m[ys, (xs + 1).clamp(0, n - 1)]
    else:
        lo = m[(ys - 1).clamp(0, n - 1), xs]
        hi = m[(ys + 1).clamp(0, n - 1), xs]
    c = m[ys, xs]
    den = (lo - 2 * c + hi).to(torch.float64)
    off = torch.where(den < 0, 0.5 * (lo - hi).to(torch.float64) / torch.where(den < 0, den, -1.0), 0.0)
    return off.clamp(-0.5, 0.5)
