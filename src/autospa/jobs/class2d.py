"""2D classification (RELION's relion_refine for 2D; job type relion.class2d): EM or VDAM on one
E-step, distributed over the chunks of a particle store.

The driver holds the small model state (references, noise, priors, moments) and, per particle,
the current class, psi, origin and scores; each iteration it maps the E-step over the chunks
holding that iteration's particles (:func:`autospa.distributed.map_reduce.run_estep`), applies
the EM or VDAM update to the reduced statistics, writes RELION's output files when due and a
checkpoint after every iteration (so ``--continue`` resumes after a kill).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from autospa.data.particle_stack import ParticleStack
from autospa.distributed.map_reduce import CTF_COLUMNS, ParticleTable, ctf_images, run_estep
from autospa.errors import InputError
from autospa.io import refine_files as rf
from autospa.io.zarr_store import open_store
from autospa.jobs.refine_common import (
    checkpoint_path, group_tables, require_checkpoint, save_run_checkpoint,
    check_numeric_options, check_particles_input, current_client, initial_noise,
    image_names, input_store, particle_diameter_px, per_particle_init, shared_pixel_size, write_data_table,
    other_args_check_norm,
)
from autospa.jobs.registry import check_abort, job_device, option_bool, option_float, option_int, register_job, resolve_path, succeed
from autospa.numerics.masks import soft_circular_mask
from autospa.refinement import init as rinit
from autospa.refinement import mstep, schedule
from autospa.refinement.accuracy import expected_accuracies
from autospa.refinement.estep import EStepModel, Sampling
from autospa.refinement.state import ModelState
from autospa.refinement.vdam import vdam_update
from autospa.report.class_gallery import class_gallery_png

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


@dataclass
class Class2DOptions:
    """Options of a 2D classification, named after relion_refine's.

    Attributes
    ----------
    input
        A RELION particles.star (stacks resolved as RELION does) or a particle store (``.zarr``).
    output
        Output root ``DIR/run``.
    n_classes
        --K.
    n_iter
        --iter (default 25 for EM, 200 for VDAM).
    grad
        --grad: VDAM instead of EM.
    particle_diameter_a
        --particle_diameter in Angstrom (default 75% of the box).
    tau2_fudge
        --tau2_fudge T (VDAM schedules it from 1 to T).
    psi_step_deg, offset_range_px, offset_step_px
        Coarse sampling; the fine pass halves both steps.
    ctf, zero_mask, center_classes
        --ctf, --zero_mask (on by default; --no_zero_mask turns it off), --center_classes.
    class_inactivity_threshold
        VDAM's inactive-class substitution threshold.
    grad_write_iter
        VDAM writes output every this many iterations (and on full passes and the last).
    mu
        VDAM's EMA factor for noise, priors and offsets.
    pad
        --pad.
    random_seed
        --random_seed.
    adaptive_fraction, maxsig
        Significance pruning: --adaptive_fraction and --maxsig (0 = no cap).
    device
        ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when the worker has it).
    torch_threads
        Threads of torch inside each task (0: torch's default).
    store_chunk
        Particles per chunk when a STAR file is imported.
    """

    input: str
    output: str
    n_classes: int = 1
    n_iter: int | None = None
    grad: bool = False
    particle_diameter_a: float | None = None
    tau2_fudge: float = 2.0
    psi_step_deg: float = 6.0
    offset_range_px: float = 5.0
    offset_step_px: float = 1.0
    ctf: bool = False
    zero_mask: bool = True
    check_norm: bool = True
    center_classes: bool = False
    class_inactivity_threshold: float = 0.1
    grad_write_iter: int = 10
    mu: float = 0.9
    pad: int = 2
    random_seed: int = 1
    adaptive_fraction: float = 0.999
    maxsig: int = 0
    device: str = "cpu"
    torch_threads: int = 0
    store_chunk: int = 1024
    command_line: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def iterations(self) -> int:
        return self.n_iter if self.n_iter is not None else (200 if self.grad else 25)


@dataclass
class IterationInfo:
    """What the driver reports after each iteration (for progress bars and logs)."""

    iteration: int
    n_iter: int
    n_particles: int
    seconds: float
    resolution_a: float
    log_likelihood: float
    average_pmax: float
    written: str | None
    stage: str | None = None  # a later stage of the run with its own count (initial-model's gold-standard EM)


# --------------------------------------------------------------------------------------------
# input


def check_input(opts: Class2DOptions, continue_: bool = False) -> None:
    """Cheap checks of the input (before a cluster is started): raises InputError."""
    if continue_:
        require_checkpoint(opts.output)
        return
    src = check_particles_input(opts.input)
    if opts.n_classes < 1:
        raise InputError(src, f"--K must be at least 1 (got {opts.n_classes})")
    check_numeric_options(src, opts)


def particle_table(stack: ParticleStack, use_ctf: bool) -> ParticleTable:
    """CTF parameters, optics groups and pseudo half-sets of every particle of a store."""
    meta = stack.metadata
    optics = stack.optics.copy()
    n = len(stack)
    groups_1b = meta["OpticsGroup"].to_numpy(np.int64) if "OpticsGroup" in meta else np.ones(n, np.int64)
    group_ids = sorted(set(groups_1b.tolist()))
    group = np.searchsorted(np.array(group_ids), groups_1b).astype(np.int64)
    pixel = shared_pixel_size(stack)
    params = None
    premult = None
    if use_ctf:
        opt = optics.set_index("rlnOpticsGroup") if "rlnOpticsGroup" in optics else optics
        def col(name: str, default: float) -> np.ndarray:
            if name in meta:
                return meta[name].to_numpy(np.float64)
            label = "rln" + name
            if label in opt.columns:
                return opt.loc[groups_1b, label].to_numpy(np.float64)
            return np.full(n, default)
        for required in ("DefocusU", "DefocusV"):
            if required not in meta:
                raise InputError(stack.store_path or "particles", f"--ctf needs rln{required} for every particle")
        defaults = {"DefocusAngle": 0.0, "Voltage": 300.0, "SphericalAberration": 2.7, "AmplitudeContrast": 0.1,
                    "PhaseShift": 0.0, "CtfBfactor": 0.0, "CtfScalefactor": 1.0}
        params = np.stack([col(c, defaults.get(c, 0.0)) for c in CTF_COLUMNS], 1)
        pm = np.zeros(n, bool)
        for label in ("rlnCtfDataAreCtfPremultiplied",):
            if label in opt.columns:
                pm |= opt.loc[groups_1b, label].to_numpy().astype(int) == 1
        premult = pm if pm.any() else None
    return ParticleTable(ctf_params=params, pixel_size_a=pixel, group=group, half=np.arange(n, dtype=np.int64) % 2,
                         ctf_premultiplied=premult)


def circular_mask(box: int, radius_px: float, edge_px: float = 5.0, device=None) -> torch.Tensor:
    """RELION's soft particle mask: 1 inside ``radius``, raised cosine out to ``radius + edge``."""
    return soft_circular_mask(box, radius_px, edge_px, device=device)


def coarse_window(psi_step_deg: float, current_size: int, min_size: int = 10) -> int:
    """Fourier window of the coarse pass: out to the radius where the coarse psi step moves a
    pixel by one pixel (an arc of ``psi_step`` at radius r equals 1), at most the current size."""
    r = 1.0 / math.radians(psi_step_deg)
    return int(min(current_size, max(min_size, 2 * math.ceil(r))))


# --------------------------------------------------------------------------------------------
# initialisation


def _initialise(opts, stack: ParticleStack, store_path: Path, table: ParticleTable, mask: torch.Tensor | None, gen: torch.Generator) -> ModelState:
    box = stack.box
    sigma2, pick, imgs = initial_noise(store_path, table, mask, opts.random_seed,
                                       check_norm_radius_px=particle_diameter_px(opts, stack) / 2 if opts.check_norm else None,
                                       image_names=image_names(stack))
    ctf = ctf_images(None if table.ctf_params is None else table.ctf_params[pick], len(pick), box, table.pixel_size_a, torch.device("cpu"))
    k = opts.n_classes
    seeds = rinit.seed_maps(imgs, ctf, k, sigma2[0].to(torch.float32), gen, pad=opts.pad)
    diameter_px = particle_diameter_px(opts, stack)
    # Gaussian-blob references, different per class, for VDAM (RELION 4.0) and, unlike RELION, for
    # EM too: EM started from RELION's random-subset averages (all nearly the same rotationally
    # blurred blob) merged two of three simulated structures (purity 0.68 vs 1.00 from blobs, 500
    # particles, K = 6, 10 iterations).
    refs = rinit.blob_references(seeds, diameter_px, gen)
    tau2 = mstep.tau2_of(refs, opts.pad)
    dvp = torch.zeros(k, box // 2 + 1, dtype=torch.float64)
    return ModelState(
        refs=refs.to(torch.float32),
        sigma2=sigma2.to(torch.float32),
        class_prior=torch.full((k,), 1.0 / k, dtype=torch.float64),
        sigma_offset_a=3.0 * table.pixel_size_a,
        pixel_size_a=table.pixel_size_a,
        current_size=mstep.next_current_size(dvp, box),
        iteration=0,
        tau2=tau2,
        data_vs_prior=dvp,
        completeness=torch.zeros_like(dvp),
        pad=opts.pad,
    )



# --------------------------------------------------------------------------------------------
# outputs


def _model_star(root: Path, state: ModelState, opts: Class2DOptions, stack: ParticleStack, table: ParticleTable,
                acc_rot: np.ndarray, acc_trans_a: np.ndarray, tau2_fudge_now: float, moment_names) -> Path:
    box, pix, k = state.box, state.pixel_size_a, state.n_classes
    n_shells = box // 2 + 1
    dvp = state.data_vs_prior.cpu().numpy()
    res_shell = mstep.resolution_shell(state.data_vs_prior).cpu().numpy()
    est_res = np.where(res_shell > 0, box * pix / np.maximum(res_shell, 1), 999.0)
    completeness = state.completeness.cpu().numpy()
    overall = [float(completeness[c, 1 : max(2, state.current_size // 2 + 1)].mean()) for c in range(k)]
    pi = state.class_prior.cpu().numpy()
    classes = pd.DataFrame({
        "rlnReferenceImage": [f"{c + 1:06d}@{root}_classes.mrcs" for c in range(k)],  # from the project directory, as RELION
        "rlnClassDistribution": pi,
        "rlnAccuracyRotations": np.where(pi < 0.01, 999.0, acc_rot),
        "rlnAccuracyTranslationsAngst": np.where(pi < 0.01, 999.0, acc_trans_a),
        "rlnEstimatedResolution": est_res,
        "rlnOverallFourierCompleteness": overall,
        "rlnClassPriorOffsetX": np.zeros(k),
        "rlnClassPriorOffsetY": np.zeros(k),
    })
    if moment_names is not None:
        classes.insert(1, "rlnGradMoment1", [f"{c + 1:06d}@{moment_names[0]}" for c in range(k)])
        classes.insert(2, "rlnGradMoment2", [f"{c + 1:06d}@{moment_names[1]}" for c in range(k)])
    cur_res = float(box * pix / max(1, int(res_shell.max())))
    general = {
        "rlnReferenceDimensionality": 2, "rlnDataDimensionality": 2, "rlnOriginalImageSize": box,
        "rlnCurrentResolution": cur_res, "rlnCurrentImageSize": state.current_size, "rlnPaddingFactor": float(state.pad),
        "rlnIsHelix": 0, "rlnFourierSpaceInterpolator": 1, "rlnMinRadiusNnInterpolation": 10,
        "rlnPixelSize": pix, "rlnNrClasses": k, "rlnNrBodies": 1, "rlnNrGroups": int(table.group.max()) + 1,
        "rlnNrOpticsGroups": int(table.group.max()) + 1, "rlnTau2FudgeFactor": float(tau2_fudge_now),
        "rlnNormCorrectionAverage": 1.0, "rlnSigmaOffsetsAngst": float(state.sigma_offset_a),
        "rlnOrientationalPriorMode": 0, "rlnSigmaPriorRotAngle": 0.0, "rlnSigmaPriorTiltAngle": 0.0,
        "rlnSigmaPriorPsiAngle": 0.0, "rlnLogLikelihood": float(state.log_likelihood), "rlnAveragePmax": float(state.average_pmax),
    }
    rescols = rf.resolution_columns(n_shells, box, pix)
    tau2 = state.tau2.cpu().numpy()
    spectra = []
    for c in range(k):
        spectra.append(rf.spectral_table({**rescols, "rlnSsnrMap": dvp[c], "rlnGoldStandardFsc": np.zeros(n_shells),
                                          "rlnFourierCompleteness": completeness[c], "rlnReferenceSigma2": state.sigma2[0].cpu().numpy(),
                                          "rlnReferenceTau2": tau2[c]}))
    groups, noise = group_tables(state.sigma2, table, stack)
    return rf.write_model_star(Path(f"{root}_model.star"), general, classes, spectra, groups, noise)


def _write_iteration(root: Path, it: int, state: ModelState, opts: Class2DOptions, stack: ParticleStack, table: ParticleTable,
                     pp: dict, tau2_fudge_now: float, step_now: float, subset: int) -> None:
    pix = state.pixel_size_a
    rf.write_classes(Path(f"{root}_classes.mrcs"), state.refs.cpu().numpy(), pix)
    moment_names = None
    if state.moment1 is not None:
        moment_names = rf.write_moments(root, state.moment1, state.moment2, pix)
    # expected accuracies from the first 10 particles (RELION)
    first = np.arange(min(10, len(stack)))
    ctf = ctf_images(None if table.ctf_params is None else table.ctf_params[first], len(first), state.box, pix, torch.device("cpu"))
    sig = state.sigma2[torch.as_tensor(table.group[first])]
    rot, trans = expected_accuracies(mstep.reference_ft(state.refs, state.pad), ctf, sig, state.current_size, state.pad)
    _model_star(root, state, opts, stack, table, rot.numpy(), trans.numpy() * pix, tau2_fudge_now, moment_names)
    write_data_table(root, stack, pp, pix)
    rf.write_general_star(Path(f"{root}_sampling.star"), "sampling_general", {
        "rlnIs3DSampling": 0, "rlnIs3DTranslationalSampling": 0, "rlnPsiStep": opts.psi_step_deg,
        "rlnOffsetRange": opts.offset_range_px * pix, "rlnOffsetStep": opts.offset_step_px * pix,
        "rlnHelicalOffsetStep": -1.0, "rlnSamplingPerturbInstance": 0.0, "rlnSamplingPerturbFactor": 0.5,
        "rlnPsiStepOriginal": opts.psi_step_deg, "rlnOffsetRangeOriginal": opts.offset_range_px * pix,
        "rlnOffsetStepOriginal": opts.offset_step_px * pix})
    out_root = Path(opts.output)
    rf.write_general_star(Path(f"{root}_optimiser.star"), "optimiser_general", {
        "rlnOutputRootName": str(out_root), "rlnModelStarFile": f"{root}_model.star",
        "rlnExperimentalDataStarFile": f"{root}_data.star", "rlnOrientSamplingStarFile": f"{root}_sampling.star",
        "rlnCurrentIteration": it, "rlnNumberOfIterations": opts.iterations, "rlnAdaptiveOversampleFraction": opts.adaptive_fraction,
        "rlnAdaptiveOversampleOrder": 1, "rlnParticleDiameter": float(opts.particle_diameter_a or 0.75 * stack.box * pix),
        "rlnDoCorrectCtf": int(opts.ctf), "rlnDoZeroMask": int(opts.zero_mask), "rlnDoSolventFlattening": 1,
        "rlnDoCenterClasses": int(opts.center_classes), "rlnRandomSeed": opts.random_seed, "rlnTau2FudgeFactor": tau2_fudge_now,
        "rlnDoGradientRefine": int(opts.grad), "rlnDoStochasticGradientDescent": int(opts.grad),
        "rlnGradCurrentStepsize": step_now, "rlnSgdSubsetSize": subset, "rlnSgdMuFactor": opts.mu,
        "rlnSgdClassInactivityThreshold": opts.class_inactivity_threshold, "rlnSgdWriteEverySubset": opts.grad_write_iter,
        "rlnMaximumSignificantPoses": opts.maxsig, "rlnHasConverged": int(it >= opts.iterations),
    }, command_line=opts.command_line or None)
    order = np.argsort(-state.class_prior.cpu().numpy(), kind="stable")
    res_shell = mstep.resolution_shell(state.data_vs_prior).cpu().numpy()
    png = class_gallery_png(state.refs.cpu().numpy(), state.class_prior.cpu().numpy(),
                            np.where(res_shell > 0, state.box * pix / np.maximum(res_shell, 1), 999.0), order=order,
                            title=f"{root.name}: {state.n_classes} classes")
    rf.write_png(Path(f"{root}_classes.png"), png)


# --------------------------------------------------------------------------------------------
# the run


def run_class2d(
    opts: Class2DOptions,
    client=None,
    continue_: bool = False,
    progress: Callable[[IterationInfo], None] | None = None,
    stop_after: int | None = None,
) -> dict:
    """Run (or continue) a 2D classification.

    Parameters
    ----------
    opts
        The options.
    client
        A dask client (None: tasks run in this process).
    continue_
        Resume from ``<output>_checkpoint.pt``; options given in ``opts`` replace the stored ones
        only for the number of iterations (``--iter``).
    progress
        Called after every iteration.
    stop_after
        Stop after this iteration (tests; the checkpoint is left as after a kill).

    Returns
    -------
    dict
        ``{"iteration", "root", "state", "particles", "store"}`` of the last iteration.
    """
    out_root = Path(opts.output)
    out_dir = out_root.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = checkpoint_path(out_root)
    if continue_:
        ck = rf.load_checkpoint(ckpt_path)
        stored = Class2DOptions(**ck["options"])
        if opts.n_iter is not None:
            stored.n_iter = opts.n_iter
        stored.device, stored.torch_threads = opts.device, opts.torch_threads
        opts = stored
    store_path = input_store(opts.input, opts.output, opts.store_chunk) if not continue_ else Path(ck["store"])
    stack = open_store(store_path)
    table = particle_table(stack, opts.ctf)
    n, box = len(stack), stack.box
    if opts.n_classes < 1:
        raise InputError(opts.input, f"--K must be at least 1 (got {opts.n_classes})")
    diameter_px = particle_diameter_px(opts, stack)
    mask = circular_mask(box, diameter_px / 2) if opts.zero_mask else None
    gen = torch.Generator().manual_seed(opts.random_seed)
    if continue_:
        if ck.get("n_particles") != n or ck.get("box") != box:
            raise InputError(ckpt_path, "checkpoint does not match the particle store (different particles or box)")
        state = ModelState.from_dict(ck["state"])
        pp = ck["particles"]
        it0 = ck["iteration"]
        gen.set_state(ck["torch_rng"])
    else:
        state = _initialise(opts, stack, store_path, table, mask, gen)
        pp = per_particle_init(stack, table)
        it0 = 0
        root0 = rf.iteration_root(out_root, 0)
        rf.write_classes(Path(f"{root0}_classes.mrcs"), state.refs.numpy(), state.pixel_size_a)
        _save(ckpt_path, opts, store_path, n, box, state, pp, 0, gen)
    n_iter = opts.iterations
    ph = schedule.phases(n_iter)
    s_ini, s_fin = schedule.subset_sizes(n, "2d")
    chunk_bounds = stack.chunk_bounds()
    root = None
    for it in range(it0 + 1, n_iter + 1):
        t0 = time.perf_counter()
        rng = np.random.default_rng(opts.random_seed * 100003 + it)
        if opts.grad:
            size = schedule.subset_size(it, ph, n, s_ini, s_fin, opts.n_classes)
            subset = np.sort(rng.permutation(n)[:size]) if size < n else np.arange(n)
            step = schedule.step_size(it, ph, final=0.3)
            t2f = schedule.tau2_fudge(it, ph, final=opts.tau2_fudge)
        else:
            subset, step, t2f = np.arange(n), 1.0, opts.tau2_fudge
        full = len(subset) == n
        perturb = float(rng.uniform(-0.5, 0.5))
        # RELION's significance cap: --maxsig, else 5 K during gradient iterations, none in EM
        maxsig = opts.maxsig if opts.maxsig > 0 else (5 * opts.n_classes if opts.grad else 0)
        sampling = Sampling(opts.psi_step_deg, opts.offset_range_px, opts.offset_step_px, perturb,
                              opts.adaptive_fraction, maxsig)
        log_prior = torch.where(state.class_prior > 0, torch.log(state.class_prior.clamp_min(1e-300)),
                                torch.full_like(state.class_prior, -torch.inf)).to(torch.float32)
        model = EStepModel(
            ref_ft=mstep.reference_ft(state.refs, state.pad), sigma2=state.sigma2, log_class_prior=log_prior,
            sigma_offset_px=state.sigma_offset_a / state.pixel_size_a, current_size=state.current_size,
            coarse_size=coarse_window(opts.psi_step_deg, state.current_size), pad=state.pad)
        stats, res = run_estep(client, str(store_path), chunk_bounds, subset, pp["origin_px"], table, model, sampling, mask,
                               device=opts.device, torch_threads=opts.torch_threads)
        idx = res["index"]
        for key in ("class_index", "psi_deg", "origin_px", "max_posterior", "n_significant", "log_likelihood"):
            pp[key][idx] = res[key]
        if opts.grad:
            in_between = ph.n_ini <= it < ph.n_ini + ph.n_between
            # [paper != code] RELION's last full pass is an ordinary VDAM iteration with mu = 0.
            state, _info = vdam_update(state, stats, step, t2f, 0.0 if full else opts.mu, diameter_px / 2,
                                       center=opts.center_classes, inactivity_threshold=opts.class_inactivity_threshold,
                                       allow_replacement=in_between)
        else:
            state = mstep.em_update(state, stats, opts.tau2_fudge, diameter_px / 2, center=opts.center_classes)
        write = (not opts.grad) or full or it % opts.grad_write_iter == 0 or it == n_iter
        root = None
        if write:
            root = rf.iteration_root(out_root, it)
            _write_iteration(root, it, state, opts, stack, table, pp, t2f, step, len(subset))
        _save(ckpt_path, opts, store_path, n, box, state, pp, it, gen)
        if progress is not None:
            res_shell = int(mstep.resolution_shell(state.data_vs_prior).max())
            progress(IterationInfo(it, n_iter, len(subset), time.perf_counter() - t0, box * state.pixel_size_a / max(res_shell, 1),
                                   float(state.log_likelihood), float(state.average_pmax), None if root is None else str(root)))
        if stop_after is not None and it >= stop_after:
            break
    return {"iteration": state.iteration, "root": root, "state": state, "particles": pp, "store": store_path}


def _save(path: Path, opts, store_path, n, box, state: ModelState, pp: dict, it: int, gen: torch.Generator) -> None:
    save_run_checkpoint(path, CHECKPOINT_VERSION, asdict(opts), store_path, n, box, state, pp, it, gen)


def options_from_job(job_dir: Path, options: dict[str, str]) -> Class2DOptions:
    """Class2DOptions from a relion.class2d job.star (RELION's GUI option names)."""
    grad = option_bool(options, "do_grad", False) and not option_bool(options, "do_em", False)
    return Class2DOptions(
        device=job_device(options),
        input=str(resolve_path(job_dir, options.get("fn_img", ""))),
        output=str(Path(job_dir) / "run"),
        n_classes=option_int(options, "nr_classes", 1),
        n_iter=option_int(options, "nr_iter_grad", 200) if grad else option_int(options, "nr_iter_em", 25),
        grad=grad,
        particle_diameter_a=option_float(options, "particle_diameter", 200.0),
        tau2_fudge=option_float(options, "tau_fudge", 2.0),
        # the GUI's values are the fine sampling: RELION passes twice them (oversampling 1)
        psi_step_deg=2.0 * option_float(options, "psi_sampling", 6.0),
        offset_range_px=option_float(options, "offset_range", 5.0),
        offset_step_px=2.0 * option_float(options, "offset_step", 1.0),
        ctf=option_bool(options, "do_ctf_correction", True),
        zero_mask=option_bool(options, "do_zero_mask", True),
        center_classes=option_bool(options, "do_center", True),
        check_norm=other_args_check_norm(options.get("other_args", "")),
    )


@register_job("relion.class2d")
def job_class2d(job_dir: Path, options: dict[str, str], continue_: bool) -> None:
    """Registry entry (schemes): run 2D classification in the job directory, resuming a checkpoint."""
    opts = options_from_job(Path(job_dir), options)
    client = current_client()
    ckpt = Path(job_dir) / "run_checkpoint.pt"
    run_class2d(opts, client=client, continue_=continue_ and ckpt.exists(),
                progress=lambda info: check_abort(job_dir))
    succeed(job_dir)


__all__ = ["Class2DOptions", "IterationInfo", "circular_mask", "coarse_window", "particle_table", "run_class2d"]
