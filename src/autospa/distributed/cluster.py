"""Dask clusters: local processes, local GPUs (dask-cuda), SLURM (dask-jobqueue), or an existing one.

The only module that creates dask clusters. ``get_client`` is a context manager that starts the
cluster, yields a connected :class:`distributed.Client` and shuts everything it started down on
exit (attaching to ``scheduler_address`` leaves that cluster running).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence

import dask
from distributed import Client, LocalCluster

from autospa.distributed.malloc import MALLOC_ENVIRONMENT
from autospa.errors import DeviceError, InputError

log = logging.getLogger(__name__)

CLUSTER_KINDS = ("local", "slurm")

#: dask's own ``MALLOC_TRIM_THRESHOLD_``; its nanny copies its spawn environment into this
#: process's ``os.environ`` and lets ``os.environ`` override the configuration, so after one
#: default dask cluster in a process every later one would inherit it.
DASK_TRIM_DEFAULT = "65536"


def _left_to_us(value) -> bool:
    """A malloc setting nobody chose: unset, or dask's default (see :data:`DASK_TRIM_DEFAULT`)."""
    return value is None or str(value) == DASK_TRIM_DEFAULT


def worker_environment() -> dict[str, str]:
    """Environment of spawned worker processes: dask's ``pre-spawn-environ`` with
    :data:`MALLOC_ENVIRONMENT` over it (a user's dask configuration of these names wins)."""
    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    env.update({k: v for k, v in MALLOC_ENVIRONMENT.items() if _left_to_us(env.get(k))})
    return env


@contextlib.contextmanager
def _worker_malloc_environment() -> Iterator[None]:
    """Workers started inside get :func:`worker_environment`: the dask configuration, and this
    process's environment for names it lacks or holds dask's default in (a value a user exported
    is kept, as dask keeps it)."""
    env = worker_environment()
    saved = {k: os.environ.get(k) for k in MALLOC_ENVIRONMENT}
    os.environ.update({k: env[k] for k, v in saved.items() if _left_to_us(v)})
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": env}):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def parse_gpus(gpus: int | str | Sequence[int] | None) -> list[int] | None:
    """Normalise a GPU request to a list of device ids (``None``: no GPUs; ``[]``: all visible).

    Accepts an int N (the first N devices), ``"all"`` / ``""`` (all), ``"0,1"`` or RELION's
    ``"0:1"``, or a sequence of ints.
    """
    if gpus is None or gpus is False:
        return None
    if isinstance(gpus, bool):
        return []
    if isinstance(gpus, int):
        if gpus < 1:
            raise InputError(None, f"gpus={gpus}: ask for at least one GPU")
        return list(range(gpus))
    if isinstance(gpus, str):
        s = gpus.strip().lower()
        if s in ("", "all", "auto"):
            return []
        parts = [p for p in s.replace(":", ",").split(",") if p.strip()]
        try:
            ids = [int(p) for p in parts]
        except ValueError as exc:
            raise InputError(None, f"--gpu {gpus!r}: expected device ids like 0,1 or 0:1") from exc
        if any(i < 0 for i in ids):
            raise InputError(None, f"--gpu {gpus!r}: device ids are >= 0")
        return ids
    return [int(g) for g in gpus]


def cuda_device_count() -> int:
    """Number of CUDA devices torch sees (0 without CUDA)."""
    try:
        import torch

        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:  # a broken CUDA install counts as no CUDA
        return 0


@contextlib.contextmanager
def get_client(
    scheduler_address: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    memory_limit: str | float | int | None = "auto",
    gpus: int | str | Sequence[int] | None = None,
    cluster: str | None = None,
    slurm_queue: str | None = None,
    slurm_cores: int = 4,
    slurm_memory: str = "16GB",
    slurm_gpus_per_job: int = 0,
    slurm_jobs: int = 1,
    slurm_walltime: str = "24:00:00",
    slurm_account: str | None = None,
    slurm_job_extra: Sequence[str] = (),
    processes: bool = True,
    dashboard_address: str | None = ":0",
    connect_timeout: str = "20s",
) -> Iterator[Client]:
    """Start (or attach to) a dask cluster and yield a client.

    Parameters
    ----------
    scheduler_address
        Attach to a running scheduler (``tcp://host:8786``); nothing is started or stopped.
    n_workers
        Worker processes of a local cluster (default: dask's choice from the CPU count).
    threads_per_worker
        Threads per worker (1 suits torch tasks, which use their own threads).
    memory_limit
        Per-worker memory limit of local workers (``"auto"``: machine memory / workers).
    gpus
        Local GPUs: one dask-cuda worker per device (see :func:`parse_gpus`).
    cluster
        ``None`` / ``"local"`` (LocalCluster or LocalCUDACluster) or ``"slurm"`` (SLURMCluster).
    slurm_queue, slurm_cores, slurm_memory, slurm_gpus_per_job, slurm_jobs, slurm_walltime, slurm_account
        SLURM partition, cores and memory per job, GPUs per job (``--gres=gpu:N``; one worker
        process per GPU), number of jobs, time limit and account.
    slurm_job_extra
        Further ``#SBATCH`` directives.
    processes
        Local workers as processes (True) or threads of this process (False).
    dashboard_address
        Dashboard address of a started scheduler (``":0"``: a free port; ``None``: none).
    connect_timeout
        How long to try reaching ``scheduler_address``.

    Yields
    ------
    distributed.Client

    Raises
    ------
    DeviceError
        GPUs requested where CUDA or dask-cuda is missing, or more GPUs than exist.
    InputError
        Unreachable scheduler, unknown cluster kind, dask-jobqueue missing for SLURM.
    """
    kind = (cluster or "local").lower()
    if kind not in CLUSTER_KINDS:
        raise InputError(None, f"unknown cluster kind {cluster!r} (choose {', '.join(CLUSTER_KINDS)})")
    if n_workers is not None and int(n_workers) < 1:
        raise InputError(None, f"--j {n_workers}: ask for at least one worker")
    if scheduler_address:
        try:
            client = Client(scheduler_address, timeout=connect_timeout)
        except Exception as exc:  # OSError, TimeoutError, ...
            detail = " ".join(str(exc).split())
            raise InputError(None, f"cannot reach the dask scheduler at {scheduler_address}: {detail}") from exc
        log.info("attached to dask scheduler %s (dashboard %s)", scheduler_address, dashboard_link(client))
        try:
            yield client
        finally:
            client.close()
        return

    with _start_cluster(
        kind,
        n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        memory_limit=memory_limit,
        gpus=gpus,
        slurm_queue=slurm_queue,
        slurm_cores=slurm_cores,
        slurm_memory=slurm_memory,
        slurm_gpus_per_job=slurm_gpus_per_job,
        slurm_jobs=slurm_jobs,
        slurm_walltime=slurm_walltime,
        slurm_account=slurm_account,
        slurm_job_extra=slurm_job_extra,
        processes=processes,
        dashboard_address=dashboard_address,
    ) as clu:
        with Client(clu) as client:
            log.info("dask cluster %s; dashboard %s", type(clu).__name__, dashboard_link(client))
            yield client


def dashboard_link(client: Client) -> str | None:
    """The dashboard URL of the client's scheduler (``None`` when it has none)."""
    try:
        return client.dashboard_link
    except Exception:
        return None


def make_slurm_cluster(
    queue: str | None = None,
    cores: int = 4,
    memory: str = "16GB",
    gpus_per_job: int = 0,
    walltime: str = "24:00:00",
    account: str | None = None,
    job_extra: Sequence[str] = (),
    threads_per_worker: int = 1,
    dashboard_address: str | None = ":0",
    scheduler_options: Mapping | None = None,
):
    """A ``dask_jobqueue.SLURMCluster`` (no jobs submitted yet; call ``scale(jobs=N)``).

    The scheduler runs in this process and listens on this machine's default interface, which the
    worker jobs must reach (``scheduler_options={"interface": "ib0"}`` picks another);
    ``cluster.job_script()`` shows the batch script each job runs.

    With ``gpus_per_job`` > 0 each job asks for ``--gres=gpu:N`` and runs N worker processes,
    each advertising the dask resource ``GPU=1``. SLURM restricts the job to its N devices
    (``CUDA_VISIBLE_DEVICES``); with N = 1 every worker owns one GPU, which is the simplest
    layout (scale with more jobs). With N > 1 the N workers of a job see the same N devices and
    tasks must choose one (e.g. by worker name).
    """
    if importlib.util.find_spec("dask_jobqueue") is None:
        raise InputError(None, "cluster 'slurm' needs dask-jobqueue: pip install 'autospa[slurm]'")
    from dask_jobqueue import SLURMCluster

    directives = list(job_extra)
    kwargs: dict = {}
    if gpus_per_job > 0:
        directives.append(f"--gres=gpu:{gpus_per_job}")
        processes = gpus_per_job
        kwargs["worker_extra_args"] = ["--resources", "GPU=1"]
    else:
        processes = max(1, cores // max(1, threads_per_worker))
    sched = {"dashboard_address": dashboard_address} if dashboard_address else {}
    sched.update(scheduler_options or {})
    return SLURMCluster(
        queue=queue,
        account=account,
        cores=cores,
        processes=processes,
        memory=memory,
        walltime=walltime,
        job_extra_directives=directives,
        scheduler_options=sched,
        **kwargs,
    )


@contextlib.contextmanager
def _start_cluster(kind: str, **kw) -> Iterator:
    gpu_ids = parse_gpus(kw["gpus"])
    if kind == "slurm":
        if gpu_ids is not None:
            raise InputError(None, "--gpu starts local GPU workers; with --cluster slurm ask for GPUs per job instead (--slurm-gpus-per-job)")
        if shutil.which("sbatch") is None:
            raise InputError(None, "cluster 'slurm': sbatch is not on the PATH (run on a SLURM submit host)")
        if int(kw["slurm_jobs"]) < 1:
            raise InputError(None, f"cluster 'slurm': ask for at least one job, not {kw['slurm_jobs']}")
        clu = make_slurm_cluster(
            queue=kw["slurm_queue"],
            cores=kw["slurm_cores"],
            memory=kw["slurm_memory"],
            gpus_per_job=kw["slurm_gpus_per_job"],
            walltime=kw["slurm_walltime"],
            account=kw["slurm_account"],
            job_extra=kw["slurm_job_extra"],
            threads_per_worker=kw["threads_per_worker"],
            dashboard_address=kw["dashboard_address"],
        )
        try:
            clu.scale(jobs=int(kw["slurm_jobs"]))
            yield clu
        finally:
            clu.close()
        return
    with _worker_malloc_environment():
        if gpu_ids is not None:
            clu = _local_cuda_cluster(gpu_ids, kw)
        else:
            clu = LocalCluster(
                n_workers=kw["n_workers"],
                threads_per_worker=kw["threads_per_worker"],
                processes=kw["processes"],
                memory_limit=kw["memory_limit"],
                dashboard_address=kw["dashboard_address"],
            )
    try:
        yield clu
    finally:
        clu.close()


def _local_cuda_cluster(gpu_ids: list[int], kw: dict):
    n = cuda_device_count()
    if n == 0:
        raise DeviceError("GPUs were requested (--gpu) but CUDA is not available on this machine; run without --gpu")
    if importlib.util.find_spec("dask_cuda") is None:
        raise DeviceError("GPUs were requested (--gpu) but dask-cuda is not installed: pip install 'autospa[gpu]'")
    ids = gpu_ids or list(range(n))
    if max(ids) >= n:
        raise DeviceError(f"GPU {max(ids)} requested but this machine has {n} (ids 0..{n - 1})")
    try:
        from dask_cuda import LocalCUDACluster

        return LocalCUDACluster(
            CUDA_VISIBLE_DEVICES=",".join(str(i) for i in ids),
            threads_per_worker=kw["threads_per_worker"],
            memory_limit=kw["memory_limit"],
            dashboard_address=kw["dashboard_address"],
        )
    except Exception as exc:
        raise DeviceError(f"could not start GPU workers on devices {ids}: {type(exc).__name__}: {exc}") from exc


__all__ = ["CLUSTER_KINDS", "cuda_device_count", "dashboard_link", "get_client", "make_slurm_cluster", "parse_gpus"]
