"""glibc malloc settings for the E-step's processes (no dask import: the CLI applies them first)."""

from __future__ import annotations

#: glibc malloc settings of the worker processes. Dask's default (``MALLOC_TRIM_THRESHOLD_=65536``)
#: hands freed memory back to the kernel at once; the E-step allocates and frees blocks of tens of
#: MB per chunk, so every block came back as fresh pages: 2 million page faults per VDAM
#: mini-batch of 1,000 particles (half the CPU time in the kernel, measured on 2 cores). Blocks up
#: to 32 MB (glibc's largest mmap threshold) are now reused; the trim threshold keeps 1 GB.
MALLOC_ENVIRONMENT = {
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
    "MALLOC_TOP_PAD_": str(64 << 20),
}


def tune_malloc() -> bool:
    """Apply :data:`MALLOC_ENVIRONMENT` to this process through glibc's ``mallopt`` (the
    environment variables act only when a process starts); where an environment variable of the
    same name is set, it is left to rule. Returns False where the C library has no ``mallopt``."""
    import ctypes
    import ctypes.util
    import os

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    codes = {"MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_TOP_PAD_": -2, "MALLOC_MMAP_THRESHOLD_": -3}
    for name, value in MALLOC_ENVIRONMENT.items():
        if name not in os.environ:
            mallopt(ctypes.c_int(codes[name]), ctypes.c_int(int(value)))
    return True


__all__ = ["MALLOC_ENVIRONMENT", "tune_malloc"]
