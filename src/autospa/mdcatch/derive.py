"""Values derived from acquisition metadata (L3): dose per frame, motion-correction binning and
frame grouping, EER grouping, particle box / mask / downscaled box, and the ``it`` options.

Formulas from MDCatch's parser.py / utils/misc.py / schedule.py and relion_it.py
(reference/mdcatch.md section 1.9; reference/relion-schemes-and-ranker.md section A9), with these
fixes (reference/mdcatch.md section 1.12):

- bug 2: super-resolution is an integer factor, so SerialEM super-resolution data gets motion
  correction bin 2 and box sizes at the binned pixel (MDCatch compared ``Binning == '1'`` with the
  int 1 and used the super-resolution pixel);
- bug 4: the EER grouping is ``round(target / dose per EER frame)`` computed so that 1 / 0.05 gives
  20 (MDCatch: ``1 // 0.05 == 19.0``, written as ``"19.0"``), and motion correction gets the dose
  of one grouped fraction (MDCatch forced 1.0);
- bug 7: the dose per frame uses the real frame count (never divides by 0, never reports 0);
- the frame grouping rule (1; 2 if dpf < 0.8; 3 if 2 dpf < 0.8) is the general "smallest group
  reaching 0.8 e/A^2, at most 3", which gives the same numbers and is configurable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from autospa.errors import InputError
from autospa.mdcatch.detectors import MDCatchConfig, find_preset
from autospa.mdcatch.metadata import SUPER_RESOLUTION, AcquisitionMetadata

#: relion_it.py's downscaled box sizes.
DOWNSCALE_BOXES = (48, 64, 96, 128, 160, 192, 256, 288, 300, 320, 360, 384, 400, 420, 450, 480, 512,
                   640, 768, 896, 1024)


def _even_ceil(x: float) -> int:
    """The smallest even integer >= x (MDCatch: ``2 * ceil(x / 2)``)."""
    return 2 * math.ceil(x / 2 - 1e-9)


def box_and_mask(diameter_a: float, pixel_size_a: float, helical: bool = False) -> tuple[int, int]:
    """Particle box and mask sizes (pixels) for a particle diameter.

    SPA: mask = ceil(1.1 d), box = even ceil(1.5 d), with d the diameter in pixels.
    Helical (d = filament width): mask = ceil(1.62 d), box = even ceil(1.8 d).

    Parameters
    ----------
    diameter_a
        Particle diameter (filament width for helical) in A.
    pixel_size_a
        Pixel size of the micrographs the particles are extracted from (A).
    helical
        Helical rules.

    Returns
    -------
    box_px, mask_px
    """
    if diameter_a <= 0 or pixel_size_a <= 0:
        raise InputError(None, f"particle diameter ({diameter_a}) and pixel size ({pixel_size_a}) must be positive")
    d = diameter_a / pixel_size_a
    if helical:
        return _even_ceil(1.8 * d), math.ceil(1.62 * d - 1e-9)
    return _even_ceil(1.5 * d), math.ceil(1.1 * d - 1e-9)


def downscaled_box(
    box_px: int, pixel_size_a: float, max_pixel_a: float = 3.75, sizes: Sequence[int] = DOWNSCALE_BOXES
) -> int:
    """relion_it.py's downscaled box: the first listed size whose pixel (pixel x box / size) is
    below ``max_pixel_a``; never larger than the box itself.

    Parameters
    ----------
    box_px
        Full-resolution box (pixels).
    pixel_size_a
        Its pixel size (A).
    max_pixel_a
        The pixel size to get below (3.75 A: Nyquist better than 7.5 A).
    sizes
        Candidate sizes, increasing.

    Returns
    -------
    int
    """
    for size in sizes:
        if size > box_px:
            return box_px
        if pixel_size_a * box_px / size < max_pixel_a:
            return size
    return box_px


def frame_grouping(dose_per_frame_e_a2: float, min_dose_e_a2: float = 0.8, max_group: int = 3) -> int:
    """Frames to average for motion estimation: the smallest group with at least ``min_dose``,
    at most ``max_group`` (MDCatch: 1; 2 if dpf < 0.8; 3 if 2 dpf < 0.8)."""
    if dose_per_frame_e_a2 <= 0:
        return 1
    g = math.ceil(min_dose_e_a2 / dose_per_frame_e_a2 - 1e-9)
    return int(min(max(g, 1), max_group))


def eer_grouping(
    dose_per_eer_frame_e_a2: float, n_eer_frames: int | None, target_e_a2: float = 1.0
) -> tuple[int, int | None, int | None]:
    """Group raw EER frames into fractions of about ``target_e_a2``.

    Parameters
    ----------
    dose_per_eer_frame_e_a2
        Dose per raw EER frame (e/A^2).
    n_eer_frames
        Raw EER frames in the movie (None when unknown).
    target_e_a2
        Wanted dose per fraction.

    Returns
    -------
    group, n_fractions, dropped_frames
        EER frames per fraction (RELION ``--eer_grouping``), the resulting number of fractions and
        the frames at the end that fill no fraction (RELION drops them).
    """
    if dose_per_eer_frame_e_a2 <= 0:
        raise InputError(None, "EER grouping needs a positive dose per frame")
    group = max(1, int(math.floor(target_e_a2 / dose_per_eer_frame_e_a2 + 0.5 + 1e-9)))
    if n_eer_frames is None:
        return group, None, None
    group = min(group, n_eer_frames)
    return group, n_eer_frames // group, n_eer_frames % group


@dataclass(frozen=True)
class DerivedParameters:
    """Processing parameters derived from one movie's metadata.

    Attributes
    ----------
    movie_pixel_size_a
        Pixel of the movie as saved (A); RELION import ``angpix``.
    physical_pixel_size_a
        Pixel of one (binned) detector pixel (A): the movie pixel x super-resolution factor.
    motioncorr_bin_factor
        Motion-correction binning (2 for super-resolution movies).
    micrograph_pixel_size_a
        Pixel of the motion-corrected micrographs (A).
    dose_per_frame_e_a2
        Dose per movie frame (per raw EER frame for EER).
    dose_rate_e_px_s
        Dose rate on the camera (e per unbinned physical pixel per second).
    group_frames
        Frames averaged for motion estimation (1 for EER: the grouping is ``eer_grouping``).
    eer_grouping, eer_fractions, eer_dropped_frames
        EER frames per fraction, fractions per movie, frames dropped at the end (EER only).
    motioncorr_dose_per_frame_e_a2
        The dose per frame motion correction must be given: per movie frame, or per grouped EER
        fraction.
    patch_x, patch_y
        Motion-correction patches.
    mtf_name
        MTF file name for the detector, mode and voltage (None when the preset has none).
    particle_diameter_a, box_size_px, mask_size_px, mask_diameter_a, downscaled_box_px,
    downscaled_pixel_size_a
        Particle geometry on the micrograph pixel.
    log_diameter_min_a, log_diameter_max_a
        LoG picker diameters.
    tube_diameter_a
        Helical only: tube diameter = ceil(1.2 x filament width).
    warnings
        What could not be derived, and why.
    """

    movie_pixel_size_a: float | None
    physical_pixel_size_a: float | None
    motioncorr_bin_factor: int
    micrograph_pixel_size_a: float | None
    dose_per_frame_e_a2: float | None
    dose_rate_e_px_s: float | None
    group_frames: int
    eer_grouping: int | None
    eer_fractions: int | None
    eer_dropped_frames: int | None
    motioncorr_dose_per_frame_e_a2: float | None
    patch_x: int
    patch_y: int
    mtf_name: str | None
    particle_diameter_a: float
    box_size_px: int | None
    mask_size_px: int | None
    mask_diameter_a: float | None
    downscaled_box_px: int | None
    downscaled_pixel_size_a: float | None
    log_diameter_min_a: float
    log_diameter_max_a: float
    tube_diameter_a: float | None
    helical: bool
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["warnings"] = list(self.warnings)
        return d


def derive_parameters(
    meta: AcquisitionMetadata,
    config: MDCatchConfig,
    particle_diameter_a: float | None = None,
    helical: bool = False,
    eer_target_dose_e_a2: float | None = None,
) -> DerivedParameters:
    """Derive the processing parameters of one movie.

    Parameters
    ----------
    meta
        Resolved metadata (see ``mdcatch.detectors.resolve``).
    config
        The MDCatch configuration (defaults and detector presets).
    particle_diameter_a
        Particle diameter (filament width when ``helical``) in A; the configured default if None.
    helical
        Use the helical box/mask rules and derive a tube diameter.
    eer_target_dose_e_a2
        Dose per EER fraction to group to; the configured default if None.

    Returns
    -------
    DerivedParameters
    """
    warnings: list[str] = []
    diameter = float(particle_diameter_a if particle_diameter_a is not None else config.default("particle_diameter_a"))
    sr = meta.super_resolution_factor or 1
    bin_factor = sr if (meta.detector_mode == SUPER_RESOLUTION or sr > 1) else 1
    px = meta.pixel_size_a
    mic_px = None if px is None else px * bin_factor
    phys_px = meta.physical_pixel_size_a

    dpf = None
    if meta.total_dose_e_a2 is not None and meta.n_frames:
        dpf = meta.total_dose_e_a2 / meta.n_frames
    elif meta.dose_per_frame_e_a2 is not None:
        dpf = meta.dose_per_frame_e_a2
    else:
        warnings.append("dose per frame unknown (needs the total dose and the number of frames)")
    if dpf is not None and meta.frames_estimated:
        warnings.append("dose per frame uses an estimated frame count (exposure x frame rate)")

    rate = None
    if meta.total_dose_e_a2 is not None and phys_px is not None and meta.exposure_time_s:
        unbinned = phys_px / (meta.binning or 1)
        rate = meta.total_dose_e_a2 * unbinned**2 / meta.exposure_time_s

    eer = meta.movie_format == "eer"
    grp = 1
    eer_g = eer_n = eer_drop = None
    mc_dpf = dpf
    if eer:
        if dpf is not None:
            target = float(eer_target_dose_e_a2 if eer_target_dose_e_a2 is not None
                           else config.default("eer_target_dose_per_fraction_e_a2"))
            eer_g, eer_n, eer_drop = eer_grouping(dpf, meta.n_frames, target)
            mc_dpf = eer_g * dpf
        else:
            mc_dpf = None
    elif dpf is not None:
        grp = frame_grouping(dpf, float(config.default("group_frames_min_dose_e_a2")),
                             int(config.default("group_frames_max")))

    preset = find_preset(config, meta)
    patch_x, patch_y = preset.patches if preset is not None else (5, 5)
    mtf = preset.mtf_name(meta.detector_mode, meta.voltage_kv) if preset is not None else None

    box = mask = small = None
    mask_a = small_px = None
    if mic_px is not None:
        box, mask = box_and_mask(diameter, mic_px, helical)
        mask_a = mask * mic_px
        small = downscaled_box(box, mic_px, float(config.default("downscale_max_pixel_a")),
                               tuple(int(s) for s in config.default("downscale_boxes_px")))
        small_px = mic_px * box / small
    else:
        warnings.append("pixel size unknown: no box, mask or downscaled box")
    return DerivedParameters(
        movie_pixel_size_a=px,
        physical_pixel_size_a=phys_px,
        motioncorr_bin_factor=bin_factor,
        micrograph_pixel_size_a=mic_px,
        dose_per_frame_e_a2=dpf,
        dose_rate_e_px_s=rate,
        group_frames=grp,
        eer_grouping=eer_g,
        eer_fractions=eer_n,
        eer_dropped_frames=eer_drop,
        motioncorr_dose_per_frame_e_a2=mc_dpf,
        patch_x=patch_x,
        patch_y=patch_y,
        mtf_name=mtf,
        particle_diameter_a=diameter,
        box_size_px=box,
        mask_size_px=mask,
        mask_diameter_a=mask_a,
        downscaled_box_px=small,
        downscaled_pixel_size_a=small_px,
        log_diameter_min_a=float(config.default("log_diameter_min_fraction")) * diameter,
        log_diameter_max_a=float(config.default("log_diameter_max_fraction")) * diameter,
        tube_diameter_a=float(math.ceil(1.2 * diameter - 1e-9)) if helical else None,
        helical=helical,
        warnings=tuple(warnings),
    )


#: RELION's motion-correction choices for the gain orientation (job option values).
GAIN_ROT_CHOICES = ("No rotation (0)", "90 degrees (1)", "180 degrees (2)", "270 degrees (3)")
GAIN_FLIP_CHOICES = ("No flipping (0)", "Flip upside down (1)", "Flip left to right (2)")


def build_it_options(
    meta: AcquisitionMetadata,
    derived: DerivedParameters,
    config: MDCatchConfig,
    *,
    movies_glob: str,
    gain_reference: str | None = None,
    gain_rot: int = 0,
    gain_flip: int = 0,
    mtf_file: str | None = None,
    defect_file: str | None = None,
    symmetry: str | None = None,
    optics_group_name: str = "opticsGroup1",
) -> dict[str, Any]:
    """The ``it`` pipeline configuration for a session, from its first complete movie.

    The keys are the settings of ``autospa it`` (``orchestration.it.ItConfig``: physical values
    with units in their names, from which it derives the scheme options the relion_it way), plus
    ``options``: raw relion_it keys (``SCHEME__JOB__OPTION``) for what those settings do not cover
    (gain orientation, defect file, MTF, frame grouping, patches, optics-group name). Values are
    MDCatch's, with its bugs fixed (see the module docstring): box, mask and downscaled box on the
    motion-corrected pixel, EER grouping rounded, motion correction given the dose of one grouped
    EER fraction.

    Parameters
    ----------
    meta, derived
        The first complete movie's resolved metadata and derived parameters.
    config
        The MDCatch configuration (amplitude contrast, batch size, LoG ratio, symmetry default).
    movies_glob
        Glob of the session's movies, as the pipeline will see it (relative to the project
        directory, or absolute).
    gain_reference, gain_rot, gain_flip
        Gain reference (path or None) and RELION's rotation/flip codes for it.
    mtf_file, defect_file
        MTF file and camera defect file paths (or None).
    symmetry
        Point-group symmetry for 3D; the configured default if None.
    optics_group_name
        Name of the imported optics group.

    Returns
    -------
    dict
        Setting name -> value (float, int, bool, str) and ``options`` -> {raw key: str}.

    Raises
    ------
    InputError
        A value the pipeline cannot start without (pixel size, voltage, Cs, dose per frame, box),
        or a gain orientation code out of range.
    """
    missing = [n for n, v in (("pixel size", meta.pixel_size_a), ("voltage", meta.voltage_kv),
                              ("Cs", meta.cs_mm), ("dose per frame", derived.motioncorr_dose_per_frame_e_a2),
                              ("box size", derived.box_size_px))
               if v is None]
    if missing:
        raise InputError(meta.source, "cannot build the it configuration without: " + ", ".join(missing))
    if derived.motioncorr_bin_factor not in (1, 2):
        raise InputError(meta.source, f"motion-correction binning {derived.motioncorr_bin_factor} is not 1 or 2")
    if gain_rot not in range(4) or gain_flip not in range(3):
        raise InputError(None, f"gain_rot must be 0-3 and gain_flip 0-2, got {gain_rot}, {gain_flip}")
    assert meta.pixel_size_a is not None and meta.voltage_kv is not None and meta.cs_mm is not None
    assert derived.motioncorr_dose_per_frame_e_a2 is not None and derived.box_size_px is not None
    small = derived.downscaled_box_px if derived.downscaled_box_px is not None else derived.box_size_px
    cfg: dict[str, Any] = {
        "movies": movies_glob,
        "gain": gain_reference or "",
        "pixel_size_a": float(meta.pixel_size_a),
        "super_resolution": derived.motioncorr_bin_factor == 2,
        "dose_per_frame": float(derived.motioncorr_dose_per_frame_e_a2),
        "voltage_kv": float(meta.voltage_kv),
        "cs_mm": float(meta.cs_mm),
        "amplitude_contrast": float(config.default("amplitude_contrast")),
        "phase_plate": bool(meta.phase_plate),
        "movies_per_pass": int(config.default("batch_size")),
        "particle_diameter_a": float(derived.particle_diameter_a),
        "mask_diameter_a": round(float(derived.mask_diameter_a or 0.0), 2),
        "box_size_px": int(derived.box_size_px),
        "downscaled_box_px": int(small),
        "log_diameter_ratio": float(config.default("log_diameter_min_fraction")),
        "symmetry": symmetry or str(config.default("symmetry")),
    }
    if derived.eer_grouping is not None:
        cfg["eer_grouping"] = int(derived.eer_grouping)
    cfg["options"] = {
        "prep__importmovies__optics_group_name": optics_group_name,
        "prep__importmovies__fn_mtf": mtf_file or "",
        "prep__motioncorr__fn_defect": defect_file or "",
        "prep__motioncorr__gain_rot": GAIN_ROT_CHOICES[gain_rot],
        "prep__motioncorr__gain_flip": GAIN_FLIP_CHOICES[gain_flip],
        "prep__motioncorr__group_frames": str(int(derived.group_frames)),
        "prep__motioncorr__patch_x": str(int(derived.patch_x)),
        "prep__motioncorr__patch_y": str(int(derived.patch_y)),
    }
    return cfg
