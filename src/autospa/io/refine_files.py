"""Files of a 2D classification run in RELION's layout (reference/relion-vdam.md section 6) and
its checkpoint.

``run_itNNN_classes.mrcs``, ``run_itNNN_model.star``, ``run_itNNN_data.star``,
``run_itNNN_optimiser.star``, ``run_itNNN_sampling.star``; VDAM also ``run_itNNN_1moment.mrcs``
and ``run_itNNN_2moment.mrcs`` (x doubled: interleaved real and imaginary parts, as RELION).
The checkpoint ``run_checkpoint.pt`` holds the whole driver state (``torch.save``); every file
is written under a temporary name and renamed into place.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from autospa.errors import InputError
from autospa.io.atomic import atomic_path, write_bytes, write_text
from autospa.io.mrc import write_mrc
from autospa.io.star import read_star, star_to_string, write_star


def iteration_root(out_root: str | Path, iteration: int, continued_from: int | None = None) -> Path:
    """``DIR/run_it005`` (or RELION's ``DIR/run_ct3_it005`` for a continuation)."""
    root = Path(out_root)
    ct = f"_ct{continued_from}" if continued_from is not None else ""
    return root.parent / f"{root.name}{ct}_it{iteration:03d}"


def write_classes(path: Path, classes: np.ndarray, pixel_size_a: float) -> Path:
    """``(K, D, D)`` class averages as an MRCS stack."""
    return write_mrc(path, np.asarray(classes, np.float32), pixel_size_a, stack=True)


def write_moments(root: Path, moment1: torch.Tensor, moment2: torch.Tensor, pixel_size_a: float) -> tuple[str, str]:
    """VDAM moments as RELION writes them: 2K (half 1 then half 2) and K entries, complex values
    interleaved along x (``(PD, 2 PD)`` per entry, centred grid)."""
    m1 = moment1.reshape(-1, *moment1.shape[-2:]).cpu()
    inter = torch.stack([m1.real, m1.imag], -1).reshape(m1.shape[0], m1.shape[1], -1).numpy()
    m2 = moment2.cpu()
    inter2 = torch.stack([m2, torch.zeros_like(m2)], -1).reshape(m2.shape[0], m2.shape[1], -1).numpy()
    p1 = Path(f"{root}_1moment.mrcs")
    p2 = Path(f"{root}_2moment.mrcs")
    write_mrc(p1, inter, pixel_size_a, stack=True)
    write_mrc(p2, inter2, pixel_size_a, stack=True)
    return str(p1), str(p2)  # named from the project directory, as RELION


def write_model_star(
    path: Path,
    general: dict,
    classes: pd.DataFrame,
    class_spectra: list[pd.DataFrame],
    groups: pd.DataFrame,
    optics_noise: list[pd.DataFrame],
) -> Path:
    """``run_itNNN_model.star``: data_model_general, data_model_classes, data_model_class_N,
    data_model_groups and data_model_optics_group_N."""
    blocks: dict = {"model_general": general, "model_classes": classes}
    for i, spec in enumerate(class_spectra):
        blocks[f"model_class_{i + 1}"] = spec
    blocks["model_groups"] = groups
    for i, noise in enumerate(optics_noise):
        blocks[f"model_optics_group_{i + 1}"] = noise
    return write_star(path, blocks)


def write_data_star(path: Path, optics: pd.DataFrame, particles: pd.DataFrame) -> Path:
    """``run_itNNN_data.star``: data_optics and data_particles."""
    return write_star(path, {"optics": optics, "particles": particles})


def write_general_star(path: Path, block: str, values: dict, command_line: str | None = None) -> Path:
    """A one-block key-value STAR file (optimiser, sampling); RELION puts the command line first."""
    text = star_to_string({block: values})
    if command_line:
        text = f"# {command_line}\n" + text
    write_text(path, text)
    return path


def read_general_star(path: str | Path, block: str) -> dict:
    """The key-value block ``block`` of a STAR file."""
    blocks = read_star(path)
    if block not in blocks or not isinstance(blocks[block], dict):
        raise InputError(path, f"no data_{block} key-value block")
    return blocks[block]


def write_png(path: Path, data: bytes) -> Path:
    write_bytes(path, data)
    return path


def save_checkpoint(path: Path, payload: dict) -> Path:
    """Write the driver state atomically (``torch.save``)."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no checkpoint to continue from (was the run started with this --o?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # corrupt or truncated
        raise InputError(path, f"unreadable checkpoint ({type(exc).__name__}: {exc})") from exc


def spectral_table(values: dict[str, np.ndarray]) -> pd.DataFrame:
    """A per-shell table from label -> ``(S,)`` arrays (float formatting left to the STAR writer)."""
    return pd.DataFrame({k: np.asarray(v) for k, v in values.items()})


def resolution_columns(n_shells: int, box: int, pixel_size_a: float) -> dict[str, np.ndarray]:
    """rlnSpectralIndex, rlnResolution (1/A) and rlnAngstromResolution of each shell."""
    s = np.arange(n_shells)
    res = s / (box * pixel_size_a)
    ang = np.where(s > 0, box * pixel_size_a / np.maximum(s, 1), 999.0)
    return {"rlnSpectralIndex": s, "rlnResolution": res, "rlnAngstromResolution": ang}


__all__ = [
    "iteration_root", "load_checkpoint", "read_general_star", "resolution_columns", "save_checkpoint",
    "spectral_table", "write_classes", "write_data_star", "write_general_star", "write_model_star",
    "write_moments", "write_png",
]
