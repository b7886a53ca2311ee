"""``autospa rank``: score the classes of a 2D classification and select the good ones
(relion_class_ranker's options).

Example::

    autospa rank --opt Class2D/job008/run_it025_optimiser.star --o Select/job009/ --auto_select
    autospa rank --opt ... --o ... --auto_select --min_score 0.3
    autospa rank --opt ... --o ... --auto_select --select_quantile 0.6 --overrides keep.txt
    autospa rank --opt ... --o ... --model class_ranker_v1.0.ckpt      # RELION's weights

Writes rank_model.star (rlnClassScore), rank_data.star, rank_optimiser.star, features.npy,
images.npy, rank_classes.png and, with --auto_select, particles.star, class_averages.star
(rlnPredictedClassScore) and backup_selection.star. The default --min_score is the threshold
calibrated on autospa's validation corpus (stored with the shipped weights).

Overrides file: one ``CLASS 1|0`` (or ``+CLASS`` / ``-CLASS``) per line, or a STAR file with
rlnClassNumber and rlnSelected, or a backup_selection.star.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("rank", help="class ranker: score 2D classes and select them automatically",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--opt", required=True, metavar="STAR", help="the 2D job's run_itNNN_optimiser.star")
    p.add_argument("--o", dest="output", default="./", metavar="DIR", help="output directory (default ./)")
    p.add_argument("--auto_select", action="store_true", help="write the selection (particles.star, class_averages.star ...)")
    p.add_argument("--min_score", type=float, default=None, help="lowest selected score (default: the model's calibrated threshold)")
    p.add_argument("--max_score", type=float, default=999.0, help="highest selected score (default 999)")
    p.add_argument("--select_quantile", type=float, default=None, metavar="Q",
                   help="select the classes scoring at or above this quantile (0-1) of the job's scores instead")
    p.add_argument("--select_min_nr_particles", type=int, default=-1, metavar="N", help="add the best classes until N particles (-1: off)")
    p.add_argument("--select_min_nr_classes", type=int, default=-1, metavar="K", help="add the best classes until K classes (-1: off)")
    p.add_argument("--overrides", default=None, metavar="FILE", help="manual selection overrides (applied last)")
    p.add_argument("--model", "--fn_pytorch_model", dest="model", default=None, metavar="FILE",
                   help="model file: autospa / RELION 5.0 checkpoint or RELION 4.0 TorchScript (default: shipped weights)")
    p.add_argument("--fn_root", default="rank", help="root of the output names (default rank)")
    p.add_argument("--fn_sel_parts", default="particles.star", help="selected particles (default particles.star)")
    p.add_argument("--fn_sel_classavgs", default="class_averages.star", help="selected classes (default class_averages.star)")
    p.add_argument("--gpu", action="store_true", help="score on the GPU")
    # accepted for compatibility with relion_class_ranker command lines; they change nothing here
    p.add_argument("--do_granularity_features", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--python", default=None, help=argparse.SUPPRESS)
    p.add_argument("--pipeline_control", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from autospa.jobs.rank import RankOptions, run_rank

    opts = RankOptions(optimiser=args.opt, output_dir=args.output, model=args.model, auto_select=args.auto_select,
                       min_score=args.min_score, max_score=args.max_score, quantile=args.select_quantile,
                       select_min_nr_particles=args.select_min_nr_particles, select_min_nr_classes=args.select_min_nr_classes,
                       overrides=args.overrides, fn_root=args.fn_root, fn_sel_parts=args.fn_sel_parts,
                       fn_sel_classavgs=args.fn_sel_classavgs, device="cuda" if args.gpu else "cpu")
    res = run_rank(opts)
    order = np.argsort(-res.scores, kind="stable")
    print(" class  score  particles  selected")
    for c in order:
        s = f"{res.scores[c]:6.3f}" if res.scored[c] else "   -  "
        print(f"{c + 1:6d} {s} {res.counts[c]:10.0f}  {'yes' if res.selected[c] else 'no'}")
    rule = f"min_score {res.threshold:.3g}" if res.threshold is not None else f"quantile {args.select_quantile:g}"
    print(f"{int(res.selected.sum())} of {len(res.scores)} classes, {res.n_particles_selected} particles selected ({rule}); "
          f"outputs in {args.output}")
    return 0
