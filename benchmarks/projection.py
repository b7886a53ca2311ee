"""3D central-slice projection: our numerics.projection against teamtomo's torch-fourier-slice.

DESIGN.md section 6 asks to choose the projector by measurement, behind one signature. This script
times both on the same volume and rotations and measures their accuracy against an analytical
answer: the volume is a sum of Gaussian blobs, whose projection for RELION's matrix A is a sum of
2D Gaussians at ``(A r)_xy`` with peak ``w * sqrt(2 pi) * sigma`` (continuous integral along z).

For each implementation it reports

* project: seconds for P projections of a D^3 volume (after one warm-up call), best of ``--repeat``;
* backproject: seconds to insert the P slices back into a 3D grid (data and weights);
* rel_error: ``||p - p_true|| / ||p_true||`` over all projections (both with pad 2 and their own
  gridding/sampling choices; ours with RELION's sinc^2 pre-correction);
* adjoint: ``|<P v, x> - <v, P^T x>| / |<P v, x>|`` on random complex data (ours only: the
  torch-fourier-slice back-projection normalises by its weights, so it is not the adjoint).

Usage::

    .venv/bin/python benchmarks/projection.py                 # D=64, P=500
    .venv/bin/python benchmarks/projection.py --box 96 --n 200 --device cuda

Results go to benchmarks/results/projection.json. Measured (2026-11-27): CPU, 2 threads (loaded
machine): ours 0.10 s / 0.10 s (project / back-project), error 1.7 %; torch-fourier-slice 0.58 s /
2.7 s, error 0.8 %. H200 (torch 2.11 cu130): ours 0.003 s / 0.002 s; torch-fourier-slice 0.008 s /
0.031 s (benchmarks/results/projection_cuda_h200.json). Decision: ours, behind
``numerics.projection`` (faster, exact adjoint, RELION's conventions); use pad 3 where the 1.7 %
interpolation error matters.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from autospa.conventions import euler_to_matrix
from autospa.numerics import projection as proj

RESULTS = Path(__file__).resolve().parent / "results" / "projection.json"


def blobs(box: int, n: int, sigma: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A volume of ``n`` Gaussian blobs; returns (volume, positions (n, 3) xyz px from centre, weights)."""
    pos = (torch.rand(n, 3, generator=gen, dtype=torch.float64) - 0.5) * 0.5 * box
    w = 0.5 + torch.rand(n, generator=gen, dtype=torch.float64)
    c = torch.arange(box, dtype=torch.float64) - box // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    vol = torch.zeros(box, box, box, dtype=torch.float64)
    for p, wi in zip(pos, w):
        vol += wi * torch.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / (2 * sigma**2))
    return vol, pos, w


def analytic_projections(box: int, rots: torch.Tensor, pos: torch.Tensor, w: torch.Tensor, sigma: float) -> torch.Tensor:
    """Exact projections ``(P, box, box)`` of the blob volume for RELION matrices ``rots``."""
    c = torch.arange(box, dtype=torch.float64) - box // 2
    y, x = torch.meshgrid(c, c, indexing="ij")
    moved = torch.einsum("pij,nj->pni", rots, pos)  # (P, n, 3)
    out = torch.zeros(rots.shape[0], box, box, dtype=torch.float64)
    amp = math.sqrt(2 * math.pi) * sigma
    for k in range(pos.shape[0]):
        mx = moved[:, k, 0, None, None]
        my = moved[:, k, 1, None, None]
        out += w[k] * amp * torch.exp(-((x - mx) ** 2 + (y - my) ** 2) / (2 * sigma**2))
    return out


def _best(fn, repeat: int) -> tuple[float, object]:
    fn()  # warm-up
    best, res = math.inf, None
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, res


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm((a - b).flatten()) / torch.linalg.norm(b.flatten()))


def run(box: int, n: int, repeat: int, device: str, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    vol64, pos, w = blobs(box, 12, 2.0, gen)
    angles = torch.rand(n, 3, generator=gen, dtype=torch.float64) * torch.tensor([360.0, 180.0, 360.0]) - torch.tensor(
        [180.0, 0.0, 180.0]
    )
    rots64 = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    truth = analytic_projections(box, rots64, pos, w, 2.0)
    vol = vol64.float().to(device)
    rots = rots64.float().to(device)
    rows: dict[str, dict] = {}

    # ---- ours
    def ours_project():
        return proj.project_real(vol, rots, pad=2)

    t_proj, p_ours = _best(ours_project, repeat)
    slices = proj.project_fourier(proj.prepare_volume_ft(vol, 2), rots)

    def ours_back():
        return proj.backproject_fourier(slices, None, rots, box, pad=2)

    t_back, _ = _best(ours_back, repeat)
    # adjoint on random data (float64)
    g = torch.Generator().manual_seed(seed + 1)
    h = proj.grid_half(box, 2)
    grid_shape = (2 * h + 1, 2 * h + 1, h + 1)
    x = torch.complex(torch.randn(grid_shape, generator=g, dtype=torch.float64), torch.randn(grid_shape, generator=g, dtype=torch.float64))
    px = proj.project_fourier(proj.VolumeFT(x, box, 2), rots64[:50])
    v = torch.complex(torch.randn(px.shape, generator=g, dtype=torch.float64), torch.randn(px.shape, generator=g, dtype=torch.float64))
    ptv, _ = proj.backproject_fourier(v, None, rots64[:50], box, 2)
    lhs = float((v.conj() * px).real.sum())
    rhs = float((ptv.conj() * x).real.sum())
    rows["autospa"] = {
        "project_s": t_proj,
        "backproject_s": t_back,
        "rel_error": _rel(p_ours.double().cpu(), truth),
        "adjoint_rel": abs(lhs - rhs) / abs(lhs),
    }

    # ---- torch-fourier-slice
    try:
        import torch_fourier_slice as tfs
    except ImportError as exc:  # pragma: no cover - optional comparison
        rows["torch-fourier-slice"] = {"error": f"not importable: {exc}"}
    else:
        # their matrices rotate the sampling coordinates (xyz column vectors); RELION's slice is at
        # A^T k, so pass A^T. Both conventions are tried and the closer one is reported.
        errs = {}
        for name, m in (("A^T", rots.transpose(-1, -2)), ("A", rots)):
            p = tfs.project_3d_to_2d(vol, m[:20], pad_factor=2.0)
            errs[name] = _rel(p.double().cpu(), truth[:20])
        conv = min(errs, key=errs.get)
        mats = rots.transpose(-1, -2) if conv == "A^T" else rots

        def tfs_project():
            return tfs.project_3d_to_2d(vol, mats, pad_factor=2.0)

        t_proj2, p_tfs = _best(tfs_project, repeat)

        def tfs_back():
            return tfs.backproject_2d_to_3d(p_tfs, mats, pad_factor=2.0)

        t_back2, _ = _best(tfs_back, repeat)
        rows["torch-fourier-slice"] = {
            "project_s": t_proj2,
            "backproject_s": t_back2,
            "rel_error": _rel(p_tfs.double().cpu(), truth),
            "matrix_convention": conv,
        }
    return {
        "box": box,
        "n_projections": n,
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "results": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    res = run(args.box, args.n, args.repeat, args.device)
    print(f"box {res['box']}, {res['n_projections']} projections, {res['device']}, torch {res['torch']}, {res['threads']} threads")
    print(f"{'implementation':22s} {'project s':>10s} {'backproject s':>14s} {'rel error':>10s} {'adjoint':>9s}")
    for name, r in res["results"].items():
        if "error" in r:
            print(f"{name:22s} {r['error']}")
            continue
        adj = f"{r['adjoint_rel']:.1e}" if "adjoint_rel" in r else "-"
        print(f"{name:22s} {r['project_s']:10.3f} {r['backproject_s']:14.3f} {r['rel_error']:10.2e} {adj:>9s}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
