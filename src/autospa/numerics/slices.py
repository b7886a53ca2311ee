"""References in Fourier space on padded, centred, full grids: central slices of 3D maps and
in-plane rotations of 2D images by multilinear gather, and the exact adjoint (scatter), which
is back-projection.

The reference ``V`` (box ``D``, 2D image or 3D map) is zero-padded to ``P*D`` and Fourier
transformed on the full (not rfft) centred grid, scaled so that the sample at padded index
``P*f`` of a 2D reference equals ``fourier.rfft2(V)`` at frequency ``f`` (norm="forward" on the
D grid) and the central slice of a 3D map equals that of its projection (RELION's scale: the
3D transform is divided by ``D^2``, not ``D^3``). The image of the reference under RELION's
rotation A (``conventions.euler_to_matrix`` in 3D, ``psi_to_matrix_2d`` in 2D) has transform
``X(f) = V(A^T f)`` with ``f = (kx, ky)`` or ``(kx, ky, 0)``.

Gridding: multilinear interpolation on the padded grid multiplies real space by
``prod_axes sinc^2(x_i/(P D))``; :func:`gridding_correction` returns that factor so callers
pre-correct references before padding and post-correct reconstructions (RELION does both for EM).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from autospa.conventions import psi_to_matrix_2d


@dataclass(frozen=True)
class Interp:
    """Multilinear interpolation stencil from D-grid frequencies to a padded full grid.

    Attributes
    ----------
    index
        ``(R, F, 2^n)`` long: flat indices into the padded ``(P*D)^n`` grid.
    weight
        ``(R, F, 2^n)`` float: interpolation weights (zero for neighbours outside the grid).
    padded_box
        ``P * D``.
    ndim
        n, 2 for images, 3 for maps.
    """

    index: torch.Tensor
    weight: torch.Tensor
    padded_box: int
    ndim: int = 2


#: Former name of :class:`Interp` (2D stencils).
Interp2D = Interp


def _dims(ndim: int) -> tuple[int, ...]:
    return tuple(range(-ndim, 0))


def pad_reference_ft(refs: torch.Tensor, pad: int = 2, ndim: int = 2) -> torch.Tensor:
    """Padded, centred, full-grid Fourier transforms of real references.

    Parameters
    ----------
    refs
        ``(K, D, D)`` images (``ndim=2``) or ``(K, D, D, D)`` maps (``ndim=3``), real.
    pad
        Padding factor P.
    ndim
        2 or 3.

    Returns
    -------
    torch.Tensor
        ``(K,) + (P*D,) * ndim`` complex; the zero frequency at index ``P*D//2`` on every axis,
        scaled by ``1 / D^2`` (central slices equal ``rfft2(projection, norm="forward")``).
    """
    k, d = refs.shape[0], refs.shape[-1]
    pd = pad * d
    big = refs.new_zeros((k,) + (pd,) * ndim)
    o = (pd - d) // 2
    big[(slice(None),) + (slice(o, o + d),) * ndim] = refs
    dims = _dims(ndim)
    # the reference's centre (d//2) must land on the padded centre (pd//2)
    ft = torch.fft.fftn(torch.fft.ifftshift(big, dim=dims), dim=dims, norm="backward") / (d * d)
    return torch.fft.fftshift(ft, dim=dims)


def unpad_reference_ft(ref_ft: torch.Tensor, box: int, ndim: int = 2) -> torch.Tensor:
    """Inverse of :func:`pad_reference_ft`: real references from padded transforms.

    Parameters
    ----------
    ref_ft
        ``(K,) + (P*D,) * ndim`` complex, centred.
    box
        D.

    Returns
    -------
    torch.Tensor
        ``(K,) + (D,) * ndim`` real (the central window of the padded real-space map).
    """
    pd = ref_ft.shape[-1]
    dims = _dims(ndim)
    big = torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(ref_ft, dim=dims), dim=dims) * (box * box), dim=dims)
    o = (pd - box) // 2
    return big.real[(Ellipsis,) + (slice(o, o + box),) * ndim].contiguous()


def gridding_correction(box: int, pad: int, ndim: int = 2, device=None, dtype=torch.float32) -> torch.Tensor:
    """Real-space attenuation of multilinear Fourier interpolation on a P-times padded grid.

    Returns
    -------
    torch.Tensor
        ``(D,) * ndim``: ``prod_i sinc^2(x_i / (P D))`` with ``x_i`` from the box centre.
    """
    r = (torch.arange(box, device=device, dtype=dtype) - box // 2) / (pad * box)
    s = torch.sinc(r) ** 2
    out = s
    for _ in range(ndim - 1):
        out = out[..., None] * s
    return out


def gridding_correction_2d(box: int, pad: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """:func:`gridding_correction` of 2D images, ``(D, D)``."""
    return gridding_correction(box, pad, 2, device, dtype)


def stencil(rotations: torch.Tensor, freqs: torch.Tensor, box: int, pad: int = 2) -> Interp:
    """Multilinear stencil for sampling a padded reference at ``A^T f`` for every rotation A.

    Parameters
    ----------
    rotations
        ``(R, 2, 2)`` in-plane matrices (2D references) or ``(R, 3, 3)`` RELION matrices A
        (3D maps: the stencil samples the central slice ``A^T (kx, ky, 0)``).
    freqs
        ``(F, 2)`` frequencies ``(kx, ky)`` in D-grid units (cycles per box).
    box, pad
        D and P.

    Returns
    -------
    Interp
        Indices and weights, on the device of ``freqs``.
    """
    ndim = rotations.shape[-1]
    pd = pad * box
    # p = A^T (kx, ky[, 0])  as row vectors: f @ A[:2]  (float32: 1e-5 pixel at 256 pixels)
    p = sample_positions(rotations, freqs, box, pad)  # (R, F, n)
    p0 = torch.floor(p)
    frac = (p - p0).to(freqs.dtype)
    p0 = p0.long()
    # per axis j (x, y, z; strides 1, pd, pd^2): the two neighbours' offsets, weights, validity
    # neighbours outside the grid get weight 0 and an index clamped into it, per axis (on the
    # (R, F, 2) arrays, not the (R, F, 2^n) corners: 1.5x faster in 3D)
    idx, wts = None, None
    two = torch.arange(2, device=p0.device)
    for j in range(ndim):
        q = p0[..., j, None] + two  # (R, F, 2)
        f = frac[..., j, None]
        w = torch.cat([1 - f, f], -1) * ((q >= 0) & (q < pd))
        q = q.clamp_(0, pd - 1) * pd**j
        if idx is None:
            idx, wts = q, w
        else:  # corners ordered with x fastest
            idx = (q[..., :, None] + idx[..., None, :]).flatten(-2)
            wts = (w[..., :, None] * wts[..., None, :]).flatten(-2)
    return Interp(idx, wts, pd, ndim)


def sample_positions(rotations: torch.Tensor, freqs: torch.Tensor, box: int, pad: int = 2) -> torch.Tensor:
    """Grid positions ``(R, F, n)`` (x, y[, z] in padded-grid pixels) of ``A^T f`` for every
    rotation: the points :func:`stencil` interpolates."""
    pd = pad * box
    a = rotations.to(freqs.device, torch.float32)[:, :2, :] * pad
    return torch.einsum("fi,rij->rfj", freqs.to(torch.float32), a) + pd // 2


def channels(ref_ft: torch.Tensor) -> torch.Tensor:
    """``(1, 2K) + (P*D,) * n`` real view of complex padded references (real and imaginary parts
    as channels), the input of :func:`project`."""
    k = ref_ft.shape[0]
    ndim = ref_ft.dim() - 1
    r = torch.view_as_real(ref_ft)  # (K, ..., 2)
    return r.permute(0, ndim + 1, *range(1, ndim + 1)).reshape((1, 2 * k) + ref_ft.shape[1:]).contiguous()


def project(ref_channels: torch.Tensor, rotations: torch.Tensor, freqs: torch.Tensor, box: int, pad: int = 2) -> torch.Tensor:
    """Rotated references (2D) or central slices (3D) of every class at every rotation, by
    multilinear interpolation (``grid_sample``; the same values as :func:`rotate_gather` with
    :func:`stencil`, without building the stencil: the fast path of local searches).

    Parameters
    ----------
    ref_channels
        ``(1, 2K) + (P*D,) * n`` from :func:`channels`.
    rotations
        ``(R, n, n)``.
    freqs
        ``(F, 2)`` D-grid frequencies.

    Returns
    -------
    torch.Tensor
        ``(K, R, F)`` complex.
    """
    ndim = ref_channels.dim() - 2
    pd = ref_channels.shape[-1]
    pos = sample_positions(rotations, freqs, box, pad).to(ref_channels.dtype)  # (R, F, n) x fastest
    grid = (2.0 * pos / (pd - 1) - 1.0)[None]  # (1, R, F, n)
    if ndim == 3:
        grid = grid[:, :, :, None, :]  # (1, R, F, 1, 3)
    out = grid_sample_threaded(ref_channels, grid)
    out = out.reshape(ref_channels.shape[1] // 2, 2, rotations.shape[0], freqs.shape[0])
    return torch.complex(out[:, 0], out[:, 1])


def grid_sample_threaded(channels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``grid_sample(channels, grid)`` (bilinear / trilinear, zero padding, corners aligned) of one
    image or volume, on a CPU split into ``torch.get_num_threads()`` batch entries: torch's CPU
    kernels run a batch of one in one thread. The split is over channels (views of the input and
    output, no copies) where the channels divide evenly, else over the grid's rows (the input
    broadcast, the output put back in order). 2 cores: 2D, 100 channels of 128^2 at 120 x 1,650
    points, 251 -> 70 ms; 3D, 2 channels of 76^3 at 2,048 x 500 points, 98 -> 63 ms. Values are
    the single call's exactly.

    Parameters
    ----------
    channels
        ``(1, C) + spatial`` (2 or 3 spatial dimensions).
    grid
        ``(1, R) + rest + (n,)`` sampling positions in [-1, 1] (grid_sample's layout).

    Returns
    -------
    torch.Tensor
        ``(1, C, R) + rest``.
    """
    sample = functools.partial(torch.nn.functional.grid_sample, mode="bilinear", padding_mode="zeros",
                               align_corners=True)
    c, r = channels.shape[1], grid.shape[1]
    threads = torch.get_num_threads() if channels.device.type == "cpu" else 1
    if threads < 2 or channels.shape[0] != 1 or grid.shape[0] != 1:
        return sample(channels, grid)
    spatial, rest = channels.shape[2:], grid.shape[2:]
    if c % threads == 0:  # channel batches: views both ways
        out = sample(channels.reshape((threads, c // threads) + spatial), grid.expand((threads,) + grid.shape[1:]))
        return out.reshape((1, c) + out.shape[2:])
    b = min(threads, r)
    per = -(-r // b)
    if per * b > r:  # the last batch padded with copies of the last row
        grid = torch.cat([grid, grid[:, -1:].expand((1, per * b - r) + rest)], 1)
    out = sample(channels.expand((b,) + channels.shape[1:]), grid.reshape((b, per) + rest))  # (b, C, per) + rest
    return out.transpose(0, 1).reshape((1, c, per * b) + out.shape[3:])[:, :, :r]


def interpolation_stencil(psi_deg: torch.Tensor, freqs: torch.Tensor, box: int, pad: int = 2) -> Interp:
    """:func:`stencil` for RELION in-plane angles ``psi_deg`` ``(R,)`` (2D references)."""
    return stencil(psi_to_matrix_2d(psi_deg.to(freqs.device, torch.float64)), freqs, box, pad)


def rotate_gather(ref_ft: torch.Tensor, st: Interp) -> torch.Tensor:
    """Rotated references (2D) or central slices (3D) at the stencil's frequencies.

    Parameters
    ----------
    ref_ft
        ``(K,) + (P*D,) * n`` complex padded references (:func:`pad_reference_ft`).
    st
        From :func:`stencil` with R rotations and F frequencies.

    Returns
    -------
    torch.Tensor
        ``(K, R, F)`` complex.
    """
    k = ref_ft.shape[0]
    flat = ref_ft.reshape(k, -1)
    r, f, c = st.index.shape
    vals = flat[:, st.index.reshape(-1)].reshape(k, r, f, c)
    return (vals * st.weight.to(vals.real.dtype)).sum(-1)


def gather_columns(ref_ft: torch.Tensor, class_index: torch.Tensor, st: Interp) -> torch.Tensor:
    """Slices of one class each: column ``j`` samples reference ``class_index[j]`` with rotation j.

    Parameters
    ----------
    ref_ft
        ``(K,) + (P*D,) * n`` complex.
    class_index
        ``(R,)`` long.
    st
        Stencil with R rotations and F frequencies.

    Returns
    -------
    torch.Tensor
        ``(R, F)`` complex.
    """
    flat = ref_ft.reshape(-1)
    size = ref_ft[0].numel()
    r, f, c = st.index.shape
    vals = flat[(st.index + class_index.to(st.index.device)[:, None, None] * size).reshape(-1)].reshape(r, f, c)
    return (vals * st.weight.to(vals.real.dtype)).sum(-1)


def scatter_columns(values: torch.Tensor, class_index: torch.Tensor, st: Interp, n_classes: int) -> torch.Tensor:
    """Adjoint of :func:`gather_columns`: spread ``(R, F)`` values onto the classes' grids.

    Returns
    -------
    torch.Tensor
        ``(n_classes,) + (P*D,) * n`` (same dtype as ``values``), not Hermitian-completed.
    """
    pd = st.padded_box
    size = pd**st.ndim
    w = st.weight.to(values.real.dtype if values.is_complex() else values.dtype)
    contrib = (values[..., None] * w).reshape(-1)
    out = values.new_zeros((n_classes * size,))
    out.index_add_(0, (st.index + class_index.to(st.index.device)[:, None, None] * size).reshape(-1), contrib)
    return out.reshape((n_classes,) + (pd,) * st.ndim)


def scatter_positions(values: Sequence[torch.Tensor], class_index: torch.Tensor, positions: torch.Tensor,
                      padded_box: int, n_classes: int, out: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """:func:`scatter_columns` of several arrays without a stencil: the ``2^n`` neighbours of the
    grid positions are taken one corner at a time, each corner's weights (``(L, F)``, not
    ``(L, F, 2^n)``) serving every array, and its indices those of the sample's grid cell shifted
    by a constant: the corner is added through a view of the grid offset by that constant, so one
    index array serves all corners (3D, 2,048 columns of 500 frequencies, two arrays, 2 cores:
    312 -> 162 ms of CPU time against indices per corner; 2.1x less again than :func:`stencil`
    and two :func:`scatter_columns`). The same sums, added in another order.

    Parameters
    ----------
    values
        ``(L, F)`` arrays, real or complex.
    class_index
        ``(L,)`` long: the class each column spreads onto.
    positions
        ``(L, F, n)`` grid positions (x, y[, z]) of the columns' samples, :func:`sample_positions`.
    padded_box, n_classes
        P*D and K.
    out
        Grids ``(K,) + (P*D,) * n`` (one per array, of its dtype, contiguous) to add into, so that
        a caller summing blocks of columns holds no grid per block; new zero grids when None.

    Returns
    -------
    list of torch.Tensor
        One ``(K,) + (P*D,) * n`` grid per array (``out`` when given), not Hermitian-completed.
    """
    pd = padded_box
    ndim = positions.shape[-1]
    size = pd**ndim
    grid_shape = (n_classes,) + (pd,) * ndim
    if out is None:
        out = [v.new_zeros(grid_shape) for v in values]
    out = list(out)
    for o, v in zip(out, values):
        if o.shape != grid_shape or o.dtype != v.dtype or not o.is_contiguous():
            raise ValueError(f"scatter_positions: out grid {tuple(o.shape)} {o.dtype} does not match {grid_shape} {v.dtype}")
    if positions[..., 0].numel() == 0:
        return out
    # per axis, the grid cell [c, c + 1] with c = q = floor(position) clamped into [0, P*D - 2],
    # and the weights its two points receive from the true neighbours q and q + 1 (those outside
    # the grid drop out): every corner's flat index is then the cell's plus a constant, and the
    # corners are added through views of the grids shifted by that constant (no index arrays per
    # corner; the axes as contiguous planes)
    rdt = values[0].real.dtype if values[0].is_complex() else values[0].dtype
    planes = positions.movedim(-1, 0).contiguous()  # (n, L, F)
    cells = torch.floor(planes)
    bounds = torch.stack([cells.amin((1, 2)), cells.amax((1, 2))], 1).tolist()  # (n, 2), one host sync
    base = (class_index.to(positions.device) * size)[:, None]
    weights = []
    for j in range(ndim):
        p0 = cells[j]
        f = (planes[j] - p0).to(rdt)
        qj = p0.long()
        lo, hi = bounds[j]
        if 0 <= lo and hi <= pd - 2:  # every cell inside the grid (the usual case)
            c, w = qj, (1 - f, f)
        else:
            c = qj.clamp(0, pd - 2)
            d = qj - c  # 0 inside the grid; -1 or 1: one neighbour inside; else none
            g = 1 - f
            w = (g * (d == 0) + f * (d == -1), f * (d == 0) + g * (d == 1))
        weights.append(w)
        base = base + c * pd**j
    index = base.reshape(-1)
    flat = [o.view(-1) for o in out]

    def corners(j: int, offset: int, weight: torch.Tensor | None):
        for bit, w in enumerate(weights[j]):
            off, wt = offset + bit * pd**j, (w if weight is None else weight * w)
            if j == 0:
                yield off, wt
            else:
                yield from corners(j - 1, off, wt)

    for off, wt in corners(ndim - 1, 0, None):
        for o, v in zip(flat, values):
            o[off:].index_add_(0, index, (v * wt).reshape(-1))
    return out


def scatter_columns_shared(values: Sequence[torch.Tensor], st: Interp, n_classes: int) -> list[torch.Tensor]:
    """:func:`scatter_columns` of several arrays at once, for columns that share their stencils:
    every class has a column at each of the stencil's R orientations, row ``class * R + r``.

    All classes and arrays go through one sparse product ``S @ V``: ``S`` (grid points x
    (orientation, frequency)) holds the stencil's weights and ``V`` ((orientation, frequency) x
    (array part, class)) the values, so the work per stencil entry is a row of ``parts * K``
    values rather than one scattered add each (2D classification with K = 50 on a CPU: 3 to 6
    times less time than :func:`scatter_columns`).

    Parameters
    ----------
    values
        ``(K * R, F)`` arrays, real or complex.
    st
        Stencil with R orientations and F frequencies.
    n_classes
        K.

    Returns
    -------
    list of torch.Tensor
        One ``(K,) + (P*D,) * n`` grid per array (its dtype), not Hermitian-completed.
    """
    pd = st.padded_box
    size = pd**st.ndim
    r, f, c = st.index.shape
    k = n_classes
    real_dtype = values[0].real.dtype if values[0].is_complex() else values[0].dtype
    parts = [(torch.view_as_real(v) if v.is_complex() else v[..., None]).reshape(k, r * f, -1) for v in values]
    width = sum(p.shape[-1] for p in parts)
    dense = torch.empty(r * f, width, k, dtype=real_dtype, device=st.index.device)
    o = 0
    for p in parts:  # (K, R*F, w) -> (R*F, w, K)
        dense[:, o : o + p.shape[-1]] = p.permute(1, 2, 0)
        o += p.shape[-1]
    # S in CSR: rows (grid points) from a stable sort of the stencil's flat indices
    flat = st.index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    crow = torch.zeros(size + 1, dtype=torch.long, device=flat.device)
    crow[1:] = torch.cumsum(torch.bincount(flat, minlength=size), 0)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        s_mat = torch.sparse_csr_tensor(crow, order // c, st.weight.reshape(-1)[order].to(real_dtype), (size, r * f),
                                        check_invariants=False)
        out = (s_mat @ dense.reshape(r * f, width * k)).reshape((pd,) * st.ndim + (width, k))
    grids, o = [], 0
    for v, p in zip(values, parts):
        if v.is_complex():
            g = torch.complex(out[..., o, :], out[..., o + 1, :])
        else:
            g = out[..., o, :]
        grids.append(g.movedim(-1, 0).to(v.dtype).contiguous())
        o += p.shape[-1]
    return grids


def rotate_scatter(values: torch.Tensor, st: Interp) -> torch.Tensor:
    """Adjoint of :func:`rotate_gather`: spread ``(K, R, F)`` values onto the padded grid.

    Parameters
    ----------
    values
        ``(K, R, F)`` complex or real values at the rotated frequencies.
    st
        The same stencil as the forward operator.

    Returns
    -------
    torch.Tensor
        ``(K,) + (P*D,) * n`` accumulated grid (same dtype as ``values``), without Hermitian
        completion: callers that accumulate half-plane data add the mirrored contribution with
        :func:`hermitian_complete`.
    """
    k = values.shape[0]
    pd = st.padded_box
    size = pd**st.ndim
    w = st.weight.to(values.real.dtype if values.is_complex() else values.dtype)
    contrib = (values[..., None] * w).reshape(k, -1)
    out = values.new_zeros((k, size))
    out.index_add_(1, st.index.reshape(-1), contrib)
    return out.reshape((k,) + (pd,) * st.ndim)


def hermitian_complete(grid: torch.Tensor, ndim: int = 2) -> torch.Tensor:
    """Add the point-mirrored (and conjugated) grid: ``G(f) + conj(G(-f))`` on a centred grid.

    Half-plane data of a real image imply the conjugate values at ``-f``; back-projecting only
    the half plane and completing here gives the full sums.

    Parameters
    ----------
    grid
        ``(...,) + (N,) * ndim`` centred grid with the zero frequency at ``N//2`` (N even).
    """
    dims = _dims(ndim)
    # index i <-> N - i (mod N) around the centre N//2 for even N: mirror = roll(flip, 1)
    mirrored = torch.roll(torch.flip(grid, dims=dims), shifts=(1,) * ndim, dims=dims)
    if grid.is_complex():
        mirrored = mirrored.conj()
    return grid + mirrored


def symmetrise_grid(grid: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
    """Sum of a centred 3D Fourier grid over a point group: ``sum_g G(g^T f)``.

    A map invariant under the group's rotations has a transform invariant under them too, so
    summing the back-projected data and weights over the group imposes the symmetry on the
    reconstruction (RELION's BackProjector::symmetrise). Values are sampled trilinearly.

    Parameters
    ----------
    grid
        ``(..., N, N, N)`` complex or real, zero frequency at ``N//2``.
    ops
        ``(S, 3, 3)`` rotations acting on ``(x, y, z)`` (identity included).

    Returns
    -------
    torch.Tensor
        Same shape and dtype as ``grid``.
    """
    n = grid.shape[-1]
    lead = grid.shape[:-3]
    flat = grid.reshape(-1, n**3)
    c = torch.arange(n, device=grid.device, dtype=torch.float32) - n // 2
    zz, yy, xx = torch.meshgrid(c, c, c, indexing="ij")
    pts = torch.stack([xx, yy, zz], -1).reshape(-1, 3)  # (M, 3) x, y, z
    out = flat.clone()
    for g in ops.to(grid.device, torch.float32):
        if torch.allclose(g, torch.eye(3, device=g.device), atol=1e-6):
            continue
        p = pts @ g + n // 2  # g^T f as row vectors
        p0 = torch.floor(p)
        frac = p - p0
        p0 = p0.long()
        acc = torch.zeros_like(flat)
        for cz in (0, 1):
            for cy in (0, 1):
                for cx in (0, 1):
                    q = p0 + torch.tensor([cx, cy, cz], device=p0.device)
                    w = (frac[:, 0] if cx else 1 - frac[:, 0]) * (frac[:, 1] if cy else 1 - frac[:, 1]) * (frac[:, 2] if cz else 1 - frac[:, 2])
                    ok = ((q >= 0) & (q < n)).all(-1)
                    idx = (q[:, 2] * n + q[:, 1]) * n + q[:, 0]
                    idx = torch.where(ok, idx, torch.zeros_like(idx))
                    acc += flat[:, idx] * (w * ok).to(flat.real.dtype if flat.is_complex() else flat.dtype)
        out += acc
    return out.reshape(*lead, n, n, n)
