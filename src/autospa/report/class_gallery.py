"""Class-average galleries as PNG bytes (written by the caller through ``autospa.io``)."""

from __future__ import annotations

import io
import math

import numpy as np
from matplotlib.figure import Figure


def class_gallery_png(
    classes: np.ndarray,
    distribution: np.ndarray,
    resolution_a: np.ndarray | None = None,
    scores: np.ndarray | None = None,
    selected: np.ndarray | None = None,
    order: np.ndarray | None = None,
    title: str = "",
    columns: int = 10,
) -> bytes:
    """A grid of class averages labelled with class number, distribution and resolution.

    Parameters
    ----------
    classes
        ``(K, D, D)`` class averages.
    distribution
        ``(K,)`` rlnClassDistribution.
    resolution_a
        ``(K,)`` rlnEstimatedResolution (optional).
    scores
        ``(K,)`` class scores (optional, shown when given).
    selected
        ``(K,)`` bool: selected classes get a green frame.
    order
        Display order (default: decreasing distribution).

    Returns
    -------
    bytes
        The PNG file's content.
    """
    k = classes.shape[0]
    if order is None:
        order = np.argsort(-np.asarray(distribution), kind="stable")
    cols = min(columns, max(k, 1))
    rows = max(1, math.ceil(k / cols))
    fig = Figure(figsize=(1.6 * cols, 1.8 * rows + (0.4 if title else 0)), dpi=80)
    if title:
        fig.suptitle(title)
    for pos, c in enumerate(order):
        ax = fig.add_subplot(rows, cols, pos + 1)
        img = classes[c]
        lo, hi = np.percentile(img, [1, 99]) if np.ptp(img) > 0 else (0.0, 1.0)
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, origin="lower")
        label = f"{c + 1}: {100 * distribution[c]:.1f}%"
        if resolution_a is not None:
            label += f" {resolution_a[c]:.0f}A"
        if scores is not None:
            label += f"\ns={scores[c]:.2f}"
        ax.set_title(label, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
        if selected is not None:
            colour = "limegreen" if selected[c] else "red"
            for s in ax.spines.values():
                s.set_edgecolor(colour)
                s.set_linewidth(3 if selected[c] else 1)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
