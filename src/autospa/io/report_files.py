"""Files of the session report (L3): what a project directory holds, and writing the report.

Reading side (used by :mod:`autospa.report.session_report`):

* :func:`scan_job_directories`: every ``Type/jobNNN/`` folder of a project (RELION's layout), also
  those the pipeline file does not list (jobs run from the command line with ``--o``);
* :func:`job_times`: when a job was launched and when it ended, from its files: the scheme runner
  writes ``job.star`` into the job directory when it launches a job and the job writes one
  ``RELION_JOB_EXIT_*`` file when it ends (for a ``continue`` job both are rewritten at every
  visit, so the times are those of its last visit);
* :func:`resolve_project_file`: a file named in a STAR file (relative to the project directory,
  absolute, or absolute in a project that has since moved).

Writing side: :func:`write_report` writes the PNG figures and then ``index.html`` into the report
folder, each atomically (temporary name, then rename), so a reader never sees half a page.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from autospa.errors import InputError
from autospa.io.atomic import write_bytes, write_text

#: Names of the exit files, in the order a job directory is checked.
_EXIT_FILES = ("RELION_JOB_EXIT_FAILURE", "RELION_JOB_EXIT_ABORTED", "RELION_JOB_EXIT_SUCCESS")
_JOB_DIR = re.compile(r"^[A-Z][A-Za-z0-9]*$")
_JOB_NAME = re.compile(r"^job\d{3,}$")
_PROJECT_TAIL = re.compile(r"(?:^|/)([A-Z][A-Za-z0-9]*/job\d{3,}/.+)$")
_PNG_NAME = re.compile(r"^[A-Za-z0-9_.-]+\.png$")

__all__ = ["job_times", "resolve_project_file", "scan_job_directories", "write_report"]


def scan_job_directories(project_dir: str | Path) -> list[str]:
    """Every ``Type/jobNNN/`` folder under the project, as ``"Type/jobNNN/"``, sorted by job number.

    Parameters
    ----------
    project_dir
        The project directory.

    Raises
    ------
    InputError
        The project directory does not exist.
    """
    project = Path(project_dir)
    if not project.is_dir():
        raise InputError(project, "project directory does not exist")
    found = []
    for type_dir in project.iterdir():
        if not (type_dir.is_dir() and _JOB_DIR.match(type_dir.name)) or type_dir.name == "Schemes":
            continue
        for job in type_dir.iterdir():
            if job.is_dir() and _JOB_NAME.match(job.name) and not job.is_symlink():
                found.append(f"{type_dir.name}/{job.name}/")
    return sorted(found, key=lambda n: (int(n.rstrip("/").rsplit("job", 1)[1]), n))


def job_times(job_dir: str | Path) -> tuple[float | None, float | None]:
    """``(launched, ended)`` of a job as POSIX times (``None`` where unknown).

    ``launched`` is the modification time of the job's ``job.star`` (written by the scheme runner
    at launch), ``ended`` that of its ``RELION_JOB_EXIT_*`` file. Without a ``job.star`` (a job
    run from the command line) the oldest file of the directory stands in for the launch.
    """
    d = Path(job_dir)
    ended = None
    for name in _EXIT_FILES:
        p = d / name
        if p.is_file():
            ended = p.stat().st_mtime
            break
    star = d / "job.star"
    if star.is_file():
        launched: float | None = star.stat().st_mtime
    else:
        times = [p.stat().st_mtime for p in d.iterdir() if p.is_file() and p.name not in _EXIT_FILES] if d.is_dir() else []
        launched = min(times) if times else None
    return launched, ended


def resolve_project_file(project_dir: str | Path, name: str, beside: str | Path | None = None) -> Path | None:
    """The file a STAR file names, or ``None`` when it cannot be found.

    Tried in order: ``project_dir / name`` (RELION's names are relative to the project
    directory); ``name`` itself when absolute; for an absolute name that no longer exists, its
    ``Type/jobNNN/...`` tail inside ``project_dir`` (the project was moved); the file of that name
    in ``beside`` (the folder of the STAR file that names it).
    """
    text = str(name).strip().split(":")[0] if str(name).endswith((":mrc", ":mrcs")) else str(name).strip()
    if not text:
        return None
    project = Path(project_dir)
    p = Path(text)
    candidates = []
    if p.is_absolute():
        candidates.append(p)
        m = _PROJECT_TAIL.search(text)
        if m:
            candidates.append(project / m.group(1))
    else:
        candidates.append(project / p)
    if beside is not None:
        candidates.append(Path(beside) / p.name)
    for c in candidates:
        if c.is_file():
            return c
    return None


def write_report(out_dir: str | Path, html: str, figures: Mapping[str, bytes], index_name: str = "index.html") -> dict[str, Path]:
    """Write the report: every figure ``out_dir/NAME.png``, then ``out_dir/index.html``.

    Parameters
    ----------
    out_dir
        Report folder (created).
    html
        The page; it links the figures by their bare names.
    figures
        File name (``motion_ctf.png``) -> PNG bytes.
    index_name
        Name of the page.

    Returns
    -------
    dict
        ``{"index": path, NAME: path, ...}``.

    Raises
    ------
    InputError
        A figure name that is not a plain ``*.png`` file name, or bytes that are not a PNG.
    """
    out = Path(out_dir)
    for name, data in figures.items():
        if not _PNG_NAME.match(name):
            raise InputError(out / name, "report figures must have plain *.png names")
        if not bytes(data[:8]) == b"\x89PNG\r\n\x1a\n":
            raise InputError(out / name, "figure data is not a PNG image")
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, data in figures.items():
        write_bytes(out / name, bytes(data))
        paths[name] = out / name
    write_text(out / index_name, html)  # last: the page only appears once its figures are there
    paths["index"] = out / index_name
    return paths
