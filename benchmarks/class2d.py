"""2D classification benchmarks (issue 4 item 7). Prints a table and writes JSON.

    python benchmarks/class2d.py estep   [--device cuda] [--n 2000] [--K 12]     # (b) E-step throughput
    python benchmarks/class2d.py compare [--n 20000] [--K 50]                    # (a) VDAM vs EM
    python benchmarks/class2d.py workers [--n 4000] [--K 12]                     # (c) 1 vs 2 dask workers

(b) reports particles/s of the E-step and the achieved rate of its coarse-pass GEMM (the bulk
of the arithmetic) as a fraction of torch's matmul rate measured on the same device with the
same shapes, and the same for every matrix product the E-step runs (torch's FlopCounterMode:
the coarse GEMM, the fine pass's batched products including their padding, the sums); (a) runs both algorithms on one simulated set and scores purity against the truth.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _sim(n: int, k_true: int, seed: int = 1, box: int = 64):
    from autospa.simulate.particles import simulate_2d_classes

    return simulate_2d_classes(n=n, n_classes=k_true, box=box, pixel_size_a=3.0, snr=0.05, seed=seed,
                               shift_sigma_px=1.5, max_shift_px=4.0, return_clean=True)


def _matmul_rate(m: int, k: int, n: int, device: torch.device, reps: int = 5, trials: int = 3) -> float:
    """Best of ``trials`` rates (FLOP/s) of ``reps`` products (m, k) @ (k, n)."""
    a = torch.randn(m, k, device=device)
    b = torch.randn(k, n, device=device)
    c = a @ b  # the product into a preallocated output: the arithmetic rate, not the allocator's
    best = 0.0
    for _ in range(trials):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b, out=c)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2.0 * m * k * n * reps / (time.perf_counter() - t))
    return best


def _sparse_aware(formula, dense_arg: int):
    """A FlopCounterMode formula (raw arguments) for a matrix product: torch's own where every
    operand is dense; ``2 nnz n`` where the left operand is sparse and ``args[dense_arg]`` is the
    dense right one with ``n`` columns (the CPU's 2D back-projection is a CSR product, which
    torch's formulas would count as a dense GEMM of the whole grid: about 100 times its arithmetic)."""

    def count(*args, out_val=None, **kwargs):
        sparse = [a for a in args if isinstance(a, torch.Tensor) and a.layout != torch.strided]
        if sparse:
            return 2 * int(sparse[0]._nnz()) * int(args[dense_arg].shape[-1])
        return formula(*args, out_val=out_val, **kwargs)  # torch's formula (it takes the shapes itself)

    count._get_raw = True
    return count


def _flop_mapping() -> dict:
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    return {aten.mm: _sparse_aware(fc.mm_flop, 1), aten.addmm: _sparse_aware(fc.addmm_flop, 2)}


_SPARSE_AWARE_FLOPS = _flop_mapping()


def bench_estep(args) -> dict:
    from autospa.jobs.class2d import circular_mask, coarse_window
    from autospa.numerics.sampling import psi_grid, translation_grid
    from autospa.numerics.ctf import ctf_2d
    from autospa.refinement import estep as es
    from autospa.refinement import init as rinit
    from autospa.refinement import mstep

    device = torch.device(args.device)
    sim = _sim(args.n, 4)
    mask = circular_mask(64, 25, device=device)
    images = sim.images.to(device)
    tr = sim.truth
    ctf = ctf_2d(torch.tensor(tr.rlnDefocusU.values), torch.tensor(tr.rlnDefocusV.values),
                 torch.tensor(tr.rlnDefocusAngle.values), 300.0, 2.7, 0.1, 3.0, 64).to(device)
    ps, isum, n = rinit.power_sums(es.soft_mask_background(images, mask))
    s2 = rinit.initial_sigma2(ps.cpu(), isum.cpu(), n)
    gen = torch.Generator().manual_seed(0)
    # references: the true templates for 4 classes plus blobs for the rest (a mid-run state)
    refs = torch.cat([sim.templates * (sim.clean.std() / sim.templates.std()),
                      rinit.blob_references(sim.templates[:1].repeat(args.K - 4, 1, 1), 50.0, gen) * 0.2])[: args.K]
    rows = []
    for current in (32, 64):
        model = es.EStepModel(mstep.reference_ft(refs, 2), s2[None].float(), torch.full((args.K,), -math.log(args.K)),
                              2.0, current, coarse_window(args.psi_step, current), 2)
        batch = es.ParticleBatch(images, ctf, torch.zeros(args.n, 2, device=device),
                                 torch.zeros(args.n, dtype=torch.long, device=device), torch.arange(args.n, device=device) % 2)
        maxsig = 5 * args.K if args.maxsig is None else args.maxsig
        sampling = es.Sampling(psi_step_deg=args.psi_step, offset_step_px=args.offset_step, max_significants=maxsig)
        es.expectation(es.ParticleBatch(*(t[:64] for t in (batch.images, batch.ctf, batch.origin_px, batch.group, batch.half))),
                          model, sampling, mask)  # warm-up
        t_c = len(translation_grid(5.0, args.offset_step))
        r_c = len(psi_grid(args.psi_step))
        f_c = len(es.window_indices(64, model.coarse_size))
        gemm_shape = (min(args.n, 512) * t_c, 2 * f_c, args.K * r_c)  # the coarse GEMM's (M, K, N)
        rate_before = _matmul_rate(*gemm_shape, device)
        dt = math.inf
        for _ in range(args.repeats):  # the best of a few calls (this machine's other load varies)
            es.clear_prep_cache()  # the timed call prepares its model (projections, phases) as a task does
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.no_grad():
                _, res = es.expectation(batch, model, sampling, mask)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = min(dt, time.perf_counter() - t)
        # every matrix product the E-step ran (coarse GEMM, fine blocks, sums), counted by torch
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False, custom_mapping=_SPARSE_AWARE_FLOPS)
        es.clear_prep_cache()
        es.PARTS_IN_THREADS = False  # the counter sees this thread only: the same parts, in turn
        with torch.no_grad(), counter:
            es.expectation(batch, model, sampling, mask)
        es.PARTS_IN_THREADS = True
        all_flops = counter.get_total_flops()
        flops = 2.0 * args.n * t_c * 2 * f_c * args.K * r_c  # coarse GEMM
        # the machine's speed drifts (shared hosts): the rate is the best of one measurement
        # before the timed calls and one after, so that the fraction is not flattered by a slow spell
        rate = max(rate_before, _matmul_rate(*gemm_shape, device))
        acc = float((res.class_index.cpu().numpy()[: len(tr)] + 1 == tr.rlnClassNumber.values).mean())
        rows.append({"device": str(device), "current_size": current, "particles": args.n, "K": args.K, "max_significants": maxsig,
                     "cuda_streams": es.CUDA_STREAMS if device.type == "cuda" else None,
                     "seconds": dt,
                     "particles_per_s": args.n / dt, "coarse_gemm_gflops": flops / dt / 1e9,
                     "matmul_gflops": rate / 1e9, "coarse_fraction_of_matmul": flops / dt / rate,
                     "all_matmul_gflops": all_flops / dt / 1e9, "all_matmul_fraction_of_matmul": all_flops / dt / rate,
                     "class_accuracy_first4": acc})
    return {"benchmark": "estep", "rows": rows}


def _run(star, out, k, n_iter, grad, seed, client=None, psi_step=12.0, offset_step=2.0, device="cpu"):
    from autospa.jobs.class2d import Class2DOptions, run_class2d

    opts = Class2DOptions(input=str(star), output=str(out), n_classes=k, n_iter=n_iter, grad=grad, ctf=True,
                          particle_diameter_a=150.0, random_seed=seed, grad_write_iter=max(10, n_iter),
                          psi_step_deg=psi_step, offset_step_px=offset_step, device=device)
    t = time.perf_counter()
    res = run_class2d(opts, client=client)
    return res, time.perf_counter() - t


def bench_compare(args) -> dict:
    from autospa.jobs.demo import score_against_truth, write_unaligned_set
    from autospa.refinement import schedule

    work = Path(args.work)
    sim = _sim(args.n, args.true_classes)
    star, _ = write_unaligned_set(work / "Simulated", sim)
    rows = []
    runs = [(True, args.vdam_iter), (False, args.em_iter)]
    for grad, n_iter in [r for r in runs if ("vdam" if r[0] else "em") in args.algorithms.split(",")]:
        res, dt = _run(star, work / ("vdam" if grad else "em") / "run", args.K, n_iter, grad, 1,
                       psi_step=args.psi_step, offset_step=args.offset_step, device=args.device)
        pp = res["particles"]
        pur, psi, sh = score_against_truth(sim.truth, pp["class_index"], pp["psi_deg"], pp["origin_px"], 3.0)
        if grad:
            ph = schedule.phases(n_iter)
            s0, s1 = schedule.subset_sizes(args.n)
            seen = sum(schedule.subset_size(i, ph, args.n, s0, s1, args.K) for i in range(1, n_iter + 1))
        else:
            seen = n_iter * args.n
        rows.append({"algorithm": "VDAM" if grad else "EM", "iterations": n_iter, "seconds": dt, "epochs": seen / args.n,
                     "purity": pur, "psi_error_deg": psi, "shift_error_px": sh})
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    out = {"benchmark": "compare", "particles": args.n, "K": args.K, "rows": rows}
    if len(rows) == 2:
        out["speedup_vdam_over_em"] = rows[1]["seconds"] / rows[0]["seconds"]
    return out


def bench_workers(args) -> dict:
    from autospa.distributed.cluster import get_client
    from autospa.jobs.demo import write_unaligned_set

    work = Path(args.work)
    sim = _sim(args.n, 4)
    star, _ = write_unaligned_set(work / "Simulated", sim)
    import dask.array  # noqa: F401 - imports paid once per process, before either timed run
    import xarray  # noqa: F401

    rows = []
    for workers in (1, 2):
        shutil.rmtree(work / f"w{workers}", ignore_errors=True)  # each run imports its store afresh
        threads = 1  # one core per worker: the speed-up measures scaling with workers (cores)
        # the cluster `autospa class2d --j N` starts (its workers' malloc settings included)
        with get_client(n_workers=workers, threads_per_worker=1, dashboard_address=None) as c:
            c.run(torch.set_num_threads, threads)
            res, dt = _run(star, work / f"w{workers}" / "run", args.K, args.iter, False, 1, client=c,
                           psi_step=args.psi_step, offset_step=args.offset_step)
        rows.append({"workers": workers, "torch_threads_per_worker": threads, "seconds": dt,
                     "particles_per_s": args.n * args.iter / dt})
    return {"benchmark": "workers", "rows": rows, "speedup_2_over_1": rows[0]["seconds"] / rows[1]["seconds"]}


def _memory_child(store: str, out: str) -> None:
    """One VDAM mini-batch iteration on a store, in this process; prints peak RSS (MB)."""
    import resource

    from autospa.jobs.class2d import Class2DOptions, run_class2d

    opts = Class2DOptions(input=store, output=out, n_classes=12, n_iter=200, grad=True, ctf=True, particle_diameter_a=150.0,
                          psi_step_deg=12.0, offset_step_px=2.0)
    t = time.perf_counter()
    run_class2d(opts, stop_after=2)  # initialisation and two mini-batch iterations
    print(json.dumps({"seconds": time.perf_counter() - t,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def bench_memory(args) -> dict:
    """(d) peak RSS of a class2d run (driver and E-step in one process: the worst case) on stores of
    100k and 1M particles, one VDAM mini-batch iteration each (the mini-batch has the same size)."""
    import subprocess

    import pandas as pd

    from autospa.io.zarr_store import StoreWriter

    work = Path(args.work)
    rows = []
    for n in (100_000, 1_000_000):
        store = work / f"mem_{n}.zarr"
        if not store.exists():
            rng = np.random.default_rng(0)
            optics = pd.DataFrame([{"rlnOpticsGroup": 1, "rlnOpticsGroupName": "opticsGroup1", "rlnImagePixelSize": 3.0,
                                    "rlnImageSize": 64, "rlnImageDimensionality": 2, "rlnVoltage": 300.0,
                                    "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.1}])
            with StoreWriter(store, 64, dtype="float16", optics=optics, chunk_size=4096) as w:
                for s in range(0, n, 8192):
                    k = min(8192, n - s)
                    meta = pd.DataFrame({"rlnOpticsGroup": np.ones(k, np.int64),
                                         "rlnImageName": [f"{i + 1:06d}@Particles/stack.mrcs" for i in range(s, s + k)],
                                         "rlnDefocusU": rng.uniform(8000, 25000, k), "rlnDefocusV": rng.uniform(8000, 25000, k),
                                         "rlnDefocusAngle": rng.uniform(0, 180, k)})
                    w.append(rng.standard_normal((k, 64, 64), dtype=np.float32), meta)
        r = subprocess.run([sys.executable, __file__, "_memory_child", str(store), str(work / f"mem_{n}" / "run")],
                           capture_output=True, text=True, check=True)
        rows.append({"particles": n, **json.loads(r.stdout.strip().splitlines()[-1])})
    return {"benchmark": "memory", "rows": rows, "rss_ratio_1m_over_100k": rows[1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]}


def main() -> int:
    from autospa.distributed.malloc import tune_malloc

    tune_malloc()  # as the autospa CLI and its dask workers run
    if len(sys.argv) == 4 and sys.argv[1] == "_memory_child":
        _memory_child(sys.argv[2], sys.argv[3])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["estep", "compare", "workers", "memory"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--psi_step", type=float, default=12.0, help="coarse psi step (RELION GUI 6 deg fine = 12)")
    p.add_argument("--offset_step", type=float, default=2.0, help="coarse offset step (RELION GUI 1 px fine = 2)")
    p.add_argument("--maxsig", type=int, default=None,
                   help="estep: cap on significant coarse hypotheses per particle (default 5 K; 0 = none, class2d's default)")
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--K", type=int, default=None)
    p.add_argument("--true_classes", type=int, default=10)
    p.add_argument("--vdam_iter", type=int, default=200)
    p.add_argument("--em_iter", type=int, default=25)
    p.add_argument("--algorithms", default="vdam,em", help="compare: which to run (vdam,em)")
    p.add_argument("--iter", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5, help="estep: timed calls (the best is reported); matmul rate: best of 3, before and after")
    p.add_argument("--work", default="/tmp/autospa_bench_class2d")
    args = p.parse_args()
    defaults = {"estep": (2000, 12), "compare": (20000, 50), "workers": (4000, 12), "memory": (0, 12)}[args.mode]
    args.n = args.n or defaults[0]
    args.K = args.K or defaults[1]
    fn = {"estep": bench_estep, "compare": bench_compare, "workers": bench_workers, "memory": bench_memory}[args.mode]
    out = fn(args)
    out["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                      "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    for row in out["rows"]:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    for k, v in out.items():
        if k not in ("rows", "machine"):
            print(f"{k}: {v}")
    RESULTS.mkdir(exist_ok=True)
    tag = args.device.replace(":", "") if args.mode in ("estep", "compare") else args.mode
    if args.mode == "estep" and (args.psi_step, args.offset_step) != (12.0, 2.0):
        tag += f"_{args.psi_step:g}deg{args.offset_step:g}px"
    if args.mode == "estep" and args.maxsig is not None:
        tag += f"_maxsig{args.maxsig}"
    if args.mode == "compare" and (args.n, args.K) != (20000, 50):
        tag += f"_{args.n}_K{args.K}"
    if args.mode == "compare" and args.algorithms != "vdam,em":
        tag += "_" + args.algorithms.replace(",", "_") + f"{args.em_iter if 'em' in args.algorithms.split(',') else args.vdam_iter}"
    (RESULTS / f"class2d_{args.mode}_{tag}.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
