"""``autospa motioncorr``: motion correction of a movies.star, as RELION's own implementation
(job relion.motioncorr.own): ``autospa motioncorr --i movies.star --o MotionCorr/job002
[--gainref F --gain_rot R --gain_flip F --patch_x 5 --patch_y 5 --dose_per_frame D --bin_factor B]``
writes corrected_micrographs.star, the aligned sums (MRC mode 12), per-movie motion STAR files and
shift-trace PNGs.
"""

from __future__ import annotations

import argparse

from autospa.cli.preprocess_args import add_job_arguments, run_job


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``motioncorr`` subcommand."""
    p = subparsers.add_parser("motioncorr", help="motion-correct movies (RELION's own motion correction)", description=__doc__)
    p.add_argument("--i", required=True, metavar="STAR", help="movies.star (from autospa import --movies)")
    add_job_arguments(p)
    g = p.add_argument_group("motion correction (RELION's option names)")
    g.add_argument("--gainref", default=None, help="gain reference (MRC/TIFF); default: the optics group's rlnMicrographGainName")
    g.add_argument("--gain_rot", type=int, default=0, choices=(0, 1, 2, 3), help="rotate the gain by 0/90/180/270 degrees (0-3)")
    g.add_argument("--gain_flip", type=int, default=0, choices=(0, 1, 2), help="flip the gain: 1 upside down, 2 left to right")
    g.add_argument("--patch_x", type=int, default=5, help="patches along x for local motion (default 5; 1 with --patch_y 1: global only)")
    g.add_argument("--patch_y", type=int, default=5, help="patches along y (default 5)")
    g.add_argument("--dose_per_frame", type=float, default=1.0, help="electrons per A^2 per frame (default 1)")
    g.add_argument("--preexposure", type=float, default=0.0, help="dose before the first frame, e/A^2")
    g.add_argument("--no_dose_weighting", action="store_true", help="plain sums (no exposure filter)")
    g.add_argument("--save_noDW", action="store_true", help="also write sums without dose weighting (*_noDW.mrc)")
    g.add_argument("--bin_factor", type=float, default=1.0, help="Fourier binning of the sums (default 1: unbinned)")
    g.add_argument("--group_frames", type=int, default=1, help="align sums of this many frames")
    g.add_argument("--bfactor", type=float, default=150.0, help="B-factor (A^2) of the alignment filter (default 150)")
    g.add_argument("--first_frame_sum", type=int, default=1, help="first frame summed (1-based)")
    g.add_argument("--last_frame_sum", type=int, default=-1, help="last frame summed (-1: the last)")
    g.add_argument("--eer_grouping", type=int, default=32, help="EER frames per rendered frame")
    g.add_argument("--float16", action=argparse.BooleanOptionalAction, default=True, help="write MRC mode 12 (default yes)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from autospa.jobs.motioncorr import MotionCorrParams, run_motioncorr

    params = MotionCorrParams(
        input_star=args.i,
        output_dir=args.o,
        gainref=args.gainref,
        gain_rot=args.gain_rot,
        gain_flip=args.gain_flip,
        patch_x=args.patch_x,
        patch_y=args.patch_y,
        dose_per_frame=args.dose_per_frame,
        pre_exposure=args.preexposure,
        dose_weighting=not args.no_dose_weighting,
        bin_factor=args.bin_factor,
        group_frames=args.group_frames,
        bfactor=args.bfactor,
        first_frame_sum=args.first_frame_sum,
        last_frame_sum=args.last_frame_sum,
        eer_grouping=args.eer_grouping,
        save_no_dw=args.save_noDW,
        float16=args.float16,
        device=args.device,
    )
    return run_job(args, lambda client: run_motioncorr(params, client=client, continue_=args.continue_), "motioncorr")
