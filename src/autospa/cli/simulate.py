"""``autospa simulate``: seeded synthetic data with ground truth.

Modes::

    autospa simulate particles --o DIR --n 2000 --box 64 --pixel_size 2.0 --classes 3 --snr 0.05 --junk 0.1 --seed 0
    autospa simulate movies    --o DIR --n 4 --software EPU --size 256 --frames 8 --pixel_size 1.0 --dose 1.0
    autospa simulate volume    --o map.mrc --box 64 --pixel_size 2.0 --symmetry D7 --shape ring
"""

from __future__ import annotations

import argparse
from pathlib import Path

from autospa.simulate.datasets import ORIENTATIONS, make_volumes, write_particle_dataset, write_phantom_maps
from autospa.simulate.phantoms import SHAPES, pseudo_atomic_phantom
from autospa.simulate.session import SOFTWARE, simulate_session

DESCRIPTION = __doc__


def _common(p: argparse.ArgumentParser, box: int, pixel_size: float) -> None:
    p.add_argument("--o", required=True, metavar="OUT", help="output folder (file for 'volume')")
    p.add_argument("--box", type=int, default=box, help=f"box size of the volumes/particles in pixels (default {box})")
    p.add_argument("--pixel_size", type=float, default=pixel_size, help=f"pixel size in Angstrom (default {pixel_size})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0): same seed, same data")
    p.add_argument("--symmetry", default="C1", help="point group of the phantoms: C1, Cn, Dn, T, O, I (default C1)")
    p.add_argument("--shape", choices=SHAPES, default=None, help="phantom shape (default: cycle globular, elongated, ring)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``autospa simulate`` with its modes."""
    sim = subparsers.add_parser(
        "simulate",
        help="simulate particles, movies (with EPU/SerialEM metadata) or phantom volumes, with ground truth",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    modes = sim.add_subparsers(dest="mode", metavar="MODE", required=True)

    p = modes.add_parser("particles", help="particle images + particles.star + truth.star + phantom maps")
    _common(p, 64, 2.0)
    p.add_argument("--n", type=int, default=2000, help="number of particles (default 2000)")
    p.add_argument("--classes", type=int, default=3, help="number of distinct structures (default 3)")
    p.add_argument("--conformations", type=int, default=1, help="conformations per structure (default 1)")
    p.add_argument("--snr", type=float, default=0.05, help="signal variance / noise variance (default 0.05)")
    p.add_argument("--junk", type=float, default=0.1, help="fraction of junk images (default 0.1)")
    p.add_argument("--orientation", choices=ORIENTATIONS, default="uniform", help="view distribution (default uniform)")
    p.add_argument("--map", default=None, metavar="MRC", help="simulate from this map instead of phantoms")
    p.add_argument("--defocus", type=float, nargs=2, default=(8000.0, 25000.0), metavar=("MIN", "MAX"), help="defocus range in A")
    p.add_argument("--kV", dest="kv", type=float, default=300.0, help="voltage in kV (default 300)")
    p.add_argument("--Cs", dest="cs", type=float, default=2.7, help="spherical aberration in mm (default 2.7)")
    p.add_argument("--Q0", dest="q0", type=float, default=0.1, help="amplitude contrast (default 0.1)")
    p.add_argument("--bfactor", type=float, default=0.0, help="CTF B-factor in A^2 (default 0)")
    p.add_argument("--float16", action="store_true", help="write the stack in MRC mode 12 (float16)")
    p.add_argument("--store", action="store_true", help="also write the particle store particles.zarr")
    p.set_defaults(func=run_particles)

    m = modes.add_parser("movies", help="a session of movies with EPU XML or SerialEM mdoc, gain and truth")
    _common(m, 64, 1.0)
    m.add_argument("--n", type=int, default=4, help="number of movies (default 4)")
    m.add_argument("--software", choices=SOFTWARE, default="EPU", help="metadata and naming to write (default EPU)")
    m.add_argument("--size", type=int, nargs="+", default=[256], metavar="PX", help="frame size: one value (square) or W H (default 256)")
    m.add_argument("--frames", type=int, default=8, help="frames per movie (default 8)")
    m.add_argument("--dose", type=float, default=1.0, help="dose per frame in e/A^2 (default 1.0)")
    m.add_argument("--particles", type=int, default=20, help="particles per micrograph (default 20)")
    m.add_argument("--classes", type=int, default=1, help="number of distinct structures (default 1)")
    m.add_argument("--drift", type=float, default=3.0, help="global drift path length in pixels (default 3)")
    m.add_argument("--local_drift", type=float, default=0.8, help="largest local displacement in pixels (default 0.8)")
    m.add_argument("--no_gain", action="store_true", help="no gain reference (frames are plain counts)")
    m.add_argument("--ice", type=float, nargs=2, default=(30.0, 60.0), metavar=("MIN", "MAX"), help="ice thickness gradient in nm")
    m.add_argument("--map", default=None, metavar="MRC", help="simulate from this map instead of phantoms")
    m.set_defaults(func=run_movies)

    v = modes.add_parser("volume", help="phantom map(s) as MRC")
    _common(v, 64, 2.0)
    v.add_argument("--conformation", type=int, default=0, help="conformation index (default 0)")
    v.add_argument("--classes", type=int, default=None, help="write this many structures into the folder --o instead of one map")
    v.add_argument("--conformations", type=int, default=1, help="with --classes: conformations per structure")
    v.set_defaults(func=run_volume)


def run_particles(args: argparse.Namespace) -> int:
    """``autospa simulate particles``."""
    res = write_particle_dataset(
        args.o, n=args.n, box=args.box, pixel_size_a=args.pixel_size, n_classes=args.classes,
        n_conformations=args.conformations, snr=args.snr, junk_fraction=args.junk, seed=args.seed,
        symmetry=args.symmetry, orientation=args.orientation, shape=args.shape, map_path=args.map,
        defocus_range_a=tuple(args.defocus), voltage_kv=args.kv, cs_mm=args.cs, amplitude_contrast=args.q0,
        bfactor_a2=args.bfactor, stack_dtype="float16" if args.float16 else "float32", store=args.store,
    )  # fmt: skip
    print(f"wrote {args.n} particles ({res.n_junk} junk, measured SNR {res.measured_snr:.4f}) to {res.particles_star}")
    print(f"truth: {res.truth_star}; maps: {len(res.maps)} in {Path(args.o) / 'phantoms'}")
    return 0


def run_movies(args: argparse.Namespace) -> int:
    """``autospa simulate movies``."""
    from autospa.errors import InputError

    if len(args.size) not in (1, 2):
        raise InputError(None, "--size takes one value (square) or two (W H)")
    w, h = (args.size[0], args.size[0]) if len(args.size) == 1 else args.size
    vols, apix = make_volumes(args.classes, 1, args.box, args.pixel_size, args.symmetry, args.seed, args.shape, args.map)
    files = simulate_session(
        args.o, vols, n_movies=args.n, software=args.software, shape=(h, w), n_frames=args.frames,
        pixel_size_a=apix, dose_per_frame_e_a2=args.dose, particles_per_micrograph=args.particles, seed=args.seed,
        gain=not args.no_gain, global_drift_px=args.drift, local_drift_px=args.local_drift,
        ice_thickness_nm=tuple(args.ice),
    )  # fmt: skip
    print(f"wrote {len(files.movies)} {args.software} movies to {files.outdir}")
    print(f"truth: {files.micrographs_star}, {files.particles_star}")
    print(f"MDCatch: autospa mdcatch watch {files.outdir} --config {files.mdcatch_config} (the simulated microscope's Cs)")
    return 0


def run_volume(args: argparse.Namespace) -> int:
    """``autospa simulate volume``."""
    from autospa.errors import InputError
    from autospa.io.mrc import write_mrc

    if args.classes is not None:
        vols, apix = make_volumes(args.classes, args.conformations, args.box, args.pixel_size, args.symmetry, args.seed, args.shape)
        paths = write_phantom_maps(args.o, vols, apix, args.conformations)
        print(f"wrote {len(paths)} maps to {args.o}")
        return 0
    if args.box < 8:
        raise InputError(None, f"--box must be at least 8 pixels (got {args.box})")
    vol = pseudo_atomic_phantom(
        box=args.box, pixel_size_a=args.pixel_size, symmetry=args.symmetry, seed=args.seed,
        shape=args.shape or "globular", conformation=args.conformation,
    )  # fmt: skip
    out = write_mrc(args.o, vol.numpy(), args.pixel_size, mode=2, stack=False)
    print(f"wrote {out}")
    return 0
