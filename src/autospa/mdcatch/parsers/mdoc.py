"""SerialEM ``.mdoc`` files: frame mdocs (``movie.tif.mdoc``) and session/tilt-series mdocs.

An mdoc is ``key = value`` lines. A line ``[Name = value]`` starts a section (``FrameSet``,
``ZValue``, ``MontSection`` ...); lines before the first section are the global header, which
every section inherits. Title lines are ``[T = text]`` in tilt-series mdocs but often ``T = text``
(no brackets) in frame mdocs; both are titles here, never sections or keys.

Fixes against MDCatch (reference/mdcatch.md section 1.12):
- bug 1: unbracketed title lines are accepted, and a missing D-number is not an error;
- bug 2: super-resolution (``Binning = 0.5``) gives ``binning = 1`` and
  ``super_resolution_factor = 2`` as integers, so derived values see it;
- ``PhasePlateInserted`` is read (dead code in MDCatch), and so are ``Cs``, ``OpticalGroup``,
  ``FrameDosesAndNumber``, ``SpotSize``, ``ImageShift`` and the energy-filter slit;
- each section is its own exposure (MDCatch kept the last one's values over the first's).
"""

from __future__ import annotations

import ntpath
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from autospa.errors import InputError
from autospa.mdcatch.metadata import COUNTING, SUPER_RESOLUTION, AcquisitionMetadata

_SECTION = re.compile(r"^\[\s*(?P<key>[A-Za-z][A-Za-z0-9]*)\s*=\s*(?P<value>.*?)\s*\]$")
_KEYVAL = re.compile(r"^(?P<key>[A-Za-z_][A-Za-z0-9_.]*)\s*=\s*(?P<value>.*)$")
_DNUMBER = re.compile(r"\bD(\d{3,10})\b")


@dataclass(frozen=True)
class MdocFile:
    """The raw content of an mdoc.

    Attributes
    ----------
    titles
        Title texts (``T = ...`` lines, bracketed or not), in order.
    header
        Global ``key -> value`` lines before the first section.
    sections
        ``(section name, section value, key -> value)`` per section, in order.
    """

    titles: tuple[str, ...]
    header: dict[str, str]
    sections: tuple[tuple[str, str, dict[str, str]], ...]


def read_mdoc(path: str | Path) -> MdocFile:
    """Read an mdoc into titles, header and sections (values are stripped strings).

    Raises
    ------
    InputError
        Unreadable file, a line that is neither ``key = value`` nor a section, or no content.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise InputError(path, "not a text file (mdoc expected)") from None
    except OSError as exc:
        raise InputError(path, f"cannot read: {exc.strerror or exc}") from None
    titles: list[str] = []
    header: dict[str, str] = {}
    sections: list[tuple[str, str, dict[str, str]]] = []
    current = header
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        m = _SECTION.match(line)
        if m:
            if m["key"] == "T":
                titles.append(m["value"])
                continue
            current = {}
            sections.append((m["key"], m["value"], current))
            continue
        m = _KEYVAL.match(line)
        if not m:
            raise InputError(path, f"line {lineno} is not 'key = value' or '[section = value]': {line[:60]!r}")
        key, value = m["key"], m["value"].strip()
        if key == "T":
            titles.append(value)
            continue
        current[key] = value
    if not header and not sections:
        raise InputError(path, "no 'key = value' lines: not a SerialEM mdoc")
    return MdocFile(tuple(titles), header, tuple(sections))


def parse_mdoc(path: str | Path, movie: str | Path | None = None) -> AcquisitionMetadata:
    """Parse the exposure described by an mdoc.

    Parameters
    ----------
    path
        The ``.mdoc`` file.
    movie
        For an mdoc with several sections: the movie whose section (``SubFramePath`` basename)
        to take. Without it, the first section (or the header when there are none).

    Returns
    -------
    AcquisitionMetadata

    Raises
    ------
    InputError
        Malformed mdoc or value, or ``movie`` not named by any section.
    """
    path = Path(path)
    md = read_mdoc(path)
    values = dict(md.header)
    if md.sections:
        chosen = md.sections[0][2]
        if movie is not None:
            name = Path(movie).name
            for _, _, sec in md.sections:
                sub = sec.get("SubFramePath")
                if sub is not None and ntpath.basename(sub) == name:
                    chosen = sec
                    break
            else:
                raise InputError(path, f"no section of this mdoc has SubFramePath {name!r}")
        values.update(chosen)
    return _to_metadata(path, md.titles, values)


def parse_mdoc_sections(path: str | Path) -> list[AcquisitionMetadata]:
    """Every section of an mdoc as its own exposure (header values inherited)."""
    path = Path(path)
    md = read_mdoc(path)
    if not md.sections:
        return [_to_metadata(path, md.titles, dict(md.header))]
    return [_to_metadata(path, md.titles, {**md.header, **sec}) for _, _, sec in md.sections]


def _num(path: Path, values: dict[str, str], key: str) -> float | None:
    v = values.get(key)
    if v is None or v == "":
        return None
    try:
        return float(v.split()[0])
    except ValueError:
        raise InputError(path, f"{key} is not a number: {v!r}") from None


def _nums(path: Path, values: dict[str, str], key: str) -> list[float] | None:
    v = values.get(key)
    if v is None or v == "":
        return None
    try:
        return [float(t) for t in v.split()]
    except ValueError:
        raise InputError(path, f"{key} is not a list of numbers: {v!r}") from None


def _int(path: Path, values: dict[str, str], key: str) -> int | None:
    f = _num(path, values, key)
    if f is None:
        return None
    if f != int(f):
        raise InputError(path, f"{key} is not an integer: {values[key]!r}")
    return int(f)


def _timestamp(text: str | None) -> str | None:
    if not text:
        return None
    t = " ".join(text.split())
    for fmt in ("%d-%b-%y %H:%M:%S", "%d-%b-%Y %H:%M:%S", "%Y-%m-%d %H:%M:%S"):
        try:
            return datetime.strptime(t, fmt).isoformat()
        except ValueError:
            continue
    return None


def _to_metadata(path: Path, titles: tuple[str, ...], values: dict[str, str]) -> AcquisitionMetadata:
    warnings: list[str] = []
    scope_id = None
    scope_name = None
    for title in titles:
        if "SerialEM" not in title:
            continue
        m = _DNUMBER.search(title)
        if m:
            scope_id = m.group(1)
        on = re.search(r"Acquired on (.*?)(?:\s+D\d{3,10}\b|\s{2,}|$)", title)
        if on:
            scope_name = on.group(1).strip() or None
        break

    binning_raw = _num(path, values, "Binning")
    binning: int | None = None
    sr: int | None = None
    mode: str | None = None
    if binning_raw is not None:
        if binning_raw < 1:
            # SerialEM writes 0.5 for super-resolution frames of a K2/K3.
            sr = int(round(1 / binning_raw))
            binning = 1
            mode = SUPER_RESOLUTION
        else:
            binning = int(round(binning_raw))
            sr = 1
            mode = COUNTING  # SerialEM on a counting camera; linear mode is not recorded
    dose = _num(path, values, "ExposureDose")
    if dose is not None and dose <= 0:
        warnings.append("ExposureDose is 0 (dose not calibrated in SerialEM)")
        dose = None
    n_frames = _int(path, values, "NumSubFrames")
    dose_per_frame = None
    fdn = _nums(path, values, "FrameDosesAndNumber")
    if fdn and len(fdn) % 2 == 0 and any(d > 0 for d in fdn[0::2]):
        doses, counts = fdn[0::2], fdn[1::2]
        total = sum(d * n for d, n in zip(doses, counts, strict=True))
        if len(set(doses)) == 1:
            dose_per_frame = doses[0]
        if dose is None:
            dose = total
        elif abs(total - dose) > 0.02 * dose:
            warnings.append(f"FrameDosesAndNumber sums to {total:g} e/A^2 but ExposureDose is {dose:g}")
        if n_frames is None:
            n_frames = int(sum(counts))
    defocus_um = _num(path, values, "TargetDefocus")
    ishift = _nums(path, values, "ImageShift")
    slit = _nums(path, values, "FilterSlitAndLoss")
    pp = values.get("PhasePlateInserted")
    sub = values.get("SubFramePath")
    gain = values.get("GainReference")
    defects = values.get("DefectFile")
    movie_fmt = None
    if sub:
        ext = ntpath.splitext(sub)[1].lower()
        movie_fmt = {".tif": "tiff", ".tiff": "tiff", ".mrc": "mrc", ".eer": "eer"}.get(ext)
    size = _nums(path, values, "ImageSize")
    meta = AcquisitionMetadata(
        source=str(path),
        source_format="mdoc",
        software="SerialEM",
        software_version=values.get("Version"),
        movie=ntpath.basename(sub) if sub else None,
        timestamp=_timestamp(values.get("DateTime")),
        microscope_id=scope_id,
        microscope_name=scope_name,
        voltage_kv=_num(path, values, "Voltage"),
        cs_mm=_num(path, values, "Cs"),
        magnification=_int(path, values, "Magnification"),
        pixel_size_a=_num(path, values, "PixelSpacing"),
        binning=binning,
        super_resolution_factor=sr,
        detector_name=values.get("CameraName"),
        detector_mode=mode,
        movie_format=movie_fmt,
        image_width_px=int(size[0]) if size and len(size) == 2 else None,
        image_height_px=int(size[1]) if size and len(size) == 2 else None,
        exposure_time_s=_num(path, values, "ExposureTime"),
        n_frames=n_frames,
        total_dose_e_a2=dose,
        dose_per_frame_e_a2=dose_per_frame,
        target_defocus_a=None if defocus_um is None else -defocus_um * 1e4,
        phase_plate=None if pp is None else pp.strip().lower() in ("true", "1", "yes"),
        energy_filter_slit_inserted=None if not slit else slit[0] > 0,
        energy_filter_slit_width_ev=None if not slit or slit[0] <= 0 else slit[0],
        spot_size=_int(path, values, "SpotSize"),
        image_shift=(ishift[0], ishift[1]) if ishift and len(ishift) >= 2 else None,
        gain_reference=gain or None,
        defect_file=defects or None,
        optics_group_label=values.get("OpticalGroup") or None,
        warnings=tuple(warnings),
    )
    missing = [
        name
        for name, v in (
            ("pixel size", meta.pixel_size_a),
            ("voltage", meta.voltage_kv),
            ("dose", meta.total_dose_e_a2),
            ("number of frames", meta.n_frames),
        )
        if v is None
    ]
    if missing:
        meta = meta.with_warning("not recorded in the mdoc: " + ", ".join(missing))
    return meta.with_derived_units()
