"""The E-step as a dask map-reduce over the chunks of a particle store (DESIGN.md section 2).

Each iteration the driver

1. broadcasts the model (references, noise, priors: a few MB) to the workers once,
2. submits one task per Zarr chunk holding particles of this iteration's (mini-)batch; the task
   reads the chunk (or takes it from the worker's chunk cache), computes the CTFs, runs
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
less than a quarter of a chunk (a mini-batch of a store much larger than the batch) reads only its
particles and caches nothing, so memory stays bounded whatever the store's size. On a CUDA
worker the chunk lives on the GPU: the Zarr read becomes a cupy array when cupy is installed,
and is handed to torch through DLPack without a copy.
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

from autospa.io.zarr_store import read_store_chunk, read_store_images
from autospa.numerics.ctf import ctf_2d
from autospa.refinement.estep import EStepModel, ParticleBatch, ParticleResult, Sampling, expectation
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

#: A task caches its chunk when it uses at least this fraction of it; sparser reads (mini-batches
#: drawn from a store much larger than the batch) read only their particles and keep nothing.
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
            import cupy  # noqa: F401  (GPU extra)

            with cupy.cuda.Device(device.index or 0):
                return torch.from_dlpack(cupy.asarray(images))  # zero-copy hand-over
        except ImportError:
            return torch.from_numpy(images).to(device)
    return torch.from_numpy(images)


def load_chunk(store_path: str, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Images ``start:stop`` of a store as a float32 tensor on ``device``, through the cache."""
    key = (str(store_path), int(start), int(stop), str(device))
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


def ctf_images(params: np.ndarray | None, n: int, box: int, pixel_size_a: float, device: torch.device) -> torch.Tensor:
    """``(n, D, D//2+1)`` RELION CTFs from ``(n, 9)`` parameters (ones when ``params`` is None)."""
    if params is None:
        return torch.ones(n, box, box // 2 + 1, device=device)
    p = torch.as_tensor(params, dtype=torch.float64, device=device)
    return ctf_2d(p[:, 0], p[:, 1], p[:, 2], p[:, 3], p[:, 4], p[:, 5], pixel_size_a, box,
                  phase_shift_deg=p[:, 6], bfactor_a2=p[:, 7], scale=p[:, 8], device=device)


def estep_task(
    store_path: str,
    start: int,
    stop: int,
    local: np.ndarray,
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
    """One map task: the E-step on particles ``start + local`` of a store chunk.

    Parameters
    ----------
    local
        ``(n,)`` indices into the chunk.
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
    local = np.asarray(local, dtype=np.int64)
    if len(local) >= CACHE_MIN_FRACTION * (stop - start):
        chunk = load_chunk(store_path, start, stop, dev)
        images = chunk[torch.as_tensor(local, device=dev)]
    else:  # a sparse mini-batch of a big store: read what is needed, keep nothing
        images = _to_device(read_store_images(store_path, local + int(start)), dev)
    n, box, _ = images.shape
    ctf = ctf_images(ctf_params, n, box, pixel_size_a, dev)
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
    out = {"index": np.asarray(local, dtype=np.int64) + int(start)}
    for name in ParticleResult.__dataclass_fields__:
        out[name] = getattr(res, name).cpu().numpy()
    return stats.to("cpu"), out


def _add(a: SufficientStats, b: SufficientStats) -> SufficientStats:
    return a + b


def _concat(results: Sequence[dict]) -> dict:
    return {k: np.concatenate([r[k] for r in results]) for k in results[0]}


# --------------------------------------------------------------------------------------------
# driver side


def plan_tasks(chunk_bounds: Sequence[tuple[int, int]], indices: np.ndarray, max_per_task: int = 0) -> list[tuple[int, int, np.ndarray]]:
    """Group the particle ``indices`` (store order) by the chunk that holds them.

    Parameters
    ----------
    chunk_bounds
        ``[(start, stop), ...]`` of the store's chunks.
    indices
        ``(n,)`` store indices of this iteration's particles.
    max_per_task
        Split a chunk's particles into tasks of at most this many (0: one task per chunk).

    Returns
    -------
    list
        ``(start, stop, local)`` per task, ``local`` the sorted indices within the chunk.
    """
    idx = np.sort(np.asarray(indices, dtype=np.int64))
    starts = np.array([b[0] for b in chunk_bounds], dtype=np.int64)
    which = np.searchsorted(starts, idx, side="right") - 1
    tasks = []
    for c in np.unique(which):
        start, stop = chunk_bounds[int(c)]
        local = idx[which == c] - start
        step = max_per_task if max_per_task > 0 else len(local)
        for s in range(0, len(local), step):
            tasks.append((int(start), int(stop), local[s : s + step]))
    return tasks


#: Smallest task the E-step is split into to keep every worker busy (fewer particles per task
#: cost more in overhead than they gain).
MIN_TASK_PARTICLES = 64


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
            max_per_task = max(MIN_TASK_PARTICLES, math.ceil(len(indices) / slots))
    tasks = plan_tasks(chunk_bounds, indices, max_per_task)

    def args_of(start: int, local: np.ndarray):
        g = start + local
        return (
            local,
            origin_px[g],
            None if table.ctf_params is None else table.ctf_params[g],
            None if table.ctf_premultiplied is None else table.ctf_premultiplied[g],
            table.group[g],
            table.half[g],
        )

    def angles_of(start: int, local: np.ndarray):
        return None if angles_deg is None else np.asarray(angles_deg[start + local], dtype=np.float32)

    if client is None:
        stats, parts = None, []
        for s, e, loc in tasks:  # a running sum: memory does not grow with the number of chunks
            st, res = estep_task(store_path, s, e, *args_of(s, loc), table.pixel_size_a, model, sampling, mask, device,
                                 torch_threads, angles_of(s, loc))
            stats = st if stats is None else stats + st
            parts.append(res)
        results = _concat(parts)
    else:
        model_f, mask_f = client.scatter([model, mask], broadcast=True, hash=False)
        futures = [
            client.submit(estep_task, store_path, s, e, *args_of(s, loc), table.pixel_size_a, model_f, sampling, mask_f,
                          device, torch_threads, angles_of(s, loc), pure=False, key=f"estep-{s}-{int(loc[0])}-{os.urandom(4).hex()}")
            for s, e, loc in tasks
        ]
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


__all__ = ["CTF_COLUMNS", "ParticleTable", "clear_chunk_cache", "ctf_images", "estep_task", "load_chunk", "plan_tasks", "run_estep"]
