"""Simulated particle images with ground truth, and a writer for RELION/Zarr particle sets.

Image model (RELION's, relion-conventions.md): for a particle of class ``c`` with Euler angles A,
shift ``d = (dx, dy)`` pixels and CTF parameters, the noise-free image is

    S = crop( IFFT( CTF * ramp(d) * FFT( pad(P_A V_c) ) ) )

where ``P_A V_c`` is the projection of volume ``c`` (numerics.projection), ``pad`` zero-pads it to
twice the box so that the CTF's delocalised fringes are truncated by the box edge (as extraction
from a micrograph does) instead of wrapping around, and ``ramp(d)`` moves the particle's centre to
``box // 2 + d``. Protein is white (contrast already inverted, as RELION's extracted particles).
The truth origin is ``rlnOriginX/YAngst = -d * pixel_size`` (the particle sits at box centre minus
origin).

Noise and SNR
    White Gaussian noise of one variance ``sigma^2`` for the whole set, chosen so that

        SNR = mean over non-junk particles of var_box(S_i) / sigma^2

    equals the request (``var_box`` is the variance over all pixels of the box). Images are then
    normalised as RELION's extraction does: the pixels outside the background circle (radius
    ``bg_radius_px``, RELION's default ``0.375 * box``) get mean 0 and standard deviation 1. The
    same affine map is applied to the noise-free images returned with ``return_clean=True``, so
    ``var(clean_i) / var(noisy_i - clean_i)`` averages to the requested SNR.

Junk (``rlnAutospaIsJunk = 1``; kind in ``rlnAutospaJunkKind``, codes in :data:`JUNK_KINDS`)
    1 empty ice: a faint smooth ice-thickness fluctuation, no particle;
    2 aggregate: 3 to 6 particles of random classes and orientations clumped together;
    3 partial particle: a particle cut by a straight edge (broken) and pushed towards the box edge;
    4 carbon edge: a thick carbon film with a straight edge across the box (with a particle on it
      half of the time).
    All junk goes through the same CTF and noise as good particles. A junk image's class number is
    0; its pose columns hold the pose of the particle it contains (the first one for aggregates)
    and zeros when it contains none.

Seeds
    Every random draw comes from ``seed`` through independent streams; the same arguments give
    bit-identical images on the same device.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from autospa.conventions import euler_to_matrix
from autospa.errors import InputError
from autospa.numerics.ctf import ctf_2d
from autospa.numerics.fourier import irfft2, phase_ramp_2d, rfft2
from autospa.numerics.masks import background_mask

log = logging.getLogger(__name__)

#: rlnAutospaJunkKind codes.
JUNK_KINDS: dict[int, str] = {0: "none", 1: "empty_ice", 2: "aggregate", 3: "partial", 4: "carbon_edge"}
_KIND_CODE = {v: k for k, v in JUNK_KINDS.items()}

#: Particles simulated per batch (fixed, so that results do not depend on memory settings).
_BATCH = 512

_TAG_CLASS = 401
_TAG_POSE = 402
_TAG_SHIFT = 403
_TAG_CTF = 404
_TAG_JUNK = 405
_TAG_NOISE = 406
_TAG_VIEWS = 407


def _rng(seed: int, tag: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(tag)])


def _torch_gen(seed: int, tag: int, sub: int = 0) -> torch.Generator:
    g = torch.Generator(device="cpu")
    state = np.random.SeedSequence([int(seed), int(tag), int(sub)]).generate_state(1, np.uint64)[0]
    g.manual_seed(int(state >> 1))
    return g


# ----------------------------------------------------------------------------------- poses ---


def uniform_views(n: int, seed: int = 0) -> np.ndarray:
    """``n`` projection directions spread evenly over the sphere (Fibonacci lattice, randomly rotated).

    Returns
    -------
    np.ndarray
        ``(n, 2)`` float64 ``(rot, tilt)`` in degrees.
    """
    rng = _rng(seed, _TAG_VIEWS)
    i = np.arange(n) + 0.5
    z = 1.0 - 2.0 * i / n
    phi = math.pi * (3.0 - math.sqrt(5.0)) * i
    r = np.sqrt(1 - z * z)
    v = np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)
    q = np.linalg.qr(rng.standard_normal((3, 3)))[0]
    v = v @ q.T
    tilt = np.degrees(np.arccos(np.clip(v[:, 2], -1, 1)))
    rot = np.degrees(np.arctan2(v[:, 1], v[:, 0]))
    return np.stack([rot, tilt], axis=1)


def sample_orientations(
    n: int,
    rng: np.random.Generator,
    orientation: str | Sequence[Sequence[float]] | np.ndarray = "uniform",
    view_count: int | None = None,
    preferred_views: Sequence[Sequence[float]] = ((0.0, 0.0), (0.0, 90.0)),
    preferred_fraction: float = 0.7,
    preferred_spread_deg: float = 10.0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Draw Euler angles.

    Parameters
    ----------
    n
        Number of particles.
    rng
        Random generator.
    orientation
        ``"uniform"`` (uniform on SO(3)), ``"preferred"`` (a fraction near ``preferred_views``,
        the rest uniform), ``"views"`` (``view_count`` fixed directions from :func:`uniform_views`)
        or an array of fixed views ``(k, 2)`` (rot, tilt) or ``(k, 3)`` (rot, tilt, psi) in degrees.
        Psi is uniform unless the fixed views give it.
    view_count
        Number of fixed views for ``"views"``.
    preferred_views
        ``(rot, tilt)`` of the preferred directions (default: top and side view).
    preferred_fraction
        Share of particles near a preferred direction.
    preferred_spread_deg
        Angular standard deviation around a preferred direction.
    seed
        Seed of the fixed views for ``"views"``.

    Returns
    -------
    angles : np.ndarray
        ``(n, 3)`` float64 (rot, tilt, psi) in degrees; tilt in [0, 180], rot and psi in (-180, 180].
    view_index : np.ndarray or None
        ``(n,)`` int64 1-based fixed view of each particle (None unless fixed views are used).
    """
    psi = rng.uniform(-180.0, 180.0, n)
    if isinstance(orientation, str) and orientation == "uniform":
        rot = rng.uniform(-180.0, 180.0, n)
        tilt = np.degrees(np.arccos(rng.uniform(-1.0, 1.0, n)))
        return np.stack([rot, tilt, psi], axis=1), None
    if isinstance(orientation, str) and orientation == "preferred":
        rot = rng.uniform(-180.0, 180.0, n)
        tilt = np.degrees(np.arccos(rng.uniform(-1.0, 1.0, n)))
        pv = np.radians(np.asarray(preferred_views, dtype=np.float64).reshape(-1, 2))
        near = rng.random(n) < preferred_fraction
        which = rng.integers(0, len(pv), n)
        dirs = np.stack(
            [np.sin(pv[:, 1]) * np.cos(pv[:, 0]), np.sin(pv[:, 1]) * np.sin(pv[:, 0]), np.cos(pv[:, 1])], axis=1
        )[which]
        v = dirs + rng.standard_normal((n, 3)) * math.radians(preferred_spread_deg)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        rot = np.where(near, np.degrees(np.arctan2(v[:, 1], v[:, 0])), rot)
        tilt = np.where(near, np.degrees(np.arccos(np.clip(v[:, 2], -1, 1))), tilt)
        return np.stack([rot, tilt, psi], axis=1), None
    if isinstance(orientation, str) and orientation == "views":
        if not view_count or view_count < 1:
            raise InputError(None, "orientation 'views' needs view_count >= 1")
        views = uniform_views(int(view_count), seed=seed)
    elif isinstance(orientation, str):
        raise InputError(None, f"unknown orientation {orientation!r} (uniform, preferred, views, or an array of views)")
    else:
        views = np.asarray(orientation, dtype=np.float64)
        if views.ndim != 2 or views.shape[1] not in (2, 3) or len(views) == 0:
            raise InputError(None, f"fixed views must be a (k, 2) or (k, 3) array of degrees, got shape {views.shape}")
    idx = rng.integers(0, len(views), n)
    rot, tilt = views[idx, 0], views[idx, 1]
    if views.shape[1] == 3:
        psi = views[idx, 2]
    return np.stack([rot, tilt, psi], axis=1), idx.astype(np.int64) + 1


# ------------------------------------------------------------------------------ projection ---


def _project(volume_ft, rotations: torch.Tensor) -> torch.Tensor:
    """Real-space projections ``(B, d, d)`` of one prepared volume for ``(B, 3, 3)`` matrices A."""
    from autospa.numerics.projection import project_fourier

    return irfft2(project_fourier(volume_ft, rotations))


def _prepare(volume: torch.Tensor):
    from autospa.numerics.projection import prepare_volume_ft

    return prepare_volume_ft(volume)


def _fit_box(images: torch.Tensor, box: int) -> torch.Tensor:
    """Centre-crop or zero-pad ``(B, d, d)`` real images to ``(B, box, box)`` (centre d//2 -> box//2)."""
    d = images.shape[-1]
    if d == box:
        return images
    if d > box:
        o = d // 2 - box // 2
        return images[..., o : o + box, o : o + box]
    out = images.new_zeros((*images.shape[:-2], box, box))
    o = box // 2 - d // 2
    out[..., o : o + d, o : o + d] = images
    return out


def _pad2(images: torch.Tensor) -> torch.Tensor:
    """Zero-pad ``(B, n, n)`` to ``(B, 2n, 2n)`` keeping the centre pixel (n//2 -> n)."""
    return _fit_box(images, 2 * images.shape[-1])


def _smooth_field(gen: torch.Generator, b: int, n: int, scale_px: float, device) -> torch.Tensor:
    """``(b, n, n)`` smooth Gaussian random fields, unit standard deviation."""
    noise = torch.randn(b, n, n, generator=gen).to(device)
    k = torch.fft.fftfreq(n, device=device)
    k2 = k[:, None] ** 2 + torch.fft.rfftfreq(n, device=device)[None, :] ** 2
    filt = torch.exp(-2 * math.pi**2 * scale_px**2 * k2)
    f = torch.fft.irfft2(torch.fft.rfft2(noise) * filt, s=(n, n))
    return f / f.flatten(1).std(dim=1).clamp_min(1e-12)[:, None, None]


def _soft_half_plane(
    n: int, angle_rad: torch.Tensor, offset_px: torch.Tensor, width_px: float, device
) -> torch.Tensor:
    """``(b, n, n)`` masks: 1 on the side ``x cos a + y sin a > offset`` of a line, soft edge."""
    idx = torch.arange(n, device=device, dtype=torch.float32) - n // 2
    y, x = torch.meshgrid(idx, idx, indexing="ij")
    a = angle_rad.to(device=device, dtype=torch.float32)[:, None, None]
    s = x[None] * torch.cos(a) + y[None] * torch.sin(a) - offset_px.to(device=device, dtype=torch.float32)[:, None, None]
    return torch.sigmoid(s / max(width_px, 1e-3))


# ----------------------------------------------------------------------------- simulation ---


def particle_optics(
    pixel_size_a: float,
    box: int,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.1,
    name: str = "opticsGroup1",
) -> pd.DataFrame:
    """RELION 3.1 ``data_optics`` table of one optics group for a particle set.

    Returns
    -------
    pd.DataFrame
        One row: rlnOpticsGroupName, rlnOpticsGroup, rlnVoltage, rlnSphericalAberration,
        rlnAmplitudeContrast, rlnImagePixelSize, rlnImageSize, rlnImageDimensionality,
        rlnCtfDataAreCtfPremultiplied (0: the images are not multiplied by their CTF).
    """
    return pd.DataFrame(
        {
            "rlnOpticsGroupName": [name],
            "rlnOpticsGroup": np.array([1], dtype=np.int64),
            "rlnVoltage": [float(voltage_kv)],
            "rlnSphericalAberration": [float(cs_mm)],
            "rlnAmplitudeContrast": [float(amplitude_contrast)],
            "rlnImagePixelSize": [float(pixel_size_a)],
            "rlnImageSize": np.array([int(box)], dtype=np.int64),
            "rlnImageDimensionality": np.array([2], dtype=np.int64),
            "rlnCtfDataAreCtfPremultiplied": np.array([0], dtype=np.int64),
        }
    )


def simulate_particles(
    volumes: Sequence[torch.Tensor],
    n: int,
    pixel_size_a: float,
    box: int | None = None,
    snr: float = 0.1,
    seed: int = 0,
    orientation: str | Sequence[Sequence[float]] | np.ndarray = "uniform",
    view_count: int | None = None,
    class_weights: Sequence[float] | None = None,
    shift_sigma_px: float = 2.0,
    max_shift_px: float = 5.0,
    defocus_range_a: tuple[float, float] = (8000.0, 25000.0),
    max_astigmatism_a: float = 1000.0,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.1,
    bfactor_a2: float = 0.0,
    junk_fraction: float = 0.0,
    junk_kinds: Sequence[str] = ("empty_ice", "aggregate", "partial", "carbon_edge"),
    bg_radius_px: float | None = None,
    preferred_fraction: float = 0.7,
    preferred_spread_deg: float = 10.0,
    return_clean: bool = False,
) -> tuple[torch.Tensor, pd.DataFrame] | tuple[torch.Tensor, pd.DataFrame, torch.Tensor]:
    """Simulate a set of particle images with known poses, classes, CTFs and junk.

    The general engine (any volumes, 3D orientations). For 2D-classification data sets
    (K phantoms seen from one direction, random psi, true 2D class templates) call
    :func:`simulate_2d_classes`, which wraps this function. Everything runs on the device of
    ``volumes[0]`` (2000 particles of 64 px: about 3 s on 2 CPU cores, 0.3 s on an H200).

    Parameters
    ----------
    volumes
        Structures/conformations, each ``(d, d, d)`` at ``pixel_size_a`` (``d`` may differ from
        ``box``: projections are centre-cropped or padded). Particle class ``k`` (1-based
        rlnClassNumber) is ``volumes[k - 1]``. The device of ``volumes[0]`` is used.
    n
        Number of particles.
    pixel_size_a
        Pixel size in Angstrom.
    box
        Image size (default ``d``).
    snr
        Requested SNR (module docstring: mean signal variance over the box / noise variance).
        ``math.inf`` gives noise-free images (normalised by the background of the clean image).
    seed
        Seed of every random draw.
    orientation, view_count, preferred_fraction, preferred_spread_deg
        Orientation distribution (:func:`sample_orientations`).
    class_weights
        Relative frequency of each volume (default equal).
    shift_sigma_px, max_shift_px
        Particle shifts: Gaussian per axis with this sigma, clipped to ``max_shift_px``.
    defocus_range_a
        Range of the mean defocus (uniform), Angstrom.
    max_astigmatism_a
        ``DefocusU - DefocusV`` is uniform in ``[0, max_astigmatism_a]``; the angle is uniform in
        [0, 180) degrees.
    voltage_kv, cs_mm, amplitude_contrast, bfactor_a2
        Optics and CTF envelope.
    junk_fraction
        Share of junk images.
    junk_kinds
        Kinds of junk to draw from (equally often): see :data:`JUNK_KINDS`.
    bg_radius_px
        Background radius for the normalisation (default ``0.375 * box``).
    return_clean
        Also return the noise-free images (after the same normalisation).

    Returns
    -------
    images : torch.Tensor
        ``(n, box, box)`` float32.
    truth : pd.DataFrame
        One row per image: rlnAngleRot, rlnAngleTilt, rlnAnglePsi, rlnOriginXAngst,
        rlnOriginYAngst, rlnDefocusU, rlnDefocusV, rlnDefocusAngle, rlnPhaseShift, rlnCtfBfactor,
        rlnClassNumber (1-based volume index, 0 for junk), rlnOpticsGroup, rlnAutospaIsJunk,
        rlnAutospaJunkKind, and rlnAutospaTrueView (1-based) when fixed views are used.
    clean : torch.Tensor
        ``(n, box, box)`` float32 noise-free images, only with ``return_clean=True``.
    """
    if not volumes:
        raise InputError(None, "simulate_particles needs at least one volume")
    d = int(volumes[0].shape[-1])
    for v in volumes:
        if v.ndim != 3 or len(set(v.shape)) != 1 or v.shape[-1] != d:
            raise InputError(None, f"volumes must all be cubic of the same size, got {tuple(v.shape)}")
    box = d if box is None else int(box)
    if n < 1:
        raise InputError(None, f"number of particles must be positive (got {n})")
    if not (snr > 0):
        raise InputError(None, f"SNR must be positive (got {snr})")
    if not 0.0 <= junk_fraction <= 1.0:
        raise InputError(None, f"junk fraction must be within [0, 1] (got {junk_fraction})")
    bad = [k for k in junk_kinds if k not in _KIND_CODE or k == "none"]
    if bad or (junk_fraction > 0 and not junk_kinds):
        raise InputError(None, f"unknown junk kinds {bad} (choose from {list(JUNK_KINDS.values())[1:]})")
    device = volumes[0].device
    n_vol = len(volumes)
    w = np.ones(n_vol) if class_weights is None else np.asarray(class_weights, dtype=np.float64)
    if w.shape != (n_vol,) or np.any(w < 0) or w.sum() <= 0:
        raise InputError(None, f"class_weights must be {n_vol} non-negative numbers")
    w = w / w.sum()
    bg_radius_px = 0.375 * box if bg_radius_px is None else float(bg_radius_px)

    # ---- per-particle parameters (all drawn up front, in numpy, from independent streams)
    rng_c = _rng(seed, _TAG_CLASS)
    cls0 = rng_c.choice(n_vol, size=n, p=w)
    is_junk = rng_c.random(n) < junk_fraction
    kind = np.zeros(n, dtype=np.int64)
    if junk_kinds:
        kind[is_junk] = np.array([_KIND_CODE[k] for k in junk_kinds])[rng_c.integers(0, len(junk_kinds), int(is_junk.sum()))]
    angles, view_idx = sample_orientations(
        n,
        _rng(seed, _TAG_POSE),
        orientation,
        view_count=view_count,
        preferred_fraction=preferred_fraction,
        preferred_spread_deg=preferred_spread_deg,
        seed=seed,
    )
    rng_s = _rng(seed, _TAG_SHIFT)
    shifts = np.clip(rng_s.standard_normal((n, 2)) * shift_sigma_px, -max_shift_px, max_shift_px)
    rng_d = _rng(seed, _TAG_CTF)
    mean_df = rng_d.uniform(defocus_range_a[0], defocus_range_a[1], n)
    astig = rng_d.uniform(0.0, max_astigmatism_a, n)
    df_u = mean_df + astig / 2
    df_v = mean_df - astig / 2
    df_ang = rng_d.uniform(0.0, 180.0, n)
    rng_j = _rng(seed, _TAG_JUNK)
    # per-junk extras, drawn for every particle so that the streams do not depend on the kinds
    j_count = rng_j.integers(3, 7, n)  # aggregate size
    j_cls = rng_j.choice(n_vol, size=(n, 6), p=w)
    j_rot = rng_j.uniform(-180, 180, (n, 6))
    j_tilt = np.degrees(np.arccos(rng_j.uniform(-1, 1, (n, 6))))
    j_psi = rng_j.uniform(-180, 180, (n, 6))
    j_off = rng_j.uniform(0.25, 0.55, (n, 6)) * box
    j_dir = rng_j.uniform(0, 2 * math.pi, (n, 6))
    j_angle = rng_j.uniform(0, 2 * math.pi, n)
    j_line = rng_j.uniform(-0.3, 0.3, n) * box
    j_strength = rng_j.uniform(0.6, 1.2, n)
    j_with_particle = rng_j.random(n) < 0.5

    prepared = [_prepare(v) for v in volumes]
    # typical particle projection level, to scale carbon and ice
    probe = euler_to_matrix(torch.zeros(3), torch.tensor([0.0, 90.0, 45.0]), torch.zeros(3)).to(torch.float32)
    level = float(np.mean([_project(p, probe.to(device)).amax(dim=(-2, -1)).mean().item() for p in prepared]))

    # ---- noise-free images, in batches
    clean = torch.empty(n, box, box, dtype=torch.float32, device=device)
    pad = 2 * box
    for start in range(0, n, _BATCH):
        sl = slice(start, min(n, start + _BATCH))
        b = sl.stop - sl.start
        imgs = torch.zeros(b, pad, pad, dtype=torch.float32, device=device)
        has_particle = ~is_junk[sl] | np.isin(kind[sl], [_KIND_CODE["partial"], _KIND_CODE["aggregate"]])
        has_particle |= (kind[sl] == _KIND_CODE["carbon_edge"]) & j_with_particle[sl]
        rots = euler_to_matrix(torch.as_tensor(angles[sl, 0]), torch.as_tensor(angles[sl, 1]), torch.as_tensor(angles[sl, 2]))
        rots = rots.to(device=device, dtype=torch.float32)
        for c in range(n_vol):
            sel = np.flatnonzero((cls0[sl] == c) & has_particle)
            if sel.size:
                proj = _fit_box(_project(prepared[c], rots[sel]), box)
                imgs[torch.as_tensor(sel, device=device)] = _pad2(proj)
        _add_junk(
            imgs, kind[sl], start, seed, box, level, prepared, device,
            count=j_count[sl], cls=j_cls[sl], rot=j_rot[sl], tilt=j_tilt[sl], psi=j_psi[sl], off=j_off[sl],
            direction=j_dir[sl], angle=j_angle[sl], line=j_line[sl], strength=j_strength[sl],
        )  # fmt: skip
        ft = rfft2(imgs)
        ctf = ctf_2d(
            torch.as_tensor(df_u[sl], device=device),
            torch.as_tensor(df_v[sl], device=device),
            torch.as_tensor(df_ang[sl], device=device),
            voltage_kv,
            cs_mm,
            amplitude_contrast,
            pixel_size_a,
            pad,
            bfactor_a2=bfactor_a2,
            device=device,
        )
        ramp = phase_ramp_2d(torch.as_tensor(shifts[sl], device=device, dtype=torch.float32), pad)
        out = irfft2(ft * ctf * ramp, s=(pad, pad))
        clean[sl] = _fit_box(out, box)

    # ---- noise at the requested SNR, then RELION's background normalisation
    good = ~is_junk
    ref = good if good.any() else np.ones(n, dtype=bool)
    signal_var = clean[torch.as_tensor(ref, device=device)].flatten(1).var(dim=1).mean().item()
    if signal_var <= 0:
        raise InputError(None, "the volumes project to empty images (all zero)")
    sigma = math.sqrt(signal_var / snr) if math.isfinite(snr) else 0.0
    images = torch.empty_like(clean)
    bg = background_mask(box, bg_radius_px, device)
    for start in range(0, n, _BATCH):
        sl = slice(start, min(n, start + _BATCH))
        noise = torch.randn(sl.stop - sl.start, box, box, generator=_torch_gen(seed, _TAG_NOISE, start // _BATCH))
        x = clean[sl] + sigma * noise.to(device)
        vals = x[:, bg]
        mean = vals.mean(dim=1)[:, None, None]
        std = vals.std(dim=1).clamp_min(1e-12)[:, None, None]
        images[sl] = (x - mean) / std
        clean[sl] = (clean[sl] - mean) / std

    truth = pd.DataFrame(
        {
            "rlnAngleRot": angles[:, 0],
            "rlnAngleTilt": angles[:, 1],
            "rlnAnglePsi": angles[:, 2],
            "rlnOriginXAngst": 0.0 - shifts[:, 0] * pixel_size_a,
            "rlnOriginYAngst": 0.0 - shifts[:, 1] * pixel_size_a,
            "rlnDefocusU": df_u,
            "rlnDefocusV": df_v,
            "rlnDefocusAngle": df_ang,
            "rlnPhaseShift": np.zeros(n),
            "rlnCtfBfactor": np.full(n, float(bfactor_a2)),
            "rlnClassNumber": np.where(is_junk, 0, cls0 + 1).astype(np.int64),
            "rlnOpticsGroup": np.ones(n, dtype=np.int64),
            "rlnAutospaIsJunk": is_junk.astype(np.int64),
            "rlnAutospaJunkKind": kind,
        }
    )
    # junk without a particle has no pose
    no_pose = is_junk & ~(np.isin(kind, [_KIND_CODE["partial"], _KIND_CODE["aggregate"]]) | ((kind == _KIND_CODE["carbon_edge"]) & j_with_particle))
    truth.loc[no_pose, ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]] = 0.0
    if view_idx is not None:
        truth["rlnAutospaTrueView"] = view_idx
    log.info(
        "simulated %d particles (box %d, %.2f A/px, SNR %g, %d junk, %d classes)", n, box, pixel_size_a, snr,
        int(is_junk.sum()), n_vol,
    )
    if return_clean:
        return images, truth, clean
    return images, truth


def _add_junk(
    imgs: torch.Tensor,
    kind: np.ndarray,
    first_index: int,
    seed: int,
    box: int,
    level: float,
    prepared: list,
    device,
    count: np.ndarray,
    cls: np.ndarray,
    rot: np.ndarray,
    tilt: np.ndarray,
    psi: np.ndarray,
    off: np.ndarray,
    direction: np.ndarray,
    angle: np.ndarray,
    line: np.ndarray,
    strength: np.ndarray,
) -> None:
    """Turn the padded projections ``imgs`` ``(b, 2 box, 2 box)`` of junk rows into junk, in place.

    Random fields come from a generator per particle (``first_index + row``), so an image does not
    depend on the batch it falls in nor on the kinds of the other images.
    """
    pad = imgs.shape[-1]
    agg = np.flatnonzero(kind == _KIND_CODE["aggregate"])
    if agg.size:
        # every extra member of every aggregate of the batch, projected per class in one call
        rows = np.concatenate([np.full(int(count[i]) - 1, i) for i in agg])
        members = np.concatenate([np.arange(int(count[i]) - 1) for i in agg])
        mats = euler_to_matrix(
            torch.as_tensor(rot[rows, members]), torch.as_tensor(tilt[rows, members]), torch.as_tensor(psi[rows, members])
        ).to(device=device, dtype=torch.float32)
        member_cls = cls[rows, members]
        projs = torch.empty(len(rows), box, box, dtype=torch.float32, device=device)
        for c in np.unique(member_cls):
            sel = np.flatnonzero(member_cls == c)
            projs[torch.as_tensor(sel, device=device)] = _fit_box(_project(prepared[int(c)], mats[sel]), box)
        padded = _pad2(projs)
        for q, (i, j) in enumerate(zip(rows, members)):
            dx = int(round(off[i, j] * math.cos(direction[i, j])))
            dy = int(round(off[i, j] * math.sin(direction[i, j])))
            imgs[i] += torch.roll(padded[q], shifts=(dy, dx), dims=(0, 1))
    for i in np.flatnonzero(kind > 0):
        k = JUNK_KINDS[int(kind[i])]
        if k == "empty_ice":
            gen = _torch_gen(seed, _TAG_JUNK, first_index + int(i))
            imgs[i] = 0.03 * level * _smooth_field(gen, 1, pad, scale_px=box / 6, device=device)[0]
        elif k == "partial":
            cut = _soft_half_plane(pad, torch.tensor([angle[i]]), torch.tensor([line[i] * 0.5]), 1.0, device)[0]
            part = imgs[i] * cut
            dx = int(round(0.3 * box * math.cos(angle[i] + math.pi)))
            dy = int(round(0.3 * box * math.sin(angle[i] + math.pi)))
            imgs[i] = torch.roll(part, shifts=(dy, dx), dims=(0, 1))
        elif k == "carbon_edge":
            gen = _torch_gen(seed, _TAG_JUNK, first_index + int(i))
            texture = _smooth_field(gen, 1, pad, scale_px=1.5, device=device)[0]
            film = _soft_half_plane(pad, torch.tensor([angle[i]]), torch.tensor([line[i]]), 1.5, device)[0]
            imgs[i] += strength[i] * level * film * (1.0 + 0.15 * texture)


# ------------------------------------------------------------------- 2D classification sets ---


@dataclass(frozen=True)
class SimulatedParticles:
    """A simulated particle set with everything a test needs.

    Attributes
    ----------
    images
        ``(n, box, box)`` float32 noisy images (protein white, background-normalised).
    truth
        One row per image (:func:`simulate_particles`): rlnClassNumber (1-based, 0 = junk),
        rlnAnglePsi, rlnOriginXAngst/YAngst, rlnDefocusU/V/Angle, rlnAutospaIsJunk ...
    optics
        One-row data_optics table (:func:`particle_optics`).
    volumes
        The ``K`` phantom volumes ``(box, box, box)`` (class k is ``volumes[k - 1]``).
    templates
        ``(K, box, box)`` float32 true 2D classes: each volume projected at the common view with
        psi 0, no shift, no CTF, centred at ``box // 2``. Particle i (not junk) is
        ``templates[c - 1]`` rotated by its rlnAnglePsi (a feature at ``r`` moves to
        ``R(psi) r``, :func:`autospa.conventions.psi_to_matrix_2d`), moved by
        ``-rlnOriginX/YAngst / pixel_size`` pixels, multiplied by its CTF, plus noise.
    clean
        ``(n, box, box)`` noise-free images on the same scale as ``images``, or None.
    """

    images: torch.Tensor
    truth: pd.DataFrame
    optics: pd.DataFrame
    volumes: list[torch.Tensor]
    templates: torch.Tensor
    clean: torch.Tensor | None


def simulate_2d_classes(
    n: int = 1000,
    n_classes: int = 3,
    box: int = 64,
    pixel_size_a: float = 2.0,
    snr: float = 0.05,
    seed: int = 0,
    view: tuple[float, float] = (0.0, 90.0),
    junk_fraction: float = 0.0,
    shift_sigma_px: float = 2.0,
    max_shift_px: float = 5.0,
    defocus_range_a: tuple[float, float] = (8000.0, 25000.0),
    device: torch.device | str | None = None,
    return_clean: bool = False,
    **kwargs,
) -> SimulatedParticles:
    """``n`` particles of ``n_classes`` 2D-distinguishable structures, for 2D classification tests.

    Every structure is a different seeded phantom (:func:`autospa.simulate.phantoms.phantom_set`:
    globular, elongated, ring ...), all seen from the same direction ``view`` = (rot, tilt), so
    that each class has one true 2D average (``templates``). Each particle gets a uniform random
    in-plane angle psi, a Gaussian shift (sigma ``shift_sigma_px``, clipped at ``max_shift_px``),
    its own astigmatic CTF and white noise at ``snr`` (signal variance over the box / noise
    variance, averaged over the non-junk particles; measured SNR within 1% of the request for
    n >= 500).

    Example (the lead's 2D engine tests)::

        sim = simulate_2d_classes(n=600, n_classes=3, box=48, pixel_size_a=3.0, snr=0.05, seed=1)
        sim.images            # (600, 48, 48) float32
        sim.truth["rlnClassNumber"], sim.truth["rlnAnglePsi"], sim.truth["rlnOriginXAngst"]
        write_particle_set(tmp, sim.images, sim.truth, sim.optics)  # RELION particles.star + MRCS

    Parameters
    ----------
    n, n_classes, box, pixel_size_a, snr, seed
        Size of the set, number of classes, image size (pixels), pixel size (Angstrom), SNR, seed.
    view
        Common projection direction (rot, tilt) in degrees; the default side view shows each
        phantom's long axis.
    junk_fraction
        Share of junk images (class 0), see :func:`simulate_particles`.
    shift_sigma_px, max_shift_px, defocus_range_a
        As :func:`simulate_particles`.
    device
        Where to compute (default CPU).
    return_clean
        Keep the noise-free images.
    **kwargs
        More :func:`simulate_particles` arguments (voltage_kv, cs_mm, amplitude_contrast,
        bfactor_a2, class_weights, max_astigmatism_a, junk_kinds, bg_radius_px).

    Returns
    -------
    SimulatedParticles
    """
    from autospa.numerics.projection import project_real
    from autospa.simulate.phantoms import phantom_set

    if n_classes < 1:
        raise InputError(None, f"need at least one class (got {n_classes})")
    vols = phantom_set(n_classes, 1, box=box, pixel_size_a=pixel_size_a, seed=seed, device=device)
    res = simulate_particles(
        vols, n, pixel_size_a, box=box, snr=snr, seed=seed, orientation=np.asarray([view], dtype=np.float64),
        shift_sigma_px=shift_sigma_px, max_shift_px=max_shift_px, defocus_range_a=defocus_range_a,
        junk_fraction=junk_fraction, return_clean=return_clean, **kwargs,
    )  # fmt: skip
    images, truth = res[0], res[1]
    rot = euler_to_matrix(torch.tensor([float(view[0])]), torch.tensor([float(view[1])]), torch.tensor([0.0]))
    rot = rot.to(device=vols[0].device, dtype=torch.float32)
    templates = torch.stack([project_real(v, rot)[0] for v in vols])
    opt_keys = {k: kwargs[k] for k in ("voltage_kv", "cs_mm", "amplitude_contrast") if k in kwargs}
    return SimulatedParticles(
        images=images,
        truth=truth,
        optics=particle_optics(pixel_size_a, box, **opt_keys),
        volumes=list(vols),
        templates=templates,
        clean=res[2] if return_clean else None,
    )


# --------------------------------------------------------------------------------- writing ---


def write_particle_set(
    outdir: str | Path,
    images: torch.Tensor | np.ndarray,
    truth: pd.DataFrame,
    optics: pd.DataFrame | Mapping,
    stack_dtype: str = "float16",
    store: bool = False,
    particles_per_stack: int = 10000,
    chunk_size: int = 1024,
) -> dict[str, Path]:
    """Write a simulated particle set in RELION's layout (and optionally as a particle store).

    Files (all written atomically)::

        outdir/Particles/stack.mrcs           MRC stack (mode 12 for float16, 2 for float32);
                                              Particles/stack_000.mrcs, stack_001.mrcs ... when
                                              there are more than ``particles_per_stack`` images
        outdir/particles.star                 data_optics + data_particles: rlnImageName
                                              (``000001@Particles/stack.mrcs``, relative to
                                              outdir), rlnOpticsGroup, rlnDefocusU/V/Angle,
                                              rlnPhaseShift, rlnCtfBfactor, rlnAngleRot/Tilt/Psi,
                                              rlnOriginXAngst/YAngst (the true values, as a
                                              refined data set would carry them)
        outdir/truth.star                     the same plus every truth column (class, junk ...)
        outdir/particles.zarr                 (store=True) the particle store, with the truth
                                              columns as metadata

    Parameters
    ----------
    outdir
        Output folder (created).
    images
        ``(n, box, box)`` images.
    truth
        ``n`` rows (as returned by :func:`simulate_particles`).
    optics
        data_optics table (:func:`particle_optics`) or one group as a mapping of RELION labels.
    stack_dtype
        ``"float16"`` or ``"float32"`` (stacks and store).
    store
        Also write ``particles.zarr``.
    particles_per_stack
        Images per MRCS file.
    chunk_size
        Particles per store chunk.

    Returns
    -------
    dict
        ``{"particles": Path, "truth": Path, "stacks": [Path, ...], "store": Path (if written)}``.
    """
    from autospa.io.mrc import write_mrc
    from autospa.io.preprocess_files import write_particles_star

    outdir = Path(outdir)
    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.ndim != 3 or arr.shape[1] != arr.shape[2]:
        raise InputError(None, f"images must be (n, box, box), got shape {arr.shape}")
    n, box = arr.shape[0], arr.shape[1]
    if len(truth) != n:
        raise InputError(None, f"{n} images but {len(truth)} truth rows")
    if stack_dtype not in ("float16", "float32"):
        raise InputError(None, f"stack dtype must be float16 or float32 (got {stack_dtype!r})")
    optics_df = pd.DataFrame([dict(optics)]) if isinstance(optics, Mapping) else optics.reset_index(drop=True)
    if "rlnImageSize" in optics_df.columns and int(optics_df["rlnImageSize"].iloc[0]) != box:
        raise InputError(None, f"optics rlnImageSize {int(optics_df['rlnImageSize'].iloc[0])} differs from the image box {box}")
    apix = float(optics_df["rlnImagePixelSize"].iloc[0])
    mode = 12 if stack_dtype == "float16" else 2
    names = []
    stacks = []
    n_stacks = max(1, math.ceil(n / particles_per_stack))
    for s in range(n_stacks):
        lo, hi = s * particles_per_stack, min(n, (s + 1) * particles_per_stack)
        rel = "Particles/stack.mrcs" if n_stacks == 1 else f"Particles/stack_{s:03d}.mrcs"
        stacks.append(write_mrc(outdir / rel, arr[lo:hi], apix, mode=mode, stack=True))
        names += [f"{i + 1:06d}@{rel}" for i in range(hi - lo)]
    truth = truth.reset_index(drop=True)
    full = pd.concat([pd.DataFrame({"rlnImageName": names}), truth.drop(columns=["rlnImageName"], errors="ignore")], axis=1)
    if "rlnOpticsGroup" not in full.columns:
        full["rlnOpticsGroup"] = 1
    input_cols = [
        "rlnImageName", "rlnOpticsGroup", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift",
        "rlnCtfBfactor", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
    ]  # fmt: skip
    particles = full[[c for c in input_cols if c in full.columns]]
    out = {
        "particles": write_particles_star(outdir / "particles.star", optics_df, particles),
        "truth": write_particles_star(outdir / "truth.star", optics_df, full),
        "stacks": stacks,
    }
    if store:
        from autospa.io.zarr_store import write_store

        batches = (arr[i : i + chunk_size] for i in range(0, n, chunk_size))
        out["store"] = write_store(
            outdir / "particles.zarr", batches, full, optics_df, dtype=stack_dtype, chunk_size=chunk_size, overwrite=True
        )
    log.info("wrote %d particles to %s (%d stacks%s)", n, outdir, n_stacks, ", store" if store else "")
    return out
