"""MRC / MRCS images through ``mrcfile``: checked reads, memory-mapped stack access, atomic writes.

Readable modes: 0 (int8), 1 (int16), 2 (float32), 6 (uint16) and 12 (float16, IEEE half as
RELION-4.0 writes it). Writable modes: 2 and 12. Every reader checks the header against the file
size before touching the data (a truncated file is rejected, never padded), and image reads reject
NaN/inf. ``mrcfile.validate`` is not used: it reports large float16 files as invalid (it computes
the RMS in float16).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np

from autospa.errors import InputError
from autospa.io.atomic import atomic_path

log = logging.getLogger(__name__)

#: MRC mode -> numpy dtype (little endian; mrcfile handles byte order).
READ_MODES: dict[int, np.dtype] = {
    0: np.dtype(np.int8),
    1: np.dtype(np.int16),
    2: np.dtype(np.float32),
    6: np.dtype(np.uint16),
    12: np.dtype(np.float16),
}
#: Modes :func:`write_mrc` writes.
WRITE_MODES: dict[int, np.dtype] = {2: np.dtype(np.float32), 12: np.dtype(np.float16)}

_HEADER_BYTES = 1024


@dataclass(frozen=True)
class MrcInfo:
    """What the header of an MRC file says, checked against the file.

    Attributes
    ----------
    path
        The file.
    shape
        ``(nz, ny, nx)``: number of sections (images of a stack) and image size.
    mode
        MRC mode.
    dtype
        numpy dtype of the stored values.
    voxel_size_a
        Pixel/voxel size along x in Angstrom (0 when the header does not say).
    is_stack
        Whether the header marks the file as an image stack (space group 0).
    """

    path: Path
    shape: tuple[int, int, int]
    mode: int
    dtype: np.dtype
    voxel_size_a: float
    is_stack: bool

    @property
    def n_images(self) -> int:
        """Number of 2D sections (images of a stack)."""
        return self.shape[0]


def read_mrc_header(path: str | Path) -> MrcInfo:
    """Read and check the header of an MRC/MRCS file (no data is read).

    Raises
    ------
    InputError
        Missing or empty file, no ``MAP`` identifier, unsupported mode, zero-sized dimensions,
        or a file shorter than its header says (truncated).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_dir():
        raise InputError(path, "is a folder, not an MRC file")
    size = path.stat().st_size
    if size == 0:
        raise InputError(path, "empty file")
    if size < _HEADER_BYTES:
        raise InputError(path, f"truncated MRC file: {size} bytes, shorter than the {_HEADER_BYTES}-byte header")
    with open(path, "rb") as fh:
        raw = fh.read(_HEADER_BYTES)
    map_id = raw[208:212]
    endian = ">" if raw[212:213] == b"\x11" else "<"  # machine stamp 0x11: big endian
    ints = np.frombuffer(raw, dtype=f"{endian}i4")
    nx, ny, nz, mode = (int(v) for v in ints[:4])
    mx = int(ints[7])
    cella_x = float(np.frombuffer(raw[40:44], dtype=f"{endian}f4")[0])
    ispg, nsymbt = int(ints[22]), int(ints[23])
    voxel_x = cella_x / mx if mx > 0 else 0.0
    if map_id != b"MAP ":
        raise InputError(path, f"not an MRC file (map identifier {map_id!r}, expected b'MAP ')")
    if mode not in READ_MODES:
        names = ", ".join(f"{m} ({d.name})" for m, d in READ_MODES.items())
        raise InputError(path, f"unsupported MRC mode {mode} (readable modes: {names})")
    if nx <= 0 or ny <= 0 or nz <= 0:
        raise InputError(path, f"empty image: header dimensions nx={nx} ny={ny} nz={nz}")
    if nsymbt < 0:
        raise InputError(path, f"corrupt MRC header: extended header size {nsymbt}")
    dtype = READ_MODES[mode]
    expected = _HEADER_BYTES + nsymbt + nx * ny * nz * dtype.itemsize
    if size < expected:
        raise InputError(
            path,
            f"truncated MRC file: header says {nz} x {ny} x {nx} mode {mode} ({expected} bytes), file has {size} bytes",
        )
    if size > expected:
        log.warning("%s: %d bytes after the data block (ignored)", path, size - expected)
    return MrcInfo(
        path=path,
        shape=(nz, ny, nx),
        mode=mode,
        dtype=dtype,
        voxel_size_a=voxel_x,
        is_stack=ispg == 0 and nz > 1 or path.suffix.lower() == ".mrcs",
    )


@contextlib.contextmanager
def open_stack(path: str | Path) -> Iterator[tuple[MrcInfo, np.ndarray]]:
    """Memory-map a checked MRC file as an ``(n, ny, nx)`` array (read-only).

    Yields
    ------
    tuple
        ``(info, data)`` with ``data`` a read-only memory map of shape ``(nz, ny, nx)`` in the
        file's dtype; valid only inside the ``with`` block.
    """
    info = read_mrc_header(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mrc = mrcfile.mmap(info.path, mode="r", permissive=True)
    except Exception as exc:
        raise InputError(info.path, f"cannot map MRC data ({type(exc).__name__}: {exc})") from exc
    try:
        data = mrc.data
        if data is None:
            raise InputError(info.path, "MRC data block could not be read")
        yield info, data.reshape(info.shape)
    finally:
        mrc.close()


def read_mrc(path: str | Path, check_finite: bool = True) -> tuple[np.ndarray, float]:
    """Read a whole MRC file.

    Parameters
    ----------
    path
        MRC/MRCS file (any readable mode).
    check_finite
        Reject NaN/inf values (only float modes can hold them).

    Returns
    -------
    tuple
        ``(data, voxel_size_a)``: data in the file's dtype, ``(ny, nx)`` for a single image,
        ``(nz, ny, nx)`` for a volume or stack; voxel size along x in Angstrom.
    """
    with open_stack(path) as (info, mm):
        data = np.array(mm)
    if check_finite and data.dtype.kind == "f":
        _check_finite(info.path, data, what="data")
    if info.shape[0] == 1:
        data = data[0]
    return data, info.voxel_size_a


def read_stack_images(
    path: str | Path,
    indices: Sequence[int] | np.ndarray | None = None,
    check_finite: bool = True,
) -> np.ndarray:
    """Read images of a stack by (0-based) index, memory-mapped, as float32.

    Parameters
    ----------
    path
        MRCS stack (or a single MRC image, which is a stack of one).
    indices
        ``(k,)`` 0-based image indices (RELION's ``INDEX@`` minus one), any order, repeats
        allowed; ``None`` reads every image.
    check_finite
        Reject images holding NaN or inf.

    Returns
    -------
    np.ndarray
        ``(k, ny, nx)`` float32.
    """
    with open_stack(path) as (info, mm):
        n = info.n_images
        if indices is None:
            idx = np.arange(n)
        else:
            idx = np.asarray(indices, dtype=np.int64).reshape(-1)
            bad = (idx < 0) | (idx >= n)
            if bad.any():
                k = int(idx[np.argmax(bad)])
                raise InputError(info.path, f"image {k + 1} requested but the stack holds {n} images")
        if idx.size and np.all(np.diff(idx) == 1):
            out = np.asarray(mm[idx[0] : idx[-1] + 1], dtype=np.float32)
        else:
            out = np.asarray(mm[idx], dtype=np.float32)
    if check_finite:
        _check_finite(info.path, out, indices=idx)
    return out


def write_mrc(
    path: str | Path,
    data: np.ndarray,
    voxel_size_a: float,
    mode: int = 2,
    stack: bool | None = None,
) -> Path:
    """Write an image, stack or volume to an MRC file atomically.

    Parameters
    ----------
    path
        Destination; ``.mrcs`` makes a 3D array an image stack unless ``stack`` says otherwise.
    data
        ``(ny, nx)`` image, ``(n, ny, nx)`` stack or ``(nz, ny, nx)`` volume (any real dtype; cast
        to the mode's dtype).
    voxel_size_a
        Pixel/voxel size in Angstrom (written to the header).
    mode
        2 (float32) or 12 (float16).
    stack
        Mark a 3D array as an image stack (space group 0); default: ``path`` ends in ``.mrcs``.
    """
    path = Path(path)
    if mode not in WRITE_MODES:
        raise ValueError(f"MRC mode {mode} cannot be written (choose 2 or 12)")
    arr = np.ascontiguousarray(np.asarray(data), dtype=WRITE_MODES[mode])
    if arr.ndim not in (2, 3):
        raise ValueError(f"MRC data must be 2D or 3D, got shape {arr.shape}")
    if stack is None:
        stack = path.suffix.lower() == ".mrcs"
    with atomic_path(path) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with mrcfile.new(tmp, overwrite=True) as mrc:
                mrc.set_data(arr)
                if arr.ndim == 3:
                    mrc.set_image_stack() if stack else mrc.set_volume()
                mrc.voxel_size = float(voxel_size_a)
                _set_stats(mrc.header, *_stats(arr))
    return path


class MrcStackWriter:
    """Write an image stack in pieces, through a memory map, renamed into place on success.

    Use as a context manager::

        with MrcStackWriter(path, n_images, box, mode=12, voxel_size_a=1.2) as w:
            w.write(0, images_a)       # (k, box, box)
            w.write(k, images_b)

    Every image must be written exactly once; header statistics are accumulated in float64.
    """

    def __init__(self, path: str | Path, n_images: int, box: int, mode: int = 2, voxel_size_a: float = 1.0):
        if mode not in WRITE_MODES:
            raise ValueError(f"MRC mode {mode} cannot be written (choose 2 or 12)")
        self.path = Path(path)
        self.n_images = int(n_images)
        self.box = int(box)
        self.mode = mode
        self.voxel_size_a = float(voxel_size_a)
        self._written = np.zeros(self.n_images, dtype=bool)
        self._min = np.inf
        self._max = -np.inf
        self._sum = 0.0
        self._sumsq = 0.0
        self._stack: contextlib.ExitStack | None = None
        self._mrc = None

    def __enter__(self) -> MrcStackWriter:
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(atomic_path(self.path))
        try:
            self._mrc = mrcfile.new_mmap(tmp, shape=(self.n_images, self.box, self.box), mrc_mode=self.mode, overwrite=True)
            self._mrc.set_image_stack()
            self._mrc.voxel_size = self.voxel_size_a
        except BaseException as err:
            self._stack.__exit__(type(err), err, err.__traceback__)
            raise
        return self

    def write(self, start: int, images: np.ndarray) -> None:
        """Write ``images`` (``(k, box, box)``) at positions ``start .. start + k - 1``."""
        images = np.asarray(images)
        k = images.shape[0]
        if images.shape[1:] != (self.box, self.box):
            raise ValueError(f"images of shape {images.shape[1:]} written to a stack of box {self.box}")
        if start < 0 or start + k > self.n_images:
            raise ValueError(f"images {start}..{start + k} outside a stack of {self.n_images}")
        self._mrc.data[start : start + k] = images.astype(WRITE_MODES[self.mode], copy=False)
        self._written[start : start + k] = True
        if k:
            f = images.astype(np.float64)
            self._min = min(self._min, float(f.min()))
            self._max = max(self._max, float(f.max()))
            self._sum += float(f.sum())
            self._sumsq += float(np.square(f).sum())

    def _finish(self) -> None:
        if not self._written.all():
            missing = int(np.flatnonzero(~self._written)[0])
            raise ValueError(f"{self.path}: image {missing + 1} of {self.n_images} was never written")
        n = self.n_images * self.box * self.box
        mean = self._sum / n
        rms = float(np.sqrt(max(self._sumsq / n - mean * mean, 0.0)))
        _set_stats(self._mrc.header, self._min, self._max, mean, rms)
        self._mrc.flush()

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            try:
                self._finish()
            except BaseException as err:
                self._mrc.close()
                self._stack.__exit__(type(err), err, err.__traceback__)
                raise
            self._mrc.close()
            self._stack.__exit__(None, None, None)  # rename into place
            return False
        self._mrc.close()
        return bool(self._stack.__exit__(exc_type, exc, tb))


def _stats(arr: np.ndarray) -> tuple[float, float, float, float]:
    f = arr.astype(np.float64)
    return float(f.min()), float(f.max()), float(f.mean()), float(f.std())


def _set_stats(header, dmin: float, dmax: float, dmean: float, rms: float) -> None:
    header.dmin = np.float32(dmin)
    header.dmax = np.float32(dmax)
    header.dmean = np.float32(dmean)
    header.rms = np.float32(rms)


def _check_finite(path: Path, data: np.ndarray, indices: np.ndarray | None = None, what: str = "image") -> None:
    if data.dtype.kind != "f":
        return
    flat = data.reshape(data.shape[0], -1) if data.ndim >= 2 else data.reshape(1, -1)
    ok = np.isfinite(flat).all(axis=1)
    if not ok.all():
        k = int(np.argmax(~ok))
        if indices is not None:
            raise InputError(path, f"image {int(indices[k]) + 1} contains NaN or infinite values")
        raise InputError(path, f"{what} contains NaN or infinite values (section {k + 1})")


__all__ = [
    "READ_MODES",
    "WRITE_MODES",
    "MrcInfo",
    "MrcStackWriter",
    "open_stack",
    "read_mrc",
    "read_mrc_header",
    "read_stack_images",
    "write_mrc",
]
