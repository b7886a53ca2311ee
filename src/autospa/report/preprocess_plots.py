"""Diagnostic figures of the preprocessing jobs, as PNG bytes (L3: no file is written here).

* :func:`shift_trace_png`: the global trajectory of a movie (and the local one at each patch,
  exaggerated), as RELION's motion-correction logfile shows it;
* :func:`ctf_diagnostic_png`: the fitted power spectrum beside the model, and the equiphase
  rotational profile against the fitted CTF^2;
* :func:`picks_png`: a micrograph with its picks circled.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def shift_trace_png(
    shifts_px: np.ndarray,
    title: str = "",
    patch_centres_px: np.ndarray | None = None,
    patch_shifts_px: np.ndarray | None = None,
    image_size: tuple[int, int] | None = None,
    local_scale: float = 20.0,
) -> bytes:
    """PNG of a movie's global shift trace (left) and its local patch traces (right).

    Parameters
    ----------
    shifts_px
        ``(n, 2)`` global shifts (x, y) in pixels.
    title
        Figure title (the movie name).
    patch_centres_px, patch_shifts_px
        ``(py, px, 2)`` and ``(py, px, n, 2)`` local measurements, or ``None``.
    image_size
        ``(width, height)`` of the movie, for the local panel's axes.
    local_scale
        Exaggeration of the local traces.
    """
    s = np.asarray(shifts_px, dtype=float)
    has_local = patch_centres_px is not None and patch_shifts_px is not None
    fig = Figure(figsize=(9 if has_local else 4.5, 4.2))
    ax = fig.add_subplot(1, 2 if has_local else 1, 1)
    ax.plot(s[:, 0], s[:, 1], "-", color="tab:blue", lw=1)
    ax.scatter(s[:, 0], s[:, 1], c=np.arange(len(s)), cmap="viridis", s=14, zorder=3)
    ax.plot(s[0, 0], s[0, 1], "o", mfc="none", mec="red", ms=9, label="frame 1")
    ax.set_xlabel("shift X (pixels)")
    ax.set_ylabel("shift Y (pixels)")
    ax.set_aspect("equal", adjustable="datalim")
    ax.invert_yaxis()
    ax.legend(loc="best", fontsize=8)
    ax.set_title("global")
    if has_local:
        ax2 = fig.add_subplot(1, 2, 2)
        c = np.asarray(patch_centres_px, dtype=float).reshape(-1, 2)
        p = np.asarray(patch_shifts_px, dtype=float)
        p = p.reshape(-1, p.shape[-2], 2)
        for (cx, cy), tr in zip(c, p, strict=True):
            ax2.plot(cx + local_scale * tr[:, 0], cy + local_scale * tr[:, 1], "-", color="tab:orange", lw=1)
            ax2.plot(cx, cy, ".", color="k", ms=3)
        if image_size is not None:
            ax2.set_xlim(0, image_size[0])
            ax2.set_ylim(image_size[1], 0)
        ax2.set_aspect("equal")
        ax2.set_title(f"local (x{local_scale:g})")
        ax2.set_xlabel("X (pixels)")
        ax2.set_ylabel("Y (pixels)")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _png(fig)


def ctf_diagnostic_png(
    diagnostic: np.ndarray,
    title: str = "",
    profile_k: np.ndarray | None = None,
    profile_obs: np.ndarray | None = None,
    profile_model: np.ndarray | None = None,
) -> bytes:
    """PNG of the CTF fit: the spectrum | model image and, optionally, a 1D profile comparison.

    Parameters
    ----------
    diagnostic
        ``(box, box)`` centred image (observed left, model right).
    title
        Figure title (micrograph name and fitted values).
    profile_k, profile_obs, profile_model
        ``(S,)`` frequencies (1/A), background-subtracted observed profile and model CTF^2.
    """
    has_profile = profile_k is not None and profile_obs is not None and profile_model is not None
    fig = Figure(figsize=(9 if has_profile else 4.5, 4.2))
    ax = fig.add_subplot(1, 2 if has_profile else 1, 1)
    d = np.asarray(diagnostic, dtype=float)
    lo, hi = np.percentile(d, [1, 99])
    ax.imshow(d, cmap="gray", vmin=lo, vmax=hi)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("spectrum | model")
    if has_profile:
        ax2 = fig.add_subplot(1, 2, 2)
        ax2.plot(profile_k, profile_obs, lw=1, label="observed")
        ax2.plot(profile_k, profile_model, lw=1, label="CTF$^2$ fit")
        ax2.set_xlabel("spatial frequency (1/A)")
        ax2.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _png(fig)


def picks_png(micrograph: np.ndarray, coords_px: np.ndarray, diameter_px: float, title: str = "") -> bytes:
    """PNG of a micrograph (low-passed for display by block averaging) with circles at the picks."""
    m = np.asarray(micrograph, dtype=float)
    f = max(1, int(max(m.shape) // 1024))
    if f > 1:
        h, w = (m.shape[0] // f) * f, (m.shape[1] // f) * f
        m = m[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3))
    fig = Figure(figsize=(6, 6 * m.shape[0] / max(m.shape[1], 1)))
    ax = fig.add_subplot(1, 1, 1)
    lo, hi = np.percentile(m, [1, 99])
    ax.imshow(m, cmap="gray", vmin=lo, vmax=hi)
    c = np.asarray(coords_px, dtype=float).reshape(-1, 2) / f
    from matplotlib.patches import Circle

    for x, y in c:
        ax.add_patch(Circle((x, y), diameter_px / 2 / f, fill=False, ec="lime", lw=0.8))
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _png(fig)
