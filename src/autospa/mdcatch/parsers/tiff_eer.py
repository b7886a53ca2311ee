"""TIFF movies (SerialEM/EPU Gatan frames) and EER movies (Falcon 4/4i) through tifffile.

Tags read from the first page (reference/mdcatch.md section 1.8): 256/257 (size), 259
(compression; 65000/65001/65002 are EER), 270 (ImageDescription), 282/296 (XResolution and its
unit), 306 (DateTime), 65001 (TFS EER metadata, an XML blob of ``<item name=...>`` elements); the
number of pages is the number of frames.

Fixes against MDCatch (reference/mdcatch.md section 1.8 and 1.12):
- bug 5: no hard-coded microscope ID (3593), detector (EF-CCD), voltage (300 kV), binning or Cs:
  what the file does not record stays ``None`` and is listed in a warning;
- the pixel size from XResolution: SerialEM (IMOD's tiff writer) stores ``2.54e8 / pixel size``
  pixels per inch, so pixel size (A) = ``2.54e8 / XResolution`` (``1e8 /`` for centimetres), with
  the full rational; MDCatch computed ``numerator / 2.54e8`` (the inverse, numerator only) and
  wrote 1.0 for an unknown unit;
- the size heuristics (super-resolution, Falcon from 4096x4096) are left to the detector presets
  (``mdcatch.detectors``), which know every camera's size instead of two hard-coded heights;
- the EER dose is kept in e/px until a pixel size is known (from the EPU XML), instead of being
  divided by a placeholder pixel size of 1.0.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from datetime import datetime
from pathlib import Path
from typing import Any

import tifffile

from autospa.errors import InputError
from autospa.mdcatch.metadata import COUNTING, AcquisitionMetadata

EER_COMPRESSIONS = (65000, 65001, 65002)
TAG_EER_METADATA = 65001
_RF = re.compile(r"r/f\s*(-?\d+)")


def read_tiff_tags(path: str | Path) -> tuple[dict[int, Any], int]:
    """First-page tags (code -> value) and the number of pages.

    Raises
    ------
    InputError
        Not a TIFF file.
    """
    path = Path(path)
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.pages:
                raise InputError(path, "TIFF file has no pages")
            page = tif.pages.first
            tags = {tag.code: tag.value for tag in page.tags}
            n = len(tif.pages)
    except InputError:
        raise
    except (tifffile.TiffFileError, ValueError, OSError, EOFError, IndexError, KeyError) as exc:
        raise InputError(path, f"not a readable TIFF/EER file ({exc})") from None
    return tags, n


def _resolution_pixel_a(res: Any, unit: Any) -> float | None:
    try:
        num, den = res
        ppu = float(num) / float(den)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if ppu <= 0:
        return None
    unit = int(unit)
    if unit == 2:  # inch
        return 2.54e8 / ppu
    if unit == 3:  # centimetre
        return 1e8 / ppu
    return None


def parse_eer_metadata(blob: bytes | str, path: Path) -> dict[str, str]:
    """The ``<item name="...">value</item>`` entries of the TFS EER metadata tag."""
    if isinstance(blob, bytes):
        blob = blob.decode("utf-8", "replace")
    try:
        root = ET.fromstring(blob.strip("\x00 \n"))
    except ET.ParseError as exc:
        raise InputError(path, f"EER metadata tag is not XML ({exc})") from None
    out: dict[str, str] = {}
    for item in root.iter():
        name = item.get("name")
        if name and item.text is not None:
            out[name] = item.text.strip()
    return out


def _f(path: Path, d: dict[str, str], key: str) -> float | None:
    v = d.get(key)
    if v is None or v == "":
        return None
    try:
        return float(v)
    except ValueError:
        raise InputError(path, f"EER metadata {key} is not a number: {v!r}") from None


def parse_tiff(path: str | Path) -> AcquisitionMetadata:
    """Parse a TIFF or EER movie.

    Parameters
    ----------
    path
        ``.tif``/``.tiff``/``.eer`` file.

    Returns
    -------
    AcquisitionMetadata
        ``source_format`` is ``eer`` for EER-compressed files, else ``tiff``.
    """
    path = Path(path)
    tags, n_pages = read_tiff_tags(path)
    warnings: list[str] = []
    width = int(tags[256]) if 256 in tags else None
    height = int(tags[257]) if 257 in tags else None
    compression = int(tags.get(259, 1))
    is_eer = compression in EER_COMPRESSIONS or TAG_EER_METADATA in tags
    pixel = None
    if 282 in tags and 296 in tags:
        pixel = _resolution_pixel_a(tags[282], tags[296])
    timestamp = None
    if 306 in tags:
        try:
            timestamp = datetime.strptime(str(tags[306]).strip("\x00 "), "%Y:%m:%d %H:%M:%S").isoformat()
        except ValueError:
            warnings.append(f"TIFF DateTime {tags[306]!r} is not 'YYYY:MM:DD HH:MM:SS'")

    gain = defects = None
    gain_rf = None
    desc = tags.get(270)
    if isinstance(desc, bytes):
        desc = desc.decode("latin-1", "replace")
    if isinstance(desc, str) and desc.strip():
        lines = desc.split("\n")
        m = _RF.search(lines[0])
        if m:  # SerialEM: "... r/f N" then the gain reference and the defect file names
            gain_rf = int(m.group(1))
            if len(lines) > 1 and lines[1].strip():
                gain = lines[1].strip()
            if len(lines) > 2 and lines[2].strip():
                defects = lines[2].strip()

    exposure = dose_px = None
    n_frames = n_pages
    detector = None
    if is_eer:
        blob = tags.get(TAG_EER_METADATA)
        eer: dict[str, str] = {}
        if blob is not None:
            eer = parse_eer_metadata(blob, path)
        else:
            warnings.append("EER file without its metadata tag (65001)")
        exposure = _f(path, eer, "exposureTime")
        dose_px = _f(path, eer, "totalDose")
        nf = _f(path, eer, "numberOfFrames")
        if nf is not None and int(nf) != n_pages:
            warnings.append(f"EER metadata says {int(nf)} frames but the file has {n_pages} pages")
        detector = eer.get("commercialName") or eer.get("cameraName") or None
        if eer.get("acquisitionDateTime"):
            try:
                timestamp = datetime.fromisoformat(eer["acquisitionDateTime"]).isoformat()
            except ValueError:
                pass
        if pixel is None:
            warnings.append("EER files record no specimen pixel size (take it from the EPU XML)")

    meta = AcquisitionMetadata(
        source=str(path),
        source_format="eer" if is_eer else "tiff",
        software="SerialEM" if gain_rf is not None else None,
        movie=str(path),
        timestamp=timestamp,
        pixel_size_a=pixel,
        detector_name=detector,
        detector_mode=COUNTING if is_eer else None,
        super_resolution_factor=1 if is_eer else None,
        movie_format="eer" if is_eer else "tiff",
        image_width_px=width,
        image_height_px=height,
        exposure_time_s=exposure,
        n_frames=n_frames,
        total_dose_e_px=dose_px,
        gain_reference=gain,
        defect_file=defects,
        gain_transform_serialem=gain_rf,
        warnings=tuple(warnings),
    )
    meta = meta.with_warning(
        f"{'EER' if is_eer else 'TIFF'} headers record no voltage, magnification or detector mode: "
        "take them from the movie's XML or mdoc"
    )
    return meta.with_derived_units()
