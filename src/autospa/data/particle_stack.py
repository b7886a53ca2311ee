"""A lazy particle stack: images as a dask array, metadata as a table, optics groups (L2).

``ParticleStack`` wraps the xarray Dataset of a particle store (opened by
:func:`autospa.io.zarr_store.open_store`; this module never opens files). It is what the
map-reduce engines iterate over: ``chunk_bounds()`` gives the particle ranges of the storage
chunks, ``read_chunk(i)`` reads one as float32, and ``chunk_sources()`` gives
``(store_path, start, stop)`` triples so a dask task can re-open its chunk on a worker
(``autospa.io.zarr_store.read_store_chunk``) instead of receiving the array.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

#: Attribute that marks a Zarr group as an autospa particle store (its value: format version).
STORE_FORMAT_ATTR = "autospa_particle_store"
IMAGES = "images"


class ParticleStack:
    """Particle images and per-particle metadata, lazily.

    Parameters
    ----------
    dataset
        ``images`` ``(particle, y, x)`` plus 1-D ``(particle,)`` metadata variables; attrs as
        written by the particle store (``optics``, ``star_labels``, ``box``).
    store_path
        The store the dataset was opened from (``None`` for an in-memory dataset).
    source_indices
        ``(n,)`` positions of these particles in the store (``None``: ``0 .. n-1``).
    """

    def __init__(self, dataset: xr.Dataset, store_path: str | Path | None = None, source_indices: np.ndarray | None = None):
        if IMAGES not in dataset:
            raise ValueError("a particle stack needs an 'images' variable (particle, y, x)")
        self._ds = dataset
        self.store_path = None if store_path is None else Path(store_path)
        n = dataset.sizes["particle"]
        self._source = np.arange(n, dtype=np.int64) if source_indices is None else np.asarray(source_indices, np.int64)
        if self._source.shape != (n,):
            raise ValueError(f"source_indices must be ({n},), got {self._source.shape}")
        self._metadata: pd.DataFrame | None = None

    # -- basic properties ------------------------------------------------------------------------
    @property
    def dataset(self) -> xr.Dataset:
        """The underlying xarray Dataset (lazy)."""
        return self._ds

    @property
    def n_particles(self) -> int:
        """Number of particles."""
        return int(self._ds.sizes["particle"])

    def __len__(self) -> int:
        return self.n_particles

    @property
    def box(self) -> int:
        """Image size in pixels (images are ``box x box``)."""
        return int(self._ds.sizes["x"])

    @property
    def dtype(self) -> np.dtype:
        """Storage dtype of the images (float16 or float32)."""
        return np.dtype(self._ds[IMAGES].dtype)

    @property
    def images(self):
        """``(n, box, box)`` dask array of the images in their storage dtype."""
        return self._ds[IMAGES].data

    @property
    def source_indices(self) -> np.ndarray:
        """``(n,)`` int64 positions of these particles in their store."""
        return self._source

    @property
    def is_whole_store(self) -> bool:
        """Whether this stack is its store, in store order (chunks map to store ranges)."""
        return self.store_path is not None and bool(np.array_equal(self._source, np.arange(self._store_n())))

    def _store_n(self) -> int:
        return int(self._ds.attrs.get("n_particles", self.n_particles))

    # -- optics ----------------------------------------------------------------------------------
    @property
    def optics(self) -> pd.DataFrame:
        """The data_optics table (RELION labels), one row per optics group."""
        return pd.DataFrame(self._ds.attrs.get("optics", []))

    @property
    def pixel_sizes_a(self) -> np.ndarray:
        """``(n,)`` float64 pixel size of every particle from its optics group (Angstrom)."""
        optics = self.optics
        if optics.empty or "rlnImagePixelSize" not in optics:
            raise ValueError("the stack has no optics table with rlnImagePixelSize")
        table = dict(zip(optics["rlnOpticsGroup"].astype(int), optics["rlnImagePixelSize"].astype(float), strict=True))
        if "OpticsGroup" in self._ds:
            groups = np.asarray(self._ds["OpticsGroup"].values, dtype=np.int64)
        else:
            groups = np.full(self.n_particles, int(optics["rlnOpticsGroup"].iloc[0]), np.int64)
        values = pd.Series(groups).map(table).to_numpy(np.float64)
        if np.isnan(values).any():
            raise ValueError("some particles reference an optics group the optics table lacks")
        return values

    @property
    def pixel_size_a(self) -> float:
        """The pixel size (Angstrom) shared by every optics group.

        Raises
        ------
        ValueError
            The optics groups have different pixel sizes (use :attr:`pixel_sizes_a`).
        """
        optics = self.optics
        if optics.empty or "rlnImagePixelSize" not in optics:
            raise ValueError("the stack has no optics table with rlnImagePixelSize")
        values = sorted(set(optics["rlnImagePixelSize"].astype(float)))
        if len(values) != 1:
            raise ValueError(f"optics groups have different pixel sizes {values}; use pixel_sizes_a")
        return values[0]

    # -- metadata --------------------------------------------------------------------------------
    @property
    def metadata_columns(self) -> list[str]:
        """Metadata variables in the original STAR column order (then any others)."""
        ordered = [name for name, _ in self._ds.attrs.get("star_labels", []) if name in self._ds]
        rest = sorted(v for v in self._ds.data_vars if v != IMAGES and v not in ordered and self._ds[v].dims == ("particle",))
        return ordered + rest

    @property
    def star_labels(self) -> dict[str, str]:
        """Metadata variable -> STAR label (``DefocusU`` -> ``rlnDefocusU``)."""
        labels = {name: label for name, label in self._ds.attrs.get("star_labels", [])}
        return {c: labels.get(c, c if c.startswith("rln") else "rln" + c) for c in self.metadata_columns}

    @property
    def metadata(self) -> pd.DataFrame:
        """The per-particle metadata (variable names as columns), computed on first access."""
        if self._metadata is None:
            self._metadata = self.metadata_frame()
        return self._metadata

    def metadata_frame(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """Compute some metadata columns (all by default) into a DataFrame."""
        cols = self.metadata_columns if columns is None else list(columns)
        computed = self._ds[cols].compute() if cols else self._ds[[]]
        out = {}
        for c in cols:
            values = np.asarray(computed[c].values)
            if values.dtype.kind in ("T", "U", "S", "O"):
                values = values.astype(object)
            out[c] = values
        return pd.DataFrame(out, index=pd.RangeIndex(self.n_particles))

    def star_tables(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """``(optics, particles)`` with RELION labels, particles in the original column order."""
        meta = self.metadata.rename(columns=self.star_labels)
        return self.optics, meta

    # -- chunks ----------------------------------------------------------------------------------
    def chunk_bounds(self) -> list[tuple[int, int]]:
        """``(start, stop)`` particle ranges of the image chunks, covering ``0 .. n``."""
        sizes = self.images.chunks[0]
        ends = np.cumsum(sizes)
        return [(int(e - s), int(e)) for s, e in zip(sizes, ends, strict=True)]

    @property
    def n_chunks(self) -> int:
        """Number of image chunks."""
        return len(self.images.chunks[0])

    def read_chunk(self, i: int) -> np.ndarray:
        """Images of chunk ``i`` as a ``(k, box, box)`` float32 array."""
        start, stop = self.chunk_bounds()[i]
        return self.read(start, stop)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Images ``start:stop`` as a ``(stop - start, box, box)`` float32 array."""
        block = self.images[start:stop].compute(scheduler="sync")
        return np.asarray(block, dtype=np.float32)

    def gpu_images(self, device_index: int = 0):
        """``(n, box, box)`` float32 dask array of the images with cupy meta: each chunk, once
        computed, is a cupy array on GPU ``device_index`` (what dask-cuda users expect; hand a
        block to torch without a copy with ``torch.from_dlpack``).

        Raises
        ------
        ImportError
            cupy is not installed (the ``gpu`` extra).
        """
        import cupy

        with cupy.cuda.Device(device_index):
            meta = cupy.empty((0, 0, 0), dtype=cupy.float32)
        return self.images.map_blocks(to_cupy, device_index, dtype=np.float32, meta=meta)

    def chunk_sources(self) -> list[tuple[str, int, int]]:
        """``(store_path, start, stop)`` per chunk, in store coordinates, for tasks that re-open chunks.

        Raises
        ------
        ValueError
            The stack is not a whole store in store order (use :attr:`source_indices`).
        """
        if not self.is_whole_store:
            raise ValueError("chunk_sources needs the whole store in store order; ship source_indices instead")
        return [(str(self.store_path), a, b) for a, b in self.chunk_bounds()]

    # -- selection -------------------------------------------------------------------------------
    def isel(self, indices: Sequence[int] | np.ndarray | slice) -> ParticleStack:
        """A new (lazy) stack of some particles, in the order given.

        Parameters
        ----------
        indices
            Positions in this stack (0-based ints, a boolean mask of length n, or a slice).
        """
        if isinstance(indices, slice):
            idx = np.arange(self.n_particles)[indices]
        else:
            idx = np.asarray(indices)
            if idx.dtype == bool:
                if idx.shape != (self.n_particles,):
                    raise ValueError(f"boolean mask of shape {idx.shape} for {self.n_particles} particles")
                idx = np.flatnonzero(idx)
            idx = idx.astype(np.int64).reshape(-1)
        sub = self._ds.isel(particle=idx)
        out = ParticleStack(sub, store_path=self.store_path, source_indices=self._source[idx])
        if self._metadata is not None:
            out._metadata = self._metadata.iloc[idx].reset_index(drop=True)
        return out

    def __repr__(self) -> str:
        src = f" from {self.store_path}" if self.store_path else ""
        return f"ParticleStack({self.n_particles} particles, box {self.box}, {self.dtype.name}, {self.n_chunks} chunks{src})"


def to_cupy(block: np.ndarray, device_index: int = 0):
    """A block of images as a float32 cupy array on GPU ``device_index`` (one host-to-device copy).

    The chunks of :meth:`ParticleStack.gpu_images` and the chunks the map-reduce tasks of a GPU
    worker read go through this one function.
    """
    import cupy

    with cupy.cuda.Device(device_index):
        return cupy.asarray(np.asarray(block, dtype=np.float32))


__all__ = ["IMAGES", "STORE_FORMAT_ATTR", "ParticleStack", "to_cupy"]
