"""Files of the preprocessing jobs: movies (MRC, TIFF, EER), gain references, RELION's motion
metadata STAR, coordinate STARs and the per-job micrograph tables.

Layouts follow RELION-4.0:

* motion metadata (``MotionCorr/jobNNN/Movies/NAME.star``): ``data_general`` (image size, movie,
  gain, binning, original pixel size, dose, voltage, first frame, rlnMotionModelVersion),
  ``data_global_shift`` (rlnMicrographFrameNumber, rlnMicrographShiftX/Y in unbinned pixels),
  ``data_local_motion_model`` (rlnMotionModelCoeffsIdx, rlnMotionModelCoeff) and
  ``data_local_shift`` (the per-patch measurements) when a local model was fitted;
* coordinates (``AutoPick/jobNNN/Movies/NAME_autopick.star``): one unnamed loop with
  rlnCoordinateX/Y (micrograph pixels), rlnClassNumber, rlnAutopickFigureOfMerit, rlnAnglePsi;
* ``autopick.star``: ``data_coordinate_files`` with rlnMicrographName and rlnMicrographCoordinates.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from autospa.errors import InputError
from autospa.io.mrc import read_mrc, write_mrc
from autospa.io.star import read_star, write_star

log = logging.getLogger(__name__)

MOVIE_SUFFIXES = (".mrc", ".mrcs", ".tif", ".tiff", ".eer")

#: EER frame groups decoded at a time (bounds the memory of raw frames).
EER_CHUNK_GROUPS = 8


# ------------------------------------------------------------------------------ movies / gain ---


def read_movie(path: str | Path, eer_grouping: int = 32) -> np.ndarray:
    """Read the frames of a movie.

    Parameters
    ----------
    path
        ``.mrc``/``.mrcs`` (a stack of frames), ``.tif``/``.tiff`` (one page per frame) or
        ``.eer`` (needs the ``eer`` extra, ``eerfile``; raw EER frames are summed in groups of
        ``eer_grouping``, RELION's --eer_grouping).
    eer_grouping
        Raw EER frames per output frame.

    Returns
    -------
    np.ndarray
        ``(n, h, w)`` frames in the file's dtype (float32 for EER sums).

    Raises
    ------
    InputError
        Missing file, unknown suffix, unreadable content, or an EER file without ``eerfile``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.exists():
        raise InputError(path, "movie not found")
    if suffix not in MOVIE_SUFFIXES:
        raise InputError(path, f"unknown movie format {suffix!r} (expected one of {', '.join(MOVIE_SUFFIXES)})")
    if suffix in (".mrc", ".mrcs"):
        data, _ = read_mrc(path)
        frames = data[None] if data.ndim == 2 else data
    elif suffix in (".tif", ".tiff"):
        frames = _read_tiff(path)
    else:
        frames = _read_eer(path, eer_grouping)
    if frames.ndim != 3 or frames.shape[0] < 1:
        raise InputError(path, f"expected a stack of 2D frames, got an array of shape {frames.shape}")
    return frames


def _read_tiff(path: Path) -> np.ndarray:
    """All pages of a TIFF as ``(n, h, w)``.

    tifffile decodes LZW (the usual compression of counting-mode movies from EPU and SerialEM)
    only with the optional ``imagecodecs`` package; without it the pages are decoded by Pillow,
    which has its own LZW (and deflate/packbits) decoders.
    """
    import tifffile

    try:
        data = tifffile.imread(path)
    except Exception as exc:
        if "imagecodecs" not in str(exc):
            raise InputError(path, f"cannot read TIFF ({type(exc).__name__}: {exc})") from exc
        data = _read_tiff_pillow(path, exc)
    data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    return data


def _read_tiff_pillow(path: Path, cause: Exception) -> np.ndarray:
    """Decode every page of a compressed TIFF with Pillow (the fallback of :func:`_read_tiff`)."""
    from PIL import Image, ImageSequence

    try:
        with Image.open(path) as im:
            pages = [np.array(page) for page in ImageSequence.Iterator(im)]
    except Exception as exc:
        raise InputError(
            path, f"cannot read TIFF ({type(cause).__name__}: {cause}; Pillow: {type(exc).__name__}: {exc})"
        ) from exc
    if not pages or any(p.ndim != 2 or p.shape != pages[0].shape for p in pages):
        raise InputError(path, "cannot read TIFF: pages are not 2D images of one size")
    return np.stack(pages)


def _read_eer(path: Path, grouping: int) -> np.ndarray:
    """Raw EER frames summed in groups of ``grouping`` (RELION's --eer_grouping, no upsampling).

    Frames are read group-chunk by group-chunk (``eerfile.read_frames``), so memory holds the
    rendered movie plus at most :data:`EER_CHUNK_GROUPS` groups of raw frames.
    """
    try:
        import eerfile
        import tifffile
    except ImportError as exc:
        raise InputError(path, "reading EER movies needs the 'eer' extra: pip install 'autospa[eer]'") from exc
    if grouping < 1:
        raise InputError(path, f"EER grouping must be at least 1, not {grouping}")
    try:
        with tifffile.TiffFile(path) as tif:
            n_raw = len(tif.pages)
        n = n_raw // grouping
        if n < 1:
            raise InputError(path, f"{n_raw} EER frames are fewer than one group of {grouping}")
        if n_raw % grouping:
            log.warning("%s: last %d EER frames do not fill a group of %d and are skipped", path, n_raw % grouping, grouping)
        out = None
        for g0 in range(0, n, EER_CHUNK_GROUPS):
            g1 = min(n, g0 + EER_CHUNK_GROUPS)
            raw = np.asarray(eerfile.read_frames(path, g0 * grouping, g1 * grouping))
            sums = raw.reshape(g1 - g0, grouping, *raw.shape[1:]).sum(axis=1, dtype=np.float32)
            if out is None:
                out = np.empty((n, *sums.shape[1:]), dtype=np.float32)
            out[g0:g1] = sums
    except InputError:
        raise
    except Exception as exc:
        raise InputError(path, f"cannot read EER ({type(exc).__name__}: {exc})") from exc
    return out


def read_gain(path: str | Path) -> np.ndarray:
    """Read a gain reference (MRC or TIFF, one image) as ``(h, w)`` float32.

    Raises
    ------
    InputError
        Missing/unreadable file, more than one image, or non-finite / negative values.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "gain reference not found")
    suffix = path.suffix.lower()
    if suffix in (".mrc", ".mrcs"):
        data, _ = read_mrc(path)
    elif suffix in (".tif", ".tiff", ".gain"):
        data = _read_tiff(path)
    else:
        raise InputError(path, f"unknown gain reference format {suffix!r} (expected .mrc or .tif)")
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 3:
        if data.shape[0] != 1:
            raise InputError(path, f"gain reference holds {data.shape[0]} images, expected one")
        data = data[0]
    if not np.isfinite(data).all():
        raise InputError(path, "gain reference contains NaN or infinite values")
    if (data < 0).any():
        raise InputError(path, "gain reference has negative values")
    return data


def write_micrograph(path: str | Path, image: np.ndarray, pixel_size_a: float, float16: bool = True) -> Path:
    """Write a micrograph (or a diagnostic image) as MRC, mode 12 (float16) or mode 2."""
    return write_mrc(path, np.asarray(image, dtype=np.float32), pixel_size_a, mode=12 if float16 else 2)


def read_micrograph(path: str | Path) -> tuple[np.ndarray, float]:
    """Read a single micrograph as ``(h, w)`` float32 and its header pixel size.

    Raises
    ------
    InputError
        Unreadable file or more than one image.
    """
    data, apix = read_mrc(path)
    if data.ndim != 2:
        raise InputError(path, f"expected one micrograph, found an array of shape {data.shape}")
    return np.asarray(data, dtype=np.float32), apix


# ---------------------------------------------------------------------------- motion metadata ---


@dataclass(frozen=True)
class MotionMetadata:
    """Contents of a RELION motion metadata STAR file (one movie).

    Attributes
    ----------
    general
        ``data_general`` (label -> value).
    global_shifts_px
        ``(n, 2)`` rlnMicrographShiftX/Y per frame (unbinned pixels).
    local_coeffs
        ``(36,)`` polynomial coefficients or ``None``.
    local_shifts
        DataFrame of ``data_local_shift`` or ``None``.
    """

    general: dict
    global_shifts_px: np.ndarray
    local_coeffs: np.ndarray | None
    local_shifts: pd.DataFrame | None


def write_motion_metadata(
    path: str | Path,
    *,
    image_size: tuple[int, int, int],
    movie_name: str,
    gain_name: str | None,
    binning: float,
    original_pixel_size_a: float,
    dose_per_frame: float,
    pre_exposure: float,
    voltage_kv: float,
    start_frame: int,
    global_shifts_px: np.ndarray,
    local_coeffs: np.ndarray | None = None,
    patch_centres_px: np.ndarray | None = None,
    patch_shifts_px: np.ndarray | None = None,
) -> Path:
    """Write RELION's per-movie motion metadata STAR file atomically.

    Parameters
    ----------
    path
        Destination ``.star``.
    image_size
        ``(x, y, n_frames)`` of the movie.
    movie_name, gain_name
        Paths written as rlnMicrographMovieName / rlnMicrographGainName.
    binning, original_pixel_size_a, dose_per_frame, pre_exposure, voltage_kv, start_frame
        RELION's data_general values.
    global_shifts_px
        ``(n, 2)`` global shifts (unbinned pixels) of every movie frame, frame 1 first (RELION
        writes -9999 for frames outside the summed range).
    local_coeffs
        ``(36,)`` polynomial model, or ``None`` (rlnMotionModelVersion 0).
    patch_centres_px, patch_shifts_px
        ``(py, px, 2)`` and ``(py, px, n, 2)`` patch measurements for ``data_local_shift``
        (frames numbered from ``start_frame``).
    """
    general = {
        "rlnImageSizeX": int(image_size[0]),
        "rlnImageSizeY": int(image_size[1]),
        "rlnImageSizeZ": int(image_size[2]),
        "rlnMicrographMovieName": str(movie_name),
    }
    if gain_name:
        general["rlnMicrographGainName"] = str(gain_name)
    general.update(
        {
            "rlnMicrographBinning": float(binning),
            "rlnMicrographOriginalPixelSize": float(original_pixel_size_a),
            "rlnMicrographDoseRate": float(dose_per_frame),
            "rlnMicrographPreExposure": float(pre_exposure),
            "rlnVoltage": float(voltage_kv),
            "rlnMicrographStartFrame": int(start_frame),
            "rlnMotionModelVersion": 1 if local_coeffs is not None else 0,
        }
    )
    shifts = np.asarray(global_shifts_px, dtype=np.float64)
    blocks: dict = {
        "general": general,
        "global_shift": pd.DataFrame(
            {
                "rlnMicrographFrameNumber": np.arange(1, shifts.shape[0] + 1, dtype=np.int64),
                "rlnMicrographShiftX": shifts[:, 0],
                "rlnMicrographShiftY": shifts[:, 1],
            }
        ),
    }
    if local_coeffs is not None:
        c = np.asarray(local_coeffs, dtype=np.float64).reshape(-1)
        blocks["local_motion_model"] = pd.DataFrame(
            {"rlnMotionModelCoeffsIdx": np.arange(c.size, dtype=np.int64), "rlnMotionModelCoeff": c}
        )
    if patch_centres_px is not None and patch_shifts_px is not None:
        centres = np.asarray(patch_centres_px, dtype=np.float64).reshape(-1, 2)
        ps = np.asarray(patch_shifts_px, dtype=np.float64)
        n = ps.shape[-2]
        ps = ps.reshape(-1, n, 2)
        frames = np.tile(np.arange(start_frame, start_frame + n, dtype=np.int64), centres.shape[0])
        blocks["local_shift"] = pd.DataFrame(
            {
                "rlnMicrographFrameNumber": frames,
                "rlnCoordinateX": np.repeat(centres[:, 0], n),
                "rlnCoordinateY": np.repeat(centres[:, 1], n),
                "rlnMicrographShiftX": ps[..., 0].reshape(-1),
                "rlnMicrographShiftY": ps[..., 1].reshape(-1),
            }
        )
    return write_star(path, blocks)


def read_motion_metadata(path: str | Path) -> MotionMetadata:
    """Read a motion metadata STAR file written by :func:`write_motion_metadata` or RELION.

    Raises
    ------
    InputError
        Missing ``data_general`` or ``data_global_shift``, or a malformed coefficient table.
    """
    blocks = read_star(path)
    if "general" not in blocks or "global_shift" not in blocks:
        raise InputError(path, "not a motion metadata file (needs data_general and data_global_shift)")
    gs = blocks["global_shift"]
    if not isinstance(gs, pd.DataFrame):
        gs = pd.DataFrame([gs])
    for lab in ("rlnMicrographShiftX", "rlnMicrographShiftY"):
        if lab not in gs.columns:
            raise InputError(path, f"data_global_shift has no {lab}")
    shifts = np.stack([gs["rlnMicrographShiftX"].to_numpy(float), gs["rlnMicrographShiftY"].to_numpy(float)], axis=-1)
    coeffs = None
    if "local_motion_model" in blocks:
        lm = blocks["local_motion_model"]
        order = np.argsort(lm["rlnMotionModelCoeffsIdx"].to_numpy())
        coeffs = lm["rlnMotionModelCoeff"].to_numpy(float)[order]
        if coeffs.size != 36:
            raise InputError(path, f"local motion model has {coeffs.size} coefficients, expected 36")
    local = blocks.get("local_shift")
    general = blocks["general"] if isinstance(blocks["general"], dict) else blocks["general"].iloc[0].to_dict()
    return MotionMetadata(general=general, global_shifts_px=shifts, local_coeffs=coeffs, local_shifts=local)


# ------------------------------------------------------------------------------- coordinates ---


def write_coordinates(
    path: str | Path,
    coords_px: np.ndarray,
    fom: np.ndarray | None = None,
    extra: dict[str, Sequence] | None = None,
) -> Path:
    """Write a RELION coordinate STAR file (one unnamed loop) atomically.

    Parameters
    ----------
    path
        Destination, e.g. ``AutoPick/job004/Movies/mic001_autopick.star``.
    coords_px
        ``(k, 2)`` coordinates (x, y) in micrograph pixels.
    fom
        ``(k,)`` rlnAutopickFigureOfMerit (default 0).
    extra
        More columns (label -> values).
    """
    c = np.asarray(coords_px, dtype=np.float64).reshape(-1, 2)
    k = c.shape[0]
    df = pd.DataFrame(
        {
            "rlnCoordinateX": c[:, 0],
            "rlnCoordinateY": c[:, 1],
            "rlnClassNumber": np.zeros(k, dtype=np.int64),
            "rlnAutopickFigureOfMerit": np.zeros(k) if fom is None else np.asarray(fom, dtype=np.float64),
            "rlnAnglePsi": np.full(k, -999.0),
        }
    )
    for lab, values in (extra or {}).items():
        df[lab] = list(values)
    return write_star(path, {"": df})


def read_coordinates(path: str | Path) -> pd.DataFrame:
    """Read a coordinate STAR file (RELION's, any block) as a DataFrame with rlnCoordinateX/Y.

    Raises
    ------
    InputError
        No loop with rlnCoordinateX and rlnCoordinateY.
    """
    blocks = read_star(path)
    for block in blocks.values():
        if isinstance(block, pd.DataFrame) and {"rlnCoordinateX", "rlnCoordinateY"} <= set(block.columns):
            return block
        if isinstance(block, dict) and {"rlnCoordinateX", "rlnCoordinateY"} <= set(block):
            return pd.DataFrame([block])
        if isinstance(block, dict) and not block:
            continue
    # an empty coordinate file written by us has an empty loop: starfile returns an empty frame
    for block in blocks.values():
        if isinstance(block, pd.DataFrame) and block.empty:
            return pd.DataFrame({"rlnCoordinateX": np.zeros(0), "rlnCoordinateY": np.zeros(0)})
    raise InputError(path, "no rlnCoordinateX/rlnCoordinateY loop in coordinate file")


def write_coordinate_index(path: str | Path, micrograph_names: Sequence[str], coordinate_files: Sequence[str]) -> Path:
    """Write ``autopick.star``: data_coordinate_files with rlnMicrographName and rlnMicrographCoordinates."""
    df = pd.DataFrame(
        {"rlnMicrographName": [str(m) for m in micrograph_names], "rlnMicrographCoordinates": [str(c) for c in coordinate_files]}
    )
    return write_star(path, {"coordinate_files": df})


def read_coordinate_index(path: str | Path) -> pd.DataFrame:
    """Read ``autopick.star`` (RELION-4.0's data_coordinate_files).

    Raises
    ------
    InputError
        No data_coordinate_files loop with rlnMicrographName and rlnMicrographCoordinates.
    """
    blocks = read_star(path)
    block = blocks.get("coordinate_files")
    if isinstance(block, dict) and block:
        block = pd.DataFrame([block])
    if not isinstance(block, pd.DataFrame) or not {"rlnMicrographName", "rlnMicrographCoordinates"} <= set(block.columns):
        raise InputError(path, "no data_coordinate_files loop with rlnMicrographName and rlnMicrographCoordinates")
    block = block.copy()
    block["rlnMicrographCoordinates"] = block["rlnMicrographCoordinates"].astype(str)
    block["rlnMicrographName"] = block["rlnMicrographName"].astype(str)
    return block


# ------------------------------------------------------------------------ micrograph tables ---


@dataclass(frozen=True)
class MicrographTable:
    """A RELION 3.1+ table of movies or micrographs.

    Attributes
    ----------
    optics
        ``data_optics`` rows.
    rows
        ``data_movies`` or ``data_micrographs`` rows.
    block
        Name of the row block (``"movies"`` or ``"micrographs"``).
    """

    optics: pd.DataFrame
    rows: pd.DataFrame
    block: str

    def optics_for(self, i: int) -> dict:
        """The optics-group row (as a dict) of row ``i``."""
        group = int(self.rows["rlnOpticsGroup"].iloc[i]) if "rlnOpticsGroup" in self.rows.columns else 1
        match = self.optics[self.optics["rlnOpticsGroup"].astype(int) == group]
        if match.empty:
            match = self.optics.iloc[[0]]
        return match.iloc[0].to_dict()


def read_micrograph_table(path: str | Path, block: str, name_label: str) -> MicrographTable:
    """Read ``movies.star`` / ``corrected_micrographs.star`` / ``micrographs_ctf.star``.

    Parameters
    ----------
    path
        STAR file.
    block
        ``"movies"`` or ``"micrographs"``.
    name_label
        Column every row must have (rlnMicrographMovieName or rlnMicrographName).

    Raises
    ------
    InputError
        Missing data_optics, the row block or the name column, or a row with an unknown optics group.
    """
    blocks = read_star(path)
    optics = blocks.get("optics")
    if isinstance(optics, dict):
        optics = pd.DataFrame([optics]) if optics else None
    if optics is None or optics.empty:
        raise InputError(path, "no data_optics block (RELION 3.1+ STAR expected)")
    rows = blocks.get(block)
    if isinstance(rows, dict):
        rows = pd.DataFrame([rows]) if rows else pd.DataFrame({name_label: []})
    if rows is None:
        raise InputError(path, f"no data_{block} block")
    if name_label not in rows.columns:
        raise InputError(path, f"data_{block} has no {name_label} column")
    if "rlnOpticsGroup" not in optics.columns:
        raise InputError(path, "data_optics has no rlnOpticsGroup column")
    if "rlnOpticsGroup" in rows.columns and len(rows):
        known = set(optics["rlnOpticsGroup"].astype(int))
        unknown = set(rows["rlnOpticsGroup"].astype(int)) - known
        if unknown:
            raise InputError(path, f"rows refer to optics group(s) {sorted(unknown)} missing from data_optics")
    return MicrographTable(optics=optics.reset_index(drop=True), rows=rows.reset_index(drop=True), block=block)


def write_micrograph_table(path: str | Path, optics: pd.DataFrame, rows: pd.DataFrame, block: str = "micrographs") -> Path:
    """Write a data_optics + data_<block> STAR file atomically."""
    return write_star(path, {"optics": optics, block: rows})


def write_particles_star(path: str | Path, optics: pd.DataFrame, particles: pd.DataFrame) -> Path:
    """Write ``particles.star`` (data_optics + data_particles) atomically."""
    return write_star(path, {"optics": optics, "particles": particles})
