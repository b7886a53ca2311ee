"""Job relion.motioncorr.own: motion-correct every movie of a movies.star (L5).

Outputs, in RELION's layout (``DIR`` = the job directory)::

    DIR/corrected_micrographs.star         data_optics (+ rlnMicrographPixelSize) + data_micrographs
                                           (rlnMicrographName, rlnMicrographMetadata, rlnOpticsGroup,
                                            rlnAccumMotionTotal/Early/Late[, rlnMicrographNameNoDW])
    DIR/Movies/NAME.mrc                    aligned, dose-weighted sum (MRC mode 12 unless float16=False)
    DIR/Movies/NAME.star                   motion metadata (data_general, data_global_shift,
                                           data_local_motion_model, data_local_shift)
    DIR/Movies/NAME_shifts.png             shift traces
    DIR/Movies/NAME_noDW.mrc               sum without dose weighting (save_no_dw)

One dask task per movie. With ``continue_`` only movies whose micrograph is not yet listed in
``corrected_micrographs.star`` are processed and appended (streaming).
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
    read_gain,
    read_micrograph_table,
    read_movie,
    write_micrograph,
    write_micrograph_table,
    write_motion_metadata,
)
from autospa.jobs.preprocess_common import map_tasks, mirror_path, parse_relion_choice, project_relative, resolve
from autospa.jobs.registry import option_bool, option_float, option_int, register_job, resolve_path, succeed
from autospa.preprocess.motion import motion_correct, orient_gain
from autospa.report.preprocess_plots import shift_trace_png

log = logging.getLogger(__name__)

OUTPUT_STAR = "corrected_micrographs.star"

#: RELION's shift value for frames that were not aligned (Micrograph::NOT_OBSERVED).
NOT_OBSERVED = -9999.0


@dataclass(frozen=True)
class MotionCorrParams:
    """Options of the motion-correction job (RELION's names in brackets).

    Attributes
    ----------
    input_star
        movies.star [--i / input_star_mics].
    output_dir
        Job directory [--o].
    gainref
        Gain reference [--gainref / fn_gain_ref]; default: the optics group's rlnMicrographGainName.
    gain_rot, gain_flip
        [--gain_rot, --gain_flip] (0-3 and 0-2, see :func:`autospa.preprocess.motion.orient_gain`).
    patch_x, patch_y
        Patches for local motion [--patch_x, --patch_y]; 1 x 1 = global only.
    dose_per_frame, pre_exposure
        e/A^2 [--dose_per_frame, --preexposure].
    dose_weighting
        Apply the exposure filter [--dose_weighting].
    bin_factor
        Fourier binning of the output [--bin_factor].
    group_frames
        Frames summed for alignment [--group_frames].
    bfactor
        B-factor of the alignment filter [--bfactor].
    first_frame_sum, last_frame_sum
        Frames summed (1-based; -1 = last) [--first_frame_sum, --last_frame_sum].
    eer_grouping
        EER frames per rendered frame [--eer_grouping].
    save_no_dw
        Also write sums without dose weighting [--save_noDW].
    float16
        Write micrographs in MRC mode 12 [--float16].
    device
        torch device of each task (``"cpu"``, ``"cuda"``).
    """

    input_star: str
    output_dir: str
    gainref: str | None = None
    gain_rot: int = 0
    gain_flip: int = 0
    patch_x: int = 5
    patch_y: int = 5
    dose_per_frame: float = 1.0
    pre_exposure: float = 0.0
    dose_weighting: bool = True
    bin_factor: float = 1.0
    group_frames: int = 1
    bfactor: float = 150.0
    first_frame_sum: int = 1
    last_frame_sum: int = -1
    eer_grouping: int = 32
    save_no_dw: bool = False
    float16: bool = True
    device: str = "cpu"


def _process_movie(task: dict) -> dict:
    """One dask task: motion-correct one movie and write its outputs; returns its STAR row
    (or ``{"error": message}`` for a movie that cannot be used)."""
    p = MotionCorrParams(**task["params"])
    try:
        frames = torch.from_numpy(np.asarray(read_movie(task["movie_path"], p.eer_grouping), dtype=np.float32))
        dev = torch.device(p.device)
        frames = frames.to(dev)
        gain = None
        if task["gain_path"]:
            g = torch.from_numpy(read_gain(task["gain_path"])).to(dev)
            gain = orient_gain(g, p.gain_rot, p.gain_flip)
            if tuple(gain.shape) != tuple(frames.shape[-2:]):
                raise InputError(
                    task["gain_path"],
                    f"gain reference is {gain.shape[-1]} x {gain.shape[-2]} (x by y, after --gain_rot {p.gain_rot}) "
                    f"but movie {task['movie_name']} has {frames.shape[-1]} x {frames.shape[-2]} frames",
                )
        res = motion_correct(
            frames,
            task["pixel_size_a"],
            gain=gain,
            voltage_kv=task["voltage_kv"],
            dose_per_frame=p.dose_per_frame if p.dose_weighting else 0.0,
            pre_exposure=p.pre_exposure,
            patch_x=p.patch_x,
            patch_y=p.patch_y,
            bfactor_a2=p.bfactor,
            group_frames=p.group_frames,
            bin_factor=p.bin_factor,
            first_frame=p.first_frame_sum,
            last_frame=p.last_frame_sum,
            save_no_dw=p.save_no_dw,
        )
    except (AutospaError, ValueError) as exc:
        return {"error": f"{task['movie_name']}: {exc}"}
    out_mrc = Path(task["mic_path"])
    out_pixel = task["pixel_size_a"] * p.bin_factor
    write_micrograph(out_mrc, res.micrograph.cpu().numpy(), out_pixel, float16=p.float16)
    n_frames, h, w = frames.shape
    first = max(1, p.first_frame_sum)
    last = n_frames if p.last_frame_sum < 1 else min(p.last_frame_sum, n_frames)
    shifts_all = np.full((n_frames, 2), NOT_OBSERVED)  # RELION's value for frames outside the sum
    shifts_all[first - 1 : last] = res.shifts_px.cpu().numpy()
    write_motion_metadata(
        task["meta_path"],
        image_size=(w, h, n_frames),
        movie_name=task["movie_name"],
        gain_name=task["gain_name"],
        binning=p.bin_factor,
        original_pixel_size_a=task["pixel_size_a"],
        dose_per_frame=p.dose_per_frame,
        pre_exposure=p.pre_exposure,
        voltage_kv=task["voltage_kv"],
        start_frame=first,
        global_shifts_px=shifts_all,
        local_coeffs=None if res.local_coeffs is None else res.local_coeffs.cpu().numpy(),
        patch_centres_px=None if res.patch_centres_px is None else res.patch_centres_px.cpu().numpy(),
        patch_shifts_px=None if res.patch_shifts_px is None else res.patch_shifts_px.cpu().numpy(),
    )
    png = shift_trace_png(
        res.shifts_px.cpu().numpy(),
        title=task["movie_name"],
        patch_centres_px=None if res.patch_centres_px is None else res.patch_centres_px.cpu().numpy(),
        patch_shifts_px=None if res.patch_shifts_px is None else res.patch_shifts_px.cpu().numpy(),
        image_size=(w, h),
    )
    write_bytes(task["png_path"], png)
    row = {
        "rlnMicrographName": task["mic_name"],
        "rlnMicrographMetadata": task["meta_name"],
        "rlnOpticsGroup": task["optics_group"],
        "rlnAccumMotionTotal": res.accum_motion_a[0],
        "rlnAccumMotionEarly": res.accum_motion_a[1],
        "rlnAccumMotionLate": res.accum_motion_a[2],
    }
    if res.micrograph_no_dw is not None:
        write_micrograph(task["nodw_path"], res.micrograph_no_dw.cpu().numpy(), out_pixel, float16=p.float16)
        row["rlnMicrographNameNoDW"] = task["nodw_name"]
    return row


def run_motioncorr(
    params: MotionCorrParams,
    project_dir: str | Path | None = None,
    client=None,
    continue_: bool = False,
) -> Path:
    """Motion-correct the movies of ``params.input_star``; returns corrected_micrographs.star.

    Parameters
    ----------
    params
        Job options.
    project_dir
        Directory that STAR paths are relative to (default: the current directory).
    client
        dask client for the per-movie tasks (default: the current one, else threads).
    continue_
        Only process movies not yet in the output STAR file.

    Raises
    ------
    InputError
        Unreadable input, or every movie failed (the first reason is given).
    """
    project = Path(project_dir or Path.cwd()).resolve()
    in_star = resolve(params.input_star, project)
    out_dir = resolve(params.output_dir, project)
    table = read_micrograph_table(in_star, "movies", "rlnMicrographMovieName")
    out_star = out_dir / OUTPUT_STAR
    done_rows = _existing_rows(out_star) if continue_ else None
    done = set(done_rows["rlnMicrographName"]) if done_rows is not None else set()
    tasks = []
    for i, movie in enumerate(table.rows["rlnMicrographMovieName"].astype(str)):
        optics = table.optics_for(i)
        mic_path = mirror_path(movie, out_dir, ".mrc")
        mic_name = project_relative(mic_path, project)
        if mic_name in done:
            continue
        gain_name = params.gainref or optics.get("rlnMicrographGainName") or None
        if isinstance(gain_name, float):  # NaN from a missing optics value
            gain_name = None
        pixel = float(optics.get("rlnMicrographOriginalPixelSize", optics.get("rlnMicrographPixelSize", 0)) or 0)
        if pixel <= 0:
            raise InputError(in_star, "data_optics has no rlnMicrographOriginalPixelSize")
        meta_path = mirror_path(movie, out_dir, ".star")
        nodw_path = mirror_path(movie, out_dir, "_noDW.mrc")
        tasks.append(
            {
                "params": asdict(params),
                "movie_name": movie,
                "movie_path": str(resolve(movie, project)),
                "gain_name": gain_name,
                "gain_path": str(resolve(gain_name, project)) if gain_name else None,
                "pixel_size_a": pixel,
                "voltage_kv": float(optics.get("rlnVoltage", 300.0)),
                "optics_group": int(table.rows["rlnOpticsGroup"].iloc[i]) if "rlnOpticsGroup" in table.rows else 1,
                "mic_path": str(mic_path),
                "mic_name": mic_name,
                "meta_path": str(meta_path),
                "meta_name": project_relative(meta_path, project),
                "png_path": str(mirror_path(movie, out_dir, "_shifts.png")),
                "nodw_path": str(nodw_path),
                "nodw_name": project_relative(nodw_path, project),
            }
        )
    log.info("motioncorr: %d movies to process, %d already done", len(tasks), len(done))
    results = map_tasks(_process_movie, tasks, client=client, key_prefix="motioncorr")
    rows = [r for r in results if "error" not in r]
    for r in results:
        if "error" in r:
            log.warning("motioncorr: skipped %s", r["error"])
    if tasks and not rows:
        raise InputError(in_star, f"no movie could be motion-corrected; first problem: {results[0]['error']}")
    new = pd.DataFrame(rows)
    all_rows = pd.concat([done_rows, new], ignore_index=True) if done_rows is not None and len(done_rows) else new
    optics = table.optics.copy()
    orig = optics["rlnMicrographOriginalPixelSize"] if "rlnMicrographOriginalPixelSize" in optics else optics["rlnMicrographPixelSize"]
    optics["rlnMicrographPixelSize"] = orig.astype(float) * params.bin_factor
    if all_rows.empty:
        all_rows = pd.DataFrame({"rlnMicrographName": [], "rlnMicrographMetadata": [], "rlnOpticsGroup": []})
    write_micrograph_table(out_star, optics, all_rows, "micrographs")
    return out_star


def _existing_rows(star: Path) -> pd.DataFrame | None:
    if not star.exists():
        return None
    return read_micrograph_table(star, "micrographs", "rlnMicrographName").rows


def params_from_options(job_dir: Path, options: dict[str, str]) -> MotionCorrParams:
    """MotionCorrParams from RELION's job.star option names."""
    gain = options.get("fn_gain_ref", "").strip().strip('"')
    return MotionCorrParams(
        input_star=str(resolve_path(job_dir, options.get("input_star_mics", options.get("fn_in", "")))),
        output_dir=str(job_dir),
        gainref=str(resolve_path(job_dir, gain)) if gain else None,
        gain_rot=parse_relion_choice(options.get("gain_rot", 0)),
        gain_flip=parse_relion_choice(options.get("gain_flip", 0)),
        patch_x=option_int(options, "patch_x", 5),
        patch_y=option_int(options, "patch_y", 5),
        dose_per_frame=option_float(options, "dose_per_frame", 1.0),
        pre_exposure=option_float(options, "pre_exposure", 0.0),
        dose_weighting=option_bool(options, "do_dose_weighting", True),
        bin_factor=option_float(options, "bin_factor", 1.0),
        group_frames=option_int(options, "group_frames", 1),
        bfactor=option_float(options, "bfactor", 150.0),
        first_frame_sum=option_int(options, "first_frame_sum", 1),
        last_frame_sum=option_int(options, "last_frame_sum", -1),
        eer_grouping=option_int(options, "eer_grouping", 32),
        save_no_dw=option_bool(options, "do_save_noDW", False),
        float16=option_bool(options, "do_float16", True),
    )


@register_job("relion.motioncorr.own")
def job_motioncorr(job_dir: Path, options: dict[str, str], continue_: bool) -> None:
    """Registry entry: run the job from its job.star options."""
    from autospa.jobs.registry import project_dir_of

    run_motioncorr(params_from_options(job_dir, options), project_dir_of(job_dir), continue_=continue_)
    succeed(job_dir)
