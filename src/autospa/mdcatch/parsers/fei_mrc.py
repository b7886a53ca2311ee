"""MRC movies and sums: the FEI/TFS extended header (``FEI1``/``FEI2``) and plain MRC headers.

The FEI extended header (MRC-2014 FEI specification, metadata versions 0 and 2) holds one record
per section; the record layout is mrcfile's ``get_ext_header_dtype`` (FEI1: 768 bytes, FEI2: 888
bytes), read here directly so that a record padded beyond that size (``Metadata size`` larger than
the dtype) still reads: records are ``Metadata size`` bytes apart.

Fixes against MDCatch (reference/mdcatch.md section 1.12):
- bug 7: the frame count is the number of sections (``nz``), not a fixed 0, so the dose per frame
  is not 0;
- bug 5: the voltage is a float in kV (MDCatch: the string ``'300.0'``), Cs is left for the
  microscope table (no KeyError), nothing is hard-coded;
- the applied defocus is converted to RELION's sign and A;
- for a stack of dose fractions (every record flagged ``Is dose fraction``) the total dose is the
  sum of the records' doses (each record describes its own image); a single image or a stack
  without that flag uses record 0's dose, as MDCatch does.
"""

from __future__ import annotations

import math
import re
import warnings as _warnings
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np
from mrcfile.dtypes import get_ext_header_dtype

from autospa.errors import InputError
from autospa.mdcatch.metadata import COUNTING, LINEAR, AcquisitionMetadata

_RF = re.compile(r"r/f\s*(-?\d+)")


def _str(v: Any) -> str | None:
    if isinstance(v, bytes | np.bytes_):
        s = bytes(v).split(b"\x00", 1)[0].decode("latin-1").strip()
        return s or None
    return None


def _float(v: Any) -> float | None:
    f = float(v)
    return None if not math.isfinite(f) else f


def read_fei_records(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read an MRC's main header and its FEI extended-header records.

    Parameters
    ----------
    path
        An MRC file.

    Returns
    -------
    header, records
        ``header``: ``nx, ny, nz, mode, exttyp, voxel_size_a, labels``; ``records``: one dict per
        section (field name -> numpy scalar) when the extended header is FEI1/FEI2, else empty.

    Raises
    ------
    InputError
        Not an MRC file, or an FEI extended header that cannot be decoded.
    """
    path = Path(path)
    try:
        with _warnings.catch_warnings():
            _warnings.simplefilter("ignore")
            with mrcfile.open(path, header_only=True, permissive=True) as mrc:
                h = mrc.header
                if h is None or mrc.extended_header is None:
                    raise InputError(path, "not an MRC file (no valid header)")
                exttyp = bytes(h.exttyp).decode("latin-1", "replace").strip("\x00 ")
                try:
                    labels = [
                        bytes(lab).decode("latin-1").rstrip("\x00 ").strip()
                        for lab in h.label[: int(h.nlabl)]
                    ]
                except (TypeError, ValueError):
                    labels = []
                header = {
                    "nx": int(h.nx),
                    "ny": int(h.ny),
                    "nz": int(h.nz),
                    "mode": int(h.mode),
                    "exttyp": exttyp,
                    "voxel_size_a": float(mrc.voxel_size.x),
                    "labels": labels,
                }
                ext = np.asarray(mrc.extended_header).tobytes()
                byteorder = h.mode.dtype.byteorder
    except InputError:
        raise
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(path, f"not a readable MRC file ({exc})") from None
    if header["nx"] <= 0 or header["ny"] <= 0 or header["nz"] <= 0:
        raise InputError(path, f"MRC header has an invalid size {header['nx']}x{header['ny']}x{header['nz']}")
    records: list[dict[str, Any]] = []
    if exttyp in ("FEI1", "FEI2"):
        dtype = get_ext_header_dtype(exttyp.encode(), byteorder if byteorder in "<>" else "<")
        if len(ext) < dtype.itemsize:
            raise InputError(path, f"{exttyp} extended header is {len(ext)} bytes, shorter than one record ({dtype.itemsize})")
        first = np.frombuffer(ext[: dtype.itemsize], dtype=dtype)[0]
        stride = int(first["Metadata size"])
        if stride < dtype.itemsize:
            raise InputError(
                path, f"{exttyp} record 'Metadata size' is {stride} bytes, less than the {dtype.itemsize} of its layout"
            )
        n = min(header["nz"], len(ext) // stride)
        for i in range(n):
            rec = np.frombuffer(ext[i * stride : i * stride + dtype.itemsize], dtype=dtype)[0]
            records.append({name: rec[name] for name in dtype.names or ()})
    return header, records


def parse_mrc(path: str | Path) -> AcquisitionMetadata:
    """Parse an MRC movie or sum: FEI extended header when present, else the plain header.

    Parameters
    ----------
    path
        An ``.mrc``/``.mrcs`` file.

    Returns
    -------
    AcquisitionMetadata
        ``source_format`` is ``fei_mrc`` with an FEI header, else ``mrc``.
    """
    path = Path(path)
    header, records = read_fei_records(path)
    nz = header["nz"]
    warnings: list[str] = []
    gain_rf = None
    for lab in header["labels"]:
        m = _RF.search(lab)
        if m and "SerialEM" in lab:
            gain_rf = int(m.group(1))
    if not records:
        vs = header["voxel_size_a"]
        pixel = vs if vs > 0 else None
        if pixel is None:
            warnings.append("MRC header has no pixel size")
        elif pixel == 1.0:
            warnings.append("MRC header pixel size is 1.0 A, which may be a placeholder")
        meta = AcquisitionMetadata(
            source=str(path),
            source_format="mrc",
            software="SerialEM" if gain_rf is not None else None,
            movie=str(path),
            pixel_size_a=pixel,
            movie_format="mrc",
            image_width_px=header["nx"],
            image_height_px=header["ny"],
            n_frames=nz,
            gain_transform_serialem=gain_rf,
            warnings=tuple(warnings) + ("MRC header without FEI extended header: little metadata",),
        )
        return meta

    r0 = records[0]
    fractions = len(records) > 1 and all(bool(r["Is dose fraction"]) for r in records)
    if fractions:
        doses = [_float(r["Dose"]) for r in records]
        dose_m2 = None if any(d is None for d in doses) else float(sum(d for d in doses if d is not None))
    else:
        dose_m2 = _float(r0["Dose"])
    if dose_m2 is not None and dose_m2 <= 0:
        dose_m2 = None
    ht = _float(r0["HT"])
    px_m = _float(r0["Pixel size X"])
    defocus = _float(r0["Applied defocus"])
    counting = bool(r0["Direct detector electron counting"])
    exposure = _float(r0["Integration time"])
    mag = _float(r0["Magnification"])
    ill = _float(r0["Illuminated area"])
    slit_w = _float(r0["Slit width"])
    slit_in = bool(r0["Slit inserted"])
    bin_w = int(r0["Binning Width"])
    meta = AcquisitionMetadata(
        source=str(path),
        source_format="fei_mrc",
        software=_str(r0["Application"]),
        software_version=_str(r0["Application version"]),
        movie=str(path),
        microscope_id=_str(r0["D-Number"]),
        microscope_name=_str(r0["Microscope type"]),
        voltage_kv=None if not ht else ht / 1000.0,
        magnification=None if not mag else int(round(mag)),
        pixel_size_a=None if not px_m else px_m * 1e10,
        binning=bin_w if bin_w > 0 else None,
        super_resolution_factor=1,  # FEI cameras write no super-resolution movies
        detector_name=_str(r0["Camera name"]),
        detector_mode=COUNTING if counting else LINEAR,
        movie_format="mrc",
        image_width_px=header["nx"],
        image_height_px=header["ny"],
        exposure_time_s=exposure if exposure else None,
        n_frames=nz,
        total_dose_e_a2=None if dose_m2 is None else dose_m2 * 1e-20,
        target_defocus_a=None if defocus is None else -defocus * 1e10,
        phase_plate=bool(r0["Phase Plate"]),
        phase_plate_position=int(r0["Phase plate position index"]) if "Phase plate position index" in r0 else None,
        objective_aperture=_str(r0["Objective aperture name"]) if "Objective aperture name" in r0 else None,
        energy_filter_slit_inserted=slit_in,
        energy_filter_slit_width_ev=slit_w if slit_in and slit_w else None,
        spot_size=int(r0["Spot index"]),
        beam_diameter_um=None if not ill else ill * 1e6,
        beam_shift=(float(r0["Shift X"]), float(r0["Shift Y"])),
        image_shift=(float(r0["Shift offset X"]), float(r0["Shift offset Y"])),
        warnings=tuple(warnings),
    )
    if "Detector commercial name" in r0 and _str(r0["Detector commercial name"]):
        meta = meta.replace(detector_name=_str(r0["Detector commercial name"]))
    missing = [n for n, v in (("pixel size", meta.pixel_size_a), ("voltage", meta.voltage_kv),
                              ("dose", meta.total_dose_e_a2)) if v is None]
    if missing:
        meta = meta.with_warning("not recorded in the FEI header: " + ", ".join(missing))
    return meta.with_derived_units()
