"""``autospa import`` and ``autospa export``: RELION files <-> the particle store.

``autospa import`` has two forms:

* ``autospa import particles.star --o store.zarr`` reads a RELION particle STAR file and its MRCS
  stacks into a Zarr particle store;
* ``autospa import --movies "Movies/*.tiff" --o Import/job001 --angpix A --kV V --Cs C --Q0 Q``
  (or ``--micrographs "glob"``) is RELION's Import job: it writes ``movies.star`` /
  ``micrographs.star``.

``autospa export store.zarr --o DIR`` writes ``DIR/particles.star`` and ``DIR/Particles/*.mrcs``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from autospa.errors import AutospaError, InputError
from autospa.io.job_control import clear_job_exit_status, write_job_exit_status
from autospa.io.relion_import import import_micrographs, import_movies
from autospa.io.relion_particles import export_particles, import_particles
from autospa.io.zarr_store import DEFAULT_CHUNK, open_store

IMPORT_HELP = """\
Two forms:

  1. particles -> particle store (Zarr):
       autospa import particles.star --o store.zarr [--dtype float16|float32] [--chunk 1024]
     Image stacks named in rlnImageName (INDEX@path) are looked up relative to the STAR file's
     folder, then relative to the current directory (RELION's project directory).

  2. RELION's Import job (movies or micrographs -> STAR):
       autospa import --movies "Movies/*.tiff" --o Import/job001 --angpix 0.885 --kV 300 --Cs 2.7 --Q0 0.1
       autospa import --micrographs "MotionCorr/*.mrc" --o Import/job002 --angpix 1.1 --kV 300 --Cs 2.7 --Q0 0.1
     writes DIR/movies.star or DIR/micrographs.star (data_optics + data_movies/data_micrographs).
     File names are kept as the pattern gives them (relative to the current directory), sorted;
     with --continue only files not yet listed are appended.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``import`` and ``export`` subcommands."""
    p = subparsers.add_parser(
        "import",
        help="import RELION particles into a particle store, or movies/micrographs into a STAR file",
        description=IMPORT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("star", nargs="?", help="form 1: RELION particle STAR file (data_optics + data_particles, or RELION 3.0)")
    p.add_argument("--o", required=True, metavar="OUT", help="form 1: the new store (e.g. particles.zarr); form 2: output folder")
    p.add_argument("--pipeline_control", metavar="DIR", help="write RELION_JOB_EXIT_SUCCESS / _FAILURE to DIR (as RELION jobs do)")
    g1 = p.add_argument_group("form 1: particles -> store")
    g1.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="image storage type (default float16)")
    g1.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, metavar="N", help=f"particles per chunk (default {DEFAULT_CHUNK})")
    g1.add_argument("--compress", action="store_true", help="zstd-compress the images (slower; noisy images barely shrink)")
    g1.add_argument("--overwrite", action="store_true", help="replace an existing store (only once the new one is complete)")
    g2 = p.add_argument_group("form 2: RELION Import job")
    src = g2.add_mutually_exclusive_group()
    src.add_argument("--movies", metavar="GLOB", help='movie files, e.g. "Movies/*.tiff" (quote it)')
    src.add_argument("--micrographs", metavar="GLOB", help='micrograph files, e.g. "MotionCorr/*.mrc" (quote it)')
    g2.add_argument("--angpix", type=float, help="pixel size in Angstrom")
    g2.add_argument("--kV", dest="kv", type=float, help="acceleration voltage in kV")
    g2.add_argument("--Cs", dest="cs", type=float, help="spherical aberration in mm")
    g2.add_argument("--Q0", dest="q0", type=float, help="amplitude contrast (e.g. 0.1)")
    g2.add_argument("--optics_group_name", default="opticsGroup1", help="rlnOpticsGroupName (default opticsGroup1)")
    g2.add_argument("--gainref", metavar="FILE", help="gain reference (rlnMicrographGainName, movies only)")
    g2.add_argument("--mtf", metavar="FILE", help="detector MTF STAR file (rlnMtfFileName)")
    g2.add_argument("--beamtilt_x", type=float, help="beam tilt X in mrad")
    g2.add_argument("--beamtilt_y", type=float, help="beam tilt Y in mrad")
    g2.add_argument("--continue", dest="continue_", action="store_true", help="append only files not yet in the output STAR file")
    p.set_defaults(func=run_import)

    e = subparsers.add_parser(
        "export",
        help="export a particle store to RELION (particles.star + Particles/*.mrcs)",
        description=(
            "Write DIR/particles.star and DIR/Particles/*.mrcs from a particle store. Image names are "
            "relative to DIR, so run RELION (e.g. relion_display --i particles.star) from DIR."
        ),
    )
    e.add_argument("store", help="particle store (Zarr folder)")
    e.add_argument("--o", required=True, metavar="DIR", help="output folder")
    e.add_argument("--mode", type=int, choices=(12, 2), default=None, help="MRC mode: 12 (float16) or 2 (float32); default: the store's type")
    e.add_argument(
        "--per",
        choices=("auto", "micrograph", "chunk"),
        default="auto",
        help="one stack per micrograph or per store chunk (auto: per micrograph when particles are grouped by micrograph)",
    )
    e.add_argument("--overwrite", action="store_true", help="replace existing output files")
    e.set_defaults(func=run_export)


def run_import(args: argparse.Namespace) -> int:
    """``autospa import``: either form; returns the exit code."""
    control = Path(args.pipeline_control) if args.pipeline_control else None
    if control is not None:
        clear_job_exit_status(control)
    try:
        message = _import(args)
    except AutospaError:
        if control is not None:
            write_job_exit_status(control, success=False)
        raise
    if control is not None:
        write_job_exit_status(control, success=True)
    print(message)
    return 0


def _import(args: argparse.Namespace) -> str:
    pattern = args.movies or args.micrographs
    if pattern is not None:
        if args.star:
            raise InputError(args.star, "give either a particle STAR file or --movies/--micrographs, not both")
        missing = [flag for flag, v in (("--angpix", args.angpix), ("--kV", args.kv), ("--Cs", args.cs), ("--Q0", args.q0)) if v is None]
        if missing:
            raise InputError(None, f"importing {'movies' if args.movies else 'micrographs'} needs {', '.join(missing)}")
        common = dict(
            pattern=pattern,
            outdir=args.o,
            angpix=args.angpix,
            kv=args.kv,
            cs=args.cs,
            q0=args.q0,
            optics_group_name=args.optics_group_name,
            mtf=args.mtf,
            beamtilt_x=args.beamtilt_x,
            beamtilt_y=args.beamtilt_y,
            continue_=args.continue_,
        )
        if args.movies:
            out = import_movies(gainref=args.gainref, **common)
        else:
            out = import_micrographs(**common)
        return f"wrote {out}"
    if not args.star:
        raise InputError(None, "nothing to import: give a particle STAR file, --movies GLOB or --micrographs GLOB")
    if args.chunk < 1:
        raise InputError(None, f"--chunk {args.chunk} must be at least 1")
    out = import_particles(
        args.star,
        args.o,
        dtype=args.dtype,
        chunk_size=args.chunk,
        overwrite=args.overwrite,
        compressor="zstd" if args.compress else None,
    )
    stack = open_store(out)
    return f"wrote {out}: {stack.n_particles} particles, box {stack.box}, {stack.dtype.name}, {stack.n_chunks} chunks"


def run_export(args: argparse.Namespace) -> int:
    """``autospa export``; returns the exit code."""
    star = export_particles(args.store, args.o, mode=args.mode, per=args.per, overwrite=args.overwrite)
    print(f"wrote {star}")
    return 0


__all__ = ["register", "run_export", "run_import"]
