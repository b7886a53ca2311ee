"""``autospa extract``: particle extraction (job relion.extract): ``autospa extract --i
micrographs_ctf.star --coords AutoPick/job004/autopick.star --o Extract/job005 --extract_size 256
--scale 64`` writes particles.star, one MRCS stack per micrograph and the Zarr particle store
(particles.zarr). With ``--particle_diameter D`` and no --extract_size / --scale the box is
1.5 x D (FFT-friendly) and the particles are downscaled to 2.8-3.5 A/pixel.
"""

from __future__ import annotations

import argparse

from autospa.cli.preprocess_args import add_job_arguments, run_job


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``extract`` subcommand."""
    p = subparsers.add_parser("extract", help="extract particles into particles.star + MRCS + a Zarr store", description=__doc__)
    p.add_argument("--i", required=True, metavar="STAR", help="micrographs_ctf.star (its CTF values go to every particle)")
    p.add_argument(
        "--coords",
        "--coord_list",
        "--coord_dir",
        dest="coords",
        required=True,
        metavar="STAR",
        help="autopick.star (RELION 4), or RELION 3's coords_suffix_autopick.star or a folder of NAME_autopick.star / "
        "NAME_manualpick.star files mirroring the micrographs' paths",
    )
    add_job_arguments(p)
    g = p.add_argument_group("extraction (RELION's option names)")
    g.add_argument("--extract_size", type=int, default=0, help="box in micrograph pixels (default: 1.5 x --particle_diameter)")
    g.add_argument("--scale", type=int, default=None, help="downscale to this box (default: none; -1: 2.8-3.5 A/pixel)")
    g.add_argument("--particle_diameter", type=float, default=0.0, help="particle diameter, A (for the automatic sizes)")
    g.add_argument("--norm", action=argparse.BooleanOptionalAction, default=True, help="normalise the background (default yes)")
    g.add_argument("--bg_radius", type=float, default=-1.0, help="particle circle radius in output pixels (-1: 75%% of half the box)")
    g.add_argument("--invert_contrast", action=argparse.BooleanOptionalAction, default=True, help="white protein (default yes)")
    g.add_argument("--float16", action=argparse.BooleanOptionalAction, default=True, help="MRC mode 12 stacks, float16 store")
    g.add_argument("--minimum_pick_fom", type=float, default=None, help="skip picks with a lower rlnAutopickFigureOfMerit")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from autospa.jobs.extract import ExtractParams, run_extract

    scale = args.scale
    if scale is None:
        scale = -1 if args.extract_size <= 0 and args.particle_diameter > 0 else 0
    params = ExtractParams(
        mics_star=args.i,
        coords_star=args.coords,
        output_dir=args.o,
        extract_size=args.extract_size,
        rescale=scale,
        particle_diameter=args.particle_diameter,
        do_norm=args.norm,
        bg_diameter=2 * args.bg_radius if args.bg_radius > 0 else -1.0,
        do_invert=args.invert_contrast,
        float16=args.float16,
        minimum_pick_fom=args.minimum_pick_fom,
        device=args.device,
    )
    return run_job(args, lambda client: run_extract(params, client=client, continue_=args.continue_), "extract")
