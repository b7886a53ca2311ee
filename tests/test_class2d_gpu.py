"""2D classification on a GPU: Zarr chunks onto the device, the map-reduce E-step on CUDA (in this
process and on a dask-cuda cluster) against the CPU's, and `autospa class2d --gpu` end to end
(skipped without CUDA)."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from autospa.distributed import map_reduce as mr
from autospa.distributed.cluster import cuda_device_count
from autospa.io.zarr_store import write_store
from autospa.jobs.class2d import circular_mask
from autospa.jobs.demo import score_against_truth, write_unaligned_set
from autospa.io.star import read_star
from autospa.refinement import estep as es
from autospa.refinement import init as rinit
from autospa.refinement import mstep
from autospa.simulate.particles import simulate_2d_classes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BOX, PIX = 64, 3.0
FAST = dict(psi_step_deg=12.0, offset_step_px=2.0)
HAS_DASK_CUDA = importlib.util.find_spec("dask_cuda") is not None


@pytest.fixture(scope="module")
def sim():
    return simulate_2d_classes(n=400, n_classes=3, box=BOX, pixel_size_a=PIX, snr=0.1, seed=3, shift_sigma_px=1.5,
                               max_shift_px=3.0, return_clean=True)


@pytest.fixture(scope="module")
def store(sim, tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu") / "p.zarr"
    n = len(sim.truth)
    meta = pd.DataFrame({"rlnOpticsGroup": np.ones(n, int), "rlnImageName": [f"{i + 1}@x.mrcs" for i in range(n)]})
    write_store(path, [sim.images.numpy()], meta, optics=sim.optics, chunk_size=64, dtype="float32")
    return path


def test_chunk_is_read_onto_the_gpu_and_cached_there(sim, store):
    mr.clear_chunk_cache()
    dev = torch.device("cuda")
    chunk = mr.load_chunk(str(store), 64, 128, dev)
    assert chunk.device.type == "cuda" and chunk.dtype == torch.float32 and chunk.shape == (64, BOX, BOX)
    assert torch.equal(chunk.cpu(), sim.images[64:128].float())
    assert mr.load_chunk(str(store), 64, 128, dev) is chunk  # the second read is the cached device tensor
    if importlib.util.find_spec("cupy") is not None:
        import cupy

        host = np.random.default_rng(0).standard_normal((3, 8, 8)).astype(np.float32)
        on_gpu = mr._to_device(host, dev)
        view = cupy.from_dlpack(on_gpu)  # DLPack both ways: the same device memory, no copy
        assert view.data.ptr == on_gpu.data_ptr()
        assert np.array_equal(cupy.asnumpy(view), host)
    mr.clear_chunk_cache()


@pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="needs cupy (the gpu extra)")
def test_store_as_a_dask_array_with_cupy_meta(sim, store):
    """The store's images as dask-cuda users expect them: a dask array with cupy meta whose
    blocks are cupy arrays on the GPU, equal to the CPU's; a block goes to torch through DLPack
    without a copy, and a map task's chunk is that same block."""
    import cupy
    import dask.array as da

    from autospa.io.zarr_store import open_store

    stack = open_store(store)
    arr = stack.gpu_images()
    assert isinstance(arr, da.Array) and isinstance(arr._meta, cupy.ndarray)
    assert arr.dtype == np.float32 and arr.shape == (len(sim.truth), BOX, BOX)
    assert arr.chunks[0] == stack.images.chunks[0]
    block = arr.blocks[1].compute()
    assert isinstance(block, cupy.ndarray) and block.device.id == 0
    assert np.array_equal(cupy.asnumpy(block), sim.images[64:128].numpy())
    as_torch = torch.from_dlpack(block)
    assert as_torch.is_cuda and as_torch.data_ptr() == block.data.ptr  # no copy
    # dask reductions run on the GPU blocks and agree with the host
    assert float(arr.mean().compute()) == pytest.approx(float(sim.images.double().mean()), rel=1e-5)
    mr.clear_chunk_cache()
    assert torch.equal(mr.load_chunk(str(store), 64, 128, torch.device("cuda")), as_torch)
    sub = stack.isel(np.arange(10, 20)).gpu_images().compute()  # a selection keeps the cupy meta
    assert isinstance(sub, cupy.ndarray) and np.array_equal(cupy.asnumpy(sub), sim.images[10:20].numpy())
    mr.clear_chunk_cache()


def _model(sim, mask):
    ps, isum, n = rinit.power_sums(es.soft_mask_background(sim.images, mask))
    s2 = rinit.initial_sigma2(ps, isum, n)
    refs = sim.templates * (sim.clean.std() / sim.templates.std())
    k = refs.shape[0]
    return es.EStepModel(mstep.reference_ft(refs, 2), s2[None].float(), torch.full((k,), -math.log(k)),
                         2.0, 32, 16, 2)


def _agree(st, res, ref_st, ref_res, subset):
    assert np.array_equal(res["index"], subset)
    assert float((st.data - ref_st.data).abs().max()) <= 2e-3 * float(ref_st.data.abs().max())
    assert float(st.class_weight.sum()) == pytest.approx(len(subset), rel=1e-4)  # posteriors sum to one
    assert float(np.mean(res["class_index"] == ref_res["class_index"])) >= 0.98  # float32 ties may flip a rare one


@pytest.mark.parametrize("on_cluster", [False, pytest.param(True, marks=pytest.mark.skipif(not HAS_DASK_CUDA, reason="needs dask-cuda"))])
def test_map_reduce_on_the_gpu_equals_the_cpu(sim, store, on_cluster):
    n = len(sim.truth)
    mask = circular_mask(BOX, 25)
    model = _model(sim, mask)
    cols = ["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]
    params = np.concatenate([sim.truth[cols].to_numpy(), np.tile([300.0, 2.7, 0.1, 0.0, 0.0, 1.0], (n, 1))], 1)
    table = mr.ParticleTable(params, PIX, np.zeros(n, np.int64), np.arange(n) % 2)
    bounds = [(s, min(n, s + 64)) for s in range(0, n, 64)]
    subset = np.arange(0, n, 2)
    origins = np.zeros((n, 2), np.float32)
    ref = mr.run_estep(None, str(store), bounds, subset, origins, table, model, es.Sampling(**FAST), mask)
    if on_cluster:
        from autospa.distributed.cluster import get_client

        with get_client(gpus="all", dashboard_address=None) as client:
            assert len(client.scheduler_info()["workers"]) == cuda_device_count()
            out = mr.run_estep(client, str(store), bounds, subset, origins, table, model, es.Sampling(**FAST), mask,
                               device="cuda")
    else:
        out = mr.run_estep(None, str(store), bounds, subset, origins, table, model, es.Sampling(**FAST), mask, device="cuda")
    assert out[0].data.device.type == "cpu"  # statistics come back to the driver on the CPU
    _agree(*out, *ref, subset)


@pytest.mark.skipif(not HAS_DASK_CUDA, reason="needs dask-cuda")
def test_class2d_cli_on_the_gpu_classifies_and_aligns(tmp_path):
    # the set and options of test_class2d_job.py's EM test, run by `autospa class2d --gpu` (a dask-cuda worker)
    sim = simulate_2d_classes(n=500, n_classes=3, box=BOX, pixel_size_a=PIX, snr=0.1, seed=5, shift_sigma_px=1.5,
                              max_shift_px=3.0)
    star, _ = write_unaligned_set(tmp_path / "Simulated", sim)
    out = tmp_path / "Class2D" / "run"
    cmd = [sys.executable, "-m", "autospa", "class2d", "--i", str(star), "--o", str(out), "--K", "6", "--iter", "10",
           "--ctf", "--particle_diameter", "150", "--gpu", "--psi_step", "12", "--offset_step", "2", "--random_seed", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    data = read_star(f"{out}_it010_data.star")["particles"]
    assert np.array_equal(data["rlnImageName"].to_numpy(), read_star(star)["particles"]["rlnImageName"].to_numpy())
    origin_px = np.stack([data["rlnOriginXAngst"], data["rlnOriginYAngst"]], 1) / PIX
    purity, psi_err, shift_err = score_against_truth(sim.truth, data["rlnClassNumber"].to_numpy() - 1,
                                                     data["rlnAnglePsi"].to_numpy(), origin_px, PIX)
    assert purity >= 0.9
    assert psi_err <= 5.0
    assert shift_err <= 1.0
