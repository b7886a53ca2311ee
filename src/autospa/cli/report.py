"""``autospa report``: an HTML page with figures about a whole project (acquisition, motion and CTF
per micrograph, picks, the ranked 2D class gallery, initial model and final map slices, the FSC
curve, time per stage). Stages that have not run are left out with a one-line note, so the
report can be made at any time, also while the schemes are still running.

Example::

    autospa report --project /data/session42            # writes /data/session42/report/index.html
    autospa report --project . --o /www/session42 --session /data/session42/session.json
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("report", help="HTML report of a project: acquisition, micrographs, classes, maps, FSC, timing",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--project", default=".", metavar="DIR", help="the project directory (default: current)")
    p.add_argument("--o", dest="output", default=None, metavar="DIR", help="report folder (default: PROJECT/report)")
    p.add_argument("--session", default=None, metavar="session.json",
                   help="MDCatch session file (default: PROJECT/session.json when it exists)")
    p.add_argument("--title", default=None, help="page title")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from autospa.io.report_files import write_report
    from autospa.report.session_report import session_report

    project = Path(args.project)
    out = Path(args.output) if args.output else project / "report"
    rep = session_report(project, session_json=args.session, title=args.title)
    paths = write_report(out, rep.html, rep.figures)
    d = rep.data
    shown = [k for k, v in (("micrographs", d.micrographs), ("picks", d.picks), ("2D classes", d.classes),
                            ("initial model", d.initial_model), ("final map", d.final_map), ("FSC", d.fsc)) if v is not None]
    print(f"wrote {paths['index']} ({len(rep.figures)} figures; sections: {', '.join(shown) or 'none'})")
    for key, why in d.notes.items():
        print(f"  not run: {key}: {why}")
    if d.fsc is not None:
        print(f"  final resolution {d.fsc.resolution_a:.2f} A ({d.fsc.job})")
    return 0
