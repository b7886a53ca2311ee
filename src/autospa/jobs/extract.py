"""Job relion.extract: cut particles out of the micrographs at their picked coordinates (L5).

Outputs, in RELION's layout (``DIR`` = the job directory)::

    DIR/particles.star          data_optics (the micrographs' optics groups plus rlnImagePixelSize,
                                rlnImageSize, rlnImageDimensionality, rlnCtfDataAreCtfPremultiplied)
                                + data_particles: rlnCoordinateX/Y (micrograph pixels),
                                rlnImageName (``000001@DIR/Movies/NAME.mrcs``), rlnMicrographName,
                                rlnOpticsGroup, the micrograph's CTF (rlnDefocusU/V/Angle,
                                rlnCtfBfactor, rlnCtfScalefactor, rlnPhaseShift,
                                rlnCtfMaxResolution, rlnCtfFigureOfMerit), rlnAutopickFigureOfMerit,
                                rlnClassNumber, rlnAnglePsi
    DIR/Movies/NAME.mrcs        the particles of one micrograph (MRC mode 12 with ``float16``)
    DIR/particles.zarr          the same particles as the Zarr particle store (xarray Dataset)

The MRCS stacks are always written: particles.star must name images that RELION and the
downstream jobs (which take a particles.star) can read; the store is what autospa's own jobs
stream from. Box sizes follow :func:`autospa.preprocess.extract.choose_box_sizes` when only a
particle diameter is given (1.5 x diameter, FFT-friendly, downscaled to 2.8-3.5 A/pixel).

One dask task per micrograph. With ``continue_`` only micrographs without particles in
particles.star are extracted; the store is then rebuilt from all stacks.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from autospa.errors import AutospaError, InputError
from autospa.io.mrc import read_stack_images, write_mrc
from autospa.io.preprocess_files import (
    read_coordinate_index,
    read_coordinates,
    read_micrograph,
    read_micrograph_table,
    write_particles_star,
)
from autospa.io.star import read_star
from autospa.io.zarr_store import StoreWriter
from autospa.jobs.preprocess_common import map_tasks, mirror_path, project_relative, resolve
from autospa.jobs.registry import option_bool, option_float, option_int, project_dir_of, register_job, resolve_path, succeed
from autospa.preprocess.extract import choose_box_sizes, extract_particles, is_fft_friendly

log = logging.getLogger(__name__)

OUTPUT_STAR = "particles.star"
OUTPUT_STORE = "particles.zarr"

#: Micrograph-level CTF columns copied to every particle when present.
CTF_COLUMNS = (
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnCtfBfactor",
    "rlnCtfScalefactor",
    "rlnPhaseShift",
    "rlnCtfMaxResolution",
    "rlnCtfFigureOfMerit",
)


@dataclass(frozen=True)
class ExtractParams:
    """Options of the extraction job (RELION's job.star names in brackets).

    Attributes
    ----------
    mics_star
        micrographs_ctf.star [star_mics / --i].
    coords_star
        autopick.star [coords_suffix / --coords]; also RELION 3's ``coords_suffix_*.star`` or a
        folder of per-micrograph coordinate files (see :func:`coordinate_files`).
    output_dir
        Job directory [--o].
    extract_size
        Box in micrograph pixels [extract_size]; ``<= 0``: 1.5 x ``particle_diameter``.
    rescale
        Box after downscaling [rescale, with do_rescale]; ``0``: no rescaling; ``-1``: choose a
        size giving 2.8-3.5 A/pixel (needs ``particle_diameter`` or ``extract_size``).
    particle_diameter
        Particle diameter in Angstrom (only for the automatic sizes).
    do_norm
        Normalise the background (mean 0, std 1 outside the particle circle) [do_norm].
    bg_diameter
        Diameter (rescaled pixels) of the particle circle; ``-1``: 75 % of the box [bg_diameter].
    do_invert
        Invert the contrast (white protein) [do_invert].
    float16
        Write the stacks in MRC mode 12 and the store in float16 [do_float16].
    minimum_pick_fom
        Skip picks whose rlnAutopickFigureOfMerit is lower [do_fom_threshold, minimum_pick_fom];
        ``None``: keep all.
    chunk_size
        Particles per chunk of the Zarr store.
    device
        torch device of each task.
    """

    mics_star: str
    coords_star: str
    output_dir: str
    extract_size: int = 256
    rescale: int = 0
    particle_diameter: float = 0.0
    do_norm: bool = True
    bg_diameter: float = -1.0
    do_invert: bool = True
    float16: bool = True
    minimum_pick_fom: float | None = None
    chunk_size: int = 1024
    device: str = "cpu"


@dataclass(frozen=True)
class _Sizes:
    box: int
    out_box: int


def _sizes(params: ExtractParams, pixel_size_a: float) -> _Sizes:
    """Extraction and output box for micrographs of this pixel size."""
    box = int(params.extract_size)
    auto = choose_box_sizes(params.particle_diameter, pixel_size_a) if params.particle_diameter > 0 else None
    if box <= 0:
        if auto is None:
            raise InputError(None, "give --extract_size or a --particle_diameter to choose the box from")
        box = auto.extract_box
    if box % 2:
        raise InputError(None, f"--extract_size must be even (got {box})")
    out = int(params.rescale)
    if out == 0:
        out = box
    elif out < 0:
        side_a = box * pixel_size_a
        if auto is not None and auto.extract_box == box:
            out = auto.scaled_box
        else:
            # same rule as choose_box_sizes, for a given box
            cands = [m for m in range(2, box + 1, 2) if is_fft_friendly(m) and 2.8 - 1e-9 <= side_a / m <= 3.5 + 1e-9]
            out = max(cands) if cands else box
    if out % 2 or out > box:
        raise InputError(None, f"--scale {out} must be even and at most the extraction box {box}")
    return _Sizes(box, out)


def _extract_micrograph(task: dict) -> dict:
    """One dask task: extract the particles of one micrograph into its MRCS stack.

    Returns ``{"rows": [...], "n": k}`` (particle rows without the CTF columns) or ``{"error": ...}``.
    """
    p = ExtractParams(**task["params"])
    try:
        coords = read_coordinates(task["coord_path"])
        if p.minimum_pick_fom is not None and "rlnAutopickFigureOfMerit" in coords.columns:
            coords = coords[coords["rlnAutopickFigureOfMerit"].astype(float) >= p.minimum_pick_fom]
        coords = coords.reset_index(drop=True)
        if coords.empty:
            return {"rows": [], "n": 0}
        image, _ = read_micrograph(task["mic_path"])
        mic = torch.from_numpy(image).to(torch.device(p.device))
        xy = torch.as_tensor(coords[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(np.float64))
        bg_radius = p.bg_diameter / 2 if p.bg_diameter > 0 else None
        images, inside = extract_particles(
            mic,
            xy,
            task["box"],
            scaled_box=task["out_box"],
            bg_radius_px=bg_radius,
            normalise=p.do_norm,
            invert_contrast=p.do_invert,
        )
    except (AutospaError, ValueError) as exc:
        return {"error": f"{task['mic_name']}: {exc}"}
    kept = coords[inside.cpu().numpy()].reset_index(drop=True)
    k = len(kept)
    if k == 0:
        return {"rows": [], "n": 0}
    write_mrc(task["stack_path"], images.cpu().numpy(), task["out_pixel_a"], mode=12 if p.float16 else 2, stack=True)
    rows = []
    for j in range(k):
        row = {
            "rlnCoordinateX": float(kept["rlnCoordinateX"].iloc[j]),
            "rlnCoordinateY": float(kept["rlnCoordinateY"].iloc[j]),
            "rlnImageName": f"{j + 1:06d}@{task['stack_name']}",
            "rlnMicrographName": task["mic_name"],
            "rlnOpticsGroup": task["optics_group"],
            "rlnClassNumber": int(kept["rlnClassNumber"].iloc[j]) if "rlnClassNumber" in kept.columns else 0,
            "rlnAnglePsi": float(kept["rlnAnglePsi"].iloc[j]) if "rlnAnglePsi" in kept.columns else -999.0,
            "rlnAutopickFigureOfMerit": float(kept["rlnAutopickFigureOfMerit"].iloc[j])
            if "rlnAutopickFigureOfMerit" in kept.columns
            else 0.0,
        }
        rows.append(row)
    return {"rows": rows, "n": k}


#: Suffixes of RELION's per-micrograph coordinate files, tried in turn for a coordinate folder.
COORDINATE_SUFFIXES = ("_autopick.star", "_manualpick.star", "_pick.star")

_COORDS_SUFFIX_FILE = re.compile(r"^coords_suffix(_.+\.star)$")


def coordinate_files(coords: Path, micrograph_names, project: Path) -> dict[str, str]:
    """Micrograph name -> coordinate file, from any of RELION's ways of naming the picks.

    * RELION 4's ``autopick.star`` / ``manualpick.star`` (``data_coordinate_files``);
    * RELION 3's ``coords_suffix_SUFFIX.star`` in a picking job's folder: the coordinates of
      micrograph ``MotionCorr/job002/Movies/a.mrc`` are ``JOBDIR/Movies/a_SUFFIX.star``;
    * a folder (RELION 3's ``--coord_dir``), with any of :data:`COORDINATE_SUFFIXES`.

    Raises
    ------
    InputError
        Missing file, no coordinate table, or (RELION 3 layouts) no coordinate file for any of the
        micrographs.
    """
    match = _COORDS_SUFFIX_FILE.match(coords.name)
    if coords.is_dir():
        coord_dir, suffixes = coords, COORDINATE_SUFFIXES
    elif match and coords.is_file():
        coord_dir, suffixes = coords.parent, (match.group(1),)
    else:
        index = read_coordinate_index(coords)
        return dict(zip(index["rlnMicrographName"], index["rlnMicrographCoordinates"], strict=True))
    found = {}
    for mic in micrograph_names:
        for suffix in suffixes:
            path = mirror_path(mic, coord_dir, suffix)
            if path.is_file():
                found[mic] = project_relative(path, project)
                break
    if not found:
        example = mirror_path(next(iter(micrograph_names), "NAME.mrc"), coord_dir, suffixes[0])
        raise InputError(coords, f"no coordinate file for any micrograph (looked for e.g. {example})")
    return found


def run_extract(
    params: ExtractParams,
    project_dir: str | Path | None = None,
    client=None,
    continue_: bool = False,
) -> Path:
    """Extract the picked particles of every micrograph; returns particles.star.

    Raises
    ------
    InputError
        Unreadable inputs, inconsistent sizes, or no particle could be extracted.
    """
    project = Path(project_dir or Path.cwd()).resolve()
    mics_star = resolve(params.mics_star, project)
    coords_star = resolve(params.coords_star, project)
    out_dir = resolve(params.output_dir, project)
    table = read_micrograph_table(mics_star, "micrographs", "rlnMicrographName")
    coord_files = coordinate_files(coords_star, table.rows["rlnMicrographName"].astype(str), project)
    out_star = out_dir / OUTPUT_STAR
    done_particles = _existing_particles(out_star) if continue_ else None
    done = set(done_particles["rlnMicrographName"].astype(str)) if done_particles is not None else set()

    optics_rows: dict[int, dict] = {}
    tasks, mic_rows = [], []
    for i, mic in enumerate(table.rows["rlnMicrographName"].astype(str)):
        if mic in done or mic not in coord_files:
            continue
        optics = table.optics_for(i)
        group = int(optics["rlnOpticsGroup"])
        pixel = float(optics.get("rlnMicrographPixelSize", 0) or 0)
        if not pixel > 0:
            raise InputError(mics_star, "data_optics has no rlnMicrographPixelSize")
        sizes = _sizes(params, pixel)
        out_pixel = pixel * sizes.box / sizes.out_box
        optics_rows.setdefault(group, _particle_optics(optics, out_pixel, sizes.out_box))
        stack_path = mirror_path(mic, out_dir, ".mrcs")
        tasks.append(
            {
                "params": asdict(params),
                "mic_name": mic,
                "mic_path": str(resolve(mic, project)),
                "coord_path": str(resolve(coord_files[mic], project)),
                "box": sizes.box,
                "out_box": sizes.out_box,
                "out_pixel_a": out_pixel,
                "optics_group": group,
                "stack_path": str(stack_path),
                "stack_name": project_relative(stack_path, project),
            }
        )
        mic_rows.append(table.rows.iloc[i])
    log.info("extract: %d micrographs to extract, %d already done", len(tasks), len(done))
    results = map_tasks(_extract_micrograph, tasks, client=client, key_prefix="extract")
    frames = []
    for r, mrow in zip(results, mic_rows, strict=True):
        if "error" in r:
            log.warning("extract: skipped %s", r["error"])
            continue
        if not r["rows"]:
            continue
        df = pd.DataFrame(r["rows"])
        for col in CTF_COLUMNS:
            if col in mrow.index:
                df[col] = mrow[col]
        frames.append(df)
    errors = [r["error"] for r in results if "error" in r]
    if tasks and len(errors) == len(tasks):
        raise InputError(mics_star, f"no micrograph could be extracted; first problem: {errors[0]}")
    new = pd.concat(frames, ignore_index=True) if frames else None
    parts = [df for df in (done_particles, new) if df is not None and len(df)]
    if not parts:
        raise InputError(coords_star, "no particles to extract (no coordinates inside the micrographs)")
    particles = pd.concat(parts, ignore_index=True)
    optics_df = _merge_optics(out_star if continue_ else None, optics_rows)
    boxes = set(optics_df["rlnImageSize"].astype(int))
    if len(boxes) != 1:
        raise InputError(mics_star, f"optics groups would get different particle boxes {sorted(boxes)}; extract them separately")
    box = boxes.pop()
    store = out_dir / OUTPUT_STORE
    if new is None and continue_ and store.exists() and out_star.exists():
        log.info("extract: no new particles; %s and %s are up to date", out_star, store)
        return out_star
    _write_store(store, particles, optics_df, box, params, project)
    write_particles_star(out_star, optics_df, particles)
    log.info("extract: %d particles of %d px in %s", len(particles), box, out_star)
    return out_star


def _particle_optics(optics: dict, out_pixel: float, out_box: int) -> dict:
    row = {k: v for k, v in optics.items() if isinstance(k, str) and k.startswith("rln")}
    row["rlnImagePixelSize"] = float(out_pixel)
    row["rlnImageSize"] = int(out_box)
    row["rlnImageDimensionality"] = 2
    row["rlnCtfDataAreCtfPremultiplied"] = 0
    return row


def _merge_optics(old_star: Path | None, new_rows: dict[int, dict]) -> pd.DataFrame:
    rows: dict[int, dict] = {}
    if old_star is not None and old_star.exists():
        old = read_star(old_star).get("optics")
        if isinstance(old, pd.DataFrame):
            for rec in old.to_dict("records"):
                rows[int(rec["rlnOpticsGroup"])] = rec
    for g, rec in new_rows.items():
        rows.setdefault(g, rec)
    df = pd.DataFrame([rows[g] for g in sorted(rows)])
    df["rlnOpticsGroup"] = df["rlnOpticsGroup"].astype(np.int64)
    df["rlnImageSize"] = df["rlnImageSize"].astype(np.int64)
    df["rlnImageDimensionality"] = df["rlnImageDimensionality"].astype(np.int64)
    df["rlnCtfDataAreCtfPremultiplied"] = df["rlnCtfDataAreCtfPremultiplied"].astype(np.int64)
    return df


def _existing_particles(star: Path) -> pd.DataFrame | None:
    if not star.exists():
        return None
    blocks = read_star(star)
    parts = blocks.get("particles")
    if not isinstance(parts, pd.DataFrame) or "rlnMicrographName" not in parts.columns:
        raise InputError(star, "existing particles.star has no data_particles with rlnMicrographName")
    return parts


def _write_store(store: Path, particles: pd.DataFrame, optics: pd.DataFrame, box: int, params: ExtractParams, project: Path) -> None:
    """(Re)build the Zarr store from the stacks, micrograph by micrograph, in particles.star order."""
    stacks = particles["rlnImageName"].str.split("@", n=1).str[1]
    index = particles["rlnImageName"].str.split("@", n=1).str[0].astype(np.int64) - 1
    dtype = "float16" if params.float16 else "float32"
    with StoreWriter(store, box, dtype=dtype, optics=optics, chunk_size=params.chunk_size, overwrite=True) as w:
        start = 0
        n = len(particles)
        while start < n:
            stop = start
            name = stacks.iloc[start]
            while stop < n and stacks.iloc[stop] == name:
                stop += 1
            images = read_stack_images(resolve(name, project), index.iloc[start:stop].to_numpy())
            w.append(images, particles.iloc[start:stop].reset_index(drop=True))
            start = stop


def params_from_options(job_dir: Path, options: dict[str, str]) -> ExtractParams:
    """ExtractParams from RELION's job.star option names."""
    rescale = option_int(options, "rescale", 128) if option_bool(options, "do_rescale", False) else 0
    return ExtractParams(
        mics_star=str(resolve_path(job_dir, options.get("star_mics", ""))),
        coords_star=str(resolve_path(job_dir, options.get("coords_suffix", ""))),
        output_dir=str(job_dir),
        extract_size=option_int(options, "extract_size", 128),
        rescale=rescale,
        do_norm=option_bool(options, "do_norm", True),
        bg_diameter=option_float(options, "bg_diameter", -1.0),
        do_invert=option_bool(options, "do_invert", True),
        float16=option_bool(options, "do_float16", True),
        minimum_pick_fom=option_float(options, "minimum_pick_fom", 0.0) if option_bool(options, "do_fom_threshold", False) else None,
    )


@register_job("relion.extract")
def job_extract(job_dir: Path, options: dict[str, str], continue_: bool) -> None:
    """Registry entry: run the job from its job.star options."""
    run_extract(params_from_options(job_dir, options), project_dir_of(job_dir), continue_=continue_)
    succeed(job_dir)


__all__ = ["CTF_COLUMNS", "OUTPUT_STAR", "OUTPUT_STORE", "ExtractParams", "params_from_options", "run_extract"]
