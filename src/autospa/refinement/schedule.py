"""VDAM schedules: step size, tau2 fudge, mini-batch size (reference/relion-vdam.md 4.6-4.8).

All functions are pure and follow RELION 4.0.2's code (MlOptimiser::updateStepSize,
updateTau2Fudge, updateSubsetSize, initialiseGeneral).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Phases:
    """Phase lengths of a VDAM run: initial, in-between and final iterations."""

    n_iter: int
    n_ini: int
    n_between: int
    n_fin: int


def phases(n_iter: int, ini_frac: float = 0.3, fin_frac: float = 0.2) -> Phases:
    """RELION's phase lengths (``--grad_ini_frac`` 0.3, ``--grad_fin_frac`` 0.2)."""
    if ini_frac + fin_frac > 0.9:
        s = ini_frac + fin_frac + 0.1
        ini_frac, fin_frac = ini_frac / s, fin_frac / s
    n_ini = int(math.floor(n_iter * ini_frac))
    n_fin = int(math.floor(n_iter * fin_frac))
    return Phases(n_iter, n_ini, n_iter - n_ini - n_fin, n_fin)


def _sigmoid(it: int, b: int, a: int) -> float:
    if a <= 0:
        return 1.0 if it < b else 0.0
    x = (it - b - a / 2.0) / (a / 4.0)
    if x > 300:
        return 0.0
    return 1.0 / (10.0**x + 1.0)


def step_size(it: int, ph: Phases, final: float, initial: float = 0.9) -> float:
    """Step size of iteration ``it`` (1-based): ``"<0.9/eta_f>-step"`` scheme, 0.9 -> ``final``."""
    s = _sigmoid(it, ph.n_ini, ph.n_between // 2)
    return initial * s + final * (1.0 - s)


def tau2_fudge(it: int, ph: Phases, final: float) -> float:
    """Regularisation T of iteration ``it``: rises from 1 to ``final`` (``"<T_f>-step"``)."""
    s = _sigmoid(it, ph.n_ini, ph.n_between // 4)
    return s + final * (1.0 - s)


def subset_sizes(n_particles: int, mode: str = "2d") -> tuple[int, int]:
    """Default initial and final mini-batch sizes.

    ``"2d"``: clamp(0.5 % N, 200, 10 000) then clamp(5 % N, 1 000, 100 000);
    ``"3d"`` (initial model): clamp(0.5 % N, 200, 5 000) then clamp(10 % N, 1 000, 50 000).
    """
    clamp = lambda x, lo, hi: int(max(min(x, hi), lo))  # noqa: E731
    if mode == "2d":
        return clamp(0.005 * n_particles, 200, 10_000), clamp(0.05 * n_particles, 1_000, 100_000)
    if mode == "3d":
        return clamp(0.005 * n_particles, 200, 5_000), clamp(0.10 * n_particles, 1_000, 50_000)
    raise ValueError(f"unknown mode {mode!r}")


def subset_size(it: int, ph: Phases, n_particles: int, s_ini: int, s_fin: int, n_classes: int) -> int:
    """Mini-batch size of iteration ``it``; ``n_particles`` means a full pass.

    The last iteration is a full pass when K > 1 (RELION: S = -1 at iter = nr_iter).
    """
    if it >= ph.n_iter and n_classes > 1:
        return n_particles
    if it < ph.n_ini:
        s = s_ini
    elif it < ph.n_ini + ph.n_between:
        s = s_ini + int(round((it - ph.n_ini) / ph.n_between * (s_fin - s_ini)))
    else:
        s = s_fin
    return min(s, n_particles)
