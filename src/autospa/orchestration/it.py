"""``autospa it``: the relion_it equivalent.

One configuration (a YAML file, relion_it's Python-dict options file, or command-line values)
sets the variables and job options of the prep and proc schemes and launches both together.

Configuration keys (:class:`ItConfig`) are physical quantities with units in their names; they
are turned into relion_it's option keys (:func:`derive_options`): ``SCHEME__VARIABLE`` sets a
scheme variable (value and reset value, as relion_it does), ``SCHEME__JOB__OPTION`` a job
template option. Raw keys of either form may be given too (``options:`` in YAML, or top-level
keys containing ``__``), and win over derived ones.

Derived values follow relion_it (4.0): mask diameter = 1.1 x particle diameter; box = 1.5 x
diameter in pixels rounded up to even; the down-scaled box is the first of RELION's list of sizes
whose pixel size is below 3.75 A (never above the box); with super-resolution the pixel size for
these is doubled and motion correction bins by 2; LoG picking uses ratio x diameter .. diameter
and no FOM threshold at extraction; Topaz picking uses the GPU, one process and the FOM
threshold; the GPU list goes to class2d and the initial model, its first entry to autopick, and
with ``:`` separators to refine3d.

Differences from relion_it (fixes): the schemes are reset *before* they are run, in order (relion_it
starts ``--reset`` and ``--run`` in the background, so they race); a launch does not reset unless
asked (a re-launch resumes; changed options are detected by the runner); the number of 2D
iterations and the optimiser file the class ranker reads are set together
(``proc__class2d_iter`` and ``proc__class2d_optimiser``; RELION hard-wires ``run_it200``).
"""

from __future__ import annotations

import ast
import contextlib
import contextvars
import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from autospa.errors import InputError
from autospa.io.atomic import write_text
from autospa.io.scheme_files import copy_scheme_folder, locked, read_job_template, read_scheme, scheme_lock
from autospa.io.scheme_files import write_job_template, write_scheme
from autospa.orchestration.runner import RunResult, RunSettings, run_scheme
from autospa.orchestration.scheme_commands import SchemeStatus, reset_scheme, scheme_status
from autospa.scheme.model import SchemeError

log = logging.getLogger(__name__)

#: RELION's down-scaled box sizes (relion_it ``calculate_downscaled_box_size``).
DOWNSCALED_BOXES = (48, 64, 96, 128, 160, 192, 256, 288, 300, 320, 360, 384, 400, 420, 450, 480, 512, 640, 768, 896, 1024)

#: Prefect settings applied when the user has not set them (DESIGN.md section 6): a fresh
#: ephemeral server needs more than Prefect's default 20 s to start on a small machine.
PREFECT_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


@contextlib.contextmanager
def prefect_environment() -> Iterator[None]:
    """Apply :data:`PREFECT_DEFAULTS` where the user has not set them (before Prefect is imported)."""
    for k, v in PREFECT_DEFAULTS.items():
        os.environ.setdefault(k, v)
    yield


#: The schemes ``autospa it`` runs, in launch order.
IT_SCHEMES = ("prep", "proc")


@dataclass(frozen=True)
class ItConfig:
    """Everything ``autospa it`` needs to know about a session (defaults: relion_it's where it has them).

    Attributes
    ----------
    movies
        Glob of the movies, relative to the project directory.
    gain
        Gain reference ("" for none).
    pixel_size_a
        Movie pixel size (the super-resolution pixel size for super-resolution movies).
    super_resolution
        Movies are super-resolution: motion correction bins by 2.
    dose_per_frame
        Electrons per A^2 per frame.
    voltage_kv, cs_mm, amplitude_contrast
        Microscope.
    phase_plate
        Estimate a phase shift in CTF estimation.
    eer_grouping
        EER frames per fraction.
    movies_per_pass
        At most this many new movies are motion-corrected per pass of prep.
    wait_sec, maxtime_hr
        Loop period and lifetime of both schemes.
    particle_diameter_a
        Longest particle diameter.
    mask_diameter_a, box_size_px, downscaled_box_px
        Derived from the diameter when ``None``.
    symmetry
        Point group for the initial model and refinement.
    picker
        ``log`` or ``topaz``.
    log_diameter_ratio
        Shortest / longest diameter for LoG picking.
    log_threshold_adjust
        LoG threshold adjustment.
    topaz_model
        Topaz model ("" = Topaz's default model).
    topaz_min_fom
        Minimum Topaz figure of merit for extraction.
    ctf_max_resolution_a
        Micrographs whose CTF fits to worse than this are not used.
    class2d_classes, class2d_iterations
        2D classification size and VDAM iterations.
    class_score_threshold
        Minimum class-ranker score of selected 2D classes.
    min_particles_3d
        Selected particles needed before 3D runs.
    reference_3d
        A 3D reference (``None``: an initial model is made).
    gpus
        Comma-separated GPU ids.
    micrographs_ctf
        With ``do_prep`` off: an existing micrographs_ctf.star for proc.
    do_prep, do_proc
        Which schemes to run.
    options
        Raw relion_it keys (``SCHEME__VAR`` / ``SCHEME__JOB__OPTION``) -> value.
    """

    movies: str = "Movies/*.tiff"
    gain: str = ""
    pixel_size_a: float = 0.885
    super_resolution: bool = False
    dose_per_frame: float = 1.277
    voltage_kv: float = 200.0
    cs_mm: float = 1.4
    amplitude_contrast: float = 0.1
    phase_plate: bool = False
    eer_grouping: int = 20
    movies_per_pass: int = 50
    wait_sec: float = 180.0
    maxtime_hr: float = 48.0
    particle_diameter_a: float = 200.0
    mask_diameter_a: float | None = None
    box_size_px: int | None = None
    downscaled_box_px: int | None = None
    symmetry: str = "C1"
    picker: str = "log"
    log_diameter_ratio: float = 150.0 / 180.0
    log_threshold_adjust: float = 0.0
    topaz_model: str = ""
    topaz_min_fom: float = 0.0
    ctf_max_resolution_a: float = 6.0
    class2d_classes: int = 100
    class2d_iterations: int = 200
    class_score_threshold: float = 0.25
    min_particles_3d: int = 5000
    reference_3d: str = "None"
    gpus: str = "0"
    micrographs_ctf: str = ""
    do_prep: bool = True
    do_proc: bool = True
    options: Mapping[str, str] = field(default_factory=dict)


_FIELDS = {f.name: f for f in dataclasses.fields(ItConfig)}


def _convert(name: str, value: object, source: str | None) -> object:
    f = _FIELDS[name]
    t = str(f.type)
    if value is None:
        if "None" in t:
            return None
        raise InputError(source, f"{name} cannot be empty")
    try:
        if t.startswith("bool"):
            if isinstance(value, bool):
                return value
            v = str(value).strip().lower()
            if v in ("true", "yes", "1"):
                return True
            if v in ("false", "no", "0"):
                return False
            raise ValueError(value)
        if t.startswith("int"):
            x = float(value)
            if x != int(x):
                raise ValueError(value)
            return int(x)
        if t.startswith("float"):
            return float(value)
        if t.startswith("Mapping"):
            if not isinstance(value, Mapping):
                raise ValueError(value)
            return {str(k): _option_text(v) for k, v in value.items()}
        return str(value)
    except (TypeError, ValueError):
        raise InputError(source, f"{name}: {value!r} is not a valid {t}") from None


def _option_text(v: object) -> str:
    if isinstance(v, bool):
        return "True" if v else "False"
    return "" if v is None else str(v)


def config_from_mapping(data: Mapping[str, object], source: str | None = None) -> ItConfig:
    """An :class:`ItConfig` from a mapping of field names (and raw ``__`` keys).

    relion_it's own keys (``do_prep``, ``do_proc``, ``prep__importmovies__angpix``...) are accepted.

    Raises
    ------
    InputError
        An unknown key or a value of the wrong type.
    """
    values: dict[str, object] = {}
    options: dict[str, str] = {}
    for key, value in data.items():
        key = str(key)
        if key == "options":
            options.update(_convert("options", value, source))  # type: ignore[arg-type]
        elif "__" in key:
            options[key] = _option_text(value)
        elif key == "do_auto_boxsize":
            continue  # relion_it's switch: we derive whatever is not given
        elif key in _FIELDS:
            values[key] = _convert(key, value, source)
        else:
            raise InputError(source, f"unknown setting {key!r} (known: {', '.join(sorted(_FIELDS))})")
    if options:
        values["options"] = options
    cfg = ItConfig(**values)  # type: ignore[arg-type]
    if cfg.picker not in ("log", "topaz"):
        raise InputError(source, f"picker must be 'log' or 'topaz', not {cfg.picker!r}")
    return cfg


def load_it_config(path: str | Path) -> ItConfig:
    """Read a YAML configuration, or a relion_it options file (a Python dict literal, ``.py``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(path, "no such configuration file") from None
    try:
        data = ast.literal_eval(text) if path.suffix == ".py" else yaml.safe_load(text)
    except (SyntaxError, ValueError, yaml.YAMLError) as exc:
        raise InputError(path, f"cannot parse: {str(exc).splitlines()[0]}") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise InputError(path, "must hold a mapping of settings")
    return config_from_mapping(data, str(path))


def box_sizes(cfg: ItConfig) -> tuple[float, int, int]:
    """(mask diameter in A, box in px, down-scaled box in px), derived as relion_it does where not given."""
    angpix = cfg.pixel_size_a * (2.0 if cfg.super_resolution else 1.0)
    mask = cfg.mask_diameter_a if cfg.mask_diameter_a is not None else 1.1 * cfg.particle_diameter_a
    box = cfg.box_size_px
    if box is None:
        b = int(math.ceil(1.5 * cfg.particle_diameter_a / angpix))
        box = b + b % 2
    small = cfg.downscaled_box_px
    if small is None:
        small = box
        for candidate in DOWNSCALED_BOXES:
            if candidate > box:
                small = box
                break
            if angpix * box / candidate < 3.75:
                small = candidate
                break
        else:
            raise InputError(None, f"box size {box} px is too large for RELION's down-scaled sizes")
    return mask, box, small


def _num(x: float) -> str:
    return f"{x:g}"


def derive_options(cfg: ItConfig) -> dict[str, str]:
    """relion_it option keys -> values for ``cfg`` (raw ``cfg.options`` win)."""
    mask, box, small = box_sizes(cfg)
    log_pick = cfg.picker == "log"
    gpus = cfg.gpus.replace(" ", "")
    out = {
        "prep__importmovies__fn_in_raw": cfg.movies,
        "prep__importmovies__angpix": _num(cfg.pixel_size_a),
        "prep__importmovies__kV": _num(cfg.voltage_kv),
        "prep__importmovies__Cs": _num(cfg.cs_mm),
        "prep__importmovies__Q0": _num(cfg.amplitude_contrast),
        "prep__motioncorr__fn_gain_ref": cfg.gain,
        "prep__motioncorr__dose_per_frame": _num(cfg.dose_per_frame),
        "prep__motioncorr__bin_factor": "2" if cfg.super_resolution else "1",
        "prep__motioncorr__eer_grouping": str(cfg.eer_grouping),
        "prep__ctffind__do_phaseshift": "Yes" if cfg.phase_plate else "No",
        "prep__do_at_most": str(cfg.movies_per_pass),
        "prep__wait_sec": _num(cfg.wait_sec),
        "prep__maxtime_hr": _num(cfg.maxtime_hr),
        "proc__wait_sec": _num(cfg.wait_sec),
        "proc__maxtime_hr": _num(cfg.maxtime_hr),
        "proc__select_mics__select_maxval": _num(cfg.ctf_max_resolution_a),
        "proc__do_log": "True" if log_pick else "False",
        "proc__topaz_model": cfg.topaz_model,
        "proc__autopick__log_diam_min": _num(cfg.log_diameter_ratio * cfg.particle_diameter_a),
        "proc__autopick__log_diam_max": _num(cfg.particle_diameter_a),
        "proc__autopick__log_adjust_thr": _num(cfg.log_threshold_adjust),
        "proc__autopick__topaz_particle_diameter": _num(cfg.particle_diameter_a),
        "proc__autopick__use_gpu": "No" if log_pick else "Yes",
        "proc__autopick__gpu_ids": gpus.split(",")[0],
        "proc__extract__extract_size": str(box),
        "proc__extract__rescale": str(small),
        "proc__extract__do_rescale": "Yes" if small != box else "No",
        "proc__extract__do_fom_threshold": "No" if log_pick else "Yes",
        "proc__extract__minimum_pick_fom": _num(cfg.topaz_min_fom),
        "proc__class2d__particle_diameter": _num(mask),
        "proc__class2d__nr_classes": str(cfg.class2d_classes),
        "proc__class2d__gpu_ids": gpus,
        "proc__class2d_iter": str(cfg.class2d_iterations),
        "proc__class2d_optimiser": f"Schemes/proc/class2d/run_it{cfg.class2d_iterations:03d}_optimiser.star",
        "proc__select_parts__rank_threshold": _num(cfg.class_score_threshold),
        "proc__min_nr_parts_3d": str(cfg.min_particles_3d),
        "proc__iniref": cfg.reference_3d or "None",
        "proc__inimodel3d__sym_name": cfg.symmetry,
        "proc__inimodel3d__particle_diameter": _num(mask),
        "proc__inimodel3d__gpu_ids": gpus,
        "proc__refine3d__sym_name": cfg.symmetry,
        "proc__refine3d__particle_diameter": _num(mask),
        "proc__refine3d__gpu_ids": gpus.replace(",", ":"),
    }
    if cfg.micrographs_ctf:
        out["proc__ctffind_mics"] = cfg.micrographs_ctf
    out.update(cfg.options)
    return out


def shipped_schemes_dir() -> Path:
    """Where autospa's own prep and proc schemes are: ``$AUTOSPA_SCHEMES_DIR``, the package's
    ``schemes`` data folder, or the repository's ``schemes/`` folder (editable installs)."""
    env = os.environ.get("AUTOSPA_SCHEMES_DIR")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve()
    candidates += [here.parents[1] / "schemes", here.parents[3] / "schemes"]
    for c in candidates:
        if (c / "prep" / "scheme.star").exists():
            return c
    raise InputError(None, "cannot find autospa's shipped schemes; set AUTOSPA_SCHEMES_DIR to the schemes/ folder")


def install_schemes(project_dir: str | Path, names: tuple[str, ...] = IT_SCHEMES, source: str | Path | None = None) -> list[str]:
    """Copy the shipped schemes into ``<project>/Schemes/`` where they are not there yet (as relion_it
    does); returns the names copied."""
    src = Path(source) if source is not None else shipped_schemes_dir()
    copied = []
    for name in names:
        dst = Path(project_dir) / "Schemes" / name
        if (dst / "scheme.star").exists():
            continue
        if not (src / name / "scheme.star").exists():
            raise InputError(src / name, "no scheme.star: not a scheme folder")
        copy_scheme_folder(src / name, dst)
        copied.append(name)
    return copied


def apply_options(project_dir: str | Path, options: Mapping[str, str], lock_wait_s: float = 60.0) -> dict[str, int]:
    """Write relion_it option keys into the project's schemes (variables: value and reset value;
    job options: the template). Keys without ``__`` are ignored; a scheme not in the project is
    skipped with a warning.

    Returns
    -------
    dict
        Scheme -> number of settings written.

    Raises
    ------
    InputError
        A variable or job option the scheme does not have, or a value of the wrong type.
    """
    project = Path(project_dir)
    by_scheme: dict[str, list[tuple[list[str], str]]] = {}
    for key, value in options.items():
        parts = key.split("__")
        if len(parts) not in (2, 3) or not all(parts):
            continue
        by_scheme.setdefault(parts[0], []).append((parts[1:], value))
    counts: dict[str, int] = {}
    for name, items in by_scheme.items():
        sdir = project / "Schemes" / name
        if not (sdir / "scheme.star").exists():
            log.warning("scheme %s is not in %s: %d setting(s) for it skipped", name, project, len(items))
            continue
        with locked(scheme_lock(project, name), lock_wait_s):
            scheme = read_scheme(sdir)
            templates = {}
            for path, value in items:
                if len(path) == 1:
                    var = path[0]
                    if var not in scheme.variables:
                        raise InputError(sdir / "scheme.star", f"{name}__{var}: the scheme has no variable {var!r}")
                    try:
                        scheme = scheme.with_value(var, value, value)
                    except SchemeError as exc:
                        raise InputError(sdir / "scheme.star", f"{name}__{var}: {exc}") from None
                else:
                    job, opt = path
                    if job not in templates:
                        if job not in scheme.jobs:
                            raise InputError(sdir / "scheme.star", f"{name}__{job}__{opt}: the scheme has no job {job!r}")
                        templates[job] = read_job_template(sdir / job)
                    tpl = templates[job]
                    if opt not in tpl.options:
                        raise InputError(sdir / job / "job.star", f"{name}__{job}__{opt}: the job has no option {opt!r}")
                    v = {"True": "Yes", "true": "Yes", "False": "No", "false": "No"}.get(value, value)
                    templates[job] = tpl.with_option(opt, v)
            for job, tpl in templates.items():
                write_job_template(sdir / job / "job.star", tpl)
            write_scheme(sdir, scheme)
        counts[name] = len(items)
    return counts


def save_config(project_dir: str | Path, cfg: ItConfig, options: Mapping[str, str]) -> Path:
    """Record the configuration used (``autospa_it.yaml``, like relion_it_options.py)."""
    data = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "options"}
    data["options"] = dict(sorted(options.items()))
    path = Path(project_dir) / "autospa_it.yaml"
    write_text(path, yaml.safe_dump(data, sort_keys=False))
    return path


def prepare_it(
    project_dir: str | Path, cfg: ItConfig, reset: bool = False, schemes_source: str | Path | None = None
) -> tuple[str, ...]:
    """Install the schemes, write the settings, optionally reset; returns the schemes to run."""
    names = tuple(n for n, on in zip(IT_SCHEMES, (cfg.do_prep, cfg.do_proc), strict=True) if on)
    # as relion_it: both schemes are installed and configured, whichever of them runs now
    install_schemes(project_dir, IT_SCHEMES, schemes_source)
    options = derive_options(cfg)
    apply_options(project_dir, options)
    save_config(project_dir, cfg, options)
    if reset:
        for name in names:
            reset_scheme(name, project_dir)
    return names


def run_together(
    names: tuple[str, ...],
    run_one: Callable[[str], RunResult],
) -> dict[str, RunResult | BaseException]:
    """Run ``run_one(name)`` for every scheme at once (one thread each); wait for all."""
    if not names:
        return {}
    out: dict[str, RunResult | BaseException] = {}
    with ThreadPoolExecutor(max_workers=len(names), thread_name_prefix="scheme") as pool:
        futures = {n: pool.submit(contextvars.copy_context().run, run_one, n) for n in names}
        for n, fut in futures.items():
            try:
                out[n] = fut.result()
            except BaseException as exc:  # one scheme's error must not hide the other's result
                out[n] = exc
    return out


def launch_it(
    project_dir: str | Path, names: tuple[str, ...], settings: RunSettings | None = None
) -> dict[str, RunResult | BaseException]:
    """Run the schemes together without Prefect (see :mod:`autospa.orchestration.prefect_flows`)."""
    return run_together(names, lambda n: run_scheme(n, project_dir, settings))


def it_status(project_dir: str | Path, names: tuple[str, ...] = IT_SCHEMES) -> list[SchemeStatus]:
    """Where each scheme of ``autospa it`` is."""
    return [scheme_status(n, project_dir) for n in names]
