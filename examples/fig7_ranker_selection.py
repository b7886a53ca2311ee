"""Automated 2D class selection with the shipped class ranker: particle FPR and FNR against the
truth, per data set and over thresholds (the RELION-4.0 paper's Figure 7, on simulated data).

Each "data set" is a simulated 2D classification job made exactly as the ranker's training corpus
(``autospa.jobs.ranker_train``: a seeded mix of structures, SNR, junk of several kinds, too few
particles or a wrong box; classified with our VDAM 2D classification). The specifications are drawn
with a seed the shipped weights were never trained or validated on (``--seed``, default 7; the
weights used seed 0). Every class is scored by the shipped network (``autospa rank``'s scoring:
``autospa.jobs.rank.load_ranker`` + ``autospa.ranker.network.predict_scores``) and the classes with
``score >= t`` are selected.

The paper compares with a *manual* selection; here the reference is the simulator's truth: the
particles that are real (not junk). As in the paper (its Figure 7 legend):

* FPR = particles selected but not in the reference / particles in the reference;
* FNR = particles in the reference but not selected / particles in the reference;
* three thresholds per data set: the shipped model's default (calibrated on its training jobs,
  ``autospa rank``'s default ``--min_score``), the paper's relion_it default 0.15, and a
  "supervised" threshold T chosen for that data set (the one minimising max(FPR, FNR)).

Printed: one row per data set (the bars of the paper's figure), the pooled rates over a range of
thresholds, and the mean over data sets.

Usage::

    python examples/fig7_ranker_selection.py --quick          # 3 small data sets, a few minutes on 2 cores
    python examples/fig7_ranker_selection.py                  # 12 data sets (the paper's count)
    python examples/fig7_ranker_selection.py --device cuda --work /scratch/fig7

Finished data sets are kept in ``--work`` (default: a temporary folder) and reused by a later run.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

PAPER_DEFAULT = 0.15  # relion_it.py's default score threshold (paper)
THRESHOLDS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)


def _quick(spec):
    """A smaller, faster job of the same kind (fewer particles and mini-batches)."""
    return dataclasses.replace(spec, n_particles=min(spec.n_particles, 300), n_iter=min(spec.n_iter, 15))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 small data sets (300 particles, 15 VDAM mini-batches)")
    ap.add_argument("--n", type=int, default=None, help="number of data sets (default 12, --quick 3)")
    ap.add_argument("--seed", type=int, default=7, help="seed of the data-set specifications (the shipped weights used 0)")
    ap.add_argument("--weights", default=None, help="ranker model file (default: the shipped weights)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (simulation, classification and scoring)")
    ap.add_argument("--work", default=None, help="folder for the simulated jobs (default: a temporary folder)")
    args = ap.parse_args()

    from autospa.jobs.rank import load_ranker
    from autospa.jobs.ranker_train import cached_job_examples, corpus_specs, make_corpus_job
    from autospa.ranker.network import predict_scores
    from autospa.ranker.train import calibrate_threshold, pooled_rates

    n = args.n or (3 if args.quick else 12)
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="fig7_")
    work = Path(args.work or tmp.name) / ("quick" if args.quick else "full")
    ranker = load_ranker(args.weights, args.device)
    default = ranker.default_threshold if ranker.default_threshold is not None else 0.5
    specs = corpus_specs(n, seed=args.seed)
    if args.quick:
        specs = [_quick(s) for s in specs]

    t0 = time.perf_counter()
    jobs = []
    for spec in specs:
        t = time.perf_counter()
        job_dir = make_corpus_job(spec, work, device=args.device)
        ex = cached_job_examples(job_dir)
        scores = predict_scores(ranker.model, ex.images, ex.features) if ex.class_numbers.numel() else torch.zeros(0)
        jobs.append((spec, ex, (ex.class_numbers, scores, ex.particle_class, ex.particle_real)))
        print(f"  {spec.name}: {spec.n_particles} particles, {spec.n_structures} structure(s), K={spec.n_classes}, "
              f"SNR {spec.snr:.3f}, junk {100 * spec.junk_fraction:.0f}%"
              + (f", particles {spec.particle_scale:.1f}x the box" if spec.particle_scale != 1.0 else "")
              + f" ({time.perf_counter() - t:.0f} s)", flush=True)

    def pct_selected(sel, t: float) -> float:
        classes, scores, pclass, _real = sel
        return 100.0 * float(torch.isin(pclass, classes[scores >= t]).double().mean()) if pclass.numel() else 0.0

    print()
    print(f"Figure 7 (simulated): particle selection by the shipped ranker ({ranker.path.name}); reference = real particles")
    head = (f"{'data set':9s} {'ref %':>6s} | {'t=' + format(default, '.2f'):>6s} {'FPR':>5s} {'FNR':>5s} | "
            f"{'t=0.15':>6s} {'FPR':>5s} {'FNR':>5s} | {'T':>5s} {'t=T %':>6s} {'FPR':>5s} {'FNR':>5s}")
    print(head)
    print("-" * len(head))
    sums = []
    for spec, ex, sel in jobs:
        ref = 100.0 * float(ex.particle_real.double().mean())
        f_d, n_d = pooled_rates([sel], default)
        f_p, n_p = pooled_rates([sel], PAPER_DEFAULT)
        t_sup, f_s, n_s = calibrate_threshold([sel])
        sums.append((f_d, n_d, f_p, n_p, f_s, n_s))
        print(f"{spec.name:9s} {ref:6.1f} | {pct_selected(sel, default):6.1f} {f_d:5.2f} {n_d:5.2f} | "
              f"{pct_selected(sel, PAPER_DEFAULT):6.1f} {f_p:5.2f} {n_p:5.2f} | {t_sup:5.2f} {pct_selected(sel, t_sup):6.1f} "
              f"{f_s:5.2f} {n_s:5.2f}")
    m = [sum(c) / len(sums) for c in zip(*sums, strict=True)]
    print("-" * len(head))
    print(f"{'mean':9s} {'':6s} | {'':6s} {m[0]:5.2f} {m[1]:5.2f} | {'':6s} {m[2]:5.2f} {m[3]:5.2f} | {'':5s} {'':6s} "
          f"{m[4]:5.2f} {m[5]:5.2f}")
    n_under = sum(1 for s in sums if s[4] < 0.25 and s[5] < 0.25)
    print(f"data sets with FPR and FNR below 0.25 at their supervised threshold: {n_under} of {len(sums)} (paper: 12 of 12)")

    print()
    print("pooled over all data sets:")
    print(f"{'threshold':>9s} {'FPR':>6s} {'FNR':>6s}")
    for t in sorted(set(THRESHOLDS) | {round(default, 4)}):
        fpr, fnr = pooled_rates([s for _, _, s in jobs], t)
        print(f"{t:9.2f} {fpr:6.3f} {fnr:6.3f}" + ("   <- model default" if abs(t - default) < 1e-9 else ""))
    print(f"\n{len(jobs)} data sets in {time.perf_counter() - t0:.0f} s (device {args.device}, {torch.get_num_threads()} torch threads)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
