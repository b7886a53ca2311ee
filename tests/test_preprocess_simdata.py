"""Simulated micrographs and movies with ground truth for the preprocessing tests.

The simulator package (``autospa.simulate``) makes movies from a canvas (``simulate_movie``) and
particle images; these helpers build the specimen canvases the preprocessing tests need:

* :func:`simulate_micrograph`: a square micrograph with pseudo-atomic particles (the
  simulator's phantoms, randomly rotated, projected) at known, non-overlapping positions, a thin
  layer of amorphous ice, an ice-thickness gradient, RELION's CTF with known defocus U/V/angle and
  white detector noise. Raw contrast: particles are dark.
* :func:`movie_canvas`: a positive intensity canvas (1 = vacuum) with the same content, larger
  than the frames by a margin, for :func:`autospa.simulate.movies.simulate_movie`.

The tests at the end check the helpers themselves (particles where the truth says, CTF as given).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from autospa.numerics.ctf import ctf_2d
from autospa.simulate.phantoms import phantom_atoms


@dataclass(frozen=True)
class SimMicrograph:
    """A simulated micrograph and its truth."""

    image: torch.Tensor  # (n, n) float32, particles dark
    coords_px: np.ndarray  # (k, 2) particle centres (x, y), pixels
    pixel_size_a: float
    defocus_u_a: float
    defocus_v_a: float
    defocus_angle_deg: float
    diameter_a: float
    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1


def _positions(rng: np.random.Generator, n: int, k: int, min_dist_px: float, edge_px: float) -> np.ndarray:
    pts: list[np.ndarray] = []
    tries = 0
    while len(pts) < k and tries < 20000:
        tries += 1
        p = rng.uniform(edge_px, n - 1 - edge_px, size=2)
        if all(np.hypot(*(p - q)) >= min_dist_px for q in pts):
            pts.append(p)
    return np.array(pts, dtype=np.float64).reshape(-1, 2)


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.standard_normal(4)
    q /= np.linalg.norm(q)
    a, b, c, d = q
    return np.array(
        [
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d],
        ]
    )


def specimen(
    n: int,
    pixel_size_a: float,
    n_particles: int,
    diameter_a: float,
    seed: int,
    ice: float = 0.35,
    margin_px: int = 0,
    spacing: float = 1.5,
) -> tuple[torch.Tensor, np.ndarray]:
    """Projected potential ``(n + 2m, n + 2m)`` of particles + amorphous ice; centres in frame pixels.

    Each particle is a globular protein of diameter ``diameter``: a uniformly dense ellipsoid
    (semi-axes within 10 % of ``diameter / 2``) carrying the simulator's pseudo-atomic phantom as
    internal structure, rotated at random and projected; its projection peaks at about 1. The ice is white noise of standard
    deviation ``ice`` smoothed over 2 A (it gives the power spectrum its Thon rings everywhere).
    Particle centres are at least ``spacing`` diameters apart and ``0.6`` diameters from the edges.
    """
    rng = np.random.default_rng(seed)
    big = n + 2 * margin_px
    atoms, weights = phantom_atoms(n_atoms=600, radius_a=diameter_a / 2 * 0.9, seed=seed)
    atoms = np.asarray(atoms, dtype=np.float64)
    w_atoms = np.asarray(weights, dtype=np.float64)
    atoms = atoms - (atoms * w_atoms[:, None]).sum(0) / w_atoms.sum()  # centre of mass at the origin
    coords = _positions(rng, n, n_particles, spacing * diameter_a / pixel_size_a, 0.6 * diameter_a / pixel_size_a)
    grid = torch.zeros(big, big, dtype=torch.float64)
    for c in coords:
        r = (_rotation(rng) @ atoms.T).T / pixel_size_a  # pixels
        x = r[:, 0] + c[0] + margin_px
        y = r[:, 1] + c[1] + margin_px
        # bilinear splat
        x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
        fx, fy = x - x0, y - y0
        w = w_atoms
        for dx, dy, ww in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
            xi, yi = x0 + dx, y0 + dy
            ok = (xi >= 0) & (xi < big) & (yi >= 0) & (yi < big)
            grid.index_put_((torch.as_tensor(yi[ok]), torch.as_tensor(xi[ok])), torch.as_tensor((w * ww)[ok]), accumulate=True)
    ky = torch.fft.fftfreq(big, d=pixel_size_a, dtype=torch.float64).view(-1, 1)
    kx = torch.fft.rfftfreq(big, d=pixel_size_a, dtype=torch.float64).view(1, -1)
    k2 = kx**2 + ky**2
    blur = torch.exp(-2 * math.pi**2 * (2.0**2) * k2)  # atoms of sigma 2 A
    part = torch.fft.irfft2(torch.fft.rfft2(grid) * blur, s=(big, big))
    part = 0.5 * part / part.max().clamp_min(1e-12)
    half = int(math.ceil(0.6 * diameter_a / pixel_size_a))
    off = torch.arange(-half, half + 1, dtype=torch.float64)
    for c in coords:
        a, b = diameter_a / 2 / pixel_size_a * rng.uniform(0.9, 1.1, size=2)
        t = rng.uniform(0, math.pi)
        cx, cy = c[0] + margin_px, c[1] + margin_px
        x0, y0 = int(round(cx)), int(round(cy))
        ys, xs = (y0 + off).long().clamp(0, big - 1), (x0 + off).long().clamp(0, big - 1)
        dy, dx = torch.meshgrid(ys.double() - cy, xs.double() - cx, indexing="ij")
        u = dx * math.cos(t) + dy * math.sin(t)
        v = -dx * math.sin(t) + dy * math.cos(t)
        blob = 0.5 * torch.sqrt((1 - (u / a) ** 2 - (v / b) ** 2).clamp_min(0))
        part[ys[:, None], xs[None, :]] += blob
    g = torch.Generator().manual_seed(seed + 1)
    ice_noise = torch.randn(big, big, generator=g, dtype=torch.float64)
    ice_noise = torch.fft.irfft2(torch.fft.rfft2(ice_noise) * torch.exp(-2 * math.pi**2 * 1.0 * k2), s=(big, big))
    ice_noise = ice * ice_noise / ice_noise.std()
    return (part + ice_noise).to(torch.float32), coords


def apply_ctf(
    potential: torch.Tensor, pixel_size_a: float, du: float, dv: float, ang: float, bfactor: float = 40.0, phase_shift_deg: float = 0.0
) -> torch.Tensor:
    """Image contrast ``CTF * potential`` (protein white); square input."""
    n = potential.shape[-1]
    ctf = ctf_2d(du, dv, ang, 300.0, 2.7, 0.1, pixel_size_a, n, phase_shift_deg=phase_shift_deg, bfactor_a2=bfactor, dtype=torch.float64)[0]
    return torch.fft.irfft2(torch.fft.rfft2(potential.to(torch.float64)) * ctf, s=(n, n)).to(torch.float32)


def simulate_micrograph(
    n: int = 512,
    pixel_size_a: float = 1.5,
    n_particles: int = 12,
    diameter_a: float = 150.0,
    defocus_u_a: float = 16000.0,
    defocus_v_a: float = 15000.0,
    defocus_angle_deg: float = 30.0,
    noise: float = 1.0,
    seed: int = 0,
    gradient: float = 0.5,
    phase_shift_deg: float = 0.0,
) -> SimMicrograph:
    """A micrograph (particles dark) with known particle centres and CTF (see the module doc)."""
    pot, coords = specimen(n, pixel_size_a, n_particles, diameter_a, seed)
    img = -apply_ctf(pot, pixel_size_a, defocus_u_a, defocus_v_a, defocus_angle_deg, phase_shift_deg=phase_shift_deg)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, n), torch.linspace(-1, 1, n), indexing="ij")
    g = torch.Generator().manual_seed(seed + 2)
    img = img / img.std() + gradient * (0.6 * xx + 0.4 * yy) + noise * torch.randn(n, n, generator=g)
    return SimMicrograph(
        image=img.to(torch.float32),
        coords_px=coords,
        pixel_size_a=pixel_size_a,
        defocus_u_a=defocus_u_a,
        defocus_v_a=defocus_v_a,
        defocus_angle_deg=defocus_angle_deg,
        diameter_a=diameter_a,
    )


def movie_canvas(
    n: int, margin_px: int, pixel_size_a: float, seed: int, contrast: float = 0.15, n_particles: int = 6,
    defocus: tuple[float, float, float] = (15000.0, 14000.0, 20.0),
) -> torch.Tensor:
    """Relative intensity ``(n + 2m, n + 2m)`` (1 = vacuum) of a CTF-filtered specimen."""
    return movie_canvas_with_truth(n, margin_px, pixel_size_a, seed, contrast, n_particles, defocus)[0]


def movie_canvas_with_truth(
    n: int, margin_px: int, pixel_size_a: float, seed: int, contrast: float = 0.15, n_particles: int = 6,
    defocus: tuple[float, float, float] = (15000.0, 14000.0, 20.0),
) -> tuple[torch.Tensor, np.ndarray]:
    """:func:`movie_canvas` and the particle centres (frame-1 pixels) of 150 A particles."""
    pot, coords = specimen(n, pixel_size_a, n_particles, 150.0, seed, margin_px=margin_px)
    img = -apply_ctf(pot, pixel_size_a, *defocus)
    return (1.0 + contrast * img / img.std()).clamp_min(0.05), coords


# ------------------------------------------------------------------------------ helper tests ---


def test_particles_are_where_the_truth_says() -> None:
    m = simulate_micrograph(n=256, n_particles=4, noise=0.0, gradient=0.0, diameter_a=120.0, pixel_size_a=2.0, seed=3)
    pot, coords = specimen(256, 2.0, 4, 120.0, 3)
    np.testing.assert_allclose(coords, m.coords_px)
    for x, y in coords:
        xi, yi = int(round(x)), int(round(y))
        inside = float(pot[yi - 5 : yi + 6, xi - 5 : xi + 6].mean())
        assert inside > 0.2, inside  # particle density at the true centre
    assert coords.shape == (4, 2)


def test_ctf_of_helper_matches_numerics() -> None:
    # a delta function's image is the CTF itself (real space PSF): its spectrum is the CTF
    pot = torch.zeros(128, 128)
    pot[0, 0] = 1.0
    img = apply_ctf(pot, 1.0, 12000.0, 11000.0, 40.0, bfactor=0.0)
    spec = torch.fft.rfft2(img.to(torch.float64)).real
    ref = ctf_2d(12000.0, 11000.0, 40.0, 300.0, 2.7, 0.1, 1.0, 128, dtype=torch.float64)[0]
    # (the Nyquist row and column of an astigmatic CTF are not Hermitian; a real image cannot hold them)
    keep = torch.ones_like(ref, dtype=torch.bool)
    keep[64, :] = False
    keep[:, -1] = False
    assert float((spec - ref).abs()[keep].max()) < 1e-5
