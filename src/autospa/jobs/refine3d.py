"""3D auto-refinement (RELION's relion_refine --auto_refine --split_random_halves; job type
relion.refine3d), followed by post-processing of the half maps.

Gold standard: the particles are split into two random halves (rlnRandomSubset when the input has
it) and each half is refined against its own map only. Every iteration runs the shared E-step
over each half with HEALPix orientations (symmetry mates removed from the grid), imposes the point
group on the back-projected sums, reconstructs each half with FSC-based regularisation and solvent
flattening (:mod:`autospa.refinement.autorefine`), and applies RELION's auto-sampling: after an
iteration without a resolution gain and with small orientation changes the angular sampling gets
one HEALPix order finer (and the translational step halves), and when it is at
``--max_healpix_order`` the run has converged. Outputs: run_itNNN_half{1,2}_class001.mrc,
run_itNNN_{model,data,optimiser,sampling}.star per iteration, then run_class001.mrc (both halves),
run_half{1,2}_class001_unfil.mrc, run_model.star, run_data.star, and postprocess.mrc /
postprocess_masked.mrc / postprocess.star (rlnFinalResolution) / FSC plot with an automatic
solvent mask.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from autospa.data.particle_stack import ParticleStack
from autospa.distributed.map_reduce import ParticleTable
from autospa.errors import InputError
from autospa.io import refine_files as rf
from autospa.io.postprocess_files import read_volume, write_volume
from autospa.io.zarr_store import open_store, read_store_images
from autospa.jobs.class2d import IterationInfo, circular_mask, particle_table
from autospa.jobs.initialmodel import coarse_window_3d, model_star_3d, use_ctf
from autospa.jobs.postprocess import PostprocessJob, run_postprocess
from autospa.jobs.refine_common import (
    checkpoint_path, require_checkpoint,
    check_numeric_options, check_particles_input, current_client, initial_noise,
    half_set_estep, image_names, input_store, particle_diameter_px, per_particle_init, write_data_table,
)
from autospa.jobs.registry import check_abort, job_device, option_bool, option_float, register_job, resolve_path, succeed
from autospa.conventions import euler_to_matrix
from autospa.numerics import slices
from autospa.numerics.fourier import fourier_rescale
from autospa.numerics.masks import raised_cosine, soft_spherical_mask
from autospa.numerics.sampling import angular_sampling_deg
from autospa.numerics.symmetry import point_group_order
from autospa.refinement import autorefine as ar
from autospa.refinement import mstep
from autospa.refinement.estep import Sampling, centered_rfft2, rfft_frequencies
from autospa.refinement.postprocess import low_pass
from autospa.refinement.state import ModelState

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


@dataclass
class Refine3DOptions:
    """Options of a 3D auto-refinement, named after relion_refine's.

    Attributes
    ----------
    input, output, reference
        Particles, output root ``DIR/run`` and the initial map (--ref).
    symmetry
        --sym point group imposed on the reconstructions.
    particle_diameter_a
        --particle_diameter (default 75 % of the box).
    ini_high
        --ini_high: the reference is low-pass filtered to this resolution (Angstrom) first.
    healpix_order
        Initial coarse HEALPix order (2: 15 degrees coarse, 7.5 fine, RELION's GUI default).
    max_healpix_order
        Finest coarse order of the auto-sampling.
    auto_local_healpix_order
        From this order on the searches are local (RELION's --auto_local_healpix_order): each
        particle's orientations within 3 sigma of its previous one, sigma twice the fine step,
        with a Gaussian prior, and translations within two coarse steps of its previous origin.
        Default 3, one below RELION's 4: local searches at order 3 reach +/-22.5 degrees, three
        times the fine step of the global order-2 searches before them, and a global search at
        order 3 costs 8x one at order 2 (minutes per iteration on CPUs) for no better poses.
    offset_range_px, offset_step_px
        Initial coarse translational search (RELION's GUI 5 / 1 pixel fine = 2 coarse).
    max_iter
        Iteration limit if the run does not converge before.
    ctf
        CTF correction (on when the particles have defocus values).
    maxsig
        RELION's --maxsig: at most this many significant coarse hypotheses per particle in global
        searches (0: no cap). The first iterations against a low-pass reference leave
        thousands significant, and the fine pass over all of them takes minutes per iteration.
    auto_bfactor
        Post-processing estimates the B-factor from the Guinier plot.
    """

    input: str
    output: str
    reference: str
    symmetry: str = "C1"
    particle_diameter_a: float | None = None
    ini_high: float = 40.0
    healpix_order: int = 2
    max_healpix_order: int = 4
    auto_local_healpix_order: int = 3
    offset_range_px: float = 5.0
    offset_step_px: float = 2.0
    max_iter: int = 25
    tau2_fudge: float = 1.0
    ctf: bool = True
    zero_mask: bool = True
    check_norm: bool = True
    pad: int = 2
    random_seed: int = 1
    adaptive_fraction: float = 0.999
    maxsig: int = 500
    auto_bfactor: bool = True
    device: str = "cpu"
    torch_threads: int = 0
    store_chunk: int = 1024
    command_line: str = ""
    extra: dict = field(default_factory=dict)


def check_input(opts: Refine3DOptions, continue_: bool = False) -> None:
    """Cheap checks before a cluster starts; raises InputError."""
    if continue_:
        require_checkpoint(opts.output)
        return
    src = check_particles_input(opts.input)
    check_numeric_options(src, opts)
    ref = Path(opts.reference)
    if not ref.is_file():
        raise InputError(ref, "reference map does not exist (--ref)")
    try:
        point_group_order(opts.symmetry)
    except ValueError as exc:
        raise InputError(src, f"--sym: {exc}") from exc
    if opts.ini_high <= 0:
        raise InputError(src, f"--ini_high must be positive (got {opts.ini_high})")



def reference_on_particle_grid(path: str, box: int, pixel_size_a: float) -> torch.Tensor:
    """The --ref map resampled (Fourier crop/pad) to the particles' box and pixel size."""
    vol, px = read_volume(path, "reference map")
    if vol.dim() != 3 or len(set(vol.shape)) != 1:
        raise InputError(path, f"reference must be a cubic map, got {tuple(vol.shape)}")
    px = px if px > 0 else pixel_size_a
    n = vol.shape[-1]
    if abs(px - pixel_size_a) > 1e-3 * pixel_size_a:
        size = int(round(n * px / pixel_size_a / 2)) * 2
        vol = fourier_rescale(vol.float(), size, ndim=3) * (size / n) ** 3
        n = size
    if n != box:  # window in real space around the centre
        out = torch.zeros(box, box, box, dtype=vol.dtype)
        a, b = max(0, (n - box) // 2), max(0, (box - n) // 2)
        m = min(n, box)
        out[b : b + m, b : b + m, b : b + m] = vol[a : a + m, a : a + m, a : a + m]
        vol = out
    return vol.float()


def greyscale_factor(ref: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, ctf: torch.Tensor, max_shell: int) -> float:
    """Scale that puts the reference on the particles' greyscale (RELION's firstiter_cc problem).

    The particles' signal power per shell is their power inside the mask minus the noise power
    measured outside it; the reference's is the mean power of its central slices (CTF-weighted)
    over random orientations. The factor is the square root of their ratio, averaged over
    shells 2..``max_shell``.
    """
    box = images.shape[-1]
    inside = centered_rfft2(images * mask)
    outside = centered_rfft2(images * (1 - mask))
    frac_in = float(mask.mean())
    frac_out = 1.0 - frac_in
    fr, shells = rfft_frequencies(box)
    # projections of the reference at random orientations: the central slice's power per shell
    g = torch.Generator().manual_seed(0)
    rnd = torch.rand(64, 3, generator=g, dtype=torch.float64)
    mats = euler_to_matrix(rnd[:, 0] * 360, torch.rad2deg(torch.acos(1 - 2 * rnd[:, 1])), rnd[:, 2] * 360)
    ft = slices.pad_reference_ft(ref[None], 2, 3)
    proj = slices.rotate_gather(ft, slices.stencil(mats, fr, box, 2))[0]  # (64, F)
    ctf2 = (ctf.reshape(ctf.shape[0], -1) ** 2).mean(0)
    num, den = 0.0, 0.0
    for s in range(2, max(3, max_shell + 1)):
        sel = shells == s
        if not bool(sel.any()):
            continue
        p_in = float((inside.reshape(inside.shape[0], -1)[:, sel].abs() ** 2).mean())
        p_out = float((outside.reshape(outside.shape[0], -1)[:, sel].abs() ** 2).mean()) * frac_in / max(frac_out, 1e-6)
        p_ref = float((proj[:, sel].abs() ** 2 * ctf2[sel]).mean())
        num += max(p_in - p_out, 0.0)
        den += p_ref
    if den <= 0 or num <= 0:
        return 1.0
    return math.sqrt(num / den)


def auto_mask(vol: torch.Tensor, pixel_size_a: float, lowpass_a: float = 15.0, extend_px: float = 3.0, soft_px: float = 6.0) -> torch.Tensor:
    """A soft solvent mask from a map (relion_mask_create's recipe with an automatic threshold):
    low-pass, threshold at 1/5 of the maximum inside the particle, extend, soft raised-cosine edge."""
    from scipy import ndimage

    box = vol.shape[-1]
    lp = low_pass(vol.to(torch.float64), max(lowpass_a, 2.5 * pixel_size_a), pixel_size_a)
    lp = lp * soft_spherical_mask(box, box / 2 - 2, 2.0, dtype=lp.dtype)
    binary = (lp > 0.2 * float(lp.max())).numpy()
    if not binary.any():
        return soft_spherical_mask(box, box / 2 - 3, 3.0)
    dist = torch.from_numpy(ndimage.distance_transform_edt(~binary))
    return raised_cosine(dist - extend_px, 0.0, soft_px).to(torch.float32) * (dist > 0) + torch.from_numpy(binary).float()


def _save(path: Path, opts, store_path, n, box, state: ModelState, pp: dict, half: np.ndarray, it: int,
          auto: ar.AutoSampling, fsc: np.ndarray | None) -> None:
    rf.save_checkpoint(path, {
        "version": CHECKPOINT_VERSION, "options": asdict(opts), "store": str(store_path), "n_particles": n, "box": box,
        "state": state.to_dict(), "particles": pp, "half": half, "iteration": it, "auto": asdict(auto), "fsc": fsc,
    })


def _halves(stack: ParticleStack, seed: int) -> np.ndarray:
    """0/1 half-set per particle: rlnRandomSubset when present, else a seeded random split."""
    meta = stack.metadata
    n = len(stack)
    if "RandomSubset" in meta:
        h = meta["RandomSubset"].to_numpy(np.int64) - 1
        if set(np.unique(h).tolist()) == {0, 1}:
            return h
    rng = np.random.default_rng(seed)
    h = np.zeros(n, np.int64)
    h[rng.permutation(n)[: n // 2]] = 1
    return h


def _write_iteration(root: Path, it: int, state: ModelState, opts: Refine3DOptions, stack: ParticleStack,
                     table: ParticleTable, pp: dict, half: np.ndarray, auto: ar.AutoSampling, fsc: np.ndarray,
                     final: torch.Tensor | None = None) -> None:
    pix = state.pixel_size_a
    names = []
    if final is None:
        for h in range(2):
            p = Path(f"{root}_half{h + 1}_class001.mrc")
            write_volume(p, state.refs[h], pix)
        names.append(f"{root}_half1_class001.mrc")
    else:
        write_volume(Path(f"{root}_class001.mrc"), final, pix)
        names.append(f"{root}_class001.mrc")
    one = state.replace(class_prior=torch.ones(1, dtype=torch.float64), data_vs_prior=state.data_vs_prior[:1],
                        tau2=state.tau2[:1], completeness=None)
    model_star_3d(root, one, table, stack, opts.tau2_fudge, names, fsc=fsc,
                  extra_general={"rlnHasConverged": int(auto.converged)})
    write_data_table(root, stack, pp, pix, half=half)
    step = angular_sampling_deg(auto.healpix_order)
    rf.write_general_star(Path(f"{root}_sampling.star"), "sampling_general", {
        "rlnIs3DSampling": 1, "rlnIs3DTranslationalSampling": 0, "rlnHealpixOrder": auto.healpix_order,
        "rlnSymmetryGroup": opts.symmetry, "rlnTiltAngleLimit": -91.0, "rlnPsiStep": step,
        "rlnOffsetRange": auto.offset_range_px * pix, "rlnOffsetStep": auto.offset_step_px * pix,
        "rlnHelicalOffsetStep": -1.0, "rlnSamplingPerturbInstance": 0.0, "rlnSamplingPerturbFactor": 0.5,
        "rlnHealpixOrderOriginal": opts.healpix_order, "rlnPsiStepOriginal": angular_sampling_deg(opts.healpix_order),
        "rlnOffsetRangeOriginal": opts.offset_range_px * pix, "rlnOffsetStepOriginal": opts.offset_step_px * pix})
    rf.write_general_star(Path(f"{root}_optimiser.star"), "optimiser_general", {
        "rlnOutputRootName": str(opts.output), "rlnModelStarFile": f"{root}_model.star",
        "rlnExperimentalDataStarFile": f"{root}_data.star", "rlnOrientSamplingStarFile": f"{root}_sampling.star",
        "rlnCurrentIteration": it, "rlnNumberOfIterations": opts.max_iter, "rlnDoSplitRandomHalves": 1,
        "rlnJoinHalvesUntilThisResolution": -1.0, "rlnAdaptiveOversampleFraction": opts.adaptive_fraction,
        "rlnAdaptiveOversampleOrder": 1, "rlnAutoLocalSearchesHealpixOrder": 4,
        "rlnParticleDiameter": float(opts.particle_diameter_a or 0.75 * stack.box * pix),
        "rlnDoCorrectCtf": int(table.ctf_params is not None), "rlnDoZeroMask": int(opts.zero_mask),
        "rlnDoSolventFlattening": 1, "rlnRandomSeed": opts.random_seed, "rlnTau2FudgeFactor": opts.tau2_fudge,
        "rlnDoAutoRefine": 1, "rlnDoAutoSampling": 1, "rlnHasConverged": int(auto.converged),
        "rlnNumberOfIterWithoutResolutionGain": auto.iter_without_gain,
        "rlnNumberOfIterWithoutChangingAssignments": auto.iter_small_changes,
    }, command_line=opts.command_line or None)


def run_refine3d(
    opts: Refine3DOptions,
    client=None,
    continue_: bool = False,
    progress: Callable[[IterationInfo], None] | None = None,
    stop_after: int | None = None,
) -> dict:
    """Run (or continue) a gold-standard 3D auto-refinement and post-process its half maps.

    Returns
    -------
    dict
        ``{"iteration", "state", "particles", "half", "fsc", "resolution_a", "final_resolution_a",
        "root"}``; the post-processing values are None when the run stopped early.
    """
    out_root = Path(opts.output)
    out_dir = out_root.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = checkpoint_path(out_root)
    check_input(opts, continue_)
    if continue_:
        ck = rf.load_checkpoint(ckpt_path)
        stored = Refine3DOptions(**ck["options"])
        stored.device, stored.torch_threads = opts.device, opts.torch_threads
        opts = stored
    store_path = input_store(opts.input, opts.output, opts.store_chunk) if not continue_ else Path(ck["store"])
    stack = open_store(store_path)
    table = particle_table(stack, use_ctf(stack, opts.ctf))
    n, box, pix = len(stack), stack.box, table.pixel_size_a
    diameter_px = particle_diameter_px(opts, stack)
    mask = circular_mask(box, diameter_px / 2) if opts.zero_mask else None
    if continue_:
        if ck.get("n_particles") != n or ck.get("box") != box:
            raise InputError(ckpt_path, "checkpoint does not match the particle store (different particles or box)")
        state = ModelState.from_dict(ck["state"])
        pp, half, it0 = ck["particles"], ck["half"], ck["iteration"]
        auto = ar.AutoSampling(**ck["auto"])
        fsc = ck["fsc"]
    else:
        half = _halves(stack, opts.random_seed)
        sigma2, pick, imgs = initial_noise(store_path, table, mask, opts.random_seed,
                                           check_norm_radius_px=particle_diameter_px(opts, stack) / 2 if opts.check_norm else None,
                                           image_names=image_names(stack))
        ref = reference_on_particle_grid(opts.reference, box, pix)
        ref = low_pass(ref.to(torch.float64), opts.ini_high, pix).to(torch.float32)
        from autospa.distributed.map_reduce import ctf_images

        sample = pick[: min(len(pick), 300)]
        ctf = ctf_images(None if table.ctf_params is None else table.ctf_params[sample], len(sample), box, pix, torch.device("cpu"))
        raw = torch.from_numpy(read_store_images(store_path, sample))
        pmask = circular_mask(box, diameter_px / 2)
        scale = greyscale_factor(ref, raw, pmask, ctf, max_shell=max(3, int(box * pix / opts.ini_high)))
        log.info("reference greyscale factor %.4g", scale)
        refs = torch.stack([ref * scale, ref * scale])
        state = ModelState(
            refs=refs, sigma2=sigma2.to(torch.float32), class_prior=torch.ones(1, dtype=torch.float64),
            sigma_offset_a=3.0 * pix, pixel_size_a=pix, current_size=ar.window_for_resolution(opts.ini_high, box, pix),
            tau2=mstep.tau2_of(refs, opts.pad), data_vs_prior=torch.zeros(2, box // 2 + 1, dtype=torch.float64),
            completeness=None, pad=opts.pad)
        pp = per_particle_init(stack, table)
        auto = ar.AutoSampling(opts.healpix_order, opts.offset_range_px, opts.offset_step_px)
        it0, fsc = 0, None
        table.half = half
        _save(ckpt_path, opts, store_path, n, box, state, pp, half, 0, auto, fsc)
    table.half = half
    chunk_bounds = stack.chunk_bounds()
    root = None
    it = it0
    while not auto.converged and it < opts.max_iter:
        it += 1
        t0 = time.perf_counter()
        rng = np.random.default_rng(opts.random_seed * 100003 + it)
        local = auto.healpix_order >= opts.auto_local_healpix_order
        sampling = Sampling(offset_range_px=min(auto.offset_range_px, 2 * auto.offset_step_px) if local else auto.offset_range_px,
                            offset_step_px=auto.offset_step_px, perturb=float(rng.uniform(-0.5, 0.5)),
                            adaptive_fraction=opts.adaptive_fraction, healpix_order=auto.healpix_order,
                            max_significants=0 if local else opts.maxsig,
                            symmetry=opts.symmetry,
                            local_sigma_deg=2 * angular_sampling_deg(auto.healpix_order + 1) if local else 0.0)
        angles = np.stack([pp["rot_deg"], pp["tilt_deg"], pp["psi_deg"]], 1) if local else None
        coarse = coarse_window_3d(auto.angular_step_deg, state.current_size, diameter_px / 2)
        prev = {k: pp[k].copy() for k in ("rot_deg", "tilt_deg", "psi_deg")}
        stats = half_set_estep(client, store_path, chunk_bounds, np.arange(n), half, state, pp, table, sampling, mask, coarse,
                               device=opts.device, torch_threads=opts.torch_threads, angles_deg=angles)
        stats = ar.symmetrise_stats(stats, opts.symmetry)
        rec = ar.reconstruct_halves(stats, box, state.pad, state.current_size, opts.tau2_fudge, diameter_px / 2)
        nuis = mstep.update_nuisance(state, stats, mu=0.0)
        change = float(ar.angle_change_deg(prev["rot_deg"], prev["tilt_deg"], prev["psi_deg"],
                                           pp["rot_deg"], pp["tilt_deg"], pp["psi_deg"]).mean()) if it > 1 else 180.0
        auto = ar.update_sampling(auto, rec.resolution_shell, change, opts.max_healpix_order)
        fsc = rec.fsc.cpu().numpy()
        tau2 = mstep.tau2_of(rec.halves, state.pad)
        state = state.replace(refs=rec.halves, tau2=tau2, data_vs_prior=rec.ssnr[None].expand(2, -1).clone(),
                              current_size=ar.next_window(rec.resolution_shell, box), iteration=it,
                              sigma2=nuis["sigma2"], sigma_offset_a=nuis["sigma_offset_a"],
                              log_likelihood=nuis["log_likelihood"], average_pmax=nuis["average_pmax"],
                              extra={"combined": rec.combined, "unfiltered": rec.unfiltered})
        root = rf.iteration_root(out_root, it)
        _write_iteration(root, it, state, opts, stack, table, pp, half, auto, fsc)
        _save(ckpt_path, opts, store_path, n, box, state, pp, half, it, auto, fsc)
        res_a = box * pix / max(rec.resolution_shell, 1)
        log.info("iteration %d (%s searches): resolution %.2f A, next order %d, mean angle change %.2f deg", it,
                 "local" if local else "global", res_a, auto.healpix_order, change)
        if progress is not None:
            progress(IterationInfo(it, opts.max_iter, n, time.perf_counter() - t0, res_a, float(state.log_likelihood),
                                   float(state.average_pmax), str(root)))
        if stop_after is not None and it >= stop_after and not auto.converged:
            return {"iteration": it, "state": state, "particles": pp, "half": half, "fsc": fsc, "resolution_a": res_a,
                    "final_resolution_a": None, "root": root}
    # final outputs: the combined map, unfiltered halves, model/data, post-processing
    combined = state.extra["combined"]
    unfil = state.extra["unfiltered"]
    final_root = out_root
    _write_iteration(final_root, it, state, opts, stack, table, pp, half, auto, fsc, final=combined)
    h1 = write_volume(out_dir / f"{out_root.name}_half1_class001_unfil.mrc", unfil[0], pix)
    h2 = write_volume(out_dir / f"{out_root.name}_half2_class001_unfil.mrc", unfil[1], pix)
    mask_path = write_volume(out_dir / "mask.mrc", auto_mask(combined, pix), pix)
    res_shell = ar.resolution_shell_of(torch.as_tensor(fsc))
    # RELION's Guinier fit runs from 10 A to the final resolution: it needs a few shells there
    fit_shells = res_shell - math.ceil(box * pix / 10.0) + 1
    auto_b = opts.auto_bfactor and fit_shells >= 3
    if opts.auto_bfactor and not auto_b:
        log.warning("resolution %.1f A leaves too few shells beyond 10 A for a Guinier fit: no sharpening",
                    box * pix / res_shell)
    pp_result, _ = run_postprocess(PostprocessJob(half1=str(h1), half2=str(h2), mask=str(mask_path), output_dir=str(out_dir),
                                                  pixel_size_a=pix, auto_bfactor=auto_b,
                                                  command_line=opts.command_line or None))
    return {"iteration": it, "state": state, "particles": pp, "half": half, "fsc": fsc,
            "resolution_a": box * pix / max(res_shell, 1), "final_resolution_a": pp_result.final_resolution_a,
            "bfactor": pp_result.bfactor, "root": final_root}


def options_from_job(job_dir: Path, options: dict[str, str]) -> Refine3DOptions:
    """Refine3DOptions from a relion.refine3d job.star (RELION's GUI option names)."""
    sampling = options.get("sampling", "7.5 degrees").split()[0]
    try:
        fine = float(sampling)
    except ValueError:
        fine = 7.5
    order = max(0, min(5, int(round(math.log2(360.0 / (6 * fine))))) - 1)  # fine step = order + 1
    return Refine3DOptions(
        device=job_device(options),
        input=str(resolve_path(job_dir, options.get("fn_img", ""))),
        output=str(Path(job_dir) / "run"),
        reference=str(resolve_path(job_dir, options.get("fn_ref", ""))),
        symmetry=options.get("sym_name", "C1") or "C1",
        particle_diameter_a=option_float(options, "particle_diameter", 200.0),
        ini_high=option_float(options, "ini_high", 40.0),
        healpix_order=order,
        offset_range_px=option_float(options, "offset_range", 5.0),
        offset_step_px=2.0 * option_float(options, "offset_step", 1.0),
        ctf=option_bool(options, "do_ctf_correction", True),
        zero_mask=option_bool(options, "do_zero_mask", True),
        **extra_arguments(job_dir, options.get("other_args", "")),
    )


#: relion_refine options accepted in a job's "Additional arguments" (other_args), and the
#: Refine3DOptions field each sets.
OTHER_ARGS = {"--iter": ("max_iter", int), "--maxsig": ("maxsig", int), "--healpix_order": ("healpix_order", int),
              "--max_healpix_order": ("max_healpix_order", int),
              "--auto_local_healpix_order": ("auto_local_healpix_order", int), "--tau2_fudge": ("tau2_fudge", float)}
#: Flags (no value) accepted in other_args, and the field and value each sets.
OTHER_FLAGS = {"--dont_check_norm": ("check_norm", False)}


def extra_arguments(job_dir: Path, other_args: str) -> dict:
    """Refine3DOptions fields from a job's other_args (``--iter 10 --maxsig 200``); an argument
    this implementation does not take is an error naming it."""
    import shlex

    words = shlex.split(other_args.strip().strip('"'))
    out = {}
    i = 0
    while i < len(words):
        key = words[i]
        if key in OTHER_FLAGS:
            field_name, value = OTHER_FLAGS[key]
            out[field_name] = value
            i += 1
            continue
        if key not in OTHER_ARGS or i + 1 >= len(words):
            raise InputError(Path(job_dir) / "job.star", f"other_args: unsupported argument {key!r} "
                             f"(accepted: {', '.join(sorted(OTHER_ARGS))}, each with a value; {', '.join(OTHER_FLAGS)})")
        field_name, kind = OTHER_ARGS[key]
        try:
            out[field_name] = kind(words[i + 1])
        except ValueError:
            raise InputError(Path(job_dir) / "job.star", f"other_args: {key} needs a number, got {words[i + 1]!r}") from None
        i += 2
    return out


@register_job("relion.refine3d")
def job_refine3d(job_dir: Path, options: dict[str, str], continue_: bool) -> None:
    """Registry entry (schemes): run the refinement and its post-processing in the job directory."""
    opts = options_from_job(Path(job_dir), options)
    client = current_client()
    ckpt = Path(job_dir) / "run_checkpoint.pt"
    run_refine3d(opts, client=client, continue_=continue_ and ckpt.exists(), progress=lambda info: check_abort(job_dir))
    succeed(job_dir)


__all__ = ["Refine3DOptions", "auto_mask", "check_input", "greyscale_factor", "run_refine3d"]
