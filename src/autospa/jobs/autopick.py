"""Jobs relion.autopick.log and relion.autopick.topaz: pick particles on every micrograph (L5).

Outputs, in RELION-4.0's layout (``DIR`` = the job directory)::

    DIR/autopick.star                    data_coordinate_files: rlnMicrographName,
                                         rlnMicrographCoordinates (one row per micrograph)
    DIR/Movies/NAME_autopick.star        the picks of one micrograph: rlnCoordinateX/Y (pixels of
                                         the micrograph), rlnClassNumber, rlnAutopickFigureOfMerit,
                                         rlnAnglePsi
    DIR/Movies/NAME_autopick.png         the micrograph with its picks circled (``write_png``)

One dask task per micrograph. With ``continue_`` only micrographs not yet listed in
``autopick.star`` are picked and appended (streaming).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from autospa.errors import AutospaError, InputError
from autospa.io.atomic import write_bytes
from autospa.io.preprocess_files import (
    read_coordinate_index,
    read_micrograph,
    read_micrograph_table,
    write_coordinate_index,
    write_coordinates,
)
from autospa.jobs.preprocess_common import map_tasks, mirror_path, project_relative, resolve
from autospa.jobs.registry import option_bool, option_float, option_int, project_dir_of, register_job, resolve_path, succeed
from autospa.preprocess.pick_log import pick_log
from autospa.report.preprocess_plots import picks_png

log = logging.getLogger(__name__)

OUTPUT_STAR = "autopick.star"
METHODS = ("log", "topaz")


@dataclass(frozen=True)
class AutopickParams:
    """Options of the picking job (RELION's job.star names in brackets).

    Attributes
    ----------
    input_star
        micrographs_ctf.star or micrographs.star [fn_input_autopick / --i].
    output_dir
        Job directory [--o].
    method
        ``"log"`` [do_log] or ``"topaz"`` [do_topaz].
    log_diam_min, log_diam_max
        LoG particle diameter range in Angstrom [log_diam_min, log_diam_max].
    log_adjust_thr, log_upper_thr
        LoG thresholds in standard deviations [log_adjust_thr, log_upper_thr].
    log_maxres
        Low-pass (Angstrom) before LoG filtering [log_maxres].
    log_invert
        Particles are white [log_invert].
    topaz_model
        Pretrained detector name or a trained model file; empty = Topaz's default ResNet16 [topaz_model].
    topaz_particle_diameter
        Particle diameter for Topaz (Angstrom) [topaz_particle_diameter].
    topaz_threshold
        Smallest Topaz score kept.
    topaz_nr_particles
        Keep at most this many picks per micrograph (-1: all) [topaz_nr_particles].
    write_png
        Write a PNG of each micrograph with its picks.
    device
        torch device of each task.
    """

    input_star: str
    output_dir: str
    method: str = "log"
    log_diam_min: float = 150.0
    log_diam_max: float = 180.0
    log_adjust_thr: float = 0.0
    log_upper_thr: float = 999.0
    log_maxres: float = 20.0
    log_invert: bool = False
    topaz_model: str = ""
    topaz_particle_diameter: float = 180.0
    topaz_threshold: float = -6.0
    topaz_nr_particles: int = -1
    write_png: bool = True
    device: str = "cpu"


def _pick_micrograph(task: dict) -> dict:
    """One dask task: pick one micrograph and write its coordinate file; returns its index row."""
    p = AutopickParams(**task["params"])
    try:
        image, _ = read_micrograph(task["mic_path"])
        mic = torch.from_numpy(image).to(torch.device(p.device))
        if p.method == "log":
            picks = pick_log(
                mic,
                task["pixel_size_a"],
                p.log_diam_min,
                p.log_diam_max,
                lowpass_a=p.log_maxres,
                adjust_threshold=p.log_adjust_thr,
                upper_threshold=p.log_upper_thr,
                invert=p.log_invert,
            )
            coords, fom, diameter = picks.coords_px, picks.fom, p.log_diam_max
        else:
            from autospa.preprocess.pick_topaz import pick_topaz

            picks = pick_topaz(
                mic,
                task["pixel_size_a"],
                p.topaz_particle_diameter,
                model=p.topaz_model or "resnet16",
                threshold=p.topaz_threshold,
                max_particles=p.topaz_nr_particles,
            )
            coords, fom, diameter = picks.coords_px, picks.score, p.topaz_particle_diameter
    except (AutospaError, ValueError) as exc:
        return {"error": f"{task['mic_name']}: {exc}"}
    c = coords.cpu().numpy()
    write_coordinates(task["coord_path"], c, fom.cpu().numpy())
    if p.write_png:
        png = picks_png(image, c, diameter / task["pixel_size_a"], title=f"{task['mic_name']}: {len(c)} picks")
        write_bytes(task["png_path"], png)
    return {"rlnMicrographName": task["mic_name"], "rlnMicrographCoordinates": task["coord_name"], "n": int(len(c))}


def run_autopick(
    params: AutopickParams,
    project_dir: str | Path | None = None,
    client=None,
    continue_: bool = False,
) -> Path:
    """Pick every micrograph of ``params.input_star``; returns autopick.star.

    Raises
    ------
    InputError
        Unknown method, unreadable input, Topaz without topaz-em, or every micrograph failed.
    """
    if params.method not in METHODS:
        raise InputError(None, f"unknown picking method {params.method!r} (choose {' or '.join(METHODS)})")
    if params.method == "log" and not 0 < params.log_diam_min <= params.log_diam_max:
        raise InputError(None, f"need 0 < --LoG_diam_min ({params.log_diam_min}) <= --LoG_diam_max ({params.log_diam_max})")
    if params.method == "topaz":
        from autospa.preprocess.pick_topaz import topaz_available

        if not topaz_available():
            raise InputError(None, "Topaz picking needs the 'topaz' extra: pip install 'autospa[topaz]'")
    project = Path(project_dir or Path.cwd()).resolve()
    in_star = resolve(params.input_star, project)
    out_dir = resolve(params.output_dir, project)
    table = read_micrograph_table(in_star, "micrographs", "rlnMicrographName")
    out_star = out_dir / OUTPUT_STAR
    done_rows = read_coordinate_index(out_star) if continue_ and out_star.exists() else None
    done = set(done_rows["rlnMicrographName"]) if done_rows is not None else set()
    tasks = []
    for i, mic in enumerate(table.rows["rlnMicrographName"].astype(str)):
        if mic in done:
            continue
        optics = table.optics_for(i)
        pixel = float(optics.get("rlnMicrographPixelSize", 0) or 0)
        if not pixel > 0:
            raise InputError(in_star, "data_optics has no rlnMicrographPixelSize")
        coord_path = mirror_path(mic, out_dir, "_autopick.star")
        tasks.append(
            {
                "params": asdict(params),
                "mic_name": mic,
                "mic_path": str(resolve(mic, project)),
                "pixel_size_a": pixel,
                "coord_path": str(coord_path),
                "coord_name": project_relative(coord_path, project),
                "png_path": str(mirror_path(mic, out_dir, "_autopick.png")),
            }
        )
    log.info("autopick (%s): %d micrographs to pick, %d already done", params.method, len(tasks), len(done))
    results = map_tasks(_pick_micrograph, tasks, client=client, key_prefix="autopick")
    rows = [r for r in results if "error" not in r]
    for r in results:
        if "error" in r:
            log.warning("autopick: skipped %s", r["error"])
    if tasks and not rows:
        raise InputError(in_star, f"no micrograph could be picked; first problem: {results[0]['error']}")
    log.info("autopick: %d particles on %d new micrographs", sum(r["n"] for r in rows), len(rows))
    names = ([] if done_rows is None else list(done_rows["rlnMicrographName"])) + [r["rlnMicrographName"] for r in rows]
    files = ([] if done_rows is None else list(done_rows["rlnMicrographCoordinates"])) + [
        r["rlnMicrographCoordinates"] for r in rows
    ]
    write_coordinate_index(out_star, names, files)
    return out_star


def count_picks(autopick_star: str | Path, project_dir: str | Path | None = None) -> pd.Series:
    """Number of picks per micrograph listed in an autopick.star (for reports and tests)."""
    from autospa.io.preprocess_files import read_coordinates

    project = Path(project_dir or Path.cwd()).resolve()
    idx = read_coordinate_index(autopick_star)
    counts = [len(read_coordinates(resolve(f, project))) for f in idx["rlnMicrographCoordinates"]]
    return pd.Series(np.asarray(counts, dtype=np.int64), index=list(idx["rlnMicrographName"]))


def params_from_options(job_dir: Path, options: dict[str, str], method: str) -> AutopickParams:
    """AutopickParams from RELION's job.star option names."""
    model = str(options.get("topaz_model", "")).strip().strip('"')
    if model and model not in ("resnet16", "resnet8", "resnet16_u64", "resnet16_u32", "resnet8_u64", "resnet8_u32"):
        model = str(resolve_path(job_dir, model))
    return AutopickParams(
        input_star=str(resolve_path(job_dir, options.get("fn_input_autopick", ""))),
        output_dir=str(job_dir),
        method=method,
        log_diam_min=option_float(options, "log_diam_min", 150.0),
        log_diam_max=option_float(options, "log_diam_max", 180.0),
        log_adjust_thr=option_float(options, "log_adjust_thr", 0.0),
        log_upper_thr=option_float(options, "log_upper_thr", 999.0),
        log_maxres=option_float(options, "log_maxres", 20.0),
        log_invert=option_bool(options, "log_invert", False),
        topaz_model=model,
        topaz_particle_diameter=option_float(options, "topaz_particle_diameter", 180.0),
        topaz_nr_particles=option_int(options, "topaz_nr_particles", -1),
    )


@register_job("relion.autopick.log")
def job_autopick_log(job_dir: Path, options: dict[str, str], continue_: bool) -> None:
    """Registry entry: LoG picking from job.star options."""
    run_autopick(params_from_options(job_dir, options, "log"), project_dir_of(job_dir), continue_=continue_)
    succeed(job_dir)


def job_autopick_topaz(job_dir: Path, options: dict[str, str], continue_: bool) -> None:
    """Registry entry: Topaz picking (pretrained or given model) from job.star options."""
    run_autopick(params_from_options(job_dir, options, "topaz"), project_dir_of(job_dir), continue_=continue_)
    succeed(job_dir)


# RELION-4.0 names Topaz picking relion.autopick.topaz.pick; the short name is kept too.
register_job("relion.autopick.topaz")(job_autopick_topaz)
register_job("relion.autopick.topaz.pick")(job_autopick_topaz)


__all__ = ["METHODS", "OUTPUT_STAR", "AutopickParams", "count_picks", "params_from_options", "run_autopick"]
