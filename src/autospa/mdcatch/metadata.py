"""The typed acquisition metadata of one movie, with explicit units (L3).

MDCatch keeps every value as a string in a dict; here every field has a type and its unit in its
name, and ``None`` means "not recorded". One :class:`AcquisitionMetadata` comes from each parsed
file; :func:`merge` combines the metadata file of a movie (EPU XML, SerialEM mdoc) with the movie's
own header (frame count, image size).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

#: Detector modes.
COUNTING = "counting"
SUPER_RESOLUTION = "super-resolution"
LINEAR = "linear"
DETECTOR_MODES = (COUNTING, SUPER_RESOLUTION, LINEAR)

#: Fields whose value is taken from the movie file rather than from the metadata file when both
#: have one: the movie is what will actually be processed.
MOVIE_AUTHORITATIVE = ("n_frames", "image_width_px", "image_height_px", "movie_format")

_PAIR_FIELDS = ("beam_shift", "beam_tilt", "image_shift")


@dataclass(frozen=True)
class AcquisitionMetadata:
    """Everything recorded about one exposure, in explicit units.

    Attributes
    ----------
    source
        Path of the file these values were parsed from (several, ``;``-joined, after a merge).
    source_format
        ``epu_xml``, ``mdoc``, ``fei_mrc``, ``mrc``, ``tiff`` or ``eer`` (``+``-joined after a merge).
    software, software_version
        Acquisition software (``EPU``, ``SerialEM``) and its version.
    movie
        The movie file this metadata describes, when known.
    timestamp
        Acquisition time, ISO 8601.
    microscope_id, microscope_name
        Instrument ID (EPU InstrumentID, SerialEM/FEI D-number) and a name for it.
    voltage_kv, cs_mm
        Acceleration voltage (kV) and spherical aberration (mm).
    magnification
        Nominal magnification.
    pixel_size_a
        Pixel size of the movie as saved (A): the super-resolution pixel in super-resolution mode.
    binning
        Camera binning of physical pixels (1 = unbinned; super-resolution is not binning).
    super_resolution_factor
        2 for super-resolution movies, 1 otherwise.
    detector_name
        The camera as the metadata names it (``EF-CCD``, ``BM-Falcon``, ``Falcon 4i`` ...).
    detector_model
        The detector preset it resolves to (``K3``, ``Falcon4i`` ...), see ``mdcatch.detectors``.
    detector_mode
        ``counting``, ``super-resolution`` or ``linear``.
    movie_format
        ``mrc``, ``tiff`` or ``eer``.
    image_width_px, image_height_px
        Frame size of the movie (x, y) in movie pixels.
    exposure_time_s
        Exposure time (s).
    n_frames
        Frames stored in the movie (fractions for EPU MRC/TIFF, raw EER frames for EER).
    frames_estimated
        True when ``n_frames`` was estimated (EER: exposure time x frame rate), not counted.
    frame_rate_hz
        Internal camera frame rate (EER frames per second).
    total_dose_e_a2
        Total dose of the exposure (e/A^2).
    total_dose_e_px
        Total dose per movie pixel (e/px), as EER headers record it.
    dose_per_frame_e_a2
        Dose per frame when the file records it directly (SerialEM FrameDosesAndNumber).
    target_defocus_a
        Target (applied) defocus in A, RELION's sign: positive = underfocus.
    phase_plate, phase_plate_name, phase_plate_position
        Phase plate in use, its aperture name and position index.
    energy_filter_slit_inserted, energy_filter_slit_width_ev
        Energy-filter slit state and width (eV).
    spot_size, probe_mode, beam_diameter_um, gun_lens, extractor_voltage_v
        Illumination settings.
    beam_shift, beam_tilt, image_shift
        (x, y) in the instrument's units (EPU/TEM server: dimensionless; SerialEM: microns).
    c2_aperture, objective_aperture
        Aperture names.
    gain_reference, defect_file
        Gain reference and defect file named by the metadata (as written, possibly a Windows path).
    gain_transform_serialem
        SerialEM's rotation/flip code (``r/f`` in TIFF/MRC headers) of the frames relative to the
        gain reference: 0-3 rotate by 90 deg x code, 4-7 flip then rotate (SerialEM convention).
    optics_group_label
        An optics-group label recorded by the acquisition software (SerialEM ``OpticalGroup``).
    warnings
        Problems met while parsing (missing or inconsistent values).
    """

    source: str
    source_format: str
    software: str | None = None
    software_version: str | None = None
    movie: str | None = None
    timestamp: str | None = None
    microscope_id: str | None = None
    microscope_name: str | None = None
    voltage_kv: float | None = None
    cs_mm: float | None = None
    magnification: int | None = None
    pixel_size_a: float | None = None
    binning: int | None = None
    super_resolution_factor: int | None = None
    detector_name: str | None = None
    detector_model: str | None = None
    detector_mode: str | None = None
    movie_format: str | None = None
    image_width_px: int | None = None
    image_height_px: int | None = None
    exposure_time_s: float | None = None
    n_frames: int | None = None
    frames_estimated: bool = False
    frame_rate_hz: float | None = None
    total_dose_e_a2: float | None = None
    total_dose_e_px: float | None = None
    dose_per_frame_e_a2: float | None = None
    target_defocus_a: float | None = None
    phase_plate: bool | None = None
    phase_plate_name: str | None = None
    phase_plate_position: int | None = None
    energy_filter_slit_inserted: bool | None = None
    energy_filter_slit_width_ev: float | None = None
    spot_size: int | None = None
    probe_mode: str | None = None
    beam_diameter_um: float | None = None
    gun_lens: int | None = None
    extractor_voltage_v: float | None = None
    beam_shift: tuple[float, float] | None = None
    beam_tilt: tuple[float, float] | None = None
    image_shift: tuple[float, float] | None = None
    c2_aperture: str | None = None
    objective_aperture: str | None = None
    gain_reference: str | None = None
    defect_file: str | None = None
    gain_transform_serialem: int | None = None
    optics_group_label: str | None = None
    warnings: tuple[str, ...] = field(default=())

    # ------------------------------------------------------------------ conversions
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists); :meth:`from_dict` inverts it exactly."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AcquisitionMetadata:
        """Rebuild from :meth:`to_dict` output (unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        kw: dict[str, Any] = {}
        for k, v in data.items():
            if k not in names:
                continue
            if k in _PAIR_FIELDS and v is not None:
                v = (float(v[0]), float(v[1]))
            elif k == "warnings":
                v = tuple(v or ())
            kw[k] = v
        return cls(**kw)

    def replace(self, **changes: Any) -> AcquisitionMetadata:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def with_warning(self, message: str) -> AcquisitionMetadata:
        """A copy with one more warning (duplicates are dropped)."""
        if message in self.warnings:
            return self
        return dataclasses.replace(self, warnings=self.warnings + (message,))

    @property
    def physical_pixel_size_a(self) -> float | None:
        """Pixel size of one physical (counting) detector pixel at the recorded binning (A)."""
        if self.pixel_size_a is None:
            return None
        return self.pixel_size_a * (self.super_resolution_factor or 1)

    def with_derived_units(self) -> AcquisitionMetadata:
        """Fill values that follow from others: e/A^2 from e/px and the pixel size, and back."""
        m = self
        px = m.pixel_size_a
        if m.total_dose_e_a2 is None and m.total_dose_e_px is not None and px:
            m = m.replace(total_dose_e_a2=m.total_dose_e_px / px**2)
        elif m.total_dose_e_px is None and m.total_dose_e_a2 is not None and px:
            m = m.replace(total_dose_e_px=m.total_dose_e_a2 * px**2)
        return m


def merge(primary: AcquisitionMetadata, secondary: AcquisitionMetadata) -> AcquisitionMetadata:
    """Combine two descriptions of the same exposure.

    ``primary`` (normally the metadata file: EPU XML or mdoc) wins for every field that it has,
    except the fields in :data:`MOVIE_AUTHORITATIVE` (frame count, image size, movie format), for
    which ``secondary`` (normally the movie header) wins when it has a counted value. Missing values
    are filled from the other side; warnings are concatenated.

    Parameters
    ----------
    primary, secondary
        The two descriptions.

    Returns
    -------
    AcquisitionMetadata
        The merged description, with ``source`` and ``source_format`` of both.
    """
    kw: dict[str, Any] = {}
    for f in fields(AcquisitionMetadata):
        name = f.name
        a, b = getattr(primary, name), getattr(secondary, name)
        if name == "source":
            kw[name] = a if a == b else f"{a};{b}"
        elif name == "source_format":
            kw[name] = a if a == b else f"{a}+{b}"
        elif name == "warnings":
            kw[name] = a + tuple(w for w in b if w not in a)
        elif name == "frames_estimated":
            continue
        elif name == "n_frames":
            if b is not None and (a is None or not secondary.frames_estimated):
                kw[name] = b
                kw["frames_estimated"] = secondary.frames_estimated
            else:
                kw[name] = a
                kw["frames_estimated"] = primary.frames_estimated
        elif name in MOVIE_AUTHORITATIVE:
            kw[name] = b if b is not None else a
        else:
            kw[name] = a if a is not None else b
    return AcquisitionMetadata(**kw).with_derived_units()


def is_close(a: float | None, b: float | None, rel: float) -> bool:
    """True when both are None, or both are numbers within relative tolerance ``rel``."""
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=rel, abs_tol=0.0)
