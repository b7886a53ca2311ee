"""Options and the run wrapper shared by the preprocessing subcommands (motioncorr, ctffind,
autopick, extract); not a subcommand itself.

Every preprocessing subcommand takes RELION's ``--o``, ``--only_do_unfinished`` (alias
``--continue``: process only the micrographs the job has not seen yet), ``--pipeline_control``
(write ``RELION_JOB_EXIT_SUCCESS`` / ``_FAILURE`` there), ``--device`` (torch device of each task)
and the cluster options of :mod:`autospa.cli.common`. Without any cluster option the per-micrograph
tasks run on dask's threaded scheduler in this process; ``--j N`` (or a scheduler address,
``--gpu``, ``--cluster slurm``) starts or attaches to a dask cluster.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from autospa.cli.common import add_cluster_arguments, client_from_args
from autospa.errors import AutospaError
from autospa.io.job_control import clear_job_exit_status, write_job_exit_status


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --o, --only_do_unfinished/--continue, --pipeline_control, --device and the cluster options."""
    parser.add_argument("--o", required=True, metavar="DIR", help="output (job) directory")
    parser.add_argument(
        "--only_do_unfinished",
        "--continue",
        dest="continue_",
        action="store_true",
        help="process only micrographs not yet in this job's output STAR file (streaming)",
    )
    parser.add_argument("--pipeline_control", metavar="DIR", help="write RELION_JOB_EXIT_SUCCESS / _FAILURE to DIR")
    parser.add_argument("--device", default="cpu", help="torch device of each task: cpu, cuda, cuda:1 (default cpu)")
    add_cluster_arguments(parser)


def _wants_cluster(args: argparse.Namespace) -> bool:
    return bool(args.j or args.gpu or args.scheduler_address or (args.cluster and args.cluster != "local"))


def run_job(args: argparse.Namespace, work: Callable[[object], Path], what: str) -> int:
    """Run ``work(client)`` with the requested dask client, handle RELION's exit markers and print
    the output file; returns the exit code (errors propagate to the dispatcher as AutospaError)."""
    control = Path(args.pipeline_control) if args.pipeline_control else None
    if control is not None:
        clear_job_exit_status(control)
    try:
        if _wants_cluster(args):
            with client_from_args(args) as client:
                out = work(client)
        else:
            out = work(None)
    except AutospaError:
        if control is not None:
            write_job_exit_status(control, success=False)
        raise
    if control is not None:
        write_job_exit_status(control, success=True)
    print(f"{what}: wrote {out}")
    return 0


__all__ = ["add_job_arguments", "run_job"]
