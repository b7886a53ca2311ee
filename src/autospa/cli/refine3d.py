"""``autospa refine3d``: gold-standard 3D auto-refinement (relion_refine --auto_refine
--split_random_halves) and post-processing of its half maps, RELION's option names.

Example::

    autospa refine3d --i particles.star --ref initial_model.mrc --o Refine3D/job001/run --sym D2 \\
        --particle_diameter 150 --ini_high 40 --j 2
    autospa refine3d --o Refine3D/job001/run --continue     # resume after an interruption

Writes run_class001.mrc, run_half1_class001_unfil.mrc, run_half2_class001_unfil.mrc,
run_model.star, run_data.star (and the run_itNNN files), then postprocess.mrc,
postprocess_masked.mrc and postprocess.star (rlnFinalResolution) with an automatic solvent mask.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from autospa.cli.class2d import progress_bar
from autospa.cli.common import add_cluster_arguments, client_from_args
from autospa.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("refine3d", help="gold-standard 3D auto-refinement + post-processing (RELION's Refine3D)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--i", dest="input", default=None, metavar="STAR|ZARR", help="particles.star (+ MRCS) or a particle store")
    p.add_argument("--ref", default=None, metavar="MAP", help="initial reference map (MRC)")
    p.add_argument("--o", dest="output", default=None, metavar="DIR/run", help="output root (RELION: Refine3D/jobNNN/run)")
    p.add_argument("--sym", default="C1", help="point group imposed on the reconstructions (default C1)")
    p.add_argument("--particle_diameter", type=float, default=None, metavar="A", help="mask diameter in Angstrom (default 75%% of the box)")
    p.add_argument("--ini_high", type=float, default=40.0, metavar="A", help="low-pass the reference to this resolution first (default 40)")
    p.add_argument("--healpix_order", type=int, default=2, help="initial coarse HEALPix order (2: 15 deg coarse, 7.5 fine)")
    p.add_argument("--max_healpix_order", type=int, default=4, help="finest coarse order of the auto-sampling (default 4)")
    p.add_argument("--auto_local_healpix_order", type=int, default=3,
                   help="local searches from this order on (RELION's option; default 3, RELION's 4)")
    p.add_argument("--maxsig", type=int, default=500, help="at most this many significant coarse hypotheses per particle "
                   "in global searches (default 500; 0: no cap)")
    p.add_argument("--offset_range", type=float, default=5.0, help="translation search range in pixels (default 5)")
    p.add_argument("--offset_step", type=float, default=2.0, help="coarse translation step in pixels (default 2; fine 1)")
    p.add_argument("--iter", dest="max_iter", type=int, default=25, help="iteration limit (default 25)")
    p.add_argument("--tau2_fudge", type=float, default=1.0, help="regularisation T (default 1)")
    p.add_argument("--ctf", dest="ctf", action="store_true", default=True,
                   help="CTF correction (default on when the particles have defocus values)")
    p.add_argument("--no_ctf", dest="ctf", action="store_false", help="no CTF correction")
    p.add_argument("--no_zero_mask", dest="zero_mask", action="store_false", default=True, help="do not mask the particles")
    p.add_argument("--dont_check_norm", dest="check_norm", action="store_false", default=True,
                   help="skip RELION's check that the particles are normalised (background mean 0, std 1)")
    p.add_argument("--pad", type=int, default=2, help="padding factor (default 2)")
    p.add_argument("--random_seed", type=int, default=1, help="random seed of the half-set split (default 1)")
    p.add_argument("--torch_threads", type=int, default=0, help="torch threads per task (default: cores / workers)")
    p.add_argument("--continue", dest="continue_", action="store_true", help="resume the run at --o from its checkpoint")
    add_cluster_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from autospa.jobs.refine3d import Refine3DOptions, check_input, run_refine3d

    if args.output is None:
        raise InputError(None, "--o is required (the output root, e.g. Refine3D/job001/run)")
    if not args.continue_:
        if args.input is None:
            raise InputError(None, "--i is required (a particles.star or a particle store), unless --continue")
        if args.ref is None:
            raise InputError(None, "--ref is required (the initial map), unless --continue")
    device = "cuda" if args.gpu is not None else "cpu"
    opts = Refine3DOptions(
        input=str(args.input) if args.input else "", output=args.output, reference=str(args.ref) if args.ref else "",
        symmetry=args.sym, particle_diameter_a=args.particle_diameter, ini_high=args.ini_high,
        healpix_order=args.healpix_order, max_healpix_order=max(args.healpix_order, args.max_healpix_order),
        auto_local_healpix_order=args.auto_local_healpix_order, maxsig=args.maxsig,
        offset_range_px=args.offset_range, offset_step_px=args.offset_step, max_iter=args.max_iter,
        tau2_fudge=args.tau2_fudge, ctf=args.ctf, zero_mask=args.zero_mask, check_norm=args.check_norm, pad=args.pad, random_seed=args.random_seed,
        device=device, torch_threads=args.torch_threads,
        command_line="autospa " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )
    if opts.torch_threads == 0 and args.scheduler_address is None and device == "cpu":
        opts.torch_threads = max(1, (os.cpu_count() or 1) // (args.j or 1))
    check_input(opts, args.continue_)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    progress, close = progress_bar("refine3d")
    try:
        with client_from_args(args) as client:
            result = run_refine3d(opts, client=client, continue_=args.continue_, progress=progress)
    finally:
        close()
    print(f"refine3d finished after {result['iteration']} iterations: {result['root']}_class001.mrc; "
          f"gold-standard resolution {result['resolution_a']:.2f} A, post-processed {result['final_resolution_a']:.2f} A")
    return 0
