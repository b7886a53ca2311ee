"""3D auto-refinement benchmark (issue 5 item 5). Prints a table and writes JSON.

    python benchmarks/refine3d.py [--seeds 3] [--n 1000] [--box 24]

For an asymmetric phantom (refined in C1) and a D2 phantom (refined in C1 and in D2): simulate
particles, refine from the truth low-passed to 30 A (``--ini_high 30``), and report the
resolution of the final map against the truth (FSC 0.143), the gold-standard and post-processed
resolutions, the iterations and the wall time. Success: FSC-to-truth 0.143 within 1.15x the
Nyquist resolution. The D2 rows show what imposing the group buys.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def run_one(phantom: str, sym: str, seed: int, args, work: Path) -> dict:
    from autospa.io.postprocess_files import read_volume, write_volume
    from autospa.jobs.refine3d import Refine3DOptions, run_refine3d
    from autospa.numerics.fsc import fsc
    from autospa.refinement.autorefine import resolution_shell_of
    from autospa.refinement.postprocess import low_pass
    from autospa.simulate.datasets import write_particle_dataset

    from autospa.simulate.phantoms import pseudo_atomic_phantom

    base = work / f"{phantom}_{sym}_{seed}"
    base.mkdir(parents=True, exist_ok=True)
    # atoms of atom_sigma pixels: the map holds signal out to Nyquist (the simulator's default
    # atoms, 1.1 px, leave almost none beyond 1.2x Nyquist, where no refinement can follow)
    vol = pseudo_atomic_phantom(args.box, args.px, seed=seed, symmetry=phantom, atom_sigma_a=args.atom_sigma * args.px)
    phantom_map = write_volume(base / "phantom.mrc", vol, args.px)
    ds = write_particle_dataset(base, n=args.n, box=args.box, pixel_size_a=args.px, n_classes=1, snr=args.snr,
                                junk_fraction=0.0, seed=seed, map_path=phantom_map)
    truth, _ = read_volume(ds.maps[0])
    ref = write_volume(base / "ref.mrc", low_pass(truth.double(), 30.0, args.px).float(), args.px)
    t = time.perf_counter()
    res = run_refine3d(Refine3DOptions(str(ds.particles_star), str(base / "r3d" / "run"), str(ref), symmetry=sym,
                                       particle_diameter_a=0.6 * args.box * args.px, ini_high=30.0,
                                       healpix_order=args.order, max_healpix_order=args.max_order,
                                       auto_local_healpix_order=args.local_order, random_seed=seed,
                                       device=args.device))
    wall = time.perf_counter() - t
    final, _ = read_volume(base / "r3d" / "run_class001.mrc")
    curve = fsc(final.double(), truth.double())
    res_truth = args.box * args.px / resolution_shell_of(curve)
    nyquist = 2 * args.px
    return {"phantom": phantom, "symmetry": sym, "seed": seed, "seconds": wall, "iterations": res["iteration"],
            "resolution_vs_truth_a": res_truth, "gold_standard_a": res["resolution_a"],
            "postprocess_a": res["final_resolution_a"], "success": res_truth <= 1.15 * nyquist}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--box", type=int, default=24)
    p.add_argument("--px", type=float, default=6.0)
    p.add_argument("--snr", type=float, default=0.2)
    p.add_argument("--atom_sigma", type=float, default=0.6, help="phantom atom width in pixels (default 0.6)")
    p.add_argument("--order", type=int, default=2)
    p.add_argument("--max_order", type=int, default=4)
    p.add_argument("--local_order", type=int, default=3, help="local searches from this HEALPix order on")
    p.add_argument("--cases", default="C1/C1,D2/C1,D2/D2", help="phantom/symmetry pairs")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--tag", default="", help="suffix of the results file name")
    args = p.parse_args()
    rows = []
    cases = [tuple(c.split("/")) for c in args.cases.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for phantom, sym in cases:
            for seed in range(args.seeds):
                r = run_one(phantom, sym, seed, args, Path(tmp))
                rows.append(r)
                print(f"{phantom} phantom, {sym} refinement, seed {seed}: vs truth {r['resolution_vs_truth_a']:.1f} A, "
                      f"gold-standard {r['gold_standard_a']:.1f} A, post-processed {r['postprocess_a']:.1f} A, "
                      f"{r['iterations']} it, {r['seconds']:.0f} s {'ok' if r['success'] else 'FAIL'}", flush=True)
    summary = {}
    print(f"\n{'phantom/sym':12s} {'success':>8s} {'med. res vs truth A':>20s} {'med. s':>7s}")
    for phantom, sym in cases:
        rs = [r for r in rows if r["phantom"] == phantom and r["symmetry"] == sym]
        ok = sum(r["success"] for r in rs)
        med = sorted(r["resolution_vs_truth_a"] for r in rs)[len(rs) // 2]
        med_t = sorted(r["seconds"] for r in rs)[len(rs) // 2]
        summary[f"{phantom}/{sym}"] = {"success": ok, "runs": len(rs), "median_resolution_vs_truth_a": med, "median_seconds": med_t}
        print(f"{phantom + '/' + sym:12s} {ok:>4d}/{len(rs):<3d} {med:20.1f} {med_t:7.0f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"refine3d{args.tag}.json"
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    out.write_text(json.dumps({"machine": platform.platform(), "device": device, "threads": torch.get_num_threads(), "args": vars(args),
                               "runs": rows, "summary": summary}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
