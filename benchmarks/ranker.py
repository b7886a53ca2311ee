"""Class ranker: speed of the features and the network, and accuracy of a weights file on the
held-out jobs of a corpus.

Usage::

    PYTHONPATH=src python benchmarks/ranker.py --corpus ranker_corpus [--weights FILE] [--device cuda]

Prints a table and writes ``benchmarks/results/ranker.json``:

* feature extraction per class (24 features + the 64 x 64 image), over the corpus's classes;
* network inference per class at batch 1 and 256 (``--device``);
* a whole ``autospa rank`` run on one corpus job (read, features, scores, all outputs);
* on the corpus's validation jobs (the job-level split of training): MSE against the
  truth-derived targets and particle FPR / FNR (against the simulator's real particles) at
  thresholds 0.1 to 0.5 and at the model's calibrated default;
* the MSE floors of two oracles (``autospa.jobs.ranker_train.oracle_floors``) that know the job score and
  one truth quantity of each class exactly: its template match (what a class average shows) or its
  purity (the share of real particles, which an average mostly hides).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", nargs="+", required=True)
    ap.add_argument("--weights", default=None, help="model file (default: the shipped weights)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ranker.json"))
    args = ap.parse_args()

    from autospa.io.ranker_files import read_corpus_job
    from autospa.jobs.rank import RankOptions, load_ranker, run_rank
    from autospa.jobs.ranker_train import corpus_examples, inputs_of_job, is_validation_job, oracle_floors
    from autospa.ranker.network import predict_scores
    from autospa.ranker.train import evaluate_mse, pooled_rates

    device = torch.device(args.device)
    ranker = load_ranker(args.weights, args.device)
    out: dict = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "torch_threads": torch.get_num_threads(),
                 "weights": str(ranker.path), "default_threshold": ranker.default_threshold}
    jobs = sorted({p.parent for d in args.corpus for p in Path(d).glob("*/DONE")})
    if not jobs:
        raise SystemExit("no finished corpus jobs")
    # features
    n_cls, t_feat = 0, 0.0
    for j in jobs[:20]:
        job = read_corpus_job(j)[0]
        t0 = time.perf_counter()
        ji = inputs_of_job(job)
        t_feat += time.perf_counter() - t0
        n_cls += int(ji.kept.sum())
    out["feature_ms_per_class"] = 1000 * t_feat / max(1, n_cls)
    # network
    for b in (1, 256):
        x, y = torch.randn(b, 64, 64), torch.randn(b, 24)
        predict_scores(ranker.model, x, y)
        _sync(device)
        t0 = time.perf_counter()
        reps = 5
        for _ in range(reps):
            predict_scores(ranker.model, x, y)
        _sync(device)
        out[f"network_ms_per_class_batch{b}"] = 1000 * (time.perf_counter() - t0) / (reps * b)
    # a whole rank run
    job0 = read_corpus_job(jobs[0])[0]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run_rank(RankOptions(str(job0.optimiser_path), tmp, model=args.weights, device=args.device))
        out["rank_run_s"] = time.perf_counter() - t0
        out["rank_run_classes"] = job0.n_classes
    # accuracy on held-out jobs
    every = corpus_examples(args.corpus)
    ex = [e for e in every if is_validation_job(e.name)]
    out.update(oracle_floors([e for e in every if not is_validation_job(e.name)], ex))
    if ex and ranker.kind == "checkpoint":
        vi = torch.cat([e.images for e in ex])
        vf = torch.cat([e.features for e in ex])
        vt = torch.cat([e.targets for e in ex])
        out["validation_jobs"] = len(ex)
        out["validation_classes"] = int(vt.numel())
        out["validation_mse"] = evaluate_mse(ranker.model.cpu(), vi, vf, vt)
        sel = [(e.class_numbers, predict_scores(ranker.model, e.images, e.features), e.particle_class, e.particle_real) for e in ex]
        thresholds = [0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5] + ([ranker.default_threshold] if ranker.default_threshold else [])
        out["validation_fpr_fnr"] = {f"{t:.3g}": pooled_rates(sel, t) for t in thresholds}
    print(f"{'quantity':40s} value")
    for k, v in out.items():
        if isinstance(v, dict):
            for t, (fpr, fnr) in v.items():
                print(f"{'FPR / FNR at threshold ' + t:40s} {fpr:.3f} / {fnr:.3f}")
        else:
            print(f"{k:40s} {v:.4g}" if isinstance(v, float) else f"{k:40s} {v}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
