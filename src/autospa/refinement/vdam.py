"""VDAM: variable-metric gradient descent with adaptive moments (paper eq. 14; RELION 4.0.2's
MlOptimiser::maximizationGradientParameters, BackProjector::reweightGrad / getFristMoment /
getSecondMoment / applyMomenta — reference/relion-vdam.md section 4).

Where RELION's code and the paper differ we follow the code, and say so at each place.
The E-step is the same as for EM: the statistics hold the data sums B and weights F, and the
mini-batch gradient is formed here as ``B - F * V`` (RELION back-projects the residuals in the
E-step instead; the two are equal up to interpolation, and this keeps one E-step for both).
"""

from __future__ import annotations

import math

import torch

from autospa.numerics import slices
from autospa.refinement import mstep
from autospa.refinement.state import ModelState
from autospa.refinement.statistics import SufficientStats

BETA1 = 0.9  # hard-coded in RELION
BETA2 = 0.999  # hard-coded in RELION
MOM2_INIT = 1.0  # RELION's MOM2_INIT_CONSTANT


def projector_consistent_ft(refs: torch.Tensor, pad: int) -> torch.Tensor:
    """``FT(pad(V * g))``: what ``B / F`` estimates for a reference V (g = gridding attenuation).

    The E-step samples ``FT(pad(V / g))`` with bilinear interpolation, and the spread of
    back-projected data multiplies real space by g, so the ratio B/F estimates the transform of
    ``V * g``. The gradient and the update live on this grid; the reference is recovered by
    dividing by g (RELION's VDAM skips the gridding correction; we apply it so that one full
    step with FSC = 1 equals the unregularised EM reconstruction exactly).
    """
    box, ndim = refs.shape[-1], mstep.ndim_of(refs)
    g = slices.gridding_correction(box, pad, ndim, refs.device, refs.dtype)
    return slices.pad_reference_ft(refs * g, pad, ndim)


def vdam_update(
    state: ModelState,
    stats: SufficientStats,
    step: float,
    tau2_fudge: float,
    mu: float,
    mask_radius_px: float | None,
    center: bool = False,
    max_center_px: float = 5.0,
    inactivity_threshold: float = 0.0,
    allow_replacement: bool = False,
    fsc_override: float | None = None,
    damp_small_classes: bool = True,
    min_shell: int = 5,
) -> tuple[ModelState, dict]:
    """One VDAM update from mini-batch statistics.

    Parameters
    ----------
    state
        Current model; ``moment1``/``moment2`` are created on first use.
    stats
        Mini-batch sums per pseudo half-set (half 0 = particles with even index).
    step
        Step size eta of this iteration (schedule.step_size).
    tau2_fudge
        T of this iteration (schedule.tau2_fudge); enters the SNR -> FSC estimate and the SSNR.
    mu
        EMA factor of the nuisance parameters (0.9 for mini-batches, 0 for a full pass).
    mask_radius_px
        Solvent-flattening radius (particle diameter / 2), None for no flattening.
    center
        Centre classes on their centre of mass of positive pixels this iteration.
    inactivity_threshold, allow_replacement
        Inactive-class substitution (RELION ``--class_inactivity_threshold``; only in the
        in-between phase).
    fsc_override
        Use this FSC everywhere instead of the moment-based estimate (for tests: with a full
        batch, step 1 and FSC 1 the update equals the unregularised EM reconstruction).
    damp_small_classes
        RELION's code damps the step of nearly empty classes by ``1 - exp(-(3K + 10) pi_k)``
        (not in the paper).

    Returns
    -------
    state, info
        The new state, and ``{"replaced": (a, b) or None}``.
    """
    box, pad, k = state.box, state.pad, state.n_classes
    device = state.refs.device
    v = projector_consistent_ft(state.refs, pad)  # (K,) + (PD,) * ndim
    ndim = mstep.ndim_of(v)
    grid_dims = tuple(range(-ndim, 0))
    per_class = (-1,) + (1,) * ndim
    pd = v.shape[-1]
    shells = mstep.padded_shells(pd, pad, device, ndim)
    n_shells = box // 2 + 1
    inside = (shells <= state.current_size // 2)[None]

    # rescaled gradient per half: G/max(1, F)   [paper: G/(F + eps); code: max(F, 1)]
    data = stats.data.to(v.dtype)
    weight = stats.weight.to(v.real.dtype)
    grad = (data - weight * v[None]) / weight.clamp_min(1.0)
    grad = grad * inside[None]

    m1 = state.moment1
    u = state.moment2
    if m1 is None:
        m1 = torch.zeros((2, k) + (pd,) * ndim, dtype=v.dtype, device=device)
        u = torch.full((k,) + (pd,) * ndim, MOM2_INIT, dtype=v.real.dtype, device=device)
    # first use of a (half, class) moment: m = G; else an EMA inside the current r_max, no bias
    # correction (one pass over all of them: no per-class loop, no host synchronisation)
    fresh = ~m1.reshape(2, k, -1).ne(0).any(-1)  # (2, K)
    ema = torch.where(inside, BETA1 * m1 + (1 - BETA1) * grad, m1)
    m1 = torch.where(fresh.reshape((2, k) + (1,) * ndim), grad, ema)
    # [paper != code] the paper tracks |G1 - G2|^2; the code normalises it by the squared mean
    # (|z|^2 as re^2 + im^2: the CPU's complex abs is several times slower)
    diff, mean = grad[0] - grad[1], (grad[0] + grad[1]) / 2
    diff2 = diff.real**2 + diff.imag**2
    mean2 = mean.real**2 + mean.imag**2
    del diff, mean
    u = torch.where(inside, BETA2 * u + (1 - BETA2) * diff2 / (mean2 + 1e-12), u)
    # [paper != code] one reference per class, stepping along the mean of the two half moments
    direction = ((m1[0] + m1[1]) / 2) / (torch.sqrt(u) + 1e-12)

    # FSC from the two halves' moments (applyMomenta): SNR = 2 T <|V|> / <|m1 - m2|>
    m_diff = m1[0] - m1[1]
    noise_amp = mstep.shell_mean(torch.sqrt(m_diff.real**2 + m_diff.imag**2), shells, n_shells)
    sig_amp = mstep.shell_mean(torch.sqrt(v.real**2 + v.imag**2), shells, n_shells)
    del m_diff
    snr = torch.where(noise_amp > 0, 2 * tau2_fudge * sig_amp / noise_amp.clamp_min(1e-300), torch.zeros_like(noise_amp))
    fsc = (snr / (1 + snr)).clamp(0, 1)
    if fsc_override is not None:
        fsc = torch.full_like(fsc, float(fsc_override))
    fsc_px = fsc.to(v.real.dtype).index_select(1, shells.clamp_max(n_shells - 1).reshape(-1)).view((k,) + shells.shape)

    # inactive-class substitution (maximizationGradientParameters; MlModel::reset_class)
    replaced = None
    pi = state.class_prior.clone()
    skip = torch.zeros(k, dtype=torch.bool, device=device)
    if allow_replacement and inactivity_threshold > 0 and k > 1:
        n_active = int((pi > 0).sum())
        score = (direction.real**2 + direction.imag**2).mean(grid_dims).to(pi.dtype) * pi
        b = int(torch.argmax(score))
        a = int(torch.argmin(pi))
        if a != b and float(pi[a]) < inactivity_threshold / max(n_active, 1):
            # [paper != code] the paper picks a by the smallest P(X|v_a) and b by the largest
            # |m_b / (u_b + eps)|^2; the code uses pi and |D|^2 pi as here.
            v[a] = v[b]
            m1[0, a] = m1[0, b] * 0.9  # only half 1's moment is damped, as written in RELION
            m1[1, a] = m1[1, b]
            u[a] = u[b]
            # RELION copies pi_b into a; we split b's share so that the priors still sum to 1
            pi[a] = pi[b] / 2
            pi[b] = pi[b] / 2
            skip[a] = True
            replaced = (a, b)

    eta = torch.full((k,), float(step), dtype=torch.float64, device=device)
    if damp_small_classes:
        # [paper != code] damping of nearly empty classes, RELION code only
        eta = eta * (1 - torch.exp(-(3 * k + 10) * pi.to(torch.float64)))
    eta = torch.where(skip | (pi <= 0), torch.zeros_like(eta), eta).to(v.real.dtype)
    # V <- V + eta [FSC D - (1 - FSC) V]   (T' = 1 for pseudo half-sets)
    upd = fsc_px * direction - (1 - fsc_px) * v
    v_new = torch.where(inside, v + eta.reshape(per_class) * upd, torch.zeros_like(v))
    v_new = torch.where(skip.reshape(per_class), torch.where(inside, v, torch.zeros_like(v)), v_new)

    refs = mstep.finish_references(v_new, box, pad, mask_radius_px, gridding=True)
    if center and ndim == 2:
        shift = -mstep.center_of_mass_shift(refs, max_center_px)
        # VDAM skips shifts below 2 px (max(0.01 * diameter / p, 2) in RELION)
        small = shift.norm(dim=-1) < 2.0
        shift[small] = 0
        if bool((~small).any()):
            refs = mstep.shift_real(refs, shift)
            m1 = _shift_padded(m1, shift, pad, box)

    nuis = mstep.update_nuisance(state, stats, mu)
    if replaced is not None:
        a, b = replaced
        nuis["class_prior"][a] = nuis["class_prior"][b] = (nuis["class_prior"][a] + nuis["class_prior"][b]) / 2
    tau2_new = mstep.tau2_of(refs, pad)
    # SSNR and resolution from half-set 1's weights of this mini-batch only (RELION)
    dvp, comp = mstep.ssnr(stats.weight[0], tau2_new, tau2_fudge, pad, state.current_size)
    new_state = state.replace(
        refs=refs,
        tau2=tau2_new,
        data_vs_prior=dvp,
        completeness=comp,
        current_size=mstep.next_current_size(dvp, box, min_shell=min_shell),
        iteration=state.iteration + 1,
        moment1=m1,
        moment2=u,
        **nuis,
    )
    return new_state, {"replaced": replaced, "fsc": fsc}


def _shift_padded(m: torch.Tensor, shift_px: torch.Tensor, pad: int, box: int) -> torch.Tensor:
    """Apply real-space shifts ``(K, 2)`` as phase ramps to padded centred grids ``(2, K, PD, PD)``."""
    pd = m.shape[-1]
    c = (torch.arange(pd, device=m.device, dtype=torch.float32) - pd // 2) / pad  # D-grid units
    ang = -2 * math.pi * (shift_px[:, 0, None, None] * c[None, None, :] + shift_px[:, 1, None, None] * c[None, :, None]) / box
    return m * torch.polar(torch.ones_like(ang), ang)[None]
