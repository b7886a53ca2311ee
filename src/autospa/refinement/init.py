"""Initialisation: noise spectra from the data and Gaussian-blob references
(reference/relion-vdam.md 3.2 "Initial sigma2" and 4.12; SomGraph::make_blobs_2d).
"""

from __future__ import annotations

import math

import torch

from autospa.conventions import euler_to_matrix, psi_to_matrix_2d
from autospa.numerics import slices
from autospa.refinement.estep import centered_rfft2, rfft_frequencies, window_indices
from autospa.refinement.mstep import soft_edge


def power_sums(images_masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Additive sums for the initial noise estimate.

    Parameters
    ----------
    images_masked
        ``(N, D, D)`` (zero-masked) particles.

    Returns
    -------
    shell_power_sum
        ``(S,)`` sum over particles of the shell-averaged ``|X|^2`` (half-plane pixels).
    image_sum
        ``(D, D)`` sum of the images (for the mean image).
    n
        Number of particles.
    """
    n, box, _ = images_masked.shape
    ft = torch.fft.rfft2(images_masked, norm="forward").reshape(n, -1)
    return _shell_average(ft.abs() ** 2, box).sum(0), images_masked.sum(0), n


def _shell_average(values: torch.Tensor, box: int) -> torch.Tensor:
    """Shell average over half-plane rfft pixels of ``(N, F_all)`` values: ``(N, S)``."""
    freqs, shells = rfft_frequencies(box, values.device)
    keep = ~((freqs[:, 0] == 0) & (freqs[:, 1] < 0)) & (shells <= box // 2)
    s = shells[keep]
    n_sh = box // 2 + 1
    sums = torch.zeros(values.shape[0], n_sh, dtype=torch.float64, device=values.device).index_add_(1, s, values[:, keep].to(torch.float64))
    return sums / torch.bincount(s, minlength=n_sh).clamp_min(1).to(torch.float64)


def initial_sigma2(shell_power_sum: torch.Tensor, image_sum: torch.Tensor, n: int) -> torch.Tensor:
    """``sigma2(s) = 1/2 <|X|^2>_s - 1/2 |FT(mean image)|^2_s``, non-positive shells replaced by
    the previous (or next) positive one; ``(S,)`` float64."""
    box = image_sum.shape[-1]
    mean_img = (image_sum / max(n, 1))[None]
    mean_pow = _shell_average(torch.fft.rfft2(mean_img, norm="forward").reshape(1, -1).abs() ** 2, box)[0]
    s2 = 0.5 * shell_power_sum / max(n, 1) - 0.5 * mean_pow
    s2 = s2.clone()
    pos = s2 > 0
    if not bool(pos.any()):
        raise ValueError("all noise power estimates are non-positive: are the images empty?")
    first = int(torch.nonzero(pos)[0])
    for s in range(len(s2)):
        if s2[s] <= 0:
            s2[s] = s2[s - 1] if s > first else s2[first]
    return s2


def seed_maps(
    images: torch.Tensor, ctf: torch.Tensor, n_classes: int, sigma2: torch.Tensor, generator: torch.Generator, pad: int = 2,
    ndim: int = 2,
) -> torch.Tensor:
    """Low-resolution seed maps: particles at random orientations (psi in 2D, uniform rotations
    for 3D maps), CTF-weighted and averaged per class (particle index mod K), reconstructed
    without a prior at ``round(0.07 D)`` shells.

    Parameters
    ----------
    images
        ``(N, D, D)`` masked particles (N <= 1000 per optics group in RELION).
    ctf
        ``(N, D, D//2+1)``.
    sigma2
        ``(S,)``.

    Returns
    -------
    torch.Tensor
        ``(K,) + (D,) * ndim`` real seed maps, low-pass filtered.
    """
    n, box, _ = images.shape
    r = max(2, round(0.07 * box))
    idx = window_indices(box, 2 * (r + 1), images.device, include_dc=True)
    freqs, shells = rfft_frequencies(box, images.device)
    f = freqs[idx]
    x = centered_rfft2(images).reshape(n, -1)[:, idx]
    c = ctf.reshape(n, -1)[:, idx]
    w = 1.0 / sigma2.to(images.dtype)[shells[idx].clamp_max(len(sigma2) - 1)]
    dc_half = torch.where((f == 0).all(-1), 0.5, 1.0).to(images.dtype)
    rnd = torch.rand(n, 3, generator=generator, dtype=torch.float64).to(images.device)
    if ndim == 2:
        mats = psi_to_matrix_2d(rnd[:, 2] * 360.0)
    else:  # uniform on SO(3): rot, psi uniform, cos(tilt) uniform
        mats = euler_to_matrix(rnd[:, 0] * 360.0, torch.rad2deg(torch.acos(1 - 2 * rnd[:, 1])), rnd[:, 2] * 360.0)
    pd = pad * box
    data = torch.zeros((n_classes,) + (pd,) * ndim, dtype=torch.complex64, device=images.device)
    weight = torch.zeros((n_classes,) + (pd,) * ndim, dtype=images.dtype, device=images.device)
    for cls in range(n_classes):
        sel = torch.arange(cls, n, n_classes, device=images.device)
        if len(sel) == 0:
            continue
        st = slices.stencil(mats[sel], f, box, pad)  # one rotation per particle
        # sum over the particles of this class: scatter with K=1 and R=len(sel)
        data[cls] = slices.hermitian_complete(slices.rotate_scatter((c[sel] * w * x[sel] * dc_half)[None], st), ndim)[0]
        weight[cls] = slices.hermitian_complete(slices.rotate_scatter((c[sel] ** 2 * w * dc_half)[None], st), ndim)[0]
    ft = torch.where(weight > 1e-6 * weight.amax().clamp_min(1e-30), data / weight.clamp_min(1e-30), torch.zeros_like(data))
    maps = slices.unpad_reference_ft(ft, box, ndim) / slices.gridding_correction(box, pad, ndim, images.device, images.dtype)
    return lowpass_raised_cosine(maps, r)


def lowpass_raised_cosine(maps: torch.Tensor, r: float) -> torch.Tensor:
    """Pass below ``r - 1`` shells, zero beyond ``r + 1``, raised cosine between; ``(K, D, D)``
    images or ``(K, D, D, D)`` maps."""
    box, ndim = maps.shape[-1], maps.dim() - 1
    dims = tuple(range(-ndim, 0))
    axes = [torch.fft.fftfreq(box, d=1.0 / box, device=maps.device)] * (ndim - 1)
    axes.append(torch.arange(box // 2 + 1, device=maps.device, dtype=torch.float32))
    rad = torch.sqrt(sum(g * g for g in torch.meshgrid(*axes, indexing="ij")))
    filt = torch.where(rad < r - 1, torch.ones_like(rad), torch.where(rad > r + 1, torch.zeros_like(rad),
                       0.5 + 0.5 * torch.cos(math.pi * (rad - (r - 1)) / 2.0)))
    return torch.fft.irfftn(torch.fft.rfftn(maps, dim=dims) * filt, s=(box,) * ndim, dim=dims)


def blob_references(seeds: torch.Tensor, diameter_px: float, generator: torch.Generator, n_blobs: int = 40) -> torch.Tensor:
    """RELION's Gaussian-blob references, different per class (SomGraph::make_blobs_2d).

    For each class two sets of ``n_blobs`` blobs (positive and negative), centres drawn from
    ``N(D/2, (d/7)^2)`` per axis, each ``exp(-|r - c|^2 (10/d)^2)`` with the amplitude
    ``|seed|`` at the centre pixel; ``V = pos - neg/2``, rescaled to the seed's standard
    deviation, low-pass filtered like the seeds and soft-masked at ``d/2`` (5-pixel edge).

    Parameters
    ----------
    seeds
        ``(K, D, D)`` seed images or ``(K, D, D, D)`` seed maps (SomGraph::make_blobs_3d).
    diameter_px
        Particle diameter in pixels.

    Returns
    -------
    torch.Tensor
        Same shape as ``seeds``.
    """
    k, box, ndim = seeds.shape[0], seeds.shape[-1], seeds.dim() - 1
    dev, dt = seeds.device, seeds.dtype
    ax = torch.arange(box, device=dev, dtype=dt)
    coords = torch.meshgrid(*([ax] * ndim), indexing="ij")[::-1]  # x, y[, z]
    out = torch.zeros_like(seeds)
    for c in range(k):
        maps = []
        for _ in range(2):
            centres = (box / 2 + torch.randn(n_blobs, ndim, generator=generator, dtype=torch.float64) * diameter_px / 7).to(dev, dt)
            ci = centres.long()
            ok = (ci >= 0).all(-1) & (ci < box).all(-1)
            amp = torch.zeros(n_blobs, device=dev, dtype=dt)
            amp[ok] = seeds[c][tuple(ci[ok, j] for j in reversed(range(ndim)))].abs()
            d2 = sum((coords[j][None] - centres[:, j].reshape(-1, *([1] * ndim))) ** 2 for j in range(ndim))
            maps.append((amp.reshape(-1, *([1] * ndim)) * torch.exp(-d2 * (10.0 / diameter_px) ** 2)).sum(0))
        v = maps[0] - 0.5 * maps[1]
        std_v = v.std()
        out[c] = v * (seeds[c].std() / std_v) if std_v > 0 else v
    r = max(2, round(0.07 * box))
    out = lowpass_raised_cosine(out, r)
    return soft_edge(out, diameter_px / 2, 5.0, fill_edge_mean=True)
