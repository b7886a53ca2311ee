"""``autospa demo``: the main job on simulated data, end to end with embedded defaults.

For now (the movies-to-map pipeline grows with later work) it

1. simulates a particle set with the seeded simulator: ``n_classes`` distinct structures seen
   from one direction, random in-plane rotations and shifts, per-particle CTF, SNR 0.05;
2. writes it as RELION would have extracted it (particles.star + MRCS, no poses);
3. runs 2D classification with VDAM on a local dask cluster (the same code path as
   ``autospa class2d --grad``);
4. scores the result against the simulator's truth: class purity and psi / shift errors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autospa.io.star import read_star, write_star
from autospa.jobs.class2d import Class2DOptions, run_class2d
from autospa.simulate.particles import simulate_2d_classes, write_particle_set

log = logging.getLogger(__name__)

POSE_LABELS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnClassNumber")


@dataclass
class DemoResult:
    particles_star: Path
    model_star: Path
    purity: float
    median_psi_error_deg: float
    median_shift_error_px: float
    n_particles: int
    n_classes_found: int


def write_unaligned_set(outdir: Path, sim) -> tuple[Path, Path]:
    """Write a simulated set as extracted particles (poses removed from particles.star; truth.star keeps them)."""
    files = write_particle_set(outdir, sim.images, sim.truth, sim.optics, stack_dtype="float32")
    blocks = read_star(files["particles"])
    blocks["particles"] = blocks["particles"].drop(columns=[c for c in POSE_LABELS if c in blocks["particles"]])
    write_star(files["particles"], blocks)
    return Path(files["particles"]), Path(files["truth"])


def score_against_truth(truth, classes: np.ndarray, psi_deg: np.ndarray, origin_px: np.ndarray, pixel_size_a: float) -> tuple[float, float, float]:
    """Purity, median psi error and median shift error (pixels) of a 2D classification.

    Each found class is matched to its majority true class; psi and shifts are compared after
    removing, per found class, the constant in-plane rotation and offset between the class
    average and the true template (a class average may be any rotated/shifted copy).
    """
    true = truth["rlnClassNumber"].to_numpy()
    real = true > 0
    pur_hits = 0
    psi_err, sh_err = [], []
    t_psi = truth["rlnAnglePsi"].to_numpy()
    t_org = np.stack([truth["rlnOriginXAngst"].to_numpy(), truth["rlnOriginYAngst"].to_numpy()], 1) / pixel_size_a
    for k in np.unique(classes[real]):
        sel = real & (classes == k)
        vals, cnt = np.unique(true[sel], return_counts=True)
        pur_hits += cnt.max()
        good = sel & (true == vals[np.argmax(cnt)])
        d = np.deg2rad((t_psi[good] - psi_deg[good]) % 360)
        mean = np.arctan2(np.sin(d).mean(), np.cos(d).mean())
        psi_err.append(np.abs(np.rad2deg((d - mean + np.pi) % (2 * np.pi) - np.pi)))
        # origins: with class average A = R(a) T + s, a particle's estimate is
        # o_est = o_true + R(psi_est) s, so R(psi_est)^T (o_est - o_true) is constant per class
        diff = origin_px[good] - t_org[good]
        ang = np.deg2rad(psi_deg[good])
        best = None
        for sign in (1.0, -1.0):
            c, s_ = np.cos(sign * ang), np.sin(sign * ang)
            local = np.stack([c * diff[:, 0] + s_ * diff[:, 1], -s_ * diff[:, 0] + c * diff[:, 1]], 1)
            e = np.linalg.norm(local - np.median(local, 0), axis=1)
            if best is None or np.median(e) < np.median(best):
                best = e
        sh_err.append(best)
    purity = pur_hits / max(1, int(real.sum()))
    return float(purity), float(np.median(np.concatenate(psi_err))), float(np.median(np.concatenate(sh_err)))


def run_demo(outdir: str | Path, n_particles: int = 2000, n_structures: int = 4, n_classes: int = 8, n_iter: int = 60,
             snr: float = 0.05, seed: int = 1, client=None, progress=None) -> DemoResult:
    """Simulate, classify with VDAM, score. Returns the figures (also logged)."""
    outdir = Path(outdir)
    sim = simulate_2d_classes(n=n_particles, n_classes=n_structures, box=64, pixel_size_a=3.0, snr=snr, seed=seed,
                              shift_sigma_px=1.5, max_shift_px=4.0)
    star, _truth = write_unaligned_set(outdir / "Simulated", sim)
    opts = Class2DOptions(input=str(star), output=str(outdir / "Class2D" / "run"), n_classes=n_classes, n_iter=n_iter,
                          grad=True, particle_diameter_a=150.0, ctf=True, center_classes=True, random_seed=seed,
                          psi_step_deg=12.0, offset_step_px=2.0,  # RELION's GUI sampling (6 deg / 1 px fine)
                          grad_write_iter=max(10, n_iter // 4))
    result = run_class2d(opts, client=client, progress=progress)
    pp = result["particles"]
    purity, psi_err, sh_err = score_against_truth(sim.truth, pp["class_index"], pp["psi_deg"], pp["origin_px"], 3.0)
    res = DemoResult(star, Path(f"{result['root']}_model.star"), purity, psi_err, sh_err, n_particles,
                     int(len(np.unique(pp["class_index"]))))
    log.info("demo: purity %.3f, psi error %.1f deg, shift error %.2f px", purity, psi_err, sh_err)
    return res


# --------------------------------------------------------------------------------------------
# movies to map


@dataclass
class PipelineDemoResult:
    """What :func:`run_pipeline_demo` produced.

    Attributes
    ----------
    project
        The processing project (RELION's layout: Import/, MotionCorr/, ... Refine3D/, PostProcess).
    postprocess_star
        The refine3d job's postprocess.star (``rlnFinalResolution``); None when proc stopped early.
    final_map
        The refined map (run_class001.mrc).
    final_resolution_a
        Gold-standard resolution after post-processing (rlnFinalResolution).
    resolution_vs_truth_a
        FSC 0.143 of the final map against the simulator's phantom, after aligning it (rotation,
        shift, hand).
    stage_seconds
        Wall time of simulation, ingestion, prep and proc.
    scheme_status
        How prep and proc ended (``exited``, ``failed`` ...).
    """

    project: Path
    postprocess_star: Path | None
    final_map: Path | None
    final_resolution_a: float | None
    resolution_vs_truth_a: float | None
    stage_seconds: dict
    scheme_status: dict
    n_movies: int
    n_particles_refined: int


@dataclass
class PipelineDemoSettings:
    """The simulated session and the processing choices of the demo (small enough for 2 cores).

    The defaults simulate 24 EPU movies (8 frames of 384 x 384 pixels, 2 A/px, 40 e/A^2) with 25
    particles each of an asymmetric phantom (about 45 A across), and process them with 20
    iterations of 2D classification, 30 of the initial model (one class) and a gold-standard
    refinement, on particles extracted in 38-pixel boxes and down-scaled to 24 pixels. The LoG
    picker's threshold is raised by 2 standard deviations (``--log_adjust 2``): on these
    micrographs that halves recall losses against junk (precision 0.5 at recall 0.8, against 0.17
    at 0.95 with RELION's default 0).
    """

    n_movies: int = 24
    particles_per_micrograph: int = 25
    frame_px: int = 384
    n_frames: int = 8
    pixel_size_a: float = 2.0
    dose_per_frame_e_a2: float = 5.0
    phantom_box: int = 40
    particle_diameter_a: float = 50.0
    small_box: int = 24
    log_adjust: float = 2.0
    class2d_iter: int = 20
    class2d_classes: int = 10
    inimodel_iter: int = 30
    refine3d_iter: int = 0
    min_particles_3d: int = 100
    symmetry: str = "C1"
    seed: int = 1


def run_pipeline_demo(outdir: str | Path, settings: PipelineDemoSettings | None = None, engine: str = "prefect",
                      announce=None) -> PipelineDemoResult:
    """Movies to map: simulate an EPU session, ingest it with MDCatch, run prep then proc (as
    Prefect flows, or plainly with ``engine="plain"``) in ``outdir/project`` and score the map.

    The jobs use the current dask client (``distributed.default_client``) when there is one.
    ``announce(message)`` receives one-line stage messages (the CLI prints them).
    """
    import dataclasses
    import os
    import time

    from autospa.io.atomic import write_text
    from autospa.io.postprocess_files import read_postprocess_star, read_volume, write_volume
    from autospa.mdcatch.detectors import load_config
    from autospa.mdcatch.session import SessionWatcher, WatchSettings, it_settings
    from autospa.numerics.fsc import fsc
    from autospa.orchestration.it import config_from_mapping, launch_it, prefect_environment, prepare_it
    from autospa.refinement.autorefine import resolution_shell_of
    from autospa.refinement.map_align import align_maps
    from autospa.simulate.phantoms import pseudo_atomic_phantom
    from autospa.simulate.session import simulate_session

    s = settings or PipelineDemoSettings()
    say = announce or (lambda msg: log.info("%s", msg))
    out = Path(outdir).resolve()
    session, project = out / "session", out / "project"
    project.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t = time.perf_counter()
    truth = pseudo_atomic_phantom(s.phantom_box, s.pixel_size_a, seed=s.seed, symmetry=s.symmetry)
    truth_path = write_volume(out / "truth_map.mrc", truth, s.pixel_size_a)
    simulate_session(session, [truth], n_movies=s.n_movies, software="EPU", shape=(s.frame_px, s.frame_px),
                     n_frames=s.n_frames, pixel_size_a=s.pixel_size_a, dose_per_frame_e_a2=s.dose_per_frame_e_a2,
                     particles_per_micrograph=s.particles_per_micrograph, seed=s.seed)
    times["simulate"] = time.perf_counter() - t
    say(f"simulated an EPU session of {s.n_movies} movies in {session}")

    t = time.perf_counter()
    # the facility's MDCatch table: the simulated microscope and its Cs (EPU's XML does not record Cs)
    site = out / "mdcatch_site.toml"
    write_text(site, '[defaults]\ncs_mm = 2.7\n[microscopes.autospa-sim]\nname = "Simulator"\ncs_mm = 2.7\n')
    watcher = SessionWatcher(session, project / "MDCatch", load_config(site),
                             WatchSettings(particle_diameter_a=s.particle_diameter_a, symmetry=s.symmetry))
    n_ingested = 0
    for _ in range(3):  # the first look only notes the files: a movie is complete once it stops growing
        n_ingested += len(watcher.poll().ingested)
    if n_ingested == 0:
        raise RuntimeError(f"MDCatch ingested no movie of {session}")
    extra = {"maxtime_hr": 0.0, "wait_sec": 0.0, "ctf_max_resolution_a": 31.0, "class2d_iterations": s.class2d_iter,
             "downscaled_box_px": s.small_box, "log_threshold_adjust": s.log_adjust,
             "class2d_classes": s.class2d_classes, "min_particles_3d": s.min_particles_3d,
             "options": {"proc__inimodel3d__nr_iter": str(s.inimodel_iter), "proc__inimodel3d__nr_classes": "1"}}
    if s.refine3d_iter > 0:  # an iteration limit (0: until the refinement converges)
        extra["options"]["proc__refine3d__other_args"] = f"--iter {s.refine3d_iter}"
    cfg = config_from_mapping(it_settings(watcher, extra, watcher.pipeline_movies_glob(project)), "demo settings")
    times["mdcatch"] = time.perf_counter() - t
    say(f"MDCatch: {n_ingested} movies ingested; box {watcher.derived.box_size_px if watcher.derived else '?'} px")

    cwd = os.getcwd()
    os.chdir(project)  # jobs run in the project directory, as RELION's do
    status: dict[str, str] = {}
    try:
        # one pass of prep, then one of proc (both stop at their maxtime check)
        for name, c in (("prep", dataclasses.replace(cfg, do_proc=False)), ("proc", dataclasses.replace(cfg, do_prep=False))):
            t = time.perf_counter()
            say(f"running {name} ({'Prefect flow' if engine == 'prefect' else 'plain runner'})")
            if engine == "plain":
                results = launch_it(project, prepare_it(project, c))
            else:
                with prefect_environment():
                    from autospa.orchestration.prefect_flows import run_it_flow

                    results = run_it_flow(project, c)
            times[name] = time.perf_counter() - t
            r = results.get(name)
            status[name] = f"error: {r}" if isinstance(r, BaseException) else f"{r.status.value} at {r.node}"
            say(f"scheme {name}: {status[name]} ({times[name]:.0f} s)")
    finally:
        os.chdir(cwd)
    refine_dirs = sorted(project.glob("Refine3D/job*/"))
    pp_star = refine_dirs[-1] / "postprocess.star" if refine_dirs else None
    if pp_star is None or not pp_star.exists():
        return PipelineDemoResult(project, None, None, None, None, times, status, n_ingested, 0)
    general, _, _ = read_postprocess_star(pp_star)
    final = refine_dirs[-1] / "run_class001.mrc"
    vol, map_px = read_volume(final)
    n_refined = len(read_star(refine_dirs[-1] / "run_data.star")["particles"])
    # the phantom on the refined map's grid (the particles were down-scaled), then aligned
    from autospa.jobs.refine3d import reference_on_particle_grid

    ref = reference_on_particle_grid(str(truth_path), vol.shape[-1], float(map_px))
    al = align_maps(vol, ref, float(map_px))
    shell = resolution_shell_of(fsc(al.aligned.double(), ref.double()))
    res_truth = vol.shape[-1] * float(map_px) / max(shell, 1)
    return PipelineDemoResult(project, pp_star, final, float(general["rlnFinalResolution"]), res_truth, times, status,
                              n_ingested, n_refined)
