"""2D references in Fourier space: in-plane rotation by bilinear gather on a padded grid, and its
exact adjoint (scatter), the 2D analogue of central-slice projection / back-projection.

The reference ``V`` (box ``D``) is zero-padded to ``P*D`` and Fourier transformed on the full
(not rfft) centred grid, scaled so that the sample at padded index ``P*f`` equals
``fourier.rfft2(V)`` at frequency ``f`` (norm="forward" on the D grid). The image of the reference
under RELION's psi (matrix A, conventions.psi_to_matrix_2d) has transform ``X(f) = V(A^T f)``.

Gridding: bilinear interpolation on the padded grid multiplies real space by
``sinc^2(x/(P D)) sinc^2(y/(P D))``; :func:`gridding_correction_2d` returns that factor so callers
pre-correct references before padding and post-correct reconstructions (RELION does both for EM).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autospa.conventions import psi_to_matrix_2d


@dataclass(frozen=True)
class Interp2D:
    """Bilinear interpolation stencil from D-grid frequencies to a padded full grid.

    Attributes
    ----------
    index
        ``(R, F, 4)`` long: flat indices into the padded ``(P*D) * (P*D)`` grid.
    weight
        ``(R, F, 4)`` float: bilinear weights (zero for neighbours outside the grid).
    padded_box
        ``P * D``.
    """

    index: torch.Tensor
    weight: torch.Tensor
    padded_box: int


def pad_reference_ft(refs: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """Padded, centred, full-grid Fourier transforms of real 2D references.

    Parameters
    ----------
    refs
        ``(K, D, D)`` real references.
    pad
        Padding factor P.

    Returns
    -------
    torch.Tensor
        ``(K, P*D, P*D)`` complex; the zero frequency at index ``P*D//2`` on both axes, scaled so
        that index ``P*f + P*D//2`` equals ``rfft2(ref, norm="forward")`` at frequency ``f``.
    """
    k, d, _ = refs.shape
    pd = pad * d
    big = refs.new_zeros((k, pd, pd))
    o = (pd - d) // 2
    big[:, o : o + d, o : o + d] = refs
    # the reference's centre (d//2) must land on the padded centre (pd//2)
    ft = torch.fft.fft2(torch.fft.ifftshift(big, dim=(-2, -1)), norm="backward") / (d * d)
    return torch.fft.fftshift(ft, dim=(-2, -1))


def unpad_reference_ft(ref_ft: torch.Tensor, box: int) -> torch.Tensor:
    """Inverse of :func:`pad_reference_ft`: real ``(K, D, D)`` references from padded transforms.

    Parameters
    ----------
    ref_ft
        ``(K, P*D, P*D)`` complex, centred.
    box
        D.

    Returns
    -------
    torch.Tensor
        ``(K, D, D)`` real (the central window of the padded real-space map).
    """
    pd = ref_ft.shape[-1]
    big = torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(ref_ft, dim=(-2, -1)) * (box * box)), dim=(-2, -1))
    o = (pd - box) // 2
    return big.real[..., o : o + box, o : o + box].contiguous()


def gridding_correction_2d(box: int, pad: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Real-space attenuation of bilinear Fourier interpolation on a P-times padded grid.

    Returns
    -------
    torch.Tensor
        ``(D, D)``: ``sinc^2(x / (P D)) * sinc^2(y / (P D))`` with x, y from the box centre.
    """
    r = (torch.arange(box, device=device, dtype=dtype) - box // 2) / (pad * box)
    s = torch.sinc(r) ** 2
    return s[:, None] * s[None, :]


def interpolation_stencil(
    psi_deg: torch.Tensor, freqs: torch.Tensor, box: int, pad: int = 2
) -> Interp2D:
    """Bilinear stencil for sampling a padded reference at ``A(psi)^T f``.

    Parameters
    ----------
    psi_deg
        ``(R,)`` in-plane angles in degrees (RELION's psi).
    freqs
        ``(F, 2)`` frequencies ``(kx, ky)`` in D-grid units (cycles per box).
    box, pad
        D and P.

    Returns
    -------
    Interp2D
        Indices and weights, on the device of ``freqs``.
    """
    pd = pad * box
    a = psi_to_matrix_2d(psi_deg.to(freqs.device, torch.float64))  # (R, 2, 2)
    # p = A^T f  (row vectors: f @ A)
    p = torch.einsum("fi,rij->rfj", freqs.to(torch.float64), a) * pad + pd // 2  # (R, F, 2) (x, y)
    x0 = torch.floor(p[..., 0])
    y0 = torch.floor(p[..., 1])
    fx = (p[..., 0] - x0).to(freqs.dtype)
    fy = (p[..., 1] - y0).to(freqs.dtype)
    x0 = x0.long()
    y0 = y0.long()
    idx, wts = [], []
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            xx, yy = x0 + dx, y0 + dy
            inside = (xx >= 0) & (xx < pd) & (yy >= 0) & (yy < pd)
            idx.append(torch.where(inside, yy * pd + xx, torch.zeros_like(xx)))
            wts.append(torch.where(inside, wx * wy, torch.zeros_like(wx)))
    return Interp2D(torch.stack(idx, -1), torch.stack(wts, -1), pd)


def rotate_gather(ref_ft: torch.Tensor, stencil: Interp2D) -> torch.Tensor:
    """Rotated references sampled at the stencil's frequencies (the forward operator).

    Parameters
    ----------
    ref_ft
        ``(K, P*D, P*D)`` complex padded references (:func:`pad_reference_ft`).
    stencil
        From :func:`interpolation_stencil` with R rotations and F frequencies.

    Returns
    -------
    torch.Tensor
        ``(K, R, F)`` complex.
    """
    k = ref_ft.shape[0]
    flat = ref_ft.reshape(k, -1)
    r, f, _ = stencil.index.shape
    vals = flat[:, stencil.index.reshape(-1)].reshape(k, r, f, 4)
    return (vals * stencil.weight.to(vals.real.dtype)).sum(-1)


def rotate_scatter(values: torch.Tensor, stencil: Interp2D) -> torch.Tensor:
    """Adjoint of :func:`rotate_gather`: spread ``(K, R, F)`` values onto the padded grid.

    Parameters
    ----------
    values
        ``(K, R, F)`` complex or real values at the rotated frequencies.
    stencil
        The same stencil as the forward operator.

    Returns
    -------
    torch.Tensor
        ``(K, P*D, P*D)`` accumulated grid (same dtype as ``values``), without Hermitian
        completion: callers that accumulate half-plane data add the mirrored contribution with
        :func:`hermitian_complete`.
    """
    k = values.shape[0]
    pd = stencil.padded_box
    w = stencil.weight.to(values.real.dtype if values.is_complex() else values.dtype)
    contrib = (values[..., None] * w).reshape(k, -1)
    out = values.new_zeros((k, pd * pd))
    out.index_add_(1, stencil.index.reshape(-1), contrib)
    return out.reshape(k, pd, pd)


def hermitian_complete(grid: torch.Tensor) -> torch.Tensor:
    """Add the point-mirrored (and conjugated) grid: ``G(f) + conj(G(-f))`` on a centred grid.

    Half-plane data of a real image imply the conjugate values at ``-f``; back-projecting only
    the half plane and completing here gives the full-plane sums.

    Parameters
    ----------
    grid
        ``(..., N, N)`` centred grid with the zero frequency at ``N//2`` (N even).
    """
    # index i <-> N - i (mod N) around the centre N//2 for even N: mirror = roll(flip, 1)
    mirrored = torch.roll(torch.flip(grid, dims=(-2, -1)), shifts=(1, 1), dims=(-2, -1))
    if grid.is_complex():
        mirrored = mirrored.conj()
    return grid + mirrored
