"""Class-average galleries as PNG bytes (written by the caller through ``autospa.io``).

Drawn with Pillow (tiles pasted into one image, labels in its built-in font): a gallery of 50
classes takes milliseconds, where a figure of subplots took about a second, which the class2d
driver paid after every iteration.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: Edge of one class tile in the PNG (pixels); classes are resampled to it.
TILE_PX = 112
#: Height of the label band above each tile, and the margin around tiles.
LABEL_PX, MARGIN_PX = 28, 6
FRAME_SELECTED, FRAME_REJECTED = (50, 205, 50), (220, 30, 30)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the bitmap font has one size
        return ImageFont.load_default()


def _tile(img: np.ndarray) -> Image.Image:
    """One class average as an 8-bit grey tile, 1st-99th percentile contrast, y up (as RELION
    displays images: row 0 at the bottom)."""
    img = np.asarray(img, dtype=np.float64)
    lo, hi = np.percentile(img, [1, 99]) if np.ptp(img) > 0 else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    grey = np.clip((img - lo) / (hi - lo), 0.0, 1.0)[::-1]
    return Image.fromarray((grey * 255).round().astype(np.uint8), mode="L").resize((TILE_PX, TILE_PX), Image.BILINEAR)


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
        ``(K,)`` bool: selected classes get a green frame, the others a red one.
    order
        Display order (default: decreasing distribution).
    title
        A line above the grid.
    columns
        Tiles per row.

    Returns
    -------
    bytes
        The PNG file's content (RGB).
    """
    classes = np.asarray(classes)
    distribution = np.asarray(distribution, dtype=np.float64)
    k = classes.shape[0]
    if order is None:
        order = np.argsort(-distribution, kind="stable")
    cols = min(columns, max(k, 1))
    rows = max(1, math.ceil(k / cols))
    cell_w, cell_h = TILE_PX + 2 * MARGIN_PX, TILE_PX + LABEL_PX + 2 * MARGIN_PX
    top = 24 if title else 0
    canvas = Image.new("RGB", (cols * cell_w, rows * cell_h + top), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(11)
    if title:
        draw.text((MARGIN_PX, 4), title, fill="black", font=_font(14))
    for pos, c in enumerate(np.asarray(order, dtype=np.int64).tolist()):
        x0 = (pos % cols) * cell_w + MARGIN_PX
        y0 = (pos // cols) * cell_h + MARGIN_PX + top
        label = f"{c + 1}: {100 * distribution[c]:.1f}%"
        if resolution_a is not None:
            label += f" {float(resolution_a[c]):.0f}A"
        if scores is not None:
            label += f"\ns={float(scores[c]):.2f}"
        draw.multiline_text((x0, y0), label, fill="black", font=font, spacing=1)
        ty = y0 + LABEL_PX
        canvas.paste(_tile(classes[c]), (x0, ty))
        if selected is not None:
            on = bool(selected[c])
            width = 3 if on else 1
            draw.rectangle((x0 - width, ty - width, x0 + TILE_PX + width - 1, ty + TILE_PX + width - 1),
                           outline=FRAME_SELECTED if on else FRAME_REJECTED, width=width)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()
