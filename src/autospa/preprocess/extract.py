"""Particle extraction, as ``relion_preprocess --extract`` does it (L3, pure torch).

For each coordinate a box of ``box`` pixels is cut from the micrograph around the rounded
coordinate (the particle centre lands on pixel ``box // 2``), Fourier-rescaled to ``scaled_box``
pixels, normalised (a plane fitted to the background pixels outside a circle of ``bg_radius``
output pixels is subtracted, then the background has mean 0 and standard deviation 1) and
contrast-inverted (white protein). Boxes that reach outside the micrograph are skipped. Rescaling is
:func:`autospa.numerics.fourier.fourier_rescale` (Fourier crop or pad, mean kept).

Box-size helpers choose RELION-style sizes: 1.5 x the particle diameter, even and FFT-friendly,
and a downscaled box whose pixel size falls between 2.8 and 3.5 Angstrom.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from autospa.numerics.fourier import fourier_rescale
from autospa.numerics.masks import background_mask


def is_fft_friendly(n: int) -> bool:
    """Whether ``n`` is even and has no prime factor above 7."""
    if n < 2 or n % 2:
        return False
    for p in (2, 3, 5, 7):
        while n % p == 0:
            n //= p
    return n == 1


def good_box_size(n: float) -> int:
    """Smallest even FFT-friendly integer (prime factors 2, 3, 5, 7) that is ``>= n``."""
    m = max(2, int(math.ceil(n)))
    m += m % 2
    while not is_fft_friendly(m):
        m += 2
    return m


@dataclass(frozen=True)
class BoxChoice:
    """Extraction sizes for one particle diameter.

    Attributes
    ----------
    extract_box
        Box in micrograph pixels (RELION's --extract_size).
    scaled_box
        Box after downscaling (RELION's --scale).
    scaled_pixel_a
        Pixel size of the extracted particles (Angstrom).
    """

    extract_box: int
    scaled_box: int
    scaled_pixel_a: float


def choose_box_sizes(
    diameter_a: float,
    pixel_size_a: float,
    target_pixel_a: tuple[float, float] = (2.8, 3.5),
    box_factor: float = 1.5,
) -> BoxChoice:
    """Box = ``box_factor`` x diameter (even, FFT-friendly), downscaled to a pixel size in ``target_pixel_a``.

    The extraction box is the smallest FFT-friendly size covering ``box_factor * diameter``. The
    downscaled box is the largest FFT-friendly even size whose pixel size is at least
    ``target_pixel_a[0]``; when it falls above ``target_pixel_a[1]`` (no friendly size fits) the
    smallest size at or below the upper bound is taken instead. Micrographs whose pixel size is
    already coarser than the range are not upscaled.

    Parameters
    ----------
    diameter_a
        Particle diameter (Angstrom).
    pixel_size_a
        Micrograph pixel size (Angstrom).
    target_pixel_a
        Range of acceptable particle pixel sizes (Angstrom).
    box_factor
        Box size over diameter.

    Returns
    -------
    BoxChoice
    """
    lo, hi = target_pixel_a
    box = good_box_size(box_factor * diameter_a / pixel_size_a)
    if pixel_size_a >= lo:
        return BoxChoice(box, box, pixel_size_a)
    side_a = box * pixel_size_a
    candidates = [m for m in range(2, box + 1, 2) if is_fft_friendly(m)]
    in_range = [m for m in candidates if lo - 1e-9 <= side_a / m <= hi + 1e-9]
    if in_range:
        scaled = max(in_range)
    else:
        above = [m for m in candidates if side_a / m >= lo]
        scaled = max(above) if above else box
    return BoxChoice(box, scaled, side_a / scaled)


def crop_boxes(micrograph: torch.Tensor, coords_px: torch.Tensor, box: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut ``box`` x ``box`` windows centred on the rounded coordinates.

    Parameters
    ----------
    micrograph
        ``(h, w)`` micrograph.
    coords_px
        ``(k, 2)`` coordinates (x, y) in pixels.
    box
        Box size in pixels.

    Returns
    -------
    boxes : torch.Tensor
        ``(k', box, box)`` float32 windows of the particles that fit inside the micrograph.
    inside : torch.Tensor
        ``(k,)`` bool: which coordinates were extracted.
    """
    h, w = micrograph.shape
    c = torch.round(coords_px.to(torch.float64)).to(torch.long)
    x0 = c[:, 0] - box // 2
    y0 = c[:, 1] - box // 2
    inside = (x0 >= 0) & (y0 >= 0) & (x0 + box <= w) & (y0 + box <= h)
    x0, y0 = x0[inside].to(micrograph.device), y0[inside].to(micrograph.device)
    ar = torch.arange(box, device=micrograph.device)
    rows = (y0[:, None] + ar[None, :])[:, :, None]  # (k, box, 1)
    cols = (x0[:, None] + ar[None, :])[:, None, :]  # (k, 1, box)
    boxes = micrograph.to(torch.float32)[rows, cols]
    return boxes, inside.to(torch.bool)


def normalise_background(images: torch.Tensor, bg_radius_px: float, ramp: bool = True) -> torch.Tensor:
    """Subtract a background plane, then scale to background mean 0 and standard deviation 1.

    Parameters
    ----------
    images
        ``(k, n, n)`` images.
    bg_radius_px
        Radius (pixels) of the particle circle; the background is outside it.
    ramp
        Fit and subtract a plane ``a + b x + c y`` to the background first (RELION's default).

    Returns
    -------
    torch.Tensor
        ``(k, n, n)`` float32 normalised images.
    """
    k, n, _ = images.shape
    mask = background_mask(n, bg_radius_px, images.device)
    if not bool(mask.any()):
        raise ValueError(f"background radius {bg_radius_px} leaves no background pixels in a box of {n}")
    x = images.to(torch.float32)
    if ramp:
        ar = torch.arange(n, device=images.device, dtype=torch.float64) - n // 2
        gy, gx = torch.meshgrid(ar, ar, indexing="ij")
        design = torch.stack([torch.ones_like(gx), gx, gy], dim=-1)  # (n, n, 3)
        a = design[mask]  # (m, 3)
        b = x[:, mask].to(torch.float64).T  # (m, k)
        coef = torch.linalg.lstsq(a, b).solution  # (3, k)
        plane = torch.einsum("yxc,ck->kyx", design, coef).to(torch.float32)
        x = x - plane
    bg = x[:, mask]
    mean = bg.mean(dim=1)
    std = bg.std(dim=1, unbiased=False).clamp_min(1e-12)
    return (x - mean[:, None, None]) / std[:, None, None]


def extract_particles(
    micrograph: torch.Tensor,
    coords_px: torch.Tensor,
    box: int,
    scaled_box: int | None = None,
    bg_radius_px: float | None = None,
    normalise: bool = True,
    invert_contrast: bool = True,
    ramp: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Extract, rescale, normalise and invert particle images.

    Parameters
    ----------
    micrograph
        ``(h, w)`` micrograph.
    coords_px
        ``(k, 2)`` coordinates (x, y), micrograph pixels.
    box
        Extraction box (micrograph pixels).
    scaled_box
        Output box (``None``: no rescaling).
    bg_radius_px
        Background radius in output pixels; default (RELION's): 75 % of half the output box.
    normalise
        Normalise the background to mean 0, std 1.
    invert_contrast
        Multiply by -1 (dark protein becomes white).
    ramp
        Subtract a background plane during normalisation.

    Returns
    -------
    images : torch.Tensor
        ``(k', s, s)`` float32 particle images (``s = scaled_box or box``).
    inside : torch.Tensor
        ``(k,)`` bool: the coordinates that were extracted (the others reach outside).
    """
    out_box = box if scaled_box is None else int(scaled_box)
    boxes, inside = crop_boxes(micrograph, coords_px, box)
    if out_box != box and boxes.shape[0]:
        boxes = fourier_rescale(boxes, out_box)
    if normalise and boxes.shape[0]:
        radius = 0.75 * out_box / 2 if bg_radius_px is None or bg_radius_px <= 0 else bg_radius_px
        boxes = normalise_background(boxes, radius, ramp=ramp)
    if invert_contrast:
        boxes = -boxes
    return boxes, inside
