"""Particle store: create and stream 100k and 1M particles with bounded memory.

For each size N this script runs three phases:

* create: write N random float16 64 x 64 images plus per-particle metadata into a new store,
  chunk by chunk (``StoreWriter.append``), never holding more than a chunk;
* stream: open the store lazily and compute the per-particle mean over every image with dask
  (a full pass over all chunks, threaded scheduler);
* chunks: the same means through ``read_store_chunk(path, start, stop)`` over
  ``stack.chunk_sources()``, one chunk at a time (what the map-reduce engines' tasks do).

Each phase is a fresh subprocess, so the peak RSS is per phase.

It reports wall time, throughput and the peak RSS of each subprocess (``ru_maxrss``), and the ratio
of the largest to the smallest size's peak RSS (target <= 1.5: memory does not grow with N).
The stores live in a temporary folder that is deleted afterwards. 1M x 64 x 64 float16 is 8.2 GB
on disk; the script checks the free space first.

Usage::

    .venv/bin/python benchmarks/store_stream.py                     # 100k and 1M
    .venv/bin/python benchmarks/store_stream.py --sizes 20000 100000 --workdir /scratch
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "store_stream.json"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def run_create(path: Path, n: int, box: int, chunk: int, seed: int) -> dict:
    import numpy as np
    import pandas as pd

    from autospa.io.zarr_store import create_store

    optics = [{"rlnOpticsGroup": 1, "rlnOpticsGroupName": "opticsGroup1", "rlnImagePixelSize": 1.1, "rlnImageSize": box}]
    rng = np.random.default_rng(seed)
    rss_before = _peak_rss_mb()
    t0 = time.perf_counter()
    with create_store(path, box, dtype="float16", optics=optics, chunk_size=chunk) as w:
        for start in range(0, n, chunk):
            k = min(chunk, n - start)
            images = rng.standard_normal((k, box, box), dtype=np.float32).astype(np.float16)
            mic = (np.arange(start, start + k) // 200).astype(np.int64)
            meta = pd.DataFrame(
                {
                    "rlnDefocusU": rng.uniform(8000, 25000, k),
                    "rlnAnglePsi": rng.uniform(-180, 180, k),
                    "rlnOpticsGroup": np.ones(k, np.int64),
                    "rlnMicrographName": [f"MotionCorr/job002/Movies/mic_{m:06d}.mrc" for m in mic],
                }
            )
            w.append(images, meta)
    seconds = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return {"seconds": seconds, "bytes": size, "peak_rss_mb": _peak_rss_mb(), "rss_after_imports_mb": rss_before}


def run_stream(path: Path) -> dict:
    import dask
    import numpy as np

    from autospa.io.zarr_store import open_store

    rss_before = _peak_rss_mb()
    t0 = time.perf_counter()
    stack = open_store(path)
    means = stack.images.mean(axis=(1, 2), dtype=np.float32)
    with dask.config.set(scheduler="threads"):
        m = means.compute()
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "n": int(m.shape[0]),
        "n_chunks": stack.n_chunks,
        "mean_of_means": float(m.mean()),
        "std_of_means": float(m.std()),
        "peak_rss_mb": _peak_rss_mb(),
        "rss_after_imports_mb": rss_before,
    }


def run_chunks(path: Path) -> dict:
    import numpy as np

    from autospa.io.zarr_store import open_store, read_store_chunk

    rss_before = _peak_rss_mb()
    t0 = time.perf_counter()
    stack = open_store(path)
    means = np.empty(stack.n_particles, np.float32)
    for store, start, stop in stack.chunk_sources():
        means[start:stop] = read_store_chunk(store, start, stop).mean(axis=(1, 2))
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "n": int(means.shape[0]),
        "mean_of_means": float(means.mean()),
        "peak_rss_mb": _peak_rss_mb(),
        "rss_after_imports_mb": rss_before,
    }


PHASES = {"create": None, "stream": run_stream, "chunks": run_chunks}


def _child(args: argparse.Namespace) -> None:
    if args.child == "create":
        out = run_create(Path(args.store), args.n, args.box, args.chunk, args.seed)
    else:
        out = PHASES[args.child](Path(args.store))
    print(json.dumps(out))


def _spawn(kind: str, store: Path, n: int, box: int, chunk: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--store", str(store), "--n", str(n), "--box", str(box), "--chunk", str(chunk)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{kind} {n} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _growth(row: dict, kind: str) -> float:
    """Peak RSS above the RSS after imports (MB), at least 1 MB."""
    return max(row[f"{kind}_peak_rss_mb"] - row[f"{kind}_rss_after_imports_mb"], 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--workdir", default=None, help="folder for the temporary stores (default: system temp)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--child", choices=tuple(PHASES), help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return

    need = max(args.sizes) * args.box * args.box * 2 * 1.1
    tmp = Path(tempfile.mkdtemp(prefix="autospa-store-bench-", dir=args.workdir))
    free = shutil.disk_usage(tmp).free
    if free < need:
        shutil.rmtree(tmp)
        sys.exit(f"not enough free space in {tmp.parent}: {free / 1e9:.1f} GB free, {need / 1e9:.1f} GB needed")
    rows = []
    try:
        for n in args.sizes:
            store = tmp / f"p{n}.zarr"
            c = _spawn("create", store, n, args.box, args.chunk)
            s = _spawn("stream", store, n, args.box, args.chunk)
            k = _spawn("chunks", store, n, args.box, args.chunk)
            assert s["n"] == k["n"] == n
            assert abs(s["mean_of_means"] - k["mean_of_means"]) < 1e-6  # both passes read the same data
            rows.append(
                {
                    "n_particles": n,
                    "box": args.box,
                    "chunk": args.chunk,
                    "gb_on_disk": c["bytes"] / 1e9,
                    "create_s": c["seconds"],
                    "create_mb_per_s": c["bytes"] / 1e6 / c["seconds"],
                    "create_peak_rss_mb": c["peak_rss_mb"],
                    "create_rss_after_imports_mb": c["rss_after_imports_mb"],
                    "stream_s": s["seconds"],
                    "stream_mb_per_s": c["bytes"] / 1e6 / s["seconds"],
                    "stream_peak_rss_mb": s["peak_rss_mb"],
                    "stream_rss_after_imports_mb": s["rss_after_imports_mb"],
                    "chunks_s": k["seconds"],
                    "chunks_mb_per_s": c["bytes"] / 1e6 / k["seconds"],
                    "chunks_peak_rss_mb": k["peak_rss_mb"],
                    "chunks_rss_after_imports_mb": k["rss_after_imports_mb"],
                    "mean_of_means": s["mean_of_means"],
                }
            )
            shutil.rmtree(store)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    small, large = rows[0], rows[-1]
    summary: dict = {"target_ratio": 1.5}
    for phase in ("create", "stream", "chunks"):
        summary[f"{phase}_peak_rss_ratio"] = large[f"{phase}_peak_rss_mb"] / small[f"{phase}_peak_rss_mb"]
    for phase in ("create", "stream", "chunks"):
        # the same ratio for the memory above the imports (torch, xarray, zarr: ~300 MB of the peak)
        summary[f"{phase}_growth_ratio"] = _growth(large, phase) / _growth(small, phase)
    hdr = (
        f"{'particles':>10} {'GB':>6} | {'create s':>8} {'MB/s':>6} {'RSS MB':>7} | {'stream s':>8} {'MB/s':>6} {'RSS MB':>7}"
        f" | {'chunks s':>8} {'MB/s':>6} {'RSS MB':>7}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        cells = [f"{r['n_particles']:>10,d} {r['gb_on_disk']:>6.2f}"]
        for phase in ("create", "stream", "chunks"):
            cells.append(f"{r[phase + '_s']:>8.1f} {r[phase + '_mb_per_s']:>6.0f} {r[phase + '_peak_rss_mb']:>7.0f}")
        print(" | ".join(cells))
    print(f"peak RSS ratio {large['n_particles']:,d} / {small['n_particles']:,d} (target <= 1.5):")
    for phase in ("create", "stream", "chunks"):
        print(
            f"  {phase:<7} {summary[phase + '_peak_rss_ratio']:.2f}"
            f"   (above the imports: {summary[phase + '_growth_ratio']:.2f},"
            f" {_growth(small, phase):.0f} -> {_growth(large, phase):.0f} MB)"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "store_stream",
                "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
                "rows": rows,
                "summary": summary,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
