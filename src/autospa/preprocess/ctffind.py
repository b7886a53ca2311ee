"""CTF estimation from a micrograph's power spectrum (L3, pure torch; the model is RELION's CTF
from :mod:`autospa.numerics.ctf`).

Method (in the spirit of CTFFIND4):

1. **Spectrum.** The micrograph is cut into overlapping square tiles (``box``, half-overlapping),
   each mean-subtracted and edge-tapered; their power spectra are averaged and the square root
   taken (amplitude spectrum ``A``).
2. **Background and envelope by variable projection.** In the fitting range
   ``[1 / res_min, 1 / res_max]`` the spectrum is modelled as ``A(k) = B(|k|) + E(|k|) CTF^2(k)``
   with ``B`` and ``E`` low-order polynomials of ``|k|``. For any CTF parameters the best ``B``
   and ``E`` follow from linear least squares, so the fit only searches the CTF parameters and the
   score is the remaining squared residual (candidates whose envelope comes out negative, i.e.
   fitting the rings in anti-phase, are rejected).
3. **1D search.** On the rotational average, an exhaustive defocus search (``defocus_step_a``,
   and the phase shift on request), refined on a 10x finer grid.
4. **2D fit.** Astigmatism and its angle by a grid search around the 1D defocus on the full 2D
   spectrum, then a Nelder-Mead refinement of (mean defocus, astigmatism, angle[, phase shift]).
5. **Quality.** rlnCtfFigureOfMerit is the correlation between the background-subtracted spectrum
   and ``E * CTF^2`` over the fitting range; rlnCtfMaxResolution is the highest resolution up to
   which the local correlation between the spectrum and the model's rings (in sliding windows of
   one CTF oscillation) stays above ``0.5`` (CTFFIND4's rule: the drop only counts after more
   than three windows were above ``0.66``; windows at the start of the fitting range, where the
   first ring is cut by the range, cannot end it). It is reported from the equiphase average, up
   to Nyquist, and may lie beyond the fitting range (as CTFFIND's fit resolution does).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize

from autospa.numerics.ctf import ctf_chi, ctf_constants

log = logging.getLogger(__name__)

#: Local correlation below which the CTF rings are considered lost (rlnCtfMaxResolution), once
#: the fit has been armed (CTFFIND4's "significance" threshold of the fit-resolution criterion).
RESOLUTION_CC_THRESHOLD = 0.5
#: Windows above this correlation arm the criterion above (see :data:`RESOLUTION_ARM_INDEPENDENT`).
RESOLUTION_CC_HIGH = 0.66
#: Once more than :data:`RESOLUTION_ARM_COUNT` windows exceeded it, a window below it ends the fit.
RESOLUTION_CC_LOW = 0.1
#: Number of windows that must exceed a threshold before a drop below it counts.
RESOLUTION_ARM_COUNT = 3
#: Fewest profile samples on each side of a window centre.
RESOLUTION_MIN_HALF_WINDOW = 6
#: Windows above :data:`RESOLUTION_CC_HIGH` (significant, half a window apart) needed to arm the
#: :data:`RESOLUTION_CC_THRESHOLD` criterion; a fit that never arms it has no resolution.
RESOLUTION_ARM_INDEPENDENT = 2
#: A window counts as agreeing (towards :data:`RESOLUTION_CC_HIGH` and
#: :data:`RESOLUTION_CC_THRESHOLD`) only when its correlation is also significant: Fisher
#: ``atanh(cc) sqrt(n - 5)`` at least this (``n`` samples). Short windows of a noise spectrum reach
#: ``cc > 0.66`` by chance; without this, fits to pure noise reported 4-8 A.
RESOLUTION_MIN_Z = 3.0


@dataclass(frozen=True)
class CtfFit:
    """Result of :func:`estimate_ctf` (RELION's micrographs_ctf.star columns).

    Attributes
    ----------
    defocus_u_a, defocus_v_a
        rlnDefocusU >= rlnDefocusV (Angstrom, positive = underfocus).
    defocus_angle_deg
        rlnDefocusAngle in [0, 180): direction of defocus U from the x axis towards y.
    phase_shift_deg
        rlnPhaseShift (0 unless fitted).
    figure_of_merit
        rlnCtfFigureOfMerit (correlation of spectrum and model over the fitting range).
    max_resolution_a
        rlnCtfMaxResolution (Angstrom).
    spectrum
        ``(box, box // 2 + 1)`` amplitude spectrum that was fitted (rfft layout).
    background
        ``(box, box // 2 + 1)`` fitted background ``B(|k|)`` (valid in the fitting range).
    envelope
        ``(box, box // 2 + 1)`` fitted envelope ``E(|k|)`` (valid in the fitting range).
    pixel_size_a
        Pixel size of the spectrum (Angstrom).
    """

    defocus_u_a: float
    defocus_v_a: float
    defocus_angle_deg: float
    phase_shift_deg: float
    figure_of_merit: float
    max_resolution_a: float
    spectrum: torch.Tensor
    background: torch.Tensor
    envelope: torch.Tensor
    pixel_size_a: float

    @property
    def astigmatism_a(self) -> float:
        """rlnCtfAstigmatism = defocus U - defocus V (Angstrom)."""
        return self.defocus_u_a - self.defocus_v_a


# -------------------------------------------------------------------------------- spectrum ---


def tile_power_spectrum(micrograph: torch.Tensor, box: int, overlap: float = 0.5) -> torch.Tensor:
    """Average power spectrum of overlapping, tapered tiles.

    Parameters
    ----------
    micrograph
        ``(h, w)`` image.
    box
        Tile size (even, at most ``min(h, w)``).
    overlap
        Fraction of overlap between neighbouring tiles.

    Returns
    -------
    torch.Tensor
        ``(box, box // 2 + 1)`` float32 mean of ``|rfft2(tile)|^2`` (tiles divided by their pixel
        count, i.e. RELION's FFT scale).
    """
    h, w = micrograph.shape
    if box > min(h, w) or box % 2:
        raise ValueError(f"tile box {box} must be even and fit in a {w} x {h} micrograph")
    step = max(1, int(round(box * (1 - overlap))))
    ys = list(range(0, h - box + 1, step))
    xs = list(range(0, w - box + 1, step))
    taper = _edge_taper(box, micrograph.device)
    img = micrograph.to(torch.float32)
    acc = torch.zeros(box, box // 2 + 1, dtype=torch.float32, device=micrograph.device)
    count = 0
    for y in ys:
        tiles = torch.stack([img[y : y + box, x : x + box] for x in xs])
        tiles = tiles - tiles.mean(dim=(-2, -1), keepdim=True)
        spec = torch.fft.rfft2(tiles * taper, norm="forward")
        acc += (spec.real**2 + spec.imag**2).sum(0)
        count += tiles.shape[0]
    return acc / count


def _edge_taper(box: int, device: torch.device) -> torch.Tensor:
    """Separable cosine taper over the outer 1/16 of the tile on each side; ``(box, box)``."""
    n = max(2, box // 16)
    ramp = 0.5 - 0.5 * torch.cos(torch.linspace(0, math.pi, n, device=device))
    t = torch.ones(box, device=device)
    t[:n] = ramp
    t[box - n :] = ramp.flip(0)
    return t[:, None] * t[None, :]


# ------------------------------------------------------------------------ fitting machinery ---


@dataclass(frozen=True)
class _Problem:
    kx: torch.Tensor  # (P,) 1/A, pixels in the fitting range
    feats: torch.Tensor  # (P, 5) chi features
    ky: torch.Tensor  # (P,)
    amp: torch.Tensor  # (P,) amplitude spectrum
    shell: torch.Tensor  # (P,) int64 shell index
    basis: torch.Tensor  # (S, m) polynomial basis per shell
    shell_k: torch.Tensor  # (S,) 1/A
    counts: torch.Tensor  # (S,)
    sum_a: torch.Tensor  # (S,)
    sum_aa: torch.Tensor  # scalar
    k1: float
    k2: float
    k3: float


def _legendre_basis(t: torch.Tensor, degree: int) -> torch.Tensor:
    """Legendre polynomials P_0..P_degree at ``t`` in [-1, 1]; ``(..., degree + 1)``."""
    out = [torch.ones_like(t), t]
    for n in range(1, degree):
        out.append(((2 * n + 1) * t * out[-1] - n * out[-2]) / (n + 1))
    return torch.stack(out[: degree + 1], dim=-1)


def _make_problem(
    amp_2d: torch.Tensor,
    pixel_size_a: float,
    k_lo: float,
    k_hi: float,
    k1: float,
    k2: float,
    k3: float,
    degree: int,
) -> _Problem:
    box = amp_2d.shape[0]
    f64 = torch.float64
    dev = amp_2d.device
    ky = torch.fft.fftfreq(box, d=pixel_size_a, device=dev, dtype=f64).view(box, 1).expand(box, box // 2 + 1)
    kx = torch.fft.rfftfreq(box, d=pixel_size_a, device=dev, dtype=f64).view(1, -1).expand(box, box // 2 + 1)
    kr = torch.sqrt(kx**2 + ky**2)
    sel = (kr >= k_lo) & (kr <= k_hi)
    # the half-plane holds both (kx=0, ky) and (kx=0, -ky): keep one of each pair of duplicates
    sel &= ~((kx == 0) & (ky < 0))
    shell_of = torch.round(kr * box * pixel_size_a).long()
    s_min = int(shell_of[sel].min())
    shell = shell_of[sel] - s_min
    n_shells = int(shell.max()) + 1
    shell_k = (torch.arange(n_shells, device=dev, dtype=f64) + s_min) / (box * pixel_size_a)
    t = (2 * (shell_k - k_lo) / (k_hi - k_lo) - 1).clamp(-1, 1)
    basis = _legendre_basis(t, degree)
    a = amp_2d.to(f64)[sel]
    counts = torch.zeros(n_shells, dtype=f64, device=dev).index_add_(0, shell, torch.ones_like(a))
    sum_a = torch.zeros(n_shells, dtype=f64, device=dev).index_add_(0, shell, a)
    return _Problem(
        kx=kx[sel], feats=_chi_features(kx[sel], ky[sel]), ky=ky[sel], amp=a, shell=shell, basis=basis, shell_k=shell_k, counts=counts, sum_a=sum_a,
        sum_aa=(a * a).sum(), k1=k1, k2=k2, k3=k3,
    )


def _ctf2_points(
    kx: torch.Tensor, ky: torch.Tensor, du: torch.Tensor, dv: torch.Tensor, ang: torch.Tensor, phase: torch.Tensor,
    k1: float, k2: float, k3: float,
) -> torch.Tensor:
    """CTF^2 = sin^2(chi) (RELION's chi, :func:`autospa.numerics.ctf.ctf_chi`) for candidates ``(T,)`` at points ``(P,)``: ``(T, P)``."""
    col = lambda x: x.reshape(-1, 1)  # noqa: E731
    chi = ctf_chi(kx, ky, col(du), col(dv), col(ang), k1, k2, k3, col(torch.deg2rad(phase)))
    return torch.sin(chi) ** 2


def _chi_features(kx: torch.Tensor, ky: torch.Tensor) -> torch.Tensor:
    """Per-point features ``(P, 5)`` = (u2, u2 cos 2t, u2 sin 2t, u2^2, 1), t = atan2(ky, kx).

    RELION's chi is linear in them: with mean defocus m, half astigmatism a = (dU - dV) / 2 and
    azimuth z, ``chi = -K1 m u2 - K1 a (u2 cos 2t cos 2z + u2 sin 2t sin 2z) + K2 u2^2 - K3 - K5``,
    so a batch of candidates is one matrix product (:func:`_chi_coefficients`).
    """
    u2 = kx * kx + ky * ky
    c2t = kx * kx - ky * ky  # u2 cos 2t
    s2t = 2 * kx * ky  # u2 sin 2t
    return torch.stack([u2, c2t, s2t, u2 * u2, torch.ones_like(u2)], dim=-1)


def _chi_coefficients(du, dv, ang, phase, k1: float, k2: float, k3: float) -> torch.Tensor:
    """Coefficients ``(T, 5)`` of :func:`_chi_features` for candidates ``(T,)``."""
    mean = 0.5 * (du + dv)
    half = 0.5 * (du - dv)
    z = torch.deg2rad(ang)
    return torch.stack(
        [-k1 * mean, -k1 * half * torch.cos(2 * z), -k1 * half * torch.sin(2 * z),
         torch.full_like(mean, k2), -(k3 + torch.deg2rad(phase))], dim=-1
    )


def _solve_variable_projection(
    basis: torch.Tensor,
    counts: torch.Tensor,
    s_c: torch.Tensor,
    s_cc: torch.Tensor,
    sum_a: torch.Tensor,
    s_ca: torch.Tensor,
    sum_aa: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares for background/envelope coefficients from per-shell sums.

    ``basis (S, m)``; ``counts, sum_a (S,)``; ``s_c, s_cc, s_ca (T, S)``. Returns residuals
    ``(T,)`` and coefficients ``(T, 2m)`` (background first).
    """
    m = basis.shape[1]
    pp = basis[:, :, None] * basis[:, None, :]  # (S, m, m)
    g11 = torch.einsum("s,sij->ij", counts, pp).expand(s_c.shape[0], m, m)
    g12 = torch.einsum("ts,sij->tij", s_c, pp)
    g22 = torch.einsum("ts,sij->tij", s_cc, pp)
    gram = torch.cat([torch.cat([g11, g12], 2), torch.cat([g12, g22], 2)], 1)  # (T, 2m, 2m)
    rhs = torch.cat([(sum_a[:, None] * basis).sum(0).expand(s_c.shape[0], m), s_ca @ basis], 1)  # (T, 2m)
    ridge = 1e-9 * torch.diagonal(gram, dim1=1, dim2=2).mean(1).view(-1, 1, 1) * torch.eye(2 * m, dtype=gram.dtype, device=gram.device)
    coef = torch.linalg.solve(gram + ridge, rhs.unsqueeze(-1)).squeeze(-1)
    resid = sum_aa - (coef * rhs).sum(1)
    return resid, coef


def _score_candidates(
    prob: _Problem, du, dv, ang, phase, chunk: int = 64, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residuals ``(T,)`` (inf where the envelope is negative) and coefficients ``(T, 2m)``.

    ``dtype`` is the precision of CTF^2 and the per-shell sums (float32 for coarse grid searches).
    """
    out_r, out_c = [], []
    n_shells = prob.counts.shape[0]
    m = prob.basis.shape[1]
    amp = prob.amp.to(dtype)
    for i in range(0, du.shape[0], chunk):
        sl = slice(i, i + chunk)
        chi = _chi_coefficients(du[sl], dv[sl], ang[sl], phase[sl], prob.k1, prob.k2, prob.k3) @ prob.feats.T
        c2 = torch.sin(chi.to(dtype)) ** 2
        t = c2.shape[0]
        z = lambda: torch.zeros(t, n_shells, dtype=dtype, device=c2.device)  # noqa: E731
        s_c = z().index_add_(1, prob.shell, c2).double()
        s_cc = z().index_add_(1, prob.shell, c2 * c2).double()
        s_ca = z().index_add_(1, prob.shell, c2 * amp).double()
        resid, coef = _solve_variable_projection(prob.basis, prob.counts, s_c, s_cc, prob.sum_a, s_ca, prob.sum_aa)
        env_mean = (coef[:, m:] @ (prob.basis * prob.counts[:, None]).sum(0)) / prob.counts.sum()
        resid = torch.where(env_mean > 0, resid, torch.full_like(resid, float("inf")))
        out_r.append(resid)
        out_c.append(coef)
    return torch.cat(out_r), torch.cat(out_c)


def _score_1d(
    shell_k: torch.Tensor, prof: torch.Tensor, weights: torch.Tensor, basis: torch.Tensor,
    defocus: torch.Tensor, phase: torch.Tensor, k1: float, k2: float, k3: float,
) -> torch.Tensor:
    """Variable-projection residuals of the rotational average for ``(T,)`` defocus/phase pairs."""
    m = basis.shape[1]
    chi = ctf_chi(shell_k, torch.zeros_like(shell_k), defocus.view(-1, 1), defocus.view(-1, 1),
                  torch.zeros_like(defocus).view(-1, 1), k1, k2, k3, torch.deg2rad(phase).view(-1, 1))
    c2 = torch.sin(chi) ** 2  # (T, S)
    x = torch.cat([basis.expand(c2.shape[0], -1, -1), basis * c2[..., None]], dim=2)  # (T, S, 2m)
    xw = x * weights.view(1, -1, 1)
    gram = xw.transpose(1, 2) @ x
    rhs = (xw * prof.view(1, -1, 1)).sum(1)
    ridge = 1e-9 * torch.diagonal(gram, dim1=1, dim2=2).mean(1).view(-1, 1, 1) * torch.eye(2 * m, dtype=x.dtype, device=x.device)
    coef = torch.linalg.solve(gram + ridge, rhs.unsqueeze(-1)).squeeze(-1)
    resid = (weights * prof * prof).sum() - (coef * rhs).sum(1)
    env = (x[..., m:] @ coef[:, m:, None]).squeeze(-1)  # E(k) * c2
    env_ok = (coef[:, m:] @ (basis * weights[:, None]).sum(0)) > 0
    del env
    return torch.where(env_ok, resid, torch.full_like(resid, float("inf")))


# ------------------------------------------------------------------------------- estimation ---


def estimate_ctf(
    micrograph: torch.Tensor,
    pixel_size_a: float,
    voltage_kv: float,
    cs_mm: float,
    amplitude_contrast: float,
    *,
    box: int = 512,
    res_min_a: float = 30.0,
    res_max_a: float = 5.0,
    defocus_min_a: float = 5000.0,
    defocus_max_a: float = 50000.0,
    defocus_step_a: float = 500.0,
    max_astigmatism_a: float = 2000.0,
    fit_phase_shift: bool = False,
    phase_min_deg: float = 0.0,
    phase_max_deg: float = 180.0,
    phase_step_deg: float = 10.0,
    poly_degree: int = 4,
) -> CtfFit:
    """Estimate defocus U/V, astigmatism angle (and phase shift) of one micrograph.

    Parameters
    ----------
    micrograph
        ``(h, w)`` micrograph (any contrast; a sum of frames or a single image).
    pixel_size_a
        Pixel size (Angstrom).
    voltage_kv, cs_mm, amplitude_contrast
        Optics (rlnVoltage, rlnSphericalAberration, rlnAmplitudeContrast).
    box
        Tile size of the power spectrum (CTFFIND's 512); reduced to fit at least 2 x 2 tiles.
    res_min_a, res_max_a
        Fitting range (Angstrom); ``res_max_a`` is raised to 2.1 pixels when below Nyquist.
    defocus_min_a, defocus_max_a, defocus_step_a
        Defocus search range and step of the exhaustive 1D search.
    max_astigmatism_a
        Largest |dU - dV| searched.
    fit_phase_shift, phase_min_deg, phase_max_deg, phase_step_deg
        Also fit a phase shift (phase plates) in this range.
    poly_degree
        Degree of the background and envelope polynomials.

    Returns
    -------
    CtfFit
    """
    h, w = micrograph.shape
    limit = min(h, w) // 2 if min(h, w) >= 128 else min(h, w)
    box = int(min(box, limit))
    box -= box % 2
    if box < 64:
        raise ValueError(f"micrograph of {w} x {h} pixels is too small for CTF estimation")
    f64 = torch.float64
    dev = micrograph.device
    ps = tile_power_spectrum(micrograph, box)
    amp = torch.sqrt(ps.to(f64))
    k1, k2, k3, _ = (float(v) for v in ctf_constants(voltage_kv, cs_mm, amplitude_contrast))
    k_lo = 1.0 / res_min_a
    k_hi = min(1.0 / res_max_a, 1.0 / (2.1 * pixel_size_a))
    if k_hi <= k_lo * 1.5:
        raise ValueError(f"fitting range {res_min_a}-{1 / k_hi:.1f} A is too narrow at {pixel_size_a} A/pixel")
    prob = _make_problem(amp, pixel_size_a, k_lo, k_hi, k1, k2, k3, poly_degree)

    # ---- 1D exhaustive search on the rotational average
    prof = prob.sum_a / prob.counts.clamp_min(1)
    wts = prob.counts
    phases = (
        torch.arange(phase_min_deg, phase_max_deg + 1e-9, phase_step_deg, dtype=f64, device=dev)
        if fit_phase_shift
        else torch.zeros(1, dtype=f64, device=dev)
    )
    step = max(defocus_step_a / 5.0, 10.0)  # a finer grid than CTFFIND's step: the 1D score is cheap
    dfs = torch.arange(defocus_min_a, defocus_max_a + 1e-9, step, dtype=f64, device=dev)
    gd, gp = torch.meshgrid(dfs, phases, indexing="ij")
    r1 = _score_1d(prob.shell_k, prof, wts, prob.basis, gd.reshape(-1), gp.reshape(-1), k1, k2, k3)
    best = int(torch.argmin(r1))
    df0, ph0 = float(gd.reshape(-1)[best]), float(gp.reshape(-1)[best])
    fine = torch.arange(df0 - step, df0 + step + 1e-9, step / 10.0, dtype=f64, device=dev)
    r1f = _score_1d(prob.shell_k, prof, wts, prob.basis, fine, torch.full_like(fine, ph0), k1, k2, k3)
    df0 = float(fine[int(torch.argmin(r1f))])
    log.debug("1D fit: defocus %.0f A, phase shift %.0f deg", df0, ph0)

    # ---- 2D grid over astigmatism and angle around the 1D defocus
    astig_step = max(50.0, max_astigmatism_a / 16.0)
    astigs = torch.arange(0.0, max_astigmatism_a + 1e-9, astig_step, dtype=f64, device=dev)
    angles = torch.arange(0.0, 180.0, 7.5, dtype=f64, device=dev)
    means = torch.tensor([df0 - step / 2, df0, df0 + step / 2], dtype=f64, device=dev)
    gm, ga, gt = torch.meshgrid(means, astigs, angles, indexing="ij")
    gm, ga, gt = gm.reshape(-1), ga.reshape(-1), gt.reshape(-1)
    r2, _ = _score_candidates(prob, gm + ga / 2, gm - ga / 2, gt, torch.full_like(gm, ph0), dtype=torch.float32)
    best = int(torch.argmin(r2))
    x0 = [float(gm[best]), float(ga[best]), float(gt[best])] + ([ph0] if fit_phase_shift else [])

    # ---- Nelder-Mead refinement of (mean, astigmatism, angle[, phase])
    def objective(p: np.ndarray) -> float:
        mean, ast, ang = float(p[0]), float(p[1]), float(p[2])
        ph = float(p[3]) if fit_phase_shift else 0.0
        t = lambda v: torch.tensor([v], dtype=f64, device=dev)  # noqa: E731
        r, _ = _score_candidates(prob, t(mean + ast / 2), t(mean - ast / 2), t(ang), t(ph))
        return float(r[0]) if math.isfinite(float(r[0])) else 1e300

    simplex_steps = [step / 4, astig_step / 2 + 50.0, 10.0] + ([phase_step_deg / 2] if fit_phase_shift else [])
    init = np.array(x0)
    sim = np.vstack([init] + [init + np.eye(len(init))[i] * simplex_steps[i] for i in range(len(init))])
    res = minimize(objective, init, method="Nelder-Mead",
                   options={"initial_simplex": sim, "xatol": 0.5, "fatol": 1e-12, "maxiter": 400})
    mean, ast, ang = float(res.x[0]), float(res.x[1]), float(res.x[2])
    ph = float(res.x[3]) % 360.0 if fit_phase_shift else 0.0
    du, dv = mean + ast / 2, mean - ast / 2
    if du < dv:
        du, dv, ang = dv, du, ang + 90.0
    ang = ang % 180.0

    # ---- quality
    t = lambda v: torch.tensor([v], dtype=f64, device=dev)  # noqa: E731
    _, coef = _score_candidates(prob, t(du), t(dv), t(ang), t(ph))
    m = prob.basis.shape[1]
    bg2d, env2d = _radial_fields(box, pixel_size_a, k_lo, k_hi, coef[0, :m], coef[0, m:], poly_degree, dev)
    c2_fit = _ctf2_points(prob.kx, prob.ky, t(du), t(dv), t(ang), t(ph), k1, k2, k3)[0]
    bg_pts = prob.basis @ coef[0, :m]
    env_pts = prob.basis @ coef[0, m:]
    fom = _pearson(prob.amp - bg_pts[prob.shell], env_pts[prob.shell] * c2_fit)
    max_res = _max_resolution(amp, pixel_size_a, du, dv, ang, ph, k1, k2, k3, k_lo, voltage_kv)
    return CtfFit(
        defocus_u_a=du,
        defocus_v_a=dv,
        defocus_angle_deg=ang,
        phase_shift_deg=ph,
        figure_of_merit=float(fom),
        max_resolution_a=max_res,
        spectrum=amp.to(torch.float32),
        background=bg2d.to(torch.float32),
        envelope=env2d.to(torch.float32),
        pixel_size_a=pixel_size_a,
    )


def _radial_fields(box, pixel_size_a, k_lo, k_hi, bcoef, ecoef, degree, dev):
    """Background and envelope on the rfft grid (polynomials of |k|, clamped to the fitting range)."""
    f64 = torch.float64
    ky = torch.fft.fftfreq(box, d=pixel_size_a, device=dev, dtype=f64).view(box, 1)
    kx = torch.fft.rfftfreq(box, d=pixel_size_a, device=dev, dtype=f64).view(1, -1)
    kr = torch.sqrt(kx**2 + ky**2)
    tt = (2 * (kr - k_lo) / (k_hi - k_lo) - 1).clamp(-1, 1)
    basis = _legendre_basis(tt, degree)
    return basis @ bcoef, basis @ ecoef


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = torch.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if float(den) > 0 else 0.0


def _max_resolution(
    amp: torch.Tensor, pixel_size_a: float, du: float, dv: float, ang: float, ph: float,
    k1: float, k2: float, k3: float, k_lo: float, voltage_kv: float,
) -> float:
    """Highest resolution (A) up to which the spectrum still follows the fitted CTF rings.

    The 2D spectrum is first reduced to an equiphase average: every pixel is assigned the
    frequency at which a non-astigmatic CTF of the mean defocus has the same phase, and pixels
    are averaged in shells of that frequency (astigmatic rings become circular). In sliding
    windows of one CTF oscillation on each side, a straight line in ``k`` is regressed out of both
    the profile and the model ``CTF^2``; the correlation of what remains is the local fit quality.
    The resolution is the centre of the last good window by :func:`_last_good_window`
    (CTFFIND4's criterion); ``1 / k_lo`` (the low end of the fitting range) when no window
    agrees.
    """
    box = amp.shape[0]
    f64 = torch.float64
    dev = amp.device
    ky = torch.fft.fftfreq(box, d=pixel_size_a, device=dev, dtype=f64).view(box, 1).expand(box, box // 2 + 1)
    kx = torch.fft.rfftfreq(box, d=pixel_size_a, device=dev, dtype=f64).view(1, -1).expand(box, box // 2 + 1)
    keep = ~((kx == 0) & (ky < 0))
    kx, ky, a = kx[keep], ky[keep], amp.to(f64)[keep]
    t = lambda v: torch.tensor([v], dtype=f64, device=dev)  # noqa: E731
    chi = (_chi_coefficients(t(du), t(dv), t(ang), t(ph), k1, k2, k3) @ _chi_features(kx, ky).T)[0]
    mean_df = 0.5 * (du + dv)
    c = chi + k3 + math.radians(ph)  # = K2 u^2 - K1 m u for the equivalent u = k_eq^2
    b = k1 * mean_df
    disc = (b * b + 4 * k2 * c).clamp_min(0)
    u_eq = (-2 * c / (b + torch.sqrt(disc))).clamp_min(0)
    k_eq = torch.sqrt(u_eq)
    nyq = 1.0 / (2 * pixel_size_a)
    dk = 1.0 / (box * pixel_size_a)
    shell = torch.round(k_eq / dk).long()
    n_sh = int(round(nyq / dk)) + 1
    ok = shell < n_sh
    cnt = torch.zeros(n_sh, dtype=f64, device=dev).index_add_(0, shell[ok], torch.ones_like(a[ok]))
    tot = torch.zeros(n_sh, dtype=f64, device=dev).index_add_(0, shell[ok], a[ok])
    prof = tot / cnt.clamp_min(1)
    ks = torch.arange(n_sh, dtype=f64, device=dev) * dk
    chi1 = (_chi_coefficients(t(mean_df), t(mean_df), t(0.0), t(ph), k1, k2, k3)
            @ _chi_features(ks, torch.zeros_like(ks)).T)[0]
    model = torch.sin(chi1) ** 2
    lam = k1 / math.pi
    i0 = int(math.ceil(k_lo / dk))
    centres, ccs, sizes = [], [], []
    for i in range(i0, n_sh - 2):
        k = float(ks[i])
        half = max(RESOLUTION_MIN_HALF_WINDOW, int(math.ceil(1.0 / max(2 * lam * mean_df * k, 1e-12) / dk)))
        sel = torch.arange(max(0, i - half), min(n_sh, i + half + 1), device=dev)
        sel = sel[cnt[sel] > 0]
        if sel.numel() < 6:
            continue
        x = torch.stack([torch.ones(sel.numel(), dtype=f64, device=dev), ks[sel]], dim=1)
        proj = x @ torch.linalg.pinv(x)
        rp = prof[sel] - proj @ prof[sel]
        rm = model[sel] - proj @ model[sel]
        den = torch.sqrt((rp * rp).sum() * (rm * rm).sum())
        centres.append(k)
        sizes.append(int(sel.numel()))
        ccs.append(float((rp * rm).sum() / den) if float(den) > 0 else 0.0)
    last_good = _last_good_window(np.asarray(ccs), np.asarray(sizes))
    log.debug("resolution windows: %s", np.round(np.asarray(ccs), 2).tolist())
    k_good = centres[last_good] if last_good is not None else k_lo
    return float(1.0 / min(max(k_good, k_lo), nyq))


def _last_good_window(cc: np.ndarray, sizes: np.ndarray) -> int | None:
    """Index of the last window whose CTF rings still agree with the spectrum (CTFFIND4's rule).

    Windows are scanned from low to high frequency. The fit ends at the first window whose local
    correlation is below :data:`RESOLUTION_CC_THRESHOLD` after :data:`RESOLUTION_ARM_INDEPENDENT`
    independent windows (half a window apart, significant) were above :data:`RESOLUTION_CC_HIGH`,
    or below :data:`RESOLUTION_CC_LOW` after more than :data:`RESOLUTION_ARM_COUNT` windows were
    above it. Low correlations before
    the criterion is armed (the first ring, where a window is cut by the fitting range) do not end
    it. Returns ``None`` when the criterion was never armed (no rings found: a fit to noise agrees
    with the spectrum over a short stretch by chance, and is not reported as a resolution).

    Parameters
    ----------
    cc
        ``(W,)`` local correlations of consecutive windows, low frequency first.
    sizes
        ``(W,)`` number of profile samples in each window.

    Returns
    -------
    int or None
        The last window before the end that agrees significantly (correlation above
        :data:`RESOLUTION_CC_THRESHOLD` and Fisher z at least :data:`RESOLUTION_MIN_Z`).
    """
    # Fisher z of each window (two parameters, a line, are regressed out of both curves)
    z = np.arctanh(np.clip(cc, -0.999999, 0.999999)) * np.sqrt(np.maximum(sizes - 5, 1))
    significant = z >= RESOLUTION_MIN_Z
    half = (sizes - 1) // 2
    n_low = n_high = 0
    last_high = -(10**9)
    last_ok: int | None = None
    for i, c in enumerate(cc.tolist()):
        if (n_low > RESOLUTION_ARM_COUNT and c < RESOLUTION_CC_LOW) or (
            n_high >= RESOLUTION_ARM_INDEPENDENT and c < RESOLUTION_CC_THRESHOLD
        ):
            break
        n_low += c > RESOLUTION_CC_LOW
        if c > RESOLUTION_CC_HIGH and significant[i] and i - last_high >= half[i]:
            n_high += 1  # windows half a window apart count as independent evidence
            last_high = i
        if c > RESOLUTION_CC_THRESHOLD and significant[i]:
            last_ok = i
    # a fit whose rings never agreed convincingly (a fit to noise, which always matches the
    # spectrum somewhere by chance) has no resolution
    return last_ok if n_high >= RESOLUTION_ARM_INDEPENDENT else None


def diagnostic_image(fit: CtfFit, voltage_kv: float, cs_mm: float, amplitude_contrast: float) -> torch.Tensor:
    """Centred ``(box, box)`` diagnostic: observed spectrum (left half) beside the fitted model (right).

    The observed half is background-subtracted and divided by the envelope; the model half is
    ``CTF^2`` of the fit up to rlnCtfMaxResolution. Both are on the same scale (about 0..1). Computed on the CPU (it is a
    small picture for people, whatever device the fit ran on).
    """
    box = fit.spectrum.shape[0]
    f64 = torch.float64
    k1, k2, k3, _ = (float(v) for v in ctf_constants(voltage_kv, cs_mm, amplitude_contrast))
    ky = torch.fft.fftfreq(box, d=fit.pixel_size_a, dtype=f64).view(box, 1).expand(box, box // 2 + 1)
    kx = torch.fft.rfftfreq(box, d=fit.pixel_size_a, dtype=f64).view(1, -1).expand(box, box // 2 + 1)
    t = lambda v: torch.tensor([v], dtype=f64)  # noqa: E731
    c2 = _ctf2_points(kx.reshape(-1), ky.reshape(-1), t(fit.defocus_u_a), t(fit.defocus_v_a),
                      t(fit.defocus_angle_deg), t(fit.phase_shift_deg), k1, k2, k3)[0].reshape(box, -1)
    # the model is drawn up to the fit's resolution limit only (beyond it, and beyond Nyquist of
    # its own rings, it would only show aliasing); mid-grey elsewhere
    kr = torch.sqrt(kx**2 + ky**2)
    c2 = torch.where(kr <= 1.0 / fit.max_resolution_a, c2, torch.full_like(c2, 0.5))
    env = fit.envelope.detach().cpu().to(f64)
    obs = (fit.spectrum.detach().cpu().to(f64) - fit.background.detach().cpu().to(f64)) / torch.where(
        env.abs() > 1e-12, env, torch.ones_like(env)
    )
    obs = obs.clamp(-0.5, 1.5)
    # full plane from the half plane (Friedel symmetry), centred
    def full(half: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(box, box, dtype=f64)
        out[:, : box // 2 + 1] = half
        idx_y = (-torch.arange(box)) % box
        out[:, box // 2 + 1 :] = half[idx_y][:, 1 : box // 2].flip(1)
        return torch.fft.fftshift(out)

    o, mdl = full(obs), full(c2)
    img = o.clone()
    img[:, box // 2 :] = mdl[:, box // 2 :]
    return img.to(torch.float32)
