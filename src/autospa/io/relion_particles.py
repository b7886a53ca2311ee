"""RELION particles (STAR + MRCS stacks) <-> the Zarr particle store.

``import_particles`` validates everything it can before writing (STAR labels, optics groups,
every referenced stack's header, box sizes and image indices), then streams the images chunk by
chunk into a new store (bounded memory; the store appears only when complete).
``export_particles`` writes ``DIR/particles.star`` and ``DIR/Particles/*.mrcs`` with image names
relative to ``DIR``, so ``relion_display --i particles.star`` run from ``DIR`` finds the stacks.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from autospa.errors import InputError
from autospa.io.mrc import MrcStackWriter, read_mrc_header, read_stack_images
from autospa.io.particles_star import read_particles_star
from autospa.io.star import write_star
from autospa.io.zarr_store import DEFAULT_CHUNK, StoreWriter, open_store

log = logging.getLogger(__name__)

PARTICLES_DIR = "Particles"


def source_signature(star_path: str | Path, stack_paths) -> str | None:
    """Fingerprint of a STAR file and its stacks (path, size and modification time of each), by
    which a store imported from them is known to be current; ``None`` when a file is missing."""
    import hashlib

    h = hashlib.sha1()
    for p in [Path(star_path), *sorted(Path(s) for s in set(stack_paths))]:
        try:
            st = p.stat()
        except OSError:
            return None
        h.update(f"{p}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def import_particles(
    star_path: str | Path,
    store_path: str | Path,
    dtype: str = "float16",
    chunk_size: int = DEFAULT_CHUNK,
    overwrite: bool = False,
    compressor: str | None = None,
) -> Path:
    """Import a RELION particle STAR file and its MRCS stacks into a particle store.

    Parameters
    ----------
    star_path
        RELION 3.1+ (or 3.0, converted) particle STAR file; stacks resolved relative to its
        folder, then to the current directory.
    store_path
        The new store (``*.zarr``).
    dtype
        ``"float16"`` or ``"float32"`` storage.
    chunk_size
        Particles per chunk.
    overwrite
        Replace an existing store (only once the new one is complete).
    compressor
        ``None`` or ``"zstd"`` for the images.

    Returns
    -------
    Path
        ``store_path``.

    Raises
    ------
    InputError
        Bad STAR file, missing stack, box that does not match the optics group, image index
        beyond a stack, truncated or unreadable stack, NaN/inf image, or an existing store
        without ``overwrite`` (which is then left untouched).
    """
    star_path = Path(star_path)
    store_path = Path(store_path)
    if store_path.exists() and not overwrite:
        raise InputError(store_path, "output store already exists (pass --overwrite to replace it)")
    table = read_particles_star(star_path)
    optics, particles = table.optics, table.particles
    used = sorted(set(particles["rlnOpticsGroup"].tolist()))
    sizes = optics.set_index("rlnOpticsGroup").loc[used, "rlnImageSize"]
    if sizes.nunique() != 1:
        detail = ", ".join(f"group {g}: {s}" for g, s in sizes.items())
        raise InputError(star_path, f"optics groups have different rlnImageSize ({detail}); import them into separate stores")
    box = int(sizes.iloc[0])

    index0, names = table.image_indices_and_paths()
    stacks = _check_stacks(table, index0, names, box)

    star_labels = {c: c for c in particles.columns if not str(c).startswith("rln")}
    n = len(particles)
    log.info("importing %d particles (box %d) from %d stacks into %s", n, box, len(stacks), store_path)
    try:
        writer = StoreWriter(
            store_path,
            box,
            dtype=dtype,
            optics=optics,
            chunk_size=chunk_size,
            overwrite=overwrite,
            compressor=compressor,
            attrs={"source_star": str(star_path), "relion_version": table.relion_version,
                   "source_stacks": sorted(str(p) for p in set(stacks.values())),
                   "source_signature": source_signature(star_path, stacks.values())},
            star_labels=star_labels,
        )
    except ValueError as exc:
        raise InputError(star_path, str(exc)) from exc
    with writer:
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            images = np.empty((stop - start, box, box), dtype=np.float32)
            chunk_names = pd.Series(names[start:stop])
            for name, pos in chunk_names.groupby(chunk_names, sort=False).indices.items():
                images[pos] = read_stack_images(stacks[name], index0[start:stop][pos])
            try:
                writer.append(images, particles.iloc[start:stop])
            except ValueError as exc:
                raise InputError(star_path, f"particles {start + 1}-{stop}: {exc}") from exc
    return store_path


def _check_stacks(table, index0: np.ndarray, names: np.ndarray, box: int) -> dict[str, Path]:
    """Resolve every stack and check its header against the optics group and the indices."""
    df = pd.DataFrame({"name": names, "index0": index0, "group": table.particles["rlnOpticsGroup"].to_numpy()})
    stats = df.groupby("name", sort=False).agg(max_index=("index0", "max"), group=("group", "first"))
    out: dict[str, Path] = {}
    for name, row in stats.iterrows():
        path = table.resolve(name)
        info = read_mrc_header(path)
        nz, ny, nx = info.shape
        if (ny, nx) != (box, box):
            raise InputError(
                path,
                f"images are {ny} x {nx} pixels but optics group {int(row['group'])} of {table.path} "
                f"says rlnImageSize {box}",
            )
        if int(row["max_index"]) >= nz:
            raise InputError(path, f"{table.path} asks for image {int(row['max_index']) + 1} but the stack holds {nz}")
        out[name] = path
    return out


def export_particles(
    store_path: str | Path,
    outdir: str | Path,
    mode: int | None = None,
    per: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Export a particle store to RELION: ``outdir/particles.star`` + ``outdir/Particles/*.mrcs``.

    Parameters
    ----------
    store_path
        The store.
    outdir
        Output folder; image names in the STAR file are relative to it.
    mode
        MRC mode of the stacks: 12 (float16) or 2 (float32); default: the store's dtype.
    per
        ``"micrograph"`` (one stack per MicrographName, mirroring its path under Particles/),
        ``"chunk"`` (one stack per store chunk) or ``"auto"`` (per micrograph when the store has
        MicrographName and each micrograph's particles are contiguous, else per chunk).
    overwrite
        Replace existing output files.

    Returns
    -------
    Path
        The written ``particles.star``.
    """
    stack = open_store(store_path)
    outdir = Path(outdir)
    if mode is None:
        mode = 12 if stack.dtype == np.float16 else 2
    if mode not in (2, 12):
        raise InputError(None, f"MRC mode {mode} cannot be exported (choose 12 or 2)")
    if per not in ("auto", "micrograph", "chunk"):
        raise InputError(None, f"per must be auto, micrograph or chunk, not {per!r}")
    star_out = outdir / "particles.star"
    optics, particles = stack.star_tables()
    files, file_of, index_in_file = _export_plan(stack, particles, per)
    targets = [outdir / f for f in files]
    if not overwrite:
        for p in [star_out, *targets]:
            if p.exists():
                raise InputError(p, "already exists (pass --overwrite to replace the export)")
    counts = np.bincount(file_of, minlength=len(files))
    apix = stack.pixel_size_a if _single_pixel_size(stack) else 1.0
    remaining = counts.copy()
    with contextlib.ExitStack() as guard:
        open_writers: dict[int, MrcStackWriter] = {}

        def _close_all_on_error(exc_type, exc, tb):
            for w in open_writers.values():
                w.__exit__(exc_type or RuntimeError, exc, tb)
            open_writers.clear()

        guard.push(_close_all_on_error)
        for start, stop in stack.chunk_bounds():
            images = stack.read(start, stop)
            fids = file_of[start:stop]
            for fid in pd.unique(fids):
                sel = np.flatnonzero(fids == fid)
                w = open_writers.get(fid)
                if w is None:
                    w = MrcStackWriter(targets[fid], int(counts[fid]), stack.box, mode=mode, voxel_size_a=apix)
                    w.__enter__()
                    open_writers[fid] = w
                w.write(int(index_in_file[start + sel[0]]), images[sel])
                remaining[fid] -= sel.size
                if remaining[fid] == 0:
                    open_writers.pop(fid).__exit__(None, None, None)
        guard.pop_all()
    particles = particles.copy()
    names = [f"{i + 1:06d}@{files[f]}" for f, i in zip(file_of.tolist(), index_in_file.tolist(), strict=True)]
    if "rlnImageName" in particles:
        particles["rlnImageName"] = names
    else:
        particles.insert(0, "rlnImageName", names)
    if "rlnOpticsGroup" not in particles:
        particles["rlnOpticsGroup"] = np.int64(optics["rlnOpticsGroup"].iloc[0]) if len(optics) else np.int64(1)
    write_star(star_out, {"optics": optics, "particles": particles})
    log.info("exported %d particles to %s (%d stacks, mode %d)", len(particles), star_out, len(files), mode)
    return star_out


def _single_pixel_size(stack) -> bool:
    try:
        stack.pixel_size_a
    except ValueError:
        return False
    return True


def _export_plan(stack, particles: pd.DataFrame, per: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Stack file (relative to the output folder) and 0-based position of every particle."""
    n = len(particles)
    if per in ("auto", "micrograph") and "rlnMicrographName" in particles:
        mic = particles["rlnMicrographName"].astype(str).to_numpy(dtype=object)
        codes, uniques = pd.factorize(mic)
        runs = 1 + int(np.count_nonzero(codes[1:] != codes[:-1])) if n else 0
        stems = [_stack_name_for(m) for m in uniques]
        if (per == "micrograph" or runs == len(uniques)) and len(set(stems)) == len(stems):
            index_in_file = pd.Series(codes).groupby(codes).cumcount().to_numpy(np.int64)
            return stems, codes.astype(np.int64), index_in_file
        if per == "micrograph":
            raise InputError(stack.store_path, "micrograph names map to clashing stack names; use per='chunk'")
    bounds = stack.chunk_bounds()
    files = [f"{PARTICLES_DIR}/particles_{i:06d}.mrcs" for i in range(len(bounds))]
    file_of = np.empty(n, np.int64)
    index_in_file = np.empty(n, np.int64)
    for i, (a, b) in enumerate(bounds):
        file_of[a:b] = i
        index_in_file[a:b] = np.arange(b - a)
    return files, file_of, index_in_file


def _stack_name_for(micrograph: str) -> str:
    """``MotionCorr/job002/Movies/mic_01.mrc`` -> ``Particles/MotionCorr/job002/Movies/mic_01.mrcs``."""
    p = PurePosixPath(str(micrograph).replace("\\", "/"))
    parts = [("_up_" if q == ".." else q) for q in p.parts if q not in ("/", ".", "")]
    if not parts:
        parts = ["micrograph"]
    stem = PurePosixPath(*parts)
    stem = stem.with_suffix("") if stem.suffix else stem
    return f"{PARTICLES_DIR}/{stem}.mrcs"


__all__ = ["PARTICLES_DIR", "export_particles", "import_particles"]
