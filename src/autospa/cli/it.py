"""``autospa it``: the relion_it equivalent. One configuration sets the variables and job options of
the prep and proc schemes, which are then run together (as Prefect flows by default).

::

    autospa it --config session.yaml                  # YAML (or relion_it's options .py file)
    autospa it --movies 'Movies/*.tiff' --angpix 0.885 --dose_per_frame 1.2 --kv 300 --cs 2.7 \\
               --particle_diameter 180 --symmetry D2
    autospa it --status                               # where each scheme is
    autospa it --config session.yaml --only_save      # write the settings, do not run

The schemes are copied from autospa's ``schemes/`` into ``Schemes/prep`` and ``Schemes/proc`` of
the project if they are not there yet (an existing copy keeps its state, so launching again
resumes). Command-line values override the file's; ``--set KEY=VALUE`` sets any configuration
field or raw relion_it key (``proc__class2d__nr_classes=50``, ``prep__do_at_most=20``). The
configuration used is recorded in ``autospa_it.yaml``. Exit status: 0 when both schemes ended
normally, 1 when one stopped on a failure, 3 when one was aborted.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from autospa.cli.common import add_cluster_arguments
from autospa.cli.schemer import dask_client, print_result, print_status, prefect_environment
from autospa.errors import InputError
from autospa.orchestration.it import (
    IT_SCHEMES,
    config_from_mapping,
    it_status,
    launch_it,
    load_it_config,
    prepare_it,
)
from autospa.orchestration.runner import RunResult, RunSettings

#: Command-line flag -> ItConfig field (flags use relion_it's / RELION's words where they exist).
FLAGS = {
    "movies": ("movies", str, "glob of the movies, relative to the project directory"),
    "gain": ("gain", str, "gain reference"),
    "angpix": ("pixel_size_a", float, "movie pixel size in A (the super-resolution one for super-resolution movies)"),
    "super_resolution": ("super_resolution", "flag", "super-resolution movies: motion correction bins by 2"),
    "dose_per_frame": ("dose_per_frame", float, "electrons per A^2 per frame"),
    "kv": ("voltage_kv", float, "acceleration voltage in kV"),
    "cs": ("cs_mm", float, "spherical aberration in mm"),
    "q0": ("amplitude_contrast", float, "amplitude contrast"),
    "phase_plate": ("phase_plate", "flag", "estimate a phase shift"),
    "particle_diameter": ("particle_diameter_a", float, "longest particle diameter in A"),
    "mask_diameter": ("mask_diameter_a", float, "mask diameter in A (default 1.1 x particle diameter)"),
    "box": ("box_size_px", int, "extraction box in pixels (default 1.5 x diameter, even)"),
    "small_box": ("downscaled_box_px", int, "down-scaled box in pixels (default: pixel size below 3.75 A)"),
    "symmetry": ("symmetry", str, "point group for the initial model and refinement"),
    "picker": ("picker", str, "log or topaz"),
    "log_ratio": ("log_diameter_ratio", float, "shortest / longest diameter for LoG picking"),
    "log_adjust": ("log_threshold_adjust", float, "LoG threshold adjustment"),
    "topaz_model": ("topaz_model", str, "Topaz model (default: Topaz's own)"),
    "topaz_min_fom": ("topaz_min_fom", float, "minimum Topaz figure of merit for extraction"),
    "ctf_max_res": ("ctf_max_resolution_a", float, "use micrographs whose CTF fits to this resolution (A) or better"),
    "class2d_classes": ("class2d_classes", int, "2D classes"),
    "class2d_iter": ("class2d_iterations", int, "2D VDAM iterations"),
    "class_threshold": ("class_score_threshold", float, "minimum class-ranker score of selected 2D classes"),
    "min_particles_3d": ("min_particles_3d", int, "selected particles needed before 3D runs"),
    "reference": ("reference_3d", str, "3D reference map (default: make an initial model)"),
    "gpu_ids": ("gpus", str, "comma-separated GPU ids written into the job options (class2d, 3D, Topaz)"),
    "movies_per_pass": ("movies_per_pass", int, "at most this many new movies per pass of prep"),
    "wait_sec": ("wait_sec", float, "loop period of both schemes, seconds"),
    "maxtime_hr": ("maxtime_hr", float, "lifetime of both schemes, hours"),
    "micrographs_ctf": ("micrographs_ctf", str, "with --no_prep: an existing micrographs_ctf.star for proc"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``autospa it``."""
    p = subparsers.add_parser(
        "it",
        help="configure and launch the prep and proc schemes together (relion_it)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=None, metavar="FILE", help="YAML configuration, or relion_it options file (.py)")
    p.add_argument("--project", default=".", metavar="DIR", help="project directory (default: the current directory)")
    g = p.add_argument_group("session settings (override the configuration file)")
    for flag, (_field, kind, help_) in FLAGS.items():
        if kind == "flag":
            g.add_argument(f"--{flag}", action="store_true", default=None, help=help_)
        else:
            g.add_argument(f"--{flag}", type=kind, default=None, help=help_)
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any setting or raw relion_it key (repeatable)")
    g.add_argument("--no_prep", action="store_true", help="do not run the prep scheme")
    g.add_argument("--no_proc", action="store_true", help="do not run the proc scheme")
    r = p.add_argument_group("running")
    r.add_argument("--status", action="store_true", help="print where each scheme is and exit")
    r.add_argument("--only_save", action="store_true", help="write the settings into the schemes, do not run them")
    r.add_argument("--reset", action="store_true", help="reset both schemes before running (start from scratch)")
    r.add_argument("--engine", choices=("prefect", "plain"), default="prefect", help="run as Prefect flows (default) or without Prefect")
    r.add_argument("--input_wait", type=float, default=50.0, metavar="S", help="seconds a job waits for its input files (default 50)")
    r.add_argument("--lock_wait", type=float, default=10.0, metavar="S", help="seconds to wait for a runner holding a scheme (default 10)")
    add_cluster_arguments(p)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    """The :class:`~autospa.orchestration.it.ItConfig`: file, then flags, then ``--set``."""
    base = load_it_config(args.config) if args.config else config_from_mapping({})
    data: dict[str, object] = {}
    for flag, (field, _kind, _help) in FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            data[field] = value
    if args.no_prep:
        data["do_prep"] = False
    if args.no_proc:
        data["do_proc"] = False
    for item in args.set:
        if "=" not in item:
            raise InputError(None, f"--set {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        data[k.strip()] = v
    if not data:
        return base
    from dataclasses import asdict

    merged = {k: v for k, v in asdict(base).items() if k != "options"}
    merged.update({k: v for k, v in data.items() if "__" not in k})
    options = dict(base.options)
    options.update({k: str(v) for k, v in data.items() if "__" in k})
    merged["options"] = options
    return config_from_mapping(merged, "command line")


def run(args: argparse.Namespace) -> int:
    """Configure and launch (or report)."""
    if args.status:
        for st in it_status(args.project):
            print_status(st)
        return 0
    cfg = config_from_args(args)
    project = Path(args.project).resolve()
    if not project.is_dir():
        raise InputError(project, "the project directory does not exist")
    os.chdir(project)  # jobs run in the project directory, as RELION's do
    args.project = str(project)
    settings = RunSettings(lock_wait_s=args.lock_wait, input_wait_s=args.input_wait)
    if args.only_save:
        names = prepare_it(args.project, cfg, args.reset)
        print(f"settings written into {', '.join(f'Schemes/{n}' for n in IT_SCHEMES)}; "
              f"would run: {', '.join(names) or 'nothing'}")
        return 0
    with dask_client(args):
        if args.engine == "plain":
            names = prepare_it(args.project, cfg, args.reset)
            results = launch_it(args.project, names, settings)
        else:
            with prefect_environment():
                from autospa.orchestration.prefect_flows import run_it_flow  # imports Prefect

                results = run_it_flow(args.project, cfg, args.reset, settings)
    return report(results)


def report(results: dict[str, RunResult | BaseException]) -> int:
    """Print each scheme's result; the worst exit status."""
    code = 0
    for name, r in results.items():
        if isinstance(r, BaseException):
            print(f"scheme {name}: error: {r}", file=sys.stderr)
            code = max(code, 1)
            continue
        print_result(r)
        code = max(code, r.exit_code)
    if not results:
        print("nothing to run (--no_prep and --no_proc)")
    return code
