"""``autospa class2d``: 2D classification with EM or VDAM (relion_refine's options).

Example::

    autospa class2d --i particles.star --o Class2D/job001/run --K 12 --grad --iter 100 \\
        --particle_diameter 150 --ctf --j 2
    autospa class2d --o Class2D/job001/run --continue      # resume after an interruption
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from autospa.cli.common import add_cluster_arguments, client_from_args
from autospa.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("class2d", help="2D classification (EM or VDAM), RELION's outputs",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--i", dest="input", default=None, metavar="STAR|ZARR", help="particles.star (+ MRCS) or a particle store")
    p.add_argument("--o", dest="output", default=None, metavar="DIR/run", help="output root (RELION: Class2D/jobNNN/run)")
    p.add_argument("--K", type=int, default=1, help="number of classes (default 1)")
    p.add_argument("--iter", type=int, default=None, help="iterations (default 25 for EM, 200 mini-batches for VDAM)")
    alg = p.add_mutually_exclusive_group()
    alg.add_argument("--grad", action="store_true", help="VDAM gradient optimisation (RELION 4.0)")
    alg.add_argument("--em", action="store_true", help="expectation-maximisation (the default)")
    p.add_argument("--particle_diameter", type=float, default=None, metavar="A", help="mask diameter in Angstrom (default 75%% of the box)")
    p.add_argument("--tau2_fudge", type=float, default=2.0, help="regularisation T (default 2)")
    p.add_argument("--psi_step", type=float, default=6.0, help="coarse in-plane step in degrees (fine pass: half; default 6)")
    p.add_argument("--offset_range", type=float, default=5.0, help="translation search range in pixels (default 5)")
    p.add_argument("--offset_step", type=float, default=1.0, help="coarse translation step in pixels (fine pass: half; default 1)")
    p.add_argument("--ctf", action="store_true", help="CTF correction")
    p.add_argument("--zero_mask", action="store_true", default=True, help="mask the particles' surroundings to the background mean (default on)")
    p.add_argument("--no_zero_mask", dest="zero_mask", action="store_false", help="do not mask the particles")
    p.add_argument("--dont_check_norm", dest="check_norm", action="store_false", default=True,
                   help="skip RELION's check that the particles are normalised (background mean 0, std 1)")
    p.add_argument("--center_classes", action="store_true", help="re-centre the class averages on their centre of mass")
    p.add_argument("--class_inactivity_threshold", type=float, default=0.1, help="VDAM inactive-class substitution threshold (default 0.1)")
    p.add_argument("--grad_write_iter", type=int, default=10, help="VDAM writes output every N mini-batches (default 10)")
    p.add_argument("--mu", type=float, default=0.9, help="VDAM averaging of noise and priors (default 0.9)")
    p.add_argument("--pad", type=int, default=2, help="padding factor (default 2)")
    p.add_argument("--random_seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--adaptive_fraction", type=float, default=0.999, help="probability mass kept by the coarse pass (default 0.999)")
    p.add_argument("--maxsig", type=int, default=0, help="cap on significant coarse hypotheses (default: 5K for VDAM, none for EM)")
    p.add_argument("--torch_threads", type=int, default=0, help="torch threads per task (default: cores / workers)")
    p.add_argument("--continue", dest="continue_", nargs="?", const=True, default=False, metavar="OPTIMISER_STAR",
                   help="resume the run at --o from its checkpoint (RELION's form --continue DIR/run_itNNN_optimiser.star also works)")
    add_cluster_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from autospa.jobs.class2d import Class2DOptions, check_input, run_class2d

    if isinstance(args.continue_, str):
        # RELION: --continue DIR/run_it025_optimiser.star [--o DIR/run_ct25]: resume DIR/run's checkpoint
        import re

        m = re.match(r"^(.*?)(_ct\d+)?_it\d{3,}_optimiser\.star$", args.continue_)
        if m is None:
            raise InputError(args.continue_, "--continue takes a run_itNNN_optimiser.star file")
        args.output = m.group(1)
        args.continue_ = True
    if args.output is None:
        raise InputError(None, "--o is required (the output root, e.g. Class2D/job001/run)")
    if args.input is None and not args.continue_:
        raise InputError(None, "--i is required (a particles.star or a particle store), unless --continue")
    if args.K < 1:
        raise InputError(args.input, f"--K must be at least 1 (got {args.K})")
    device = "cpu"
    if args.gpu is not None:
        device = "cuda"
    opts = Class2DOptions(
        input=str(args.input) if args.input else "",
        output=args.output,
        n_classes=args.K,
        n_iter=args.iter,
        grad=args.grad,
        particle_diameter_a=args.particle_diameter,
        tau2_fudge=args.tau2_fudge,
        psi_step_deg=args.psi_step,
        offset_range_px=args.offset_range,
        offset_step_px=args.offset_step,
        ctf=args.ctf,
        zero_mask=args.zero_mask,
        check_norm=args.check_norm,
        center_classes=args.center_classes,
        class_inactivity_threshold=args.class_inactivity_threshold,
        grad_write_iter=args.grad_write_iter,
        mu=args.mu,
        pad=args.pad,
        random_seed=args.random_seed,
        adaptive_fraction=args.adaptive_fraction,
        maxsig=args.maxsig,
        device=device,
        torch_threads=args.torch_threads,
        command_line="autospa " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )
    if opts.torch_threads == 0 and args.scheduler_address is None and device == "cpu":
        import os

        workers = args.j or 1
        opts.torch_threads = max(1, (os.cpu_count() or 1) // workers)
    check_input(opts, args.continue_)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    progress, close = progress_bar("class2d")
    try:
        with client_from_args(args) as client:
            result = run_class2d(opts, client=client, continue_=args.continue_, progress=progress)
    finally:
        close()
    root = result["root"]
    print(f"class2d finished at iteration {result['iteration']}: {root}_model.star" if root else "class2d: nothing to do")
    return 0


def progress_bar(label: str):
    """A rich progress bar with ETA on stderr (plain lines when stderr is not a terminal), fed
    with the jobs' :class:`~autospa.jobs.class2d.IterationInfo`."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    prog = Progress(TextColumn(label), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console,
                    disable=not console.is_terminal)
    tasks: dict = {}  # one bar per stage of the run
    prog.start()

    def update(info) -> None:
        text = f"res {info.resolution_a:.1f} A  pmax {info.average_pmax:.3f}"
        stage = getattr(info, "stage", None)
        if stage not in tasks:
            tasks[stage] = prog.add_task(label if stage is None else f"{label} {stage}", total=info.n_iter,
                                         completed=info.iteration - 1, info=text)
        prog.update(tasks[stage], completed=info.iteration, info=text)
        if not console.is_terminal:
            print(f"{'' if stage is None else stage + ' '}iteration {info.iteration}/{info.n_iter}: {info.n_particles} "
                  f"particles, {info.seconds:.1f} s, resolution {info.resolution_a:.1f} A, <pmax> {info.average_pmax:.3f}",
                  file=sys.stderr, flush=True)

    return update, prog.stop
