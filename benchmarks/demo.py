"""``autospa demo`` end to end (issue 10: <= 20 minutes on 2 CPU cores). Prints the time of each
stage, the gold-standard and the against-truth resolution, and writes JSON.

    python benchmarks/demo.py [--movies 24] [--engine prefect] [--j 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--movies", type=int, default=24)
    p.add_argument("--engine", choices=("prefect", "plain"), default="prefect")
    p.add_argument("--j", type=int, default=2, help="local dask workers")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    from autospa.distributed.cluster import get_client
    from autospa.jobs.demo import PipelineDemoSettings, run_pipeline_demo

    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("PREFECT_HOME", str(Path(tmp) / "prefect"))
        t = time.perf_counter()
        with get_client(n_workers=args.j):
            res = run_pipeline_demo(Path(tmp) / "demo", PipelineDemoSettings(n_movies=args.movies), engine=args.engine,
                                    announce=lambda m: print(m, flush=True))
        wall = time.perf_counter() - t
    row = {"movies": args.movies, "engine": args.engine, "workers": args.j, "cpus": os.cpu_count(), "seconds": wall,
           "stage_seconds": res.stage_seconds, "particles_refined": res.n_particles_refined,
           "final_resolution_a": res.final_resolution_a, "resolution_vs_truth_a": res.resolution_vs_truth_a,
           "scheme_status": res.scheme_status}
    print(f"\n{'stage':10s} {'s':>7s}")
    for k, v in res.stage_seconds.items():
        print(f"{k:10s} {v:7.0f}")
    print(f"{'total':10s} {wall:7.0f}")
    print(f"rlnFinalResolution {res.final_resolution_a} A, against the truth {res.resolution_vs_truth_a} A, "
          f"{res.n_particles_refined} particles")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"demo{args.tag}.json"
    out.write_text(json.dumps({"machine": platform.platform(), **row}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
