"""The Zarr particle store: streamed writes, lazy reads, chunk access by path, atomic replacement."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from autospa.data.particle_stack import ParticleStack
from autospa.errors import InputError
from autospa.io.zarr_store import (
    StoreWriter,
    create_store,
    open_store,
    read_store_chunk,
    read_store_images,
    store_attrs,
    write_store,
)
from test_io_data import optics_table

BOX = 12


def _data(n: int, seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, BOX, BOX)).astype(np.float32)
    meta = pd.DataFrame(
        {
            "rlnDefocusU": rng.uniform(5000, 20000, n),
            "rlnClassNumber": rng.integers(1, 10, n),
            "rlnMicrographName": [f"mic_{i // 7:03d}.mrc" if i % 11 else "" for i in range(n)],
            "rlnOpticsGroup": np.where(np.arange(n) % 3 == 0, 2, 1),
            "AnglePsi": rng.uniform(-180, 180, n),  # already a store name
            "foreignLabel": rng.normal(size=n),
        }
    )
    return images, meta


def _write_uneven(path: Path, images: np.ndarray, meta: pd.DataFrame, dtype: str, chunk: int, **kw) -> None:
    sizes = [1, 130, 7, 300, 2, 64]
    with create_store(path, BOX, dtype=dtype, optics=optics_table(BOX, 1.5, groups=2), chunk_size=chunk, star_labels={"foreignLabel": "foreignLabel"}, **kw) as w:
        pos = 0
        for s in sizes + [len(images)]:
            s = min(s, len(images) - pos)
            if s <= 0:
                break
            w.append(images[pos : pos + s], meta.iloc[pos : pos + s])
            pos += s
    assert pos == len(images)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_streamed_write_and_lazy_read(tmp_path: Path, dtype: str) -> None:
    n = 1000
    images, meta = _data(n)
    path = tmp_path / "s.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # zarr v3 strings, no consolidated metadata: no warnings
        _write_uneven(path, images, meta, dtype, chunk=128, n_particles_hint=n)
        stack = open_store(path)
    assert isinstance(stack, ParticleStack)
    assert stack.n_particles == n and stack.box == BOX and stack.dtype == np.dtype(dtype)
    bounds = stack.chunk_bounds()
    assert bounds[0] == (0, 128) and bounds[-1] == (896, 1000)  # the last chunk is short
    assert all(b[1] - b[0] == 128 for b in bounds[:-1])
    expect = images.astype(dtype).astype(np.float32)
    got = np.concatenate([stack.read_chunk(i) for i in range(stack.n_chunks)])
    assert got.dtype == np.float32 and np.array_equal(got, expect)
    assert np.array_equal(read_store_chunk(path, 128, 256), expect[128:256])
    idx = np.array([999, 0, 500, 129, 129])
    assert np.array_equal(read_store_images(path, idx), expect[idx])
    # metadata: names without rln, exact values, strings preserved (empty ones too)
    md = stack.metadata
    assert list(md.columns) == ["DefocusU", "ClassNumber", "MicrographName", "OpticsGroup", "AnglePsi", "foreignLabel"]
    assert np.array_equal(md["DefocusU"].to_numpy(), meta["rlnDefocusU"].to_numpy())
    assert np.array_equal(md["ClassNumber"].to_numpy(), meta["rlnClassNumber"].to_numpy())
    assert md["MicrographName"].tolist() == meta["rlnMicrographName"].tolist()
    assert stack.star_labels["foreignLabel"] == "foreignLabel" and stack.star_labels["AnglePsi"] == "rlnAnglePsi"
    assert md["ClassNumber"].dtype == np.int64
    # optics and pixel sizes
    assert stack.optics["rlnImagePixelSize"].tolist() == [1.5, 3.0]
    assert np.array_equal(stack.pixel_sizes_a, np.where(meta["rlnOpticsGroup"] == 2, 3.0, 1.5))
    with pytest.raises(ValueError, match="different pixel sizes"):
        stack.pixel_size_a
    # xarray view: the documented layout
    ds = xr.open_zarr(path, consolidated=False)
    assert ds["images"].dims == ("particle", "y", "x") and ds["DefocusU"].dims == ("particle",)
    attrs = store_attrs(path)
    assert attrs["n_particles"] == n and attrs["chunk_size"] == 128 and attrs["optics"][1]["rlnOpticsGroup"] == 2


def test_dask_reduction_matches_in_memory(tmp_path: Path) -> None:
    images, meta = _data(700, seed=3)
    path = tmp_path / "d.zarr"
    write_store(path, (images[i : i + 33] for i in range(0, 700, 33)), meta, optics_table(BOX), dtype="float32", chunk_size=96)
    stack = open_store(path)
    assert [b - a for a, b in stack.chunk_bounds()] == [96] * 7 + [28]
    per_particle = stack.images.mean(axis=(1, 2), dtype=np.float32)
    with dask.config.set(scheduler="threads"):
        got = per_particle.compute()
    assert np.allclose(got, images.mean(axis=(1, 2)), atol=1e-6)
    # tasks that re-open chunks by path (what the engines ship) give the same sums
    parts = [dask.delayed(lambda p, a, b: read_store_chunk(p, a, b).sum(dtype=np.float64))(*src) for src in stack.chunk_sources()]
    total = sum(dask.compute(*parts, scheduler="threads"))
    assert total == pytest.approx(images.astype(np.float64).sum(), rel=1e-12)


def test_isel_subset(tmp_path: Path) -> None:
    images, meta = _data(300, seed=4)
    path = tmp_path / "i.zarr"
    write_store(path, [images], meta, optics_table(BOX, groups=2), dtype="float32", chunk_size=64)
    stack = open_store(path)
    _ = stack.metadata
    idx = np.array([299, 5, 64, 65, 200])
    sub = stack.isel(idx)
    assert sub.n_particles == 5 and np.array_equal(sub.source_indices, idx)
    assert np.array_equal(sub.read(0, 5), images[idx])
    assert sub.metadata["DefocusU"].tolist() == meta["rlnDefocusU"].to_numpy()[idx].tolist()
    mask = stack.metadata["ClassNumber"].to_numpy() == 3
    by_mask = stack.isel(mask)
    assert np.array_equal(by_mask.images.compute(), images[mask])
    assert stack.is_whole_store and not sub.is_whole_store
    with pytest.raises(ValueError, match="source_indices"):
        sub.chunk_sources()
    assert stack.isel(slice(10, 20)).source_indices.tolist() == list(range(10, 20))


def test_existing_store_is_refused_then_replaced_atomically(tmp_path: Path) -> None:
    images, meta = _data(50)
    path = tmp_path / "a.zarr"
    write_store(path, [images], meta, optics_table(BOX), dtype="float32")
    before = json.loads((path / "zarr.json").read_text())
    with pytest.raises(InputError, match="already exists"):
        write_store(path, [images[:10]], meta.iloc[:10], optics_table(BOX))
    # a failure while writing with overwrite=True leaves the old store as it was, and no temp dirs
    with pytest.raises(RuntimeError, match="boom"):
        with StoreWriter(path, BOX, optics=optics_table(BOX), overwrite=True) as w:
            w.append(images[:10], meta.iloc[:10])
            raise RuntimeError("boom")
    with pytest.raises(ValueError, match="NaN"):
        bad = images[:5].copy()
        bad[2, 0, 0] = np.nan
        write_store(path, [bad], meta.iloc[:5], optics_table(BOX), overwrite=True)
    assert json.loads((path / "zarr.json").read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zarr"]
    write_store(path, [images[:10]], meta.iloc[:10], optics_table(BOX), dtype="float32", overwrite=True)
    assert open_store(path).n_particles == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zarr"]


def test_writer_rejects_inconsistent_input(tmp_path: Path) -> None:
    images, meta = _data(20)
    with pytest.raises(ValueError, match="columns changed"):
        with create_store(tmp_path / "x.zarr", BOX) as w:
            w.append(images[:10], meta.iloc[:10])
            w.append(images[10:], meta.iloc[10:, :2])
    with pytest.raises(ValueError, match=r"images must be \(k, 12, 12\)"):
        with create_store(tmp_path / "x.zarr", BOX) as w:
            w.append(np.zeros((3, 8, 8)), None)
    with pytest.raises(ValueError, match="3 images but 2 metadata rows"):
        write_store(tmp_path / "x.zarr", [images[:3]], meta.iloc[:2], None)
    assert not any(tmp_path.iterdir())


def test_open_store_rejects_non_stores(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="particle store not found"):
        open_store(tmp_path / "none.zarr")
    (tmp_path / "dir").mkdir()
    with pytest.raises(InputError, match="no zarr.json"):
        open_store(tmp_path / "dir")
    xr.Dataset({"a": ("x", np.arange(3))}).to_zarr(tmp_path / "other.zarr", zarr_format=3, consolidated=False)
    with pytest.raises(InputError, match="not an autospa particle store"):
        open_store(tmp_path / "other.zarr")
