"""EPU ``FoilHole_*_Data_*.xml`` (a serialised ``Fei.SharedObjects.MicroscopeImage``).

Namespaces (as MDCatch's feixml.py names them): ``so`` Fei.SharedObjects (the default namespace of
the document), ``ar`` Serialization/Arrays (key/value lists), ``fr``
Fei.Applications.Common.Omp.Interface (fractionation settings), ``tp`` Fei.Types (x/y pairs) and
``dr`` System.Drawing (binning, readout area). Elements are found by their path of local names, so
a namespace prefix chosen differently by another EPU version does not matter; the root must be a
``MicroscopeImage``.

Fixes against MDCatch (reference/mdcatch.md section 1.12):
- missing keys are reported as warnings instead of being skipped silently;
- values are typed (no ``str`` conversion, ``PhasePlateUsed`` is a bool);
- the voltage is divided as a float (MDCatch: integer division);
- the phase-plate name and position are read whether or not an objective-aperture key exists
  (MDCatch bug 3: lost when ``Aperture[OBJ].Name`` is absent);
- EER frame counts are marked as estimates (``exposure x frame rate``, without MDCatch's empirical
  31/32 factor) so that the count from the EER file itself replaces them.
"""

from __future__ import annotations

import logging
import ntpath
import xml.etree.ElementTree as ET
from datetime import datetime
from pathlib import Path

from autospa.errors import InputError
from autospa.mdcatch.metadata import COUNTING, LINEAR, SUPER_RESOLUTION, AcquisitionMetadata

log = logging.getLogger(__name__)

NAMESPACES = {
    "so": "http://schemas.datacontract.org/2004/07/Fei.SharedObjects",
    "ar": "http://schemas.microsoft.com/2003/10/Serialization/Arrays",
    "fr": "http://schemas.datacontract.org/2004/07/Fei.Applications.Common.Omp.Interface",
    "tp": "http://schemas.datacontract.org/2004/07/Fei.Types",
    "dr": "http://schemas.datacontract.org/2004/07/System.Drawing",
    "i": "http://www.w3.org/2001/XMLSchema-instance",
}

_EER_DETECTORS = ("BM-Falcon", "EF-Falcon")


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child(elem: ET.Element | None, name: str) -> ET.Element | None:
    if elem is None:
        return None
    for c in elem:
        if _local(c.tag) == name:
            return c
    return None


def _path(elem: ET.Element | None, path: str) -> ET.Element | None:
    for part in path.split("/"):
        elem = _child(elem, part)
        if elem is None:
            return None
    return elem


def _is_nil(elem: ET.Element) -> bool:
    return elem.get(f"{{{NAMESPACES['i']}}}nil") == "true"


def _text(elem: ET.Element | None, path: str) -> str | None:
    e = _path(elem, path)
    if e is None or _is_nil(e) or e.text is None:
        return None
    t = e.text.strip()
    return t or None


def _key_values(elem: ET.Element | None) -> dict[str, ET.Element]:
    """``KeyValueOfstringanyType`` children of ``elem`` as key -> Value element."""
    out: dict[str, ET.Element] = {}
    if elem is None:
        return out
    for kv in elem:
        if _local(kv.tag) != "KeyValueOfstringanyType":
            continue
        key, value = _child(kv, "Key"), _child(kv, "Value")
        if key is not None and key.text and value is not None:
            out[key.text.strip()] = value
    return out


def _value_text(elem: ET.Element | None) -> str | None:
    if elem is None or _is_nil(elem) or elem.text is None:
        return None
    return elem.text.strip() or None


class _Reader:
    """Typed conversion with one InputError per unparsable value."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def float(self, text: str | None, what: str) -> float | None:
        if text is None:
            return None
        try:
            return float(text)
        except ValueError:
            raise InputError(self.path, f"{what} is not a number: {text!r}") from None

    def int(self, text: str | None, what: str) -> int | None:
        v = self.float(text, what)
        if v is None:
            return None
        if v != int(v):
            raise InputError(self.path, f"{what} is not an integer: {text!r}")
        return int(v)

    def bool(self, text: str | None, what: str) -> bool | None:
        if text is None:
            return None
        t = text.strip().lower()
        if t in ("true", "1"):
            return True
        if t in ("false", "0"):
            return False
        raise InputError(self.path, f"{what} is not true/false: {text!r}")

    def pair(self, elem: ET.Element | None, what: str) -> tuple[float, float] | None:
        if elem is None or _is_nil(elem):
            return None
        x, y = _value_text(_child(elem, "_x")), _value_text(_child(elem, "_y"))
        if x is None or y is None:
            return None
        fx, fy = self.float(x, what + " x"), self.float(y, what + " y")
        assert fx is not None and fy is not None
        return (fx, fy)


def parse_epu_xml(path: str | Path) -> AcquisitionMetadata:
    """Parse one EPU exposure XML.

    Parameters
    ----------
    path
        A ``FoilHole_*_Data_*.xml`` file.

    Returns
    -------
    AcquisitionMetadata
        Every field EPU records that MDCatch reads, plus acquisition time and readout area.

    Raises
    ------
    InputError
        The file cannot be read, is not XML, is not a MicroscopeImage, or holds a malformed value.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except OSError as exc:
        raise InputError(path, f"cannot read: {exc.strerror or exc}") from None
    except ET.ParseError as exc:
        raise InputError(path, f"not a well-formed XML file ({exc})") from None
    if _local(root.tag) != "MicroscopeImage":
        raise InputError(path, f"not an EPU MicroscopeImage XML (root element {_local(root.tag)!r})")
    rd = _Reader(path)
    warnings: list[str] = []
    md = _path(root, "microscopeData")
    if md is None:
        raise InputError(path, "no microscopeData element: not an EPU exposure XML")
    cam = _path(md, "acquisition/camera")

    exposure_s = rd.float(_text(cam, "ExposureTime"), "ExposureTime")
    detector = _text(cam, "Name")
    binning = rd.int(_text(cam, "Binning/x"), "Binning")
    width = rd.int(_text(cam, "ReadoutArea/width"), "ReadoutArea width")
    height = rd.int(_text(cam, "ReadoutArea/height"), "ReadoutArea height")

    # Camera-specific input: counting, super-resolution, fractionation.
    csi = _key_values(_child(cam, "CameraSpecificInput"))
    counting = rd.bool(_value_text(csi.get("ElectronCountingEnabled")), "ElectronCountingEnabled")
    sr = rd.int(_value_text(csi.get("SuperResolutionFactor")), "SuperResolutionFactor")
    mode: str | None = None
    if counting is True:
        mode = SUPER_RESOLUTION if (sr or 1) > 1 else COUNTING
    elif counting is False:
        mode = LINEAR
    n_frames: int | None = None
    frac = csi.get("FractionationSettings")
    if frac is not None:
        nfrac = _child(frac, "NumberOffractions")
        fractions = _child(frac, "DoseFractions")
        if nfrac is not None:  # equidistant fractionation (Gatan cameras)
            n_frames = rd.int(_value_text(nfrac), "NumberOffractions")
        elif fractions is not None:  # one element per (possibly uneven) fraction (Falcon)
            n_frames = len(list(fractions))
    if n_frames is None:
        fractions = None
        for v in csi.values():  # older files: DoseFractions directly under a Value
            fractions = _child(v, "DoseFractions")
            if fractions is not None:
                n_frames = len(list(fractions))
                break

    gun = _child(md, "gun")
    volt_v = rd.float(_text(gun, "AccelerationVoltage"), "AccelerationVoltage")
    optics = _child(md, "optics")
    beam_d_m = rd.float(_text(optics, "BeamDiameter"), "BeamDiameter")
    px_m = rd.float(_text(root, "SpatialScale/pixelSize/x/numericValue"), "pixelSize")
    pixel_a = None if px_m is None else px_m * 1e10 / (sr or 1)

    stamp = _text(md, "acquisition/acquisitionDateTime")
    timestamp = None
    if stamp is not None:
        try:
            timestamp = datetime.fromisoformat(stamp).isoformat()
        except ValueError:
            warnings.append(f"acquisitionDateTime {stamp!r} is not ISO 8601")

    # Root CustomData: dose, defocus, phase plate, apertures, EER gain and frame rate.
    custom_elems = _key_values(_child(root, "CustomData"))
    custom = {k: _value_text(v) for k, v in custom_elems.items()}
    dose_e_a2 = None
    if custom.get("Dose") is not None:
        d = rd.float(custom["Dose"], "Dose")
        assert d is not None
        dose_e_a2 = d * 1e-20  # e/m^2 -> e/A^2: total dose of the exposure
    elif custom.get("DoseOnCamera") is not None and px_m:
        # DoseOnCamera is the total dose per (physical, binned) pixel: Dose x pixel^2.
        doc = rd.float(custom["DoseOnCamera"], "DoseOnCamera")
        assert doc is not None
        dose_e_a2 = doc / (px_m * 1e10) ** 2
        warnings.append("no Dose in CustomData; total dose computed from DoseOnCamera")
    defocus_a = None
    if custom.get("AppliedDefocus") is not None:
        df = rd.float(custom["AppliedDefocus"], "AppliedDefocus")
        assert df is not None
        defocus_a = -df * 1e10  # EPU: metres, negative = underfocus; RELION: A, positive
    phase_plate = rd.bool(custom.get("PhasePlateUsed"), "PhasePlateUsed")
    pp_name = custom.get("PhasePlateApertureName")
    pp_pos = rd.int(custom.get("PhasePlatePosition"), "PhasePlatePosition")

    frame_rate = None
    gain_ref = None
    movie_format = None
    for det in _EER_DETECTORS:
        eer_gain = custom.get(f"Detectors[{det}].EerGainReference")
        if eer_gain is not None:
            gain_ref = ntpath.basename(eer_gain)
            movie_format = "eer"
            mode = COUNTING
            frame_rate = rd.float(custom.get(f"Detectors[{det}].FrameRate"), "FrameRate")
            break
        plain_gain = custom.get(f"Detectors[{det}].GainReference")
        if plain_gain is not None and gain_ref is None:
            gain_ref = ntpath.basename(plain_gain)
    frames_estimated = False
    if movie_format == "eer":
        if frame_rate is not None and exposure_s is not None:
            n_frames = int(round(exposure_s * frame_rate))
            frames_estimated = True
        else:
            n_frames = None
            warnings.append("EER exposure without FrameRate: frame count comes from the EER file")

    meta = AcquisitionMetadata(
        source=str(path),
        source_format="epu_xml",
        software=_text(md, "core/ApplicationSoftware") or "EPU",
        software_version=_text(md, "core/ApplicationSoftwareVersion"),
        timestamp=timestamp,
        microscope_id=_text(md, "instrument/InstrumentID"),
        microscope_name=_text(md, "instrument/InstrumentModel"),
        voltage_kv=None if volt_v is None else volt_v / 1000.0,
        magnification=rd.int(_text(optics, "TemMagnification/NominalMagnification"), "NominalMagnification"),
        pixel_size_a=pixel_a,
        binning=binning,
        super_resolution_factor=sr if sr is not None else (1 if counting is not None else None),
        detector_name=detector,
        detector_mode=mode,
        movie_format=movie_format,
        image_width_px=width,
        image_height_px=height,
        exposure_time_s=exposure_s,
        n_frames=n_frames,
        frames_estimated=frames_estimated,
        frame_rate_hz=frame_rate,
        total_dose_e_a2=dose_e_a2,
        target_defocus_a=defocus_a,
        phase_plate=phase_plate,
        phase_plate_name=pp_name,
        phase_plate_position=pp_pos,
        energy_filter_slit_inserted=rd.bool(
            _text(optics, "EnergyFilter/EnergySelectionSlitInserted"), "EnergySelectionSlitInserted"
        ),
        energy_filter_slit_width_ev=rd.float(
            _text(optics, "EnergyFilter/EnergySelectionSlitWidth"), "EnergySelectionSlitWidth"
        ),
        spot_size=rd.int(_text(optics, "SpotIndex"), "SpotIndex"),
        probe_mode=_text(optics, "ProbeMode"),
        beam_diameter_um=None if beam_d_m is None else beam_d_m * 1e6,
        gun_lens=_gun_lens(rd, _text(gun, "GunLens")),
        extractor_voltage_v=rd.float(_text(gun, "ExtractorVoltage"), "ExtractorVoltage"),
        beam_shift=rd.pair(_child(optics, "BeamShift"), "BeamShift"),
        beam_tilt=rd.pair(_child(optics, "BeamTilt"), "BeamTilt"),
        image_shift=rd.pair(_child(optics, "ImageShift"), "ImageShift"),
        c2_aperture=custom.get("Aperture[C2].Name"),
        objective_aperture=custom.get("Aperture[OBJ].Name"),
        gain_reference=gain_ref,
        warnings=tuple(warnings),
    )
    missing = [
        name
        for name, v in (
            ("pixel size", meta.pixel_size_a),
            ("voltage", meta.voltage_kv),
            ("dose", meta.total_dose_e_a2),
            ("exposure time", meta.exposure_time_s),
            ("number of frames", meta.n_frames if movie_format != "eer" else 0),
        )
        if v is None
    ]
    if missing:
        meta = meta.with_warning("not recorded in the XML: " + ", ".join(missing))
    return meta.with_derived_units()


def _gun_lens(rd: _Reader, text: str | None) -> int | None:
    # Old EPU versions write the string 'None'.
    if text is None or text == "None":
        return None
    return rd.int(text, "GunLens")
