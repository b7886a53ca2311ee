"""FSC and Guinier plots of a post-processing run, as PNG bytes (L3: no file is written here).

The figures RELION's relion_postprocess writes as postprocess_fsc.eps and postprocess_guinier.eps:
the corrected, unmasked, masked and phase-randomised masked FSC curves against resolution with the
0.143 line and the final resolution; ln(amplitudes) against 1/d^2 of the input, FSC-weighted and
sharpened maps with the fitted line.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

__all__ = ["fsc_plot_png", "guinier_plot_png"]


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def fsc_plot_png(
    frequency: np.ndarray,
    curves: dict[str, np.ndarray],
    final_resolution_a: float | None = None,
    threshold: float = 0.143,
    title: str | None = None,
) -> bytes:
    """PNG of FSC curves against spatial frequency.

    Parameters
    ----------
    frequency
        ``(S,)`` spatial frequency per shell in 1/Angstrom (rlnResolution).
    curves
        Legend label -> ``(S,)`` FSC values; the first is drawn thick (the corrected FSC).
    final_resolution_a
        Marked with a vertical line and given in the title.
    threshold
        Horizontal threshold line (0.143).
    title
        Figure title (default: "Final resolution = X A").

    Returns
    -------
    bytes
        The PNG file content.
    """
    f = np.asarray(frequency, dtype=float)
    fig = Figure(figsize=(7.0, 4.6))
    ax = fig.add_subplot(1, 1, 1)
    colours = ["black", "tab:green", "tab:blue", "tab:red", "tab:orange", "tab:purple"]
    for i, (label, values) in enumerate(curves.items()):
        ax.plot(f, np.asarray(values, dtype=float), "-", color=colours[i % len(colours)], lw=2.2 if i == 0 else 1.2,
                label=label)
    ax.axhline(threshold, color="grey", ls="--", lw=0.8)
    ax.axhline(0.0, color="grey", lw=0.5)
    if final_resolution_a and final_resolution_a < 900:
        ax.axvline(1.0 / final_resolution_a, color="grey", ls=":", lw=0.8)
    if title is None and final_resolution_a is not None:
        title = f"Final resolution = {final_resolution_a:.2f} Angstroms"
    if title:
        ax.set_title(title)
    ax.set_xlabel("resolution (1/A)")
    ax.set_ylabel("Fourier Shell Correlation")
    ax.set_ylim(-0.1, 1.05)
    ax.set_xlim(0, float(f.max()) if f.size else 1)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def guinier_plot_png(
    s2: np.ndarray,
    curves: dict[str, np.ndarray],
    fit: tuple[float, float] | None = None,
    fit_range_a: tuple[float, float] | None = None,
    title: str = "Guinier plots",
) -> bytes:
    """PNG of Guinier plots: ln(mean amplitude) against squared frequency.

    Parameters
    ----------
    s2
        ``(S,)`` squared spatial frequency (1/A^2).
    curves
        Legend label -> ``(S,)`` ln amplitudes (NaN points are left out).
    fit
        ``(slope, intercept)`` of the fitted line, drawn over ``fit_range_a``.
    fit_range_a
        ``(low, high)`` resolution of the fit in Angstrom.

    Returns
    -------
    bytes
        The PNG file content.
    """
    x = np.asarray(s2, dtype=float)
    fig = Figure(figsize=(7.0, 4.6))
    ax = fig.add_subplot(1, 1, 1)
    colours = ["black", "tab:blue", "tab:red", "tab:green"]
    for i, (label, values) in enumerate(curves.items()):
        y = np.asarray(values, dtype=float)
        ok = np.isfinite(y) & (x > 0)
        ax.plot(x[ok], y[ok], "-", color=colours[i % len(colours)], lw=1.2, label=label)
    if fit is not None and fit_range_a is not None and np.all(np.isfinite(fit)):
        xs = np.array([1.0 / fit_range_a[0] ** 2, 1.0 / fit_range_a[1] ** 2])
        ax.plot(xs, fit[0] * xs + fit[1], "--", color="tab:orange", lw=1.5,
                label=f"fit: B = {4 * fit[0]:.1f} A^2")
    ax.set_title(title)
    ax.set_xlabel("resolution^2 (1/A^2)")
    ax.set_ylabel("ln(amplitudes)")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return _png(fig)
