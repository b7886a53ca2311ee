"""RELION's Import job for movies and micrographs (``relion.import.movies``), as the prep scheme's
``importmovies`` node runs it: ``fn_in_raw`` (a glob relative to the project directory) is imported
into ``Import/jobNNN/movies.star`` (``is_multiframe Yes``) or ``micrographs.star``, with one optics
group (``optics_group_name``, ``angpix``, ``kV``, ``Cs``, ``Q0``, ``fn_mtf``, beam tilt). Continued,
it appends only the files it has not listed yet, which is how prep follows a growing session.

File names are written as RELION writes them, relative to the project directory, when the process
runs in the project directory (as ``autospa schemer`` and ``autospa it`` do, and as RELION always
does); otherwise they are absolute.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from autospa.errors import InputError
from autospa.io.relion_import import MICROGRAPHS_STAR, MOVIES_STAR, import_micrographs, import_movies
from autospa.jobs.registry import option_bool, option_float, project_dir_of, register_job, succeed

log = logging.getLogger(__name__)


def _optional_float(options: dict[str, str], key: str) -> float | None:
    value = str(options.get(key, "")).strip()
    if value in ("", '""'):
        return None
    return option_float(options, key)


@register_job("relion.import.movies", outputs=(MOVIES_STAR, MICROGRAPHS_STAR))
def job_import_movies(job_dir: Path, options: dict[str, str], continue_: bool) -> None:
    """Import the movies (or micrographs) that ``fn_in_raw`` matches."""
    if not option_bool(options, "do_raw", True):
        raise InputError(job_dir / "job.star", "only the import of raw movies or micrographs (do_raw Yes) is implemented")
    pattern = str(options.get("fn_in_raw", "")).strip()
    if not pattern:
        raise InputError(job_dir / "job.star", "fn_in_raw (the movies to import) is empty")
    project = project_dir_of(job_dir)
    if not Path(pattern).is_absolute() and Path.cwd().resolve() != project:
        log.warning("not running in the project directory %s: importing %s with absolute file names", project, pattern)
        pattern = os.path.join(str(project), pattern)
    bx, by = _optional_float(options, "beamtilt_x"), _optional_float(options, "beamtilt_y")
    common = dict(
        pattern=pattern,
        outdir=job_dir,
        angpix=option_float(options, "angpix"),
        kv=option_float(options, "kV"),
        cs=option_float(options, "Cs"),
        q0=option_float(options, "Q0", 0.1),
        optics_group_name=str(options.get("optics_group_name", "opticsGroup1")) or "opticsGroup1",
        mtf=str(options.get("fn_mtf", "")).strip().strip('"') or None,
        beamtilt_x=bx if bx else None,
        beamtilt_y=by if by else None,
        continue_=continue_,
    )
    if option_bool(options, "is_multiframe", True):
        import_movies(**common)
    else:
        import_micrographs(**common)
    succeed(job_dir)
