"""3D auto-refinement (RELION's relion_refine --auto_refine --split_random_halves): the
gold-standard M-step on two independent half-sets, point-group symmetry imposed on the
back-projected sums, FSC-based regularisation, and the auto-sampling / convergence rules.

The E-step is the shared one (:func:`autospa.refinement.estep.expectation`) run once per
half-set with that half's map, so the halves never see each other's data; their statistics land
in ``stats.data[h]`` / ``stats.weight[h]`` and are reconstructed here separately.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from autospa.numerics import slices
from autospa.conventions import euler_to_matrix
from autospa.numerics.sampling import angular_sampling_deg
from autospa.numerics.symmetry import point_group_matrices
from autospa.refinement import mstep
from autospa.refinement.statistics import SufficientStats


@dataclass(frozen=True)
class HalfReconstruction:
    """The M-step of one gold-standard iteration.

    Attributes
    ----------
    halves
        ``(2, D, D, D)`` regularised half maps (gridding-corrected, edge- and solvent-masked).
    combined
        ``(D, D, D)`` map from both halves' sums (RELION's run_class001.mrc).
    unfiltered
        ``(2, D, D, D)`` unregularised half maps ``B_h / F_h`` (edge-masked, no solvent
        flattening): RELION's run_half?_class001_unfil.mrc, the input of post-processing.
    fsc
        ``(S,)`` FSC between the unregularised half reconstructions, per shell (S = D//2 + 1).
    ssnr
        ``(S,)`` ``FSC / (1 - FSC)`` used as data_vs_prior (``T`` included).
    resolution_shell
        Last shell with FSC >= 0.143 (at least 1).
    """

    halves: torch.Tensor
    combined: torch.Tensor
    unfiltered: torch.Tensor
    fsc: torch.Tensor
    ssnr: torch.Tensor
    resolution_shell: int


def symmetrise_stats(stats: SufficientStats, symmetry: str) -> SufficientStats:
    """Impose a point group on the back-projected data and weights (3D statistics)."""
    if symmetry.upper() == "C1":
        return stats
    ops = point_group_matrices(symmetry, device=stats.data.device)
    return replace(stats, data=slices.symmetrise_grid(stats.data, ops), weight=slices.symmetrise_grid(stats.weight, ops))


def grid_fsc(a: torch.Tensor, b: torch.Tensor, shells: torch.Tensor, n_shells: int) -> torch.Tensor:
    """FSC of two centred Fourier grids per shell: ``Re sum a conj b / sqrt(sum |a|^2 sum |b|^2)``; ``(S,)``."""
    sel = shells < n_shells
    s = shells[sel]
    num = torch.zeros(n_shells, dtype=torch.float64, device=a.device).index_add_(0, s, (a[sel] * b[sel].conj()).real.to(torch.float64))
    pa = torch.zeros(n_shells, dtype=torch.float64, device=a.device).index_add_(0, s, (a[sel].abs() ** 2).to(torch.float64))
    pb = torch.zeros(n_shells, dtype=torch.float64, device=a.device).index_add_(0, s, (b[sel].abs() ** 2).to(torch.float64))
    return torch.where((pa > 0) & (pb > 0), num / torch.sqrt(pa * pb).clamp_min(1e-300), torch.zeros_like(num))


def resolution_shell_of(fsc: torch.Tensor, threshold: float = 0.143) -> int:
    """Last shell before the FSC first drops below ``threshold`` (shell 0 ignored; at least 1)."""
    below = torch.nonzero(fsc[1:] < threshold).squeeze(1)
    last = int(below[0]) if len(below) else len(fsc) - 1  # shell below[0] + 1 is the first one below
    return max(1, last)


def reconstruct_halves(
    stats: SufficientStats,
    box: int,
    pad: int,
    current_size: int,
    tau2_fudge: float = 1.0,
    mask_radius_px: float | None = None,
    min_shell: int = 5,
) -> HalfReconstruction:
    """Gold-standard reconstruction (BackProjector::reconstruct with update_tau2_with_fsc).

    The FSC between the unregularised half reconstructions ``B_h / F_h`` gives the SSNR per shell,
    ``T * FSC / (1 - FSC)``; each half is then ``V_h = B_h / (F_h + <F>_s / SSNR_s)`` inside the
    current window (plain ``B / F`` below ``min_shell``), and the combined map uses the summed
    sums with the doubled SSNR of the whole data set.

    Parameters
    ----------
    stats
        Statistics with ``data``/``weight`` ``(2, 1, PD, PD, PD)`` (symmetry already imposed).
    box, pad
        D and P.
    current_size
        Window (pixels of the D grid) of the iteration.
    tau2_fudge
        T.
    mask_radius_px
        Solvent-flattening radius (None: edge mask only).
    min_shell
        Shells below are not regularised (RELION's minres_map).
    """
    data = stats.data[:, 0].to(torch.complex128)  # (2, PD^3)
    weight = stats.weight[:, 0].to(torch.float64)
    pd = data.shape[-1]
    shells = mstep.padded_shells(pd, pad, data.device, 3)
    n_shells = box // 2 + 1
    inside = shells <= current_size // 2
    eps = 1e-6 * float(weight.amax().clamp_min(1e-30))
    raw = torch.where(inside & (weight > eps), data / weight.clamp_min(eps), torch.zeros_like(data))
    fsc = grid_fsc(raw[0], raw[1], shells, n_shells)
    fsc[0] = 1.0
    fsc_c = fsc.clamp(0.001, 0.999)
    ssnr = tau2_fudge * fsc_c / (1 - fsc_c)
    beyond = torch.arange(n_shells, device=data.device) > current_size // 2
    ssnr = torch.where(beyond, torch.zeros_like(ssnr), ssnr)

    def _solve(b: torch.Tensor, f: torch.Tensor, snr: torch.Tensor) -> torch.Tensor:
        mean_f = mstep.shell_mean(f[None], shells, int(shells.max()) + 1)[0][shells]
        snr_px = snr[shells.clamp_max(n_shells - 1)]
        reg = torch.where(snr_px > 0, mean_f / snr_px.clamp_min(1e-12), torch.zeros_like(mean_f))
        reg = torch.where(shells >= min_shell, reg, torch.zeros_like(reg))
        denom = torch.maximum(f + reg, mean_f / 1000)
        return torch.where(inside & (denom > 0), b / denom.clamp_min(1e-300), torch.zeros_like(b))

    halves = torch.stack([_solve(data[h], weight[h], ssnr) for h in range(2)])
    combined = _solve(data.sum(0), weight.sum(0), 2 * ssnr)
    maps = mstep.finish_references(torch.cat([halves, combined[None]]).to(torch.complex64), box, pad, mask_radius_px)
    unfil = mstep.finish_references(torch.stack([_solve(data[h], weight[h], torch.zeros_like(ssnr)) for h in range(2)])
                                    .to(torch.complex64), box, pad, None)
    return HalfReconstruction(maps[:2], maps[2], unfil, fsc, ssnr, resolution_shell_of(fsc))


@dataclass(frozen=True)
class AutoSampling:
    """State of RELION's auto-sampling and convergence check (MlOptimiser::updateAngularSampling,
    checkConvergence).

    Attributes
    ----------
    healpix_order
        Coarse HEALPix order of the next E-step (the fine pass uses order + 1).
    offset_range_px, offset_step_px
        Coarse translational search of the next E-step (the fine pass halves the step).
    best_shell
        Best resolution shell so far.
    iter_without_gain
        Iterations since the resolution last improved.
    iter_small_changes
        Iterations whose mean orientation change was small: below half the coarse step, or no
        smaller than the smallest change seen at this sampling (RELION: the changes stopped
        decreasing).
    smallest_change_deg
        Smallest mean orientation change at the current sampling.
    converged
        Sampling is at its finest and neither resolution nor poses change.
    """

    healpix_order: int
    offset_range_px: float
    offset_step_px: float
    best_shell: int = 0
    iter_without_gain: int = 0
    iter_small_changes: int = 0
    converged: bool = False
    smallest_change_deg: float = 1e30

    @property
    def angular_step_deg(self) -> float:
        return angular_sampling_deg(self.healpix_order)


def update_sampling(auto: AutoSampling, resolution_shell: int, mean_angle_change_deg: float, max_order: int) -> AutoSampling:
    """One step of the auto-sampling rules.

    The resolution gains when the 0.143 shell moves out; changes are small when the particles'
    mean orientation change is below half the coarse step or has stopped decreasing. After an iteration with neither, the
    sampling gets finer (HEALPix order + 1, translational step halved down to 0.5 px, range
    shrunk to at least 3 steps); when it cannot (``max_order``), the refinement has converged.
    """
    gain = resolution_shell > auto.best_shell
    best = max(auto.best_shell, resolution_shell)
    wo_gain = 0 if gain else auto.iter_without_gain + 1
    small_now = (mean_angle_change_deg < 0.5 * auto.angular_step_deg
                 or mean_angle_change_deg >= 0.98 * auto.smallest_change_deg)
    small = auto.iter_small_changes + 1 if small_now else 0
    smallest = min(auto.smallest_change_deg, mean_angle_change_deg)
    if wo_gain >= 1 and small >= 1:
        if auto.healpix_order < max_order:
            step = max(0.5, auto.offset_step_px / 2)
            rng = max(3 * step, auto.offset_range_px * 0.6)
            return AutoSampling(auto.healpix_order + 1, rng, step, best, 0, 0, False)
        return AutoSampling(auto.healpix_order, auto.offset_range_px, auto.offset_step_px, best, wo_gain, small, True,
                            smallest)
    return AutoSampling(auto.healpix_order, auto.offset_range_px, auto.offset_step_px, best, wo_gain, small, False,
                        smallest)


def next_window(resolution_shell: int, box: int, incr_size: int = 10) -> int:
    """RELION's window after a gold-standard iteration: ``min(D, 2 (shell + incr_size))``, even."""
    return int(min(box, 2 * (resolution_shell + incr_size)))


def window_for_resolution(resolution_a: float, box: int, pixel_size_a: float) -> int:
    """Even window (pixels) holding the shells up to ``resolution_a`` (``--ini_high``), at least 10."""
    shell = int(math.floor(box * pixel_size_a / max(resolution_a, 2 * pixel_size_a)))
    return int(min(box, max(10, 2 * shell)))


def angle_change_deg(rot_a, tilt_a, psi_a, rot_b, tilt_b, psi_b) -> torch.Tensor:
    """Rotation angle (degrees) between two sets of RELION Euler angles, per particle."""
    a = euler_to_matrix(torch.as_tensor(rot_a, dtype=torch.float64), torch.as_tensor(tilt_a, dtype=torch.float64),
                        torch.as_tensor(psi_a, dtype=torch.float64))
    b = euler_to_matrix(torch.as_tensor(rot_b, dtype=torch.float64), torch.as_tensor(tilt_b, dtype=torch.float64),
                        torch.as_tensor(psi_b, dtype=torch.float64))
    c = ((torch.einsum("...ij,...ij->...", a, b) - 1) / 2).clamp(-1, 1)
    return torch.rad2deg(torch.acos(c))


__all__ = ["AutoSampling", "HalfReconstruction", "angle_change_deg", "grid_fsc", "next_window",
           "reconstruct_halves", "resolution_shell_of", "symmetrise_stats", "update_sampling", "window_for_resolution"]
