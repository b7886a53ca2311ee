"""What the iterative refinement jobs share (class2d, initial-model, refine3d): the particle store
of the input, the initial noise estimate, the per-particle table of poses and scores, the E-step
of a gold-standard iteration, and the run_itNNN_data.star writer.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from autospa.data.particle_stack import ParticleStack
from autospa.distributed.map_reduce import ParticleTable, run_estep
from autospa.errors import InputError
from autospa.io import refine_files as rf
from autospa.io.relion_particles import import_particles, source_signature
from autospa.io.zarr_store import open_store, read_store_images
from autospa.refinement import init as rinit
from autospa.refinement import mstep
from autospa.numerics.masks import background_mean_std
from autospa.refinement.estep import EStepModel, Sampling, soft_mask_background
from autospa.refinement.state import ModelState
from autospa.refinement.statistics import SufficientStats

log = logging.getLogger(__name__)

#: Per-particle results an E-step of one class writes back into the per-particle table.
POSE_KEYS = ("psi_deg", "rot_deg", "tilt_deg", "origin_px", "max_posterior", "n_significant", "log_likelihood")


def check_particles_input(path: str | Path) -> Path:
    """The input exists and is a particles .star file or a particle store; raises InputError."""
    src = Path(path)
    if not src.exists():
        raise InputError(src, "input does not exist")
    if not src.is_dir() and src.suffix.lower() != ".star":
        raise InputError(src, "input must be a particles .star file or a particle store (.zarr folder)")
    return src


def check_numeric_options(src: str | Path | None, opts) -> None:
    """The numbers shared by the refinement jobs' options are in range (cheap, before a cluster
    starts); options a job does not have are skipped.

    Raises
    ------
    InputError
        ``--particle_diameter`` not positive, ``--offset_range`` negative, ``--offset_step``,
        ``--psi_step``, ``--tau2_fudge`` not positive, ``--iter`` or ``--pad`` below 1, or
        ``--adaptive_fraction`` outside (0, 1].
    """
    def bad(flag: str, value, need: str) -> InputError:
        return InputError(src, f"{flag} must be {need} (got {value:g})")

    d = getattr(opts, "particle_diameter_a", None)
    if d is not None and not d > 0:
        raise bad("--particle_diameter", d, "positive (Angstrom)")
    for attr, flag in (("offset_step_px", "--offset_step"), ("psi_step_deg", "--psi_step"), ("tau2_fudge", "--tau2_fudge")):
        v = getattr(opts, attr, None)
        if v is not None and not v > 0:
            raise bad(flag, v, "positive")
    v = getattr(opts, "offset_range_px", None)
    if v is not None and not v >= 0:
        raise bad("--offset_range", v, "zero or positive")
    for attr in ("n_iter", "max_iter"):
        v = getattr(opts, attr, None)
        if v is not None and v < 1:
            raise bad("--iter", v, "at least 1")
    v = getattr(opts, "pad", None)
    if v is not None and v < 1:
        raise bad("--pad", v, "at least 1")
    v = getattr(opts, "adaptive_fraction", None)
    if v is not None and not 0 < v <= 1:
        raise bad("--adaptive_fraction", v, "in (0, 1]")


def input_store(input_path: str | Path, output_root: str | Path, chunk: int = 1024) -> Path:
    """The particle store of a job's input: the store itself, or ``<root>_particles.zarr`` imported
    from a STAR file (reused while the STAR file and its stacks are unchanged: same paths, sizes
    and modification times, :func:`~autospa.io.relion_particles.source_signature`)."""
    src = check_particles_input(input_path)
    if src.is_dir():
        return src
    out_root = Path(output_root)
    store = out_root.parent / (out_root.name + "_particles.zarr")
    if store.exists():
        try:
            attrs = open_store(store).dataset.attrs
        except InputError:
            attrs = {}
        sig = attrs.get("source_signature")
        if attrs.get("source_star") == str(src) and sig and sig == source_signature(src, attrs.get("source_stacks", [])):
            return store
        log.info("re-importing %s: the STAR file or its stacks changed since %s was made", src, store)
    import_particles(src, store, dtype="float32", chunk_size=chunk, overwrite=True)
    return store


def used_optics_groups(stack: ParticleStack) -> np.ndarray:
    """``(G,)`` sorted int64 optics group numbers (1-based) that at least one particle uses."""
    meta = stack.metadata
    if "OpticsGroup" in meta:
        return np.unique(meta["OpticsGroup"].to_numpy(np.int64))
    return np.ones(1, np.int64)


def shared_pixel_size(stack: ParticleStack) -> float:
    """The pixel size (Angstrom) of the optics groups the particles use, which must agree.

    Optics groups no particle uses (a subset keeps RELION's whole data_optics table) are ignored.

    Raises
    ------
    InputError
        No pixel size, or the used optics groups have different pixel sizes (RELION rescales them
        to the first group's; autospa refines at one pixel size).
    """
    src = stack.dataset.attrs.get("source_star") or stack.store_path or "particles"
    optics = stack.optics
    if optics.empty or "rlnImagePixelSize" not in optics or "rlnOpticsGroup" not in optics:
        raise InputError(src, "the optics table has no rlnImagePixelSize")
    apix = dict(zip(optics["rlnOpticsGroup"].astype(int), optics["rlnImagePixelSize"].astype(float), strict=True))
    used = used_optics_groups(stack)
    missing = [int(g) for g in used if int(g) not in apix]
    if missing:
        raise InputError(src, f"particles use optics group(s) {missing}, which the optics table does not define")
    values = {int(g): apix[int(g)] for g in used}
    if len(set(values.values())) != 1:
        detail = ", ".join(f"group {g}: {v:g} A" for g, v in values.items())
        raise InputError(src, f"optics groups have different pixel sizes ({detail}); autospa refines at one pixel "
                              "size: rescale the particles to a common pixel size (e.g. re-extract with --rescale) "
                              "or process the groups separately")
    return next(iter(values.values()))


def particle_diameter_px(opts, stack: ParticleStack) -> float:
    """``opts.particle_diameter_a`` in pixels of the stack (default 75 % of the box), checked."""
    if opts.particle_diameter_a is None:
        return 0.75 * stack.box
    d = opts.particle_diameter_a / shared_pixel_size(stack)
    if d <= 2 or d > 2 * stack.box:
        raise InputError(opts.input, f"--particle_diameter {opts.particle_diameter_a} A is {d:.1f} px for a box of {stack.box} px")
    return min(d, stack.box - 2.0)


def current_client():
    """The dask client of the calling context (a scheme run's cluster), or None."""
    from distributed import default_client

    try:
        return default_client()
    except ValueError:
        return None


def checkpoint_path(output_root: str | Path) -> Path:
    """``DIR/run_checkpoint.pt`` of the output root ``DIR/run``."""
    root = Path(output_root)
    return root.parent / f"{root.name}_checkpoint.pt"


def require_checkpoint(output_root: str | Path) -> Path:
    """The checkpoint of a run to ``--continue``; raises InputError when there is none."""
    ckpt = checkpoint_path(output_root)
    if not ckpt.is_file():
        raise InputError(ckpt, "no checkpoint to continue from (was the run started with this --o?)")
    return ckpt


def save_run_checkpoint(path: Path, version: int, options: dict, store_path, n: int, box: int, state, pp: dict, it: int,
                        gen: torch.Generator) -> None:
    """The driver state of an iterative job (class2d, initial-model), written atomically."""
    rf.save_checkpoint(path, {
        "version": version, "options": options, "store": str(store_path), "n_particles": n, "box": box,
        "state": state.to_dict(), "particles": pp, "iteration": it, "torch_rng": gen.get_state(),
    })


def group_tables(sigma2: torch.Tensor, table: ParticleTable, stack: ParticleStack) -> tuple[pd.DataFrame, list[pd.DataFrame]]:
    """data_model_groups and the data_model_optics_group_N noise spectra of a model.star."""
    n_groups = int(table.group.max()) + 1
    counts = np.bincount(table.group, minlength=n_groups)
    optics = stack.optics
    used = used_optics_groups(stack)
    if len(used) != n_groups:
        used = np.arange(1, n_groups + 1)
    if "rlnOpticsGroupName" in optics and "rlnOpticsGroup" in optics:
        name_of = dict(zip(optics["rlnOpticsGroup"].astype(int), optics["rlnOpticsGroupName"].astype(str), strict=True))
        names = [name_of.get(int(g), f"opticsGroup{int(g)}") for g in used]
    else:
        names = [f"opticsGroup{int(g)}" for g in used]
    groups = pd.DataFrame({"rlnGroupNumber": np.arange(1, n_groups + 1), "rlnGroupName": names,
                           "rlnGroupNrParticles": counts, "rlnGroupScaleCorrection": np.ones(n_groups)})
    rescols = rf.resolution_columns(sigma2.shape[1], stack.box, shared_pixel_size(stack))
    noise = []
    for g in range(n_groups):
        s2 = sigma2[g].cpu().numpy()
        keep = s2 > 0
        noise.append(rf.spectral_table({"rlnSpectralIndex": rescols["rlnSpectralIndex"][keep],
                                        "rlnResolution": rescols["rlnResolution"][keep], "rlnSigma2Noise": s2[keep]}))
    return groups, noise


def check_normalisation(images: torch.Tensor, indices: np.ndarray, radius_px: float, image_names=None,
                        source: str | Path | None = None) -> None:
    """RELION's check that particles are normalised (relion_preprocess --norm): the background
    outside the particle circle must have ``|mean / std| <= 0.5`` and ``0.5 <= std <= 2``.

    Parameters
    ----------
    images
        ``(M, D, D)`` particles, before masking.
    indices
        ``(M,)`` their store indices (for the message).
    radius_px
        Half the particle diameter in pixels.
    image_names
        ``(N_store,)`` rlnImageName of every particle, or None.

    Raises
    ------
    InputError
        The first image that fails, with its background mean and standard deviation.
    """
    mean, std = background_mean_std(images, radius_px)
    bad = ~((mean / std).abs() <= 0.5) | ~(std >= 0.5) | ~(std <= 2.0)
    if bool(bad.any()):
        k = int(torch.nonzero(bad)[0])
        i = int(indices[k])
        name = f" ({image_names[i]})" if image_names is not None else ""
        raise InputError(
            source,
            f"particle {i + 1}{name} is not normalised: background mean {float(mean[k]):.4g}, standard deviation "
            f"{float(std[k]):.4g} outside a circle of {round(radius_px)} px (RELION requires mean ~0 and std ~1, "
            f"as relion_preprocess --norm writes them); normalise the particles, or pass --dont_check_norm",
        )


def initial_noise(store_path: Path, table: ParticleTable, mask: torch.Tensor | None, seed: int,
                  per_group: int = 1000, check_norm_radius_px: float | None = None,
                  image_names=None) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    """RELION's initial noise spectra from up to ``per_group`` (zero-masked) particles per optics group.

    With ``check_norm_radius_px``, those particles are first checked to be normalised
    (:func:`check_normalisation`; ``image_names`` names the offending one).

    Returns
    -------
    sigma2
        ``(G, S)`` float64.
    picked
        ``(M,)`` store indices of the particles used.
    images
        ``(M, D, D)`` those particles (masked), for seed maps.
    """
    rng = np.random.default_rng(seed)
    n_groups = int(table.group.max()) + 1
    picks, images, sig = [], [], []
    if check_norm_radius_px is not None:
        source = open_store(store_path).dataset.attrs.get("source_star") or store_path
    for g in range(n_groups):
        members = np.nonzero(table.group == g)[0]
        pick = np.sort(rng.choice(members, size=min(per_group, len(members)), replace=False))
        imgs = torch.from_numpy(read_store_images(store_path, pick))
        if check_norm_radius_px is not None:
            check_normalisation(imgs, pick, check_norm_radius_px, image_names, source)
        if mask is not None:
            imgs = soft_mask_background(imgs, mask)
        ps, isum, cnt = rinit.power_sums(imgs)
        sig.append(rinit.initial_sigma2(ps, isum, cnt))
        picks.append(pick)
        images.append(imgs)
    return torch.stack(sig), np.concatenate(picks), torch.cat(images)


def half_set_estep(
    client,
    store_path: Path,
    chunk_bounds,
    indices: np.ndarray,
    half: np.ndarray,
    state: ModelState,
    pp: dict,
    table: ParticleTable,
    sampling: Sampling,
    mask: torch.Tensor | None,
    coarse_size: int,
    device: str = "cpu",
    torch_threads: int = 0,
    angles_deg: np.ndarray | None = None,
) -> SufficientStats:
    """The E-step of a gold-standard iteration: the particles of each half-set against that half's
    own reference (``state.refs[h]``, one class), statistics summed, poses written into ``pp``.

    Parameters
    ----------
    indices
        Store indices of the particles of this iteration.
    half
        ``(N_store,)`` half-set (0/1) of every particle; must equal ``table.half`` so that the
        statistics land in the half each particle was aligned in.
    state
        ``refs`` ``(2, D, D, D)``: the two half maps; sigma2, offsets prior, window and padding.
    pp
        Per-particle table (:func:`per_particle_init`), updated in place for ``indices``.
    """
    stats = None
    for h in range(2):
        model = EStepModel(ref_ft=mstep.reference_ft(state.refs[h : h + 1], state.pad), sigma2=state.sigma2,
                           log_class_prior=torch.zeros(1), sigma_offset_px=state.sigma_offset_a / state.pixel_size_a,
                           current_size=state.current_size, coarse_size=coarse_size, pad=state.pad)
        st, res = run_estep(client, str(store_path), chunk_bounds, indices[half[indices] == h], pp["origin_px"], table,
                            model, sampling, mask, device=device, torch_threads=torch_threads, angles_deg=angles_deg)
        stats = st if stats is None else stats + st
        for key in POSE_KEYS:
            pp[key][res["index"]] = res[key]
    return stats


def image_names(stack: ParticleStack):
    """``(N,)`` rlnImageName of every particle of a store, or None when it has none."""
    meta = stack.metadata
    return meta["ImageName"].to_numpy() if "ImageName" in meta else None


def per_particle_init(stack: ParticleStack, table: ParticleTable) -> dict:
    """Per-particle poses and scores from the input's metadata (zeros where absent)."""
    meta = stack.metadata
    n = len(stack)
    pix = table.pixel_size_a

    def col(name: str) -> np.ndarray:
        return meta[name].to_numpy(np.float64) if name in meta else np.zeros(n)

    return {
        "class_index": np.zeros(n, np.int64), "psi_deg": col("AnglePsi").astype(np.float32),
        "rot_deg": col("AngleRot").astype(np.float32), "tilt_deg": col("AngleTilt").astype(np.float32),
        "origin_px": np.stack([col("OriginXAngst") / pix, col("OriginYAngst") / pix], 1).astype(np.float32),
        "max_posterior": np.zeros(n, np.float32), "n_significant": np.zeros(n, np.int64),
        "log_likelihood": np.zeros(n, np.float32), "group": table.group.copy(),
    }


def write_data_table(root: Path, stack: ParticleStack, pp: dict, pixel: float, half: np.ndarray | None = None) -> Path:
    """``<root>_data.star``: the input's particles with this iteration's class, angles, origins
    and scores (rlnRandomSubset 1/2 when ``half`` is given)."""
    optics, particles = stack.star_tables()
    particles = particles.copy()
    particles["rlnClassNumber"] = pp["class_index"] + 1
    particles["rlnAngleRot"] = pp["rot_deg"].astype(np.float64) if "rot_deg" in pp else particles.get("rlnAngleRot", 0.0)
    particles["rlnAngleTilt"] = pp["tilt_deg"].astype(np.float64) if "tilt_deg" in pp else particles.get("rlnAngleTilt", 0.0)
    particles["rlnAnglePsi"] = pp["psi_deg"].astype(np.float64)
    particles["rlnOriginXAngst"] = pp["origin_px"][:, 0].astype(np.float64) * pixel
    particles["rlnOriginYAngst"] = pp["origin_px"][:, 1].astype(np.float64) * pixel
    particles["rlnLogLikeliContribution"] = pp["log_likelihood"].astype(np.float64)
    particles["rlnMaxValueProbDistribution"] = pp["max_posterior"].astype(np.float64)
    particles["rlnNrOfSignificantSamples"] = pp["n_significant"].astype(np.int64)
    if "rlnNormCorrection" not in particles:
        particles["rlnNormCorrection"] = 1.0
    particles["rlnGroupNumber"] = pp["group"] + 1
    if half is not None:
        particles["rlnRandomSubset"] = np.asarray(half, np.int64) + 1
    return rf.write_data_star(Path(f"{root}_data.star"), optics, particles)


def other_args_check_norm(other_args: str) -> bool:
    """Whether a job's "Additional arguments" (other_args) leave RELION's normalisation check on,
    i.e. do not hold ``--dont_check_norm`` (where RELION users switch it off in the GUI)."""
    import shlex

    return "--dont_check_norm" not in shlex.split(str(other_args or "").strip().strip('"'))


__all__ = ["check_numeric_options", "check_particles_input", "checkpoint_path", "group_tables", "require_checkpoint", "save_run_checkpoint", "current_client", "particle_diameter_px", "shared_pixel_size", "used_optics_groups", "check_normalisation", "image_names", "initial_noise", "input_store", "per_particle_init", "write_data_table", "other_args_check_norm"]
