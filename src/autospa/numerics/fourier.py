"""Fourier-space helpers on RELION's scale (L1, pure torch).

Layout
    ``rfft2`` of an ``(..., h, w)`` image is ``(..., h, w // 2 + 1)`` with the zero frequency at
    index 0 (unshifted). Row ``i`` holds ``ky = i / h`` for ``i <= h // 2`` and ``(i - h) / h``
    beyond, which is RELION's ``FOR_ALL_ELEMENTS_IN_FFTW_TRANSFORM`` mapping: for an even box the
    Nyquist row ``h // 2`` holds ``ky = +0.5`` (``torch.fft.fftfreq`` says ``-0.5``; on the discrete
    grid the two are the same frequency). Column ``j`` holds ``kx = j / w``.
Scale
    The forward transform is divided by the number of pixels (``norm="forward"``), the inverse is
    not: the zero-frequency coefficient is the image mean and real-space values keep their
    magnitude through crop/pad. This is RELION's scale, so sigma2 and tau2 need no conversion.
Shells
    The shell of a Fourier pixel is ``round(|k| * box)`` with ``k`` in cycles/pixel, shells
    ``0 .. box // 2`` are reported (the corners beyond ``box // 2`` are left out).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "rfft2",
    "irfft2",
    "rfftn3",
    "irfftn3",
    "freq_index",
    "fftfreq_2d",
    "fftfreq_3d",
    "shell_index_2d",
    "shell_index_3d",
    "shell_counts_2d",
    "shell_counts_3d",
    "radial_sum_2d",
    "radial_average_2d",
    "radial_sum_3d",
    "radial_average_3d",
    "fourier_crop",
    "fourier_pad",
    "fourier_rescale",
    "phase_ramp_2d",
    "phase_shift_2d",
    "shift_images",
]


# --------------------------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------------------------


def _as_fft_input(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32 (torch.fft refuses half precision on CPU)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def rfft2(x: torch.Tensor) -> torch.Tensor:
    """Forward real FFT over the last two dims on RELION's scale (divided by ``h * w``).

    Parameters
    ----------
    x
        ``(..., h, w)`` real images.

    Returns
    -------
    torch.Tensor
        ``(..., h, w // 2 + 1)`` complex, unshifted.
    """
    return torch.fft.rfft2(_as_fft_input(x), norm="forward")


def irfft2(x_ft: torch.Tensor, s: int | Sequence[int] | None = None) -> torch.Tensor:
    """Inverse of :func:`rfft2` (not divided).

    Parameters
    ----------
    x_ft
        ``(..., h, w // 2 + 1)`` complex.
    s
        Output size ``(h, w)`` or one int for a square box. Default: ``(h, 2 * (w_ft - 1))``.

    Returns
    -------
    torch.Tensor
        ``(..., h, w)`` real images.
    """
    if s is None:
        s = (x_ft.shape[-2], 2 * (x_ft.shape[-1] - 1))
    elif isinstance(s, int):
        s = (s, s)
    return torch.fft.irfft2(x_ft, s=tuple(s), norm="forward")


def rfftn3(x: torch.Tensor) -> torch.Tensor:
    """Forward real FFT over the last three dims on RELION's scale (divided by ``d * h * w``).

    Parameters
    ----------
    x
        ``(..., d, h, w)`` real volumes.

    Returns
    -------
    torch.Tensor
        ``(..., d, h, w // 2 + 1)`` complex, unshifted.
    """
    return torch.fft.rfftn(_as_fft_input(x), dim=(-3, -2, -1), norm="forward")


def irfftn3(x_ft: torch.Tensor, s: int | Sequence[int] | None = None) -> torch.Tensor:
    """Inverse of :func:`rfftn3` (not divided).

    Parameters
    ----------
    x_ft
        ``(..., d, h, w // 2 + 1)`` complex.
    s
        Output size ``(d, h, w)`` or one int for a cube. Default: ``(d, h, 2 * (w_ft - 1))``.

    Returns
    -------
    torch.Tensor
        ``(..., d, h, w)`` real volumes.
    """
    if s is None:
        s = (x_ft.shape[-3], x_ft.shape[-2], 2 * (x_ft.shape[-1] - 1))
    elif isinstance(s, int):
        s = (s, s, s)
    return torch.fft.irfftn(x_ft, s=tuple(s), dim=(-3, -2, -1), norm="forward")


# --------------------------------------------------------------------------------------------
# frequency grids and shells
# --------------------------------------------------------------------------------------------


def freq_index(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Signed integer frequency of each index of a length-``n`` unshifted FFT axis.

    ``i`` for ``i <= n // 2`` and ``i - n`` beyond (RELION's mapping: the Nyquist index of an even
    axis is ``+n / 2``).

    Returns
    -------
    torch.Tensor
        ``(n,)`` int64.
    """
    i = torch.arange(n, device=device)
    return torch.where(i <= n // 2, i, i - n)


def _integer_grid_2d(box: int, rfft: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer (ix, iy) frequencies, each ``(box, box // 2 + 1)`` (or ``(box, box)``)."""
    iy = freq_index(box, device)
    ix = torch.arange(box // 2 + 1, device=device) if rfft else freq_index(box, device)
    gy, gx = torch.meshgrid(iy, ix, indexing="ij")
    return gx, gy


def _integer_grid_3d(box: int, rfft: bool, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer (ix, iy, iz) frequencies, each ``(box, box, box // 2 + 1)`` (or ``(box,) * 3``)."""
    iz = freq_index(box, device)
    ix = torch.arange(box // 2 + 1, device=device) if rfft else freq_index(box, device)
    gz, gy, gx = torch.meshgrid(iz, iz, ix, indexing="ij")
    return gx, gy, gz


def fftfreq_2d(
    box: int, rfft: bool = True, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """2D frequencies (kx, ky) in cycles/pixel in the unshifted layout.

    Parameters
    ----------
    box
        Image size (square).
    rfft
        Half plane ``(box, box // 2 + 1)`` if True, else the full plane ``(box, box)``.

    Returns
    -------
    torch.Tensor
        ``(box, box // 2 + 1, 2)`` (or ``(box, box, 2)``): ``[..., 0]`` = kx (columns),
        ``[..., 1]`` = ky (rows).
    """
    gx, gy = _integer_grid_2d(box, rfft, device)
    return torch.stack([gx, gy], dim=-1).to(dtype) / box


def fftfreq_3d(
    box: int, rfft: bool = True, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """3D frequencies (kx, ky, kz) in cycles/voxel in the unshifted layout.

    Returns
    -------
    torch.Tensor
        ``(box, box, box // 2 + 1, 3)`` (or ``(box, box, box, 3)``), indexed ``[z, y, x]``.
    """
    gx, gy, gz = _integer_grid_3d(box, rfft, device)
    return torch.stack([gx, gy, gz], dim=-1).to(dtype) / box


def shell_index_2d(box: int, rfft: bool = True, device: torch.device | str | None = None) -> torch.Tensor:
    """Resolution shell ``round(|k| * box)`` of every Fourier pixel.

    Returns
    -------
    torch.Tensor
        ``(box, box // 2 + 1)`` (or ``(box, box)``) int64.
    """
    gx, gy = _integer_grid_2d(box, rfft, device)
    return torch.round(torch.sqrt((gx * gx + gy * gy).double())).long()


def shell_index_3d(box: int, rfft: bool = True, device: torch.device | str | None = None) -> torch.Tensor:
    """Resolution shell ``round(|k| * box)`` of every Fourier voxel.

    Returns
    -------
    torch.Tensor
        ``(box, box, box // 2 + 1)`` (or ``(box,) * 3``) int64.
    """
    gx, gy, gz = _integer_grid_3d(box, rfft, device)
    return torch.round(torch.sqrt((gx * gx + gy * gy + gz * gz).double())).long()


def _layout_2d(values: torch.Tensor, box: int | None) -> tuple[int, bool]:
    h, w = values.shape[-2:]
    box = h if box is None else box
    if h != box:
        raise ValueError(f"expected {box} rows, got shape {tuple(values.shape)}")
    if w == box // 2 + 1:
        return box, True
    if w == box:
        return box, False
    raise ValueError(f"last dim {w} is neither box//2+1 nor box for box {box}")


def _layout_3d(values: torch.Tensor, box: int | None) -> tuple[int, bool]:
    d, h, w = values.shape[-3:]
    box = d if box is None else box
    if d != box or h != box:
        raise ValueError(f"expected a ({box}, {box}, .) grid, got shape {tuple(values.shape)}")
    if w == box // 2 + 1:
        return box, True
    if w == box:
        return box, False
    raise ValueError(f"last dim {w} is neither box//2+1 nor box for box {box}")


def _radial_sum(values: torch.Tensor, shells: torch.Tensor, n_shells: int, ndim: int) -> torch.Tensor:
    lead = values.shape[: values.dim() - ndim]
    flat = values.reshape(-1, shells.numel())
    s = shells.reshape(-1).to(values.device)
    keep = s < n_shells
    out = torch.zeros(flat.shape[0], n_shells, dtype=values.dtype, device=values.device)
    out.index_add_(1, s[keep], flat[:, keep])
    return out.reshape(*lead, n_shells)


def shell_counts_2d(box: int, rfft: bool = True, device: torch.device | str | None = None) -> torch.Tensor:
    """Number of Fourier pixels per shell ``0 .. box // 2`` (half plane if ``rfft``).

    Returns
    -------
    torch.Tensor
        ``(box // 2 + 1,)`` float32.
    """
    s = shell_index_2d(box, rfft, device).reshape(-1)
    s = s[s <= box // 2]
    return torch.bincount(s, minlength=box // 2 + 1).float()


def shell_counts_3d(box: int, rfft: bool = True, device: torch.device | str | None = None) -> torch.Tensor:
    """Number of Fourier voxels per shell ``0 .. box // 2`` (half volume if ``rfft``).

    Returns
    -------
    torch.Tensor
        ``(box // 2 + 1,)`` float32.
    """
    s = shell_index_3d(box, rfft, device).reshape(-1)
    s = s[s <= box // 2]
    return torch.bincount(s, minlength=box // 2 + 1).float()


def radial_sum_2d(values: torch.Tensor, box: int | None = None) -> torch.Tensor:
    """Sum of ``values`` per resolution shell.

    Parameters
    ----------
    values
        ``(..., box, box // 2 + 1)`` (half plane) or ``(..., box, box)`` (full unshifted plane),
        real or complex.
    box
        Image size; default ``values.shape[-2]``.

    Returns
    -------
    torch.Tensor
        ``(..., box // 2 + 1)`` sums over shells ``0 .. box // 2``, same dtype as ``values``.
    """
    box, rfft = _layout_2d(values, box)
    return _radial_sum(values, shell_index_2d(box, rfft, values.device), box // 2 + 1, 2)


def radial_average_2d(values: torch.Tensor, box: int | None = None) -> torch.Tensor:
    """Mean of ``values`` per resolution shell (each stored pixel counted once).

    Parameters
    ----------
    values
        ``(..., box, box // 2 + 1)`` or ``(..., box, box)``, real or complex.

    Returns
    -------
    torch.Tensor
        ``(..., box // 2 + 1)``.
    """
    box, rfft = _layout_2d(values, box)
    counts = shell_counts_2d(box, rfft, values.device)
    return radial_sum_2d(values, box) / counts.clamp(min=1)


def radial_sum_3d(values: torch.Tensor, box: int | None = None) -> torch.Tensor:
    """Sum of ``values`` per shell for ``(..., box, box, box // 2 + 1)`` or ``(..., box, box, box)``.

    Returns
    -------
    torch.Tensor
        ``(..., box // 2 + 1)``.
    """
    box, rfft = _layout_3d(values, box)
    return _radial_sum(values, shell_index_3d(box, rfft, values.device), box // 2 + 1, 3)


def radial_average_3d(values: torch.Tensor, box: int | None = None) -> torch.Tensor:
    """Mean of ``values`` per shell (each stored voxel counted once).

    Returns
    -------
    torch.Tensor
        ``(..., box // 2 + 1)``.
    """
    box, rfft = _layout_3d(values, box)
    counts = shell_counts_3d(box, rfft, values.device)
    return radial_sum_3d(values, box) / counts.clamp(min=1)


# --------------------------------------------------------------------------------------------
# Fourier crop / pad
# --------------------------------------------------------------------------------------------


def _resample_full_axis(x_ft: torch.Tensor, dim: int, n: int, m: int) -> torch.Tensor:
    """Crop or zero-pad one full (two-sided, unshifted) FFT axis from ``n`` to ``m`` samples.

    Cropping to an even ``m`` folds the frequencies ``+m/2`` and ``-m/2`` of the source onto the
    new Nyquist (what sampling on the coarser grid does); padding an even ``n`` splits the source
    Nyquist in two halves at ``+n/2`` and ``-n/2`` (trigonometric interpolation). Pad followed by
    crop is therefore the identity, and a crop equals decimation for band-limited content.
    """
    if m == n:
        return x_ft
    x = x_ft.movedim(dim, -1)
    out = x.new_zeros((*x.shape[:-1], m))
    k = min(n, m)
    half = (k - 1) // 2  # frequencies |f| <= half are copied as they are
    out[..., : half + 1] = x[..., : half + 1]
    if half > 0:
        out[..., m - half :] = x[..., n - half :]
    if k % 2 == 0:
        ny = k // 2
        if m < n:  # crop: fold +ny and -ny onto the new Nyquist
            out[..., ny] = x[..., ny] + x[..., n - ny]
        else:  # pad: split the old Nyquist
            out[..., ny] = 0.5 * x[..., ny]
            out[..., m - ny] = 0.5 * x[..., ny]
    return out.movedim(-1, dim)


def _resample_half_axis(x_ft: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Crop or pad the last (one-sided rfft) axis of real rows from ``n`` to ``m`` samples."""
    if m == n:
        return x_ft
    out = x_ft.new_zeros((*x_ft.shape[:-1], m // 2 + 1))
    k = min(n, m)
    half = (k - 1) // 2
    out[..., : half + 1] = x_ft[..., : half + 1]
    if k % 2 == 0:
        ny = k // 2
        if m < n:  # crop: X[+ny] + X[-ny] = X[ny] + conj(X[ny])
            out[..., ny] = 2.0 * x_ft[..., ny].real
        else:  # pad: half at +ny, the implicit conjugate half at -ny
            out[..., ny] = 0.5 * x_ft[..., ny]
    return out


def _resize(images: torch.Tensor, new_shape: tuple[int, ...]) -> torch.Tensor:
    ndim = len(new_shape)
    old_shape = tuple(images.shape[-ndim:])
    if old_shape == new_shape:
        return images.clone()
    x = _as_fft_input(images)
    # last axis first, while rows are still real (one-sided spectrum valid per row)
    x_ft = torch.fft.rfft(x, dim=-1, norm="forward")
    x_ft = _resample_half_axis(x_ft, old_shape[-1], new_shape[-1])
    for ax in range(ndim - 1):
        dim = -ndim + ax
        x_ft = torch.fft.fft(x_ft, dim=dim, norm="forward")
        x_ft = _resample_full_axis(x_ft, dim, old_shape[ax], new_shape[ax])
        x_ft = torch.fft.ifft(x_ft, dim=dim, norm="forward")
    return torch.fft.irfft(x_ft, n=new_shape[-1], dim=-1, norm="forward")


def _new_shape(images: torch.Tensor, new_box: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    if ndim not in (1, 2, 3):
        raise ValueError(f"ndim must be 1, 2 or 3, got {ndim}")
    if isinstance(new_box, int):
        shape = (new_box,) * ndim
    else:
        shape = tuple(int(b) for b in new_box)
    if len(shape) != ndim or min(shape) < 1:
        raise ValueError(f"new size {new_box} does not fit {ndim} spatial dims")
    return shape


def fourier_crop(images: torch.Tensor, new_box: int | Sequence[int], ndim: int = 2) -> torch.Tensor:
    """Downsample by cropping the spectrum (ideal low-pass), keeping real-space magnitudes.

    Parameters
    ----------
    images
        ``(..., h, w)`` real images (or ``(..., d, h, w)`` volumes with ``ndim=3``).
    new_box
        New size per spatial dim (int) or a tuple of sizes, each <= the old one.
    ndim
        Number of trailing spatial dims.

    Returns
    -------
    torch.Tensor
        ``(..., new_h, new_w)`` real. The mean is kept; for content band-limited below the new
        Nyquist the result equals sampling the continuous image on the coarser grid (for an
        integer factor f: ``images[..., ::f, ::f]``). The pixel size grows by ``old / new``.
    """
    shape = _new_shape(images, new_box, ndim)
    if any(m > n for m, n in zip(shape, images.shape[-ndim:])):
        raise ValueError(f"fourier_crop: {shape} is larger than {tuple(images.shape[-ndim:])}")
    return _resize(images, shape)


def fourier_pad(images: torch.Tensor, new_box: int | Sequence[int], ndim: int = 2) -> torch.Tensor:
    """Upsample by zero-padding the spectrum (trigonometric interpolation).

    Parameters
    ----------
    images
        ``(..., h, w)`` real images (or volumes with ``ndim=3``).
    new_box
        New size per spatial dim, each >= the old one.

    Returns
    -------
    torch.Tensor
        ``(..., new_h, new_w)`` real; values keep their magnitude and for an integer factor f
        ``result[..., ::f, ::f] == images``. ``fourier_crop(fourier_pad(x, m), n) == x``.
    """
    shape = _new_shape(images, new_box, ndim)
    if any(m < n for m, n in zip(shape, images.shape[-ndim:])):
        raise ValueError(f"fourier_pad: {shape} is smaller than {tuple(images.shape[-ndim:])}")
    return _resize(images, shape)


def fourier_rescale(images: torch.Tensor, new_box: int | Sequence[int], ndim: int = 2) -> torch.Tensor:
    """:func:`fourier_crop` or :func:`fourier_pad`, whichever ``new_box`` needs (mixed allowed).

    Returns
    -------
    torch.Tensor
        ``(..., *new_shape)`` real.
    """
    return _resize(images, _new_shape(images, new_box, ndim))


# --------------------------------------------------------------------------------------------
# shifts
# --------------------------------------------------------------------------------------------


def phase_ramp_2d(
    shifts_px: torch.Tensor, box: int, dtype: torch.dtype = torch.complex64, device=None
) -> torch.Tensor:
    """Phase ramps ``exp(-2 pi i (kx dx + ky dy))`` that move image content by ``+(dx, dy)``.

    Parameters
    ----------
    shifts_px
        ``(..., 2)`` shifts ``(dx, dy)`` in pixels (x along columns, y along rows).
    box
        Image size (square).

    Returns
    -------
    torch.Tensor
        ``(..., box, box // 2 + 1)`` complex, to multiply an :func:`rfft2`.
    """
    shifts_px = torch.as_tensor(shifts_px)
    device = shifts_px.device if device is None else device
    real_dtype = torch.float64 if dtype == torch.complex128 else torch.float32
    k = fftfreq_2d(box, rfft=True, device=device, dtype=real_dtype)
    t = shifts_px.to(device=device, dtype=real_dtype)
    angle = -2.0 * math.pi * (k[..., 0] * t[..., 0, None, None] + k[..., 1] * t[..., 1, None, None])
    return torch.polar(torch.ones_like(angle), angle).to(dtype)


def phase_shift_2d(images_ft: torch.Tensor, shifts_px: torch.Tensor, box: int | None = None) -> torch.Tensor:
    """Shift images in Fourier space (sub-pixel exact phase ramp).

    Parameters
    ----------
    images_ft
        ``(..., h, h // 2 + 1)`` complex :func:`rfft2` of square images.
    shifts_px
        ``(..., 2)`` ``(dx, dy)`` in pixels, broadcast against the leading dims of ``images_ft``.
        Positive dx moves content right (towards higher column index), positive dy down.
    box
        Real-space size; default ``images_ft.shape[-2]``.

    Returns
    -------
    torch.Tensor
        ``(broadcast(...), h, h // 2 + 1)`` transform of the shifted images. Integer shifts equal
        ``torch.roll`` (cyclic).
    """
    box = images_ft.shape[-2] if box is None else box
    if images_ft.shape[-1] != box // 2 + 1:
        raise ValueError(f"expected (..., {box}, {box // 2 + 1}) rfft, got {tuple(images_ft.shape)}")
    ramp = phase_ramp_2d(torch.as_tensor(shifts_px, device=images_ft.device), box, images_ft.dtype)
    return images_ft * ramp


def shift_images(images: torch.Tensor, shifts_px: torch.Tensor) -> torch.Tensor:
    """Shift real images by ``+(dx, dy)`` pixels (cyclic, sub-pixel via the Fourier phase ramp).

    Parameters
    ----------
    images
        ``(..., h, h)`` real.
    shifts_px
        ``(..., 2)`` ``(dx, dy)`` in pixels.

    Returns
    -------
    torch.Tensor
        ``(broadcast(...), h, h)`` real.
    """
    box = images.shape[-1]
    if images.shape[-2] != box:
        raise ValueError(f"shift_images needs square images, got {tuple(images.shape)}")
    return irfft2(phase_shift_2d(rfft2(images), shifts_px, box), box)
