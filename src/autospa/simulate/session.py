"""A whole simulated acquisition session: movies, EPU / SerialEM metadata beside them, and truth.

Layout written by :func:`simulate_session` (paths relative to ``outdir``)::

    EPU:       Images-Disc1/GridSquare_<g>/Data/FoilHole_<h>_Data_<a>_<b>_<date>_<time>.xml
               Images-Disc1/GridSquare_<g>/Data/FoilHole_<h>_Data_<a>_<b>_<date>_<time>_fractions.mrc
    SerialEM:  Movies/<prefix>_<nnnnn>.mrc  and  Movies/<prefix>_<nnnnn>.mrc.mdoc
    gain.mrc                                  gain reference (multiply the raw frames by it), if any
    truth/micrographs.star                    data_optics + data_micrographs: one row per movie
                                              (movie name, CTF, ice, accumulated motion, files below)
    truth/particles.star                      data_optics + data_particles: every particle
                                              (rlnMicrographMovieName, coordinates, pose, class, CTF)
    truth/motion/<stem>.star                  RELION motion metadata: data_general, data_global_shift
                                              (rlnMicrographShiftX/Y = minus the specimen drift),
                                              data_local_shift (local part on a 5 x 5 patch grid)
    truth/coordinates/<stem>_truth.star       coordinates of that micrograph's particles
    truth/Micrographs/<stem>_clean.mrc        noise-free drift-free sum (expected electrons per
                                              pixel over the exposure, frame-1 geometry)

Movies are MRC mode 12 (float16, exact for counts up to 2048): Poisson electron counts per frame,
divided by the gain (recorded = Poisson(expected / gain)) when a gain reference is written.
The EPU XML and the mdoc carry the values the MDCatch parsers read (pixel size, voltage, total
dose, frames, exposure time, defocus, detector, readout area, timestamp).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from autospa.errors import InputError
from autospa.io.atomic import write_text
from autospa.io.mrc import write_mrc
from autospa.io.preprocess_files import write_coordinates, write_motion_metadata, write_particles_star
from autospa.io.star import write_star
from autospa.simulate.micrographs import simulate_micrograph
from autospa.simulate.movies import simulate_gain_reference, simulate_movie

log = logging.getLogger(__name__)

SOFTWARE = ("EPU", "SerialEM")

_SO = "http://schemas.datacontract.org/2004/07/Fei.SharedObjects"
_AR = "http://schemas.microsoft.com/2003/10/Serialization/Arrays"
_FR = "http://schemas.datacontract.org/2004/07/Fei.Applications.Common.Omp.Interface"
_TP = "http://schemas.datacontract.org/2004/07/Fei.Types"
_DR = "http://schemas.datacontract.org/2004/07/System.Drawing"
_XSI = "http://www.w3.org/2001/XMLSchema-instance"
_XSD = "http://www.w3.org/2001/XMLSchema"


def _kv(key: str, value: object, typ: str = "double") -> str:
    if isinstance(value, bool):
        value = "true" if value else "false"
    return (
        f'<a:KeyValueOfstringanyType><a:Key>{key}</a:Key><a:Value i:type="b:{typ}" xmlns:b="{_XSD}">'
        f"{value}</a:Value></a:KeyValueOfstringanyType>"
    )


def epu_xml_text(
    *,
    pixel_size_a: float,
    voltage_kv: float,
    total_dose_e_a2: float,
    n_frames: int,
    exposure_s: float,
    defocus_a: float,
    width: int,
    height: int,
    timestamp: datetime,
    detector: str = "EF-CCD",
    magnification: int = 105000,
    spot: int = 5,
    slit_ev: float | None = 20.0,
) -> str:
    """The text of an EPU exposure XML (``Fei.SharedObjects.MicroscopeImage``).

    Units as EPU writes them: pixel size in metres, voltage in volts, total dose in e/m^2,
    ``AppliedDefocus`` in metres (negative = underfocus), equidistant fractionation into
    ``n_frames``, counting mode, binning 1.
    """
    custom = _kv("Dose", repr(total_dose_e_a2 * 1e20)) + _kv("AppliedDefocus", repr(-defocus_a * 1e-10))
    csi = (
        _kv("ElectronCountingEnabled", True, "boolean")
        + _kv("SuperResolutionFactor", 1, "int")
        + f'<a:KeyValueOfstringanyType><a:Key>FractionationSettings</a:Key><a:Value i:type="b:EquidistantFractionation" '
        f'xmlns:b="{_FR}"><b:NumberOffractions>{int(n_frames)}</b:NumberOffractions></a:Value></a:KeyValueOfstringanyType>'
    )
    slit = ""
    if slit_ev is not None:
        slit = (
            f"<EnergyFilter><EnergySelectionSlitInserted>true</EnergySelectionSlitInserted>"
            f"<EnergySelectionSlitWidth>{slit_ev:g}</EnergySelectionSlitWidth></EnergyFilter>"
        )
    px_m = pixel_size_a * 1e-10
    return f"""<?xml version="1.0" encoding="utf-8"?>
<MicroscopeImage xmlns="{_SO}" xmlns:i="{_XSI}">
<CustomData xmlns:a="{_AR}">{custom}</CustomData>
<SpatialScale><pixelSize><x><numericValue>{px_m!r}</numericValue></x><y><numericValue>{px_m!r}</numericValue></y></pixelSize></SpatialScale>
<microscopeData>
<acquisition><acquisitionDateTime>{timestamp.isoformat()}</acquisitionDateTime><camera>
<Binning xmlns:a="{_DR}"><a:x>1</a:x><a:y>1</a:y></Binning>
<CameraSpecificInput xmlns:a="{_AR}">{csi}</CameraSpecificInput>
<ExposureTime>{exposure_s!r}</ExposureTime><Name>{detector}</Name>
<ReadoutArea xmlns:a="{_DR}"><a:height>{int(height)}</a:height><a:width>{int(width)}</a:width><a:x>0</a:x><a:y>0</a:y></ReadoutArea>
</camera></acquisition>
<core><ApplicationSoftware>EPU</ApplicationSoftware><ApplicationSoftwareVersion>3.5.1</ApplicationSoftwareVersion></core>
<gun><AccelerationVoltage>{voltage_kv * 1000.0!r}</AccelerationVoltage><ExtractorVoltage>4100</ExtractorVoltage><GunLens>3</GunLens></gun>
<instrument><InstrumentID>autospa-sim</InstrumentID></instrument>
<optics><BeamDiameter>1E-06</BeamDiameter>
<BeamShift xmlns:a="{_TP}"><a:_x>0</a:_x><a:_y>0</a:_y></BeamShift>
<BeamTilt xmlns:a="{_TP}"><a:_x>0</a:_x><a:_y>0</a:_y></BeamTilt>{slit}
<ImageShift xmlns:a="{_TP}"><a:_x>0</a:_x><a:_y>0</a:_y></ImageShift>
<ProbeMode>NanoProbe</ProbeMode><SpotIndex>{int(spot)}</SpotIndex>
<TemMagnification><NominalMagnification>{int(magnification)}</NominalMagnification></TemMagnification></optics>
</microscopeData>
</MicroscopeImage>
"""


def mdoc_text(
    *,
    movie_name: str,
    pixel_size_a: float,
    voltage_kv: float,
    total_dose_e_a2: float,
    n_frames: int,
    exposure_s: float,
    defocus_a: float,
    timestamp: datetime,
    gain_name: str | None = None,
    cs_mm: float | None = None,
    magnification: int = 105000,
    spot: int = 5,
) -> str:
    """The text of a SerialEM frame mdoc (``movie.mrc.mdoc``): an unbracketed title, a global
    ``Voltage`` and one ``[FrameSet = 0]`` section (``TargetDefocus`` in micrometres, negative =
    underfocus; ``ExposureDose`` = total dose in e/A^2)."""
    stamp = timestamp.strftime("%d-%b-%y  %H:%M:%S")
    lines = [
        f"T = SerialEM: Acquired on autospa simulator    {stamp}",
        f"Voltage = {voltage_kv:g}",
        "",
        "[FrameSet = 0]",
        f"Magnification = {int(magnification)}",
        f"ExposureDose = {total_dose_e_a2!r}",
        f"PixelSpacing = {pixel_size_a!r}",
        f"SpotSize = {int(spot)}",
        f"ExposureTime = {exposure_s!r}",
        "Binning = 1",
        f"TargetDefocus = {-defocus_a * 1e-4!r}",
        f"SubFramePath = X:\\Data\\{movie_name}",
        f"NumSubFrames = {int(n_frames)}",
        f"DateTime = {stamp}",
    ]
    if gain_name:
        lines.append(f"GainReference = {gain_name}")
    if cs_mm is not None:
        lines.append(f"Cs = {cs_mm:g}")
    return "\n".join(lines) + "\n\n"


@dataclass(frozen=True)
class SessionFiles:
    """What :func:`simulate_session` wrote.

    Attributes
    ----------
    outdir
        The session folder.
    movies
        Movie files, in acquisition order.
    metadata
        The XML or mdoc beside each movie.
    gain
        The gain reference, or None.
    micrographs_star, particles_star
        Truth tables.
    mdcatch_config
        ``truth/mdcatch_site.toml``: the simulated microscope (ID ``autospa-sim``) and its Cs for
        MDCatch (``autospa mdcatch watch OUT --config OUT/truth/mdcatch_site.toml``); EPU XML does
        not record Cs, so without it the watcher cannot write movies.star.
    motion_stars, coordinate_stars, clean_micrographs
        Per-movie truth files.
    """

    outdir: Path
    movies: list[Path]
    metadata: list[Path]
    gain: Path | None
    micrographs_star: Path
    particles_star: Path
    mdcatch_config: Path | None = None
    motion_stars: list[Path] = field(default_factory=list)
    coordinate_stars: list[Path] = field(default_factory=list)
    clean_micrographs: list[Path] = field(default_factory=list)


def simulate_session(
    outdir: str | Path,
    volumes: Sequence[torch.Tensor],
    n_movies: int = 4,
    software: str = "EPU",
    shape: tuple[int, int] = (256, 256),
    n_frames: int = 8,
    pixel_size_a: float = 1.0,
    dose_per_frame_e_a2: float = 1.0,
    particles_per_micrograph: int = 20,
    seed: int = 0,
    gain: bool = True,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.1,
    global_drift_px: float = 3.0,
    local_drift_px: float = 0.8,
    exposure_s: float = 2.0,
    prefix: str = "grid1",
    **micrograph_kwargs,
) -> SessionFiles:
    """Simulate ``n_movies`` exposures and write them as an EPU or SerialEM session (module doc).

    Parameters
    ----------
    outdir
        Session folder (created).
    volumes
        Structures ``(d, d, d)`` at ``pixel_size_a``.
    n_movies
        Number of exposures.
    software
        ``"EPU"`` or ``"SerialEM"``: which metadata and naming to write.
    shape
        ``(h, w)`` of the frames.
    n_frames
        Frames per movie.
    pixel_size_a
        Pixel size in Angstrom.
    dose_per_frame_e_a2
        Electrons per square Angstrom per frame.
    particles_per_micrograph
        Particles placed on each micrograph.
    seed
        Seed; movie ``i`` uses ``seed * 1000 + i``.
    gain
        Write a gain reference and record gain-divided counts.
    voltage_kv, cs_mm, amplitude_contrast
        Optics.
    global_drift_px, local_drift_px
        Size of the beam-induced motion (:func:`autospa.simulate.movies.simulate_drift`).
    exposure_s
        Exposure time written to the metadata.
    prefix
        SerialEM movie name prefix.
    **micrograph_kwargs
        Passed to :func:`autospa.simulate.micrographs.simulate_micrograph` (defocus range,
        ice thickness, contrast ...).

    Returns
    -------
    SessionFiles
    """
    if software not in SOFTWARE:
        raise InputError(None, f"unknown acquisition software {software!r} (choose {' or '.join(SOFTWARE)})")
    if n_movies < 1:
        raise InputError(None, f"a session needs at least one movie (got {n_movies})")
    outdir = Path(outdir)
    h, w = (int(v) for v in shape)
    margin = int(math.ceil(global_drift_px + 2 * local_drift_px)) + 4
    gain_map = simulate_gain_reference((h, w), seed=seed) if gain else None
    gain_path = write_mrc(outdir / "gain.mrc", gain_map.numpy(), pixel_size_a, mode=2) if gain_map is not None else None
    t0 = datetime(2026, 1, 1, 9, 0, 0, tzinfo=timezone.utc)
    total_dose = dose_per_frame_e_a2 * n_frames
    movies, metas, motion_stars, coord_stars, cleans = [], [], [], [], []
    mic_rows, part_rows = [], []
    for i in range(n_movies):
        s = seed * 1000 + i
        mic = simulate_micrograph(
            volumes, (h, w), pixel_size_a, particles_per_micrograph, seed=s, margin_px=margin,
            voltage_kv=voltage_kv, cs_mm=cs_mm, amplitude_contrast=amplitude_contrast, **micrograph_kwargs,
        )  # fmt: skip
        movie = simulate_movie(
            mic.intensity, margin, n_frames, dose_per_frame_e_a2, pixel_size_a, seed=s,
            global_px=global_drift_px, local_px=local_drift_px, gain=gain_map,
        )  # fmt: skip
        stamp = t0 + timedelta(seconds=75 * i)
        defocus_mean = 0.5 * (mic.defocus_u_a + mic.defocus_v_a)
        if software == "EPU":
            square, hole = 1000 + i // 4, 2000 + i
            stem = f"FoilHole_{hole}_Data_{3000 + i}_{4000 + i}_{stamp:%Y%m%d}_{stamp:%H%M%S}"
            folder = outdir / "Images-Disc1" / f"GridSquare_{square}" / "Data"
            movie_path = folder / f"{stem}_fractions.mrc"
            meta_path = folder / f"{stem}.xml"
            text = epu_xml_text(
                pixel_size_a=pixel_size_a, voltage_kv=voltage_kv, total_dose_e_a2=total_dose, n_frames=n_frames,
                exposure_s=exposure_s, defocus_a=defocus_mean, width=w, height=h, timestamp=stamp,
            )  # fmt: skip
        else:
            stem = f"{prefix}_{i + 1:05d}"
            movie_path = outdir / "Movies" / f"{stem}.mrc"
            meta_path = outdir / "Movies" / f"{stem}.mrc.mdoc"
            text = mdoc_text(
                movie_name=movie_path.name, pixel_size_a=pixel_size_a, voltage_kv=voltage_kv,
                total_dose_e_a2=total_dose, n_frames=n_frames, exposure_s=exposure_s, defocus_a=defocus_mean,
                timestamp=stamp, gain_name=None if gain_path is None else gain_path.name, cs_mm=cs_mm,
            )  # fmt: skip
        frames = movie.frames.cpu().numpy()
        if frames.max() > 2048:
            raise InputError(None, f"{frames.max():.0f} electrons in one pixel of a frame do not fit float16 exactly; lower the dose")
        write_mrc(movie_path, frames, pixel_size_a, mode=12, stack=False)
        write_text(meta_path, text)
        rel_movie = movie_path.relative_to(outdir).as_posix()
        # ---- truth
        drift = movie.drift
        g = drift.global_shift_table()
        loc = drift.local_shift_table((5, 5))
        centres = loc[loc.rlnMicrographFrameNumber == 1][["rlnMicrographCoordinateX", "rlnMicrographCoordinateY"]].to_numpy()
        patch = np.stack([loc["rlnMicrographShiftX"].to_numpy(), loc["rlnMicrographShiftY"].to_numpy()], -1)
        patch = patch.reshape(n_frames, 25, 2).transpose(1, 0, 2).reshape(5, 5, n_frames, 2)
        motion = write_motion_metadata(
            outdir / "truth" / "motion" / f"{stem}.star",
            image_size=(w, h, n_frames), movie_name=rel_movie,
            gain_name=None if gain_path is None else gain_path.name, binning=1.0,
            original_pixel_size_a=pixel_size_a, dose_per_frame=dose_per_frame_e_a2, pre_exposure=0.0,
            voltage_kv=voltage_kv, start_frame=1,
            global_shifts_px=g[["rlnMicrographShiftX", "rlnMicrographShiftY"]].to_numpy(),
            patch_centres_px=centres.reshape(5, 5, 2), patch_shifts_px=patch,
        )  # fmt: skip
        c = mic.coordinates
        coords = write_coordinates(
            outdir / "truth" / "coordinates" / f"{stem}_truth.star",
            c[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(),
            extra={k: c[k].to_numpy() for k in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnClassNumber")},
        )
        clean = mic.field_of_view() * float(total_dose * pixel_size_a**2)
        clean_path = write_mrc(outdir / "truth" / "Micrographs" / f"{stem}_clean.mrc", clean.cpu().numpy(), pixel_size_a, mode=2)
        thick = mic.ice_thickness_nm
        mic_rows.append(
            {
                "rlnMicrographMovieName": rel_movie,
                "rlnMicrographName": clean_path.relative_to(outdir).as_posix(),
                "rlnMicrographMetadata": motion.relative_to(outdir).as_posix(),
                "rlnOpticsGroup": 1,
                "rlnDefocusU": mic.defocus_u_a,
                "rlnDefocusV": mic.defocus_v_a,
                "rlnDefocusAngle": mic.defocus_angle_deg,
                "rlnCtfAstigmatism": mic.defocus_u_a - mic.defocus_v_a,
                "rlnAccumMotionTotal": drift.accumulated_motion_px() * pixel_size_a,
                "rlnAutospaMaxDriftPx": drift.max_displacement_px(),
                "rlnAutospaIceThicknessMinNm": float(thick.min()),
                "rlnAutospaIceThicknessMaxNm": float(thick.max()),
                "rlnAutospaNumberOfParticles": len(c),
                "rlnAutospaCoordinatesFile": coords.relative_to(outdir).as_posix(),
            }
        )
        part = c.copy()
        part.insert(0, "rlnMicrographMovieName", rel_movie)
        part["rlnDefocusU"], part["rlnDefocusV"] = mic.defocus_u_a, mic.defocus_v_a
        part["rlnDefocusAngle"] = mic.defocus_angle_deg
        part["rlnOpticsGroup"] = 1
        part_rows.append(part)
        movies.append(movie_path)
        metas.append(meta_path)
        motion_stars.append(motion)
        coord_stars.append(coords)
        cleans.append(clean_path)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnOpticsGroup": [1],
            "rlnMicrographOriginalPixelSize": [float(pixel_size_a)],
            "rlnVoltage": [float(voltage_kv)],
            "rlnSphericalAberration": [float(cs_mm)],
            "rlnAmplitudeContrast": [float(amplitude_contrast)],
            "rlnMicrographPixelSize": [float(pixel_size_a)],
        }
    )
    mics_star = write_star(outdir / "truth" / "micrographs.star", {"optics": optics, "micrographs": pd.DataFrame(mic_rows)})
    parts_star = write_particles_star(outdir / "truth" / "particles.star", optics, pd.concat(part_rows, ignore_index=True))
    site = outdir / "truth" / "mdcatch_site.toml"
    write_text(
        site,
        f'# the simulated microscope, for autospa mdcatch --config\n[microscopes.autospa-sim]\nname = "Simulator"\n'
        f"cs_mm = {float(cs_mm)!r}\n",
    )
    log.info("simulated a %s session of %d movies in %s", software, n_movies, outdir)
    return SessionFiles(
        outdir=outdir,
        movies=movies,
        metadata=metas,
        gain=gain_path,
        micrographs_star=mics_star,
        particles_star=parts_star,
        mdcatch_config=site,
        motion_stars=motion_stars,
        coordinate_stars=coord_stars,
        clean_micrographs=cleans,
    )
