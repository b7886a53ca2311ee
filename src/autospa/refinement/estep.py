"""The E-step shared by EM and VDAM, 2D (in-plane rotations) — DESIGN.md section 2.

For a batch of particles and K references it scores every (class, psi, translation) hypothesis
as batched matrix products, keeps the hypotheses holding the top ``adaptive_fraction`` of each
particle's probability mass (coarse pass), re-scores their children on a grid twice as fine in
psi and translation (fine pass), and returns additive sufficient statistics
(:class:`~autospa.refinement.statistics.SufficientStats`) plus each particle's best pose.

Likelihood (RELION, reference/relion-vdam.md section 2.3): for the half-plane Fourier pixels
``f`` inside the current window (DC and the duplicated ``kx = 0, ky < 0`` half column excluded)

    d2(i, k, psi, t) = sum_f |X_i(f) e^{-2 pi i f.t / D} - C_i(f) V_k(A(psi)^T f)|^2 / (2 sigma2_g(s(f)))

which expands to ``(|X|^2 - 2 Re<P_t, A> + <C^2, |A|^2>) / 2`` with ``P_t = C X e^{..} / sigma2``:
the cross term is one real GEMM ``(N*T, 2F) x (2F, K*R)`` and the norm term one GEMM
``(N, F) x (F, K*R)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from autospa.numerics import slice2d
from autospa.numerics.sampling import psi_grid, translation_grid
from autospa.refinement.statistics import SufficientStats


@dataclass(frozen=True)
class Sampling2D:
    """Sampling of one E-step.

    Attributes
    ----------
    psi_step_deg
        Coarse in-plane step; the fine pass uses half of it (oversampling 1).
    offset_range_px, offset_step_px
        Translation search around each particle's rounded previous origin; the fine pass uses
        half the step.
    perturb
        Random fraction of a coarse step added to every psi this iteration, in [-0.5, 0.5].
    adaptive_fraction
        Probability mass kept by the significance pruning (RELION 0.999).
    max_significants
        Cap on the number of significant coarse hypotheses per particle (0 = none).
    """

    psi_step_deg: float = 6.0
    offset_range_px: float = 5.0
    offset_step_px: float = 1.0
    perturb: float = 0.0
    adaptive_fraction: float = 0.999
    max_significants: int = 0


@dataclass
class EStepModel:
    """What the E-step needs of the model (broadcast to every task).

    Attributes
    ----------
    ref_ft
        ``(K, P*D, P*D)`` complex padded references (gridding pre-corrected).
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
    """

    images: torch.Tensor
    ctf: torch.Tensor
    origin_px: torch.Tensor
    group: torch.Tensor
    half: torch.Tensor


@dataclass
class ParticleResult:
    """Per-particle outputs of the E-step (all ``(N,)`` or ``(N, 2)``)."""

    class_index: torch.Tensor
    psi_deg: torch.Tensor
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
    ysc, xsc = ys.clamp(0, h - 1), xs.clamp(0, w - 1)
    out = images[torch.arange(n, device=images.device)[:, None, None], ysc[:, :, None], xsc[:, None, :]]
    return out * valid


def centered_rfft2(images: torch.Tensor) -> torch.Tensor:
    """``rfft2(norm="forward")`` with the phase origin at the box centre ``(D//2, D//2)``.

    References (:func:`autospa.numerics.slice2d.pad_reference_ft`) are transformed about the box
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
    if 0 < cap < weights.shape[1]:
        srt = torch.topk(weights, cap, dim=1, sorted=True).values  # the walk stops at the cap anyway
    else:
        srt, _ = torch.sort(weights, dim=1, descending=True)
    csum = torch.cumsum(srt.to(torch.float64), 1)
    first = (csum < fraction * total * (1 - 1e-12)).sum(1).clamp_max(srt.shape[1] - 1)
    return srt.gather(1, first[:, None]).squeeze(1)


def expectation_2d(
    batch: ParticleBatch,
    model: EStepModel,
    sampling: Sampling2D,
    mask: torch.Tensor | None,
    chunk_particles: int | None = None,
) -> tuple[SufficientStats, ParticleResult]:
    """Run the 2D E-step on a batch of particles.

    Parameters
    ----------
    batch
        The particles (``N`` images of box ``D``).
    model
        References, noise and priors (on any device: moved to the images' device).
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
        Per-particle best class, psi, origin, max posterior, number of significant samples and
        log-likelihood.
    """
    device = batch.images.device
    model = model.to(device)
    n, box, _ = batch.images.shape
    k = model.ref_ft.shape[0]
    n_groups, n_shells = model.sigma2.shape
    pd = model.ref_ft.shape[-1]
    stats = SufficientStats.zeros(2, k, pd, device=device, n_groups=n_groups, n_shells=n_shells)

    prep = _prepare(model, sampling, box, device)
    t_c, r_c = len(prep.trans_c), len(prep.psi_c)
    if chunk_particles is None:
        # floats of the largest blocks per particle: coarse (T, K*R) scores; fine (rows, cols)
        # scores and (rows, 2F) phased images, rows = 4 x the translations holding significant
        # hypotheses and cols = 2 x the significant (class, psi) pairs (all, or capped by maxsig)
        budget = 32_000_000
        cap = sampling.max_significants
        rows = 4 * (min(t_c, cap) if cap > 0 else t_c)
        cols = min(k * 2 * r_c, 2 * cap) if cap > 0 else k * 2 * r_c
        per_particle = max(t_c * k * r_c, rows * cols + rows * 2 * len(prep.idx_m))
        chunk_particles = max(1, min(n, budget // max(1, per_particle)))
    results = []
    for start in range(0, n, chunk_particles):
        sl = slice(start, min(n, start + chunk_particles))
        sub = ParticleBatch(batch.images[sl], batch.ctf[sl], batch.origin_px[sl], batch.group[sl], batch.half[sl])
        results.append(_expectation_chunk(sub, model, sampling, mask, prep, stats))
    res = ParticleResult(*[torch.cat([getattr(r, f) for r in results]) for f in ParticleResult.__dataclass_fields__])
    return stats, res


@dataclass
class _Prepared:
    """Grids, stencils and rotated references shared by every chunk of one E-step."""

    psi_c: torch.Tensor
    trans_c: torch.Tensor
    idx_c: torch.Tensor
    a_c: torch.Tensor  # (K*R, Fc)
    ph_c: torch.Tensor  # (T, Fc)
    psi_f: torch.Tensor
    idx_f: torch.Tensor
    a_flat: torch.Tensor  # (K*2R, Ff)
    trans_f: torch.Tensor  # (4T, 2) fine translations, children 4t..4t+3 of coarse t
    ph_f: torch.Tensor  # (4T, Ff) phases of the fine translations on the fine window
    ph_m: torch.Tensor  # (4T, Fm) the same on the statistics window
    a_pow: torch.Tensor  # (K*2R, Ff) |A|^2
    idx_m: torch.Tensor
    st_m: slice2d.Interp2D
    psi_step: float


def _prepare(model: EStepModel, sampling: Sampling2D, box: int, device) -> _Prepared:
    k = model.ref_ft.shape[0]
    pad = model.pad
    freqs_all, _ = rfft_frequencies(box, device)
    n_psi = len(psi_grid(sampling.psi_step_deg))
    step = 360.0 / n_psi
    psi_c = psi_grid(sampling.psi_step_deg, offset_deg=sampling.perturb * step, device=device)  # RELION's j * step
    trans_c = translation_grid(sampling.offset_range_px, sampling.offset_step_px, dtype=torch.float32, device=device)
    idx_c = window_indices(box, model.coarse_size, device)
    f_c = freqs_all[idx_c]
    a_c = slice2d.rotate_gather(model.ref_ft, slice2d.interpolation_stencil(psi_c, f_c, box, pad)).reshape(k * len(psi_c), -1)
    psi_f = torch.stack([psi_c - step / 4, psi_c + step / 4], 1).reshape(-1)  # (2R,) child 2r+j
    idx_f = window_indices(box, model.current_size, device)
    a_f = slice2d.rotate_gather(model.ref_ft, slice2d.interpolation_stencil(psi_f, freqs_all[idx_f], box, pad))
    a_flat = a_f.reshape(k * len(psi_f), -1)
    idx_m = window_indices(box, model.current_size, device, include_dc=True)
    st_m = slice2d.interpolation_stencil(psi_f, freqs_all[idx_m], box, pad)
    q = sampling.offset_step_px / 4
    child_t = torch.tensor([[-q, -q], [q, -q], [-q, q], [q, q]], device=device, dtype=trans_c.dtype)
    trans_f = (trans_c[:, None, :] + child_t[None]).reshape(-1, 2)
    return _Prepared(psi_c, trans_c, idx_c, a_c, _phases(f_c, trans_c, box), psi_f, idx_f, a_flat,
                     trans_f, _phases(freqs_all[idx_f], trans_f, box), _phases(freqs_all[idx_m], trans_f, box),
                     a_flat.real**2 + a_flat.imag**2, idx_m, st_m, step)


def _real_gemm(left: torch.Tensor, right_t: torch.Tensor) -> torch.Tensor:
    """``Re(left @ conj(right_t).T)`` for complex ``left`` (M, F) and ``right_t`` (C, F), as one
    real GEMM of width 2F; returns (M, C)."""
    return torch.cat([left.real, left.imag], -1) @ torch.cat([right_t.real, right_t.imag], -1).T


#: Fraction of a chunk's (class, psi) columns live in some particle above which the fine pass is
#: one shared GEMM instead of per-particle blocks.
DENSE_FINE_COLUMNS = 0.3


def _fine_dense(n, row_p, row_tf, colmask, pw_f, norm_f, xnorm_f, row_logoff, col_prior, x_f, q0, half, bsum, prep):
    """Fine pass by GEMMs over the rows: scores, data sums and residual cross terms.

    The element-wise work (priors, exponentials, normalisation) runs on the whole ``(U, K*2R)``
    block when most entries are live, and on the live entries only when few are.
    """
    device = pw_f.device
    ph_rows = prep.ph_f[row_tf]  # (U, Ff)
    cross = _real_gemm(pw_f[row_p] * ph_rows, prep.a_flat)  # (U, K*2R)
    n_rows, n_cols = cross.shape
    if float(colmask.sum()) > 0.25 * colmask.numel():
        logw = cross
        logw -= 0.5 * (xnorm_f[row_p, None] + norm_f[row_p])
        logw += row_logoff[:, None] + col_prior[None, :]
        logw.masked_fill_(~colmask, -torch.inf)
        row_max, row_arg = logw.max(1)
        mx = torch.full((n,), -torch.inf, device=device, dtype=logw.dtype).scatter_reduce(0, row_p, row_max, reduce="amax")
        gam = torch.exp(logw - mx[row_p, None])
        del logw, cross
        s_i = torch.zeros(n, device=device, dtype=torch.float64).index_add_(0, row_p, gam.sum(1, dtype=torch.float64))
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
        g_e = torch.exp(logw - mx[e_p])
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
        qr = q0[row_p[rows]] * prep.ph_m[row_tf[rows]]  # (U_h, Fm)
        g_h = gam[rows]
        bsum[h] += torch.complex(g_h.T @ qr.real, g_h.T @ qr.imag)
    m_rows = torch.complex(gam @ prep.a_flat.real, gam @ prep.a_flat.imag)  # (U, Ff) posterior-mean reference
    cross_pix = torch.zeros_like(x_f.real).index_add_(0, row_p, (x_f[row_p] * ph_rows * torch.conj(m_rows)).real)
    return mx, s_i, best_row, best_col, gmax, g_part, cross_pix, gam.sum(1, dtype=torch.float64)


def _fine_blocks(n, row_p, row_tf, colmask, pw_f, norm_f, xnorm_f, row_logoff, col_prior, x_f, q0, half, bsum, prep):
    """Fine pass as per-particle blocks: batched GEMMs over each particle's live rows and columns.

    A particle's rows are its fine translations (children of coarse translations holding a
    significant hypothesis); its columns are the (class, fine psi) children of its significant
    (class, psi) pairs. Scores, posterior-weighted data sums and posterior-mean references are
    batched matrix products over ``(N, rows, columns)`` blocks padded to the largest particle of
    the chunk, so the work follows the posterior's support, not the whole grid.

    Returns
    -------
    tuple
        ``mx, s_i (N,)``: max log-weight and sum of weights per particle; ``best_row (N,)`` index
        into the rows, ``best_col (N,)`` column; ``gmax (N,)``; ``g_part (N, K*2R)`` posterior per
        particle and column; ``cross_pix (N, Ff)`` posterior-weighted ``Re(X_t conj(A))``;
        ``g_rows (U,)`` posterior per row. The data sums are added to ``bsum (2, K*2R, Fm)``.
    """
    device = pw_f.device
    n_rows, n_cols = colmask.shape
    rdt = x_f.real.dtype
    # rows of each particle (row_p is sorted by particle)
    r_cnt = torch.bincount(row_p, minlength=n)
    r_start = torch.cumsum(r_cnt, 0) - r_cnt
    u_max = int(r_cnt.max()) if n_rows else 1
    r_local = torch.arange(n_rows, device=device) - r_start[row_p]
    rows = torch.full((n, u_max), -1, device=device, dtype=torch.long)
    rows[row_p, r_local] = torch.arange(n_rows, device=device)
    # live columns of each particle
    live = torch.zeros(n, n_cols, dtype=torch.int32, device=device).index_add_(0, row_p, colmask.to(torch.int32)) > 0
    c_p, c_c = torch.nonzero(live, as_tuple=True)
    c_cnt = live.sum(1)
    c_start = torch.cumsum(c_cnt, 0) - c_cnt
    c_max = max(1, int(c_cnt.max()))
    cols = torch.zeros(n, c_max, device=device, dtype=torch.long)
    col_ok = torch.zeros(n, c_max, device=device, dtype=torch.bool)
    c_local = torch.arange(len(c_p), device=device) - c_start[c_p]
    cols[c_p, c_local] = c_c
    col_ok[c_p, c_local] = True
    row_ok = rows >= 0
    rows_c = rows.clamp_min(0)
    emask = colmask[rows_c[:, :, None], cols[:, None, :]] & row_ok[:, :, None] & col_ok[:, None, :]  # (N, u, c)

    ph = prep.ph_f[row_tf[rows_c]]  # (N, u, Ff)
    p_blk = pw_f[:, None, :] * ph
    a_blk = prep.a_flat[cols]  # (N, c, Ff)
    logw = torch.bmm(torch.cat([p_blk.real, p_blk.imag], -1), torch.cat([a_blk.real, a_blk.imag], -1).transpose(1, 2))
    del p_blk
    ar = torch.arange(n, device=device)[:, None]
    logw -= 0.5 * (xnorm_f[:, None, None] + norm_f[ar, cols][:, None, :])
    logw += row_logoff[rows_c][:, :, None] + col_prior[cols][:, None, :]
    logw.masked_fill_(~emask, -torch.inf)
    flat = logw.reshape(n, -1)
    mx, arg = flat.max(1)
    gam = torch.exp(logw - mx[:, None, None])  # (N, u, c); dead entries 0
    del logw, flat
    s_i = gam.sum((1, 2), dtype=torch.float64)
    gam /= s_i[:, None, None].to(gam.dtype)
    best_row = rows_c[torch.arange(n, device=device), arg // c_max]
    best_col = cols[torch.arange(n, device=device), arg % c_max]
    gmax = gam.reshape(n, -1)[torch.arange(n, device=device), arg]
    # posterior per particle and column, per row
    g_part = torch.zeros(n, n_cols, device=device, dtype=gam.dtype)
    g_part.scatter_add_(1, cols, gam.sum(1))
    g_rows = torch.zeros(n_rows, device=device, dtype=torch.float64)
    g_rows[rows_c[row_ok]] = gam.sum(2, dtype=torch.float64)[row_ok]
    # data sums: Z[i, c] = sum_u G[i, u, c] Q[i, u]  then scattered to the columns' rows of bsum
    qr = q0[:, None, :] * prep.ph_m[row_tf[rows_c]]  # (N, u, Fm)
    gt = gam.transpose(1, 2)  # (N, c, u)
    z = torch.complex(torch.bmm(gt, qr.real), torch.bmm(gt, qr.imag))  # (N, c, Fm)
    del qr
    key = half[:, None] * n_cols + cols  # (N, c)
    bsum.view(-1, bsum.shape[-1]).index_add_(0, key[col_ok], z[col_ok])
    # posterior-mean reference per row, for the residual power
    m = torch.complex(torch.bmm(gam, a_blk.real), torch.bmm(gam, a_blk.imag))  # (N, u, Ff)
    cross_pix = ((x_f[:, None, :] * ph * torch.conj(m)).real * row_ok[:, :, None]).sum(1)
    return mx, s_i, best_row, best_col, gmax, g_part, cross_pix.to(rdt), g_rows


def _expectation_chunk(batch, model, sampling, mask, prep: _Prepared, stats) -> ParticleResult:
    device = batch.images.device
    n, box, _ = batch.images.shape
    k = model.ref_ft.shape[0]
    freqs_all, shells_all = rfft_frequencies(box, device)
    rounded = batch.origin_px.round()
    trans_c, psi_c = prep.trans_c, prep.psi_c

    # --- image preparation: shift by +round(origin), mask, FFT (RELION section 2.1)
    shifted = integer_shift(batch.images, rounded)
    masked = soft_mask_background(shifted, mask) if mask is not None else shifted
    x_mask = centered_rfft2(masked).reshape(n, -1)
    x_full = centered_rfft2(shifted).reshape(n, -1)
    ctf_all = batch.ctf.reshape(n, -1)
    inv_s2_all = 1.0 / model.sigma2[batch.group][:, shells_all.clamp_max(model.sigma2.shape[1] - 1)]  # (N, Fall)
    log_prior_k = model.log_class_prior
    s_off2 = max(model.sigma_offset_px, 1e-3) ** 2

    # --- coarse pass: every (translation, class, psi) as one GEMM
    idx_c, a_c = prep.idx_c, prep.a_c
    x_c, ctf_c, w_c = x_mask[:, idx_c], ctf_all[:, idx_c], inv_s2_all[:, idx_c]
    r_n, t_c = len(psi_c), len(trans_c)
    p_c = ((ctf_c * w_c * x_c)[:, None, :] * prep.ph_c[None]).reshape(n * t_c, -1)  # (N*T, Fc)
    cross = _real_gemm(p_c, a_c).reshape(n, t_c, -1)  # (N, T, KR)
    del p_c
    norm = (ctf_c**2 * w_c) @ (a_c.real**2 + a_c.imag**2).T  # (N, KR)
    xnorm = ((x_c.real**2 + x_c.imag**2) * w_c).sum(-1)  # (N,)
    log_off = -((rounded[:, None, :] + trans_c[None]) ** 2).sum(-1) / (2 * s_off2)  # (N, T)
    logw = cross - 0.5 * (xnorm[:, None, None] + norm[:, None, :]) + log_off[:, :, None]
    logw += log_prior_k.repeat_interleave(r_n)[None, None, :]
    del cross
    logw = logw.reshape(n, -1)
    w = torch.exp(logw - logw.amax(1, keepdim=True))  # (N, T*KR)
    del logw
    thr = row_threshold(w, sampling.adaptive_fraction, sampling.max_significants)
    sig = (w >= thr[:, None]) & (w > 0)
    n_sig = sig.sum(1)
    sig = sig.reshape(n, t_c, k, r_n)
    del w

    # --- fine pass: children (2 psi x 4 translations) of the significant coarse hypotheses.
    # Rows are (particle, fine translation) pairs whose parent translation holds a significant
    # hypothesis; columns are all (class, fine psi); entries whose parent (class, psi) was not
    # significant are out. Dense rows (broad posteriors, EM's first iterations) are scored as one
    # GEMM; sparse ones (sharp posteriors, or VDAM's significance cap) entry by entry.
    idx_f, psi_f = prep.idx_f, prep.psi_f
    r_f = len(psi_f)
    x_f, ctf_f, w_f = x_mask[:, idx_f], ctf_all[:, idx_f], inv_s2_all[:, idx_f]
    par_p, par_t = torch.nonzero(sig.any(-1).any(-1), as_tuple=True)  # parent rows
    row_p = par_p.repeat_interleave(4)
    row_tf = (par_t[:, None] * 4 + torch.arange(4, device=device)[None]).reshape(-1)  # index into prep.trans_f
    row_t = prep.trans_f[row_tf]  # (U, 2)
    colmask = sig[par_p, par_t].repeat_interleave(2, dim=-1).reshape(len(par_p), 1, -1).expand(-1, 4, -1)
    colmask = colmask.reshape(len(row_p), -1)  # (U, K*2R)
    pw_f = ctf_f * w_f * x_f  # (N, Ff)
    norm_f = (ctf_f**2 * w_f) @ prep.a_pow.T  # (N, K*2R)
    xnorm_f = ((x_f.real**2 + x_f.imag**2) * w_f).sum(-1)  # (N,)
    row_logoff = -((rounded[row_p] + row_t) ** 2).sum(-1) / (2 * s_off2)  # (U,)
    col_prior = log_prior_k.repeat_interleave(r_f)  # (K*2R,)

    # data for the statistics
    idx_m = prep.idx_m
    f_m = freqs_all[idx_m]
    dc_half = torch.where((f_m == 0).all(-1), 0.5, 1.0).to(x_f.real.dtype)  # DC is completed twice
    c_m, w_m = ctf_all[:, idx_m], inv_s2_all[:, idx_m]
    q0 = c_m * w_m * x_full[:, idx_m] * dc_half  # (N, Fm) unmasked image, for the reconstruction
    c2 = c_m**2 * w_m * dc_half  # (N, Fm)
    bsum = torch.zeros(2, k * r_f, len(idx_m), dtype=q0.dtype, device=device)

    # Most columns live (broad posteriors: EM's first iterations): one GEMM shared by all rows;
    # otherwise per-particle blocks that follow each posterior's support.
    live_cols = torch.zeros(n, colmask.shape[1], dtype=torch.int32, device=device).index_add_(
        0, row_p, colmask.to(torch.int32)) > 0
    fine_pass = _fine_dense if float(live_cols.sum(1).max()) > DENSE_FINE_COLUMNS * colmask.shape[1] else _fine_blocks
    fine = fine_pass(n, row_p, row_tf, colmask, pw_f, norm_f, xnorm_f, row_logoff, col_prior, x_f, q0, batch.half, bsum, prep)
    mx, s_i, best_row, best_col, gmax, g_part, cross_pix, g_rows = fine

    log_norm = torch.log(2 * math.pi / w_f).sum(-1)  # sum over the window of log(2 pi sigma2)
    ll = (mx.to(torch.float64) + torch.log(s_i)).to(xnorm_f.dtype) - log_norm
    for h in range(2):
        parts = batch.half == h
        if not bool(parts.any()):
            continue
        f_h = g_part[parts].T @ c2[parts]  # (K*2R, Fm)
        stats.data[h] += slice2d.hermitian_complete(slice2d.rotate_scatter(bsum[h].reshape(k, r_f, -1), prep.st_m)).to(stats.data.dtype)
        stats.weight[h] += slice2d.hermitian_complete(slice2d.rotate_scatter(f_h.reshape(k, r_f, -1), prep.st_m)).to(stats.weight.dtype)
        stats.class_weight[h] += g_part[parts].reshape(-1, k, r_f).sum((0, 2)).to(torch.float64)
    # residual power |X_t - C A|^2 = |X|^2 - 2 C Re(X_t conj(A)) + C^2 |A|^2, posterior-weighted
    resid = (x_f.real**2 + x_f.imag**2) * g_part.sum(1, keepdim=True) - 2 * ctf_f * cross_pix + ctf_f**2 * (g_part @ prep.a_pow)
    # noise power per group and shell: residuals inside the window + image power beyond it
    shells_f = shells_all[idx_f]
    beyond = torch.ones(len(shells_all), dtype=torch.bool, device=device)
    beyond[window_indices(box, model.current_size, device, include_dc=True)] = False
    beyond &= ~((freqs_all[:, 0] == 0) & (freqs_all[:, 1] < 0))
    beyond &= shells_all < n_shells_of(stats)
    pow_beyond = x_mask[:, beyond].abs() ** 2
    for g_ in torch.unique(batch.group):
        sel = batch.group == g_
        stats.noise_power[g_] += torch.zeros(n_shells_of(stats), dtype=torch.float64, device=device).index_add_(
            0, shells_f, resid[sel].sum(0).to(torch.float64)).index_add_(
            0, shells_all[beyond], pow_beyond[sel].sum(0).to(torch.float64))
        stats.noise_weight[g_] += sel.sum()
    stats.offset_sq += (g_rows * ((rounded[row_p] + row_t).to(torch.float64) ** 2).sum(-1)).sum()
    stats.offset_weight += g_rows.sum()
    stats.log_likelihood += ll.to(torch.float64).sum()
    stats.max_posterior += gmax.to(torch.float64).sum()
    stats.n_particles += n
    return ParticleResult(
        class_index=best_col // r_f,
        psi_deg=torch.remainder(psi_f[best_col % r_f], 360.0).to(torch.float32),
        origin_px=(rounded + prep.trans_f[row_tf[best_row]]).to(torch.float32),
        max_posterior=gmax.to(torch.float32),
        n_significant=n_sig,
        log_likelihood=ll.to(torch.float32),
    )


def n_shells_of(stats: SufficientStats) -> int:
    return stats.noise_power.shape[1]
