"""relion_schemer's editing commands (``--set_var``, ``--reset``, ``--set_current_node``,
``--set_has_started``, ``--set_job_mode``, ``--abort``), relion_pipeliner's ``--editJob``, and a
status summary of a scheme.

Every edit reads scheme.star under the scheme lock (so it waits for, and then refuses to race
with, a running runner), saves ``scheme.star.bck``, applies a pure change and writes the file
atomically. ``--abort`` only creates ``RELION_JOB_ABORT_NOW`` files, as in RELION.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from autospa.errors import InputError
from autospa.io.scheme_files import (
    backup_scheme,
    locked,
    read_exit_status,
    read_job_template,
    read_pipeline,
    read_scheme,
    request_abort,
    scheme_lock,
    write_job_template,
    write_scheme,
)
from autospa.orchestration.runner import SchemeLocation, locate_scheme
from autospa.scheme.model import UNDEFINED, JobMode, RunStatus, Scheme, SchemeError, parse_bool

log = logging.getLogger(__name__)

#: Default wait for the scheme lock in edits (RELION waits about 2 minutes).
EDIT_LOCK_WAIT_S = 60.0


def edit_scheme(
    scheme: str | Path,
    change: Callable[[Scheme], Scheme],
    project_dir: str | Path | None = None,
    lock_wait_s: float = EDIT_LOCK_WAIT_S,
) -> Scheme:
    """Apply ``change`` to a scheme under its lock; returns the new scheme.

    Raises
    ------
    InputError
        No scheme.star, or the change is invalid (unknown variable, bad value...).
    LockError
        A runner holds the scheme for longer than ``lock_wait_s``.
    """
    loc = locate_scheme(scheme, project_dir)
    path = loc.scheme_dir / "scheme.star"
    if not path.exists():
        raise InputError(path, "no such scheme (scheme.star is missing)")
    with locked(scheme_lock(loc.project_dir, loc.name), lock_wait_s):
        old = read_scheme(loc.scheme_dir)
        try:
            new = change(old)
        except (SchemeError, ValueError) as exc:
            raise InputError(path, str(exc)) from None
        backup_scheme(loc.scheme_dir)
        write_scheme(loc.scheme_dir, new)
    return new


def set_variable(
    scheme: str | Path,
    name: str,
    value: str,
    original_value: str | None = None,
    project_dir: str | Path | None = None,
    lock_wait_s: float = EDIT_LOCK_WAIT_S,
) -> Scheme:
    """``--set_var NAME --value V [--original_value W]`` (bool: true/false/1/0, float: a number)."""
    return edit_scheme(scheme, lambda s: s.with_value(name, value, original_value), project_dir, lock_wait_s)


def reset_scheme(
    scheme: str | Path, project_dir: str | Path | None = None, lock_wait_s: float = EDIT_LOCK_WAIT_S
) -> Scheme:
    """``--reset``: variables to reset values, jobs unstarted, current node = start node."""
    return edit_scheme(scheme, Scheme.reset, project_dir, lock_wait_s)


def set_current_node(
    scheme: str | Path, node: str, project_dir: str | Path | None = None, lock_wait_s: float = EDIT_LOCK_WAIT_S
) -> Scheme:
    """``--set_current_node NODE`` (FIX: RELION does not check that the node exists; we do)."""

    def change(s: Scheme) -> Scheme:
        if node not in s.node_names():
            raise SchemeError(f"{node!r} is not a node of {s.name} (nodes: {', '.join(sorted(s.node_names()))})")
        return s.with_current_node(node)

    return edit_scheme(scheme, change, project_dir, lock_wait_s)


def set_has_started(
    scheme: str | Path, job: str, value: str | bool, project_dir: str | Path | None = None,
    lock_wait_s: float = EDIT_LOCK_WAIT_S,
) -> Scheme:
    """``--set_has_started JOB --value True|False``: False makes the next visit start afresh."""
    try:
        flag = value if isinstance(value, bool) else parse_bool(str(value))
    except ValueError:
        raise InputError(None, f"--set_has_started {job}: {value!r} is not a boolean (True/False/1/0)") from None
    return edit_scheme(scheme, lambda s: s.with_job(job, has_started=flag), project_dir, lock_wait_s)


def set_job_mode(
    scheme: str | Path, job: str, mode: str, project_dir: str | Path | None = None,
    lock_wait_s: float = EDIT_LOCK_WAIT_S,
) -> Scheme:
    """``--set_job_mode JOB --value new|continue``."""
    try:
        m = JobMode(mode)
    except ValueError:
        raise InputError(None, f"job mode {mode!r} is not 'new' or 'continue'") from None
    return edit_scheme(scheme, lambda s: s.with_job(job, mode=m), project_dir, lock_wait_s)


def abort_scheme(scheme: str | Path, project_dir: str | Path | None = None) -> list[Path]:
    """``--abort``: ``RELION_JOB_ABORT_NOW`` in the scheme folder, and in the current job's
    directory if the current node is a started job. Does not wait. Returns the files made."""
    loc = locate_scheme(scheme, project_dir)
    s = read_scheme(loc.scheme_dir)
    made = []
    job = s.jobs.get(s.current_node)
    if job is not None and job.has_started and job.job_dir and (loc.project_dir / job.job_dir).is_dir():
        made.append(request_abort(loc.project_dir / job.job_dir))
    made.append(request_abort(loc.scheme_dir))
    return made


def edit_job_option(job_star: str | Path, option: str, value: str, allow_new: bool = False) -> Path:
    """``relion_pipeliner --editJob FILE --editOption KEY --editValue V``: True/False become Yes/No.

    Raises
    ------
    InputError
        The job.star does not have that option (unless ``allow_new``).
    """
    path = Path(job_star)
    if path.is_dir():
        path = path / "job.star"
    tpl = read_job_template(path)
    if option not in tpl.options and not allow_new:
        raise InputError(path, f"has no option {option!r} (options: {', '.join(sorted(tpl.options))})")
    if value in ("True", "true"):
        value = "Yes"
    elif value in ("False", "false"):
        value = "No"
    return write_job_template(path, tpl.with_option(option, value))


# ------------------------------------------------------------------------------------------------
# status
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobStatus:
    """One job node: mode, whether it started, its directory and the pipeline's status of it."""

    name: str
    mode: str
    has_started: bool
    job_dir: str
    pipeline_status: str


@dataclass(frozen=True)
class SchemeStatus:
    """Where a scheme is: running or not (and the runner's PID), current node, last run status."""

    name: str
    exists: bool
    running: bool
    runner: str
    current_node: str
    status: str
    message: str
    jobs: tuple[JobStatus, ...] = ()
    variables: tuple[tuple[str, str], ...] = ()


def scheme_status(scheme: str | Path, project_dir: str | Path | None = None) -> SchemeStatus:
    """Summarise a scheme without taking its lock."""
    loc: SchemeLocation = locate_scheme(scheme, project_dir)
    if not (loc.scheme_dir / "scheme.star").exists():
        return SchemeStatus(loc.name, False, False, "", UNDEFINED, "", "")
    s = read_scheme(loc.scheme_dir)
    lock = scheme_lock(loc.project_dir, loc.name)
    owner = lock.owner()
    running = owner is not None and lock.owner_alive(owner)
    runner = f"pid {owner.get('pid')} on {owner.get('host')}" if running and owner else ""
    status = s.status.value
    if s.status is RunStatus.RUNNING and not running:
        status = "stopped (runner gone)"
    elif not status:
        status = "not run"
        if read_exit_status(loc.scheme_dir):
            status = f"ended ({read_exit_status(loc.scheme_dir)})"
    pipeline = read_pipeline(loc.project_dir)
    jobs = []
    for j in sorted(s.jobs.values(), key=lambda j: j.name):
        proc = pipeline.process(j.job_dir) if j.job_dir else None
        jobs.append(JobStatus(j.name, j.mode.value, j.has_started, j.job_dir or "", proc.status if proc else ""))
    variables = tuple(
        (v.name, str(v.value)) for v in sorted(s.variables.values(), key=lambda v: v.name)
    )
    return SchemeStatus(
        name=loc.name,
        exists=True,
        running=running,
        runner=runner,
        current_node=s.current_node,
        status=status,
        message=s.message,
        jobs=tuple(jobs),
        variables=variables,
    )


__all__ = [
    "JobStatus",
    "SchemeStatus",
    "abort_scheme",
    "edit_job_option",
    "edit_scheme",
    "reset_scheme",
    "scheme_status",
    "set_current_node",
    "set_has_started",
    "set_job_mode",
    "set_variable",
]
