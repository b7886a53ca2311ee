"""De-novo 3D initial models with VDAM over 10 random seeds: how often the automated procedure finds
the target structure (the RELION-4.0 paper's Figure 8, on simulated data).

The paper ran ten 3D initial-model jobs per data set (VDAM, three classes, 200 iterations, the most
populated class taken, as relion_it does) and counted the runs that converged to the known
structure (GDH 8/10, CB1 9/10, INX6 10/10, aldolase 5/10 - half of its particles were a similar but
different complex -, TRPV1 4/10). Here each data set is simulated with
``autospa.simulate.datasets.write_particle_dataset`` and every run goes through
``autospa.jobs.initialmodel.run_initial_model`` (the code path of ``autospa initial-model`` and of
the proc scheme's inimodel3d job) with a different ``--random_seed``. The map it writes
(``initial_model.mrc``: the most populated class) is aligned onto the true target map
(``autospa.refinement.map_align.align_maps``: rotation, shift and hand, as the paper aligned its
maps by hand in Chimera) and compared by FSC. A run succeeds when it is closer to the target than
to any other structure of the set and the FSC with the target stays at or above 0.5 out to twice
the Nyquist frequency (a resolution of 4 pixels, ``--limit_px``; the paper refined each model
first and judged the refined map). The paper's "central slices" are printed as numbers: the
FSC-0.5 resolution and real-space correlation of every run.

Data sets (``--quick`` runs the first one only, with fewer particles, seeds and iterations):

* ``single``: one structure, uniform views, no junk (the easy case: INX6, CB1);
* ``mixed``: two different structures, about half each; the target is structure 1 (aldolase);
* ``preferred``: one structure, 70 % of the views near a top and a side view, 20 % junk (TRPV1).

Usage::

    python examples/fig8_initial_model_seeds.py --quick      # 'single', 400 particles, 3 seeds, 24 iterations
    python examples/fig8_initial_model_seeds.py              # 3 sets x 10 seeds x 200 iterations (CPU: days; use a GPU)
    python examples/fig8_initial_model_seeds.py --device cuda --sets single mixed --seeds 10
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

BOX, PIXEL, DIAMETER_A = 24, 6.0, 90.0

#: name -> (description, write_particle_dataset keyword arguments)
SETS = {
    "single": ("one structure, uniform views", dict(n_classes=1, junk_fraction=0.0, orientation="uniform")),
    "mixed": ("two structures, about half each (target: structure 1)", dict(n_classes=2, junk_fraction=0.0,
                                                                              orientation="uniform")),
    "preferred": ("one structure, preferred views, 20 % junk", dict(n_classes=1, junk_fraction=0.2, orientation="preferred")),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the 'single' set: 400 particles, 3 seeds, 24 iterations")
    ap.add_argument("--sets", nargs="+", choices=tuple(SETS), default=None, help="data sets (default: all; --quick: single)")
    ap.add_argument("--seeds", type=int, default=None, help="runs per data set (default 10, --quick 3)")
    ap.add_argument("--iter", type=int, default=None, help="VDAM iterations (default 200 as the paper, --quick 24)")
    ap.add_argument("--particles", type=int, default=None, help="particles per set (default 2000, --quick 400)")
    ap.add_argument("--K", type=int, default=3, help="classes (paper: 3)")
    ap.add_argument("--snr", type=float, default=0.2, help="simulated SNR")
    ap.add_argument("--limit_px", type=float, default=4.0,
                    help="success: FSC >= 0.5 with the target out to this many pixels (default 4: twice Nyquist)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--work", default=None, help="folder for the data sets and runs (default: a temporary folder)")
    args = ap.parse_args()

    import torch

    from autospa.io.postprocess_files import read_volume
    from autospa.jobs.initialmodel import InitialModelOptions, run_initial_model
    from autospa.numerics.fsc import fsc, fsc_resolution
    from autospa.refinement.map_align import align_maps
    from autospa.simulate.datasets import write_particle_dataset

    sets = args.sets or (["single"] if args.quick else list(SETS))
    n_seeds = args.seeds or (3 if args.quick else 10)
    n_iter = args.iter or (24 if args.quick else 200)
    n_particles = args.particles or (400 if args.quick else 2000)
    limit_a = args.limit_px * PIXEL  # success: FSC >= 0.5 with the target out to this resolution
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="fig8_")
    work = Path(args.work or tmp.name)
    t_all = time.perf_counter()
    summary = []
    for name in sets:
        desc, kw = SETS[name]
        ds = write_particle_dataset(work / name / "data", n=n_particles, box=BOX, pixel_size_a=PIXEL, snr=args.snr, seed=11, **kw)
        target, _ = read_volume(ds.maps[0])
        others = [read_volume(p)[0] for p in ds.maps[1:]]
        print(f"{name}: {desc}; {n_particles} particles ({ds.n_junk} junk), box {BOX} at {PIXEL:g} A, SNR {args.snr:g}", flush=True)
        print(f"  {'seed':>4s} {'class':>5s} {'share':>6s} {'hand':>6s} {'CC':>6s} {'FSC0.5 (A)':>10s} {'best match':>10s} "
              f"{'result':>7s} {'time':>6s}")
        ok = 0
        for seed in range(1, n_seeds + 1):
            t0 = time.perf_counter()
            opts = InitialModelOptions(input=str(ds.particles_star), output=str(work / name / f"seed{seed:02d}" / "run"),
                                       n_classes=args.K, n_iter=n_iter, particle_diameter_a=DIAMETER_A, random_seed=seed,
                                       device=args.device)
            res = run_initial_model(opts)
            model, _ = read_volume(res["initial_model"])
            share = float(res["state"].class_prior[res["class_index"]])
            al = align_maps(model, target, PIXEL)
            curve = fsc(al.aligned.double(), target.double())
            res_a = fsc_resolution(curve, BOX, PIXEL, threshold=0.5)
            match = "target"
            for i, other in enumerate(others, start=2):  # is it closer to another structure of the set?
                if align_maps(model, other, PIXEL).correlation > al.correlation:
                    match = f"struct. {i}"
            success = match == "target" and res_a <= limit_a + 1e-6
            ok += success
            print(f"  {seed:4d} {res['class_index'] + 1:5d} {100 * share:5.1f}% {'mirror' if al.mirrored else 'same':>6s} "
                  f"{al.correlation:6.3f} {res_a:10.1f} {match:>10s} {'yes' if success else 'no':>7s} "
                  f"{time.perf_counter() - t0:5.0f}s", flush=True)
        summary.append((name, ok, n_seeds))
        print()
    print(f"Figure 8 (simulated): successful initial models (VDAM, K={args.K}, {n_iter} iterations, most populated class; "
          f"success = FSC >= 0.5 with the target to {limit_a:g} A)")
    for name, ok, n in summary:
        print(f"  {name:10s} {ok:2d} / {n}")
    print("  paper: GDH 8/10, CB1 9/10, INX6 10/10, aldolase 5/10, TRPV1 4/10")
    print(f"\n{time.perf_counter() - t_all:.0f} s (device {args.device}, {torch.get_num_threads()} torch threads)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
