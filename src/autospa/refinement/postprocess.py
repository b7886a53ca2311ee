"""Post-processing of two half maps: masked FSC with phase-randomisation correction, B-factor
sharpening and FSC weighting (relion_postprocess; L2, pure torch, no files).

Steps (RELION's src/postprocessing.cpp, with its defaults):

1. ``fsc_unmasked`` = FSC(half1, half2); ``fsc_masked`` = FSC(mask * half1, mask * half2).
2. ``randomize_at`` = the first shell (from 1) where the *unmasked* FSC drops below 0.8
   (``--randomize_at_fsc``). Both half maps get random phases beyond that shell (the same random
   phases for both, as RELION draws one set per map with the same seed), are masked, and give
   ``fsc_random_masked``.
3. Corrected FSC (Chen et al. 2013): ``fsc_masked`` below ``randomize_at + 2``; beyond it
   ``(fsc_masked - fsc_random) / (1 - fsc_random)``.
4. Final resolution: RELION's rule, the last shell before the corrected FSC first drops below
   0.143: ``box * pixel / i`` (no interpolation). If the unmasked FSC reaches further than the
   corrected one, RELION distrusts the mask and uses the unmasked FSC (unless ``force_mask``).
5. Sharpening of the average of the unmasked half maps: FSC weighting
   ``sqrt(2 FSC / (1 + FSC))`` (Rosenthal & Henderson 2003; zero from the first shell where the FSC
   falls below 1e-4), then ``exp(-B s^2 / 4)`` with ``B`` from ``--adhoc_bfac`` or ``--autob``
   (a straight line through the Guinier plot ``ln(mean |F|)`` against ``s^2 = 1/d^2`` of the
   FSC-weighted map between 10 A and the final resolution; ``B = 4 * slope``, negative for a map
   that needs sharpening), then a raised-cosine low-pass at the final resolution (2 shells wide).

Scales and shells are those of :mod:`autospa.numerics.fourier` (shell ``round(|k| box)``,
``s = i / (box * pixel)``), the same as RELION's.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from autospa.numerics.fourier import fftfreq_3d, irfftn3, radial_average_3d, rfftn3, shell_index_3d
from autospa.numerics.fsc import fsc as fsc_curve
from autospa.numerics.fsc import shell_frequencies

log = logging.getLogger(__name__)

__all__ = [
    "PostprocessOptions",
    "PostprocessResult",
    "first_shell_below",
    "relion_resolution",
    "randomize_phases_beyond",
    "corrected_fsc",
    "guinier_plot",
    "fit_bfactor",
    "fsc_weight",
    "apply_bfactor",
    "low_pass",
    "postprocess_halves",
]


@dataclass(frozen=True)
class PostprocessOptions:
    """relion_postprocess's options.

    Attributes
    ----------
    pixel_size_a
        Pixel size in Angstrom (``--angpix``).
    auto_bfactor
        Estimate the B-factor from the Guinier plot (``--autob``).
    adhoc_bfactor
        B-factor to apply when ``auto_bfactor`` is off (``--adhoc_bfac``, negative sharpens; 0: none).
    autob_lowres_a
        Low-resolution end of the Guinier fit (``--autob_lowres``, 10 A).
    autob_highres_a
        High-resolution end (``--autob_highres``; 0: the final resolution).
    randomize_at_fsc
        Phase randomisation starts where the unmasked FSC drops below this (``--randomize_at_fsc``).
    skip_fsc_weighting
        Skip the FSC weighting and low-pass at ``low_pass_a`` instead (``--skip_fsc_weighting``).
    low_pass_a
        Low-pass resolution with ``skip_fsc_weighting`` (``--low_pass``; 0: the final resolution).
    filter_edge_shells
        Width of the low-pass edge in shells (RELION: 2).
    force_mask
        Keep the masked FSC even where the unmasked one reaches a better resolution
        (``--force_mask``).
    seed
        Seed of the random phases.
    """

    pixel_size_a: float
    auto_bfactor: bool = False
    adhoc_bfactor: float = 0.0
    autob_lowres_a: float = 10.0
    autob_highres_a: float = 0.0
    randomize_at_fsc: float = 0.8
    skip_fsc_weighting: bool = False
    low_pass_a: float = 0.0
    filter_edge_shells: float = 2.0
    force_mask: bool = False
    seed: int = 0


@dataclass(frozen=True)
class PostprocessResult:
    """Everything relion_postprocess reports.

    Attributes
    ----------
    final_resolution_a
        rlnFinalResolution.
    bfactor
        rlnBfactorUsedForSharpening.
    randomize_from_a
        rlnRandomiseFrom (Angstrom of the first phase-randomised shell; 0 if none).
    randomize_at_shell
        That shell (0 if no randomisation).
    fsc_unmasked, fsc_masked, fsc_random_masked, fsc_corrected
        ``(S,)`` float64 curves, ``S = box // 2 + 1``.
    guinier_s2, guinier_in, guinier_weighted, guinier_sharpened
        ``(S,)`` Guinier plots ``ln(mean |F|)`` against ``s^2`` (1/A^2) of the average map, the
        FSC-weighted map and the sharpened map (NaN where a shell has no amplitude).
    fit_slope, fit_intercept, fit_corr
        The Guinier fit (NaN without ``auto_bfactor``).
    mask_used
        Whether the corrected FSC comes from the masked maps (False: no mask, or RELION's fallback
        to the unmasked FSC).
    warnings
        Messages RELION would print as warnings (also logged).
    sharpened, sharpened_masked
        ``(D, D, D)`` postprocess.mrc and postprocess_masked.mrc.
    """

    final_resolution_a: float
    bfactor: float
    randomize_from_a: float
    randomize_at_shell: int
    fsc_unmasked: torch.Tensor
    fsc_masked: torch.Tensor
    fsc_random_masked: torch.Tensor
    fsc_corrected: torch.Tensor
    guinier_s2: torch.Tensor
    guinier_in: torch.Tensor
    guinier_weighted: torch.Tensor
    guinier_sharpened: torch.Tensor
    fit_slope: float
    fit_intercept: float
    fit_corr: float
    mask_used: bool
    warnings: tuple[str, ...]
    sharpened: torch.Tensor = field(repr=False)
    sharpened_masked: torch.Tensor = field(repr=False)


# --------------------------------------------------------------------------------------------
# curves
# --------------------------------------------------------------------------------------------


def first_shell_below(curve: torch.Tensor, threshold: float) -> int:
    """First shell ``i >= 1`` with ``curve[i] < threshold``; ``len(curve)`` if there is none."""
    c = torch.as_tensor(curve).reshape(-1)
    below = torch.nonzero(c[1:] < threshold).reshape(-1)
    return int(below[0]) + 1 if below.numel() else c.numel()


def relion_resolution(curve: torch.Tensor, box: int, pixel_size_a: float, threshold: float = 0.143) -> float:
    """RELION's resolution: ``box * pixel / i`` of the last shell before the curve drops below ``threshold``.

    Parameters
    ----------
    curve
        ``(box // 2 + 1,)`` FSC.

    Returns
    -------
    float
        Angstrom; 999 if shell 1 is already below the threshold (RELION's value).
    """
    i = first_shell_below(curve, threshold)
    return 999.0 if i <= 1 else box * pixel_size_a / (i - 1)


def randomize_phases_beyond(vol: torch.Tensor, shell: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace the phases of every Fourier component at shell >= ``shell`` by random ones.

    The random phases are those of the transform of real white noise, so the result is real
    (Hermitian symmetry kept); amplitudes are unchanged.

    Parameters
    ----------
    vol
        ``(D, D, D)`` real map.
    shell
        First randomised shell (``round(|k| * D)``).
    generator
        Source of the random phases (CPU generator; the noise is moved to ``vol``'s device).

    Returns
    -------
    torch.Tensor
        ``(D, D, D)`` real map, dtype of ``vol`` (float32 at least).
    """
    box = vol.shape[-1]
    work = vol.float() if vol.dtype in (torch.float16, torch.bfloat16) else vol
    ft = rfftn3(work)
    noise = torch.randn(work.shape, generator=generator, dtype=work.dtype).to(vol.device)
    nft = rfftn3(noise)
    phase = nft / nft.abs().clamp_min(1e-30)
    sh = shell_index_3d(box, rfft=True, device=vol.device)
    out = torch.where(sh >= shell, ft.abs() * phase, ft)
    return irfftn3(out, box).to(work.dtype)


def corrected_fsc(fsc_masked: torch.Tensor, fsc_random: torch.Tensor, randomize_at: int) -> torch.Tensor:
    """RELION's calculateFSCtrue: ``(fsc_t - fsc_n) / (1 - fsc_n)`` from shell ``randomize_at + 2`` on.

    RELION starts the correction two shells beyond the first randomised one ("because of small
    artefacts near the resolution of randomisation").

    Parameters
    ----------
    fsc_masked, fsc_random
        ``(S,)`` masked FSC of the maps and of the phase-randomised maps.
    randomize_at
        First randomised shell.

    Returns
    -------
    torch.Tensor
        ``(S,)`` float64.
    """
    t = torch.as_tensor(fsc_masked, dtype=torch.float64).clone()
    n = torch.as_tensor(fsc_random, dtype=torch.float64).clone()
    if float(t[0]) <= 0.0:
        t[0] = 1.0
    if float(n[0]) <= 0.0:
        n[0] = 1.0
    idx = torch.arange(t.numel(), device=t.device)
    corr = (t - n) / (1.0 - n).clamp_min(1e-12)
    return torch.where(idx < randomize_at + 2, t, corr)


def guinier_plot(vol: torch.Tensor, pixel_size_a: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Guinier plot of a map: ``ln(mean_{shell} |F|)`` against ``s^2``.

    Parameters
    ----------
    vol
        ``(D, D, D)`` map.
    pixel_size_a
        Pixel size in Angstrom.

    Returns
    -------
    s2 : torch.Tensor
        ``(D // 2 + 1,)`` float64 squared spatial frequency (1/A^2) per shell.
    ln_f : torch.Tensor
        ``(D // 2 + 1,)`` float64 log mean amplitude (NaN where the mean amplitude is 0).
    """
    box = vol.shape[-1]
    ft = rfftn3(vol.float() if vol.dtype in (torch.float16, torch.bfloat16) else vol)
    mean_amp = radial_average_3d(ft.abs().double(), box)
    s2 = shell_frequencies(box, pixel_size_a, vol.device) ** 2
    ln_f = torch.where(mean_amp > 0, torch.log(mean_amp.clamp_min(1e-300)), torch.full_like(mean_amp, float("nan")))
    return s2, ln_f


def fit_bfactor(
    s2: torch.Tensor, ln_f: torch.Tensor, lowres_a: float, highres_a: float
) -> tuple[float, float, float, float]:
    """Straight line through the Guinier plot between two resolutions (RELION's --autob).

    Parameters
    ----------
    s2, ln_f
        ``(S,)`` from :func:`guinier_plot`.
    lowres_a, highres_a
        Fit range in Angstrom (``lowres_a > highres_a``); points with ``highres <= 1/s <= lowres``.

    Returns
    -------
    tuple of float
        ``(bfactor, slope, intercept, correlation)`` with ``bfactor = 4 * slope`` (A^2).

    Raises
    ------
    ValueError
        Fewer than 2 usable points in the range.
    """
    s2 = torch.as_tensor(s2, dtype=torch.float64).reshape(-1)
    y = torch.as_tensor(ln_f, dtype=torch.float64).reshape(-1)
    lo, hi = 1.0 / lowres_a**2, 1.0 / highres_a**2
    sel = (s2 >= lo * (1 - 1e-9)) & (s2 <= hi * (1 + 1e-9)) & torch.isfinite(y)
    if int(sel.sum()) < 2:
        raise ValueError(
            f"the Guinier fit between {lowres_a:.2f} and {highres_a:.2f} A has {int(sel.sum())} shells (needs 2)"
        )
    x, yy = s2[sel], y[sel]
    xm, ym = x.mean(), yy.mean()
    sxx = ((x - xm) ** 2).sum()
    sxy = ((x - xm) * (yy - ym)).sum()
    syy = ((yy - ym) ** 2).sum()
    slope = sxy / sxx
    intercept = ym - slope * xm
    corr = sxy / torch.sqrt(sxx * syy) if float(syy) > 0 else torch.tensor(1.0, dtype=torch.float64)
    return float(4.0 * slope), float(slope), float(intercept), float(corr)


def fsc_weight(fsc: torch.Tensor) -> torch.Tensor:
    """RELION's FSC weighting per shell: ``sqrt(2 FSC / (1 + FSC))`` up to the first shell where
    the FSC falls below 1e-4, 0 beyond it (and where the FSC is not positive).

    Returns
    -------
    torch.Tensor
        ``(S,)`` float64 weights.
    """
    f = torch.as_tensor(fsc, dtype=torch.float64).reshape(-1)
    below = torch.nonzero(f < 1e-4).reshape(-1)
    ires_max = int(below[0]) - 1 if below.numel() else f.numel() - 1
    w = torch.where(f > 0, torch.sqrt((2.0 * f).clamp_min(0.0) / (1.0 + f)), torch.zeros_like(f))
    idx = torch.arange(f.numel(), device=f.device)
    return torch.where(idx <= ires_max, w, torch.zeros_like(w))


def _apply_shell_filter(vol: torch.Tensor, per_shell: torch.Tensor) -> torch.Tensor:
    """Multiply a map's transform by a per-shell factor ``(D // 2 + 1,)``; the corners beyond get 0."""
    box = vol.shape[-1]
    ft = rfftn3(vol)
    sh = shell_index_3d(box, rfft=True, device=vol.device)
    w = torch.cat([per_shell.to(vol.device, torch.float64), torch.zeros(1, dtype=torch.float64, device=vol.device)])
    factor = w[sh.clamp(max=per_shell.numel())]
    return irfftn3(ft * factor.to(ft.dtype), box)


def apply_bfactor(vol: torch.Tensor, bfactor: float, pixel_size_a: float) -> torch.Tensor:
    """Multiply the transform by ``exp(-B s^2 / 4)`` (negative B sharpens), ``s = |k| / pixel``.

    Parameters
    ----------
    vol
        ``(D, D, D)`` map.

    Returns
    -------
    torch.Tensor
        ``(D, D, D)``.
    """
    box = vol.shape[-1]
    k = fftfreq_3d(box, rfft=True, device=vol.device, dtype=torch.float64)
    s2 = (k**2).sum(-1) / pixel_size_a**2
    ft = rfftn3(vol)
    return irfftn3(ft * torch.exp(-bfactor * s2 / 4.0).to(ft.dtype), box)


def low_pass(vol: torch.Tensor, resolution_a: float, pixel_size_a: float, edge_shells: float = 2.0) -> torch.Tensor:
    """RELION's lowPassFilterMap: raised-cosine edge ``edge_shells`` wide centred on the resolution.

    Parameters
    ----------
    vol
        ``(D, D, D)`` map.
    resolution_a
        Low-pass resolution in Angstrom.

    Returns
    -------
    torch.Tensor
        ``(D, D, D)``.
    """
    box = vol.shape[-1]
    r = fftfreq_3d(box, rfft=True, device=vol.device, dtype=torch.float64).norm(dim=-1)  # cycles/px
    ires = round(box * pixel_size_a / resolution_a)
    half = edge_shells / 2.0
    lo = max(0.0, (ires - half) / box)
    hi = min(0.5 * box, (ires + half)) / box
    width = max(hi - lo, 1e-12)
    t = ((r - lo) / width).clamp(0.0, 1.0)
    filt = torch.where(r < lo, torch.ones_like(r), torch.where(r > hi, torch.zeros_like(r), 0.5 + 0.5 * torch.cos(math.pi * t)))
    ft = rfftn3(vol)
    return irfftn3(ft * filt.to(ft.dtype), box)


# --------------------------------------------------------------------------------------------
# the whole procedure
# --------------------------------------------------------------------------------------------


def postprocess_halves(
    half1: torch.Tensor, half2: torch.Tensor, mask: torch.Tensor | None, options: PostprocessOptions
) -> PostprocessResult:
    """relion_postprocess on two half maps.

    Parameters
    ----------
    half1, half2
        ``(D, D, D)`` unfiltered half maps.
    mask
        ``(D, D, D)`` soft solvent mask in [0, 1], or None (no masking: the corrected FSC is the
        unmasked one).
    options
        See :class:`PostprocessOptions`.

    Returns
    -------
    PostprocessResult
        Curves, resolution, B-factor and the sharpened maps.

    Raises
    ------
    ValueError
        Shapes differ, the maps are not cubic, the unmasked FSC never drops below
        ``randomize_at_fsc`` (with a mask), or the Guinier fit range holds fewer than 2 shells.
    """
    if half1.shape != half2.shape or half1.dim() != 3 or len(set(half1.shape)) != 1:
        raise ValueError(f"half maps must be cubic and of one shape, got {tuple(half1.shape)} and {tuple(half2.shape)}")
    if mask is not None and mask.shape != half1.shape:
        raise ValueError(f"the mask {tuple(mask.shape)} does not match the half maps {tuple(half1.shape)}")
    opts = options
    px = opts.pixel_size_a
    box = half1.shape[-1]
    h1 = half1.float() if half1.dtype != torch.float64 else half1
    h2 = half2.to(h1.dtype)
    fsc_unmasked = fsc_curve(h1, h2, ndim=3)
    n_sh = fsc_unmasked.numel()
    warnings: list[str] = []
    randomize_at = 0
    if mask is None:
        fsc_masked = fsc_unmasked.clone()
        fsc_random = torch.zeros_like(fsc_unmasked)
        fsc_true = fsc_unmasked.clone()
    else:
        m = mask.to(h1.dtype)
        fsc_masked = fsc_curve(h1 * m, h2 * m, ndim=3)
        randomize_at = first_shell_below(fsc_unmasked, opts.randomize_at_fsc)
        if randomize_at >= n_sh:
            raise ValueError(f"the unmasked FSC never drops below {opts.randomize_at_fsc} (--randomize_at_fsc)")
        # independent random phases in the two halves (Chen et al. 2013)
        g1 = torch.Generator().manual_seed(opts.seed)
        g2 = torch.Generator().manual_seed(opts.seed + 1)
        r1 = randomize_phases_beyond(h1, randomize_at, g1)
        r2 = randomize_phases_beyond(h2, randomize_at, g2)
        fsc_random = fsc_curve(r1 * m, r2 * m, ndim=3)
        fsc_true = corrected_fsc(fsc_masked, fsc_random, randomize_at)
    resolution = relion_resolution(fsc_true, box, px)
    mask_used = mask is not None
    if mask is not None:
        i_true = first_shell_below(fsc_true, 0.143) - 1
        i_unmasked = first_shell_below(fsc_unmasked, 0.143) - 1
        if i_unmasked > i_true:
            if opts.force_mask:
                warnings.append("the unmasked FSC extends beyond the solvent-corrected FSC")
            else:
                warnings.append("the unmasked FSC extends beyond the solvent-corrected FSC: the mask is not used "
                                "(adjust the mask, or force it with --force_mask)")
                fsc_true = fsc_unmasked.clone()
                resolution = relion_resolution(fsc_true, box, px)
                mask_used = False
        elif 0 <= i_true < n_sh and float(fsc_random[i_true]) > 0.1:
            warnings.append("the phase-randomised FSC is larger than 0.10 at the estimated resolution: "
                            "use a softer mask with fewer features")
    for w in warnings:
        log.warning(w)
    randomize_from = box * px / randomize_at if randomize_at > 0 else 0.0

    avg = 0.5 * (h1 + h2)
    s2, g_in = guinier_plot(avg, px)
    if opts.skip_fsc_weighting:
        weighted = avg
    else:
        weighted = _apply_shell_filter(avg, fsc_weight(fsc_true))
    _, g_w = guinier_plot(weighted, px)
    slope = intercept = corr = float("nan")
    if opts.auto_bfactor:
        highres = opts.autob_highres_a if opts.autob_highres_a > 0 else resolution
        bfactor, slope, intercept, corr = fit_bfactor(s2, g_w, opts.autob_lowres_a, highres)
    else:
        bfactor = float(opts.adhoc_bfactor)
    sharp = apply_bfactor(weighted, bfactor, px) if bfactor != 0.0 else weighted
    lp = opts.low_pass_a if (opts.skip_fsc_weighting and opts.low_pass_a > 0) else resolution
    sharp = low_pass(sharp, lp, px, opts.filter_edge_shells)
    _, g_s = guinier_plot(sharp, px)
    masked = sharp * mask.to(sharp.dtype) if mask is not None else sharp
    return PostprocessResult(
        final_resolution_a=float(resolution),
        bfactor=float(bfactor),
        randomize_from_a=float(randomize_from),
        randomize_at_shell=int(randomize_at),
        fsc_unmasked=fsc_unmasked,
        fsc_masked=fsc_masked,
        fsc_random_masked=fsc_random,
        fsc_corrected=fsc_true,
        guinier_s2=s2,
        guinier_in=g_in,
        guinier_weighted=g_w,
        guinier_sharpened=g_s,
        fit_slope=slope,
        fit_intercept=intercept,
        fit_corr=corr,
        mask_used=mask_used,
        warnings=tuple(warnings),
        sharpened=sharp.to(half1.dtype if half1.dtype.is_floating_point else torch.float32),
        sharpened_masked=masked.to(half1.dtype if half1.dtype.is_floating_point else torch.float32),
    )
