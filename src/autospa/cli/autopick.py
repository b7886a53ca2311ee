"""``autospa autopick``: particle picking with RELION's Laplacian-of-Gaussian picker
(job relion.autopick.log) or Topaz's pretrained model (relion.autopick.topaz, needs the ``topaz``
extra): ``autospa autopick --i micrographs_ctf.star --o AutoPick/job004 --LoG --LoG_diam_min 150
--LoG_diam_max 180`` (or ``--topaz --topaz_particle_diameter 180``) writes autopick.star naming one
coordinate STAR file per micrograph.
"""

from __future__ import annotations

import argparse

from autospa.cli.preprocess_args import add_job_arguments, run_job


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``autopick`` subcommand."""
    p = subparsers.add_parser("autopick", help="pick particles (LoG or Topaz)", description=__doc__)
    p.add_argument("--i", required=True, metavar="STAR", help="micrographs_ctf.star (or micrographs.star)")
    add_job_arguments(p)
    m = p.add_mutually_exclusive_group(required=True)
    m.add_argument("--LoG", action="store_true", help="Laplacian-of-Gaussian picking")
    m.add_argument("--topaz", "--topaz_extract", dest="topaz", action="store_true", help="Topaz picking")
    g = p.add_argument_group("LoG (RELION's option names)")
    g.add_argument("--LoG_diam_min", type=float, default=150.0, help="smallest particle diameter, A")
    g.add_argument("--LoG_diam_max", type=float, default=180.0, help="largest particle diameter, A")
    g.add_argument("--LoG_adjust_threshold", type=float, default=0.0, help="threshold in std devs (higher: fewer picks)")
    g.add_argument("--LoG_upper_threshold", type=float, default=999.0, help="reject picks above this many std devs")
    g.add_argument("--lowpass", "--LoG_maxres", dest="lowpass", type=float, default=20.0, help="low-pass before picking, A")
    g.add_argument("--Log_invert", "--LoG_invert", dest="invert", action="store_true", help="particles are white")
    t = p.add_argument_group("Topaz")
    t.add_argument("--topaz_model", default="", help="pretrained name (resnet16, resnet8 ...) or a trained model file")
    t.add_argument("--topaz_particle_diameter", type=float, default=180.0, help="particle diameter, A")
    t.add_argument("--topaz_threshold", type=float, default=-6.0, help="smallest Topaz score kept (default -6)")
    t.add_argument("--topaz_nr_particles", type=int, default=-1, help="keep at most this many per micrograph")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from autospa.jobs.autopick import AutopickParams, run_autopick

    params = AutopickParams(
        input_star=args.i,
        output_dir=args.o,
        method="topaz" if args.topaz else "log",
        log_diam_min=args.LoG_diam_min,
        log_diam_max=args.LoG_diam_max,
        log_adjust_thr=args.LoG_adjust_threshold,
        log_upper_thr=args.LoG_upper_threshold,
        log_maxres=args.lowpass,
        log_invert=args.invert,
        topaz_model=args.topaz_model,
        topaz_particle_diameter=args.topaz_particle_diameter,
        topaz_threshold=args.topaz_threshold,
        topaz_nr_particles=args.topaz_nr_particles,
        device=args.device,
    )
    return run_job(args, lambda client: run_autopick(params, client=client, continue_=args.continue_), "autopick")
