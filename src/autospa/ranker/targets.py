"""Target scores of the class ranker from simulator truth (L2, pure torch).

RELION's training targets (``getClassScoreFromJobScore``, reference/relion-schemes-and-ranker.md
B10) combine a human **job score** in [0, 1], a per-class **category** (RELION's colour codes in
``backup_selection.star``: 1 red = best, 5 magenta, 2 green, 3 blue / 4 cyan, 6 yellow / 0 = worst)
and a **resolution term** ``w = (minRes / d)^2``, minRes being the best resolution among the job's
category-1 classes::

    target = (0.75 + 0.25 w) * job_score    category 1
             (0.50 + 0.25 w) * job_score    category 5
             (0.25 + 0.25 w) * job_score    category 2
             (0.00 + 0.25 w) * job_score    category 3 or 4
             0                              category 6 or 0

Here the human is replaced by the simulator's truth:

- a class's **quality** is measured by its purity (share of its particles that are real particles
  of its majority structure) and by how well its average matches that structure's true 2D
  projection (:func:`template_match`: normalised cross-correlation, maximised over in-plane
  rotations and shifts, both low-pass filtered);
- :func:`class_categories` turns (purity, match) into RELION's categories with the thresholds of
  :data:`CATEGORY_RULES`;
- :func:`job_score_from_truth` scores a job by its best class's match, scaled down by the junk
  fraction of its particles (a human scores a 2D job by how good its best classes look and how
  much of the data is usable).

Differences from RELION: ``w`` is capped at 1 (RELION's is unbounded when a non-red class has a
better resolution than the best red one, or when no class is red, where minRes = 999), so targets
stay in [0, 1]; without category-1 classes minRes is the best resolution of the job's scored classes.
"""

from __future__ import annotations

import math

import torch

#: RELION's category codes, best first.
CATEGORY_ORDER = (1, 5, 2, 3, 0)
#: (category, minimum purity, minimum template match), tried in order; otherwise category 0.
CATEGORY_RULES: tuple[tuple[int, float, float], ...] = ((1, 0.8, 0.8), (5, 0.65, 0.65), (2, 0.5, 0.5), (3, 0.35, 0.35))
#: Base of the target per category (RELION).
CATEGORY_BASE = {1: 0.75, 5: 0.5, 2: 0.25, 3: 0.0, 4: 0.0}
#: Job score: best-class template match mapped linearly from JOB_MATCH_LOW (score 0) to JOB_MATCH_HIGH (1).
JOB_MATCH_LOW = 0.45
JOB_MATCH_HIGH = 0.9


def _soft_disc(n: int, radius: float, edge: float, device, dtype) -> torch.Tensor:
    ax = torch.arange(n, device=device, dtype=dtype) - n // 2
    r = torch.sqrt(ax[:, None] ** 2 + ax[None, :] ** 2)
    return torch.clamp((radius + edge - r) / edge, 0.0, 1.0)


def _prepare(images: torch.Tensor, mask: torch.Tensor, lowpass_sigma_freq: float) -> torch.Tensor:
    n = images.shape[-1]
    f = torch.fft.fftfreq(n, device=images.device, dtype=images.dtype)
    fr = torch.fft.rfftfreq(n, device=images.device, dtype=images.dtype)
    g = torch.exp(-(f[:, None] ** 2 + fr[None, :] ** 2) / (2 * lowpass_sigma_freq**2))
    x = torch.fft.irfft2(torch.fft.rfft2(images) * g, s=(n, n))
    w = mask.sum()
    mean = (x * mask).sum((-2, -1), keepdim=True) / w
    return (x - mean) * mask


def template_match(classes: torch.Tensor, templates: torch.Tensor, radius_px: float, pixel_size_a: float,
                   lowpass_a: float = 20.0, n_angles: int = 72, max_shift_px: float | None = None) -> torch.Tensor:
    """Normalised cross-correlation of every class average with every true template, maximised
    over in-plane rotations and shifts.

    Parameters
    ----------
    classes
        ``(K, n, n)`` class averages.
    templates
        ``(S, n, n)`` true 2D projections (same pixel size and box).
    radius_px
        Mask radius (the job's mask diameter / 2, in pixels).
    pixel_size_a
        Pixel size (Angstrom).
    lowpass_a
        Gaussian low-pass applied to both (Angstrom, at the Gaussian's sigma).
    n_angles
        In-plane rotations tried (uniform over 360 degrees).
    max_shift_px
        Largest shift tried (default ``n / 4``).

    Returns
    -------
    torch.Tensor
        ``(K, S)`` correlations in [-1, 1] (0 for a flat image).
    """
    dtype = torch.float32
    classes = classes.to(dtype)
    templates = templates.to(device=classes.device, dtype=dtype)
    k, n = classes.shape[0], classes.shape[-1]
    s = templates.shape[0]
    mask = _soft_disc(n, radius_px, 3.0, classes.device, dtype)
    sigma = pixel_size_a / lowpass_a
    c = _prepare(classes, mask, sigma)
    ang = torch.arange(n_angles, device=classes.device, dtype=dtype) * (2 * math.pi / n_angles)
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.zeros(n_angles, 2, 3, device=classes.device, dtype=dtype)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    grid = torch.nn.functional.affine_grid(theta, [n_angles, 1, n, n], align_corners=False)
    rot = torch.nn.functional.grid_sample(
        templates[:, None].repeat_interleave(n_angles, 0), grid.repeat(s, 1, 1, 1), align_corners=False, padding_mode="zeros"
    )[:, 0]
    t = _prepare(rot, mask, sigma)  # (S*A, n, n)
    cc = torch.fft.irfft2(torch.fft.rfft2(c)[:, None] * torch.conj(torch.fft.rfft2(t))[None], s=(n, n))  # (K, S*A, n, n)
    sh = torch.fft.fftfreq(n, 1.0 / n, device=classes.device)
    lim = n / 4 if max_shift_px is None else max_shift_px
    allowed = (sh[:, None] ** 2 + sh[None, :] ** 2) <= lim**2
    cc = torch.where(allowed, cc, torch.tensor(-math.inf, device=cc.device))
    best = cc.amax((-2, -1))
    norm = torch.sqrt((c**2).sum((-2, -1)))[:, None] * torch.sqrt((t**2).sum((-2, -1)))[None]
    ncc = torch.where(norm > 0, best / norm.clamp_min(1e-30), torch.zeros_like(best))
    return ncc.reshape(k, s, n_angles).amax(-1).clamp(-1.0, 1.0)


def class_categories(purity: torch.Tensor, match: torch.Tensor) -> torch.Tensor:
    """RELION category codes ``(K,)`` int64 from purity and template match ``(K,)`` (rules in
    :data:`CATEGORY_RULES`)."""
    out = torch.zeros(purity.shape, dtype=torch.int64, device=purity.device)
    done = torch.zeros(purity.shape, dtype=torch.bool, device=purity.device)
    for code, p_min, m_min in CATEGORY_RULES:
        hit = (~done) & (purity >= p_min) & (match >= m_min)
        out[hit] = code
        done |= hit
    return out


def job_score_from_truth(best_match: float, real_fraction: float) -> float:
    """A job score in [0, 1]: the best class's template match mapped from
    :data:`JOB_MATCH_LOW` -> 0 to :data:`JOB_MATCH_HIGH` -> 1, times ``0.5 + 0.5 * real_fraction``
    (the share of the job's particles that are real)."""
    q = (best_match - JOB_MATCH_LOW) / (JOB_MATCH_HIGH - JOB_MATCH_LOW)
    return float(min(1.0, max(0.0, q)) * (0.5 + 0.5 * min(1.0, max(0.0, real_fraction))))


def target_scores(categories: torch.Tensor, resolution_a: torch.Tensor, job_score: float, scored: torch.Tensor | None = None) -> torch.Tensor:
    """RELION's target class scores (``getClassScoreFromJobScore``) with ``w`` capped at 1.

    Parameters
    ----------
    categories
        ``(K,)`` category codes (1, 5, 2, 3, 4, 6, 0).
    resolution_a
        ``(K,)`` estimated resolution of each class (Angstrom).
    job_score
        In [0, 1].
    scored
        ``(K,)`` bool: classes that get a target (minRes is taken over these); default all.

    Returns
    -------
    torch.Tensor
        ``(K,)`` float64 targets.
    """
    res = resolution_a.to(torch.float64)
    scored = torch.ones_like(categories, dtype=torch.bool) if scored is None else scored
    red = scored & (categories == 1)
    pool = red if bool(red.any()) else scored
    min_res = float(res[pool].min()) if bool(pool.any()) else 999.0
    w = torch.clamp((min_res / res.clamp_min(1e-6)) ** 2, max=1.0)
    base = torch.zeros_like(res)
    has = torch.zeros_like(categories, dtype=torch.bool)
    for code, b in CATEGORY_BASE.items():
        sel = categories == code
        base[sel] = b
        has |= sel
    return torch.where(has, (base + 0.25 * w) * job_score, torch.zeros_like(res))


__all__ = ["CATEGORY_RULES", "class_categories", "job_score_from_truth", "target_scores", "template_match"]
