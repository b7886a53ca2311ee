"""The session report (L3): one HTML page with figures about a whole project, as a facility user
reads it after (or during) an automated run.

:func:`gather_report_data` reads what the jobs of a RELION-layout project directory wrote (through
:mod:`autospa.io`); :func:`build_report` turns that into the page and its figures (PNG bytes);
:func:`session_report` does both. Nothing here writes a file: :func:`autospa.io.report_files.write_report`
does (``autospa report``).

Sections, each from the newest job of its kind (the newest that succeeded, if any did):

=====================  =============================================================================
acquisition            MDCatch's ``session.json`` (``autospa mdcatch watch --out PROJECT``) when the
                       project has one; else the Import job's movies.star optics and ``autospa it``'s
                       ``autospa_it.yaml``
motion and CTF         MotionCorr ``corrected_micrographs.star`` (rlnAccumMotionTotal/Early/Late) and
                       CtfFind ``micrographs_ctf.star`` (rlnDefocusU/V, rlnCtfMaxResolution,
                       rlnCtfFigureOfMerit), one row per micrograph; Select ``micrographs.star`` marks
                       the micrographs that passed the CTF selection
picks                  AutoPick ``autopick.star`` and its coordinate files: picks per micrograph and
                       the first micrograph with picks, its picks circled; Extract ``particles.star``
2D classes             the class ranker's output (Select job with ``rank_model.star``: rlnClassScore,
                       ``backup_selection.star``), gallery sorted by score with the selection framed
                       green; without a ranker job the newest Class2D iteration sorted by size
initial model          InitialModel ``initial_model.mrc``: central slices
final map and FSC      Refine3D ``run_class001.mrc`` (central slices); the FSC of the newest
                       ``postprocess.star`` (data_general rlnFinalResolution, data_fsc) of a
                       PostProcess job or of a Refine3D job (ours post-processes its half maps),
                       else the Refine3D job's ``run_model.star`` (rlnGoldStandardFsc,
                       rlnCurrentResolution)
time per stage         every job's launch (its ``job.star``) to its ``RELION_JOB_EXIT_*`` file
=====================  =============================================================================

A section whose inputs are missing is replaced by a one-line "not run" note. The numbers the page
shows are in :class:`ReportData` and carry ``id`` attributes in the HTML (``n-micrographs``,
``mean-defocus``, ``final-resolution`` ...), so that tests and scripts can read them back.
"""

from __future__ import annotations

import datetime as _dt
import html
import io
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from autospa.errors import AutospaError, InputError  # noqa: E402
from autospa.io.mrc import read_mrc  # noqa: E402
from autospa.io.postprocess_files import read_postprocess_star  # noqa: E402
from autospa.io.preprocess_files import read_coordinate_index, read_coordinates, read_micrograph  # noqa: E402
from autospa.io.ranker_files import read_class2d_job  # noqa: E402
from autospa.io.report_files import job_times, resolve_project_file, scan_job_directories  # noqa: E402
from autospa.io.scheme_files import read_exit_status, read_job_template, read_pipeline, read_scheme  # noqa: E402
from autospa.io.session_files import read_pipeline_config, read_session_json  # noqa: E402
from autospa.io.star import read_star  # noqa: E402
from autospa.report.class_gallery import class_gallery_png  # noqa: E402
from autospa.report.fsc_plot import fsc_plot_png  # noqa: E402
from autospa.report.preprocess_plots import picks_png  # noqa: E402
from autospa.scheme.pipeline import PROCESS_DIRECTORIES  # noqa: E402

log = logging.getLogger(__name__)

__all__ = [
    "ClassesInfo", "FIGURES", "central_slices", "FscInfo", "JobInfo", "MapInfo", "PicksInfo", "ReportData", "SessionReport",
    "build_report", "gather_report_data", "map_slices_png", "motion_ctf_png", "session_report", "stage_times", "timing_png",
]

#: Figure file names, per section.
FIGURES = {
    "micrographs": "motion_ctf.png",
    "picks": "picks.png",
    "classes": "class_gallery.png",
    "initial_model": "initial_model.png",
    "final_map": "final_map.png",
    "fsc": "fsc.png",
    "timing": "timing.png",
}
#: Resolution (dots per inch) of the report's own figures.
DPI = 100
#: Size in inches of the motion/CTF figure and of a map-slices figure.
MOTION_CTF_SIZE_IN = (10.0, 7.0)
MAP_SLICES_SIZE_IN = (9.0, 3.4)
#: Micrograph rows listed in the HTML table (the figure shows all of them).
MAX_TABLE_ROWS = 500
#: Coordinate files read for the picks per micrograph (beyond: the extracted particles are counted).
MAX_COORDINATE_FILES = 2000

_DIR_FAMILY = {v: k for k, v in PROCESS_DIRECTORIES.items()}
_STATUS_FROM_EXIT = {"SUCCESS": "Succeeded", "FAILURE": "Failed", "ABORTED": "Aborted"}


# ================================================================================================
# data
# ================================================================================================
@dataclass(frozen=True)
class JobInfo:
    """One job of the project.

    Attributes
    ----------
    name
        Job directory, ``"CtfFind/job003/"``.
    type_label
        ``relion.ctffind.ctffind4`` (from the pipeline or job.star; ``relion.<family>`` if unknown).
    status
        ``Succeeded``, ``Failed``, ``Aborted``, ``Running`` (exit file first, then the pipeline).
    node
        The scheme node that ran it (``prep/ctffind``), or ``None``.
    launched, ended
        POSIX times (see :func:`autospa.io.report_files.job_times`).
    """

    name: str
    type_label: str
    status: str
    node: str | None = None
    launched: float | None = None
    ended: float | None = None

    @property
    def family(self) -> str:
        """The job family (``ctffind``) of ``relion.ctffind.ctffind4``."""
        parts = self.type_label.split(".")
        return parts[1] if len(parts) > 1 and parts[0] == "relion" else _DIR_FAMILY.get(self.name.split("/")[0], "external")

    @property
    def number(self) -> int:
        """The job number (3 for ``CtfFind/job003/``)."""
        try:
            return int(self.name.rstrip("/").rsplit("job", 1)[1])
        except (IndexError, ValueError):
            return 0

    @property
    def seconds(self) -> float | None:
        """Run time of the (last visit of the) job, or ``None``."""
        if self.launched is None or self.ended is None or self.ended < self.launched:
            return None
        return self.ended - self.launched


@dataclass
class PicksInfo:
    """Particle picking and extraction.

    Attributes
    ----------
    job
        The AutoPick job (``None`` when only extraction is known).
    total
        Picks over all micrographs (``None`` when not counted).
    micrograph, image, coords_px, diameter_px
        The micrograph drawn, its ``(h, w)`` image (``None`` if unreadable), its ``(k, 2)`` picks
        and the circle diameter in pixels.
    extract_job, n_particles, box_px, particle_pixel_size_a
        Extraction (``None`` when it has not run).
    """

    job: str | None
    total: int | None
    micrograph: str | None = None
    image: np.ndarray | None = None
    coords_px: np.ndarray | None = None
    diameter_px: float = 0.0
    extract_job: str | None = None
    n_particles: int | None = None
    box_px: int | None = None
    particle_pixel_size_a: float | None = None


@dataclass
class ClassesInfo:
    """2D classes as the gallery shows them.

    Attributes
    ----------
    class2d_job, rank_job
        The Class2D job and the ranker's Select job (``None`` without ranking).
    iteration
        Iteration of the class averages shown (``None`` if unknown).
    images
        ``(K, D, D)`` class averages.
    distribution, resolution_a
        ``(K,)`` rlnClassDistribution and rlnEstimatedResolution.
    scores, selected
        ``(K,)`` rlnClassScore (-999: not scored) and the selection, or ``None`` without ranking.
    order
        0-based class indices in display order (descending score, else descending size).
    n_particles, n_selected_particles
        Particles classified and particles in the selected classes.
    """

    class2d_job: str | None
    rank_job: str | None
    iteration: int | None
    images: np.ndarray
    distribution: np.ndarray
    resolution_a: np.ndarray | None
    scores: np.ndarray | None
    selected: np.ndarray | None
    order: np.ndarray
    n_particles: int | None = None
    n_selected_particles: int | None = None

    @property
    def n_classes(self) -> int:
        return int(self.images.shape[0])


@dataclass
class MapInfo:
    """A 3D map: its job, file, ``(D, D, D)`` data and voxel size (Angstrom)."""

    job: str
    path: Path
    volume: np.ndarray
    pixel_size_a: float


@dataclass
class FscInfo:
    """An FSC curve and the resolution it gives.

    Attributes
    ----------
    job, source
        The job and the file read.
    frequency
        ``(S,)`` spatial frequency (1/A).
    curves
        Legend -> ``(S,)`` FSC (the first is the one the resolution comes from).
    resolution_a
        rlnFinalResolution (or rlnCurrentResolution of a refinement's model).
    """

    job: str
    source: Path
    frequency: np.ndarray
    curves: dict[str, np.ndarray]
    resolution_a: float


@dataclass
class ReportData:
    """Everything the report shows; ``None`` marks a stage that has not run.

    Attributes
    ----------
    project
        The project directory.
    jobs
        Every job found, by job number.
    acquisition
        ``(key, label, value)`` rows and their source (a file), or ``None``.
    micrographs
        One row per micrograph: ``micrograph``, ``motion_total``, ``motion_early``, ``motion_late``
        (Angstrom), ``defocus_u``, ``defocus_v``, ``defocus_angle``, ``defocus`` (mean of U and V),
        ``astigmatism`` (Angstrom), ``ctf_max_res`` (Angstrom), ``ctf_fom``, ``picks``, ``selected``.
    n_movies
        Movies imported.
    motion_job, ctf_job, select_job
        The jobs the micrograph table comes from.
    ctf_max_res_cut
        The selection's upper limit on rlnCtfMaxResolution (Angstrom), when known.
    picks, classes, initial_model, final_map, fsc
        Later stages.
    notes
        Section -> why it is not shown.
    """

    project: Path
    jobs: list[JobInfo]
    acquisition: list[tuple[str, str, str]] | None = None
    acquisition_source: str | None = None
    micrographs: pd.DataFrame | None = None
    n_movies: int | None = None
    motion_job: str | None = None
    ctf_job: str | None = None
    select_job: str | None = None
    ctf_max_res_cut: float | None = None
    picks: PicksInfo | None = None
    classes: ClassesInfo | None = None
    initial_model: MapInfo | None = None
    final_map: MapInfo | None = None
    fsc: FscInfo | None = None
    notes: dict[str, str] = field(default_factory=dict)

    def job(self, name: str | None) -> JobInfo | None:
        """The job called ``name`` (``"CtfFind/job003/"``)."""
        for j in self.jobs:
            if j.name == name:
                return j
        return None


@dataclass
class SessionReport:
    """The page and its figures (file name -> PNG bytes), with the data they show."""

    html: str
    figures: dict[str, bytes]
    data: ReportData


# ================================================================================================
# gathering
# ================================================================================================
def _frame(block) -> pd.DataFrame | None:
    if isinstance(block, pd.DataFrame):
        return block.reset_index(drop=True)
    if isinstance(block, dict) and block:
        return pd.DataFrame([block])
    return None


def _general(block) -> dict:
    if isinstance(block, dict):
        return block
    if isinstance(block, pd.DataFrame) and len(block):
        return block.iloc[0].to_dict()
    return {}


def _float(v, default: float | None = None) -> float | None:
    try:
        x = float(str(v).strip().strip('"'))
    except (TypeError, ValueError):
        return default
    return x if math.isfinite(x) else default


def _project_jobs(project: Path) -> list[JobInfo]:
    pipeline = read_pipeline(project)
    listed = {p.name: p for p in pipeline.processes}
    names = set(listed) | set(scan_job_directories(project))
    nodes: dict[str, str] = {}
    schemes = project / "Schemes"
    if schemes.is_dir():
        for folder in sorted(schemes.iterdir()):
            if not (folder / "scheme.star").is_file():
                continue
            try:
                scheme = read_scheme(folder)
            except AutospaError as exc:
                log.warning("report: %s", exc)
                continue
            for node, job in scheme.jobs.items():
                if job.job_dir:
                    nodes[job.job_dir] = f"{folder.name}/{node}"
    jobs = []
    for name in names:
        d = project / name
        proc = listed.get(name)
        type_label = proc.type_label if proc is not None else ""
        if not type_label and (d / "job.star").is_file():
            try:
                type_label = read_job_template(d / "job.star").type_label
            except AutospaError:
                type_label = ""
        if not type_label:
            type_label = f"relion.{_DIR_FAMILY.get(name.split('/')[0], 'external')}"
        exit_status = read_exit_status(d) if d.is_dir() else None
        status = _STATUS_FROM_EXIT.get(exit_status or "", proc.status if proc is not None else "Running")
        launched, ended = job_times(d) if d.is_dir() else (None, None)
        jobs.append(JobInfo(name, type_label, status, nodes.get(name), launched, ended))
    return sorted(jobs, key=lambda j: (j.number, j.name))


def _newest(project: Path, jobs: Sequence[JobInfo], families: Sequence[str], has: Callable[[Path], bool]) -> JobInfo | None:
    """The newest job of ``families`` for which ``has(job_dir)``; a succeeded one if any is."""
    cands = [j for j in jobs if j.family in families and (project / j.name).is_dir() and has(project / j.name)]
    if not cands:
        return None
    ok = [j for j in cands if j.status == "Succeeded"]
    return max(ok or cands, key=lambda j: j.number)


def _has(name: str) -> Callable[[Path], bool]:
    return lambda d: (d / name).is_file()


def _job_option(project: Path, job: str, key: str) -> str | None:
    p = project / job / "job.star"
    if not p.is_file():
        return None
    try:
        return read_job_template(p).options.get(key)
    except AutospaError:
        return None


def _acquisition(project: Path, jobs: Sequence[JobInfo], session_json: Path | None) -> tuple[list, str] | None:
    rows: list[tuple[str, str, str]] = []
    source = None
    path = session_json if session_json is not None else project / "session.json"
    if path.is_file():
        try:
            state = read_session_json(path)
        except AutospaError as exc:
            log.warning("report: %s", exc)
            state = None
        if state and state.get("reference"):
            source = str(path)
            meta = state["reference"].get("metadata") or {}
            derived = state.get("derived") or {}
            movies = state.get("movies") or []

            def add(key: str, label: str, value, fmt: str = "{}") -> None:
                if value is not None and value != "" and value != []:
                    rows.append((key, label, fmt.format(value)))

            add("software", "Acquisition software",
                " ".join(str(v) for v in (state.get("software") or meta.get("software"), meta.get("software_version")) if v))
            add("microscope", "Microscope", meta.get("microscope_name") or meta.get("microscope_id"))
            det = " ".join(str(v) for v in (meta.get("detector_name") or meta.get("detector_model"), meta.get("detector_mode")) if v)
            add("detector", "Detector", det)
            add("voltage", "Voltage (kV)", meta.get("voltage_kv"), "{:g}")
            add("cs", "Spherical aberration (mm)", meta.get("cs_mm"), "{:g}")
            add("magnification", "Magnification", meta.get("magnification"))
            add("pixel-size", "Pixel size (A)", meta.get("pixel_size_a"), "{:.4g}")
            if meta.get("image_width_px") and meta.get("image_height_px"):
                add("movie-size", "Movie size (pixels)", f"{meta['image_width_px']} x {meta['image_height_px']}")
            add("frames", "Frames per movie", meta.get("n_frames"))
            add("exposure", "Exposure time (s)", meta.get("exposure_time_s"), "{:.3g}")
            add("total-dose", "Total dose (e/A^2)", meta.get("total_dose_e_a2"), "{:.3g}")
            add("dose-per-frame", "Dose per frame (e/A^2)", derived.get("dose_per_frame_e_a2") or meta.get("dose_per_frame_e_a2"),
                "{:.3g}")
            add("particle-diameter", "Particle diameter (A)", derived.get("particle_diameter_a"), "{:g}")
            add("n-movies", "Movies ingested", len(movies))
            add("optics-groups", "Optics groups", len(state.get("optics_groups") or []))
            add("drift-flags", "Drift flags", len(state.get("drift") or []))
            stamps = sorted(str(m["timestamp"]) for m in movies if m.get("timestamp"))
            if stamps:
                add("first-movie", "First movie", stamps[0])
                add("last-movie", "Last movie", stamps[-1])
                try:
                    t0, t1 = _dt.datetime.fromisoformat(stamps[0]), _dt.datetime.fromisoformat(stamps[-1])
                    hours = (t1 - t0).total_seconds() / 3600.0
                    if hours > 0 and len(stamps) > 1:
                        add("movies-per-hour", "Movies per hour", (len(stamps) - 1) / hours, "{:.0f}")
                except ValueError:
                    pass
    if rows:
        return rows, source
    # fallback: the Import job's optics table and autospa it's settings
    imp = _newest(project, jobs, ("import",), lambda d: (d / "movies.star").is_file() or (d / "micrographs.star").is_file())
    if imp is not None:
        name = "movies.star" if (project / imp.name / "movies.star").is_file() else "micrographs.star"
        blocks = read_star(project / imp.name / name)
        optics = _frame(blocks.get("optics"))
        table = _frame(blocks.get("movies" if name == "movies.star" else "micrographs"))
        source = str(project / imp.name / name)
        if optics is not None and len(optics):
            o = optics.iloc[0]
            for key, label, col in (("pixel-size", "Pixel size (A)", "rlnMicrographOriginalPixelSize"),
                                    ("voltage", "Voltage (kV)", "rlnVoltage"),
                                    ("cs", "Spherical aberration (mm)", "rlnSphericalAberration"),
                                    ("q0", "Amplitude contrast", "rlnAmplitudeContrast")):
                if col in optics:
                    rows.append((key, label, f"{float(o[col]):.4g}"))
            rows.append(("optics-groups", "Optics groups", str(len(optics))))
        rows.append(("n-movies", "Movies imported", str(0 if table is None else len(table))))
    cfg_path = project / "autospa_it.yaml"
    if cfg_path.is_file():
        try:
            cfg = read_pipeline_config(cfg_path)
        except AutospaError:
            cfg = {}
        have = {r[0] for r in rows}
        for key, label, k in (("dose-per-frame", "Dose per frame (e/A^2)", "dose_per_frame"),
                              ("particle-diameter", "Particle diameter (A)", "particle_diameter_a"),
                              ("symmetry", "Symmetry", "symmetry")):
            if key not in have and cfg.get(k) not in (None, ""):
                rows.append((key, label, f"{cfg[k]:g}" if isinstance(cfg[k], float) else str(cfg[k])))
        source = f"{source}, {cfg_path}" if source else str(cfg_path)
    return (rows, source) if rows else None


_MOTION_COLS = {"rlnAccumMotionTotal": "motion_total", "rlnAccumMotionEarly": "motion_early", "rlnAccumMotionLate": "motion_late"}
_CTF_COLS = {"rlnDefocusU": "defocus_u", "rlnDefocusV": "defocus_v", "rlnDefocusAngle": "defocus_angle",
             "rlnCtfMaxResolution": "ctf_max_res", "rlnCtfFigureOfMerit": "ctf_fom"}


def _micrograph_rows(path: Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    blocks = read_star(path)
    if "micrographs" not in blocks:
        raise InputError(path, "no data_micrographs table")
    rows = _frame(blocks.get("micrographs"))
    if rows is None or (rows.empty and "rlnMicrographName" not in rows):  # an empty loop: no micrograph yet
        rows = pd.DataFrame({"rlnMicrographName": pd.Series(dtype=str)})
    if "rlnMicrographName" not in rows:
        raise InputError(path, "data_micrographs has no rlnMicrographName column")
    rows = rows.copy()
    rows["rlnMicrographName"] = rows["rlnMicrographName"].astype(str)
    return rows, _frame(blocks.get("optics"))


def _micrographs(project: Path, jobs: Sequence[JobInfo], data: ReportData) -> None:
    mc = _newest(project, jobs, ("motioncorr",), _has("corrected_micrographs.star"))
    ctf = _newest(project, jobs, ("ctffind",), _has("micrographs_ctf.star"))
    imp = _newest(project, jobs, ("import",), _has("movies.star"))
    if imp is not None:
        movies = _frame(read_star(project / imp.name / "movies.star").get("movies"))
        data.n_movies = 0 if movies is None else len(movies)
    if mc is None and ctf is None:
        data.notes["micrographs"] = "no MotionCorr job with corrected_micrographs.star and no CtfFind job with micrographs_ctf.star"
        return
    table = pd.DataFrame({"micrograph": pd.Series(dtype=str)})
    if mc is not None:
        rows, _ = _micrograph_rows(project / mc.name / "corrected_micrographs.star")
        part = pd.DataFrame({"micrograph": rows["rlnMicrographName"]})
        for src, dst in _MOTION_COLS.items():
            part[dst] = rows[src].astype(float) if src in rows else np.nan
        table = part
    if ctf is not None:
        rows, _ = _micrograph_rows(project / ctf.name / "micrographs_ctf.star")
        part = pd.DataFrame({"micrograph": rows["rlnMicrographName"]})
        for src, dst in _CTF_COLS.items():
            part[dst] = rows[src].astype(float) if src in rows else np.nan
        if mc is None:
            for src, dst in _MOTION_COLS.items():
                part[dst] = rows[src].astype(float) if src in rows else np.nan
            table = part
        else:
            table = table.merge(part, on="micrograph", how="outer", sort=False)
    for col in list(_MOTION_COLS.values()) + list(_CTF_COLS.values()):
        if col not in table:
            table[col] = np.nan
    table["defocus"] = 0.5 * (table["defocus_u"] + table["defocus_v"])
    table["astigmatism"] = (table["defocus_u"] - table["defocus_v"]).abs()
    table["picks"] = np.nan
    table["selected"] = pd.Series([pd.NA] * len(table), dtype="boolean")
    sel = _newest(project, jobs, ("select",), _has("micrographs.star"))
    if sel is not None:
        rows, _ = _micrograph_rows(project / sel.name / "micrographs.star")
        table["selected"] = table["micrograph"].isin(set(rows["rlnMicrographName"])).astype("boolean")
        data.select_job = sel.name
        if str(_job_option(project, sel.name, "select_label") or "").strip() == "rlnCtfMaxResolution":
            data.ctf_max_res_cut = _float(_job_option(project, sel.name, "select_maxval"))
    data.micrographs = table.reset_index(drop=True)
    data.motion_job = None if mc is None else mc.name
    data.ctf_job = None if ctf is None else ctf.name


def _micrograph_pixel_size(project: Path, data: ReportData) -> float | None:
    for job, name in ((data.ctf_job, "micrographs_ctf.star"), (data.motion_job, "corrected_micrographs.star")):
        if job is None:
            continue
        optics = _frame(read_star(project / job / name).get("optics"))
        if optics is not None and "rlnMicrographPixelSize" in optics and len(optics):
            return float(optics["rlnMicrographPixelSize"].iloc[0])
    return None


def _picks(project: Path, jobs: Sequence[JobInfo], data: ReportData) -> None:
    pick = _newest(project, jobs, ("autopick",), _has("autopick.star"))
    ext = _newest(project, jobs, ("extract",), _has("particles.star"))
    if pick is None and ext is None:
        data.notes["picks"] = "no AutoPick job with autopick.star and no Extract job with particles.star"
        return
    info = PicksInfo(job=None if pick is None else pick.name, total=None)
    counts: dict[str, int] = {}
    if pick is not None:
        index = read_coordinate_index(project / pick.name / "autopick.star")
        shown = None
        if len(index) <= MAX_COORDINATE_FILES:
            for mic, cfile in zip(index["rlnMicrographName"], index["rlnMicrographCoordinates"], strict=True):
                path = resolve_project_file(project, cfile, project / pick.name)
                if path is None:
                    continue
                coords = read_coordinates(path)[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(np.float64)
                counts[str(mic)] = len(coords)
                if shown is None and len(coords):
                    shown = (str(mic), coords)
            info.total = int(sum(counts.values()))
        if shown is not None:
            info.micrograph, info.coords_px = shown
            mpath = resolve_project_file(project, shown[0])
            pixel = _micrograph_pixel_size(project, data)
            if mpath is not None:
                try:
                    info.image, header_pixel = read_micrograph(mpath)
                    pixel = pixel or header_pixel or None
                except AutospaError as exc:
                    log.warning("report: %s", exc)
            diam_a = None
            for key in ("log_diam_max", "topaz_particle_diameter", "particle_diameter"):
                diam_a = _float(_job_option(project, pick.name, key))
                if diam_a and diam_a > 0:
                    break
            if diam_a and pixel:
                info.diameter_px = diam_a / pixel
            elif info.image is not None:
                info.diameter_px = 0.05 * max(info.image.shape)
    if ext is not None:
        blocks = read_star(project / ext.name / "particles.star")
        parts = _frame(blocks.get("particles"))
        optics = _frame(blocks.get("optics"))
        info.extract_job = ext.name
        info.n_particles = 0 if parts is None else len(parts)
        if optics is not None and len(optics):
            if "rlnImageSize" in optics:
                info.box_px = int(optics["rlnImageSize"].iloc[0])
            if "rlnImagePixelSize" in optics:
                info.particle_pixel_size_a = float(optics["rlnImagePixelSize"].iloc[0])
        if not counts and parts is not None and "rlnMicrographName" in parts:
            counts = parts["rlnMicrographName"].astype(str).value_counts().to_dict()
    if data.micrographs is not None and counts:
        data.micrographs["picks"] = data.micrographs["micrograph"].map(counts).astype(float)
    data.picks = info


def _class_images(project: Path, refs: Sequence[str], beside: Path) -> np.ndarray | None:
    stacks: dict[Path, np.ndarray] = {}
    out = []
    for ref in refs:
        if "@" not in str(ref):
            return None
        idx, name = str(ref).split("@", 1)
        path = resolve_project_file(project, name, beside)
        if path is None:
            return None
        if path not in stacks:
            arr, _ = read_mrc(path)
            stacks[path] = arr[None] if arr.ndim == 2 else arr
        i = int(idx) - 1
        if not 0 <= i < stacks[path].shape[0]:
            return None
        out.append(np.asarray(stacks[path][i], np.float32))
    return np.stack(out) if out else None


def _iteration_of(name: str) -> int | None:
    stem = Path(name).name
    if "_it" in stem:
        digits = stem.split("_it", 1)[1][:3]
        if digits.isdigit():
            return int(digits)
    return None


def _last_optimiser(job_dir: Path) -> Path | None:
    opts = sorted(p for p in job_dir.glob("run_it[0-9][0-9][0-9]_optimiser.star") if _iteration_of(p.name))
    return opts[-1] if opts else None


def _classes(project: Path, jobs: Sequence[JobInfo], data: ReportData) -> None:
    rank = _newest(project, jobs, ("select",), _has("rank_model.star"))
    c2d = _newest(project, jobs, ("class2d",), lambda d: _last_optimiser(d) is not None)
    if rank is not None:
        rdir = project / rank.name
        model = _frame(read_star(rdir / "rank_model.star").get("model_classes"))
        if model is not None and {"rlnReferenceImage", "rlnClassScore"} <= set(model.columns) and len(model):
            images = _class_images(project, model["rlnReferenceImage"].astype(str).tolist(), rdir)
            if images is not None:
                scores = model["rlnClassScore"].to_numpy(np.float64)
                k = len(model)
                dist = model["rlnClassDistribution"].to_numpy(np.float64) if "rlnClassDistribution" in model else np.full(k, 1.0 / k)
                res = model["rlnEstimatedResolution"].to_numpy(np.float64) if "rlnEstimatedResolution" in model else None
                selected = None
                if (rdir / "backup_selection.star").is_file():
                    block = next(iter(read_star(rdir / "backup_selection.star").values()), None)
                    sel = _frame(block)
                    if sel is not None and "rlnSelected" in sel and len(sel) == k:
                        selected = sel["rlnSelected"].to_numpy().astype(int) == 1
                n_sel = None
                if (rdir / "particles.star").is_file():
                    parts = _frame(read_star(rdir / "particles.star").get("particles"))
                    n_sel = 0 if parts is None else len(parts)
                n_all = None
                if (rdir / "rank_data.star").is_file():
                    parts = _frame(read_star(rdir / "rank_data.star").get("particles"))
                    n_all = 0 if parts is None else len(parts)
                first_ref = str(model["rlnReferenceImage"].iloc[0]).split("@", 1)[1]
                src = resolve_project_file(project, first_ref, rdir)
                src_job = None
                if src is not None:
                    try:
                        rel = src.resolve().relative_to(project.resolve())
                        src_job = "/".join(rel.parts[:2]) + "/"
                    except ValueError:
                        src_job = None
                order = np.argsort(-scores, kind="stable")
                data.classes = ClassesInfo(src_job or (None if c2d is None else c2d.name), rank.name, _iteration_of(first_ref),
                                           images, dist, res, scores, selected, order, n_all, n_sel)
                return
            log.warning("report: %s: the class averages it names cannot be read", rdir / "rank_model.star")
    if c2d is None:
        data.notes["classes"] = "no Class2D job with a run_itNNN_optimiser.star"
        return
    opt = _last_optimiser(project / c2d.name)
    job = read_class2d_job(opt)
    dist = job.classes_table["rlnClassDistribution"].to_numpy(np.float64)
    res = job.classes_table["rlnEstimatedResolution"].to_numpy(np.float64) if "rlnEstimatedResolution" in job.classes_table else None
    data.classes = ClassesInfo(c2d.name, None, _iteration_of(opt.name), job.classes, dist, res, None, None,
                               np.argsort(-dist, kind="stable"), len(job.particles), None)


def _map(project: Path, jobs: Sequence[JobInfo], families: Sequence[str], names: Sequence[str]) -> MapInfo | None:
    for name in names:
        job = _newest(project, jobs, families, _has(name))
        if job is None:
            continue
        path = project / job.name / name
        vol, pixel = read_mrc(path)
        if vol.ndim != 3:
            raise InputError(path, f"expected a 3D map, found shape {vol.shape}")
        return MapInfo(job.name, path, np.asarray(vol, np.float32), float(pixel))
    return None


_FSC_LABELS = (
    ("rlnFourierShellCorrelationCorrected", "corrected (solvent mask)"),
    ("rlnFourierShellCorrelationUnmaskedMaps", "unmasked maps"),
    ("rlnFourierShellCorrelationMaskedMaps", "masked maps"),
    ("rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps", "phase-randomised masked maps"),
)


def _fsc(project: Path, jobs: Sequence[JobInfo]) -> FscInfo | None:
    # the newest post-processing: a PostProcess job, or the one a Refine3D job runs on its half maps
    job = _newest(project, jobs, ("postprocess", "refine3d"), _has("postprocess.star"))
    if job is not None:
        path = project / job.name / "postprocess.star"
        general, fsc, _ = read_postprocess_star(path)
        fsc = _frame(fsc)
        res = _float(general.get("rlnFinalResolution"))
        if fsc is None or "rlnResolution" not in fsc or res is None:
            raise InputError(path, "data_fsc needs rlnResolution and data_general rlnFinalResolution")
        curves = {label: fsc[col].to_numpy(np.float64) for col, label in _FSC_LABELS if col in fsc}
        return FscInfo(job.name, path, fsc["rlnResolution"].to_numpy(np.float64), curves, res)
    job = _newest(project, jobs, ("refine3d",), _has("run_model.star"))
    if job is not None:
        path = project / job.name / "run_model.star"
        blocks = read_star(path)
        general = _general(blocks.get("model_general"))
        cls = _frame(blocks.get("model_class_1"))
        res = _float(general.get("rlnCurrentResolution"))
        if cls is not None and {"rlnResolution", "rlnGoldStandardFsc"} <= set(cls.columns) and res is not None:
            return FscInfo(job.name, path, cls["rlnResolution"].to_numpy(np.float64),
                           {"gold-standard FSC": cls["rlnGoldStandardFsc"].to_numpy(np.float64)}, res)
    return None


def gather_report_data(project_dir: str | Path, session_json: str | Path | None = None) -> ReportData:
    """Read what the project's jobs wrote.

    Parameters
    ----------
    project_dir
        A RELION-layout project directory (``default_pipeline.star``, ``Type/jobNNN/`` folders).
    session_json
        MDCatch's ``session.json`` (default: ``project_dir/session.json`` when it exists).

    Returns
    -------
    ReportData

    Raises
    ------
    InputError
        The project directory does not exist or holds no job, or a job's output file cannot be
        read.
    """
    project = Path(project_dir)
    if not project.is_dir():
        raise InputError(project, "project directory does not exist")
    jobs = _project_jobs(project)
    data = ReportData(project=project, jobs=jobs)
    acq = _acquisition(project, jobs, Path(session_json) if session_json is not None else None)
    if not jobs and acq is None:
        raise InputError(project, "not a project directory: no default_pipeline.star, no Type/jobNNN/ folder, no session.json")
    if acq is None:
        data.notes["acquisition"] = "no session.json (autospa mdcatch), Import job or autospa_it.yaml"
    else:
        data.acquisition, data.acquisition_source = acq
    _micrographs(project, jobs, data)
    _picks(project, jobs, data)
    _classes(project, jobs, data)
    data.initial_model = _map(project, jobs, ("initialmodel",), ("initial_model.mrc",))
    if data.initial_model is None:
        data.notes["initial_model"] = "no InitialModel job with initial_model.mrc"
    data.final_map = _map(project, jobs, ("refine3d",), ("run_class001.mrc",))
    data.fsc = _fsc(project, jobs)
    if data.final_map is None and data.fsc is None:
        data.notes["final_map"] = "no Refine3D job with run_class001.mrc and no PostProcess job with postprocess.star"
    if not any(j.seconds is not None for j in jobs):
        data.notes["timing"] = "no job with both a job.star and a RELION_JOB_EXIT_* file"
    return data


# ================================================================================================
# figures
# ================================================================================================
def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def motion_ctf_png(table: pd.DataFrame, ctf_max_res_cut: float | None = None) -> bytes:
    """PNG (``MOTION_CTF_SIZE_IN`` x ``DPI`` pixels) of motion and CTF per micrograph.

    Panels: accumulated motion (total, early, late), defocus U and V (micrometres), CTF maximum
    resolution (with the selection's cut-off, rejected micrographs in red), CTF figure of merit.

    Parameters
    ----------
    table
        :attr:`ReportData.micrographs`.
    ctf_max_res_cut
        The selection's upper limit on the CTF resolution (Angstrom), drawn as a line.
    """
    n = len(table)
    x = np.arange(1, n + 1)
    fig = Figure(figsize=MOTION_CTF_SIZE_IN)
    axes = [fig.add_subplot(2, 2, i + 1) for i in range(4)]
    style = dict(marker="o", ms=3, lw=0.8)
    for col, label in (("motion_total", "total"), ("motion_early", "early"), ("motion_late", "late")):
        if table[col].notna().any():
            axes[0].plot(x, table[col], label=label, **style)
    axes[0].set_ylabel("accumulated motion (A)")
    axes[0].set_title("motion per micrograph")
    for col, label in (("defocus_u", "defocus U"), ("defocus_v", "defocus V")):
        if table[col].notna().any():
            axes[1].plot(x, table[col] / 1e4, label=label, **style)
    axes[1].set_ylabel("defocus (um)")
    axes[1].set_title("defocus per micrograph")
    res = table["ctf_max_res"]
    if res.notna().any():
        axes[2].plot(x, res, color="tab:blue", **style)
        if "selected" in table and table["selected"].notna().any():
            rej = table["selected"].fillna(True).to_numpy(bool) == False  # noqa: E712
            if rej.any():
                axes[2].plot(x[rej], res[rej], "o", color="tab:red", ms=5, label="rejected")
        if ctf_max_res_cut is not None:
            axes[2].axhline(ctf_max_res_cut, color="grey", ls="--", lw=0.8, label=f"cut {ctf_max_res_cut:g} A")
    axes[2].set_ylabel("CTF max. resolution (A)")
    axes[2].set_title("CTF resolution per micrograph")
    if table["ctf_fom"].notna().any():
        axes[3].plot(x, table["ctf_fom"], color="tab:purple", **style)
    axes[3].set_ylabel("CTF figure of merit")
    axes[3].set_title("CTF fit quality")
    for ax in axes:
        ax.set_xlabel("micrograph")
        if n:
            ax.set_xlim(0.5, n + 0.5)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _png(fig)


def central_slices(volume: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The central planes of a ``(D, D, D)`` map (axes z, y, x): ``(v[D/2], v[:, D/2], v[:, :, D/2])``,
    i.e. the XY plane at z = D/2 ``(y, x)``, the XZ plane ``(z, x)`` and the YZ plane ``(z, y)``."""
    v = np.asarray(volume)
    if v.ndim != 3:
        raise InputError(None, f"map slices need a 3D map, got shape {v.shape}")
    cz, cy, cx = (s // 2 for s in v.shape)
    return v[cz], v[:, cy, :], v[:, :, cx]


def map_slices_png(volume: np.ndarray, title: str = "", pixel_size_a: float | None = None) -> bytes:
    """PNG (``MAP_SLICES_SIZE_IN`` x ``DPI`` pixels) of the central z, y and x slices of a map.

    Parameters
    ----------
    volume
        ``(D, D, D)`` map, axes (z, y, x).
    title
        Figure title.
    pixel_size_a
        Voxel size, for the axis note.
    """
    v = np.asarray(volume, dtype=np.float32)
    slices = tuple(zip(("central XY (z = D/2)", "central XZ (y = D/2)", "central YZ (x = D/2)"), central_slices(v), strict=True))
    lo, hi = np.percentile(v, [0.5, 99.5]) if np.ptp(v) > 0 else (0.0, 1.0)
    fig = Figure(figsize=MAP_SLICES_SIZE_IN)
    for i, (label, img) in enumerate(slices):
        ax = fig.add_subplot(1, 3, i + 1)
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, origin="lower")
        ax.set_title(label, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    note = f"{v.shape[2]}^3 voxels" + (f", {pixel_size_a:.3g} A/voxel" if pixel_size_a else "")
    fig.suptitle(f"{title} ({note})" if title else note, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def stage_times(jobs: Sequence[JobInfo]) -> list[tuple[str, int, float]]:
    """Time per stage: ``(stage, jobs, seconds)`` summed over the timed jobs of each stage, in the
    order the stages first ran. A stage is the scheme node that ran a job (``prep/motioncorr``), or
    the job type (``relion.postprocess``) for jobs run outside a scheme."""
    out: dict[str, list] = {}
    for j in sorted(jobs, key=lambda j: (j.number, j.name)):
        if j.seconds is None:
            continue
        key = j.node or j.type_label
        entry = out.setdefault(key, [0, 0.0])
        entry[0] += 1
        entry[1] += j.seconds
    return [(k, n, t) for k, (n, t) in out.items()]


def timing_png(labels: Sequence[str], seconds: Sequence[float]) -> bytes:
    """PNG of a horizontal bar per stage (800 x ``100 * (1.2 + 0.35 n)`` pixels for ``n`` stages)."""
    n = len(labels)
    fig = Figure(figsize=(8.0, 1.2 + 0.35 * n))
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(n)[::-1]
    vals = np.asarray(seconds, dtype=float)
    ax.barh(y, vals, color="tab:blue")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    unit = "min" if vals.size and vals.max() > 600 else "s"
    if unit == "min":
        ax.set_xticks(ax.get_xticks())
        ax.set_xticklabels([f"{t / 60:.0f}" for t in ax.get_xticks()])
    ax.set_xlabel(f"time ({unit})")
    ax.set_title("time per stage")
    fig.tight_layout()
    return _png(fig)


# ================================================================================================
# HTML
# ================================================================================================
_CSS = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1100px; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
p.not-run { color: #777; font-style: italic; }
img { max-width: 100%; border: 1px solid #eee; }
.small { color: #666; font-size: 0.85em; }
tr.rejected td { color: #a00; }
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _num(v, fmt: str = "{:.2f}") -> str:
    if v is None:
        return "-"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return _e(v)
    if not math.isfinite(f):
        return "-"
    return fmt.format(f)


def _mean(s: pd.Series) -> float | None:
    s = pd.to_numeric(s, errors="coerce").dropna()
    return float(s.mean()) if len(s) else None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _not_run(key: str, title: str, reason: str) -> str:
    return f'<p class="not-run" id="{_e(key)}-not-run">{_e(title)}: not run ({_e(reason)})</p>'


def _img(name: str, alt: str) -> str:
    return f'<p><img src="{_e(name)}" alt="{_e(alt)}"></p>'


def _summary_rows(data: ReportData) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    if data.n_movies is not None:
        rows.append(("n-movies", "Movies imported", str(data.n_movies)))
    t = data.micrographs
    if t is not None:
        rows.append(("n-micrographs", "Micrographs", str(len(t))))
        rows.append(("mean-motion", "Mean total motion (A)", _num(_mean(t["motion_total"]))))
        rows.append(("mean-defocus", "Mean defocus (A)", _num(_mean(t["defocus"]), "{:.0f}")))
        rows.append(("mean-ctf-resolution", "Mean CTF max. resolution (A)", _num(_mean(t["ctf_max_res"]))))
        if t["selected"].notna().any():
            rows.append(("n-selected-micrographs", "Micrographs passing the CTF selection", str(int(t["selected"].fillna(False).sum()))))
    p = data.picks
    if p is not None:
        if p.total is not None:
            rows.append(("n-picks", "Picks", str(p.total)))
        if p.n_particles is not None:
            rows.append(("n-particles", "Particles extracted", str(p.n_particles)))
    c = data.classes
    if c is not None:
        rows.append(("n-classes", "2D classes", str(c.n_classes)))
        if c.selected is not None:
            rows.append(("n-selected-classes", "2D classes selected", str(int(c.selected.sum()))))
        if c.n_selected_particles is not None:
            rows.append(("n-selected-particles", "Particles selected", str(c.n_selected_particles)))
    if data.fsc is not None:
        rows.append(("final-resolution", "Final resolution (A)", _num(data.fsc.resolution_a)))
    launched = [j.launched for j in data.jobs if j.launched is not None]
    ended = [j.ended for j in data.jobs if j.ended is not None]
    if launched and ended and max(ended) >= min(launched):
        rows.append(("elapsed", "First job launch to last job end (h:mm:ss)", _duration(max(ended) - min(launched))))
    return rows


def _kv_table(rows: Sequence[tuple[str, str, str]], table_id: str, prefix: str = "") -> str:
    body = "".join(f'<tr><th>{_e(label)}</th><td class="num" id="{_e(prefix + key)}">{_e(value)}</td></tr>'
                   for key, label, value in rows)
    return f'<table id="{_e(table_id)}">{body}</table>'


def _micrograph_table(t: pd.DataFrame) -> str:
    cols = (("micrograph", "micrograph", None), ("motion_total", "motion total (A)", "{:.2f}"),
            ("motion_early", "early (A)", "{:.2f}"), ("motion_late", "late (A)", "{:.2f}"),
            ("defocus_u", "defocus U (A)", "{:.0f}"), ("defocus_v", "defocus V (A)", "{:.0f}"),
            ("defocus_angle", "angle (deg)", "{:.1f}"), ("ctf_max_res", "CTF max. res. (A)", "{:.2f}"),
            ("ctf_fom", "FOM", "{:.3f}"), ("picks", "picks", "{:.0f}"))
    head = "<tr><th>#</th>" + "".join(f"<th>{_e(h)}</th>" for _, h, _f in cols) + "<th>selected</th></tr>"
    body = []
    for i, row in enumerate(t.head(MAX_TABLE_ROWS).itertuples(index=False)):
        r = row._asdict()
        sel = r["selected"]
        sel_txt = "-" if sel is pd.NA or sel is None else ("yes" if bool(sel) else "no")
        cls = ' class="rejected"' if sel_txt == "no" else ""
        cells = "".join(f"<td>{_e(r[c])}</td>" if f is None else f'<td class="num">{_num(r[c], f)}</td>' for c, _h, f in cols)
        body.append(f"<tr{cls}><td>{i + 1}</td>{cells}<td>{sel_txt}</td></tr>")
    more = (f'<p class="small">first {MAX_TABLE_ROWS} of {len(t)} micrographs listed</p>' if len(t) > MAX_TABLE_ROWS else "")
    return f'<details><summary>per micrograph</summary><table id="micrograph-table">{head}{"".join(body)}</table>{more}</details>'


def _classes_table(c: ClassesInfo) -> str:
    head = "<tr><th>rank</th><th>class</th><th>score</th><th>particles (%)</th><th>resolution (A)</th><th>selected</th></tr>"
    body = []
    for rank, k in enumerate(c.order):
        score = "-" if c.scores is None or c.scores[k] <= -998 else f"{c.scores[k]:.3f}"
        res = "-" if c.resolution_a is None else _num(c.resolution_a[k], "{:.1f}")
        sel = "-" if c.selected is None else ("yes" if c.selected[k] else "no")
        body.append(f'<tr><td class="num">{rank + 1}</td><td class="num">{k + 1}</td><td class="num">{score}</td>'
                    f'<td class="num">{100 * c.distribution[k]:.1f}</td><td class="num">{res}</td><td>{sel}</td></tr>')
    return f'<details><summary>classes in gallery order</summary><table id="class-table">{head}{"".join(body)}</table></details>'


def build_report(data: ReportData, title: str | None = None, generated: _dt.datetime | None = None) -> SessionReport:
    """The HTML page and its figures for gathered data.

    Parameters
    ----------
    data
        From :func:`gather_report_data`.
    title
        Page title (default: "autospa session report: <project folder name>").
    generated
        Time stamp written on the page (default: now).

    Returns
    -------
    SessionReport
        ``html`` links the figures by their bare names (:data:`FIGURES`), to be written beside it.
    """
    figures: dict[str, bytes] = {}
    title = title or f"autospa session report: {data.project.resolve().name}"
    when = (generated or _dt.datetime.now()).strftime("%Y-%m-%d %H:%M")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="small">project <code>{_e(data.project.resolve())}</code>; generated {_e(when)}</p>',
        "<h2>Summary</h2>",
        _kv_table(_summary_rows(data), "summary"),
    ]

    # acquisition
    parts.append('<section id="acquisition"><h2>Acquisition</h2>')
    if data.acquisition is not None:
        parts.append(_kv_table(data.acquisition, "acquisition-table", prefix="acq-"))
        parts.append(f'<p class="small">from {_e(data.acquisition_source)}</p>')
    else:
        parts.append(_not_run("acquisition", "Acquisition summary", data.notes.get("acquisition", "no metadata")))
    parts.append("</section>")

    # motion and CTF
    parts.append('<section id="micrographs"><h2>Motion and CTF per micrograph</h2>')
    t = data.micrographs
    if t is not None and len(t):
        figures[FIGURES["micrographs"]] = motion_ctf_png(t, data.ctf_max_res_cut)
        jobs = ", ".join(j for j in (data.motion_job, data.ctf_job, data.select_job) if j)
        parts.append(f'<p class="small">{len(t)} micrographs from {_e(jobs)}'
                     + (f"; CTF selection: rlnCtfMaxResolution &le; {data.ctf_max_res_cut:g} A" if data.ctf_max_res_cut else "")
                     + "</p>")
        parts.append(_img(FIGURES["micrographs"], "motion and CTF per micrograph"))
        parts.append(_micrograph_table(t))
    else:
        parts.append(_not_run("micrographs", "Motion correction and CTF estimation",
                              data.notes.get("micrographs", "no micrographs listed yet")))
    parts.append("</section>")

    # picks
    parts.append('<section id="picks"><h2>Particle picking</h2>')
    p = data.picks
    if p is not None:
        if p.image is not None and p.coords_px is not None:
            figures[FIGURES["picks"]] = picks_png(p.image, p.coords_px, p.diameter_px,
                                                 title=f"{Path(str(p.micrograph)).name}: {len(p.coords_px)} picks")
            parts.append(f'<p class="small">{_e(p.job)}: picks on <code>{_e(p.micrograph)}</code> '
                         f'(<span id="picks-shown">{len(p.coords_px)}</span> picks, circles of {p.diameter_px:.0f} pixels)</p>')
            parts.append(_img(FIGURES["picks"], "picks on a micrograph"))
        elif p.job is not None:
            parts.append(f'<p class="small">{_e(p.job)}: no micrograph with picks could be shown</p>')
        if p.extract_job is not None:
            box = f", box {p.box_px} pixels" if p.box_px else ""
            pix = f" at {p.particle_pixel_size_a:.3g} A/pixel" if p.particle_pixel_size_a else ""
            parts.append(f"<p>{_e(p.extract_job)}: {p.n_particles} particles extracted{_e(box)}{_e(pix)}.</p>")
        else:
            parts.append(_not_run("extract", "Particle extraction", "no Extract job with particles.star"))
    else:
        parts.append(_not_run("picks", "Particle picking", data.notes.get("picks", "")))
    parts.append("</section>")

    # 2D classes
    parts.append('<section id="classes"><h2>2D classes</h2>')
    c = data.classes
    if c is not None:
        ranked = c.scores is not None
        rule = "sorted by ranker score, selected classes framed green" if ranked else "sorted by class size (no ranker job yet)"
        it = f" iteration {c.iteration}" if c.iteration is not None else ""
        figures[FIGURES["classes"]] = class_gallery_png(
            c.images, c.distribution, c.resolution_a,
            scores=None if c.scores is None else np.where(c.scores <= -998, np.nan, c.scores),
            selected=c.selected, order=c.order,
            # short: the gallery is 1.6 inches per class wide (details are on the page)
            title=(f"{int(c.selected.sum())} of {c.n_classes} classes selected" if c.selected is not None else f"{c.n_classes} classes"))
        src = ", ".join(x for x in (c.class2d_job, c.rank_job) if x)
        parts.append(f'<p class="small">{_e(src)}{_e(it)}: {rule}.'
                     + (f" {c.n_selected_particles} of {c.n_particles} particles in the selected classes." if
                        c.n_selected_particles is not None and c.n_particles is not None else "") + "</p>")
        parts.append(f'<p class="small" id="class-order">{" ".join(str(int(k) + 1) for k in c.order)}</p>')
        parts.append(_img(FIGURES["classes"], "2D class averages"))
        parts.append(_classes_table(c))
    else:
        parts.append(_not_run("classes", "2D classification", data.notes.get("classes", "")))
    parts.append("</section>")

    # initial model
    parts.append('<section id="initial-model"><h2>Initial model</h2>')
    def map_figure(m, key: str, alt: str) -> None:
        figures[FIGURES[key]] = map_slices_png(m.volume, f"{m.job}{m.path.name}", m.pixel_size_a)
        parts.append(f'<p class="small">{_e(m.job + m.path.name)}</p>')
        parts.append(_img(FIGURES[key], alt))

    if data.initial_model is not None:
        map_figure(data.initial_model, "initial_model", "initial model slices")
    else:
        parts.append(_not_run("initial-model", "Initial model", data.notes.get("initial_model", "")))
    parts.append("</section>")

    # final map and FSC
    parts.append('<section id="final-map"><h2>Final map and FSC</h2>')
    if data.final_map is not None:
        map_figure(data.final_map, "final_map", "final map slices")
    if data.fsc is not None:
        f = data.fsc
        figures[FIGURES["fsc"]] = fsc_plot_png(f.frequency, f.curves, f.resolution_a)
        parts.append(f'<p>Resolution (FSC = 0.143): <b><span id="fsc-resolution">{_num(f.resolution_a)}</span> A</b> '
                     f'<span class="small">from {_e(f.job + f.source.name)}</span></p>')
        parts.append(_img(FIGURES["fsc"], "FSC curve"))
    if data.final_map is None and data.fsc is None:
        parts.append(_not_run("final-map", "3D refinement", data.notes.get("final_map", "")))
    elif data.fsc is None:
        parts.append(_not_run("fsc", "FSC", "no postprocess.star or run_model.star with an FSC"))
    parts.append("</section>")

    # time per stage
    parts.append('<section id="timing"><h2>Time per stage</h2>')
    stages = stage_times(data.jobs)
    if stages:
        labels = [f"{name} ({n} job{'s' if n > 1 else ''})" for name, n, _t in stages]
        figures[FIGURES["timing"]] = timing_png(labels, [t for _name, _n, t in stages])
        parts.append(_img(FIGURES["timing"], "time per stage"))
        rows = "".join(f'<tr><td>{_e(name)}</td><td class="num">{n}</td><td class="num">{t:.1f}</td>'
                       f'<td class="num">{_duration(t)}</td></tr>' for name, n, t in stages)
        parts.append('<table id="stage-table"><tr><th>stage</th><th>jobs</th><th>seconds</th><th>h:mm:ss</th></tr>'
                     + rows + "</table>")
    else:
        parts.append(_not_run("timing", "Time per stage", data.notes.get("timing", "no jobs")))
    if data.jobs:
        rows = []  # every job
        for j in data.jobs:
            start = _dt.datetime.fromtimestamp(j.launched).strftime("%Y-%m-%d %H:%M:%S") if j.launched else "-"
            secs = "-" if j.seconds is None else f"{j.seconds:.1f}"
            rows.append(f"<tr><td>{_e(j.name)}</td><td>{_e(j.node or '-')}</td><td>{_e(j.type_label)}</td><td>{_e(j.status)}</td>"
                        f'<td>{_e(start)}</td><td class="num">{secs}</td><td class="num">{_duration(j.seconds)}</td></tr>')
        parts.append('<details><summary>every job</summary><table id="job-table"><tr><th>job</th><th>scheme node</th><th>type</th><th>status</th><th>launched</th>'
                     "<th>seconds</th><th>h:mm:ss</th></tr>" + "".join(rows) + "</table></details>")
        parts.append('<p class="small">Times run from the launch of a job (its job.star) to its RELION_JOB_EXIT_* file; '
                     "for a job that continues in the same directory, of its last run.</p>")
    parts.append("</section></body></html>\n")
    return SessionReport("\n".join(parts), figures, data)


def session_report(project_dir: str | Path, session_json: str | Path | None = None, title: str | None = None) -> SessionReport:
    """:func:`gather_report_data` then :func:`build_report`."""
    return build_report(gather_report_data(project_dir, session_json), title=title)
