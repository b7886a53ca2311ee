"""Test-fixture writers for the MDCatch tests, written from the formats' structure.

- EPU FoilHole exposure XML (``Fei.SharedObjects.MicroscopeImage``, namespaces so/ar/fr/tp/dr);
- SerialEM mdoc text (frame mdocs with an unbracketed title, session mdocs with sections);
- MRC with an FEI1/FEI2 extended header (numpy structured dtype from mrcfile's layout, one record
  per section, ``Metadata size`` = record size);
- TIFF movies as SerialEM writes them (XResolution = 2.54e8 / pixel size per inch, ImageDescription
  ``... r/f N`` / gain / defects);
- EER movies: a TIFF whose pages have compression 65001 and whose first page carries the TFS EER
  metadata XML in tag 65001 (the frame data are placeholders: only headers are read).
"""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import tifffile
from mrcfile.dtypes import get_ext_header_dtype

SO = "http://schemas.datacontract.org/2004/07/Fei.SharedObjects"
AR = "http://schemas.microsoft.com/2003/10/Serialization/Arrays"
FR = "http://schemas.datacontract.org/2004/07/Fei.Applications.Common.Omp.Interface"
TP = "http://schemas.datacontract.org/2004/07/Fei.Types"
DR = "http://schemas.datacontract.org/2004/07/System.Drawing"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
XSD = "http://www.w3.org/2001/XMLSchema"


def _kv(key: str, value: object, typ: str = "double") -> str:
    if isinstance(value, bool):
        value = "true" if value else "false"
    return (f'<a:KeyValueOfstringanyType><a:Key>{key}</a:Key><a:Value i:type="b:{typ}" xmlns:b="{XSD}">'
            f"{value}</a:Value></a:KeyValueOfstringanyType>")


def epu_xml(
    *,
    pixel_size_m: float = 1.06e-10,
    voltage_v: float = 300000,
    exposure_s: float = 2.5,
    detector: str = "EF-CCD",
    binning: int = 1,
    counting: bool | None = True,
    super_resolution: int = 1,
    n_fractions: int | None = 40,
    fraction_elements: int | None = None,
    dose_e_m2: float | None = 4.0e21,
    applied_defocus_m: float | None = -1.5e-6,
    eer_gain: str | None = None,
    frame_rate_hz: float | None = None,
    instrument_id: str = "3593",
    magnification: int = 105000,
    spot: int = 4,
    width: int = 5760,
    height: int = 4092,
    timestamp: str = "2021-06-14T08:31:05.1234567+00:00",
    phase_plate: bool | None = None,
    beam_shift: tuple[float, float] = (0.0, 0.0),
    slit_ev: float | None = 20.0,
) -> str:
    """The text of an EPU exposure XML with the given values."""
    custom = []
    if dose_e_m2 is not None:
        custom.append(_kv("Dose", repr(dose_e_m2)))
    if applied_defocus_m is not None:
        custom.append(_kv("AppliedDefocus", repr(applied_defocus_m)))
    if phase_plate is not None:
        custom.append(_kv("PhasePlateUsed", phase_plate, "boolean"))
    if eer_gain is not None:
        custom.append(_kv(f"Detectors[{detector}].EerGainReference", eer_gain, "string"))
        if frame_rate_hz is not None:
            custom.append(_kv(f"Detectors[{detector}].FrameRate", repr(frame_rate_hz)))
    csi = []
    if counting is not None:
        csi.append(_kv("ElectronCountingEnabled", counting, "boolean"))
        csi.append(_kv("SuperResolutionFactor", super_resolution, "int"))
    if n_fractions is not None:
        csi.append(f'<a:KeyValueOfstringanyType><a:Key>FractionationSettings</a:Key><a:Value i:type="b:EquidistantFractionation" '
                   f'xmlns:b="{FR}"><b:NumberOffractions>{n_fractions}</b:NumberOffractions></a:Value></a:KeyValueOfstringanyType>')
    elif fraction_elements is not None:
        fr = "".join(f"<b:DoseFraction><b:EndFrameNumber>{i}</b:EndFrameNumber><b:StartFrameNumber>{i}</b:StartFrameNumber></b:DoseFraction>"
                     for i in range(fraction_elements))
        csi.append(f'<a:KeyValueOfstringanyType><a:Key>FractionationSettings</a:Key><a:Value i:type="b:NumberOfFractionsFractionation" '
                   f'xmlns:b="{FR}"><b:DoseFractions>{fr}</b:DoseFractions></a:Value></a:KeyValueOfstringanyType>')
    slit = ""
    if slit_ev is not None:
        slit = (f"<EnergyFilter><EnergySelectionSlitInserted>true</EnergySelectionSlitInserted>"
                f"<EnergySelectionSlitWidth>{slit_ev:g}</EnergySelectionSlitWidth></EnergyFilter>")
    return f"""<?xml version="1.0" encoding="utf-8"?>
<MicroscopeImage xmlns="{SO}" xmlns:i="{XSI}">
<CustomData xmlns:a="{AR}">{''.join(custom)}</CustomData>
<SpatialScale><pixelSize><x><numericValue>{pixel_size_m!r}</numericValue></x><y><numericValue>{pixel_size_m!r}</numericValue></y></pixelSize></SpatialScale>
<microscopeData>
<acquisition><acquisitionDateTime>{timestamp}</acquisitionDateTime><camera>
<Binning xmlns:a="{DR}"><a:x>{binning}</a:x><a:y>{binning}</a:y></Binning>
<CameraSpecificInput xmlns:a="{AR}">{''.join(csi)}</CameraSpecificInput>
<ExposureTime>{exposure_s!r}</ExposureTime><Name>{detector}</Name>
<ReadoutArea xmlns:a="{DR}"><a:height>{height}</a:height><a:width>{width}</a:width><a:x>0</a:x><a:y>0</a:y></ReadoutArea>
</camera></acquisition>
<core><ApplicationSoftware>EPU</ApplicationSoftware><ApplicationSoftwareVersion>3.5.1</ApplicationSoftwareVersion></core>
<gun><AccelerationVoltage>{voltage_v!r}</AccelerationVoltage><ExtractorVoltage>4100</ExtractorVoltage><GunLens>3</GunLens></gun>
<instrument><InstrumentID>{instrument_id}</InstrumentID></instrument>
<optics><BeamDiameter>1E-06</BeamDiameter>
<BeamShift xmlns:a="{TP}"><a:_x>{beam_shift[0]!r}</a:_x><a:_y>{beam_shift[1]!r}</a:_y></BeamShift>
<BeamTilt xmlns:a="{TP}"><a:_x>0</a:_x><a:_y>0</a:_y></BeamTilt>{slit}
<ImageShift xmlns:a="{TP}"><a:_x>0</a:_x><a:_y>0</a:_y></ImageShift>
<ProbeMode>NanoProbe</ProbeMode><SpotIndex>{spot}</SpotIndex>
<TemMagnification><NominalMagnification>{magnification}</NominalMagnification></TemMagnification></optics>
</microscopeData>
</MicroscopeImage>
"""


def frame_mdoc(
    *,
    movie_name: str,
    pixel_a: float = 0.4175,
    binning: str = "0.5",
    dose: float = 52.5,
    n_frames: int = 50,
    magnification: int = 105000,
    voltage: int = 300,
    title_bracketed: bool = False,
    d_number: str | None = "3593",
    gain: str | None = "SuperRef_grid1.dm4",
    optical_group: str | None = None,
) -> str:
    """A SerialEM frame mdoc (``movie.tif.mdoc``)."""
    scope = f"Titan Krios D{d_number}" if d_number else "Titan Krios"
    title = f"T = SerialEM: Acquired on {scope}    14-Jun-21  09:12:44"
    if title_bracketed:
        title = f"[{title}]"
    lines = [title, f"Voltage = {voltage}", "", "[FrameSet = 0]", f"Magnification = {magnification}",
             f"ExposureDose = {dose!r}", f"PixelSpacing = {pixel_a!r}", "SpotSize = 5", "ExposureTime = 2",
             f"Binning = {binning}", "TargetDefocus = -1.8", f"SubFramePath = X:\\Data\\{movie_name}",
             f"NumSubFrames = {n_frames}", "DateTime = 14-Jun-21  09:12:44"]
    if gain:
        lines.append(f"GainReference = {gain}")
    if optical_group:
        lines.append(f"OpticalGroup = {optical_group}")
    return "\n".join(lines) + "\n\n"


def write_fei_mrc(
    path: str | Path,
    *,
    shape: tuple[int, int, int] = (4, 64, 64),
    version: int = 2,
    dose_e_m2: float = 8.0e20,
    fractions: bool = True,
    pixel_size_m: float = 1.1e-10,
    ht_v: float = 200000.0,
    counting: bool = True,
    camera: str = "BM-Falcon",
    d_number: str = "9952833",
    magnification: float = 92000.0,
    exposure_s: float = 1.0,
    applied_defocus_m: float = -2.0e-6,
    spot: int = 9,
    phase_plate: bool = False,
    slit: tuple[bool, float] = (False, 0.0),
    shift: tuple[float, float] = (0.1, -0.2),
    shift_offset: tuple[float, float] = (0.3, 0.4),
    pad_record_to: int | None = None,
    metadata_size: int | None = None,
) -> None:
    """An MRC with an FEI1 (version 1) or FEI2 (version 2) extended header; one record per section.

    ``dose_e_m2`` is each record's Dose (the fraction's dose when ``fractions``).
    """
    exttyp = b"FEI1" if version == 1 else b"FEI2"
    dt = get_ext_header_dtype(exttyp, "<")
    nz = shape[0]
    rec = np.zeros(nz, dtype=dt)
    stride = pad_record_to or dt.itemsize
    rec["Metadata size"] = dt.itemsize if metadata_size is None else metadata_size
    if pad_record_to is not None and metadata_size is None:
        rec["Metadata size"] = stride
    rec["Metadata version"] = 0 if version == 1 else 2
    rec["Bitmask 1"] = 0xFFFFFFFF
    rec["Microscope type"] = b"TITAN"
    rec["D-Number"] = d_number.encode()
    rec["Application"] = b"EPU"
    rec["Application version"] = b"2.9.0"
    rec["HT"] = ht_v
    rec["Dose"] = dose_e_m2
    rec["Pixel size X"] = pixel_size_m
    rec["Pixel size Y"] = pixel_size_m
    rec["Applied defocus"] = applied_defocus_m
    rec["Magnification"] = magnification
    rec["Spot index"] = spot
    rec["Illuminated area"] = 1.2e-6
    rec["Slit inserted"] = slit[0]
    rec["Slit width"] = slit[1]
    rec["Shift X"], rec["Shift Y"] = shift
    rec["Shift offset X"], rec["Shift offset Y"] = shift_offset
    rec["Integration time"] = exposure_s
    rec["Binning Width"] = 1
    rec["Binning Height"] = 1
    rec["Camera name"] = camera.encode()
    rec["Direct detector electron counting"] = counting
    rec["Phase Plate"] = phase_plate
    rec["Is dose fraction"] = fractions
    rec["Fraction number"] = np.arange(nz)
    if version == 2:
        rec["Phase plate position index"] = 7
        rec["Objective aperture name"] = b"OBJ 100"
    raw = bytearray(nz * stride)
    for i in range(nz):
        raw[i * stride : i * stride + dt.itemsize] = rec[i].tobytes()
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.zeros(shape, dtype=np.float16 if nz > 1 else np.float32))
        mrc.set_extended_header(np.frombuffer(bytes(raw), dtype="V1"))
        mrc.header.exttyp = exttyp
        mrc.voxel_size = pixel_size_m * 1e10


def write_plain_mrc(path: str | Path, data: np.ndarray, pixel_a: float = 0.0, label: str | None = None) -> None:
    """An MRC without extended header (SerialEM-style movie when ``label`` has ``r/f``)."""
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.asarray(data))
        mrc.voxel_size = pixel_a
        if label:
            mrc.header.label[0] = label.encode()
            mrc.header.nlabl = 1


def write_serialem_tiff(
    path: str | Path,
    frames: np.ndarray,
    *,
    pixel_a: float | None = 0.835,
    rf: int | None = 0,
    gain: str | None = "CountRef_grid1.dm4",
    defects: str | None = "defects_grid1.txt",
    datetime: str | None = "2022:02:01 10:00:12",
) -> None:
    """A multi-page TIFF as SerialEM writes frames (resolution in pixels per inch = 2.54e8 / A)."""
    desc = None
    if rf is not None:
        desc = "\n".join([f"SerialEMCCD: Dose frac. image, r/f {rf}", gain or "", defects or ""])
    kw: dict = {"photometric": "minisblack", "metadata": None}
    if pixel_a is not None:
        ppi = round(2.54e8 / pixel_a)
        kw["resolution"] = ((ppi, 1), (ppi, 1))
        kw["resolutionunit"] = 2
    if desc is not None:
        kw["description"] = desc
    if datetime is not None:
        kw["datetime"] = datetime
    tifffile.imwrite(path, np.asarray(frames), **kw)


def write_eer(
    path: str | Path,
    *,
    n_frames: int = 12,
    size: int = 64,
    items: dict[str, str] | None = None,
    metadata: bool = True,
) -> None:
    """An EER-like TIFF: ``n_frames`` pages with compression 65001 and the EER metadata XML in tag
    65001 of the first page (page data are placeholders)."""
    items = items if items is not None else {"exposureTime": "4.5", "totalDose": "27.556", "numberOfFrames": str(n_frames)}
    xml = "<metadata>" + "".join(f'<item name="{k}">{v}</item>' for k, v in items.items()) + "</metadata>"
    extratags = [(65001, "B", len(xml), xml.encode(), True)] if metadata else []
    tifffile.imwrite(path, np.zeros((n_frames, size, size), np.uint8), photometric="minisblack", metadata=None,
                     extratags=extratags)
    with tifffile.TiffFile(path, mode="r+b") as tif:
        for page in tif.pages:
            page.tags[259].overwrite(65001)
