"""RELION's STAR labels and units <-> autospa's internal ones: the ONE place that converts them.

Internal units (see :mod:`autospa.conventions`): Angstrom, pixels and degrees with the unit in the
name. Angles stay in degrees because :func:`autospa.conventions.euler_to_matrix` and
:func:`~autospa.conventions.psi_to_matrix_2d` take degrees, so the angle conversion is the identity
and exact.

=========================== =================================== =====================================
RELION label (file)         internal field (:class:`ParticleParams`)  conversion
=========================== =================================== =====================================
rlnAngleRot/Tilt/Psi (deg)  ``rot_deg``, ``tilt_deg``, ``psi_deg`` identity (ZYZ, RELION's matrix A)
rlnOriginXAngst/YAngst (A)  ``origin_x_px``, ``origin_y_px``    / pixel size of the optics group;
                                                                same sign (particle centre at
                                                                box centre - origin)
rlnOriginX/Y (px, 3.0)      same                                identity
rlnDefocusU/V (A)           ``defocus_u_a``, ``defocus_v_a``    identity (positive = underfocus)
rlnDefocusAngle (deg)       ``defocus_angle_deg``               identity
rlnPhaseShift (deg)         ``phase_shift_deg``                 identity
rlnCtfBfactor (A^2)         ``ctf_bfactor_a2``                  identity
rlnCtfScalefactor           ``ctf_scale``                       identity
rlnClassNumber              ``class_number``                    identity (1-based; 0 = none)
rlnRandomSubset             ``random_subset``                   identity (1 or 2; 0 = none)
rlnOpticsGroup              ``optics_group``                    identity (1-based)
optics rlnImagePixelSize    ``pixel_size_a`` (per particle)     looked up through rlnOpticsGroup
optics rlnVoltage (kV)      ``voltage_kv``                      idem
optics rlnSphericalAb. (mm) ``cs_mm``                           idem
optics rlnAmplitudeContr.   ``amplitude_contrast``              idem
=========================== =================================== =====================================

The origin conversion itself is :func:`autospa.conventions.origin_angst_to_px` /
:func:`~autospa.conventions.origin_px_to_angst` (the conventions module owns the sign and unit).
Values that the conversion multiplies back (origins) are snapped to 12 significant digits on the
way out, which removes the last-bit error of ``x / p * p``: a STAR value with at most 12
significant digits (RELION writes 6 decimals) comes back bit-identical.

RELION 3.0 files (no data_optics; rlnOriginX/Y in pixels; pixel size from rlnDetectorPixelSize and
rlnMagnification) are converted to the 3.1 layout by :func:`convert_relion30_particles`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields

import numpy as np
import pandas as pd

from autospa.conventions import origin_angst_to_px, origin_px_to_angst

log = logging.getLogger(__name__)

RLN = "rln"

#: Labels that RELION 3.0 kept per particle and 3.1 moved to data_optics.
OPTICS_LABELS_30 = (
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnBeamTiltX",
    "rlnBeamTiltY",
)


def label_to_name(label: str) -> str:
    """STAR label -> particle-store variable name (``rlnDefocusU`` -> ``DefocusU``)."""
    return label[len(RLN) :] if label.startswith(RLN) and len(label) > len(RLN) else label


def name_to_label(name: str) -> str:
    """Particle-store variable name -> STAR label (``DefocusU`` -> ``rlnDefocusU``)."""
    return name if name.startswith(RLN) else RLN + name


# ------------------------------------------------------------------------------------------------
# per-particle parameters in internal units
# ------------------------------------------------------------------------------------------------
@dataclass
class ParticleParams:
    """Per-particle pose, CTF and bookkeeping in internal units; every field is ``(n,)``.

    Missing labels give RELION's defaults: angles and origins 0, class/subset 0 (none), CTF values
    NaN (no CTF known), phase shift 0, B-factor 0, scale 1.
    """

    rot_deg: np.ndarray
    tilt_deg: np.ndarray
    psi_deg: np.ndarray
    origin_x_px: np.ndarray
    origin_y_px: np.ndarray
    defocus_u_a: np.ndarray
    defocus_v_a: np.ndarray
    defocus_angle_deg: np.ndarray
    phase_shift_deg: np.ndarray
    ctf_bfactor_a2: np.ndarray
    ctf_scale: np.ndarray
    class_number: np.ndarray
    random_subset: np.ndarray
    optics_group: np.ndarray
    pixel_size_a: np.ndarray
    voltage_kv: np.ndarray
    cs_mm: np.ndarray
    amplitude_contrast: np.ndarray
    #: STAR labels the parameters were read from (written back by :func:`params_to_star`).
    labels: tuple[str, ...] = field(default=())

    def __len__(self) -> int:
        return int(self.rot_deg.shape[0])

    def subset(self, index: np.ndarray | slice) -> ParticleParams:
        """The parameters of some particles."""
        kw = {f.name: getattr(self, f.name)[index] for f in fields(self) if f.name != "labels"}
        return ParticleParams(**kw, labels=self.labels)


#: internal field -> (STAR label, default, dtype) for the per-particle labels that are identities.
_IDENTITY = {
    "rot_deg": ("rlnAngleRot", 0.0, np.float64),
    "tilt_deg": ("rlnAngleTilt", 0.0, np.float64),
    "psi_deg": ("rlnAnglePsi", 0.0, np.float64),
    "defocus_u_a": ("rlnDefocusU", np.nan, np.float64),
    "defocus_v_a": ("rlnDefocusV", np.nan, np.float64),
    "defocus_angle_deg": ("rlnDefocusAngle", np.nan, np.float64),
    "phase_shift_deg": ("rlnPhaseShift", 0.0, np.float64),
    "ctf_bfactor_a2": ("rlnCtfBfactor", 0.0, np.float64),
    "ctf_scale": ("rlnCtfScalefactor", 1.0, np.float64),
    "class_number": ("rlnClassNumber", 0, np.int64),
    "random_subset": ("rlnRandomSubset", 0, np.int64),
}
#: internal field -> optics label, looked up per particle through rlnOpticsGroup.
_FROM_OPTICS = {
    "pixel_size_a": "rlnImagePixelSize",
    "voltage_kv": "rlnVoltage",
    "cs_mm": "rlnSphericalAberration",
    "amplitude_contrast": "rlnAmplitudeContrast",
}
_ORIGIN = {"origin_x_px": "rlnOriginXAngst", "origin_y_px": "rlnOriginYAngst"}


def optics_lookup(particles: pd.DataFrame, optics: pd.DataFrame, label: str) -> np.ndarray:
    """The optics-group value of ``label`` for every particle.

    Parameters
    ----------
    particles
        Particle table with ``rlnOpticsGroup``.
    optics
        Optics table with ``rlnOpticsGroup`` and ``label``.

    Returns
    -------
    np.ndarray
        ``(n,)`` values (NaN for float labels that the optics table lacks).
    """
    n = len(particles)
    if label not in optics.columns:
        return np.full(n, np.nan)
    groups = optics["rlnOpticsGroup"].to_numpy(dtype=np.int64)
    values = optics[label].to_numpy()
    order = np.argsort(groups)
    pg = particles["rlnOpticsGroup"].to_numpy(dtype=np.int64) if "rlnOpticsGroup" in particles else np.ones(n, np.int64)
    pos = np.searchsorted(groups[order], pg)
    pos = np.clip(pos, 0, len(groups) - 1)
    if not np.all(groups[order][pos] == pg):
        missing = sorted(set(pg.tolist()) - set(groups.tolist()))
        raise KeyError(f"optics group(s) {missing} not defined in data_optics")
    return values[order][pos]


def params_from_star(particles: pd.DataFrame, optics: pd.DataFrame) -> ParticleParams:
    """RELION particle + optics tables -> :class:`ParticleParams` (internal units).

    Parameters
    ----------
    particles
        RELION 3.1+ particle table (``rlnOpticsGroup`` per row).
    optics
        Its data_optics table (needs ``rlnOpticsGroup`` and ``rlnImagePixelSize``).
    """
    n = len(particles)
    kw: dict[str, np.ndarray] = {}
    for name, (label, default, dtype) in _IDENTITY.items():
        kw[name] = particles[label].to_numpy(dtype=dtype) if label in particles else np.full(n, default, dtype=dtype)
    for name, label in _FROM_OPTICS.items():
        kw[name] = np.asarray(optics_lookup(particles, optics, label), dtype=np.float64)
    for name, label in _ORIGIN.items():
        if label in particles:
            kw[name] = origin_angst_to_px(particles[label].to_numpy(dtype=np.float64), kw["pixel_size_a"])
        else:
            kw[name] = np.zeros(n)
    kw["optics_group"] = (
        particles["rlnOpticsGroup"].to_numpy(dtype=np.int64) if "rlnOpticsGroup" in particles else np.ones(n, np.int64)
    )
    # own, writable arrays (pandas' copy-on-write hands out read-only views)
    kw = {k: v if v.flags.writeable and v.flags.owndata else np.array(v) for k, v in kw.items()}
    labels = tuple(
        lab
        for lab in [v[0] for v in _IDENTITY.values()] + list(_ORIGIN.values()) + ["rlnOpticsGroup"]
        if lab in particles
    )
    return ParticleParams(**kw, labels=labels)


def params_to_star(
    params: ParticleParams,
    particles: pd.DataFrame | None = None,
    labels: tuple[str, ...] | None = None,
) -> pd.DataFrame:
    """:class:`ParticleParams` -> RELION particle columns.

    Parameters
    ----------
    params
        Internal parameters of ``n`` particles.
    particles
        An ``(n, ...)`` particle table to update (its other columns and their order are kept;
        new labels are appended), or ``None`` for a table of the parameter labels only.
    labels
        STAR labels to write; default: the labels the parameters were read from
        (``params.labels``), plus the pose labels (angles, origins), ``rlnOpticsGroup`` and any
        label whose values differ from RELION's default.

    Returns
    -------
    pd.DataFrame
        A new table; ``particles`` is not modified.
    """
    n = len(params)
    out = pd.DataFrame(index=range(n)) if particles is None else particles.reset_index(drop=True).copy()
    if len(out) != n:
        raise ValueError(f"{n} parameters for a table of {len(out)} particles")
    if labels is None:
        wanted = set(params.labels) | {"rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnOpticsGroup"}
        for name, (label, default, _) in _IDENTITY.items():
            v = getattr(params, name)
            if isinstance(default, float) and np.isnan(default):
                if np.isfinite(v).any():
                    wanted.add(label)
            elif np.any(v != default):
                wanted.add(label)
    else:
        wanted = set(labels)
    values: dict[str, np.ndarray] = {}
    for name, (label, _, dtype) in _IDENTITY.items():
        values[label] = np.asarray(getattr(params, name), dtype=dtype)
    for name, label in _ORIGIN.items():
        values[label] = snap_significant(origin_px_to_angst(np.asarray(getattr(params, name), np.float64), params.pixel_size_a))
    values["rlnOpticsGroup"] = np.asarray(params.optics_group, dtype=np.int64)
    order = [lab for lab in _STAR_ORDER if lab in wanted]
    unknown = wanted - set(values)
    if unknown:
        raise KeyError(f"params_to_star cannot write {sorted(unknown)}")
    for label in order:
        out[label] = values[label]
    return out


_STAR_ORDER = (
    "rlnAngleRot",
    "rlnAngleTilt",
    "rlnAnglePsi",
    "rlnOriginXAngst",
    "rlnOriginYAngst",
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnPhaseShift",
    "rlnCtfBfactor",
    "rlnCtfScalefactor",
    "rlnClassNumber",
    "rlnRandomSubset",
    "rlnOpticsGroup",
)


def snap_significant(x: np.ndarray, digits: int = 12) -> np.ndarray:
    """Round every value to ``digits`` significant decimal digits (exactly, through text).

    Parameters
    ----------
    x
        ``(...)`` float array.

    Returns
    -------
    np.ndarray
        ``(...)`` float64, the doubles nearest to the rounded decimals (NaN/inf unchanged).
    """
    a = np.asarray(x, dtype=np.float64)
    fmt = f"%.{digits}g"
    flat = [float(fmt % v) for v in a.ravel().tolist()]
    return np.array(flat, dtype=np.float64).reshape(a.shape)


# ------------------------------------------------------------------------------------------------
# RELION 3.0 -> 3.1
# ------------------------------------------------------------------------------------------------
def relion30_pixel_size(particles: pd.DataFrame) -> np.ndarray:
    """Per-particle pixel size of a RELION 3.0 table: rlnDetectorPixelSize (um) * 1e4 / rlnMagnification.

    Raises
    ------
    KeyError
        Neither the 3.0 labels nor rlnImagePixelSize are present.
    """
    if "rlnDetectorPixelSize" in particles and "rlnMagnification" in particles:
        return particles["rlnDetectorPixelSize"].to_numpy(np.float64) * 1e4 / particles["rlnMagnification"].to_numpy(np.float64)
    if "rlnImagePixelSize" in particles:
        return particles["rlnImagePixelSize"].to_numpy(np.float64)
    raise KeyError("rlnDetectorPixelSize and rlnMagnification (or rlnImagePixelSize)")


def convert_relion30_particles(particles: pd.DataFrame, image_size: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A RELION 3.0 particle table -> (data_optics, data_particles) in the 3.1 layout.

    One optics group per distinct combination of pixel size, voltage, Cs, amplitude contrast and
    beam tilt (the 3.0 per-particle labels RELION 3.1 moves to data_optics). rlnOriginX/Y (pixels)
    become rlnOriginXAngst/YAngst; rlnDetectorPixelSize/rlnMagnification are dropped.

    Parameters
    ----------
    particles
        The 3.0 table (rlnImageName, rlnDetectorPixelSize, rlnMagnification, ...).
    image_size
        Box size in pixels (read from the first stack; 3.0 files do not store it).
    """
    df = particles.reset_index(drop=True).copy()
    apix = relion30_pixel_size(df)
    key_cols = {"rlnImagePixelSize": apix}
    for lab in OPTICS_LABELS_30:
        if lab in df:
            key_cols[lab] = df[lab].to_numpy(np.float64)
    keys = pd.DataFrame(key_cols)
    groups = keys.drop_duplicates().reset_index(drop=True)
    groups.insert(0, "rlnOpticsGroup", np.arange(1, len(groups) + 1, dtype=np.int64))
    group_of = keys.merge(groups, on=list(key_cols), how="left")["rlnOpticsGroup"].to_numpy(np.int64)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": [f"opticsGroup{g}" for g in groups["rlnOpticsGroup"]],
            "rlnOpticsGroup": groups["rlnOpticsGroup"].to_numpy(np.int64),
        }
    )
    for lab in key_cols:
        if lab != "rlnImagePixelSize":
            optics[lab] = groups[lab].to_numpy()
    optics["rlnImagePixelSize"] = groups["rlnImagePixelSize"].to_numpy()
    optics["rlnImageSize"] = np.int64(image_size)
    optics["rlnImageDimensionality"] = np.int64(2)
    for axis in ("X", "Y"):
        if f"rlnOrigin{axis}" in df:
            df[f"rlnOrigin{axis}Angst"] = df[f"rlnOrigin{axis}"].to_numpy(np.float64) * apix
            df = df.drop(columns=f"rlnOrigin{axis}")
    drop = [c for c in ("rlnDetectorPixelSize", "rlnMagnification", "rlnImagePixelSize", *OPTICS_LABELS_30) if c in df]
    df = df.drop(columns=drop)
    df["rlnOpticsGroup"] = group_of
    return optics, df


__all__ = [
    "OPTICS_LABELS_30",
    "ParticleParams",
    "convert_relion30_particles",
    "label_to_name",
    "name_to_label",
    "optics_lookup",
    "params_from_star",
    "params_to_star",
    "relion30_pixel_size",
    "snap_significant",
]
