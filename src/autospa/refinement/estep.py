"""The E-step shared by EM and VDAM, 2D (in-plane rotations) and 3D (central slices) — DESIGN.md
section 2.

For a batch of particles and K references it scores every (class, orientation, translation)
hypothesis as batched matrix products (an orientation is a psi for 2D references, a HEALPix
direction and psi for 3D maps), keeps the hypotheses holding the top ``adaptive_fraction`` of each
particle's probability mass (coarse pass), re-scores their children on a grid twice as fine in
orientation and translation (fine pass, oversampling 1: 2 psi in 2D, 4 directions x 2 psi in 3D), and returns additive sufficient statistics
(:class:`~autospa.refinement.statistics.SufficientStats`) plus each particle's best pose.

Likelihood (RELION, reference/relion-vdam.md section 2.3): for the half-plane Fourier pixels
``f`` inside the current window (DC and the duplicated ``kx = 0, ky < 0`` half column excluded)

    d2(i, k, psi, t) = sum_f |X_i(f) e^{-2 pi i f.t / D} - C_i(f) V_k(A(psi)^T f)|^2 / (2 sigma2_g(s(f)))

which expands to ``(|X|^2 - 2 Re<P_t, A> + <C^2, |A|^2>) / 2`` with ``P_t = C X e^{..} / sigma2``:
the cross term is one real GEMM ``(N*T, 2F) x (2F, K*R)`` and the norm term one GEMM
``(N, F) x (F, K*R)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from autospa.conventions import euler_to_matrix, matrix_to_euler, psi_to_matrix_2d
from autospa.numerics import slices
from autospa.numerics.sampling import (
    angular_sampling_deg,
    healpix_max_pixrad,
    oversampled_orientations_3d,
    perturb_orientations_3d,
    psi_grid,
    psi_step,
    remove_symmetry_equivalent_directions,
    healpix_directions,
    translation_grid,
)
from autospa.numerics.symmetry import point_group_matrices
from autospa.refinement.statistics import SufficientStats


@dataclass(frozen=True)
class Sampling:
    """Sampling of one E-step.

    Attributes
    ----------
    psi_step_deg
        Coarse in-plane step of 2D references; the fine pass uses half of it (oversampling 1).
        3D references use the HEALPix order's step (``360 / (6 * 2^order)``) instead.
    offset_range_px, offset_step_px
        Translation search around each particle's rounded previous origin; the fine pass uses
        half the step.
    perturb
        Random fraction of a coarse step added to every psi this iteration, in [-0.5, 0.5].
    adaptive_fraction
        Probability mass kept by the significance pruning (RELION 0.999).
    max_significants
        Cap on the number of significant coarse hypotheses per particle (0 = none).
    healpix_order
        Coarse HEALPix order of 3D references (the fine pass uses order + 1); None for 2D.
    symmetry
        Point group of 3D references: symmetry-equivalent directions are left out of the grid.
    local_sigma_deg
        0: global searches. > 0 (3D only): local searches (RELION's orientation priors): every
        particle's orientations within ``3 * local_sigma_deg`` of its previous one, on a lattice
        of the fine step (order + 1), weighted by a Gaussian prior of this width; translations
        around the previous origin at the fine step within ``offset_range_px``. One pass, no
        coarse pruning: the work per particle is fixed by the width, not by the order.
    """

    psi_step_deg: float = 6.0
    offset_range_px: float = 5.0
    offset_step_px: float = 1.0
    perturb: float = 0.0
    adaptive_fraction: float = 0.999
    max_significants: int = 0
    healpix_order: int | None = None
    symmetry: str = "C1"
    local_sigma_deg: float = 0.0


@dataclass
class EStepModel:
    """What the E-step needs of the model (broadcast to every task).

    Attributes
    ----------
    ref_ft
        ``(K, P*D, P*D)`` (2D) or ``(K, P*D, P*D, P*D)`` (3D) complex padded references
        (gridding pre-corrected, :func:`autospa.numerics.slices.pad_reference_ft`).
    sigma2
        ``(G, S)`` noise variance per component, per optics group and shell (S = D//2 + 1).
    log_class_prior
        ``(K,)`` log pi_k (``-inf`` for empty classes).
    sigma_offset_px
        Standard deviation of the Gaussian prior on the total offset, pixels.
    current_size, coarse_size
        Even Fourier window sizes (pixels of the D grid) of the fine and coarse passes.
    pad
        Padding factor P.
    """

    ref_ft: torch.Tensor
    sigma2: torch.Tensor
    log_class_prior: torch.Tensor
    sigma_offset_px: float
    current_size: int
    coarse_size: int
    pad: int = 2

    @property
    def ndim(self) -> int:
        """2 for images, 3 for maps."""
        return self.ref_ft.dim() - 1

    def to(self, device) -> "EStepModel":
        return EStepModel(self.ref_ft.to(device), self.sigma2.to(device), self.log_class_prior.to(device),
                          self.sigma_offset_px, self.current_size, self.coarse_size, self.pad)


@dataclass
class ParticleBatch:
    """Particles of one task.

    Attributes
    ----------
    images
        ``(N, D, D)`` float32, normalised, protein white (RELION's extracted particles).
    ctf
        ``(N, D, D//2+1)`` CTF on the rfft grid (ones without --ctf).
    origin_px
        ``(N, 2)`` previous origins (x, y) in pixels, RELION's sign.
    group
        ``(N,)`` long optics-group index (0-based, into ``EStepModel.sigma2``).
    half
        ``(N,)`` long half-set (0 or 1).
    angles_deg
        ``(N, 3)`` previous (rot, tilt, psi) in degrees: the centres of local searches (None
        for global searches).
    """

    images: torch.Tensor
    ctf: torch.Tensor
    origin_px: torch.Tensor
    group: torch.Tensor
    half: torch.Tensor
    angles_deg: torch.Tensor | None = None

    def subset(self, sl: slice) -> "ParticleBatch":
        return ParticleBatch(self.images[sl], self.ctf[sl], self.origin_px[sl], self.group[sl], self.half[sl],
                             None if self.angles_deg is None else self.angles_deg[sl])


@dataclass
class ParticleResult:
    """Per-particle outputs of the E-step (all ``(N,)`` or ``(N, 2)``); rot and tilt are 0 for
    2D references."""

    class_index: torch.Tensor
    psi_deg: torch.Tensor
    rot_deg: torch.Tensor
    tilt_deg: torch.Tensor
    origin_px: torch.Tensor
    max_posterior: torch.Tensor
    n_significant: torch.Tensor
    log_likelihood: torch.Tensor


# --------------------------------------------------------------------------------------------
# grids


def rfft_frequencies(box: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Frequencies ``(kx, ky)`` (cycles per box) and shell index of every rfft pixel.

    Returns
    -------
    freqs
        ``(D * (D//2+1), 2)`` float32 in row-major rfft order.
    shells
        ``(D * (D//2+1),)`` long ``round(|f|)``.
    """
    ky = torch.fft.fftfreq(box, d=1.0 / box, device=device)
    kx = torch.arange(box // 2 + 1, device=device, dtype=torch.float32)
    gy, gx = torch.meshgrid(ky, kx, indexing="ij")
    freqs = torch.stack([gx, gy], -1).reshape(-1, 2)
    shells = torch.round(freqs.norm(dim=-1)).long()
    return freqs, shells


def window_indices(box: int, size: int, device=None, include_dc: bool = False) -> torch.Tensor:
    """Flat rfft indices of the half-plane pixels with ``round(|f|) <= size // 2``.

    The DC pixel is left out unless ``include_dc``; the ``kx = 0, ky < 0`` half column (the
    complex conjugates of ``kx = 0, ky > 0``) is always left out.
    """
    freqs, shells = rfft_frequencies(box, device)
    keep = shells <= size // 2
    keep &= ~((freqs[:, 0] == 0) & (freqs[:, 1] < 0))
    if not include_dc:
        keep &= shells > 0
    return torch.nonzero(keep).squeeze(1)


# --------------------------------------------------------------------------------------------
# image preparation


def integer_shift(images: torch.Tensor, shift_px: torch.Tensor) -> torch.Tensor:
    """Move each image's content by an integer ``(dx, dy)``; pixels shifted in are 0 (no wrap).

    Parameters
    ----------
    images
        ``(N, H, W)``.
    shift_px
        ``(N, 2)`` integer-valued shifts (x, y).
    """
    n, h, w = images.shape
    dx = shift_px[:, 0].round().long()
    dy = shift_px[:, 1].round().long()
    ys = torch.arange(h, device=images.device)[None, :] - dy[:, None]  # source rows (N, H)
    xs = torch.arange(w, device=images.device)[None, :] - dx[:, None]
    valid = ((ys >= 0) & (ys < h))[:, :, None] & ((xs >= 0) & (xs < w))[:, None, :]
    # rows, then columns, by gathers along one dimension (a 3-index gather is 2x slower on the CPU)
    rows = images.gather(1, ys.clamp(0, h - 1)[:, :, None].expand(n, h, w))
    return rows.gather(2, xs.clamp(0, w - 1)[:, None, :].expand(n, h, w)) * valid


def centered_rfft2(images: torch.Tensor) -> torch.Tensor:
    """``rfft2(norm="forward")`` with the phase origin at the box centre ``(D//2, D//2)``.

    References (:func:`autospa.numerics.slices.pad_reference_ft`) are transformed about the box
    centre, where RELION puts the particle; images must be too, or every frequency of odd
    ``kx + ky`` would carry a spurious sign.

    Parameters
    ----------
    images
        ``(N, D, D)`` real.

    Returns
    -------
    torch.Tensor
        ``(N, D, D//2+1)`` complex.
    """
    return torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1)), norm="forward")


def soft_mask_background(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RELION's --zero_mask: keep the inside of ``mask``, set the outside to the background mean.

    Parameters
    ----------
    images
        ``(N, D, D)``.
    mask
        ``(D, D)`` soft mask in [0, 1].
    """
    outside = 1.0 - mask
    bg = (images * outside).sum((-2, -1)) / outside.sum().clamp_min(1e-6)
    return images * mask + bg[:, None, None] * outside


# --------------------------------------------------------------------------------------------
# the E-step


def _phases(freqs: torch.Tensor, shifts: torch.Tensor, box: int) -> torch.Tensor:
    """``exp(-2 pi i f.t / D)``: ``(T, F)`` complex for freqs ``(F, 2)`` and shifts ``(T, 2)``."""
    ang = -2.0 * math.pi * (shifts @ freqs.T) / box
    return torch.polar(torch.ones_like(ang), ang)


#: Log-weights (relative to their maximum) are clamped here before ``exp``: below it float32
#: results are denormal or 0 and the CPU's exp takes a slow path (5 to 13 times slower); a
#: weight of ``e^-87`` (about 1.6e-38) instead of less changes no sum, threshold or posterior.
EXP_FLOOR = -87.0


def row_threshold(weights: torch.Tensor, fraction: float, cap: int = 0) -> torch.Tensor:
    """Per-row weight threshold holding ``fraction`` of the row's mass (RELION's significance rule).

    Each row's weights are sorted in descending order and summed until the cumulative sum reaches
    ``fraction`` of the row total; the threshold is the weight reached. With ``cap > 0`` the
    threshold is at least the ``cap``-th largest weight (RELION's --maxsig).

    Parameters
    ----------
    weights
        ``(N, M)`` non-negative.

    Returns
    -------
    torch.Tensor
        ``(N,)`` thresholds: ``weights >= threshold[:, None]`` selects the significant entries.
    """
    total = weights.sum(1, keepdim=True, dtype=torch.float64)
    m = weights.shape[1]
    if 0 < cap < m:
        return _walk(torch.topk(weights, cap, dim=1, sorted=True).values, total, fraction)  # the walk stops at the cap
    if m <= ROW_THRESHOLD_TOPK:
        return _walk(torch.sort(weights, dim=1, descending=True)[0], total, fraction)
    # the largest few usually hold the fraction (sharp posteriors): a full sort only for the
    # rows where they do not; the result is the full sort's either way
    srt = torch.topk(weights, ROW_THRESHOLD_TOPK, dim=1, sorted=True).values
    thr = _walk(srt, total, fraction)
    short = torch.nonzero(srt.sum(1, dtype=torch.float64) < fraction * total[:, 0] * (1 - 1e-12)).squeeze(1)
    if len(short):
        thr[short] = _walk(torch.sort(weights[short], dim=1, descending=True)[0], total[short], fraction)
    return thr


#: Largest weights per row that :func:`row_threshold` looks at before it sorts a whole row.
ROW_THRESHOLD_TOPK = 256


def log_row_threshold(logw: torch.Tensor, fraction: float, cap: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`row_threshold` on log-weights, mostly without exponentiating the rows.

    The significant entries of a row are those whose weight ``exp(logw - max)`` is at least the
    threshold reached by :func:`row_threshold`; here the threshold is returned as a log-weight,
    so that ``logw >= threshold[:, None]`` selects them. The largest ``k`` log-weights (``k =
    cap``, else :data:`ROW_THRESHOLD_TOPK`) and a bound on the mass of the rest (``(M - k)`` times
    the ``k``-th weight) decide most rows (sharp posteriors: the rest is negligible); then bounds
    from the count of entries within 1 of the ``k``-th; the row's total is summed only for the
    rows these bounds leave undecided, and a full sort done only for
    rows whose ``k`` largest do not hold ``fraction`` (as :func:`row_threshold`, without a cap).
    Entries more than 100 below the row's maximum (weights below ``e^-100``) are never significant.

    Parameters
    ----------
    logw
        ``(N, M)`` log-weights (``-inf`` allowed, at least one finite per row).

    Returns
    -------
    threshold, row_max
        ``(N,)`` log-weight thresholds and ``(N,)`` row maxima.
    """
    capped, k = _top_size(logw.shape[1], cap)
    vals = torch.topk(logw, k, dim=1, sorted=True).values  # (N, k) descending
    return _threshold_of_top(logw, vals, fraction, capped), vals[:, 0]


def _top_size(m: int, cap: int) -> tuple[bool, int]:
    """Whether a cap applies to rows of ``m`` entries, and the number ``k`` of largest entries the
    top-k rule looks at (the cap, else :data:`ROW_THRESHOLD_TOPK`)."""
    capped = 0 < cap < m
    return capped, cap if capped else min(m, ROW_THRESHOLD_TOPK)


def _threshold_of_top(logw: torch.Tensor, vals: torch.Tensor, fraction: float, capped: bool) -> torch.Tensor:
    """:func:`log_row_threshold`'s thresholds ``(N,)`` from the rows ``logw (N, M)`` and their ``k``
    largest values ``vals (N, k)`` in descending order (``k`` the cap when ``capped``)."""
    n, m = logw.shape
    k = vals.shape[1]
    mx = vals[:, 0]
    e = torch.exp((vals - mx[:, None]).to(torch.float64))
    csum = torch.cumsum(e, 1)
    lower = csum[:, -1]
    upper = lower + (m - k) * e[:, -1]  # bound of the mass outside the k largest
    last = k - 1 if capped else k  # with a cap the walk stops at the k-th; without, k means "sort"
    j = _reach(csum, lower, fraction).clamp_max(last)
    open_rows = torch.nonzero(_reach(csum, upper, fraction).clamp_max(last) != j).squeeze(1)
    if len(open_rows):  # tighter bounds from the count of entries within 1 of the k-th
        sub = logw if len(open_rows) == n else _take_rows(logw, open_rows)
        c_o, e_k = csum[open_rows], e[open_rows, -1]
        n_mid = ((sub >= (vals[open_rows, -1] - 1.0)[:, None]).sum(1, dtype=torch.int32) - k).to(torch.float64)
        lo = c_o[:, -1] + n_mid * e_k * math.exp(-1.0)
        hi = c_o[:, -1] + n_mid * e_k + (m - k - n_mid) * e_k * math.exp(-1.0)
        j_lo = _reach(c_o, lo, fraction).clamp_max(last)
        done = j_lo == _reach(c_o, hi, fraction).clamp_max(last)
        j[open_rows[done]] = j_lo[done]
        sub, open_rows = sub[~done], open_rows[~done]
    if len(open_rows):  # the bounds do not decide: the rows' exact mass
        exact = sum64(torch.exp((sub - mx[open_rows, None]).clamp_min(EXP_FLOOR)), 1)
        j[open_rows] = _reach(csum[open_rows], exact, fraction).clamp_max(last)
    thr = vals.gather(1, j.clamp_max(k - 1)[:, None]).squeeze(1)
    short = torch.nonzero(j >= k).squeeze(1)  # (no cap) the k largest do not hold the fraction
    if len(short):
        thr[short] = _sorted_threshold(logw if len(short) == n else _take_rows(logw, short), mx[short], fraction)
    return torch.maximum(thr, mx - 100.0)


def _sorted_threshold(rows: torch.Tensor, mx: torch.Tensor, fraction: float) -> torch.Tensor:
    """The full sort's threshold of rows ``(S, M)`` (row maxima ``mx (S,)``), sorting only the
    entries that can be reached: with the row's exact mass ``total`` (weights relative to the
    maximum), the entries more than ``depth = log(M / ((1 - fraction) total)) + 1`` below the
    maximum weigh less than ``(1 - fraction) total`` together, so the cumulative sum reaches the
    fraction above them; the sorted entries above, and so the threshold, are those of the full sort.
    Broad rows (a large mass) thus sort few entries."""
    m = rows.shape[1]
    total = sum64(torch.exp((rows - mx[:, None]).clamp_min(EXP_FLOOR)), 1)  # as the exact mass above
    if fraction < 1.0:
        depth = torch.log(m / ((1.0 - fraction) * total)) + 1.0
    else:
        depth = torch.full_like(total, math.inf)
    keep = rows >= (mx - depth.to(rows.dtype))[:, None]
    few = keep.sum(1, dtype=torch.int32) <= m // 4  # the others: a full sort (compacting would not pay)
    thr = torch.empty_like(mx)
    sub = torch.nonzero(few).squeeze(1)
    off = torch.nonzero(~few).squeeze(1)
    if len(sub):
        pad, cnt = _compact_rows(rows[sub], keep[sub])
        srt = torch.sort(pad, dim=1, descending=True).values
        csum = torch.cumsum(torch.exp((srt - mx[sub, None]).to(torch.float64)), 1)
        j = _reach(csum, total[sub], fraction)
        thr[sub] = srt.gather(1, j.clamp_max(srt.shape[1] - 1)[:, None]).squeeze(1)
        off = torch.cat([off, sub[j >= cnt]])  # not expected (the bound has a margin of e)
    if len(off):
        full = torch.sort(rows[off], dim=1, descending=True).values
        c_full = torch.cumsum(torch.exp((full - mx[off, None]).to(torch.float64)), 1)
        thr[off] = full.gather(1, _reach(c_full, c_full[:, -1], fraction).clamp_max(m - 1)[:, None]).squeeze(1)
    return thr


def _compact_rows(values: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept entries of each row of ``values (N, M)`` packed to the left of an ``(N, W)`` block
    padded with ``-inf`` (``W`` the largest count, at least 1), and the counts ``(N,)``."""
    n = values.shape[0]
    c_r, c_c = torch.nonzero(keep, as_tuple=True)
    cnt = torch.bincount(c_r, minlength=n)
    width = max(1, int(cnt.max())) if n else 1
    start = torch.cumsum(cnt, 0) - cnt
    pad = torch.full((n, width), -torch.inf, dtype=values.dtype, device=values.device)
    pad[c_r, torch.arange(len(c_r), device=values.device) - start[c_r]] = values[c_r, c_c]
    return pad, cnt


#: Length of the float32 partial sums :func:`sum64` adds in float64.
SUM64_BLOCK = 1024


def sum64(x: torch.Tensor, dim: int | tuple[int, ...]) -> torch.Tensor:
    """``x.sum(dim, dtype=torch.float64)`` for float32 ``x`` on the CPU at float32 speed.

    The CPU's float32-to-float64 reductions are not vectorised (about 40 times slower than float32
    sums); here trailing dimensions are summed in float32 blocks of at most :data:`SUM64_BLOCK`
    contiguous entries (torch's cascade sums: relative error about 1e-7 per block, the rounding
    of the float32 entries themselves) and the blocks' sums in float64. Other dtypes, devices and
    non-trailing dimensions take the plain float64 sum.

    Parameters
    ----------
    x
        ``(..., *reduced)`` tensor.
    dim
        The dimensions to sum over.

    Returns
    -------
    torch.Tensor
        float64, ``x``'s shape without ``dim``.
    """
    dims = sorted(d % x.ndim for d in ((dim,) if isinstance(dim, int) else dim))
    lead = x.ndim - len(dims)
    if x.dtype != torch.float32 or x.device.type != "cpu" or dims != list(range(lead, x.ndim)):
        return x.sum(dim, dtype=torch.float64)
    flat = x.flatten(lead) if len(dims) > 1 else x  # (..., L)
    length = flat.shape[-1]
    if length <= SUM64_BLOCK:
        return flat.sum(-1).to(torch.float64)
    nb = length // SUM64_BLOCK
    parts = flat[..., : nb * SUM64_BLOCK].unflatten(-1, (nb, SUM64_BLOCK)).sum(-1)  # (..., nb) float32
    if length > nb * SUM64_BLOCK:
        parts = torch.cat([parts, flat[..., nb * SUM64_BLOCK:].sum(-1, keepdim=True)], -1)
    return parts.to(torch.float64).sum(-1)


def significant_entries(logw: torch.Tensor, fraction: float, cap: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The entries ``logw >= log_row_threshold(logw, fraction, cap)[0][:, None]`` as index lists,
    from one top-k of each row and without a dense mask.

    Each row's ``k + 1`` largest entries (``k = cap``, else :data:`ROW_THRESHOLD_TOPK`) give the
    threshold by :func:`log_row_threshold`'s rule (a further pass over a row only where its bounds
    leave the row undecided, or, without a cap, where the ``k`` largest do not hold the fraction),
    and the selection: it lies within the ``k`` largest unless the ``(k + 1)``-th reaches the
    threshold (ties past the ``k``-th, or uncapped broad rows), in which case the row is scanned.
    A top-k costs about what one comparison pass over the rows and its mask cost on the CPU
    (bool outputs and ``nonzero`` are not vectorised), so nothing else touches every entry.

    Parameters
    ----------
    logw
        ``(N, M)`` log-weights (``-inf`` allowed, at least one finite per row).

    Returns
    -------
    rows, cols
        ``(S,)`` each: the significant entries, sorted by row and then column.
    """
    m = logw.shape[1]
    capped, k = _top_size(m, cap)
    top_v, top_i = torch.topk(logw, min(m, k + 1), dim=1, sorted=True)
    thr = _threshold_of_top(logw, top_v[:, :k], fraction, capped)
    # the selection is within the k largest unless the (k+1)-th reaches the threshold
    inside = top_v[:, -1] < thr if top_v.shape[1] > k else torch.ones_like(thr, dtype=torch.bool)
    rows, j = torch.nonzero((top_v[:, :k] >= thr[:, None]) & inside[:, None], as_tuple=True)
    cols = top_i[rows, j]
    out = torch.nonzero(~inside).squeeze(1)
    if len(out):
        o_r, o_c = torch.nonzero(_take_rows(logw, out) >= thr[out, None], as_tuple=True)
        rows, cols = torch.cat([rows, out[o_r]]), torch.cat([cols, o_c])
    order = torch.argsort(rows * m + cols)
    return rows[order], cols[order]


def _reach(csum: torch.Tensor, total: torch.Tensor, fraction: float) -> torch.Tensor:
    """Index of the first entry of each row of cumulative sums ``csum`` (N, k) that reaches
    ``fraction`` of the row's ``total`` (N,); ``k`` where none does."""
    return (csum < fraction * total[:, None] * (1 - 1e-12)).sum(1)


def _walk(srt: torch.Tensor, total: torch.Tensor, fraction: float) -> torch.Tensor:
    """Threshold of each row of descending weights ``srt`` (N, k) reaching ``fraction`` of
    ``total`` (N, 1), or the last of the ``k`` when they do not reach it."""
    first = _reach(torch.cumsum(srt.to(torch.float64), 1), total[:, 0], fraction).clamp_max(srt.shape[1] - 1)
    return srt.gather(1, first[:, None]).squeeze(1)


def expectation(
    batch: ParticleBatch,
    model: EStepModel,
    sampling: Sampling,
    mask: torch.Tensor | None,
    chunk_particles: int | None = None,
) -> tuple[SufficientStats, ParticleResult]:
    """Run the E-step on a batch of particles.

    Parameters
    ----------
    batch
        The particles (``N`` images of box ``D``).
    model
        References (2D images or 3D maps), noise and priors (on any device: moved to the images'
        device).
    sampling
        Grids and pruning.
    mask
        ``(D, D)`` soft particle mask for the likelihood image (None: no masking).
    chunk_particles
        Particles scored together (memory bound); chosen from K, R, T when None.

    Returns
    -------
    stats
        Additive sums (half-sets, classes) on the images' device.
    result
        Per-particle best class, orientation, origin, max posterior, number of significant
        samples and log-likelihood.
    """
    device = batch.images.device
    n, box, _ = batch.images.shape
    k = model.ref_ft.shape[0]
    n_groups, n_shells = model.sigma2.shape
    pd = model.ref_ft.shape[-1]
    stats = SufficientStats.zeros(2, k, pd, device=device, n_groups=n_groups, n_shells=n_shells, ndim=model.ndim)
    if sampling.local_sigma_deg > 0:
        return _expectation_local(batch, model.to(device), sampling, mask, stats, chunk_particles)

    model, prep = _prepared(model, sampling, box, device)
    t_c, r_c = len(prep.trans_c), prep.n_coarse
    if chunk_particles is None:
        # floats of the largest blocks per particle: coarse (T, K*R) scores; fine (rows, cols)
        # scores and (rows, 2F) phased images, rows = 4 x the translations holding significant
        # hypotheses and cols = C x the significant (class, orientation) pairs
        # (the fine pass splits a chunk further into groups that fit, _expectation_chunk)
        cap = sampling.max_significants
        rows = 4 * (min(t_c, cap) if cap > 0 else t_c)
        per_particle = t_c * k * r_c * 3 + rows * 2 * len(prep.idx_m)
        chunk_particles = max(1, min(n, global_chunk_budget(device) // max(1, per_particle)))
    n_cols = k * r_c * prep.n_children
    # per-column sums of the whole call, back-projected once at the end when they fit (also for
    # one chunk: its fine pass may run in several groups, which share most of their columns; a
    # back-projection per group cost 8x the stencils in a 3D global search of 400 particles)
    acc = None
    if n_cols * len(prep.idx_m) <= ACCUMULATE_MAX:
        acc = _ColumnSums(n_cols, len(prep.idx_m), device)
    streams = CUDA_STREAMS if device.type == "cuda" else 1
    results = _concurrent_chunks(batch, model, sampling, mask, prep, stats, acc, chunk_particles, streams)
    if acc is not None:
        acc.flush()
        used = torch.nonzero((acc.weight != 0).any(-1).any(0)).squeeze(1)
        if _shared_backprojection(model, prep, len(used), used.device):  # all columns (no gather)
            used = torch.arange(n_cols, device=used.device)
            sums = [acc.data[0], acc.data[1], acc.weight[0], acc.weight[1]]
        else:
            sums = [acc.data[0, used], acc.data[1, used], acc.weight[0, used], acc.weight[1, used]]
        grids = _backproject_columns(sums, used, model, prep, box)
        for h in range(2):
            stats.data[h] += grids[h].to(stats.data.dtype)
            stats.weight[h] += grids[2 + h].to(stats.weight.dtype)
    res = ParticleResult(*[torch.cat([getattr(r, f) for r in results]) for f in ParticleResult.__dataclass_fields__])
    return stats, res


class _ColumnSums:
    """Per fine column sums of one E-step call on the statistics window, back-projected once
    at the end: posterior-weighted data ``data (2, L, Fm)`` (added by the fine passes in place)
    and weights ``weight (2, L, Fm)``, the latter as GEMMs of the posteriors per particle and
    column with the particles' CTF^2/sigma2 over many particles at once (:meth:`add_weights`
    keeps them until :data:`COLUMN_SUMS_PENDING` values wait)."""

    def __init__(self, n_cols: int, fm: int, device):
        self.data = torch.zeros(2, n_cols, fm, dtype=torch.complex64, device=device)
        self.weight = torch.zeros(2, n_cols, fm, dtype=torch.float32, device=device)
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._size = 0

    def add_weights(self, g_part: torch.Tensor, cols: torch.Tensor, c2: torch.Tensor, half: torch.Tensor) -> None:
        """``g_part (N, L)`` posteriors of the columns ``cols (L,)``; ``c2 (N, Fm)``; ``half (N,)``."""
        self._pending.append((g_part, cols, c2, half))
        self._size += g_part.shape[0] * self.weight.shape[1]
        if self._size > COLUMN_SUMS_PENDING:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        n_cols = self.weight.shape[1]
        g = torch.cat([torch.zeros(gp.shape[0], n_cols, dtype=gp.dtype, device=gp.device).index_copy_(1, c, gp)
                       for gp, c, _, _ in self._pending])
        c2 = torch.cat([p[2] for p in self._pending])
        half = torch.cat([p[3] for p in self._pending])
        self._pending, self._size = [], 0
        for h in range(2):
            parts = torch.nonzero(half == h).squeeze(1)
            if len(parts):
                self.weight[h] += (g[parts].T @ c2[parts]).to(self.weight.dtype)


def _chunks(batch, model, sampling, mask, prep: _Prepared, stats, acc, chunk_particles: int) -> list[ParticleResult]:
    """The global E-step of ``batch`` in chunks of ``chunk_particles``, in order."""
    results = []
    for start in range(0, batch.images.shape[0], chunk_particles):
        results.extend(_expectation_chunk(batch.subset(slice(start, start + chunk_particles)), model, sampling, mask,
                                          prep, stats, acc))
    return results


#: Parts of one GPU E-step call run at once, each by a thread on its own CUDA stream: while one
#: part waits for the GPU (the fine pass's sizes come back to the host), another launches
#: kernels. Parts hold at least :data:`STREAM_MIN_PARTICLES` particles. Measured on an H200
#: (20,000 particles, K = 12, seconds for 1 / 2 / 4 / 8 streams): 12 deg / 2 px 0.080 / 0.084 /
#: 0.119 / 0.193 (32 px) and 0.205 / 0.197 / 0.214 / 0.279 (64 px); 6 deg / 1 px 0.239 / 0.185 /
#: 0.184 / 0.208 and 0.391 / 0.315 / 0.356 / 0.519; peak memory 9.5 -> 13.5 GB with 2.
CUDA_STREAMS = 2
STREAM_MIN_PARTICLES = 1000

#: False: the parts run one after another in the calling thread (each still on its own stream),
#: for tools that observe the calling thread only (torch's FlopCounterMode, profilers).
PARTS_IN_THREADS = True


def _concurrent_chunks(batch, model, sampling, mask, prep: _Prepared, stats, acc, chunk_particles: int,
                       parts: int) -> list[ParticleResult]:
    """:func:`_chunks` over ``parts`` contiguous parts of the batch at once (threads; on a GPU each
    on its own stream), each into its own statistics and column sums, added to ``stats`` and
    ``acc`` at the end; the results come back in the batch's order."""
    n = batch.images.shape[0]
    parts = max(1, min(parts, n // STREAM_MIN_PARTICLES))
    if parts == 1:
        return _chunks(batch, model, sampling, mask, prep, stats, acc, chunk_particles)
    device = batch.images.device
    cuda = device.type == "cuda"
    edges = [n * i // parts for i in range(parts + 1)]
    main = torch.cuda.current_stream(device) if cuda else None

    def run(i: int):
        stream = torch.cuda.Stream(device) if cuda else None
        if cuda:
            stream.wait_stream(main)  # the batch and model are ready
        with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
            own = SufficientStats(**{f.name: torch.zeros_like(getattr(stats, f.name)) for f in dataclasses.fields(stats)})
            own_acc = None if acc is None else _ColumnSums(acc.weight.shape[1], acc.weight.shape[2], device)
            res = _chunks(batch.subset(slice(edges[i], edges[i + 1])), model, sampling, mask, prep, own, own_acc,
                          chunk_particles)
            if own_acc is not None:
                own_acc.flush()
        return stream, own, own_acc, res

    if PARTS_IN_THREADS:
        with ThreadPoolExecutor(parts) as pool:
            outs = list(pool.map(run, range(parts)))
    else:
        outs = [run(i) for i in range(parts)]
    results = []
    for stream, own, own_acc, res in outs:
        if cuda:
            main.wait_stream(stream)
            tensors = [getattr(own, f.name) for f in dataclasses.fields(own)]
            tensors += [] if own_acc is None else [own_acc.data, own_acc.weight]
            tensors += [getattr(r, f.name) for r in res for f in dataclasses.fields(r)]
            for t in tensors:  # made on the part's stream, used and freed on this one
                t.record_stream(main)
        for f in dataclasses.fields(own):
            getattr(stats, f.name).add_(getattr(own, f.name))
        if acc is not None:
            acc.data += own_acc.data
            acc.weight += own_acc.weight
        results.extend(res)
    return results


#: Posterior values (particles x columns) :class:`_ColumnSums` keeps before its weight GEMMs.
COLUMN_SUMS_PENDING = 8_000_000


#: Largest per-column accumulator (columns x statistics-window pixels) of one E-step call.
ACCUMULATE_MAX = 48_000_000


#: Elements (floats) of the largest temporary blocks of one chunk of particles (CPU).
CHUNK_BUDGET = 32_000_000

#: The number of particles of a chunk of the global search (CPU) is set by this many floats per
#: chunk instead (384 MB): chunks of a few hundred particles at 6 deg / 1 px run about 15 % faster
#: than at :data:`CHUNK_BUDGET` (fewer, larger ops per particle). The fine pass splits a chunk
#: into groups within :data:`CHUNK_BUDGET` and :data:`FINE_ROW_BUDGET`.
GLOBAL_CHUNK_BUDGET = 96_000_000

#: Floats of the fine pass's (rows, 2 F) phased images per group of particles (CPU: 64 MB; on a
#: GPU groups are bounded by its :func:`chunk_budget` alone).
FINE_ROW_BUDGET = 16_000_000

#: The same on a GPU: bigger chunks mean fewer kernel launches and host synchronisations per
#: particle (a GPU E-step is bound by launches, not arithmetic). Measured on an H200, 20,000
#: particles, K = 12, the state of benchmarks/class2d.py estep --device cuda: 1 G floats with
#: :data:`BLOCK_PADDING_CUDA` against 256 M with :data:`BLOCK_PADDING`, 0.58 -> 0.083 s (12 deg /
#: 2 px, 32 px) and 1.60 -> 0.38 s (6 deg / 1 px, 64 px), peak memory 3 -> 10 GB (about 2.5
#: blocks). A GPU with less memory gets less: see :func:`chunk_budget`.
CHUNK_BUDGET_CUDA = 1_000_000_000

#: The smallest GPU budget (the earlier fixed one: peak use about 3 GB).
CHUNK_BUDGET_CUDA_MIN = 256_000_000

#: Between those two, a GPU's budget is its memory (bytes) over this many float32 bytes (an
#: 80 GB card: 625 M floats, a peak near 7 GB).
CUDA_MEMORY_SHARE = 32

#: The local (3D) searches keep their blocks within this on a GPU (not measured larger).
LOCAL_CHUNK_BUDGET_CUDA = 256_000_000


def chunk_budget(device: torch.device) -> int:
    """Floats of the largest temporary block on ``device``: :data:`CHUNK_BUDGET` on the CPU; on
    a GPU its memory over ``4 x`` :data:`CUDA_MEMORY_SHARE`, within :data:`CHUNK_BUDGET_CUDA_MIN`
    and :data:`CHUNK_BUDGET_CUDA`."""
    device = torch.device(device)
    if device.type != "cuda":
        return CHUNK_BUDGET
    index = device.index if device.index is not None else torch.cuda.current_device()
    share = torch.cuda.get_device_properties(index).total_memory // (4 * CUDA_MEMORY_SHARE)
    return int(min(CHUNK_BUDGET_CUDA, max(CHUNK_BUDGET_CUDA_MIN, share)))


def global_chunk_budget(device: torch.device) -> int:
    """Floats per chunk of particles of the global search on ``device`` (:data:`GLOBAL_CHUNK_BUDGET`
    or the GPU's :func:`chunk_budget`)."""
    return chunk_budget(device) if torch.device(device).type == "cuda" else GLOBAL_CHUNK_BUDGET


def orientation_grid(sampling: Sampling, device=None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Coarse orientations and their fine-pass children (oversampling 1).

    2D: RELION's psi grid ``j * step + perturb * step`` and children ``psi -/+ step / 4``.
    3D: HEALPix directions of ``sampling.healpix_order`` (symmetry mates removed) x psi at the
    order's step, rotated by RELION's perturbation; children are the 4 directions of order + 1
    inside each pixel x 2 psi.

    Returns
    -------
    coarse
        ``(R, 3)`` (rot, tilt, psi) degrees (rot = tilt = 0 in 2D).
    fine
        ``(R, C, 3)`` children of each coarse orientation (C = 2 in 2D, 8 in 3D).
    step
        Coarse angular step in degrees.
    """
    if sampling.healpix_order is None:
        step = psi_step(sampling.psi_step_deg)
        psi_c = psi_grid(sampling.psi_step_deg, offset_deg=sampling.perturb * step, device=device)
        psi_f = torch.stack([psi_c - step / 4, psi_c + step / 4], 1)  # child 2r+j
        zc, zf = torch.zeros_like(psi_c), torch.zeros_like(psi_f)
        return torch.stack([zc, zc, psi_c], -1), torch.stack([zf, zf, psi_f], -1), step
    order = int(sampling.healpix_order)
    step = angular_sampling_deg(order)
    dirs = healpix_directions(order, device=device)
    pix = torch.arange(dirs.shape[0], device=dirs.device)
    if sampling.symmetry.upper() != "C1":
        ops = point_group_matrices(sampling.symmetry, device=dirs.device)
        max_ang = 0.5 * math.degrees(healpix_max_pixrad(order))
        keep = remove_symmetry_equivalent_directions(dirs[:, 0], dirs[:, 1], ops, max_ang, sampling.symmetry)
        dirs, pix = dirs[keep], pix[keep]
    psi = psi_grid(step, device=dirs.device)
    n_d, n_p = dirs.shape[0], psi.shape[0]
    coarse = torch.cat([dirs[:, None, :].expand(-1, n_p, -1), psi[None, :, None].expand(n_d, -1, -1)], -1).reshape(-1, 3)
    fine = oversampled_orientations_3d(order, pix.repeat_interleave(n_p), coarse[:, 2], step, 1)  # (R, 8, 3)
    if sampling.perturb != 0.0:
        coarse = perturb_orientations_3d(coarse, sampling.perturb, step)
        fine = perturb_orientations_3d(fine, sampling.perturb, step)
    return coarse, fine, step


def rotation_matrices(angles_deg: torch.Tensor, ndim: int) -> torch.Tensor:
    """``(..., n, n)`` rotations of ``(..., 3)`` (rot, tilt, psi): psi's 2x2 matrix for 2D
    references, RELION's Euler matrix A for 3D maps."""
    if ndim == 2:
        return psi_to_matrix_2d(angles_deg[..., 2])
    return euler_to_matrix(angles_deg[..., 0], angles_deg[..., 1], angles_deg[..., 2])


@dataclass
class _Prepared:
    """Grids, stencils and projected references shared by every chunk of one E-step."""

    n_coarse: int
    n_children: int
    trans_c: torch.Tensor
    idx_c: torch.Tensor
    a_c: torch.Tensor  # (K*R, Fc) coarse slices
    a_c_aug: torch.Tensor  # (K*R, 2Fc + 2) real view of a_c (interleaved), a column of ones and one of zeros
    ph_c: torch.Tensor  # (T, Fc)
    fine_angles: torch.Tensor  # (R*C, 3)
    fine_mats: torch.Tensor  # (R*C, n, n)
    idx_f: torch.Tensor
    f_f: torch.Tensor  # (Ff, 2) frequencies of the fine window
    fine_table: torch.Tensor | None  # (K*R*C, Ff) all fine slices when small enough
    trans_f: torch.Tensor  # (4T, 2) fine translations, children 4t..4t+3 of coarse t
    ph_f: torch.Tensor  # (4T, Ff) phases of the fine translations on the fine window
    ph_m: torch.Tensor  # (4T, Fm) the same on the statistics window
    idx_m: torch.Tensor
    f_m: torch.Tensor  # (Fm, 2)
    step: float
    channels: torch.Tensor | None = None  # (1, 2K, PD, ...) real view of the references (slices.channels)
    dc_m: int = 0  # place of DC in the statistics window (the fine window is the rest, in order)


#: Largest table of all fine slices (complex values) kept for a whole E-step; bigger grids
#: (fine 3D sampling) project the live columns of each chunk only.
FINE_TABLE_MAX = 16_000_000


#: The last few (model, sampling, box, device) -> (model on the device, _Prepared) of this
#: process. A map task calls :func:`expectation` once with the model the driver
#: broadcast for the iteration (one object per worker), so the projections, phases and fine
#: table are made once per iteration and worker instead of once per task (a VDAM mini-batch
#: spread over a large store touches a chunk with a few dozen particles in each of many tasks).
_PREP_CACHE: list = []
_PREP_CACHE_SIZE = 2  # refine3d alternates the two half-set models
_PREP_LOCK = threading.Lock()


def _prepared(model: EStepModel, sampling: Sampling, box: int, device) -> tuple[EStepModel, _Prepared]:
    """``(model.to(device), _prepare(...))``, from the cache when this very model object (not an
    equal one: models are not compared) was prepared with the same sampling, box and device."""
    key = (sampling, box, str(device))
    with _PREP_LOCK:
        for i, (m, kk, value) in enumerate(_PREP_CACHE):
            if m is model and kk == key:
                _PREP_CACHE.append(_PREP_CACHE.pop(i))
                return value
    moved = model.to(device)
    value = (moved, _prepare(moved, sampling, box, device))
    with _PREP_LOCK:
        _PREP_CACHE.append((model, key, value))
        del _PREP_CACHE[:-_PREP_CACHE_SIZE]
    return value


def clear_prep_cache() -> None:
    """Forget the prepared models of this process."""
    with _PREP_LOCK:
        _PREP_CACHE.clear()


def _prepare(model: EStepModel, sampling: Sampling, box: int, device) -> _Prepared:
    k = model.ref_ft.shape[0]
    pad = model.pad
    ndim = model.ndim
    if (sampling.healpix_order is None) != (ndim == 2):
        raise ValueError("2D references need Sampling.healpix_order None; 3D maps need a HEALPix order")
    freqs_all, _ = rfft_frequencies(box, device)
    coarse, fine, step = orientation_grid(sampling, device)
    r_c, n_ch = coarse.shape[0], fine.shape[1]
    trans_c = translation_grid(sampling.offset_range_px, sampling.offset_step_px, dtype=torch.float32, device=device)
    idx_c = window_indices(box, model.coarse_size, device)
    f_c = freqs_all[idx_c]
    channels = slices.channels(model.ref_ft)
    a_c = slices.project(channels, rotation_matrices(coarse, ndim), f_c, box, pad).reshape(k * r_c, -1)
    fine_angles = fine.reshape(-1, 3)
    fine_mats = rotation_matrices(fine_angles, ndim)
    idx_f = window_indices(box, model.current_size, device)
    f_f = freqs_all[idx_f]
    idx_m = window_indices(box, model.current_size, device, include_dc=True)
    q = sampling.offset_step_px / 4
    child_t = torch.tensor([[-q, -q], [q, -q], [-q, q], [q, q]], device=device, dtype=trans_c.dtype)
    trans_f = (trans_c[:, None, :] + child_t[None]).reshape(-1, 2)
    a_c_aug = torch.cat([_flat_real(a_c), torch.ones(a_c.shape[0], 1, dtype=a_c.real.dtype, device=device),
                         torch.zeros(a_c.shape[0], 1, dtype=a_c.real.dtype, device=device)], 1)
    prep = _Prepared(r_c, n_ch, trans_c, idx_c, a_c, a_c_aug, _phases(f_c, trans_c, box), fine_angles, fine_mats, idx_f, f_f, None,
                     trans_f, _phases(f_f, trans_f, box), _phases(freqs_all[idx_m], trans_f, box), idx_m, freqs_all[idx_m], step,
                     channels)
    prep.dc_m = int(torch.nonzero((prep.f_m == 0).all(-1))[0, 0])
    if k * r_c * n_ch * len(idx_f) <= FINE_TABLE_MAX:
        # every class at every fine orientation, a few classes (grid_sample channels) per call on a
        # CPU (cache-friendly: 4 classes 2.1x faster than 50 at 64 px), all in one call on a GPU
        group = k if torch.device(device).type == "cuda" else PROJECT_CLASS_GROUP
        prep.fine_table = torch.cat([slices.project(channels[:, 2 * a : 2 * min(a + group, k)], fine_mats, f_f, box, pad)
                                     for a in range(0, k, group)]).reshape(k * r_c * n_ch, -1)
    return prep


#: Classes projected together into the fine table on a CPU (a GPU takes all in one call).
PROJECT_CLASS_GROUP = 4

#: A 2D back-projection on a CPU goes through one sparse product of all K * R columns
#: (:func:`~autospa.numerics.slices.scatter_columns_shared`) when at least this fraction of them
#: has values (its cost is that of all columns; the scattered adds' that of the live ones: 6.8x
#: and 3.6x more per column at 64 and 32 px; a GPU's scattered adds are fast already).
SHARED_STENCIL_MIN_FRACTION = 0.3

#: Columns projected or back-projected together (bounds the stencil's memory).
COLUMN_BLOCK = 2048


def _fine_columns(model: EStepModel, prep: _Prepared, cols: torch.Tensor, box: int) -> torch.Tensor:
    """Fine slices ``(L, Ff)`` of the global fine columns ``cols`` (class * R*C + orientation)."""
    if prep.fine_table is not None:
        return prep.fine_table[cols]
    rc = prep.fine_mats.shape[0]
    out = model.ref_ft.new_zeros((len(cols), len(prep.idx_f)))
    cls = cols // rc
    for k in torch.unique(cls).tolist():  # grid_sample per class (no stencil to build)
        sel = torch.nonzero(cls == k).squeeze(1)
        ch = prep.channels[:, 2 * k : 2 * k + 2]
        for s in range(0, len(sel), 4 * COLUMN_BLOCK):
            j = sel[s : s + 4 * COLUMN_BLOCK]
            out[j] = slices.project(ch, prep.fine_mats[cols[j] % rc], prep.f_f, box, model.pad)[0]
    return out


def _shared_backprojection(model: EStepModel, prep: _Prepared, n_live: int, device: torch.device) -> bool:
    """Whether :func:`_backproject_columns` of ``n_live`` columns takes the sparse product."""
    k, rc = model.ref_ft.shape[0], prep.fine_mats.shape[0]
    return model.ndim == 2 and k > 1 and device.type == "cpu" and n_live >= SHARED_STENCIL_MIN_FRACTION * k * rc


def _backproject_columns(values: list[torch.Tensor], cols: torch.Tensor, model: EStepModel, prep: _Prepared,
                         box: int) -> list[torch.Tensor]:
    """Adjoint of the fine projection on the statistics window: each ``(L, Fm)`` array of
    ``values`` (per-column sums of the global columns ``cols``) spread onto the classes' padded
    grids and Hermitian-completed: 2D on a CPU with many live columns as one sparse product
    (:func:`~autospa.numerics.slices.scatter_columns_shared`), else in blocks of columns whose
    interpolation corners serve all arrays (:func:`~autospa.numerics.slices.scatter_positions`)."""
    k = model.ref_ft.shape[0]
    rc = prep.fine_mats.shape[0]
    if _shared_backprojection(model, prep, len(cols), cols.device):
        # 2D: every class has columns at the same orientations: one sparse product for all
        st = slices.stencil(prep.fine_mats, prep.f_m, box, model.pad)
        if len(cols) < k * rc:  # the absent columns as zeros
            values = [v.new_zeros((k * rc, v.shape[1])).index_copy_(0, cols, v) for v in values]
        out = slices.scatter_columns_shared(values, st, k)
        return [slices.hermitian_complete(o, model.ndim) for o in out]
    pd = model.ref_ft.shape[-1]
    out = [v.new_zeros((k,) + (pd,) * model.ndim) for v in values]
    for s in range(0, len(cols), COLUMN_BLOCK):
        c = cols[s : s + COLUMN_BLOCK]
        pos = slices.sample_positions(prep.fine_mats[c % rc], prep.f_m, box, model.pad)
        slices.scatter_positions([v[s : s + COLUMN_BLOCK] for v in values], c // rc, pos, pd, k, out=out)
    return [slices.hermitian_complete(o, model.ndim) for o in out]


def _with_dc(z: torch.Tensor, dc: int) -> torch.Tensor:
    """Values ``(..., Ff)`` on the fine window to the statistics window ``(..., Ff + 1)``: a 0 at
    DC's place ``dc`` (the fine window is the statistics window without DC)."""
    out = z.new_empty(z.shape[:-1] + (z.shape[-1] + 1,))
    out[..., :dc] = z[..., :dc]
    out[..., dc] = 0
    out[..., dc + 1 :] = z[..., dc:]
    return out


def _without_dc(z: torch.Tensor, dc: int) -> torch.Tensor:
    """Inverse of :func:`_with_dc`: ``(..., Fm)`` on the statistics window to the fine window."""
    return torch.cat([z[..., :dc], z[..., dc + 1 :]], -1)


def _add_rows(target: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """``target[index[i]] += rows[i]`` for ``target (M, F)`` and ``rows (S, F)``; complex rows are
    added on the real views (CPU's index_add_ of complex rows is about 4 times slower)."""
    rows = rows.to(target.dtype)
    if target.is_complex():
        target, rows = torch.view_as_real(target).flatten(-2), torch.view_as_real(rows.contiguous()).flatten(-2)
    target.index_add_(0, index, rows)


def _take_rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[index]`` for ``values (R, ...)`` and an integer ``index`` of any shape, by
    ``index_select`` (whole rows copied at once: 2 to 6 times faster than advanced indexing on the CPU)."""
    return values.index_select(0, index.reshape(-1)).view(*index.shape, *values.shape[1:])


def _flat_real(z: torch.Tensor) -> torch.Tensor:
    """Complex ``(..., F)`` as real ``(..., 2F)`` with real and imaginary parts interleaved (a view
    when ``z`` is contiguous): ``Re(a conj(b)) = flat(a) . flat(b)``."""
    return torch.view_as_real(z).flatten(-2)


def _real_gemm(left: torch.Tensor, right_t: torch.Tensor) -> torch.Tensor:
    """``Re(left @ conj(right_t).T)`` for complex ``left`` (M, F) and ``right_t`` (C, F), as one
    real GEMM of width 2F on the interleaved views (no copies); returns (M, C)."""
    return _flat_real(left) @ _flat_real(right_t).T


def _real_bmm(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Batched ``Re(left @ conj(right)^T)``: complex ``(B, M, F)`` and ``(B, C, F)`` -> real ``(B, M, C)``."""
    return torch.bmm(_flat_real(left), _flat_real(right).transpose(1, 2))


def _weighted_sum(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Real ``(..., M, U)`` weights times complex ``(..., U, F)`` values -> complex ``(..., M, F)``,
    one real (batched) GEMM on the interleaved view of ``values``."""
    return torch.view_as_complex(torch.matmul(weights, _flat_real(values)).unflatten(-1, (-1, 2)))


#: Fraction of a chunk's (class, psi) columns live in some particle above which the fine pass is
#: one shared GEMM instead of per-particle blocks.
DENSE_FINE_COLUMNS = 0.3


def _fine_dense(n, row_p, row_tf, colmask, pw_f, norm_f, xnorm_f, row_logoff, col_prior, x_f, q0, half, bsum, prep, a_cols):
    """Fine pass by GEMMs over the rows: scores, data sums and residual cross terms.

    The element-wise work (priors, exponentials, normalisation) runs on the whole ``(U, K*2R)``
    block when most entries are live, and on the live entries only when few are.
    """
    device = pw_f.device
    ph_rows = _take_rows(prep.ph_f, row_tf)  # (U, Ff)
    cross = _real_gemm(_take_rows(pw_f, row_p) * ph_rows, a_cols)  # (U, K*2R)
    n_rows, n_cols = cross.shape
    if float(colmask.sum()) > 0.25 * colmask.numel():
        logw = cross
        logw -= 0.5 * (xnorm_f[row_p, None] + norm_f[row_p])
        logw += row_logoff[:, None] + col_prior[None, :]
        dead = ~colmask
        logw.masked_fill_(dead, -torch.inf)
        row_max, row_arg = logw.max(1)
        mx = torch.full((n,), -torch.inf, device=device, dtype=logw.dtype).scatter_reduce(0, row_p, row_max, reduce="amax")
        gam = torch.exp((logw - mx[row_p, None]).clamp_min(EXP_FLOOR)).masked_fill_(dead, 0)
        del logw, cross
        s_i = torch.zeros(n, device=device, dtype=torch.float64).index_add_(0, row_p, sum64(gam, 1))
        gam /= s_i[row_p, None].to(gam.dtype)
        u_idx = torch.arange(n_rows, device=device)
        best_row = torch.full((n,), n_rows, device=device, dtype=torch.long).scatter_reduce(
            0, row_p, torch.where(row_max >= mx[row_p], u_idx, torch.full_like(u_idx, n_rows)), reduce="amin")
        best_col = row_arg[best_row]
        gmax = gam[best_row, best_col]
    else:
        e_u, e_c = torch.nonzero(colmask, as_tuple=True)
        e_p = row_p[e_u]
        logw = cross[e_u, e_c] - 0.5 * (xnorm_f[e_p] + norm_f[e_p, e_c]) + row_logoff[e_u] + col_prior[e_c]
        del cross
        mx = torch.full((n,), -torch.inf, device=device, dtype=logw.dtype).scatter_reduce(0, e_p, logw, reduce="amax")
        g_e = torch.exp((logw - mx[e_p]).clamp_min(EXP_FLOOR))
        s_i = torch.zeros(n, device=device, dtype=torch.float64).index_add_(0, e_p, g_e.to(torch.float64))
        g_e = (g_e.to(torch.float64) / s_i[e_p]).to(logw.dtype)
        gmax = torch.zeros(n, device=device, dtype=g_e.dtype).scatter_reduce(0, e_p, g_e, reduce="amax")
        e_idx = torch.arange(len(e_p), device=device)
        best = torch.full((n,), len(e_p), device=device, dtype=torch.long).scatter_reduce(
            0, e_p, torch.where(g_e >= gmax[e_p], e_idx, torch.full_like(e_idx, len(e_p))), reduce="amin")
        best_row, best_col = e_u[best], e_c[best]
        gam = torch.zeros(n_rows, n_cols, device=device, dtype=g_e.dtype)
        gam[e_u, e_c] = g_e
    g_part = torch.zeros(n, n_cols, device=device, dtype=gam.dtype).index_add_(0, row_p, gam)
    half_rows = half[row_p]
    for h in range(2):
        rows = torch.nonzero(half_rows == h).squeeze(1)
        if len(rows) == 0:
            continue
        qr = _take_rows(q0, row_p[rows]) * _take_rows(prep.ph_m, row_tf[rows])  # (U_h, Fm)
        g_h = gam[rows]
        _add_rows(bsum[0][h], bsum[1], _weighted_sum(g_h.T, qr))
    m_rows = _weighted_sum(gam, a_cols)  # (U, Ff) posterior-mean reference
    cross_pix = torch.zeros_like(x_f.real).index_add_(0, row_p, (_take_rows(x_f, row_p) * ph_rows * m_rows.conj().resolve_conj()).real)
    return mx, s_i, best_row, best_col, gmax, g_part, cross_pix, sum64(gam, 1)


#: Padded entries a bucket of per-particle blocks may hold, relative to its particles' own blocks
#: (particles are sorted by block size and grouped so that padding stays below this).
BLOCK_PADDING = 1.5

#: The same on a GPU, where a bucket costs a few dozen kernel launches and host synchronisations
#: whatever its size: fewer, more padded buckets are faster (H200, 6 deg / 1 px, 32 px: 0.91 s
#: at 1.5, 0.40 s at 4, 0.35 s at 16, 0.34 s at 64 per 20,000 particles).
BLOCK_PADDING_CUDA = 16.0


def _block_buckets(r_cnt: torch.Tensor, c_cnt: torch.Tensor, max_lines: int, padding: float | None = None
                   ) -> list[torch.Tensor]:
    """Group particles into buckets whose blocks, padded to the bucket's largest rows and columns,
    hold at most ``padding`` (default :data:`BLOCK_PADDING`) times their own entries (plus a little slack, so that
    buckets do not become tiny), and whose padded rows plus columns (the ``(rows + columns, Ff)``
    arrays a bucket holds) number at most ``max_lines``; particles sorted by block size."""
    padding = BLOCK_PADDING if padding is None else padding
    r_t, c_t = r_cnt.cpu().long(), c_cnt.cpu().long().clamp_min(1)
    order_t = torch.argsort((r_t * c_t) * (int(c_t.max()) + 1) + c_t, stable=True)
    order, r, c = order_t.tolist(), r_t.tolist(), c_t.tolist()
    buckets, start = [], 0
    while start < len(order):
        stop, r_max, c_max, own = start, 0, 0, 0
        while stop < len(order):
            i = order[stop]
            r_new, c_new = max(r_max, r[i]), max(c_max, c[i])
            own_new = own + r[i] * c[i]
            count = stop - start + 1
            if stop > start and (r_new * c_new * count > padding * own_new + 256 * count
                                 or (r_new + c_new) * count > max_lines):
                break
            r_max, c_max, own, stop = r_new, c_new, own_new, stop + 1
        buckets.append(order_t[start:stop].to(r_cnt.device))
        start = stop
    return buckets


def _fine_blocks(n, row_p, row_tf, colmask, live, pw_f, norm_f, xnorm_f, row_logoff, col_prior, x_f, q0, half, bsum, prep,
                 a_cols):
    """Fine pass as per-particle blocks: batched GEMMs over each particle's live rows and columns.

    A particle's rows are its fine translations (children of coarse translations holding a
    significant hypothesis); its columns are the (class, fine psi) children of its significant
    (class, psi) pairs. Scores, posterior-weighted data sums and posterior-mean references are
    batched matrix products over ``(N_b, rows, columns)`` blocks; particles are sorted by block size
    and batched in buckets padded to their own largest block (:func:`_block_buckets`), so the work
    follows the posterior's support, not the largest particle of the chunk. ``colmask (U, L)`` marks
    the live (row, column) entries, ``live (N, L)`` each particle's live columns.

    Returns
    -------
    tuple
        ``mx, s_i (N,)``: max log-weight and sum of weights per particle; ``best_row (N,)`` index
        into the rows, ``best_col (N,)`` column; ``gmax (N,)``; ``g_part (N, K*2R)`` posterior per
        particle and column; ``cross_pix (N, Ff)`` posterior-weighted ``Re(X_t conj(A))``;
        ``g_rows (U,)`` posterior per row. The data sums are added to ``bsum[0] (2, L', Fm)`` at the
        columns ``bsum[1][c]`` of the pass's columns ``c``.
    """
    device = pw_f.device
    n_rows, n_cols = colmask.shape
    rdt = x_f.real.dtype
    # columns and conjugate image weights on the statistics window (0 at DC), made once for all
    # buckets (products with torch.conj views take a slow path on CPU: conjugates are stored)
    a_cols_m = _with_dc(a_cols, prep.dc_m)  # (L, Fm)
    a_cols_mc = a_cols_m.conj().resolve_conj()
    pw_c = _with_dc(pw_f, prep.dc_m).conj().resolve_conj()  # (N, Fm)
    # rows of each particle (row_p is sorted by particle)
    r_cnt = torch.bincount(row_p, minlength=n)
    r_start = torch.cumsum(r_cnt, 0) - r_cnt
    c_cnt = live.sum(1)
    mx = torch.empty(n, device=device, dtype=rdt)
    s_i = torch.empty(n, device=device, dtype=torch.float64)
    best_row = torch.empty(n, device=device, dtype=torch.long)
    best_col = torch.empty(n, device=device, dtype=torch.long)
    gmax = torch.empty(n, device=device, dtype=rdt)
    g_part = torch.zeros(n, n_cols, device=device, dtype=rdt)
    g_rows = torch.zeros(n_rows, device=device, dtype=torch.float64)
    cross_pix = torch.empty(n, x_f.shape[1], device=device, dtype=rdt)
    max_lines = max(1, chunk_budget(device) // max(1, 4 * pw_c.shape[1]))  # (rows + columns, Ff) arrays that fit
    padding = BLOCK_PADDING_CUDA if device.type == "cuda" else BLOCK_PADDING
    for pb in _block_buckets(r_cnt, c_cnt, max_lines, padding):
        nb = len(pb)
        u_max = max(1, int(r_cnt[pb].max()))
        j = torch.arange(u_max, device=device)
        row_ok = j[None, :] < r_cnt[pb, None]
        rows_c = torch.where(row_ok, r_start[pb, None] + j[None, :], 0)  # (nb, u)
        c_p, c_c = torch.nonzero(live[pb], as_tuple=True)
        cb = c_cnt[pb]
        c_max = max(1, int(cb.max()))
        c_local = torch.arange(len(c_p), device=device) - (torch.cumsum(cb, 0) - cb)[c_p]
        cols = torch.zeros(nb, c_max, device=device, dtype=torch.long)
        col_ok = torch.zeros(nb, c_max, device=device, dtype=torch.bool)
        cols[c_p, c_local] = c_c
        col_ok[c_p, c_local] = True
        emask = colmask[rows_c[:, None, :], cols[:, :, None]] & row_ok[:, None, :] & col_ok[:, :, None]  # (nb, c, u)

        # Re(P ph_u conj(A_c)) = Re(ph_u conj(A_c conj(P))): the image weights go onto the (fewer)
        # columns, so no (rows, Ff) product is formed. The rows' phases are taken on the
        # statistics window (the fine window and DC; the columns are 0 at DC), so that one
        # gather and one weighted sum (G ph) serve the scores, the data sums and the residuals.
        # Blocks are (columns, rows): the batched products run faster with the short side first.
        ph = _take_rows(prep.ph_m, row_tf[rows_c])  # (nb, u, Fm)
        a_blk = _take_rows(a_cols_m, cols)  # (nb, c, Fm), 0 at DC
        logw = _real_bmm(a_blk * pw_c[pb, None, :], ph)  # (nb, c, u)
        logw -= 0.5 * (xnorm_f[pb, None, None] + norm_f[pb[:, None], cols][:, :, None])
        logw += row_logoff[rows_c][:, None, :] + col_prior[cols][:, :, None]
        dead = ~emask
        logw.masked_fill_(dead, -torch.inf)
        m_b, arg = logw.reshape(nb, -1).max(1)
        gam = torch.exp((logw - m_b[:, None, None]).clamp_min(EXP_FLOOR)).masked_fill_(dead, 0)  # (nb, c, u)
        del logw
        s_b = sum64(gam, (1, 2))
        gam /= s_b[:, None, None].to(gam.dtype)
        ar = torch.arange(nb, device=device)
        mx[pb], s_i[pb] = m_b, s_b
        best_row[pb] = rows_c[ar, arg % u_max]
        best_col[pb] = cols[ar, arg // u_max]
        gmax[pb] = gam.reshape(nb, -1)[ar, arg]
        # posterior per particle and column, per row
        g_part[pb] = torch.zeros(nb, n_cols, device=device, dtype=gam.dtype).scatter_add_(1, cols, gam.sum(2))
        g_rows[rows_c[row_ok]] = sum64(gam.transpose(1, 2), 2)[row_ok]
        g_ph = _weighted_sum(gam, ph)  # (nb, c, Fm): (G ph)[c]
        # data sums: Z[i, c] = sum_u G[i, c, u] Q[i] ph_u = Q[i] (G ph)[c], scattered to the
        # columns' rows of bsum
        key = half[pb, None] * bsum[0].shape[1] + bsum[1][cols]  # (nb, c)
        _add_rows(bsum[0].view(-1, bsum[0].shape[-1]), key[col_ok], (q0[pb, None, :] * g_ph)[col_ok])
        # posterior-weighted Re(X ph_u conj(A_c)) = Re(X sum_c conj(A_c) (G ph)[c]) for the
        # residual power (padded rows and columns have zero posterior)
        cross_pix[pb] = (x_f[pb] * _without_dc((_take_rows(a_cols_mc, cols) * g_ph).sum(1), prep.dc_m)).real.to(rdt)
    return mx, s_i, best_row, best_col, gmax, g_part, cross_pix, g_rows


def _fine_sparse(n, hp, ht, lc, row_of, n_par, n_lc, pw_f, norm_f, xnorm_f, rounded, s_off2, col_prior, x_f, q0, half,
                 bsum, prep, a_cols):
    """Fine pass hypothesis by hypothesis: the children of each significant coarse
    (translation, class, orientation) are scored as a small (4 translations x C orientations)
    GEMM, batched over the hypotheses (RELION's own scheme). The work follows the number of
    significant hypotheses, not the product of a particle's live rows and columns.

    ``hp, ht, lc (S,)``: the hypotheses' particle, coarse translation and local coarse column
    (sorted by particle), ``row_of (S,)`` their parent row (of ``n_par``); ``n_lc`` live coarse
    columns. Returns the same tuple as :func:`_fine_blocks` (rows: parent rows x 4 children).
    """
    device = pw_f.device
    n_ch = prep.n_children
    n_hyp = len(hp)
    kids = torch.arange(n_ch, device=device)
    four = torch.arange(4, device=device)
    n_cols = n_lc * n_ch
    logw = torch.empty(n_hyp, 4, n_ch, dtype=pw_f.real.dtype, device=device)
    ff = pw_f.shape[1]
    step = max(1, 64_000_000 // max(1, (4 + n_ch) * ff * 4))
    for s in range(0, n_hyp, step):
        e = slice(s, s + step)
        p, t, c = hp[e], ht[e], lc[e]
        tf = t[:, None] * 4 + four  # (s, 4)
        col = c[:, None] * n_ch + kids  # (s, C)
        ph = pw_f[p][:, None, :] * prep.ph_f[tf]
        a = a_cols[col]
        lw = _real_bmm(ph, a)
        lw -= 0.5 * (xnorm_f[p][:, None, None] + norm_f[p[:, None], col][:, None, :])
        lw -= ((rounded[p][:, None, :] + prep.trans_f[tf]) ** 2).sum(-1)[:, :, None] / (2 * s_off2)
        lw += col_prior[col][:, None, :]
        logw[e] = lw
    flat = logw.reshape(n_hyp, -1)
    hmax, harg = flat.max(1)
    mx = torch.full((n,), -torch.inf, device=device, dtype=flat.dtype).scatter_reduce(0, hp, hmax, reduce="amax")
    gam = torch.exp((logw - mx[hp][:, None, None]).clamp_min(EXP_FLOOR))
    s_i = torch.zeros(n, device=device, dtype=torch.float64).index_add_(0, hp, gam.sum((1, 2), dtype=torch.float64))
    gam = (gam.to(torch.float64) / s_i[hp][:, None, None]).to(logw.dtype)
    # best entry per particle
    gh = gam.reshape(n_hyp, -1).gather(1, harg[:, None]).squeeze(1)
    gmax = torch.zeros(n, device=device, dtype=gam.dtype).scatter_reduce(0, hp, gh, reduce="amax")
    h_idx = torch.arange(n_hyp, device=device)
    best_h = torch.full((n,), n_hyp, device=device, dtype=torch.long).scatter_reduce(
        0, hp, torch.where(gh >= gmax[hp], h_idx, torch.full_like(h_idx, n_hyp)), reduce="amin")
    b_t, b_c = harg[best_h] // n_ch, harg[best_h] % n_ch
    best_row = row_of[best_h] * 4 + b_t
    best_col = lc[best_h] * n_ch + b_c
    # statistics
    col_all = lc[:, None] * n_ch + kids  # (S, C)
    g_part = torch.zeros(n * n_cols, device=device, dtype=gam.dtype).index_add_(
        0, (hp[:, None] * n_cols + col_all).reshape(-1), gam.sum(1).reshape(-1)).reshape(n, n_cols)
    g_rows = torch.zeros(n_par * 4, device=device, dtype=torch.float64).index_add_(
        0, (row_of[:, None] * 4 + four).reshape(-1), gam.sum(2, dtype=torch.float64).reshape(-1))
    cross_pix = torch.zeros_like(x_f.real)
    fm = q0.shape[1]
    step = max(1, 64_000_000 // max(1, (4 + n_ch) * max(ff, fm) * 4))
    for s in range(0, n_hyp, step):
        e = slice(s, s + step)
        p, t, g = hp[e], ht[e], gam[e]
        tf = t[:, None] * 4 + four
        col = col_all[e]
        qr = q0[p][:, None, :] * prep.ph_m[tf]  # (s, 4, Fm)
        gt = g.transpose(1, 2)  # (s, C, 4)
        z = _weighted_sum(gt, qr)  # (s, C, Fm)
        key = half[p][:, None] * bsum[0].shape[1] + bsum[1][col]
        _add_rows(bsum[0].view(-1, bsum[0].shape[-1]), key.reshape(-1), z.reshape(-1, fm))
        a = a_cols[col]
        m = _weighted_sum(g, a)  # (s, 4, Ff)
        cross_pix.index_add_(0, p, (x_f[p][:, None, :] * prep.ph_f[tf] * m.conj().resolve_conj()).real.sum(1))
    return mx, s_i, best_row, best_col, gmax, g_part, cross_pix, g_rows


#: The fine pass goes hypothesis by hypothesis when the per-particle blocks would hold more than
#: this many times the live entries.
SPARSE_FINE_WASTE = 30.0


def _expectation_chunk(batch, model, sampling, mask, prep: _Prepared, stats, acc=None) -> list[ParticleResult]:
    device = batch.images.device
    n, box, _ = batch.images.shape
    k = model.ref_ft.shape[0]
    freqs_all, shells_all = rfft_frequencies(box, device)
    rounded = batch.origin_px.round()
    trans_c, r_n = prep.trans_c, prep.n_coarse

    # --- image preparation: shift by +round(origin), mask, FFT (RELION section 2.1)
    shifted = integer_shift(batch.images, rounded)
    masked = soft_mask_background(shifted, mask) if mask is not None else shifted
    x_mask = centered_rfft2(masked).reshape(n, -1)
    x_full = centered_rfft2(shifted).reshape(n, -1)
    ctf_all = batch.ctf.reshape(n, -1)
    inv_s2_all = 1.0 / model.sigma2[batch.group][:, shells_all.clamp_max(model.sigma2.shape[1] - 1)]  # (N, Fall)
    s_off2 = max(model.sigma_offset_px, 1e-3) ** 2

    # --- coarse pass: every (translation, class, orientation) as one GEMM. The offset prior
    # rides in the GEMM (a column of log_off per row against ones, and a zero column that keeps
    # the rows' length even), the image norm is left out (a constant per particle), and the
    # CTF-weighted reference power and class prior (per particle and column) are added in one
    # pass; the significant hypotheses are listed from the log-weights (significant_entries), so
    # the (N, T*KR) block is never exponentiated nor turned into a mask.
    idx_c, a_c = prep.idx_c, prep.a_c
    x_c, ctf_c, w_c = x_mask[:, idx_c], ctf_all[:, idx_c], inv_s2_all[:, idx_c]
    t_c, f_c = len(trans_c), len(idx_c)
    rdt = x_c.real.dtype
    p_aug = torch.empty(n, t_c, 2 * f_c + 2, dtype=rdt, device=device)  # even rows: a complex view
    torch.mul((ctf_c * w_c * x_c)[:, None, :], prep.ph_c[None],
              out=torch.view_as_complex(p_aug[:, :, : 2 * f_c].unflatten(-1, (f_c, 2))))
    p_aug[:, :, -2] = -((rounded[:, None, :] + trans_c[None]) ** 2).sum(-1) / (2 * s_off2)  # log offset prior
    p_aug[:, :, -1] = 0
    logw = (p_aug.view(n * t_c, -1) @ prep.a_c_aug.T).view(n, t_c, -1)  # (N, T, KR)
    del p_aug
    bias = -0.5 * ((ctf_c**2 * w_c) @ (a_c.real**2 + a_c.imag**2).T)  # (N, KR)
    bias += model.log_class_prior.repeat_interleave(r_n)[None, :]
    logw += bias[:, None, :]
    kr = k * r_n
    h_p, h_j = significant_entries(logw.view(n, -1), sampling.adaptive_fraction, sampling.max_significants)
    del logw
    h_t, h_c = h_j // kr, h_j % kr  # significant (particle, translation, class * R + psi), by particle
    n_sig = torch.bincount(h_p, minlength=n)

    # --- fine pass over groups of particles whose (rows x live columns) block fits the budget and
    # whose (rows, 2 F) phased images fit FINE_ROW_BUDGET (larger ones fall out of cache: twice
    # the time of the dense path for broad posteriors at 64 px)
    live_per_particle = torch.bincount(torch.unique(h_p * kr + h_c) // kr, minlength=n).tolist()
    rows_per_particle = (torch.bincount(torch.unique(h_p * t_c + h_t) // t_c, minlength=n) * 4).tolist()
    bounds = torch.searchsorted(h_p, torch.arange(n + 1, device=device)).tolist()
    out, start = [], 0
    n_cols = kr * prep.n_children
    budget = chunk_budget(device)
    row_max = max(1, (budget if device.type == "cuda" else FINE_ROW_BUDGET) // (2 * len(prep.idx_m)))
    while start < n:
        stop, cols_sum, rows_sum = start, 0, 0
        while stop < n:
            c_new = min(n_cols, cols_sum + live_per_particle[stop] * prep.n_children)
            r_new = rows_sum + rows_per_particle[stop]
            if stop > start and (c_new * r_new > budget or r_new > row_max):
                break
            cols_sum, rows_sum, stop = c_new, r_new, stop + 1
        sl, e = slice(start, stop), slice(bounds[start], bounds[stop])
        out.append(_fine_pass(batch, sl, (h_p[e] - start, h_t[e], h_c[e]), t_c, n_sig[sl], model, prep, stats,
                              rounded[sl], x_mask[sl], x_full[sl], ctf_all[sl], inv_s2_all[sl], s_off2, freqs_all,
                              shells_all, acc))
        start = stop
    return out


def _fine_pass(batch, sl, hyp, t_c, n_sig, model, prep: _Prepared, stats, rounded, x_mask, x_full, ctf_all, inv_s2_all,
               s_off2, freqs_all, shells_all, acc=None) -> ParticleResult:
    """Children (C orientations x 4 translations) of the significant coarse hypotheses ``hyp``
    (particle within ``sl``, coarse translation, class * R + orientation; sorted by particle,
    translation and column) of particles ``sl``: scores, posteriors, statistics and the best pose.

    Rows are (particle, fine translation) pairs whose parent translation holds a significant
    hypothesis; columns are the children of the (class, orientation) pairs significant for some
    particle of the group (compacted: only those are projected); entries whose parent was not
    significant for the row's particle are out. Broad posteriors (EM's first iterations) are
    scored as one GEMM shared by all rows; sparse ones per particle (batched GEMMs).
    """
    device = x_mask.device
    n = n_sig.shape[0]
    box = batch.images.shape[-1]
    k = model.ref_ft.shape[0]
    n_ch = prep.n_children
    rc = prep.fine_mats.shape[0]
    half = batch.half[sl]
    group = batch.group[sl]
    # live coarse columns of the group and their fine children (global column ids)
    h_p, h_t, h_c = hyp
    live_c, h_lc = torch.unique(h_c, return_inverse=True)  # (Lc,) class * R + r; local column per hypothesis
    n_lc = len(live_c)
    cols = (live_c[:, None] * n_ch + torch.arange(n_ch, device=device)[None]).reshape(-1)  # (L,) class * R*C + o
    par_key, h_row = torch.unique(h_p * t_c + h_t, return_inverse=True)  # parent rows; parent of each hypothesis
    par_p, par_t = par_key // t_c, par_key % t_c
    row_p = par_p.repeat_interleave(4)
    row_tf = (par_t[:, None] * 4 + torch.arange(4, device=device)[None]).reshape(-1)  # index into prep.trans_f
    row_t = prep.trans_f[row_tf]  # (U, 2)
    # path: one shared GEMM (broad posteriors), per-particle blocks, or hypothesis by hypothesis
    n_live = torch.bincount(torch.unique(h_p * n_lc + h_lc) // n_lc, minlength=n) * n_ch  # (N,) live fine columns
    rows_pp = torch.bincount(par_p, minlength=n) * 4
    dense = float(n_live.max()) > DENSE_FINE_COLUMNS * len(cols)
    sparse = not dense and float((rows_pp * n_live).sum()) > SPARSE_FINE_WASTE * len(h_p) * 4 * n_ch
    colmask = None
    if not sparse:
        par_cols = torch.zeros(len(par_key), n_lc, dtype=torch.bool, device=device)
        par_cols[h_row, h_lc] = True
        colmask = par_cols.repeat_interleave(n_ch, dim=-1)[:, None, :].expand(-1, 4, -1).reshape(len(row_p), -1)
    a_cols = _fine_columns(model, prep, cols, box)  # (L, Ff)
    col_class = cols // rc

    idx_f = prep.idx_f
    x_f, ctf_f, w_f = x_mask[:, idx_f], ctf_all[:, idx_f], inv_s2_all[:, idx_f]
    pw_f = ctf_f * w_f * x_f  # (N, Ff)
    a_pow = a_cols.real**2 + a_cols.imag**2
    norm_f = (ctf_f**2 * w_f) @ a_pow.T  # (N, L)
    xnorm_f = ((x_f.real**2 + x_f.imag**2) * w_f).sum(-1)  # (N,)
    row_logoff = -((rounded[row_p] + row_t) ** 2).sum(-1) / (2 * s_off2)  # (U,)
    col_prior = model.log_class_prior[col_class]  # (L,)

    # data for the statistics
    idx_m = prep.idx_m
    dc_half = torch.where((prep.f_m == 0).all(-1), 0.5, 1.0).to(x_f.real.dtype)  # DC is completed twice
    c_m, w_m = ctf_all[:, idx_m], inv_s2_all[:, idx_m]
    q0 = c_m * w_m * x_full[:, idx_m] * dc_half  # (N, Fm) unmasked image, for the reconstruction
    c2 = c_m**2 * w_m * dc_half  # (N, Fm)
    # data sums go straight into the call's accumulator (global columns) or into this pass's own
    if acc is not None:
        bsum = (acc.data, cols)
    else:
        bsum = (torch.zeros(2, len(cols), len(idx_m), dtype=q0.dtype, device=device), torch.arange(len(cols), device=device))

    if dense:
        fine = _fine_dense(n, row_p, row_tf, colmask, pw_f, norm_f, xnorm_f, row_logoff, col_prior, x_f, q0, half, bsum,
                           prep, a_cols)
    elif sparse:
        fine = _fine_sparse(n, h_p, h_t, h_lc, h_row, len(par_key), n_lc, pw_f, norm_f, xnorm_f, rounded, s_off2,
                            col_prior, x_f, q0, half, bsum, prep, a_cols)
    else:
        live = torch.zeros(n, n_lc, dtype=torch.bool, device=device)
        live[h_p, h_lc] = True  # (N, Lc) -> (N, L): live columns of each particle
        fine = _fine_blocks(n, row_p, row_tf, colmask, live.repeat_interleave(n_ch, dim=-1), pw_f, norm_f, xnorm_f,
                            row_logoff, col_prior, x_f, q0, half, bsum, prep, a_cols)
    mx, s_i, best_row, best_col, gmax, g_part, cross_pix, g_rows = fine

    log_norm = torch.log(2 * math.pi / w_f).sum(-1)  # sum over the window of log(2 pi sigma2)
    ll = (mx.to(torch.float64) + torch.log(s_i)).to(xnorm_f.dtype) - log_norm
    pending = []  # (half, data sums, weight sums) back-projected together: one stencil per column block
    if acc is not None:  # back-projected once per call
        acc.add_weights(g_part, cols, c2, half)
    for h in range(2):
        parts = half == h
        if not bool(parts.any()):
            continue
        if acc is None:
            pending.append((h, bsum[0][h], g_part[parts].T @ c2[parts]))  # data and weight sums (L, Fm)
        stats.class_weight[h] += torch.zeros(k, dtype=torch.float64, device=device).index_add_(
            0, col_class, g_part[parts].sum(0, dtype=torch.float64))
    if pending:
        grids = _backproject_columns([v for _, d, w in pending for v in (d, w)], cols, model, prep, box)
        for i, (h, _, _) in enumerate(pending):
            stats.data[h] += grids[2 * i].to(stats.data.dtype)
            stats.weight[h] += grids[2 * i + 1].to(stats.weight.dtype)
    # residual power |X_t - C A|^2 = |X|^2 - 2 C Re(X_t conj(A)) + C^2 |A|^2, posterior-weighted
    resid = (x_f.real**2 + x_f.imag**2) * g_part.sum(1, keepdim=True) - 2 * ctf_f * cross_pix + ctf_f**2 * (g_part @ a_pow)
    _add_noise_power(stats, group, resid, x_mask, idx_f, idx_m, freqs_all, shells_all)
    stats.offset_sq += (g_rows * ((rounded[row_p] + row_t).to(torch.float64) ** 2).sum(-1)).sum()
    stats.offset_weight += g_rows.sum()
    stats.log_likelihood += ll.to(torch.float64).sum()
    stats.max_posterior += gmax.to(torch.float64).sum()
    stats.n_particles += n
    best = cols[best_col]
    ang = prep.fine_angles[best % rc]
    return ParticleResult(
        class_index=best // rc,
        psi_deg=_wrap180(ang[:, 2]) if model.ndim == 3 else torch.remainder(ang[:, 2], 360.0).to(torch.float32),
        rot_deg=_wrap180(ang[:, 0]),
        tilt_deg=ang[:, 1].to(torch.float32),
        origin_px=(rounded + prep.trans_f[row_tf[best_row]]).to(torch.float32),
        max_posterior=gmax.to(torch.float32),
        n_significant=n_sig,
        log_likelihood=ll.to(torch.float32),
    )


# --------------------------------------------------------------------------------------------
# local searches


def local_rotations(step_deg: float, range_deg: float, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Small rotations around the identity: a cubic lattice of rotation vectors of spacing
    ``step_deg`` inside the ball of radius ``range_deg``.

    Returns
    -------
    rotations
        ``(J, 3, 3)`` matrices (the identity included).
    angle_deg
        ``(J,)`` rotation angle of each.
    """
    n = int(math.floor(range_deg / step_deg + 1e-6))
    ax = torch.arange(-n, n + 1, dtype=torch.float64) * math.radians(step_deg)
    w = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    ang = w.norm(dim=-1)
    keep = ang <= math.radians(range_deg) * (1 + 1e-9)
    w, ang = w[keep], ang[keep]
    skew = torch.zeros(len(w), 3, 3, dtype=torch.float64)
    skew[:, 0, 1], skew[:, 0, 2], skew[:, 1, 2] = -w[:, 2], w[:, 1], -w[:, 0]
    skew = skew - skew.transpose(1, 2)
    return torch.linalg.matrix_exp(skew).to(dtype=dtype, device=device), torch.rad2deg(ang).to(dtype=dtype, device=device)


def local_step_deg(sampling: Sampling) -> float:
    """Lattice step of local searches: the fine step of the sampling's HEALPix order."""
    return angular_sampling_deg(int(sampling.healpix_order) + 1)


def _expectation_local(batch: ParticleBatch, model: EStepModel, sampling: Sampling, mask, stats: SufficientStats,
                       chunk_particles: int | None) -> tuple[SufficientStats, ParticleResult]:
    if model.ndim != 3 or sampling.healpix_order is None:
        raise ValueError("local searches need 3D maps and a HEALPix order")
    if batch.angles_deg is None:
        raise ValueError("local searches need the particles' previous angles (ParticleBatch.angles_deg)")
    device = batch.images.device
    n, box, _ = batch.images.shape
    k = model.ref_ft.shape[0]
    sigma = float(sampling.local_sigma_deg)
    deltas, ang = local_rotations(local_step_deg(sampling), 3 * sigma, device)
    log_prior = -(ang.double() ** 2) / (2 * sigma**2)
    trans = translation_grid(sampling.offset_range_px, sampling.offset_step_px / 2, dtype=torch.float32, device=device)
    freqs_all, _ = rfft_frequencies(box, device)
    idx_f = window_indices(box, model.current_size, device)
    idx_m = window_indices(box, model.current_size, device, include_dc=True)
    if chunk_particles is None:
        per_particle = k * len(deltas) * (6 * len(idx_f) + 4 * len(idx_m) + 3 * len(trans)) + 4 * len(trans) * len(idx_m)
        budget = chunk_budget(device)
        if torch.device(device).type == "cuda":
            budget = min(budget, LOCAL_CHUNK_BUDGET_CUDA)
        chunk_particles = max(1, min(n, budget // max(1, per_particle)))
    # back-projections of all chunks, Hermitian-completed once at the end
    raw = [torch.zeros_like(stats.data, dtype=torch.complex64), torch.zeros_like(stats.weight, dtype=torch.float32)]
    ref_channels = slices.channels(model.ref_ft)
    results = []
    for start in range(0, n, chunk_particles):
        sl = slice(start, min(n, start + chunk_particles))
        results.append(_local_chunk(batch.subset(sl), model, sampling, mask, stats, raw, ref_channels, deltas, log_prior,
                                    trans, idx_f, idx_m))
    for h in range(2):
        stats.data[h] += slices.hermitian_complete(raw[0][h], 3).to(stats.data.dtype)
        stats.weight[h] += slices.hermitian_complete(raw[1][h], 3).to(stats.weight.dtype)
    res = ParticleResult(*[torch.cat([getattr(r, f) for r in results]) for f in ParticleResult.__dataclass_fields__])
    return stats, res


def _project_rotations(ref_channels: torch.Tensor, rots: torch.Tensor, freqs: torch.Tensor, box: int, pad: int) -> torch.Tensor:
    """Slices ``(K, R, F)`` of every class at the rotations ``rots`` ``(R, 3, 3)``, in blocks."""
    block = max(1, 4 * COLUMN_BLOCK)
    out = [slices.project(ref_channels, rots[s : s + block], freqs, box, pad) for s in range(0, len(rots), block)]
    return torch.cat(out, 1)


def _local_chunk(batch: ParticleBatch, model: EStepModel, sampling: Sampling, mask, stats: SufficientStats,
                 raw: list[torch.Tensor], ref_channels: torch.Tensor, deltas: torch.Tensor, log_prior: torch.Tensor, trans: torch.Tensor, idx_f: torch.Tensor,
                 idx_m: torch.Tensor) -> ParticleResult:
    """Local searches of one chunk: every (class, nearby orientation, nearby translation) of each
    particle scored as batched GEMMs, significant orientations back-projected."""
    device = batch.images.device
    n, box, _ = batch.images.shape
    k = model.ref_ft.shape[0]
    n_j = len(deltas)
    kj = k * n_j
    freqs_all, shells_all = rfft_frequencies(box, device)
    f_f, f_m = freqs_all[idx_f], freqs_all[idx_m]
    rounded = batch.origin_px.round()
    frac = batch.origin_px - rounded
    shifted = integer_shift(batch.images, rounded)
    masked = soft_mask_background(shifted, mask) if mask is not None else shifted
    ph_frac = _phases(freqs_all, frac, box)  # (N, Fall): the sub-pixel part of the previous origin
    x_mask = centered_rfft2(masked).reshape(n, -1)
    x_full = centered_rfft2(shifted).reshape(n, -1) * ph_frac
    ctf_all = batch.ctf.reshape(n, -1)
    inv_s2_all = 1.0 / model.sigma2[batch.group][:, shells_all.clamp_max(model.sigma2.shape[1] - 1)]
    s_off2 = max(model.sigma_offset_px, 1e-3) ** 2

    prev = euler_to_matrix(batch.angles_deg[:, 0], batch.angles_deg[:, 1], batch.angles_deg[:, 2]).to(deltas.dtype)
    rots = (deltas[None] @ prev[:, None]).reshape(-1, 3, 3)  # (N*J, 3, 3)
    a = _project_rotations(ref_channels, rots, f_f, box, model.pad)  # (K, N*J, Ff)
    a = a.reshape(k, n, n_j, -1).transpose(0, 1).reshape(n, kj, -1)  # (N, K*J, Ff) column = class * J + j
    x_f = x_mask[:, idx_f] * ph_frac[:, idx_f]
    ctf_f, w_f = ctf_all[:, idx_f], inv_s2_all[:, idx_f]
    ph_f = _phases(f_f, trans, box)  # (T, Ff)
    p = (ctf_f * w_f * x_f)[:, None, :] * ph_f[None]  # (N, T, Ff)
    logw = _real_bmm(p, a)  # (N, T, KJ)
    del p
    a_pow = a.real**2 + a.imag**2  # (N, KJ, Ff)
    norm = torch.bmm(a_pow, (ctf_f**2 * w_f)[:, :, None]).squeeze(-1)  # (N, KJ)
    xnorm = ((x_f.real**2 + x_f.imag**2) * w_f).sum(-1)
    pos = rounded[:, None, :] + frac[:, None, :] + trans[None]  # (N, T, 2) total origins
    log_off = -(pos**2).sum(-1) / (2 * s_off2)
    col_prior = (model.log_class_prior.to(torch.float64)[:, None] + log_prior[None]).reshape(-1)  # (KJ,)
    logw -= 0.5 * (xnorm[:, None, None] + norm[:, None, :])
    logw += log_off[:, :, None]
    logw += col_prior.to(logw.dtype)[None, None, :]
    mx = logw.amax((1, 2))
    gam = torch.exp(logw - mx[:, None, None])
    del logw
    s_i = gam.sum((1, 2), dtype=torch.float64)
    log_norm = torch.log(2 * math.pi / w_f).sum(-1)
    ll = (mx.to(torch.float64) + torch.log(s_i)).to(xnorm.dtype) - log_norm
    # significant orientations: those holding adaptive_fraction of each particle's mass
    col_mass = gam.sum(1)  # (N, KJ)
    thr = row_threshold(col_mass, sampling.adaptive_fraction, sampling.max_significants)
    keep = (col_mass >= thr[:, None]) & (col_mass > 0)
    gam = gam * keep[:, None, :]
    gam = (gam.to(torch.float64) / gam.sum((1, 2), dtype=torch.float64)[:, None, None]).to(a_pow.dtype)
    n_sig = (gam > 0).sum((1, 2))
    flat = gam.reshape(n, -1)
    gmax, arg = flat.max(1)
    b_t, b_c = arg // kj, arg % kj
    best_rot = rots.reshape(n, n_j, 3, 3)[torch.arange(n, device=device), b_c % n_j]
    rot, tilt, psi = matrix_to_euler(best_rot.to(torch.float64))

    # statistics: per significant (particle, column) the posterior-weighted phased image
    col_w = gam.sum(1)  # (N, KJ)
    pn, pc = torch.nonzero(keep, as_tuple=True)
    dc_half = torch.where((f_m == 0).all(-1), 0.5, 1.0).to(x_f.real.dtype)
    c_m, w_m = ctf_all[:, idx_m], inv_s2_all[:, idx_m]
    q0 = c_m * w_m * x_full[:, idx_m] * dc_half  # (N, Fm)
    c2 = c_m**2 * w_m * dc_half
    ph_m = _phases(f_m, trans, box)  # (T, Fm)
    half = batch.half
    rots_nj = rots.reshape(n, n_j, 3, 3)
    for h in range(2):
        on = half[pn] == h
        hn, hc = pn[on], pc[on]
        for s in range(0, len(hn), COLUMN_BLOCK):
            bn, bc = hn[s : s + COLUMN_BLOCK], hc[s : s + COLUMN_BLOCK]
            # sum_t G_t (Q ph_t) = Q sum_t G_t ph_t: one GEMM, no (L, T, Fm) phased images
            z = q0[bn] * _weighted_sum(gam[bn, :, bc], ph_m)  # (L, Fm)
            wgt = col_w[bn, bc][:, None] * c2[bn]
            at = slices.sample_positions(rots_nj[bn, bc % n_j], f_m, box, model.pad)
            slices.scatter_positions([z.to(raw[0].dtype), wgt.to(raw[1].dtype)], bc // n_j, at, raw[0].shape[-1], k,
                                     out=[raw[0][h], raw[1][h]])
    for h in range(2):
        sel = half == h
        stats.class_weight[h] += col_w[sel].reshape(-1, k, n_j).sum((0, 2), dtype=torch.float64)
    # residual power and noise
    m = _weighted_sum(gam, a)  # (N, T, Ff)
    cross_pix = (x_f[:, None, :] * ph_f[None] * m.conj().resolve_conj()).real.sum(1)
    resid = (x_f.real**2 + x_f.imag**2) - 2 * ctf_f * cross_pix + ctf_f**2 * torch.bmm(col_w[:, None, :], a_pow).squeeze(1)
    _add_noise_power(stats, batch.group, resid, x_mask, idx_f, idx_m, freqs_all, shells_all)
    g_rows = gam.sum(2).to(torch.float64)  # (N, T)
    stats.offset_sq += (g_rows * (pos.to(torch.float64) ** 2).sum(-1)).sum()
    stats.offset_weight += g_rows.sum()
    stats.log_likelihood += ll.to(torch.float64).sum()
    stats.max_posterior += gmax.to(torch.float64).sum()
    stats.n_particles += n
    return ParticleResult(
        class_index=b_c // n_j,
        psi_deg=_wrap180(psi),
        rot_deg=_wrap180(rot),
        tilt_deg=tilt.to(torch.float32),
        origin_px=pos[torch.arange(n, device=device), b_t].to(torch.float32),
        max_posterior=gmax.to(torch.float32),
        n_significant=n_sig,
        log_likelihood=ll.to(torch.float32),
    )


def _add_noise_power(stats: SufficientStats, group: torch.Tensor, resid: torch.Tensor, x_mask: torch.Tensor,
                     idx_f: torch.Tensor, idx_m: torch.Tensor, freqs_all: torch.Tensor, shells_all: torch.Tensor) -> None:
    """Noise power per optics group and shell: the posterior-weighted residuals ``resid``
    ``(N, Ff)`` inside the fine window plus the image power ``x_mask`` ``(N, Fall)`` beyond the
    statistics window."""
    device = resid.device
    shells_f = shells_all[idx_f]
    beyond = torch.ones(len(shells_all), dtype=torch.bool, device=device)
    beyond[idx_m] = False
    beyond &= ~((freqs_all[:, 0] == 0) & (freqs_all[:, 1] < 0))
    beyond &= shells_all < n_shells_of(stats)
    pow_beyond = x_mask[:, beyond].abs() ** 2
    for g_ in torch.unique(group):
        sel = group == g_
        stats.noise_power[g_] += torch.zeros(n_shells_of(stats), dtype=torch.float64, device=device).index_add_(
            0, shells_f, resid[sel].sum(0).to(torch.float64)).index_add_(
            0, shells_all[beyond], pow_beyond[sel].sum(0).to(torch.float64))
        stats.noise_weight[g_] += sel.sum()


def _wrap180(angle_deg: torch.Tensor) -> torch.Tensor:
    """Angles in (-180, 180] (RELION's range for rot and psi of 3D refinements)."""
    return (180.0 - torch.remainder(180.0 - angle_deg, 360.0)).to(torch.float32)


def n_shells_of(stats: SufficientStats) -> int:
    return stats.noise_power.shape[1]
