"""``autospa demo``: the main job on simulated data, end to end with embedded defaults.

Movies to map (default): simulates an EPU session of an asymmetric phantom, ingests it with
MDCatch, runs the prep and proc schemes as Prefect flows on a local dask cluster, and ends with the
refined map, its gold-standard resolution (postprocess.star, rlnFinalResolution) and its resolution
against the simulator's truth; then writes the HTML report.

While it runs, the dask dashboard and the Prefect dashboard are printed: a local Prefect server
(API and UI, PREFECT_HOME in OUT/.prefect) runs for the length of the demo, unless PREFECT_API_URL
names one already; ``--no_prefect_server`` keeps Prefect's ephemeral mode (no dashboard).

``--particles`` runs the earlier, shorter demo: 2D classification (VDAM) of simulated particles,
scored against the truth.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from autospa.cli.common import add_cluster_arguments, client_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="movies to map on a simulated EPU session (MDCatch, prep, proc), scored against the truth",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--o", dest="output", default=None, metavar="DIR",
                   help="output folder (default: a new autospa_demo_N in the current folder)")
    p.add_argument("--movies", type=int, default=24, help="movies to simulate (default 24)")
    p.add_argument("--particles_per_micrograph", type=int, default=25, help="particles per movie (default 25)")
    p.add_argument("--engine", choices=("prefect", "plain"), default="prefect", help="run the schemes as Prefect flows (default)")
    p.add_argument("--no_prefect_server", action="store_true",
                   help="no local Prefect server and dashboard: Prefect's ephemeral mode (engine prefect)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--particles", action="store_true", help="the 2D demo instead: simulated particles, VDAM classes")
    p.add_argument("--n", type=int, default=2000, help="--particles: particles to simulate (default 2000)")
    p.add_argument("--structures", type=int, default=4, help="--particles: distinct structures (default 4)")
    p.add_argument("--K", type=int, default=8, help="--particles: 2D classes (default 8)")
    p.add_argument("--iter", type=int, default=60, help="--particles: VDAM mini-batches (default 60)")
    add_cluster_arguments(p)
    p.set_defaults(func=run)


def _new_folder() -> Path:
    i = 1
    while Path(f"autospa_demo_{i}").exists():
        i += 1
    return Path(f"autospa_demo_{i}")


def run(args: argparse.Namespace) -> int:
    out = Path(args.output) if args.output else _new_folder()
    if args.particles:
        return _run_particles(args, out)
    from autospa.io.report_files import write_report
    from autospa.jobs.demo import PipelineDemoSettings, run_pipeline_demo
    from autospa.report.session_report import session_report

    settings = PipelineDemoSettings(n_movies=args.movies, particles_per_micrograph=args.particles_per_micrograph, seed=args.seed)
    with client_from_args(args), contextlib.ExitStack() as stack:
        if args.engine == "prefect":
            _start_prefect_dashboard(stack, out, args.no_prefect_server)
        res = run_pipeline_demo(out, settings, engine=args.engine, announce=lambda m: print(m, flush=True))
    print(f"project:   {res.project}")
    for name, st in res.scheme_status.items():
        print(f"scheme {name}: {st}")
    times = ", ".join(f"{k} {v:.0f} s" for k, v in res.stage_seconds.items())
    print(f"time: {times}")
    if res.postprocess_star is None:
        print("no refined map: proc stopped before refine3d (see the schemes' status above)", file=sys.stderr)
        return 1
    rep = session_report(res.project, title="autospa demo")
    paths = write_report(res.project / "report", rep.html, rep.figures)
    print(f"final map: {res.final_map} ({res.n_particles_refined} particles)")
    print(f"postprocess: {res.postprocess_star}: rlnFinalResolution {res.final_resolution_a:.2f} A; "
          f"against the simulator's truth {res.resolution_vs_truth_a:.2f} A (FSC 0.143)")
    print(f"report:    {paths['index']}")
    return 0


def _start_prefect_dashboard(stack: contextlib.ExitStack, out: Path, ephemeral: bool) -> None:
    """Start the local Prefect server on ``stack`` (unless ``ephemeral``) and print the dashboard address."""
    from autospa.orchestration.prefect_server import dashboard_url, prefect_server

    api = os.environ.get("PREFECT_API_URL")
    if ephemeral and not api:
        print("prefect: ephemeral mode (no dashboard; flow runs recorded under PREFECT_HOME)", file=sys.stderr, flush=True)
        return
    url = dashboard_url(api) if ephemeral else stack.enter_context(prefect_server(out / ".prefect"))
    if url:
        print(f"prefect dashboard: {url}", file=sys.stderr, flush=True)
    else:
        print(f"prefect: ephemeral mode (the local Prefect server did not start: see {out / '.prefect' / 'server.log'})",
              file=sys.stderr, flush=True)


def _run_particles(args: argparse.Namespace, out: Path) -> int:
    from autospa.cli.class2d import progress_bar
    from autospa.jobs.demo import run_demo

    progress, close = progress_bar("demo")
    try:
        with client_from_args(args) as client:
            res = run_demo(out, args.n, args.structures, args.K, args.iter, seed=args.seed, client=client, progress=progress)
    finally:
        close()
    print(f"simulated particles: {res.particles_star}")
    print(f"2D classes:          {res.model_star}")
    print(f"class purity {res.purity:.3f} over {res.n_particles} particles in {res.n_classes_found} classes; "
          f"median psi error {res.median_psi_error_deg:.1f} deg; median shift error {res.median_shift_error_px:.2f} px")
    return 0
