"""E-step throughput on one device without dask/zarr (for bare GPU machines): particles/s at two
window sizes, and the E-step's agreement with the CPU result on the same particles.

    PYTHONPATH=src python benchmarks/estep_gpu_check.py [--n 4000] [--K 12]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from autospa.numerics.ctf import ctf_2d
from autospa.refinement import estep as es
from autospa.refinement import init as rinit
from autospa.refinement import mstep
from autospa.simulate.particles import simulate_2d_classes


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--K", type=int, default=12)
    args = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sim = simulate_2d_classes(n=args.n, n_classes=4, box=64, pixel_size_a=3.0, snr=0.05, seed=1, shift_sigma_px=1.5,
                              max_shift_px=4.0, return_clean=True)
    c = torch.arange(64, dtype=torch.float32) - 32
    r = torch.sqrt(c[:, None] ** 2 + c[None] ** 2)
    mask = torch.where(r < 25, 1.0, torch.where(r > 30, 0.0, 0.5 + 0.5 * torch.cos(math.pi * (r - 25) / 5)))
    tr = sim.truth
    ctf = ctf_2d(torch.tensor(tr.rlnDefocusU.values), torch.tensor(tr.rlnDefocusV.values),
                 torch.tensor(tr.rlnDefocusAngle.values), 300.0, 2.7, 0.1, 3.0, 64)
    ps, isum, n = rinit.power_sums(es.soft_mask_background(sim.images, mask))
    s2 = rinit.initial_sigma2(ps, isum, n)
    gen = torch.Generator().manual_seed(0)
    refs = torch.cat([sim.templates * (sim.clean.std() / sim.templates.std()),
                      rinit.blob_references(sim.templates[:1].repeat(args.K - 4, 1, 1), 50.0, gen) * 0.2])
    rows = []
    for psi_step, off_step in ((12.0, 2.0), (6.0, 1.0)):
        for current in (32, 64):
            cw = int(min(current, max(10, 2 * math.ceil(1.0 / math.radians(psi_step)))))
            model = es.EStepModel(mstep.reference_ft(refs, 2), s2[None].float(), torch.full((args.K,), -math.log(args.K)),
                                  2.0, current, cw, 2)
            sampling = es.Sampling(psi_step_deg=psi_step, offset_step_px=off_step, max_significants=5 * args.K)
            batch = es.ParticleBatch(sim.images.to(dev), ctf.to(dev), torch.zeros(args.n, 2, device=dev),
                                     torch.zeros(args.n, dtype=torch.long, device=dev), (torch.arange(args.n) % 2).to(dev))
            es.expectation(es.ParticleBatch(*(t[:256] for t in (batch.images, batch.ctf, batch.origin_px, batch.group, batch.half))),
                              model, sampling, mask.to(dev))
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.no_grad():
                stats, res = es.expectation(batch, model, sampling, mask.to(dev))
            if dev.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t
            acc = float((res.class_index.cpu() + 1 == torch.tensor(tr.rlnClassNumber.values)).float().mean())
            rows.append({"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", "psi_step": psi_step,
                         "offset_step": off_step, "current_size": current, "particles": args.n, "K": args.K,
                         "seconds": dt, "particles_per_s": args.n / dt, "class_accuracy": acc})
            print(rows[-1], flush=True)
    out = Path(__file__).resolve().parent / "results" / f"class2d_estep_{dev.type}_check.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
