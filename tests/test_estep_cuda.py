"""The E-step on CUDA gives the CPU's result (every fine-pass path; skipped without CUDA)."""

from __future__ import annotations

import math

import pytest
import torch

from autospa.jobs.class2d import circular_mask
from autospa.numerics.ctf import ctf_2d
from autospa.refinement import estep as es
from autospa.refinement import init as rinit
from autospa.refinement import mstep
from autospa.simulate.particles import simulate_2d_classes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BOX, PIX = 64, 3.0
STAT_FIELDS = ("data", "weight", "class_weight", "noise_power", "offset_sq", "offset_weight", "log_likelihood", "max_posterior")


@pytest.fixture(scope="module")
def case():
    sim = simulate_2d_classes(n=300, n_classes=3, box=BOX, pixel_size_a=PIX, snr=0.1, seed=5, shift_sigma_px=1.5,
                              max_shift_px=3.0, return_clean=True)
    mask = circular_mask(BOX, 25)
    ps, isum, n = rinit.power_sums(es.soft_mask_background(sim.images, mask))
    s2 = rinit.initial_sigma2(ps, isum, n)
    refs = sim.templates * (sim.clean.std() / sim.templates.std())
    gen = torch.Generator().manual_seed(0)
    refs = torch.cat([refs, rinit.blob_references(refs[:1].repeat(2, 1, 1), 50.0, gen) * 0.2])  # K = 5, two blobs
    k = refs.shape[0]
    model = es.EStepModel(mstep.reference_ft(refs, 2), s2[None].float(), torch.full((k,), -math.log(k)), 2.0, 32, 16, 2)
    tr = sim.truth
    ctf = ctf_2d(torch.tensor(tr.rlnDefocusU.values), torch.tensor(tr.rlnDefocusV.values), torch.tensor(tr.rlnDefocusAngle.values),
                 300.0, 2.7, 0.1, PIX, BOX)
    n = len(tr)
    batch = es.ParticleBatch(sim.images, ctf, torch.zeros(n, 2), torch.zeros(n, dtype=torch.long), torch.arange(n) % 2)
    return model, batch, mask


def _wide(t: torch.Tensor) -> torch.Tensor:
    t = t.cpu()
    return t.to(torch.complex128 if t.is_complex() else torch.float64)


@pytest.mark.parametrize("psi_step, offset_step", [(12.0, 2.0), (6.0, 1.0)])
@pytest.mark.parametrize("path", ["shared", "blocks", "sparse"])
def test_estep_on_cuda_equals_cpu(case, monkeypatch, path, psi_step, offset_step):
    frac, waste = {"shared": (0.0, 1e9), "blocks": (2.0, 1e9), "sparse": (2.0, 0.0)}[path]
    monkeypatch.setattr(es, "DENSE_FINE_COLUMNS", frac)
    monkeypatch.setattr(es, "SPARSE_FINE_WASTE", waste)
    model, batch, mask = case
    sampling = es.Sampling(psi_step_deg=psi_step, offset_step_px=offset_step, max_significants=25)
    s_cpu, r_cpu = es.expectation(batch, model, sampling, mask)
    b_gpu = es.ParticleBatch(*(t.cuda() for t in (batch.images, batch.ctf, batch.origin_px, batch.group, batch.half)))
    s_gpu, r_gpu = es.expectation(b_gpu, model.to("cuda"), sampling, mask.cuda())
    assert s_gpu.data.device.type == "cuda" and r_gpu.class_index.device.type == "cuda"  # device follows the input
    n = batch.images.shape[0]
    assert float(s_gpu.class_weight.sum()) == pytest.approx(n, rel=1e-4)  # posteriors sum to one on the GPU too
    for f in STAT_FIELDS:
        a, b = _wide(getattr(s_cpu, f)), _wide(getattr(s_gpu, f))
        assert float((a - b).abs().max()) <= 2e-3 * max(float(a.abs().max()), 1e-12), f
    # poses: the same for (nearly) every particle; float32 ties may flip a rare one
    same = (r_cpu.class_index == r_gpu.class_index.cpu()) & (r_cpu.psi_deg == r_gpu.psi_deg.cpu())
    same &= (r_cpu.origin_px == r_gpu.origin_px.cpu()).all(1)
    assert float(same.double().mean()) >= 0.98
    assert torch.allclose(r_cpu.max_posterior, r_gpu.max_posterior.cpu(), atol=2e-3)


@pytest.mark.parametrize("streams", [1, 3])
def test_estep_on_cuda_in_many_small_chunks_equals_cpu(case, monkeypatch, streams):
    """A GPU budget far below the default: many chunks, fine-pass groups and buckets, the
    call-wide column sums, in one stream or in three parts on three streams at once; the result
    is the CPU's."""
    monkeypatch.setattr(es, "CUDA_STREAMS", streams)
    monkeypatch.setattr(es, "STREAM_MIN_PARTICLES", 100)
    monkeypatch.setattr(es, "CHUNK_BUDGET_CUDA", 3_000_000)
    monkeypatch.setattr(es, "CHUNK_BUDGET_CUDA_MIN", 3_000_000)
    assert es.chunk_budget(torch.device("cuda")) == 3_000_000
    model, batch, mask = case
    sampling = es.Sampling(psi_step_deg=6.0, offset_step_px=1.0, max_significants=25)
    s_cpu, r_cpu = es.expectation(batch, model, sampling, mask)
    b_gpu = es.ParticleBatch(*(t.cuda() for t in (batch.images, batch.ctf, batch.origin_px, batch.group, batch.half)))
    s_gpu, r_gpu = es.expectation(b_gpu, model.to("cuda"), sampling, mask.cuda())
    for f in STAT_FIELDS:
        a, b = _wide(getattr(s_cpu, f)), _wide(getattr(s_gpu, f))
        assert float((a - b).abs().max()) <= 2e-3 * max(float(a.abs().max()), 1e-12), f
    assert float((r_cpu.class_index == r_gpu.class_index.cpu()).double().mean()) >= 0.98
    assert torch.allclose(r_cpu.max_posterior, r_gpu.max_posterior.cpu(), atol=2e-3)  # in the batch's order


def test_gpu_chunk_budget_follows_the_card_memory():
    total = torch.cuda.get_device_properties(0).total_memory
    budget = es.chunk_budget(torch.device("cuda"))
    assert es.CHUNK_BUDGET_CUDA_MIN <= budget <= es.CHUNK_BUDGET_CUDA
    assert budget == min(es.CHUNK_BUDGET_CUDA, max(es.CHUNK_BUDGET_CUDA_MIN, total // (4 * es.CUDA_MEMORY_SHARE)))
    assert es.global_chunk_budget(torch.device("cuda")) == budget
