"""The particle store: an xarray Dataset in Zarr v3, written chunk by chunk, opened lazily.

Layout (one Zarr v3 group, ``consolidated=False``)::

    images          (particle, y, x)  float16 | float32, chunks (chunk_size, box, box)
    <Label>         (particle,)       one 1-D array per STAR particle label, named without ``rln``
                                      (DefocusU, AnglePsi, OriginXAngst, ImageName, ...);
                                      int64, float64 or variable-length UTF-8 strings
    attrs           autospa_particle_store (format version), n_particles, box, images_dtype,
                    chunk_size, optics (the data_optics table as a list of dicts, RELION labels),
                    star_labels (list of [variable, STAR label] in the original column order)

Metadata arrays are chunked in multiples of the image chunk (at least 65,536 particles), so
reading the whole table touches few files. No ``_FillValue`` is written: values are never masked.

API (stable; the engines use it)::

    open_store(path) -> ParticleStack              lazy; .chunk_bounds(), .read_chunk(i), .chunk_sources(),
                                                   .metadata, .optics, .pixel_size_a, .isel(idx)
    read_store_chunk(path, start, stop)            (stop - start, box, box) float32, straight from Zarr
    read_store_images(path, indices)               (k, box, box) float32 at arbitrary indices
    write_store(path, batches, metadata, optics)   whole store from an iterable of (k, box, box) batches
    create_store(path, box, ...) / StoreWriter     streamed writer: ``with ... as w: w.append(images, meta)``
    store_attrs(path), read_store_metadata(path)   attributes / metadata table without the images

Writes go to ``<path>.tmp-XXXX`` beside the target and are renamed into place when complete;
an existing store is replaced only with ``overwrite=True`` and only after the new one is complete.
Dask tasks re-open chunks by path (:func:`read_store_chunk`), so they ship paths, not arrays.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
import zarr

from autospa.data.particle_stack import STORE_FORMAT_ATTR, ParticleStack
from autospa.errors import InputError
from autospa.io.relion_labels import label_to_name

log = logging.getLogger(__name__)

STORE_FORMAT_VERSION = 1
DEFAULT_CHUNK = 1024
MIN_METADATA_CHUNK = 65536
IMAGE_DTYPES = {"float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}


class StoreWriter:
    """Stream particles into a new particle store with bounded memory.

    Use as a context manager; the store appears under ``path`` only when the block succeeds::

        with StoreWriter("p.zarr", box=64, dtype="float16", optics=optics_df) as w:
            for images, meta in chunks:          # (k, 64, 64) array, k-row DataFrame
                w.append(images, meta)

    At most one image chunk and one metadata chunk are held in memory.

    Parameters
    ----------
    path
        The store (a folder, conventionally ``*.zarr``).
    box
        Image size in pixels (images are ``(box, box)``).
    dtype
        ``"float16"`` or ``"float32"`` (storage; reads return float32).
    optics
        The data_optics table (DataFrame or list of dicts, RELION labels).
    chunk_size
        Particles per image chunk.
    overwrite
        Replace an existing store (only once the new one is complete).
    star_labels
        Metadata column -> STAR label, for columns whose label is neither the column itself
        (``rlnDefocusU``) nor ``"rln" + column`` (``DefocusU``), e.g. a foreign label ``myScore``
        (``{"myScore": "myScore"}``).
    compressor
        ``None`` (default: noisy images barely compress and zstd halves the write speed) or
        ``"zstd"``.
    attrs
        Extra JSON-serialisable attributes for the store.
    """

    def __init__(
        self,
        path: str | Path,
        box: int,
        dtype: str | np.dtype = "float16",
        optics: pd.DataFrame | Sequence[Mapping] | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        overwrite: bool = False,
        compressor: str | None = None,
        attrs: Mapping | None = None,
        star_labels: Mapping[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.star_labels = dict(star_labels or {})
        self.box = int(box)
        self.dtype = _image_dtype(dtype)
        self.optics = _optics_records(optics)
        self.chunk_size = int(chunk_size)
        if self.chunk_size < 1 or self.box < 1:
            raise ValueError("chunk_size and box must be positive")
        self.meta_chunk = self.chunk_size * math.ceil(MIN_METADATA_CHUNK / self.chunk_size)
        self.overwrite = overwrite
        if compressor not in (None, "none", "zstd"):
            raise ValueError(f"compressor must be None or 'zstd', not {compressor!r}")
        self.compressor = None if compressor in (None, "none") else compressor
        self.extra_attrs = dict(attrs or {})
        self.n_written = 0
        self._tmp: Path | None = None
        self._group: zarr.Group | None = None
        self._img_buf: list[np.ndarray] = []
        self._img_buffered = 0
        self._img_flushed = 0
        self._meta_buf: list[pd.DataFrame] = []
        self._meta_buffered = 0
        self._meta_flushed = 0
        self._columns: list[str] | None = None
        self._labels: dict[str, str] = {}
        self._kinds: dict[str, np.dtype] = {}

    # -- context manager ---------------------------------------------------------------------------
    def __enter__(self) -> StoreWriter:
        if self.path.exists() and not self.overwrite:
            raise InputError(self.path, "output store already exists (pass overwrite=True / --overwrite to replace it)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.parent / f"{self.path.name}.tmp-{uuid.uuid4().hex[:8]}"
        self._group = zarr.create_group(store=str(self._tmp), zarr_format=3)
        comp = zarr.codecs.ZstdCodec(level=1) if self.compressor == "zstd" else None
        self._images = self._group.create_array(
            "images",
            shape=(0, self.box, self.box),
            chunks=(self.chunk_size, self.box, self.box),
            dtype=self.dtype,
            dimension_names=("particle", "y", "x"),
            fill_value=0,
            compressors=comp,
        )
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            try:
                self._finish()
            except BaseException:
                self._discard()
                raise
            self._commit()
            return False
        self._discard()
        return False

    # -- writing -----------------------------------------------------------------------------------
    def append(self, images: np.ndarray, metadata: pd.DataFrame | Mapping[str, Sequence] | None = None) -> None:
        """Add particles.

        Parameters
        ----------
        images
            ``(k, box, box)`` images (any real dtype; stored as the store's dtype). Must be finite.
        metadata
            ``k`` rows of per-particle metadata (DataFrame or dict of columns). Columns named
            ``rlnX`` are stored as ``X``. Every call must give the same columns (the first call
            fixes them; ``None`` only if the first call had none either).
        """
        if self._group is None:
            raise RuntimeError("StoreWriter.append outside its with-block")
        images = np.asarray(images)
        if images.ndim != 3 or images.shape[1:] != (self.box, self.box):
            raise ValueError(f"images must be (k, {self.box}, {self.box}), got {images.shape}")
        k = images.shape[0]
        if images.dtype.kind == "f" and not np.isfinite(images).all():
            raise ValueError("images contain NaN or infinite values")
        meta = _as_frame(metadata, k)
        self._check_columns(meta)
        if k == 0:
            return
        self._img_buf.append(images.astype(self.dtype, copy=False))
        self._img_buffered += k
        self._meta_buf.append(meta)
        self._meta_buffered += k
        self.n_written += k
        if self._img_buffered >= self.chunk_size:
            self._flush_images(final=False)
        if self._meta_buffered >= self.meta_chunk:
            self._flush_meta(final=False)

    def _check_columns(self, meta: pd.DataFrame) -> None:
        cols = [str(c) for c in meta.columns]
        if self._columns is None:
            self._columns = cols
            names = []
            for c in cols:
                name = label_to_name(c)
                if name == "images" or name in names:
                    raise ValueError(f"metadata column {c!r} clashes with another store variable ({name})")
                names.append(name)
                self._labels[name] = self.star_labels.get(c, c if c.startswith("rln") else "rln" + c)
            return
        if cols != self._columns:
            raise ValueError(f"metadata columns changed between appends: {self._columns} then {cols}")

    def _flush_images(self, final: bool) -> None:
        if not self._img_buf:
            return
        data = np.concatenate(self._img_buf) if len(self._img_buf) > 1 else self._img_buf[0]
        n_full = (data.shape[0] // self.chunk_size) * self.chunk_size
        take = data.shape[0] if final else n_full
        if take:
            start = self._img_flushed
            _grow(self._images, start + take)
            self._images[start : start + take] = data[:take]
            self._img_flushed += take
        rest = data[take:]
        self._img_buf = [rest] if rest.shape[0] else []
        self._img_buffered = rest.shape[0]

    def _flush_meta(self, final: bool) -> None:
        if not self._meta_buf or not self._columns:
            self._meta_buf, self._meta_buffered = [], 0
            return
        df = pd.concat(self._meta_buf, ignore_index=True) if len(self._meta_buf) > 1 else self._meta_buf[0]
        n_full = (len(df) // self.meta_chunk) * self.meta_chunk
        take = len(df) if final else n_full
        if take:
            start = self._meta_flushed
            for col in self._columns:
                name = label_to_name(col)
                values = _column_values(df[col].iloc[:take])
                arr, dtype = self._meta_array(name, values)
                values = _cast(values, dtype, col)
                _grow(arr, start + take)
                arr[start : start + take] = values
            self._meta_flushed += take
        rest = df.iloc[take:].reset_index(drop=True)
        self._meta_buf = [rest] if len(rest) else []
        self._meta_buffered = len(rest)

    def _meta_array(self, name: str, values: np.ndarray) -> tuple[zarr.Array, np.dtype]:
        if name in self._kinds:
            return self._group[name], self._kinds[name]
        is_str = values.dtype == object
        arr = self._group.create_array(
            name,
            shape=(0,),
            chunks=(self.meta_chunk,),
            dtype=str if is_str else values.dtype,
            dimension_names=("particle",),
            fill_value="" if is_str else 0,
            compressors=zarr.codecs.ZstdCodec(level=3),
        )
        self._kinds[name] = np.dtype(object) if is_str else values.dtype
        return arr, self._kinds[name]

    def _finish(self) -> None:
        if self.n_written == 0:
            raise ValueError(f"{self.path}: no particles were written")
        self._flush_images(final=True)
        self._flush_meta(final=True)
        self._images.resize((self.n_written, self.box, self.box))  # drop the growth margin
        for name in self._kinds:
            self._group[name].resize((self.n_written,))
        star_labels = [[label_to_name(c), self._labels[label_to_name(c)]] for c in (self._columns or [])]
        attrs = {
            STORE_FORMAT_ATTR: STORE_FORMAT_VERSION,
            "n_particles": int(self.n_written),
            "box": self.box,
            "images_dtype": self.dtype.name,
            "chunk_size": self.chunk_size,
            "optics": self.optics,
            "star_labels": star_labels,
        }
        attrs.update(self.extra_attrs)
        self._group.attrs.update(_jsonable(attrs))

    def _commit(self) -> None:
        old = None
        if self.path.exists():
            old = self.path.parent / f"{self.path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.path, old)
        os.replace(self._tmp, self.path)
        if old is not None:
            _remove(old)
        log.info("wrote particle store %s (%d particles, box %d, %s)", self.path, self.n_written, self.box, self.dtype.name)

    def _discard(self) -> None:
        if self._tmp is not None and self._tmp.exists():
            _remove(self._tmp)


def create_store(
    path: str | Path,
    box: int,
    n_particles_hint: int | None = None,
    dtype: str | np.dtype = "float16",
    optics: pd.DataFrame | Sequence[Mapping] | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    overwrite: bool = False,
    compressor: str | None = None,
    attrs: Mapping | None = None,
    star_labels: Mapping[str, str] | None = None,
) -> StoreWriter:
    """A :class:`StoreWriter` for a new store (use it as a context manager, then ``append``).

    ``n_particles_hint`` only caps the metadata chunk for small stores (it need not be exact).
    """
    w = StoreWriter(
        path,
        box,
        dtype=dtype,
        optics=optics,
        chunk_size=chunk_size,
        overwrite=overwrite,
        compressor=compressor,
        attrs=attrs,
        star_labels=star_labels,
    )
    if n_particles_hint is not None and 0 < n_particles_hint < w.meta_chunk:
        w.meta_chunk = w.chunk_size * max(1, math.ceil(n_particles_hint / w.chunk_size))
    return w


def write_store(
    path: str | Path,
    images: Iterable[np.ndarray],
    metadata: pd.DataFrame | None,
    optics: pd.DataFrame | Sequence[Mapping] | None,
    dtype: str | np.dtype = "float16",
    chunk_size: int = DEFAULT_CHUNK,
    overwrite: bool = False,
    compressor: str | None = None,
    attrs: Mapping | None = None,
    star_labels: Mapping[str, str] | None = None,
) -> Path:
    """Write a store from an iterable of image batches and one metadata table.

    Parameters
    ----------
    path
        The store.
    images
        Batches ``(k_i, box, box)`` in particle order (streamed; any batch sizes).
    metadata
        ``(sum k_i)`` rows, or ``None``.
    optics
        data_optics table.

    Returns
    -------
    Path
        ``path``.
    """
    batches = iter(images)
    first = next(batches, None)
    if first is None:
        raise ValueError("write_store: no image batches")
    first = np.asarray(first)
    writer = create_store(
        path,
        first.shape[-1],
        n_particles_hint=None if metadata is None else len(metadata),
        dtype=dtype,
        optics=optics,
        chunk_size=chunk_size,
        overwrite=overwrite,
        compressor=compressor,
        attrs=attrs,
        star_labels=star_labels,
    )
    with writer:
        pos = 0
        for batch in itertools.chain([first], batches):
            batch = np.asarray(batch)
            meta = None if metadata is None else metadata.iloc[pos : pos + batch.shape[0]]
            writer.append(batch, meta)
            pos += batch.shape[0]
        if metadata is not None and pos != len(metadata):
            raise ValueError(f"write_store: {pos} images but {len(metadata)} metadata rows")
    return Path(path)


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
def open_store(path: str | Path) -> ParticleStack:
    """Open a particle store lazily (images and metadata as dask arrays).

    Raises
    ------
    InputError
        Not a folder, not a Zarr group, or not an autospa particle store.
    """
    path = Path(path)
    _check_store(path)
    try:
        ds = xr.open_zarr(str(path), consolidated=False, chunks={}, zarr_format=3)
    except Exception as exc:
        raise InputError(path, f"cannot open particle store ({type(exc).__name__}: {exc})") from exc
    return ParticleStack(ds, store_path=path)


def read_store_chunk(store_path: str | Path, start: int, stop: int) -> np.ndarray:
    """Images ``start:stop`` of a store as float32, read straight from Zarr (for dask tasks).

    Returns
    -------
    np.ndarray
        ``(stop - start, box, box)`` float32.
    """
    arr = zarr.open_array(store=str(Path(store_path) / "images"), mode="r", zarr_format=3)
    return np.asarray(arr[int(start) : int(stop)], dtype=np.float32)


def store_images_info(store_path: str | Path) -> tuple[tuple[int, ...], int]:
    """``(shape, stamp)`` of a store's image array: ``(N, box, box)`` and the modification time
    (ns) of its metadata, which changes when a store is written anew at the same path."""
    meta = Path(store_path) / "images" / "zarr.json"
    try:
        stamp = meta.stat().st_mtime_ns
    except OSError as exc:
        raise InputError(Path(store_path), "particle store not found or without images") from exc
    arr = zarr.open_array(store=str(Path(store_path) / "images"), mode="r", zarr_format=3)
    return tuple(int(v) for v in arr.shape), stamp


def read_store_images(store_path: str | Path, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """Images at arbitrary particle ``indices`` of a store, as float32 (reads each chunk once).

    Returns
    -------
    np.ndarray
        ``(len(indices), box, box)`` float32 in the order of ``indices``.
    """
    arr = zarr.open_array(store=str(Path(store_path) / "images"), mode="r", zarr_format=3)
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size == 0:
        return np.zeros((0, *arr.shape[1:]), np.float32)
    return np.asarray(arr.get_orthogonal_selection((idx, slice(None), slice(None))), dtype=np.float32)


def read_store_metadata(store_path: str | Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """The metadata table of a store (variable names as columns), read straight from Zarr."""
    return open_store(store_path).metadata_frame(columns)


def store_attrs(store_path: str | Path) -> dict:
    """The store's attributes (optics, star_labels, box, ...)."""
    path = Path(store_path)
    _check_store(path)
    return dict(zarr.open_group(str(path), mode="r", zarr_format=3).attrs)


def _check_store(path: Path) -> None:
    if not path.exists():
        raise InputError(path, "particle store not found")
    meta = path / "zarr.json"
    if not path.is_dir() or not meta.exists():
        raise InputError(path, "not a Zarr v3 particle store (no zarr.json)")
    try:
        info = json.loads(meta.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(path, f"unreadable zarr.json ({exc})") from exc
    if info.get("node_type") != "group" or STORE_FORMAT_ATTR not in info.get("attributes", {}):
        raise InputError(path, "not an autospa particle store (no particle-store attributes)")


# ------------------------------------------------------------------------------------------------
def _image_dtype(dtype: str | np.dtype) -> np.dtype:
    d = np.dtype(dtype)
    if d.name not in IMAGE_DTYPES:
        raise ValueError(f"image dtype must be float16 or float32, not {d}")
    return d


def _optics_records(optics) -> list[dict]:
    if optics is None:
        return []
    if isinstance(optics, pd.DataFrame):
        return _jsonable(optics.to_dict(orient="records"))
    return _jsonable([dict(r) for r in optics])


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _as_frame(metadata, k: int) -> pd.DataFrame:
    if metadata is None:
        return pd.DataFrame(index=range(k))
    df = metadata if isinstance(metadata, pd.DataFrame) else pd.DataFrame(dict(metadata))
    if len(df) != k:
        raise ValueError(f"{k} images but {len(df)} metadata rows")
    return df.reset_index(drop=True)


def _column_values(s: pd.Series) -> np.ndarray:
    """A metadata column as int64, float64 or an object array of str."""
    dt = s.dtype
    if pd.api.types.is_bool_dtype(dt):
        return s.to_numpy(np.int64)
    if pd.api.types.is_integer_dtype(dt):
        if s.isna().any():
            return s.to_numpy(np.float64, na_value=np.nan)
        return s.to_numpy(np.int64)
    if pd.api.types.is_float_dtype(dt):
        return s.to_numpy(np.float64, na_value=np.nan)
    return s.astype(object).where(s.notna(), "").astype(str).to_numpy(dtype=object)


def _cast(values: np.ndarray, dtype: np.dtype, col: str) -> np.ndarray:
    """``values`` as the dtype the store fixed for ``col`` (ints only from integral floats)."""
    if values.dtype == dtype:
        return values
    if dtype == object:
        return np.array([str(v) for v in values], dtype=object)
    ok = values.dtype != object
    if ok and dtype.kind == "i" and values.dtype.kind == "f":
        ok = bool(np.all(np.isfinite(values) & (values == np.round(values))))
    if not ok:
        raise ValueError(f"metadata column {col}: values of type {values.dtype} do not fit the stored {dtype}")
    return values.astype(dtype)


def _grow(arr: zarr.Array, needed: int) -> None:
    """Make room for ``needed`` particles, growing geometrically (each resize rewrites metadata)."""
    if arr.shape[0] < needed:
        arr.resize((max(needed, 2 * arr.shape[0]), *arr.shape[1:]))


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)


__all__ = [
    "DEFAULT_CHUNK",
    "STORE_FORMAT_VERSION",
    "StoreWriter",
    "create_store",
    "open_store",
    "read_store_chunk",
    "read_store_images",
    "read_store_metadata",
    "store_attrs",
    "store_images_info",
    "write_store",
]
