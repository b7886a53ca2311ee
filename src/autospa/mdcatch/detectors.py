"""Detector presets, the microscope table and defaults, from ``config/detectors.toml`` (L3).

The shipped table is merged with a user copy (``$XDG_CONFIG_HOME/autospa/detectors.toml``,
default ``~/.config/autospa/detectors.toml``) and then with an explicit ``--config`` file, key by
key, later files winning. :func:`resolve` completes a parsed :class:`AcquisitionMetadata` with what
the table knows: the detector model, Cs and microscope name, the mode from the frame size, and an
EER frame rate.

Fixes against MDCatch (reference/mdcatch.md section 1.12): an unknown microscope ID is a warning,
not a KeyError (bug 5); the camera model is also recognised from names in the metadata and from the
movie's frame size, not only from the microscope table.
"""

from __future__ import annotations

import copy
import logging
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from autospa.errors import InputError
from autospa.mdcatch.metadata import COUNTING, SUPER_RESOLUTION, AcquisitionMetadata

log = logging.getLogger(__name__)

CONFIG_NAME = "detectors.toml"


@dataclass(frozen=True)
class DetectorPreset:
    """One camera model.

    Attributes
    ----------
    key
        Preset name (``K3``, ``Falcon4i`` ...).
    vendor
        ``TFS`` or ``Gatan`` (which EPU camera name it sits behind).
    width_px, height_px
        Physical (counting-mode) frame size, x by y.
    super_resolution
        Whether it records super-resolution movies (twice the size).
    eer
        Whether it records EER movies.
    frame_rate_hz
        Internal frame rate (EER frames per second) when the metadata gives none.
    patches
        Motion-correction patches (x, y).
    mtf
        MTF file name per detector mode; ``{kv}`` stands for the voltage in kV.
    aliases
        Names of the camera in metadata (compared case-insensitively).
    gain_patterns
        Case-insensitive globs of its gain-reference file names.
    """

    key: str
    vendor: str
    width_px: int
    height_px: int
    super_resolution: bool = False
    eer: bool = False
    frame_rate_hz: float | None = None
    patches: tuple[int, int] = (5, 5)
    mtf: Mapping[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    gain_patterns: tuple[str, ...] = ()

    def mtf_name(self, mode: str | None, voltage_kv: float | None) -> str | None:
        """The MTF file name for a mode and voltage, or None when the preset has none."""
        if voltage_kv is None:
            return None
        pattern = self.mtf.get(mode or COUNTING)
        if pattern is None:
            return None
        return pattern.format(kv=int(round(voltage_kv)))


@dataclass(frozen=True)
class Microscope:
    """One row of the microscope table (keyed by instrument ID)."""

    id: str
    name: str
    cs_mm: float | None = None
    tfs_camera: str | None = None
    gatan_camera: str | None = None


@dataclass(frozen=True)
class MDCatchConfig:
    """The merged configuration.

    Attributes
    ----------
    detectors, microscopes
        Presets by key and microscopes by ID.
    defaults
        The ``[defaults]`` table (particle diameter, grouping and downscaling rules, ...).
    drift
        Tolerances of the session drift check.
    gain_dirs, mtf_dirs
        Extra folders where gain references and MTF files are looked for.
    sources
        The files merged, in order.
    """

    detectors: Mapping[str, DetectorPreset]
    microscopes: Mapping[str, Microscope]
    defaults: Mapping[str, Any]
    drift: Mapping[str, float]
    gain_dirs: tuple[str, ...] = ()
    mtf_dirs: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()

    def default(self, key: str) -> Any:
        """A value of the ``[defaults]`` table (KeyError names the key when absent)."""
        try:
            return self.defaults[key]
        except KeyError:
            raise KeyError(f"[defaults] {key} missing from the MDCatch configuration") from None


def user_config_path() -> Path:
    """``$XDG_CONFIG_HOME/autospa/detectors.toml`` (``~/.config`` when unset)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "autospa" / CONFIG_NAME


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise InputError(path, f"cannot read configuration: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(path, f"not valid TOML ({exc})") from None


def load_config(path: str | Path | None = None, *, use_user_config: bool = True) -> MDCatchConfig:
    """Load the shipped table, merged with the user copy and with ``path``.

    Parameters
    ----------
    path
        An explicit configuration file (``--config``), merged last.
    use_user_config
        Whether to merge ``user_config_path()`` when it exists.

    Returns
    -------
    MDCatchConfig

    Raises
    ------
    InputError
        A file that cannot be read or holds an invalid entry.
    """
    shipped = resources.files("autospa.config").joinpath(CONFIG_NAME)
    with shipped.open("rb") as fh:
        data = tomllib.load(fh)
    sources = [str(shipped)]
    extra: list[Path] = []
    if use_user_config and user_config_path().is_file():
        extra.append(user_config_path())
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise InputError(p, "configuration file not found")
        extra.append(p)
    for p in extra:
        data = _deep_merge(data, _read_toml(p))
        sources.append(str(p))
    return _build(data, sources, extra[-1] if extra else Path(str(shipped)))


def _build(data: Mapping[str, Any], sources: list[str], blame: Path) -> MDCatchConfig:
    detectors: dict[str, DetectorPreset] = {}
    for key, d in (data.get("detectors") or {}).items():
        try:
            detectors[key] = DetectorPreset(
                key=key,
                vendor=str(d["vendor"]),
                width_px=int(d["width_px"]),
                height_px=int(d["height_px"]),
                super_resolution=bool(d.get("super_resolution", False)),
                eer=bool(d.get("eer", False)),
                frame_rate_hz=None if d.get("frame_rate_hz") is None else float(d["frame_rate_hz"]),
                patches=(int(d.get("patches", (5, 5))[0]), int(d.get("patches", (5, 5))[1])),
                mtf=dict(d.get("mtf", {})),
                aliases=tuple(str(a) for a in d.get("aliases", ())),
                gain_patterns=tuple(str(a) for a in d.get("gain_patterns", ())),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise InputError(blame, f"[detectors.{key}] is invalid ({exc!r})") from None
    microscopes: dict[str, Microscope] = {}
    for mid, m in (data.get("microscopes") or {}).items():
        try:
            microscopes[str(mid)] = Microscope(
                id=str(mid),
                name=str(m.get("name", mid)),
                cs_mm=None if m.get("cs_mm") is None else float(m["cs_mm"]),
                tfs_camera=m.get("tfs_camera"),
                gatan_camera=m.get("gatan_camera"),
            )
        except (TypeError, ValueError, AttributeError) as exc:
            raise InputError(blame, f"[microscopes.{mid}] is invalid ({exc!r})") from None
        for cam in (microscopes[str(mid)].tfs_camera, microscopes[str(mid)].gatan_camera):
            if cam is not None and cam not in detectors:
                raise InputError(blame, f"[microscopes.{mid}] names camera {cam!r}, which is not a [detectors] preset")
    defaults = dict(data.get("defaults") or {})
    if "cs_mm" in defaults and (isinstance(defaults["cs_mm"], bool) or not isinstance(defaults["cs_mm"], int | float)):
        raise InputError(blame, f"[defaults] cs_mm must be a number, not {defaults['cs_mm']!r}")
    paths = data.get("paths") or {}
    return MDCatchConfig(
        detectors=detectors,
        microscopes=microscopes,
        defaults=defaults,
        drift={k: float(v) for k, v in (data.get("drift") or {}).items()},
        gain_dirs=tuple(str(p) for p in paths.get("gain_dirs", ())),
        mtf_dirs=tuple(str(p) for p in paths.get("mtf_dirs", ())),
        sources=tuple(sources),
    )


def _norm(name: str) -> str:
    return "".join(name.lower().split()).replace("-", "").replace("_", "")


def preset_by_name(config: MDCatchConfig, name: str | None) -> DetectorPreset | None:
    """The preset whose key or alias is ``name`` (case, blanks, '-' and '_' ignored)."""
    if not name:
        return None
    n = _norm(name)
    for preset in config.detectors.values():
        if n == _norm(preset.key) or any(n == _norm(a) for a in preset.aliases):
            return preset
    return None


def presets_by_size(config: MDCatchConfig, width: int | None, height: int | None) -> list[tuple[DetectorPreset, int]]:
    """Presets whose frame is ``width x height`` (either orientation), with the super-resolution
    factor that size implies (1 or 2)."""
    if not width or not height:
        return []
    size = {(width, height), (height, width)}
    out = []
    for p in config.detectors.values():
        if (p.width_px, p.height_px) in size:
            out.append((p, 1))
        elif p.super_resolution and (2 * p.width_px, 2 * p.height_px) in size:
            out.append((p, 2))
    return out


def _vendor_of(detector_name: str | None) -> str | None:
    if not detector_name:
        return None
    n = detector_name.lower()
    if "falcon" in n or "ceta" in n:
        return "TFS"
    if n in ("ef-ccd", "bm-ccd") or "gatan" in n or n.startswith("k2") or n.startswith("k3"):
        return "Gatan"
    return None


def resolve(meta: AcquisitionMetadata, config: MDCatchConfig) -> AcquisitionMetadata:
    """Complete metadata with the microscope table and the detector presets.

    Sets ``detector_model`` (from a name in the metadata, else the microscope table by camera
    vendor, else the frame size), ``cs_mm`` and ``microscope_name`` from the microscope table when
    the metadata has none (``cs_mm`` from ``[defaults] cs_mm`` when the microscope is not in the
    table and that default is set), the super-resolution factor and mode from the frame size when the
    metadata has none, and the EER frame rate and estimated frame count from the preset when
    missing. Everything it cannot settle is added as a warning.

    Parameters
    ----------
    meta
        Parsed (and possibly merged) metadata.
    config
        The configuration from :func:`load_config`.

    Returns
    -------
    AcquisitionMetadata
    """
    m = meta
    scope = config.microscopes.get(m.microscope_id) if m.microscope_id else None
    if m.microscope_id and scope is None:
        m = m.with_warning(f"microscope ID {m.microscope_id} is not in the microscope table")
    if scope is not None:
        m = m.replace(microscope_name=scope.name)
        if m.cs_mm is None and scope.cs_mm is not None:
            m = m.replace(cs_mm=scope.cs_mm)
    if m.cs_mm is None and config.defaults.get("cs_mm") is not None:
        m = m.replace(cs_mm=float(config.defaults["cs_mm"])).with_warning(
            "Cs taken from [defaults] cs_mm: the microscope is not identified in the microscope table"
        )
    if m.cs_mm is None:
        m = m.with_warning("Cs unknown: add the microscope to the microscope table")

    preset = preset_by_name(config, m.detector_model) or preset_by_name(config, m.detector_name)
    how = "name"
    if preset is None and scope is not None:
        vendor = _vendor_of(m.detector_name)
        cam = {"TFS": scope.tfs_camera, "Gatan": scope.gatan_camera}.get(vendor or "")
        if cam is not None:
            preset, how = config.detectors.get(cam), "microscope table"
        elif vendor is None:
            # No camera name (SerialEM mdocs): keep the scope's cameras that can have recorded
            # this movie (super-resolution: Gatan; EER: Falcon 4) and take the one left, if any.
            cams = [config.detectors[c] for c in (scope.tfs_camera, scope.gatan_camera) if c in config.detectors]
            if m.detector_mode == SUPER_RESOLUTION:
                cams = [c for c in cams if c.super_resolution]
            if m.movie_format == "eer":
                cams = [c for c in cams if c.eer]
            elif m.movie_format is not None:
                cams = [c for c in cams if not c.eer]
            if len(cams) == 1:
                preset, how = cams[0], "microscope table"
    by_size = presets_by_size(config, m.image_width_px, m.image_height_px)
    if preset is None and by_size:
        cands = by_size
        if m.movie_format == "eer":
            cands = [c for c in by_size if c[0].eer] or by_size
        elif m.movie_format is not None:
            cands = [c for c in by_size if not c[0].eer] or by_size
        vendor = _vendor_of(m.detector_name)
        if vendor:
            cands = [c for c in cands if c[0].vendor == vendor] or cands
        if len({c[0].key for c in cands}) == 1:
            preset, how = cands[0][0], "frame size"
        else:
            m = m.with_warning(
                "detector model ambiguous from the frame size ("
                + ", ".join(sorted({c[0].key for c in cands}))
                + "): name it in the microscope table"
            )
    if preset is not None:
        m = m.replace(detector_model=preset.key)
        log.debug("%s: detector %s from its %s", m.source, preset.key, how)
        sr_from_size = next((f for p, f in by_size if p.key == preset.key), None)
        if m.super_resolution_factor is None and sr_from_size is not None:
            m = m.replace(super_resolution_factor=sr_from_size)
        if m.detector_mode is None and sr_from_size == 2:
            m = m.replace(detector_mode=SUPER_RESOLUTION)
        elif m.detector_mode is None and (preset.eer or preset.vendor == "Gatan") and sr_from_size == 1:
            m = m.replace(detector_mode=COUNTING)
        if m.image_width_px and m.image_height_px and sr_from_size is None:
            m = m.with_warning(
                f"frame size {m.image_width_px}x{m.image_height_px} is not a {preset.key} frame "
                f"({preset.width_px}x{preset.height_px}"
                + (f" or {2 * preset.width_px}x{2 * preset.height_px}" if preset.super_resolution else "")
                + "): cropped or binned movies, or another camera"
            )
        if (m.super_resolution_factor == 2 and sr_from_size == 1) or (
            m.super_resolution_factor == 1 and sr_from_size == 2 and m.movie_format is not None
        ):
            m = m.with_warning(
                f"frame size {m.image_width_px}x{m.image_height_px} does not match the recorded "
                f"super-resolution factor {m.super_resolution_factor} of a {preset.key}"
            )
        if m.movie_format == "eer" and m.frame_rate_hz is None and preset.frame_rate_hz:
            m = m.replace(frame_rate_hz=preset.frame_rate_hz)
        if (
            m.movie_format == "eer"
            and m.n_frames is None
            and m.frame_rate_hz
            and m.exposure_time_s
        ):
            m = m.replace(n_frames=int(round(m.exposure_time_s * m.frame_rate_hz)), frames_estimated=True)
    elif not any(w.startswith("detector model ambiguous") for w in m.warnings):
        m = m.with_warning("detector model unknown (no name, microscope-table entry or frame size matches a preset)")
    if m.super_resolution_factor is None:
        m = m.replace(super_resolution_factor=1)
    return m.with_derived_units()


def find_preset(config: MDCatchConfig, meta: AcquisitionMetadata) -> DetectorPreset | None:
    """The preset of resolved metadata (None when unknown)."""
    return config.detectors.get(meta.detector_model) if meta.detector_model else None
