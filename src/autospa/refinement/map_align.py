"""Align one map onto another (rotation, translation and, optionally, hand), for comparing a
de-novo model with a known structure: a global search over SO(3) on small low-passed copies,
a local refinement, and the translation from the cross-correlation peak.

A de-novo reconstruction from projections is determined up to the hand (projections of a map
and of its mirror image are related by a change of Euler angles), so both hands are tried.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from autospa.numerics.fourier import fourier_crop
from autospa.refinement.symmetry_align import _small_rotations, _so3_grid, resample_volume, shift_volume


@dataclass(frozen=True)
class MapAlignment:
    """Where ``moving`` sits relative to ``reference``.

    Attributes
    ----------
    aligned
        ``(D, D, D)`` the moving map (mirrored if ``mirrored``) rotated and shifted onto the reference.
    rotation
        ``(3, 3)`` M with ``aligned(x) = moving'(M x)`` before the shift, ``moving'`` the
        (mirrored) moving map centred on its centre of mass.
    shift_px
        ``(3,)`` final translation (x, y, z) applied after the rotation.
    mirrored
        The moving map's hand was flipped.
    correlation
        Real-space correlation of the aligned map with the reference.
    """

    aligned: torch.Tensor
    rotation: torch.Tensor
    shift_px: torch.Tensor
    mirrored: bool
    correlation: float


def mirror(vol: torch.Tensor) -> torch.Tensor:
    """The mirror image ``v(-x, y, z)`` about the box centre ``D // 2``."""
    return torch.roll(torch.flip(vol, dims=(-1,)), shifts=1, dims=-1)


def centred(vol: torch.Tensor) -> torch.Tensor:
    """The map moved so that the centre of mass of its positive part is at the box centre."""
    box = vol.shape[-1]
    w = vol.clamp_min(0).to(torch.float64)
    c = torch.arange(box, dtype=torch.float64, device=vol.device) - box // 2
    tot = w.sum().clamp_min(1e-30)
    com = torch.stack([(w.sum((0, 1)) * c).sum(), (w.sum((0, 2)) * c).sum(), (w.sum((1, 2)) * c).sum()]) / tot
    return shift_volume(vol, -com)


def _downsample(vol: torch.Tensor, size: int) -> torch.Tensor:
    box = vol.shape[-1]
    if size >= box:
        return vol
    return fourier_crop(vol, size, ndim=3)


def _corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of ``a (n, ...)`` with ``b (...)``; ``(n,)``."""
    af = a.reshape(a.shape[0], -1).to(torch.float64)
    bf = b.reshape(-1).to(torch.float64)
    af = af - af.mean(1, keepdim=True)
    bf = bf - bf.mean()
    return (af @ bf) / (af.norm(dim=1) * bf.norm()).clamp_min(1e-30)


def _best_shift(moving: torch.Tensor, reference: torch.Tensor, max_shift_px: float) -> torch.Tensor:
    """Integer-plus-parabolic shift (x, y, z) that moves ``moving`` onto ``reference`` (FFT cross-correlation)."""
    box = moving.shape[-1]
    cc = torch.fft.irfftn(torch.fft.rfftn(reference) * torch.fft.rfftn(moving).conj(), s=moving.shape)
    cc = torch.fft.fftshift(cc)
    c = torch.arange(box, device=moving.device) - box // 2
    zz, yy, xx = torch.meshgrid(c, c, c, indexing="ij")
    cc = torch.where(xx**2 + yy**2 + zz**2 <= max_shift_px**2, cc, torch.full_like(cc, -torch.inf))
    i = int(torch.argmax(cc))
    z, y, x = i // (box * box), (i // box) % box, i % box
    return torch.tensor([x - box // 2, y - box // 2, z - box // 2], dtype=torch.float64)


def align_maps(
    moving: torch.Tensor,
    reference: torch.Tensor,
    pixel_size_a: float,
    search_resolution_a: float | None = None,
    step_deg: float = 12.0,
    try_mirror: bool = True,
    max_shift_px: float | None = None,
) -> MapAlignment:
    """Align ``moving`` onto ``reference`` (both ``(D, D, D)``, same pixel size).

    Parameters
    ----------
    search_resolution_a
        Resolution of the global search (default 4 pixels or 1/6 of the box, the coarser).
    step_deg
        Angular step of the global search; the local refinement goes down to 0.5 degree.
    try_mirror
        Also try the mirror image of ``moving``.
    max_shift_px
        Largest translation considered (default D/4).
    """
    box = moving.shape[-1]
    max_shift = box / 4 if max_shift_px is None else max_shift_px
    res = search_resolution_a or max(4 * pixel_size_a, box * pixel_size_a / 6)
    small = max(16, 2 * int(math.ceil(box * pixel_size_a / res)))
    small = min(small, box)
    ref_s = _downsample(reference.to(torch.float32), small)
    grid = _so3_grid(step_deg)
    best = None
    for mirrored in ((False, True) if try_mirror else (False,)):
        mov = mirror(moving) if mirrored else moving
        mov = centred(mov.to(torch.float32))
        mov_s = _downsample(mov, small)
        scores = []
        for s in range(0, len(grid), 256):
            rot = resample_volume(mov_s, grid[s : s + 256], pad=1)
            # translation-tolerant score: correlation after the best integer shift is costly, so
            # score the centred rotation and let the local refinement fix the shift
            scores.append(_corr(rot, ref_s))
        scores = torch.cat(scores)
        top = torch.topk(scores, min(8, len(scores))).indices
        for j in top.tolist():
            m, c, shift = _refine(mov, reference.to(torch.float32), grid[j], step_deg, max_shift)
            if best is None or c > best[1]:
                best = (m, c, shift, mirrored)
    m, c, shift, mirrored = best
    mov = centred((mirror(moving) if mirrored else moving).to(torch.float32))
    aligned = shift_volume(resample_volume(mov, m, pad=2), shift)
    corr = float(_corr(aligned[None], reference.to(torch.float32))[0])
    return MapAlignment(aligned, m, shift, mirrored, corr)


def _refine(mov: torch.Tensor, ref: torch.Tensor, start: torch.Tensor, step_deg: float, max_shift: float):
    """Local refinement of the rotation (hill climbing with shrinking steps) and the shift."""
    m = start.to(torch.float64)
    shift = _best_shift(resample_volume(mov, m, pad=1), ref, max_shift)
    cur = float(_corr(shift_volume(resample_volume(mov, m, pad=1), shift)[None], ref)[0])
    step = step_deg / 2
    while step >= 0.5:
        cands = _small_rotations(step) @ m
        vols = resample_volume(mov, cands, pad=1)
        vols = torch.stack([shift_volume(v, shift) for v in vols])
        sc = _corr(vols, ref)
        j = int(torch.argmax(sc))
        if float(sc[j]) > cur:
            m, cur = cands[j], float(sc[j])
            shift = _best_shift(resample_volume(mov, m, pad=1), ref, max_shift)
            cur = max(cur, float(_corr(shift_volume(resample_volume(mov, m, pad=1), shift)[None], ref)[0]))
        else:
            step /= 2
    return m, cur, shift


__all__ = ["MapAlignment", "align_maps", "mirror"]
