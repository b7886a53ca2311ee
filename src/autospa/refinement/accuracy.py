"""Expected alignment accuracies of 2D classes (RELION's calculateExpectedAngularErrors).

For a class reference ``A`` and a few particles' CTFs and noise, the rotational accuracy is the
smallest in-plane rotation ``delta`` for which the CTF-weighted change of the reference,
``sum_f C(f)^2 |A(R_delta f) - A(f)|^2 / (2 sigma2(f))``, exceeds ``ln 100`` (the change is then
100 times less likely than no change); the translational accuracy is the same for a shift along
x and along y (averaged). Limits are RELION's: 30 degrees and 10 pixels.
"""

from __future__ import annotations

import math

import torch

from autospa.numerics import slices
from autospa.refinement.estep import rfft_frequencies, window_indices

LN100 = math.log(100.0)


def expected_accuracies(
    ref_ft: torch.Tensor,
    ctf: torch.Tensor,
    sigma2: torch.Tensor,
    current_size: int,
    pad: int,
    max_angle_deg: float = 30.0,
    max_shift_px: float = 10.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotational (degrees) and translational (pixels) accuracy of each class.

    Parameters
    ----------
    ref_ft
        ``(K, P*D, P*D)`` padded reference transforms (as the E-step uses them).
    ctf
        ``(M, D, D//2+1)`` CTFs of a few particles (RELION uses 10).
    sigma2
        ``(M, S)`` noise spectra of those particles' optics groups.
    current_size
        Fourier window (pixels).

    Returns
    -------
    rot_deg, trans_px
        ``(K,)`` each; the limits where the threshold is never reached.
    """
    k, pd, _ = ref_ft.shape
    box = pd // pad
    m = ctf.shape[0]
    freqs_all, shells_all = rfft_frequencies(box, ref_ft.device)
    idx = window_indices(box, current_size, ref_ft.device)
    f = freqs_all[idx]
    c2w = (ctf.reshape(m, -1)[:, idx] ** 2 / sigma2[:, shells_all[idx].clamp_max(sigma2.shape[1] - 1)]).mean(0)  # (F,)
    deltas = torch.cat([torch.arange(0.25, 5.0, 0.25), torch.arange(5.0, max_angle_deg + 1e-6, 1.0)]).to(ref_ft.device, torch.float64)
    psi = torch.cat([torch.zeros(1, dtype=torch.float64, device=ref_ft.device), deltas])
    a = slices.rotate_gather(ref_ft, slices.interpolation_stencil(psi, f, box, pad))  # (K, 1+n, F)
    diff = ((a[:, 1:] - a[:, :1]).abs() ** 2 * c2w).sum(-1) / 2  # (K, n)
    rot = _first_above(diff, deltas, max_angle_deg)
    shifts = torch.cat([torch.arange(0.1, 2.0, 0.1), torch.arange(2.0, max_shift_px + 1e-6, 0.5)]).to(ref_ft.device, f.dtype)
    a0 = a[:, 0]  # (K, F)
    out = []
    for axis in range(2):
        ph = 1 - torch.exp(-2j * math.pi * shifts[:, None] * f[None, :, axis] / box)  # (n, F)
        d = ((a0[:, None, :].abs() ** 2) * (ph.abs() ** 2)[None] * c2w).sum(-1) / 2  # (K, n)
        out.append(_first_above(d, shifts.to(torch.float64), max_shift_px))
    return rot, (out[0] + out[1]) / 2


def _first_above(values: torch.Tensor, steps: torch.Tensor, limit: float) -> torch.Tensor:
    above = values > LN100
    first = torch.where(above.any(1), above.to(torch.int8).argmax(1), torch.full((values.shape[0],), -1, device=values.device))
    return torch.where(first >= 0, steps[first.clamp_min(0)], torch.full_like(steps[:1].expand(values.shape[0]), limit)).to(torch.float64)
