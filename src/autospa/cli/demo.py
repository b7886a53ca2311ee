"""``autospa demo``: simulate a data set and run the pipeline on it (local dask cluster, no setup)."""

from __future__ import annotations

import argparse

from autospa.cli.common import add_cluster_arguments, client_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="simulate particles and classify them in 2D (VDAM), scored against the truth",
                              description=__doc__)
    p.add_argument("--o", dest="output", default="autospa_demo", metavar="DIR", help="output folder (default autospa_demo)")
    p.add_argument("--n", type=int, default=2000, help="particles to simulate (default 2000)")
    p.add_argument("--structures", type=int, default=4, help="distinct structures (default 4)")
    p.add_argument("--K", type=int, default=8, help="2D classes (default 8)")
    p.add_argument("--iter", type=int, default=60, help="VDAM mini-batches (default 60)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    add_cluster_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from autospa.cli.class2d import progress_bar
    from autospa.jobs.demo import run_demo

    progress, close = progress_bar("demo")
    try:
        with client_from_args(args) as client:
            res = run_demo(args.output, args.n, args.structures, args.K, args.iter, seed=args.seed, client=client, progress=progress)
    finally:
        close()
    print(f"simulated particles: {res.particles_star}")
    print(f"2D classes:          {res.model_star}")
    print(f"class purity {res.purity:.3f} over {res.n_particles} particles in {res.n_classes_found} classes; "
          f"median psi error {res.median_psi_error_deg:.1f} deg; median shift error {res.median_shift_error_px:.2f} px")
    return 0
