"""Files of post-processing and symmetry alignment: map reading with checks, relion_postprocess's
outputs (postprocess.mrc, postprocess_masked.mrc, postprocess.star, the FSC and Guinier plots).

postprocess.star holds, as RELION writes it (src/postprocessing.cpp, writeOutput):

* ``data_general``: rlnFinalResolution, rlnBfactorUsedForSharpening, rlnUnfilteredMapHalf1,
  rlnUnfilteredMapHalf2, (with a mask) rlnMaskName and rlnRandomiseFrom, (with --autob)
  rlnFittedSlopeGuinierPlot, rlnFittedInterceptGuinierPlot, rlnCorrelationFitGuinierPlot;
* ``data_fsc``: rlnSpectralIndex, rlnResolution, rlnAngstromResolution and, with a mask,
  rlnFourierShellCorrelationCorrected, rlnFourierShellCorrelationUnmaskedMaps,
  rlnFourierShellCorrelationMaskedMaps, rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps
  (without one only rlnFourierShellCorrelationUnmaskedMaps);
* ``data_guinier``: rlnResolutionSquared, rlnLogAmplitudesOriginal, rlnLogAmplitudesWeighted,
  rlnLogAmplitudesSharpened (when a B-factor is applied), rlnLogAmplitudesIntercept (with --autob);
  -99 where a shell has no amplitude (RELION's value).

Every file goes through :mod:`autospa.io.atomic`; nothing is written before all inputs are read
and checked, so a bad input never leaves half an output folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from autospa.errors import InputError
from autospa.io.atomic import write_bytes, write_text
from autospa.io.mrc import read_mrc, write_mrc
from autospa.io.star import read_star, star_to_string

__all__ = [
    "read_volume", "read_mask", "PostprocessOutputs", "postprocess_star_text", "write_postprocess", "read_postprocess_star",
    "write_volume",
]


def read_volume(path: str | Path, what: str = "map") -> tuple[torch.Tensor, float]:
    """A cubic 3D map from an MRC file, checked.

    Returns
    -------
    tuple
        ``(volume (D, D, D) float32, voxel size in Angstrom from the header (0 if unset))``.

    Raises
    ------
    InputError
        Missing/unreadable file, not 3D, not cubic, or NaN/inf values.
    """
    data, voxel = read_mrc(path)
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise InputError(path, f"the {what} must be a cubic 3D map, got shape {tuple(data.shape)}")
    return torch.as_tensor(np.asarray(data, dtype=np.float32)), float(voxel)


def read_mask(path: str | Path, shape: tuple[int, ...]) -> torch.Tensor:
    """A solvent mask: cubic, of ``shape``, values in [0, 1] (RELION refuses others)."""
    mask, _ = read_volume(path, "mask")
    if tuple(mask.shape) != tuple(shape):
        raise InputError(path, f"the mask is {tuple(mask.shape)} but the maps are {tuple(shape)}")
    lo, hi = float(mask.min()), float(mask.max())
    if lo < -1e-3 or hi > 1.0 + 1e-3:
        raise InputError(path, f"mask values must lie between 0 and 1 (found {lo:.3g} .. {hi:.3g})")
    if hi <= 0:
        raise InputError(path, "the mask is empty (all zero)")
    return mask.clamp(0.0, 1.0)


@dataclass(frozen=True)
class PostprocessOutputs:
    """Paths written by :func:`write_postprocess`."""

    map: Path
    masked_map: Path | None
    star: Path
    fsc_png: Path
    guinier_png: Path


def _finite_or(x: np.ndarray, fill: float = -99.0) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    return np.where(np.isfinite(a), a, fill)


def postprocess_star_text(result, half1_name: str, half2_name: str, mask_name: str | None,
                          box: int, pixel_size_a: float, auto_bfactor: bool, command_line: str | None = None) -> str:
    """The text of postprocess.star for a :class:`autospa.refinement.postprocess.PostprocessResult`."""
    general: dict = {
        "rlnFinalResolution": float(result.final_resolution_a),
        "rlnBfactorUsedForSharpening": float(result.bfactor),
        "rlnUnfilteredMapHalf1": half1_name,
        "rlnUnfilteredMapHalf2": half2_name,
    }
    if mask_name is not None:
        general["rlnMaskName"] = mask_name
        general["rlnRandomiseFrom"] = float(result.randomize_from_a)
    if auto_bfactor:
        general["rlnFittedSlopeGuinierPlot"] = float(result.fit_slope)
        general["rlnFittedInterceptGuinierPlot"] = float(result.fit_intercept)
        general["rlnCorrelationFitGuinierPlot"] = float(result.fit_corr)
    n = int(result.fsc_corrected.numel())
    idx = np.arange(n)
    ang = np.where(idx > 0, box * pixel_size_a / np.maximum(idx, 1), 999.0)
    fsc = {
        "rlnSpectralIndex": idx,
        "rlnResolution": 1.0 / ang,
        "rlnAngstromResolution": ang,
    }
    if mask_name is not None:
        fsc["rlnFourierShellCorrelationCorrected"] = result.fsc_corrected.cpu().numpy()
        fsc["rlnFourierShellCorrelationUnmaskedMaps"] = result.fsc_unmasked.cpu().numpy()
        fsc["rlnFourierShellCorrelationMaskedMaps"] = result.fsc_masked.cpu().numpy()
        fsc["rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps"] = result.fsc_random_masked.cpu().numpy()
    else:
        fsc["rlnFourierShellCorrelationUnmaskedMaps"] = result.fsc_corrected.cpu().numpy()
    guinier = {
        "rlnResolutionSquared": result.guinier_s2.cpu().numpy(),
        "rlnLogAmplitudesOriginal": _finite_or(result.guinier_in.cpu().numpy()),
        "rlnLogAmplitudesWeighted": _finite_or(result.guinier_weighted.cpu().numpy()),
    }
    if auto_bfactor or result.bfactor != 0.0:
        guinier["rlnLogAmplitudesSharpened"] = _finite_or(result.guinier_sharpened.cpu().numpy())
    if auto_bfactor:
        guinier["rlnLogAmplitudesIntercept"] = np.full(n, float(result.fit_intercept))
    text = star_to_string({"general": general, "fsc": pd.DataFrame(fsc), "guinier": pd.DataFrame(guinier)})
    header = "# autospa postprocess (relion_postprocess layout)\n"
    if command_line:
        header += f"# {command_line}\n"
    return header + text


def write_postprocess(
    out_dir: str | Path,
    result,
    half1_name: str,
    half2_name: str,
    mask_name: str | None,
    pixel_size_a: float,
    auto_bfactor: bool,
    fsc_png: bytes,
    guinier_png: bytes,
    command_line: str | None = None,
    root: str = "postprocess",
) -> PostprocessOutputs:
    """Write relion_postprocess's outputs into ``out_dir`` (each file atomically).

    Parameters
    ----------
    out_dir
        Output folder (created).
    result
        :class:`autospa.refinement.postprocess.PostprocessResult`.
    half1_name, half2_name, mask_name
        Input names recorded in postprocess.star.
    pixel_size_a
        Voxel size written to the maps' headers.
    auto_bfactor
        Whether the B-factor was fitted (adds the fit labels).
    fsc_png, guinier_png
        Plot files (from :mod:`autospa.report.fsc_plot`).
    root
        File name root (RELION: ``postprocess``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    box = int(result.sharpened.shape[-1])
    text = postprocess_star_text(result, half1_name, half2_name, mask_name, box, pixel_size_a, auto_bfactor, command_line)
    p_map = write_mrc(out / f"{root}.mrc", result.sharpened.cpu().numpy(), pixel_size_a)
    p_masked = None
    if mask_name is not None:
        p_masked = write_mrc(out / f"{root}_masked.mrc", result.sharpened_masked.cpu().numpy(), pixel_size_a)
    p_fsc = out / f"{root}_fsc.png"
    write_bytes(p_fsc, fsc_png)
    p_gui = out / f"{root}_guinier.png"
    write_bytes(p_gui, guinier_png)
    p_star = out / f"{root}.star"
    write_text(p_star, text)  # last: its presence means the run finished
    return PostprocessOutputs(map=p_map, masked_map=p_masked, star=p_star, fsc_png=p_fsc, guinier_png=p_gui)


def read_postprocess_star(path: str | Path) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """``(general, fsc, guinier)`` blocks of a postprocess.star (ours or RELION's)."""
    blocks = read_star(path)
    for name in ("general", "fsc"):
        if name not in blocks:
            raise InputError(path, f"no data_{name} block (not a postprocess.star?)")
    general = blocks["general"]
    if not isinstance(general, dict):
        general = general.iloc[0].to_dict()
    guinier = blocks.get("guinier", pd.DataFrame())
    return general, blocks["fsc"], guinier


def write_volume(path: str | Path, vol: torch.Tensor, pixel_size_a: float) -> Path:
    """Write a ``(D, D, D)`` map as MRC mode 2 (atomically)."""
    return write_mrc(path, vol.detach().cpu().float().numpy(), pixel_size_a)
