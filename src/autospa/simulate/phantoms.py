"""Pseudo-atomic phantom volumes with known structure, symmetry and conformations.

A phantom is a sum of isotropic 3D Gaussians ("atoms") grouped into a few compact domains, so that
it looks like a lumpy multi-domain protein at low resolution. Everything is drawn from a seeded
generator: the same arguments always give the same map.

Geometry
    Atom positions are in Angstrom, as ``(x, y, z)`` column vectors relative to the centre voxel
    ``box // 2`` (conventions.py). The map is ``(z, y, x)``.
Symmetry
    For a point group G (``"C1"``, ``"Cn"``, ``"Dn"``, ``"T"``, ``"O"``, ``"I"``, RELION's axis
    conventions through :func:`autospa.numerics.symmetry.point_group_matrices`) the generator draws
    one asymmetric unit and applies every operator to its atom positions. The set of atoms is then
    closed under G, so the continuous density is exactly G-symmetric (the sampled map is symmetric
    up to the grid's interpolation).
Conformations
    ``conformation=k`` moves the same atoms as ``conformation=0`` except one mobile domain (of the
    asymmetric unit), which is rotated about a hinge point by ``k * hinge_deg`` degrees. Everything
    else (atoms, weights, hinge axis) is identical between conformations of one seed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from autospa.errors import InputError

log = logging.getLogger(__name__)

SHAPES = ("globular", "elongated", "ring")

#: Seed-stream tags, so that independent draws never share a random stream.
_TAG_GEOMETRY = 101


def _rng(seed: int, tag: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(tag)])


def _group_matrices(symmetry: str) -> np.ndarray:
    """Point-group operators as an ``(n_ops, 3, 3)`` float64 array acting on ``(x, y, z)``."""
    sym = symmetry.strip().upper()
    if sym in ("C1", ""):
        return np.eye(3)[None]
    from autospa.numerics.symmetry import point_group_matrices

    try:
        mats = point_group_matrices(sym)
    except (ValueError, KeyError) as exc:
        raise InputError(None, f"unknown point group {symmetry!r}: {exc}") from exc
    return torch.as_tensor(mats).to(torch.float64).cpu().numpy()


def _rotation_about_axis(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    """Rodrigues' rotation matrix, ``(3, 3)``, acting on column vectors."""
    k = axis / np.linalg.norm(axis)
    kx = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + math.sin(angle_rad) * kx + (1.0 - math.cos(angle_rad)) * (kx @ kx)


def _random_unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _points_in_ball(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` points uniform in the unit ball, ``(n, 3)``."""
    return _random_unit_vectors(rng, n) * rng.random((n, 1)) ** (1.0 / 3.0)


def _domain_centres(rng: np.random.Generator, n_domains: int, shape: str, order: int) -> np.ndarray:
    """Domain centres of one asymmetric unit, in units of the phantom radius, ``(n_domains, 3)``."""
    jitter = rng.uniform(-0.5, 0.5, n_domains)
    if shape == "ring":
        # evenly around a circle in the xy plane; an asymmetric unit of Cn/Dn covers 360/n degrees
        span = 2.0 * math.pi / max(order, 1)
        phi = (np.arange(n_domains) + 0.5 + 0.6 * jitter) * span / n_domains
        r = rng.uniform(0.58, 0.7, n_domains)
        z = rng.uniform(-0.1, 0.1, n_domains)
        return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)
    if shape == "elongated":
        # a rod along z, domains evenly spaced with a little lateral wobble
        z = -0.75 + (np.arange(n_domains) + 0.5 + 0.5 * jitter) * 1.5 / n_domains
        xy = rng.standard_normal((n_domains, 2)) * 0.08
        if order > 1:  # keep the asymmetric unit off the symmetry axis
            xy += np.array([0.25, 0.0])
        return np.concatenate([xy, z[:, None]], axis=1)
    # globular
    if order > 1:
        radius = rng.uniform(0.35, 0.6, n_domains)
        return _random_unit_vectors(rng, n_domains) * radius[:, None]
    return _points_in_ball(rng, n_domains) * 0.58


def phantom_atoms(
    n_atoms: int = 2000,
    radius_a: float = 60.0,
    symmetry: str = "C1",
    seed: int = 0,
    shape: str = "globular",
    conformation: int = 0,
    n_domains: int | None = None,
    hinge_deg: float = 25.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Atom positions and weights of a pseudo-atomic phantom.

    Parameters
    ----------
    n_atoms
        Total number of atoms (rounded down to a multiple of the group order).
    radius_a
        Radius in Angstrom of the particle (atoms of the outermost domains may reach a little
        beyond it).
    symmetry
        Point group (RELION names: C1, Cn, Dn, T, O, I).
    seed
        Seed of the geometry; conformations share it.
    shape
        ``"globular"``, ``"elongated"`` (rod along z) or ``"ring"`` (torus in the xy plane).
    conformation
        0 for the base structure; k rotates the mobile lobe by ``k * hinge_deg`` about its hinge.
    n_domains
        Domains per asymmetric unit (default 6 for C1, fewer for large groups).
    hinge_deg
        Hinge rotation per conformation step, in degrees.

    Returns
    -------
    positions_a : np.ndarray
        ``(n, 3)`` float64 atom positions ``(x, y, z)`` in Angstrom relative to the centre.
    weights : np.ndarray
        ``(n,)`` float64 atom weights (between 0.6 and 1.6, like a mix of C, N, O and S).
    """
    if shape not in SHAPES:
        raise InputError(None, f"unknown phantom shape {shape!r} (choose from {', '.join(SHAPES)})")
    if n_atoms < 1 or radius_a <= 0:
        raise InputError(None, f"a phantom needs n_atoms >= 1 and radius_a > 0 (got {n_atoms}, {radius_a})")
    ops = _group_matrices(symmetry)
    order = ops.shape[0]
    n_au = max(1, n_atoms // order)
    if n_domains is None:
        n_domains = max(2, min(6, round(12 / order**0.5)))
    rng = _rng(seed, _TAG_GEOMETRY)
    centres = _domain_centres(rng, n_domains, shape, order)
    # domain extent: the asymmetric unit gets a share of the volume of the whole particle
    base = {"globular": 0.40, "elongated": 0.26, "ring": 0.24}[shape]
    dom_radius = base * (6.0 / (n_domains * order)) ** (1.0 / 3.0) * rng.uniform(0.8, 1.2, n_domains)
    dom_radius = np.maximum(dom_radius, 0.1)
    dom_aniso = rng.uniform(0.75, 1.3, (n_domains, 3))
    # atoms per domain in proportion to its volume: every domain has about the same density
    vol = dom_radius**3 * dom_aniso.prod(axis=1)
    counts = np.floor(vol / vol.sum() * n_au).astype(int)
    counts[np.argmax(vol)] += n_au - counts.sum()
    domain_of = np.repeat(np.arange(n_domains), counts)
    local = _points_in_ball(rng, n_au) * dom_aniso[domain_of] * dom_radius[domain_of, None]
    pos = centres[domain_of] + local
    weights = rng.uniform(0.6, 1.6, n_au)

    # hinge: the domains beyond a plane (normal u, about a third of them) swing about an axis in
    # that plane through the centroid of the domain centres.
    u = _random_unit_vectors(rng, 1)[0]
    proj = centres @ u
    n_mobile = max(1, n_domains // 3)
    mobile_domains = np.argsort(proj)[-n_mobile:]
    plane = 0.5 * (np.sort(proj)[-n_mobile] + np.sort(proj)[-n_mobile - 1]) if n_domains > n_mobile else proj.max()
    centroid = centres.mean(axis=0)
    hinge_point = centroid + (plane - centroid @ u) * u
    axis = np.cross(u, _random_unit_vectors(rng, 1)[0])
    if conformation:
        rmat = _rotation_about_axis(axis, math.radians(hinge_deg * conformation))
        sel = np.isin(domain_of, mobile_domains)
        pos[sel] = (pos[sel] - hinge_point) @ rmat.T + hinge_point

    pos_a = pos * radius_a
    all_pos = np.einsum("gij,nj->gni", ops, pos_a).reshape(-1, 3)
    all_w = np.tile(weights, order)
    return all_pos, all_w


def render_atoms(
    positions_a: torch.Tensor | np.ndarray,
    weights: torch.Tensor | np.ndarray,
    box: int,
    pixel_size_a: float,
    atom_sigma_a: float,
    device: torch.device | str | None = None,
    cutoff_sigmas: float = 4.5,
    batch: int = 4096,
) -> torch.Tensor:
    """Sample a sum of isotropic Gaussians on a cubic grid.

    Each atom contributes ``w * exp(-|r - p|^2 / (2 sigma^2))`` (peak value w) to the voxels
    within ``cutoff_sigmas * sigma`` along each axis (the neglected tail is below
    ``exp(-cutoff_sigmas**2 / 2)`` of the peak, 4e-5 by default). Atoms outside the box are
    clipped to it.

    Parameters
    ----------
    positions_a
        ``(n, 3)`` atom positions ``(x, y, z)`` in Angstrom relative to voxel ``box // 2``.
    weights
        ``(n,)`` atom weights.
    box
        Edge length of the cube in voxels.
    pixel_size_a
        Voxel size in Angstrom.
    atom_sigma_a
        Standard deviation of each Gaussian in Angstrom.
    device
        Where to compute (defaults to the device of ``positions_a`` when it is a tensor, else CPU).
    cutoff_sigmas
        Half-width of each atom's window in units of sigma.
    batch
        Atoms per batch.

    Returns
    -------
    torch.Tensor
        ``(box, box, box)`` float32 map, ``(z, y, x)``.
    """
    if device is None:
        device = positions_a.device if isinstance(positions_a, torch.Tensor) else torch.device("cpu")
    pos = torch.as_tensor(positions_a, dtype=torch.float64, device=device) / pixel_size_a + box // 2
    w = torch.as_tensor(weights, dtype=torch.float32, device=device)
    sigma_px = atom_sigma_a / pixel_size_a
    half = int(math.ceil(cutoff_sigmas * sigma_px))
    offs = torch.arange(-half, half + 1, device=device)  # (k,)
    out = torch.zeros(box**3, dtype=torch.float32, device=device)
    for start in range(0, pos.shape[0], batch):
        p = pos[start : start + batch]  # (n, 3) voxel coordinates (x, y, z)
        base = torch.round(p).to(torch.long)  # nearest voxel
        idx = base[:, None, :] + offs[None, :, None]  # (n, k, 3)
        d = (idx.to(torch.float64) - p[:, None, :]).to(torch.float32)
        g = torch.exp(-(d**2) / (2 * sigma_px**2)) * (idx >= 0) * (idx < box)  # (n, k, 3)
        idx = idx.clamp(0, box - 1)
        gx, gy, gz = g[..., 0], g[..., 1], g[..., 2]
        vals = w[start : start + batch, None, None, None] * gz[:, :, None, None] * gy[:, None, :, None] * gx[:, None, None, :]
        flat = (idx[..., 2][:, :, None, None] * box + idx[..., 1][:, None, :, None]) * box + idx[..., 0][:, None, None, :]
        out.index_add_(0, flat.reshape(-1), vals.reshape(-1))
    return out.reshape(box, box, box)


def pseudo_atomic_phantom(
    box: int = 64,
    pixel_size_a: float = 3.0,
    n_atoms: int | None = None,
    radius_a: float | None = None,
    symmetry: str = "C1",
    seed: int = 0,
    shape: str = "globular",
    conformation: int = 0,
    atom_sigma_a: float | None = None,
    hinge_deg: float = 25.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A seeded pseudo-atomic phantom map.

    Parameters
    ----------
    box
        Edge of the cubic map in voxels.
    pixel_size_a
        Voxel size in Angstrom.
    n_atoms
        Number of Gaussian atoms (default: about one per 8 voxels of the particle's sphere,
        at least 200).
    radius_a
        Radius of the particle in Angstrom (default ``0.28 * box * pixel_size_a``, so that the
        box is about 1.6 diameters, as extraction boxes are).
    symmetry
        Point group: C1, Cn, Dn, T, O or I (RELION's conventions).
    seed
        Geometry seed.
    shape
        ``"globular"``, ``"elongated"`` or ``"ring"``.
    conformation
        0 for the base structure, 1, 2, ... for hinge-displaced versions of it.
    atom_sigma_a
        Width of each atom in Angstrom (default ``max(2 A, 1.1 * pixel_size_a)``, which keeps the
        map band-limited below Nyquist).
    hinge_deg
        Hinge rotation per conformation step in degrees.
    device
        Device of the result (default CPU).

    Returns
    -------
    torch.Tensor
        ``(box, box, box)`` float32 map ``(z, y, x)``, protein positive, background 0.
    """
    if box < 8:
        raise InputError(None, f"phantom box must be at least 8 voxels (got {box})")
    if radius_a is None:
        radius_a = 0.28 * box * pixel_size_a
    if atom_sigma_a is None:
        atom_sigma_a = max(2.0, 1.1 * pixel_size_a)
    if n_atoms is None:
        vol_vox = 4.0 / 3.0 * math.pi * (radius_a / pixel_size_a) ** 3
        n_atoms = max(200, int(vol_vox / 8))
    pos, w = phantom_atoms(
        n_atoms=n_atoms,
        radius_a=radius_a,
        symmetry=symmetry,
        seed=seed,
        shape=shape,
        conformation=conformation,
        hinge_deg=hinge_deg,
    )
    vol = render_atoms(pos, w, box, pixel_size_a, atom_sigma_a, device=device)
    log.debug("phantom seed=%d shape=%s sym=%s conf=%d: %d atoms", seed, shape, symmetry, conformation, len(w))
    return vol


def phantom_set(
    n_structures: int = 1,
    n_conformations: int = 1,
    box: int = 64,
    pixel_size_a: float = 3.0,
    symmetry: str = "C1",
    seed: int = 0,
    shapes: Sequence[str] = SHAPES,
    **kwargs,
) -> list[torch.Tensor]:
    """Several distinct structures, each in several conformations.

    Structure ``s`` uses geometry seed ``seed * 1000 + s`` and shape ``shapes[s % len(shapes)]``,
    so different structures differ in shape and domain layout and their 2D classes separate.

    Parameters
    ----------
    n_structures, n_conformations
        Number of structures and of conformations of each.
    box, pixel_size_a, symmetry, seed
        As :func:`pseudo_atomic_phantom`.
    shapes
        Shapes cycled over the structures.
    **kwargs
        Passed to :func:`pseudo_atomic_phantom`.

    Returns
    -------
    list of torch.Tensor
        ``n_structures * n_conformations`` maps ``(box, box, box)``, ordered structure-major
        (structure 0 conformations 0..k-1, then structure 1, ...). Their 1-based position in this
        list is the ``rlnClassNumber`` the particle simulator writes.
    """
    vols = []
    for s in range(n_structures):
        for c in range(n_conformations):
            vols.append(
                pseudo_atomic_phantom(
                    box=box,
                    pixel_size_a=pixel_size_a,
                    symmetry=symmetry,
                    seed=seed * 1000 + s,
                    shape=shapes[s % len(shapes)],
                    conformation=c,
                    **kwargs,
                )
            )
    return vols


def load_map(path: str | Path) -> tuple[torch.Tensor, float]:
    """A user's map (MRC) as a simulation volume.

    Parameters
    ----------
    path
        MRC file holding one cubic volume.

    Returns
    -------
    volume : torch.Tensor
        ``(d, d, d)`` float32 map ``(z, y, x)``.
    pixel_size_a : float
        Voxel size from the header (Angstrom).
    """
    from autospa.io.mrc import read_mrc

    data, pixel_size_a = read_mrc(path)
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise InputError(path, f"expected a cubic 3D map, got shape {tuple(data.shape)}")
    vol = torch.as_tensor(np.asarray(data, dtype=np.float32))
    return vol, float(pixel_size_a)
