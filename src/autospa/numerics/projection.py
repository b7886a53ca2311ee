"""Central-slice projection and back-projection in Fourier space (L1, pure torch).

What it computes (RELION's Projector::project / rotate2D and BackProjector::backproject2Dto3D /
backrotate2D): the Fourier transform of the projection of a volume for the rotation A (RELION's
matrix, :func:`autospa.conventions.euler_to_matrix`) is the central slice of the volume's
transform at the 3D frequencies ``A^T (kx, ky, 0)``; in real space that is the volume rotated by A
(a feature at ``r`` moves to ``A r``) and summed along z. For 2D references the "slice" is the
reference's transform at ``A^T (kx, ky)`` with the 2x2 in-plane matrix, i.e. the reference rotated
by A. Samples are taken from the zero-padded (factor ``pad``) transform at ``pad * A^T k`` with
trilinear (bilinear) interpolation; frequencies with a negative x use Friedel symmetry.

Layout and scale
    Slices are ``(..., P, box, box // 2 + 1)`` in the unshifted rfft layout of
    :mod:`autospa.numerics.fourier` and on its scale: ``irfft2(project_fourier(...))`` is the
    real-space projection with its centre at pixel ``box // 2`` (the phase factor of the centre is
    included). Outside the disc ``|k| <= max_shell`` they are zero.
    The padded transforms (:class:`VolumeFT`, :class:`ImageFT`) are stored centred in z and y and
    as the half ``x >= 0``, with one periodic margin voxel on each side: shape
    ``(..., 2H + 1, 2H + 1, H + 1)`` (3D) or ``(..., 2H + 1, H + 1)`` (2D), ``H = pad * box // 2
    + 1``, frequency ``f`` at index ``f + H`` (z, y) and ``f`` (x). They are pre-multiplied by
    ``pad^3 * box`` (3D) or ``pad^2`` (2D) so that a slice equals the 2D transform directly.

Adjoint
    :func:`backproject_fourier` is the exact adjoint of :func:`project_fourier` (same
    interpolation weights, same Friedel rule) for the real inner product ``Re sum(conj(a) b)``
    on the stored arrays; it returns the data grid and the weight grid (the same weights applied to
    the per-pixel ``weights``), in the layout of :class:`VolumeFT`, so that ``B / F`` estimates
    ``VolumeFT.data``. :func:`reconstruct` turns ``(B, F)`` into a real-space map.

Implementation: our own gather (``Tensor.__getitem__`` / ``torch.gather``) and scatter
(``index_add_`` / ``scatter_add_``) with trilinear weights; chosen over torch-fourier-slice by
measurement (benchmarks/projection.py; 500 projections of a 64^3 volume, pad 2) and because it
gives an exact adjoint and RELION's conventions (Friedel rule, padded-grid coordinates,
``+Nyquist`` row) by construction:

==========================  ===========  ===============  ==========================
                            project      back-project     error vs analytic Gaussians
==========================  ===========  ===============  ==========================
ours, CPU (2 threads)       0.10 s       0.10 s           1.7 % (0.7 % with pad 3)
torch-fourier-slice, CPU    0.58 s       2.7 s            0.8 %
ours, H200                  0.003 s      0.002 s          1.7 %
torch-fourier-slice, H200   0.008 s      0.031 s          0.8 %
==========================  ===========  ===============  ==========================

The adjoint error is 1e-16 (float64); torch-fourier-slice's back-projection divides by its
weights, so it has no adjoint to compare.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from autospa.numerics.fourier import freq_index

__all__ = [
    "VolumeFT",
    "ImageFT",
    "grid_half",
    "gridding_correction",
    "prepare_volume_ft",
    "prepare_image_ft",
    "project_fourier",
    "backproject_fourier",
    "rotate_fourier_2d",
    "backrotate_fourier_2d",
    "reconstruct",
    "reconstruct_2d",
    "volume_from_ft",
    "image_from_ft",
    "project_real",
    "ft_grid_to_rfft",
    "rfft_to_ft_grid",
]

#: Upper bound on gathered/scattered elements per chunk (indices, weights and values).
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class VolumeFT:
    """Padded, centred half transform of one or more volumes, ready for slicing.

    Attributes
    ----------
    data
        ``(..., 2H + 1, 2H + 1, H + 1)`` complex, ``H = pad * box // 2 + 1``; see the module doc.
    box
        Size ``D`` of the original (unpadded) volume.
    pad
        Padding factor ``P``.
    """

    data: torch.Tensor
    box: int
    pad: int

    ndim = 3


@dataclass(frozen=True)
class ImageFT:
    """Padded, centred half transform of one or more 2D references (layout as :class:`VolumeFT`).

    Attributes
    ----------
    data
        ``(..., 2H + 1, H + 1)`` complex.
    box, pad
        Original image size and padding factor.
    """

    data: torch.Tensor
    box: int
    pad: int

    ndim = 2


def grid_half(box: int, pad: int) -> int:
    """``H = pad * box // 2 + 1``: the largest |frequency| index held by the padded grid."""
    return (pad * box) // 2 + 1


def _complex_of(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype in (torch.float64, torch.complex128) else torch.complex64


def _real_of(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32


# --------------------------------------------------------------------------------------------
# gridding correction and padded transforms
# --------------------------------------------------------------------------------------------


def gridding_correction(box: int, pad: int, ndim: int = 3, device=None, dtype=torch.float32) -> torch.Tensor:
    """RELION's ``sinc^2(r / (box * pad))`` (radial, r in pixels from the centre ``box // 2``).

    Dividing a real-space map by it pre-compensates (or corrects) the trilinear interpolation of
    its padded transform (Projector::griddingCorrect).

    Returns
    -------
    torch.Tensor
        ``(box,) * ndim`` with value 1 at the centre.
    """
    c = torch.arange(box, device=device, dtype=torch.float64) - box // 2
    grids = torch.meshgrid(*([c] * ndim), indexing="ij")
    r = torch.sqrt(sum(g * g for g in grids)) / (box * pad)
    s = torch.where(r > 0, torch.sin(math.pi * r) / (math.pi * r).clamp(min=1e-30), torch.ones_like(r))
    return (s * s).to(dtype)


def _periodic_map(half: int, n: int, device) -> torch.Tensor:
    """Index into an unshifted length-n axis for each centred index ``0 .. 2 half`` (periodic)."""
    return torch.remainder(torch.arange(2 * half + 1, device=device) - half, n)


def rfft_to_ft_grid(f_unshifted: torch.Tensor, ndim: int) -> torch.Tensor:
    """Unshifted padded rfft ``(..., n, n, n // 2 + 1)`` (or 2D) to the centred grid with margins.

    Parameters
    ----------
    f_unshifted
        ``(..., n, n, n // 2 + 1)`` (ndim 3) or ``(..., n, n // 2 + 1)`` (ndim 2) complex.

    Returns
    -------
    torch.Tensor
        ``(..., 2H + 1, 2H + 1, H + 1)`` (or ``(..., 2H + 1, H + 1)``), ``H = n // 2 + 1``.
    """
    n = f_unshifted.shape[-2]
    half = n // 2 + 1
    idx = _periodic_map(half, n, f_unshifted.device)
    g = f_unshifted
    for d in range(ndim - 1):
        g = g.index_select(-2 - d, idx)
    pad_x = half + 1 - g.shape[-1]
    return torch.nn.functional.pad(g, (0, pad_x)) if pad_x > 0 else g


def ft_grid_to_rfft(grid: torch.Tensor, n: int, ndim: int) -> torch.Tensor:
    """Adjoint of :func:`rfft_to_ft_grid`: fold the margins back onto the unshifted padded rfft.

    Parameters
    ----------
    grid
        ``(..., 2H + 1, 2H + 1, H + 1)`` (or 2D), ``H = n // 2 + 1``.
    n
        Padded size ``pad * box``.

    Returns
    -------
    torch.Tensor
        ``(..., n, n, n // 2 + 1)`` (or ``(..., n, n // 2 + 1)``); margin voxels are added to their
        periodic equivalents, the x margin is dropped.
    """
    half = n // 2 + 1
    idx = _periodic_map(half, n, grid.device)
    g = grid[..., : n // 2 + 1]
    for d in range(ndim - 1):
        dim = g.dim() - 2 - d
        shape = list(g.shape)
        shape[dim] = n
        g = torch.zeros(shape, dtype=g.dtype, device=g.device).index_add_(dim, idx, g)
    return g


def _prepare(images: torch.Tensor, pad: int, ndim: int, gridding_correct: bool) -> tuple[torch.Tensor, int]:
    box = images.shape[-1]
    if any(s != box for s in images.shape[-ndim:]):
        raise ValueError(f"expected a cubic/square ({box},)*{ndim} input, got {tuple(images.shape)}")
    if pad < 1 or int(pad) != pad:
        raise ValueError(f"pad must be a positive integer, got {pad}")
    x = images.float() if images.dtype in (torch.float16, torch.bfloat16) else images
    if gridding_correct:
        x = x / gridding_correction(box, pad, ndim, x.device, x.dtype)
    n = pad * box
    o = n // 2 - box // 2
    padded = x.new_zeros((*x.shape[:-ndim], *([n] * ndim)))
    sl = (Ellipsis,) + tuple(slice(o, o + box) for _ in range(ndim))
    padded[sl] = x
    dims = tuple(range(-ndim, 0))
    f = torch.fft.rfftn(torch.fft.ifftshift(padded, dim=dims), dim=dims, norm="forward")
    f = f * (pad**ndim * (box if ndim == 3 else 1))
    return rfft_to_ft_grid(f, ndim), box


def prepare_volume_ft(volume: torch.Tensor, pad: int = 2, gridding_correct: bool = True) -> VolumeFT:
    """Padded centred transform of volumes, for :func:`project_fourier`.

    Parameters
    ----------
    volume
        ``(..., D, D, D)`` real volumes (centre at voxel ``D // 2``).
    pad
        Integer padding factor P (RELION's ``--pad``, default 2).
    gridding_correct
        Divide by ``sinc^2(r / (D P))`` first (RELION pre-corrects projector maps this way).

    Returns
    -------
    VolumeFT
        ``data`` ``(..., 2H + 1, 2H + 1, H + 1)``, same device, complex64 (complex128 for float64).
    """
    data, box = _prepare(volume, pad, 3, gridding_correct)
    return VolumeFT(data=data, box=box, pad=pad)


def prepare_image_ft(images: torch.Tensor, pad: int = 2, gridding_correct: bool = True) -> ImageFT:
    """Padded centred transform of 2D references, for :func:`rotate_fourier_2d`.

    Parameters
    ----------
    images
        ``(..., D, D)`` real images (centre at pixel ``D // 2``).

    Returns
    -------
    ImageFT
        ``data`` ``(..., 2H + 1, H + 1)``.
    """
    data, box = _prepare(images, pad, 2, gridding_correct)
    return ImageFT(data=data, box=box, pad=pad)


def _grid_to_rfft_primary(grid: torch.Tensor, n: int, ndim: int) -> torch.Tensor:
    """Exact inverse of :func:`rfft_to_ft_grid`: read each frequency's primary copy (no folding)."""
    half = n // 2 + 1
    u = torch.arange(n, device=grid.device)
    f = torch.where(u < n - n // 2, u, u - n)
    idx = f + half
    g = grid[..., : n // 2 + 1]
    for d in range(ndim - 1):
        g = g.index_select(g.dim() - 2 - d, idx)
    return g


def _from_rfft(f: torch.Tensor, box: int, pad: int, ndim: int, gridding: str | None) -> torch.Tensor:
    """Unshifted padded rfft (pre-multiplied) to real-space maps of size ``box``.

    ``gridding``: None, ``"divide"`` (correct a reconstruction) or ``"multiply"`` (undo a
    pre-correction).
    """
    n = pad * box
    f = f / (pad**ndim * (box if ndim == 3 else 1))
    dims = tuple(range(-ndim, 0))
    x = torch.fft.fftshift(torch.fft.irfftn(f, s=(n,) * ndim, dim=dims, norm="forward"), dim=dims)
    o = n // 2 - box // 2
    x = x[(Ellipsis,) + tuple(slice(o, o + box) for _ in range(ndim))]
    if gridding == "divide":
        x = x / gridding_correction(box, pad, ndim, x.device, x.dtype)
    elif gridding == "multiply":
        x = x * gridding_correction(box, pad, ndim, x.device, x.dtype)
    return x


def volume_from_ft(vol_ft: VolumeFT, undo_gridding_correction: bool = False) -> torch.Tensor:
    """Real-space volumes from a :class:`VolumeFT` (inverse of :func:`prepare_volume_ft`).

    Each frequency is read from its primary copy (the margins are ignored). Pass
    ``undo_gridding_correction=True`` for data made by ``prepare_volume_ft(...,
    gridding_correct=True)`` to get the original volume back (multiplies by ``sinc^2``).

    Returns
    -------
    torch.Tensor
        ``(..., D, D, D)`` real.
    """
    f = _grid_to_rfft_primary(vol_ft.data, vol_ft.pad * vol_ft.box, 3)
    return _from_rfft(f, vol_ft.box, vol_ft.pad, 3, "multiply" if undo_gridding_correction else None)


def image_from_ft(img_ft: ImageFT, undo_gridding_correction: bool = False) -> torch.Tensor:
    """Real-space images from an :class:`ImageFT` (inverse of :func:`prepare_image_ft`).

    Returns
    -------
    torch.Tensor
        ``(..., D, D)`` real.
    """
    f = _grid_to_rfft_primary(img_ft.data, img_ft.pad * img_ft.box, 2)
    return _from_rfft(f, img_ft.box, img_ft.pad, 2, "multiply" if undo_gridding_correction else None)


# --------------------------------------------------------------------------------------------
# interpolation kernels
# --------------------------------------------------------------------------------------------


def _output_points(box: int, max_shell: float, device, real_dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat positions (M,), integer frequencies (M, 2) and centre phases (M,) of the output disc."""
    iy = freq_index(box, device)
    ix = torch.arange(box // 2 + 1, device=device)
    gy, gx = torch.meshgrid(iy, ix, indexing="ij")
    inside = (gx * gx + gy * gy).double() <= float(max_shell) ** 2 + 1e-9
    pos = torch.nonzero(inside.reshape(-1)).squeeze(-1)
    nu = torch.stack([gx.reshape(-1)[pos], gy.reshape(-1)[pos]], dim=-1).to(real_dtype)
    c = box // 2
    angle = (-2.0 * math.pi * c / box) * (nu[:, 0].double() + nu[:, 1].double())
    phase = torch.polar(torch.ones_like(angle), angle).to(_complex_of(real_dtype))
    return pos, nu, phase


def _corners(coords: torch.Tensor, half: int, ndim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat indices ``(..., 2^ndim)``, weights ``(..., 2^ndim)`` and the Friedel flag ``(...)``."""
    neg = coords[..., 0] < 0
    c = torch.where(neg[..., None], -coords, coords)
    c0 = torch.floor(c)
    f = c - c0
    i0 = c0.long()
    sy = half + 1
    if ndim == 3:
        sz = (2 * half + 1) * (half + 1)
        base = (i0[..., 2] + half) * sz + (i0[..., 1] + half) * sy + i0[..., 0]
        fx, fy, fz = f.unbind(-1)
        gx, gy, gz = 1 - fx, 1 - fy, 1 - fz
        idx = torch.stack(
            [base, base + 1, base + sy, base + sy + 1, base + sz, base + sz + 1, base + sz + sy, base + sz + sy + 1],
            dim=-1,
        )
        w = torch.stack(
            [gz * gy * gx, gz * gy * fx, gz * fy * gx, gz * fy * fx, fz * gy * gx, fz * gy * fx, fz * fy * gx, fz * fy * fx],
            dim=-1,
        )
    else:
        base = (i0[..., 1] + half) * sy + i0[..., 0]
        fx, fy = f.unbind(-1)
        gx, gy = 1 - fx, 1 - fy
        idx = torch.stack([base, base + 1, base + sy, base + sy + 1], dim=-1)
        w = torch.stack([gy * gx, gy * fx, fy * gx, fy * fx], dim=-1)
    return idx, w, neg


def _rotations(rotations: torch.Tensor, batch_shape: torch.Size, ndim: int, device, real_dtype):
    """(P, d, d) shared or (B, P, d, d) per batch element; returns (rot, per_batch, P)."""
    rot = torch.as_tensor(rotations).to(device=device, dtype=real_dtype)
    if rot.shape[-2:] != (ndim, ndim) or rot.dim() < 3:
        raise ValueError(f"rotations must be (..., P, {ndim}, {ndim}), got {tuple(rot.shape)}")
    n_batch = math.prod(batch_shape)
    if rot.dim() == 3:
        return rot, False, rot.shape[0]
    lead = rot.shape[:-3]
    rot = rot.expand(*torch.broadcast_shapes(lead, batch_shape), *rot.shape[-3:])
    if rot.shape[:-3] != batch_shape:
        raise ValueError(f"rotation batch dims {tuple(lead)} do not match data batch dims {tuple(batch_shape)}")
    return rot.reshape(n_batch, *rot.shape[-3:]), True, rot.shape[-3]


def _chunk(n_batch: int, n_points: int, ndim: int, per_batch: bool) -> int:
    per_rot = n_points * (2**ndim) * (n_batch if per_batch else max(1, n_batch))
    return max(1, _CHUNK_ELEMENTS // max(1, per_rot))


def _max_shell(out_box: int, vol_box: int, max_shell: float | None) -> float:
    cap = min(out_box // 2, vol_box // 2)
    return float(cap if max_shell is None else min(max_shell, cap))


def _project(
    data: torch.Tensor, box: int, pad: int, ndim: int, rotations, out_box: int, max_shell: float | None
) -> torch.Tensor:
    half = data.shape[-1] - 1
    if half != grid_half(box, pad):
        raise ValueError(f"grid of size {tuple(data.shape)} does not match box {box}, pad {pad}")
    batch_shape = data.shape[: data.dim() - ndim]
    n_batch = math.prod(batch_shape)
    real_dtype = _real_of(data.dtype)
    flat = data.reshape(n_batch, -1)
    rot, per_batch, n_rot = _rotations(rotations, batch_shape, ndim, data.device, real_dtype)
    pos, nu, phase = _output_points(out_box, _max_shell(out_box, box, max_shell), data.device, real_dtype)
    out = torch.zeros(n_batch, n_rot, out_box * (out_box // 2 + 1), dtype=data.dtype, device=data.device)
    step = _chunk(n_batch, nu.shape[0], ndim, per_batch)
    for p0 in range(0, n_rot, step):
        r = rot[..., p0 : p0 + step, :2, :]
        coords = pad * torch.matmul(nu, r)  # (Pc, M, d) or (B, Pc, M, d)
        idx, w, neg = _corners(coords, half, ndim)
        if per_batch:
            vals = torch.gather(flat, 1, idx.reshape(n_batch, -1)).reshape(idx.shape)
        else:
            vals = flat[:, idx.reshape(-1)].reshape(n_batch, *idx.shape)
        v = (vals * w).sum(-1)
        v = torch.where(neg, v.conj().resolve_conj(), v) * phase
        out[:, p0 : p0 + step, pos] = v
    return out.reshape(*batch_shape, n_rot, out_box, out_box // 2 + 1)


def _backproject(
    slices: torch.Tensor,
    weights: torch.Tensor | None,
    rotations,
    box: int,
    pad: int,
    ndim: int,
    max_shell: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if slices.dim() < 3:
        raise ValueError(f"slices must be (..., P, box, box // 2 + 1), got {tuple(slices.shape)}")
    out_box, n_x = slices.shape[-2:]
    if n_x != out_box // 2 + 1:
        raise ValueError(f"slices must be (..., P, box, box // 2 + 1), got {tuple(slices.shape)}")
    half = grid_half(box, pad)
    batch_shape = slices.shape[:-3]
    n_batch = math.prod(batch_shape)
    cdtype = slices.dtype if slices.is_complex() else _complex_of(slices.dtype)
    real_dtype = _real_of(cdtype)
    rot, per_batch, n_rot = _rotations(rotations, batch_shape, ndim, slices.device, real_dtype)
    if slices.shape[-3] != n_rot:
        raise ValueError(f"{slices.shape[-3]} slices for {n_rot} rotations")
    grid_shape = (2 * half + 1,) * (ndim - 1) + (half + 1,)
    n_grid = math.prod(grid_shape)
    data = torch.zeros(n_batch, n_grid, dtype=cdtype, device=slices.device)
    wgrid = torch.zeros(n_batch, n_grid, dtype=real_dtype, device=slices.device)
    s_flat = slices.to(cdtype).reshape(n_batch, n_rot, -1)
    if weights is None:
        w_flat = None
    else:
        w_flat = torch.broadcast_to(torch.as_tensor(weights, device=slices.device).to(real_dtype), slices.shape)
        w_flat = w_flat.reshape(n_batch, n_rot, -1)
    pos, nu, phase = _output_points(out_box, _max_shell(out_box, box, max_shell), slices.device, real_dtype)
    step = _chunk(n_batch, nu.shape[0], ndim, per_batch)
    for p0 in range(0, n_rot, step):
        r = rot[..., p0 : p0 + step, :2, :]
        coords = pad * torch.matmul(nu, r)
        idx, w, neg = _corners(coords, half, ndim)
        v = s_flat[:, p0 : p0 + step][..., pos] * phase.conj()
        v = torch.where(neg, v.conj().resolve_conj(), v)
        contrib = (v[..., None] * w).reshape(n_batch, -1)
        if w_flat is None:
            wc = w.expand(n_batch, *w.shape[-3:]) if not per_batch else w
        else:
            wc = w_flat[:, p0 : p0 + step][..., pos][..., None] * w
        wc = wc.reshape(n_batch, -1)
        if per_batch:
            flat_idx = idx.reshape(n_batch, -1)
            data.scatter_add_(1, flat_idx, contrib)
            wgrid.scatter_add_(1, flat_idx, wc)
        else:
            flat_idx = idx.reshape(-1)
            data.index_add_(1, flat_idx, contrib)
            wgrid.index_add_(1, flat_idx, wc)
    return data.reshape(*batch_shape, *grid_shape), wgrid.reshape(*batch_shape, *grid_shape)


# --------------------------------------------------------------------------------------------
# public projection API
# --------------------------------------------------------------------------------------------


def project_fourier(
    vol_ft: VolumeFT, rotations: torch.Tensor, box: int | None = None, max_shell: float | None = None
) -> torch.Tensor:
    """Central slices of padded volume transforms (RELION's Projector::project).

    Parameters
    ----------
    vol_ft
        From :func:`prepare_volume_ft`; ``data`` may carry batch dims ``(...)`` (e.g. classes).
    rotations
        ``(P, 3, 3)`` RELION matrices A shared by every volume, or ``(..., P, 3, 3)`` with the
        batch dims of ``vol_ft.data`` (one set per volume).
    box
        Output size (default ``vol_ft.box``); smaller sizes give the Fourier window of RELION's
        current size (same frequencies, same scale).
    max_shell
        Zero beyond this radius in pixels (default and maximum ``min(box, vol_ft.box) // 2``).

    Returns
    -------
    torch.Tensor
        ``(..., P, box, box // 2 + 1)`` complex: the :func:`autospa.numerics.fourier.rfft2` of
        the projections (volume rotated by A, summed along z), centred at pixel ``box // 2``.
    """
    out_box = vol_ft.box if box is None else box
    return _project(vol_ft.data, vol_ft.box, vol_ft.pad, 3, rotations, out_box, max_shell)


def backproject_fourier(
    slices: torch.Tensor,
    weights: torch.Tensor | None,
    rotations: torch.Tensor,
    box: int,
    pad: int = 2,
    max_shell: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Insert 2D transforms into padded 3D grids: the exact adjoint of :func:`project_fourier`.

    Parameters
    ----------
    slices
        ``(..., P, b, b // 2 + 1)`` complex (layout of :func:`project_fourier`).
    weights
        Real per-pixel weights broadcastable to ``slices`` (e.g. CTF^2 / sigma2), or None for ones.
    rotations
        ``(P, 3, 3)`` or ``(..., P, 3, 3)`` as in :func:`project_fourier`.
    box
        Size D of the volume to reconstruct.
    pad
        Padding factor of the grid.
    max_shell
        Pixels beyond this radius are ignored (default ``min(b, box) // 2``).

    Returns
    -------
    tuple of torch.Tensor
        Data grid ``(..., 2H + 1, 2H + 1, H + 1)`` complex (sum over slices, the batch dims of
        ``slices`` kept) and the weight grid of the same shape, real.
    """
    return _backproject(slices, weights, rotations, box, pad, 3, max_shell)


def rotate_fourier_2d(
    img_ft: ImageFT, rotations: torch.Tensor, box: int | None = None, max_shell: float | None = None
) -> torch.Tensor:
    """Rotated 2D references in Fourier space (RELION's Projector::rotate2D).

    Parameters
    ----------
    img_ft
        From :func:`prepare_image_ft`; ``data`` may carry batch dims (classes).
    rotations
        ``(P, 2, 2)`` in-plane matrices (:func:`autospa.conventions.psi_to_matrix_2d`) or
        ``(..., P, 2, 2)`` per reference.

    Returns
    -------
    torch.Tensor
        ``(..., P, box, box // 2 + 1)``: the rfft2 of each reference rotated by its psi (a feature
        at ``r`` moves to ``A r``), centred at ``box // 2``.
    """
    out_box = img_ft.box if box is None else box
    return _project(img_ft.data, img_ft.box, img_ft.pad, 2, rotations, out_box, max_shell)


def backrotate_fourier_2d(
    slices: torch.Tensor,
    weights: torch.Tensor | None,
    rotations: torch.Tensor,
    box: int,
    pad: int = 2,
    max_shell: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact adjoint of :func:`rotate_fourier_2d` (RELION's backrotate2D).

    Returns
    -------
    tuple of torch.Tensor
        Data grid ``(..., 2H + 1, H + 1)`` complex and weight grid, real.
    """
    return _backproject(slices, weights, rotations, box, pad, 2, max_shell)


# --------------------------------------------------------------------------------------------
# reconstruction
# --------------------------------------------------------------------------------------------


def _enforce_hermitian(f: torch.Tensor, ndim: int) -> torch.Tensor:
    """Sum the x = 0 plane (line) with its Friedel mates, as BackProjector::enforceHermitianSymmetry."""
    plane = f[..., 0]
    dims = tuple(range(-(ndim - 1), 0))
    mate = torch.roll(torch.flip(plane, dims), shifts=(1,) * (ndim - 1), dims=dims)
    n = plane.shape[-1]
    i = torch.arange(n, device=f.device)
    self_i = torch.remainder(-i, n) == i
    self_mask = self_i
    if ndim == 3:
        self_mask = self_i[:, None] & self_i[None, :]
    summed = plane + (mate.conj() if plane.is_complex() else mate)
    out = f.clone()
    out[..., 0] = torch.where(self_mask, plane, summed)
    return out


def _padded_shells(n: int, pad: int, ndim: int, device) -> torch.Tensor:
    """``round(|f| / pad)`` on the unshifted padded half grid."""
    fi = freq_index(n, device).double()
    fx = torch.arange(n // 2 + 1, device=device).double()
    grids = torch.meshgrid(*([fi] * (ndim - 1)), fx, indexing="ij")
    r2 = sum(g * g for g in grids)
    return torch.round(torch.sqrt(r2) / pad).long()


def _reconstruct(
    data: torch.Tensor,
    weights: torch.Tensor,
    box: int,
    pad: int,
    ndim: int,
    regularisation: float | torch.Tensor | None,
    regularisation_per_shell: torch.Tensor | None,
    min_weight_fraction: float,
    max_shell: int | None,
    gridding_correct: bool,
) -> torch.Tensor:
    n = pad * box
    b = _enforce_hermitian(ft_grid_to_rfft(data, n, ndim), ndim)
    f = _enforce_hermitian(ft_grid_to_rfft(weights, n, ndim), ndim)
    shells = _padded_shells(n, pad, ndim, data.device)
    r_max = box // 2 if max_shell is None else min(int(max_shell), box // 2)
    if regularisation is not None:
        f = f + torch.as_tensor(regularisation, device=f.device, dtype=f.dtype)
    if regularisation_per_shell is not None:
        reg = torch.as_tensor(regularisation_per_shell, device=f.device, dtype=f.dtype)
        if reg.shape[-1] != box // 2 + 1:
            raise ValueError(f"regularisation_per_shell must end in {box // 2 + 1} shells, got {tuple(reg.shape)}")
        f = f + reg[..., shells.clamp(max=box // 2)]
    # per-shell mean of the weights (shells beyond r_max pooled in one bucket)
    s = shells.clamp(max=r_max + 1).reshape(-1)
    f_flat = f.reshape(-1, s.numel())
    sums = torch.zeros(f_flat.shape[0], r_max + 2, dtype=f.dtype, device=f.device).index_add_(1, s, f_flat)
    counts = torch.bincount(s, minlength=r_max + 2).to(f.dtype)
    mean = (sums / counts.clamp(min=1))[:, s].reshape(f.shape)
    f = torch.maximum(f, min_weight_fraction * mean)
    ok = (shells <= r_max) & (f > 0)
    v = torch.where(ok, b / torch.where(ok, f, torch.ones_like(f)), torch.zeros_like(b))
    return _from_rfft(v, box, pad, ndim, "divide" if gridding_correct else None)


def reconstruct(
    data: torch.Tensor,
    weights: torch.Tensor,
    box: int,
    pad: int = 2,
    regularisation: float | torch.Tensor | None = None,
    regularisation_per_shell: torch.Tensor | None = None,
    min_weight_fraction: float = 1e-3,
    max_shell: int | None = None,
    gridding_correct: bool = True,
) -> torch.Tensor:
    """Real-space volumes from back-projected sums: ``V = B / max(F + reg, mean_shell / 1000)``.

    Follows BackProjector::reconstruct: Hermitian symmetry is enforced on the x = 0 plane, the
    division guard is the per-shell mean of the (regularised) weights times
    ``min_weight_fraction``, shells (``round(|f_pad| / pad)``) beyond ``max_shell`` are zeroed, the
    padded map is inverse transformed, windowed to D and divided by ``sinc^2`` (gridding).

    Parameters
    ----------
    data, weights
        ``(..., 2H + 1, 2H + 1, H + 1)`` from :func:`backproject_fourier` (summed over batches).
    box, pad
        Volume size D and padding factor P of the grids.
    regularisation
        Added to the weights: a float or a tensor broadcastable to the unshifted padded half grid
        ``(..., P D, P D, P D // 2 + 1)``.
    regularisation_per_shell
        ``(..., D // 2 + 1)`` added per shell ``round(|f_pad| / P)`` (RELION's ``1 / (P^3 T tau2)``).
    min_weight_fraction
        Division guard relative to the shell mean (RELION: 1/1000).
    max_shell
        Highest shell kept (default D // 2).
    gridding_correct
        Divide the result by ``sinc^2(r / (D P))``.

    Returns
    -------
    torch.Tensor
        ``(..., D, D, D)`` real volumes, centred at voxel ``D // 2``.
    """
    return _reconstruct(
        data, weights, box, pad, 3, regularisation, regularisation_per_shell, min_weight_fraction, max_shell,
        gridding_correct,
    )


def reconstruct_2d(
    data: torch.Tensor,
    weights: torch.Tensor,
    box: int,
    pad: int = 2,
    regularisation: float | torch.Tensor | None = None,
    regularisation_per_shell: torch.Tensor | None = None,
    min_weight_fraction: float = 1e-3,
    max_shell: int | None = None,
    gridding_correct: bool = True,
) -> torch.Tensor:
    """2D version of :func:`reconstruct` for :func:`backrotate_fourier_2d` sums.

    Returns
    -------
    torch.Tensor
        ``(..., D, D)`` real images.
    """
    return _reconstruct(
        data, weights, box, pad, 2, regularisation, regularisation_per_shell, min_weight_fraction, max_shell,
        gridding_correct,
    )


def project_real(
    volume: torch.Tensor, rotations: torch.Tensor, pad: int = 2, gridding_correct: bool = True
) -> torch.Tensor:
    """Real-space projections of volumes (convenience around :func:`project_fourier`).

    Parameters
    ----------
    volume
        ``(..., D, D, D)`` real.
    rotations
        ``(P, 3, 3)`` or ``(..., P, 3, 3)`` RELION matrices.

    Returns
    -------
    torch.Tensor
        ``(..., P, D, D)``: the volume rotated by A and summed along z, centred at ``D // 2``.
    """
    vol_ft = prepare_volume_ft(volume, pad, gridding_correct)
    d = vol_ft.box
    slices = project_fourier(vol_ft, rotations, d)
    return torch.fft.irfft2(slices, s=(d, d), norm="forward")
