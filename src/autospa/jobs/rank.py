"""Automatic 2D class selection with the class ranker (L5): ``autospa rank`` and the job types
``relion.select.class2dauto`` (RELION's Select job with ``do_class_ranker = Yes``).

What ``relion_class_ranker --opt OPT --o DIR --auto_select --min_score T`` does
(reference/relion-schemes-and-ranker.md B1-B9), on our torch network:

1. read the 2D job from its ``run_itNNN_optimiser.star`` (model, data, class averages);
2. keep classes with more than 10 particles (pdf x total), compute their 24 features and 64 x 64
   images (:mod:`autospa.ranker.features`), score them (:mod:`autospa.ranker.network`; the
   shipped weights, or ``--model`` in RELION 5.0's checkpoint or RELION 4.0's TorchScript format);
3. select the classes with ``min_score <= score <= max_score`` (the default ``min_score`` is the
   threshold calibrated on our validation corpus and stored in the weights file), or with a score
   at or above a quantile of the job's scores (``--select_quantile``); then add the best remaining
   classes until ``--select_min_nr_particles`` / ``--select_min_nr_classes`` are met; then apply the
   manual overrides file (``--overrides``);
4. write rank_model.star (rlnClassScore), rank_data.star, rank_optimiser.star, features.npy,
   images.npy and, with ``--auto_select``, particles.star, class_averages.star
   (rlnPredictedClassScore) and backup_selection.star, plus ``rank_classes.png`` (classes sorted by
   score, scores shown, selected classes framed green).

Everything is computed before the first file is written, so bad input leaves old outputs alone.
"""

from __future__ import annotations

import argparse
import logging
import shlex
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from autospa.errors import InputError
from autospa.jobs.registry import option_bool, option_float, option_int, register_job, resolve_path, succeed

log = logging.getLogger(__name__)

#: The shipped weights (package data).
DEFAULT_WEIGHTS_NAME = "class_ranker_autospa_v3.ckpt"
#: Threshold used when a model file carries no calibrated one (RELION 4.0's ``--min_score`` default).
RELION_DEFAULT_MIN_SCORE = 0.5


def default_model_path() -> Path:
    """The weights shipped inside the package (``autospa/ranker/weights/``)."""
    return Path(str(resources.files("autospa.ranker").joinpath("weights", DEFAULT_WEIGHTS_NAME)))


@dataclass
class LoadedRanker:
    """A scoring model and what its file says about it.

    Attributes
    ----------
    model
        :class:`autospa.ranker.network.ClassRankerNet` or a TorchScript module.
    path
        The file.
    default_threshold
        The calibrated selection threshold stored with our weights, else None.
    kind
        ``"checkpoint"`` (RELION 5.0 layout / ours) or ``"torchscript"`` (RELION 4.0).
    """

    model: torch.nn.Module
    path: Path
    default_threshold: float | None
    kind: str


def load_ranker(path: str | Path | None = None, device: str = "cpu") -> LoadedRanker:
    """Load a class-ranker model (default: the shipped weights).

    Raises
    ------
    InputError
        Missing file, unknown format or weights that do not fit the architecture.
    """
    from autospa.io.ranker_files import load_model_file
    from autospa.ranker.network import model_from_payload

    p = Path(path) if path is not None else default_model_path()
    if path is None and not p.is_file():
        raise InputError(p, "the shipped class-ranker weights are missing (reinstall autospa, or give --model)")
    obj = load_model_file(p)
    if isinstance(obj, dict):
        thr = obj.get("autospa_default_threshold")
        return LoadedRanker(model_from_payload(obj, str(p)).to(device), p, None if thr is None else float(thr), "checkpoint")
    return LoadedRanker(obj.to(device).eval(), p, None, "torchscript")


def select_classes(scores: np.ndarray, scored: np.ndarray, counts: np.ndarray, min_score: float, max_score: float = 999.0,
                   quantile: float | None = None, min_particles: int = -1, min_classes: int = -1,
                   overrides: dict[int, bool] | None = None) -> np.ndarray:
    """relion_class_ranker's selection rule (B9), plus quantile selection and manual overrides.

    Parameters
    ----------
    scores, scored, counts
        ``(K,)`` predicted scores, whether each class was scored, and particle counts.
    min_score, max_score
        Classes with ``min_score <= score <= max_score`` are selected (ignored with ``quantile``).
    quantile
        Select instead the scored classes whose score is at least this quantile (0..1) of the
        scored classes' scores (``max_score`` still applies).
    min_particles, min_classes
        Walk the remaining scored classes from the best down, adding them until the selection
        holds this many particles (checked first) or classes (-1 = off).
    overrides
        Class number (1-based) -> selected, applied last.

    Returns
    -------
    np.ndarray
        ``(K,)`` bool.
    """
    scores = np.asarray(scores, np.float64)
    scored = np.asarray(scored, bool)
    counts = np.asarray(counts, np.float64)
    if quantile is not None:
        if not 0.0 <= quantile <= 1.0:
            raise InputError(None, f"--select_quantile must be within [0, 1] (got {quantile})")
        cut = float(np.quantile(scores[scored], quantile)) if scored.any() else np.inf
        sel = scored & (scores >= cut) & (scores <= max_score)
    else:
        sel = scored & (scores >= min_score) & (scores <= max_score)
    order = [int(c) for c in np.argsort(-np.where(scored, scores, -np.inf), kind="stable") if scored[c]]
    if min_particles > 0:
        for c in order:
            if counts[sel].sum() >= min_particles:
                break
            sel[c] = True
    elif min_classes > 0:
        for c in order:
            if sel.sum() >= min_classes:
                break
            sel[c] = True
    for c, v in (overrides or {}).items():
        sel[int(c) - 1] = bool(v)
    return sel


@dataclass
class RankOptions:
    """Options of a ranking run (relion_class_ranker's names in brackets).

    Attributes
    ----------
    optimiser
        The 2D job's run_itNNN_optimiser.star [--opt].
    output_dir
        [--o].
    model
        Model file [--fn_pytorch_model / --model]; default the shipped weights.
    auto_select
        Write the selection [--auto_select].
    min_score, max_score
        Score window [--min_score, --max_score]; ``min_score`` None uses the model's calibrated
        default (RELION's 0.5 for a model without one).
    quantile
        Select by a quantile of the scores instead of a threshold.
    select_min_nr_particles, select_min_nr_classes
        [--select_min_nr_particles, --select_min_nr_classes] (-1 = off).
    overrides
        Manual overrides file (:func:`autospa.io.ranker_files.read_overrides`).
    fn_root, fn_sel_parts, fn_sel_classavgs
        Output names.
    min_class_particles
        Classes need more particles than this to be scored (RELION: 10).
    device
        ``cpu`` or ``cuda``.
    """

    optimiser: str
    output_dir: str
    model: str | None = None
    auto_select: bool = True
    min_score: float | None = None
    max_score: float = 999.0
    quantile: float | None = None
    select_min_nr_particles: int = -1
    select_min_nr_classes: int = -1
    overrides: str | None = None
    fn_root: str = "rank"
    fn_sel_parts: str = "particles.star"
    fn_sel_classavgs: str = "class_averages.star"
    min_class_particles: float = 10.0
    device: str = "cpu"


@dataclass
class RankResult:
    """What a ranking run found (also written to files)."""

    scores: np.ndarray
    scored: np.ndarray
    selected: np.ndarray
    counts: np.ndarray
    threshold: float | None
    n_particles_selected: int
    files: dict = field(default_factory=dict)


def run_rank(opts: RankOptions) -> RankResult:
    """Score and select the classes of a 2D job; see the module docstring.

    Raises
    ------
    InputError
        Unreadable inputs, a 2D job run without CTF correction (as RELION), bad options.
    """
    from autospa.io.ranker_files import read_class2d_job, read_overrides, write_rank_outputs
    from autospa.jobs.ranker_train import inputs_of_job
    from autospa.ranker.network import predict_scores
    from autospa.report.class_gallery import class_gallery_png

    if opts.quantile is not None and not 0.0 <= opts.quantile <= 1.0:
        raise InputError(None, f"--select_quantile must be within [0, 1] (got {opts.quantile})")
    if opts.min_score is not None and opts.min_score > opts.max_score:
        raise InputError(None, f"--min_score {opts.min_score} is above --max_score {opts.max_score}")
    job = read_class2d_job(opts.optimiser)
    if not job.do_correct_ctf:
        raise InputError(job.optimiser_path, "the 2D classification ran without CTF correction; the class ranker needs --ctf "
                                             "(RELION's ranker skips such jobs)")
    if int(job.optimiser.get("rlnIgnoreCtfUntilFirstPeak", 0) or 0):
        log.warning("%s: --ctf_intact_first_peak is not corrected before ranking", job.optimiser_path)
    if not job.particle_diameter_a > 0:
        raise InputError(job.optimiser_path, "rlnParticleDiameter is missing or not positive")
    overrides = read_overrides(opts.overrides, job.n_classes) if opts.overrides else {}
    ranker = load_ranker(opts.model, opts.device)
    inputs = inputs_of_job(job)
    k = job.n_classes
    scored = inputs.kept.numpy().astype(bool)
    scores = np.full(k, -999.0)
    if scored.any():
        scores[scored] = predict_scores(ranker.model, inputs.images, inputs.features).numpy()
    counts = job.classes_table["rlnClassDistribution"].to_numpy(np.float64) * len(job.particles)
    thr = opts.min_score if opts.min_score is not None else (ranker.default_threshold if ranker.default_threshold is not None
                                                             else RELION_DEFAULT_MIN_SCORE)
    selected = select_classes(scores, scored, counts, thr, opts.max_score, opts.quantile, opts.select_min_nr_particles,
                              opts.select_min_nr_classes, overrides)
    order = np.argsort(-scores, kind="stable")
    res = job.classes_table["rlnEstimatedResolution"].to_numpy(np.float64) if "rlnEstimatedResolution" in job.classes_table else None
    rule = f"quantile {opts.quantile:g}" if opts.quantile is not None else f"score >= {thr:.3g}"
    png = class_gallery_png(job.classes, job.classes_table["rlnClassDistribution"].to_numpy(np.float64), res,
                            scores=np.where(scored, scores, np.nan), selected=selected if opts.auto_select else None, order=order,
                            title=f"{Path(opts.optimiser).name}: {int(selected.sum())} of {k} classes selected ({rule})")
    files = write_rank_outputs(opts.output_dir, job, scores, selected, inputs.features.numpy(), inputs.images.numpy(), scored, png,
                               opts.fn_root, opts.fn_sel_parts, opts.fn_sel_classavgs, write_selection=opts.auto_select)
    n_sel = int(np.isin(job.particles["rlnClassNumber"].to_numpy(np.int64), np.flatnonzero(selected) + 1).sum())
    log.info("rank: %d of %d classes scored, %d selected (%s), %d of %d particles", int(scored.sum()), k, int(selected.sum()), rule,
             n_sel, len(job.particles))
    return RankResult(scores, scored, selected, counts, None if opts.quantile is not None else thr, n_sel, files)


# ----------------------------------------------------------------------------------- job ---

def _other_args(text: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--select_quantile", type=float, default=None)
    p.add_argument("--overrides", default=None)
    p.add_argument("--model", "--fn_pytorch_model", dest="model", default=None)
    p.add_argument("--max_score", type=float, default=999.0)
    args, _unknown = p.parse_known_args(shlex.split(text or ""))
    return args


def options_from_job(job_dir: Path, options: dict[str, str]) -> RankOptions:
    """RankOptions from a relion.select job.star with ``do_class_ranker`` (RELION's option names:
    fn_model, rank_threshold, select_nr_parts, select_nr_classes; ``other_args`` may add
    --select_quantile, --overrides, --model, --max_score). A missing, empty or ``auto``
    rank_threshold uses the model's calibrated default."""
    src = str(options.get("fn_model", "")).strip().strip('"')
    if not src:
        raise InputError(job_dir, "relion.select.class2dauto needs fn_model (a 2D job's run_itNNN_optimiser.star)")
    extra = _other_args(str(options.get("other_args", "")).strip().strip('"'))
    nr_parts = option_int(options, "select_nr_parts", -1)
    nr_classes = option_int(options, "select_nr_classes", -1)
    return RankOptions(
        optimiser=str(resolve_path(job_dir, src)),
        output_dir=str(job_dir),
        model=str(resolve_path(job_dir, extra.model)) if extra.model else None,
        auto_select=True,
        min_score=None if str(options.get("rank_threshold", "")).strip().strip('"').lower() in ("", "auto", "default")
        else option_float(options, "rank_threshold"),
        max_score=extra.max_score,
        quantile=extra.select_quantile,
        select_min_nr_particles=nr_parts,
        select_min_nr_classes=-1 if nr_parts > 0 else nr_classes,
        overrides=str(resolve_path(job_dir, extra.overrides)) if extra.overrides else None,
        device="cuda" if option_bool(options, "use_gpu", False) and torch.cuda.is_available() else "cpu",
    )


@register_job("relion.select.class2dauto", outputs=("particles.star", "class_averages.star", "rank_optimiser.star"))
def job_select_class2dauto(job_dir: Path, options: dict[str, str], continue_: bool) -> None:
    """Registry entry: automatic 2D class selection (Select job with do_class_ranker = Yes)."""
    run_rank(options_from_job(Path(job_dir), options))
    succeed(job_dir)


__all__ = ["LoadedRanker", "RankOptions", "RankResult", "default_model_path", "load_ranker", "options_from_job", "run_rank",
           "select_classes"]
