"""Topaz particle picking with a pretrained model (L3; needs the ``topaz`` extra, ``topaz-em``).

Topaz (Bepler et al. 2019, GPL-3.0) scores every pixel of a downsampled, normalised micrograph
with a convolutional classifier and extracts peaks by non-maximum suppression. Its command line
pulls in torchvision, so, as DESIGN.md section 6 says, its Python modules are called directly:
``topaz.model.factory.load_model`` (the pretrained ResNet8/ResNet16 detectors shipped inside the
package, or a ``.sav`` file from ``topaz train``) and ``topaz.algorithms.non_maximum_suppression``.

Steps (as ``topaz preprocess`` + ``topaz extract`` do them):

1. downsample by Fourier cropping so that the particle diameter spans about
   :data:`TARGET_DIAMETER_PX` pixels (Topaz's ``-s`` scale factor; at least 1);
2. normalise the micrograph to mean 0, standard deviation 1 (Topaz's affine normalisation);
3. score it with the model (per-pixel logits, rlnAutopickFigureOfMerit);
4. non-maximum suppression with the particle radius, keep scores above ``threshold`` (Topaz's
   default -6), at most ``max_particles`` of the best;
5. coordinates back to input pixels.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from autospa.errors import InputError

log = logging.getLogger(__name__)

#: Particle diameter (pixels) on the downsampled micrograph that Topaz scores.
TARGET_DIAMETER_PX = 24.0

#: Pretrained detectors shipped with topaz-em.
PRETRAINED = ("resnet16", "resnet16_u64", "resnet16_u32", "resnet8", "resnet8_u64", "resnet8_u32")


def topaz_available() -> bool:
    """Whether ``topaz`` (topaz-em) can be imported."""
    try:
        import topaz.algorithms  # noqa: F401
        import topaz.model.factory  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class TopazPicks:
    """Picks of one micrograph.

    Attributes
    ----------
    coords_px
        ``(k, 2)`` float64 positions (x, y) in pixels of the input micrograph.
    score
        ``(k,)`` Topaz scores (logits), best first.
    scale
        Downsampling factor used.
    """

    coords_px: torch.Tensor
    score: torch.Tensor
    scale: float


_MODELS: dict[tuple[str, str], torch.nn.Module] = {}


def load_topaz_model(model: str = "resnet16", device: torch.device | str = "cpu") -> torch.nn.Module:
    """A Topaz detector in eval mode on ``device`` (cached per process).

    Parameters
    ----------
    model
        A pretrained name (:data:`PRETRAINED`) or the path of a model saved by ``topaz train``.

    Raises
    ------
    InputError
        topaz-em is not installed, or the model cannot be loaded.
    """
    key = (str(model), str(device))
    if key in _MODELS:
        return _MODELS[key]
    try:
        from topaz.model.factory import load_model
    except ImportError as exc:
        raise InputError(None, "Topaz picking needs the 'topaz' extra: pip install 'autospa[topaz]'") from exc
    try:
        net = load_model(str(model))
    except Exception as exc:  # topaz raises whatever torch.load raises
        raise InputError(model if model not in PRETRAINED else None, f"cannot load Topaz model {model!r}: {exc}") from exc
    net.eval()
    net.fill()
    net = net.to(device)
    _MODELS[key] = net
    return net


def _downsample(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Fourier-crop ``(h, w)`` by ``factor`` (even output sizes), mean kept."""
    h, w = image.shape
    if factor <= 1:
        return image
    hn = max(8, 2 * int(round(h / factor / 2)))
    wn = max(8, 2 * int(round(w / factor / 2)))
    spec = torch.fft.rfft2(image, norm="forward")
    top = hn // 2
    rows = torch.cat([spec[:top], spec[h - top :]], dim=0)[:, : wn // 2 + 1].clone()
    rows[top, :] = 0
    return torch.fft.irfft2(rows, s=(hn, wn), norm="forward")


def pick_topaz(
    micrograph: torch.Tensor,
    pixel_size_a: float,
    diameter_a: float,
    *,
    model: str = "resnet16",
    threshold: float = -6.0,
    max_particles: int = -1,
    scale: float | None = None,
) -> TopazPicks:
    """Pick particles with a Topaz detector.

    Parameters
    ----------
    micrograph
        ``(h, w)`` micrograph (raw contrast: particles dark, as Topaz's models expect).
    pixel_size_a
        Micrograph pixel size (Angstrom).
    diameter_a
        Particle diameter (Angstrom; RELION's topaz_particle_diameter): sets the downsampling and
        the suppression radius.
    model
        Pretrained detector name or a trained model file.
    threshold
        Smallest score kept (Topaz's ``-t``, default -6).
    max_particles
        Keep at most this many of the best picks (``-1``: all).
    scale
        Downsampling factor (default: so that the diameter spans :data:`TARGET_DIAMETER_PX`).

    Returns
    -------
    TopazPicks
    """
    if diameter_a <= 0:
        raise ValueError(f"Topaz needs a positive particle diameter, not {diameter_a}")
    from topaz.algorithms import non_maximum_suppression

    dev = micrograph.device
    net = load_topaz_model(model, dev)
    factor = scale if scale is not None else max(1.0, diameter_a / pixel_size_a / TARGET_DIAMETER_PX)
    img = micrograph.to(torch.float32)
    h, w = img.shape
    small = _downsample(img[: h - h % 2, : w - w % 2], factor)
    hs, ws = small.shape
    fy, fx = (h - h % 2) / hs, (w - w % 2) / ws
    small = (small - small.mean()) / small.std().clamp_min(1e-12)
    with torch.no_grad():
        scores = net(small[None, None])[0, 0].float().cpu().numpy()
    radius = max(1, int(math.floor(diameter_a / 2 / pixel_size_a / max(fx, fy))))
    sc, xy = non_maximum_suppression(scores, radius, threshold=threshold)
    order = np.argsort(-sc, kind="stable")
    sc, xy = sc[order], xy[order]
    if max_particles is not None and max_particles > 0:
        sc, xy = sc[:max_particles], xy[:max_particles]
    coords = np.stack([xy[:, 0] * fx, xy[:, 1] * fy], axis=-1).astype(np.float64) if len(sc) else np.zeros((0, 2))
    log.debug("Topaz: %d picks above %.1f (scale %.2f, radius %d px)", len(sc), threshold, factor, radius)
    return TopazPicks(
        coords_px=torch.as_tensor(coords, dtype=torch.float64),
        score=torch.as_tensor(np.asarray(sc, dtype=np.float64)),
        scale=float(factor),
    )
