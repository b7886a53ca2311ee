"""relion_postprocess as a job (L5): read two half maps and a mask, post-process, write
postprocess.mrc, postprocess_masked.mrc, postprocess.star and the FSC/Guinier plots.

Two entry points: :func:`run_postprocess` (the CLI's) and the registry job ``relion.postprocess``
(job.star options as RELION's GUI writes them: ``fn_in`` (half 1), ``fn_mask``, ``angpix``,
``do_auto_bfac``, ``autob_lowres``, ``do_adhoc_bfac``, ``adhoc_bfac``, ``do_skip_fsc_weighting``,
``low_pass``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from autospa.errors import InputError
from autospa.io.postprocess_files import PostprocessOutputs, read_mask, read_volume, write_postprocess
from autospa.jobs.registry import option_bool, option_float, register_job, resolve_path, succeed
from autospa.refinement.postprocess import PostprocessOptions, PostprocessResult, postprocess_halves
from autospa.report.fsc_plot import fsc_plot_png, guinier_plot_png

log = logging.getLogger(__name__)

__all__ = ["PostprocessJob", "default_half2", "run_postprocess", "job_postprocess"]


@dataclass(frozen=True)
class PostprocessJob:
    """What ``autospa postprocess`` asks for (relion_postprocess's options).

    Attributes
    ----------
    half1, half2
        Unfiltered half maps (``--i``, ``--i2``; half2 defaults to half1 with "half1" -> "half2").
    mask
        Solvent mask (``--mask``), or None.
    output_dir
        Output folder (``--o``); files are named ``<root>.mrc`` etc.
    root
        File name root (``postprocess``).
    pixel_size_a
        ``--angpix``; 0 or less: from the half map's header.
    auto_bfactor, adhoc_bfactor, autob_lowres_a, autob_highres_a, skip_fsc_weighting, low_pass_a,
    randomize_at_fsc, force_mask
        As :class:`autospa.refinement.postprocess.PostprocessOptions`.
    command_line
        Recorded in postprocess.star.
    """

    half1: str
    half2: str | None
    mask: str | None
    output_dir: str
    root: str = "postprocess"
    pixel_size_a: float = 0.0
    auto_bfactor: bool = False
    adhoc_bfactor: float = 0.0
    autob_lowres_a: float = 10.0
    autob_highres_a: float = 0.0
    skip_fsc_weighting: bool = False
    low_pass_a: float = 0.0
    randomize_at_fsc: float = 0.8
    force_mask: bool = False
    command_line: str | None = None


def default_half2(half1: str) -> str:
    """RELION's default ``--i2``: ``--i`` with its last "half1" replaced by "half2"."""
    name = Path(half1).name
    if "half1" not in name:
        raise InputError(half1, "cannot derive the second half map (the name holds no 'half1'): give --i2")
    i = name.rfind("half1")
    return str(Path(half1).with_name(name[:i] + "half2" + name[i + 5 :]))


def run_postprocess(job: PostprocessJob) -> tuple[PostprocessResult, PostprocessOutputs]:
    """Read, check, post-process and write.

    Returns
    -------
    tuple
        The numerical result and the written paths.

    Raises
    ------
    InputError
        Unreadable or mismatching maps, a bad mask, no pixel size, or an impossible B-factor fit;
        nothing is written then.
    """
    half2 = job.half2 or default_half2(job.half1)
    h1, px1 = read_volume(job.half1, "half map")
    h2, px2 = read_volume(half2, "half map")
    if h1.shape != h2.shape:
        raise InputError(half2, f"the half maps differ in size: {tuple(h1.shape)} and {tuple(h2.shape)}")
    px = job.pixel_size_a if job.pixel_size_a > 0 else px1
    if px <= 0:
        raise InputError(job.half1, "the header holds no pixel size: give --angpix")
    if job.pixel_size_a <= 0 and px2 > 0 and abs(px2 - px1) > 1e-3 * px1:
        raise InputError(half2, f"pixel size {px2:.4f} A differs from the first half map's {px1:.4f} A")
    mask = read_mask(job.mask, tuple(h1.shape)) if job.mask else None
    opts = PostprocessOptions(
        pixel_size_a=px,
        auto_bfactor=job.auto_bfactor,
        adhoc_bfactor=job.adhoc_bfactor,
        autob_lowres_a=job.autob_lowres_a,
        autob_highres_a=job.autob_highres_a,
        randomize_at_fsc=job.randomize_at_fsc,
        skip_fsc_weighting=job.skip_fsc_weighting,
        low_pass_a=job.low_pass_a,
        force_mask=job.force_mask,
    )
    try:
        result = postprocess_halves(h1, h2, mask, opts)
    except ValueError as exc:
        raise InputError(job.half1, str(exc)) from exc
    freq = (torch.arange(result.fsc_corrected.numel(), dtype=torch.float64) / (h1.shape[-1] * px)).numpy()
    curves = {"corrected (solvent mask)": result.fsc_corrected.numpy()} if mask is not None else {}
    curves["unmasked maps"] = result.fsc_unmasked.numpy()
    if mask is not None:
        curves["masked maps"] = result.fsc_masked.numpy()
        curves["phase-randomised masked maps"] = result.fsc_random_masked.numpy()
    fsc_png = fsc_plot_png(freq, curves, result.final_resolution_a)
    g_curves = {"original": result.guinier_in.numpy()}
    if not job.skip_fsc_weighting:
        g_curves["FSC-weighted"] = result.guinier_weighted.numpy()
    if result.bfactor != 0.0:
        g_curves["sharpened"] = result.guinier_sharpened.numpy()
    fit_hi = job.autob_highres_a if job.autob_highres_a > 0 else result.final_resolution_a
    gui_png = guinier_plot_png(
        result.guinier_s2.numpy(), g_curves,
        fit=(result.fit_slope, result.fit_intercept) if job.auto_bfactor else None,
        fit_range_a=(job.autob_lowres_a, fit_hi),
    )
    outputs = write_postprocess(
        job.output_dir, result, job.half1, half2, job.mask, px, job.auto_bfactor, fsc_png, gui_png,
        command_line=job.command_line, root=job.root,
    )
    log.info("postprocess: final resolution %.2f A, B-factor %.1f A^2", result.final_resolution_a, result.bfactor)
    return result, outputs


@register_job("relion.postprocess", outputs=("postprocess.mrc", "postprocess_masked.mrc", "postprocess.star"))
def job_postprocess(job_dir: Path, options: dict[str, str], continue_: bool) -> None:
    """Registry entry: ``relion.postprocess`` (``continue_`` recomputes, as RELION does)."""
    fn_in = str(options.get("fn_in", "")).strip()
    if not fn_in:
        raise InputError(job_dir, "relion.postprocess needs fn_in (the first unfiltered half map)")
    fn_mask = str(options.get("fn_mask", "")).strip()
    half1 = str(resolve_path(job_dir, fn_in))
    job = PostprocessJob(
        half1=half1,
        half2=None,
        mask=str(resolve_path(job_dir, fn_mask)) if fn_mask else None,
        output_dir=str(job_dir),
        pixel_size_a=option_float(options, "angpix", -1.0),
        auto_bfactor=option_bool(options, "do_auto_bfac", True),
        adhoc_bfactor=option_float(options, "adhoc_bfac", 0.0) if option_bool(options, "do_adhoc_bfac", False) else 0.0,
        autob_lowres_a=option_float(options, "autob_lowres", 10.0),
        skip_fsc_weighting=option_bool(options, "do_skip_fsc_weighting", False),
        low_pass_a=option_float(options, "low_pass", 0.0),
    )
    run_postprocess(job)
    succeed(job_dir)
