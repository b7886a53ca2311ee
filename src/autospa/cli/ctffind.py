"""``autospa ctffind``: CTF estimation of every micrograph (job relion.ctffind.ctffind4):
``autospa ctffind --i corrected_micrographs.star --o CtfFind/job003`` writes micrographs_ctf.star
(rlnDefocusU, rlnDefocusV, rlnDefocusAngle, rlnCtfMaxResolution, rlnCtfFigureOfMerit ...) and a
diagnostic image (MRC + PNG) per micrograph.
"""

from __future__ import annotations

import argparse

from autospa.cli.preprocess_args import add_job_arguments, run_job


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``ctffind`` subcommand."""
    p = subparsers.add_parser("ctffind", help="estimate defocus, astigmatism and fit resolution", description=__doc__)
    p.add_argument("--i", required=True, metavar="STAR", help="corrected_micrographs.star (or any micrographs STAR)")
    add_job_arguments(p)
    g = p.add_argument_group("CTF estimation (RELION/CTFFIND option names)")
    g.add_argument("--box", type=int, default=512, help="tile size of the power spectrum (default 512)")
    g.add_argument("--ResMin", "--resmin", dest="resmin", type=float, default=30.0, help="lowest resolution fitted, A (default 30)")
    g.add_argument("--ResMax", "--resmax", dest="resmax", type=float, default=5.0, help="highest resolution fitted, A (default 5)")
    g.add_argument("--dFMin", "--dfmin", dest="dfmin", type=float, default=5000.0, help="smallest defocus searched, A")
    g.add_argument("--dFMax", "--dfmax", dest="dfmax", type=float, default=50000.0, help="largest defocus searched, A")
    g.add_argument("--FStep", "--dfstep", dest="dfstep", type=float, default=500.0, help="defocus search step, A")
    g.add_argument("--max_astig", type=float, default=2000.0, help="largest astigmatism searched, A (default 2000)")
    g.add_argument("--do_phaseshift", action="store_true", help="also fit a phase shift (phase plate)")
    g.add_argument("--phase_min", type=float, default=0.0)
    g.add_argument("--phase_max", type=float, default=180.0)
    g.add_argument("--phase_step", type=float, default=10.0)
    g.add_argument("--use_noDW", action=argparse.BooleanOptionalAction, default=True, help="fit the non-dose-weighted sums when listed")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from autospa.jobs.ctffind import CtffindParams, run_ctffind

    params = CtffindParams(
        input_star=args.i,
        output_dir=args.o,
        box=args.box,
        resmin=args.resmin,
        resmax=args.resmax,
        dfmin=args.dfmin,
        dfmax=args.dfmax,
        dfstep=args.dfstep,
        max_astigmatism=args.max_astig,
        do_phaseshift=args.do_phaseshift,
        phase_min=args.phase_min,
        phase_max=args.phase_max,
        phase_step=args.phase_step,
        use_noDW=args.use_noDW,
        device=args.device,
    )
    return run_job(args, lambda client: run_ctffind(params, client=client, continue_=args.continue_), "ctffind")
