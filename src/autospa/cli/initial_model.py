"""``autospa initial-model``: de-novo 3D initial model by VDAM (relion_refine --grad --denovo_3dref,
then relion_align_symmetry), RELION's option names.

Example::

    autospa initial-model --i particles.star --o InitialModel/job001/run --K 3 --sym C1 \\
        --particle_diameter 150 --j 2
    autospa initial-model --o InitialModel/job001/run --continue     # resume after an interruption

Writes DIR/initial_model.mrc (the most populated class, aligned to the axes of --sym and
symmetrised when --sym is not C1) beside RELION's run_itNNN files.
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
    p = subparsers.add_parser("initial-model", help="3D initial model by VDAM (RELION's InitialModel job)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--i", dest="input", default=None, metavar="STAR|ZARR", help="particles.star (+ MRCS) or a particle store")
    p.add_argument("--o", dest="output", default=None, metavar="DIR/run", help="output root (RELION: InitialModel/jobNNN/run)")
    p.add_argument("--K", type=int, default=3, help="number of classes (default 3)")
    p.add_argument("--iter", type=int, default=200, help="VDAM iterations (mini-batches; default 200)")
    p.add_argument("--sym", default="C1", help="point group of the final map (the run is in C1; default C1)")
    p.add_argument("--particle_diameter", type=float, default=None, metavar="A", help="mask diameter in Angstrom (default 75%% of the box)")
    p.add_argument("--tau2_fudge", type=float, default=4.0, help="final regularisation T (scheduled from 1; default 4)")
    p.add_argument("--healpix_order", type=int, default=1, help="initial coarse HEALPix order (1: 30 deg coarse, 15 fine)")
    p.add_argument("--max_healpix_order", type=int, default=2, help="finest coarse order of the auto-sampling (default 2)")
    p.add_argument("--offset_range", type=float, default=6.0, help="translation search range in pixels (default 6)")
    p.add_argument("--offset_step", type=float, default=2.0, help="coarse translation step in pixels (default 2)")
    p.add_argument("--ctf", dest="ctf", action="store_true", default=True,
                   help="CTF correction (default on when the particles have defocus values)")
    p.add_argument("--no_ctf", dest="ctf", action="store_false", help="no CTF correction")
    p.add_argument("--no_zero_mask", dest="zero_mask", action="store_false", default=True, help="do not mask the particles")
    p.add_argument("--dont_check_norm", dest="check_norm", action="store_false", default=True,
                   help="skip RELION's check that the particles are normalised (background mean 0, std 1)")
    p.add_argument("--grad_write_iter", type=int, default=10, help="write output every N iterations (default 10)")
    p.add_argument("--pad", type=int, default=1, help="padding factor (default 1, as RELION's initial model)")
    p.add_argument("--random_seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--maxsig", type=int, default=0, help="cap on significant coarse hypotheses (default 100 K)")
    p.add_argument("--final_em_iter", type=int, default=5,
                   help="gold-standard EM iterations on the largest class after VDAM (autospa; 0: RELION's VDAM map; default 5)")
    p.add_argument("--torch_threads", type=int, default=0, help="torch threads per task (default: cores / workers)")
    p.add_argument("--continue", dest="continue_", action="store_true", help="resume the run at --o from its checkpoint")
    add_cluster_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from autospa.jobs.initialmodel import InitialModelOptions, check_input, run_initial_model

    if args.output is None:
        raise InputError(None, "--o is required (the output root, e.g. InitialModel/job001/run)")
    if args.input is None and not args.continue_:
        raise InputError(None, "--i is required (a particles.star or a particle store), unless --continue")
    device = "cuda" if args.gpu is not None else "cpu"
    opts = InitialModelOptions(
        input=str(args.input) if args.input else "", output=args.output, n_classes=args.K, n_iter=args.iter,
        symmetry=args.sym, particle_diameter_a=args.particle_diameter, tau2_fudge=args.tau2_fudge,
        healpix_order=args.healpix_order, max_healpix_order=max(args.healpix_order, args.max_healpix_order),
        offset_range_px=args.offset_range, offset_step_px=args.offset_step, ctf=args.ctf, zero_mask=args.zero_mask, check_norm=args.check_norm,
        grad_write_iter=args.grad_write_iter, pad=args.pad, random_seed=args.random_seed, maxsig=args.maxsig,
        final_em_iter=args.final_em_iter, device=device, torch_threads=args.torch_threads,
        command_line="autospa " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )
    if opts.torch_threads == 0 and args.scheduler_address is None and device == "cpu":
        opts.torch_threads = max(1, (os.cpu_count() or 1) // (args.j or 1))
    check_input(opts, args.continue_)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    progress, close = progress_bar("initial-model")
    try:
        with client_from_args(args) as client:
            result = run_initial_model(opts, client=client, continue_=args.continue_, progress=progress)
    finally:
        close()
    print(f"initial-model finished at iteration {result['iteration']}: {result['initial_model']} "
          f"(class {result['class_index'] + 1})")
    return 0
