"""CUDA check of numerics/ and the particle simulator: device follows input, results match the CPU.

Runs (each skipped with a message when its imports are missing on the machine):

* adjoint test of project_fourier / backproject_fourier on CUDA (float32 and float64);
* ctf_2d and project_real on CUDA against the CPU result;
* simulate_2d_classes on CUDA: measured SNR and agreement with the CPU run of the same seed;
* timings: 500 projections / back-projections of a 64^3 volume on CUDA (ours, and
  torch-fourier-slice when installed).

Usage: ``PYTHONPATH=src python benchmarks/cuda_numerics_check.py`` (prints one JSON document;
``AUTOSPA_CHECK_DEVICE=cpu`` runs the same on the CPU).
"""

from __future__ import annotations

import json
import math
import os
import time

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _best(fn, repeat: int = 3) -> float:
    fn()
    _sync()
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    out: dict = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    dev = torch.device(os.environ.get("AUTOSPA_CHECK_DEVICE", "cuda"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(json.dumps(out))
        return
    out["device"] = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    from autospa.conventions import euler_to_matrix
    from autospa.numerics import ctf as C
    from autospa.numerics import projection as P

    gen = torch.Generator().manual_seed(0)
    box = 32
    h = P.grid_half(box, 2)
    for dtype in (torch.float32, torch.float64):
        x = torch.complex(torch.randn(2 * h + 1, 2 * h + 1, h + 1, generator=gen, dtype=dtype),
                          torch.randn(2 * h + 1, 2 * h + 1, h + 1, generator=gen, dtype=dtype)).to(dev)
        a = torch.rand(40, 3, generator=gen, dtype=torch.float64) * torch.tensor([360.0, 180.0, 360.0])
        rots = euler_to_matrix(a[:, 0], a[:, 1], a[:, 2]).to(dev, dtype)
        px = P.project_fourier(P.VolumeFT(x, box, 2), rots)
        v = torch.complex(torch.randn(px.shape, dtype=dtype), torch.randn(px.shape, dtype=dtype)).to(dev)
        ptv, _ = P.backproject_fourier(v, None, rots, box, 2)
        lhs = float((v.conj() * px).real.sum())
        rhs = float((ptv.conj() * x).real.sum())
        out[f"adjoint_rel_{str(dtype)[6:]}"] = abs(lhs - rhs) / abs(lhs)
        out[f"adjoint_device_{str(dtype)[6:]}"] = str(ptv.device)
    du = torch.tensor([12000.0, 20000.0], dtype=torch.float64)
    cpu = C.ctf_2d(du, du - 300, torch.tensor([10.0, 70.0]), 300.0, 2.7, 0.1, 1.2, 64)
    gpu = C.ctf_2d(du.to(dev), (du - 300).to(dev), torch.tensor([10.0, 70.0], device=dev), 300.0, 2.7, 0.1, 1.2, 64)
    out["ctf_max_diff_cpu_gpu"] = float((gpu.cpu() - cpu).abs().max())
    out["ctf_device"] = str(gpu.device)
    vol = torch.rand(48, 48, 48, generator=gen)
    a = torch.rand(20, 3, generator=gen, dtype=torch.float64) * torch.tensor([360.0, 180.0, 360.0])
    rots = euler_to_matrix(a[:, 0], a[:, 1], a[:, 2]).float()
    pc = P.project_real(vol, rots)
    pg = P.project_real(vol.to(dev), rots.to(dev))
    out["project_rel_diff_cpu_gpu"] = float((pg.cpu() - pc).norm() / pc.norm())

    # timings, 64^3 volume, 500 projections
    vol = torch.rand(64, 64, 64, generator=gen).to(dev)
    a = torch.rand(500, 3, generator=gen, dtype=torch.float64) * torch.tensor([360.0, 180.0, 360.0])
    rots = euler_to_matrix(a[:, 0], a[:, 1], a[:, 2]).float().to(dev)
    vft = P.prepare_volume_ft(vol, 2)
    slices = P.project_fourier(vft, rots)
    out["ours_project_500_s"] = _best(lambda: P.project_fourier(vft, rots))
    out["ours_project_real_500_s"] = _best(lambda: P.project_real(vol, rots))
    out["ours_backproject_500_s"] = _best(lambda: P.backproject_fourier(slices, None, rots, 64, 2))
    try:
        import torch_fourier_slice as tfs

        mats = rots.transpose(-1, -2)
        imgs = tfs.project_3d_to_2d(vol, mats, pad_factor=2.0)
        out["tfs_project_500_s"] = _best(lambda: tfs.project_3d_to_2d(vol, mats, pad_factor=2.0))
        out["tfs_backproject_500_s"] = _best(lambda: tfs.backproject_2d_to_3d(imgs, mats, pad_factor=2.0))
    except Exception as exc:  # noqa: BLE001 - optional comparison
        out["tfs"] = f"skipped: {type(exc).__name__}: {exc}"

    try:
        from autospa.simulate.particles import simulate_2d_classes
    except Exception as exc:  # noqa: BLE001 - pandas etc. may be missing on the device image
        out["simulate"] = f"skipped: {type(exc).__name__}: {exc}"
    else:
        t0 = time.perf_counter()
        g = simulate_2d_classes(n=2000, n_classes=3, box=64, pixel_size_a=2.0, snr=0.05, seed=0, device=dev,
                                return_clean=True, junk_fraction=0.1)
        _sync()
        out["simulate_2000_cuda_s"] = time.perf_counter() - t0
        good = torch.as_tensor(g.truth["rlnAutospaIsJunk"].to_numpy() == 0, device=dev)
        out["simulate_cuda_snr"] = float(g.clean[good].flatten(1).var(1).mean() / (g.images[good] - g.clean[good]).flatten(1).var(1).mean())
        out["simulate_device"] = str(g.images.device)
        c = simulate_2d_classes(n=200, n_classes=3, box=64, pixel_size_a=2.0, snr=0.05, seed=0, return_clean=True,
                                junk_fraction=0.1)
        gg = simulate_2d_classes(n=200, n_classes=3, box=64, pixel_size_a=2.0, snr=0.05, seed=0, device=dev,
                                 return_clean=True, junk_fraction=0.1)
        out["simulate_clean_rel_diff_cpu_gpu"] = float((gg.clean.cpu() - c.clean).norm() / c.clean.norm())
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
