"""The E-step as a dask map-reduce over the chunks of a particle store (DESIGN.md section 2).

Each iteration the driver

1. broadcasts the model (references, noise, priors: a few MB) to the workers once,
2. submits tasks over the Zarr chunks holding particles of this iteration's (mini-)batch (a
   chunk, an equal part of one, or the few particles a sparse mini-batch draws from several
   chunks packed together: :func:`plan_tasks`); the task reads its chunks (or takes them from
   the worker's chunk cache), computes the CTFs, runs
   :func:`autospa.refinement.estep.expectation` and returns additive statistics plus the
   per-particle results,
3. tree-reduces the statistics on the workers (pairwise ``+``), and gathers one
   :class:`~autospa.refinement.statistics.SufficientStats` and the per-particle results.

Tasks are pure functions of their arguments, so a task lost with a killed worker is recomputed
by dask with the same result. Without a client (``client=None``) the same task function runs in
the calling process, which is what a one-process run and the tests of equality use.

Chunk cache: a worker keeps the float32 images of the chunks it has read (up to
``AUTOSPA_CHUNK_CACHE_MB``, default 15% of the machine's memory per process, least recently used
first out), so iterations over the same particles read Zarr only the first time. A task that needs
less than a quarter of a chunk of a store bigger than half the cache (a mini-batch of a store much
larger than memory) reads only its particles and caches nothing, so memory stays bounded whatever
the store's size. Cached chunks are keyed by the store's stamp (its image metadata's modification
time), so a store written anew at the same path is read afresh. On a CUDA
worker the chunk lives on the GPU: the Zarr read becomes a cupy array when cupy is installed (the
same block :meth:`~autospa.data.particle_stack.ParticleStack.gpu_images`, the dask array with
cupy meta, computes), and is handed to torch through DLPack without a copy.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from autospa.data.particle_stack import to_cupy
from autospa.io.zarr_store import read_store_chunk, read_store_images, store_images_info
from autospa.numerics.ctf import ctf_2d
from autospa.refinement.estep import EStepModel, ParticleBatch, ParticleResult, Sampling, expectation, rfft_frequencies
from autospa.refinement.statistics import SufficientStats

log = logging.getLogger(__name__)

#: Per-particle CTF parameters, the columns of :attr:`ParticleTable.ctf_params`.
CTF_COLUMNS = ("DefocusU", "DefocusV", "DefocusAngle", "Voltage", "SphericalAberration", "AmplitudeContrast",
               "PhaseShift", "CtfBfactor", "CtfScalefactor")


@dataclass
class ParticleTable:
    """What the tasks need of each particle, besides its image (numpy, indexed by particle).

    Attributes
    ----------
    ctf_params
        ``(N, 9)`` float64, columns :data:`CTF_COLUMNS`, or None to run without CTF.
    pixel_size_a
        Pixel size of the images (one value: the engine runs on one box and pixel size).
    group
        ``(N,)`` int64 0-based optics group.
    half
        ``(N,)`` int64 half-set (0/1).
    ctf_premultiplied
        ``(N,)`` bool: images already multiplied by their CTF (rlnCtfDataArePhaseFlipped or
        rlnCtfDataAreCtfPremultiplied) — the E-step then uses CTF^2 as RELION does.
    """

    ctf_params: np.ndarray | None
    pixel_size_a: float
    group: np.ndarray
    half: np.ndarray
    ctf_premultiplied: np.ndarray | None = None


# --------------------------------------------------------------------------------------------
# worker side

#: A task caches its chunk when it uses at least this fraction of it, or when the whole store
#: (as float32) fits in half the cache; sparser reads of bigger stores (mini-batches drawn from a
#: store much larger than the cache) read only their particles and keep nothing.
CACHE_MIN_FRACTION = 0.25


_CACHE: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_BYTES = [0]


def _cache_limit() -> int:
    env = os.environ.get("AUTOSPA_CHUNK_CACHE_MB")
    if env is not None:
        return int(float(env) * 2**20)
    try:
        import psutil

        return int(psutil.virtual_memory().total * 0.15)
    except Exception:  # pragma: no cover
        return 2 * 2**30


def _to_device(images: np.ndarray, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        try:
            # the chunk as ParticleStack.gpu_images gives it (cupy), then zero-copy to torch
            return torch.from_dlpack(to_cupy(images, device.index or 0))
        except ImportError:
            return torch.from_numpy(images).to(device)
    return torch.from_numpy(images)


def _store_stamp_and_fits(store_path: str) -> tuple[int, bool]:
    """The store's stamp (cached chunks of an older store at the same path are not reused) and
    whether all its images fit in half the chunk cache."""
    shape, stamp = store_images_info(store_path)
    return stamp, 4 * math.prod(shape) <= _cache_limit() // 2


def load_chunk(store_path: str, start: int, stop: int, device: torch.device, stamp: int | None = None) -> torch.Tensor:
    """Images ``start:stop`` of a store as a float32 tensor on ``device``, through the cache
    (``stamp``: the store's, :func:`~autospa.io.zarr_store.store_images_info`)."""
    if stamp is None:
        stamp = store_images_info(store_path)[1]
    key = (str(store_path), stamp, int(start), int(stop), str(device))
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            return hit
    images = _to_device(read_store_chunk(store_path, start, stop), device)
    size = images.numel() * images.element_size()
    limit = _cache_limit()
    with _CACHE_LOCK:
        if size <= limit:
            _CACHE[key] = images
            _CACHE_BYTES[0] += size
            while _CACHE_BYTES[0] > limit and len(_CACHE) > 1:
                _, old = _CACHE.popitem(last=False)
                _CACHE_BYTES[0] -= old.numel() * old.element_size()
    return images


def clear_chunk_cache() -> None:
    """Forget the cached chunks of this process."""
    with _CACHE_LOCK:
        _CACHE.clear()
        _CACHE_BYTES[0] = 0


def _task_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


def ctf_images(params: np.ndarray | None, n: int, box: int, pixel_size_a: float, device: torch.device,
               size: int | None = None) -> torch.Tensor:
    """``(n, D, D//2+1)`` RELION CTFs from ``(n, 9)`` parameters (ones when ``params`` is None).

    With ``size``, only the pixels of shells ``round(|f|) <= size // 2`` (the E-step's windows at
    that current image size) are computed, the others are 0: the E-step reads nothing beyond, and
    at large boxes and low resolution the float64 CTF of the whole grid was a large part of a task
    (box 200 at a 42-px window: 14 % of a class2d run's time, for 20 times the pixels it needs).
    """
    if params is None:
        return torch.ones(n, box, box // 2 + 1, device=device)
    p = torch.as_tensor(params, dtype=torch.float64, device=device)
    args = (p[:, 0], p[:, 1], p[:, 2], p[:, 3], p[:, 4], p[:, 5], pixel_size_a, box)
    kw = dict(phase_shift_deg=p[:, 6], bfactor_a2=p[:, 7], scale=p[:, 8], device=device)
    if size is None or size // 2 >= box:
        return ctf_2d(*args, **kw)
    freqs, shells = rfft_frequencies(box, device)
    inside = torch.nonzero(shells <= size // 2).squeeze(1)
    out = torch.zeros(n, box * (box // 2 + 1), device=device)
    out[:, inside] = ctf_2d(*args, **kw, frequencies=freqs[inside])
    return out.view(n, box, box // 2 + 1)


def estep_task(
    store_path: str,
    pieces: Sequence[tuple[int, int, np.ndarray]],
    origin_px: np.ndarray,
    ctf_params: np.ndarray | None,
    premultiplied: np.ndarray | None,
    group: np.ndarray,
    half: np.ndarray,
    pixel_size_a: float,
    model: EStepModel,
    sampling: Sampling,
    mask: torch.Tensor | None,
    device: str = "cpu",
    torch_threads: int = 0,
    angles_deg: np.ndarray | None = None,
) -> tuple[SufficientStats, dict]:
    """One map task: the E-step on particles ``start + local`` of one or more store chunks.

    Parameters
    ----------
    pieces
        ``[(start, stop, local), ...]``: chunk bounds and ``(n_i,)`` indices into the chunk
        (:func:`plan_tasks`); the task's particles are the pieces' in this order.
    origin_px, ctf_params, premultiplied, group, half
        Per-particle values of those particles (``(n, 2)``, ``(n, 9)``, ``(n,)``...).
    angles_deg
        ``(n, 3)`` previous (rot, tilt, psi) of those particles: the centres of local searches.

    Returns
    -------
    stats, result
        Statistics on the CPU, and a dict of numpy arrays: ``index`` (store indices) plus the
        fields of :class:`~autospa.refinement.estep.ParticleResult`.
    """
    if torch_threads > 0 and torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    dev = _task_device(device)
    stamp, fits = _store_stamp_and_fits(store_path)
    parts, index = [], []
    for start, stop, local in pieces:
        local = np.asarray(local, dtype=np.int64)
        if fits or len(local) >= CACHE_MIN_FRACTION * (stop - start):
            chunk = load_chunk(store_path, start, stop, dev, stamp)
            parts.append(chunk[torch.as_tensor(local, device=dev)])
        else:  # a sparse mini-batch of a big store: read what is needed, keep nothing
            parts.append(_to_device(read_store_images(store_path, local + int(start)), dev))
        index.append(local + int(start))
    images = parts[0] if len(parts) == 1 else torch.cat(parts)
    n, box, _ = images.shape
    ctf = ctf_images(ctf_params, n, box, pixel_size_a, dev, size=model.current_size)  # what the E-step reads
    if premultiplied is not None and bool(np.any(premultiplied)):
        pm = torch.as_tensor(np.asarray(premultiplied, dtype=bool), device=dev)
        ctf = torch.where(pm[:, None, None], ctf * ctf, ctf)  # RELION: CTF^2 for premultiplied data
    batch = ParticleBatch(
        images=images,
        ctf=ctf,
        origin_px=torch.as_tensor(origin_px, dtype=torch.float32, device=dev),
        group=torch.as_tensor(group, dtype=torch.long, device=dev),
        half=torch.as_tensor(half, dtype=torch.long, device=dev),
        angles_deg=None if angles_deg is None else torch.as_tensor(angles_deg, dtype=torch.float32, device=dev),
    )
    with torch.no_grad():
        stats, res = expectation(batch, model, sampling, mask.to(dev) if mask is not None else None)
    out = {"index": np.concatenate(index)}
    for name in ParticleResult.__dataclass_fields__:
        out[name] = getattr(res, name).cpu().numpy()
    return stats.to("cpu"), out


def _add(a: SufficientStats, b: SufficientStats) -> SufficientStats:
    return a + b


def _concat(results: Sequence[dict]) -> dict:
    return {k: np.concatenate([r[k] for r in results]) for k in results[0]}


# --------------------------------------------------------------------------------------------
# driver side


def plan_tasks(chunk_bounds: Sequence[tuple[int, int]], indices: np.ndarray, max_per_task: int = 0
               ) -> list[list[tuple[int, int, np.ndarray]]]:
    """Group the particle ``indices`` (store order) into tasks of pieces of chunks.

    Each chunk's particles are split into pieces of about ``max_per_task`` (the nearest whole
    number of equal pieces); pieces smaller than that are then packed, in store order, into tasks
    of at most ``max_per_task`` particles, so that a sparse mini-batch spread over many chunks
    makes a few tasks rather than one small task per chunk (each task pays for its own
    back-projection of the statistics).

    Parameters
    ----------
    chunk_bounds
        ``[(start, stop), ...]`` of the store's chunks.
    indices
        ``(n,)`` store indices of this iteration's particles.
    max_per_task
        Particles per task (0: :data:`TASK_PARTICLES`).

    Returns
    -------
    list
        Tasks, each ``[(start, stop, local), ...]``, ``local`` the sorted indices within the chunk.
    """
    limit = max_per_task if max_per_task > 0 else TASK_PARTICLES
    idx = np.sort(np.asarray(indices, dtype=np.int64))
    starts = np.array([b[0] for b in chunk_bounds], dtype=np.int64)
    which = np.searchsorted(starts, idx, side="right") - 1
    pieces = []
    for c in np.unique(which):
        start, stop = chunk_bounds[int(c)]
        local = idx[which == c] - start
        n_pieces = max(1, round(len(local) / limit))
        pieces.extend((int(start), int(stop), part) for part in np.array_split(local, n_pieces))
    tasks: list[list[tuple[int, int, np.ndarray]]] = []
    size = 0
    for piece in pieces:
        if tasks and size + len(piece[2]) <= limit:
            tasks[-1].append(piece)
            size += len(piece[2])
        else:
            tasks.append([piece])
            size = len(piece[2])
    return tasks


#: Particles per task when nothing else decides (one process): a few chunks' worth, so that the
#: per-task costs are paid rarely and the images of a task stay small (64 MB at 64 px).
TASK_PARTICLES = 4096

#: Smallest task the E-step is split into to keep every worker busy (fewer particles per task
#: cost more in overhead than they gain).
MIN_TASK_PARTICLES = 64
#: Tasks per worker thread a small E-step is cut into: pieces of a quarter of a thread's share,
#: submitted largest first, even out chunks of unequal size (with one task per thread, a thread
#: idles while the largest chunk finishes).
TASKS_PER_SLOT = 4


def run_estep(
    client,
    store_path: str,
    chunk_bounds: Sequence[tuple[int, int]],
    indices: np.ndarray,
    origin_px: np.ndarray,
    table: ParticleTable,
    model: EStepModel,
    sampling: Sampling,
    mask: torch.Tensor | None,
    device: str = "cpu",
    torch_threads: int = 0,
    max_per_task: int = 0,
    angles_deg: np.ndarray | None = None,
) -> tuple[SufficientStats, dict]:
    """Map the E-step over the chunks holding ``indices`` and reduce the statistics.

    Parameters
    ----------
    client
        A ``distributed.Client``, or None to run the tasks in this process.
    origin_px
        ``(N_store, 2)`` current origins of all particles (pixels).
    table
        Per-particle CTF, group and half-set of all particles.
    angles_deg
        ``(N_store, 3)`` previous (rot, tilt, psi) of all particles; needed by local searches
        (``sampling.local_sigma_deg > 0``).

    Returns
    -------
    stats, results
        The reduced statistics, and per-particle results (dict of arrays with ``index``) sorted
        by store index.
    """
    if client is not None and max_per_task == 0:
        # every worker thread gets work, also when the particles fill one chunk or a few
        try:
            slots = sum(int(w.get("nthreads", 1)) for w in client.scheduler_info()["workers"].values())
        except Exception:  # noqa: BLE001 - a scheduler that cannot say: one task per chunk
            slots = 1
        if slots > 1:
            max_per_task = max(MIN_TASK_PARTICLES, math.ceil(len(indices) / (TASKS_PER_SLOT * slots)))
    # largest first: dask runs tasks in submission order, so the last to start are the shortest
    tasks = sorted(plan_tasks(chunk_bounds, indices, max_per_task), key=lambda t: -sum(len(p[2]) for p in t))

    def args_of(task):
        g = np.concatenate([start + local for start, _, local in task])  # store indices, task order
        return (
            task,
            origin_px[g],
            None if table.ctf_params is None else table.ctf_params[g],
            None if table.ctf_premultiplied is None else table.ctf_premultiplied[g],
            table.group[g],
            table.half[g],
            table.pixel_size_a,
        ), None if angles_deg is None else np.asarray(angles_deg[g], dtype=np.float32)

    if client is None:
        stats, parts = None, []
        for task in tasks:  # a running sum: memory does not grow with the number of chunks
            args, angles = args_of(task)
            st, res = estep_task(store_path, *args, model, sampling, mask, device, torch_threads, angles)
            stats = st if stats is None else stats + st
            parts.append(res)
        results = _concat(parts)
    else:
        model_f, mask_f = client.scatter([model, mask], broadcast=True, hash=False)
        futures = []
        for task in tasks:
            args, angles = args_of(task)
            futures.append(client.submit(estep_task, store_path, *args, model_f, sampling, mask_f, device, torch_threads, angles,
                                         pure=False, key=f"estep-{task[0][0]}-{int(task[0][2][0])}-{os.urandom(4).hex()}"))
        stat_f = [client.submit(lambda r: r[0], f, pure=False) for f in futures]
        res_f = [client.submit(lambda r: r[1], f, pure=False) for f in futures]
        while len(stat_f) > 1:  # tree reduction on the workers
            stat_f = [client.submit(_add, stat_f[i], stat_f[i + 1], pure=False) if i + 1 < len(stat_f) else stat_f[i]
                      for i in range(0, len(stat_f), 2)]
        stats = stat_f[0].result()
        results = _concat(client.gather(res_f))
        del futures
    order = np.argsort(results["index"], kind="stable")
    return stats, {k: v[order] for k, v in results.items()}


__all__ = ["CTF_COLUMNS", "TASK_PARTICLES", "ParticleTable", "clear_chunk_cache", "ctf_images", "estep_task", "load_chunk", "plan_tasks", "run_estep"]
