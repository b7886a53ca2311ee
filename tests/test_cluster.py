"""The cluster helper: a real LocalCluster, attaching to a running scheduler, the CLI options, the
GPU and SLURM paths (the SLURM job script as dask-jobqueue generates it)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil

import dask.array as da
import numpy as np
import pytest
from distributed import Client, LocalCluster

from autospa.cli.common import add_cluster_arguments, client_from_args, cluster_kwargs
from autospa.distributed.cluster import cuda_device_count, get_client, make_slurm_cluster, parse_gpus
from autospa.distributed.malloc import MALLOC_ENVIRONMENT, tune_malloc
from autospa.errors import DeviceError, InputError


def _uneven_sum(client: Client) -> tuple[float, float]:
    x = np.random.default_rng(0).normal(size=(1000, 30))
    d = da.from_array(x, chunks=((100, 300, 7, 593), (30,)))
    got = client.compute((d * d).sum(axis=1)).result()
    assert np.allclose(got, (x * x).sum(axis=1), rtol=1e-12)
    return float(got.sum()), float((x * x).sum())


def test_local_cluster_computes_and_shuts_down() -> None:
    with get_client(n_workers=1, threads_per_worker=2, processes=False, memory_limit="1GiB") as client:
        workers = client.scheduler_info()["workers"]
        assert len(workers) == 1
        (info,) = workers.values()
        assert info["nthreads"] == 2 and info["memory_limit"] == 2**30
        got, want = _uneven_sum(client)
        assert got == pytest.approx(want, rel=1e-12)
        assert client.dashboard_link.startswith("http://")
        cluster = client.cluster
    assert client.status == "closed" and cluster.status.name == "closed"


def test_default_local_cluster_uses_worker_processes() -> None:
    with get_client(n_workers=1, memory_limit="512MiB") as client:  # processes=True is the default
        (info,) = client.scheduler_info()["workers"].values()
        assert info["memory_limit"] == 512 * 2**20
        assert client.submit(os.getpid).result() != os.getpid()
        # worker processes keep freed E-step blocks (dask's default trims at 64 kB)
        env = client.run(lambda: {k: os.environ.get(k) for k in MALLOC_ENVIRONMENT})
        assert list(env.values()) == [MALLOC_ENVIRONMENT]
        _uneven_sum(client)


def test_workers_get_the_malloc_settings_after_a_default_dask_cluster(monkeypatch) -> None:
    # a default dask cluster earlier in the process leaves dask's trim threshold in os.environ
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    with get_client(n_workers=1, memory_limit="512MiB") as client:
        env = client.run(lambda: {k: os.environ.get(k) for k in MALLOC_ENVIRONMENT})
        assert list(env.values()) == [MALLOC_ENVIRONMENT]
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "65536"


def test_tune_malloc_applies_on_glibc() -> None:
    import platform

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert tune_malloc() is True


def test_attach_to_a_running_scheduler_leaves_it_running() -> None:
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as running:
        with get_client(scheduler_address=running.scheduler_address) as client:
            _uneven_sum(client)
            assert client.scheduler.address == running.scheduler_address
        assert client.status == "closed"
        with Client(running) as again:  # the cluster we attached to is still up
            assert again.submit(sum, [1, 2, 3]).result() == 6


def test_unreachable_scheduler_is_an_input_error() -> None:
    with pytest.raises(InputError, match=r"cannot reach the dask scheduler at tcp://127\.0\.0\.1:1") as ei:
        with get_client(scheduler_address="tcp://127.0.0.1:1", connect_timeout="1s"):
            pass
    assert "\n" not in str(ei.value)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_cluster_arguments(p)
    return p.parse_args(argv)


def test_cli_options_map_onto_get_client(capsys: pytest.CaptureFixture) -> None:
    kw = cluster_kwargs(_parse([]))
    assert kw["scheduler_address"] is None and kw["gpus"] is None and kw["cluster"] == "local"
    assert kw["n_workers"] is None and kw["memory_limit"] == "auto"
    kw = cluster_kwargs(
        _parse(
            ["--j", "3", "--gpu", "0:2", "--cluster", "slurm", "--slurm-queue", "gpu", "--slurm-gpus-per-job", "1",
             "--slurm-jobs", "4", "--slurm-memory", "64GB", "--slurm-walltime", "1:00:00", "--slurm-account", "lab"]
        )
    )
    assert kw["n_workers"] == 3 and parse_gpus(kw["gpus"]) == [0, 2]
    assert (kw["slurm_queue"], kw["slurm_gpus_per_job"], kw["slurm_jobs"], kw["slurm_memory"]) == ("gpu", 1, 4, "64GB")
    assert (kw["slurm_walltime"], kw["slurm_account"]) == ("1:00:00", "lab")
    assert parse_gpus(_parse(["--gpu"]).gpu) == []  # all visible devices
    # the context manager the subcommands use: attach, compute, print the dashboard address
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as running:
        with client_from_args(_parse(["--scheduler-address", running.scheduler_address])) as client:
            _uneven_sum(client)
        port = re.search(r":(\d+)/status", running.dashboard_link).group(1)
        err = capsys.readouterr().err
        assert re.fullmatch(rf"dask dashboard: http://\S+:{port}/status\n", err), err


def test_parse_gpus() -> None:
    assert parse_gpus(None) is None
    assert parse_gpus("all") == [] and parse_gpus("") == []
    assert parse_gpus(2) == [0, 1]
    assert parse_gpus("0,3") == [0, 3] and parse_gpus("1:2") == [1, 2] and parse_gpus([4]) == [4]
    for bad in ("a,b", "-1", 0):
        with pytest.raises(InputError):
            parse_gpus(bad)


@pytest.mark.skipif(cuda_device_count() > 0, reason="this machine has CUDA")
def test_gpus_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(DeviceError, match="CUDA is not available"):
        with get_client(gpus="all", processes=False):
            pass


def test_bad_cluster_requests() -> None:
    with pytest.raises(InputError, match="unknown cluster kind 'pbs'"):
        with get_client(cluster="pbs"):
            pass
    with pytest.raises(InputError, match="at least one worker"):
        with get_client(n_workers=0):
            pass
    with pytest.raises(InputError, match="--slurm-gpus-per-job"):
        with get_client(cluster="slurm", gpus="0"):
            pass


@pytest.mark.skipif(shutil.which("sbatch") is not None, reason="this machine has SLURM")
def test_slurm_without_sbatch_is_a_clear_error() -> None:
    with pytest.raises(InputError, match="sbatch is not on the PATH"):
        with get_client(cluster="slurm", slurm_queue="cpu"):
            pass


def _sbatch(script: str) -> set[str]:
    return {line.removeprefix("#SBATCH ").strip() for line in script.splitlines() if line.startswith("#SBATCH")}


def _worker_command(script: str) -> str:
    (line,) = [s for s in script.splitlines() if s.strip() and not s.startswith("#")]
    return line


@pytest.mark.skipif(importlib.util.find_spec("dask_jobqueue") is None, reason="dask-jobqueue not installed")
def test_slurm_job_script_gpu_jobs() -> None:
    clu = make_slurm_cluster(
        queue="gpu",
        cores=8,
        memory="32GB",
        gpus_per_job=2,
        walltime="02:00:00",
        account="lab",
        job_extra=["--constraint=a100"],
        scheduler_options={"host": "127.0.0.1"},
    )
    try:
        script = clu.job_script()
        assert clu.scheduler_address.startswith("tcp://127.0.0.1:")
    finally:
        clu.close()
    assert script.startswith("#!/usr/bin/env bash")
    directives = _sbatch(script)
    for d in ("-p gpu", "-A lab", "-n 1", "--cpus-per-task=8", "-t 02:00:00", "--gres=gpu:2", "--constraint=a100"):
        assert d in directives, (d, directives)
    mem = [d for d in directives if d.startswith("--mem=")]
    assert mem == ["--mem=30G"]  # 32 GB = 29.8 GiB, which dask-jobqueue rounds to whole GiB
    cmd = _worker_command(script)
    assert clu.scheduler_address in cmd
    assert re.search(r"--nworkers 2\b", cmd) and re.search(r"--nthreads 4\b", cmd)  # one worker per GPU
    assert "--resources GPU=1" in cmd


@pytest.mark.skipif(importlib.util.find_spec("dask_jobqueue") is None, reason="dask-jobqueue not installed")
def test_slurm_job_script_cpu_jobs() -> None:
    clu = make_slurm_cluster(queue="cpu", cores=6, memory="12GB", scheduler_options={"host": "127.0.0.1"})
    try:
        script = clu.job_script()
    finally:
        clu.close()
    directives = _sbatch(script)
    assert {"-p cpu", "--cpus-per-task=6", "-t 24:00:00"} <= directives
    assert not any(d.startswith("--gres") or d.startswith("-A ") for d in directives)
    cmd = _worker_command(script)
    assert re.search(r"--nworkers 6\b", cmd) and re.search(r"--nthreads 1\b", cmd)  # one thread per worker process
    assert "--resources" not in cmd
    limit = re.search(r"--memory-limit (\S+)", cmd).group(1)
    assert limit == "1.86GiB"  # 12 GB split over 6 workers


def _gpu_task() -> tuple[str, str, float]:
    import torch

    x = torch.arange(12.0, device="cuda").reshape(3, 4)
    return os.environ.get("CUDA_VISIBLE_DEVICES", ""), torch.cuda.get_device_name(0), float((x @ x.T).trace())


@pytest.mark.gpu
@pytest.mark.skipif(cuda_device_count() == 0 or importlib.util.find_spec("dask_cuda") is None, reason="needs CUDA and dask-cuda")
def test_local_cuda_cluster_one_worker_per_gpu() -> None:
    n = cuda_device_count()
    with get_client(gpus="all") as client:
        workers = client.scheduler_info()["workers"]
        assert len(workers) == n
        visible, name, value = client.submit(_gpu_task, pure=False).result()
        assert value == pytest.approx(float(sum(i * i for i in range(12))))  # trace(x x^T) = sum of squares
        assert visible.split(",")[0] in {str(i) for i in range(n)} and name
    with pytest.raises(DeviceError, match=f"GPU {n} requested but this machine has {n}"):
        with get_client(gpus=str(n)):
            pass
