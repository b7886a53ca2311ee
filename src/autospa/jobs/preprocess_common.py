"""Shared plumbing of the preprocessing jobs (motioncorr, ctffind, autopick, extract, select).

* per-micrograph work runs as dask tasks (:func:`map_tasks`): on the connected client when there
  is one (given, or the process's default client), else on dask's threaded scheduler;
* RELION's mirrored output layout (:func:`mirror_path`): ``Movies/a.tiff`` processed by
  ``MotionCorr/job002`` becomes ``MotionCorr/job002/Movies/a.mrc``; an input that lives in
  another job's folder (``MotionCorr/job002/Movies/a.mrc``) loses that job prefix;
* paths in STAR files are relative to the project directory (:func:`project_relative`).
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import dask

log = logging.getLogger(__name__)

_JOB_PREFIX = re.compile(r"^[A-Za-z0-9_]+/job\d{3,}/")


def default_client_or_none():
    """The dask client this process is connected to, or ``None``."""
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def map_tasks(func: Callable[[Any], Any], items: Sequence[Any], client=None, key_prefix: str = "autospa") -> list:
    """Run ``func`` on every item as one dask task each and return the results in order.

    Parameters
    ----------
    func
        A picklable top-level function of one argument.
    items
        Its arguments (one task each).
    client
        A ``distributed.Client``; default: the process's current client, else the threaded scheduler.
    key_prefix
        Task-name prefix (shown on the dashboard).
    """
    if not items:
        return []
    client = client if client is not None else default_client_or_none()
    run_id = uuid.uuid4().hex[:8]  # keys unique per call: a later run never meets an earlier result
    if client is not None:
        futures = client.map(func, list(items), pure=False, key=[f"{key_prefix}-{run_id}-{i}" for i in range(len(items))])
        return client.gather(futures)
    tasks = [dask.delayed(func, pure=False)(it, dask_key_name=f"{key_prefix}-{run_id}-{i}") for i, it in enumerate(items)]
    return list(dask.compute(*tasks, scheduler="threads"))


def project_relative(path: Path, project_dir: Path) -> str:
    """``path`` relative to the project directory when inside it, else absolute (STAR convention)."""
    path = Path(path)
    try:
        return path.resolve().relative_to(project_dir.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def resolve(name: str, project_dir: Path) -> Path:
    """A STAR path (relative to the project directory, or absolute) as an absolute path."""
    p = Path(name)
    return p if p.is_absolute() else project_dir / p


def mirror_path(input_name: str, output_dir: Path, suffix: str) -> Path:
    """Where an output derived from ``input_name`` goes inside ``output_dir`` (RELION's layout).

    Parameters
    ----------
    input_name
        The input's name as written in the input STAR (project-relative or absolute).
    output_dir
        The job directory.
    suffix
        New suffix including the dot and any name ending (``".mrc"``, ``"_autopick.star"``).
    """
    name = Path(input_name)
    if name.is_absolute():
        rel = Path(*name.parts[-2:]) if len(name.parts) >= 2 else Path(name.name)
    else:
        rel = Path(_JOB_PREFIX.sub("", name.as_posix()))
        rel = Path(*[p for p in rel.parts if p not in ("..", ".")])
    return output_dir / rel.parent / (rel.stem + suffix)


def parse_relion_choice(value: str | int | float, default: int = 0) -> int:
    """RELION's option strings like ``"90 degrees (1)"`` or ``"No flipping (0)"`` -> 1, 0; numbers pass."""
    if isinstance(value, (int, float)):
        return int(value)
    s = str(value).strip()
    m = re.search(r"\((\d+)\)\s*$", s)
    if m:
        return int(m.group(1))
    try:
        return int(float(s))
    except ValueError:
        return default
