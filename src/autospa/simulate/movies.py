"""Movies: frames of one exposure with beam-induced drift, dose fractionation, shot noise and gain.

Model
    The exposure is described by a *canvas*: the expected relative intensity (1 = vacuum) of the
    specimen at its frame-1 position, larger than the frame by ``margin_px`` on every side (so
    that drifting frames never look outside it). Frame ``f`` (0-based) samples the canvas at
    ``p + margin - d_f(p)``, where ``d_f(p)`` is the specimen's displacement in pixels at frame
    position ``p = (x, y)``: the sum of a global trajectory ``g_f`` (smooth, with an early fast
    phase; ``g_0 = 0``) and a local deformation field (a smooth quadratic field of the position,
    zero-mean over the field of view, growing in time). The expected electron count of a pixel is
    ``dose_per_frame_e_a2 * pixel_size_a**2 * intensity``; the recorded count is Poisson.
Gain
    With a gain reference ``G`` (mean 1), the detector records ``Poisson(expected / G)`` so that
    ``raw * G`` (what motion correction computes) has the expected value of the true counts.
Truth, RELION's motion STAR conventions (src/motioncorr_runner.cpp)
    ``rlnMicrographShiftX/Y`` of frame f is the translation that aligns the frame to frame 1
    (the aligned frame is the recorded one sampled at ``p - shift``), i.e. **minus** the
    specimen's displacement: ``shift_f = -g_f``. Frame numbers count from 1. The local block
    (``data_local_shift``) lists, on a grid of patch centres (rlnMicrographCoordinateX/Y, pixels
    from the first pixel), the local part only (minus the local displacement), the residual after
    the global shift as RELION's own motion correction writes it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from autospa.errors import InputError

log = logging.getLogger(__name__)

_TAG_GLOBAL = 301
_TAG_LOCAL = 302
_TAG_SHOT = 303
_TAG_GAIN = 304


def _rng(seed: int, tag: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(tag)])


def _torch_gen(seed: int, tag: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(int(np.random.SeedSequence([int(seed), int(tag)]).generate_state(1, np.uint64)[0] >> 1))
    return g


def _local_basis(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Zero-mean quadratic basis of normalised coordinates ``u, v`` in [-0.5, 0.5]: ``(..., 5)``."""
    return torch.stack([u, v, u * u - 1.0 / 12.0, u * v, v * v - 1.0 / 12.0], dim=-1)


@dataclass(frozen=True)
class Drift:
    """Beam-induced motion of one movie.

    Attributes
    ----------
    global_px
        ``(n_frames, 2)`` float64 specimen displacement ``(x, y)`` in pixels of frame f relative
        to frame 1 (row 0 is zero).
    local_coeffs
        ``(2, 5)`` float64 coefficients of the local field for x and y displacements, on the basis
        ``[u, v, u^2 - 1/12, u v, v^2 - 1/12]`` with ``u = x / width - 0.5``, ``v = y / height - 0.5``.
    local_time
        ``(n_frames,)`` float64 growth of the local field, 0 at frame 1 and 1 at the last frame.
    shape
        ``(height, width)`` of the frames in pixels.
    """

    global_px: torch.Tensor
    local_coeffs: torch.Tensor
    local_time: torch.Tensor
    shape: tuple[int, int]

    @property
    def n_frames(self) -> int:
        """Number of frames."""
        return int(self.global_px.shape[0])

    def local_displacement(self, x_px: torch.Tensor, y_px: torch.Tensor) -> torch.Tensor:
        """Local part of the displacement at frame positions.

        Parameters
        ----------
        x_px, y_px
            ``(...)`` positions in frame pixels (column, row; from the first pixel).

        Returns
        -------
        torch.Tensor
            ``(n_frames, ..., 2)`` float64 displacement ``(x, y)`` in pixels.
        """
        h, w = self.shape
        x = torch.as_tensor(x_px, dtype=torch.float64)
        y = torch.as_tensor(y_px, dtype=torch.float64)
        basis = _local_basis(x / w - 0.5, y / h - 0.5)  # (..., 5)
        field = basis @ self.local_coeffs.T.to(basis.device)  # (..., 2)
        t = self.local_time.to(basis.device).reshape(-1, *([1] * (field.ndim)))
        return t * field[None]

    def displacement(self, x_px: torch.Tensor, y_px: torch.Tensor) -> torch.Tensor:
        """Total (global + local) displacement, ``(n_frames, ..., 2)`` float64 pixels."""
        loc = self.local_displacement(x_px, y_px)
        g = self.global_px.to(loc.device).reshape(self.n_frames, *([1] * (loc.ndim - 2)), 2)
        return loc + g

    def global_shift_table(self) -> pd.DataFrame:
        """RELION's ``data_global_shift`` loop (frame numbers from 1; shift = minus displacement)."""
        g = self.global_px.cpu().numpy()
        return pd.DataFrame(
            {
                "rlnMicrographFrameNumber": np.arange(1, self.n_frames + 1, dtype=np.int64),
                "rlnMicrographShiftX": 0.0 - g[:, 0],
                "rlnMicrographShiftY": 0.0 - g[:, 1],
            }
        )

    def local_shift_table(self, n_patches: tuple[int, int] = (5, 5)) -> pd.DataFrame:
        """RELION's ``data_local_shift`` loop on a grid of patch centres.

        Parameters
        ----------
        n_patches
            ``(nx, ny)`` patches; the centre of patch ``(i, j)`` is at
            ``((i + 0.5) * width / nx, (j + 0.5) * height / ny)``.
        """
        h, w = self.shape
        nx, ny = n_patches
        xc = (torch.arange(nx, dtype=torch.float64) + 0.5) * w / nx
        yc = (torch.arange(ny, dtype=torch.float64) + 0.5) * h / ny
        yy, xx = torch.meshgrid(yc, xc, indexing="ij")
        loc = self.local_displacement(xx.reshape(-1), yy.reshape(-1)).numpy()  # (n_frames, P, 2)
        n_f, n_p = loc.shape[0], loc.shape[1]
        return pd.DataFrame(
            {
                "rlnMicrographFrameNumber": np.repeat(np.arange(1, n_f + 1, dtype=np.int64), n_p),
                "rlnMicrographCoordinateX": np.tile(xx.reshape(-1).numpy(), n_f),
                "rlnMicrographCoordinateY": np.tile(yy.reshape(-1).numpy(), n_f),
                "rlnMicrographShiftX": -loc[..., 0].reshape(-1),
                "rlnMicrographShiftY": -loc[..., 1].reshape(-1),
            }
        )

    def max_displacement_px(self) -> float:
        """Largest displacement anywhere in the field of view (checked on a 9 x 9 grid)."""
        h, w = self.shape
        yy, xx = torch.meshgrid(
            torch.linspace(0, h, 9, dtype=torch.float64), torch.linspace(0, w, 9, dtype=torch.float64), indexing="ij"
        )
        return float(self.displacement(xx, yy).norm(dim=-1).max())

    def accumulated_motion_px(self) -> float:
        """Path length of the global trajectory in pixels (RELION's rlnAccumMotionTotal is this
        in Angstrom)."""
        return float(self.global_px.diff(dim=0).norm(dim=-1).sum())


def simulate_drift(
    n_frames: int,
    shape: tuple[int, int],
    seed: int = 0,
    global_px: float = 3.0,
    local_px: float = 0.8,
    early_fraction: float = 0.6,
) -> Drift:
    """Draw a seeded beam-induced motion.

    The global trajectory is ``a (1 - exp(-t / tau)) e1 + b t / (n - 1) e2`` (an early fast phase
    along ``e1`` plus a slow linear drift along ``e2``), scaled so that its path length is
    ``global_px``; ``early_fraction`` of the path is the fast phase. The local field has its
    largest displacement (over the field of view, at the last frame) equal to ``local_px``.

    Parameters
    ----------
    n_frames
        Number of frames (at least 2).
    shape
        ``(height, width)`` of the frames in pixels.
    seed
        Seed.
    global_px
        Path length of the global trajectory in pixels.
    local_px
        Largest local displacement in pixels (0 for none).
    early_fraction
        Share of the global path in the early fast phase.

    Returns
    -------
    Drift
    """
    if n_frames < 2:
        raise InputError(None, f"a movie needs at least 2 frames (got {n_frames})")
    rng = _rng(seed, _TAG_GLOBAL)
    t = np.arange(n_frames, dtype=np.float64)
    tau = max(0.5, n_frames * rng.uniform(0.08, 0.2))
    th1 = rng.uniform(0, 2 * math.pi)
    th2 = th1 + rng.uniform(-1.2, 1.2)
    e1 = np.array([math.cos(th1), math.sin(th1)])
    e2 = np.array([math.cos(th2), math.sin(th2)])
    early = (1.0 - np.exp(-t / tau))[:, None] * e1
    late = (t / (n_frames - 1))[:, None] * e2
    early_len = np.linalg.norm(np.diff(early, axis=0), axis=1).sum()
    late_len = np.linalg.norm(np.diff(late, axis=0), axis=1).sum()
    traj = early_fraction * early / max(early_len, 1e-12) + (1 - early_fraction) * late / max(late_len, 1e-12)
    path = np.linalg.norm(np.diff(traj, axis=0), axis=1).sum()
    traj = traj * (global_px / path if path > 0 else 0.0)
    traj -= traj[0]

    rng_l = _rng(seed, _TAG_LOCAL)
    coeffs = rng_l.standard_normal((2, 5))
    h, w = shape
    yy, xx = np.meshgrid(np.linspace(0, h, 9), np.linspace(0, w, 9), indexing="ij")
    basis = _local_basis(torch.as_tensor(xx / w - 0.5), torch.as_tensor(yy / h - 0.5)).numpy()
    peak = np.linalg.norm(basis @ coeffs.T, axis=-1).max()
    coeffs *= local_px / peak if peak > 0 else 0.0
    tau_l = max(0.5, n_frames * rng_l.uniform(0.15, 0.4))
    lt = (1.0 - np.exp(-t / tau_l)) / (1.0 - math.exp(-(n_frames - 1) / tau_l))
    return Drift(
        global_px=torch.as_tensor(traj),
        local_coeffs=torch.as_tensor(coeffs),
        local_time=torch.as_tensor(lt),
        shape=(int(h), int(w)),
    )


def render_frames(canvas: torch.Tensor, margin_px: int, drift: Drift) -> torch.Tensor:
    """Expected intensity of every frame (no noise): the canvas warped by the drift.

    Parameters
    ----------
    canvas
        ``(h + 2 m, w + 2 m)`` relative intensity at the frame-1 position, ``m = margin_px``.
    margin_px
        Margin of the canvas on every side, in pixels.
    drift
        Motion of the movie (``drift.shape == (h, w)``).

    Returns
    -------
    torch.Tensor
        ``(n_frames, h, w)`` float32 on ``canvas.device``, ``frame_f(p) = canvas(p + m - d_f(p))``
        (bicubic interpolation; values clamped at 0).
    """
    h, w = drift.shape
    big_h, big_w = canvas.shape
    if (big_h, big_w) != (h + 2 * margin_px, w + 2 * margin_px):
        raise ValueError(f"canvas {tuple(canvas.shape)} does not match frames {(h, w)} with margin {margin_px}")
    if drift.max_displacement_px() + 2 > margin_px:
        raise InputError(None, f"drift of {drift.max_displacement_px():.1f} px needs a canvas margin above {margin_px} px")
    dev = canvas.device
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float64, device=dev), torch.arange(w, dtype=torch.float64, device=dev), indexing="ij"
    )
    disp = drift.displacement(xs.cpu(), ys.cpu()).to(dev)  # (n, h, w, 2)
    src_x = xs[None] + margin_px - disp[..., 0]
    src_y = ys[None] + margin_px - disp[..., 1]
    grid = torch.stack([2 * src_x / (big_w - 1) - 1, 2 * src_y / (big_h - 1) - 1], dim=-1).to(torch.float32)
    img = canvas.to(torch.float32)[None, None]
    frames = torch.empty(drift.n_frames, h, w, dtype=torch.float32, device=dev)
    for f in range(drift.n_frames):
        frames[f] = F.grid_sample(img, grid[f : f + 1], mode="bicubic", padding_mode="border", align_corners=True)[0, 0]
    return frames.clamp_min_(0.0)


def simulate_gain_reference(shape: tuple[int, int], seed: int = 0, spread: float = 0.05) -> torch.Tensor:
    """A seeded gain reference: mean 1, per-pixel and per-column variation plus a smooth tilt.

    Parameters
    ----------
    shape
        ``(height, width)``.
    seed
        Seed.
    spread
        Relative standard deviation of the per-pixel part.

    Returns
    -------
    torch.Tensor
        ``(height, width)`` float32, all values within ``[0.5, 1.5]``.
    """
    h, w = shape
    rng = _rng(seed, _TAG_GAIN)
    pix = rng.standard_normal((h, w)) * spread
    cols = rng.standard_normal((1, w)) * spread * 0.4
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    tilt = 0.03 * (rng.uniform(-1, 1) * xx + rng.uniform(-1, 1) * yy)
    g = np.clip(1.0 + pix + cols + tilt, 0.5, 1.5)
    g /= g.mean()
    return torch.as_tensor(g, dtype=torch.float32)


@dataclass(frozen=True)
class Movie:
    """One simulated movie.

    Attributes
    ----------
    frames
        ``(n_frames, h, w)`` float32 recorded electron counts (integers; divided by the gain when
        a gain reference is used).
    drift
        The true motion.
    gain
        ``(h, w)`` gain reference (multiply the frames by it), or ``None``.
    dose_per_frame_e_a2
        Dose per frame in electrons per square Angstrom (vacuum).
    pixel_size_a
        Pixel size in Angstrom.
    """

    frames: torch.Tensor
    drift: Drift
    gain: torch.Tensor | None
    dose_per_frame_e_a2: float
    pixel_size_a: float

    @property
    def total_dose_e_a2(self) -> float:
        """Total dose of the exposure (vacuum), electrons per square Angstrom."""
        return self.dose_per_frame_e_a2 * self.frames.shape[0]


def simulate_movie(
    canvas: torch.Tensor,
    margin_px: int,
    n_frames: int,
    dose_per_frame_e_a2: float,
    pixel_size_a: float,
    seed: int = 0,
    global_px: float = 3.0,
    local_px: float = 0.8,
    gain: torch.Tensor | None = None,
    drift: Drift | None = None,
) -> Movie:
    """Frames of one exposure of a canvas, with drift, dose and Poisson shot noise.

    Parameters
    ----------
    canvas
        ``(h + 2 m, w + 2 m)`` expected relative intensity (1 = vacuum) at the frame-1 position.
    margin_px
        The margin ``m`` in pixels (must exceed the largest displacement by 2).
    n_frames
        Number of frames.
    dose_per_frame_e_a2
        Electrons per square Angstrom per frame.
    pixel_size_a
        Pixel size in Angstrom.
    seed
        Seed of the drift (unless ``drift`` is given) and of the shot noise.
    global_px, local_px
        Size of the global path and of the local field (see :func:`simulate_drift`).
    gain
        ``(h, w)`` gain reference or ``None``; recorded counts are ``Poisson(expected / gain)``.
    drift
        Use this motion instead of drawing one.

    Returns
    -------
    Movie
    """
    h, w = canvas.shape[0] - 2 * margin_px, canvas.shape[1] - 2 * margin_px
    if h <= 0 or w <= 0:
        raise InputError(None, f"canvas {tuple(canvas.shape)} is too small for margin {margin_px}")
    if dose_per_frame_e_a2 <= 0:
        raise InputError(None, f"dose per frame must be positive (got {dose_per_frame_e_a2})")
    if drift is None:
        drift = simulate_drift(n_frames, (h, w), seed=seed, global_px=global_px, local_px=local_px)
    expected = render_frames(canvas, margin_px, drift) * (dose_per_frame_e_a2 * pixel_size_a**2)
    if gain is not None:
        if tuple(gain.shape) != (h, w):
            raise InputError(None, f"gain reference {tuple(gain.shape)} does not match frames {(h, w)}")
        expected = expected / gain.to(expected)[None]
    gen = _torch_gen(seed, _TAG_SHOT)
    counts = torch.poisson(expected.cpu(), generator=gen).to(expected.device)
    log.debug(
        "movie %dx%d, %d frames, %.2f e/A2/frame, drift %.2f px", w, h, n_frames, dose_per_frame_e_a2,
        drift.accumulated_motion_px(),
    )
    return Movie(frames=counts, drift=drift, gain=gain, dose_per_frame_e_a2=dose_per_frame_e_a2, pixel_size_a=pixel_size_a)
