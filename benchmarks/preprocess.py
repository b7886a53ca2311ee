"""Throughput of the preprocessing numerics: micrographs per second for motion correction, CTF
estimation and LoG picking, on CPU threads or a GPU (``--device cuda``).

Each movie is simulated with known drift (autospa.simulate.movies: a CTF-filtered specimen canvas,
global + local drift, shot noise at the given dose), then timed through
:func:`autospa.preprocess.motion.motion_correct` (gain, global + 5 x 5 patch alignment, dose
weighting), :func:`autospa.preprocess.ctffind.estimate_ctf` on the corrected sum and
:func:`autospa.preprocess.pick_log.pick_log`. The accuracy of each run (drift RMS against the truth,
defocus error) is printed with the timings, so a fast but wrong run shows.

Only torch, numpy, scipy and pandas are needed (no file I/O), so it runs on a bare GPU machine with
``PYTHONPATH=src``::

    python benchmarks/preprocess.py --size 1024 --frames 16 --movies 3 --threads 2
    python benchmarks/preprocess.py --device cuda --size 4096 --frames 32 --movies 3 --json out.json

Prints a table and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import numpy as np
import torch

from autospa.io.atomic import write_text
from autospa.numerics.ctf import ctf_2d
from autospa.preprocess.ctffind import estimate_ctf
from autospa.preprocess.motion import motion_correct
from autospa.preprocess.pick_log import pick_log
from autospa.simulate.movies import render_frames, simulate_drift


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _canvas(n: int, margin: int, pixel: float, defocus: tuple[float, float, float], seed: int, device) -> torch.Tensor:
    """Relative intensity of a specimen: CTF-filtered amorphous texture plus dark globular blobs."""
    big = n + 2 * margin
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pot = torch.randn(big, big, generator=gen, dtype=torch.float32) * 0.35
    rng = np.random.default_rng(seed)
    r = 75.0 / pixel
    half = int(math.ceil(r)) + 1
    off = torch.arange(-half, half + 1, dtype=torch.float32)
    for cx, cy in rng.uniform(half, big - half - 1, size=(max(1, big * big // int(25 * r * r)), 2)):
        x0, y0 = int(cx), int(cy)
        dy, dx = torch.meshgrid(off + y0 - float(cy), off + x0 - float(cx), indexing="ij")
        pot[y0 - half : y0 + half + 1, x0 - half : x0 + half + 1] += torch.sqrt((1 - (dx**2 + dy**2) / r**2).clamp_min(0))
    ctf = ctf_2d(*defocus, 300.0, 2.7, 0.1, pixel, big, bfactor_a2=40.0)[0]
    img = -torch.fft.irfft2(torch.fft.rfft2(pot) * ctf, s=(big, big))
    return (1.0 + 0.15 * img / img.std()).clamp_min(0.05).to(device)


def run(device: torch.device, size: int, frames: int, movies: int, pixel: float, dose: float, patches: int) -> dict:
    margin = 24
    rows = []
    for m in range(movies + 1):  # the first movie warms up (kernels, caches) and is not counted
        defocus = (12000.0 + 3000.0 * m, 11000.0 + 3000.0 * m, 30.0 * m)
        drift = simulate_drift(frames, (size, size), seed=m, global_px=6.0, local_px=1.0)
        canvas = _canvas(size, margin, pixel, defocus, seed=m, device=device)
        expected = render_frames(canvas, margin, drift) * (dose * pixel**2)
        gen = torch.Generator(device=device).manual_seed(m)
        movie = torch.poisson(expected, generator=gen)
        del expected
        _sync(device)
        t0 = time.perf_counter()
        res = motion_correct(movie, pixel, dose_per_frame=dose, patch_x=patches, patch_y=patches)
        _sync(device)
        t1 = time.perf_counter()
        fit = estimate_ctf(res.micrograph, pixel, 300.0, 2.7, 0.1, box=512)
        _sync(device)
        t2 = time.perf_counter()
        picks = pick_log(res.micrograph, pixel, 130.0, 170.0)
        _sync(device)
        t3 = time.perf_counter()
        truth = -drift.global_px.numpy()
        rms = float(np.sqrt(((res.shifts_px.cpu().numpy() - truth) ** 2).sum(1).mean()))
        row = {
            "movie": m,
            "motion_s": t1 - t0,
            "ctf_s": t2 - t1,
            "log_s": t3 - t2,
            "drift_rms_px": rms,
            "defocus_u_error_a": abs(fit.defocus_u_a - defocus[0]),
            "defocus_v_error_a": abs(fit.defocus_v_a - defocus[1]),
            "picks": int(len(picks.coords_px)),
        }
        del movie, res
        if m > 0:
            rows.append(row)
        print(
            f"  movie {m}{' (warm-up)' if m == 0 else ''}: motion {row['motion_s']:.2f} s, ctf {row['ctf_s']:.2f} s, "
            f"LoG {row['log_s']:.2f} s; drift RMS {rms:.3f} px, defocus error {row['defocus_u_error_a']:.0f}/"
            f"{row['defocus_v_error_a']:.0f} A",
            flush=True,
        )

    def rate(key: str) -> float:
        return len(rows) / sum(r[key] for r in rows)

    return {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "host": platform.node(),
        "size": size,
        "frames": frames,
        "pixel_size_a": pixel,
        "patches": f"{patches}x{patches}",
        "movies": len(rows),
        "motion_mics_per_s": rate("motion_s"),
        "ctf_mics_per_s": rate("ctf_s"),
        "log_mics_per_s": rate("log_s"),
        "max_drift_rms_px": max(r["drift_rms_px"] for r in rows),
        "max_defocus_error_a": max(max(r["defocus_u_error_a"], r["defocus_v_error_a"]) for r in rows),
        "runs": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--size", type=int, default=1024, help="movie width = height in pixels")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--movies", type=int, default=3, help="timed movies (one more warms up)")
    p.add_argument("--pixel", type=float, default=1.0, help="pixel size, A")
    p.add_argument("--dose", type=float, default=1.2, help="e/A^2 per frame")
    p.add_argument("--patches", type=int, default=5)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"preprocessing throughput on {device} ({args.threads} CPU threads), {args.size}^2 x {args.frames} frames", flush=True)
    out = run(device, args.size, args.frames, args.movies, args.pixel, args.dose, args.patches)
    print()
    print("| device | movie | motion mics/s | CTF mics/s | LoG mics/s | max drift RMS px | max defocus err A |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {out['device']} ({out['threads']} thr) | {args.size}^2 x {args.frames} | {out['motion_mics_per_s']:.3f} | "
        f"{out['ctf_mics_per_s']:.3f} | {out['log_mics_per_s']:.3f} | {out['max_drift_rms_px']:.3f} | "
        f"{out['max_defocus_error_a']:.0f} |"
    )
    if args.json:
        write_text(args.json, json.dumps(out, indent=2))
    assert math.isfinite(out["motion_mics_per_s"])


if __name__ == "__main__":
    main()
