"""Files of RELION Schemes and pipelines: scheme.star, job.star, default_pipeline.star, locks,
``RELION_JOB_*`` sentinel files, and the file-system environment scheme operators run in.

Every write is atomic (temporary file + rename, :mod:`autospa.io.atomic`), so a runner killed
with ``kill -9`` never leaves a half-written scheme.star. Locks are directories created with an
atomic ``mkdir`` (as RELION's are), holding a file with the owner's PID, host and start time; a
lock whose owner process is gone is taken over.

Layout (project directory = where RELION runs):

- ``Schemes/NAME/scheme.star``, ``Schemes/NAME/<job>/job.star`` (templates),
  ``Schemes/NAME/RELION_JOB_ABORT_NOW`` and ``RELION_JOB_EXIT_*`` (the scheme's own sentinels);
- ``.relion_lock_scheme_NAME/lock_scheme`` (held by a running schemer);
- ``default_pipeline.star`` and ``.relion_lock/lock_default_pipeline``;
- ``<Type>/jobNNN/`` job directories with ``job.star`` and the job's sentinels.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import smtplib
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from email.message import EmailMessage
from pathlib import Path
from typing import TypeVar

import psutil

from autospa.errors import AutospaError, InputError
from autospa.io.atomic import write_text
from autospa.scheme.model import (
    JobTemplate,
    Scheme,
    SchemeError,
    VarValue,
    job_template_from_text,
    job_template_to_text,
    scheme_from_text,
    scheme_to_text,
)
from autospa.scheme.pipeline import Pipeline, pipeline_from_text, pipeline_to_text

log = logging.getLogger(__name__)

SCHEME_FILE = "scheme.star"
JOB_FILE = "job.star"
PIPELINE_FILE = "default_pipeline.star"
EXIT_SUCCESS = "RELION_JOB_EXIT_SUCCESS"
EXIT_FAILURE = "RELION_JOB_EXIT_FAILURE"
EXIT_ABORTED = "RELION_JOB_EXIT_ABORTED"
ABORT_NOW = "RELION_JOB_ABORT_NOW"
_EXIT_FILES = {"SUCCESS": EXIT_SUCCESS, "FAILURE": EXIT_FAILURE, "ABORTED": EXIT_ABORTED}


class LockError(AutospaError):
    """A lock held by another live process (or not obtained in time)."""


# ================================================================================================
# scheme.star, job.star
# ================================================================================================
def _read(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(path, f"no {what} here") from None
    except UnicodeDecodeError:
        raise InputError(path, f"not a text file (expected a {what})") from None
    except IsADirectoryError:
        raise InputError(path, f"is a directory, not a {what}") from None


def read_scheme(scheme_dir: str | Path) -> Scheme:
    """Read ``scheme_dir/scheme.star`` (format checks only; see :mod:`autospa.scheme.validate`)."""
    path = Path(scheme_dir) / SCHEME_FILE
    return scheme_from_text(_read(path, "scheme.star"), str(path))


def write_scheme(scheme_dir: str | Path, scheme: Scheme) -> Path:
    """Write ``scheme_dir/scheme.star`` atomically."""
    path = Path(scheme_dir) / SCHEME_FILE
    write_text(path, scheme_to_text(scheme))
    return path


def backup_scheme(scheme_dir: str | Path) -> Path | None:
    """Copy scheme.star to scheme.star.bck (as relion_schemer does before an edit)."""
    path = Path(scheme_dir) / SCHEME_FILE
    if not path.exists():
        return None
    bck = path.with_name(SCHEME_FILE + ".bck")
    write_text(bck, path.read_text(encoding="utf-8"))
    return bck


def read_job_template(path: str | Path) -> JobTemplate:
    """Read a job.star (a file, or a folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / JOB_FILE
    return job_template_from_text(_read(path, "job.star"), str(path))


def write_job_template(path: str | Path, template: JobTemplate) -> Path:
    """Write a job.star atomically (``path`` may be the folder)."""
    path = Path(path)
    if path.is_dir() or path.suffix != ".star":
        path = path / JOB_FILE
    write_text(path, job_template_to_text(template))
    return path


def read_job_templates(scheme_dir: str | Path, scheme: Scheme) -> dict[str, JobTemplate | None]:
    """Every job node's template (``None`` where ``<job>/job.star`` is missing)."""
    out: dict[str, JobTemplate | None] = {}
    for name in scheme.jobs:
        p = Path(scheme_dir) / name / JOB_FILE
        out[name] = read_job_template(p) if p.exists() else None
    return out


def copy_scheme_folder(source: str | Path, destination: str | Path) -> list[Path]:
    """Copy a scheme folder (scheme.star and every ``<job>/job.star``) file by file, atomically.

    Returns the files written. Files other than STAR files are not copied.
    """
    source, destination = Path(source), Path(destination)
    if not (source / SCHEME_FILE).exists():
        raise InputError(source, "no scheme.star in this folder")
    written = []
    for f in sorted(source.rglob("*.star")):
        rel = f.relative_to(source)
        if rel.name != SCHEME_FILE and rel.name != JOB_FILE:
            continue
        target = destination / rel
        write_text(target, f.read_text(encoding="utf-8"))
        written.append(target)
    return written


# ================================================================================================
# locks
# ================================================================================================
def _process_start(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


class DirectoryLock:
    """A lock made by an atomic ``mkdir``, with ``<dir>/<filename>`` naming its owner.

    Parameters
    ----------
    directory
        The lock directory (``.relion_lock_scheme_prep``).
    filename
        The owner file inside it (``lock_scheme``).
    what
        What it locks, for messages.
    """

    def __init__(self, directory: str | Path, filename: str, what: str) -> None:
        self.directory = Path(directory)
        self.file = self.directory / filename
        self.what = what
        self.held = False

    # -- owner ----------------------------------------------------------------------------------
    def owner(self) -> dict[str, str] | None:
        """The owner record (``pid``, ``host``, ``start``), ``{}`` if the lock holds no readable
        record (a RELION lock), ``None`` if there is no lock."""
        if not self.directory.exists():
            return None
        try:
            text = self.file.read_text()
        except (FileNotFoundError, NotADirectoryError):
            return {}
        rec = {}
        for line in text.splitlines():
            if "=" in line:
                k, v = line.split("=", 1)
                rec[k.strip()] = v.strip()
        return rec

    def owner_alive(self, rec: Mapping[str, str] | None = None) -> bool:
        """Whether the lock's owner process still runs (a lock of another host or without a record
        counts as alive; a record-less lock older than 30 s counts as dead only if the directory is
        empty, i.e. its creator died between mkdir and writing the record)."""
        rec = self.owner() if rec is None else rec
        if rec is None:
            return False
        if not rec:
            try:
                empty = not any(self.directory.iterdir())
                age = time.time() - self.directory.stat().st_mtime
            except FileNotFoundError:
                return False
            return not (empty and age > 30.0)
        if rec.get("host") != socket.gethostname():
            return True
        try:
            pid = int(rec.get("pid", ""))
        except ValueError:
            return True
        start = _process_start(pid)
        if start is None:
            return False
        try:
            recorded = float(rec.get("start", "nan"))
        except ValueError:
            return True
        return abs(start - recorded) < 2.0 or recorded != recorded  # nan: unknown start time

    def _take_over(self) -> bool:
        stale = self.directory.with_name(f"{self.directory.name}.stale.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.directory, stale)
        except FileNotFoundError:
            return False
        shutil.rmtree(stale, ignore_errors=True)
        log.warning("took over the stale lock of %s (its owner is gone): %s", self.what, self.directory)
        return True

    # -- acquire / release ----------------------------------------------------------------------
    def acquire(self, timeout_s: float = 0.0, poll_s: float = 0.1) -> None:
        """Take the lock, waiting up to ``timeout_s`` for a live owner to release it.

        Raises
        ------
        LockError
            Still held by a live process after ``timeout_s``.
        """
        deadline = time.monotonic() + max(0.0, timeout_s)
        me = os.getpid()
        while True:
            try:
                self.directory.parent.mkdir(parents=True, exist_ok=True)
                os.mkdir(self.directory)
            except FileExistsError:
                rec = self.owner()
                if rec is not None and not self.owner_alive(rec):
                    self._take_over()
                    continue
                if time.monotonic() >= deadline:
                    who = f"pid {rec.get('pid')} on {rec.get('host')}" if rec else "another program (RELION?)"
                    raise LockError(
                        f"{self.what} is locked by {who}: {self.directory} exists. If no runner is running, "
                        f"remove that directory."
                    ) from None
                time.sleep(poll_s)
                continue
            start = _process_start(me)
            write_text(self.file, f"pid={me}\nhost={socket.gethostname()}\nstart={start}\n")
            self.held = True
            return

    def release(self) -> None:
        """Give the lock back (only if this object holds it)."""
        if not self.held:
            return
        self.held = False
        with contextlib.suppress(FileNotFoundError):
            self.file.unlink()
        with contextlib.suppress(FileNotFoundError, OSError):
            self.directory.rmdir()

    def __enter__(self) -> DirectoryLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def scheme_lock(project_dir: str | Path, name: str) -> DirectoryLock:
    """RELION's scheme lock: ``<project>/.relion_lock_scheme_<name>/lock_scheme``."""
    return DirectoryLock(Path(project_dir) / f".relion_lock_scheme_{name}", "lock_scheme", f"scheme {name}")


def pipeline_lock(project_dir: str | Path) -> DirectoryLock:
    """RELION's pipeline lock: ``<project>/.relion_lock/lock_default_pipeline``."""
    return DirectoryLock(Path(project_dir) / ".relion_lock", "lock_default_pipeline", "default_pipeline.star")


@contextlib.contextmanager
def locked(lock: DirectoryLock, timeout_s: float) -> Iterator[DirectoryLock]:
    """Hold ``lock`` for a block."""
    lock.acquire(timeout_s)
    try:
        yield lock
    finally:
        lock.release()


# ================================================================================================
# default_pipeline.star
# ================================================================================================
T = TypeVar("T")


def read_pipeline(project_dir: str | Path) -> Pipeline:
    """The project's ``default_pipeline.star`` (an empty pipeline if there is none)."""
    path = Path(project_dir) / PIPELINE_FILE
    if not path.exists():
        return Pipeline()
    return pipeline_from_text(_read(path, "default_pipeline.star"), str(path))


def update_pipeline(
    project_dir: str | Path, change: Callable[[Pipeline], tuple[Pipeline, T]], timeout_s: float = 120.0
) -> T:
    """Read, change and write ``default_pipeline.star`` under the pipeline lock.

    Parameters
    ----------
    change
        ``pipeline -> (new pipeline, value)``.

    Returns
    -------
    The ``value`` ``change`` returned.
    """
    with locked(pipeline_lock(project_dir), timeout_s):
        new, value = change(read_pipeline(project_dir))
        write_text(Path(project_dir) / PIPELINE_FILE, pipeline_to_text(new))
    return value


# ================================================================================================
# sentinels
# ================================================================================================
def write_exit_status(directory: str | Path, status: str, message: str = "") -> Path:
    """Write ``RELION_JOB_EXIT_<status>`` (SUCCESS, FAILURE or ABORTED) into ``directory``; the
    other exit files are removed first, so exactly one remains. ``message`` goes into the file."""
    if status not in _EXIT_FILES:
        raise ValueError(f"unknown exit status {status!r}")
    directory = Path(directory)
    clear_exit_status(directory)
    path = directory / _EXIT_FILES[status]
    write_text(path, message + ("\n" if message and not message.endswith("\n") else ""))
    return path


def read_exit_status(directory: str | Path) -> str | None:
    """``"SUCCESS"``, ``"FAILURE"``, ``"ABORTED"`` or ``None`` (FAILURE wins if several exist)."""
    directory = Path(directory)
    for status in ("FAILURE", "ABORTED", "SUCCESS"):
        if (directory / _EXIT_FILES[status]).exists():
            return status
    return None


def exit_message(directory: str | Path) -> str:
    """The text of the exit file of ``directory`` (first non-empty line), ``""`` if none."""
    status = read_exit_status(directory)
    if status is None:
        return ""
    try:
        text = (Path(directory) / _EXIT_FILES[status]).read_text(errors="replace")
    except FileNotFoundError:
        return ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def clear_exit_status(directory: str | Path) -> None:
    """Remove every ``RELION_JOB_EXIT_*`` file of ``directory``."""
    for name in _EXIT_FILES.values():
        with contextlib.suppress(FileNotFoundError):
            (Path(directory) / name).unlink()


def request_abort(directory: str | Path) -> Path:
    """Create ``RELION_JOB_ABORT_NOW`` in ``directory``."""
    path = Path(directory) / ABORT_NOW
    write_text(path, "")
    return path


def abort_requested(directory: str | Path) -> bool:
    """Whether ``directory`` holds ``RELION_JOB_ABORT_NOW``."""
    return (Path(directory) / ABORT_NOW).exists()


def clear_abort(directory: str | Path) -> None:
    """Remove ``RELION_JOB_ABORT_NOW`` from ``directory``."""
    with contextlib.suppress(FileNotFoundError):
        (Path(directory) / ABORT_NOW).unlink()


def write_job_note(job_dir: str | Path, name: str, text: str) -> Path:
    """Write a small text file (``run.err``, ``note.txt``...) into a job directory."""
    path = Path(job_dir) / name
    write_text(path, text)
    return path


# ================================================================================================
# the operators' environment
# ================================================================================================
class FileSystemEnvironment:
    """:class:`autospa.scheme.operators.OperatorEnvironment` on the real file system.

    Parameters
    ----------
    project_dir
        Paths in operators are relative to it (RELION runs in the project directory).
    abort_check
        Called while sleeping; returns ``True`` when an abort was requested.
    """

    def __init__(self, project_dir: str | Path, abort_check: Callable[[], bool] | None = None) -> None:
        self.project_dir = Path(project_dir).resolve()
        self.abort_check = abort_check or (lambda: False)

    # -- paths ----------------------------------------------------------------------------------
    def _path(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else self.project_dir / p

    def _inside(self, path: Path, what: str) -> Path:
        resolved = path.resolve()
        if resolved != self.project_dir and self.project_dir not in resolved.parents:
            raise SchemeError(f"{what} {path} is outside the project directory {self.project_dir}")
        return resolved

    def _matches(self, pattern: str) -> list[Path]:
        return [Path(p) for p in sorted(glob.glob(str(self._path(pattern))))]

    # -- queries --------------------------------------------------------------------------------
    def file_exists(self, path: str) -> bool:
        return self._path(path).is_file()

    def _blocks(self, path: str) -> dict:
        from autospa.io.star import read_star  # imported here: pandas/starfile only when needed

        return read_star(self._path(path))

    def star_table_rows(self, path: str, table: str) -> int | None:
        if not self._path(path).is_file():
            return None
        block = self._blocks(path).get(table)
        if block is None:
            return 0
        return len(block) if not isinstance(block, dict) else (1 if block else 0)

    def star_column(self, path: str, table: str, label: str) -> list[VarValue]:
        blocks = self._blocks(path)
        block = blocks.get(table)
        if block is None:
            raise SchemeError(f"{path} has no table data_{table}")
        if isinstance(block, dict):
            if label not in block:
                raise SchemeError(f"{path}: data_{table} has no _{label}")
            return [_scalar(block[label])]
        if label not in block.columns:
            raise SchemeError(f"{path}: data_{table} has no _{label}")
        return [_scalar(v) for v in block[label].tolist()]

    def glob(self, pattern: str) -> list[str]:
        out = []
        for p in self._matches(pattern):
            out.append(str(p) if Path(pattern).is_absolute() else os.path.relpath(p, self.project_dir))
        return out

    # -- changes --------------------------------------------------------------------------------
    def touch(self, path: str) -> None:
        target = self._inside(self._path(path), "touch_file target")
        if target.exists():
            os.utime(target)
        else:
            write_text(target, "")

    def _transfer(self, source: str, destination: str, move: bool) -> None:
        what = "move_file" if move else "copy_file"
        matches = [m for m in self._matches(source) if m.is_file()]
        if not matches:
            raise SchemeError(f"{what}: nothing matches {source}")
        dest = self._inside(self._path(destination), f"{what} destination")
        if len(matches) > 1 or destination.endswith("/") or dest.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
            targets = [dest / m.name for m in matches]
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            targets = [dest]
        for src, dst in zip(matches, targets, strict=True):
            if move:
                self._inside(src, "move_file source")
                os.replace(src, dst)
            else:
                tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp")
                shutil.copy2(src, tmp)
                os.replace(tmp, dst)

    def copy(self, source: str, destination: str) -> None:
        self._transfer(source, destination, move=False)

    def move(self, source: str, destination: str) -> None:
        self._transfer(source, destination, move=True)

    def delete(self, pattern: str) -> None:
        for m in self._matches(pattern):
            if m.is_file() or m.is_symlink():
                self._inside(m.parent, "delete_file target").joinpath(m.name).unlink()

    def send_email(self, to: str, subject: str, body: str) -> None:
        host = os.environ.get("AUTOSPA_SMTP_HOST", "localhost")
        port = int(os.environ.get("AUTOSPA_SMTP_PORT", "25"))
        msg = EmailMessage()
        msg["From"] = f"autospa@{socket.gethostname()}"
        msg["To"] = to
        msg["Subject"] = subject
        msg.set_content(body)
        try:
            with smtplib.SMTP(host, port, timeout=10) as smtp:
                smtp.send_message(msg)
        except (OSError, smtplib.SMTPException) as exc:
            log.warning("could not send mail to %s through %s:%d: %s", to, host, port, exc)

    # -- time -----------------------------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> bool:
        end = time.monotonic() + seconds
        while True:
            if self.abort_check():
                return False
            left = end - time.monotonic()
            if left <= 0:
                return True
            time.sleep(min(left, 0.25))

    # -- other schemes --------------------------------------------------------------------------
    def scheme_jobs(self, scheme: str) -> Mapping[str, str]:
        path = self.project_dir / "Schemes" / scheme / SCHEME_FILE
        try:
            other = read_scheme(path.parent)
        except InputError as exc:
            raise SchemeError(f"another scheme is referred to but cannot be read: {exc}") from None
        return {n: j.current_name for n, j in other.jobs.items()}


def _scalar(v: object) -> VarValue:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return v
    try:  # numpy scalars
        import numpy as np

        if isinstance(v, np.generic):
            return _scalar(v.item())
    except ImportError:  # pragma: no cover
        pass
    return str(v)
