"""Job relion.ctffind.ctffind4: estimate the CTF of every micrograph of a micrographs STAR file (L5).

The estimation is ours (:func:`autospa.preprocess.ctffind.estimate_ctf`: tiled power spectrum,
background/envelope by variable projection, 1D then 2D fit); the job writes RELION's layout
(``DIR`` = the job directory)::

    DIR/micrographs_ctf.star        data_optics + data_micrographs: the input columns plus
                                    rlnCtfImage, rlnDefocusU, rlnDefocusV, rlnCtfAstigmatism,
                                    rlnDefocusAngle, rlnCtfFigureOfMerit, rlnCtfMaxResolution
                                    (and rlnPhaseShift when it was fitted)
    DIR/Movies/NAME.ctf             the diagnostic image (spectrum | model), MRC, named in
                                    rlnCtfImage as ``DIR/Movies/NAME.ctf:mrc`` (as RELION does)
    DIR/Movies/NAME_ctf.png         the same diagnostic as a PNG

One dask task per micrograph. With ``continue_`` only micrographs not yet listed in
``micrographs_ctf.star`` are processed and appended (streaming).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from autospa.errors import AutospaError, InputError
from autospa.io.atomic import write_bytes
from autospa.io.preprocess_files import read_micrograph, read_micrograph_table, write_micrograph, write_micrograph_table
from autospa.jobs.preprocess_common import map_tasks, mirror_path, project_relative, resolve
from autospa.jobs.registry import option_bool, option_float, option_int, project_dir_of, register_job, resolve_path, succeed
from autospa.preprocess.ctffind import diagnostic_image, estimate_ctf
from autospa.report.preprocess_plots import ctf_diagnostic_png

log = logging.getLogger(__name__)

OUTPUT_STAR = "micrographs_ctf.star"

#: Columns this job adds to every micrograph row.
CTF_LABELS = (
    "rlnCtfImage",
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnCtfAstigmatism",
    "rlnDefocusAngle",
    "rlnCtfFigureOfMerit",
    "rlnCtfMaxResolution",
)


@dataclass(frozen=True)
class CtffindParams:
    """Options of the CTF-estimation job (RELION's job.star names in brackets).

    Attributes
    ----------
    input_star
        corrected_micrographs.star (or any micrographs STAR) [input_star_mics / --i].
    output_dir
        Job directory [--o].
    box
        Tile size of the power spectrum [box].
    resmin, resmax
        Fitting range in Angstrom [resmin, resmax].
    dfmin, dfmax, dfstep
        Defocus search range and step in Angstrom [dfmin, dfmax, dfstep].
    max_astigmatism
        Largest astigmatism searched (Angstrom). RELION's ``dast`` is CTFFIND's astigmatism
        restraint; the search here is unrestrained up to this value.
    do_phaseshift, phase_min, phase_max, phase_step
        Fit a phase shift (degrees) [do_phaseshift, phase_min, phase_max, phase_step].
    use_noDW
        Estimate on the sums without dose weighting when listed (rlnMicrographNameNoDW) [use_noDW].
    write_png
        Write a diagnostic PNG per micrograph.
    device
        torch device of each task.
    """

    input_star: str
    output_dir: str
    box: int = 512
    resmin: float = 30.0
    resmax: float = 5.0
    dfmin: float = 5000.0
    dfmax: float = 50000.0
    dfstep: float = 500.0
    max_astigmatism: float = 2000.0
    do_phaseshift: bool = False
    phase_min: float = 0.0
    phase_max: float = 180.0
    phase_step: float = 10.0
    use_noDW: bool = True
    write_png: bool = True
    device: str = "cpu"


def _process_micrograph(task: dict) -> dict:
    """One dask task: estimate the CTF of one micrograph; returns the new columns or ``{"error": ...}``."""
    p = CtffindParams(**task["params"])
    try:
        image, _ = read_micrograph(task["input_path"])
        mic = torch.from_numpy(image).to(torch.device(p.device))
        fit = estimate_ctf(
            mic,
            task["pixel_size_a"],
            task["voltage_kv"],
            task["cs_mm"],
            task["q0"],
            box=p.box,
            res_min_a=p.resmin,
            res_max_a=p.resmax,
            defocus_min_a=p.dfmin,
            defocus_max_a=p.dfmax,
            defocus_step_a=p.dfstep,
            max_astigmatism_a=p.max_astigmatism,
            fit_phase_shift=p.do_phaseshift,
            phase_min_deg=p.phase_min,
            phase_max_deg=p.phase_max,
            phase_step_deg=p.phase_step,
        )
    except (AutospaError, ValueError) as exc:
        return {"error": f"{task['mic_name']}: {exc}"}
    diag = diagnostic_image(fit, task["voltage_kv"], task["cs_mm"], task["q0"]).numpy()
    write_micrograph(task["ctf_path"], diag, fit.pixel_size_a, float16=False)
    if p.write_png:
        title = (
            f"{task['mic_name']}\ndU {fit.defocus_u_a:.0f} dV {fit.defocus_v_a:.0f} A, angle {fit.defocus_angle_deg:.1f}, "
            f"max res {fit.max_resolution_a:.1f} A, FOM {fit.figure_of_merit:.3f}"
        )
        write_bytes(task["png_path"], ctf_diagnostic_png(diag, title=title))
    row = {
        "rlnCtfImage": task["ctf_name"] + ":mrc",
        "rlnDefocusU": fit.defocus_u_a,
        "rlnDefocusV": fit.defocus_v_a,
        "rlnCtfAstigmatism": fit.astigmatism_a,
        "rlnDefocusAngle": fit.defocus_angle_deg,
        "rlnCtfFigureOfMerit": fit.figure_of_merit,
        "rlnCtfMaxResolution": fit.max_resolution_a,
    }
    if p.do_phaseshift:
        row["rlnPhaseShift"] = fit.phase_shift_deg
    return row


def run_ctffind(
    params: CtffindParams,
    project_dir: str | Path | None = None,
    client=None,
    continue_: bool = False,
) -> Path:
    """Estimate the CTF of every micrograph of ``params.input_star``; returns micrographs_ctf.star.

    Parameters
    ----------
    params
        Job options.
    project_dir
        Directory that STAR paths are relative to (default: the current directory).
    client
        dask client for the per-micrograph tasks (default: the current one, else threads).
    continue_
        Only process micrographs not yet in the output STAR file.

    Raises
    ------
    InputError
        Unreadable input, missing optics values, or every micrograph failed.
    """
    project = Path(project_dir or Path.cwd()).resolve()
    in_star = resolve(params.input_star, project)
    out_dir = resolve(params.output_dir, project)
    table = read_micrograph_table(in_star, "micrographs", "rlnMicrographName")
    out_star = out_dir / OUTPUT_STAR
    done_rows = None
    if continue_ and out_star.exists():
        done_rows = read_micrograph_table(out_star, "micrographs", "rlnMicrographName").rows
    done = set(done_rows["rlnMicrographName"].astype(str)) if done_rows is not None else set()
    tasks, new_idx = [], []
    for i, mic in enumerate(table.rows["rlnMicrographName"].astype(str)):
        if mic in done:
            continue
        optics = table.optics_for(i)
        pixel = _optics_value(optics, in_star, "rlnMicrographPixelSize", "rlnMicrographOriginalPixelSize")
        source = mic
        if params.use_noDW and "rlnMicrographNameNoDW" in table.rows.columns:
            nodw = table.rows["rlnMicrographNameNoDW"].iloc[i]
            if isinstance(nodw, str) and nodw.strip():
                source = nodw
        ctf_path = mirror_path(mic, out_dir, ".ctf")
        tasks.append(
            {
                "params": asdict(params),
                "mic_name": mic,
                "input_path": str(resolve(source, project)),
                "pixel_size_a": pixel,
                "voltage_kv": _optics_value(optics, in_star, "rlnVoltage"),
                "cs_mm": _optics_value(optics, in_star, "rlnSphericalAberration", allow_zero=True),
                "q0": _optics_value(optics, in_star, "rlnAmplitudeContrast", allow_zero=True),
                "ctf_path": str(ctf_path),
                "ctf_name": project_relative(ctf_path, project),
                "png_path": str(mirror_path(mic, out_dir, "_ctf.png")),
            }
        )
        new_idx.append(i)
    log.info("ctffind: %d micrographs to process, %d already done", len(tasks), len(done))
    results = map_tasks(_process_micrograph, tasks, client=client, key_prefix="ctffind")
    ok_idx = [i for i, r in zip(new_idx, results, strict=True) if "error" not in r]
    for r in results:
        if "error" in r:
            log.warning("ctffind: skipped %s", r["error"])
    if tasks and not ok_idx:
        raise InputError(in_star, f"no micrograph could be processed; first problem: {results[0]['error']}")
    new = table.rows.iloc[ok_idx].reset_index(drop=True)
    fitted = pd.DataFrame([r for r in results if "error" not in r])
    for col in fitted.columns:
        new[col] = fitted[col].to_numpy()
    parts = [df for df in (done_rows, new) if df is not None and len(df)]
    all_rows = pd.concat(parts, ignore_index=True) if parts else new
    write_micrograph_table(out_star, table.optics, all_rows, "micrographs")
    return out_star


def _optics_value(optics: dict, star: Path, *labels: str, allow_zero: bool = False) -> float:
    for lab in labels:
        v = optics.get(lab)
        if v is None:
            continue
        try:
            x = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(x) and (x > 0 or (allow_zero and x >= 0)):
            return x
    raise InputError(star, f"data_optics has no usable {' or '.join(labels)}")


def params_from_options(job_dir: Path, options: dict[str, str]) -> CtffindParams:
    """CtffindParams from RELION's job.star option names."""
    return CtffindParams(
        input_star=str(resolve_path(job_dir, options.get("input_star_mics", ""))),
        output_dir=str(job_dir),
        box=option_int(options, "box", 512),
        resmin=option_float(options, "resmin", 30.0),
        resmax=option_float(options, "resmax", 5.0),
        dfmin=option_float(options, "dfmin", 5000.0),
        dfmax=option_float(options, "dfmax", 50000.0),
        dfstep=option_float(options, "dfstep", 500.0),
        do_phaseshift=option_bool(options, "do_phaseshift", False),
        phase_min=option_float(options, "phase_min", 0.0),
        phase_max=option_float(options, "phase_max", 180.0),
        phase_step=option_float(options, "phase_step", 10.0),
        use_noDW=option_bool(options, "use_noDW", True),
    )


@register_job("relion.ctffind.ctffind4")
def job_ctffind(job_dir: Path, options: dict[str, str], continue_: bool) -> None:
    """Registry entry: run the job from its job.star options."""
    run_ctffind(params_from_options(job_dir, options), project_dir_of(job_dir), continue_=continue_)
    succeed(job_dir)


__all__ = ["CTF_LABELS", "OUTPUT_STAR", "CtffindParams", "params_from_options", "run_ctffind"]
