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
