"""M-step for EM and what EM and VDAM share: noise, priors, SSNR, resolution, reference
finishing and class centring (reference/relion-vdam.md section 3, 4.10, 4.11).
"""

from __future__ import annotations

import functools
import math

import torch

from autospa.numerics import slices
from autospa.numerics.masks import raised_cosine, radius_grid
from autospa.refinement.estep import rfft_frequencies
from autospa.refinement.state import ModelState
from autospa.refinement.statistics import SufficientStats


def padded_shells(padded_box: int, pad: int, device=None, ndim: int = 2) -> torch.Tensor:
    """Shell index ``round(|nu_pad| / P)`` (D-grid units) of every pixel of a centred padded grid.

    The grid is made once per (size, padding, dimensionality, device) and shared: callers index
    with it and must not write to it.

    Returns
    -------
    torch.Tensor
        ``(P*D,) * ndim`` long.
    """
    return _padded_shells(int(padded_box), int(pad), str(torch.device(device or "cpu")), int(ndim))


@functools.lru_cache(maxsize=16)
def _padded_shells(padded_box: int, pad: int, device: str, ndim: int) -> torch.Tensor:
    c = torch.arange(padded_box, device=device, dtype=torch.float32) - padded_box // 2
    grids = torch.meshgrid(*([c] * ndim), indexing="ij")
    r = torch.sqrt(sum(g * g for g in grids)) / pad
    return torch.round(r).long()


def ndim_of(refs: torch.Tensor) -> int:
    """2 for ``(K, D, D)`` images, 3 for ``(K, D, D, D)`` maps."""
    return refs.dim() - 1


def shell_mean(values: torch.Tensor, shells: torch.Tensor, n_shells: int) -> torch.Tensor:
    """Mean of ``values`` ``(K,) + grid`` per shell (``shells`` of the grid's shape): ``(K, n_shells)``
    (0 for empty shells), summed in float64.

    One weighted ``bincount`` over (class, shell) keys of the pixels inside ``n_shells`` (an
    ``index_add_`` along the grid axis of a ``(K, G)`` block is 2 to 3 times slower on the CPU).
    """
    k = values.shape[0]
    flat_shells = shells.reshape(-1)
    idx = torch.nonzero(flat_shells < n_shells).squeeze(1)
    s = flat_shells.index_select(0, idx)
    v = values.reshape(k, -1).index_select(1, idx)
    key = (torch.arange(k, device=values.device) * n_shells)[:, None] + s[None]  # (K, G')
    sums = torch.bincount(key.reshape(-1), weights=v.reshape(-1).to(torch.float64), minlength=k * n_shells)
    cnt = torch.bincount(s, minlength=n_shells).to(torch.float64)
    return sums.view(k, n_shells) / cnt.clamp_min(1)


def reference_ft(refs: torch.Tensor, pad: int) -> torch.Tensor:
    """Padded transforms of the references, gridding pre-corrected (for the E-step projector).

    Parameters
    ----------
    refs
        ``(K, D, D)`` or ``(K, D, D, D)`` real.

    Returns
    -------
    torch.Tensor
        ``(K,) + (P*D,) * ndim`` complex.
    """
    box, ndim = refs.shape[-1], ndim_of(refs)
    g = slices.gridding_correction(box, pad, ndim, refs.device, refs.dtype)
    return slices.pad_reference_ft(refs / g, pad, ndim)


def tau2_of(refs: torch.Tensor, pad: int) -> torch.Tensor:
    """tau2_k(s): shell-averaged power ``|V|^2 / 2`` of each reference's padded transform; ``(K, S)``."""
    box, ndim = refs.shape[-1], ndim_of(refs)
    ft = slices.pad_reference_ft(refs, pad, ndim)
    return shell_mean((ft.real**2 + ft.imag**2) / 2, padded_shells(ft.shape[-1], pad, refs.device, ndim), box // 2 + 1)


def half_plane_counts(box: int, device=None) -> torch.Tensor:
    """Number of half-plane Fourier pixels of the D grid per shell, ``(D//2 + 1,)``."""
    freqs, shells = rfft_frequencies(box, device)
    keep = ~((freqs[:, 0] == 0) & (freqs[:, 1] < 0)) & (shells <= box // 2)
    return torch.bincount(shells[keep], minlength=box // 2 + 1)[: box // 2 + 1].to(torch.float64)


def noise_from_stats(stats: SufficientStats, box: int, previous: torch.Tensor, mu: float = 0.0) -> torch.Tensor:
    """Noise spectra: ``sigma2 = mu sigma2_old + (1 - mu) W(s) / (2 N_g Npix(s))``; ``(G, S)``."""
    npix = half_plane_counts(box, stats.noise_power.device)
    new = stats.noise_power / (2.0 * stats.noise_weight[:, None].clamp_min(1) * npix.clamp_min(1)[None])
    new = new.to(previous.dtype)
    # values below 1e-14 copy the previous shell (RELION); shell 0 from shell 1
    for g in range(new.shape[0]):
        if stats.noise_weight[g] <= 0:
            new[g] = previous[g]
            continue
        for s in range(new.shape[1]):
            if new[g, s] < 1e-14:
                new[g, s] = new[g, s - 1] if s > 0 else new[g, 1]
    return mu * previous + (1 - mu) * new


def ssnr(weight: torch.Tensor, tau2: torch.Tensor, tau2_fudge: float, pad: int, current_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """data_vs_prior and Fourier completeness per class and shell (BackProjector::updateSSNRarrays).

    Parameters
    ----------
    weight
        ``(K,) + (P*D,) * ndim`` summed CTF^2/sigma2 weights.
    tau2
        ``(K, S)``.

    Returns
    -------
    data_vs_prior, completeness
        ``(K, S)`` each; shells beyond ``current_size // 2`` are 0.
    """
    ndim = ndim_of(weight)
    pd = weight.shape[-1]
    n_shells = tau2.shape[1]
    shells = padded_shells(pd, pad, weight.device, ndim)
    t2 = tau2.to(torch.float64)
    per_px = weight.to(torch.float64) * pad**ndim * tau2_fudge * t2[:, shells.clamp_max(n_shells - 1)]
    dvp = shell_mean(per_px, shells, n_shells)
    comp = shell_mean((per_px >= 1).to(torch.float64), shells, n_shells)
    beyond = torch.arange(n_shells, device=weight.device) > current_size // 2
    dvp[:, beyond] = 0
    comp[:, beyond] = 0
    return dvp, comp


def resolution_shell(data_vs_prior: torch.Tensor, min_shell: int = 5) -> torch.Tensor:
    """Per class, the last shell before data_vs_prior first drops below 1 (at least ``min_shell``)."""
    k, n = data_vs_prior.shape
    out = torch.full((k,), n - 1, dtype=torch.long)
    for c in range(k):
        below = torch.nonzero(data_vs_prior[c, 1:] < 1).squeeze(1)
        if len(below):
            out[c] = int(below[0])  # shell index (below[0] + 1) minus 1
    return out.clamp_min(min_shell)


def next_current_size(data_vs_prior: torch.Tensor, box: int, incr_size: int = 10, min_shell: int = 5) -> int:
    """RELION's window: ``min(D, 2 * (max over classes of the resolution shell + incr_size))``."""
    maxres = int(resolution_shell(data_vs_prior, min_shell).max())
    return int(min(box, 2 * (maxres + incr_size)))


def resolution_angstrom(shell: int | torch.Tensor, box: int, pixel_size_a: float) -> torch.Tensor:
    """``D * pixel / shell`` (999 for shell 0)."""
    s = torch.as_tensor(shell, dtype=torch.float64)
    return torch.where(s > 0, box * pixel_size_a / s.clamp_min(1), torch.full_like(s, 999.0))


def finish_references(ref_ft: torch.Tensor, box: int, pad: int, mask_radius_px: float | None, gridding: bool = True) -> torch.Tensor:
    """Padded transforms to real references: window to D, gridding correction, edge and solvent masks.

    The edge mask is RELION's soft mask at D/2 with a 3-pixel cosine edge (outside set to the
    edge mean); solvent flattening multiplies by the particle mask (radius, 5-pixel edge).

    Returns
    -------
    torch.Tensor
        ``(K, D, D)`` or ``(K, D, D, D)`` real.
    """
    ndim = ndim_of(ref_ft)
    refs = slices.unpad_reference_ft(ref_ft, box, ndim)
    if gridding:
        refs = refs / slices.gridding_correction(box, pad, ndim, refs.device, refs.dtype)
    refs = soft_edge(refs, box / 2 - 3, 3.0, fill_edge_mean=True)
    if mask_radius_px is not None:
        refs = soft_edge(refs, mask_radius_px, 5.0, fill_edge_mean=False)
    return refs


def soft_edge(refs: torch.Tensor, radius: float, edge: float, fill_edge_mean: bool) -> torch.Tensor:
    """Soft circular (spherical) mask of ``(K, D, D)`` images (``(K, D, D, D)`` maps), RELION's
    raised cosine; with ``fill_edge_mean`` the outside is set to the mean over the edge ring
    (RELION's edge mask) instead of 0."""
    box, ndim = refs.shape[-1], ndim_of(refs)
    r = radius_grid(box, ndim, device=refs.device, dtype=refs.dtype)
    m = raised_cosine(r, radius, edge)
    if not fill_edge_mean:
        return refs * m
    ring = (r >= radius) & (r <= radius + edge)
    fill = refs[:, ring].mean(-1) if ring.any() else torch.zeros(refs.shape[0], device=refs.device)
    return refs * m + fill.reshape(-1, *([1] * ndim)) * (1 - m)


def center_of_mass_shift(refs: torch.Tensor, max_shift_px: float) -> torch.Tensor:
    """Offset of each reference's centre of mass of positive pixels from the box centre; ``(K, 2)``
    (x, y), capped in length at ``max_shift_px``."""
    box = refs.shape[-1]
    pos = refs.clamp_min(0)
    c = torch.arange(box, device=refs.device, dtype=refs.dtype) - box // 2
    tot = pos.sum((-2, -1)).clamp_min(1e-12)
    cx = (pos * c[None, None, :]).sum((-2, -1)) / tot
    cy = (pos * c[None, :, None]).sum((-2, -1)) / tot
    com = torch.stack([cx, cy], -1)
    norm = com.norm(dim=-1, keepdim=True)
    return torch.where(norm > max_shift_px, com * (max_shift_px / norm.clamp_min(1e-12)), com)


def shift_real(refs: torch.Tensor, shift_px: torch.Tensor) -> torch.Tensor:
    """Shift real images ``(K, D, D)`` by ``(K, 2)`` (x, y) pixels (sub-pixel, Fourier phase ramp)."""
    box = refs.shape[-1]
    freqs, _ = rfft_frequencies(box, refs.device)
    ft = torch.fft.rfft2(refs).reshape(refs.shape[0], -1)
    ang = -2 * math.pi * (shift_px.to(freqs.dtype) @ freqs.T) / box
    ft = ft * torch.polar(torch.ones_like(ang), ang)
    return torch.fft.irfft2(ft.reshape(refs.shape[0], box, box // 2 + 1), s=(box, box))


def update_nuisance(state: ModelState, stats: SufficientStats, mu: float) -> dict:
    """sigma2, class priors and the offset prior as ``mu * old + (1 - mu) * new``."""
    box = state.box
    sigma2 = noise_from_stats(stats, box, state.sigma2, mu)
    cw = stats.class_weight.sum(0)
    pi_new = cw / cw.sum().clamp_min(1e-300)
    pi = mu * state.class_prior + (1 - mu) * pi_new.to(state.class_prior.dtype)
    pi = pi / pi.sum()
    if stats.offset_weight > 0:
        var_a2 = float(stats.offset_sq / (2 * stats.offset_weight)) * state.pixel_size_a**2
        sig_off = math.sqrt(mu * state.sigma_offset_a**2 + (1 - mu) * var_a2)
    else:
        sig_off = state.sigma_offset_a
    n = float(stats.n_particles)
    return dict(
        sigma2=sigma2,
        class_prior=pi,
        sigma_offset_a=max(sig_off, 1e-3),
        log_likelihood=float(stats.log_likelihood),
        average_pmax=float(stats.max_posterior) / max(n, 1.0),
    )


def em_update(
    state: ModelState,
    stats: SufficientStats,
    tau2_fudge: float,
    mask_radius_px: float | None,
    center: bool = False,
    max_center_px: float = 5.0,
    min_shell: int = 5,
) -> ModelState:
    """EM M-step (paper eq. 5; BackProjector::reconstruct with skip_gridding off).

    ``V_k = B_k / (F_k + 1 / (P^2 T tau2_k(s)))`` for shells >= ``min_shell`` (plain ``B/F``
    below), guarded by ``mean_shell(F') / 1000``; then noise, priors and offsets from the same
    statistics (mu = 0), class centring and the next resolution window.
    """
    box, pad = state.box, state.pad
    data = stats.data.sum(0)
    weight = stats.weight.sum(0).to(torch.float64)
    ndim = ndim_of(data)
    pd = data.shape[-1]
    shells = padded_shells(pd, pad, data.device, ndim)
    n_shells = box // 2 + 1
    tau2 = tau2_of(state.refs, pad).to(torch.float64)
    t2 = tau2[:, shells.clamp_max(n_shells - 1)]
    reg = torch.where(t2 > 0, 1.0 / (pad**ndim * tau2_fudge * t2.clamp_min(1e-300)), 1.0 / (0.001 * weight.clamp_min(1e-300)))
    reg = torch.where((shells >= min_shell)[None], reg, torch.zeros_like(reg))
    inside = shells <= state.current_size // 2
    denom = weight + reg
    guard = shell_mean(denom, shells, int(shells.max()) + 1)[:, shells] / 1000
    denom = torch.maximum(denom, guard)
    new_ft = torch.where(inside[None] & (denom > 0), data.to(torch.complex128) / denom.clamp_min(1e-300), torch.zeros_like(data, dtype=torch.complex128))
    refs = finish_references(new_ft.to(torch.complex64), box, pad, mask_radius_px)
    empty = stats.class_weight.sum(0) <= 0
    refs[empty] = 0
    nuis = update_nuisance(state, stats, mu=0.0)
    if center and ndim == 2:
        refs = shift_real(refs, -center_of_mass_shift(refs, max_center_px))
    tau2_new = tau2_of(refs, pad)
    dvp, comp = ssnr(stats.weight.sum(0), tau2_new, tau2_fudge, pad, state.current_size)
    return state.replace(
        refs=refs,
        tau2=tau2_new,
        data_vs_prior=dvp,
        completeness=comp,
        current_size=next_current_size(dvp, box, min_shell=min_shell),
        iteration=state.iteration + 1,
        **nuis,
    )
