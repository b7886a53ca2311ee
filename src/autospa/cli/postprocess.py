"""``autospa postprocess``: mask-corrected FSC, B-factor sharpening (relion_postprocess's options).

Example::

    autospa postprocess --i Refine3D/job010/run_half1_class001_unfil.mrc --mask mask.mrc \\
        --angpix 1.06 --o PostProcess/job011 --autob
"""

from __future__ import annotations

import argparse
import shlex
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("postprocess", help="FSC of half maps, mask correction, sharpening (relion_postprocess)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--i", dest="half1", required=True, metavar="HALF1.mrc", help="first unfiltered half map")
    p.add_argument("--i2", dest="half2", default=None, metavar="HALF2.mrc",
                   help="second half map (default: --i with 'half1' replaced by 'half2')")
    p.add_argument("--mask", default=None, metavar="MASK.mrc", help="soft solvent mask (values 0..1)")
    p.add_argument("--angpix", type=float, default=-1.0, metavar="A", help="pixel size in Angstrom (default: from the header)")
    p.add_argument("--o", dest="output", default=".", metavar="DIR", help="output folder (default: current)")
    p.add_argument("--root", default="postprocess", help="output file name root (default postprocess)")
    p.add_argument("--autob", action="store_true", help="estimate the B-factor from the Guinier plot")
    p.add_argument("--adhoc_bfac", type=float, default=0.0, metavar="B", help="B-factor to apply without --autob (negative sharpens)")
    p.add_argument("--autob_lowres", type=float, default=10.0, metavar="A", help="low-resolution end of the Guinier fit (default 10)")
    p.add_argument("--autob_highres", type=float, default=0.0, metavar="A", help="high-resolution end (default: the final resolution)")
    p.add_argument("--skip_fsc_weighting", action="store_true", help="no FSC weighting; low-pass at --low_pass instead")
    p.add_argument("--low_pass", type=float, default=0.0, metavar="A", help="low-pass resolution with --skip_fsc_weighting")
    p.add_argument("--randomize_at_fsc", type=float, default=0.8, help="phase randomisation from where the unmasked FSC drops below this (default 0.8)")
    p.add_argument("--force_mask", action="store_true", help="keep the mask even when the unmasked FSC reaches further")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from autospa.jobs.postprocess import PostprocessJob, run_postprocess

    job = PostprocessJob(
        half1=args.half1,
        half2=args.half2,
        mask=args.mask,
        output_dir=args.output,
        root=args.root,
        pixel_size_a=args.angpix,
        auto_bfactor=args.autob,
        adhoc_bfactor=args.adhoc_bfac,
        autob_lowres_a=args.autob_lowres,
        autob_highres_a=args.autob_highres,
        skip_fsc_weighting=args.skip_fsc_weighting,
        low_pass_a=args.low_pass,
        randomize_at_fsc=args.randomize_at_fsc,
        force_mask=args.force_mask,
        command_line="autospa " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )
    result, out = run_postprocess(job)
    for w in result.warnings:
        print(f"WARNING: {w}", file=sys.stderr)
    print(f"final resolution {result.final_resolution_a:.2f} A, B-factor {result.bfactor:.1f} A^2"
          + (f", phases randomised from {result.randomize_from_a:.2f} A" if result.randomize_at_shell else ""))
    print(f"wrote {out.map}" + (f", {out.masked_map}" if out.masked_map else "") + f", {out.star}")
    return 0
