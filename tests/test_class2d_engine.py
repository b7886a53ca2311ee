"""The 2D likelihood engine: E-step invariants and accuracy, EM/VDAM equivalence, dask map-reduce."""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest
import torch

from autospa.distributed.map_reduce import ParticleTable, run_estep
from autospa.io.zarr_store import write_store
from autospa.jobs.class2d import circular_mask
from autospa.numerics import slices
from autospa.numerics.ctf import ctf_2d
from autospa.refinement import estep as es
from autospa.refinement import init as rinit
from autospa.refinement import mstep
from autospa.refinement.state import ModelState
from autospa.refinement.statistics import SufficientStats
from autospa.refinement.vdam import vdam_update
from autospa.simulate.particles import simulate_2d_classes

BOX, PIX = 64, 3.0
FAST = dict(psi_step_deg=12.0, offset_step_px=2.0)  # RELION GUI sampling (6 deg / 1 px fine)


@pytest.fixture(scope="module")
def sim():
    return simulate_2d_classes(n=200, n_classes=3, box=BOX, pixel_size_a=PIX, snr=0.1, seed=3, shift_sigma_px=1.5,
                               max_shift_px=3.0, return_clean=True)


def _ctf(truth):
    return ctf_2d(torch.tensor(truth.rlnDefocusU.values), torch.tensor(truth.rlnDefocusV.values),
                  torch.tensor(truth.rlnDefocusAngle.values), 300.0, 2.7, 0.1, PIX, BOX)


def _true_model(sim, mask, current_size=BOX, coarse=16):
    ps, isum, n = rinit.power_sums(es.soft_mask_background(sim.images, mask))
    s2 = rinit.initial_sigma2(ps, isum, n)
    refs = sim.templates * (sim.clean.std() / sim.templates.std())
    k = refs.shape[0]
    return refs, es.EStepModel(mstep.reference_ft(refs, 2), s2[None].float(), torch.full((k,), -math.log(k)),
                               2.0, current_size, coarse, 2)


def _batch(sim):
    n = len(sim.truth)
    return es.ParticleBatch(sim.images, _ctf(sim.truth), torch.zeros(n, 2), torch.zeros(n, dtype=torch.long),
                            torch.arange(n) % 2)


def test_rotation_gather_scatter_are_adjoint():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 32, 32, generator=g, dtype=torch.complex64)
    psi = torch.tensor([0.0, 17.0, 123.5])
    freqs, _ = es.rfft_frequencies(16)
    st = slices.interpolation_stencil(psi, freqs[es.window_indices(16, 16)], 16, 2)
    v = torch.randn(2, 3, st.index.shape[1], generator=g, dtype=torch.complex64)
    lhs = (slices.rotate_gather(ref, st) * v.conj()).sum()
    rhs = (ref * slices.rotate_scatter(v, st).conj()).sum()
    assert abs(lhs - rhs) / abs(lhs) < 1e-5


def test_row_threshold_keeps_the_requested_mass():
    w = torch.tensor([[0.5, 0.3, 0.15, 0.05], [1.0, 0.0, 0.0, 0.0]])
    thr = es.row_threshold(w, 0.9)
    assert torch.equal(thr, torch.tensor([0.15, 1.0]))
    assert torch.equal(es.row_threshold(w, 0.999, cap=2), torch.tensor([0.3, 1.0]))


def test_row_threshold_top_k_shortcut_equals_the_full_sort():
    g = torch.Generator().manual_seed(4)
    m = 4 * es.ROW_THRESHOLD_TOPK
    # sharp rows (a few entries hold the mass) and broad rows (a full sort needed) mixed
    sharp = torch.exp(-torch.rand(6, m, generator=g) * 200)
    broad = torch.rand(6, m, generator=g)
    w = torch.cat([sharp, broad])[torch.randperm(12, generator=g)]
    for fraction in (0.9, 0.999):
        srt = torch.sort(w, dim=1, descending=True)[0]
        expect = es._walk(srt, w.sum(1, keepdim=True, dtype=torch.float64), fraction)
        assert torch.equal(es.row_threshold(w, fraction), expect)


def test_log_row_threshold_selects_what_row_threshold_selects():
    """The threshold on log-weights (top k and a bound on the rest; exact mass or a full sort only
    where needed) selects the same entries as row_threshold on the weights, capped or not."""
    g = torch.Generator().manual_seed(5)
    m = 8 * es.ROW_THRESHOLD_TOPK
    rows = [
        -torch.rand(m, generator=g) * 400,  # sharp: the top k decide, the bound holds
        -torch.rand(m, generator=g) * 12,  # the bound is loose: the exact mass decides
        -torch.rand(m, generator=g) * 0.5,  # broad: the top k do not hold the fraction (full sort)
        torch.where(torch.rand(m, generator=g) < 0.5, -torch.inf, -torch.rand(m, generator=g) * 30),  # -inf entries
        # a plateau of 400 beyond the k largest, the rest far below: only the entries within reach are sorted
        torch.where(torch.randperm(m, generator=g) < 400, -torch.rand(m, generator=g) * 0.5, -50.0 - torch.rand(m, generator=g)),
    ]
    logw = torch.stack(rows * 3)[torch.randperm(15, generator=g)] + 7.0  # an offset: the row maxima are not 0
    for fraction in (0.9, 0.999):
        for cap in (0, 60, 5000):
            thr, mx = es.log_row_threshold(logw, fraction, cap)
            assert torch.equal(mx, logw.max(1).values)
            w = torch.exp((logw - mx[:, None]).double())
            expect = w >= es.row_threshold(w, fraction, cap)[:, None]
            assert torch.equal(logw >= thr[:, None], expect), (fraction, cap)


def test_significant_entries_are_the_thresholded_entries():
    """The sparse selection (each row's k + 1 largest; a scan of the row only for ties past the
    k-th or uncapped rows whose k largest do not hold the fraction) lists exactly the entries at
    or above log_row_threshold."""
    g = torch.Generator().manual_seed(6)
    m = 48 * es.ROW_THRESHOLD_TOPK
    rows = [
        -torch.rand(m, generator=g) * 2000,  # sharp: the k largest hold the fraction, the bound decides
        -torch.rand(m, generator=g) * 60,  # loose bound on the rest: tighter bounds or the exact mass decide
        -torch.rand(m, generator=g) * 0.5,  # broad: the k largest do not hold the fraction
        torch.where(torch.rand(m, generator=g) < 0.5, -torch.inf, -torch.rand(m, generator=g) * 300),  # -inf entries
        torch.cat([torch.zeros(3), torch.full((m - 3,), -31.0)]),  # a long low tail holds mass
        torch.zeros(m),  # broad and all tied: the selection reaches past the k largest
        -(torch.rand(m, generator=g) * 20).round(),  # broad with ties at every level
    ]
    logw = torch.stack(rows * 3)[torch.randperm(21, generator=g)] - 3.0
    for fraction in (0.9, 0.999):
        for cap in (0, 60, 5000):
            thr, _ = es.log_row_threshold(logw, fraction, cap)
            expect = torch.nonzero(logw >= thr[:, None], as_tuple=True)
            got = es.significant_entries(logw, fraction, cap)
            assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1]), (fraction, cap)
    # undecided by the bound: the tail below the depth moves the fraction past the first entry
    row = torch.cat([torch.tensor([math.log(0.9), math.log(0.1)], dtype=torch.float64),
                     torch.full((m - 2,), -30.5, dtype=torch.float64)])
    w = torch.exp(row)
    assert w[0] < 0.9 * w.sum() * (1 - 1e-12) and w[0] >= 0.9 * w[:2].sum() * (1 - 1e-12)
    got = es.significant_entries(row[None], 0.9)
    assert torch.equal(got[1], torch.tensor([0, 1]))


def test_sum64_matches_the_float64_sum():
    """sum64 (float32 blocks added in float64) agrees with the float64 sum to float32 rounding, over
    one or several trailing dimensions, with and without a partial last block; other cases are
    the plain float64 sum."""
    g = torch.Generator().manual_seed(7)
    for shape, dim in [((5, 3 * es.SUM64_BLOCK + 17), 1), ((4, 6, 700), (1, 2)), ((3, 100), -1), ((7, 2 * es.SUM64_BLOCK), 1)]:
        x = torch.rand(shape, generator=g) * torch.rand(shape[:1] + (1,) * (len(shape) - 1), generator=g)
        got = es.sum64(x, dim)
        ref = x.double().sum(dim)
        assert got.dtype == torch.float64 and got.shape == ref.shape
        assert float(((got - ref) / ref).abs().max()) < 1e-6
    x = torch.rand(50, 3, generator=g)
    assert torch.equal(es.sum64(x, 0), x.sum(0, dtype=torch.float64))  # not trailing: the plain sum
    xd = x.double()
    assert torch.equal(es.sum64(xd, 1), xd.sum(1))


def test_estep_finds_true_poses_and_posteriors_sum_to_one(sim):
    mask = circular_mask(BOX, 25)
    _, model = _true_model(sim, mask)
    stats, res = es.expectation(_batch(sim), model, es.Sampling(), mask)
    n = len(sim.truth)
    # posteriors of every particle sum to one: class weights and offset weights total n
    assert float(stats.class_weight.sum()) == pytest.approx(n, rel=1e-4)
    assert float(stats.offset_weight) == pytest.approx(n, rel=1e-4)
    truth = sim.truth
    assert (res.class_index.numpy() + 1 == truth.rlnClassNumber.values).mean() >= 0.95
    dpsi = (res.psi_deg.numpy() - truth.rlnAnglePsi.values + 180) % 360 - 180
    assert np.median(np.abs(dpsi)) <= 3.0
    true_org = np.stack([truth.rlnOriginXAngst.values, truth.rlnOriginYAngst.values], 1) / PIX
    assert np.median(np.linalg.norm(res.origin_px.numpy() - true_org, axis=1)) <= 1.0
    assert bool((res.max_posterior > 0).all()) and bool((res.max_posterior <= 1 + 1e-6).all())


def test_prepared_model_is_reused_per_model_object_and_gives_the_same_result(sim):
    """Tasks of one iteration share the broadcast model: its projections are made once; a new
    model object or a new sampling is prepared afresh."""
    mask = circular_mask(BOX, 25)
    _, model = _true_model(sim, mask)
    batch = _batch(sim)
    first, second = batch.subset(slice(0, 40)), batch.subset(slice(40, 80))
    es.clear_prep_cache()
    s1, r1 = es.expectation(first, model, es.Sampling(), mask)
    prep = es._PREP_CACHE[-1][2][1]
    s2, r2 = es.expectation(second, model, es.Sampling(), mask)
    assert len(es._PREP_CACHE) == 1 and es._PREP_CACHE[-1][2][1] is prep  # reused
    es.clear_prep_cache()
    s2b, r2b = es.expectation(second, model, es.Sampling(), mask)  # prepared afresh: same numbers
    assert torch.equal(r2.class_index, r2b.class_index) and torch.equal(r2.psi_deg, r2b.psi_deg)
    assert torch.allclose(s2.data, s2b.data)
    es.expectation(first, model, es.Sampling(perturb=0.25), mask)  # another sampling
    es.expectation(first, es.EStepModel(*[getattr(model, f) for f in model.__dataclass_fields__]), es.Sampling(), mask)
    assert len(es._PREP_CACHE) == es._PREP_CACHE_SIZE and all(e[2][1] is not prep for e in es._PREP_CACHE)


def test_fine_pass_matches_brute_force_posteriors(sim):
    """With every coarse hypothesis significant, the blocked fine pass equals a direct evaluation
    of the likelihood over the whole fine grid (2R psi x 4T translations x K classes)."""
    mask = circular_mask(BOX, 25)
    refs, model = _true_model(sim, mask, current_size=24, coarse=24)
    model.sigma2 = model.sigma2 * 40  # broad posteriors: many hypotheses carry weight
    batch = _batch(sim)
    m = 6
    sub = es.ParticleBatch(*(t[:m] for t in (batch.images, batch.ctf, batch.origin_px, batch.group, batch.half)))
    sampling = es.Sampling(psi_step_deg=30.0, offset_range_px=2.0, offset_step_px=1.0, adaptive_fraction=1.0)
    stats, res = es.expectation(sub, model, sampling, mask)
    # brute force
    prep = es._prepare(model, sampling, BOX, torch.device("cpu"))
    freqs, shells = es.rfft_frequencies(BOX)
    x = es.centered_rfft2(es.soft_mask_background(sub.images, mask)).reshape(m, -1)[:, prep.idx_f]
    c = sub.ctf.reshape(m, -1)[:, prep.idx_f]
    w = 1.0 / model.sigma2[0][shells[prep.idx_f]]
    ph = prep.ph_f  # (4T, Ff)
    a = prep.fine_table  # (K*2R, Ff)
    d2 = ((x[:, None, None, :] * ph[None, :, None, :] - c[:, None, None, :] * a[None, None, :, :]).abs() ** 2 * w).sum(-1) / 2
    logw = -d2 - (prep.trans_f**2).sum(-1)[None, :, None] / (2 * model.sigma_offset_px**2)
    gam = torch.softmax(logw.reshape(m, -1), 1).reshape(logw.shape)  # (m, 4T, K*2R)
    best = gam.reshape(m, -1).argmax(1)
    r_f = prep.fine_angles.shape[0]
    assert torch.equal(res.class_index, (best % a.shape[0]) // r_f)
    assert torch.allclose(res.max_posterior, gam.reshape(m, -1).max(1).values, rtol=1e-3, atol=1e-5)
    k = refs.shape[0]
    cw = torch.zeros(2, k)
    for h in range(2):
        cw[h] = gam[sub.half == h].sum((0, 1)).reshape(k, r_f).sum(1)
    assert torch.allclose(stats.class_weight.float(), cw, atol=1e-4)
    off2 = (gam.sum(2) * ((sub.origin_px.round()[:, None, :] + prep.trans_f[None]) ** 2).sum(-1)).sum()
    assert float(stats.offset_sq) == pytest.approx(float(off2), rel=1e-4)


def test_shared_gemm_block_and_sparse_fine_passes_agree(sim, monkeypatch):
    mask = circular_mask(BOX, 25)
    _, model = _true_model(sim, mask, current_size=32)
    batch = _batch(sim)
    out = []
    # one shared GEMM always; per-particle blocks always (in one padded bucket, and in buckets of
    # equal-sized blocks); hypothesis by hypothesis always
    for frac, waste, padding in ((0.0, 1e9, 1.5), (2.0, 1e9, 1e9), (2.0, 1e9, 1.0), (2.0, 0.0, 1.5)):
        monkeypatch.setattr(es, "DENSE_FINE_COLUMNS", frac)
        monkeypatch.setattr(es, "SPARSE_FINE_WASTE", waste)
        monkeypatch.setattr(es, "BLOCK_PADDING", padding)
        out.append(es.expectation(batch, model, es.Sampling(max_significants=15, **FAST), mask))
    s0, r0 = out[0]
    for s1, r1 in out[1:]:
        for f in ("data", "weight", "class_weight", "noise_power", "offset_sq", "offset_weight", "log_likelihood",
                  "max_posterior"):
            a, b = getattr(s0, f), getattr(s1, f)
            assert float((a - b).abs().max()) <= 1e-4 * float(b.abs().max()), f
        assert torch.equal(r0.class_index, r1.class_index) and torch.equal(r0.psi_deg, r1.psi_deg)
        assert torch.equal(r0.origin_px, r1.origin_px)


def test_statistics_are_additive_over_any_partition(sim):
    mask = circular_mask(BOX, 25)
    _, model = _true_model(sim, mask, current_size=32)
    batch = _batch(sim)
    whole, _ = es.expectation(batch, model, es.Sampling(**FAST), mask, chunk_particles=200)
    parts, _ = es.expectation(batch, model, es.Sampling(**FAST), mask, chunk_particles=37)
    assert float((whole.data - parts.data).abs().max()) <= 1e-4 * float(whole.data.abs().max())
    assert float((whole.noise_power - parts.noise_power).abs().max()) <= 1e-6 * float(whole.noise_power.abs().max())


def test_vdam_full_batch_step_one_equals_unregularised_em(sim):
    mask = circular_mask(BOX, 25)
    refs, model = _true_model(sim, mask, current_size=BOX)
    stats, _ = es.expectation(_batch(sim), model, es.Sampling(**FAST), mask)
    k = refs.shape[0]
    state = ModelState(refs=refs, sigma2=model.sigma2, class_prior=torch.full((k,), 1.0 / k, dtype=torch.float64),
                       sigma_offset_a=2.0 * PIX, pixel_size_a=PIX, current_size=BOX)
    # EM without a prior (T -> infinity) and VDAM with step 1 and FSC 1 on the same statistics
    em = mstep.em_update(state, stats, tau2_fudge=1e12, mask_radius_px=None)
    vd, _ = vdam_update(state, stats, step=1.0, tau2_fudge=1.0, mu=0.0, mask_radius_px=None, fsc_override=1.0,
                        damp_small_classes=False)
    # they agree where the summed weights are at least 1 (VDAM rescales by max(F, 1))
    w = stats.weight.sum(0)
    assert float(w[:, w.shape[-1] // 2, w.shape[-1] // 2 + 8].min()) > 1
    corr = torch.nn.functional.cosine_similarity(em.refs.reshape(k, -1), vd.refs.reshape(k, -1))
    assert float(corr.min()) > 0.999


def test_map_reduce_same_result_in_process_and_on_a_cluster(sim, tmp_path):
    from distributed import Client, LocalCluster

    store = tmp_path / "p.zarr"
    n = len(sim.truth)
    import pandas as pd

    meta = pd.DataFrame({"rlnOpticsGroup": np.ones(n, int), "rlnImageName": [f"{i + 1}@x.mrcs" for i in range(n)]})
    write_store(store, [sim.images.numpy()], meta, optics=sim.optics, chunk_size=64, dtype="float32")
    mask = circular_mask(BOX, 25)
    _, model = _true_model(sim, mask, current_size=32)
    cols = ["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]
    params = np.concatenate([sim.truth[cols].to_numpy(), np.tile([300.0, 2.7, 0.1, 0.0, 0.0, 1.0], (n, 1))], 1)
    table = ParticleTable(params, PIX, np.zeros(n, np.int64), np.arange(n) % 2)
    bounds = [(s, min(n, s + 64)) for s in range(0, n, 64)]
    subset = np.arange(0, n, 2)
    origins = np.zeros((n, 2), np.float32)
    ref_stats, ref_res = run_estep(None, str(store), bounds, subset, origins, table, model, es.Sampling(**FAST), mask)
    for workers in (1, 2):
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=False, dashboard_address=None) as cl, Client(cl) as c:
            st, res = run_estep(c, str(store), bounds, subset, origins, table, model, es.Sampling(**FAST), mask)
        assert np.array_equal(res["index"], subset)
        assert np.array_equal(res["class_index"], ref_res["class_index"])
        assert float((st.data - ref_stats.data).abs().max()) <= 1e-4 * float(ref_stats.data.abs().max())
        assert float(st.class_weight.sum()) == pytest.approx(len(subset), rel=1e-4)


def test_worker_killed_mid_iteration_gives_the_same_result(sim, tmp_path):
    """kill -9 a worker process while the E-step runs: dask recomputes its tasks elsewhere."""
    import signal
    import threading

    from distributed import Client, LocalCluster
    import pandas as pd

    store = tmp_path / "p.zarr"
    n = len(sim.truth)
    meta = pd.DataFrame({"rlnOpticsGroup": np.ones(n, int), "rlnImageName": [f"{i + 1}@x.mrcs" for i in range(n)]})
    write_store(store, [sim.images.numpy()], meta, optics=sim.optics, chunk_size=16, dtype="float32")
    mask = circular_mask(BOX, 25)
    _, model = _true_model(sim, mask, current_size=48)
    table = ParticleTable(None, PIX, np.zeros(n, np.int64), np.arange(n) % 2)
    bounds = [(s, min(n, s + 16)) for s in range(0, n, 16)]
    subset = np.arange(n)
    origins = np.zeros((n, 2), np.float32)
    ref_stats, ref_res = run_estep(None, str(store), bounds, subset, origins, table, model, es.Sampling(**FAST), mask,
                                   torch_threads=1)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cl, Client(cl) as c:
        out = {}
        t = threading.Thread(target=lambda: out.update(r=run_estep(c, str(store), bounds, subset, origins, table, model,
                                                                   es.Sampling(**FAST), mask, torch_threads=1)))
        t.start()
        deadline = time.time() + 60
        victim = None
        while time.time() < deadline and victim is None:
            busy = [w for w, tasks in c.processing().items() if tasks]
            if busy:
                victim = c.run(os.getpid, workers=[busy[0]])[busy[0]]
            else:
                time.sleep(0.05)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        t.join(240)
        assert not t.is_alive()
    st, res = out["r"]
    assert np.array_equal(res["index"], subset)
    assert np.array_equal(res["class_index"], ref_res["class_index"])
    assert float((st.data - ref_stats.data).abs().max()) <= 1e-4 * float(ref_stats.data.abs().max())
    assert float(st.n_particles) == n


def test_block_buckets_cover_every_particle_once_and_bound_the_padding():
    gen = torch.Generator().manual_seed(3)
    r = torch.randint(1, 60, (500,), generator=gen)
    c = torch.randint(1, 40, (500,), generator=gen)
    buckets = es._block_buckets(r, c, max_lines=10**9)
    allp = torch.cat(buckets)
    assert torch.equal(torch.sort(allp).values, torch.arange(500))
    assert len(buckets) > 1
    for b in buckets:
        own = int((r[b] * c[b]).sum())
        padded = int(r[b].max() * c[b].max()) * len(b)
        assert padded <= es.BLOCK_PADDING * own + 256 * len(b) or len(b) == 1
    # the GPU's looser padding: fewer, larger buckets within their own bound
    loose = es._block_buckets(r, c, max_lines=10**9, padding=es.BLOCK_PADDING_CUDA)
    assert torch.equal(torch.sort(torch.cat(loose)).values, torch.arange(500)) and len(loose) < len(buckets)
    for b in loose:
        own = int((r[b] * c[b]).sum())
        assert int(r[b].max() * c[b].max()) * len(b) <= es.BLOCK_PADDING_CUDA * own + 256 * len(b) or len(b) == 1
    # a memory bound smaller than one block still gives every particle its own bucket
    tiny = es._block_buckets(r, c, max_lines=1)
    assert len(tiny) == 500
    for b in es._block_buckets(r, c, max_lines=2000):
        assert int(r[b].max() + c[b].max()) * len(b) <= 2000 or len(b) == 1


def test_chunk_cache_reads_a_rewritten_store_afresh_and_keeps_small_stores(tmp_path, monkeypatch):
    import pandas as pd

    from autospa.distributed import map_reduce as mr

    rng = np.random.default_rng(0)
    store = tmp_path / "s.zarr"
    meta = pd.DataFrame({"rlnOpticsGroup": np.ones(64, int), "rlnImageName": [f"{i + 1}@x.mrcs" for i in range(64)]})
    optics = [{"rlnOpticsGroup": 1, "rlnOpticsGroupName": "g1", "rlnImagePixelSize": 2.0, "rlnImageSize": 8,
               "rlnImageDimensionality": 2, "rlnVoltage": 300.0, "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.1}]
    a = rng.standard_normal((64, 8, 8)).astype(np.float32)
    write_store(store, [a], meta, optics=optics, chunk_size=32, dtype="float32")
    mr.clear_chunk_cache()
    stamp, fits = mr._store_stamp_and_fits(str(store))
    assert fits  # 16 kB: a sparse read of this store keeps its chunk
    assert np.array_equal(mr.load_chunk(str(store), 32, 64, torch.device("cpu")).numpy(), a[32:])
    # the store written anew at the same path: its chunks are not taken from the cache
    b = a + 1.0
    write_store(store, [b], meta, optics=optics, chunk_size=32, dtype="float32", overwrite=True)
    assert mr._store_stamp_and_fits(str(store))[0] != stamp
    assert np.array_equal(mr.load_chunk(str(store), 32, 64, torch.device("cpu")).numpy(), b[32:])
    # a cache smaller than twice the store: sparse reads keep nothing
    monkeypatch.setenv("AUTOSPA_CHUNK_CACHE_MB", str(16_000 / 2**20))
    assert not mr._store_stamp_and_fits(str(store))[1]
    mr.clear_chunk_cache()


def test_plan_tasks_covers_every_particle_once_and_packs_sparse_batches():
    from autospa.distributed.map_reduce import TASK_PARTICLES, plan_tasks

    bounds = [(s, min(s + 1024, 20_000)) for s in range(0, 20_000, 1024)]
    rng = np.random.default_rng(3)
    for indices, limit in ((np.arange(20_000), 0), (np.arange(4000), 500), (rng.choice(20_000, 1000, replace=False), 125),
                           (rng.choice(20_000, 200, replace=False), 64)):
        tasks = plan_tasks(bounds, indices, limit)
        cap = limit or TASK_PARTICLES
        got = np.concatenate([s + loc for t in tasks for s, _, loc in t])
        assert np.array_equal(got, np.sort(indices))  # every particle once, in store order
        for t in tasks:
            sizes = [len(loc) for _, _, loc in t]
            for s, e, loc in t:
                assert len(loc) and loc.min() >= 0 and loc.max() < e - s  # pieces lie inside their chunk
            assert sum(sizes) <= cap or len(t) == 1  # packed tasks keep the limit; a lone piece is
            assert max(sizes) <= 1.5 * cap  # at most the nearest whole number of pieces above it
        if limit == 125:  # 1,000 particles spread over 20 chunks: about 8 tasks, not 20
            assert len(tasks) <= 10
    # 4,000 particles for 2 workers (tasks of about 500): chunks cut into equal halves
    sizes = sorted(sum(len(p[2]) for p in t) for t in plan_tasks(bounds[:4], np.arange(4000), 500))
    assert sizes == [464, 464, 512, 512, 512, 512, 512, 512]


def test_backprojection_shares_stencils_across_classes(sim):
    """Columns of several classes at one orientation share one stencil: the sums equal those
    of a stencil per column, for columns in any order (also all orientations distinct), through
    the sparse product of all classes (all columns; a random subset of them) and the scattered
    adds (few columns per orientation)."""
    mask = circular_mask(BOX, 25)
    _, model = _true_model(sim, mask, current_size=32)
    model, prep = es._prepared(model, es.Sampling(**FAST), BOX, torch.device("cpu"))
    k, rc = model.ref_ft.shape[0], prep.fine_mats.shape[0]
    gen = torch.Generator().manual_seed(7)
    distinct = torch.randperm(rc, generator=gen) + rc * (torch.arange(rc) % k)  # every orientation once, unsorted
    assert es._shared_backprojection(model, prep, 2 * rc, torch.device("cpu"))
    assert not es._shared_backprojection(model, prep, rc // 4, torch.device("cpu"))
    for cols in (torch.arange(k * rc), torch.randperm(k * rc, generator=gen)[: 2 * rc], distinct[: rc // 4], distinct):
        vals = [torch.randn(len(cols), len(prep.idx_m), dtype=torch.complex64, generator=gen),
                torch.rand(len(cols), len(prep.idx_m), generator=gen)]
        got = es._backproject_columns(vals, cols, model, prep, BOX)
        st = slices.stencil(prep.fine_mats[cols % rc], prep.f_m, BOX, model.pad)  # one per column
        for g, v in zip(got, vals):
            ref = slices.hermitian_complete(slices.scatter_columns(v, cols // rc, st, k), model.ndim)
            assert float((g - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


@pytest.mark.parametrize("in_threads", [True, False])
def test_concurrent_parts_add_up_to_one_pass(sim, monkeypatch, in_threads):
    """The E-step of a batch in concurrent parts (threads; on a GPU each on its own stream), each
    into its own statistics and column sums, adds up to one pass over the batch: the same sums
    and per-particle results, in the batch's order."""
    mask = circular_mask(BOX, 25)
    _, model = _true_model(sim, mask, current_size=32)
    sampling = es.Sampling(**FAST, max_significants=15)
    model, prep = es._prepared(model, sampling, BOX, torch.device("cpu"))
    k, pd = model.ref_ft.shape[0], model.ref_ft.shape[-1]
    batch = _batch(sim)
    outs = []
    for parts in (1, 3):
        stats = SufficientStats.zeros(2, k, pd, n_groups=1, n_shells=model.sigma2.shape[1])
        acc = es._ColumnSums(k * prep.n_coarse * prep.n_children, len(prep.idx_m), torch.device("cpu"))
        monkeypatch.setattr(es, "STREAM_MIN_PARTICLES", 50)  # three parts of this small batch
        monkeypatch.setattr(es, "PARTS_IN_THREADS", in_threads)
        res = es._concurrent_chunks(batch, model, sampling, mask, prep, stats, acc, 40, parts)
        acc.flush()
        outs.append((stats, acc, res))
    (s1, a1, r1), (s3, a3, r3) = outs
    assert len(r3) > len(r1) // 2 and sum(len(r.class_index) for r in r3) == len(sim.truth)
    for f in ("class_index", "psi_deg", "origin_px", "n_significant"):
        assert torch.equal(torch.cat([getattr(r, f) for r in r1]), torch.cat([getattr(r, f) for r in r3])), f
    for name in ("class_weight", "noise_power", "log_likelihood", "offset_sq", "n_particles"):
        assert torch.allclose(getattr(s3, name), getattr(s1, name), rtol=1e-6, atol=1e-9), name
    assert float(a3.weight.sum()) == pytest.approx(float(a1.weight.sum()), rel=1e-5)
    assert float((a3.data - a1.data).abs().max()) <= 1e-4 * float(a1.data.abs().max())


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("reach", [2.2, 0.6])
def test_corner_by_corner_scatter_equals_the_stencil_scatter(ndim, reach):
    """scatter_positions (the interpolation corners one at a time, shared by every array, through
    shifted views of the grids) spreads the same sums as a stencil and scatter_columns per array,
    for samples inside the padded grid and for samples whose neighbours lie outside it."""
    gen = torch.Generator().manual_seed(ndim)
    box, pad, k, n_cols = 16, 2, 3, 40
    rots = torch.linalg.qr(torch.randn(n_cols, ndim, ndim, generator=gen, dtype=torch.float64))[0].float()
    freqs = (torch.rand(90, 2, generator=gen) - 0.5) * reach * box  # 2.2: beyond Nyquist, corners off the grid
    cls = torch.randint(0, k, (n_cols,), generator=gen)
    vals = [torch.randn(n_cols, 90, dtype=torch.complex64, generator=gen), torch.rand(n_cols, 90, generator=gen)]
    st = slices.stencil(rots, freqs, box, pad)
    pos = slices.sample_positions(rots, freqs, box, pad)
    cells = pos.floor()
    inside = bool(((cells >= 0) & (cells <= pad * box - 2)).all())
    assert inside == (reach < 2)  # beyond Nyquist some neighbours lie outside the grid
    got = slices.scatter_positions(vals, cls, pos, pad * box, k)
    for g, v in zip(got, vals):
        ref = slices.scatter_columns(v, cls, st, k)
        assert g.shape == ref.shape and g.dtype == ref.dtype
        assert float((g - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    # out=: the sums are added into the given grids (a second pass doubles them), returned as such
    again = slices.scatter_positions(vals, cls, pos, pad * box, k, out=got)
    assert all(a is g for a, g in zip(again, got))
    for g, v in zip(got, vals):
        ref = slices.scatter_columns(v, cls, st, k)
        assert float((g - 2 * ref).abs().max()) <= 2e-5 * float(ref.abs().max())
    with pytest.raises(ValueError, match="does not match"):
        slices.scatter_positions(vals, cls, pos, pad * box, k, out=[g.to(torch.complex128) for g in got])


@pytest.mark.parametrize("ndim", [2, 3])
def test_shell_mean_is_the_mean_of_each_shell(ndim):
    """mstep.shell_mean (one bincount over class and shell keys) against a loop over the shells,
    pixels beyond n_shells left out and empty shells 0; padded_shells is one shared grid."""
    gen = torch.Generator().manual_seed(ndim)
    pd, pad, k = 20, 2, 3
    shells = mstep.padded_shells(pd, pad, ndim=ndim)
    assert shells is mstep.padded_shells(pd, pad, ndim=ndim)
    values = torch.rand((k,) + (pd,) * ndim, generator=gen)
    n_shells = 4
    got = mstep.shell_mean(values, shells, n_shells)
    assert got.shape == (k, n_shells) and got.dtype == torch.float64
    for s in range(n_shells):
        sel = shells == s
        want = values[:, sel].double().mean(1) if bool(sel.any()) else torch.zeros(k, dtype=torch.float64)
        assert torch.allclose(got[:, s], want, rtol=1e-12, atol=0)
    wide = mstep.shell_mean(values, shells, int(shells.max()) + 3)  # shells past the grid are empty
    assert bool((wide[:, -2:] == 0).all())


@pytest.mark.parametrize("threads", [2, 3])
def test_threaded_grid_sample_equals_one_call(threads):
    """slices.grid_sample_threaded (a batch of one split over channels, or over the grid's rows
    with the input broadcast) returns grid_sample's values exactly, for 2D and 3D inputs, channel
    counts that do and do not divide evenly, and fewer rows than threads."""
    gen = torch.Generator().manual_seed(threads)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for c in (2, 6):
            for spatial, rest in (((20, 20), (13, 7, 2)), ((12, 12, 12), (13, 7, 1, 3)), ((12, 12, 12), (1, 7, 1, 3))):
                x = torch.randn((1, c) + spatial, generator=gen)
                g = torch.rand((1,) + rest, generator=gen) * 2.2 - 1.1  # some points off the grid
                want = torch.nn.functional.grid_sample(x, g, mode="bilinear", padding_mode="zeros", align_corners=True)
                got = slices.grid_sample_threaded(x, g)
                assert got.shape == want.shape and torch.equal(got, want), (c, spatial, rest)
    finally:
        torch.set_num_threads(saved)


def test_ctf_of_the_current_window_gives_the_same_estep(sim):
    """Map tasks compute the CTF only inside the E-step's windows (shells <= current_size // 2):
    the values there are the whole grid's, the rest is 0, and the E-step's numbers are identical."""
    from autospa.distributed.map_reduce import ctf_images

    mask = circular_mask(BOX, 25)
    _, model = _true_model(sim, mask, current_size=32)
    n = len(sim.truth)
    cols = ["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]
    params = np.concatenate([sim.truth[cols].to_numpy(), np.tile([300.0, 2.7, 0.1, 15.0, 40.0, 0.9], (n, 1))], 1)
    full = ctf_images(params, n, BOX, PIX, torch.device("cpu"))
    part = ctf_images(params, n, BOX, PIX, torch.device("cpu"), size=model.current_size)
    _, shells = es.rfft_frequencies(BOX)
    inside = (shells <= model.current_size // 2).reshape(BOX, BOX // 2 + 1)
    assert torch.equal(part[:, inside], full[:, inside]) and bool((part[:, ~inside] == 0).all())
    assert int(inside.sum()) < 0.3 * inside.numel()
    runs = []
    for ctf in (full, part):
        batch = es.ParticleBatch(sim.images, ctf, torch.zeros(n, 2), torch.zeros(n, dtype=torch.long), torch.arange(n) % 2)
        es.clear_prep_cache()
        runs.append(es.expectation(batch, model, es.Sampling(**FAST), mask))
    (s_full, r_full), (s_part, r_part) = runs
    for f in ("data", "weight", "class_weight", "noise_power", "log_likelihood"):
        assert torch.equal(getattr(s_full, f), getattr(s_part, f)), f
    for f in r_full.__dataclass_fields__:
        assert torch.equal(getattr(r_full, f), getattr(r_part, f)), f
