"""3D E-step throughput on one device, without dask or zarr (runs on bare GPU machines): global
searches (HEALPix order 2 and 3) and local searches (order 4, RELION's sigma of twice the fine
step) on simulated particles of a phantom, with the median pose error against the truth.
Prints a table and writes JSON.

    PYTHONPATH=src python benchmarks/estep3d_check.py [--n 2000] [--box 64] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from autospa.conventions import euler_to_matrix, matrix_to_euler
from autospa.numerics import slices
from autospa.numerics.ctf import ctf_2d
from autospa.numerics.sampling import angular_sampling_deg
from autospa.refinement import estep as es
from autospa.refinement.autorefine import angle_change_deg
from autospa.refinement import init as rinit
from autospa.refinement import mstep
from autospa.simulate.particles import simulate_particles
from autospa.simulate.phantoms import pseudo_atomic_phantom


def pose_error_deg(truth, res) -> torch.Tensor:
    return angle_change_deg(*(torch.tensor(truth[c].values) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")),
                            res.rot_deg.cpu(), res.tilt_deg.cpu(), res.psi_deg.cpu())


def turned(truth, deg: float, seed: int) -> torch.Tensor:
    """True orientations turned by ``deg`` about random axes (the priors of local searches)."""
    a = euler_to_matrix(*(torch.tensor(truth[c].values) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")))
    axis = torch.randn(len(a), 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w = axis / axis.norm(dim=1, keepdim=True) * math.radians(deg)
    skew = torch.zeros(len(a), 3, 3, dtype=torch.float64)
    skew[:, 0, 1], skew[:, 0, 2], skew[:, 1, 2] = -w[:, 2], w[:, 1], -w[:, 0]
    return torch.stack(matrix_to_euler(torch.linalg.matrix_exp(skew - skew.transpose(1, 2)) @ a), 1).float()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--px", type=float, default=2.5)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cases", default="global2,global3,local4")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    dev = torch.device(args.device)
    box, px, n = args.box, args.px, args.n
    vol = pseudo_atomic_phantom(box, px, seed=3, atom_sigma_a=max(2.0, 0.6 * px))
    imgs, truth = simulate_particles([vol], n, px, snr=args.snr, seed=1, shift_sigma_px=1.0, max_shift_px=2.0)
    ctf = ctf_2d(torch.tensor(truth.rlnDefocusU.values), torch.tensor(truth.rlnDefocusV.values),
                 torch.tensor(truth.rlnDefocusAngle.values), 300.0, 2.7, 0.1, px, box).float()
    ps, isum, cnt = rinit.power_sums(imgs.float())
    sigma2 = rinit.initial_sigma2(ps, isum, cnt).float()
    origin = torch.tensor(np.stack([truth.rlnOriginXAngst, truth.rlnOriginYAngst], 1) / px).float()
    # the map on the particles' greyscale: least squares at the true poses
    a = euler_to_matrix(*(torch.tensor(truth[c].values) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")))
    freqs, _ = es.rfft_frequencies(box)
    sl = slices.rotate_gather(mstep.reference_ft(vol[None], 2), slices.stencil(a.float(), freqs, box, 2))[0]
    sl = sl * ctf.reshape(n, -1)
    x = es.centered_rfft2(imgs.float()).reshape(n, -1) * torch.exp(-2j * math.pi * (origin @ freqs.T) / box)
    scale = float((sl.conj() * x).real.sum() / (sl.abs() ** 2).sum())
    ref_ft = mstep.reference_ft(vol[None] * scale, 2)
    rows = []
    for case in args.cases.split(","):
        order = int(case[-1])
        local = case.startswith("local")
        step = angular_sampling_deg(order + 1)
        current = box if local else min(box, 2 * int(box * px / 12.0))  # global searches at ~12 A
        coarse = min(current, max(10, 2 * math.ceil(1.0 / math.radians(angular_sampling_deg(order)))))
        model = es.EStepModel(ref_ft, sigma2[None], torch.zeros(1), 2.0, current, coarse, 2)
        sampling = es.Sampling(offset_range_px=1.0 if local else 3.0, offset_step_px=1.0 if local else 2.0,
                               healpix_order=order, max_significants=0 if local else 200,
                               local_sigma_deg=2 * step if local else 0.0)
        batch = es.ParticleBatch(imgs.float().to(dev), ctf.to(dev), origin.to(dev) if local else torch.zeros(n, 2, device=dev),
                                 torch.zeros(n, dtype=torch.long, device=dev), (torch.arange(n) % 2).to(dev),
                                 turned(truth, 1.5 * step, 0).to(dev) if local else None)
        with torch.no_grad():
            es.expectation(batch.subset(slice(0, min(n, 64))), model, sampling, None)  # warm-up
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            stats, res = es.expectation(batch, model, sampling, None)
            if dev.type == "cuda":
                torch.cuda.synchronize()
        dt = time.perf_counter() - t
        err = pose_error_deg(truth, res)
        rows.append({"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
                     "case": case, "box": box, "window": current, "fine_step_deg": step, "particles": n, "seconds": dt,
                     "particles_per_s": n / dt, "median_pose_error_deg": float(err.median()),
                     "class_weight": float(stats.class_weight.sum())})
        print(f"{rows[-1]['device']:28s} {case:8s} box {box} window {current:3d} fine {step:5.2f} deg: {dt:7.2f} s "
              f"{n / dt:8.1f} particles/s, median pose error {float(err.median()):5.2f} deg", flush=True)
    out = Path(__file__).resolve().parent / "results" / f"estep3d_{dev.type}{args.tag}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "args": vars(args), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
