"""Micrographs with particles at known positions, a CTF and an ice-thickness gradient.

Image model (raw micrograph contrast: protein dark, as recorded)
    The expected relative intensity (1 = vacuum, no specimen) at pixel ``p`` is

        I(p) = T(p) * (1 - contrast * (CTF (*) S)(p) / level)

    where ``S`` is the sum of the particles' projections (numerics.projection, protein
    positive) placed with their centres at the true coordinates, ``CTF (*)`` the micrograph's
    astigmatic RELION CTF applied in Fourier space over the whole field (so fringes spread
    between particles, as on real data), ``level`` the mean peak of the particles' projections and
    ``T(p) = exp(-t(p) / mean_free_path)`` the transmission of an ice layer of thickness ``t(p)``:
    a linear gradient from ``ice_thickness_nm[0]`` to ``ice_thickness_nm[1]`` across the field
    along a random direction, plus a gentle smooth fluctuation. The CTF is positive at zero
    frequency (``+Q0``), so protein comes out dark; RELION's extraction inverts it.
Coordinates
    ``rlnCoordinateX/Y`` count pixels from the first pixel of the micrograph (x along columns);
    a particle's projection centre (pixel ``d // 2`` of its box) lies exactly there (sub-pixel
    positions through a Fourier phase shift). With ``margin_px > 0`` the returned intensity is a
    *canvas* larger by the margin on every side, for :func:`autospa.simulate.movies.simulate_movie`;
    coordinates stay in micrograph (frame 1) pixels: canvas pixel = coordinate + margin.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from autospa.conventions import euler_to_matrix
from autospa.errors import InputError
from autospa.numerics.ctf import ctf_2d
from autospa.numerics.fourier import irfft2, rfft2, shift_images
from autospa.numerics.projection import prepare_volume_ft, project_fourier
from autospa.simulate.particles import sample_orientations

log = logging.getLogger(__name__)

_TAG_POS = 501
_TAG_CTF = 502
_TAG_ICE = 503
_TAG_POSE = 504
_TAG_CLASS = 505
_TAG_SCATTER = 506
#: Mean ice thickness (nm) at which the ice texture has the standard deviation ``ice_scatter``.
ICE_SCATTER_REF_NM = 45.0


def _rng(seed: int, tag: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(tag)])


@dataclass(frozen=True)
class Micrograph:
    """A simulated micrograph (noise free) and its truth.

    Attributes
    ----------
    intensity
        ``(h + 2 m, w + 2 m)`` float32 expected relative intensity (1 = vacuum), ``m = margin_px``.
    margin_px
        Margin of ``intensity`` around the micrograph's field of view.
    coordinates
        One row per particle: rlnCoordinateX, rlnCoordinateY (pixels, frame 1), rlnAngleRot,
        rlnAngleTilt, rlnAnglePsi, rlnClassNumber (1-based volume index).
    defocus_u_a, defocus_v_a, defocus_angle_deg
        The micrograph's CTF (RELION's convention).
    ice_thickness_nm
        ``(h + 2 m, w + 2 m)`` float32 ice thickness.
    pixel_size_a
        Pixel size in Angstrom.
    """

    intensity: torch.Tensor
    margin_px: int
    coordinates: pd.DataFrame
    defocus_u_a: float
    defocus_v_a: float
    defocus_angle_deg: float
    ice_thickness_nm: torch.Tensor
    pixel_size_a: float

    @property
    def shape(self) -> tuple[int, int]:
        """``(h, w)`` of the micrograph (without margin)."""
        m = self.margin_px
        return int(self.intensity.shape[0] - 2 * m), int(self.intensity.shape[1] - 2 * m)

    def field_of_view(self) -> torch.Tensor:
        """``(h, w)`` view of the intensity without the margin."""
        m = self.margin_px
        h, w = self.shape
        return self.intensity[m : m + h, m : m + w]


def place_particles(
    n: int,
    shape: tuple[int, int],
    edge_px: float,
    min_distance_px: float,
    rng: np.random.Generator,
    max_tries: int = 200,
) -> np.ndarray:
    """Random positions at least ``min_distance_px`` apart and ``edge_px`` from the border.

    Dart throwing: up to ``max_tries * n`` candidates; fewer than ``n`` positions come back
    when the field is full.

    Returns
    -------
    np.ndarray
        ``(k, 2)`` float64 ``(x, y)`` pixel coordinates, ``k <= n``.
    """
    h, w = shape
    if w - 2 * edge_px <= 0 or h - 2 * edge_px <= 0:
        raise InputError(None, f"micrograph {w}x{h} px is too small for particles {2 * edge_px:.0f} px wide")
    out: list[np.ndarray] = []
    d2 = min_distance_px**2
    tries = 0
    while len(out) < n and tries < max_tries * max(n, 1):
        cand = rng.uniform([edge_px, edge_px], [w - edge_px, h - edge_px], size=(64, 2))
        tries += 64
        for c in cand:
            if len(out) >= n:
                break
            if not out or np.min(np.sum((np.asarray(out) - c) ** 2, axis=1)) >= d2:
                out.append(c)
    return np.asarray(out, dtype=np.float64).reshape(-1, 2)


def _smooth(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> torch.Tensor:
    noise = torch.as_tensor(rng.standard_normal(shape))
    ky = torch.fft.fftfreq(shape[0], dtype=torch.float64)[:, None]
    kx = torch.fft.rfftfreq(shape[1], dtype=torch.float64)[None, :]
    f = torch.fft.irfft2(torch.fft.rfft2(noise) * torch.exp(-2 * math.pi**2 * scale_px**2 * (kx**2 + ky**2)), s=shape)
    return f / f.std().clamp_min(1e-12)


def simulate_micrograph(
    volumes: Sequence[torch.Tensor],
    shape: tuple[int, int],
    pixel_size_a: float,
    n_particles: int,
    seed: int = 0,
    margin_px: int = 0,
    class_weights: Sequence[float] | None = None,
    orientation: str = "uniform",
    min_distance_px: float | None = None,
    defocus_range_a: tuple[float, float] = (10000.0, 25000.0),
    max_astigmatism_a: float = 1000.0,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.1,
    bfactor_a2: float = 0.0,
    contrast: float = 0.1,
    ice_thickness_nm: tuple[float, float] = (30.0, 60.0),
    mean_free_path_nm: float = 320.0,
    ice_scatter: float = 0.25,
) -> Micrograph:
    """Simulate one noise-free micrograph (or movie canvas) with known particles.

    Parameters
    ----------
    volumes
        Structures, each ``(d, d, d)`` at ``pixel_size_a``; particle class ``k`` is ``volumes[k-1]``.
    shape
        ``(h, w)`` of the micrograph in pixels.
    pixel_size_a
        Pixel size in Angstrom.
    n_particles
        Particles to place (fewer if they do not fit at ``min_distance_px``).
    seed
        Seed of positions, poses, classes, CTF and ice.
    margin_px
        Extra border of the returned canvas (for drifting movie frames).
    class_weights
        Relative frequency of each volume (default equal).
    orientation
        ``"uniform"`` or ``"preferred"`` (:func:`autospa.simulate.particles.sample_orientations`).
    min_distance_px
        Smallest centre distance (default ``0.6 * d``: particles may touch, not overlap much).
    defocus_range_a, max_astigmatism_a
        Mean defocus uniform in the range; ``DefocusU - DefocusV`` uniform in [0, max].
    voltage_kv, cs_mm, amplitude_contrast, bfactor_a2
        Optics.
    contrast
        Relative intensity dip of a typical particle's densest point before the CTF.
    ice_thickness_nm
        Thickness at the two ends of the gradient.
    mean_free_path_nm
        Inelastic mean free path (about 320 nm at 300 kV with an energy filter).
    ice_scatter
        Standard deviation of the amorphous ice's phase texture relative to the particles'
        projected peak, for ice of 45 nm (proportional to the mean thickness): it passes through
        the CTF with the particles and gives the micrograph the Thon rings that CTF estimation
        fits (0: particles only).

    Returns
    -------
    Micrograph
    """
    if not volumes:
        raise InputError(None, "simulate_micrograph needs at least one volume")
    h, w = (int(v) for v in shape)
    d = int(volumes[0].shape[-1])
    if any(tuple(v.shape) != (d, d, d) for v in volumes):
        raise InputError(None, "volumes must all be cubic of the same size")
    if min(ice_thickness_nm) < 0 or mean_free_path_nm <= 0:
        raise InputError(None, "ice thickness must be >= 0 and the mean free path > 0")
    device = volumes[0].device
    min_distance_px = 0.6 * d if min_distance_px is None else float(min_distance_px)
    pos = place_particles(n_particles, (h, w), edge_px=d / 2, min_distance_px=min_distance_px, rng=_rng(seed, _TAG_POS))
    k = pos.shape[0]
    if k < n_particles:
        log.warning("only %d of %d particles fit on a %dx%d micrograph", k, n_particles, w, h)
    n_vol = len(volumes)
    wts = np.ones(n_vol) if class_weights is None else np.asarray(class_weights, dtype=np.float64)
    cls = _rng(seed, _TAG_CLASS).choice(n_vol, size=k, p=wts / wts.sum())
    angles, _ = sample_orientations(k, _rng(seed, _TAG_POSE), orientation)
    rng_c = _rng(seed, _TAG_CTF)
    mean_df = rng_c.uniform(*defocus_range_a)
    astig = rng_c.uniform(0.0, max_astigmatism_a)
    df_u, df_v, df_ang = mean_df + astig / 2, mean_df - astig / 2, rng_c.uniform(0.0, 180.0)

    hc, wc = h + 2 * margin_px, w + 2 * margin_px
    signal = torch.zeros(hc, wc, dtype=torch.float32, device=device)
    level = 0.0
    if k:
        rots = euler_to_matrix(torch.as_tensor(angles[:, 0]), torch.as_tensor(angles[:, 1]), torch.as_tensor(angles[:, 2]))
        rots = rots.to(device=device, dtype=torch.float32)
        projs = torch.empty(k, d, d, dtype=torch.float32, device=device)
        for c in range(n_vol):
            sel = np.flatnonzero(cls == c)
            if sel.size:
                projs[torch.as_tensor(sel, device=device)] = irfft2(project_fourier(prepare_volume_ft(volumes[c]), rots[sel]), d)
        level = float(projs.amax(dim=(-2, -1)).mean())
        q = pos + margin_px  # canvas coordinates of the centres
        base = np.floor(q).astype(np.int64)
        frac = torch.as_tensor(q - base, dtype=torch.float32, device=device)
        projs = shift_images(projs, frac)
        c0 = d // 2
        for i in range(k):
            x0, y0 = int(base[i, 0]) - c0, int(base[i, 1]) - c0
            xs, ys = max(x0, 0), max(y0, 0)
            xe, ye = min(x0 + d, wc), min(y0 + d, hc)
            if xe > xs and ye > ys:
                signal[ys:ye, xs:xe] += projs[i, ys - y0 : ye - y0, xs - x0 : xe - x0]
    ctf = ctf_2d(
        df_u, df_v, df_ang, voltage_kv, cs_mm, amplitude_contrast, pixel_size_a, (hc, wc),
        bfactor_a2=bfactor_a2, device=device,
    )[0]  # fmt: skip
    amp = ice_scatter * 0.5 * (ice_thickness_nm[0] + ice_thickness_nm[1]) / ICE_SCATTER_REF_NM
    if amp > 0:  # amorphous ice: a random phase texture through the same CTF (Thon rings)
        ice = _smooth(_rng(seed, _TAG_SCATTER), (hc, wc), scale_px=0.8 / pixel_size_a)  # half power at ~4 A
        signal = signal + float(amp) * (level if level > 0 else 1.0) * ice.to(device=device, dtype=signal.dtype)
    phase = irfft2(rfft2(signal) * ctf, (hc, wc))
    rng_i = _rng(seed, _TAG_ICE)
    theta = rng_i.uniform(0, 2 * math.pi)
    yy, xx = torch.meshgrid(
        torch.arange(hc, dtype=torch.float64), torch.arange(wc, dtype=torch.float64), indexing="ij"
    )
    along = xx * math.cos(theta) + yy * math.sin(theta)
    along = (along - along.min()) / (along.max() - along.min()).clamp_min(1e-12)
    t_lo, t_hi = ice_thickness_nm
    fluct = _smooth(rng_i, (hc, wc), scale_px=max(hc, wc) / 8) * 0.02 * 0.5 * (t_lo + t_hi)
    thickness = (t_lo + (t_hi - t_lo) * along + fluct).clamp_min(0.0)
    transmission = torch.exp(-thickness / mean_free_path_nm).to(device=device, dtype=torch.float32)
    scale = contrast / level if level > 0 else 0.0
    intensity = transmission * (1.0 - scale * phase)
    coords = pd.DataFrame(
        {
            "rlnCoordinateX": pos[:, 0],
            "rlnCoordinateY": pos[:, 1],
            "rlnAngleRot": angles[:, 0],
            "rlnAngleTilt": angles[:, 1],
            "rlnAnglePsi": angles[:, 2],
            "rlnClassNumber": (cls + 1).astype(np.int64),
        }
    )
    return Micrograph(
        intensity=intensity.clamp_min(0.0),
        margin_px=int(margin_px),
        coordinates=coords,
        defocus_u_a=float(df_u),
        defocus_v_a=float(df_v),
        defocus_angle_deg=float(df_ang),
        ice_thickness_nm=thickness.to(torch.float32),
        pixel_size_a=float(pixel_size_a),
    )
