"""3D initial model by VDAM (RELION's relion_refine --grad --denovo_3dref, then
relion_align_symmetry; job type relion.initialmodel).

K classes start from Gaussian-blob maps (different per class) and follow the VDAM schedules of
the 3D initial model (reference/relion-vdam.md sections 4.6-4.8 and 5): step size 0.9 -> 0.5,
T 1 -> 4, mini-batches clamp(0.5 % N, 200, 5000) then clamp(10 % N, 1000, 50000), the last
iteration a full pass when K > 1, significance capped at 100 K. The E-step is the shared one
with central slices of the 3D maps and HEALPix orientations; the angular sampling follows the
resolution (auto-sampling) from ``--healpix_order`` up to ``--max_healpix_order``. The run
writes RELION's run_itNNN files every ``--grad_write_iter`` iterations and a checkpoint every
iteration. At the end the most populated class goes through ``--final_em_iter`` gold-standard EM
iterations (autospa, not RELION: see :func:`gold_standard_finish`), is aligned to the axes of
``--sym`` (C1: unchanged), symmetrised, and written as ``initial_model.mrc``.
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
from autospa.distributed.map_reduce import ParticleTable, ctf_images, run_estep
from autospa.errors import InputError
from autospa.io import refine_files as rf
from autospa.io.postprocess_files import write_volume
from autospa.io.zarr_store import open_store
from autospa.jobs.class2d import IterationInfo, circular_mask, particle_table
from autospa.jobs.refine_common import (
    checkpoint_path, group_tables, require_checkpoint, save_run_checkpoint,
    check_numeric_options, check_particles_input, current_client, initial_noise,
    POSE_KEYS, half_set_estep, image_names, input_store, particle_diameter_px, per_particle_init, write_data_table,
    other_args_check_norm,
)
from autospa.jobs.registry import check_abort, job_device, option_bool, option_float, option_int, register_job, resolve_path, succeed
from autospa.numerics.sampling import angular_sampling_deg
from autospa.numerics.symmetry import point_group_order
from autospa.refinement import autorefine as ar
from autospa.refinement import init as rinit
from autospa.refinement import mstep, schedule
from autospa.refinement.estep import EStepModel, Sampling
from autospa.refinement.state import ModelState
from autospa.refinement.symmetry_align import align_symmetry, apply_alignment
from autospa.refinement.vdam import vdam_update

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


@dataclass
class InitialModelOptions:
    """Options of a 3D initial model, named after relion_refine's.

    Attributes
    ----------
    input, output
        Particles (.star or store) and output root ``DIR/run``.
    n_classes
        --K (default 3, as RELION's schemes and the paper).
    n_iter
        --iter (200).
    symmetry
        --sym: the point group the final map is aligned to and symmetrised with (the run itself
        is in C1, RELION's "run in C1 and apply symmetry later").
    particle_diameter_a
        --particle_diameter (default 75 % of the box).
    tau2_fudge
        Final T (scheduled from 1).
    healpix_order, max_healpix_order
        First and finest coarse HEALPix order of the auto-sampling (the fine pass is one finer).
    offset_range_px, offset_step_px
        Coarse translational search (RELION 6 / 2 pixels).
    ctf
        CTF correction (on when the particles have defocus values; --no_ctf turns it off).
    pad
        --pad (RELION's initial model uses 1).
    final_em_iter
        Gold-standard EM iterations on the most populated class after the VDAM iterations
        (:func:`gold_standard_finish`; 0 writes the VDAM reference as RELION does).
    """

    input: str
    output: str
    n_classes: int = 3
    n_iter: int = 200
    symmetry: str = "C1"
    particle_diameter_a: float | None = None
    tau2_fudge: float = 4.0
    healpix_order: int = 1
    max_healpix_order: int = 2
    offset_range_px: float = 6.0
    offset_step_px: float = 2.0
    ctf: bool = True
    zero_mask: bool = True
    check_norm: bool = True
    grad_write_iter: int = 10
    mu: float = 0.9
    pad: int = 1
    random_seed: int = 1
    adaptive_fraction: float = 0.999
    maxsig: int = 0
    final_em_iter: int = 5
    device: str = "cpu"
    torch_threads: int = 0
    store_chunk: int = 1024
    command_line: str = ""
    extra: dict = field(default_factory=dict)


def check_input(opts: InitialModelOptions, continue_: bool = False) -> None:
    """Cheap checks before a cluster starts; raises InputError."""
    if continue_:
        require_checkpoint(opts.output)
        return
    src = check_particles_input(opts.input)
    if opts.n_classes < 1:
        raise InputError(src, f"--K must be at least 1 (got {opts.n_classes})")
    check_numeric_options(src, opts)
    if opts.n_iter < 1:
        raise InputError(src, f"--iter must be at least 1 (got {opts.n_iter})")
    if opts.final_em_iter < 0:
        raise InputError(src, f"--final_em_iter must be >= 0 (got {opts.final_em_iter})")
    try:
        point_group_order(opts.symmetry)
    except ValueError as exc:
        raise InputError(src, f"--sym: {exc}") from exc


def healpix_order_for(resolution_a: float, diameter_a: float, min_order: int, max_order: int) -> int:
    """Coarse HEALPix order whose fine step (order + 1) moves the particle's edge by at most a
    quarter of the resolution: ``step <= resolution / diameter`` radians."""
    need = math.degrees(resolution_a / max(diameter_a, 1e-6))
    order = min_order
    while order < max_order and angular_sampling_deg(order + 1) > need:
        order += 1
    return order


def coarse_window_3d(step_deg: float, current_size: int, radius_px: float, min_size: int = 10) -> int:
    """Window of the coarse pass: out to the shell where the coarse angular step moves the
    particle's edge by about one pixel of that shell's wavelength (at most the current size)."""
    r = radius_px / max(1.0, radius_px * math.radians(step_deg))
    shell = max(min_size // 2, math.ceil(r * 1.5))
    return int(min(current_size, max(min_size, 2 * shell)))



def use_ctf(stack: ParticleStack, requested: bool) -> bool:
    """CTF correction when asked and the particles carry defocus values."""
    return requested and "DefocusU" in stack.metadata and "DefocusV" in stack.metadata


def _initialise(opts: InitialModelOptions, stack: ParticleStack, store_path: Path, table: ParticleTable,
                mask: torch.Tensor | None, gen: torch.Generator) -> ModelState:
    box = stack.box
    sigma2, pick, imgs = initial_noise(store_path, table, mask, opts.random_seed,
                                       check_norm_radius_px=particle_diameter_px(opts, stack) / 2 if opts.check_norm else None,
                                       image_names=image_names(stack))
    ctf = ctf_images(None if table.ctf_params is None else table.ctf_params[pick], len(pick), box, table.pixel_size_a,
                     torch.device("cpu"))
    seeds = rinit.seed_maps(imgs, ctf, opts.n_classes, sigma2[0].to(torch.float32), gen, pad=opts.pad, ndim=3)
    refs = rinit.blob_references(seeds, particle_diameter_px(opts, stack), gen)
    k = opts.n_classes
    dvp = torch.zeros(k, box // 2 + 1, dtype=torch.float64)
    return ModelState(
        refs=refs.to(torch.float32), sigma2=sigma2.to(torch.float32),
        class_prior=torch.full((k,), 1.0 / k, dtype=torch.float64),
        sigma_offset_a=3.0 * table.pixel_size_a, pixel_size_a=table.pixel_size_a,
        current_size=mstep.next_current_size(dvp, box), iteration=0, tau2=mstep.tau2_of(refs, opts.pad),
        data_vs_prior=dvp, completeness=torch.zeros_like(dvp), pad=opts.pad,
        extra={"healpix_order": opts.healpix_order},
    )


def resolution_a(state: ModelState) -> float:
    """Current resolution (Angstrom) of the best class (data_vs_prior >= 1)."""
    shell = int(mstep.resolution_shell(state.data_vs_prior).max())
    return state.box * state.pixel_size_a / max(shell, 1)


def model_star_3d(root: Path, state: ModelState, table: ParticleTable, stack: ParticleStack, tau2_fudge_now: float,
                  class_names: list[str], fsc: np.ndarray | None = None, extra_general: dict | None = None) -> Path:
    """``<root>_model.star`` of a 3D run (data_model_general, classes, per-class spectra, groups, noise)."""
    box, pix, k = state.box, state.pixel_size_a, len(class_names)
    n_shells = box // 2 + 1
    dvp = state.data_vs_prior.cpu().numpy()
    res_shell = mstep.resolution_shell(state.data_vs_prior).cpu().numpy() if fsc is None else None
    if fsc is not None:
        from autospa.refinement.autorefine import resolution_shell_of

        res_shell = np.array([resolution_shell_of(torch.as_tensor(fsc))] * k)
    est_res = np.where(res_shell > 0, box * pix / np.maximum(res_shell, 1), 999.0)
    completeness = state.completeness.cpu().numpy() if state.completeness is not None else np.zeros((k, n_shells))
    pi = state.class_prior.cpu().numpy()
    classes = pd.DataFrame({
        "rlnReferenceImage": class_names,
        "rlnClassDistribution": pi[:k] if len(pi) >= k else np.ones(k),
        "rlnAccuracyRotations": np.full(k, 999.0),
        "rlnAccuracyTranslationsAngst": np.full(k, 999.0),
        "rlnEstimatedResolution": est_res,
        "rlnOverallFourierCompleteness": [float(completeness[min(c, len(completeness) - 1), 1:max(2, state.current_size // 2 + 1)].mean())
                                          for c in range(k)],
        "rlnClassPriorOffsetX": np.zeros(k), "rlnClassPriorOffsetY": np.zeros(k),
    })
    n_groups = int(table.group.max()) + 1
    general = {
        "rlnReferenceDimensionality": 3, "rlnDataDimensionality": 2, "rlnOriginalImageSize": box,
        "rlnCurrentResolution": float(est_res.min()), "rlnCurrentImageSize": state.current_size,
        "rlnPaddingFactor": float(state.pad), "rlnIsHelix": 0, "rlnFourierSpaceInterpolator": 1,
        "rlnMinRadiusNnInterpolation": 10, "rlnPixelSize": pix, "rlnNrClasses": k, "rlnNrBodies": 1,
        "rlnNrGroups": n_groups, "rlnNrOpticsGroups": n_groups, "rlnTau2FudgeFactor": float(tau2_fudge_now),
        "rlnNormCorrectionAverage": 1.0, "rlnSigmaOffsetsAngst": float(state.sigma_offset_a),
        "rlnOrientationalPriorMode": 0, "rlnSigmaPriorRotAngle": 0.0, "rlnSigmaPriorTiltAngle": 0.0,
        "rlnSigmaPriorPsiAngle": 0.0, "rlnLogLikelihood": float(state.log_likelihood),
        "rlnAveragePmax": float(state.average_pmax), **(extra_general or {}),
    }
    rescols = rf.resolution_columns(n_shells, box, pix)
    tau2 = state.tau2.cpu().numpy()
    spectra = []
    for c in range(k):
        cc = min(c, len(dvp) - 1)
        spectra.append(rf.spectral_table({
            **rescols, "rlnSsnrMap": dvp[cc], "rlnGoldStandardFsc": fsc if fsc is not None else np.zeros(n_shells),
            "rlnFourierCompleteness": completeness[min(c, len(completeness) - 1)],
            "rlnReferenceSigma2": state.sigma2[0].cpu().numpy(), "rlnReferenceTau2": tau2[min(c, len(tau2) - 1)]}))
    groups, noise = group_tables(state.sigma2, table, stack)
    return rf.write_model_star(Path(f"{root}_model.star"), general, classes, spectra, groups, noise)


def _write_iteration(root: Path, it: int, state: ModelState, opts: InitialModelOptions, stack: ParticleStack,
                     table: ParticleTable, pp: dict, t2f: float, step: float, subset: int, order: int) -> None:
    pix = state.pixel_size_a
    names = []
    for c in range(state.n_classes):
        p = Path(f"{root}_class{c + 1:03d}.mrc")
        write_volume(p, state.refs[c], pix)
        names.append(str(p))  # from the project directory, as RELION
    model_star_3d(root, state, table, stack, t2f, names)
    write_data_table(root, stack, pp, pix)
    step_deg = angular_sampling_deg(order)
    rf.write_general_star(Path(f"{root}_sampling.star"), "sampling_general", {
        "rlnIs3DSampling": 1, "rlnIs3DTranslationalSampling": 0, "rlnHealpixOrder": order, "rlnSymmetryGroup": "C1",
        "rlnTiltAngleLimit": -91.0, "rlnPsiStep": step_deg, "rlnOffsetRange": opts.offset_range_px * pix,
        "rlnOffsetStep": opts.offset_step_px * pix, "rlnHelicalOffsetStep": -1.0, "rlnSamplingPerturbInstance": 0.0,
        "rlnSamplingPerturbFactor": 0.5, "rlnHealpixOrderOriginal": opts.healpix_order,
        "rlnPsiStepOriginal": angular_sampling_deg(opts.healpix_order), "rlnOffsetRangeOriginal": opts.offset_range_px * pix,
        "rlnOffsetStepOriginal": opts.offset_step_px * pix})
    rf.write_general_star(Path(f"{root}_optimiser.star"), "optimiser_general", {
        "rlnOutputRootName": str(opts.output), "rlnModelStarFile": f"{root}_model.star",
        "rlnExperimentalDataStarFile": f"{root}_data.star", "rlnOrientSamplingStarFile": f"{root}_sampling.star",
        "rlnCurrentIteration": it, "rlnNumberOfIterations": opts.n_iter, "rlnAdaptiveOversampleFraction": opts.adaptive_fraction,
        "rlnAdaptiveOversampleOrder": 1, "rlnParticleDiameter": float(opts.particle_diameter_a or 0.75 * stack.box * pix),
        "rlnDoCorrectCtf": int(table.ctf_params is not None), "rlnDoZeroMask": int(opts.zero_mask),
        "rlnDoSolventFlattening": 1, "rlnRandomSeed": opts.random_seed, "rlnTau2FudgeFactor": t2f,
        "rlnDoGradientRefine": 1, "rlnGradCurrentStepsize": step, "rlnSgdSubsetSize": subset, "rlnSgdMuFactor": opts.mu,
        "rlnSgdWriteEverySubset": opts.grad_write_iter, "rlnDoAutoSampling": 1, "rlnHasConverged": int(it >= opts.n_iter),
    }, command_line=opts.command_line or None)


def _save(path: Path, opts, store_path, n, box, state: ModelState, pp: dict, it: int, gen: torch.Generator) -> None:
    save_run_checkpoint(path, CHECKPOINT_VERSION, asdict(opts), store_path, n, box, state, pp, it, gen)


def final_map(vol: torch.Tensor, symmetry: str) -> tuple[torch.Tensor, dict]:
    """A map aligned to the axes of ``symmetry`` and symmetrised (C1: as is).

    Returns
    -------
    map, info
        ``(D, D, D)`` and ``{"symmetry_alignment": ...}`` (empty for C1).
    """
    vol = vol.to(torch.float32)
    if symmetry.upper() == "C1":
        return vol, {}
    alignment = align_symmetry(vol, symmetry)
    out = apply_alignment(vol, alignment, apply_symmetry=True)
    return out, {"symmetry_alignment": alignment}


def gold_standard_finish(
    opts: InitialModelOptions,
    state: ModelState,
    pp: dict,
    table: ParticleTable,
    store_path: Path,
    chunk_bounds,
    mask: torch.Tensor | None,
    diameter_px: float,
    client=None,
    progress: Callable[[IterationInfo], None] | None = None,
) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """The most populated class after ``opts.final_em_iter`` gold-standard EM iterations
    (each reported to ``progress`` as stage ``"gold-standard EM"``).

    Not in RELION. VDAM's pseudo half-sets are aligned to one shared reference, so the FSC of
    their moments also counts the noise the reference has fitted, and the map keeps it: on
    simulated data the VDAM reference loses its agreement with the truth a shell or two before
    its own resolution estimate. Here both half-sets start from that reference and are then
    aligned (global search at the final HEALPix order) and reconstructed independently, each
    regularised by the FSC between the two half maps (as refine3d does); the result is the map
    from both halves' sums. The particles are those of the class (at most the final mini-batch
    size, a fixed random subset), so the cost is that of ``final_em_iter`` final-phase iterations.

    Returns
    -------
    map, class_index, fsc
        ``(D, D, D)``, the 0-based class, and the last half-map FSC ``(D // 2 + 1,)`` (None when
        ``final_em_iter`` is 0).
    """
    best = int(torch.argmax(state.class_prior))
    vol = state.refs[best].to(torch.float32)
    if opts.final_em_iter <= 0:
        return vol, best, None
    n, box = len(table.half), state.box
    members = np.arange(n) if state.n_classes == 1 else np.nonzero(pp["class_index"] == best)[0]
    _, s_fin = schedule.subset_sizes(n, "3d")
    rng = np.random.default_rng(opts.random_seed * 100003 + opts.n_iter + 1)
    if len(members) > s_fin:
        members = np.sort(rng.choice(members, s_fin, replace=False))
    per_half = np.bincount(np.asarray(table.half)[members], minlength=2)
    if per_half.min() < 2:
        log.warning("class %d has %d + %d particles in the two half-sets: no gold-standard EM, the VDAM map is written",
                    best + 1, int(per_half[0]), int(per_half[1]))
        return vol, best, None
    order = int(state.extra.get("healpix_order", opts.healpix_order))
    maxsig = opts.maxsig if opts.maxsig > 0 else 100 * opts.n_classes
    coarse = coarse_window_3d(angular_sampling_deg(order), state.current_size, diameter_px / 2)
    gold = state.replace(refs=torch.stack([vol, vol]), class_prior=torch.ones(1, dtype=torch.float64))
    fsc = None
    for i in range(opts.final_em_iter):
        t0 = time.perf_counter()
        sampling = Sampling(offset_range_px=opts.offset_range_px, offset_step_px=opts.offset_step_px,
                            perturb=float(rng.uniform(-0.5, 0.5)), adaptive_fraction=opts.adaptive_fraction,
                            max_significants=maxsig, healpix_order=order)
        stats = half_set_estep(client, store_path, chunk_bounds, members, table.half, gold, pp, table, sampling, mask,
                               coarse, device=opts.device, torch_threads=opts.torch_threads)
        rec = ar.reconstruct_halves(stats, box, gold.pad, gold.current_size, 1.0, diameter_px / 2)
        gold = gold.replace(refs=rec.halves.to(torch.float32))
        vol, fsc = rec.combined.to(torch.float32), rec.fsc
        res_a = box * state.pixel_size_a / max(rec.resolution_shell, 1)
        log.info("gold-standard EM %d/%d on class %d (%d particles): half-map FSC 0.143 at %.1f A", i + 1,
                 opts.final_em_iter, best + 1, len(members), res_a)
        if progress is not None:
            n_done = max(1, int(stats.n_particles))
            progress(IterationInfo(i + 1, opts.final_em_iter, len(members), time.perf_counter() - t0, res_a,
                                   float(stats.log_likelihood), float(stats.max_posterior) / n_done, None,
                                   stage="gold-standard EM"))
    return vol, best, fsc


def run_initial_model(
    opts: InitialModelOptions,
    client=None,
    continue_: bool = False,
    progress: Callable[[IterationInfo], None] | None = None,
    stop_after: int | None = None,
) -> dict:
    """Run (or continue) a VDAM 3D initial model.

    Returns
    -------
    dict
        ``{"iteration", "state", "particles", "store", "initial_model", "class_index"}``; the map
        path is None when the run stopped early (``stop_after``).
    """
    out_root = Path(opts.output)
    out_dir = out_root.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = checkpoint_path(out_root)
    check_input(opts, continue_)
    if continue_:
        ck = rf.load_checkpoint(ckpt_path)
        stored = InitialModelOptions(**ck["options"])
        stored.device, stored.torch_threads = opts.device, opts.torch_threads
        opts = stored
    store_path = input_store(opts.input, opts.output, opts.store_chunk) if not continue_ else Path(ck["store"])
    stack = open_store(store_path)
    table = particle_table(stack, use_ctf(stack, opts.ctf))
    n, box = len(stack), stack.box
    diameter_px = particle_diameter_px(opts, stack)
    mask = circular_mask(box, diameter_px / 2) if opts.zero_mask else None
    gen = torch.Generator().manual_seed(opts.random_seed)
    if continue_:
        if ck.get("n_particles") != n or ck.get("box") != box:
            raise InputError(ckpt_path, "checkpoint does not match the particle store (different particles or box)")
        state = ModelState.from_dict(ck["state"])
        pp, it0 = ck["particles"], ck["iteration"]
        gen.set_state(ck["torch_rng"])
    else:
        state = _initialise(opts, stack, store_path, table, mask, gen)
        pp = per_particle_init(stack, table)
        it0 = 0
        _save(ckpt_path, opts, store_path, n, box, state, pp, 0, gen)
    ph = schedule.phases(opts.n_iter)
    s_ini, s_fin = schedule.subset_sizes(n, "3d")
    chunk_bounds = stack.chunk_bounds()
    diameter_a = diameter_px * table.pixel_size_a
    for it in range(it0 + 1, opts.n_iter + 1):
        t0 = time.perf_counter()
        rng = np.random.default_rng(opts.random_seed * 100003 + it)
        size = schedule.subset_size(it, ph, n, s_ini, s_fin, opts.n_classes)
        subset = np.sort(rng.permutation(n)[:size]) if size < n else np.arange(n)
        full = len(subset) == n
        step = schedule.step_size(it, ph, final=0.5)
        t2f = schedule.tau2_fudge(it, ph, final=opts.tau2_fudge)
        order = max(int(state.extra.get("healpix_order", opts.healpix_order)),
                    healpix_order_for(resolution_a(state), diameter_a, opts.healpix_order, opts.max_healpix_order))
        state.extra["healpix_order"] = order
        maxsig = opts.maxsig if opts.maxsig > 0 else 100 * opts.n_classes
        sampling = Sampling(offset_range_px=opts.offset_range_px, offset_step_px=opts.offset_step_px,
                            perturb=float(rng.uniform(-0.5, 0.5)), adaptive_fraction=opts.adaptive_fraction,
                            max_significants=maxsig, healpix_order=order)
        log_prior = torch.where(state.class_prior > 0, torch.log(state.class_prior.clamp_min(1e-300)),
                                torch.full_like(state.class_prior, -torch.inf)).to(torch.float32)
        model = EStepModel(
            ref_ft=mstep.reference_ft(state.refs, state.pad), sigma2=state.sigma2, log_class_prior=log_prior,
            sigma_offset_px=state.sigma_offset_a / state.pixel_size_a, current_size=state.current_size,
            coarse_size=coarse_window_3d(angular_sampling_deg(order), state.current_size, diameter_px / 2), pad=state.pad)
        stats, res = run_estep(client, str(store_path), chunk_bounds, subset, pp["origin_px"], table, model, sampling, mask,
                               device=opts.device, torch_threads=opts.torch_threads)
        idx = res["index"]
        for key in ("class_index",) + POSE_KEYS:
            pp[key][idx] = res[key]
        extra = dict(state.extra)
        state, _info = vdam_update(state, stats, step, t2f, 0.0 if full else opts.mu, diameter_px / 2, center=False)
        state = state.replace(extra=extra)
        root = None
        if full or it % opts.grad_write_iter == 0 or it == opts.n_iter:
            root = rf.iteration_root(out_root, it)
            _write_iteration(root, it, state, opts, stack, table, pp, t2f, step, len(subset), order)
        _save(ckpt_path, opts, store_path, n, box, state, pp, it, gen)
        if progress is not None:
            progress(IterationInfo(it, opts.n_iter, len(subset), time.perf_counter() - t0, resolution_a(state),
                                   float(state.log_likelihood), float(state.average_pmax), None if root is None else str(root)))
        if stop_after is not None and it >= stop_after:
            return {"iteration": it, "state": state, "particles": pp, "store": store_path, "initial_model": None, "class_index": None}
    vol, best, half_fsc = gold_standard_finish(opts, state, pp, table, store_path, chunk_bounds, mask, diameter_px, client,
                                               progress)
    vol, info = final_map(vol, opts.symmetry)
    path = write_volume(out_dir / "initial_model.mrc", vol, state.pixel_size_a)
    return {"iteration": state.iteration, "state": state, "particles": pp, "store": store_path, "initial_model": path,
            "class_index": best, "half_map_fsc": half_fsc, **info}


def options_from_job(job_dir: Path, options: dict[str, str]) -> InitialModelOptions:
    """InitialModelOptions from a relion.initialmodel job.star (RELION's GUI option names)."""
    # the run is in C1 either way; the group is applied to the final map ("run in C1 and apply
    # symmetry later", do_run_C1, RELION's default and the only mode here)
    run_sym = options.get("sym_name", "C1") or "C1"
    return InitialModelOptions(
        device=job_device(options),
        input=str(resolve_path(job_dir, options.get("fn_img", ""))),
        output=str(Path(job_dir) / "run"),
        n_classes=option_int(options, "nr_classes", 1),
        n_iter=option_int(options, "nr_iter", 200),
        symmetry=run_sym,
        particle_diameter_a=option_float(options, "particle_diameter", 200.0),
        tau2_fudge=option_float(options, "tau_fudge", 4.0),
        ctf=option_bool(options, "do_ctf_correction", True),
        check_norm=other_args_check_norm(options.get("other_args", "")),
    )


@register_job("relion.initialmodel")
def job_initialmodel(job_dir: Path, options: dict[str, str], continue_: bool) -> None:
    """Registry entry (schemes): run the initial model in the job directory."""
    opts = options_from_job(Path(job_dir), options)
    client = current_client()
    ckpt = Path(job_dir) / "run_checkpoint.pt"
    run_initial_model(opts, client=client, continue_=continue_ and ckpt.exists(), progress=lambda info: check_abort(job_dir))
    succeed(job_dir)


__all__ = ["InitialModelOptions", "check_input", "final_map", "gold_standard_finish", "healpix_order_for", "model_star_3d",
           "run_initial_model"]
