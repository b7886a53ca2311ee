"""Fourier shell (ring) correlation, resolution and rotationally averaged spectra (L1, pure torch).

Shells are those of :mod:`autospa.numerics.fourier`: shell ``i = round(|k| * box)`` at spatial
frequency ``i / (box * pixel_size)``, shells ``0 .. box // 2``. Sums run over the full Fourier
plane (volume): the rfft half is used with every column that stands for a Friedel pair counted
twice, so the numbers equal those of a full complex FFT.

    FSC_i = Re sum_{k in i} A_k conj(B_k) / sqrt(sum |A_k|^2 * sum |B_k|^2)

A shell where either map has no power gets FSC 0 (the zero shell of two zero-mean maps included).
"""

from __future__ import annotations

import torch

from autospa.numerics.fourier import radial_sum_2d, radial_sum_3d, rfft2, rfftn3

__all__ = ["friedel_weights", "fsc", "fsc_resolution", "shell_frequencies", "power_spectrum_1d"]


def friedel_weights(box: int, ndim: int = 2, device: torch.device | str | None = None) -> torch.Tensor:
    """Multiplicity of each rfft column in the full transform: 1 for x = 0 (and Nyquist), else 2.

    Returns
    -------
    torch.Tensor
        ``(box // 2 + 1,)`` float64, to broadcast over the last (x) axis of an rfft.
    """
    w = torch.full((box // 2 + 1,), 2.0, dtype=torch.float64, device=device)
    w[0] = 1.0
    if box % 2 == 0:
        w[-1] = 1.0
    return w


def _spectra(a: torch.Tensor, b: torch.Tensor | None, ndim: int):
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    box = a.shape[-1]
    if any(s != box for s in a.shape[-ndim:]):
        raise ValueError(f"expected square/cubic ({box},)*{ndim} maps, got {tuple(a.shape)}")
    fft = rfft2 if ndim == 2 else rfftn3
    rsum = radial_sum_2d if ndim == 2 else radial_sum_3d
    fa = fft(a).to(torch.complex128)
    fb = None if b is None else fft(b).to(torch.complex128)
    w = friedel_weights(box, ndim, a.device)
    return box, fa, fb, w, rsum


def fsc(a: torch.Tensor, b: torch.Tensor, ndim: int | None = None) -> torch.Tensor:
    """Fourier shell correlation (FRC for images) of two real maps.

    Parameters
    ----------
    a, b
        ``(..., n, n)`` images or ``(..., n, n, n)`` volumes of the same shape (or broadcastable).
    ndim
        2 or 3. Default: 3 for a single cubic ``(n, n, n)`` tensor, else 2. Pass it explicitly
        for batches (a batch of n images of size n would otherwise read as a volume).

    Returns
    -------
    torch.Tensor
        ``(..., n // 2 + 1)`` float64 correlation per shell, in [-1, 1]; 1 for identical maps
        (shells with power).
    """
    if ndim is None:
        ndim = 3 if a.dim() == 3 and a.shape[-3] == a.shape[-1] and a.shape[-2] == a.shape[-1] else 2
    a, b = torch.broadcast_tensors(a, b)
    box, fa, fb, w, rsum = _spectra(a, b, ndim)
    num = rsum(((fa * fb.conj()).real * w), box)
    pa = rsum((fa.abs() ** 2) * w, box)
    pb = rsum((fb.abs() ** 2) * w, box)
    den = torch.sqrt(pa * pb)
    tiny = torch.finfo(torch.float64).tiny
    return torch.where(den > tiny, num / den.clamp_min(tiny), torch.zeros_like(num))


def shell_frequencies(box: int, pixel_size_a: float, device: torch.device | str | None = None) -> torch.Tensor:
    """Spatial frequency of each shell, ``i / (box * pixel_size)`` in 1/Angstrom (RELION's rlnResolution).

    Returns
    -------
    torch.Tensor
        ``(box // 2 + 1,)`` float64.
    """
    return torch.arange(box // 2 + 1, dtype=torch.float64, device=device) / (box * pixel_size_a)


def fsc_resolution(curve: torch.Tensor, box: int, pixel_size_a: float, threshold: float = 0.143) -> float:
    """Resolution (Angstrom) where an FSC curve first drops below ``threshold``.

    The crossing between the last shell at or above the threshold (searching from shell 1) and the
    next one is interpolated linearly in frequency. If the curve never drops below it, the
    Nyquist resolution ``2 * pixel_size`` is returned; if shell 1 is already below it, the
    resolution of shell 1 (``box * pixel_size``).

    Parameters
    ----------
    curve
        ``(box // 2 + 1,)`` FSC values.

    Returns
    -------
    float
        Resolution in Angstrom.
    """
    c = torch.as_tensor(curve, dtype=torch.float64).reshape(-1).cpu()
    if c.shape[0] != box // 2 + 1:
        raise ValueError(f"an FSC curve for box {box} has {box // 2 + 1} shells, got {c.shape[0]}")
    freqs = shell_frequencies(box, pixel_size_a)
    below = torch.nonzero(c[1:] < threshold).reshape(-1)
    if below.numel() == 0:
        return float(1.0 / freqs[-1])
    i = int(below[0]) + 1  # first shell below
    if i == 1:
        return float(1.0 / freqs[1])
    c0, c1 = float(c[i - 1]), float(c[i])
    t = (c0 - threshold) / (c0 - c1) if c0 != c1 else 0.0
    f = float(freqs[i - 1] + t * (freqs[i] - freqs[i - 1]))
    return 1.0 / f


def power_spectrum_1d(x: torch.Tensor, ndim: int = 2) -> torch.Tensor:
    """Rotationally averaged power ``mean_{k in shell} |X_k|^2`` (full transform, RELION's scale).

    Parameters
    ----------
    x
        ``(..., n, n)`` images (``ndim=2``) or ``(..., n, n, n)`` volumes (``ndim=3``).

    Returns
    -------
    torch.Tensor
        ``(..., n // 2 + 1)`` float64; the transform is divided by the number of pixels
        (:func:`autospa.numerics.fourier.rfft2`), so white noise of variance s^2 gives ``s^2 / N``.
    """
    box, fx, _, w, rsum = _spectra(x, None, ndim)
    power = rsum((fx.abs() ** 2) * w, box)
    ones = torch.ones(fx.shape[-ndim:], dtype=torch.float64, device=x.device)
    counts = rsum(ones * w, box)
    return power / counts.clamp_min(1.0)
