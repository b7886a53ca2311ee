"""The class gallery PNG: tiles in the order asked for, y up, contrast, selection frames."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from autospa.report import class_gallery as g


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _tile_origin(pos: int, cols: int, title: bool = False) -> tuple[int, int]:
    cell_w, cell_h = g.TILE_PX + 2 * g.MARGIN_PX, g.TILE_PX + g.LABEL_PX + 2 * g.MARGIN_PX
    return ((pos // cols) * cell_h + g.MARGIN_PX + g.LABEL_PX + (24 if title else 0), (pos % cols) * cell_w + g.MARGIN_PX)


def test_tiles_follow_the_distribution_and_frames_mark_the_selection() -> None:
    k, d = 13, 16
    classes = np.zeros((k, d, d), np.float32)
    for c in range(k):
        classes[c] = c  # a flat tile per class ...
        classes[c, 0, :] = 100.0 + c  # ... with a bright first row (y = 0: bottom of the tile)
    dist = np.linspace(0.01, 0.2, k)  # the last class is the most populated
    sel = np.arange(k) % 2 == 0
    png = g.class_gallery_png(classes, dist, resolution_a=np.full(k, 12.0), scores=np.linspace(0, 1, k), selected=sel,
                              title="run_it025", columns=5)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    img = _decode(png)
    cell_w, cell_h = g.TILE_PX + 2 * g.MARGIN_PX, g.TILE_PX + g.LABEL_PX + 2 * g.MARGIN_PX
    assert img.shape == (3 * cell_h + 24, 5 * cell_w, 3)
    order = np.argsort(-dist, kind="stable")
    assert order[0] == k - 1
    for pos, c in enumerate(order):
        y, x = _tile_origin(pos, 5, title=True)
        tile = img[y : y + g.TILE_PX, x : x + g.TILE_PX, 0].astype(int)
        mid = tile[g.TILE_PX // 2 - 10 : g.TILE_PX // 2 + 10, 10:-10]
        bottom = tile[-3:, 10:-10]
        assert mid.max() - mid.min() <= 1 and mid.mean() < 20  # the flat part is black (below the 1st percentile)
        assert bottom.min() > 200  # the bright row y = 0 is drawn at the bottom
        frame = img[y - 1, x + g.TILE_PX // 2]
        want = g.FRAME_SELECTED if sel[c] else g.FRAME_REJECTED
        assert tuple(int(v) for v in frame) == want, (pos, c)
    # the unused cells stay white
    y, x = _tile_origin(14, 5, title=True)
    assert (img[y : y + g.TILE_PX, x : x + g.TILE_PX] == 255).all()


def test_flat_and_single_class_galleries() -> None:
    png = g.class_gallery_png(np.ones((1, 8, 8)), np.array([1.0]))
    img = _decode(png)
    cell_w = g.TILE_PX + 2 * g.MARGIN_PX
    assert img.shape[1] == cell_w  # one column for one class
