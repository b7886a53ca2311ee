"""Test data for the io/store tests: small RELION projects written with real files.

(Imported by tests/test_io_*.py and tests/test_store_*.py; holds no tests itself.)
"""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from autospa.io.mrc import write_mrc
from autospa.io.star import write_star


def optics_table(box: int = 16, apix: float = 1.5, groups: int = 1) -> pd.DataFrame:
    rows = []
    for g in range(1, groups + 1):
        rows.append(
            {
                "rlnOpticsGroupName": f"opticsGroup{g}",
                "rlnOpticsGroup": g,
                "rlnImagePixelSize": apix * g,
                "rlnImageSize": box,
                "rlnImageDimensionality": 2,
                "rlnVoltage": 300.0,
                "rlnSphericalAberration": 2.7,
                "rlnAmplitudeContrast": 0.1,
            }
        )
    return pd.DataFrame(rows)


def make_project(
    root: Path,
    n_mics: int = 3,
    per_mic: tuple[int, ...] = (5, 7, 4),
    box: int = 16,
    apix: float = 1.5,
    groups: int = 1,
    seed: int = 0,
    stack_dir: str = "Extract/job007/MotionCorr",
    star_name: str = "Extract/job007/particles.star",
    names_relative_to: str = "project",
) -> tuple[Path, dict[str, np.ndarray], pd.DataFrame]:
    """A RELION-like project under ``root``: stacks (float32) + a 3.1 particle STAR file.

    Image names are relative to the project (``root``) unless ``names_relative_to="star"``.
    Returns ``(star_path, {stack_name: images}, particles)``.
    """
    rng = np.random.default_rng(seed)
    stacks: dict[str, np.ndarray] = {}
    rows = []
    star_path = root / star_name
    for m in range(n_mics):
        n = per_mic[m % len(per_mic)]
        images = rng.normal(size=(n, box, box)).astype(np.float32)
        rel = f"{stack_dir}/mic_{m:03d}.mrcs"
        write_mrc(root / rel, images, apix)
        name = rel if names_relative_to == "project" else str((root / rel).relative_to(star_path.parent))
        stacks[name] = images
        for i in range(n):
            rows.append(
                {
                    "rlnCoordinateX": round(float(rng.uniform(0, 4096)), 6),
                    "rlnCoordinateY": round(float(rng.uniform(0, 4096)), 6),
                    "rlnImageName": f"{i + 1:06d}@{name}",
                    "rlnMicrographName": f"MotionCorr/job002/Movies/mic_{m:03d}.mrc",
                    "rlnOpticsGroup": 1 + (m % groups),
                    "rlnDefocusU": round(float(rng.uniform(8000, 25000)), 6),
                    "rlnDefocusV": round(float(rng.uniform(8000, 25000)), 6),
                    "rlnDefocusAngle": round(float(rng.uniform(-180, 180)), 6),
                    "rlnAngleRot": round(float(rng.uniform(-180, 180)), 6),
                    "rlnAngleTilt": round(float(rng.uniform(0, 180)), 6),
                    "rlnAnglePsi": round(float(rng.uniform(-180, 180)), 6),
                    "rlnOriginXAngst": round(float(rng.uniform(-10, 10)), 6),
                    "rlnOriginYAngst": round(float(rng.uniform(-10, 10)), 6),
                    "rlnClassNumber": int(rng.integers(1, 5)),
                    "rlnRandomSubset": int(rng.integers(1, 3)),
                    "rlnGroupName": "00012",  # a numeric-looking string label
                    "myCustomScore": float(rng.normal()),  # an unknown, non-RELION label
                }
            )
    particles = pd.DataFrame(rows)
    write_star(star_path, {"optics": optics_table(box, apix, groups), "particles": particles})
    return star_path, stacks, particles


def write_raw_mrc(path: Path, data: np.ndarray, mode_dtype=None) -> Path:
    """An MRC file written by mrcfile directly (for modes autospa does not write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data if mode_dtype is None else data.astype(mode_dtype))
        if data.ndim == 3:
            mrc.set_image_stack()
        mrc.voxel_size = 1.0
    return path


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_read_movie_decodes_lzw_tiff_without_imagecodecs(tmp_path: Path, dtype) -> None:
    # EPU and SerialEM write counting-mode movies as LZW-compressed TIFF; tifffile alone needs the
    # optional imagecodecs package for LZW, so the pages must still decode (through Pillow)
    from PIL import Image

    from autospa.io.preprocess_files import read_movie

    frames = (np.arange(3 * 20 * 24).reshape(3, 20, 24) % 7).astype(dtype)
    frames[1, 2, 3] = 200
    pages = [Image.fromarray(f) for f in frames]
    path = tmp_path / "movie.tiff"
    pages[0].save(path, save_all=True, append_images=pages[1:], compression="tiff_lzw")
    import tifffile

    assert tifffile.TiffFile(path).pages[0].compression == 5  # really LZW
    out = read_movie(path)
    assert out.shape == (3, 20, 24) and out.dtype == dtype
    np.testing.assert_array_equal(out, frames)
