"""Whole simulated data sets on disk: what ``autospa simulate`` writes (one function per mode).

* :func:`write_phantom_maps` -- phantom volumes (structures x conformations) as MRC maps;
* :func:`write_particle_dataset` -- phantoms + particles: ``particles.star``, ``truth.star``,
  ``Particles/stack.mrcs``, ``phantoms/class_NNN.mrc`` (optionally ``particles.zarr``);
* :func:`autospa.simulate.session.simulate_session` -- movies with EPU/SerialEM metadata.

All values are checked before the first file is written; every file is written atomically.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from autospa.errors import InputError
from autospa.io.mrc import write_mrc
from autospa.simulate.particles import JUNK_KINDS, particle_optics, simulate_particles, write_particle_set
from autospa.simulate.phantoms import SHAPES, load_map, phantom_set

log = logging.getLogger(__name__)

ORIENTATIONS = ("uniform", "preferred", "side", "top")


def write_phantom_maps(
    outdir: str | Path,
    volumes: list[torch.Tensor],
    pixel_size_a: float,
    n_conformations: int = 1,
) -> list[Path]:
    """Write phantom maps as ``outdir/class_NNN.mrc`` (NNN = 1-based rlnClassNumber).

    Parameters
    ----------
    volumes
        Maps in class order (structure-major, :func:`autospa.simulate.phantoms.phantom_set`).
    n_conformations
        Conformations per structure (only used for the log message).

    Returns
    -------
    list of Path
    """
    outdir = Path(outdir)
    paths = [
        write_mrc(outdir / f"class_{k + 1:03d}.mrc", v.detach().cpu().numpy(), pixel_size_a, mode=2, stack=False)
        for k, v in enumerate(volumes)
    ]
    log.info("wrote %d maps (%d conformation(s) each) to %s", len(paths), n_conformations, outdir)
    return paths


def _check_common(box: int, pixel_size_a: float, seed: int) -> None:
    if box < 8:
        raise InputError(None, f"--box must be at least 8 pixels (got {box})")
    if not pixel_size_a > 0:
        raise InputError(None, f"--pixel_size must be positive (got {pixel_size_a})")
    if seed < 0:
        raise InputError(None, f"--seed must be >= 0 (got {seed})")


def make_volumes(
    n_classes: int,
    n_conformations: int,
    box: int,
    pixel_size_a: float,
    symmetry: str = "C1",
    seed: int = 0,
    shape: str | None = None,
    map_path: str | Path | None = None,
) -> tuple[list[torch.Tensor], float]:
    """Phantoms (or a user's map) for a simulation.

    Returns
    -------
    volumes : list of torch.Tensor
        ``n_classes * n_conformations`` maps ``(box, box, box)`` (one map for ``map_path``).
    pixel_size_a : float
        The pixel size of the maps (the map header's for ``map_path``).
    """
    if map_path is not None:
        vol, apix = load_map(map_path)
        if apix <= 0:
            apix = pixel_size_a
        return [vol], apix
    if n_classes < 1 or n_conformations < 1:
        raise InputError(None, f"--classes and --conformations must be >= 1 (got {n_classes}, {n_conformations})")
    if shape is not None and shape not in SHAPES:
        raise InputError(None, f"unknown --shape {shape!r} (choose from {', '.join(SHAPES)})")
    shapes = SHAPES if shape is None else (shape,)
    vols = phantom_set(n_classes, n_conformations, box=box, pixel_size_a=pixel_size_a, symmetry=symmetry, seed=seed, shapes=shapes)
    return vols, pixel_size_a


@dataclass(frozen=True)
class ParticleDataset:
    """Files written by :func:`write_particle_dataset`."""

    particles_star: Path
    truth_star: Path
    stacks: list[Path]
    maps: list[Path]
    store: Path | None
    n_junk: int
    measured_snr: float


def write_particle_dataset(
    outdir: str | Path,
    n: int = 2000,
    box: int = 64,
    pixel_size_a: float = 2.0,
    n_classes: int = 3,
    n_conformations: int = 1,
    snr: float = 0.05,
    junk_fraction: float = 0.1,
    seed: int = 0,
    symmetry: str = "C1",
    orientation: str = "uniform",
    shape: str | None = None,
    map_path: str | Path | None = None,
    defocus_range_a: tuple[float, float] = (8000.0, 25000.0),
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.1,
    bfactor_a2: float = 0.0,
    stack_dtype: str = "float32",
    store: bool = False,
) -> ParticleDataset:
    """Simulate a particle set and write it in RELION's layout, with its truth and phantom maps.

    Files (``outdir``)::

        particles.star          data_optics + data_particles (rlnImageName 000001@Particles/stack.mrcs,
                                CTF, true angles and origins; rlnCtfDataAreCtfPremultiplied 0)
        truth.star              the same plus rlnClassNumber (volume, 0 = junk), rlnAutospaStructure
                                (1-based, 0 = junk), rlnAutospaConformation (0-based, -1 = junk),
                                rlnAutospaIsJunk, rlnAutospaJunkKind
        Particles/stack.mrcs    the images
        phantoms/class_NNN.mrc  the volumes (class NNN = structure s, conformation c at
                                NNN = s * conformations + c + 1)
        particles.zarr          the particle store (``store=True``)

    Parameters
    ----------
    orientation
        ``uniform``, ``preferred`` (70 % near a top and a side view), ``side`` or ``top`` (one
        fixed direction for every particle, random psi: 2D-classification data).
    (others)
        As :func:`autospa.simulate.particles.simulate_particles` and :func:`make_volumes`.

    Returns
    -------
    ParticleDataset
    """
    _check_common(box, pixel_size_a, seed)
    if n < 1:
        raise InputError(None, f"--n must be >= 1 (got {n})")
    if not snr > 0:
        raise InputError(None, f"--snr must be positive (got {snr})")
    if not 0.0 <= junk_fraction <= 1.0:
        raise InputError(None, f"--junk must be within [0, 1] (got {junk_fraction})")
    if orientation not in ORIENTATIONS:
        raise InputError(None, f"unknown --orientation {orientation!r} (choose from {', '.join(ORIENTATIONS)})")
    if defocus_range_a[0] <= 0 or defocus_range_a[1] < defocus_range_a[0]:
        raise InputError(None, f"defocus range must be increasing and positive (got {defocus_range_a})")
    outdir = Path(outdir)
    vols, apix = make_volumes(n_classes, n_conformations, box, pixel_size_a, symmetry, seed, shape, map_path)
    orient: str | np.ndarray = orientation
    if orientation == "side":
        orient = np.array([[0.0, 90.0]])
    elif orientation == "top":
        orient = np.array([[0.0, 0.0]])
    images, truth, clean = simulate_particles(
        vols, n, apix, box=box, snr=snr, seed=seed, orientation=orient, junk_fraction=junk_fraction,
        defocus_range_a=defocus_range_a, voltage_kv=voltage_kv, cs_mm=cs_mm,
        amplitude_contrast=amplitude_contrast, bfactor_a2=bfactor_a2, return_clean=True,
    )  # fmt: skip
    cls = truth["rlnClassNumber"].to_numpy()
    truth["rlnAutospaStructure"] = np.where(cls > 0, (cls - 1) // n_conformations + 1, 0).astype(np.int64)
    truth["rlnAutospaConformation"] = np.where(cls > 0, (cls - 1) % n_conformations, -1).astype(np.int64)
    good = torch.as_tensor(truth["rlnAutospaIsJunk"].to_numpy() == 0)
    if not bool(good.any()):
        good = torch.ones(n, dtype=torch.bool)
    measured = float(clean[good].flatten(1).var(1).mean() / (images[good] - clean[good]).flatten(1).var(1).mean())
    optics = particle_optics(apix, box, voltage_kv, cs_mm, amplitude_contrast)
    files = write_particle_set(outdir, images, truth, optics, stack_dtype=stack_dtype, store=store)
    maps = write_phantom_maps(outdir / "phantoms", vols, apix, n_conformations)
    kinds = truth["rlnAutospaJunkKind"].value_counts().to_dict()
    log.info("junk kinds: %s", {JUNK_KINDS[int(k)]: int(v) for k, v in kinds.items() if k})
    return ParticleDataset(
        particles_star=files["particles"],
        truth_star=files["truth"],
        stacks=list(files["stacks"]),
        maps=maps,
        store=files.get("store"),
        n_junk=int(truth["rlnAutospaIsJunk"].sum()),
        measured_snr=measured,
    )
