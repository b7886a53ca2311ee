"""``autospa align-symmetry``: put a map's symmetry axes in RELION's standard orientation
(relion_align_symmetry), or find its point group with ``--sym auto``.

Examples::

    autospa align-symmetry --i initial_model.mrc --o aligned.mrc --sym D7
    autospa align-symmetry --i run_class001.mrc --o aligned.mrc --sym auto   # ranks C1..C12, D2..D12, T, O, I
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("align-symmetry", help="align a map with a point group's axes, or detect its group",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--i", dest="input", required=True, metavar="MAP.mrc", help="input map")
    p.add_argument("--o", dest="output", required=True, metavar="OUT.mrc", help="aligned (symmetrised) map")
    p.add_argument("--sym", required=True, help="point group (C<n>, D<n>, T, O, I) or 'auto'")
    p.add_argument("--sym_candidates", default=None, metavar="G1,G2,...",
                   help="groups --sym auto considers (default C1-C12, D2-D12, T, O, I)")
    p.add_argument("--order_penalty", type=float, default=0.5,
                   help="auto: the correlation each extra symmetry operator must beat (default 0.5)")
    p.add_argument("--angpix", type=float, default=-1.0, metavar="A", help="pixel size (default: from the header)")
    p.add_argument("--box_size", type=int, default=24, help="working box of the search (default 24)")
    p.add_argument("--keep_centre", action="store_true", help="do not re-centre on the centre of mass")
    p.add_argument("--apply_sym", dest="apply_sym", action="store_true", default=True,
                   help="symmetrise the aligned map (default)")
    p.add_argument("--no_apply_sym", dest="apply_sym", action="store_false", help="only rotate and shift")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from autospa.errors import InputError
    from autospa.jobs.symmetry import AlignSymmetryJob, run_align_symmetry
    from autospa.refinement.symmetry_align import SymmetrySearchOptions

    if args.box_size < 8:
        raise InputError(None, f"--box_size must be at least 8 (got {args.box_size})")
    candidates = tuple(c.strip() for c in args.sym_candidates.split(",") if c.strip()) if args.sym_candidates else None
    opts = SymmetrySearchOptions(working_box=args.box_size, keep_centre=args.keep_centre, order_penalty=args.order_penalty)
    job = AlignSymmetryJob(input=args.input, output=args.output, symmetry=args.sym, candidates=candidates,
                           apply_symmetry=args.apply_sym, pixel_size_a=args.angpix, options=opts)
    res = run_align_symmetry(job)
    if res.ranking:
        print(f"{'rank':>4}  {'group':<6} {'order':>5} {'agreement':>9} {'score':>8}")
        for i, r in enumerate(res.ranking, 1):
            flag = "" if r.refined else "  (coarse)"
            print(f"{i:>4}  {r.group:<6} {r.order:>5} {r.agreement:>9.3f} {r.score:>8.2f}{flag}")
    a = res.alignment
    rot, tilt, psi = a.euler_deg
    cx, cy, cz = (float(v) for v in a.center_px)
    print(f"{a.group}: agreement {a.agreement:.3f}; rotation (rot, tilt, psi) = ({rot:.2f}, {tilt:.2f}, {psi:.2f}) deg; "
          f"centre of symmetry ({cx:.2f}, {cy:.2f}, {cz:.2f}) px from the box centre")
    print(f"wrote {res.output}")
    return 0
