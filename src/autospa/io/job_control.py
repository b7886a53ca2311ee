"""RELION job-control markers: ``RELION_JOB_EXIT_SUCCESS`` / ``_FAILURE`` / ``_ABORTED``.

RELION (and its Schemes) run a job with ``--pipeline_control DIR`` and wait for one of these empty
files in ``DIR``; a job clears them when it starts and writes one when it ends.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from autospa.io.atomic import write_bytes

SUCCESS = "RELION_JOB_EXIT_SUCCESS"
FAILURE = "RELION_JOB_EXIT_FAILURE"
ABORTED = "RELION_JOB_EXIT_ABORTED"
_ALL = (SUCCESS, FAILURE, ABORTED)


def clear_job_exit_status(job_dir: str | Path) -> None:
    """Remove any exit marker left in ``job_dir`` by an earlier run."""
    for name in _ALL:
        with contextlib.suppress(FileNotFoundError):
            (Path(job_dir) / name).unlink()


def write_job_exit_status(job_dir: str | Path, success: bool, aborted: bool = False) -> Path:
    """Write the exit marker of a finished job (removing the others); returns its path."""
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    name = ABORTED if aborted else (SUCCESS if success else FAILURE)
    for other in _ALL:
        if other != name:
            with contextlib.suppress(FileNotFoundError):
                (job_dir / other).unlink()
    path = job_dir / name
    write_bytes(path, b"")
    return path


def read_job_exit_status(job_dir: str | Path) -> str | None:
    """``"success"``, ``"failure"``, ``"aborted"`` or ``None`` (still running / never run)."""
    job_dir = Path(job_dir)
    for name, status in ((SUCCESS, "success"), (FAILURE, "failure"), (ABORTED, "aborted")):
        if (job_dir / name).exists():
            return status
    return None


__all__ = ["ABORTED", "FAILURE", "SUCCESS", "clear_job_exit_status", "read_job_exit_status", "write_job_exit_status"]
