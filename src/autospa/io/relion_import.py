"""RELION's Import job for movies and micrographs (relion_import --do_movies / --do_micrographs).

Writes ``DIR/movies.star`` (data_optics + data_movies) or ``DIR/micrographs.star`` (data_optics +
data_micrographs) in RELION 4.0's layout. File names are kept as the glob returns them (relative to
the project directory, i.e. the current directory, when the pattern is relative), sorted. In
continue mode only files that the existing STAR file does not list are appended, which is how the
prep scheme re-runs the import on a folder that keeps growing.
"""

from __future__ import annotations

import glob
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from autospa.errors import InputError
from autospa.io.star import read_star, write_star

log = logging.getLogger(__name__)

MOVIES_STAR = "movies.star"
MICROGRAPHS_STAR = "micrographs.star"


def import_movies(
    pattern: str,
    outdir: str | Path,
    angpix: float,
    kv: float,
    cs: float,
    q0: float,
    optics_group_name: str = "opticsGroup1",
    gainref: str | None = None,
    mtf: str | None = None,
    beamtilt_x: float | None = None,
    beamtilt_y: float | None = None,
    continue_: bool = False,
    ofile: str = MOVIES_STAR,
) -> Path:
    """Import movies: write ``outdir/movies.star``.

    Parameters
    ----------
    pattern
        Glob of movie files (e.g. ``"Movies/*.tiff"``), relative to the current directory.
    outdir
        Job folder (e.g. ``Import/job001``).
    angpix
        Pixel size of the movies in Angstrom (rlnMicrographOriginalPixelSize).
    kv, cs, q0
        Voltage (kV), spherical aberration (mm), amplitude contrast (fraction).
    optics_group_name
        rlnOpticsGroupName of these movies.
    gainref, mtf
        Optional gain reference (rlnMicrographGainName) and MTF file (rlnMtfFileName).
    beamtilt_x, beamtilt_y
        Optional beam tilt in mrad (rlnBeamTiltX/Y).
    continue_
        Append only files that ``outdir/ofile`` does not list yet.
    ofile
        Output file name.

    Returns
    -------
    Path
        The STAR file.
    """
    return _import_images(
        "movies", pattern, outdir, angpix, kv, cs, q0, optics_group_name, gainref, mtf, beamtilt_x, beamtilt_y, continue_, ofile
    )


def import_micrographs(
    pattern: str,
    outdir: str | Path,
    angpix: float,
    kv: float,
    cs: float,
    q0: float,
    optics_group_name: str = "opticsGroup1",
    mtf: str | None = None,
    beamtilt_x: float | None = None,
    beamtilt_y: float | None = None,
    continue_: bool = False,
    ofile: str = MICROGRAPHS_STAR,
) -> Path:
    """Import (motion-corrected) micrographs: write ``outdir/micrographs.star``.

    Same parameters as :func:`import_movies`; ``angpix`` is the micrograph pixel size
    (rlnMicrographPixelSize and rlnMicrographOriginalPixelSize in data_optics).
    """
    return _import_images(
        "micrographs", pattern, outdir, angpix, kv, cs, q0, optics_group_name, None, mtf, beamtilt_x, beamtilt_y, continue_, ofile
    )


def _import_images(
    kind: str,
    pattern: str,
    outdir: str | Path,
    angpix: float,
    kv: float,
    cs: float,
    q0: float,
    group_name: str,
    gainref: str | None,
    mtf: str | None,
    beamtilt_x: float | None,
    beamtilt_y: float | None,
    continue_: bool,
    ofile: str,
) -> Path:
    _check_value("angpix", angpix, lambda v: v > 0)
    _check_value("kV", kv, lambda v: v > 0)
    _check_value("Cs", cs, lambda v: v >= 0)
    _check_value("Q0", q0, lambda v: 0 <= v < 1)
    if not group_name or any(ch.isspace() for ch in group_name):
        raise InputError(None, f"optics group name {group_name!r} must be a non-empty word without spaces")
    if gainref and not Path(gainref).is_file():  # else every movie fails later, in motion correction
        raise InputError(gainref, "gain reference not found (paths are relative to the project directory)")
    out = Path(outdir) / ofile
    name_label = "rlnMicrographMovieName" if kind == "movies" else "rlnMicrographName"
    files = sorted(f for f in glob.glob(pattern) if not Path(f).is_dir())
    new_optics = _optics_row(kind, group_name, angpix, kv, cs, q0, gainref, mtf, beamtilt_x, beamtilt_y)

    if continue_ and out.exists():
        blocks = read_star(out)
        if "optics" not in blocks or kind not in blocks:
            raise InputError(out, f"cannot continue: expected data_optics and data_{kind} blocks")
        optics = _frame(blocks["optics"])
        table = _frame(blocks[kind])
        if name_label not in table.columns and len(table):
            raise InputError(out, f"cannot continue: data_{kind} lacks {name_label}")
        known = set(table[name_label].astype(str)) if len(table) else set()
        new_files = [f for f in files if f not in known]
        group = _optics_group(out, optics, new_optics)
        optics = group[1]
        if not new_files:
            log.info("%s: no new %s matching %s", out, kind, pattern)
            return out
        rows = pd.DataFrame({name_label: new_files, "rlnOpticsGroup": np.int64(group[0])})
        table = pd.concat([table.reset_index(drop=True), rows], ignore_index=True) if len(table) else rows
        log.info("%s: appending %d new %s (%d in total)", out, len(new_files), kind, len(table))
    else:
        if not files:
            raise InputError(pattern, "no files match this pattern")
        optics = pd.DataFrame([new_optics])
        optics["rlnOpticsGroup"] = optics["rlnOpticsGroup"].astype(np.int64)
        table = pd.DataFrame({name_label: files, "rlnOpticsGroup": np.int64(1)})
        log.info("%s: %d %s", out, len(files), kind)
    table["rlnOpticsGroup"] = table["rlnOpticsGroup"].astype(np.int64)
    write_star(out, {"optics": optics, kind: table})
    return out


def _check_value(name: str, value: float, ok) -> None:
    if value is None or not math.isfinite(float(value)) or not ok(float(value)):
        raise InputError(None, f"--{name} {value} is not a valid value")


def _optics_row(kind, group_name, angpix, kv, cs, q0, gainref, mtf, beamtilt_x, beamtilt_y) -> dict:
    row: dict = {"rlnOpticsGroupName": group_name, "rlnOpticsGroup": 1}
    if mtf:
        row["rlnMtfFileName"] = str(mtf)
    row["rlnMicrographOriginalPixelSize"] = float(angpix)
    if kind == "micrographs":
        row["rlnMicrographPixelSize"] = float(angpix)
    row["rlnVoltage"] = float(kv)
    row["rlnSphericalAberration"] = float(cs)
    row["rlnAmplitudeContrast"] = float(q0)
    if beamtilt_x is not None or beamtilt_y is not None:
        row["rlnBeamTiltX"] = float(beamtilt_x or 0.0)
        row["rlnBeamTiltY"] = float(beamtilt_y or 0.0)
    if gainref:
        row["rlnMicrographGainName"] = str(gainref)
    return row


def _frame(block) -> pd.DataFrame:
    if isinstance(block, pd.DataFrame):
        return block.reset_index(drop=True)
    return pd.DataFrame([block]) if block else pd.DataFrame()


def _optics_group(out: Path, optics: pd.DataFrame, new: dict) -> tuple[int, pd.DataFrame]:
    """The group number for ``new`` in ``optics`` (appending a group for a new name)."""
    name = new["rlnOpticsGroupName"]
    if "rlnOpticsGroupName" in optics and (optics["rlnOpticsGroupName"].astype(str) == name).any():
        row = optics[optics["rlnOpticsGroupName"].astype(str) == name].iloc[0]
        for label, value in new.items():
            if label in ("rlnOpticsGroup", "rlnOpticsGroupName"):
                continue
            old = row.get(label)
            if isinstance(value, float):
                same = old is not None and not pd.isna(old) and math.isclose(float(old), value, rel_tol=1e-6, abs_tol=1e-9)
            else:
                same = old is not None and str(old) == str(value)
            if not same:
                raise InputError(out, f"optics group {name} already has {label} = {old}, not {value}; use another --optics_group_name")
        return int(row["rlnOpticsGroup"]), optics
    number = int(optics["rlnOpticsGroup"].max()) + 1 if len(optics) else 1
    row = dict(new, rlnOpticsGroup=number)
    merged = pd.concat([optics, pd.DataFrame([row])], ignore_index=True)
    for col in merged.columns:
        if merged[col].isna().any():
            merged[col] = merged[col].fillna("" if merged[col].dtype == object or pd.api.types.is_string_dtype(merged[col]) else 0)
    merged["rlnOpticsGroup"] = merged["rlnOpticsGroup"].astype(np.int64)
    return number, merged


__all__ = ["MICROGRAPHS_STAR", "MOVIES_STAR", "import_micrographs", "import_movies"]
