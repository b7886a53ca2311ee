"""2D classification with VDAM (200 mini-batches) against EM (25 iterations): wall time, passes
through the data and class purity (the RELION-4.0 paper's Table 2, on simulated data).

For each simulated data set (``autospa.simulate.particles.simulate_2d_classes``: several
structures seen from one direction, random in-plane rotations and shifts, per-particle CTF, white
noise), both algorithms run through ``autospa.jobs.class2d.run_class2d`` (the code path of
``autospa class2d`` and of the class2d scheme job) with the same options as the proc scheme (CTF
correction, centring, RELION's GUI sampling: 6 degrees / 1 pixel fine, 12 / 2 coarse), from the
same particle store. Printed per data set: wall time, iterations, epochs (particles processed /
particles in the set; VDAM's mini-batches grow from 200 to 1,000 particles, and its last iteration
is one full pass), class purity against the simulator's truth (each found class counts its
majority structure) and the speed-up of VDAM over EM.

The paper's point is that VDAM needs ~6 passes through the data where EM needs 25, so it is ~5x
faster on real data sets (10^5 - 10^6 particles). VDAM's mini-batch sizes are absolute numbers
(RELION's defaults: 200 rising to 1,000 particles, at least 0.5 % / 5 % of the set), so the number
of epochs - and the speed-up - depends on the size of the set: about 6 epochs need ~20,000
particles; with a few thousand particles VDAM passes through the data *more* often than EM. The
``--quick`` set is that small on purpose (it shows the accounting, not the speed-up); the full run
uses sets of 10,000 to 40,000 particles.

Usage::

    python examples/table2_vdam_vs_em.py --quick                 # 1 set of 2,000 particles, ~15 min on 2 cores
    python examples/table2_vdam_vs_em.py                          # 3 sets, 10k-40k particles: hours on 2 CPU cores
    python examples/table2_vdam_vs_em.py --device cuda            # the same on a GPU
    python examples/table2_vdam_vs_em.py --j 4                    # on a local dask cluster of 4 workers
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

#: name, particles, structures, classes K, SNR, box (pixels), pixel size (A)
FULL_SETS = (
    ("sim-A", 20_000, 4, 20, 0.05, 48, 3.0),
    ("sim-B", 40_000, 6, 30, 0.03, 48, 3.0),
    ("sim-C", 10_000, 2, 10, 0.10, 48, 3.0),
)
QUICK_SETS = (("quick", 2_000, 3, 4, 0.05, 32, 4.0),)


@dataclass
class Run:
    algorithm: str
    iterations: int
    seconds: float
    epochs: float
    purity: float
    classes_used: int


def _classify(store: Path, out: Path, k: int, grad: bool, n_iter: int, diameter_a: float, seed: int, device: str,
              client) -> tuple[dict, float, int]:
    from autospa.jobs.class2d import Class2DOptions, run_class2d

    seen = []
    opts = Class2DOptions(input=str(store), output=str(out / "run"), n_classes=k, n_iter=n_iter, grad=grad,
                          particle_diameter_a=diameter_a, ctf=True, center_classes=True, random_seed=seed,
                          psi_step_deg=12.0, offset_step_px=2.0,  # the GUI's 6 deg / 1 px (fine sampling)
                          device=device)
    t0 = time.perf_counter()
    result = run_class2d(opts, client=client, progress=lambda info: seen.append(info.n_particles))
    return result, time.perf_counter() - t0, sum(seen)


def vdam_epochs(n_particles: int, n_iter: int, n_classes: int) -> float:
    """Passes through the data that ``n_iter`` VDAM mini-batches make on a set of ``n_particles``
    (RELION's schedule, :mod:`autospa.refinement.schedule`; the last iteration is a full pass)."""
    from autospa.refinement import schedule

    ph = schedule.phases(n_iter)
    s_ini, s_fin = schedule.subset_sizes(n_particles, "2d")
    seen = sum(schedule.subset_size(i, ph, n_particles, s_ini, s_fin, n_classes) for i in range(1, n_iter + 1))
    return seen / n_particles


def run_set(name: str, n: int, structures: int, k: int, snr: float, box: int, pixel: float, work: Path, em_iter: int,
            vdam_iter: int, device: str, client, seed: int = 1) -> tuple[Run, Run]:
    """Simulate one set, import it once, classify it with EM and with VDAM."""
    import numpy as np

    from autospa.io.relion_particles import import_particles
    from autospa.jobs.demo import score_against_truth, write_unaligned_set
    from autospa.simulate.particles import simulate_2d_classes

    sim = simulate_2d_classes(n=n, n_classes=structures, box=box, pixel_size_a=pixel, snr=snr, seed=seed,
                              shift_sigma_px=1.5, max_shift_px=4.0)
    star, _ = write_unaligned_set(work / name / "Simulated", sim)
    store = import_particles(star, work / name / "particles.zarr", dtype="float32", chunk_size=1024, overwrite=True)
    diameter = 0.8 * box * pixel
    runs = []
    for algorithm, grad, n_iter in (("EM", False, em_iter), ("VDAM", True, vdam_iter)):
        result, seconds, processed = _classify(store, work / name / algorithm, k, grad, n_iter, diameter, seed, device, client)
        pp = result["particles"]
        purity, _psi, _shift = score_against_truth(sim.truth, pp["class_index"], pp["psi_deg"], pp["origin_px"], pixel)
        runs.append(Run(algorithm, n_iter, seconds, processed / n, purity, int(len(np.unique(pp["class_index"])))))
        print(f"  {name} {algorithm}: {n_iter} iterations, {seconds:.0f} s, {processed / n:.1f} epochs, purity {purity:.3f}",
              flush=True)
    return runs[0], runs[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one small set (2,000 particles, box 32, K = 4)")
    ap.add_argument("--em_iter", type=int, default=25, help="EM iterations (paper: 25)")
    ap.add_argument("--vdam_iter", type=int, default=200, help="VDAM mini-batches (paper: 200)")
    ap.add_argument("--particles", type=int, default=None, help="particles per set (overrides the sets' own sizes)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto (the E-step's device)")
    ap.add_argument("--j", type=int, default=None, help="run on a local dask cluster of this many workers")
    ap.add_argument("--work", default=None, help="folder for the sets and the runs (default: a temporary folder)")
    args = ap.parse_args()

    sets = QUICK_SETS if args.quick else FULL_SETS
    if args.particles:
        sets = tuple((name, args.particles, *rest) for name, _n, *rest in sets)
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="table2_")
    work = Path(args.work or tmp.name)
    rows = []
    with contextlib.ExitStack() as stack:
        client = None
        if args.j:
            from autospa.distributed.cluster import get_client

            client = stack.enter_context(get_client(n_workers=args.j, dashboard_address=None))
        for spec in sets:
            em, vdam = run_set(*spec, work=work, em_iter=args.em_iter, vdam_iter=args.vdam_iter, device=args.device,
                               client=client)
            rows.append((spec, em, vdam))

    print()
    print(f"Table 2 (simulated): 2D classification, EM {args.em_iter} iterations vs VDAM {args.vdam_iter} mini-batches "
          f"(device {args.device}{f', {args.j} dask workers' if args.j else ''})")
    head = (f"{'data set':9s} {'particles':>9s} {'K':>3s} | {'EM time':>8s} {'epochs':>6s} {'purity':>6s} | "
            f"{'VDAM time':>9s} {'epochs':>6s} {'purity':>6s} | {'speed-up':>8s}")
    print(head)
    print("-" * len(head))
    for (name, n, _s, k, _snr, _box, _pix), em, vdam in rows:
        print(f"{name:9s} {n:9d} {k:3d} | {em.seconds:7.0f}s {em.epochs:6.1f} {em.purity:6.3f} | "
              f"{vdam.seconds:8.0f}s {vdam.epochs:6.1f} {vdam.purity:6.3f} | {em.seconds / vdam.seconds:7.2f}x")
    mean = sum(em.seconds / vdam.seconds for _, em, vdam in rows) / len(rows)
    print("-" * len(head))
    print(f"mean speed-up of VDAM over EM: {mean:.2f}x (paper, real data sets of 10^5-10^6 particles: about 5x)")
    print()
    print(f"epochs of {args.vdam_iter} VDAM mini-batches by set size (RELION's mini-batch schedule; EM: {args.em_iter}):")
    print("  " + "  ".join(f"{n:>9,d}: {vdam_epochs(n, args.vdam_iter, 20):5.1f}" for n in (2_000, 5_000, 20_000, 100_000, 1_000_000)))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
