"""RELION particle STAR files: a validated optics + particles view, image names and stack paths.

``read_particles_star`` accepts RELION 3.1+ files (data_optics + data_particles) and RELION 3.0
files (one loop with rlnImageName, no optics block), which are converted to the 3.1 layout with a
warning. Image names are ``INDEX@path`` with a 1-based index; stack paths are resolved relative to
the STAR file's folder first, then to the current directory (RELION's project directory).

Writing one is :func:`autospa.io.star.write_star` with ``{"optics": optics, "particles": particles}``
(RELION 3.1 layout, exact values, atomic) and the stacks :func:`autospa.io.mrc.write_mrc` /
:class:`autospa.io.mrc.MrcStackWriter`; :func:`autospa.io.relion_particles.export_particles` does
both for a whole particle store.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from autospa.errors import InputError
from autospa.io.mrc import read_mrc_header
from autospa.io.relion_labels import convert_relion30_particles, optics_lookup, relion30_pixel_size
from autospa.io.star import StarBlock, read_star

log = logging.getLogger(__name__)

#: Labels every data_optics table of a particle file must have.
REQUIRED_OPTICS_LABELS = ("rlnOpticsGroup", "rlnImagePixelSize", "rlnImageSize")
#: Labels every particle row must have (RELION 3.1+).
REQUIRED_PARTICLE_LABELS = ("rlnImageName", "rlnOpticsGroup")


@dataclass
class ParticlesTable:
    """A particle STAR file, validated: optics groups and particles, RELION 3.1 labels.

    Attributes
    ----------
    path
        The STAR file.
    optics
        data_optics, one row per group (rlnOpticsGroup, rlnImagePixelSize, rlnImageSize, ...).
    particles
        data_particles, one row per particle, in file order (every original column kept).
    relion_version
        30001 for 3.1+ files, 30000 for converted RELION 3.0 files.
    other_blocks
        Any further data blocks of the file, unchanged.
    """

    path: Path
    optics: pd.DataFrame
    particles: pd.DataFrame
    relion_version: int = 30001
    other_blocks: dict[str, StarBlock] = field(default_factory=dict)

    @property
    def n_particles(self) -> int:
        """Number of particles."""
        return len(self.particles)

    @property
    def optics_group(self) -> np.ndarray:
        """``(n,)`` int64 optics group (1-based) of every particle."""
        return self.particles["rlnOpticsGroup"].to_numpy(np.int64)

    @property
    def pixel_size_a(self) -> np.ndarray:
        """``(n,)`` float64 pixel size of every particle, from its optics group (Angstrom)."""
        return np.asarray(optics_lookup(self.particles, self.optics, "rlnImagePixelSize"), np.float64)

    @property
    def image_size(self) -> np.ndarray:
        """``(n,)`` int64 box size of every particle, from its optics group (pixels)."""
        return np.asarray(optics_lookup(self.particles, self.optics, "rlnImageSize"), np.int64)

    def merged(self) -> pd.DataFrame:
        """Particles with their optics group's columns joined (particle values win on a clash)."""
        extra = [c for c in self.optics.columns if c == "rlnOpticsGroup" or c not in self.particles.columns]
        return self.particles.merge(self.optics[extra], on="rlnOpticsGroup", how="left", validate="many_to_one")

    def image_indices_and_paths(self) -> tuple[np.ndarray, np.ndarray]:
        """Split rlnImageName into ``(index0, path)``: ``(n,)`` 0-based int64 indices and ``(n,)`` str paths."""
        return parse_image_names(self.particles["rlnImageName"], self.path)

    def resolve(self, stack_name: str) -> Path:
        """The file a stack name (the part of rlnImageName after ``@``) refers to."""
        return resolve_stack_path(self.path, stack_name)


def parse_image_name(name: str) -> tuple[int, str]:
    """``"000012@Particles/mic1.mrcs"`` -> ``(11, "Particles/mic1.mrcs")`` (0-based index).

    A name without ``@`` is a single image: index 0.

    Raises
    ------
    ValueError
        Index not a positive integer, or empty path.
    """
    name = str(name).strip()
    if "@" in name:
        idx, path = name.split("@", 1)
        if not idx.strip().isdigit() or int(idx) < 1:
            raise ValueError(f"image name {name!r}: index before '@' must be a positive integer (1-based)")
        index0 = int(idx) - 1
    else:
        index0, path = 0, name
    if not path:
        raise ValueError(f"image name {name!r} has no file path")
    return index0, path


def parse_image_names(names: pd.Series | list[str], star_path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised :func:`parse_image_name`.

    Returns
    -------
    tuple
        ``(index0, paths)``: ``(n,)`` int64 0-based indices and ``(n,)`` object array of paths.

    Raises
    ------
    InputError
        A malformed name (the row and the name are named).
    """
    s = pd.Series(names, dtype=object).astype(str).str.strip()
    has_at = s.str.contains("@", regex=False)
    parts = s.str.split("@", n=1, expand=True) if has_at.any() else None
    if parts is not None and parts.shape[1] == 2:
        idx_str = parts[0].where(has_at, "1")
        path = parts[1].where(has_at, s)
    else:
        idx_str = pd.Series(["1"] * len(s))
        path = s
    ok = idx_str.str.fullmatch(r"\d+") & (path.fillna("").str.len() > 0)
    idx = pd.to_numeric(idx_str.where(ok, "0")).to_numpy(np.int64)
    ok &= idx >= 1
    if not ok.all():
        r = int(np.argmax(~ok.to_numpy()))
        raise InputError(star_path, f"rlnImageName of particle {r + 1} is {s.iloc[r]!r}, expected INDEX@path with a 1-based index")
    return idx - 1, path.to_numpy(dtype=object)


def resolve_stack_path(star_path: str | Path, stack_name: str) -> Path:
    """Find the stack an image name points to, as RELION does.

    Absolute paths are used as they are; a relative path is looked up relative to the STAR file's
    folder first, then relative to the current directory (RELION's project directory).

    Raises
    ------
    InputError
        The stack exists in neither place (names the STAR file and the stack).
    """
    p = Path(stack_name)
    if p.is_absolute():
        if p.exists():
            return p
        raise InputError(star_path, f"image stack {stack_name} not found")
    star_dir = Path(star_path).parent
    for base in (star_dir, Path.cwd()):
        cand = base / p
        if cand.exists():
            return cand
    raise InputError(
        star_path,
        f"image stack {stack_name} not found (looked relative to {star_dir} and to the current directory {os.getcwd()})",
    )


def read_particles_star(path: str | Path) -> ParticlesTable:
    """Read and validate a RELION particle STAR file.

    Parameters
    ----------
    path
        RELION 3.1+ (data_optics + data_particles) or 3.0 (single loop with rlnImageName).

    Returns
    -------
    ParticlesTable

    Raises
    ------
    InputError
        Empty or non-STAR file; no particle block; a missing required label (optics:
        rlnOpticsGroup, rlnImagePixelSize, rlnImageSize; particles: rlnImageName, rlnOpticsGroup);
        non-positive pixel or box size; a particle referencing an undefined optics group; a
        malformed rlnImageName; no particles.
    """
    path = Path(path)
    blocks = read_star(path)
    if "optics" in blocks:
        optics = _as_frame(blocks["optics"])
        pname = _particle_block_name(blocks, path)
        particles = _as_frame(blocks[pname])
        version = 30001
        others = {k: v for k, v in blocks.items() if k not in ("optics", pname)}
    else:
        pname = _particle_block_name(blocks, path)
        particles = _as_frame(blocks[pname])
        others = {k: v for k, v in blocks.items() if k != pname}
        _require(path, particles, f"data_{pname}", ("rlnImageName",))
        if len(particles) == 0:
            raise InputError(path, f"data_{pname} holds no particles")
        optics, particles = _convert_30(path, particles)
        version = 30000
    _require(path, optics, "data_optics", REQUIRED_OPTICS_LABELS)
    _require(path, particles, f"data_{pname}", REQUIRED_PARTICLE_LABELS)
    if len(particles) == 0:
        raise InputError(path, f"data_{pname} holds no particles")
    _check_optics(path, optics)
    _check_groups(path, particles, optics)
    parse_image_names(particles["rlnImageName"], path)  # raises on malformed names
    return ParticlesTable(path=path, optics=optics, particles=particles, relion_version=version, other_blocks=others)


# ------------------------------------------------------------------------------------------------
def _as_frame(block: StarBlock) -> pd.DataFrame:
    if isinstance(block, pd.DataFrame):
        return block.reset_index(drop=True)
    return pd.DataFrame([block]) if block else pd.DataFrame()


def _particle_block_name(blocks: dict[str, StarBlock], path: Path) -> str:
    if "particles" in blocks:
        return "particles"
    candidates = [k for k, v in blocks.items() if k != "optics" and isinstance(v, pd.DataFrame) and "rlnImageName" in v.columns]
    if len(candidates) == 1:
        return candidates[0]
    names = ", ".join(f"data_{k}" for k in blocks) or "none"
    if not candidates:
        raise InputError(path, f"no particle block (data_particles with rlnImageName); blocks: {names}")
    raise InputError(path, f"several blocks hold rlnImageName ({names}); expected one data_particles")


def _require(path: Path, df: pd.DataFrame, block: str, labels: tuple[str, ...]) -> None:
    for lab in labels:
        if lab not in df.columns:
            raise InputError(path, f"{block} lacks the required label {lab}")


def _numeric(path: Path, df: pd.DataFrame, block: str, label: str) -> np.ndarray:
    try:
        return pd.to_numeric(df[label]).to_numpy(np.float64)
    except (ValueError, TypeError) as exc:
        raise InputError(path, f"{block} {label} holds non-numeric values") from exc


def _check_optics(path: Path, optics: pd.DataFrame) -> None:
    if len(optics) == 0:
        raise InputError(path, "data_optics defines no optics group")
    groups = _numeric(path, optics, "data_optics", "rlnOpticsGroup")
    if np.any(groups != np.round(groups)) or np.any(groups < 1):
        raise InputError(path, "data_optics rlnOpticsGroup must be positive integers")
    if len(set(groups.tolist())) != len(groups):
        raise InputError(path, "data_optics defines an optics group twice")
    optics["rlnOpticsGroup"] = groups.astype(np.int64)
    apix = _numeric(path, optics, "data_optics", "rlnImagePixelSize")
    if not np.all(np.isfinite(apix) & (apix > 0)):
        raise InputError(path, f"data_optics rlnImagePixelSize must be positive, got {apix.tolist()}")
    size = _numeric(path, optics, "data_optics", "rlnImageSize")
    if not np.all(np.isfinite(size) & (size > 0) & (size == np.round(size))):
        raise InputError(path, f"data_optics rlnImageSize must be positive integers, got {size.tolist()}")
    optics["rlnImageSize"] = size.astype(np.int64)


def _check_groups(path: Path, particles: pd.DataFrame, optics: pd.DataFrame) -> None:
    pg = _numeric(path, particles, "data_particles", "rlnOpticsGroup")
    defined = set(optics["rlnOpticsGroup"].tolist())
    bad = ~np.isin(pg, list(defined))
    if bad.any():
        r = int(np.argmax(bad))
        raise InputError(
            path,
            f"particle {r + 1} references optics group {pg[r]:g}, which data_optics does not define "
            f"(defined: {sorted(defined)})",
        )
    particles["rlnOpticsGroup"] = pg.astype(np.int64)


def _convert_30(path: Path, particles: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    try:
        relion30_pixel_size(particles)
    except KeyError as exc:
        raise InputError(
            path,
            "RELION 3.0 particle file (no data_optics) lacks rlnDetectorPixelSize and rlnMagnification: pixel size unknown",
        ) from exc
    index0, paths = parse_image_names(particles["rlnImageName"], path)
    box = read_mrc_header(resolve_stack_path(path, paths[0])).shape[1]
    log.warning(
        "%s: RELION 3.0 particle file (no data_optics): converted to the 3.1 layout "
        "(pixel size = rlnDetectorPixelSize * 1e4 / rlnMagnification, rlnOriginX/Y -> rlnOriginX/YAngst, box %d)",
        path,
        box,
    )
    return convert_relion30_particles(particles, image_size=box)


__all__ = [
    "REQUIRED_OPTICS_LABELS",
    "REQUIRED_PARTICLE_LABELS",
    "ParticlesTable",
    "parse_image_name",
    "parse_image_names",
    "read_particles_star",
    "resolve_stack_path",
]
