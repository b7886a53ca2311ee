"""Arguments shared by subcommands: the dask cluster (--j, --gpu, --scheduler-address, SLURM).

Usage in a subcommand module::

    def register(subparsers):
        p = subparsers.add_parser("class2d", ...)
        add_cluster_arguments(p)
        p.set_defaults(func=run)

    def run(args):
        with client_from_args(args) as client:     # prints the dashboard address to stderr
            ...                                    # client: a connected distributed.Client

Options: ``--j N`` (local worker processes), ``--memory-limit`` (per local worker),
``--gpu [IDS]`` (one dask-cuda worker per local GPU), ``--scheduler-address tcp://host:8786``
(attach to a running cluster), ``--cluster slurm`` with ``--slurm-queue/-cores/-memory/
-gpus-per-job/-jobs/-walltime/-account`` (dask-jobqueue's SLURMCluster).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator

from autospa.distributed.cluster import CLUSTER_KINDS, dashboard_link, get_client


def add_cluster_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the cluster options to a subcommand's parser; read them back with :func:`cluster_kwargs`."""
    g = parser.add_argument_group("compute cluster (dask)")
    g.add_argument("--j", type=int, default=None, metavar="N", help="number of local worker processes (default: from the CPU count)")
    g.add_argument("--memory-limit", default="auto", metavar="MEM", help="memory limit per local worker, e.g. 4GB (default auto: machine memory / workers)")
    g.add_argument(
        "--gpu",
        "--gpus",
        dest="gpu",
        nargs="?",
        const="all",
        default=None,
        metavar="IDS",
        help="run on local GPUs, one worker per device: --gpu (all), --gpu 0,1 or RELION's --gpu 0:1",
    )
    g.add_argument("--scheduler-address", default=None, metavar="ADDR", help="attach to a running dask scheduler (tcp://host:8786)")
    g.add_argument("--cluster", choices=CLUSTER_KINDS, default="local", help="where workers run (default: local)")
    g.add_argument("--slurm-queue", default=None, metavar="PARTITION", help="SLURM partition for worker jobs")
    g.add_argument("--slurm-cores", type=int, default=4, metavar="N", help="cores per SLURM job (default 4)")
    g.add_argument("--slurm-memory", default="16GB", metavar="MEM", help="memory per SLURM job (default 16GB)")
    g.add_argument("--slurm-gpus-per-job", type=int, default=0, metavar="N", help="GPUs per SLURM job (--gres=gpu:N; default 0)")
    g.add_argument("--slurm-jobs", type=int, default=1, metavar="N", help="number of SLURM worker jobs (default 1)")
    g.add_argument("--slurm-walltime", default="24:00:00", metavar="T", help="time limit per SLURM job (default 24:00:00)")
    g.add_argument("--slurm-account", default=None, metavar="ACCOUNT", help="SLURM account to charge")
    return g


def cluster_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of :func:`autospa.distributed.cluster.get_client` from parsed options."""
    return {
        "scheduler_address": args.scheduler_address,
        "n_workers": args.j,
        "memory_limit": args.memory_limit,
        "gpus": args.gpu,
        "cluster": args.cluster,
        "slurm_queue": args.slurm_queue,
        "slurm_cores": args.slurm_cores,
        "slurm_memory": args.slurm_memory,
        "slurm_gpus_per_job": args.slurm_gpus_per_job,
        "slurm_jobs": args.slurm_jobs,
        "slurm_walltime": args.slurm_walltime,
        "slurm_account": args.slurm_account,
    }


@contextlib.contextmanager
def client_from_args(args: argparse.Namespace) -> Iterator:
    """Start the cluster the options ask for, print its dashboard address, yield the client."""
    with get_client(**cluster_kwargs(args)) as client:
        link = dashboard_link(client)
        if link:
            print(f"dask dashboard: {link}", file=sys.stderr)
        yield client


__all__ = ["add_cluster_arguments", "client_from_args", "cluster_kwargs"]
