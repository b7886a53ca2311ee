"""``autospa ranker``: build the class ranker's training corpus and train it.

Examples (see ``autospa ranker train --help``)::

    autospa ranker train --corpus ranker_corpus --o class_ranker.ckpt    # < 35 min of corpus here
    # the shipped weights (weights/README.md): three corpus folders, then one training run
    autospa ranker train --corpus rk_cpu --first 2000 --jobs 992 --workers 2 --time_limit 0 --o a.ckpt   # ~100 min, 2 cores
    autospa ranker train --corpus rk_gpu --first 1000 --jobs 400 --workers 15 --gpu_workers 3 --time_limit 250 --o b.ckpt
    autospa ranker train --corpus rk_local --first 0 --jobs 4 --o c.ckpt
    autospa ranker train --corpus rk_cpu rk_gpu rk_local --no_build --o class_ranker.ckpt   # 100 epochs, lr 5e-4, dropout 0.1

``train`` first completes the corpus (simulated 2D jobs classified with VDAM: jobs already
finished are kept, ``--time_limit`` stops starting new ones), then computes the features and the
truth-derived targets, trains with a job-level validation split, calibrates the default selection
threshold and writes the weights (RELION 5.0 checkpoint layout) and ``<o>.json`` with the report.
"""

from __future__ import annotations

import argparse
import sys
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ranker", help="class ranker: build the simulated training corpus, train the network",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="ranker_command", metavar="ACTION")
    t = sub.add_parser("train", help="build the corpus (if needed) and train", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--corpus", nargs="+", required=True, metavar="DIR", help="corpus folder(s); the first one is built/completed")
    t.add_argument("--o", dest="output", required=True, metavar="FILE", help="weights file to write (+ FILE.json report)")
    t.add_argument("--jobs", type=int, default=160, help="corpus size in 2D jobs (default 160)")
    t.add_argument("--first", type=int, default=0, help="index of the first corpus job (default 0)")
    t.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    t.add_argument("--workers", type=int, default=1, help="processes building the corpus (default 1)")
    t.add_argument("--gpu", action="store_true", help="build the corpus (every worker) and train on the GPU")
    t.add_argument("--gpu_workers", type=int, default=0, metavar="N", help="only the first N corpus workers use the GPU")
    t.add_argument("--time_limit", type=float, default=1800.0, metavar="S",
                   help="start no new corpus job after S seconds (default 1800: the corpus then takes under 35 minutes; 0: no limit)")
    t.add_argument("--no_build", action="store_true", help="train on the finished jobs only")
    t.add_argument("--epochs", type=int, default=100, help="training epochs (default 100, as the shipped weights)")
    t.add_argument("--lr", type=float, default=5e-4, help="Adam learning rate (default 5e-4, cosine decay)")
    t.add_argument("--batch_size", type=int, default=32, help="batch size (default 32)")
    t.add_argument("--dropout", type=float, default=0.1, help="dropout in training (default 0.1, as the shipped weights; RELION uses 0.3)")
    t.add_argument("--val_fraction", type=float, default=0.2, help="share of jobs held out (default 0.2)")
    t.add_argument("--final_train", action="store_true", help="train on every job (no held-out figures)")
    t.set_defaults(func=run_train)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_train(args: argparse.Namespace) -> int:
    from autospa.errors import InputError
    from autospa.jobs.ranker_train import build_corpus, train_ranker
    from autospa.ranker.train import TrainConfig

    if args.jobs < 1 or args.epochs < 1:
        raise InputError(None, "--jobs and --epochs must be positive")
    if not 0.0 <= args.val_fraction < 1.0:
        raise InputError(None, f"--val_fraction must be within [0, 1) (got {args.val_fraction})")
    t0 = time.time()
    device = "cuda" if args.gpu else "cpu"

    def say(text: str) -> None:
        print(f"[{time.time() - t0:7.0f} s] {text}", file=sys.stderr, flush=True)

    if not args.no_build:
        import os

        threads = max(1, (os.cpu_count() or 1) // max(1, args.workers))
        devices = (device,)
        if args.gpu_workers > 0:
            devices = ("cuda",) * min(args.gpu_workers, args.workers) + ("cpu",) * max(0, args.workers - args.gpu_workers)
        done = build_corpus(args.corpus[0], args.jobs, seed=args.seed, first_index=args.first, workers=args.workers,
                            devices=devices, torch_threads=threads, time_limit_s=args.time_limit or None,
                            progress=lambda name: say(f"corpus job {name} done"))
        say(f"corpus: {len(done)} finished jobs in {args.corpus[0]}")
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, dropout=args.dropout)
    rep = train_ranker(args.corpus, args.output, cfg, val_fraction=args.val_fraction, device=device,
                       progress=lambda s: say(s) if s.startswith("epoch") else None, final_train=args.final_train)
    print(f"trained on {rep['n_classes_train']} classes of {rep['n_jobs_train']} jobs in {rep['training_seconds']:.0f} s; "
          f"train MSE {rep['train_mse']:.4f}")
    if "validation_mse" in rep:
        print(f"validation ({rep['n_classes_validation']} classes of {rep['n_jobs_validation']} held-out jobs): MSE "
              f"{rep['validation_mse']:.4f}; at the default threshold {rep['default_threshold']:.2f}: particle FPR "
              f"{rep['validation_fpr']:.3f}, FNR {rep['validation_fnr']:.3f}")
    print(f"weights: {args.output} (report {args.output}.json)")
    return 0
