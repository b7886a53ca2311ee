"""Soft circular and spherical masks, RELION style (L1, pure torch).

RELION masks particles with a raised-cosine edge (src/image.cpp ``softMaskOutsideMap``, the
``--particle_diameter`` mask of relion_refine): with ``r`` the distance in pixels from the box
centre ``box // 2`` (conventions.py), ``radius`` the inner radius and ``edge`` the width of the
cosine edge::

    m(r) = 1                                          r <= radius
    m(r) = 0.5 + 0.5 * cos(pi * (r - radius) / edge)  radius < r < radius + edge
    m(r) = 0                                          r >= radius + edge

``edge = 0`` gives a hard mask (``r <= radius``). :func:`soft_mask_outside` replaces what lies
outside by the weighted background mean, as RELION does for the particle images before alignment
(so the mask does not add a step to the images).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["background_mask", "background_mean_std", "radius_grid", "soft_circular_mask", "soft_spherical_mask", "soft_mask_outside"]


def radius_grid(
    box: int,
    ndim: int = 2,
    center: Sequence[float] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Distance of every pixel (voxel) from the centre.

    Parameters
    ----------
    box
        Edge length of the square (cubic) box.
    ndim
        2 (image) or 3 (volume).
    center
        Centre in pixels, ordered ``(x, y)`` or ``(x, y, z)``; default ``box // 2`` on every axis.

    Returns
    -------
    torch.Tensor
        ``(box, box)`` or ``(box, box, box)`` distances in pixels, indexed ``[y, x]`` / ``[z, y, x]``.
    """
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    c = [float(box // 2)] * ndim if center is None else [float(v) for v in center]
    if len(c) != ndim:
        raise ValueError(f"center needs {ndim} values (x, y[, z]), got {center}")
    ax = torch.arange(box, device=device, dtype=torch.float64)
    grids = torch.meshgrid(*([ax] * ndim), indexing="ij")  # (z,) y, x
    r2 = torch.zeros_like(grids[0])
    for g, cc in zip(reversed(grids), c):  # x first
        r2 = r2 + (g - cc) ** 2
    return torch.sqrt(r2).to(dtype)


def raised_cosine(r: torch.Tensor, radius: float, edge: float) -> torch.Tensor:
    if radius < 0 or edge < 0:
        raise ValueError(f"mask radius and edge must be >= 0 (got {radius}, {edge})")
    if edge == 0:
        return (r <= radius).to(r.dtype)
    t = ((r - radius) / edge).clamp(0.0, 1.0)
    return 0.5 + 0.5 * torch.cos(math.pi * t)


def soft_circular_mask(
    box: int,
    radius_px: float,
    edge_px: float = 5.0,
    center: Sequence[float] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """2D mask: 1 inside ``radius_px``, raised-cosine edge of ``edge_px`` pixels, 0 beyond.

    Parameters
    ----------
    box
        Image size.
    radius_px
        Inner radius in pixels (RELION: particle diameter / 2 / pixel size).
    edge_px
        Width of the cosine edge (RELION's ``--width_mask_edge``, default 5); 0 = hard edge.
    center
        ``(x, y)`` in pixels; default ``(box // 2, box // 2)``.

    Returns
    -------
    torch.Tensor
        ``(box, box)`` values in [0, 1].
    """
    return raised_cosine(radius_grid(box, 2, center, device, dtype), float(radius_px), float(edge_px))


def soft_spherical_mask(
    box: int,
    radius_px: float,
    edge_px: float = 5.0,
    center: Sequence[float] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """3D version of :func:`soft_circular_mask`.

    Returns
    -------
    torch.Tensor
        ``(box, box, box)`` values in [0, 1].
    """
    return raised_cosine(radius_grid(box, 3, center, device, dtype), float(radius_px), float(edge_px))


def soft_mask_outside(
    x: torch.Tensor,
    radius_px: float,
    edge_px: float = 5.0,
    ndim: int = 2,
    background: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """RELION's ``softMaskOutsideMap``: blend each image (volume) into its background outside a circle.

    ``out = m * x + (1 - m) * bg`` with the soft mask ``m`` and ``bg`` the mean of ``x`` weighted
    by ``1 - m`` (per image), unless ``background`` is given (0 masks to zero).

    Parameters
    ----------
    x
        ``(..., box, box)`` images (``ndim=2``) or ``(..., box, box, box)`` volumes (``ndim=3``).
    radius_px, edge_px
        As :func:`soft_circular_mask`.
    background
        Fixed background value (float or tensor broadcastable to ``(...)``), or None for RELION's
        weighted mean.

    Returns
    -------
    torch.Tensor
        Same shape, dtype and device as ``x`` (float16 is computed in float32 and cast back).
    """
    box = x.shape[-1]
    if any(s != box for s in x.shape[-ndim:]):
        raise ValueError(f"expected square/cubic ({box},)*{ndim} data, got {tuple(x.shape)}")
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    m = raised_cosine(radius_grid(box, ndim, None, x.device, work.dtype), float(radius_px), float(edge_px))
    dims = tuple(range(-ndim, 0))
    if background is None:
        w = 1.0 - m
        wsum = w.sum()
        if float(wsum) <= 0:
            bg = torch.zeros(work.shape[: work.dim() - ndim], dtype=work.dtype, device=x.device)
        else:
            bg = (work * w).sum(dim=dims) / wsum
    else:
        bg = torch.as_tensor(background, dtype=work.dtype, device=x.device)
    bg = bg.reshape(*bg.shape, *([1] * ndim))
    return (m * work + (1.0 - m) * bg).to(x.dtype)


def background_mask(box: int, bg_radius_px: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(box, box)`` bool mask of the background: pixels farther than ``bg_radius_px`` from ``box // 2``."""
    ar = torch.arange(box, device=device, dtype=torch.float32) - box // 2
    r2 = ar[:, None] ** 2 + ar[None, :] ** 2
    return r2 > bg_radius_px**2


def background_mean_std(images: torch.Tensor, radius_px: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of every image outside a circle, as RELION measures the background.

    RELION (MlOptimiser, the check behind ``--dont_check_norm``) counts the pixels whose squared
    distance from the centre (``box // 2``) exceeds ``round(radius)**2`` and takes the population
    standard deviation.

    Parameters
    ----------
    images
        ``(..., n, n)`` real images.
    radius_px
        Radius of the particle circle in pixels (half the particle diameter).

    Returns
    -------
    tuple
        ``(mean, std)``, each ``(...,)`` float64; NaN where no pixel lies outside the circle.
    """
    bg = background_mask(images.shape[-1], float(round(radius_px)), images.device)
    vals = images.to(torch.float64)[..., bg]  # (..., m)
    mean = vals.mean(-1)
    std = ((vals - mean[..., None]) ** 2).mean(-1).sqrt()
    return mean, std
