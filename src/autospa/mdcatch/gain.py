"""Gain reference, defect file and MTF beside a session; gain size and orientation checks (L3).

MDCatch copies the gain and MTF found by fixed patterns and never checks them (its gain
rotation/flip stay "No rotation (0)" / "No flipping (0)"; reference/mdcatch.md section 1.9). Here
the gain is looked for by the name the metadata records, then by the detector's patterns, in the
movie's folder, the session folder and the configured folders; its size is compared with the
movies', and a mismatch is explained as a rotation and/or a binning. When the size cannot decide
(square detectors, or a flip), :func:`find_gain_orientation` compares the gain with the sum of a
movie's raw frames: raw counts are proportional to 1 / gain, so the right orientation is the one
whose 1 / gain correlates best with the frame sum.

Orientation codes are RELION's motion-correction options: ``gain_rot`` rotates the gain by
``90 deg x gain_rot`` clockwise as displayed with row 0 at the top (relion_display, MotionCor2's
-RotGain), then ``gain_flip`` 1 flips it upside down (rows reversed) and 2 left to right.
"""

from __future__ import annotations

import fnmatch
import logging
import ntpath
import os
import warnings as _warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np
import tifffile

from autospa.errors import InputError
from autospa.mdcatch.detectors import MDCatchConfig, find_preset
from autospa.mdcatch.metadata import AcquisitionMetadata

log = logging.getLogger(__name__)

#: The 8 distinct orientations as (gain_rot, gain_flip).
ORIENTATIONS = tuple((rot, flip) for flip in (0, 1) for rot in range(4))


def relion_gain_transform(gain: np.ndarray, gain_rot: int, gain_flip: int) -> np.ndarray:
    """Apply RELION's gain rotation then flip.

    Parameters
    ----------
    gain
        ``(h, w)`` gain reference, row 0 at the top.
    gain_rot
        0-3: rotate by 90 deg x gain_rot clockwise.
    gain_flip
        0 none, 1 upside down (reverse rows), 2 left to right (reverse columns).

    Returns
    -------
    numpy.ndarray
        ``(h, w)`` or ``(w, h)``.
    """
    if gain_rot not in (0, 1, 2, 3) or gain_flip not in (0, 1, 2):
        raise ValueError(f"gain_rot must be 0-3 and gain_flip 0-2, got {gain_rot}, {gain_flip}")
    out = np.rot90(gain, k=-gain_rot)
    if gain_flip == 1:
        out = out[::-1, :]
    elif gain_flip == 2:
        out = out[:, ::-1]
    return out


@dataclass(frozen=True)
class GainFix:
    """One way to make a gain reference fit the movies.

    Attributes
    ----------
    gain_rot, gain_flip
        RELION's codes (see :func:`relion_gain_transform`).
    gain_bin
        Bin the gain by this factor (2: super-resolution gain, counting movies); 0.5 means the
        movies are super-resolution and the gain is not (upsample the gain, or bin the movies).
    description
        The same in words.
    """

    gain_rot: int
    gain_flip: int
    gain_bin: float
    description: str


@dataclass(frozen=True)
class GainCheck:
    """Result of comparing a gain reference's size with the movies'.

    Attributes
    ----------
    gain_shape, movie_shape
        ``(height, width)`` of each (None when unknown).
    matches
        The sizes agree as they are.
    fixes
        Rotations / binnings that would make them agree (empty when they already do or nothing can).
    message
        One line for the user.
    """

    gain_shape: tuple[int, int] | None
    movie_shape: tuple[int, int] | None
    matches: bool
    fixes: tuple[GainFix, ...]
    message: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["fixes"] = [asdict(f) for f in self.fixes]
        return d


def check_gain_size(gain_shape: tuple[int, int] | None, movie_shape: tuple[int, int] | None) -> GainCheck:
    """Compare sizes and say which rotation and/or binning would make the gain fit.

    Parameters
    ----------
    gain_shape, movie_shape
        ``(height, width)``.

    Returns
    -------
    GainCheck
    """
    if gain_shape is None or movie_shape is None:
        return GainCheck(gain_shape, movie_shape, False, (), "size unknown: gain not checked")
    gh, gw = gain_shape
    mh, mw = movie_shape
    if (gh, gw) == (mh, mw):
        note = " (square: the orientation cannot be told from the size)" if gh == gw else ""
        return GainCheck(gain_shape, movie_shape, True, (), f"gain {gw}x{gh} matches the movies{note}")
    fixes = []
    for rot in (0, 1):
        th, tw = (gh, gw) if rot == 0 else (gw, gh)
        for b in (1.0, 2.0, 0.5):
            if (th / b, tw / b) != (mh, mw):
                continue
            if rot == 0 and b == 1.0:
                continue
            words = []
            if rot:
                words.append("rotate the gain by 90 degrees (gain_rot 1 or 3: run `autospa mdcatch gain` to tell which)")
            if b == 2.0:
                words.append("bin the gain by 2 (it is super-resolution, the movies are not)")
            elif b == 0.5:
                words.append("the movies are super-resolution and the gain is not: upsample the gain by 2 "
                             "or bin the movies by 2 before gain correction")
            fixes.append(GainFix(rot, 0, b, "; ".join(words)))
    if fixes:
        msg = f"gain {gw}x{gh} does not match the movies {mw}x{mh}: " + " / ".join(f.description for f in fixes)
    else:
        msg = f"gain {gw}x{gh} does not match the movies {mw}x{mh}, and no rotation or 2x binning makes it fit"
    return GainCheck(gain_shape, movie_shape, False, tuple(fixes), msg)


def _bin2(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
    a = a[:h, :w]
    return a.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))


@dataclass(frozen=True)
class GainOrientation:
    """Correlation of the frame sum with 1 / gain in one orientation."""

    gain_rot: int
    gain_flip: int
    correlation: float


def find_gain_orientation(gain: np.ndarray, frame_sum: np.ndarray) -> list[GainOrientation]:
    """Rank the orientations of a gain reference against a sum of raw (not gain-corrected) frames.

    Raw counts are proportional to 1 / gain (the gain-corrected image is raw x gain). For every
    orientation whose shape fits (after a 2x binning of the larger image when the two differ by a
    factor 2) the Pearson correlation of the frame sum with 1 / gain is computed over the pixels
    where the gain is positive and finite.

    Parameters
    ----------
    gain
        ``(gh, gw)`` gain reference.
    frame_sum
        ``(h, w)`` sum of raw frames of one movie.

    Returns
    -------
    list of GainOrientation
        Best first; empty when no orientation fits the shape.
    """
    gain = np.asarray(gain, dtype=np.float64)
    frame_sum = np.asarray(frame_sum, dtype=np.float64)
    out: list[GainOrientation] = []
    for rot, flip in ORIENTATIONS:
        g = relion_gain_transform(gain, rot, flip)
        s = frame_sum
        if g.shape != s.shape:
            if (g.shape[0] // 2, g.shape[1] // 2) == s.shape:
                g = _bin2(g)
            elif (s.shape[0] // 2, s.shape[1] // 2) == g.shape:
                s = _bin2(s)
            else:
                continue
        valid = np.isfinite(g) & (g > 0) & np.isfinite(s)
        if valid.sum() < 16:
            continue
        inv = 1.0 / g[valid]
        x = s[valid]
        inv = inv - inv.mean()
        x = x - x.mean()
        den = float(np.sqrt((inv * inv).sum() * (x * x).sum()))
        corr = float((inv * x).sum() / den) if den > 0 else 0.0
        out.append(GainOrientation(rot, flip, corr))
    out.sort(key=lambda o: -o.correlation)
    return out


# ---------------------------------------------------------------------------------- file reading
def read_image(path: str | Path, max_frames: int | None = 1) -> np.ndarray:
    """The sum of the first ``max_frames`` sections (all when None) of an MRC or TIFF, as float64.

    Raises
    ------
    InputError
        Unreadable file or a format that cannot be decoded here (EER, DM4).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".eer":
        raise InputError(path, "EER frames cannot be decoded here (install eerfile, or use a TIFF/MRC movie)")
    if suffix in (".dm4", ".dm3"):
        raise InputError(path, "DM4 gain references cannot be read: convert it with IMOD's dm2mrc")
    try:
        if suffix in (".mrc", ".mrcs", ".st"):
            with _warnings.catch_warnings():
                _warnings.simplefilter("ignore")
                with mrcfile.mmap(path, mode="r", permissive=True) as mrc:
                    data = mrc.data
                    if data is None:
                        raise InputError(path, "MRC file has no data")
                    if data.ndim == 2:
                        return np.asarray(data, dtype=np.float64)
                    n = data.shape[0] if max_frames is None else min(max_frames, data.shape[0])
                    return np.asarray(data[:n], dtype=np.float64).sum(axis=0)
        with tifffile.TiffFile(path) as tif:
            n = len(tif.pages) if max_frames is None else min(max_frames, len(tif.pages))
            acc = None
            for i in range(n):
                page = tif.pages[i]
                a = np.asarray(page.asarray(), dtype=np.float64)  # type: ignore[union-attr]
                acc = a if acc is None else acc + a
            if acc is None:
                raise InputError(path, "TIFF file has no pages")
            return acc
    except InputError:
        raise
    except (ValueError, OSError, EOFError, tifffile.TiffFileError, IndexError) as exc:
        raise InputError(path, f"cannot read image data ({exc})") from None


def read_image_shape(path: str | Path) -> tuple[int, int] | None:
    """``(height, width)`` of an MRC/TIFF/.gain image from its header; None for DM3/DM4.

    Raises
    ------
    InputError
        Unreadable file.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".dm4", ".dm3"):
        return None
    try:
        if suffix in (".mrc", ".mrcs", ".st"):
            with _warnings.catch_warnings():
                _warnings.simplefilter("ignore")
                with mrcfile.open(path, header_only=True, permissive=True) as mrc:
                    return int(mrc.header.ny), int(mrc.header.nx)
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            return int(page.tags[257].value), int(page.tags[256].value)
    except (ValueError, OSError, EOFError, tifffile.TiffFileError, KeyError, AttributeError) as exc:
        raise InputError(path, f"cannot read the image size ({exc})") from None


# ---------------------------------------------------------------------------------- finding files
def _search_dirs(movie: Path | None, session: Path, extra: tuple[str, ...]) -> list[Path]:
    dirs: list[Path] = []
    if movie is not None:
        dirs.append(movie.parent)
    dirs.append(session)
    for e in extra:
        p = Path(os.path.expanduser(e))
        dirs.append(p if p.is_absolute() else session / p)
    out: list[Path] = []
    for d in dirs:
        d = d.resolve()
        if d.is_dir() and d not in out:
            out.append(d)
    return out


def _listdir(d: Path) -> list[str]:
    try:
        return sorted(os.listdir(d))
    except OSError:
        return []


def _find_named(name: str | None, dirs: list[Path]) -> Path | None:
    if not name:
        return None
    base = ntpath.basename(name.strip())  # names may be Windows paths (SerialEM, EPU)
    if not base:
        return None
    for d in dirs:
        for f in _listdir(d):
            if f.lower() == base.lower() and (d / f).is_file():
                return d / f
    return None


def _find_pattern(patterns: tuple[str, ...], dirs: list[Path]) -> Path | None:
    for d in dirs:
        names = _listdir(d)
        for pat in patterns:
            for f in names:
                if fnmatch.fnmatch(f.lower(), pat.lower()) and (d / f).is_file():
                    return d / f
    return None


def gain_patterns(config: MDCatchConfig, meta: AcquisitionMetadata) -> tuple[str, ...]:
    """The detector's gain patterns, or every preset's when the detector is unknown."""
    preset = find_preset(config, meta)
    if preset is not None:
        return preset.gain_patterns
    pats: list[str] = []
    for p in config.detectors.values():
        pats += [x for x in p.gain_patterns if x not in pats]
    return tuple(pats)


def is_gain_name(name: str, config: MDCatchConfig) -> bool:
    """Whether a file name looks like a gain reference (any preset's pattern)."""
    low = name.lower()
    return any(fnmatch.fnmatch(low, p.lower()) for d in config.detectors.values() for p in d.gain_patterns)


def find_gain_reference(
    meta: AcquisitionMetadata, session: str | Path, config: MDCatchConfig, movie: str | Path | None = None
) -> Path | None:
    """The gain reference of a session: by the name in the metadata, else by the detector's patterns,
    in the movie's folder, the session folder and the configured ``gain_dirs``."""
    dirs = _search_dirs(Path(movie) if movie else None, Path(session), config.gain_dirs)
    return _find_named(meta.gain_reference, dirs) or _find_pattern(gain_patterns(config, meta), dirs)


def find_defect_file(
    meta: AcquisitionMetadata, session: str | Path, config: MDCatchConfig, movie: str | Path | None = None
) -> Path | None:
    """The camera defect file named by the metadata, when it is found beside the session."""
    dirs = _search_dirs(Path(movie) if movie else None, Path(session), config.gain_dirs)
    return _find_named(meta.defect_file, dirs)


def find_mtf(
    mtf_name: str | None, session: str | Path, config: MDCatchConfig, movie: str | Path | None = None
) -> Path | None:
    """The MTF file ``mtf_name`` in the movie's folder, the session folder or ``mtf_dirs``."""
    dirs = _search_dirs(Path(movie) if movie else None, Path(session), config.mtf_dirs)
    return _find_named(mtf_name, dirs)


@dataclass(frozen=True)
class GainReport:
    """Gain, defect and MTF files found for a session, the gain check and the gain orientation.

    Attributes
    ----------
    gain_reference, defect_file, mtf_file
        Paths found (None when not found).
    mtf_name
        The MTF file name looked for.
    check
        Size comparison of the gain with the movies (None without a gain).
    gain_rot, gain_flip
        RELION's orientation codes to use with the gain (0, 0 unless measured).
    orientation
        How the orientation was settled: ``frames`` (measured on the movie's frames), ``size``
        (the only fit by size), ``unchecked`` or a reason why it could not be measured.
    orientation_scores
        Correlation per orientation, best first (empty when not measured).
    usable
        Whether the gain can be given to motion correction with ``gain_rot``/``gain_flip``.
    """

    gain_reference: str | None
    defect_file: str | None
    mtf_name: str | None
    mtf_file: str | None
    check: GainCheck | None
    gain_rot: int = 0
    gain_flip: int = 0
    orientation: str = "unchecked"
    orientation_scores: tuple[GainOrientation, ...] = ()
    usable: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "gain_reference": self.gain_reference,
            "defect_file": self.defect_file,
            "mtf_name": self.mtf_name,
            "mtf_file": self.mtf_file,
            "check": None if self.check is None else self.check.to_dict(),
            "gain_rot": self.gain_rot,
            "gain_flip": self.gain_flip,
            "orientation": self.orientation,
            "orientation_scores": [asdict(o) for o in self.orientation_scores],
            "usable": self.usable,
        }


#: Minimum lead of the best orientation's correlation over the second best to accept it.
ORIENTATION_MARGIN = 0.05


def measure_orientation(gain_path: str | Path, movie_path: str | Path, max_frames: int = 8) -> tuple[
    str, tuple[GainOrientation, ...], tuple[int, int] | None
]:
    """Measure the gain's orientation on the first frames of a raw movie.

    Returns
    -------
    how, scores, best
        ``how`` is ``frames`` when one orientation leads by :data:`ORIENTATION_MARGIN`, else the
        reason; ``best`` is ``(gain_rot, gain_flip)`` or None.
    """
    try:
        gain = read_image(gain_path, max_frames=1)
        frames = read_image(movie_path, max_frames=max_frames)
    except InputError as exc:
        return f"not measured: {exc.problem}", (), None
    scores = tuple(find_gain_orientation(gain, frames))
    if not scores:
        return "not measured: no orientation of the gain fits the movie", (), None
    best = scores[0]
    second = scores[1].correlation if len(scores) > 1 else 0.0
    if best.correlation - second < ORIENTATION_MARGIN:
        return (f"ambiguous: best r = {best.correlation:.3f}, next {second:.3f} (movies gain-corrected already, "
                "or the gain belongs to another camera)"), scores, None
    return "frames", scores, (best.gain_rot, best.gain_flip)


def gain_report(
    meta: AcquisitionMetadata,
    session: str | Path,
    config: MDCatchConfig,
    mtf_name: str | None,
    movie: str | Path | None = None,
    measure: bool = True,
    max_frames: int = 8,
) -> GainReport:
    """Find the gain, defect file and MTF of a session, check the gain's size and orientation.

    Parameters
    ----------
    meta
        Resolved metadata of a movie of the session (frame size used for the check).
    session
        Session folder.
    config
        MDCatch configuration.
    mtf_name
        The MTF file name for the detector (``DerivedParameters.mtf_name``).
    movie
        The movie (its folder is searched first; its frames are used to measure the orientation).
    measure
        Measure the orientation on the movie's first ``max_frames`` frames (MRC/TIFF movies).
    max_frames
        Frames summed for the measurement.

    Returns
    -------
    GainReport
    """
    gain = find_gain_reference(meta, session, config, movie)
    defects = find_defect_file(meta, session, config, movie)
    mtf = find_mtf(mtf_name, session, config, movie)
    check = None
    rot = flip = 0
    how = "unchecked"
    scores: tuple[GainOrientation, ...] = ()
    usable = False
    if gain is not None:
        movie_shape = None
        if meta.image_width_px and meta.image_height_px:
            movie_shape = (meta.image_height_px, meta.image_width_px)
        try:
            check = check_gain_size(read_image_shape(gain), movie_shape)
        except InputError as exc:
            check = GainCheck(None, movie_shape, False, (), str(exc))
        usable = check.matches
        if measure and movie is not None and check.gain_shape is not None:
            how, scores, best = measure_orientation(gain, movie, max_frames)
            if best is not None:
                rot, flip = best
                gh, gw = check.gain_shape
                turned = (gh, gw) if rot % 2 == 0 else (gw, gh)
                usable = movie_shape is not None and turned == movie_shape
        if not check.matches and not usable:
            log.warning("%s", check.message)
    return GainReport(
        gain_reference=None if gain is None else str(gain),
        defect_file=None if defects is None else str(defects),
        mtf_name=mtf_name,
        mtf_file=None if mtf is None else str(mtf),
        check=check,
        gain_rot=rot,
        gain_flip=flip,
        orientation=how,
        orientation_scores=scores,
        usable=usable,
    )
