"""MRC/MRCS: exact float32/float16 round trips, int modes, memory-mapped stack reads, bad files."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest

from autospa.errors import InputError
from autospa.io.mrc import MrcStackWriter, read_mrc, read_mrc_header, read_stack_images, write_mrc
from test_io_data import write_raw_mrc


@pytest.mark.parametrize(("mode", "dtype"), [(2, np.float32), (12, np.float16)])
def test_write_read_exact(tmp_path: Path, mode: int, dtype) -> None:
    rng = np.random.default_rng(0)
    stack = rng.normal(size=(7, 24, 24)).astype(dtype)
    p = write_mrc(tmp_path / "s.mrcs", stack, voxel_size_a=1.25, mode=mode)
    info = read_mrc_header(p)
    assert info.mode == mode and info.shape == (7, 24, 24) and info.is_stack
    assert info.voxel_size_a == pytest.approx(1.25)
    data, apix = read_mrc(p)
    assert data.dtype == dtype and np.array_equal(data, stack)
    assert apix == pytest.approx(1.25)
    with mrcfile.open(p) as mrc:  # independent reader agrees, header marks a stack
        assert mrc.header.ispg == 0 and np.array_equal(mrc.data, stack)
        assert float(mrc.header.dmean) == pytest.approx(float(stack.astype(np.float64).mean()), abs=1e-6)


def test_single_image_and_volume(tmp_path: Path) -> None:
    img = np.arange(12 * 10, dtype=np.float32).reshape(12, 10)
    data, _ = read_mrc(write_mrc(tmp_path / "i.mrc", img, 2.0))
    assert data.shape == (12, 10) and np.array_equal(data, img)
    vol = np.random.default_rng(1).normal(size=(8, 8, 8)).astype(np.float32)
    p = write_mrc(tmp_path / "v.mrc", vol, 2.0)
    assert not read_mrc_header(p).is_stack
    assert np.array_equal(read_mrc(p)[0], vol)


def test_read_stack_images_by_index_is_float32(tmp_path: Path) -> None:
    stack = np.random.default_rng(2).normal(size=(10, 8, 8)).astype(np.float16)
    p = write_mrc(tmp_path / "s.mrcs", stack, 1.0, mode=12)
    idx = [9, 0, 3, 3, 4]
    out = read_stack_images(p, idx)
    assert out.dtype == np.float32 and out.shape == (5, 8, 8)
    assert np.array_equal(out, stack[idx].astype(np.float32))
    assert np.array_equal(read_stack_images(p, [2, 3, 4]), stack[2:5].astype(np.float32))
    assert np.array_equal(read_stack_images(p), stack.astype(np.float32))
    with pytest.raises(InputError, match="image 11 requested but the stack holds 10"):
        read_stack_images(p, [10])


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint16])
def test_integer_modes_are_read(tmp_path: Path, dtype) -> None:
    data = np.random.default_rng(3).integers(-100 if dtype != np.uint16 else 0, 100, size=(3, 6, 6)).astype(dtype)
    p = write_raw_mrc(tmp_path / "int.mrcs", data)
    assert read_mrc_header(p).dtype == np.dtype(dtype)
    assert np.array_equal(read_stack_images(p, [0, 1, 2]), data.astype(np.float32))


def test_stack_writer_streams_and_sets_header_stats(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    stack = rng.normal(size=(9, 8, 8)).astype(np.float32)
    with MrcStackWriter(tmp_path / "w.mrcs", 9, 8, mode=12, voxel_size_a=3.0) as w:
        w.write(5, stack[5:])
        w.write(0, stack[:5])
    data, apix = read_mrc(tmp_path / "w.mrcs")
    assert data.dtype == np.float16 and np.array_equal(data, stack.astype(np.float16)) and apix == pytest.approx(3.0)
    with mrcfile.open(tmp_path / "w.mrcs") as mrc:
        f = stack.astype(np.float64)
        assert float(mrc.header.rms) == pytest.approx(f.std(), rel=1e-5)
        assert float(mrc.header.dmax) == pytest.approx(f.max(), rel=1e-6)


def test_stack_writer_failure_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "old.mrcs"
    old = write_mrc(target, np.ones((2, 8, 8), np.float32), 1.0).read_bytes()
    with pytest.raises(ValueError, match="never written"):
        with MrcStackWriter(target, 3, 8) as w:
            w.write(0, np.zeros((2, 8, 8)))
    with pytest.raises(RuntimeError):
        with MrcStackWriter(tmp_path / "new.mrcs", 1, 8) as w:
            w.write(0, np.zeros((1, 8, 8)))
            raise RuntimeError("boom")
    assert target.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.mrcs"]


# ---------------------------------------------------------------------------------------------- bad
def test_truncated_file_is_rejected(tmp_path: Path) -> None:
    p = write_mrc(tmp_path / "t.mrcs", np.ones((4, 16, 16), np.float32), 1.0)
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) - 100])
    with pytest.raises(InputError, match="truncated MRC file") as ei:
        read_stack_images(p, [0])
    assert str(p) in str(ei.value)
    short = tmp_path / "h.mrc"
    short.write_bytes(raw[:500])
    with pytest.raises(InputError, match="shorter than the 1024-byte header"):
        read_mrc(short)


def test_unsupported_mode_is_rejected(tmp_path: Path) -> None:
    p = write_raw_mrc(tmp_path / "c.mrc", np.ones((4, 4), np.complex64))
    with pytest.raises(InputError, match="unsupported MRC mode 4"):
        read_mrc(p)
    q = write_mrc(tmp_path / "m.mrc", np.ones((4, 4), np.float32), 1.0)
    raw = bytearray(q.read_bytes())
    raw[12:16] = np.int32(101).tobytes()  # 4-bit mode
    q.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="unsupported MRC mode 101"):
        read_mrc_header(q)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_images_are_rejected(tmp_path: Path, bad: float) -> None:
    stack = np.zeros((5, 8, 8), np.float32)
    stack[3, 2, 2] = bad
    p = write_mrc(tmp_path / "n.mrcs", stack, 1.0)
    assert np.array_equal(read_stack_images(p, [0, 1, 2]), stack[:3])  # clean images read fine
    with pytest.raises(InputError, match="image 4 contains NaN or infinite values"):
        read_stack_images(p, [1, 3])
    with pytest.raises(InputError, match="NaN or infinite"):
        read_mrc(p)


def test_empty_and_foreign_files(tmp_path: Path) -> None:
    e = tmp_path / "e.mrc"
    e.write_bytes(b"")
    with pytest.raises(InputError, match="empty file"):
        read_mrc(e)
    f = tmp_path / "f.mrc"
    f.write_bytes(b"x" * 2048)
    with pytest.raises(InputError):
        read_mrc(f)
    with pytest.raises(InputError, match="file not found"):
        read_mrc(tmp_path / "missing.mrc")
