"""The ``autospa`` console script: one subcommand per module, each parsing its arguments and
calling one library function.

Every subcommand module defines ``register(subparsers)`` which adds its parser and sets
``func`` (called with the parsed namespace, returns an exit code or ``None``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from autospa import __version__
from autospa.errors import AutospaError

#: Subcommand modules, in the order ``autospa --help`` lists them.
SUBCOMMAND_MODULES = (
    "autospa.cli.simulate",
    "autospa.cli.store",  # import / export
    "autospa.cli.motioncorr",
    "autospa.cli.ctffind",
    "autospa.cli.autopick",
    "autospa.cli.extract",
    "autospa.cli.class2d",
    "autospa.cli.initial_model",
    "autospa.cli.refine3d",
    "autospa.cli.rank",
    "autospa.cli.ranker",
    "autospa.cli.align_symmetry",
    "autospa.cli.postprocess",
    "autospa.cli.schemer",
    "autospa.cli.it",
    "autospa.cli.mdcatch",
    "autospa.cli.demo",
    "autospa.cli.report",
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="autospa",
        description="Automated cryo-EM single-particle analysis (RELION-4.0 tools on dask, Zarr and Prefect).",
    )
    parser.add_argument("--version", action="version", version=f"autospa {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from autospa.distributed.malloc import tune_malloc

    tune_malloc()  # the E-step's large temporaries are reused, not page-faulted afresh
    try:
        rc = args.func(args)
    except AutospaError as exc:
        print(f"autospa {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"autospa {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
